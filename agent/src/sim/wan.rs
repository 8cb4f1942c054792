//! A virtual-time WAN link, carrying streams as the agents' QUIC links do: the streams
//! being sent share the bandwidth equally (the transport takes turns between streams
//! with data), a stream starts once the one queued before it has at most a send buffer
//! of bytes left (the agent opens the next stream once the previous one has handed its
//! last bytes to its send buffer), and a stream arrives whole, half a round trip after
//! its last byte left. So a round's small frames overtake the large frame queued before
//! them, and a link backed up with several rounds finishes them close together, as the
//! agents' links do. Round-trip time, jitter and loss (resent bytes, and a round trip's
//! delay when a stream loses a packet in its last round trip of sending) come
//! from the link's model; every quantity is a pure function of the seed, so a run's bytes
//! and times are exact and repeatable.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Bytes per packet used to turn loss rates into retransmissions.
const PACKET: u64 = 1200;

/// The agents' smallest flow-control window and per-stream send buffer
/// (`wan::endpoint::window_bytes`): one MiB, or two bandwidth-delay products of the link.
const MIN_SEND_BUFFER: f64 = (1u64 << 20) as f64;

/// Bits below which a stream counts as sent (float rounding of the shared drain).
const SENT_EPSILON_BITS: f64 = 1e-3;

/// The simulator's event queue keeps time in nanoseconds: a change due within one of
/// `now` has happened.
const TIME_RESOLUTION: f64 = 1e-9;

/// What changes next on a link: the started streams send `bits` each, then the least of
/// them is through, or the first waiting stream starts.
#[derive(Debug, Clone, Copy)]
enum Step {
    Through { bits: f64 },
    Start { bits: f64 },
}

/// The physical properties of one direction of a link.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkModel {
    /// Bits per second.
    pub bandwidth_bps: f64,
    /// Round-trip time, seconds.
    pub rtt_s: f64,
    /// Extra one-way delay drawn uniformly from `[0, jitter_s)`.
    pub jitter_s: f64,
    /// Packet loss probability. A lost packet is resent (its bytes cross again); one lost
    /// in its stream's last round trip of sending holds the stream's end back a round
    /// trip (an earlier loss is detected and resent while the rest is still being sent).
    pub loss: f64,
}

impl LinkModel {
    /// Packets the link carries in a round trip: a stream's last round trip of sending is
    /// at most this many of its packets.
    fn round_trip_packets(&self) -> u64 {
        ((self.bandwidth_bps / 8.0 * self.rtt_s) / PACKET as f64)
            .ceil()
            .max(1.0) as u64
    }

    /// The send buffer of an agent's stream on this link, in bits: two bandwidth-delay
    /// products, at least one MiB (as the agents size it).
    fn send_buffer_bits(&self) -> f64 {
        (2.0 * self.bandwidth_bps / 8.0 * self.rtt_s).max(MIN_SEND_BUFFER) * 8.0
    }
}

/// A stream that arrived: its id (from [`VirtualLink::send`]) and when its last byte
/// reached the peer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Delivery {
    /// The stream.
    pub stream: u64,
    /// Arrival time, seconds.
    pub at: f64,
}

#[derive(Debug, Clone)]
struct Stream {
    id: u64,
    bytes: u64,
    /// Bits still to send (retransmitted packets included).
    bits_left: f64,
    /// One-way delay after its last bit left: half a round trip, jitter, and a round trip
    /// more when a packet of its last round trip of sending was lost.
    delay: f64,
    /// Whether it is being sent (else it waits for the stream before it).
    started: bool,
}

/// One direction of a link in virtual time.
#[derive(Debug, Clone)]
pub struct VirtualLink {
    model: LinkModel,
    /// Streams not yet through, in the order sent; the started ones come first.
    streams: VecDeque<Stream>,
    /// The stream started last (a waiting stream starts once it has a send buffer left
    /// or is through).
    last_started: Option<u64>,
    /// The time up to which `streams` have been drained.
    clock: f64,
    /// Streams through and not yet acknowledged: when the acknowledgement reaches the
    /// sender, and the stream's bytes.
    unacknowledged: Vec<(f64, u64)>,
    /// Seconds of the busy periods that ended (see [`Self::busy_seconds`]).
    busy_before: f64,
    /// When the current busy period began.
    busy_from: Option<f64>,
    /// When the last acknowledgement so far reaches the sender.
    acked_until: f64,
    next_id: u64,
    rng: ChaCha8Rng,
}

impl VirtualLink {
    /// An idle link whose jitter and loss come from `seed`.
    pub fn new(model: LinkModel, seed: u64) -> Self {
        Self {
            model,
            streams: VecDeque::new(),
            last_started: None,
            clock: 0.0,
            unacknowledged: Vec::new(),
            busy_before: 0.0,
            busy_from: None,
            acked_until: 0.0,
            next_id: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Its properties.
    pub fn model(&self) -> LinkModel {
        self.model
    }

    /// Hands a stream of `bytes` to the link at `now`; returns its id, and the streams
    /// that arrived up to `now` (see [`Self::advance`]).
    pub fn send(&mut self, now: f64, bytes: u64) -> (u64, Vec<Delivery>) {
        let arrived = self.advance(now);
        if self.streams.is_empty() && self.acked_until <= now {
            // Idle until now: a new busy period begins.
            if let Some(from) = self.busy_from {
                self.busy_before += self.acked_until - from;
            }
            self.busy_from = Some(now);
        }
        let mut bits = bytes as f64 * 8.0;
        let mut delay = self.model.rtt_s / 2.0;
        if self.model.loss > 0.0 {
            let packets = bytes.div_ceil(PACKET);
            let tail = self.model.round_trip_packets();
            let mut lost = 0u64;
            let mut lost_in_tail = false;
            for p in 0..packets {
                if self.rng.random_bool(self.model.loss.min(1.0)) {
                    lost += 1;
                    lost_in_tail |= packets - p <= tail;
                }
            }
            // Lost packets are resent (using bandwidth); one lost in the stream's last
            // round trip of sending holds its end back about a round trip.
            bits += (lost * PACKET * 8) as f64;
            if lost_in_tail {
                delay += self.model.rtt_s;
            }
        }
        if self.model.jitter_s > 0.0 {
            delay += self.rng.random_range(0.0..self.model.jitter_s);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.streams.push_back(Stream {
            id,
            bytes,
            bits_left: bits,
            delay,
            started: false,
        });
        // Admit it now if it may start; `advance` keeps the rest in step.
        let more = self.advance(now);
        debug_assert!(more.is_empty(), "nothing arrives in no time");
        (id, arrived)
    }

    /// Changes the bandwidth at `now` (what was sent before went at the old rate);
    /// returns the streams that arrived up to `now`.
    pub fn set_bandwidth(&mut self, now: f64, bandwidth_bps: f64) -> Vec<Delivery> {
        let arrived = self.advance(now);
        self.model.bandwidth_bps = bandwidth_bps;
        arrived
    }

    /// When the link next changes by itself (a stream through, or one starting): the
    /// time to call [`Self::advance`] at; `None` when nothing is in flight.
    pub fn next_change(&self) -> Option<f64> {
        self.next_step().map(|(at, _)| at)
    }

    /// The next change of the started streams: when, and what it is.
    fn next_step(&self) -> Option<(f64, Step)> {
        let started = self.streams.iter().filter(|s| s.started).count();
        if started == 0 {
            return None;
        }
        let rate = self.model.bandwidth_bps / started as f64;
        let least = self
            .streams
            .iter()
            .filter(|s| s.started)
            .map(|s| s.bits_left)
            .fold(f64::INFINITY, f64::min);
        let through = (self.clock + least / rate, Step::Through { bits: least });
        Some(match self.bits_until_next_start() {
            Some(bits) if bits < least => (self.clock + bits / rate, Step::Start { bits }),
            _ => through,
        })
    }

    /// Bits each started stream sends before the first waiting stream may start (`None`
    /// when none waits): until the stream started last has a send buffer left.
    fn bits_until_next_start(&self) -> Option<f64> {
        self.streams.iter().find(|s| !s.started)?;
        let buffer = self.model.send_buffer_bits();
        let before = self
            .last_started
            .and_then(|id| self.streams.iter().find(|s| s.id == id));
        Some(match before {
            Some(s) if s.bits_left > buffer => s.bits_left - buffer,
            _ => 0.0,
        })
    }

    /// Starts the first waiting stream.
    fn start_next(&mut self) {
        if let Some(s) = self.streams.iter_mut().find(|s| !s.started) {
            s.started = true;
            self.last_started = Some(s.id);
        }
    }

    /// Sends up to `now`: the started streams drain at an equal share of the bandwidth,
    /// waiting ones start in order as the rule allows. Returns the streams whose last
    /// byte left by `now`, with their arrival times (which may lie after `now`).
    pub fn advance(&mut self, now: f64) -> Vec<Delivery> {
        let mut arrived = Vec::new();
        loop {
            if self.streams.iter().all(|s| !s.started) {
                if self.streams.is_empty() {
                    self.clock = self.clock.max(now);
                    return arrived;
                }
                // An idle link starts the next stream at once.
                self.start_next();
                continue;
            }
            if self.bits_until_next_start() == Some(0.0) {
                self.start_next();
                continue;
            }
            let (at, step) = self.next_step().expect("a stream is being sent");
            let started = self.streams.iter().filter(|s| s.started).count();
            // Within the event queue's resolution of `now`, the change has happened.
            if at > now + TIME_RESOLUTION {
                let bits = (now - self.clock).max(0.0) * self.model.bandwidth_bps / started as f64;
                self.drain(bits);
                self.clock = self.clock.max(now);
                return arrived;
            }
            self.clock = self.clock.max(at);
            match step {
                Step::Start { bits } => {
                    self.drain(bits);
                    self.start_next();
                }
                Step::Through { bits } => self.drain(bits),
            }
            let rtt = self.model.rtt_s;
            let clock = self.clock;
            let unacknowledged = &mut self.unacknowledged;
            let acked_until = &mut self.acked_until;
            unacknowledged.retain(|&(at, _)| at > clock);
            self.streams.retain(|s| {
                let through = s.started && s.bits_left <= SENT_EPSILON_BITS;
                if through {
                    let at = clock + s.delay;
                    arrived.push(Delivery { stream: s.id, at });
                    unacknowledged.push((at + rtt / 2.0, s.bytes));
                    *acked_until = acked_until.max(at + rtt / 2.0);
                }
                !through
            });
        }
    }

    /// Takes `bits` off every started stream.
    fn drain(&mut self, bits: f64) {
        for s in self.streams.iter_mut().filter(|s| s.started) {
            s.bits_left -= bits;
        }
    }

    /// Seconds during which the link had a stream sent and not yet acknowledged, as the
    /// agents' links count their busy time, up to the last acknowledgement of the
    /// streams through so far (the whole run once every stream is through).
    pub fn busy_seconds(&self) -> f64 {
        self.busy_before + self.busy_from.map_or(0.0, |from| self.acked_until - from)
    }

    /// Bytes sent and not yet acknowledged at `now`, as a real link counts them: a
    /// stream stays queued until the receiver's acknowledgement is back, half a round
    /// trip after it arrived (what the `adaptive` policy reads as backlog).
    pub fn queued(&self, now: f64) -> u64 {
        self.streams.iter().map(|s| s.bytes).sum::<u64>()
            + self
                .unacknowledged
                .iter()
                .filter(|&&(at, _)| at > now)
                .map(|&(_, b)| b)
                .sum::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 8 Mbit/s (a megabyte a second), 100 ms round trip, no jitter or loss; its send
    /// buffer is the 1 MiB floor.
    const CLEAN_8_MBIT: LinkModel = LinkModel {
        bandwidth_bps: 8e6,
        rtt_s: 0.1,
        jitter_s: 0.0,
        loss: 0.0,
    };

    /// Runs the link until every stream is through; arrival times by stream id.
    fn drain(link: &mut VirtualLink, mut arrived: Vec<Delivery>) -> Vec<f64> {
        while let Some(at) = link.next_change() {
            arrived.extend(link.advance(at));
        }
        arrived.sort_by_key(|d| d.stream);
        arrived.iter().map(|d| d.at).collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn a_lone_stream_takes_bytes_over_bandwidth_plus_half_a_round_trip() {
        let mut l = VirtualLink::new(CLEAN_8_MBIT, 0);
        let (id, now) = l.send(0.0, 1_000_000);
        assert_eq!((id, now), (0, vec![]));
        let at = drain(&mut l, vec![]);
        assert!(close(at[0], 1.05), "{at:?}");
        // An idle link starts the next one at once.
        l.send(10.0, 500_000);
        assert!(close(drain(&mut l, vec![])[0], 10.55));
    }

    #[test]
    fn streams_in_flight_share_the_link_so_a_small_one_overtakes_a_large_one() {
        let mut l = VirtualLink::new(CLEAN_8_MBIT, 0);
        l.send(0.0, 1_000_000);
        l.send(0.0, 10_000);
        let at = drain(&mut l, vec![]);
        // The small one at half the rate: 20 ms; the large one keeps the rest.
        assert!(close(at[1], 0.02 + 0.05), "{at:?}");
        assert!(close(at[0], 1.01 + 0.05), "{at:?}");
        assert!(at[1] < at[0]);
    }

    #[test]
    fn a_stream_larger_than_the_send_buffer_holds_the_next_back_until_a_buffer_is_left() {
        let mut l = VirtualLink::new(CLEAN_8_MBIT, 0);
        let buffer = MIN_SEND_BUFFER / 1e6; // seconds of the link's time
        l.send(0.0, 3_000_000);
        l.send(0.0, 1_000);
        let at = drain(&mut l, vec![]);
        // The second waits until the first has one buffer left, then shares for 2 ms.
        let starts = 3.0 - buffer;
        assert!(close(at[1], starts + 0.002 + 0.05), "{at:?}");
        assert!(close(at[0], 3.001 + 0.05), "{at:?}");
    }

    #[test]
    fn several_rounds_backed_up_finish_close_together() {
        let mut l = VirtualLink::new(CLEAN_8_MBIT, 0);
        for _ in 0..4 {
            l.send(0.0, 250_000);
        }
        let at = drain(&mut l, vec![]);
        // One at a time they would arrive at 0.3, 0.55, 0.8, 1.05 s.
        assert!(at.iter().all(|&t| close(t, 1.05)), "{at:?}");
    }

    #[test]
    fn bytes_stay_queued_until_the_acknowledgement_is_back() {
        let mut l = VirtualLink::new(CLEAN_8_MBIT, 0);
        assert_eq!(l.queued(0.0), 0);
        l.send(0.0, 1_000_000);
        l.send(0.5, 500);
        assert_eq!(l.queued(0.9), 1_000_500);
        // The small one left at 0.501 s, arrived at 0.551 s, acknowledged at 0.601 s.
        l.advance(0.9);
        assert_eq!(l.queued(0.9), 1_000_000);
        // The large one arrives at 1.0505 s, its acknowledgement is back at 1.1005 s.
        let at = drain(&mut l, vec![]);
        assert!(close(at[0], 1.0505), "{at:?}");
        assert_eq!(l.queued(1.08), 1_000_000, "arrived, not yet acknowledged");
        assert_eq!(l.queued(1.11), 0);
    }

    #[test]
    fn a_bandwidth_change_applies_to_what_is_left() {
        let mut l = VirtualLink::new(CLEAN_8_MBIT, 0);
        l.send(0.0, 1_000_000);
        assert!(l.set_bandwidth(0.5, 4e6).is_empty());
        // Half sent at 8 Mbit/s, the other half at 4: one more second.
        assert!(close(drain(&mut l, vec![])[0], 1.55));
    }

    #[test]
    fn loss_and_jitter_only_delay_and_are_repeatable_from_the_seed() {
        let m = LinkModel {
            bandwidth_bps: 1e8,
            rtt_s: 0.2,
            jitter_s: 0.05,
            loss: 0.01,
        };
        let run = |seed| {
            let mut l = VirtualLink::new(m, seed);
            let mut arrived = Vec::new();
            for i in 0..200 {
                arrived.extend(l.send(i as f64 * 0.01, 50_000).1);
            }
            drain(&mut l, arrived)
        };
        let a = run(3);
        assert_eq!(a, run(3), "deterministic from the seed");
        for (i, t) in a.iter().enumerate() {
            // Never sooner than alone on a clean link.
            assert!(*t >= i as f64 * 0.01 + 0.004 + 0.1 - 1e-9, "{i}: {t}");
        }
        assert!(
            a.iter().any(|t| *t > 0.35),
            "some packet was lost and resent"
        );
    }

    #[test]
    fn only_a_loss_in_a_streams_last_round_trip_holds_its_end_back() {
        // 8 Mbit/s at 100 ms: a round trip carries 100 kB, 84 packets.
        let lossy = LinkModel {
            loss: 0.002,
            ..CLEAN_8_MBIT
        };
        assert_eq!(lossy.round_trip_packets(), 84);
        // Streams of 1,000 packets, each alone on the link: every one's resent bytes cost
        // time, but a round trip's delay only where a loss fell in its last 84 packets.
        let (mut delayed, mut streams_with_loss) = (0, 0);
        let mut l = VirtualLink::new(lossy, 5);
        for i in 0..200 {
            let sent = i as f64 * 10.0;
            l.send(sent, 1_200_000);
            let at = drain(&mut l, vec![])[0] - sent;
            // 1.2 MB at a megabyte a second, half a round trip to arrive; each resent
            // packet adds 1.2 ms.
            let clean = 1.2 + 0.05;
            assert!(at >= clean - 1e-9, "{at}");
            if at - clean > 0.09 {
                delayed += 1;
            }
            if at > clean + 1e-9 {
                streams_with_loss += 1;
            }
        }
        // P(some loss in 1,000 packets) = 86%; in the last 84: 15%.
        assert!(streams_with_loss > 150, "{streams_with_loss}");
        assert!((15..=50).contains(&delayed), "{delayed} of 200 held back");
    }

    #[test]
    fn a_link_is_busy_from_a_send_to_the_last_acknowledgement_before_it_idles() {
        let mut l = VirtualLink::new(CLEAN_8_MBIT, 0);
        assert_eq!(l.busy_seconds(), 0.0);
        // One megabyte: through at 1.0 s, arrives at 1.05, acknowledged at 1.1.
        l.send(0.0, 1_000_000);
        drain(&mut l, vec![]);
        assert!(close(l.busy_seconds(), 1.1), "{}", l.busy_seconds());
        // Idle from 1.1 to 3.0; then two streams whose busy times overlap count once:
        // half a megabyte each, the second sent while the first is acknowledged.
        l.send(3.0, 500_000);
        let arrived = l.send(3.58, 500_000).1;
        drain(&mut l, arrived);
        // The first is through at 3.5 and acknowledged at 3.6; the second, alone from
        // 3.58, at 4.08 and 4.18.
        assert!(close(l.busy_seconds(), 1.1 + 1.18), "{}", l.busy_seconds());
    }
}
