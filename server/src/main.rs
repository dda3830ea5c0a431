//! `peregrine`: the node daemon. With no arguments it serves namespace `test` on a file device
//! under `./data` at 127.0.0.1:3000; `--config FILE` reads a TOML configuration
//! (see `docs/peregrine.example.toml`), and flags override the common settings.

mod batch;
mod config;
mod conn;
mod frames;
mod metrics;
mod node;
mod record;
mod scan;
mod values;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use peregrine_engine::{Engine, affinity};
use tokio::sync::{Semaphore, watch};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::node::Node;

/// The Peregrine node daemon (speaks the Aerospike client protocol).
#[derive(Parser, Debug)]
#[command(name = "peregrine", version, about)]
struct Args {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Client address (overrides the config).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<std::net::SocketAddr>,
    /// Directory for file devices (overrides the config).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Prometheus endpoint address, or "off" (overrides the config).
    #[arg(long, value_name = "HOST:PORT|off")]
    metrics_listen: Option<String>,
}

fn load(args: &Args) -> Result<Config, String> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => {
            let mut c = Config::default();
            c.fill_defaults();
            c
        }
    };
    if let Some(l) = args.listen {
        config.server.listen = l;
    }
    if let Some(d) = &args.data_dir {
        config.server.data_dir = d.clone();
    }
    match args.metrics_listen.as_deref() {
        None => {}
        Some("off") => config.server.metrics_listen = None,
        Some(a) => config.server.metrics_listen = Some(a.parse().map_err(|e| format!("--metrics-listen {a}: {e}"))?),
    }
    config.validate()?;
    Ok(config)
}

fn open_engines(config: &Config) -> Result<Vec<(String, Engine)>, String> {
    let io_cpus = if config.server.pin_io_threads {
        affinity::split_io_cpu().map(|(io, _)| vec![io]).unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut engines = Vec::new();
    for ns in &config.namespaces {
        let ec = ns.engine_config(&config.server.data_dir, io_cpus.clone())?;
        let devices: Vec<String> = ec.devices.iter().map(|d| d.path.display().to_string()).collect();
        let engine = Engine::open(ec).map_err(|e| format!("namespace {}: {e}", ns.name))?;
        tracing::info!(namespace = %ns.name, devices = %devices.join(","), records = engine.stats().records, "namespace ready");
        engines.push((ns.name.clone(), engine));
    }
    Ok(engines)
}

async fn run(config: Config, engines: Vec<(String, Engine)>) -> Result<(), String> {
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let engines_for_metrics = Arc::new(engines.clone());
    if let Some(addr) = config.server.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
        tokio::spawn(metrics::serve(l, metrics.clone(), engines_for_metrics.clone(), shutdown_rx.clone()));
    }
    let node = Arc::new(Node::new(config.server.clone(), engines, metrics.clone()));
    tracing::info!(listen = %config.server.listen, node = %node.node_id, "peregrine node serving");
    let connections = Arc::new(Semaphore::new(config.server.max_connections));
    let budget = Arc::new(Semaphore::new(config.server.max_inflight_request_bytes as usize));
    let mut tasks = tokio::task::JoinSet::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("installing the SIGTERM handler: {e}"))?;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: shutting down"); break }
        };
        while tasks.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        metrics.connections_accepted.fetch_add(1, Ordering::Relaxed);
        let Ok(slot) = connections.clone().try_acquire_owned() else {
            metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, max = config.server.max_connections, "too many connections; closing a new one");
            drop(stream);
            continue;
        };
        let (node, budget, shutdown) = (node.clone(), budget.clone(), shutdown_rx.clone());
        tasks.spawn(async move {
            node.metrics.connections_open.fetch_add(1, Ordering::Relaxed);
            conn::serve(node.clone(), stream, peer, budget, shutdown).await;
            node.metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
    drop(listener);
    let _ = shutdown_tx.send(true);
    let grace = Duration::from_millis(config.server.shutdown_grace_ms);
    if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await.is_err() {
        tracing::warn!(left = tasks.len(), "connections still busy after the grace period; closing them");
        tasks.abort_all();
    }
    for (name, engine) in engines_for_metrics.iter() {
        match engine.close() {
            Ok(()) => tracing::info!(namespace = %name, "flushed and marked clean"),
            Err(e) => tracing::error!(namespace = %name, error = %e, "closing the namespace failed"),
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let result = load(&args).and_then(|config| {
        let engines = open_engines(&config)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("starting tokio: {e}"))?;
        rt.block_on(run(config, engines))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peregrine: {e}");
            ExitCode::from(1)
        }
    }
}
