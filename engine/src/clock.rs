//! Time as the engine sees it: wall-clock milliseconds for last-update times, and void times in
//! seconds since 2010-01-01 UTC (the Aerospike "citrusleaf" epoch). Injectable for tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// 2010-01-01T00:00:00Z as seconds since the Unix epoch.
pub const CITRUSLEAF_EPOCH_UNIX_S: u64 = 1_262_304_000;

/// A source of wall-clock time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_unix_ms(&self) -> u64;

    /// Seconds since 2010-01-01 UTC (the unit of void times).
    fn now_void_s(&self) -> u32 {
        let s = self.now_unix_ms() / 1000;
        s.saturating_sub(CITRUSLEAF_EPOCH_UNIX_S).min(u64::from(u32::MAX)) as u32
    }
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }
}

/// A clock that only moves when told to (for tests of expiry).
#[derive(Debug)]
pub struct ManualClock {
    ms: AtomicU64,
}

impl ManualClock {
    /// A clock reading `unix_ms`.
    pub fn new(unix_ms: u64) -> ManualClock {
        ManualClock { ms: AtomicU64::new(unix_ms) }
    }

    /// Moves the clock forward.
    pub fn advance_ms(&self, ms: u64) {
        self.ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_unix_ms(&self) -> u64 {
        self.ms.load(Ordering::SeqCst)
    }
}

/// Whether a record with `void_time` has expired at `now_void_s`.
pub fn is_expired(void_time: u32, now_void_s: u32) -> bool {
    void_time != 0 && void_time <= now_void_s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn void_time_epoch() {
        let c = ManualClock::new((CITRUSLEAF_EPOCH_UNIX_S + 100) * 1000);
        assert_eq!(c.now_void_s(), 100);
        c.advance_ms(1500);
        assert_eq!(c.now_void_s(), 101);
        assert!(is_expired(101, 101));
        assert!(!is_expired(0, 101));
        assert!(!is_expired(102, 101));
    }
}
