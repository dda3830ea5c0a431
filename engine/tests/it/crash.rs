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
const KEYS: i64 = 400;

/// The bins of key `k` at `version`: the value, and the version as an integer.
fn versioned_bins(k: i64, version: u64) -> Vec<peregrine_engine::Bin> {
    let mut b = bins(k, version, 300 + (k as usize % 700));
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
    let mut cfg = config(std::path::Path::new(dir), backend, 32 << 20);
    cfg.commit_to_device = true;
    let e = Engine::open(cfg).expect("child could not open the engine");
    let stdout = std::sync::Mutex::new(std::io::stdout());
    std::thread::scope(|s| {
        for t in 0..4i64 {
            let e = &e;
            let stdout = &stdout;
            s.spawn(move || {
                let mut rng = Rng(0x5EED + t as u64 + cycle * 97);
                for i in 0.. {
                    // Each thread owns the keys k ≡ t (mod 4): at most one operation per key is
                    // in flight when the process dies.
                    let k = (rng.below((KEYS / 4) as u64) as i64) * 4 + t;
                    let version = cycle * 1_000_000 + i;
                    if i % 10 == 9 {
                        println_locked(stdout, &format!("try del {k}"));
                        match e.delete(&digest(k), GenerationPolicy::None) {
                            Ok(()) | Err(peregrine_engine::Error::NotFound) => {
                                println_locked(stdout, &format!("ack del {k}"))
                            }
                            Err(err) => panic!("delete failed: {err}"),
                        }
                    } else {
                        println_locked(stdout, &format!("try put {k} {version}"));
                        e.put(&digest(k), b"s", Some(key(k)), versioned_bins(k, version), &WritePolicy::default())
                            .expect("put failed");
                        println_locked(stdout, &format!("ack put {k} {version}"));
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
    for (backend, name) in [(IoBackendChoice::Uring, "uring"), (IoBackendChoice::Blocking, "blocking")] {
        let dir = tempfile::tempdir().unwrap();
        let mut states: HashMap<i64, KeyState> = HashMap::new();
        let mut rng = Rng(42);
        for cycle in 0..4u64 {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "crash::kill_9_loses_no_acknowledged_write", "--nocapture", "--test-threads=1"])
                .env(CHILD_ENV, dir.path())
                .env(BACKEND_ENV, name)
                .env(CYCLE_ENV, cycle.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            let kill_after = 200 + rng.below(800) as usize;
            let mut lines = BufReader::new(stdout).lines();
            let started = Instant::now();
            let mut acks = 0;
            while acks < kill_after {
                let Some(Ok(line)) = lines.next() else { panic!("child exited early after {acks} acks") };
                acks += usize::from(observe(&mut states, &line));
                assert!(started.elapsed() < Duration::from_secs(60), "child too slow");
            }
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            // Lines written before the kill may still be in the pipe.
            for line in lines.map_while(Result::ok) {
                observe(&mut states, &line);
            }
            let e = Engine::open(config(dir.path(), backend, 32 << 20)).unwrap();
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
                let allowed_acked = st.acked.is_none_or(|a| a == found);
                let allowed_in_flight = st.in_flight == Some(found);
                assert!(
                    allowed_acked || allowed_in_flight,
                    "{name} cycle {cycle}: key {k} is {found:?}, but the last acknowledged state was {:?} (in flight: {:?})",
                    st.acked,
                    st.in_flight
                );
                // Whatever survived is now the acknowledged state.
                *st = KeyState { acked: Some(found), in_flight: None };
            }
            e.close().unwrap();
        }
    }
}
