//! The final summary: a table for people and one JSON object for scripts, with the embedded
//! engine's own figures (device reads per record read, index bytes per record, write
//! amplification) taken from its stats before and after the run, and the per-second series
//! (throughput and errors by kind), so a window of errors (a node killed, partitions
//! unavailable until the cluster moves them) shows when it started and how long it lasted.

use peregrine_engine::EngineStats;
use serde_json::{Value, json};

use crate::cli::RunArgs;
use crate::report::{Point, percentiles};
use crate::run::Outcome;
use crate::target::ErrorKind;

/// Engine figures over the run (embedded mode).
#[derive(Clone, Debug, Default)]
pub struct EngineFigures {
    /// Device read I/Os per record read that was not served from memory.
    pub device_reads_per_record_read: f64,
    /// Index RAM per record.
    pub index_bytes_per_record: f64,
    /// Device bytes written (client and defrag streams) per record byte clients appended.
    pub write_amplification: f64,
}

/// Computes the engine figures from stats taken before and after the run.
pub fn engine_figures(before: &EngineStats, after: &EngineStats) -> EngineFigures {
    let reads = after.record_reads_from_device.saturating_sub(before.record_reads_from_device);
    let ios = after.device_reads.saturating_sub(before.device_reads);
    // Device bytes of both write streams (client and defrag) per record byte written by clients.
    let device_bytes =
        |s: &EngineStats| s.devices.iter().map(|d| d.write_bytes + d.defrag_device_write_bytes).sum::<u64>();
    let written = device_bytes(after).saturating_sub(device_bytes(before));
    let appended: u64 = after.devices.iter().map(|d| d.appended_bytes).sum::<u64>()
        - before.devices.iter().map(|d| d.appended_bytes).sum::<u64>();
    EngineFigures {
        device_reads_per_record_read: if reads == 0 { 0.0 } else { ios as f64 / reads as f64 },
        index_bytes_per_record: if after.records == 0 { 0.0 } else { after.index_bytes as f64 / after.records as f64 },
        write_amplification: if appended == 0 { 0.0 } else { written as f64 / appended as f64 },
    }
}

/// The summary as JSON.
pub fn to_json(args: &RunArgs, outcome: &Outcome, engine: Option<&EngineFigures>) -> Value {
    let secs = outcome.elapsed.as_secs_f64().max(1e-9);
    let t = &outcome.total;
    let [r50, r99, r999] = percentiles(&t.read);
    let [w50, w99, w999] = percentiles(&t.write);
    let by_kind: serde_json::Map<String, Value> =
        ErrorKind::ALL.iter().map(|k| (k.name().to_string(), json!(t.errors[k.index()]))).collect();
    let mut v = json!({
        "workload": args.workload.to_string(),
        "target": if args.embedded.is_some() { "embedded" } else { "hosts" },
        "concurrency": args.concurrency,
        "keys": args.keys,
        "object_size_min": args.object_size.min,
        "object_size_max": args.object_size.max,
        "elapsed_s": secs,
        "ops": t.read.len() + t.write.len(),
        "ops_per_sec": (t.read.len() + t.write.len()) as f64 / secs,
        "reads_per_sec": t.read.len() as f64 / secs,
        "writes_per_sec": t.write.len() as f64 / secs,
        "read_p50_us": r50, "read_p99_us": r99, "read_p999_us": r999,
        "write_p50_us": w50, "write_p99_us": w99, "write_p999_us": w999,
        "errors": t.error_total(),
        "errors_by_kind": by_kind,
        "per_second": per_second(&outcome.points),
    });
    if let (Some(e), Some(obj)) = (engine, v.as_object_mut()) {
        obj.insert("device_reads_per_record_read".into(), json!(e.device_reads_per_record_read));
        obj.insert("index_bytes_per_record".into(), json!(e.index_bytes_per_record));
        obj.insert("write_amplification".into(), json!(e.write_amplification));
    }
    v
}

/// Rounded to 0.1: the series are rates over about a second.
fn tenths(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// The per-second series, one array per figure: `t` (seconds since the start at the end of
/// each interval), `reads_per_s`, `writes_per_s`, and `errors_per_s` with one array per kind.
fn per_second(points: &[Point]) -> Value {
    let series = |f: &dyn Fn(&Point) -> f64| Value::from(points.iter().map(|p| tenths(f(p))).collect::<Vec<f64>>());
    let errors: serde_json::Map<String, Value> =
        ErrorKind::ALL.iter().map(|k| (k.name().to_string(), series(&|p: &Point| p.errors_per_s[k.index()]))).collect();
    json!({
        "t": series(&|p: &Point| p.t),
        "reads_per_s": series(&|p: &Point| p.reads_per_s),
        "writes_per_s": series(&|p: &Point| p.writes_per_s),
        "errors_per_s": errors,
    })
}

/// For each error kind of the per-second series (not-found reads aside): when its errors started and ended (the start
/// of the first interval with any, the end of the last) and the peak rate.
fn error_windows(summary: &Value) -> Vec<String> {
    let Some(series) = summary.get("per_second") else { return Vec::new() };
    let Some(t) = series.get("t").and_then(Value::as_array) else { return Vec::new() };
    let t: Vec<f64> = t.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect();
    let Some(kinds) = series.get("errors_per_s").and_then(Value::as_object) else { return Vec::new() };
    let mut out = Vec::new();
    for (kind, values) in kinds.iter().filter(|(k, _)| k.as_str() != ErrorKind::NotFound.name()) {
        let values: Vec<f64> =
            values.as_array().map(|a| a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect()).unwrap_or_default();
        let (Some(first), Some(last)) = (values.iter().position(|v| *v > 0.0), values.iter().rposition(|v| *v > 0.0))
        else {
            continue;
        };
        let start = if first == 0 { 0.0 } else { t.get(first - 1).copied().unwrap_or(0.0) };
        let end = t.get(last).copied().unwrap_or(0.0);
        let peak = values.iter().copied().fold(0.0, f64::max);
        out.push(format!("{kind} {start:.1}-{end:.1} s (peak {peak:.0}/s)"));
    }
    out
}

/// The summary as a table.
pub fn table(summary: &Value) -> String {
    let get = |k: &str| summary.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let mut out = String::new();
    out.push_str(&format!(
        "\n== {} over {:.1} s, {} in flight ==\n",
        summary.get("workload").and_then(Value::as_str).unwrap_or("?"),
        get("elapsed_s"),
        get("concurrency")
    ));
    out.push_str(&format!(
        "throughput     {:>12.0} ops/s  (reads {:.0}/s, writes {:.0}/s)\n",
        get("ops_per_sec"),
        get("reads_per_sec"),
        get("writes_per_sec")
    ));
    out.push_str(&format!(
        "read latency   p50 {:>7} us  p99 {:>7} us  p99.9 {:>7} us\n",
        get("read_p50_us"),
        get("read_p99_us"),
        get("read_p999_us")
    ));
    out.push_str(&format!(
        "write latency  p50 {:>7} us  p99 {:>7} us  p99.9 {:>7} us\n",
        get("write_p50_us"),
        get("write_p99_us"),
        get("write_p999_us")
    ));
    let kinds = summary.get("errors_by_kind").and_then(Value::as_object);
    let listed: Vec<String> = kinds
        .map(|m| m.iter().filter(|(_, n)| n.as_u64().unwrap_or(0) > 0).map(|(k, n)| format!("{k} {n}")).collect())
        .unwrap_or_default();
    out.push_str(&format!(
        "errors         {}{}\n",
        get("errors"),
        if listed.is_empty() { String::new() } else { format!("  ({})", listed.join(", ")) }
    ));
    let windows = error_windows(summary);
    if !windows.is_empty() {
        out.push_str(&format!("errors when    {}\n", windows.join(", ")));
    }
    if summary.get("index_bytes_per_record").is_some() {
        out.push_str(&format!(
            "engine         {:.2} device reads per record read, {:.1} index bytes per record, write amplification {:.2}\n",
            get("device_reads_per_record_read"),
            get("index_bytes_per_record"),
            get("write_amplification")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::*;
    use crate::cli::Cli;
    use crate::report::Interval;

    #[test]
    fn json_and_table_carry_errors_per_second_by_kind() {
        let args = Cli::parse_from(["peregrine-bench", "--hosts", "127.0.0.1:3000"]).run;
        let mut total = Interval::default();
        let points: Vec<Point> = (1..=5)
            .map(|s| {
                let mut iv = Interval::default();
                for _ in 0..100 {
                    iv.read(Duration::from_micros(200));
                }
                // A node is killed in the third second: unavailable until the fourth's end.
                if (3..=4).contains(&s) {
                    for _ in 0..40 * s {
                        iv.error(ErrorKind::Unavailable);
                    }
                }
                total.merge(&iv);
                Point::of_interval(f64::from(s), 1.0, &iv)
            })
            .collect();
        let outcome = Outcome {
            elapsed: Duration::from_secs(5),
            total,
            points,
            intervals: Vec::new(),
            verify_failures: Vec::new(),
        };
        let v = to_json(&args, &outcome, None);
        assert_eq!(v["errors"], 280);
        assert_eq!(v["errors_by_kind"]["unavailable"], 280);
        let series = &v["per_second"];
        assert_eq!(series["t"], json!([1.0, 2.0, 3.0, 4.0, 5.0]));
        assert_eq!(series["reads_per_s"], json!([100.0, 100.0, 100.0, 100.0, 100.0]));
        assert_eq!(series["errors_per_s"]["unavailable"], json!([0.0, 0.0, 120.0, 160.0, 0.0]));
        assert_eq!(series["errors_per_s"]["timeout"], json!([0.0, 0.0, 0.0, 0.0, 0.0]));
        assert_eq!(series["errors_per_s"].as_object().unwrap().len(), ErrorKind::ALL.len());
        let table = table(&v);
        assert!(table.contains("errors when    unavailable 2.0-4.0 s (peak 160/s)"), "{table}");
    }
}
