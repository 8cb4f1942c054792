//! A virtual-time WAN link: bandwidth, round-trip time, jitter, loss (as retransmission
//! delay) and a FIFO queue. Every quantity is a pure function of the seed, so a run's bytes
//! and times are exact and repeatable.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Bytes per packet used to turn loss rates into retransmissions.
const PACKET: u64 = 1200;

/// The physical properties of one direction of a link.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkModel {
    /// Bits per second.
    pub bandwidth_bps: f64,
    /// Round-trip time, seconds.
    pub rtt_s: f64,
    /// Extra one-way delay drawn uniformly from `[0, jitter_s)`.
    pub jitter_s: f64,
    /// Packet loss probability; each lost packet is resent after one RTT.
    pub loss: f64,
}

/// One direction of a link in virtual time.
#[derive(Debug, Clone)]
pub struct VirtualLink {
    /// Its properties.
    pub model: LinkModel,
    free_at: f64,
    last_arrival: f64,
    /// Messages not yet acknowledged: when the receiver's acknowledgement reaches the
    /// sender, and the message's bytes, in the order sent.
    unacknowledged: VecDeque<(f64, u64)>,
    rng: ChaCha8Rng,
}

impl VirtualLink {
    /// An idle link whose jitter and loss come from `seed`.
    pub fn new(model: LinkModel, seed: u64) -> Self {
        Self {
            model,
            free_at: 0.0,
            last_arrival: 0.0,
            unacknowledged: VecDeque::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Hands `bytes` to the link at time `now`; returns when the last byte arrives.
    /// Messages arrive in the order sent (one stream).
    pub fn send(&mut self, now: f64, bytes: u64) -> f64 {
        let start = self.free_at.max(now);
        let mut tx = bytes as f64 * 8.0 / self.model.bandwidth_bps;
        let mut delay = self.model.rtt_s / 2.0;
        if self.model.loss > 0.0 {
            let packets = bytes.div_ceil(PACKET);
            let lost = (0..packets)
                .filter(|_| self.rng.random_bool(self.model.loss.min(1.0)))
                .count() as u64;
            if lost > 0 {
                // Lost packets are resent (using bandwidth) after about one round trip.
                tx += (lost * PACKET) as f64 * 8.0 / self.model.bandwidth_bps;
                delay += self.model.rtt_s;
            }
        }
        if self.model.jitter_s > 0.0 {
            delay += self.rng.random_range(0.0..self.model.jitter_s);
        }
        self.free_at = start + tx;
        let arrival = (self.free_at + delay).max(self.last_arrival);
        self.last_arrival = arrival;
        while self
            .unacknowledged
            .front()
            .is_some_and(|&(at, _)| at <= now)
        {
            self.unacknowledged.pop_front();
        }
        self.unacknowledged
            .push_back((arrival + self.model.rtt_s / 2.0, bytes));
        arrival
    }

    /// Bytes sent and not yet acknowledged at `now`, as a real link counts them: a
    /// message stays queued until the receiver's acknowledgement is back, half a round
    /// trip after its last byte arrived (what the `adaptive` policy reads as backlog).
    pub fn queued(&self, now: f64) -> u64 {
        self.unacknowledged
            .iter()
            .filter(|&&(at, _)| at > now)
            .map(|&(_, bytes)| bytes)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 8 Mbit/s (a megabyte a second), 100 ms round trip, no jitter or loss.
    const CLEAN_8_MBIT: LinkModel = LinkModel {
        bandwidth_bps: 8e6,
        rtt_s: 0.1,
        jitter_s: 0.0,
        loss: 0.0,
    };

    #[test]
    fn transfer_time_is_bytes_over_bandwidth_plus_half_rtt() {
        let mut l = VirtualLink::new(CLEAN_8_MBIT, 0);
        assert!((l.send(0.0, 1_000_000) - 1.05).abs() < 1e-9);
        // Queued behind the first message.
        assert!((l.send(0.5, 1_000_000) - 2.05).abs() < 1e-9);
        assert!((l.send(10.0, 0) - 10.05).abs() < 1e-9);
    }

    #[test]
    fn bytes_stay_queued_until_the_acknowledgement_is_back() {
        let mut l = VirtualLink::new(CLEAN_8_MBIT, 0);
        assert_eq!(l.queued(0.0), 0);
        // Arrives at 1.05 s, acknowledged back at 1.10 s.
        l.send(0.0, 1_000_000);
        l.send(0.5, 500);
        assert_eq!(l.queued(0.9), 1_000_500);
        assert_eq!(l.queued(1.06), 1_000_500, "arrived, not yet acknowledged");
        assert_eq!(l.queued(1.11), 0, "both acknowledged");
        // Sending later forgets what was acknowledged and counts only the new message.
        l.send(2.0, 700);
        assert_eq!(l.queued(2.0), 700);
        assert_eq!(l.unacknowledged.len(), 1);
    }

    #[test]
    fn loss_and_jitter_only_delay_and_keep_order() {
        let m = LinkModel {
            bandwidth_bps: 1e8,
            rtt_s: 0.2,
            jitter_s: 0.05,
            loss: 0.01,
        };
        let mut a = VirtualLink::new(m, 3);
        let mut b = VirtualLink::new(m, 3);
        let mut last = 0.0;
        for i in 0..200 {
            let t = a.send(i as f64 * 0.01, 50_000);
            assert_eq!(
                t,
                b.send(i as f64 * 0.01, 50_000),
                "deterministic from the seed"
            );
            assert!(t >= last && t >= i as f64 * 0.01 + 0.1);
            last = t;
        }
    }
}
