//! Command-line flags, their parsing (sizes, ranges, workloads) and validation with clear errors.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Load-test Peregrine: an embedded engine on a file or block device, or a server or cluster
/// over the Aerospike wire protocol.
#[derive(Parser, Debug)]
#[command(name = "peregrine-bench", version, about, long_about = None)]
pub struct Cli {
    /// Extra modes.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Workload flags.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per run
pub enum Command {
    /// Measure the device with fio (the physical limit) and Peregrine on the same file, in the
    /// same run, and print Peregrine's figures as ratios of fio's.
    Physical(RunArgs),
    /// An in-process 3-node replicated cluster: time to elect every group's leader, replicated
    /// writes (throughput, latency, fsyncs and log bytes), idle CPU and RSS with hibernation.
    Replicated(crate::replicated::ReplicatedArgs),
}

/// What to run.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Open the engine in-process on this file or block device (created if missing).
    #[arg(long, value_name = "PATH", conflicts_with = "hosts")]
    pub embedded: Option<PathBuf>,
    /// Size of a file device created by --embedded (suffixes K, M, G, T).
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "4G")]
    pub device_size: u64,
    /// Drive a server or cluster: seed addresses, comma-separated.
    #[arg(long, value_name = "HOST:PORT[,...]")]
    pub hosts: Option<String>,
    /// Namespace.
    #[arg(long, default_value = "test")]
    pub namespace: String,
    /// Set name.
    #[arg(long, default_value = "bench")]
    pub set: String,
    /// Key space: integer keys 0..N.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    pub keys: u64,
    /// Object size in bytes, or a range MIN-MAX (suffixes K, M).
    #[arg(long, value_name = "BYTES|MIN-MAX", value_parser = parse_size_range, default_value = "1024")]
    pub object_size: SizeRange,
    /// Bins per record (the object is split evenly over them).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub bins: u16,
    /// I (insert the key space once), RU,P (P% reads, rest updates) or RR,P (reads vs replaces).
    #[arg(long, value_name = "I|RU,P|RR,P", value_parser = parse_workload, default_value = "RU,80")]
    pub workload: Workload,
    /// Zipfian key skew (e.g. 0.99); uniform when absent.
    #[arg(long, value_name = "THETA")]
    pub zipf: Option<f64>,
    /// Keys per read (batch reads when above 1).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub batch_size: u32,
    /// TTL in seconds for written records (namespace default when absent).
    #[arg(long, value_name = "SECONDS")]
    pub ttl: Option<u32>,
    /// Operations in flight.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub concurrency: u32,
    /// Limit to this many operations per second (latency is then measured from each
    /// operation's scheduled start, correcting coordinated omission).
    #[arg(long, value_name = "OPS")]
    pub target_rate: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Stop after this many operations.
    #[arg(long, value_name = "N")]
    pub ops: Option<u64>,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the final summary as one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
    /// Write the latency histograms in HdrHistogram interval-log format.
    #[arg(long, value_name = "FILE")]
    pub histogram_out: Option<PathBuf>,
    /// Draw throughput and latency percentiles over time (SVG).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Check every read against what this run last wrote (values derive from key and version).
    #[arg(long)]
    pub verify: bool,
    /// No per-second progress lines.
    #[arg(long)]
    pub quiet: bool,
    /// Embedded: write block size.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "8M")]
    pub write_block: u64,
    /// Embedded: largest device write piece while reads are active.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "128K")]
    pub write_chunk: u64,
    /// Embedded: device write pieces in flight while reads are active.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub write_depth: u32,
    /// Embedded: largest device write piece when no reads are active.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "1M")]
    pub bulk_write_chunk: u64,
    /// Embedded: device write pieces in flight when no reads are active.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub bulk_write_depth: u32,
    /// Embedded: acknowledge writes only once durable (group commit).
    #[arg(long)]
    pub commit_to_device: bool,
    /// Embedded: I/O backend (auto, uring, blocking).
    #[arg(long, value_name = "KIND", default_value = "auto")]
    pub io_backend: String,
    /// Embedded: post-write cache per device.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "64M")]
    pub post_write_cache: u64,
    /// Do not pin threads (by default the engine's I/O thread gets the last CPU).
    #[arg(long)]
    pub no_pin: bool,
    /// Request threads: `split` (pinned to the CPUs the I/O thread does not use; best for reads)
    /// or `float` (one per CPU, unpinned; best for CPU-heavy loads).
    #[arg(long, value_enum, default_value = "split")]
    pub workers: WorkerPlacement,
    /// Remote: per-operation timeout in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub timeout_ms: u64,
}

/// Where the request threads run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkerPlacement {
    /// Pinned to the CPUs left after the engine's I/O thread's.
    Split,
    /// One per CPU, unpinned.
    Float,
}

/// An object size or a range of sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeRange {
    /// Smallest size.
    pub min: usize,
    /// Largest size.
    pub max: usize,
}

/// The operation mix.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Workload {
    /// Insert every key once.
    Insert,
    /// `read_pct` % reads, the rest updates (merge writes).
    ReadUpdate {
        /// Percentage of reads.
        read_pct: u8,
    },
    /// `read_pct` % reads, the rest replaces.
    ReadReplace {
        /// Percentage of reads.
        read_pct: u8,
    },
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workload::Insert => f.write_str("I"),
            Workload::ReadUpdate { read_pct } => write!(f, "RU,{read_pct}"),
            Workload::ReadReplace { read_pct } => write!(f, "RR,{read_pct}"),
        }
    }
}

/// Parses "1024", "4K", "512M", "4G", "1T" (binary units).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = digits.parse().map_err(|_| format!("'{text}' is not a size (use e.g. 1024, 64K, 512M, 4G)"))?;
    let mult: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(format!("'{text}': unknown size unit '{unit}' (use K, M, G or T)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("'{text}' is too large"))
}

/// Parses "1024" or "512-4K".
pub fn parse_size_range(text: &str) -> Result<SizeRange, String> {
    let (min, max) = match text.split_once('-') {
        Some((a, b)) => (parse_size(a)?, parse_size(b)?),
        None => {
            let n = parse_size(text)?;
            (n, n)
        }
    };
    if min == 0 || min > max {
        return Err(format!("object size range '{text}' must be positive with MIN <= MAX"));
    }
    Ok(SizeRange { min: min as usize, max: max as usize })
}

/// Parses "I", "RU,80", "RR,50".
pub fn parse_workload(text: &str) -> Result<Workload, String> {
    let upper = text.trim().to_ascii_uppercase();
    if upper == "I" {
        return Ok(Workload::Insert);
    }
    let (kind, pct) = upper.split_once(',').ok_or_else(|| format!("workload '{text}' must be I, RU,P or RR,P"))?;
    let read_pct: u8 = pct
        .trim()
        .parse()
        .ok()
        .filter(|p| *p <= 100)
        .ok_or_else(|| format!("workload '{text}': read percentage must be 0 to 100"))?;
    match kind.trim() {
        "RU" => Ok(Workload::ReadUpdate { read_pct }),
        "RR" => Ok(Workload::ReadReplace { read_pct }),
        other => Err(format!("workload '{text}': unknown kind '{other}' (use I, RU or RR)")),
    }
}

impl RunArgs {
    /// Checks combinations clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.embedded.is_none() && self.hosts.is_none() {
            return Err("give a target: --embedded PATH or --hosts HOST:PORT".into());
        }
        if self.keys == 0 {
            return Err("--keys must be at least 1".into());
        }
        if self.concurrency == 0 || self.concurrency > 100_000 {
            return Err("--concurrency must be 1 to 100000".into());
        }
        if self.bins == 0 || self.bins > 1000 {
            return Err("--bins must be 1 to 1000".into());
        }
        if self.object_size.min < 16 * usize::from(self.bins) {
            return Err(format!(
                "--object-size must be at least 16 bytes per bin ({} for {} bins)",
                16 * usize::from(self.bins),
                self.bins
            ));
        }
        if let Some(theta) = self.zipf
            && !(theta > 0.0 && theta < 10.0 && (theta - 1.0).abs() > 1e-9)
        {
            return Err("--zipf THETA must be between 0 and 10, and not exactly 1".into());
        }
        if self.batch_size == 0 || self.batch_size > 5000 {
            return Err("--batch-size must be 1 to 5000".into());
        }
        if self.target_rate == Some(0) {
            return Err("--target-rate must be positive".into());
        }
        if let Some(d) = self.duration
            && !(d > 0.0 && d.is_finite())
        {
            return Err("--duration must be a positive number of seconds".into());
        }
        if self.ops == Some(0) {
            return Err("--ops must be positive".into());
        }
        if !["auto", "uring", "blocking"].contains(&self.io_backend.as_str()) {
            return Err("--io-backend must be auto, uring or blocking".into());
        }
        if let Some(p) = &self.plot
            && p.extension().and_then(|e| e.to_str()) != Some("svg")
        {
            return Err("--plot writes SVG: give a file name ending in .svg".into());
        }
        if self.embedded.is_some() && self.workload != Workload::Insert && self.duration.is_none() && self.ops.is_none()
        {
            return Err("give --duration SECS or --ops N (only the insert workload ends by itself)".into());
        }
        if self.hosts.is_some() && self.workload != Workload::Insert && self.duration.is_none() && self.ops.is_none() {
            return Err("give --duration SECS or --ops N (only the insert workload ends by itself)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("x").is_err());
        assert!(parse_size("5Q").unwrap_err().contains("unit"));
        assert_eq!(parse_size_range("512-2K"), Ok(SizeRange { min: 512, max: 2048 }));
        assert!(parse_size_range("2K-1K").is_err());
        assert!(parse_size_range("0").is_err());
    }

    #[test]
    fn workloads() {
        assert_eq!(parse_workload("I"), Ok(Workload::Insert));
        assert_eq!(parse_workload("ru,80"), Ok(Workload::ReadUpdate { read_pct: 80 }));
        assert_eq!(parse_workload("RR,0"), Ok(Workload::ReadReplace { read_pct: 0 }));
        assert!(parse_workload("RU,101").is_err());
        assert!(parse_workload("XX,5").is_err());
        assert!(parse_workload("RU").is_err());
    }
}
