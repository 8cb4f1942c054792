//! What `GET /status` shows: the core publishes it after every round and while it waits.

use serde::Serialize;
use std::collections::BTreeMap;

/// A peer as the status page shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PeerStatus {
    /// Region name.
    pub name: String,
    /// `up`, `down` (within the deadline) or `excluded` (past it).
    pub state: &'static str,
    /// Smoothed RTT of the current connection, ms.
    pub rtt_ms: Option<f64>,
    /// Measured goodput while busy, bit/s.
    pub goodput_bps: f64,
    /// This region's rounds minus the peer's fully arrived rounds.
    pub staleness: i64,
    /// The peer's rounds fully arrived here.
    pub rounds_complete: u64,
    /// Message bytes queued for it and not yet acknowledged.
    pub queued_bytes: u64,
}

/// The active policy as the status page shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct PolicyStatus {
    /// Policy name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// sha256 of the component.
    pub digest: String,
    /// When it became active (RFC 3339, UTC).
    pub loaded_at: String,
    /// The breaker: failed calls in a row, suspension, quarantined components.
    pub breaker: crate::policy::BreakerStatus,
}

/// Byte totals.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct ByteTotals {
    /// WAN bytes sent, as encoded.
    pub wan_sent: u64,
    /// WAN bytes received.
    pub wan_received: u64,
    /// LAN bytes.
    pub lan: u64,
}

/// The agent's status.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Status {
    /// Region name.
    pub region: String,
    /// `starting` (reaching peers), `fetching` (taking a peer's model), `training`,
    /// `waiting` (for peers, at the staleness bound), `finished` or `stopping`.
    pub state: &'static str,
    /// Rounds finished.
    pub round: u64,
    /// Rounds in the run.
    pub total_rounds: u64,
    /// Training loss of the last step.
    pub loss: Option<f32>,
    /// Test top-1 at the last evaluation.
    pub test_accuracy: Option<f64>,
    /// Peers, in configuration order.
    pub peers: Vec<PeerStatus>,
    /// The active policy.
    pub policy: PolicyStatus,
    /// Policy failures by kind.
    pub policy_failures: BTreeMap<String, u64>,
    /// Byte totals.
    pub bytes: ByteTotals,
}

/// Now, as RFC 3339 UTC.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
