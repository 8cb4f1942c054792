//! Which peers the mirror clock waits for, sans-IO with injected time: a peer whose
//! outgoing link has been down longer than the deadline is excluded (the others go on);
//! it is included again as soon as the link is back.

use std::time::Duration;

#[derive(Debug, Clone)]
struct PeerLiveness {
    connected: bool,
    /// When the link went down (or the agent started), if it is down.
    down_since: Option<Duration>,
    live: bool,
    /// Whether the link has ever been up.
    ever_connected: bool,
}

/// Liveness of every peer link.
#[derive(Debug, Clone)]
pub struct Liveness {
    deadline: Duration,
    peers: Vec<PeerLiveness>,
}

/// A change the mirror clock must hear about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LivenessChange {
    /// The peer is excluded: unreachable past the deadline.
    Excluded(usize),
    /// The peer is back.
    Included(usize),
}

impl Liveness {
    /// `peers` links, all live and not yet connected, at time `now`.
    pub fn new(peers: usize, deadline: Duration, now: Duration) -> Self {
        Self {
            deadline,
            peers: vec![
                PeerLiveness {
                    connected: false,
                    down_since: Some(now),
                    live: true,
                    ever_connected: false,
                };
                peers
            ],
        }
    }

    /// The link to `peer` is up.
    pub fn connected(&mut self, peer: usize) -> Option<LivenessChange> {
        let p = &mut self.peers[peer];
        p.connected = true;
        p.ever_connected = true;
        p.down_since = None;
        (!std::mem::replace(&mut p.live, true)).then_some(LivenessChange::Included(peer))
    }

    /// The link to `peer` is down as of `now`.
    pub fn disconnected(&mut self, peer: usize, now: Duration) {
        let p = &mut self.peers[peer];
        if p.connected || p.down_since.is_none() {
            p.down_since = Some(now);
        }
        p.connected = false;
    }

    /// Excludes peers down for longer than the deadline at `now`.
    pub fn tick(&mut self, now: Duration) -> Vec<LivenessChange> {
        let deadline = self.deadline;
        self.peers
            .iter_mut()
            .enumerate()
            .filter_map(|(i, p)| {
                let overdue = p
                    .down_since
                    .is_some_and(|since| now.saturating_sub(since) > deadline);
                (p.live && overdue).then(|| {
                    p.live = false;
                    LivenessChange::Excluded(i)
                })
            })
            .collect()
    }

    /// Whether `peer` counts towards the mirror clock.
    pub fn is_live(&self, peer: usize) -> bool {
        self.peers[peer].live
    }

    /// Whether the link to `peer` is up now.
    pub fn is_connected(&self, peer: usize) -> bool {
        self.peers[peer].connected
    }

    /// Whether every peer has either been reached once or been excluded: a fresh agent
    /// knows by then whether it joins a run already under way.
    pub fn settled(&self) -> bool {
        self.peers.iter().all(|p| p.ever_connected || !p.live)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: u64) -> Duration {
        Duration::from_secs(x)
    }

    #[test]
    fn excluded_after_the_deadline_and_back_on_reconnect() {
        let mut l = Liveness::new(2, s(10), s(0));
        assert!(!l.settled());
        assert_eq!(l.connected(0), None, "live from the start");
        assert!(!l.settled());
        assert!(l.tick(s(10)).is_empty(), "not past the deadline yet");
        assert_eq!(l.tick(s(11)), vec![LivenessChange::Excluded(1)]);
        assert!(l.tick(s(12)).is_empty(), "reported once");
        assert!(l.settled(), "peer 1 never answered but is excluded");
        // Peer 0 drops at 20 and comes back at 25: never excluded.
        l.disconnected(0, s(20));
        assert!(l.tick(s(25)).is_empty());
        assert_eq!(l.connected(0), None);
        // Drops again at 40; a second disconnect report does not restart the clock.
        l.disconnected(0, s(40));
        l.disconnected(0, s(45));
        assert_eq!(l.tick(s(51)), vec![LivenessChange::Excluded(0)]);
        assert!(!l.is_live(0) && !l.is_connected(0));
        assert_eq!(l.connected(0), Some(LivenessChange::Included(0)));
        assert!(l.is_live(0));
    }
}
