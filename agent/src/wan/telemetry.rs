//! What s2n-quic's event subscriber tells us about each connection: the names on the
//! peer's verified certificate (for the handshake's identity check), RTT, congestion
//! window, bytes in flight and losses (for the policy and the metrics), and why and where
//! slow start ended (logged, and a loss during the handshake flagged for `wan::link`).

use s2n_quic::provider::event::{ConnectionInfo, ConnectionMeta, Subscriber, events};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One connection's latest transport statistics.
#[derive(Debug, Clone, Default)]
pub struct ConnectionStats {
    /// DNS names on the peer's certificate (the leaf of its verified chain).
    pub peer_names: Vec<String>,
    /// Smoothed round-trip time.
    pub smoothed_rtt: Duration,
    /// Lowest round-trip time seen.
    pub min_rtt: Duration,
    /// Congestion window, bytes.
    pub congestion_window: u32,
    /// Bytes sent and not yet acknowledged or lost.
    pub bytes_in_flight: u32,
    /// Packets declared lost.
    pub packets_lost: u64,
    /// Packets sent.
    pub packets_sent: u64,
    /// The TLS handshake has completed (the peer's certificate is known).
    pub handshake_complete: bool,
    /// The congestion controller left slow start because a packet was lost before the
    /// handshake completed: typically the first flight went to a peer not listening yet.
    /// The connection then grows its window from the initial one (12 KB) in congestion
    /// avoidance, which under CUBIC takes tens of seconds to fill a long, fast link.
    pub left_slow_start_in_handshake: bool,
}

impl ConnectionStats {
    /// Fraction of sent packets declared lost.
    pub fn loss_rate(&self) -> f64 {
        if self.packets_sent == 0 {
            0.0
        } else {
            self.packets_lost as f64 / self.packets_sent as f64
        }
    }
}

/// Shared handle to one connection's statistics (the subscriber writes, the agent reads).
pub type SharedStats = Arc<Mutex<ConnectionStats>>;

/// Reads a connection's statistics handle.
pub fn stats_of(conn: &s2n_quic::connection::Handle) -> Option<SharedStats> {
    conn.query_event_context(|s: &SharedStats| s.clone()).ok()
}

/// The event subscriber installed on every endpoint; counts refused TLS handshakes.
#[derive(Debug, Default, Clone)]
pub struct LinkTelemetry {
    /// TLS handshakes that failed (an untrusted or misnamed certificate, or none).
    pub tls_refusals: Arc<AtomicU64>,
}

/// DNS names in a DER certificate's subject alternative names.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(s) => Some(s.to_string()),
            _ => None,
        })
        .collect()
}

impl Subscriber for LinkTelemetry {
    type ConnectionContext = SharedStats;

    fn create_connection_context(
        &mut self,
        _meta: &ConnectionMeta,
        _info: &ConnectionInfo,
    ) -> Self::ConnectionContext {
        SharedStats::default()
    }

    fn on_tls_exporter_ready(
        &mut self,
        context: &mut Self::ConnectionContext,
        _meta: &ConnectionMeta,
        event: &events::TlsExporterReady,
    ) {
        // The verified chain's leaf is the peer's own certificate.
        let mut s = context.lock().expect("stats");
        s.handshake_complete = true;
        if let Ok(chain) = event.session.peer_cert_chain_der()
            && let Some(leaf) = chain.first()
        {
            s.peer_names = certificate_names(leaf);
        }
    }

    fn on_tls_handshake_failed(
        &mut self,
        _context: &mut Self::ConnectionContext,
        meta: &ConnectionMeta,
        event: &events::TlsHandshakeFailed,
    ) {
        self.tls_refusals.fetch_add(1, Ordering::Relaxed);
        let side = match meta.endpoint_type {
            events::EndpointType::Server { .. } => "accepting",
            _ => "dialling",
        };
        tracing::warn!(
            side,
            "refused a WAN connection: TLS handshake failed ({}): the peer's certificate \
             is not from the configured CA, names no configured peer, or does not match \
             the region dialled",
            event.error
        );
    }

    fn on_recovery_metrics(
        &mut self,
        context: &mut Self::ConnectionContext,
        _meta: &ConnectionMeta,
        event: &events::RecoveryMetrics,
    ) {
        let mut s = context.lock().expect("stats");
        s.smoothed_rtt = event.smoothed_rtt;
        s.min_rtt = event.min_rtt;
        s.congestion_window = event.congestion_window;
        s.bytes_in_flight = event.bytes_in_flight;
    }

    fn on_packet_sent(
        &mut self,
        context: &mut Self::ConnectionContext,
        _meta: &ConnectionMeta,
        _event: &events::PacketSent,
    ) {
        context.lock().expect("stats").packets_sent += 1;
    }

    fn on_packet_lost(
        &mut self,
        context: &mut Self::ConnectionContext,
        _meta: &ConnectionMeta,
        event: &events::PacketLost,
    ) {
        let mut s = context.lock().expect("stats");
        s.packets_lost += 1;
        tracing::debug!(
            peer = s.peer_names.first().map(String::as_str),
            bytes = event.bytes_lost,
            mtu_probe = event.is_mtu_probe,
            congestion_window = s.congestion_window,
            "packet lost"
        );
    }

    fn on_slow_start_exited(
        &mut self,
        context: &mut Self::ConnectionContext,
        _meta: &ConnectionMeta,
        event: &events::SlowStartExited,
    ) {
        let mut s = context.lock().expect("stats");
        if matches!(event.cause, events::SlowStartExitCause::PacketLoss { .. })
            && !s.handshake_complete
        {
            s.left_slow_start_in_handshake = true;
        }
        let peer = s.peer_names.first().map(String::as_str);
        let congestion_window = event.congestion_window;
        // The first exit sets the window the connection grows from; later ones (CUBIC
        // crossing its threshold again) are routine.
        let cause = match event.cause {
            events::SlowStartExitCause::PacketLoss { .. } => "packet loss",
            events::SlowStartExitCause::Ecn { .. } => "ECN mark",
            events::SlowStartExitCause::Rtt { .. } => "RTT rise",
            _ => {
                tracing::debug!(peer, congestion_window, "left slow start again");
                return;
            }
        };
        tracing::info!(
            peer,
            cause,
            congestion_window,
            smoothed_rtt_ms = s.smoothed_rtt.as_secs_f64() * 1e3,
            "WAN connection left slow start"
        );
    }
}
