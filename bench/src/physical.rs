//! `peregrine-bench physical`: the device's physical limit measured by fio on the same file, in
//! the same run, next to Peregrine's own figures, as ratios. fio patterns match Peregrine's:
//! 4 KiB random reads at the same queue depth (record reads), and 1 MiB sequential writes at
//! queue depth 4 (block flushes).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::cli::{RunArgs, WorkerPlacement, Workload};
use crate::run::run;
use crate::summary::{engine_figures, to_json};
use crate::target::Target;

/// Alternating fio / Peregrine random-read rounds; medians are compared.
const READ_ROUNDS: usize = 3;

/// Whole-machine CPU busy percentage over `secs` seconds (from /proc/stat).
pub fn cpu_busy_pct(secs: f64) -> Option<f64> {
    let read = || -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().next()?;
        let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        let idle = v.get(3)? + v.get(4)?;
        Some((v.iter().take(8).sum(), idle))
    };
    let (t0, i0) = read()?;
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (t1, i1) = read()?;
    let total = t1.saturating_sub(t0).max(1);
    Some(100.0 * (total - (i1 - i0)) as f64 / total as f64)
}

fn fio(path: &Path, size: u64, secs: f64, job: &[&str]) -> Result<Value, String> {
    let mut command = Command::new("fio");
    command
        .args(["--name=peregrine-physical", "--ioengine=io_uring", "--direct=1", "--randrepeat=0", "--norandommap"])
        .args(["--lat_percentiles=1", "--output-format=json", "--time_based", "--ramp_time=1"])
        .arg(format!("--runtime={}", secs.ceil() as u64))
        .arg(format!("--filename={}", path.display()))
        .arg(format!("--size={size}"))
        .args(job);
    fio_json(command)
}

/// Runs a prepared fio command (with `--output-format=json`) and returns its JSON report.
pub(crate) fn fio_json(mut command: Command) -> Result<Value, String> {
    let out = command.output().map_err(|e| format!("cannot run fio ({e}); install it (apt-get install fio)"))?;
    if !out.status.success() {
        return Err(format!("fio failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find('{').ok_or("fio printed no JSON")?;
    serde_json::from_str(&text[start..]).map_err(|e| format!("fio output: {e}"))
}

fn fio_layout(path: &Path, size: u64) -> Result<(), String> {
    let out = Command::new("fio")
        .args(["--name=peregrine-layout", "--ioengine=io_uring", "--direct=1", "--rw=write", "--bs=1M"])
        .args(["--iodepth=4", "--end_fsync=1", "--output-format=json"])
        .arg(format!("--filename={}", path.display()))
        .arg(format!("--size={size}"))
        .output()
        .map_err(|e| format!("cannot run fio ({e}); install it (apt-get install fio)"))?;
    if out.status.success() { Ok(()) } else { Err(format!("fio failed: {}", String::from_utf8_lossy(&out.stderr))) }
}

fn fio_figures(v: &Value, dir: &str) -> (f64, f64, f64, f64) {
    let job = &v["jobs"][0][dir];
    let lat = &job["lat_ns"]["percentile"];
    let p = |k: &str| lat[k].as_f64().unwrap_or(0.0) / 1000.0;
    (job["iops"].as_f64().unwrap_or(0.0), job["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6, p("50.000000"), p("99.000000"))
}

async fn phase(args: &RunArgs, target: &Arc<Target>) -> Value {
    let before = target.engine_stats().unwrap_or_default();
    let outcome = run(args, target.clone()).await;
    if let Err(e) = target.flush() {
        eprintln!("flush after the phase failed: {e}");
    }
    let after = target.engine_stats().unwrap_or_default();
    let figures = engine_figures(&before, &after);
    to_json(args, &outcome, Some(&figures))
}

/// Runs fio and Peregrine on the same file and prints the comparison.
pub fn physical(
    mut args: RunArgs,
    open: impl Fn(&RunArgs, bool) -> Result<Target, String>,
    runtime: impl Fn(WorkerPlacement, bool) -> Result<tokio::runtime::Runtime, String>,
) -> Result<Value, String> {
    let Some(path) = args.embedded.clone() else {
        return Err("physical needs --embedded PATH (the file or device to measure)".into());
    };
    let secs = args.duration.unwrap_or(10.0);
    let qd = args.concurrency;
    let busy_start = cpu_busy_pct(2.0);
    eprintln!("# machine CPU busy before: {busy_start:.0?} %");
    let size = args.device_size;
    // First pass: write the whole file once (not measured), so the timed pass overwrites
    // allocated blocks, as Peregrine does, and the host's write cache is not flattering a fresh
    // file.
    eprintln!("# fio: laying out {size} bytes with 1 MiB sequential writes (not measured)");
    fio_layout(&path, size)?;
    eprintln!("# fio: 1 MiB sequential writes, queue depth 4, {secs} s");
    let seqw = fio(&path, size, secs, &["--rw=write", "--bs=1M", "--iodepth=4"])?;
    let (_, fio_write_mbps, _, fio_write_p99) = fio_figures(&seqw, "write");

    // fio left garbage in the file: Peregrine reformats it.
    let target = Arc::new(open(&args, true)?);
    let rt = runtime(WorkerPlacement::Split, !args.no_pin)?;
    // The load is CPU-heavy on the client side: its request threads float over every CPU.
    let load_rt = runtime(WorkerPlacement::Float, !args.no_pin)?;
    args.quiet = true;
    let mut load = args.clone();
    load.workload = Workload::Insert;
    load.duration = None;
    load.ops = None;
    eprintln!("# peregrine: insert {} keys of {} bytes", args.keys, args.object_size.max);
    let load_json = load_rt.block_on(phase(&load, &target));
    drop(load_rt);
    // Random reads: alternate fio and Peregrine rounds on the same file and compare medians
    // (the disk is shared and drifts by 10-25 % between minutes).
    let mut reads = args.clone();
    reads.workload = Workload::ReadUpdate { read_pct: 100 };
    reads.duration = Some(secs);
    let fio_job = ["--rw=randread".to_string(), "--bs=4k".to_string(), format!("--iodepth={qd}")];
    let fio_job: Vec<&str> = fio_job.iter().map(String::as_str).collect();
    let mut fio_rounds = Vec::new();
    let mut read_rounds = Vec::new();
    for round in 1..=READ_ROUNDS {
        eprintln!(
            "# round {round}/{READ_ROUNDS}: fio 4 KiB random reads, then Peregrine random reads, QD {qd}, {secs} s each"
        );
        fio_rounds.push(fio_figures(&fio(&path, size, secs, &fio_job)?, "read"));
        read_rounds.push(rt.block_on(phase(&reads, &target)));
    }
    let median_of = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let fio_iops = median_of(fio_rounds.iter().map(|r| r.0).collect());
    let fio_read_p50 = median_of(fio_rounds.iter().map(|r| r.2).collect());
    let fio_read_p99 = median_of(fio_rounds.iter().map(|r| r.3).collect());
    let ours =
        |k: &str| median_of(read_rounds.iter().map(|v| v.get(k).and_then(Value::as_f64).unwrap_or(0.0)).collect());
    let mut read_json = read_rounds[read_rounds.len() / 2].clone();
    for k in ["reads_per_sec", "read_p50_us", "read_p99_us", "read_p999_us", "device_reads_per_record_read"] {
        read_json[k] = json!(ours(k));
    }
    read_json["rounds_reads_per_sec"] =
        json!(read_rounds.iter().map(|v| v["reads_per_sec"].clone()).collect::<Vec<_>>());
    let fio_round_iops: Vec<f64> = fio_rounds.iter().map(|r| r.0).collect();
    let mut mixed = args.clone();
    mixed.workload = Workload::ReadUpdate { read_pct: 50 };
    mixed.duration = Some(secs);
    eprintln!("# peregrine: 50% reads / 50% updates, {qd} in flight, {secs} s");
    let mixed_json = rt.block_on(phase(&mixed, &target));
    target.close()?;
    let busy_end = cpu_busy_pct(2.0);

    let f = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let object = args.object_size.max as f64;
    let load_mbps = f(&load_json, "writes_per_sec") * object / 1e6;
    let result = json!({
        "fio_seq_write_1m_qd4_mbps": fio_write_mbps,
        "fio_seq_write_p99_us": fio_write_p99,
        "fio_rand_read_4k_iops": fio_iops,
        "fio_rand_read_4k_iops_rounds": fio_round_iops,
        "fio_rand_read_p50_us": fio_read_p50,
        "fio_rand_read_p99_us": fio_read_p99,
        "queue_depth": qd,
        "load": load_json,
        "load_record_mbps": load_mbps,
        "load_ratio_vs_fio_seq_write": load_mbps / fio_write_mbps.max(1e-9),
        "random_read": read_json,
        "random_read_ratio_vs_fio": f(&read_json, "reads_per_sec") / fio_iops.max(1e-9),
        "mixed_50_50": mixed_json,
        "mixed_read_ratio_vs_fio": f(&mixed_json, "reads_per_sec") / fio_iops.max(1e-9),
        "busy_start_pct": busy_start,
        "busy_end_pct": busy_end,
    });
    println!("\n== physical limit vs Peregrine on {} ({} bytes) ==", path.display(), size);
    println!("{:<44} {:>12} {:>12} {:>7}", "", "peregrine", "fio", "ratio");
    println!(
        "{:<44} {:>12.0} {:>12.0} {:>7.2}",
        "load: record MB/s vs 1 MiB seq write MB/s",
        load_mbps,
        fio_write_mbps,
        f(&result, "load_ratio_vs_fio_seq_write")
    );
    println!(
        "{:<44} {:>12.0} {:>12.0} {:>7.2}",
        format!("random reads/s vs 4 KiB IOPS (QD {qd})"),
        f(&read_json, "reads_per_sec"),
        fio_iops,
        f(&result, "random_read_ratio_vs_fio")
    );
    println!(
        "{:<44} {:>12.0} {:>12.0}",
        "random read p50 / p99 us (peregrine)",
        f(&read_json, "read_p50_us"),
        f(&read_json, "read_p99_us")
    );
    println!("{:<44} {:>12.0} {:>12.0}", "random read p50 / p99 us (fio)", fio_read_p50, fio_read_p99);
    println!(
        "{:<44} {:>12.0} {:>12.0} {:>7.2}",
        "50/50 mix: reads/s vs 4 KiB IOPS",
        f(&mixed_json, "reads_per_sec"),
        fio_iops,
        f(&result, "mixed_read_ratio_vs_fio")
    );
    println!(
        "{:<44} {:>12.0} {:>12.0}",
        "50/50 mix: read p99 / write p99 us",
        f(&mixed_json, "read_p99_us"),
        f(&mixed_json, "write_p99_us")
    );
    println!("{:<44} {:>12.2}", "device reads per record read", f(&read_json, "device_reads_per_record_read"));
    println!("{:<44} {:>12.1}", "index bytes per record", f(&read_json, "index_bytes_per_record"));
    println!("{:<44} {:?} vs fio {:?}", "read rounds (reads/s)", read_json["rounds_reads_per_sec"], fio_round_iops);
    println!("# machine CPU busy: before {busy_start:.0?} %, after {busy_end:.0?} %");
    Ok(result)
}
