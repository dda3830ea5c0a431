//! Hostile and careless clients against a real `peregrine` process: the server refuses or
//! closes cleanly, never crashes, keeps its memory bounded, and keeps serving a normal client.

#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{Server, info};
use peregrine_index::{Digest, KeyRef};
use peregrine_proto::consts::{field, info1, info2, msg_type, op, particle};
use peregrine_proto::encode::{begin_frame, end_frame, put_field, put_msg_header, put_op};
use peregrine_proto::{MsgHeader, ProtoHeader, decode_message};

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Whether the server closed the connection (read returns EOF or a reset) within 10 s.
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn request(info1_bits: u8, info2_bits: u8, key: i64, ops: &[(u8, u8, &[u8], &[u8])]) -> Vec<u8> {
    request_with_generation(info1_bits, info2_bits, 0, key, ops)
}

fn request_with_generation(
    info1_bits: u8,
    info2_bits: u8,
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
            generation,
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

/// Sends a frame and returns (result code, ops) of the reply.
/// (bin name, value bytes) of a reply op.
type ReplyOp = (Vec<u8>, Vec<u8>);

fn roundtrip(s: &mut TcpStream, frame: &[u8]) -> (u8, Vec<ReplyOp>) {
    let (rc, _, ops) = roundtrip_generation(s, frame);
    (rc, ops)
}

/// Like [`roundtrip`], with the reply's generation.
fn roundtrip_generation(s: &mut TcpStream, frame: &[u8]) -> (u8, u32, Vec<ReplyOp>) {
    s.write_all(frame).unwrap();
    let mut h = [0u8; 8];
    s.read_exact(&mut h).unwrap();
    let size = (u64::from_be_bytes(h) & 0xFFFF_FFFF_FFFF) as usize;
    let mut body = vec![0u8; size];
    s.read_exact(&mut body).unwrap();
    let (m, _) = decode_message(&body).unwrap();
    (m.header.result_code, m.header.generation, m.ops.iter().map(|o| (o.name.to_vec(), o.value.to_vec())).collect())
}

/// A normal client: write then read a record with raw frames.
fn normal_client_works(addr: SocketAddr, key: i64) {
    let mut s = connect(addr);
    let value = key.to_be_bytes();
    let (rc, _) = roundtrip(&mut s, &request(0, info2::WRITE, key, &[(op::WRITE, particle::INTEGER, b"v", &value)]));
    assert_eq!(rc, 0);
    let (rc, ops) = roundtrip(&mut s, &request(info1::READ | info1::GET_ALL, 0, key, &[]));
    assert_eq!(rc, 0);
    assert_eq!(ops, vec![(b"v".to_vec(), value.to_vec())]);
}

#[test]
fn bad_frames_close_the_connection_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "");
    let addr = server.addr;
    // A header claiming 1 GiB: refused from the header, before allocating.
    let mut s = connect(addr);
    s.write_all(&ProtoHeader::encode(msg_type::MESSAGE, 1 << 30)).unwrap();
    assert!(closed_by_server(&mut s));
    // A bad version.
    let mut s = connect(addr);
    s.write_all(&[9, 3, 0, 0, 0, 0, 0, 10]).unwrap();
    assert!(closed_by_server(&mut s));
    // TLS ClientHello on the plain port.
    let mut s = connect(addr);
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]).unwrap();
    assert!(closed_by_server(&mut s));
    // Garbage.
    let mut s = connect(addr);
    s.write_all(&(0..200u32).map(|i| (i * 37 + 11) as u8).collect::<Vec<_>>()).unwrap();
    assert!(closed_by_server(&mut s));
    // Truncated: a header for 100 bytes, 10 sent, then the client goes away.
    let mut s = connect(addr);
    s.write_all(&ProtoHeader::encode(msg_type::MESSAGE, 100)).unwrap();
    s.write_all(&[0; 10]).unwrap();
    drop(s);
    // An admin (security) frame.
    let mut s = connect(addr);
    s.write_all(&ProtoHeader::encode(msg_type::ADMIN, 4)).unwrap();
    s.write_all(&[0; 4]).unwrap();
    assert!(closed_by_server(&mut s));
    // A malformed message inside a well-framed request: error 4, and the connection stays usable.
    let mut s = connect(addr);
    let mut bad = ProtoHeader::encode(msg_type::MESSAGE, 30).to_vec();
    bad.extend_from_slice(&[
        22, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8,
    ]);
    let (rc, _) = roundtrip(&mut s, &bad);
    assert_eq!(rc, 4);
    let value = 1i64.to_be_bytes();
    let (rc, _) = roundtrip(&mut s, &request(0, info2::WRITE, 1, &[(op::WRITE, particle::INTEGER, b"v", &value)]));
    assert_eq!(rc, 0);
    // Counts that run past the end inside a frame, and a 19-byte digest: error 4 too.
    let mut frame = request(info1::READ, 0, 2, &[]);
    frame[8 + 18..8 + 20].copy_from_slice(&[0xFF, 0xFF]);
    assert_eq!(roundtrip(&mut s, &frame).0, 4);
    normal_client_works(addr, 3);
    assert!(info(addr, "node").starts_with("node\t"));
    let log = server.log_text();
    assert!(log.contains("TLS"), "the TLS case is not named in the log:\n{log}");
    // The write of key 1 and the normal client's write; the two malformed messages (error 4)
    // count as reads, as does the normal client's read.
    metrics_become(
        &server,
        &[
            ("peregrine_bad_frames_total", &[], 5),
            ("peregrine_requests_total", &[("kind", "write"), ("result", "0")], 2),
            ("peregrine_requests_total", &[("kind", "read"), ("result", "4")], 2),
            ("peregrine_requests_total", &[("kind", "read"), ("result", "0")], 1),
        ],
    );
    assert!(server.stop().success());
}

#[test]
fn a_thousand_idle_connections_do_not_block_a_normal_client() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "");
    let idle: Vec<TcpStream> = (0..1000).map(|_| connect(server.addr)).collect();
    let started = Instant::now();
    for k in 0..100 {
        normal_client_works(server.addr, k);
    }
    assert!(started.elapsed() < Duration::from_secs(10), "normal client slowed down: {:?}", started.elapsed());
    // The 1000 idle connections and the info request's own; the normal clients' connections
    // are closed (the server notices each close a moment later).
    let open = eventually(|| statistic(&info(server.addr, "statistics"), "client_connections"), 1001);
    assert_eq!(open, Some(1001));
    drop(idle);
    assert!(server.stop().success());
}

/// `n` clients each promise a 16 MiB frame (the maximum) and send 64 KiB of it.
fn half_sent_frames(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = connect(addr);
            s.write_all(&ProtoHeader::encode(msg_type::MESSAGE, 16 << 20)).unwrap();
            s.write_all(&[0u8; 64 * 1024]).unwrap();
            s
        })
        .collect()
}

/// The server's body buffer figure, read from `/metrics` until it equals `want` (5 s at most).
fn request_buffer_bytes(server: &Server, want: u64) -> Option<u64> {
    eventually(|| metric(&http_get(&server.metrics_addr(), "/metrics"), "peregrine_request_buffer_bytes", &[]), want)
}

#[test]
fn half_sent_large_frames_keep_memory_bounded_and_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "frame_timeout_ms = 4000\n");
    let metrics = http_get(&server.metrics_addr(), "/metrics");
    assert_eq!(metric(&metrics, "peregrine_request_buffer_bytes", &[]), Some(0), "{metrics}");
    assert_eq!(metric(&metrics, "peregrine_request_buffer_limit_bytes", &[]), Some(256 << 20), "{metrics}");
    let mut slow = half_sent_frames(server.addr, 200);
    // Each connection holds budget for the 64 KiB piece it received and for the next piece it
    // is waiting for, whether or not those bytes were ever touched: not the 16 MiB promised.
    let held = 200 * 2 * 64 * 1024;
    assert_eq!(request_buffer_bytes(&server, held), Some(held));
    normal_client_works(server.addr, 7);
    // The frame deadline closes every one of them and gives their budget back.
    for s in &mut slow {
        assert!(closed_by_server(s));
    }
    assert_eq!(request_buffer_bytes(&server, 0), Some(0));
    metrics_become(&server, &[("peregrine_timeouts_total", &[], 200)]);
    // The info figure counts the info request's own body, buffered while it is answered.
    assert_eq!(statistic(&info(server.addr, "statistics"), "request_buffer_bytes"), Some("statistics\n".len() as u64));
    assert!(server.stop().success());
}

#[test]
fn half_sent_frames_stop_at_the_request_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let limit: u64 = 16 << 20;
    let server = Server::start(dir.path(), &format!("frame_timeout_ms = 3000\nmax_inflight_request_bytes = {limit}\n"));
    // 200 × 128 KiB wanted, 16 MiB allowed: the budget is taken to the byte and no further.
    let mut slow = half_sent_frames(server.addr, 200);
    assert_eq!(request_buffer_bytes(&server, limit), Some(limit));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        metric(&http_get(&server.metrics_addr(), "/metrics"), "peregrine_request_buffer_bytes", &[]),
        Some(limit)
    );
    for s in &mut slow {
        assert!(closed_by_server(s));
    }
    assert_eq!(request_buffer_bytes(&server, 0), Some(0));
    normal_client_works(server.addr, 8);
    assert!(server.stop().success());
}

#[test]
fn connection_limit_and_idle_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "max_connections = 20\nidle_timeout_ms = 1000\n");
    let held: Vec<TcpStream> = (0..20).map(|_| connect(server.addr)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = connect(server.addr);
    assert!(closed_by_server(&mut extra), "the 21st connection was kept");
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    let mut idle = connect(server.addr);
    let started = Instant::now();
    assert!(closed_by_server(&mut idle));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(800) && waited < Duration::from_secs(5), "idle close after {waited:?}");
    normal_client_works(server.addr, 9);
    metrics_become(&server, &[("peregrine_connections_refused_total", &[], 1)]);
    assert!(server.stop().success());
}

/// Logs going to a file or a pipe carry no terminal colour codes (ESC bytes).
#[test]
fn logs_to_files_and_pipes_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    // stderr to a file (the test harness's `Server`).
    let server = Server::start(dir.path(), "");
    normal_client_works(server.addr, 1);
    assert!(server.stop().success());
    let log = std::fs::read(Server::log_file_in(dir.path())).unwrap();
    assert!(String::from_utf8_lossy(&log).contains("marked clean"), "{}", String::from_utf8_lossy(&log));
    assert!(!log.contains(&0x1b), "colour codes in a log file:\n{}", String::from_utf8_lossy(&log));
    // stderr to a pipe.
    let config = dir.path().join("pipe.toml");
    std::fs::write(
        &config,
        "[[namespace]]\nname = \"test\"\n[[namespace.devices]]\npath = \"pipe.dat\"\nsize_bytes = 268435456\n",
    )
    .unwrap();
    let port = common::free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_peregrine"))
        .arg("--config")
        .arg(&config)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--metrics-listen", "off", "--data-dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        stderr.read_to_end(&mut out).unwrap();
        out
    });
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(60), "server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: sending a signal to our own child by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let piped = reader.join().unwrap();
    assert!(String::from_utf8_lossy(&piped).contains("peregrine node serving"), "{}", String::from_utf8_lossy(&piped));
    assert!(!piped.contains(&0x1b), "colour codes on a pipe:\n{}", String::from_utf8_lossy(&piped));
}

/// The wire's generation field is 32 bits, record generations 16. Like the Aerospike server,
/// the node compares them as 32-bit numbers: "equal 65538" must not match generation 2 (as a
/// 16-bit truncation would), and "greater than 65537" holds for every record.
#[test]
fn generations_beyond_16_bits_compare_as_32_bit_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "");
    let mut s = connect(server.addr);
    let one = 1i64.to_be_bytes();
    let write = |gen_bits: u8, generation: u32| {
        request_with_generation(
            0,
            info2::WRITE | gen_bits,
            generation,
            5,
            &[(op::WRITE, particle::INTEGER, b"v", &one)],
        )
    };
    let read = request(info1::READ | info1::GET_ALL, 0, 5, &[]);
    assert_eq!(roundtrip_generation(&mut s, &write(0, 0)).0, 0);
    let (rc, generation, _) = roundtrip_generation(&mut s, &write(0, 0));
    assert_eq!((rc, generation), (0, 2));
    // Equal, with 65536 + 2: a generation error, and the record keeps generation 2.
    assert_eq!(roundtrip_generation(&mut s, &write(info2::GENERATION, (1 << 16) + 2)).0, 3);
    assert_eq!(roundtrip_generation(&mut s, &read).1, 2);
    // Greater, with 65536 + 1 (1 after truncation, which is not greater than 2): written.
    let (rc, generation, _) = roundtrip_generation(&mut s, &write(info2::GENERATION_GT, (1 << 16) + 1));
    assert_eq!((rc, generation), (0, 3));
    assert_eq!(roundtrip_generation(&mut s, &write(info2::GENERATION_GT, u32::MAX)).0, 0);
    // Deletes compare the same way.
    let delete = |gen_bits: u8, generation: u32| {
        request_with_generation(0, info2::WRITE | info2::DELETE | gen_bits, generation, 5, &[])
    };
    assert_eq!(roundtrip_generation(&mut s, &delete(info2::GENERATION, (1 << 16) + 4)).0, 3);
    assert_eq!(roundtrip_generation(&mut s, &read).1, 4);
    assert_eq!(roundtrip_generation(&mut s, &delete(info2::GENERATION_GT, (1 << 16) + 3)).0, 0);
    assert_eq!(roundtrip_generation(&mut s, &read).0, 2);
    // In range, nothing changed: equal matches, greater needs greater.
    assert_eq!(roundtrip_generation(&mut s, &write(0, 0)).0, 0);
    assert_eq!(roundtrip_generation(&mut s, &write(info2::GENERATION_GT, 1)).0, 3);
    assert_eq!(roundtrip_generation(&mut s, &write(info2::GENERATION, 1)).0, 0);
    assert!(server.stop().success());
}

#[test]
fn metric_lookups_match_the_whole_name_and_label_set() {
    let text = "HTTP/1.1 200 OK\r\n\r\n# HELP a_total x\na_total_more 7\na_total 50\n\
                b{kind=\"read\",result=\"0\",extra=\"1\"} 9\nb{result=\"0\",kind=\"read\"} 4\n";
    assert_eq!(metric(text, "a_total", &[]), Some(50));
    assert_eq!(metric(text, "a_tot", &[]), None);
    assert_eq!(metric(text, "b", &[("kind", "read"), ("result", "0")]), Some(4));
    assert_eq!(metric(text, "b", &[("kind", "read")]), None);
    assert_eq!(
        statistic("statistics\tclient_connections=1001;client_connections_opened=5\n", "client_connections"),
        Some(1001)
    );
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of the series with exactly this name and exactly this label set (in any order) in
/// Prometheus text; `None` when absent. Panics if the series appears twice or is not an integer.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    let body = text.split_once("\r\n\r\n").map_or(text, |(_, b)| b);
    let mut want: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    want.sort();
    let mut found = None;
    for line in body.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}').unwrap()),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let mut have: Vec<(String, String)> = series_labels
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap();
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .collect();
        have.sort();
        if have == want {
            assert!(found.is_none(), "{name}{labels:?} appears twice:\n{body}");
            found = Some(value.parse().unwrap_or_else(|_| panic!("{line}: not an integer")));
        }
    }
    found
}

/// The value of `key` in an info `statistics` answer (`key=value;key=value`), by exact key.
fn statistic(answer: &str, key: &str) -> Option<u64> {
    let values = answer.split_once('\t').map_or(answer, |(_, v)| v).trim_end();
    values.split(';').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| v.parse().unwrap())
}

/// An expected series: name, exact label set, value.
type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], u64);

/// Reads `/metrics` until every series has exactly its expected value (5 s at most), then
/// asserts it. The node counts a request or a closed connection just after the client sees
/// its reply or the close, so a reading taken at once can be a moment early.
fn metrics_become(server: &Server, want: &[Expected<'_>]) {
    let read = || http_get(&server.metrics_addr(), "/metrics");
    let matches = |text: &str| want.iter().all(|(name, labels, v)| metric(text, name, labels) == Some(*v));
    let started = Instant::now();
    let mut text = read();
    while !matches(&text) && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
        text = read();
    }
    for (name, labels, v) in want {
        assert_eq!(metric(&text, name, labels), Some(*v), "{name}{labels:?} in\n{text}");
    }
}

/// Reads a figure until it equals `want` or 5 s pass; returns the last reading.
fn eventually(mut read: impl FnMut() -> Option<u64>, want: u64) -> Option<u64> {
    let started = Instant::now();
    loop {
        let v = read();
        if v == Some(want) || started.elapsed() > Duration::from_secs(5) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The metrics port is bound before the client port: a node that accepted clients must not
/// then exit because a later listener failed. With both ports taken, the metrics port is the
/// one the error names.
#[test]
fn the_metrics_port_is_bound_before_the_client_port() {
    let dir = tempfile::tempdir().unwrap();
    let taken_metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_client = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (metrics, client) = (taken_metrics.local_addr().unwrap(), taken_client.local_addr().unwrap());
    let config = dir.path().join("taken.toml");
    std::fs::write(
        &config,
        "[[namespace]]\nname = \"test\"\n[[namespace.devices]]\npath = \"taken.dat\"\nsize_bytes = 268435456\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_peregrine"))
        .arg("--config")
        .arg(&config)
        .args(["--listen", &client.to_string(), "--metrics-listen", &metrics.to_string(), "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("cannot listen for metrics on {metrics}")), "{stderr}");
    assert!(!stderr.contains(&format!("cannot listen on {client}")), "{stderr}");
    drop((taken_metrics, taken_client));
}
