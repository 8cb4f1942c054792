//! The WAN emulator's TCP mode (`weightgrad wan-emu --tcp`): a user-space TCP relay that
//! puts the same emulated link as the UDP relay ([`Shaper`]) between TCP clients and an
//! upstream — bandwidth, delay, jitter and a bounded queue per direction, each direction
//! shared by every connection — so TCP peers (a PyTorch process group over gloo, say) cross
//! the same links as the agents' QUIC.
//!
//! The relay ends each TCP connection on both of its sides and applies the link to the
//! byte stream: every chunk it reads waits for room in its direction's queue (the sender
//! slows down, as flow control would slow it), is serialized at the bandwidth and written
//! out after the delay (± jitter, order kept). A stream cannot lose bytes, so there is no
//! random loss in this mode, and the connections' congestion control runs over loopback:
//! what crosses is an ideal TCP on that link, with no slow start and no loss recovery.

use super::shaper::{Fate, Shaper, Shaping};
use anyhow::{Context, Result, anyhow, bail};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Largest chunk read from a connection at a time (smaller when the queue is smaller).
const CHUNK_BYTES: usize = 16 << 10;

/// What to relay and how.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TcpRelayConfig {
    /// Where clients connect.
    pub listen: SocketAddr,
    /// Where the relay connects for each client.
    pub upstream: SocketAddr,
    /// Client → upstream.
    pub up: Shaping,
    /// Upstream → client.
    pub down: Shaping,
    /// Seed for jitter.
    pub seed: u64,
}

/// What the relay did.
#[derive(Debug, Default)]
pub struct TcpRelayStats {
    /// Client connections accepted.
    pub connections: AtomicU64,
    /// Client connections the upstream refused (closed at once).
    pub upstream_refused: AtomicU64,
    /// Bytes delivered client → upstream.
    pub up_bytes: AtomicU64,
    /// Bytes delivered upstream → client.
    pub down_bytes: AtomicU64,
    /// Chunks that waited for room in a full queue (either direction).
    pub queue_waits: AtomicU64,
}

impl TcpRelayStats {
    /// The counters as one line.
    pub fn summary(&self) -> String {
        format!(
            "{} connections ({} refused by the upstream), {} bytes client -> upstream, {} bytes \
             upstream -> client, {} chunks waited for room in a full queue",
            self.connections.load(Relaxed),
            self.upstream_refused.load(Relaxed),
            self.up_bytes.load(Relaxed),
            self.down_bytes.load(Relaxed),
            self.queue_waits.load(Relaxed)
        )
    }
}

/// A running TCP relay; dropping it stops it and closes every connection.
pub struct TcpRelay {
    local: SocketAddr,
    stats: Arc<TcpRelayStats>,
    task: JoinHandle<()>,
}

impl TcpRelay {
    /// The address clients connect to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Live counters.
    pub fn stats(&self) -> &TcpRelayStats {
        &self.stats
    }

    /// Stops accepting, closes every connection, and waits until the listener is closed.
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The relay's clock: seconds since it started, for the shapers.
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }

    fn at(&self, t: f64) -> Instant {
        self.0 + Duration::from_secs_f64(t.max(0.0))
    }
}

/// One direction's link, shared by every connection.
#[derive(Clone)]
struct Direction {
    shaper: Arc<Mutex<Shaper>>,
    delivered: Arc<TcpRelayStats>,
    up: bool,
}

impl Direction {
    fn count(&self, bytes: usize) {
        let counter = if self.up {
            &self.delivered.up_bytes
        } else {
            &self.delivered.down_bytes
        };
        counter.fetch_add(bytes as u64, Relaxed);
    }
}

/// Binds the relay and starts it on the current tokio runtime.
pub async fn start(cfg: TcpRelayConfig) -> Result<TcpRelay> {
    for (name, shaping) in [
        ("client-to-upstream", cfg.up),
        ("upstream-to-client", cfg.down),
    ] {
        shaping
            .validate()
            .map_err(|e| anyhow!("{name} link: {e}"))?;
        if shaping.loss > 0.0 {
            bail!(
                "{name} link: loss {} applies to datagrams; a TCP stream cannot lose bytes \
                 (TCP mode emulates bandwidth, delay, jitter and the queue)",
                shaping.loss
            );
        }
        if shaping.queue_bytes == 0 {
            bail!("{name} link: a queue of 0 bytes can never admit a byte");
        }
    }
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding the TCP relay to {}", cfg.listen))?;
    let local = listener.local_addr()?;
    let stats = Arc::new(TcpRelayStats::default());
    let clock = Clock(Instant::now());
    let up = Direction {
        shaper: Arc::new(Mutex::new(Shaper::new(cfg.up, cfg.seed))),
        delivered: stats.clone(),
        up: true,
    };
    let down = Direction {
        shaper: Arc::new(Mutex::new(Shaper::new(cfg.down, cfg.seed ^ 0x9e37_79b9))),
        delivered: stats.clone(),
        up: false,
    };
    let accept_stats = stats.clone();
    let task = tokio::spawn(async move {
        // Dropping the set (when this task is aborted) aborts every connection.
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((client, _)) = accepted else { continue };
                    accept_stats.connections.fetch_add(1, Relaxed);
                    connections.spawn(relay_connection(
                        client,
                        cfg.upstream,
                        (up.clone(), down.clone()),
                        clock,
                        accept_stats.clone(),
                    ));
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    });
    Ok(TcpRelay { local, stats, task })
}

/// Connects `client` to the upstream and pumps both directions through their links until
/// both sides have closed.
async fn relay_connection(
    client: TcpStream,
    upstream: SocketAddr,
    (up, down): (Direction, Direction),
    clock: Clock,
    stats: Arc<TcpRelayStats>,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        // The client sees its connection closed, as a refused one would be.
        stats.upstream_refused.fetch_add(1, Relaxed);
        return;
    };
    // Small writes (a collective's handshakes) must not wait for Nagle: the link's delay is
    // the emulated one.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pump(client_read, server_write, up, clock, stats.clone()),
        pump(server_read, client_write, down, clock, stats),
    );
}

/// Moves one direction's bytes: each chunk read waits for room in the link's queue, is
/// scheduled by the shaper, and is written at its delivery time; the end of the stream is
/// passed on after the last chunk.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    link: Direction,
    clock: Clock,
    stats: Arc<TcpRelayStats>,
) {
    let queue = link
        .shaper
        .lock()
        .expect("shaper lock")
        .shaping()
        .queue_bytes;
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                // The far side is gone; the reader stops at its next send.
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; CHUNK_BYTES.min(queue)];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let delivery = loop {
                let now = clock.now();
                let room = {
                    let mut shaper = link.shaper.lock().expect("shaper lock");
                    let room = shaper.room_at(now, n);
                    if room <= now {
                        match shaper.admit(now, n) {
                            Fate::Deliver(at) => break at,
                            // Rounding at the queue's edge: try again a moment later.
                            Fate::QueueFull | Fate::Lost => now + 1e-4,
                        }
                    } else {
                        room
                    }
                };
                stats.queue_waits.fetch_add(1, Relaxed);
                tokio::time::sleep_until(clock.at(room)).await;
            };
            link.count(n);
            if tx.send((clock.at(delivery), buf[..n].to_vec())).is_err() {
                break;
            }
        }
        // Dropping the sender lets the writer deliver what is scheduled, then close.
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant as StdInstant;

    /// An echo server on loopback that closes after echoing a stream to its end.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }

    async fn relay(mbps: f64, delay_ms: f64) -> TcpRelay {
        let link = Shaping::new(mbps, delay_ms);
        start(TcpRelayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            upstream: echo().await,
            up: link,
            down: link,
            seed: 0,
        })
        .await
        .unwrap()
    }

    /// Sends `bytes` through the relay to the echo server and reads them back to the end.
    async fn round_trip(relay: SocketAddr, bytes: Vec<u8>) -> Vec<u8> {
        let stream = TcpStream::connect(relay).await.unwrap();
        let (mut r, mut w) = stream.into_split();
        let send = tokio::spawn(async move {
            w.write_all(&bytes).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        send.await.unwrap();
        back
    }

    #[tokio::test]
    async fn a_stream_crosses_intact_and_no_sooner_than_the_link_allows() {
        // 8 Mbit/s (1 MB/s), 20 ms one way.
        let relay = relay(8.0, 20.0).await;
        let started = StdInstant::now();
        assert_eq!(
            round_trip(relay.local_addr(), b"ping".to_vec()).await,
            b"ping"
        );
        assert!(started.elapsed() >= Duration::from_millis(40));
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let started = StdInstant::now();
        let back = round_trip(relay.local_addr(), payload.clone()).await;
        assert!(back == payload, "the stream came back altered");
        // 300 kB each way at 1 MB/s, the directions overlapping: at least 0.3 s + 40 ms.
        assert!(
            started.elapsed() >= Duration::from_millis(340),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(relay.stats().up_bytes.load(Relaxed), 300_004);
        assert_eq!(relay.stats().down_bytes.load(Relaxed), 300_004);
        assert_eq!(relay.stats().connections.load(Relaxed), 2);
    }

    #[tokio::test]
    async fn connections_share_the_links_bandwidth() {
        let relay = relay(8.0, 5.0).await;
        let addr = relay.local_addr();
        let started = StdInstant::now();
        let (a, b) = tokio::join!(
            round_trip(addr, vec![1u8; 200_000]),
            round_trip(addr, vec![2u8; 200_000])
        );
        assert!(a.iter().all(|&x| x == 1) && a.len() == 200_000);
        assert!(b.iter().all(|&x| x == 2) && b.len() == 200_000);
        // 400 kB over one 1 MB/s link each way.
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "{:?}",
            started.elapsed()
        );
        assert!(relay.stats().queue_waits.load(Relaxed) > 0);
    }

    #[tokio::test]
    async fn loss_and_an_empty_queue_are_refused_and_a_closed_upstream_closes_the_client() {
        let mut lossy = Shaping::new(10.0, 10.0);
        lossy.loss = 0.01;
        let cfg = TcpRelayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            upstream: "127.0.0.1:9".parse().unwrap(),
            up: lossy,
            down: Shaping::new(10.0, 10.0),
            seed: 0,
        };
        let e = start(cfg).await.err().unwrap().to_string();
        assert!(e.contains("client-to-upstream link: loss 0.01"), "{e}");
        let mut empty = Shaping::new(10.0, 10.0);
        empty.queue_bytes = 0;
        let e = start(TcpRelayConfig {
            up: Shaping::new(10.0, 10.0),
            down: empty,
            ..cfg
        })
        .await
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("upstream-to-client link: a queue of 0 bytes"),
            "{e}"
        );
        // Nothing listens upstream: the client's connection is closed, and counted.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let nowhere = closed.local_addr().unwrap();
        drop(closed);
        let relay = start(TcpRelayConfig {
            upstream: nowhere,
            up: Shaping::new(10.0, 1.0),
            down: Shaping::new(10.0, 1.0),
            ..cfg
        })
        .await
        .unwrap();
        let mut s = TcpStream::connect(relay.local_addr()).await.unwrap();
        let mut buf = Vec::new();
        let n = s.read_to_end(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0);
        assert_eq!(relay.stats().upstream_refused.load(Relaxed), 1);
        let addr = relay.local_addr();
        relay.stop().await;
        assert!(
            TcpListener::bind(addr).await.is_ok(),
            "the port is free again"
        );
    }
}
