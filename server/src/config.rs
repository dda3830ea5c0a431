//! The node's configuration: a TOML file (`--config`), command-line overrides, and defaults that
//! give a working node with no configuration at all (namespace `test` on `./data/test.dat`,
//! listening on 127.0.0.1:3000).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use peregrine_engine::io::{IoBackendChoice, IoOptions};
use peregrine_engine::{DeviceSpec, EngineConfig};
use serde::Deserialize;

/// Default size of a file device created for a namespace that names none.
pub const DEFAULT_FILE_DEVICE_BYTES: u64 = 1 << 30;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Network and limits.
    pub server: ServerConfig,
    /// Namespaces (at least one; `test` when none is given).
    #[serde(rename = "namespace")]
    pub namespaces: Vec<NamespaceConfig>,
}

/// The `[server]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Client port.
    pub listen: SocketAddr,
    /// Address clients should use to reach this node (defaults to the listen address, or
    /// 127.0.0.1 when listening on all addresses).
    pub advertise: Option<String>,
    /// Directory for file devices given as relative paths and for default devices.
    pub data_dir: PathBuf,
    /// Node id (hex u64); derived from the listen address and data dir when absent.
    pub node_id: Option<String>,
    /// Cluster name reported to clients.
    pub cluster_name: Option<String>,
    /// Prometheus `/metrics` endpoint (empty to disable).
    pub metrics_listen: Option<SocketAddr>,
    /// Most client connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// Largest request frame accepted (checked on the header, before any allocation).
    pub max_frame_bytes: u64,
    /// Request bytes buffered over all connections at once; readers wait beyond it.
    pub max_inflight_request_bytes: u64,
    /// A connection idle this long (no request started) is closed.
    pub idle_timeout_ms: u64,
    /// A request whose frame does not arrive whole within this time is dropped with its
    /// connection (slow senders).
    pub frame_timeout_ms: u64,
    /// On shutdown, in-flight requests get this long to finish.
    pub shutdown_grace_ms: u64,
    /// Pin each device's I/O thread to the last CPU.
    pub pin_io_threads: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
            advertise: None,
            data_dir: PathBuf::from("data"),
            node_id: None,
            cluster_name: None,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9145))),
            max_connections: 10_000,
            max_frame_bytes: 16 << 20,
            max_inflight_request_bytes: 256 << 20,
            idle_timeout_ms: 10 * 60 * 1000,
            frame_timeout_ms: 10_000,
            shutdown_grace_ms: 10_000,
            pin_io_threads: true,
        }
    }
}

/// A `[[namespace]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Namespace name.
    pub name: String,
    /// Devices; a file `<data_dir>/<name>.dat` of `DEFAULT_FILE_DEVICE_BYTES` when empty.
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
    /// Write block size.
    #[serde(default)]
    pub write_block_bytes: Option<u32>,
    /// Largest record (0 = min(1 MiB, write block - 64)).
    #[serde(default)]
    pub max_record_bytes: Option<u32>,
    /// Default TTL in seconds (0 = never expire).
    #[serde(default)]
    pub default_ttl_s: Option<u32>,
    /// Acknowledge writes only when durable.
    #[serde(default)]
    pub commit_to_device: Option<bool>,
    /// Partial write blocks are flushed after this long.
    #[serde(default)]
    pub flush_interval_ms: Option<u64>,
    /// Post-write cache per device.
    #[serde(default)]
    pub post_write_cache_bytes: Option<u64>,
    /// Write queue limit per device (beyond it writes fail with "device overload").
    #[serde(default)]
    pub max_write_queue_bytes: Option<u64>,
    /// Device write pieces while reads are active.
    #[serde(default)]
    pub write_chunk_bytes: Option<u32>,
    /// Device write depth while reads are active.
    #[serde(default)]
    pub write_queue_depth: Option<u32>,
    /// Device write pieces with no reads.
    #[serde(default)]
    pub bulk_write_chunk_bytes: Option<u32>,
    /// Device write depth with no reads.
    #[serde(default)]
    pub bulk_write_queue_depth: Option<u32>,
    /// I/O backend: auto, uring or blocking.
    #[serde(default)]
    pub io_backend: Option<String>,
    /// Reformat devices holding foreign or mismatched data (destroys it).
    #[serde(default)]
    pub format_foreign_devices: Option<bool>,
    /// Defragment used blocks below this fill percentage.
    #[serde(default)]
    pub defrag_lwm_pct: Option<u32>,
    /// Defrag pause per MiB processed.
    #[serde(default)]
    pub defrag_sleep_us: Option<u64>,
    /// How long a write waits for defrag to free a block before "device overload".
    #[serde(default)]
    pub defrag_wait_ms: Option<u64>,
    /// Ordinary writes stop at this free-block percentage.
    #[serde(default)]
    pub stop_writes_avail_pct: Option<u32>,
    /// Free blocks kept for defrag alone (percent).
    #[serde(default)]
    pub defrag_reserve_pct: Option<u32>,
    /// Expiry period (0 = off).
    #[serde(default)]
    pub expiry_period_s: Option<u64>,
    /// Evict while live data exceeds this device percentage (0 = off).
    #[serde(default)]
    pub evict_used_pct: Option<u32>,
    /// Evict while the index exceeds this many bytes (0 = off).
    #[serde(default)]
    pub evict_index_bytes: Option<u64>,
    /// Tomb raider period (0 = only when tombstones pile up).
    #[serde(default)]
    pub tomb_raider_period_s: Option<u64>,
}

/// A device of a namespace.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Block device or file (relative paths are under `data_dir`).
    pub path: PathBuf,
    /// Size to create a file with (ignored for block devices).
    #[serde(default)]
    pub size_bytes: Option<u64>,
}

impl NamespaceConfig {
    /// A namespace with every default.
    pub fn named(name: &str) -> NamespaceConfig {
        NamespaceConfig {
            name: name.into(),
            devices: Vec::new(),
            write_block_bytes: None,
            max_record_bytes: None,
            default_ttl_s: None,
            commit_to_device: None,
            flush_interval_ms: None,
            post_write_cache_bytes: None,
            max_write_queue_bytes: None,
            write_chunk_bytes: None,
            write_queue_depth: None,
            bulk_write_chunk_bytes: None,
            bulk_write_queue_depth: None,
            io_backend: None,
            format_foreign_devices: None,
            defrag_lwm_pct: None,
            defrag_sleep_us: None,
            defrag_wait_ms: None,
            stop_writes_avail_pct: None,
            defrag_reserve_pct: None,
            expiry_period_s: None,
            evict_used_pct: None,
            evict_index_bytes: None,
            tomb_raider_period_s: None,
        }
    }

    /// The engine configuration for this namespace.
    pub fn engine_config(&self, data_dir: &Path, io_cpus: Vec<usize>) -> Result<EngineConfig, String> {
        let devices = if self.devices.is_empty() {
            vec![DeviceSpec {
                path: data_dir.join(format!("{}.dat", self.name)),
                file_size_bytes: Some(DEFAULT_FILE_DEVICE_BYTES),
            }]
        } else {
            self.devices
                .iter()
                .map(|d| DeviceSpec {
                    path: if d.path.is_absolute() { d.path.clone() } else { data_dir.join(&d.path) },
                    file_size_bytes: Some(d.size_bytes.unwrap_or(DEFAULT_FILE_DEVICE_BYTES)),
                })
                .collect()
        };
        let mut c = EngineConfig::new(self.name.clone(), devices);
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { c.$field = v; } )* };
        }
        set!(
            write_block_bytes,
            max_record_bytes,
            default_ttl_s,
            commit_to_device,
            flush_interval_ms,
            post_write_cache_bytes,
            max_write_queue_bytes,
            write_chunk_bytes,
            write_queue_depth,
            bulk_write_chunk_bytes,
            bulk_write_queue_depth,
            format_foreign_devices,
            defrag_lwm_pct,
            defrag_sleep_us,
            defrag_wait_ms,
            stop_writes_avail_pct,
            defrag_reserve_pct,
            expiry_period_s,
            evict_used_pct,
            evict_index_bytes,
            tomb_raider_period_s
        );
        let backend = match self.io_backend.as_deref() {
            None | Some("auto") => IoBackendChoice::Auto,
            Some("uring") => IoBackendChoice::Uring,
            Some("blocking") => IoBackendChoice::Blocking,
            Some(other) => {
                return Err(format!(
                    "namespace {}: io_backend must be auto, uring or blocking, not '{other}'",
                    self.name
                ));
            }
        };
        c.io = IoOptions { backend, io_thread_cpus: io_cpus, ..IoOptions::default() };
        c.validate().map_err(|e| format!("namespace {}: {e}", self.name))?;
        Ok(c)
    }
}

impl Config {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        Config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Config, String> {
        let mut c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        c.fill_defaults();
        c.validate()?;
        Ok(c)
    }

    /// Adds the default namespace when none is configured.
    pub fn fill_defaults(&mut self) {
        if self.namespaces.is_empty() {
            self.namespaces.push(NamespaceConfig::named("test"));
        }
    }

    /// Checks what the parser cannot.
    pub fn validate(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for ns in &self.namespaces {
            if !names.insert(ns.name.as_str()) {
                return Err(format!("namespace '{}' is configured twice", ns.name));
            }
        }
        if let Some(id) = &self.server.node_id
            && u64::from_str_radix(id, 16).is_err()
        {
            return Err(format!("node_id '{id}' is not a hexadecimal u64"));
        }
        if self.server.max_frame_bytes < 64 * 1024 {
            return Err("max_frame_bytes must be at least 65536".into());
        }
        if self.server.max_inflight_request_bytes < self.server.max_frame_bytes {
            return Err("max_inflight_request_bytes must hold at least one max_frame_bytes frame".into());
        }
        if self.server.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_gives_the_default_node() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:3000");
        assert_eq!(c.namespaces.len(), 1);
        let e = c.namespaces[0].engine_config(&c.server.data_dir, vec![]).unwrap();
        assert_eq!(e.namespace, "test");
        assert_eq!(e.devices[0].path, PathBuf::from("data/test.dat"));
    }

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../../docs/peregrine.example.toml");
        let c = Config::parse(text).unwrap();
        assert!(c.namespaces.len() >= 2);
        for ns in &c.namespaces {
            ns.engine_config(&c.server.data_dir, vec![]).unwrap();
        }
    }

    #[test]
    fn mistakes_are_named() {
        let err = Config::parse("[server]\nlisten = \"nope\"\n").unwrap_err();
        assert!(err.contains("listen") || err.contains("address"), "{err}");
        let err = Config::parse("[server]\nbogus = 1\n").unwrap_err();
        assert!(err.contains("bogus"), "{err}");
        let err = Config::parse("[[namespace]]\nname = \"a\"\n[[namespace]]\nname = \"a\"\n").unwrap_err();
        assert!(err.contains("twice"), "{err}");
        let c = Config::parse("[[namespace]]\nname = \"a\"\nio_backend = \"fast\"\n").unwrap();
        let err = c.namespaces[0].engine_config(Path::new("/d"), vec![]).unwrap_err();
        assert!(err.contains("io_backend"), "{err}");
        let c = Config::parse("[[namespace]]\nname = \"a\"\nwrite_block_bytes = 1000\n").unwrap();
        assert!(c.namespaces[0].engine_config(Path::new("/d"), vec![]).unwrap_err().contains("write_block_bytes"));
    }
}
