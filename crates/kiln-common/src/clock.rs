//! Time as kiln counts it: unix microseconds.
//!
//! [`now_micros`] is the wall clock every server call stamps its store writes with.
//! Code that decides by time takes a [`Clock`], so that tests drive it with a
//! [`FakeClock`] instead of waiting.

use std::sync::atomic::{AtomicI64, Ordering};

/// One second in microseconds.
pub const SECOND_MICROS: i64 = 1_000_000;

/// Unix time in microseconds: the one clock that orders the store.
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros() as i64)
        .unwrap_or_default()
}

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// Unix time in microseconds.
    fn now_micros(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> i64 {
        now_micros()
    }
}

/// A clock that stands still until a test moves it.
#[derive(Debug, Default)]
pub struct FakeClock {
    micros: AtomicI64,
}

impl FakeClock {
    /// A clock showing `micros`.
    pub fn at(micros: i64) -> Self {
        FakeClock {
            micros: AtomicI64::new(micros),
        }
    }

    /// Moves the clock forward by `micros`.
    pub fn advance(&self, micros: i64) {
        self.micros.fetch_add(micros, Ordering::SeqCst);
    }

    /// Sets the clock to `micros`.
    pub fn set(&self, micros: i64) {
        self.micros.store(micros, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_micros(&self) -> i64 {
        self.micros.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fake_clock_moves_only_when_told() {
        let clock = FakeClock::at(5 * SECOND_MICROS);
        assert_eq!(clock.now_micros(), 5 * SECOND_MICROS);
        clock.advance(SECOND_MICROS);
        assert_eq!(clock.now_micros(), 6 * SECOND_MICROS);
        clock.set(1);
        assert_eq!(clock.now_micros(), 1);
    }

    #[test]
    fn the_system_clock_is_past_2020() {
        assert!(SystemClock.now_micros() > 1_577_836_800 * SECOND_MICROS);
    }
}
