//! The official Aerospike Python client against a real `peregrine` process: every command, bin
//! type, policy and error in `tests/python/test_wire.py`, then a SIGTERM, a restart on the same
//! device, and a byte-for-byte check of the 10,000 records written before it (deleted ones stay
//! deleted); then more deletes, a SIGKILL, a restart, and the same check again.
//!
//! Needs PEREGRINE_PYTHON: a Python with the `aerospike` package (`bash .ci/run` makes one).

#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

mod common;

use std::process::Command;

use common::{Server, info};

fn python() -> String {
    std::env::var("PEREGRINE_PYTHON").unwrap_or_else(|_| {
        panic!(
            "PEREGRINE_PYTHON is not set: run the tests with `bash .ci/run`, or point it at a Python \
             with the official client (python3 -m venv v && v/bin/pip install aerospike)"
        )
    })
}

fn run_phase(server: &Server, phase: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/test_wire.py");
    let out = Command::new(python())
        .arg(script)
        .args(["--port", &server.addr.port().to_string(), "--phase", phase])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "python phase {phase} failed:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
}

#[test]
fn official_python_client_end_to_end_with_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "");
    run_phase(&server, "main");
    let status = server.stop();
    assert!(status.success(), "server exited with {status}");
    let log = std::fs::read_to_string(Server::log_file_in(dir.path())).unwrap();
    assert!(log.contains("marked clean"), "no clean shutdown in the log:\n{log}");
    let mut server = Server::start(dir.path(), "");
    run_phase(&server, "restart");
    let metrics = info(server.addr, "namespace/test");
    assert!(metrics.contains("objects="), "{metrics}");
    // An unclean stop: the deletes of the restart phase must survive it too.
    server.child.kill().unwrap();
    assert!(!server.child.wait().unwrap().success());
    assert!(!server.log_text().contains("marked clean"), "the killed node shut down cleanly:\n{}", server.log_text());
    drop(server);
    let server = Server::start(dir.path(), "");
    run_phase(&server, "after-kill");
    assert!(server.stop().success());
}
