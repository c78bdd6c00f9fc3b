//! Reconnect pacing: exponential backoff with full jitter, so a fleet of agents that lost the hub at
//! the same moment does not come back at the same moment.

use std::time::Duration;

/// Backoff state for one retry loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next attempt, given a uniform random `fraction` in [0, 1).
    pub fn next_delay(&mut self, fraction: f64) -> Duration {
        let ceiling = delay_ceiling(self.base, self.max, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        // Full jitter, but never less than a tenth of the base: a zero delay would be a hot loop.
        ceiling
            .mul_f64(fraction.clamp(0.0, 1.0))
            .max(self.base / 10)
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// `min(max, base * 2^attempt)`.
pub fn delay_ceiling(base: Duration, max: Duration, attempt: u32) -> Duration {
    base.checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max)
}

/// A uniform random fraction in [0, 1) from the system CSPRNG (0.5 if it is unavailable).
pub fn random_fraction() -> f64 {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 4];
    match SystemRandom::new().fill(&mut bytes) {
        Ok(()) => f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0),
        Err(_) => 0.5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let base = Duration::from_millis(500);
        let max = Duration::from_secs(30);
        let table = [
            (0, 500),
            (1, 1_000),
            (2, 2_000),
            (5, 16_000),
            (6, 30_000),
            (40, 30_000),
        ];
        for (attempt, ms) in table {
            assert_eq!(
                delay_ceiling(base, max, attempt),
                Duration::from_millis(ms),
                "attempt {attempt}"
            );
        }
    }

    #[test]
    fn jitter_stays_within_bounds_and_reset_starts_over() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.next_delay(0.0), Duration::from_millis(10));
        assert_eq!(b.next_delay(0.5), Duration::from_millis(100));
        assert_eq!(
            b.next_delay(0.999),
            Duration::from_millis(100).mul_f64(4.0 * 0.999)
        );
        b.reset();
        assert_eq!(b.next_delay(1.0), Duration::from_millis(100));
        for _ in 0..5 {
            let f = random_fraction();
            assert!((0.0..1.0).contains(&f));
        }
    }
}
