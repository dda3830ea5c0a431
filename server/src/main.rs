//! `peregrine`: the node daemon (the logic is in the `peregrine_server` library). With no arguments it serves namespace `test` on a file device
//! under `./data` at 127.0.0.1:3000; `--config FILE` reads a TOML configuration
//! (see `docs/peregrine.example.toml`), and flags override the common settings.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use peregrine_server::config::{self, Config};
use peregrine_server::{open_engines, run};

/// The Peregrine node daemon (speaks the Aerospike client protocol).
#[derive(Parser, Debug)]
#[command(name = "peregrine", version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Sub>,
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

#[derive(clap::Subcommand, Debug)]
enum Sub {
    /// Starts a cluster of N node processes on loopback and waits until every partition has
    /// a leader; Ctrl-C or SIGTERM stops them all.
    LocalCluster {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Directory for configs, data and logs.
        #[arg(long, value_name = "DIR", default_value = "data/local-cluster")]
        data_dir: PathBuf,
        /// Client port of the first node (node i: base + 10 i; fabric +1, metrics +2).
        #[arg(long, default_value_t = 3000)]
        base_port: u16,
    },
}

fn local_cluster(nodes: usize, data_dir: &std::path::Path, base_port: u16) -> Result<(), String> {
    std::fs::create_dir_all(data_dir).map_err(|e| format!("creating {}: {e}", data_dir.display()))?;
    let data_dir = std::fs::canonicalize(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    let binary = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
    let lc = peregrine_server::local_cluster::LocalCluster {
        nodes,
        data_dir,
        base_port,
        binary,
        extra_cluster_config: String::new(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("starting tokio: {e}"))?;
    rt.block_on(lc.run(peregrine_server::shutdown_signals()))
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
    if let Some(a) = args.metrics_listen.as_deref() {
        config.server.metrics_listen = config::parse_metrics_listen(a).map_err(|e| format!("--metrics-listen: {e}"))?;
    }
    config.validate()?;
    Ok(config)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=error")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: not in log files, pipes or journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    if let Some(Sub::LocalCluster { nodes, data_dir, base_port }) = &args.command {
        return match local_cluster(*nodes, data_dir, *base_port) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("peregrine local-cluster: {e}");
                ExitCode::from(1)
            }
        };
    }
    let result = load(&args).and_then(|config| {
        let engines = open_engines(&config)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("starting tokio: {e}"))?;
        rt.block_on(run(config, engines, peregrine_server::shutdown_signals()))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peregrine: {e}");
            ExitCode::from(1)
        }
    }
}
