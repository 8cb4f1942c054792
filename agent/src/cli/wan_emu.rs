//! `weightgrad wan-emu`: an emulated WAN link between a client and an upstream endpoint,
//! on loopback or anywhere, without root: UDP datagrams (the agents' QUIC), or TCP
//! connections with `--tcp`.

use crate::wan::relay::{RelayConfig, start};
use crate::wan::shaper::Shaping;
use crate::wan::tcp_relay::TcpRelayConfig;
use anyhow::{Context, Result};
use clap::Args;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Options of `weightgrad wan-emu`.
#[derive(Debug, Args)]
pub struct WanEmuArgs {
    /// Address clients send to (UDP), or connect to with --tcp.
    #[arg(long)]
    listen: SocketAddr,
    /// Relay TCP connections instead of UDP datagrams (bandwidth, delay, jitter and queue
    /// applied to each direction's byte stream, shared by every connection; no loss).
    #[arg(long)]
    tcp: bool,
    /// Where datagrams are relayed to: `host:port` (a name is resolved once at start,
    /// retried for up to 30 s while it does not resolve yet, as when the upstream's
    /// container is still starting).
    #[arg(long)]
    upstream: String,
    /// Bandwidth each way, Mbit/s.
    #[arg(long, default_value_t = 50.0)]
    mbps: f64,
    /// One-way delay, milliseconds (the round trip is twice this).
    #[arg(long, default_value_t = 40.0)]
    delay_ms: f64,
    /// Uniform jitter on the delay, ± milliseconds.
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// Probability a datagram is lost, each way (UDP only).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Queue per direction, bytes (default: one bandwidth-delay product, at least 64 KiB).
    #[arg(long)]
    queue_bytes: Option<usize>,
    /// Bandwidth upstream-to-client, if different, Mbit/s.
    #[arg(long)]
    down_mbps: Option<f64>,
    /// Seed for loss and jitter.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// With --tcp: write JSON lines to stdout for a program driving the relay: the address
    /// it listens on once it does, its byte counters every this many milliseconds (each
    /// stamped with the system clock), and the counters at exit.
    #[arg(long, requires = "tcp", value_name = "MS")]
    json_every_ms: Option<u64>,
}

fn shaping(mbps: f64, a: &WanEmuArgs) -> Shaping {
    let mut s = Shaping::new(mbps, a.delay_ms);
    s.jitter_s = a.jitter_ms / 1e3;
    s.loss = a.loss;
    if let Some(q) = a.queue_bytes {
        s.queue_bytes = q;
    }
    s
}

/// Runs the relay until Ctrl-C or SIGTERM, then prints what it did.
pub fn run(args: WanEmuArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let upstream = rt.block_on(resolve(&args.upstream, Duration::from_secs(30)))?;
    if args.tcp {
        return rt.block_on(run_tcp(&args, upstream));
    }
    let cfg = RelayConfig {
        listen: args.listen,
        upstream,
        up: shaping(args.mbps, &args),
        down: shaping(args.down_mbps.unwrap_or(args.mbps), &args),
        seed: args.seed,
    };
    rt.block_on(async {
        let relay = start(cfg).await?;
        eprintln!(
            "relaying {} -> {} ({}) at {} Mbit/s, {} ms one way (±{} ms), loss {}",
            relay.local_addr(),
            args.upstream,
            cfg.upstream,
            args.mbps,
            args.delay_ms,
            args.jitter_ms,
            args.loss
        );
        wait_for_shutdown().await?;
        eprintln!("client -> upstream: {}", relay.stats().up.summary());
        eprintln!("upstream -> client: {}", relay.stats().down.summary());
        Ok(())
    })
}

/// Runs the TCP relay until Ctrl-C or SIGTERM, then prints what it did.
async fn run_tcp(args: &WanEmuArgs, upstream: SocketAddr) -> Result<()> {
    let relay = crate::wan::tcp_relay::start(TcpRelayConfig {
        listen: args.listen,
        upstream,
        up: shaping(args.mbps, args),
        down: shaping(args.down_mbps.unwrap_or(args.mbps), args),
        seed: args.seed,
    })
    .await?;
    eprintln!(
        "relaying TCP {} -> {} ({upstream}) at {} Mbit/s, {} ms one way (±{} ms)",
        relay.local_addr(),
        args.upstream,
        args.mbps,
        args.delay_ms,
        args.jitter_ms,
    );
    let Some(every_ms) = args.json_every_ms else {
        wait_for_shutdown().await?;
        eprintln!("{}", relay.stats().summary());
        return Ok(());
    };
    print_json(&serde_json::json!({ "listening": relay.local_addr().to_string() }));
    let mut tick = tokio::time::interval(Duration::from_millis(every_ms.max(1)));
    let shutdown = wait_for_shutdown();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            r = &mut shutdown => {
                r?;
                break;
            }
            _ = tick.tick() => print_json(&counters(relay.stats(), false)),
        }
    }
    print_json(&counters(relay.stats(), true));
    eprintln!("{}", relay.stats().summary());
    Ok(())
}

/// One JSON line to stdout, flushed at once so that a reader sees it now.
fn print_json(v: &serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // A reader that has gone away is not the relay's failure.
    let _ = writeln!(out, "{v}").and_then(|()| out.flush());
}

/// The TCP relay's counters as JSON, stamped with the system clock (seconds since the
/// Unix epoch) so that a reader can line them up with its own events.
fn counters(stats: &crate::wan::tcp_relay::TcpRelayStats, last: bool) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    serde_json::json!({
        "unix_s": unix_s,
        "up_bytes": stats.up_bytes.load(Relaxed),
        "down_bytes": stats.down_bytes.load(Relaxed),
        "connections": stats.connections.load(Relaxed),
        "queue_waits": stats.queue_waits.load(Relaxed),
        "last": last,
    })
}

/// Waits for Ctrl-C or SIGTERM.
async fn wait_for_shutdown() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// Resolves `host:port` to its first address, retrying once a second until `patience` runs
/// out: a name that does not resolve yet may belong to a host that is still starting.
async fn resolve(upstream: &str, patience: Duration) -> Result<SocketAddr> {
    let deadline = Instant::now() + patience;
    loop {
        let error = match tokio::net::lookup_host(upstream).await {
            Ok(mut addrs) => match addrs.next() {
                Some(addr) => return Ok(addr),
                None => anyhow::anyhow!("no address"),
            },
            Err(e) => e.into(),
        };
        if Instant::now() >= deadline {
            return Err(error.context(format!(
                "--upstream {upstream}: cannot resolve it (expected host:port)"
            )));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn upstream_names_and_addresses_resolve_and_bad_ones_are_named() {
        let addr = resolve("127.0.0.1:4433", Duration::ZERO).await.unwrap();
        assert_eq!(addr, "127.0.0.1:4433".parse::<SocketAddr>().unwrap());
        let local = resolve("localhost:4433", Duration::ZERO).await.unwrap();
        assert!(local.ip().is_loopback() && local.port() == 4433, "{local}");
        let e = resolve("no-port", Duration::ZERO).await.unwrap_err();
        assert!(format!("{e:#}").contains("--upstream no-port"), "{e:#}");
    }
}
