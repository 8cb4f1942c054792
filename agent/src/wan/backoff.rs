//! Reconnect delays, sans-IO: exponential backoff with jitter, reset on success.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;

/// Exponential backoff: attempt `k` waits a uniformly jittered time in
/// `[base·2^k / 2, base·2^k]`, capped at `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    rng: ChaCha8Rng,
}

impl Backoff {
    /// Backoff from `base` up to `max`; `seed` drives the jitter.
    pub fn new(base: Duration, max: Duration, seed: u64) -> Self {
        Self {
            base,
            max: max.max(base),
            attempt: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The wait before the next attempt (and counts the attempt).
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let lo = ceiling / 2;
        lo + ceiling.mul_f64(self.rng.random::<f64>() * 0.5)
    }

    /// Forgets failures after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_with_jitter_cap_and_reset() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let mut b = Backoff::new(base, max, 1);
        let mut previous_ceiling = Duration::ZERO;
        for k in 0..12u32 {
            let d = b.next_delay();
            let ceiling = (base * 2u32.pow(k)).min(max);
            assert!(d >= ceiling / 2 && d <= ceiling, "attempt {k}: {d:?}");
            assert!(ceiling >= previous_ceiling);
            previous_ceiling = ceiling;
        }
        b.reset();
        assert!(b.next_delay() <= base);
        // Jitter: two agents with different seeds do not retry in lockstep.
        let mut a = Backoff::new(base, max, 1);
        let mut c = Backoff::new(base, max, 2);
        let same = (0..8).filter(|_| a.next_delay() == c.next_delay()).count();
        assert!(same < 8);
    }
}
