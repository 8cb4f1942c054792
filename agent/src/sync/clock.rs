//! The mirror clock: which rounds of each peer have fully arrived, and whether this region
//! may start its next round without running more than `max_staleness` rounds ahead of the
//! slowest live peer. Sans-IO: it only counts what it is told.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct PeerClock {
    /// Highest round `c` such that every round `<= c` is complete.
    complete: u64,
    /// Frames announced by a round-end marker, by round.
    announced: BTreeMap<u64, u32>,
    /// Frames received, by round (may run ahead of the marker).
    received: BTreeMap<u64, u32>,
    /// Whether the peer counts towards the bound.
    live: bool,
}

impl PeerClock {
    fn advance(&mut self) {
        while let Some(&want) = self.announced.get(&(self.complete + 1)) {
            let got = self
                .received
                .get(&(self.complete + 1))
                .copied()
                .unwrap_or(0);
            if got < want {
                break;
            }
            self.complete += 1;
            self.announced.remove(&self.complete);
            self.received.remove(&self.complete);
        }
    }
}

/// Per-peer round completion and the staleness bound.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MirrorClock {
    max_staleness: u64,
    peers: Vec<PeerClock>,
}

impl MirrorClock {
    /// A clock for `peers` peers, all live, none of whose rounds has arrived.
    pub fn new(peers: usize, max_staleness: u64) -> Self {
        Self {
            max_staleness,
            peers: vec![
                PeerClock {
                    live: true,
                    ..PeerClock::default()
                };
                peers
            ],
        }
    }

    /// The configured bound.
    pub fn max_staleness(&self) -> u64 {
        self.max_staleness
    }

    /// Records one update frame of `peer`'s round `clock`.
    pub fn frame_arrived(&mut self, peer: usize, clock: u64) {
        let p = &mut self.peers[peer];
        if clock > p.complete {
            *p.received.entry(clock).or_default() += 1;
            p.advance();
        }
    }

    /// Records `peer`'s marker: round `clock` produced `frames` frames.
    pub fn round_ended(&mut self, peer: usize, clock: u64, frames: u32) {
        let p = &mut self.peers[peer];
        if clock > p.complete {
            p.announced.insert(clock, frames);
            p.advance();
        }
    }

    /// Declares `peer`'s rounds up to `round` complete: it restarted from a snapshot that
    /// holds them and will never send them. Later rounds keep what already arrived.
    pub fn skip_to(&mut self, peer: usize, round: u64) {
        let p = &mut self.peers[peer];
        if round > p.complete {
            p.complete = round;
            p.announced = p.announced.split_off(&(round + 1));
            p.received = p.received.split_off(&(round + 1));
            p.advance();
        }
    }

    /// Rounds of `peer` known complete.
    pub fn complete(&self, peer: usize) -> u64 {
        self.peers[peer].complete
    }

    /// Marks a peer live or not; a peer that is not live does not hold others back.
    pub fn set_live(&mut self, peer: usize, live: bool) {
        self.peers[peer].live = live;
    }

    /// The slowest live peer's complete rounds (`None` when no peer is live).
    pub fn slowest_live(&self) -> Option<u64> {
        self.peers
            .iter()
            .filter(|p| p.live)
            .map(|p| p.complete)
            .min()
    }

    /// Whether this region may start round `round` (1-based): its previous round may be at
    /// most `max_staleness` ahead of the slowest live peer.
    pub fn may_start(&self, round: u64) -> bool {
        self.slowest_live()
            .is_none_or(|slowest| round.saturating_sub(1) <= slowest + self.max_staleness)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_complete_only_when_all_announced_frames_arrived() {
        let mut c = MirrorClock::new(2, 0);
        assert!(c.may_start(1));
        assert!(!c.may_start(2));
        c.frame_arrived(0, 1);
        c.round_ended(0, 1, 2);
        assert_eq!(c.complete(0), 0, "one of two frames");
        c.frame_arrived(0, 1);
        assert_eq!(c.complete(0), 1);
        // Peer 1's marker for round 2 arrives before round 1's: nothing completes out of order.
        c.round_ended(1, 2, 0);
        assert_eq!(c.complete(1), 0);
        assert!(!c.may_start(2));
        c.round_ended(1, 1, 0);
        assert_eq!(c.complete(1), 2);
        assert!(c.may_start(2));
        assert!(!c.may_start(3));
    }

    #[test]
    fn dead_peers_do_not_hold_others_back() {
        let mut c = MirrorClock::new(2, 1);
        c.round_ended(0, 1, 0);
        c.round_ended(0, 2, 0);
        assert!(!c.may_start(3));
        c.set_live(1, false);
        assert!(c.may_start(4));
        assert!(!c.may_start(5));
    }

    #[test]
    fn a_resumed_peer_skips_the_rounds_its_snapshot_holds() {
        let mut c = MirrorClock::new(1, 1);
        c.round_ended(0, 1, 0);
        // Rounds 2..=9 will never come; round 11's marker arrived early.
        c.round_ended(0, 11, 0);
        c.round_ended(0, 5, 1);
        c.skip_to(0, 10);
        assert_eq!(
            c.complete(0),
            11,
            "skipped to 10, then 11 was already announced"
        );
        c.skip_to(0, 3);
        assert_eq!(c.complete(0), 11, "never goes back");
        c.frame_arrived(0, 4);
        assert_eq!(c.complete(0), 11);
    }
}
