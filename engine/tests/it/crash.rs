//! Process crashes: a child process writes in `commit_to_device` mode and reports every
//! acknowledged write on stdout; the parent kills it with SIGKILL at a random moment, reopens
//! the device and checks that every acknowledged record is there with its value.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use peregrine_engine::io::IoBackendChoice;
use peregrine_engine::{BinSelection, Engine, GenerationPolicy, WritePolicy};

use crate::common::*;

const CHILD_ENV: &str = "PEREGRINE_CRASH_CHILD_DIR";
const BACKEND_ENV: &str = "PEREGRINE_CRASH_CHILD_BACKEND";
const CYCLE_ENV: &str = "PEREGRINE_CRASH_CHILD_CYCLE";
const SHAPE_ENV: &str = "PEREGRINE_CRASH_CHILD_SHAPE";

/// What a crash run writes.
#[derive(Clone, Copy, Debug)]
struct Shape {
    name: &'static str,
    device_bytes: u64,
    keys: i64,
    /// Every n-th put gets a 1 s TTL (0 = none).
    ttl_every: u64,
}

/// Light load on a roomy device.
const LIGHT: Shape = Shape { name: "light", device_bytes: 32 << 20, keys: 400, ttl_every: 0 };
/// Half-full small device under overwrites, deletes and expiring records: defrag is busy.
const CHURN: Shape = Shape { name: "churn", device_bytes: 16 << 20, keys: 10_000, ttl_every: 7 };

fn shape_from_env() -> Shape {
    match std::env::var(SHAPE_ENV).as_deref() {
        Ok("churn") => CHURN,
        _ => LIGHT,
    }
}

fn value_len(k: i64) -> usize {
    300 + (k as usize % 700)
}

/// The bins of key `k` at `version`: the value, and the version as an integer.
fn versioned_bins(k: i64, version: u64) -> Vec<peregrine_engine::Bin> {
    let mut b = bins(k, version, value_len(k));
    b.push(peregrine_engine::Bin::new("ver", peregrine_engine::Value::Int(version as i64)).unwrap());
    b
}

/// Runs only inside the child: write forever from 4 threads. Before each operation it prints
/// `try put K V` / `try del K`, after its acknowledgement `ack put K V` / `ack del K`.
fn child_main(dir: &str) {
    let backend = match std::env::var(BACKEND_ENV).as_deref() {
        Ok("blocking") => IoBackendChoice::Blocking,
        _ => IoBackendChoice::Uring,
    };
    let cycle: u64 = std::env::var(CYCLE_ENV).ok().and_then(|c| c.parse().ok()).unwrap_or(0);
    let shape = shape_from_env();
    let mut cfg = config(std::path::Path::new(dir), backend, shape.device_bytes);
    cfg.commit_to_device = true;
    cfg.defrag_sleep_us = 0;
    let e = Engine::open(cfg).expect("child could not open the engine");
    let stdout = std::sync::Mutex::new(std::io::stdout());
    std::thread::scope(|s| {
        for t in 0..4i64 {
            let e = &e;
            let stdout = &stdout;
            s.spawn(move || {
                let mut rng = Rng(0x5EED + t as u64 + cycle * 97);
                for i in 0.. {
                    if t == 0 && i % 500 == 0 {
                        let moved: u64 = e.stats().devices.iter().map(|d| d.defrag_records_moved).sum();
                        println_locked(stdout, &format!("stat defrag {moved}"));
                    }
                    // Each thread owns the keys k ≡ t (mod 4): at most one operation per key is
                    // in flight when the process dies.
                    let k = (rng.below((shape.keys / 4) as u64) as i64) * 4 + t;
                    // Real versions start at 1: 0 stands for "an expiring put" in the output.
                    let version = cycle * 1_000_000 + i + 1;
                    if i % 10 == 9 {
                        println_locked(stdout, &format!("try del {k}"));
                        loop {
                            match e.delete(&digest(k), GenerationPolicy::None) {
                                Ok(()) | Err(peregrine_engine::Error::NotFound) => break,
                                Err(
                                    peregrine_engine::Error::DeviceFull(_) | peregrine_engine::Error::DeviceOverload(_),
                                ) => std::thread::sleep(std::time::Duration::from_millis(2)),
                                Err(err) => panic!("delete failed: {err}"),
                            }
                        }
                        println_locked(stdout, &format!("ack del {k}"));
                    } else {
                        let expiring = shape.ttl_every > 0 && i % shape.ttl_every == 3;
                        let policy = WritePolicy {
                            ttl: if expiring {
                                peregrine_engine::Ttl::Seconds(1)
                            } else {
                                peregrine_engine::Ttl::Never
                            },
                            ..WritePolicy::default()
                        };
                        // An expiring put is recorded as version 0: it must be gone after the
                        // restart (which comes well over a second later).
                        let shown = if expiring { 0 } else { version };
                        println_locked(stdout, &format!("try put {k} {shown}"));
                        loop {
                            match e.put(&digest(k), b"s", Some(key(k)), versioned_bins(k, version), &policy) {
                                Ok(_) => break,
                                Err(
                                    peregrine_engine::Error::DeviceFull(_) | peregrine_engine::Error::DeviceOverload(_),
                                ) => std::thread::sleep(std::time::Duration::from_millis(2)),
                                Err(err) => panic!("put failed: {err}"),
                            }
                        }
                        println_locked(stdout, &format!("ack put {k} {shown}"));
                    }
                }
            });
        }
    });
}

fn println_locked(out: &std::sync::Mutex<std::io::Stdout>, line: &str) {
    use std::io::Write;
    let mut o = out.lock().unwrap();
    writeln!(o, "{line}").unwrap();
    o.flush().unwrap();
}

/// What the parent knows about a key: its last acknowledged state and the operation in flight
/// after it (if any). `None` inside means "deleted".
#[derive(Default, Clone, Copy, Debug)]
struct KeyState {
    acked: Option<Option<u64>>,
    in_flight: Option<Option<u64>>,
}

/// Applies one line of the child's output; returns whether it was an acknowledgement.
fn observe(states: &mut HashMap<i64, KeyState>, line: &str) -> bool {
    let parts: Vec<&str> = line.split_whitespace().collect();
    let (phase, k, state) = match parts.as_slice() {
        [phase @ ("try" | "ack"), "put", k, v] => (*phase, k.parse().unwrap(), Some(v.parse().unwrap())),
        [phase @ ("try" | "ack"), "del", k] => (*phase, k.parse().unwrap(), None),
        _ => return false,
    };
    let entry = states.entry(k).or_default();
    if phase == "try" {
        entry.in_flight = Some(state);
        false
    } else {
        entry.acked = Some(state);
        entry.in_flight = None;
        true
    }
}

#[test]
fn kill_9_loses_no_acknowledged_write() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child_main(&dir);
        return;
    }
    kill_cycles(LIGHT, "crash::kill_9_loses_no_acknowledged_write", 4, 200..1000);
}

/// The same during heavy defragmentation (a small, half-full device under overwrites and
/// deletes), with expiring records that must not come back either.
#[test]
fn kill_9_during_heavy_defrag_loses_and_resurrects_nothing() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child_main(&dir);
        return;
    }
    let moved = kill_cycles(CHURN, "crash::kill_9_during_heavy_defrag_loses_and_resurrects_nothing", 3, 12_000..24_000);
    assert!(moved > 1000, "defrag was not busy when the process was killed: {moved} records moved");
}

/// Runs kill/restart cycles on both backends; returns the most records the child reported
/// defrag had moved before a kill.
fn kill_cycles(shape: Shape, test_name: &str, cycles: u64, acks: std::ops::Range<u64>) -> u64 {
    let mut defrag_moved = 0u64;
    // Real backends only (see `REAL_BACKENDS`): a simulated device lives in the child's memory
    // and dies with it; `crash_sim` cuts the power of a simulated device instead.
    for (backend, name) in [(IoBackendChoice::Uring, "uring"), (IoBackendChoice::Blocking, "blocking")] {
        let dir = tempfile::tempdir().unwrap();
        let mut states: HashMap<i64, KeyState> = HashMap::new();
        let mut rng = Rng(42);
        for cycle in 0..cycles {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
                .env(CHILD_ENV, dir.path())
                .env(BACKEND_ENV, name)
                .env(CYCLE_ENV, cycle.to_string())
                .env(SHAPE_ENV, shape.name)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            let kill_after = (acks.start + rng.below(acks.end - acks.start)) as usize;
            let mut lines = BufReader::new(stdout).lines();
            let started = Instant::now();
            let mut seen = 0;
            while seen < kill_after {
                let Some(Ok(line)) = lines.next() else { panic!("child exited early after {seen} acks") };
                if let Some(n) = line.strip_prefix("stat defrag ").and_then(|n| n.parse().ok()) {
                    defrag_moved = defrag_moved.max(n);
                }
                seen += usize::from(observe(&mut states, &line));
                assert!(started.elapsed() < Duration::from_secs(120), "child too slow");
            }
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            for line in lines.map_while(Result::ok) {
                observe(&mut states, &line);
            }
            if shape.ttl_every > 0 {
                // Let every expiring record written before the kill pass its void time.
                std::thread::sleep(Duration::from_millis(2100));
            }
            let mut cfg = config(dir.path(), backend, shape.device_bytes);
            cfg.defrag_sleep_us = 0;
            let e = Engine::open(cfg).unwrap();
            for (k, st) in states.iter_mut() {
                let found = match e.get(&digest(*k), &BinSelection::All) {
                    Ok(r) => {
                        let Some(peregrine_engine::Value::Int(v)) = r.bin("ver").cloned() else {
                            panic!("no version bin")
                        };
                        assert_eq!(r.bins, versioned_bins(*k, v as u64), "{name}: key {k} version {v} has wrong bytes");
                        Some(v as u64)
                    }
                    Err(peregrine_engine::Error::NotFound) => None,
                    Err(err) => panic!("{name}: reading key {k}: {err}"),
                };
                // A found record is never an expiring one, and an acknowledged expiring put
                // (version 0) may only be found absent.
                let acked_ok = match st.acked {
                    None => true,
                    Some(Some(0)) => found.is_none(),
                    Some(a) => a == found,
                };
                let in_flight_ok = match st.in_flight {
                    Some(Some(0)) => found.is_none(),
                    Some(f) => f == found,
                    None => false,
                };
                assert!(
                    acked_ok || in_flight_ok,
                    "{name} {} cycle {cycle}: key {k} is {found:?}, but the last acknowledged state was {:?} (in flight: {:?})",
                    shape.name,
                    st.acked,
                    st.in_flight
                );
                *st = KeyState { acked: Some(found), in_flight: None };
            }
            let s = e.stats();
            if shape.name == "churn" {
                eprintln!("{name} cycle {cycle}: {} records, {:?}", s.records, s.devices[0].blocks);
            }
            e.close().unwrap();
        }
    }
    defrag_moved
}
