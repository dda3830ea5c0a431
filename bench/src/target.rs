//! Where operations go: the engine in this process, or (with `--hosts`) a server or cluster.
//! Errors are sorted into the kinds the report counts.

use peregrine_engine::completion::join_all;
use peregrine_engine::{
    Bin, BinName, BinSelection, Digest, Engine, EngineStats, Error, KeyRef, RecordExists, Ttl, Value, WritePolicy,
};
use peregrine_proto::client::{Client, ClientError, WireBin, WriteMode};
use peregrine_proto::consts::result;

/// Kinds of failed operations, as reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The record was not there (for reads: not an error, counted apart).
    NotFound,
    /// The server or device is full.
    DeviceFull,
    /// The device is overloaded (write queue full) or the key is busy.
    Overload,
    /// The operation timed out.
    Timeout,
    /// The partition was unavailable: result 11, or no known node held it.
    Unavailable,
    /// Generation condition failed.
    Generation,
    /// Corrupt data was detected.
    Corruption,
    /// An I/O or network error.
    Io,
    /// `--verify` found a wrong value.
    Verify,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// Every kind, in report order.
    pub const ALL: [ErrorKind; 10] = [
        ErrorKind::NotFound,
        ErrorKind::DeviceFull,
        ErrorKind::Overload,
        ErrorKind::Timeout,
        ErrorKind::Unavailable,
        ErrorKind::Generation,
        ErrorKind::Corruption,
        ErrorKind::Io,
        ErrorKind::Verify,
        ErrorKind::Other,
    ];

    /// Name in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::DeviceFull => "device_full",
            ErrorKind::Overload => "overload",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Generation => "generation",
            ErrorKind::Corruption => "corruption",
            ErrorKind::Io => "io",
            ErrorKind::Verify => "verify",
            ErrorKind::Other => "other",
        }
    }

    /// Position in [`ErrorKind::ALL`].
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|k| *k == self).unwrap_or(Self::ALL.len() - 1)
    }

    fn of_client(e: &ClientError) -> ErrorKind {
        match e {
            ClientError::Result(code) => match *code {
                result::KEY_NOT_FOUND => ErrorKind::NotFound,
                result::GENERATION => ErrorKind::Generation,
                result::SERVER_FULL => ErrorKind::DeviceFull,
                result::TIMEOUT => ErrorKind::Timeout,
                result::PARTITION_UNAVAILABLE => ErrorKind::Unavailable,
                result::KEY_BUSY | result::DEVICE_OVERLOAD => ErrorKind::Overload,
                _ => ErrorKind::Other,
            },
            ClientError::Timeout => ErrorKind::Timeout,
            ClientError::NoNode { .. } => ErrorKind::Unavailable,
            ClientError::Io(_) => ErrorKind::Io,
            ClientError::Protocol(_) => ErrorKind::Other,
        }
    }

    fn of_engine(e: &Error) -> ErrorKind {
        match e {
            Error::NotFound => ErrorKind::NotFound,
            Error::DeviceFull(_) => ErrorKind::DeviceFull,
            Error::DeviceOverload(_) | Error::KeyBusy => ErrorKind::Overload,
            Error::Generation { .. } => ErrorKind::Generation,
            Error::Corruption { .. } => ErrorKind::Corruption,
            Error::Io { .. } | Error::Failed { .. } => ErrorKind::Io,
            _ => ErrorKind::Other,
        }
    }
}

/// The engine, opened in this process.
#[derive(Debug)]
pub struct Embedded {
    engine: Engine,
    set: Vec<u8>,
    ttl: Ttl,
}

/// A server or cluster over the wire protocol.
#[derive(Debug)]
pub struct Remote {
    client: Client,
    namespace: String,
    set: String,
    ttl: Option<u32>,
}

/// A target for operations.
#[derive(Debug)]
pub enum Target {
    /// The engine in this process.
    Embedded(Embedded),
    /// A server or cluster.
    Remote(Remote),
}

/// The digest of integer key `k` in `set`.
pub fn digest_of(set: &[u8], k: u64) -> Digest {
    Digest::of_key(set, KeyRef::Int(k as i64))
}

impl Target {
    /// An embedded target.
    pub fn embedded(engine: Engine, set: &str, ttl: Option<u32>) -> Target {
        let ttl = ttl.map_or(Ttl::NamespaceDefault, Ttl::Seconds);
        Target::Embedded(Embedded { engine, set: set.as_bytes().to_vec(), ttl })
    }

    /// A remote target reached through `seeds`.
    pub async fn remote(
        seeds: &[std::net::SocketAddr],
        namespace: &str,
        set: &str,
        ttl: Option<u32>,
        timeout: std::time::Duration,
    ) -> Result<Target, String> {
        let client = Client::connect(seeds, timeout).await.map_err(|e| format!("connecting to {seeds:?}: {e}"))?;
        Ok(Target::Remote(Remote { client, namespace: namespace.into(), set: set.into(), ttl }))
    }

    /// Reads one key: `Ok(None)` when it does not exist.
    pub async fn read(&self, key: u64) -> Result<Option<Vec<Bin>>, ErrorKind> {
        match self {
            Target::Remote(t) => {
                let digest = digest_of(t.set.as_bytes(), key).0;
                match t.client.get(&t.namespace, &t.set, &digest).await {
                    Ok(row) => Ok(row.map(|bins| from_wire(&bins))),
                    Err(e) => Err(ErrorKind::of_client(&e)),
                }
            }
            Target::Embedded(t) => match t.engine.get_async(&digest_of(&t.set, key), &BinSelection::All).await {
                Ok(r) => Ok(Some(r.bins)),
                Err(Error::NotFound) => Ok(None),
                Err(e) => Err(ErrorKind::of_engine(&e)),
            },
        }
    }

    /// Reads several keys (one batch request per node when remote).
    pub async fn read_batch(&self, keys: &[u64]) -> Result<Vec<Option<Vec<Bin>>>, ErrorKind> {
        match self {
            Target::Remote(t) => {
                let digests: Vec<[u8; 20]> = keys.iter().map(|k| digest_of(t.set.as_bytes(), *k).0).collect();
                match t.client.batch_get(&t.namespace, &t.set, &digests).await {
                    Ok(rows) => Ok(rows.into_iter().map(|r| r.map(|bins| from_wire(&bins))).collect()),
                    Err(e) => Err(ErrorKind::of_client(&e)),
                }
            }
            Target::Embedded(_) => join_all(keys.iter().map(|k| self.read(*k)).collect()).await.into_iter().collect(),
        }
    }

    /// Writes one key (update merges, replace replaces).
    pub async fn write(&self, key: u64, bins: Vec<Bin>, replace: bool) -> Result<(), ErrorKind> {
        match self {
            Target::Remote(t) => {
                let digest = digest_of(t.set.as_bytes(), key).0;
                let mode = if replace { WriteMode::Replace } else { WriteMode::Update };
                t.client
                    .put(&t.namespace, &t.set, &digest, &to_wire(&bins), mode, t.ttl)
                    .await
                    .map_err(|e| ErrorKind::of_client(&e))
            }
            Target::Embedded(t) => {
                let policy = WritePolicy {
                    exists: if replace { RecordExists::Replace } else { RecordExists::Update },
                    ttl: t.ttl,
                    ..WritePolicy::default()
                };
                t.engine
                    .put_async(&digest_of(&t.set, key), &t.set, None, bins, &policy)
                    .await
                    .map(|_| ())
                    .map_err(|e| ErrorKind::of_engine(&e))
            }
        }
    }

    /// Engine statistics (embedded only).
    pub fn engine_stats(&self) -> Option<EngineStats> {
        match self {
            Target::Embedded(t) => Some(t.engine.stats()),
            Target::Remote(_) => None,
        }
    }

    /// Waits until everything written is on the device (embedded only).
    pub fn flush(&self) -> Result<(), String> {
        match self {
            Target::Embedded(t) => t.engine.flush().map_err(|e| e.to_string()),
            Target::Remote(_) => Ok(()),
        }
    }

    /// Flushes and closes an embedded engine.
    pub fn close(&self) -> Result<(), String> {
        match self {
            Target::Embedded(t) => t.engine.close().map_err(|e| e.to_string()),
            Target::Remote(_) => Ok(()),
        }
    }
}

/// Bench values are blobs; other particle types come back as opaque values.
fn from_wire(bins: &[WireBin]) -> Vec<Bin> {
    bins.iter()
        .filter_map(|(name, pt, value)| {
            let value = match *pt {
                4 => Value::Blob(value.clone()),
                3 => Value::String(value.clone()),
                other => Value::Other { particle_type: other, bytes: value.clone() },
            };
            Some(Bin { name: BinName::new(name).ok()?, value })
        })
        .collect()
}

fn to_wire(bins: &[Bin]) -> Vec<WireBin> {
    bins.iter()
        .map(|b| {
            let (pt, bytes) = match &b.value {
                Value::Blob(v) => (4, v.clone()),
                Value::String(v) => (3, v.clone()),
                Value::Int(v) => (1, v.to_be_bytes().to_vec()),
                other => (other.particle_type(), Vec::new()),
            };
            (b.name.as_bytes().to_vec(), pt, bytes)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_sort_into_kinds() {
        let kind = |e: ClientError| ErrorKind::of_client(&e);
        assert_eq!(kind(ClientError::Result(result::PARTITION_UNAVAILABLE)), ErrorKind::Unavailable);
        assert_eq!(kind(ClientError::NoNode { namespace: "test".into(), partition: 7 }), ErrorKind::Unavailable);
        assert_eq!(kind(ClientError::Result(result::TIMEOUT)), ErrorKind::Timeout);
        assert_eq!(kind(ClientError::Timeout), ErrorKind::Timeout);
        assert_eq!(kind(ClientError::Result(result::KEY_BUSY)), ErrorKind::Overload);
        assert_eq!(kind(ClientError::Result(result::DEVICE_OVERLOAD)), ErrorKind::Overload);
        assert_eq!(kind(ClientError::Result(result::CLUSTER_KEY_MISMATCH)), ErrorKind::Other);
        assert_eq!(kind(ClientError::Io(std::io::ErrorKind::ConnectionRefused.into())), ErrorKind::Io);
        assert_eq!(ErrorKind::Unavailable.name(), "unavailable");
        assert!(ErrorKind::ALL.iter().enumerate().all(|(i, k)| k.index() == i));
    }
}
