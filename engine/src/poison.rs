//! The engine's poison flag: set once when a background thread (a flusher, a defragmenter,
//! the maintenance or metadata thread) dies, after which every engine call fails with the
//! reason instead of running against state nobody maintains any more.

use std::sync::OnceLock;

/// Set once, with the first reason.
#[derive(Debug, Default)]
pub struct Poison {
    reason: OnceLock<String>,
}

impl Poison {
    /// Poisons the engine (the first reason is kept).
    pub fn set(&self, reason: String) {
        if self.reason.set(reason.clone()).is_ok() {
            tracing::error!(%reason, "engine poisoned: a background thread failed; reopen the engine");
        }
    }

    /// The reason, when poisoned.
    pub fn reason(&self) -> Option<&str> {
        self.reason.get().map(String::as_str)
    }
}

/// Runs `body`; if it panics, poisons with `what` and the panic message, and returns `None`.
pub fn guard<T>(poison: &Poison, what: &str, body: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(v) => Some(v),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            poison.set(format!("{what} panicked: {msg}"));
            None
        }
    }
}
