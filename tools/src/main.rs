//! `peregrine-tool`: offline tools for Peregrine devices. They work on a device or file that no
//! engine holds (a running one is refused), never write unless the subcommand says it writes
//! (`format`, `restore --to`), and decode as much as they can when the data is damaged.

mod backup;
mod image;
mod inspect;
mod png;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use peregrine_engine::{Digest, Engine, EngineConfig, KeyRef};
use serde_json::Value as Json;

use crate::image::{DeviceImage, open_namespace, record_at};

/// Offline tools for Peregrine devices.
#[derive(Parser, Debug)]
#[command(name = "peregrine-tool", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Device headers, record counts, live bytes, block use, block sequences.
    Info {
        /// The namespace's devices.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Per-block fill map, fill histogram, and what defrag would reclaim.
    Layout {
        /// The device.
        path: PathBuf,
        /// Low-water mark for the reclaim estimate (percent).
        #[arg(long, default_value_t = 50)]
        lwm: u32,
        /// Also draw the map as SVG.
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
        /// Also draw the map as PNG.
        #[arg(long, value_name = "FILE")]
        png: Option<PathBuf>,
        /// One JSON object instead of the text map.
        #[arg(long)]
        json: bool,
    },
    /// Check every block and record; exit status 2 when anything is damaged.
    Verify {
        /// The devices.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Records with their header fields and bins.
    Dump {
        /// The device (or the namespace's devices).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Every record in this block.
        #[arg(long, conflicts_with_all = ["digest", "key"])]
        block: Option<u32>,
        /// Every copy of the record with this digest (hex).
        #[arg(long, conflicts_with = "key")]
        digest: Option<String>,
        /// Every copy of the record with this key: SET:KEY (an integer KEY is an integer key).
        #[arg(long)]
        key: Option<String>,
        /// JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Record size and TTL distributions, records per set and per partition.
    Stats {
        /// The namespace's devices.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Write a portable backup of the newest version of every live record.
    Backup {
        /// The namespace's devices.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Backup file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a backup into a device (writes) or a running server.
    Restore {
        /// Backup file.
        file: PathBuf,
        /// Device or file to restore into (created with --device-size if missing).
        #[arg(long, conflicts_with = "hosts", required_unless_present = "hosts")]
        to: Option<PathBuf>,
        /// Server or cluster seeds, HOST:PORT[,...].
        #[arg(long)]
        hosts: Option<String>,
        /// Target namespace (default: the backup's).
        #[arg(long)]
        namespace: Option<String>,
        /// Size of a file created by --to.
        #[arg(long, default_value_t = 1 << 30)]
        device_size: u64,
        /// Write block size for a device formatted by --to.
        #[arg(long, default_value_t = 8 << 20)]
        write_block: u32,
    },
    /// Initialize a device or file for a namespace (writes; destroys what it held).
    Format {
        /// Device or file.
        path: PathBuf,
        /// Namespace name.
        #[arg(long)]
        namespace: String,
        /// Write block size.
        #[arg(long, default_value_t = 8 << 20)]
        write_block: u32,
        /// Size of a file that does not exist yet.
        #[arg(long, default_value_t = 1 << 30)]
        size: u64,
        /// Confirm destroying a device that holds data.
        #[arg(long)]
        yes: bool,
    },
}

fn print(json: bool, value: &Json, text: impl FnOnce(&Json) -> String) {
    if json {
        println!("{value}");
    } else {
        print!("{}", text(value));
    }
}

fn key_digest(spec: &str) -> Result<Digest, String> {
    let (set, key) = spec.split_once(':').ok_or("--key must be SET:KEY")?;
    Ok(match key.parse::<i64>() {
        Ok(i) => Digest::of_key(set.as_bytes(), KeyRef::Int(i)),
        Err(_) => Digest::of_key(set.as_bytes(), KeyRef::String(key.as_bytes())),
    })
}

fn dump(devices: &[DeviceImage], block: Option<u32>, digest: Option<Digest>, json: bool) -> Result<ExitCode, String> {
    let newest = digest.map(|_| image::newest_copies(devices, || {})).transpose()?;
    let mut shown = 0;
    for (d, dev) in devices.iter().enumerate() {
        let blocks: Vec<_> = match block {
            Some(b) => vec![image::BlockInfo {
                index: b,
                header: dev
                    .block_header(b)
                    .ok_or_else(|| format!("block {b} of {} holds no data", dev.path.display()))?,
            }],
            None => dev.used_blocks(),
        };
        for info in blocks {
            let (_, bytes) = dev.scan(&info, |_, _| {})?;
            let mut offsets = Vec::new();
            peregrine_engine::scan::scan_block(&bytes, &info.header, |offset, v| {
                if digest.is_none_or(|want| v.digest() == want) {
                    offsets.push(offset);
                }
            });
            for offset in offsets {
                let Some(v) = record_at(&bytes, offset, info.header.checksum_seed()) else { continue };
                let is_newest = newest.as_ref().map(|n| {
                    n.get(&v.digest()).is_some_and(|c| c.device == d && c.block == info.index && c.offset == offset)
                });
                let j = inspect::record_json(
                    &v,
                    &dev.path.display().to_string(),
                    info.index,
                    offset,
                    info.header.sequence,
                    is_newest,
                );
                if json {
                    println!("{j}");
                } else {
                    print!("{}", inspect::record_text(&j));
                }
                shown += 1;
            }
        }
    }
    if shown == 0 && digest.is_some() {
        return Err("no copy of that record is on the device".into());
    }
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Info { paths, json } => {
            let v = inspect::info(&open_namespace(&paths)?)?;
            print(json, &v, inspect::info_text);
        }
        Command::Layout { path, lwm, svg, png, json } => {
            let dev = DeviceImage::open(&path)?;
            let inspect::Layout { text, json: v, fills } = inspect::layout(&dev, lwm)?;
            let block = u64::from(dev.header.write_block_bytes);
            if let Some(f) = svg {
                std::fs::write(&f, inspect::layout_svg(&path.display().to_string(), &fills, block))
                    .map_err(|e| format!("{}: {e}", f.display()))?;
            }
            if let Some(f) = png {
                std::fs::write(&f, inspect::layout_png(&fills, block)).map_err(|e| format!("{}: {e}", f.display()))?;
            }
            print(json, &v, |_| text);
        }
        Command::Verify { paths, json } => {
            let devices: Vec<DeviceImage> = paths.iter().map(|p| DeviceImage::open(p)).collect::<Result<_, _>>()?;
            let v = verify::verify(&devices)?;
            print(json, &v, verify::verify_text);
            if v["ok"].as_bool() != Some(true) {
                return Ok(ExitCode::from(2));
            }
        }
        Command::Dump { paths, block, digest, key, json } => {
            let devices = open_namespace(&paths)?;
            let want = match (digest, key) {
                (Some(h), _) => Some(Digest::from_hex(&h).ok_or("--digest must be 40 hex characters")?),
                (None, Some(k)) => Some(key_digest(&k)?),
                (None, None) => None,
            };
            if want.is_none() && block.is_none() {
                return Err("dump needs --block N, --digest HEX or --key SET:KEY".into());
            }
            return dump(&devices, block, want, json);
        }
        Command::Stats { paths, json } => {
            let v = inspect::stats(&open_namespace(&paths)?)?;
            print(json, &v, inspect::stats_text);
        }
        Command::Backup { paths, out } => {
            let n = backup::backup(&open_namespace(&paths)?, &out)?;
            eprintln!("backed up {n} records to {}", out.display());
        }
        Command::Restore { file, to, hosts, namespace, device_size, write_block } => {
            let summary = backup::check_backup(&file)?;
            let ns = namespace.unwrap_or_else(|| summary.namespace.clone());
            let n = match (to, hosts) {
                (Some(path), _) => {
                    let mut config = EngineConfig::single_file(ns, path, device_size);
                    config.write_block_bytes = write_block;
                    backup::restore_to_engine(&file, &summary, config)?
                }
                (None, Some(hosts)) => {
                    let seeds: Vec<std::net::SocketAddr> = hosts
                        .split(',')
                        .map(|h| std::net::ToSocketAddrs::to_socket_addrs(h).map_err(|e| format!("{h}: {e}")))
                        .collect::<Result<Vec<_>, _>>()?
                        .into_iter()
                        .flatten()
                        .collect();
                    backup::restore_to_hosts(&file, &summary, &seeds, &ns)?
                }
                (None, None) => return Err("restore needs --to PATH or --hosts HOST:PORT".into()),
            };
            eprintln!("restored {n} records");
        }
        Command::Format { path, namespace, write_block, size, yes } => {
            if path.exists() && !yes {
                let holds = match DeviceImage::open(&path) {
                    Ok(d) => Some(format!("namespace '{}'", d.header.namespace)),
                    Err(e) if e.contains("in use") => return Err(e),
                    Err(_) => holds_bytes(&path),
                };
                if let Some(what) = holds {
                    return Err(format!("{} holds data ({what}); pass --yes to destroy it", path.display()));
                }
            }
            let mut config = EngineConfig::single_file(namespace, &path, size);
            config.write_block_bytes = write_block;
            config.device_lock_wait_ms = 0;
            Engine::format(&config).map_err(|e| e.to_string())?;
            eprintln!("formatted {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether the first 8 KiB of a path hold anything but zeros.
fn holds_bytes(path: &std::path::Path) -> Option<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut b = vec![0u8; 8192];
    let n = f.read(&mut b).ok()?;
    b[..n].iter().any(|&x| x != 0).then(|| "unrecognised bytes".to_string())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("peregrine-tool: {e}");
            ExitCode::from(1)
        }
    }
}
