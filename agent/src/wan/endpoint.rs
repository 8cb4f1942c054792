//! Building the QUIC endpoints: mutual TLS, flow-control windows and send buffers sized
//! from the configured bandwidth × RTT (s2n-quic's defaults suit only about 150 Mbit/s at
//! 100 ms), keep-alive, the congestion controller, and the telemetry subscriber.

use super::{telemetry::LinkTelemetry, tls};
use crate::config::{Congestion, WanConfig};
use anyhow::{Context, Result};
use s2n_quic::provider::congestion_controller::{Bbr, Cubic};
use s2n_quic::provider::limits::Limits;
use s2n_quic::{Client, Server};
use std::net::SocketAddr;
use std::time::Duration;

/// Smallest window used whatever the configuration says.
const MIN_WINDOW: u64 = 1 << 20;
/// How long a silent connection lives: half the peer deadline (so a dead peer is noticed
/// well within it), between 1 and 30 seconds.
pub fn idle_timeout(wan: &WanConfig) -> Duration {
    Duration::from_secs_f64((wan.peer_deadline_s / 2.0).clamp(1.0, 30.0))
}

/// Flow-control window (connection and per stream) and send buffer, in bytes: twice the
/// bandwidth-delay product, so a full window is in flight while the next is granted.
pub fn window_bytes(wan: &WanConfig) -> u64 {
    (2 * wan.bandwidth_delay_bytes()).clamp(MIN_WINDOW, u64::from(u32::MAX))
}

/// The connection limits for `wan`.
pub fn limits(wan: &WanConfig) -> Result<Limits> {
    let window = window_bytes(wan);
    let send_buffer = u32::try_from(window).unwrap_or(u32::MAX);
    let l = Limits::new()
        .with_data_window(window)?
        .with_bidirectional_local_data_window(window)?
        .with_bidirectional_remote_data_window(window)?
        .with_unidirectional_data_window(window)?
        .with_max_send_buffer_size(send_buffer)?
        // Messages ride bidirectional streams (the receiver acknowledges on them).
        .with_max_open_local_bidirectional_streams(1024)?
        .with_max_open_remote_bidirectional_streams(1024)?
        .with_max_idle_timeout(idle_timeout(wan))?
        // Keep-alives well inside the idle timeout (and typical NAT timeouts).
        .with_max_keep_alive_period(idle_timeout(wan) / 3)?
        .with_max_handshake_duration(Duration::from_secs(10))?;
    Ok(l)
}

macro_rules! start_with_congestion {
    ($builder:expr, $congestion:expr) => {
        match $congestion {
            Congestion::Cubic => $builder
                .with_congestion_controller(Cubic::default())?
                .start()?,
            Congestion::Bbr => $builder
                .with_congestion_controller(Bbr::default())?
                .start()?,
        }
    };
}

/// The accepting endpoint on `listen`: presents `id`, admits clients of the CA naming one
/// of `peers`; `telemetry` observes its connections.
pub fn server(
    wan: &WanConfig,
    listen: SocketAddr,
    id: &tls::TlsIdentity,
    peers: &[String],
    telemetry: LinkTelemetry,
) -> Result<Server> {
    let build = || -> Result<Server> {
        let builder = Server::builder()
            .with_tls(tls::server(id, peers)?)?
            .with_io(listen)?
            .with_limits(limits(wan)?)?
            .with_event(telemetry.clone())?;
        Ok(start_with_congestion!(builder, wan.congestion))
    };
    build().with_context(|| format!("starting the QUIC endpoint on {listen} (wan.listen)"))
}

/// The dialling endpoint, bound to an ephemeral port on `bind`'s address family.
pub fn client(
    wan: &WanConfig,
    id: &tls::TlsIdentity,
    bind: SocketAddr,
    telemetry: LinkTelemetry,
) -> Result<Client> {
    let build = || -> Result<Client> {
        let builder = Client::builder()
            .with_tls(tls::client(id)?)?
            .with_io(bind)?
            .with_limits(limits(wan)?)?
            .with_event(telemetry.clone())?;
        Ok(start_with_congestion!(builder, wan.congestion))
    };
    build().context("starting the dialling QUIC endpoint")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wan(mbps: f64, rtt_ms: f64) -> WanConfig {
        WanConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            bandwidth_mbps: mbps,
            rtt_ms,
            peer_deadline_s: 30.0,
            congestion: Congestion::Bbr,
        }
    }

    #[test]
    fn windows_follow_the_bandwidth_delay_product() {
        // 1 Gbit/s at 200 ms: 25 MB in flight, window 50 MB (far above the defaults).
        assert_eq!(window_bytes(&wan(1000.0, 200.0)), 50_000_000);
        // A thin link still gets the floor.
        assert_eq!(window_bytes(&wan(1.0, 10.0)), MIN_WINDOW);
        // Absurd settings are capped where QUIC's varints and s2n-quic's checks allow.
        assert_eq!(window_bytes(&wan(1e9, 1e6)), u64::from(u32::MAX));
        assert!(limits(&wan(1e9, 1e6)).is_ok());
        let mut w = wan(100.0, 100.0);
        assert_eq!(idle_timeout(&w), Duration::from_secs(15));
        w.peer_deadline_s = 0.5;
        assert_eq!(idle_timeout(&w), Duration::from_secs(1));
        w.peer_deadline_s = 3600.0;
        assert_eq!(idle_timeout(&w), Duration::from_secs(30));
    }
}
