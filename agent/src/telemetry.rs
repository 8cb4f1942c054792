//! Every metric the agent exports, in one place: name, type, labels, help and histogram
//! buckets. The agent describes them to the `metrics` recorder from here, the Prometheus
//! exporter takes its buckets from here, and `docs/metrics.md` is checked against
//! [`markdown`] by a test, so code and docs cannot drift apart.
//!
//! Labels are bounded: `region` (a global label), `peer` (configured peers), `kind`
//! (tensor kind, failure kind, refusal stage, snapshot direction). Never per-tensor names.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// A metric's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Monotonic total.
    Counter,
    /// Current value.
    Gauge,
    /// Distribution with buckets.
    Histogram,
}

/// One metric.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    /// Prometheus name.
    pub name: &'static str,
    /// Type.
    pub kind: MetricKind,
    /// Labels besides `region`.
    pub labels: &'static [&'static str],
    /// What it measures.
    pub help: &'static str,
    /// Histogram buckets.
    pub buckets: &'static [f64],
}

const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BITS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 8.0, 16.0, 32.0];
const RATIO: &[f64] = &[1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0];

macro_rules! metric {
    ($name:expr, $kind:ident, [$($label:literal),*], $help:literal) => {
        MetricDef { name: $name, kind: MetricKind::$kind, labels: &[$($label),*], help: $help, buckets: &[] }
    };
    ($name:expr, $kind:ident, [$($label:literal),*], $help:literal, $buckets:expr) => {
        MetricDef { name: $name, kind: MetricKind::$kind, labels: &[$($label),*], help: $help, buckets: $buckets }
    };
}

/// WAN bytes sent, as encoded (frames, markers, notices, snapshots).
pub const WAN_BYTES_SENT: &str = "weightgrad_wan_bytes_sent_total";
/// WAN bytes received.
pub const WAN_BYTES_RECEIVED: &str = "weightgrad_wan_bytes_received_total";
/// Full-precision bytes of the values sent.
pub const WAN_DECODED_BYTES_SENT: &str = "weightgrad_wan_decoded_bytes_sent_total";
/// Full-precision bytes of the values received and applied.
pub const WAN_DECODED_BYTES_RECEIVED: &str = "weightgrad_wan_decoded_bytes_received_total";
/// LAN bytes.
pub const LAN_BYTES: &str = "weightgrad_lan_bytes_total";
/// Elements sent.
pub const ELEMENTS_SENT: &str = "weightgrad_elements_sent_total";
/// Elements held back.
pub const ELEMENTS_HELD: &str = "weightgrad_elements_held_total";
/// Significance ratio of the last round.
pub const SIGNIFICANCE_RATIO: &str = "weightgrad_significance_ratio";
/// Bits chosen per tensor and round.
pub const BITS_CHOSEN: &str = "weightgrad_bits_chosen";
/// Round duration.
pub const ROUND_SECONDS: &str = "weightgrad_round_duration_seconds";
/// Training step duration.
pub const STEP_SECONDS: &str = "weightgrad_step_duration_seconds";
/// Policy rollbacks, by cause.
pub const POLICY_ROLLBACKS: &str = "weightgrad_policy_rollbacks_total";
/// Components quarantined by the breaker.
pub const POLICY_QUARANTINED: &str = "weightgrad_policy_quarantined";
/// Duration of a round's WAN work (filter, quantize, encode, compress).
pub const ENCODE_SECONDS: &str = "weightgrad_encode_duration_seconds";
/// Duration of decoding and merging a peer's message.
pub const RECEIVE_SECONDS: &str = "weightgrad_receive_duration_seconds";
/// Time a region waited between rounds for peers (the staleness bound).
pub const WAIT_SECONDS: &str = "weightgrad_wait_duration_seconds";
/// Rounds finished.
pub const ROUND: &str = "weightgrad_round";
/// Training loss.
pub const LOSS: &str = "weightgrad_loss";
/// Test accuracy.
pub const ACCURACY: &str = "weightgrad_test_accuracy";
/// Staleness per peer.
pub const STALENESS: &str = "weightgrad_staleness_rounds";
/// The configured staleness bound.
pub const STALENESS_BOUND: &str = "weightgrad_staleness_bound_rounds";
/// Rounds the whole run takes.
pub const RUN_ROUNDS: &str = "weightgrad_run_rounds";
/// Link RTT.
pub const LINK_RTT: &str = "weightgrad_link_rtt_seconds";
/// Link goodput.
pub const LINK_GOODPUT: &str = "weightgrad_link_goodput_bits_per_second";
/// Link losses.
pub const LINK_LOST: &str = "weightgrad_link_packets_lost_total";
/// Link congestion window.
pub const LINK_CWND: &str = "weightgrad_link_congestion_window_bytes";
/// Link bytes in flight.
pub const LINK_IN_FLIGHT: &str = "weightgrad_link_bytes_in_flight";
/// Link unacknowledged queue.
pub const LINK_QUEUED: &str = "weightgrad_link_queued_bytes";
/// Peer up.
pub const PEER_UP: &str = "weightgrad_peer_up";
/// zstd ratio.
pub const ZSTD_RATIO: &str = "weightgrad_zstd_ratio";
/// Policy call duration.
pub const POLICY_CALL_SECONDS: &str = "weightgrad_policy_call_duration_seconds";
/// Policy failures.
pub const POLICY_FAILURES: &str = "weightgrad_policy_failures_total";
/// Policy swaps.
pub const POLICY_SWAPS: &str = "weightgrad_policy_swaps_total";
/// Messages refused.
pub const MESSAGES_REJECTED: &str = "weightgrad_messages_rejected_total";
/// Connections refused.
pub const REFUSALS: &str = "weightgrad_connections_refused_total";
/// Snapshots.
pub const SNAPSHOTS: &str = "weightgrad_snapshots_total";

/// The catalogue.
pub const CATALOGUE: &[MetricDef] = &[
    metric!(
        WAN_BYTES_SENT,
        Counter,
        ["peer"],
        "WAN bytes sent to the peer, as encoded (update frames, round-end markers, resume notices, snapshots)"
    ),
    metric!(
        WAN_BYTES_RECEIVED,
        Counter,
        ["peer"],
        "WAN bytes received from the peer, as encoded"
    ),
    metric!(
        WAN_DECODED_BYTES_SENT,
        Counter,
        ["peer"],
        "What the sent values would take at full precision (4 bytes per element sent)"
    ),
    metric!(
        WAN_DECODED_BYTES_RECEIVED,
        Counter,
        ["peer"],
        "What the received and applied values would take at full precision (4 bytes per element)"
    ),
    metric!(
        LAN_BYTES,
        Counter,
        [],
        "LAN bytes between workers and the aggregator, both ways, as encoded"
    ),
    metric!(
        ELEMENTS_SENT,
        Counter,
        ["peer"],
        "Update elements sent to the peer"
    ),
    metric!(
        ELEMENTS_HELD,
        Counter,
        ["peer"],
        "Update elements kept in the peer's residual at the end of a round"
    ),
    metric!(
        SIGNIFICANCE_RATIO,
        Gauge,
        ["peer"],
        "Fraction of the model's elements sent to the peer in the last round"
    ),
    metric!(
        BITS_CHOSEN,
        Histogram,
        ["peer", "kind"],
        "Bit-width the policy chose per tensor and round for tensors it sent (kind: the tensor's role: weight, bias, embedding, attention or norm)",
        BITS
    ),
    metric!(
        ROUND_SECONDS,
        Histogram,
        [],
        "Wall time from the start of one round to the start of the next (includes waiting for peers)",
        SECONDS
    ),
    metric!(
        STEP_SECONDS,
        Histogram,
        [],
        "Wall time of one training step across the region's workers",
        SECONDS
    ),
    metric!(
        POLICY_ROLLBACKS,
        Counter,
        ["cause"],
        "Rollbacks to the previous policy (cause: breaker, after rollback_after failed calls in a row; operator, by POST /policies/rollback)"
    ),
    metric!(
        POLICY_QUARANTINED,
        Gauge,
        [],
        "Policy components the breaker rolled back, refused on push unless forced"
    ),
    metric!(
        ENCODE_SECONDS,
        Histogram,
        [],
        "Wall time of one round's WAN work: filtering, quantizing, encoding and compressing what every link gets (with overlap it runs beside the next step)",
        SECONDS
    ),
    metric!(
        RECEIVE_SECONDS,
        Histogram,
        [],
        "Wall time of decoding one peer's message and adding it into the model (with overlap, the decoding alone: the additions wait for the step's end and are counted in the report's `round_costs.receive`)",
        SECONDS
    ),
    metric!(
        WAIT_SECONDS,
        Histogram,
        [],
        "Wall time a region waited between two of its rounds with nothing to do (for peers, under the staleness bound)",
        SECONDS
    ),
    metric!(ROUND, Gauge, [], "Rounds this region has finished"),
    metric!(LOSS, Gauge, [], "Training loss of the last step"),
    metric!(
        ACCURACY,
        Gauge,
        [],
        "Test top-1 at the last evaluation (every epoch)"
    ),
    metric!(
        STALENESS,
        Gauge,
        ["peer"],
        "This region's rounds minus the peer's fully arrived rounds"
    ),
    metric!(
        STALENESS_BOUND,
        Gauge,
        [],
        "The configured staleness bound, `training.max_staleness` (alerts compare `weightgrad_staleness_rounds` with it)"
    ),
    metric!(
        RUN_ROUNDS,
        Gauge,
        [],
        "Rounds the whole run takes; `weightgrad_round` reaching it means this region is finished"
    ),
    metric!(
        LINK_RTT,
        Gauge,
        ["peer"],
        "Smoothed round-trip time of the link (from QUIC recovery)"
    ),
    metric!(
        LINK_GOODPUT,
        Gauge,
        ["peer"],
        "Acknowledged bytes per second while the link had data in flight"
    ),
    metric!(
        LINK_LOST,
        Counter,
        ["peer"],
        "Packets QUIC declared lost on the current connection"
    ),
    metric!(LINK_CWND, Gauge, ["peer"], "Congestion window of the link"),
    metric!(
        LINK_IN_FLIGHT,
        Gauge,
        ["peer"],
        "Bytes sent and not yet acknowledged or lost (QUIC)"
    ),
    metric!(
        LINK_QUEUED,
        Gauge,
        ["peer"],
        "Message bytes queued or in flight and not yet acknowledged by the peer"
    ),
    metric!(
        PEER_UP,
        Gauge,
        ["peer"],
        "1 while the link to the peer is connected"
    ),
    metric!(
        ZSTD_RATIO,
        Histogram,
        [],
        "Packed payload bytes over zstd-compressed bytes, per update frame",
        RATIO
    ),
    metric!(
        POLICY_CALL_SECONDS,
        Histogram,
        [],
        "Wall time of one policy decision (sandbox call and validation)",
        SECONDS
    ),
    metric!(
        POLICY_FAILURES,
        Counter,
        ["kind"],
        "Policy calls that failed, by kind (timeout, memory, trap, refused, invalid, oversized)"
    ),
    metric!(POLICY_SWAPS, Counter, [], "Policy swaps and rollbacks"),
    metric!(
        MESSAGES_REJECTED,
        Counter,
        ["peer"],
        "WAN messages refused as malformed or not fitting the model"
    ),
    metric!(
        REFUSALS,
        Counter,
        ["kind"],
        "WAN connections refused (kind: tls or handshake)"
    ),
    metric!(
        SNAPSHOTS,
        Counter,
        ["kind"],
        "Snapshots served to or adopted from peers (kind: served or adopted)"
    ),
];

/// Installs the Prometheus recorder (once per process) with the catalogue's buckets and
/// `region` as a global label, and describes every metric.
pub fn install(region: &str) -> anyhow::Result<PrometheusHandle> {
    let mut builder = PrometheusBuilder::new().add_global_label("region", region);
    for m in CATALOGUE.iter().filter(|m| m.kind == MetricKind::Histogram) {
        builder = builder.set_buckets_for_metric(Matcher::Full(m.name.to_string()), m.buckets)?;
    }
    let handle = builder.install_recorder()?;
    for m in CATALOGUE {
        match m.kind {
            MetricKind::Counter => metrics::describe_counter!(m.name, m.help),
            MetricKind::Gauge => metrics::describe_gauge!(m.name, m.help),
            MetricKind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
    Ok(handle)
}

/// How often [`spawn_upkeep`] drains recorded histogram samples.
pub const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Drains the recorder's histogram samples into their buckets every [`UPKEEP_EVERY`], on the
/// current tokio runtime. The exporter otherwise keeps every sample until the next scrape,
/// so an agent nobody scrapes would grow by every duration, bit-width and ratio it records
/// (the soak in `docs/reliability.md` found this).
pub fn spawn_upkeep(handle: PrometheusHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_EVERY);
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    })
}

/// The catalogue as the Markdown table in `docs/metrics.md`.
pub fn markdown() -> String {
    let mut out =
        String::from("| metric | type | labels | what it measures |\n| --- | --- | --- | --- |\n");
    for m in CATALOGUE {
        let kind = match m.kind {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        };
        let labels = std::iter::once("region")
            .chain(m.labels.iter().copied())
            .collect::<Vec<_>>()
            .join(", ");
        out += &format!("| `{}` | {kind} | {labels} | {} |\n", m.name, m.help);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_prometheus_names_and_histograms_have_buckets() {
        let mut seen = std::collections::HashSet::new();
        for m in CATALOGUE {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(m.name.starts_with("weightgrad_"));
            assert!(m.name.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            assert_eq!(
                m.kind == MetricKind::Counter,
                m.name.ends_with("_total"),
                "{}",
                m.name
            );
            assert_eq!(
                m.kind == MetricKind::Histogram,
                !m.buckets.is_empty(),
                "{}",
                m.name
            );
            assert!(m.buckets.windows(2).all(|w| w[0] < w[1]));
        }
        for name in [
            WAN_BYTES_SENT,
            WAN_BYTES_RECEIVED,
            WAN_DECODED_BYTES_SENT,
            WAN_DECODED_BYTES_RECEIVED,
            LAN_BYTES,
            ELEMENTS_SENT,
            ELEMENTS_HELD,
            SIGNIFICANCE_RATIO,
            BITS_CHOSEN,
            ROUND_SECONDS,
            STEP_SECONDS,
            POLICY_ROLLBACKS,
            POLICY_QUARANTINED,
            ENCODE_SECONDS,
            RECEIVE_SECONDS,
            WAIT_SECONDS,
            ROUND,
            LOSS,
            ACCURACY,
            STALENESS,
            STALENESS_BOUND,
            RUN_ROUNDS,
            LINK_RTT,
            LINK_GOODPUT,
            LINK_LOST,
            LINK_CWND,
            LINK_IN_FLIGHT,
            LINK_QUEUED,
            PEER_UP,
            ZSTD_RATIO,
            POLICY_CALL_SECONDS,
            POLICY_FAILURES,
            POLICY_SWAPS,
            MESSAGES_REJECTED,
            REFUSALS,
            SNAPSHOTS,
        ] {
            assert!(seen.contains(name), "{name} is not in the catalogue");
        }
        assert_eq!(seen.len(), 36, "every catalogue entry has a constant");
    }

    #[test]
    fn docs_list_exactly_the_catalogue() {
        let doc = include_str!("../../docs/metrics.md");
        let table = markdown();
        assert!(
            doc.contains(&table),
            "docs/metrics.md is out of date; its table must be:\n{table}"
        );
    }
}
