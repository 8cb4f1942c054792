//! One direction of an emulated WAN link, sans IO: given when a datagram arrives and how
//! big it is, says when it leaves the far end, or that it is dropped. Serialization at the
//! link's bandwidth, a bounded queue (tail drop), one-way delay, uniform jitter (order kept)
//! and random loss, all from a seeded generator and the caller's clock, so the same inputs
//! give the same schedule in tests and in the relays. A byte stream asks [`Shaper::room_at`]
//! and waits instead of being dropped.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// What one direction of a link does to datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Shaping {
    /// Bandwidth, bits per second (0 or infinite: unlimited).
    pub bandwidth_bps: f64,
    /// One-way delay, seconds.
    pub delay_s: f64,
    /// Uniform jitter added to the delay, ± seconds (delivery order is kept).
    pub jitter_s: f64,
    /// Probability a datagram is lost, `0..1`.
    pub loss: f64,
    /// Bytes that may wait for the link before new datagrams are dropped.
    pub queue_bytes: usize,
}

impl Shaping {
    /// A link of `mbps` Mbit/s with `delay_ms` one-way delay, no jitter or loss, and a
    /// queue of one bandwidth-delay product (at least 64 KiB).
    pub fn new(mbps: f64, delay_ms: f64) -> Self {
        let bdp = (mbps * 1e6 / 8.0 * 2.0 * delay_ms / 1e3) as usize;
        Self {
            bandwidth_bps: mbps * 1e6,
            delay_s: delay_ms / 1e3,
            jitter_s: 0.0,
            loss: 0.0,
            queue_bytes: bdp.max(64 << 10),
        }
    }

    /// Checks the numbers; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let finite_nonneg = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!("{name} {v} must be finite and >= 0"))
            }
        };
        if self.bandwidth_bps.is_nan() || self.bandwidth_bps < 0.0 {
            return Err(format!("bandwidth {} must be >= 0", self.bandwidth_bps));
        }
        finite_nonneg("delay", self.delay_s)?;
        finite_nonneg("jitter", self.jitter_s)?;
        if self.jitter_s > self.delay_s {
            return Err(format!(
                "jitter {} s is larger than the delay {} s",
                self.jitter_s, self.delay_s
            ));
        }
        if !(0.0..1.0).contains(&self.loss) {
            return Err(format!("loss {} must be in [0, 1)", self.loss));
        }
        Ok(())
    }
}

/// What happened to a datagram.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fate {
    /// Delivered at this time (seconds, the caller's clock).
    Deliver(f64),
    /// Lost at random.
    Lost,
    /// Dropped because the queue was full.
    QueueFull,
}

/// One direction's state.
#[derive(Debug, Clone)]
pub struct Shaper {
    shaping: Shaping,
    link_free_at: f64,
    last_delivery: f64,
    rng: ChaCha8Rng,
}

impl Shaper {
    /// A shaper whose random choices come from `seed`.
    pub fn new(shaping: Shaping, seed: u64) -> Self {
        Self {
            shaping,
            link_free_at: 0.0,
            last_delivery: 0.0,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The shaping in force.
    pub fn shaping(&self) -> &Shaping {
        &self.shaping
    }

    /// The earliest time, `now` or later, at which `len` bytes fit in the queue: a byte
    /// stream waits for room (its sender is slowed, as TCP's flow control would slow it)
    /// where a datagram would be dropped. `len` must be at most `queue_bytes`.
    pub fn room_at(&self, now: f64, len: usize) -> f64 {
        let s = self.shaping;
        if s.bandwidth_bps == 0.0 || s.bandwidth_bps.is_infinite() {
            return now;
        }
        // Bytes waiting at time t: (link_free_at − t) · bandwidth / 8; room when that plus
        // `len` is at most the queue.
        let spare = s.queue_bytes.saturating_sub(len) as f64;
        (self.link_free_at - spare * 8.0 / s.bandwidth_bps).max(now)
    }

    /// A datagram of `len` bytes arrives at `now` (seconds, non-decreasing).
    pub fn admit(&mut self, now: f64, len: usize) -> Fate {
        let s = self.shaping;
        if s.loss > 0.0 && self.rng.random::<f64>() < s.loss {
            return Fate::Lost;
        }
        let unlimited = s.bandwidth_bps == 0.0 || s.bandwidth_bps.is_infinite();
        let start = self.link_free_at.max(now);
        if !unlimited {
            let waiting_bytes = (start - now) * s.bandwidth_bps / 8.0;
            if waiting_bytes + len as f64 > s.queue_bytes as f64 {
                return Fate::QueueFull;
            }
            self.link_free_at = start + len as f64 * 8.0 / s.bandwidth_bps;
        } else {
            self.link_free_at = start;
        }
        let jitter = if s.jitter_s > 0.0 {
            self.rng.random_range(-s.jitter_s..=s.jitter_s)
        } else {
            0.0
        };
        let at = (self.link_free_at + s.delay_s + jitter).max(self.last_delivery);
        self.last_delivery = at;
        Fate::Deliver(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_at_the_bandwidth_then_delays() {
        // 8 Mbit/s: 1000 bytes take 1 ms; 20 ms one way.
        let mut s = Shaper::new(Shaping::new(8.0, 20.0), 0);
        assert_eq!(s.admit(0.0, 1000), Fate::Deliver(0.001 + 0.020));
        // A second datagram at the same instant waits for the first.
        assert_eq!(s.admit(0.0, 1000), Fate::Deliver(0.002 + 0.020));
        // After the link drained, only its own serialization counts.
        let Fate::Deliver(t) = s.admit(1.0, 500) else {
            panic!()
        };
        assert!((t - (1.0 + 0.0005 + 0.020)).abs() < 1e-12);
    }

    #[test]
    fn a_full_queue_drops_the_tail_and_drains() {
        let mut shaping = Shaping::new(8.0, 10.0);
        shaping.queue_bytes = 3000;
        let mut s = Shaper::new(shaping, 0);
        let fates: Vec<Fate> = (0..5).map(|_| s.admit(0.0, 1000)).collect();
        assert!(matches!(fates[2], Fate::Deliver(_)));
        assert_eq!(fates[3], Fate::QueueFull);
        assert_eq!(fates[4], Fate::QueueFull);
        // 3 ms later the queue has drained.
        assert!(matches!(s.admit(0.003, 1000), Fate::Deliver(_)));
    }

    #[test]
    fn a_stream_waits_for_room_where_a_datagram_would_be_dropped() {
        let mut shaping = Shaping::new(8.0, 10.0);
        shaping.queue_bytes = 3000;
        let mut s = Shaper::new(shaping, 0);
        assert_eq!(s.room_at(0.0, 1000), 0.0);
        for _ in 0..3 {
            assert!(matches!(s.admit(0.0, 1000), Fate::Deliver(_)));
        }
        // Full: 1000 more bytes fit once the first 1000 have left (1 ms at 8 Mbit/s).
        let t = s.room_at(0.0, 1000);
        assert!((t - 0.001).abs() < 1e-12, "{t}");
        assert!(matches!(s.admit(t, 1000), Fate::Deliver(_)));
        // A later caller is never sent back in time.
        assert_eq!(s.room_at(5.0, 1000), 5.0);
        // An unlimited link always has room.
        let mut open = Shaping::new(8.0, 10.0);
        open.bandwidth_bps = 0.0;
        assert_eq!(Shaper::new(open, 0).room_at(1.5, 1 << 20), 1.5);
    }

    #[test]
    fn loss_and_jitter_follow_the_seed_and_keep_order() {
        let mut shaping = Shaping::new(100.0, 50.0);
        shaping.loss = 0.1;
        shaping.jitter_s = 0.01;
        let run = |seed| {
            let mut s = Shaper::new(shaping, seed);
            (0..10_000)
                .map(|i| s.admit(i as f64 * 1e-3, 1200))
                .collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7), "same seed, same schedule");
        let lost = a.iter().filter(|f| **f == Fate::Lost).count();
        assert!((800..1200).contains(&lost), "lost {lost} of 10000 at 10%");
        let times: Vec<f64> = a
            .iter()
            .filter_map(|f| match f {
                Fate::Deliver(t) => Some(*t),
                _ => None,
            })
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "order kept");
        for (i, f) in a.iter().enumerate() {
            if let Fate::Deliver(t) = f {
                let sent = i as f64 * 1e-3;
                assert!(*t >= sent + 0.04 - 1e-9, "delivered before delay − jitter");
            }
        }
    }

    #[test]
    fn bad_shaping_is_refused_with_the_field() {
        let mut s = Shaping::new(10.0, 10.0);
        s.loss = 1.5;
        assert!(s.validate().unwrap_err().contains("loss"));
        let mut s = Shaping::new(10.0, 10.0);
        s.jitter_s = 1.0;
        assert!(s.validate().unwrap_err().contains("jitter"));
        let mut s = Shaping::new(10.0, 10.0);
        s.delay_s = f64::NAN;
        assert!(s.validate().unwrap_err().contains("delay"));
        assert!(Shaping::new(10.0, 10.0).validate().is_ok());
    }
}
