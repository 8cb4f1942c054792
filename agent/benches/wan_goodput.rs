//! Goodput of one large transfer over the agent's QUIC endpoints (mutual TLS, windows
//! sized from bandwidth × RTT): through the WAN emulator as a fraction of the emulated
//! bandwidth, for CUBIC and BBR; and unshaped on loopback against a plain TCP transfer of
//! the same size measured in the same run.
//!
//! Run: `cargo bench -p weightgrad --bench wan_goodput`
//! (`WG_BENCH_MB` sets the shaped transfer size in MiB, default 64; `WG_BENCH_MBPS` and
//! `WG_BENCH_RTT_MS` the emulated link, default 50 Mbit/s at 80 ms.)

use bytes::Bytes;
use s2n_quic::client::Connect;
use std::net::SocketAddr;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weightgrad::config::{Congestion, InitialWindow, TlsConfig, WanConfig};
use weightgrad::wan::relay::{self, RelayConfig};
use weightgrad::wan::shaper::Shaping;
use weightgrad::wan::telemetry::LinkTelemetry;
use weightgrad::wan::{certs, endpoint, tls::TlsIdentity};

const CHUNK: usize = 1 << 20;

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn identity(dir: &std::path::Path, region: &str) -> TlsIdentity {
    TlsIdentity::load(&TlsConfig {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{region}.pem")),
        key: dir.join(format!("{region}.key")),
    })
    .expect("identity")
}

/// Sends `bytes` on one stream from a client to a server, through an emulated link when
/// `shaping` is given; returns seconds from the first byte sent to the receiver having read
/// the last.
async fn quic_transfer(
    wan: &WanConfig,
    dir: &std::path::Path,
    bytes: usize,
    shaping: Option<Shaping>,
) -> f64 {
    let mut server = endpoint::server(
        wan,
        "127.0.0.1:0".parse().unwrap(),
        &identity(dir, "us-east"),
        &["eu-west".into()],
        LinkTelemetry::default(),
    )
    .expect("server");
    let upstream: SocketAddr = server.local_addr().unwrap();
    let relay = match shaping {
        Some(shaping) => Some(
            relay::start(RelayConfig::both_ways(
                "127.0.0.1:0".parse().unwrap(),
                upstream,
                shaping,
                1,
            ))
            .await
            .expect("relay"),
        ),
        None => None,
    };
    let addr = relay.as_ref().map_or(upstream, |r| r.local_addr());
    let client = endpoint::client(
        wan,
        &identity(dir, "eu-west"),
        "127.0.0.1:0".parse().unwrap(),
        LinkTelemetry::default(),
    )
    .expect("client");
    let receiver = tokio::spawn(async move {
        let mut conn = server.accept().await.expect("connection");
        let mut s = conn.accept_receive_stream().await.unwrap().unwrap();
        let mut got = 0usize;
        while let Some(chunk) = s.receive().await.unwrap() {
            got += chunk.len();
        }
        (got, Instant::now(), conn, server)
    });
    let mut conn = client
        .connect(Connect::new(addr).with_server_name("us-east"))
        .await
        .expect("connect");
    let mut s = conn.open_send_stream().await.unwrap();
    let chunk = Bytes::from(vec![7u8; CHUNK]);
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        s.send(chunk.clone()).await.unwrap();
        sent += CHUNK;
    }
    s.finish().unwrap();
    let (got, end, _conn, _server) = receiver.await.unwrap();
    assert_eq!(got, sent);
    s.close().await.ok();
    if let Some(r) = &relay {
        eprintln!("relay, client to server: {}", r.stats().up.summary());
    }
    (end - start).as_secs_f64()
}

async fn tcp_transfer(bytes: usize) -> f64 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0;
        loop {
            let n = sock.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        (got, Instant::now())
    });
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let chunk = vec![7u8; CHUNK];
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        sock.write_all(&chunk).await.unwrap();
        sent += CHUNK;
    }
    sock.shutdown().await.unwrap();
    let (got, end) = receiver.await.unwrap();
    assert_eq!(got, sent);
    (end - start).as_secs_f64()
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too: keep that short.
    let quick = !std::env::args().any(|a| a == "--bench");
    let dir = tempfile::tempdir().unwrap();
    certs::init(&["us-east".into(), "eu-west".into()], dir.path(), false).unwrap();
    let mbps = env_f64("WG_BENCH_MBPS", 50.0);
    let rtt_ms = env_f64("WG_BENCH_RTT_MS", 80.0);
    let shaped_mb = if quick {
        2.0
    } else {
        env_f64("WG_BENCH_MB", 64.0)
    };
    let loopback_mb = if quick { 8.0 } else { 512.0 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "emulated link: {mbps} Mbit/s, RTT {rtt_ms} ms (queue one bandwidth-delay product); \
         shaped transfer {shaped_mb} MiB, loopback {loopback_mb} MiB"
    );
    println!("| path | congestion | goodput (Mbit/s) | baseline | ratio |");
    println!("|---|---|---:|---|---:|");
    for congestion in [Congestion::Cubic, Congestion::Bbr] {
        let wan = WanConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            bandwidth_mbps: mbps,
            rtt_ms,
            peer_deadline_s: 30.0,
            congestion,
            initial_window: InitialWindow::default(),
        };
        let bytes = (shaped_mb * CHUNK as f64) as usize;
        let shaping = Shaping::new(mbps, rtt_ms / 2.0);
        let secs = rt.block_on(quic_transfer(&wan, dir.path(), bytes, Some(shaping)));
        let goodput = bytes as f64 * 8.0 / secs / 1e6;
        println!(
            "| emulated WAN | {congestion:?} | {goodput:.1} | emulated {mbps} Mbit/s | {:.3} |",
            goodput / mbps
        );
    }
    let wan = WanConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        bandwidth_mbps: 1000.0,
        rtt_ms: 1.0,
        peer_deadline_s: 30.0,
        congestion: Congestion::Cubic,
        initial_window: InitialWindow::default(),
    };
    let bytes = (loopback_mb * CHUNK as f64) as usize;
    let (quic, tcp) = rt.block_on(async {
        let quic = quic_transfer(&wan, dir.path(), bytes, None).await;
        let tcp = tcp_transfer(bytes).await;
        (quic, tcp)
    });
    let q = bytes as f64 * 8.0 / quic / 1e6;
    let t = bytes as f64 * 8.0 / tcp / 1e6;
    println!(
        "| loopback, unshaped | Cubic | {q:.0} | TCP loopback {t:.0} Mbit/s | {:.3} |",
        q / t
    );
}
