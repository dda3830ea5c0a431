//! The Peregrine node: configuration, connections, the Aerospike wire protocol over the storage
//! engine, metrics and shutdown. The `peregrine` binary is a thin wrapper around [`run`]; tests
//! of other crates start a node in-process with [`start_in_background`].

mod batch;
mod cluster;
pub mod config;
mod conn;
mod frames;
pub mod local_cluster;
mod metrics;
mod node;
mod record;
mod route;
mod scan;
mod values;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use peregrine_engine::{Engine, MaintenanceMode, affinity};
use tokio::sync::{Semaphore, watch};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::node::Node;

/// Opens every configured namespace.
pub fn open_engines(config: &Config) -> Result<Vec<(String, Engine)>, String> {
    let io_cpus = if config.server.pin_io_threads {
        affinity::split_io_cpu().map(|(io, _)| vec![io]).unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut engines = Vec::new();
    for ns in &config.namespaces {
        let mut ec = ns.engine_config(&config.server.data_dir, io_cpus.clone())?;
        if config.cluster.is_some() {
            // Expiry and eviction go through the partition groups' logs.
            ec.maintenance = MaintenanceMode::External;
        }
        let devices: Vec<String> = ec.devices.iter().map(|d| d.path.display().to_string()).collect();
        let engine = Engine::open(ec).map_err(|e| format!("namespace {}: {e}", ns.name))?;
        tracing::info!(namespace = %ns.name, devices = %devices.join(","), records = engine.stats().records, "namespace ready");
        engines.push((ns.name.clone(), engine));
    }
    Ok(engines)
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signals() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot install the SIGTERM handler");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}

/// Serves until `stop` resolves, then stops accepting, lets connections finish their request
/// (up to `shutdown_grace_ms`), and flushes and closes every namespace.
pub async fn run(
    config: Config,
    engines: Vec<(String, Engine)>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    // The metrics port is bound first, so a taken metrics port stops the node before clients
    // can connect. (In a cluster the fabric port is still bound after the client port, by
    // `Cluster::start`: a taken fabric port stops a node clients may have reached.)
    let metrics_listener = bind_metrics(&config)?;
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
    serve(config, engines, listener, metrics_listener, stop).await
}

fn bind_metrics(config: &Config) -> Result<Option<std::net::TcpListener>, String> {
    let Some(addr) = config.server.metrics_listen else { return Ok(None) };
    let l = std::net::TcpListener::bind(addr).map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
    l.set_nonblocking(true).map_err(|e| format!("metrics listener {addr}: {e}"))?;
    Ok(Some(l))
}

async fn serve(
    config: Config,
    engines: Vec<(String, Engine)>,
    listener: tokio::net::TcpListener,
    metrics_listener: Option<std::net::TcpListener>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let metrics = Arc::new(Metrics::new(config.server.max_inflight_request_bytes));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let engines_for_metrics = Arc::new(engines.clone());
    if let Some(l) = metrics_listener {
        let l = tokio::net::TcpListener::from_std(l).map_err(|e| format!("metrics listener: {e}"))?;
        let addr = l.local_addr().map_err(|e| format!("metrics listener: {e}"))?;
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
        tokio::spawn(metrics::serve(l, metrics.clone(), engines_for_metrics.clone(), shutdown_rx.clone()));
    }
    let cluster = match &config.cluster {
        None => None,
        Some(c) => {
            let name =
                c.name.clone().or_else(|| config.server.cluster_name.clone()).unwrap_or_else(|| "peregrine".into());
            let service = Node::new(config.server.clone(), Vec::new(), metrics.clone(), None).service().to_owned();
            Some(
                cluster::Cluster::start(c.clone(), name, service, config.server.data_dir.clone(), engines.clone())
                    .await?,
            )
        }
    };
    let node = Arc::new(Node::new(config.server.clone(), engines, metrics.clone(), cluster.clone()));
    if let Some(c) = &cluster {
        c.fabric.set_proxy_handler(Arc::new(route::ServerProxy { node: Arc::downgrade(&node) }));
    }
    tracing::info!(listen = %config.server.listen, node = %node.node_id, "peregrine node serving");
    let connections = Arc::new(Semaphore::new(config.server.max_connections));
    let budget = metrics.request_budget.clone();
    let mut tasks = tokio::task::JoinSet::new();
    let mut stop = std::pin::pin!(stop);
    // In a cluster, a stop first hands this node's leaderships over while it keeps accepting
    // and serving (commands are proxied to the new leaders; clients learn the new map).
    let mut handover: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> = None;
    let mut stopping = false;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut stop, if !stopping => {
                stopping = true;
                match &cluster {
                    Some(c) => {
                        let c = c.clone();
                        handover = Some(Box::pin(async move { c.hand_over().await }));
                        continue;
                    }
                    None => break,
                }
            }
            () = async { if let Some(h) = handover.as_mut() { h.await } }, if handover.is_some() => break,
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
    if let Some(c) = &cluster {
        c.shutdown().await;
    }
    for (name, engine) in engines_for_metrics.iter() {
        match engine.close() {
            Ok(()) => tracing::info!(namespace = %name, "flushed and marked clean"),
            Err(e) => tracing::error!(namespace = %name, error = %e, "closing the namespace failed"),
        }
    }
    Ok(())
}

/// A node running on its own threads (for tests of other crates): stop it with
/// [`BackgroundNode::stop`].
#[derive(Debug)]
pub struct BackgroundNode {
    /// The address it serves.
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl BackgroundNode {
    /// Stops accepting, drains, flushes and closes; returns the node's result.
    pub fn stop(mut self) -> Result<(), String> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err("node thread panicked".into()),
            None => Ok(()),
        }
    }
}

impl Drop for BackgroundNode {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Opens the namespaces and serves on a background thread. The listen address may use port 0.
pub fn start_in_background(mut config: Config) -> Result<BackgroundNode, String> {
    config.fill_defaults();
    config.validate()?;
    let engines = open_engines(&config)?;
    let metrics_listener = bind_metrics(&config)?;
    let std_listener = std::net::TcpListener::bind(config.server.listen).map_err(|e| format!("listen: {e}"))?;
    std_listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let addr = std_listener.local_addr().map_err(|e| e.to_string())?;
    config.server.listen = addr;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("peregrine-node".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).map_err(|e| e.to_string())?;
                serve(config, engines, listener, metrics_listener, async {
                    let _ = rx.await;
                })
                .await
            })
        })
        .map_err(|e| e.to_string())?;
    Ok(BackgroundNode { addr, stop: Some(tx), thread: Some(thread) })
}
