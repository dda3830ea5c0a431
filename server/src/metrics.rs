//! Operational metrics: requests by kind and result code, latency histograms, connections and
//! refused input, served as Prometheus text on `/metrics` together with engine statistics.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use peregrine_engine::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

/// Kinds of request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Single-record read (including exists).
    Read = 0,
    /// Single-record write or operate.
    Write = 1,
    /// Single-record delete.
    Delete = 2,
    /// Batch request (one per request).
    Batch = 3,
    /// Partition scan or query.
    Scan = 4,
    /// Info request.
    Info = 5,
}

const KINDS: [&str; 6] = ["read", "write", "delete", "batch", "scan", "info"];
/// Upper bounds of the latency buckets, in seconds.
const BUCKETS_S: [f64; 15] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

struct Histogram {
    buckets: [AtomicU64; BUCKETS_S.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    fn record(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS_S.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

/// The node's counters.
pub struct Metrics {
    requests: Vec<[AtomicU64; 256]>,
    latency: Vec<Histogram>,
    /// Connections open now.
    pub connections_open: AtomicI64,
    /// Connections accepted.
    pub connections_accepted: AtomicU64,
    /// Connections closed at accept because of `max_connections`.
    pub connections_refused: AtomicU64,
    /// Connections closed for malformed frames, bad versions, oversized frames.
    pub bad_frames: AtomicU64,
    /// Connections closed by the idle or frame deadline.
    pub timeouts: AtomicU64,
    /// The node-wide budget of buffered request bytes (`max_inflight_request_bytes`): one permit
    /// per byte. A connection takes permits before it reserves body buffer for them, so the
    /// permits taken are the bytes reserved for request bodies now, touched or not.
    pub request_budget: Arc<Semaphore>,
    /// The budget's size in bytes.
    pub request_budget_bytes: u64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Counters at zero, with a request-byte budget of `request_budget_bytes`.
    pub fn new(request_budget_bytes: u64) -> Metrics {
        Metrics {
            requests: KINDS.iter().map(|_| std::array::from_fn(|_| AtomicU64::new(0))).collect(),
            latency: KINDS.iter().map(|_| Histogram::new()).collect(),
            connections_open: AtomicI64::new(0),
            connections_accepted: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            bad_frames: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            request_budget: Arc::new(Semaphore::new(request_budget_bytes as usize)),
            request_budget_bytes,
        }
    }

    /// Request body bytes reserved now under the budget.
    pub fn request_buffer_bytes(&self) -> u64 {
        self.request_budget_bytes.saturating_sub(self.request_budget.available_permits() as u64)
    }

    /// Counts a finished request.
    pub fn record(&self, kind: Kind, result_code: u8, took: Duration) {
        self.requests[kind as usize][usize::from(result_code)].fetch_add(1, Ordering::Relaxed);
        self.latency[kind as usize].record(took);
    }

    /// Prometheus text exposition.
    pub fn render(&self, engines: &[(String, Engine)]) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP peregrine_requests_total Requests by kind and Aerospike result code.");
        let _ = writeln!(out, "# TYPE peregrine_requests_total counter");
        for (k, name) in KINDS.iter().enumerate() {
            for (code, n) in self.requests[k].iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(out, "peregrine_requests_total{{kind=\"{name}\",result=\"{code}\"}} {n}");
                }
            }
        }
        let _ = writeln!(out, "# HELP peregrine_request_duration_seconds Request latency by kind.");
        let _ = writeln!(out, "# TYPE peregrine_request_duration_seconds histogram");
        for (k, name) in KINDS.iter().enumerate() {
            let h = &self.latency[k];
            let mut cumulative = 0;
            for (i, b) in BUCKETS_S.iter().enumerate() {
                cumulative += h.buckets[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "peregrine_request_duration_seconds_bucket{{kind=\"{name}\",le=\"{b}\"}} {cumulative}"
                );
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(out, "peregrine_request_duration_seconds_bucket{{kind=\"{name}\",le=\"+Inf\"}} {count}");
            let _ = writeln!(
                out,
                "peregrine_request_duration_seconds_sum{{kind=\"{name}\"}} {}",
                h.sum_us.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(out, "peregrine_request_duration_seconds_count{{kind=\"{name}\"}} {count}");
        }
        for (name, help, v) in [
            ("peregrine_connections_open", "Client connections open.", self.connections_open.load(Ordering::Relaxed)),
            (
                "peregrine_connections_accepted_total",
                "Client connections accepted.",
                self.connections_accepted.load(Ordering::Relaxed) as i64,
            ),
            (
                "peregrine_connections_refused_total",
                "Connections closed at accept (max_connections).",
                self.connections_refused.load(Ordering::Relaxed) as i64,
            ),
            (
                "peregrine_bad_frames_total",
                "Connections closed for malformed or oversized frames.",
                self.bad_frames.load(Ordering::Relaxed) as i64,
            ),
            (
                "peregrine_timeouts_total",
                "Connections closed by the idle or frame deadline.",
                self.timeouts.load(Ordering::Relaxed) as i64,
            ),
            (
                "peregrine_request_buffer_bytes",
                "Request body bytes reserved now under the max_inflight_request_bytes budget.",
                self.request_buffer_bytes() as i64,
            ),
            (
                "peregrine_request_buffer_limit_bytes",
                "The max_inflight_request_bytes budget.",
                self.request_budget_bytes as i64,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {}\n{name} {v}",
                if name.ends_with("_total") { "counter" } else { "gauge" }
            );
        }
        for (ns, engine) in engines {
            let s = engine.stats();
            let per_ns: [(&str, u64); 14] = [
                ("records", s.records),
                ("tombstones", s.tombstones),
                ("index_bytes", s.index_bytes),
                ("device_reads_total", s.device_reads),
                ("device_read_bytes_total", s.device_read_bytes),
                ("memory_reads_total", s.memory_reads),
                ("corruption_errors_total", s.corruption_errors),
                ("read_retries_total", s.read_retries),
                ("write_retries_total", s.write_retries),
                ("expired_total", s.expired),
                ("evicted_total", s.evicted),
                ("tombstones_dropped_total", s.tombstones_dropped),
                ("stop_writes", u64::from(s.stop_writes)),
                ("devices", s.devices.len() as u64),
            ];
            for (name, v) in per_ns {
                let _ = writeln!(out, "peregrine_namespace_{name}{{namespace=\"{ns}\"}} {v}");
            }
            for d in &s.devices {
                let labels = format!("namespace=\"{ns}\",device=\"{}\"", d.path.replace('"', "'"));
                for (name, v) in [
                    ("blocks_total", d.blocks_total),
                    ("blocks_free", d.blocks.free),
                    ("blocks_used", d.blocks.used),
                    ("live_bytes", d.blocks.live_bytes),
                    ("write_bytes_total", d.write_bytes),
                    ("writes_total", d.writes),
                    ("syncs_total", d.syncs),
                    ("appended_bytes_total", d.appended_bytes),
                    ("write_queue_bytes", d.write_queue_bytes),
                    ("overloads_total", d.overloads),
                    ("blocks_pending_free", d.blocks.pending_free),
                    ("blocks_defrag_eligible", d.blocks.defrag_eligible),
                    ("defrag_blocks_total", d.defrag_blocks),
                    ("defrag_urgent_blocks_total", d.defrag_urgent_blocks),
                    ("defrag_read_bytes_total", d.defrag_read_bytes),
                    ("defrag_records_moved_total", d.defrag_records_moved),
                    ("defrag_write_bytes_total", d.defrag_device_write_bytes),
                    ("stop_writes", u64::from(d.stop_writes)),
                ] {
                    let _ = writeln!(out, "peregrine_device_{name}{{{labels}}} {v}");
                }
            }
        }
        out
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    engines: Arc<Vec<(String, Engine)>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let Ok((mut stream, _)) = accepted else { continue };
        let metrics = metrics.clone();
        let engines = engines.clone();
        tokio::spawn(async move {
            let mut req = vec![0u8; 8192];
            let mut len = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while len < req.len() {
                    let n = stream.read(&mut req[len..]).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    len += n;
                    if req[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&req[..len]);
            let response = if head.starts_with("GET /metrics") {
                let body = metrics.render(&engines);
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
            };
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}
