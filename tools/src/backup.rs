//! Portable backups: the newest live version of every record (set, user key, bins, generation,
//! last-update and void time), streamed into one file and restorable into a device or a server.
//!
//! File layout (little-endian): "PGBACKUP", u32 version 1, u8 namespace length, namespace; then
//! per record u32 length and the record in the device record format with its checksum seeded
//! with 0; then u32 0xFFFFFFFF, u64 record count and u64 xxh3 of every byte before the marker.
//! A restore reads the whole file and checks every checksum and the trailer before it writes
//! anything, so a damaged backup is refused without touching the target.

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

/// A checked backup, held in memory record by record.
pub struct Backup {
    /// Namespace it was taken from.
    pub namespace: String,
    /// Every record.
    pub records: Vec<Record>,
}

/// Reads and checks a backup file completely; any damage is an error naming what failed.
pub fn read_backup(path: &Path) -> Result<Backup, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut r = BufReader::new(file);
    let mut hash = Xxh3::new();
    let damaged = |what: &str| format!("backup {} is damaged: {what}", path.display());
    let mut read = |n: usize, hash: &mut Xxh3, hashed: bool| -> Result<Vec<u8>, String> {
        let mut b = vec![0u8; n];
        r.read_exact(&mut b).map_err(|_| damaged("it ends early (truncated?)"))?;
        if hashed {
            hash.update(&b);
        }
        Ok(b)
    };
    if read(8, &mut hash, true)? != MAGIC {
        return Err(format!("{} is not a Peregrine backup", path.display()));
    }
    let version = u32::from_le_bytes(read(4, &mut hash, true)?.try_into().map_err(|_| damaged("version"))?);
    if version != VERSION {
        return Err(format!("backup {} has version {version}; this tool reads version {VERSION}", path.display()));
    }
    let ns_len = read(1, &mut hash, true)?[0] as usize;
    let namespace = String::from_utf8(read(ns_len, &mut hash, true)?).map_err(|_| damaged("namespace"))?;
    let mut records = Vec::new();
    loop {
        let len = u32::from_le_bytes(read(4, &mut hash, false)?.try_into().map_err(|_| damaged("length"))?);
        if len == TRAILER_MARKER {
            break;
        }
        if (len as usize) < record::HEADER_BYTES || len > 64 << 20 {
            return Err(damaged(&format!("record {} has an impossible length {len}", records.len())));
        }
        hash.update(&len.to_le_bytes());
        let bytes = read(len as usize, &mut hash, true)?;
        let view = record::parse(&bytes, 0).map_err(|e| damaged(&format!("record {}: {e}", records.len())))?;
        match view.to_version() {
            RecordVersion::Live(rec) => records.push(rec),
            RecordVersion::Tombstone { .. } => return Err(damaged("it holds a tombstone")),
        }
    }
    let count = u64::from_le_bytes(read(8, &mut hash, false)?.try_into().map_err(|_| damaged("trailer"))?);
    let digest = u64::from_le_bytes(read(8, &mut hash, false)?.try_into().map_err(|_| damaged("trailer"))?);
    if count != records.len() as u64 {
        return Err(damaged(&format!("the trailer counts {count} records, the file holds {}", records.len())));
    }
    if digest != hash.digest() {
        return Err(damaged("the checksum over the file does not match"));
    }
    Ok(Backup { namespace, records })
}

/// Restores into an engine on `config`'s devices (versions kept exactly).
pub fn restore_to_engine(backup: &Backup, config: EngineConfig) -> Result<u64, String> {
    let engine = Engine::open(config).map_err(|e| e.to_string())?;
    let bar = progress(backup.records.len() as u64, "restoring");
    for r in &backup.records {
        engine.apply_version(&RecordVersion::Live(r.clone())).map_err(|e| format!("restoring {}: {e}", r.digest))?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    engine.close().map_err(|e| e.to_string())?;
    Ok(backup.records.len() as u64)
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

/// Restores into a server or cluster: bins, user key and remaining TTL of each record.
pub async fn restore_to_hosts(backup: &Backup, seeds: &[std::net::SocketAddr], namespace: &str) -> Result<u64, String> {
    use peregrine_proto::client::{Client, WriteMode};
    let client =
        Client::connect(seeds, std::time::Duration::from_secs(5)).await.map_err(|e| format!("connecting: {e}"))?;
    let now = SystemClock.now_void_s();
    let bar = progress(backup.records.len() as u64, "restoring");
    let mut n = 0;
    for r in &backup.records {
        let ttl = match r.meta.void_time {
            0 => Some(0),
            v if v <= now => {
                bar.inc(1);
                continue; // expired since the backup
            }
            v => Some(v - now),
        };
        let bins: Vec<_> = r
            .bins
            .iter()
            .map(|b| {
                let (pt, bytes) = wire_value(&b.value);
                (b.name.as_bytes().to_vec(), pt, bytes)
            })
            .collect();
        let set = String::from_utf8_lossy(&r.set_name).into_owned();
        let key = r.key.as_ref().map(|k| (k.particle_type, k.bytes.as_slice()));
        client
            .put_with_key(namespace, &set, &r.digest.0, key, &bins, WriteMode::Replace, ttl)
            .await
            .map_err(|e| format!("restoring {}: {e}", r.digest))?;
        n += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(n)
}
