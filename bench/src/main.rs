//! peregrine-bench: load-test an embedded Peregrine engine or a cluster, with HDR latency,
//! per-second progress, a JSON summary, plots, and a comparison against the physical limit.

mod cli;
mod physical;
mod plot;
mod replicated;
mod report;
mod run;
mod summary;
mod target;
mod workload;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use peregrine_engine::affinity;
use peregrine_engine::io::{IoBackendChoice, IoOptions};
use peregrine_engine::{Engine, EngineConfig};

use crate::cli::{Cli, Command, RunArgs, SizeRange, WorkerPlacement, Workload, parse_size};
use crate::target::Target;

fn open_embedded(args: &RunArgs, format: bool) -> Result<Target, String> {
    let Some(path) = &args.embedded else { return Err("no --embedded path".into()) };
    let mut config = EngineConfig::single_file(args.namespace.clone(), path, args.device_size);
    config.write_block_bytes = u32::try_from(args.write_block).map_err(|_| "--write-block too large")?;
    config.commit_to_device = args.commit_to_device;
    config.writer.write_chunk_bytes = u32::try_from(args.write_chunk).map_err(|_| "--write-chunk too large")?;
    config.writer.write_queue_depth = args.write_depth;
    config.writer.bulk_write_chunk_bytes =
        u32::try_from(args.bulk_write_chunk).map_err(|_| "--bulk-write-chunk too large")?;
    config.writer.bulk_write_queue_depth = args.bulk_write_depth;
    config.writer.post_write_cache_bytes = args.post_write_cache;
    config.format_foreign_devices = format;
    config.io = IoOptions {
        backend: match args.io_backend.as_str() {
            "uring" => IoBackendChoice::Uring,
            "blocking" => IoBackendChoice::Blocking,
            _ => IoBackendChoice::Auto,
        },
        io_thread_cpus: if args.no_pin {
            Vec::new()
        } else {
            affinity::split_io_cpu().map(|(io, _)| vec![io]).unwrap_or_default()
        },
        ..IoOptions::default()
    };
    let engine = Engine::open(config).map_err(|e| format!("opening {}: {e}", path.display()))?;
    Ok(Target::embedded(engine, &args.set, args.ttl))
}

/// The request runtime. `split`: one worker per CPU left after the engine's I/O thread's, pinned
/// there (best for reads: no thread migrations, measured +15 %). `float`: one worker per CPU,
/// unpinned (best for CPU-heavy loads). Without pinning at all (--no-pin) workers float too.
fn runtime(workers: WorkerPlacement, pin: bool) -> Result<tokio::runtime::Runtime, String> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all();
    if pin
        && workers == WorkerPlacement::Split
        && let Some((_, cpus)) = affinity::split_io_cpu()
    {
        b.worker_threads(cpus.len());
        b.on_thread_start(move || {
            if let Err(e) = affinity::pin_current_thread(&cpus) {
                tracing::warn!(error = %e, "could not pin a worker thread");
            }
        });
    }
    b.build().map_err(|e| format!("starting tokio: {e}"))
}

fn seeds(hosts: &str) -> Result<Vec<std::net::SocketAddr>, String> {
    use std::net::ToSocketAddrs;
    let mut out = Vec::new();
    for h in hosts.split(',').filter(|h| !h.is_empty()) {
        let addrs = h.to_socket_addrs().map_err(|e| format!("--hosts {h}: {e}"))?;
        out.extend(addrs);
    }
    if out.is_empty() {
        return Err("--hosts lists no address".into());
    }
    Ok(out)
}

fn run_workload(args: &RunArgs) -> Result<ExitCode, String> {
    args.validate()?;
    let rt = runtime(if args.hosts.is_some() { WorkerPlacement::Float } else { args.workers }, !args.no_pin)?;
    let target = Arc::new(match &args.hosts {
        Some(hosts) => rt.block_on(Target::remote(
            &seeds(hosts)?,
            &args.namespace,
            &args.set,
            args.ttl,
            std::time::Duration::from_millis(args.timeout_ms),
        ))?,
        None => open_embedded(args, false)?,
    });
    let before = target.engine_stats();
    let outcome = rt.block_on(run::run(args, target.clone()));
    target.flush()?;
    let figures = match (before, target.engine_stats()) {
        (Some(b), Some(a)) => Some(summary::engine_figures(&b, &a)),
        _ => None,
    };
    let json = summary::to_json(args, &outcome, figures.as_ref());
    eprint!("{}", summary::table(&json));
    for f in &outcome.verify_failures {
        eprintln!("verify: {f}");
    }
    if let Some(path) = &args.histogram_out {
        report::write_histogram_log(path, &outcome.intervals)?;
    }
    if let Some(path) = &args.plot {
        let title = format!("peregrine-bench {} ({} in flight)", args.workload, args.concurrency);
        std::fs::write(path, plot::render(&title, &outcome.points))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    target.close()?;
    if args.json {
        println!("{json}");
    }
    Ok(if outcome.total.errors[target::ErrorKind::Verify.index()] > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

/// No arguments: one canonical workload on a temporary device, two numbers.
fn canonical() -> Result<ExitCode, String> {
    let dir = std::path::Path::new("/var/tmp").join(format!("peregrine-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let result = (|| {
        let mut args = Cli::parse_from(["peregrine-bench", "--quiet"]).run;
        args.embedded = Some(dir.join("canonical.dat"));
        args.device_size = parse_size("2G")?;
        args.keys = 500_000;
        args.object_size = SizeRange { min: 1024, max: 1024 };
        args.workload = Workload::Insert;
        eprintln!("# canonical workload: 500k keys of 1 KiB on a 2 GiB file in {}; loading...", dir.display());
        let target = Arc::new(open_embedded(&args, false)?);
        let rt = runtime(WorkerPlacement::Split, true)?;
        rt.block_on(run::run(&args, target.clone()));
        args.workload = Workload::ReadUpdate { read_pct: 80 };
        args.duration = Some(25.0);
        eprintln!("# running 80% reads / 20% updates, 32 in flight, 25 s");
        let outcome = rt.block_on(run::run(&args, target.clone()));
        target.close()?;
        let json = summary::to_json(&args, &outcome, None);
        println!("throughput: {:.0} ops/s", json["ops_per_sec"].as_f64().unwrap_or(0.0));
        println!(
            "p99 latency: {} us (reads), {} us (writes)",
            json["read_p99_us"].as_u64().unwrap_or(0),
            json["write_p99_us"].as_u64().unwrap_or(0)
        );
        Ok(ExitCode::SUCCESS)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn main() -> ExitCode {
    // openraft warns about every failed RPC; thousands of groups at start and shutdown make
    // that a flood, so `replicated` shows only its errors unless RUST_LOG says otherwise.
    let default_filter =
        if std::env::args().nth(1).as_deref() == Some("replicated") { "warn,openraft=error" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = if std::env::args_os().len() == 1 {
        canonical()
    } else {
        let cli = Cli::parse();
        match cli.command {
            Some(Command::Physical(args)) => physical::physical(args.clone(), open_embedded, runtime).map(|v| {
                if args.json {
                    println!("{v}");
                }
                ExitCode::SUCCESS
            }),
            Some(Command::Replicated(args)) => {
                let json = args.json;
                replicated::replicated(args).map(|v| {
                    if json {
                        println!("{v}");
                    }
                    ExitCode::SUCCESS
                })
            }
            None => run_workload(&cli.run),
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("peregrine-bench: {e}");
            ExitCode::from(1)
        }
    }
}
