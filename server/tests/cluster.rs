//! Three real `peregrine` processes on loopback forming one strong-consistency cluster, used
//! through the official Aerospike Python client and through raw frames sent to chosen nodes:
//! every command of `tests/python/test_wire.py`; a write through one node read through the
//! others in each read mode (proxied); a generation check-and-set race through two nodes;
//! a rolling SIGTERM restart under load losing no acknowledged write; a kill -9 under load with no
//! acknowledged write lost, writes back within 5 s, and the killed node catching up from a
//! snapshot once the others purged their logs.
//!
//! The nodes run `PEREGRINE_NODE_BIN` when set (`.ci/run` builds a release `peregrine` for
//! them: 3 unoptimized processes of 4096 Raft groups each are too slow on 2 cores), else this
//! build's own: `PEREGRINE_NODE_BIN=target/release/peregrine cargo test -p peregrine-server
//! --test cluster`. Needs PEREGRINE_PYTHON (see `python_client.rs`). The tests take a lock: one
//! cluster at a time in this process.

#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::cluster::TestCluster;
use peregrine_engine::{Digest, KeyRef};
use peregrine_proto::consts::{field, info1, info2, info3, msg_type, op, particle, result};
use peregrine_proto::encode::{begin_frame, end_frame, put_field, put_msg_header, put_op};
use peregrine_proto::{MsgHeader, decode_message};

static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A child process killed (by pid) when the test ends, passed or not.
struct Reaped(std::process::Child);

impl Reaped {
    fn wait(&mut self) -> std::process::ExitStatus {
        self.0.wait().unwrap()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn python() -> String {
    std::env::var("PEREGRINE_PYTHON")
        .unwrap_or_else(|_| panic!("PEREGRINE_PYTHON is not set: run the tests with `bash .ci/run`"))
}

fn script(name: &str) -> String {
    format!("{}/tests/python/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn hosts(c: &TestCluster) -> String {
    c.clients().iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",")
}

fn run_python(c: &TestCluster, args: &[&str]) -> String {
    let out = Command::new(python()).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python {args:?} failed:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
    stdout
}

/// A single-record request for key `key` of set "s" with the given bits and ops.
fn request(
    info1_bits: u8,
    info2_bits: u8,
    info3_bits: u8,
    generation: u32,
    key: i64,
    ops: &[(u8, u8, &[u8], &[u8])],
) -> Vec<u8> {
    let digest = Digest::of_key(b"s", KeyRef::Int(key));
    let mut buf = Vec::new();
    let start = begin_frame(&mut buf, msg_type::MESSAGE);
    put_msg_header(
        &mut buf,
        &MsgHeader {
            info1: info1_bits,
            info2: info2_bits,
            info3: info3_bits,
            generation,
            transaction_ttl: 3_000,
            n_fields: 3,
            n_ops: ops.len() as u16,
            ..MsgHeader::default()
        },
    );
    put_field(&mut buf, field::NAMESPACE, b"test");
    put_field(&mut buf, field::SET, b"s");
    put_field(&mut buf, field::DIGEST, &digest.0);
    for (t, p, n, v) in ops {
        put_op(&mut buf, *t, *p, n, v);
    }
    end_frame(&mut buf, start);
    buf
}

/// Sends one frame to `addr`: (result code, generation, first op's value).
fn roundtrip(addr: SocketAddr, frame: &[u8]) -> (u8, u32, Option<Vec<u8>>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(frame).unwrap();
    let mut h = [0u8; 8];
    s.read_exact(&mut h).unwrap();
    let mut body = vec![0u8; (u64::from_be_bytes(h) & 0xFFFF_FFFF_FFFF) as usize];
    s.read_exact(&mut body).unwrap();
    let (m, _) = decode_message(&body).unwrap();
    (m.header.result_code, m.header.generation, m.ops.first().map(|o| o.value.to_vec()))
}

fn write_int(addr: SocketAddr, key: i64, v: i64, generation: Option<u32>) -> u8 {
    let bits = if generation.is_some() { info2::WRITE | info2::GENERATION } else { info2::WRITE };
    let frame =
        request(0, bits, 0, generation.unwrap_or(0), key, &[(op::WRITE, particle::INTEGER, b"v", &v.to_be_bytes())]);
    roundtrip(addr, &frame).0
}

fn read_int(addr: SocketAddr, key: i64, info3_bits: u8) -> (u8, u32, Option<i64>) {
    let frame = request(info1::READ | info1::GET_ALL, 0, info3_bits, 0, key, &[]);
    let (rc, generation, v) = roundtrip(addr, &frame);
    (rc, generation, v.map(|b| i64::from_be_bytes(b.try_into().unwrap())))
}

/// The test_wire suite, the read modes through the official client, raw commands through
/// every node, a check-and-set race through two nodes, and a rolling restart under load
/// with no client error.
#[test]
fn a_cluster_serves_the_official_client_through_any_node() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = TestCluster::start(3, "");
    let port = c.ports[0].client.port().to_string();
    let out = run_python(&c, &[&script("test_wire.py"), "--port", &port, "--phase", "main", "--cluster", "3"]);
    println!("{out}");
    println!("{}", run_python(&c, &[&script("cluster_checks.py"), "--hosts", &hosts(&c), "modes"]));

    // Raw frames: a write through each node (two of them proxy it to the leader), read back
    // through every node in every read mode.
    let modes = [0, info3::SC_READ_TYPE, info3::SC_READ_RELAX, info3::SC_READ_TYPE | info3::SC_READ_RELAX];
    for (k, writer) in c.clients().into_iter().enumerate() {
        for key in (0..40).map(|i| 1_000 * k as i64 + i) {
            assert_eq!(write_int(writer, key, key * 7, None), result::OK, "write of {key} through {writer}");
            for reader in c.clients() {
                for m in modes {
                    // A follower may not have applied the write yet in ALLOW_REPLICA: retry briefly.
                    let deadline = Instant::now() + Duration::from_secs(5);
                    loop {
                        let (rc, _, v) = read_int(reader, key, m);
                        if rc == result::OK && v == Some(key * 7) {
                            break;
                        }
                        assert!(
                            m & info3::SC_READ_RELAX != 0 && Instant::now() < deadline,
                            "key {key} read through {reader} in mode {m:#x}: {rc} {v:?}"
                        );
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
    }

    // Check-and-set through two different nodes at once: exactly one wins.
    for key in 5_000..5_020i64 {
        let [a, b, _] = c.clients()[..] else { unreachable!() };
        assert_eq!(write_int(a, key, 0, None), result::OK);
        let (_, generation, _) = read_int(b, key, 0);
        let ta = std::thread::spawn(move || write_int(a, key, 1, Some(generation)));
        let tb = std::thread::spawn(move || write_int(b, key, 2, Some(generation)));
        let (ra, rb) = (ta.join().unwrap(), tb.join().unwrap());
        let mut codes = [ra, rb];
        codes.sort();
        assert_eq!(codes, [result::OK, result::GENERATION], "key {key}: {ra} {rb}");
        let (_, g2, v) = read_int(a, key, info3::SC_READ_TYPE);
        assert_eq!(g2, generation + 1);
        assert_eq!(v, Some(if ra == result::OK { 1 } else { 2 }));
    }

    // Rolling restart under load: each node in turn gets SIGTERM (it hands its leaderships
    // over first) and restarts; the cluster keeps serving and no acknowledged write is lost.
    // (The goal of no client error at all is not met yet: the errors are counted, not
    // asserted — see the README's "Not yet".)
    let out_file = c.dir.path().join("rolling.json");
    let mut workload = Reaped(
        Command::new(python())
            .args([&script("cluster_checks.py"), "--hosts", &hosts(&c), "workload", "--seconds", "60", "--out"])
            .arg(&out_file)
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_secs(3));
    for i in 0..3 {
        let status = c.terminate(i);
        assert!(status.success(), "node {} exited with {status}\n{}", i + 1, c.logs());
        c.restart(i);
        c.wait_ready(Duration::from_secs(90));
    }
    let status = workload.wait();
    assert!(status.success(), "the workload failed\n{}", c.logs());
    let report = std::fs::read_to_string(&out_file).unwrap();
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    println!(
        "rolling restart: {} writes, {} errors: {:?}",
        v["writes"],
        v["errors"].as_array().map_or(0, Vec::len),
        errors_of(&report)
    );
    println!(
        "{}",
        run_python(
            &c,
            &[&script("cluster_checks.py"), "--hosts", &hosts(&c), "verify", "--in", out_file.to_str().unwrap()]
        )
    );
}

/// kill -9 of a node under load: writes resume within 5 s, no acknowledged write is lost,
/// and the node, restarted after the others purged their logs, catches up from snapshots.
#[test]
fn kill_nine_loses_nothing_and_the_node_catches_up_from_a_snapshot() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    // Small logs: a group snapshots every 64 entries and keeps 16.
    let mut c = TestCluster::start(3, "snapshot_every_entries = 64\nlog_kept_after_snapshot = 16\n");
    let out_file = c.dir.path().join("kill.json");
    // Writes to 16 partitions only, so their groups fill and purge their logs quickly.
    let workload_started = Instant::now();
    let mut workload = Reaped(
        Command::new(python())
            .args([
                &script("cluster_checks.py"),
                "--hosts",
                &hosts(&c),
                "workload",
                "--seconds",
                "30",
                "--partitions",
                "16",
                "--out",
            ])
            .arg(&out_file)
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_secs(4));
    let victim = c.leader_of(0).expect("partition 0 has a leader");
    let killed_at = Instant::now();
    c.kill(victim);
    // Partition 0 (written by the workload) gets a new leader on a survivor.
    let deadline = killed_at + Duration::from_secs(5);
    loop {
        if let Some(l) = c.leader_of(0)
            && l != victim
        {
            break;
        }
        assert!(Instant::now() < deadline, "partition 0 has no new leader 5 s after the kill\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("partition 0 led again {:?} after the kill", killed_at.elapsed());
    // Keep writing while the node is down, then bring it back.
    std::thread::sleep(Duration::from_secs(12));
    c.restart(victim);
    let status = workload.wait();
    assert!(status.success());
    let report: String = std::fs::read_to_string(&out_file).unwrap();
    c.wait_ready(Duration::from_secs(60));
    println!(
        "{}",
        run_python(
            &c,
            &[&script("cluster_checks.py"), "--hosts", &hosts(&c), "verify", "--in", out_file.to_str().unwrap()]
        )
    );
    // Errors only after the kill, for at most 5 s (the workload's clock starts when its
    // client connected, a little after the process started: the bound is generous by that).
    let kill_s = killed_at.duration_since(workload_started).as_secs_f64();
    let errors = errors_of(&report);
    for (t, what) in &errors {
        assert!(
            *t >= kill_s - 1.5 && *t <= kill_s + 5.0,
            "error at {t:.2} s (kill at {kill_s:.2} s): {what}\nall: {errors:?}"
        );
    }
    println!(
        "{} errors, from {:?} to {:?} s; kill at {kill_s:.2} s",
        errors.len(),
        errors.first().map(|e| e.0),
        errors.last().map(|e| e.0)
    );
    // The restarted node caught up from snapshots, and holds what the others hold.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = c.info(victim, "statistics").unwrap_or_default();
        let received = stats.split(';').find_map(|kv| kv.strip_prefix("snapshots_received=")?.parse::<u64>().ok());
        let objects: Vec<Option<u64>> = (0..3).map(|i| c.ns_stat(i, "objects")).collect();
        if received.unwrap_or(0) > 0 && objects.iter().all(|o| o.is_some() && *o == objects[0]) {
            break;
        }
        assert!(Instant::now() < deadline, "node {} did not catch up: {stats} {objects:?}\n{}", victim + 1, c.logs());
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// (seconds since the workload started, what) of each error in a workload report.
fn errors_of(report: &str) -> Vec<(f64, String)> {
    let v: serde_json::Value = serde_json::from_str(report).unwrap();
    v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e[0].as_f64()?, format!("{} {}", e[1], e[2]))))
        .collect()
}
