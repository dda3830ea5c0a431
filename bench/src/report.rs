//! Measurements: per-task interval recorders, the per-second progress line, the time series for
//! plots and the JSON summary (throughput, latency percentiles and errors per second by kind, so
//! a window of unavailability shows), and the HdrHistogram interval log.

use std::time::Duration;

use hdrhistogram::Histogram;
use hdrhistogram::serialization::V2Serializer;
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};

use crate::target::ErrorKind;

/// Latencies are recorded in microseconds, 1 µs to 60 s, 3 significant digits.
const LATENCY_US_MAX: u64 = 60_000_000;

fn new_histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, LATENCY_US_MAX, 3) {
        Ok(h) => h,
        Err(e) => unreachable!("constant histogram bounds are valid: {e}"),
    }
}

/// What one task recorded since the last drain.
#[derive(Clone, Debug)]
pub struct Interval {
    /// Read latencies (µs).
    pub read: Histogram<u64>,
    /// Write latencies (µs).
    pub write: Histogram<u64>,
    /// Errors by kind (index of [`ErrorKind::ALL`]); not-found reads included.
    pub errors: [u64; ErrorKind::ALL.len()],
}

impl Default for Interval {
    fn default() -> Self {
        Interval { read: new_histogram(), write: new_histogram(), errors: [0; ErrorKind::ALL.len()] }
    }
}

impl Interval {
    /// Records a completed read.
    pub fn read(&mut self, latency: Duration) {
        self.read.saturating_record(latency.as_micros().clamp(1, u128::from(LATENCY_US_MAX)) as u64);
    }

    /// Records a completed write.
    pub fn write(&mut self, latency: Duration) {
        self.write.saturating_record(latency.as_micros().clamp(1, u128::from(LATENCY_US_MAX)) as u64);
    }

    /// Counts an error.
    pub fn error(&mut self, kind: ErrorKind) {
        self.errors[kind.index()] += 1;
    }

    /// Adds another interval into this one.
    pub fn merge(&mut self, other: &Interval) {
        let _ = self.read.add(&other.read);
        let _ = self.write.add(&other.write);
        for (a, b) in self.errors.iter_mut().zip(other.errors) {
            *a += b;
        }
    }

    /// Errors excluding not-found.
    pub fn error_total(&self) -> u64 {
        self.errors.iter().enumerate().filter(|(i, _)| *i != ErrorKind::NotFound.index()).map(|(_, n)| n).sum()
    }
}

/// One second of the run, for the plot.
#[derive(Clone, Debug, Default)]
pub struct Point {
    /// Seconds since the start.
    pub t: f64,
    /// Reads per second.
    pub reads_per_s: f64,
    /// Writes per second.
    pub writes_per_s: f64,
    /// Read p50/p99/p99.9 in µs.
    pub read_us: [u64; 3],
    /// Write p50/p99/p99.9 in µs.
    pub write_us: [u64; 3],
    /// Errors per second by kind (index of [`ErrorKind::ALL`]); not-found reads included.
    pub errors_per_s: [f64; ErrorKind::ALL.len()],
}

impl Point {
    /// One interval of `secs` seconds ending `t` seconds into the run.
    pub fn of_interval(t: f64, secs: f64, iv: &Interval) -> Point {
        let secs = secs.max(1e-3);
        Point {
            t,
            reads_per_s: iv.read.len() as f64 / secs,
            writes_per_s: iv.write.len() as f64 / secs,
            read_us: percentiles(&iv.read),
            write_us: percentiles(&iv.write),
            errors_per_s: iv.errors.map(|n| n as f64 / secs),
        }
    }
}

/// p50, p99, p99.9 of a histogram (0 when empty).
pub fn percentiles(h: &Histogram<u64>) -> [u64; 3] {
    if h.is_empty() {
        return [0; 3];
    }
    [h.value_at_quantile(0.50), h.value_at_quantile(0.99), h.value_at_quantile(0.999)]
}

/// Formats one progress line: throughput, latency percentiles, and errors per second by kind
/// when there were any.
pub fn progress_line(p: &Point) -> String {
    let mut line = format!(
        "{:6.1}s  reads/s {:>8.0}  writes/s {:>8.0}  read us p50 {:>6} p99 {:>6} p99.9 {:>6}  write us p50 {:>6} p99 {:>6} p99.9 {:>6}",
        p.t,
        p.reads_per_s,
        p.writes_per_s,
        p.read_us[0],
        p.read_us[1],
        p.read_us[2],
        p.write_us[0],
        p.write_us[1],
        p.write_us[2]
    );
    let errors: Vec<String> = ErrorKind::ALL
        .iter()
        .filter(|k| p.errors_per_s[k.index()] > 0.0)
        .map(|k| format!("{} {:.0}", k.name(), p.errors_per_s[k.index()]))
        .collect();
    if !errors.is_empty() {
        line.push_str("  errors/s: ");
        line.push_str(&errors.join(", "));
    }
    line
}

/// Writes the recorded intervals as an HdrHistogram interval log (tags "read" and "write").
pub fn write_histogram_log(path: &std::path::Path, intervals: &[(Duration, Interval)]) -> Result<(), String> {
    let mut out = Vec::new();
    let mut serializer = V2Serializer::new();
    {
        let mut log = IntervalLogWriterBuilder::new()
            .add_comment("peregrine-bench latency histograms, microseconds")
            .with_base_time(std::time::SystemTime::now())
            .begin_log_with(&mut out, &mut serializer)
            .map_err(|e| e.to_string())?;
        let second = Duration::from_secs(1);
        for (start, iv) in intervals {
            for (tag, h) in [("read", &iv.read), ("write", &iv.write)] {
                log.write_histogram(h, *start, second, Tag::new(tag)).map_err(|e| format!("{e:?}"))?;
            }
        }
    }
    std::fs::write(path, out).map_err(|e| format!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_show_errors_per_second_by_kind() {
        let mut iv = Interval::default();
        iv.read(Duration::from_micros(100));
        for _ in 0..600 {
            iv.error(ErrorKind::Unavailable);
        }
        iv.error(ErrorKind::Io);
        // Half a second: the counts become rates.
        let p = Point::of_interval(3.5, 0.5, &iv);
        assert_eq!(p.reads_per_s, 2.0);
        assert_eq!(p.errors_per_s[ErrorKind::Unavailable.index()], 1200.0);
        let line = progress_line(&p);
        assert!(line.ends_with("errors/s: unavailable 1200, io 2"), "{line}");
        assert!(!progress_line(&Point::of_interval(1.0, 1.0, &Interval::default())).contains("errors"));
    }
}
