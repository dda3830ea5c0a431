//! The node's configuration: a TOML file (`--config`), command-line overrides, and defaults that
//! give a working node with no configuration at all (namespace `test` on `./data/test.dat`,
//! listening on 127.0.0.1:3000).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use peregrine_engine::io::IoBackendChoice;
use peregrine_engine::{DeviceSpec, EngineConfig};
use serde::Deserialize;

/// Default size of a file device created for a namespace that names none.
pub const DEFAULT_FILE_DEVICE_BYTES: u64 = 1 << 30;

/// Largest node-wide request byte budget (the budget is a semaphore of one permit per byte).
pub const INFLIGHT_REQUEST_BYTES_MAX: u64 = 1 << 40;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Network and limits.
    pub server: ServerConfig,
    /// Namespaces (at least one; `test` when none is given).
    #[serde(rename = "namespace")]
    pub namespaces: Vec<NamespaceConfig>,
    /// The cluster this node belongs to (`None`: a node alone, no replication).
    pub cluster: Option<ClusterConfig>,
}

/// Default replication factor of a cluster.
pub const REPLICATION_FACTOR_DEFAULT: usize = 3;
/// Default Raft heartbeat interval of a cluster's partition groups, ms.
pub const CLUSTER_HEARTBEAT_MS_DEFAULT: u64 = 750;
/// Default shortest election timeout of a cluster's partition groups, ms (the longest is
/// twice this). openraft's leader lease is the longest election timeout (3.5 s): a failed
/// leader's groups elect once it lapses, so writes resume within about 4 s.
pub const CLUSTER_ELECTION_TIMEOUT_MS_DEFAULT: u64 = 1_750;
/// Default time without a command after which a partition group led here sleeps, ms. Short:
/// a uniform load over 4096 partitions touches each one every few seconds, and an awake group
/// costs every one of its replicas a tick every 152 ms (openraft's tick is 13/64 of the
/// heartbeat); a write to a sleeping group pays one heartbeat round first. Measured with 3
/// nodes on 2 cores, 1 KiB updates: 1 s gave 1 548 writes/s at 32 clients (p99 56 ms) and
/// 1 641 at 256 (p99 392 ms), against 846 (p99 124 ms) and 1 107 (p99 722 ms) with 10 s.
pub const CLUSTER_IDLE_AFTER_MS_DEFAULT: u64 = 1_000;
/// Default snapshot transfer rate, MB/s.
pub const CLUSTER_SNAPSHOT_MB_PER_S_DEFAULT: u64 = 64;

/// The `[cluster]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id: unique in the cluster, never reused (1 or more).
    pub node_id: u64,
    /// Address of this node's fabric (node-to-node traffic).
    pub fabric_listen: SocketAddr,
    /// Fabric addresses of the cluster's nodes, this one included.
    pub seeds: Vec<SocketAddr>,
    /// Copies of every record (1 to the number of nodes).
    #[serde(default = "default_replication_factor")]
    pub replication_factor: usize,
    /// Cluster name the fabric checks (peers of another cluster are refused); defaults to
    /// `[server] cluster_name`, else "peregrine".
    #[serde(default)]
    pub name: Option<String>,
    /// Idle partition groups stop their timers (one liveness heartbeat per peer stands in).
    #[serde(default = "default_true")]
    pub hibernate: bool,
    /// A group led here sleeps after this long without a write or read (with `hibernate`), ms.
    #[serde(default = "default_idle_after_ms")]
    pub idle_after_ms: u64,
    /// Raft heartbeat interval, ms.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Shortest Raft election timeout, ms (the longest is twice this).
    #[serde(default = "default_election_timeout_ms")]
    pub election_timeout_ms: u64,
    /// Snapshot transfer rate, MB/s (0 = unlimited).
    #[serde(default = "default_snapshot_mb_per_s")]
    pub snapshot_mb_per_s: u64,
    /// A partition group snapshots (and may purge its log) every this many entries.
    #[serde(default = "default_snapshot_every_entries")]
    pub snapshot_every_entries: u64,
    /// Entries a group keeps after a snapshot for followers slightly behind (one further
    /// behind gets the snapshot).
    #[serde(default = "default_log_kept_after_snapshot")]
    pub log_kept_after_snapshot: u64,
}

fn default_idle_after_ms() -> u64 {
    CLUSTER_IDLE_AFTER_MS_DEFAULT
}
fn default_snapshot_every_entries() -> u64 {
    peregrine_replication::node::SNAPSHOT_EVERY_ENTRIES
}
fn default_log_kept_after_snapshot() -> u64 {
    peregrine_replication::node::LOG_KEPT_AFTER_SNAPSHOT
}

fn default_replication_factor() -> usize {
    REPLICATION_FACTOR_DEFAULT
}
fn default_true() -> bool {
    true
}
fn default_heartbeat_ms() -> u64 {
    CLUSTER_HEARTBEAT_MS_DEFAULT
}
fn default_election_timeout_ms() -> u64 {
    CLUSTER_ELECTION_TIMEOUT_MS_DEFAULT
}
fn default_snapshot_mb_per_s() -> u64 {
    CLUSTER_SNAPSHOT_MB_PER_S_DEFAULT
}

impl ClusterConfig {
    /// Checks what the parser cannot; `client_listen` is the node's client address.
    pub fn validate(&self, client_listen: SocketAddr) -> Result<(), String> {
        if self.node_id == 0 {
            return Err("[cluster] node_id must be at least 1".into());
        }
        if self.seeds.is_empty() {
            return Err("[cluster] seeds must list the fabric addresses of the cluster's nodes".into());
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.seeds {
            if !seen.insert(s) {
                return Err(format!("[cluster] seeds lists {s} twice"));
            }
        }
        if !self.seeds_contain_self() {
            return Err(format!(
                "[cluster] seeds {:?} do not contain this node's fabric_listen {}: list every node's fabric address, this one included",
                self.seeds, self.fabric_listen
            ));
        }
        if self.replication_factor == 0 || self.replication_factor > self.seeds.len() {
            return Err(format!(
                "[cluster] replication_factor {} must be from 1 to the number of nodes in seeds ({})",
                self.replication_factor,
                self.seeds.len()
            ));
        }
        if self.fabric_listen == client_listen {
            return Err(format!("[cluster] fabric_listen {} is also the client listen address", self.fabric_listen));
        }
        if self.snapshot_every_entries == 0 {
            return Err("[cluster] snapshot_every_entries must be at least 1".into());
        }
        if self.heartbeat_ms == 0 || self.election_timeout_ms <= self.heartbeat_ms {
            return Err(format!(
                "[cluster] election_timeout_ms ({}) must be above heartbeat_ms ({}), which must be at least 1",
                self.election_timeout_ms, self.heartbeat_ms
            ));
        }
        Ok(())
    }

    /// Whether `seeds` holds this node's fabric address (by port when it listens on every
    /// address).
    pub fn seeds_contain_self(&self) -> bool {
        self.seeds.iter().any(|s| self.is_self(*s))
    }

    /// Whether `addr` is this node's fabric address.
    pub fn is_self(&self, addr: SocketAddr) -> bool {
        addr == self.fabric_listen
            || (self.fabric_listen.ip().is_unspecified() && addr.port() == self.fabric_listen.port())
    }
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
    /// Prometheus `/metrics` endpoint: `"HOST:PORT"`, or `"off"` for none.
    #[serde(deserialize_with = "deserialize_metrics_listen")]
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

/// `metrics_listen` (TOML) or `--metrics-listen` (command line): `HOST:PORT`, or `off`.
pub fn parse_metrics_listen(text: &str) -> Result<Option<SocketAddr>, String> {
    match text {
        "off" => Ok(None),
        a => a.parse().map(Some).map_err(|e| format!("metrics_listen '{a}': {e} (HOST:PORT, or \"off\")")),
    }
}

fn deserialize_metrics_listen<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    parse_metrics_listen(&text).map_err(serde::de::Error::custom)
}

/// Declares [`NamespaceConfig`] from the one list of engine settings below.
///
/// Each entry is `toml_key: TomlType => engine_field` (a path into [`EngineConfig`], e.g.
/// `io.ring_entries`). The entry declares the table's optional field, sets the engine field
/// from it in [`NamespaceConfig::engine_config`], and is listed in [`ENGINE_SETTINGS`] (tests
/// check that every key is in `docs/peregrine.example.toml` and that every `EngineConfig` field
/// is reached).
macro_rules! namespace_config {
    ($( $(#[doc = $doc:literal])* $key:ident: $ty:ty => $($path:ident).+, )*) => {
        /// A `[[namespace]]` table: its name, its devices, and every engine setting (each optional;
        /// an absent one keeps the engine's default).
        #[derive(Debug, Clone, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct NamespaceConfig {
            /// Namespace name.
            pub name: String,
            /// Devices; a file `<data_dir>/<name>.dat` of `DEFAULT_FILE_DEVICE_BYTES` when empty.
            #[serde(default)]
            pub devices: Vec<DeviceConfig>,
            $(
                $(#[doc = $doc])*
                #[serde(default)]
                pub $key: Option<$ty>,
            )*
        }

        /// Every engine setting of a namespace table: (TOML key, `EngineConfig` field).
        pub const ENGINE_SETTINGS: &[(&str, &str)] = &[
            $( (stringify!($key), stringify!($($path).+)), )*
        ];

        impl NamespaceConfig {
            /// A namespace with every default.
            pub fn named(name: &str) -> NamespaceConfig {
                NamespaceConfig { name: name.into(), devices: Vec::new(), $( $key: None, )* }
            }

            /// Sets every engine field whose setting is present.
            fn apply_settings(&self, c: &mut EngineConfig) {
                $(
                    if let Some(v) = &self.$key {
                        Setting::apply(v.clone(), &mut c.$($path).+);
                    }
                )*
            }

            /// For each setting: its key, and a namespace table setting it to something other
            /// than its value in `base`.
            #[cfg(test)]
            fn each_setting_changed(base: &EngineConfig) -> Vec<(&'static str, NamespaceConfig)> {
                let mut out = Vec::new();
                $(
                    let mut ns = NamespaceConfig::named(&base.namespace);
                    let now: $ty = Setting::of(&base.$($path).+);
                    ns.$key = Some(tests::Changed::changed(&now));
                    out.push((stringify!($key), ns));
                )*
                out
            }
        }
    };
}

namespace_config! {
    /// Write block size: a power of two from 128 KiB to 8 MiB.
    write_block_bytes: u32 => write_block_bytes,
    /// Largest record (0 = min(1 MiB, write block - 64)).
    max_record_bytes: u32 => max_record_bytes,
    /// Default TTL in seconds (0 = never expire).
    default_ttl_s: u32 => default_ttl_s,
    /// Acknowledge writes only when durable.
    commit_to_device: bool => commit_to_device,
    /// Partial write blocks are flushed after this long.
    flush_interval_ms: u64 => writer.flush_interval_ms,
    /// Post-write cache per device.
    post_write_cache_bytes: u64 => writer.post_write_cache_bytes,
    /// Write queue limit per device (beyond it writes fail with "device overload").
    max_write_queue_bytes: u64 => writer.max_write_queue_bytes,
    /// Device write pieces while reads are active.
    write_chunk_bytes: u32 => writer.write_chunk_bytes,
    /// Device write depth while reads are active.
    write_queue_depth: u32 => writer.write_queue_depth,
    /// Device write pieces with no reads.
    bulk_write_chunk_bytes: u32 => writer.bulk_write_chunk_bytes,
    /// Device write depth with no reads.
    bulk_write_queue_depth: u32 => writer.bulk_write_queue_depth,
    /// How long without device reads before writes switch to the bulk pieces.
    bulk_write_after_read_quiet_ms: u64 => writer.bulk_write_after_read_quiet_ms,
    /// Reformat devices holding foreign or mismatched data (destroys it).
    format_foreign_devices: bool => format_foreign_devices,
    /// Defragment used blocks below this fill percentage.
    defrag_lwm_pct: u32 => defrag_lwm_pct,
    /// Defrag pause per MiB processed.
    defrag_sleep_us: u64 => defrag_sleep_us,
    /// How long a write waits for defrag to free a block before "device overload".
    defrag_wait_ms: u64 => defrag_wait_ms,
    /// Ordinary writes stop at this free-block percentage.
    stop_writes_avail_pct: u32 => stop_writes_avail_pct,
    /// Free blocks kept for defrag alone (percent).
    defrag_reserve_pct: u32 => defrag_reserve_pct,
    /// Expiry period (0 = off).
    expiry_period_s: u64 => expiry_period_s,
    /// Evict while live data exceeds this device percentage (0 = off).
    evict_used_pct: u32 => evict_used_pct,
    /// Evict while the index exceeds this many bytes (0 = off).
    evict_index_bytes: u64 => evict_index_bytes,
    /// Each eviction step removes about this many tenths of a percent of evictable records.
    evict_step_tenths_pct: u32 => evict_step_tenths_pct,
    /// Tomb raider period (0 = only when tombstones pile up).
    tomb_raider_period_s: u64 => tomb_raider_period_s,
    /// The tomb raider runs early once tombstones exceed this percentage of index entries.
    tomb_raider_tombstone_pct: u32 => tomb_raider_tombstone_pct,
    /// How long to wait for a device another process holds before "device in use".
    device_lock_wait_ms: u64 => device_lock_wait_ms,
    /// I/O backend: auto, uring or blocking.
    io_backend: IoBackendSetting => io.backend,
    /// Submission-queue entries of each device's io_uring (its cap on operations in flight).
    io_ring_entries: u32 => io.ring_entries,
    /// Read threads per device of the blocking backend.
    io_blocking_read_threads: usize => io.blocking_read_threads,
    /// CPUs for the device I/O threads (device i uses the (i mod n)-th; empty = not pinned).
    /// When present it replaces what `[server] pin_io_threads` chose for this namespace.
    io_thread_cpus: Vec<usize> => io.io_thread_cpus,
}

/// A TOML value type and the engine field type it sets.
trait Setting<E> {
    /// Sets the engine field.
    fn apply(self, field: &mut E);
    /// The setting that gives this engine value.
    #[cfg(test)]
    fn of(field: &E) -> Self;
}

impl<T: Clone> Setting<T> for T {
    fn apply(self, field: &mut T) {
        *field = self;
    }

    #[cfg(test)]
    fn of(field: &T) -> T {
        field.clone()
    }
}

/// `io_backend` in TOML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoBackendSetting {
    /// io_uring when the kernel allows it, else the blocking pool.
    Auto,
    /// io_uring or an error.
    Uring,
    /// The blocking pread/pwrite pool.
    Blocking,
}

impl Setting<IoBackendChoice> for IoBackendSetting {
    fn apply(self, field: &mut IoBackendChoice) {
        *field = match self {
            IoBackendSetting::Auto => IoBackendChoice::Auto,
            IoBackendSetting::Uring => IoBackendChoice::Uring,
            IoBackendSetting::Blocking => IoBackendChoice::Blocking,
        };
    }

    #[cfg(test)]
    fn of(field: &IoBackendChoice) -> IoBackendSetting {
        match field {
            IoBackendChoice::Auto => IoBackendSetting::Auto,
            IoBackendChoice::Uring => IoBackendSetting::Uring,
            // The simulated device is for the engine's crash tests; TOML does not offer it.
            IoBackendChoice::Blocking | IoBackendChoice::Simulated => IoBackendSetting::Blocking,
        }
    }
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
    /// The engine configuration for this namespace. `io_cpus` are the CPUs `[server]
    /// pin_io_threads` chose for device I/O threads; the namespace's `io_thread_cpus` replaces
    /// them when set.
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
        let c = self.unvalidated_engine_config(devices, io_cpus);
        c.validate().map_err(|e| format!("namespace {}: {e}", self.name))?;
        Ok(c)
    }

    fn unvalidated_engine_config(&self, devices: Vec<DeviceSpec>, io_cpus: Vec<usize>) -> EngineConfig {
        let mut c = EngineConfig::new(self.name.clone(), devices);
        c.io.io_thread_cpus = io_cpus;
        self.apply_settings(&mut c);
        c
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
        if self.server.max_inflight_request_bytes > INFLIGHT_REQUEST_BYTES_MAX {
            return Err(format!("max_inflight_request_bytes must be at most {INFLIGHT_REQUEST_BYTES_MAX} (1 TiB)"));
        }
        if self.server.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        if let Some(c) = &self.cluster {
            c.validate(self.server.listen)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A value other than this one, to see a setting change the engine configuration.
    pub(super) trait Changed {
        fn changed(&self) -> Self;
    }

    impl Changed for u32 {
        fn changed(&self) -> u32 {
            self.wrapping_add(1)
        }
    }

    impl Changed for u64 {
        fn changed(&self) -> u64 {
            self.wrapping_add(1)
        }
    }

    impl Changed for usize {
        fn changed(&self) -> usize {
            self.wrapping_add(1)
        }
    }

    impl Changed for bool {
        fn changed(&self) -> bool {
            !self
        }
    }

    impl Changed for Vec<usize> {
        fn changed(&self) -> Vec<usize> {
            let mut v = self.clone();
            v.push(v.len());
            v
        }
    }

    impl Changed for IoBackendSetting {
        fn changed(&self) -> IoBackendSetting {
            match self {
                IoBackendSetting::Auto => IoBackendSetting::Uring,
                IoBackendSetting::Uring => IoBackendSetting::Blocking,
                IoBackendSetting::Blocking => IoBackendSetting::Auto,
            }
        }
    }

    /// `EngineConfig` fields that are not namespace-table settings, and where they come from.
    const NOT_SETTINGS: &[(&str, &str)] = &[
        ("namespace", "the table's `name`"),
        ("devices", "the `[[namespace.devices]]` tables"),
        ("clock", "the time source, replaced only by tests"),
        ("maintenance", "External is for a replication layer; a stand-alone node runs its own"),
    ];

    /// The leaf fields of a `{:#?}` rendering, by dotted path (fields of a nested struct such as
    /// `io` as `io.<name>`), with their rendered values. Values that are not structs (lists,
    /// options, enums) are leaves, whatever they contain.
    fn engine_fields(c: &EngineConfig) -> BTreeMap<String, String> {
        let is_ident = |t: &str| !t.is_empty() && t.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
        let mut out = BTreeMap::new();
        // The path prefix of the struct open at each depth; `None` inside a leaf value.
        let mut open: Vec<Option<String>> = vec![Some(String::new())];
        let mut last_leaf: Option<String> = None;
        for line in format!("{c:#?}").lines().skip(1) {
            let text = line.trim_start();
            let depth = (line.len() - text.len()) / 4;
            let field = text.split_once(": ").filter(|(name, _)| is_ident(name));
            let parent = open.get(depth.wrapping_sub(1)).cloned().flatten();
            match (field, parent) {
                (Some((name, value)), Some(prefix)) => {
                    let path = format!("{prefix}{name}");
                    open.truncate(depth);
                    let struct_name = value.strip_suffix(" {").filter(|n| is_ident(n));
                    if struct_name.is_some_and(|n| n.starts_with(|ch: char| ch.is_ascii_uppercase())) {
                        open.push(Some(format!("{path}.")));
                        last_leaf = None;
                    } else {
                        open.push(None);
                        out.insert(path.clone(), value.to_string());
                        last_leaf = Some(path);
                    }
                }
                _ => {
                    if let Some(v) = last_leaf.as_ref().and_then(|p| out.get_mut(p)) {
                        v.push_str(text);
                    }
                }
            }
        }
        out
    }

    fn one_device() -> Vec<DeviceSpec> {
        vec![DeviceSpec { path: PathBuf::from("/d/t.dat"), file_size_bytes: Some(DEFAULT_FILE_DEVICE_BYTES) }]
    }

    #[test]
    fn every_engine_field_is_a_setting() {
        let base = NamespaceConfig::named("t").unvalidated_engine_config(one_device(), vec![]);
        let fields = engine_fields(&base);
        assert!(fields.len() > 20 && fields.contains_key("io.backend"), "{fields:?}");
        let paths: Vec<String> = ENGINE_SETTINGS.iter().map(|(_, path)| path.replace(' ', "")).collect();
        for field in fields.keys() {
            assert!(
                paths.contains(field) || NOT_SETTINGS.iter().any(|(f, _)| f == field),
                "EngineConfig field `{field}` cannot be set from the server's TOML: add it to the \
                 namespace_config! list in server/src/config.rs (and to docs/peregrine.example.toml)"
            );
        }
        for path in &paths {
            assert!(fields.contains_key(path), "setting for `{path}`, which EngineConfig does not have");
        }
    }

    #[test]
    fn every_setting_reaches_its_engine_field() {
        let base = NamespaceConfig::named("t").unvalidated_engine_config(one_device(), vec![]);
        let before = engine_fields(&base);
        let changed = NamespaceConfig::each_setting_changed(&base);
        assert_eq!(changed.len(), ENGINE_SETTINGS.len());
        for ((key, ns), (listed_key, path)) in changed.iter().zip(ENGINE_SETTINGS) {
            assert_eq!(key, listed_key);
            let after = engine_fields(&ns.unvalidated_engine_config(one_device(), vec![]));
            let differ: Vec<&String> = after.keys().filter(|f| after.get(*f) != before.get(*f)).collect();
            assert_eq!(differ, vec![&path.replace(' ', "")], "setting `{key}` changed {differ:?}");
        }
        // And from TOML text, with the server's pinning replaced by the namespace's own.
        let c = Config::parse("[[namespace]]\nname = \"a\"\nio_ring_entries = 64\nio_thread_cpus = [1, 3]\n").unwrap();
        let e = c.namespaces[0].engine_config(Path::new("/d"), vec![7]).unwrap();
        assert_eq!((e.io.ring_entries, e.io.io_thread_cpus), (64, vec![1, 3]));
        let c = Config::parse("[[namespace]]\nname = \"a\"\n").unwrap();
        assert_eq!(c.namespaces[0].engine_config(Path::new("/d"), vec![7]).unwrap().io.io_thread_cpus, vec![7]);
    }

    /// The field names a `Deserialize` struct asks its deserializer for.
    fn struct_fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
        #[derive(Debug)]
        enum Probe {
            Fields(&'static [&'static str]),
            Other,
        }
        impl std::fmt::Display for Probe {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{self:?}")
            }
        }
        impl std::error::Error for Probe {}
        impl serde::de::Error for Probe {
            fn custom<M: std::fmt::Display>(_: M) -> Probe {
                Probe::Other
            }
        }
        struct Deserializer;
        impl<'de> serde::Deserializer<'de> for Deserializer {
            type Error = Probe;
            fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Probe> {
                Err(Probe::Other)
            }
            fn deserialize_struct<V: serde::de::Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Probe> {
                Err(Probe::Fields(fields))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
                unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
            }
        }
        match T::deserialize(Deserializer) {
            Err(Probe::Fields(f)) => f,
            other => panic!("not a struct: {:?}", other.err()),
        }
    }

    #[test]
    fn the_example_config_lists_every_setting() {
        let text = include_str!("../../docs/peregrine.example.toml");
        let doc: toml::Table = toml::from_str(text).unwrap();
        // [server]: a setting without a default may be shown commented out (`# key = ...`).
        let server = doc["server"].as_table().unwrap();
        let commented = |key: &str| {
            text.lines().any(|l| {
                l.trim_start().strip_prefix('#').is_some_and(|l| l.trim_start().starts_with(&format!("{key} = ")))
            })
        };
        for key in struct_fields::<ServerConfig>() {
            assert!(server.contains_key(*key) || commented(key), "[server] {key} is missing from the example config");
        }
        // Namespaces: every setting as a real key of some [[namespace]] table, so the parse
        // test below checks its value too.
        let in_some = |tables: &[&toml::Value], key: &str| tables.iter().any(|t| t.get(key).is_some());
        let namespaces: Vec<&toml::Value> = doc["namespace"].as_array().unwrap().iter().collect();
        for (key, _) in ENGINE_SETTINGS {
            assert!(in_some(&namespaces, key), "namespace setting {key} is missing from the example config");
        }
        for key in struct_fields::<NamespaceConfig>() {
            assert!(in_some(&namespaces, key), "[[namespace]] {key} is missing from the example config");
        }
        let devices: Vec<&toml::Value> =
            namespaces.iter().filter_map(|n| n.get("devices")?.as_array()).flatten().collect();
        for key in struct_fields::<DeviceConfig>() {
            assert!(in_some(&devices, key), "[[namespace.devices]] {key} is missing from the example config");
        }
    }

    #[test]
    fn metrics_listen_off_is_accepted() {
        assert_eq!(Config::parse("[server]\nmetrics_listen = \"off\"\n").unwrap().server.metrics_listen, None);
        let c = Config::parse("[server]\nmetrics_listen = \"127.0.0.1:9\"\n").unwrap();
        assert_eq!(c.server.metrics_listen, Some(SocketAddr::from(([127, 0, 0, 1], 9))));
        let err = Config::parse("[server]\nmetrics_listen = \"nowhere\"\n").unwrap_err();
        assert!(err.contains("metrics_listen") && err.contains("off"), "{err}");
        assert_eq!(parse_metrics_listen("off"), Ok(None));
    }

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
        let err = Config::parse("[[namespace]]\nname = \"a\"\nio_backend = \"fast\"\n").unwrap_err();
        assert!(err.contains("io_backend") && err.contains("blocking"), "{err}");
        // A budget beyond what the byte semaphore can count is refused, not a panic at start.
        let err = Config::parse("[server]\nmax_inflight_request_bytes = 9223372036854775807\n").unwrap_err();
        assert!(err.contains("max_inflight_request_bytes"), "{err}");
        let c = Config::parse("[[namespace]]\nname = \"a\"\nwrite_block_bytes = 1000\n").unwrap();
        assert!(c.namespaces[0].engine_config(Path::new("/d"), vec![]).unwrap_err().contains("write_block_bytes"));
    }

    #[test]
    fn bad_cluster_tables_are_refused_with_the_reason() {
        let table = |body: &str| format!("[server]\nlisten = \"127.0.0.1:3000\"\n[cluster]\n{body}\n");
        let good = "node_id = 1\nfabric_listen = \"127.0.0.1:3001\"\nseeds = [\"127.0.0.1:3001\", \"127.0.0.1:3011\", \"127.0.0.1:3021\"]";
        let c = Config::parse(&table(good)).unwrap().cluster.unwrap();
        assert_eq!((c.node_id, c.replication_factor, c.seeds.len()), (1, 3, 3));
        let cases = [
            (good.replace("node_id = 1", "node_id = 0"), "node_id must be at least 1"),
            (good.replace("\"127.0.0.1:3001\", \"127.0.0.1:3011\"", "\"127.0.0.1:3011\", \"127.0.0.1:3011\""), "twice"),
            (good.replace("seeds = [\"127.0.0.1:3001\", ", "seeds = ["), "do not contain this node"),
            (format!("{good}\nreplication_factor = 4"), "replication_factor 4 must be from 1"),
            (format!("{good}\nreplication_factor = 0"), "replication_factor 0 must be from 1"),
            (
                good.replace("fabric_listen = \"127.0.0.1:3001\"", "fabric_listen = \"127.0.0.1:3000\"")
                    .replace("3001\", ", "3000\", "),
                "also the client listen",
            ),
            (format!("{good}\nheartbeat_ms = 2000\nelection_timeout_ms = 1000"), "election_timeout_ms"),
            (format!("{good}\nbogus = 1"), "unknown field"),
        ];
        for (body, want) in cases {
            let err = Config::parse(&table(&body)).unwrap_err();
            assert!(err.contains(want), "{body}: {err}");
        }
    }
}
