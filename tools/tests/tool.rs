//! peregrine-tool against devices written by the engine: counts, verification after random bit
//! flips (exactly the damaged records, no false alarms), torn blocks, dump by key, backup and
//! restore (also into a running server), damaged backups refused, devices in use refused,
//! layout pictures, format.

#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

use peregrine_engine::format::block_header::BlockHeader;
use peregrine_engine::format::{DATA_OFFSET_BYTES, record};
use peregrine_engine::scan::scan_block;
use peregrine_engine::{
    Bin, BinSelection, Digest, Engine, EngineConfig, GenerationPolicy, KeyRef, StoredKey, Ttl, Value, WritePolicy,
};
use serde_json::Value as Json;

const BLOCK: u32 = 128 * 1024;

fn tool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peregrine-tool")).args(args).output().unwrap()
}

fn json_of(out: &Output) -> Json {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {stdout} {}", String::from_utf8_lossy(&out.stderr)))
}

fn config(path: &Path) -> EngineConfig {
    let mut c = EngineConfig::single_file("test", path, 32 << 20);
    c.write_block_bytes = BLOCK;
    c.device_lock_wait_ms = 100;
    c
}

fn digest(k: i64) -> Digest {
    Digest::of_key(b"users", KeyRef::Int(k))
}

fn value(k: i64) -> Vec<Bin> {
    vec![
        Bin::new("name", Value::String(format!("user-{k}").into_bytes())).unwrap(),
        Bin::new("n", Value::Int(k * 3)).unwrap(),
        Bin::new("blob", Value::Blob(vec![(k % 251) as u8; 200 + (k as usize % 300)])).unwrap(),
    ]
}

/// 3000 records in set "users" (500 with a TTL), 200 overwritten, 100 deleted; closed cleanly.
fn populate(path: &Path) {
    let e = Engine::open(config(path)).unwrap();
    for k in 0..3000i64 {
        let ttl = if k < 500 { Ttl::Seconds(86_400) } else { Ttl::Never };
        let key = StoredKey { particle_type: 1, bytes: k.to_be_bytes().to_vec() };
        e.put(&digest(k), b"users", Some(key), value(k), &WritePolicy { ttl, ..WritePolicy::default() }).unwrap();
    }
    for k in 0..200 {
        e.put(&digest(k), b"users", None, value(k), &WritePolicy::default()).unwrap();
    }
    for k in 2900..3000 {
        e.delete(&digest(k), GenerationPolicy::None).unwrap();
    }
    e.close().unwrap();
}

#[test]
fn info_and_stats_match_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("d.dat");
    populate(&dev);
    let out = tool(&["info", dev.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json_of(&out);
    assert_eq!(v["records"], 2900);
    assert_eq!(v["tombstones"], 100);
    let d = &v["devices"][0];
    assert_eq!(d["namespace"], "test");
    assert_eq!(d["write_block_bytes"], BLOCK);
    assert_eq!(d["clean_shutdown"], true);
    assert!(d["blocks_used"].as_u64().unwrap() > 5);
    let out = tool(&["stats", dev.to_str().unwrap(), "--json"]);
    let s = json_of(&out);
    assert_eq!(s["records"], 2900);
    assert_eq!(s["sets"]["users"], 2900);
    assert_eq!(s["partitions"].as_array().unwrap().len(), 4096);
    assert_eq!(s["partitions"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).sum::<u64>(), 2900);
    let ttl_total: u64 = s["ttl_remaining"].as_object().unwrap().values().map(|x| x.as_u64().unwrap()).sum();
    assert_eq!(ttl_total, 2900);
    assert_eq!(s["ttl_remaining"]["never"], 2600);
    let text = tool(&["info", dev.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("records 2900"));
}

/// A record found on the device.
struct Position {
    block_base: u64,
    offset: u32,
    len: u32,
    digest: Digest,
    last_in_block: bool,
}

/// Where every record is.
fn record_positions(dev: &Path) -> Vec<Position> {
    let f = std::fs::File::open(dev).unwrap();
    let blocks = ((f.metadata().unwrap().len() - DATA_OFFSET_BYTES) / u64::from(BLOCK)) as u32;
    let mut out = Vec::new();
    for b in 0..blocks {
        let base = DATA_OFFSET_BYTES + u64::from(b) * u64::from(BLOCK);
        let mut bytes = vec![0u8; BLOCK as usize];
        f.read_exact_at(&mut bytes, base).unwrap();
        let Some(h) = BlockHeader::decode(&bytes) else { continue };
        let first = out.len();
        scan_block(&bytes, &h, |offset, v| {
            out.push(Position {
                block_base: base,
                offset,
                len: v.as_bytes().len() as u32,
                digest: v.digest(),
                last_in_block: false,
            })
        });
        if let Some(last) = out.get_mut(first..).and_then(|p| p.last_mut()) {
            last.last_in_block = true;
        }
    }
    out
}

#[test]
fn verify_finds_exactly_the_flipped_records_and_nothing_on_a_healthy_device() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("d.dat");
    populate(&dev);
    let healthy = tool(&["verify", dev.to_str().unwrap(), "--json"]);
    assert!(healthy.status.success());
    let v = json_of(&healthy);
    assert_eq!(v["corrupt_records"], 0);
    assert_eq!(v["torn_blocks"], 0);
    assert!(v["records_checked"].as_u64().unwrap() >= 3100, "{v}");
    // Flip one random bit inside the body of every 37th record (never two neighbours, never
    // the last of a block: damage running to the block's fill reads as a torn write).
    let positions = record_positions(&dev);
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&dev).unwrap();
    let mut state = 0x1234_5678u64;
    let mut flipped = std::collections::BTreeSet::new();
    for (i, p) in positions.iter().enumerate() {
        if i % 37 != 5 || p.last_in_block {
            continue;
        }
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let body = u64::from(p.len) - record::HEADER_BYTES as u64;
        let at = p.block_base + u64::from(p.offset) + record::HEADER_BYTES as u64 + state % body;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        b[0] ^= 1 << ((state >> 40) % 8);
        f.write_all_at(&b, at).unwrap();
        flipped.insert(p.digest.to_hex());
    }
    f.sync_all().unwrap();
    drop(f);
    let out = tool(&["verify", dev.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(2), "verify must fail on damage");
    let v = json_of(&out);
    let reported: std::collections::BTreeSet<String> =
        v["damage"].as_array().unwrap().iter().map(|d| d["digest"].as_str().unwrap().to_string()).collect();
    assert_eq!(v["corrupt_records"].as_u64().unwrap() as usize, flipped.len());
    assert_eq!(reported, flipped, "reported records differ from the damaged ones");
    assert_eq!(v["torn_blocks"], 0);
    let text = tool(&["verify", dev.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("CORRUPT"));
}

#[test]
fn a_torn_last_block_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("d.dat");
    populate(&dev);
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&dev).unwrap();
    let blocks = ((f.metadata().unwrap().len() - DATA_OFFSET_BYTES) / u64::from(BLOCK)) as u32;
    let (base, h) = (0..blocks)
        .filter_map(|b| {
            let base = DATA_OFFSET_BYTES + u64::from(b) * u64::from(BLOCK);
            let mut bytes = vec![0u8; 64];
            f.read_exact_at(&mut bytes, base).unwrap();
            BlockHeader::decode(&bytes).map(|h| (base, h))
        })
        .max_by_key(|(_, h)| h.sequence)
        .unwrap();
    assert!(h.fill_end > 8192);
    f.write_all_at(&vec![0u8; (h.fill_end - 4096) as usize], base + 4096).unwrap();
    drop(f);
    let out = tool(&["verify", dev.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let v = json_of(&out);
    assert_eq!(v["torn_blocks"], 1, "{v}");
}

#[test]
fn dump_by_key_block_and_digest() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("d.dat");
    populate(&dev);
    let out = tool(&["dump", dev.to_str().unwrap(), "--key", "users:1234", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json_of(&out);
    assert_eq!(v["bins"]["name"], "user-1234");
    assert_eq!(v["bins"]["n"], 3702);
    assert_eq!(v["digest"], digest(1234).to_hex());
    assert_eq!(v["newest"], true);
    // An overwritten key has an older copy and a newer one.
    let out = tool(&["dump", dev.to_str().unwrap(), "--digest", &digest(7).to_hex(), "--json"]);
    let lines: Vec<Json> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines.iter().filter(|l| l["newest"] == true).count(), 1);
    let text = tool(&["dump", dev.to_str().unwrap(), "--block", "0"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("name = \"user-"));
    let missing = tool(&["dump", dev.to_str().unwrap(), "--key", "users:999999"]);
    assert!(!missing.status.success());
}

#[test]
fn backup_restore_round_trip_and_damaged_backups_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("d.dat");
    populate(&dev);
    let backup = dir.path().join("b.pgb");
    let out = tool(&["backup", dev.to_str().unwrap(), "--out", backup.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let restored = dir.path().join("r.dat");
    let out = tool(&[
        "restore",
        backup.to_str().unwrap(),
        "--to",
        restored.to_str().unwrap(),
        "--device-size",
        "33554432",
        "--write-block",
        "131072",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let original = Engine::open(config(&dev)).unwrap();
    let copy = Engine::open(config(&restored)).unwrap();
    for k in 0..3000 {
        let a = original.get(&digest(k), &BinSelection::All);
        let b = copy.get(&digest(k), &BinSelection::All);
        match (a, b) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a.bins, b.bins, "key {k}");
                assert_eq!(a.meta, b.meta, "key {k}: generation, TTL and last-update time are kept");
                assert_eq!(a.key, b.key);
                assert_eq!(a.set_name, b.set_name);
            }
            (Err(_), Err(_)) => assert!(k >= 2900),
            (a, b) => panic!("key {k}: {a:?} vs {b:?}"),
        }
    }
    // The tool refuses a device held by a running engine.
    let busy = tool(&["info", dev.to_str().unwrap()]);
    assert!(!busy.status.success());
    assert!(String::from_utf8_lossy(&busy.stderr).contains("in use"), "{}", String::from_utf8_lossy(&busy.stderr));
    drop(original);
    drop(copy);
    // Damage: a flipped byte in the middle, a truncated file.
    let bytes = std::fs::read(&backup).unwrap();
    for (name, damaged) in [
        ("flipped", {
            let mut b = bytes.clone();
            let mid = b.len() / 2;
            b[mid] ^= 0x40;
            b
        }),
        ("truncated", bytes[..bytes.len() - 100].to_vec()),
    ] {
        let bad = dir.path().join(format!("{name}.pgb"));
        std::fs::write(&bad, damaged).unwrap();
        let target = dir.path().join(format!("{name}.dat"));
        let out = tool(&["restore", bad.to_str().unwrap(), "--to", target.to_str().unwrap()]);
        assert!(!out.status.success(), "{name} backup was accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(!target.exists(), "a damaged backup touched the target");
    }
}

#[test]
fn restore_into_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("d.dat");
    populate(&dev);
    let backup = dir.path().join("b.pgb");
    assert!(tool(&["backup", dev.to_str().unwrap(), "--out", backup.to_str().unwrap()]).status.success());
    let mut config = peregrine_server::config::Config::parse(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[[namespace]]\nname = \"test\"\n[[namespace.devices]]\npath = \"srv.dat\"\nsize_bytes = 67108864\n",
        dir.path().display()
    ))
    .unwrap();
    config.server.metrics_listen = None;
    let node = peregrine_server::start_in_background(config).unwrap();
    let out = tool(&["restore", backup.to_str().unwrap(), "--hosts", &node.addr.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("restored 2900 records"));
    node.stop().unwrap();
    let e = Engine::open(config_for(&dir.path().join("srv.dat"))).unwrap();
    let r = e.get(&digest(42), &BinSelection::All).unwrap();
    assert_eq!(r.bins, value(42));
    assert_eq!(r.key, Some(StoredKey { particle_type: 1, bytes: 42i64.to_be_bytes().to_vec() }));
    assert_eq!(r.meta.void_time, 0, "key 42 was overwritten without a TTL");
    let with_ttl = e.get(&digest(300), &BinSelection::All).unwrap();
    assert_eq!(with_ttl.bins, value(300));
    let now = peregrine_engine::clock::Clock::now_void_s(&peregrine_engine::clock::SystemClock);
    let remaining = i64::from(with_ttl.meta.void_time) - i64::from(now);
    assert!((86_000..=86_400).contains(&remaining), "TTL kept: {remaining} s left");
}

fn config_for(path: &Path) -> EngineConfig {
    EngineConfig::single_file("test", path, 64 << 20)
}

#[test]
fn layout_pictures_and_format() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("d.dat");
    populate(&dev);
    let svg = dir.path().join("l.svg");
    let png = dir.path().join("l.png");
    let out = tool(&["layout", dev.to_str().unwrap(), "--svg", svg.to_str().unwrap(), "--png", png.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("fill histogram") && text.contains("defrag at 50 %"), "{text}");
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg") && picture.trim_end().ends_with("</svg>"));
    let blocks = ((32u64 << 20) - DATA_OFFSET_BYTES) / u64::from(BLOCK);
    assert_eq!(picture.matches("<rect").count() as u64, 1 + blocks, "one rect per block plus the background");
    assert_eq!(&std::fs::read(&png).unwrap()[..4], &[0x89, b'P', b'N', b'G']);
    // format refuses a device with data unless --yes, then leaves an empty namespace.
    let refused = tool(&["format", dev.to_str().unwrap(), "--namespace", "other"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    let ok = tool(&["format", dev.to_str().unwrap(), "--namespace", "other", "--write-block", "131072", "--yes"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let v = json_of(&tool(&["info", dev.to_str().unwrap(), "--json"]));
    assert_eq!(v["records"], 0);
    assert_eq!(v["devices"][0]["namespace"], "other");
    let fresh = dir.path().join("new.dat");
    assert!(
        tool(&["format", fresh.to_str().unwrap(), "--namespace", "n", "--size", "16777216", "--write-block", "131072"])
            .status
            .success()
    );
    assert_eq!(json_of(&tool(&["info", fresh.to_str().unwrap(), "--json"]))["devices"][0]["blocks_total"], 120);
}

/// The tools pick record copies by the engine's own rule, truncations included: records a
/// truncation covers are neither counted nor backed up.
#[test]
fn truncated_records_are_not_counted_or_backed_up() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("d.dat");
    let e = Engine::open(config(&dev)).unwrap();
    let other = |k: i64| Digest::of_key(b"other", KeyRef::Int(k));
    for k in 0..300i64 {
        e.put(&digest(k), b"users", None, value(k), &WritePolicy::default()).unwrap();
        e.put(&other(k), b"other", None, value(k), &WritePolicy::default()).unwrap();
    }
    let pid = other(0).partition();
    let in_pid = (0..300).filter(|k| other(*k).partition() == pid).count() as u64;
    std::thread::sleep(std::time::Duration::from_millis(5));
    peregrine_engine::completion::block_on(e.truncate(Some(b"users"), None)).unwrap();
    peregrine_engine::completion::block_on(e.truncate_partition(pid)).unwrap();
    e.put(&digest(7), b"users", None, value(7), &WritePolicy::default()).unwrap();
    e.close().unwrap();
    drop(e);
    let out = tool(&["info", dev.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json_of(&out);
    assert_eq!(v["records"], 300 - in_pid + 1, "{v}");
    assert_eq!(v["metadata"]["sets"][0]["set"], "users");
    assert_eq!(v["metadata"]["partitions_truncated"], 1);
    let backup = dir.path().join("b.pgb");
    let out = tool(&["backup", dev.to_str().unwrap(), "--out", backup.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let restored = dir.path().join("r.dat");
    let (b, r) = (backup.to_str().unwrap(), restored.to_str().unwrap());
    let out = tool(&["restore", b, "--to", r, "--device-size", "33554432", "--write-block", "131072"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e = Engine::open(config(&restored)).unwrap();
    assert_eq!(e.stats().records, 300 - in_pid + 1);
    assert!(e.get(&digest(7), &BinSelection::All).is_ok());
    assert!(e.get(&digest(8), &BinSelection::All).is_err());
    e.close().unwrap();
}
