//! The bench binary end to end: flag validation, embedded runs checked through the JSON
//! summary, --verify against a healthy and a tampered engine, rate limiting, output files.

#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::path::Path;
use std::process::{Command, Output};

use peregrine_engine::{Bin, Digest, Engine, EngineConfig, KeyRef, Value, WritePolicy};
use serde_json::Value as Json;

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peregrine-bench")).args(args).output().unwrap()
}

fn embedded<'a>(dev: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--embedded", dev, "--device-size", "64M", "--write-block", "1M", "--quiet", "--json"];
    v.extend_from_slice(extra);
    v
}

fn summary(out: &Output) -> Json {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last =
        stdout.lines().last().unwrap_or_else(|| panic!("no output; stderr: {}", String::from_utf8_lossy(&out.stderr)));
    serde_json::from_str(last).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_flags_get_clear_errors() {
    let cases: [(&[&str], &str); 7] = [
        (&["--workload", "XX,5", "--embedded", "/x"], "unknown kind"),
        (&["--workload", "RU,120", "--embedded", "/x"], "0 to 100"),
        (&["--keys", "0", "--embedded", "/x", "--ops", "1"], "--keys must be at least 1"),
        (&["--ops", "10"], "give a target"),
        (&["--object-size", "8", "--embedded", "/x", "--ops", "1"], "at least 16 bytes"),
        (&["--plot", "x.png", "--embedded", "/x", "--ops", "1"], "SVG"),
        (&["--device-size", "12Q", "--embedded", "/x"], "unit"),
    ];
    for (args, needle) in cases {
        let out = bench(args);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr(&out).contains(needle), "{args:?}: expected '{needle}' in: {}", stderr(&out));
    }
    let out = bench(&["--embedded", "/x", "--workload", "RU,50"]);
    assert!(stderr(&out).contains("--duration"), "{}", stderr(&out));
}

#[test]
fn embedded_insert_then_mixed_with_verify() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("dev.dat");
    let dev = dev.to_str().unwrap();
    let out = bench(&embedded(dev, &["--workload", "I", "--keys", "2000", "--object-size", "100-1500", "--bins", "3"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!(s["ops"], 2000);
    assert_eq!(s["errors"], 0);
    assert!(s["writes_per_sec"].as_f64().unwrap() > 0.0);
    assert!(s["index_bytes_per_record"].as_f64().unwrap() > 20.0);
    assert!(s["write_amplification"].as_f64().unwrap() >= 1.0);
    for key in [
        "ops_per_sec",
        "reads_per_sec",
        "read_p50_us",
        "read_p99_us",
        "read_p999_us",
        "write_p50_us",
        "write_p99_us",
        "write_p999_us",
        "device_reads_per_record_read",
    ] {
        assert!(s.get(key).is_some(), "summary lacks {key}: {s}");
    }
    assert!(s["errors_by_kind"].get("not_found").is_some());

    let out = bench(&embedded(
        dev,
        &[
            "--workload",
            "RU,50",
            "--keys",
            "2000",
            "--object-size",
            "100-1500",
            "--bins",
            "3",
            "--ops",
            "4000",
            "--verify",
        ],
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!(s["errors"], 0, "{s}");
    assert_eq!(s["errors_by_kind"]["not_found"], 0, "inserted keys went missing: {s}");
    assert!(s["reads_per_sec"].as_f64().unwrap() > 0.0 && s["writes_per_sec"].as_f64().unwrap() > 0.0);
}

#[test]
fn verify_catches_a_wrong_value() {
    let dir = tempfile::tempdir().unwrap();
    let dev_path = dir.path().join("dev.dat");
    let dev = dev_path.to_str().unwrap();
    let out = bench(&embedded(dev, &["--workload", "I", "--keys", "20"]));
    assert!(out.status.success(), "{}", stderr(&out));
    tamper(&dev_path, 5);
    let out = bench(&embedded(dev, &["--workload", "RU,100", "--keys", "20", "--ops", "2000", "--verify"]));
    assert_eq!(out.status.code(), Some(2), "verify did not fail: {}", stderr(&out));
    let s = summary(&out);
    assert!(s["errors_by_kind"]["verify"].as_u64().unwrap() > 0, "{s}");
    assert!(stderr(&out).contains("key 5"), "{}", stderr(&out));
}

/// Stores a value under key 5 that was not derived from key 5.
fn tamper(dev: &Path, key: i64) {
    let mut cfg = EngineConfig::single_file("test", dev, 64 << 20);
    cfg.write_block_bytes = 1 << 20;
    let e = Engine::open(cfg).unwrap();
    let digest = Digest::of_key(b"bench", KeyRef::Int(key));
    let bins = vec![Bin::new("b0", Value::Blob(vec![0; 1024])).unwrap()];
    e.put(&digest, b"bench", None, bins, &WritePolicy::default()).unwrap();
    e.close().unwrap();
}

#[test]
fn target_rate_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("dev.dat");
    let dev = dev.to_str().unwrap();
    assert!(bench(&embedded(dev, &["--workload", "I", "--keys", "1000"])).status.success());
    let out =
        bench(&embedded(dev, &["--workload", "RU,80", "--keys", "1000", "--target-rate", "2000", "--duration", "3"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let rate = summary(&out)["ops_per_sec"].as_f64().unwrap();
    assert!((rate - 2000.0).abs() / 2000.0 < 0.05, "held {rate:.0} ops/s instead of 2000");
}

#[test]
fn histogram_log_and_plot_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("dev.dat");
    let hist = dir.path().join("h.hlog");
    let svg = dir.path().join("p.svg");
    let (dev, hist_s, svg_s) = (dev.to_str().unwrap(), hist.to_str().unwrap(), svg.to_str().unwrap());
    assert!(bench(&embedded(dev, &["--workload", "I", "--keys", "500"])).status.success());
    let out = bench(&embedded(
        dev,
        &["--workload", "RU,50", "--keys", "500", "--duration", "2.2", "--histogram-out", hist_s, "--plot", svg_s],
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    let log = std::fs::read_to_string(&hist).unwrap();
    assert!(log.contains("#[BaseTime:"), "{log}");
    assert!(log.lines().filter(|l| l.starts_with("Tag=read,")).count() >= 2, "{log}");
    assert!(log.lines().any(|l| l.starts_with("Tag=write,")));
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg") && picture.trim_end().ends_with("</svg>"));
    assert!(picture.contains("<polyline"));
}

/// The bench against a real node on loopback (started in this process, real sockets).
#[test]
fn hosts_mode_against_a_server_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let config = peregrine_server::config::Config::parse(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\n[[namespace]]\nname = \"test\"\nwrite_block_bytes = 1048576\n\
         [[namespace.devices]]\npath = \"t.dat\"\nsize_bytes = 67108864\n",
        dir.path().display()
    ))
    .unwrap();
    let mut config = config;
    config.server.metrics_listen = None;
    let node = peregrine_server::start_in_background(config).unwrap();
    let hosts = node.addr.to_string();
    let run = |extra: &[&str]| {
        let mut args = vec!["--hosts", hosts.as_str(), "--quiet", "--json", "--keys", "2000"];
        args.extend_from_slice(extra);
        bench(&args)
    };
    let out = run(&["--workload", "I"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!(s["ops"], 2000);
    assert_eq!(s["errors"], 0, "{s}");
    assert_eq!(s["target"], "hosts");
    let out = run(&["--workload", "RU,50", "--ops", "3000", "--verify", "--batch-size", "4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!(s["errors"], 0, "{s}");
    assert_eq!(s["errors_by_kind"]["not_found"], 0, "{s}");
    assert!(s["reads_per_sec"].as_f64().unwrap() > 0.0);
    node.stop().unwrap();
}
