//! The WAN emulator (`weightgrad wan-emu`): a user-space UDP relay that puts an emulated
//! link between a client and an upstream endpoint — bandwidth, delay, jitter, loss and a
//! bounded queue per direction ([`Shaper`]) — so real QUIC between agents runs over WAN-like
//! links on loopback, without root or netem.
//!
//! Datagrams from each client address are forwarded from a socket of their own, so the
//! upstream sees one peer per client and its replies find their way back. Both directions
//! share one shaper each: the link, not the flow, has the bandwidth.

use super::shaper::{Fate, Shaper, Shaping};
use anyhow::{Context, Result, anyhow};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// UDP buffer (each way) the relay asks for on each of its sockets: it holds what arrives
/// while the relay's task waits for a core, so that only the emulated queue drops datagrams;
/// the kernel caps it at `net.core.rmem_max` / `wmem_max`.
pub const SOCKET_BUFFER_BYTES: usize = 16 << 20;

/// Asks for [`SOCKET_BUFFER_BYTES`] on `socket`, both ways (a refusal leaves the default).
fn enlarge_buffers(socket: &UdpSocket) {
    let socket = socket2::SockRef::from(socket);
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
}

/// What to relay and how.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelayConfig {
    /// Where clients send.
    pub listen: SocketAddr,
    /// Where the relay forwards to.
    pub upstream: SocketAddr,
    /// Client → upstream.
    pub up: Shaping,
    /// Upstream → client.
    pub down: Shaping,
    /// Seed for loss and jitter.
    pub seed: u64,
}

impl RelayConfig {
    /// The same link both ways.
    pub fn both_ways(listen: SocketAddr, upstream: SocketAddr, link: Shaping, seed: u64) -> Self {
        Self {
            listen,
            upstream,
            up: link,
            down: link,
            seed,
        }
    }
}

/// Counters of one direction.
#[derive(Debug, Default)]
pub struct DirectionStats {
    /// Datagrams delivered.
    pub delivered: AtomicU64,
    /// Bytes delivered.
    pub delivered_bytes: AtomicU64,
    /// Datagrams lost at random.
    pub lost: AtomicU64,
    /// Datagrams dropped on a full queue.
    pub queue_drops: AtomicU64,
    /// Congestion episodes among those drops: a drop more than one round trip of the link
    /// after the drop that began the current episode begins a new one. A sender cuts its
    /// congestion window once per round trip of losses, and a stream in flight then waits
    /// about one round trip for what was resent, however many of its datagrams the episode
    /// dropped: a full queue drops datagrams in runs, so drops over datagrams overstates
    /// how often a stream was held up.
    pub queue_drop_episodes: AtomicU64,
    /// When the current episode began, microseconds on the relay's clock, plus one (0:
    /// no drop yet).
    episode_began: AtomicU64,
}

impl DirectionStats {
    /// Counts `fate` of a datagram of `len` bytes at `now_s` on the relay's clock, on a
    /// link whose round trip is `round_trip_s`.
    fn count(&self, fate: Fate, len: usize, now_s: f64, round_trip_s: f64) {
        match fate {
            Fate::Deliver(_) => {
                self.delivered.fetch_add(1, Relaxed);
                self.delivered_bytes.fetch_add(len as u64, Relaxed);
            }
            Fate::Lost => {
                self.lost.fetch_add(1, Relaxed);
            }
            Fate::QueueFull => {
                self.queue_drops.fetch_add(1, Relaxed);
                let now_us = (now_s * 1e6) as u64;
                let began = self.episode_began.load(Relaxed).checked_sub(1);
                if begins_episode(began, now_us, (round_trip_s * 1e6) as u64) {
                    self.episode_began.store(now_us + 1, Relaxed);
                    self.queue_drop_episodes.fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// `delivered / lost / queue drops` as one line.
    pub fn summary(&self) -> String {
        format!(
            "{} datagrams ({} bytes) delivered, {} lost, {} dropped on a full queue in {} episodes",
            self.delivered.load(Relaxed),
            self.delivered_bytes.load(Relaxed),
            self.lost.load(Relaxed),
            self.queue_drops.load(Relaxed),
            self.queue_drop_episodes.load(Relaxed)
        )
    }
}

/// Whether a queue drop at `now` (microseconds) begins a new congestion episode, the
/// current one having begun at `began`: the first drop does, and so does one more than a
/// round trip (`round_trip`, microseconds) after the current episode began.
fn begins_episode(began: Option<u64>, now: u64, round_trip: u64) -> bool {
    began.is_none_or(|b| now.saturating_sub(b) > round_trip)
}

/// Both directions' counters.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Client → upstream.
    pub up: DirectionStats,
    /// Upstream → client.
    pub down: DirectionStats,
}

/// A running relay; dropping it stops it.
pub struct Relay {
    local: SocketAddr,
    stats: Arc<RelayStats>,
    /// Tells the forwarder to stop its readers, wait for them, and return.
    shutdown: Option<oneshot::Sender<()>>,
    /// The forwarder: owns the listening socket (through its readers too).
    forwarder: Option<JoinHandle<()>>,
    /// The two delivery tasks; their queues hold sockets as well.
    deliverers: Vec<JoinHandle<()>>,
}

impl Relay {
    /// The address clients send to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Live counters.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Stops the relay and waits until every task holding one of its sockets has ended
    /// (dropping it only asks them to stop), so its address can be bound again at once.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(forwarder) = self.forwarder.take() {
            let _ = forwarder.await;
        }
        let deliverers = std::mem::take(&mut self.deliverers);
        for t in &deliverers {
            t.abort();
        }
        for t in deliverers {
            let _ = t.await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in self.forwarder.iter().chain(&self.deliverers) {
            t.abort();
        }
    }
}

/// A datagram waiting for its delivery time.
struct Pending {
    at: Instant,
    bytes: Vec<u8>,
    socket: Arc<UdpSocket>,
    to: SocketAddr,
}

/// Sends each datagram at its time; times are non-decreasing per direction.
async fn deliver(mut queue: mpsc::UnboundedReceiver<Pending>) {
    while let Some(p) = queue.recv().await {
        tokio::time::sleep_until(p.at).await;
        // A send error (peer gone) is the emulated network losing the datagram.
        let _ = p.socket.send_to(&p.bytes, p.to).await;
    }
}

/// Binds the relay and starts it on the current tokio runtime.
pub async fn start(cfg: RelayConfig) -> Result<Relay> {
    cfg.up
        .validate()
        .map_err(|e| anyhow!("client-to-upstream link: {e}"))?;
    cfg.down
        .validate()
        .map_err(|e| anyhow!("upstream-to-client link: {e}"))?;
    let listen = Arc::new(
        UdpSocket::bind(cfg.listen)
            .await
            .with_context(|| format!("binding the relay to {}", cfg.listen))?,
    );
    enlarge_buffers(&listen);
    let local = listen.local_addr()?;
    let epoch = Instant::now();
    let stats = Arc::new(RelayStats::default());
    let up = Arc::new(Mutex::new(Shaper::new(cfg.up, cfg.seed)));
    let down = Arc::new(Mutex::new(Shaper::new(cfg.down, cfg.seed ^ 0x9e37_79b9)));
    let (up_tx, up_rx) = mpsc::unbounded_channel();
    let (down_tx, down_rx) = mpsc::unbounded_channel();
    let deliverers = vec![tokio::spawn(deliver(up_rx)), tokio::spawn(deliver(down_rx))];
    let (shutdown, mut shutdown_rx) = oneshot::channel::<()>();
    let at = move |t: f64| epoch + Duration::from_secs_f64(t);
    let now = move || epoch.elapsed().as_secs_f64();
    // The link's round trip, which groups queue drops into congestion episodes.
    let round_trip = cfg.up.delay_s + cfg.down.delay_s;
    let bind_for_upstream: SocketAddr = if cfg.upstream.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let forward_stats = stats.clone();
    let forwarder = tokio::spawn(async move {
        let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        // Each reader holds the listening socket. On shutdown they are aborted and awaited
        // before this task returns, so `Relay::stop` leaves nothing bound; dropping the
        // relay aborts this task, whose dropped set aborts them in turn.
        let mut readers = tokio::task::JoinSet::new();
        let mut buf = vec![0u8; 65_536];
        loop {
            let received = tokio::select! {
                biased;
                _ = &mut shutdown_rx => {
                    readers.shutdown().await;
                    return;
                }
                received = listen.recv_from(&mut buf) => received,
            };
            let Ok((n, from)) = received else {
                continue;
            };
            let socket = match clients.get(&from) {
                Some(s) => s.clone(),
                None => {
                    let Ok(s) = UdpSocket::bind(bind_for_upstream).await else {
                        continue;
                    };
                    enlarge_buffers(&s);
                    let s = Arc::new(s);
                    // Replies from upstream go back to this client through the down link.
                    let (s2, listen2, down2, tx2, stats2) = (
                        s.clone(),
                        listen.clone(),
                        down.clone(),
                        down_tx.clone(),
                        forward_stats.clone(),
                    );
                    readers.spawn(async move {
                        let mut buf = vec![0u8; 65_536];
                        loop {
                            let Ok((n, src)) = s2.recv_from(&mut buf).await else {
                                continue;
                            };
                            if src != cfg.upstream {
                                continue;
                            }
                            let t = now();
                            let fate = down2.lock().expect("shaper lock").admit(t, n);
                            stats2.down.count(fate, n, t, round_trip);
                            if let Fate::Deliver(t) = fate {
                                let _ = tx2.send(Pending {
                                    at: at(t),
                                    bytes: buf[..n].to_vec(),
                                    socket: listen2.clone(),
                                    to: from,
                                });
                            }
                        }
                    });
                    clients.insert(from, s.clone());
                    s
                }
            };
            let t = now();
            let fate = up.lock().expect("shaper lock").admit(t, n);
            forward_stats.up.count(fate, n, t, round_trip);
            if let Fate::Deliver(t) = fate {
                let _ = up_tx.send(Pending {
                    at: at(t),
                    bytes: buf[..n].to_vec(),
                    socket,
                    to: cfg.upstream,
                });
            }
        }
    });
    Ok(Relay {
        local,
        stats,
        shutdown: Some(shutdown),
        forwarder: Some(forwarder),
        deliverers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback; returns its address.
    async fn echo() -> (SocketAddr, JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        (addr, task)
    }

    #[test]
    fn queue_drops_within_a_round_trip_of_an_episodes_start_are_that_episode() {
        let d = DirectionStats::default();
        let rtt = 0.1;
        // A run of drops with deliveries between them: one congestion episode.
        for (t, fate) in [
            (1.00, Fate::QueueFull),
            (1.01, Fate::QueueFull),
            (1.02, Fate::Deliver(1.2)),
            (1.09, Fate::QueueFull),
        ] {
            d.count(fate, 1200, t, rtt);
        }
        assert_eq!(d.queue_drops.load(Relaxed), 3);
        assert_eq!(d.queue_drop_episodes.load(Relaxed), 1);
        // Drops that go on past a round trip from the episode's start are the next one,
        // and so is a drop long after.
        d.count(Fate::QueueFull, 1200, 1.15, rtt);
        d.count(Fate::QueueFull, 1200, 1.20, rtt);
        d.count(Fate::QueueFull, 1200, 5.0, rtt);
        assert_eq!(d.queue_drops.load(Relaxed), 6);
        assert_eq!(d.queue_drop_episodes.load(Relaxed), 3);
        // A random loss is no queue drop.
        d.count(Fate::Lost, 1200, 9.0, rtt);
        assert_eq!(d.queue_drop_episodes.load(Relaxed), 3);
        assert!(
            d.summary()
                .ends_with("6 dropped on a full queue in 3 episodes")
        );
    }

    #[test]
    fn the_first_drop_begins_an_episode_at_time_zero_too() {
        assert!(begins_episode(None, 0, 100_000));
        assert!(!begins_episode(Some(0), 100_000, 100_000));
        assert!(begins_episode(Some(0), 100_001, 100_000));
    }

    fn config(upstream: SocketAddr, shaping: Shaping) -> RelayConfig {
        RelayConfig::both_ways("127.0.0.1:0".parse().unwrap(), upstream, shaping, 1)
    }

    /// Receives one datagram or fails the test after 10 s (a lost datagram must not hang it).
    async fn recv(socket: &UdpSocket, buf: &mut [u8]) -> (usize, SocketAddr) {
        tokio::time::timeout(Duration::from_secs(10), socket.recv_from(buf))
            .await
            .expect("a datagram within 10 s")
            .unwrap()
    }

    #[tokio::test]
    async fn round_trips_take_at_least_both_delays() {
        let (server, _echo) = echo().await;
        let relay = start(config(server, Shaping::new(100.0, 30.0)))
            .await
            .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 64];
        for i in 0..3u8 {
            let sent = Instant::now();
            client.send_to(&[i; 32], relay.local_addr()).await.unwrap();
            let (n, from) = recv(&client, &mut buf).await;
            assert_eq!((n, from, buf[0]), (32, relay.local_addr(), i));
            assert!(
                sent.elapsed() >= Duration::from_millis(60),
                "{:?}",
                sent.elapsed()
            );
        }
        assert_eq!(relay.stats().up.delivered.load(Relaxed), 3);
        assert_eq!(relay.stats().down.delivered.load(Relaxed), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_relay_frees_its_address_at_once() {
        let (server, _echo) = echo().await;
        let mut cfg = config(server, Shaping::new(1000.0, 1.0));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 64];
        for i in 0..200u8 {
            let relay = start(cfg).await.unwrap();
            cfg.listen = relay.local_addr();
            // A datagram each way, so a reader of upstream replies is running.
            client.send_to(&[i; 8], relay.local_addr()).await.unwrap();
            assert_eq!(recv(&client, &mut buf).await.0, 8);
            relay.stop().await;
        }
    }

    #[tokio::test]
    async fn a_burst_is_paced_at_the_bandwidth() {
        let (server, _echo) = echo().await;
        // 4 Mbit/s, 1 ms: 50 datagrams of 1000 bytes take at least 100 ms to cross. (Kept
        // small: a loopback socket's default receive buffer holds about 90 such datagrams.)
        let mut shaping = Shaping::new(4.0, 1.0);
        shaping.queue_bytes = 1 << 20;
        let relay = start(config(server, shaping)).await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sent = Instant::now();
        for _ in 0..50 {
            client
                .send_to(&[7u8; 1000], relay.local_addr())
                .await
                .unwrap();
        }
        let mut buf = [0u8; 2000];
        for _ in 0..50 {
            recv(&client, &mut buf).await;
        }
        assert!(
            sent.elapsed() >= Duration::from_millis(100),
            "{:?}",
            sent.elapsed()
        );
    }

    #[tokio::test]
    async fn losses_are_counted_and_bad_shaping_is_refused() {
        let (server, _echo) = echo().await;
        let mut shaping = Shaping::new(100.0, 1.0);
        shaping.loss = 0.5;
        let relay = start(config(server, shaping)).await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for _ in 0..60 {
            client
                .send_to(&[1u8; 100], relay.local_addr())
                .await
                .unwrap();
        }
        let up = &relay.stats().up;
        for _ in 0..1000 {
            if up.lost.load(Relaxed) + up.delivered.load(Relaxed) == 60 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(up.lost.load(Relaxed) + up.delivered.load(Relaxed), 60);
        assert!(
            (10..50).contains(&up.lost.load(Relaxed)),
            "{}",
            up.summary()
        );

        shaping.loss = 2.0;
        let err = start(config(server, shaping)).await.err().unwrap();
        assert!(err.to_string().contains("loss"), "{err}");
    }
}
