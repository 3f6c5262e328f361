//! Warnings that come once per request while something the requests need
//! is away (the journal, during a PostgreSQL outage): at thousands of
//! requests a second, a line each buries everything else in the log, and
//! says nothing the first did not. Each place that warns this way logs its
//! first warning at once, then at most one a second, each with `left_out`:
//! how many like it that place did not log since its last line.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The least time between two lines from one place, in milliseconds.
const EVERY_MS: u64 = 1_000;

/// One place's warnings: when it last logged one, and how many it left out
/// since.
#[derive(Debug)]
pub struct Repeated {
    /// Milliseconds since the first use of any, at the last line logged,
    /// plus one (0: none yet).
    last: AtomicU64,
    left_out: AtomicU64,
}

impl Repeated {
    /// None logged yet.
    pub const fn new() -> Self {
        Repeated {
            last: AtomicU64::new(0),
            left_out: AtomicU64::new(0),
        }
    }

    /// Whether to log a warning now: `Some` with how many were left out
    /// since the last line, or `None` (this one is left out, and counted).
    pub fn due(&self) -> Option<u64> {
        static START: OnceLock<Instant> = OnceLock::new();
        let now = START.get_or_init(Instant::now).elapsed().as_millis() as u64;
        self.due_at(now)
    }

    fn due_at(&self, now_ms: u64) -> Option<u64> {
        let stamp = now_ms + 1;
        let last = self.last.load(Ordering::Relaxed);
        let logged = (last == 0 || stamp >= last + EVERY_MS)
            && self
                .last
                .compare_exchange(last, stamp, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if logged {
            Some(self.left_out.swap(0, Ordering::Relaxed))
        } else {
            self.left_out.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for Repeated {
    fn default() -> Self {
        Repeated::new()
    }
}

/// `tracing::warn!` for a warning every request may give while something
/// is away: at most one line a second from this place, with `left_out`.
macro_rules! warn_repeated {
    ($($arg:tt)+) => {{
        static SEEN: $crate::repeated::Repeated = $crate::repeated::Repeated::new();
        if let Some(left_out) = SEEN.due() {
            tracing::warn!(left_out, $($arg)+);
        }
    }};
}
pub(crate) use warn_repeated;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_is_logged_then_one_a_second_with_what_was_left_out() {
        let r = Repeated::new();
        assert_eq!(r.due_at(0), Some(0), "the first at once");
        assert_eq!(r.due_at(1), None);
        assert_eq!(r.due_at(998), None);
        assert_eq!(r.due_at(999), None, "less than a second after");
        assert_eq!(
            r.due_at(1_000),
            Some(3),
            "a second after, with the three left out"
        );
        assert_eq!(r.due_at(1_500), None);
        assert_eq!(r.due_at(5_000), Some(1));
        assert_eq!(r.due_at(6_000), Some(0), "nothing left out since");
    }
}
