//! Portable backups: the newest live version of every record (set, user key, bins, generation,
//! last-update and void time), streamed into one file and restorable into a device or a server.
//!
//! File layout (little-endian): "PGBACKUP", u32 version 1, u8 namespace length, namespace; then
//! per record u32 length and the record in the device record format with its checksum seeded
//! with 0; then u32 0xFFFFFFFF, u64 record count and u64 xxh3 of every byte before the marker.
//! A restore streams the file twice: once to check every checksum and the trailer, then to
//! write, so a damaged backup is refused without touching the target, in constant memory.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use peregrine_engine::clock::{Clock, SystemClock};
use peregrine_engine::format::record::{self, RecordView};
use peregrine_engine::record::{Record, RecordVersion, Value};
use peregrine_engine::{Engine, EngineConfig};
use xxhash_rust::xxh3::Xxh3;

use crate::image::{DeviceImage, newest_copies, progress};

const MAGIC: &[u8; 8] = b"PGBACKUP";
const VERSION: u32 = 1;
const TRAILER_MARKER: u32 = u32::MAX;
/// No record in a backup is larger than this (the largest write block).
const MAX_BACKUP_RECORD_BYTES: u32 = 8 << 20;

struct HashingWriter<W: Write> {
    inner: W,
    hash: Xxh3,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a backup of the namespace on `devices` to `out`; returns the records written.
pub fn backup(devices: &[DeviceImage], out: &Path) -> Result<u64, String> {
    let namespace = devices.first().map(|d| d.header.namespace.clone()).ok_or("no device")?;
    let blocks_total: u64 = devices.iter().map(|d| u64::from(d.header.block_count)).sum();
    let bar = progress(2 * blocks_total, "backing up");
    let newest = newest_copies(devices, || bar.inc(1))?;
    let file = std::fs::File::create(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let mut w = HashingWriter { inner: BufWriter::new(file), hash: Xxh3::new() };
    let io = |e: std::io::Error| format!("writing {}: {e}", out.display());
    w.write_all(MAGIC).map_err(io)?;
    w.write_all(&VERSION.to_le_bytes()).map_err(io)?;
    w.write_all(&[namespace.len() as u8]).map_err(io)?;
    w.write_all(namespace.as_bytes()).map_err(io)?;
    let now = SystemClock.now_void_s();
    let mut count = 0u64;
    let mut buf = Vec::new();
    let mut failure: Option<String> = None;
    for (d, dev) in devices.iter().enumerate() {
        for info in dev.used_blocks() {
            dev.scan(&info, |offset, v: &RecordView<'_>| {
                let here = newest
                    .get(&v.digest())
                    .is_some_and(|c| c.device == d && c.block == info.index && c.offset == offset);
                let void = v.meta().void_time;
                if failure.is_some() || !here || v.is_tombstone() || (void != 0 && void <= now) {
                    return;
                }
                buf.clear();
                buf.extend_from_slice(v.as_bytes());
                record::seal(&mut buf, 0);
                let r = w.write_all(&(buf.len() as u32).to_le_bytes()).and_then(|()| w.write_all(&buf));
                match r {
                    Ok(()) => count += 1,
                    Err(e) => failure = Some(io(e)),
                }
            })?;
            bar.inc(1);
        }
    }
    if let Some(f) = failure {
        return Err(f);
    }
    let digest = w.hash.digest();
    let mut inner = w.inner;
    inner.write_all(&TRAILER_MARKER.to_le_bytes()).map_err(io)?;
    inner.write_all(&count.to_le_bytes()).map_err(io)?;
    inner.write_all(&digest.to_le_bytes()).map_err(io)?;
    inner.flush().map_err(io)?;
    bar.finish_and_clear();
    Ok(count)
}

/// What a backup file holds.
#[derive(Debug, Clone)]
pub struct BackupSummary {
    /// Namespace it was taken from.
    pub namespace: String,
    /// Records in it.
    pub records: u64,
}

/// A backup file being read, hashing what the trailer covers.
struct BackupReader<'a> {
    path: &'a Path,
    input: BufReader<std::fs::File>,
    hash: Xxh3,
    buf: Vec<u8>,
}

impl BackupReader<'_> {
    fn damaged(&self, what: &str) -> String {
        format!("backup {} is damaged: {what}", self.path.display())
    }

    /// The next `n` bytes (hashed unless `hashed` is false).
    fn bytes(&mut self, n: usize, hashed: bool) -> Result<&[u8], String> {
        self.buf.resize(n, 0);
        if self.input.read_exact(&mut self.buf).is_err() {
            return Err(self.damaged("it ends early (truncated?)"));
        }
        if hashed {
            self.hash.update(&self.buf);
        }
        Ok(&self.buf)
    }

    fn u32(&mut self, hashed: bool) -> Result<u32, String> {
        let b = self.bytes(4, hashed)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.bytes(8, false)?;
        Ok(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }
}

/// Streams a backup file, handing each record to `each`; any damage is an error naming what
/// failed. Damage is found only as the stream reaches it, so callers that write should run
/// [`check_backup`] first.
pub fn read_backup(path: &Path, mut each: impl FnMut(Record) -> Result<(), String>) -> Result<BackupSummary, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut r = BackupReader { path, input: BufReader::new(file), hash: Xxh3::new(), buf: Vec::new() };
    if r.bytes(8, true)? != MAGIC {
        return Err(format!("{} is not a Peregrine backup", path.display()));
    }
    let version = r.u32(true)?;
    if version != VERSION {
        return Err(format!("backup {} has version {version}; this tool reads version {VERSION}", path.display()));
    }
    let ns_len = r.bytes(1, true)?[0] as usize;
    let namespace = String::from_utf8(r.bytes(ns_len, true)?.to_vec()).map_err(|_| r.damaged("namespace"))?;
    let mut records = 0u64;
    loop {
        let len = r.u32(false)?;
        if len == TRAILER_MARKER {
            break;
        }
        if (len as usize) < record::HEADER_BYTES || len > MAX_BACKUP_RECORD_BYTES {
            return Err(r.damaged(&format!("record {records} has an impossible length {len}")));
        }
        r.hash.update(&len.to_le_bytes());
        let parsed = record::parse(r.bytes(len as usize, true)?, 0).map(|view| view.to_version());
        match parsed {
            Ok(RecordVersion::Live(rec)) => each(rec)?,
            Ok(RecordVersion::Tombstone { .. }) => return Err(r.damaged("it holds a tombstone")),
            Err(e) => return Err(r.damaged(&format!("record {records}: {e}"))),
        }
        records += 1;
    }
    let count = r.u64()?;
    let digest = r.u64()?;
    if count != records {
        return Err(r.damaged(&format!("the trailer counts {count} records, the file holds {records}")));
    }
    if digest != r.hash.digest() {
        return Err(r.damaged("the checksum over the file does not match"));
    }
    if r.input.read(&mut [0u8; 1]).map_err(|e| format!("{}: {e}", path.display()))? != 0 {
        return Err(r.damaged("bytes follow the trailer"));
    }
    Ok(BackupSummary { namespace, records })
}

/// Reads a whole backup file and checks every record and the trailer, keeping nothing.
pub fn check_backup(path: &Path) -> Result<BackupSummary, String> {
    read_backup(path, |_| Ok(()))
}

/// Restores the checked backup at `path` into an engine on `config`'s devices (versions kept
/// exactly: generation, last-update and void time).
pub fn restore_to_engine(path: &Path, summary: &BackupSummary, config: EngineConfig) -> Result<u64, String> {
    let engine = Engine::open(config).map_err(|e| e.to_string())?;
    let bar = progress(summary.records, "restoring");
    let n = read_backup(path, |r| {
        let digest = r.digest;
        engine.apply_version(&RecordVersion::Live(r)).map_err(|e| format!("restoring {digest}: {e}"))?;
        bar.inc(1);
        Ok(())
    })?;
    bar.finish_and_clear();
    engine.close().map_err(|e| e.to_string())?;
    Ok(n.records)
}

/// Wire bytes of a value (integers and floats big-endian).
fn wire_value(v: &Value) -> (u8, Vec<u8>) {
    match v {
        Value::Int(i) => (v.particle_type(), i.to_be_bytes().to_vec()),
        Value::Float(f) => (v.particle_type(), f.to_bits().to_be_bytes().to_vec()),
        Value::Bool(b) => (v.particle_type(), vec![u8::from(*b)]),
        Value::String(b) | Value::Blob(b) | Value::List(b) | Value::Map(b) | Value::Other { bytes: b, .. } => {
            (v.particle_type(), b.clone())
        }
    }
}

/// Restores the checked backup at `path` into a server or cluster: bins, user key and
/// remaining TTL of each record (records expired since the backup are skipped), with up to
/// [`RESTORE_IN_FLIGHT`] writes in flight. Generation and last-update time are the server's.
pub fn restore_to_hosts(
    path: &Path,
    summary: &BackupSummary,
    seeds: &[std::net::SocketAddr],
    namespace: &str,
) -> Result<u64, String> {
    use peregrine_proto::client::Client;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let client = std::sync::Arc::new(
        rt.block_on(Client::connect(seeds, std::time::Duration::from_secs(5)))
            .map_err(|e| format!("connecting: {e}"))?,
    );
    let namespace: std::sync::Arc<str> = namespace.into();
    let now = SystemClock.now_void_s();
    let bar = progress(summary.records, "restoring");
    let mut batch = Vec::with_capacity(RESTORE_IN_FLIGHT);
    let mut restored = 0u64;
    read_backup(path, |r| {
        batch.push(r);
        if batch.len() == RESTORE_IN_FLIGHT {
            restored += rt.block_on(put_all(&client, &namespace, &mut batch, now))?;
            bar.set_position(restored);
        }
        Ok(())
    })?;
    restored += rt.block_on(put_all(&client, &namespace, &mut batch, now))?;
    bar.finish_and_clear();
    Ok(restored)
}

/// Writes at most this many records at once while restoring to hosts.
pub const RESTORE_IN_FLIGHT: usize = 256;

/// Writes (and drains) `records` concurrently; returns how many were written (expired ones
/// are skipped).
async fn put_all(
    client: &std::sync::Arc<peregrine_proto::client::Client>,
    namespace: &std::sync::Arc<str>,
    records: &mut Vec<Record>,
    now_void_s: u32,
) -> Result<u64, String> {
    use peregrine_proto::client::WriteMode;
    let mut puts = tokio::task::JoinSet::new();
    for r in records.drain(..) {
        let ttl = match r.meta.void_time {
            0 => 0,
            v if v <= now_void_s => continue, // expired since the backup
            v => v - now_void_s,
        };
        let bins: Vec<_> = r
            .bins
            .iter()
            .map(|b| {
                let (pt, bytes) = wire_value(&b.value);
                (b.name.as_bytes().to_vec(), pt, bytes)
            })
            .collect();
        let (client, namespace) = (client.clone(), namespace.clone());
        puts.spawn(async move {
            let set = String::from_utf8_lossy(&r.set_name).into_owned();
            let key = r.key.as_ref().map(|k| (k.particle_type, k.bytes.as_slice()));
            client
                .put_with_key(&namespace, &set, &r.digest.0, key, &bins, WriteMode::Replace, Some(ttl))
                .await
                .map_err(|e| format!("restoring {}: {e}", r.digest))
        });
    }
    let mut n = 0;
    while let Some(joined) = puts.join_next().await {
        joined.map_err(|e| format!("a restore task failed: {e}"))??;
        n += 1;
    }
    Ok(n)
}
