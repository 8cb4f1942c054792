//! Building the QUIC endpoints: mutual TLS, flow-control windows and send buffers sized
//! from the configured bandwidth × RTT (s2n-quic's defaults suit only about 150 Mbit/s at
//! 100 ms), UDP socket buffers that ride out a busy host, keep-alive, the congestion
//! controller and its initial window, and the telemetry subscriber.

use super::{telemetry::LinkTelemetry, tls};
use crate::config::{Congestion, InitialWindow, WanConfig};
use anyhow::{Context, Result};
use s2n_quic::provider::congestion_controller::{bbr, cubic};
use s2n_quic::provider::io::tokio::{Builder as IoBuilder, Provider as Io};
use s2n_quic::provider::limits::Limits;
use s2n_quic::{Client, Server};
use std::net::SocketAddr;
use std::sync::Once;
use std::time::Duration;

/// Smallest window used whatever the configuration says.
const MIN_WINDOW: u64 = 1 << 20;
/// Smallest UDP socket buffer asked for (the kernel's usual default is 208 KiB).
const MIN_SOCKET_BUFFER: usize = 4 << 20;
/// Largest UDP socket buffer asked for.
const MAX_SOCKET_BUFFER: usize = 32 << 20;
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

/// UDP socket buffer (receive and send) to ask the kernel for, in bytes: one
/// bandwidth-delay product, at least 4 MiB and at most 32 MiB. The receive buffer holds what
/// arrives while the endpoint's task waits for a core; with the kernel's 208 KiB default a
/// 100 Mbit/s link overflows it in about 15 ms, and every datagram it drops is a loss that
/// halves a congestion window which takes seconds to regrow at WAN round-trip times.
pub fn socket_buffer_bytes(wan: &WanConfig) -> usize {
    usize::try_from(wan.bandwidth_delay_bytes())
        .unwrap_or(usize::MAX)
        .clamp(MIN_SOCKET_BUFFER, MAX_SOCKET_BUFFER)
}

/// The receive buffer the kernel grants a UDP socket that asks for `bytes`, as
/// `SO_RCVBUF` reads back (Linux doubles the request for its bookkeeping and caps it at
/// `net.core.rmem_max`); `None` where it cannot be read.
pub fn granted_recv_buffer(bytes: usize) -> Option<usize> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
    let socket = socket2::SockRef::from(&socket);
    socket.set_recv_buffer_size(bytes).ok()?;
    socket.recv_buffer_size().ok()
}

/// Warns once per process when the kernel grants less receive buffer than asked for.
fn warn_if_buffer_capped(asked: usize) {
    static WARNED: Once = Once::new();
    WARNED.call_once(|| {
        if let Some(granted) = granted_recv_buffer(asked) {
            // Linux books (and reports) twice the request, for its own overhead, so a
            // granted figure below the request itself means the cap cut it.
            if granted < asked {
                tracing::warn!(
                    asked,
                    granted,
                    "the kernel caps UDP receive buffers below the link's bandwidth-delay \
                     product; bursts may be dropped under load (raise net.core.rmem_max and \
                     net.core.wmem_max to at least {asked})"
                );
            }
        }
    });
}

/// The UDP IO for an endpoint bound to `addr`, with socket buffers for `wan`.
fn io(wan: &WanConfig, addr: SocketAddr) -> Result<Io> {
    let buffer = socket_buffer_bytes(wan);
    warn_if_buffer_capped(buffer);
    Ok(IoBuilder::default()
        .with_receive_address(addr)?
        .with_recv_buffer_size(buffer)?
        .with_send_buffer_size(buffer)?
        .build()?)
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

/// RFC 9002's recommended initial window at its largest (ten datagrams, capped at
/// 14,720 bytes): the floor of a link's initial window.
const STANDARD_INITIAL_WINDOW: u64 = 14_720;

/// The congestion window each connection starts with, in bytes, under `[wan]
/// initial_window`: one bandwidth-delay product of the configured link (at least the
/// standard window), or `None` for the controller's standard ten datagrams.
pub fn initial_window_bytes(wan: &WanConfig) -> Option<u32> {
    match wan.initial_window {
        InitialWindow::Standard => None,
        InitialWindow::Link => Some(
            u32::try_from(wan.bandwidth_delay_bytes().max(STANDARD_INITIAL_WINDOW))
                .unwrap_or(u32::MAX),
        ),
    }
}

macro_rules! start_with_congestion {
    ($builder:expr, $wan:expr) => {{
        let initial = initial_window_bytes($wan);
        match $wan.congestion {
            Congestion::Cubic => {
                let mut cc = cubic::Builder::default();
                if let Some(w) = initial {
                    cc = cc.with_initial_congestion_window(w);
                }
                $builder.with_congestion_controller(cc.build())?.start()?
            }
            Congestion::Bbr => {
                let mut cc = bbr::Builder::default();
                if let Some(w) = initial {
                    cc = cc.with_initial_congestion_window(w);
                }
                $builder.with_congestion_controller(cc.build())?.start()?
            }
        }
    }};
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
            .with_io(io(wan, listen)?)?
            .with_limits(limits(wan)?)?
            .with_event(telemetry.clone())?;
        Ok(start_with_congestion!(builder, wan))
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
            .with_io(io(wan, bind)?)?
            .with_limits(limits(wan)?)?
            .with_event(telemetry.clone())?;
        Ok(start_with_congestion!(builder, wan))
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
            initial_window: InitialWindow::Link,
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

    #[test]
    fn the_initial_window_is_one_bandwidth_delay_product_or_the_standard_one() {
        // 36.4 Mbit/s at 230 ms: 1,046,500 bytes.
        assert_eq!(initial_window_bytes(&wan(36.4, 230.0)), Some(1_046_500));
        // A link thinner than ten datagrams' worth still starts with them.
        assert_eq!(
            initial_window_bytes(&wan(0.1, 1.0)),
            Some(STANDARD_INITIAL_WINDOW as u32)
        );
        // Absurd settings stop where the controller's u32 does.
        assert_eq!(initial_window_bytes(&wan(1e9, 1e6)), Some(u32::MAX));
        let standard = WanConfig {
            initial_window: InitialWindow::Standard,
            ..wan(36.4, 230.0)
        };
        assert_eq!(initial_window_bytes(&standard), None);
    }

    #[test]
    fn socket_buffers_cover_the_bandwidth_delay_product_within_bounds() {
        // 100 Mbit/s at 230 ms: 2.9 MB in flight, below the 4 MiB floor.
        assert_eq!(socket_buffer_bytes(&wan(100.0, 230.0)), MIN_SOCKET_BUFFER);
        // 1 Gbit/s at 200 ms: 25 MB.
        assert_eq!(socket_buffer_bytes(&wan(1000.0, 200.0)), 25_000_000);
        // Absurd settings stop at the ceiling.
        assert_eq!(socket_buffer_bytes(&wan(1e9, 1e6)), MAX_SOCKET_BUFFER);
        // The kernel grants something, however it caps it.
        assert!(granted_recv_buffer(MIN_SOCKET_BUFFER).is_some_and(|b| b > 0));
    }
}
