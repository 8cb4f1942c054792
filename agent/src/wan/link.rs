//! One outgoing WAN link: dials a peer (mutual TLS, then the application handshake), sends
//! the messages the agent queues for it on QUIC streams, and redials with backoff when the
//! connection breaks. A message counts as delivered once the peer's agent has acknowledged
//! its stream (after handing the messages to its core, not merely on QUIC's receipt);
//! whatever was not acknowledged is sent again on the next connection, in order (receivers
//! drop duplicates), so a broken link loses nothing.

use super::backoff::Backoff;
use super::framing::{encode_stream, group_for_streams};
use super::handshake::{Hello, MAX_HANDSHAKE_BYTES, Verdict, decode_verdict, encode_hello};
use super::telemetry::{ConnectionStats, SharedStats, stats_of};
use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use s2n_quic::client::Connect;
use s2n_quic::{Client, Connection};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// Target size of a stream that carries several small messages.
pub const STREAM_TARGET_BYTES: usize = 256 * 1024;
/// Bytes handed to a stream at a time, so that a stream holds no more than its send buffer.
const SEND_PIECE_BYTES: usize = 64 * 1024;
/// Application close code when this side gives up on a broken connection.
const LINK_BROKEN: u32 = 10;
/// How long a dial (TLS and application handshake) may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(15);

/// What a WAN task tells the agent's core.
#[derive(Debug)]
pub enum WanEvent {
    /// A message arrived from the peer on link `link`.
    Message {
        /// Link index.
        link: usize,
        /// The message.
        bytes: Vec<u8>,
    },
    /// Our connection to the peer on `link` is up; its welcome says it finished `round`.
    Connected {
        /// Link index.
        link: usize,
        /// The peer's finished rounds.
        round: u64,
    },
    /// Our connection to the peer on `link` broke or could not be made.
    Disconnected {
        /// Link index.
        link: usize,
    },
    /// The peer on `link` asks for a snapshot of this region's state (it rejoins without
    /// its own); answer on `reply` with an encoded snapshot.
    SnapshotRequest {
        /// Link index.
        link: usize,
        /// Where the encoded snapshot goes.
        reply: tokio::sync::oneshot::Sender<Vec<u8>>,
    },
    /// The snapshot this region asked the peer on `link` for, or why there is none.
    Snapshot {
        /// Link index.
        link: usize,
        /// The encoded snapshot.
        bytes: Result<Vec<u8>, String>,
    },
    /// The peer on `link` dialled us and was admitted with this hello.
    PeerHello {
        /// Link index.
        link: usize,
        /// Its hello.
        hello: Hello,
    },
}

/// A link's state, shared between its task and the agent.
#[derive(Debug, Default)]
pub struct LinkShared {
    /// Whether the outgoing connection is up.
    pub connected: AtomicBool,
    /// Bytes queued or in flight and not yet acknowledged.
    pub unacked_bytes: AtomicU64,
    /// Messages queued or in flight and not yet acknowledged.
    pub unacked_messages: AtomicU64,
    /// Bytes acknowledged by the peer, over the link's life.
    pub acked_bytes: AtomicU64,
    /// Microseconds during which at least one stream was in flight.
    pub busy_micros: AtomicU64,
    /// Connections made.
    pub connects: AtomicU64,
    /// Connections replaced by a fresh one right after their handshake, because a packet
    /// lost during it had ended their slow start at the initial window.
    pub fresh_redials: AtomicU64,
    /// The current connection's transport statistics.
    pub transport: Mutex<Option<SharedStats>>,
    /// The last refusal or error, for the status page.
    pub last_error: Mutex<Option<String>>,
    /// Messages queued or in flight and not yet acknowledged, by sequence number (what a
    /// checkpoint keeps so a restart sends them again).
    unacked: Mutex<BTreeMap<u64, Bytes>>,
    next_seq: AtomicU64,
}

impl LinkShared {
    /// Measured goodput (bits/s) while the link had data in flight; 0 before any.
    pub fn goodput_bps(&self) -> f64 {
        let busy = self.busy_micros.load(Ordering::Relaxed);
        if busy == 0 {
            return 0.0;
        }
        self.acked_bytes.load(Ordering::Relaxed) as f64 * 8.0 / (busy as f64 / 1e6)
    }

    /// The current connection's transport statistics, if connected.
    pub fn transport(&self) -> Option<ConnectionStats> {
        let t = self.transport.lock().expect("link").clone()?;
        let s = t.lock().expect("stats").clone();
        Some(s)
    }

    fn queued(&self, bytes: &Bytes) -> u64 {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.unacked_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.unacked_messages.fetch_add(1, Ordering::Relaxed);
        self.unacked
            .lock()
            .expect("unacked")
            .insert(seq, bytes.clone());
        seq
    }

    fn acked(&self, group: &Group) {
        let mut store = self.unacked.lock().expect("unacked");
        for (seq, m) in group {
            if store.remove(seq).is_some() {
                self.unacked_bytes
                    .fetch_sub(m.len() as u64, Ordering::Relaxed);
                self.unacked_messages.fetch_sub(1, Ordering::Relaxed);
                self.acked_bytes
                    .fetch_add(m.len() as u64, Ordering::Relaxed);
            }
        }
    }

    /// Every message not yet acknowledged with its sequence number, in queue order.
    fn unacknowledged_entries(&self) -> Vec<(u64, Bytes)> {
        self.unacked
            .lock()
            .expect("unacked")
            .iter()
            .map(|(seq, b)| (*seq, b.clone()))
            .collect()
    }

    /// Every message not yet acknowledged, in the order it was queued.
    pub fn unacknowledged(&self) -> Vec<Vec<u8>> {
        self.unacked
            .lock()
            .expect("unacked")
            .values()
            .map(|b| b.to_vec())
            .collect()
    }
}

/// The sending half the agent's core holds for one link.
#[derive(Debug, Clone)]
pub struct LinkSender {
    tx: mpsc::UnboundedSender<(u64, Bytes)>,
    snapshots: mpsc::UnboundedSender<()>,
    shared: Arc<LinkShared>,
    /// In-process links (tests of the core loop) record what is sent, delivered and
    /// acknowledged at once.
    recorded: Option<Arc<Mutex<Vec<Vec<u8>>>>>,
}

impl LinkSender {
    /// A link with no task behind it: every message sent is recorded, in order, in the
    /// returned list and counts as acknowledged at once; snapshot requests go nowhere.
    /// For driving the core loop without a network.
    pub fn recording() -> (Self, Arc<Mutex<Vec<Vec<u8>>>>) {
        let (tx, _) = mpsc::unbounded_channel();
        let (snapshots, _) = mpsc::unbounded_channel();
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::new(LinkShared::default());
        shared.connected.store(true, Ordering::Relaxed);
        (
            Self {
                tx,
                snapshots,
                shared,
                recorded: Some(recorded.clone()),
            },
            recorded,
        )
    }

    /// Queues a message; false if the link task is gone.
    pub fn send(&self, bytes: Vec<u8>) -> bool {
        if let Some(recorded) = &self.recorded {
            recorded.lock().expect("recorded messages").push(bytes);
            return true;
        }
        let bytes = Bytes::from(bytes);
        let seq = self.shared.queued(&bytes);
        self.tx.send((seq, bytes)).is_ok()
    }

    /// Asks the peer for a snapshot on the current connection; the answer comes back as
    /// [`WanEvent::Snapshot`].
    pub fn request_snapshot(&self) -> bool {
        self.snapshots.send(()).is_ok()
    }

    /// The link's shared state.
    pub fn shared(&self) -> &Arc<LinkShared> {
        &self.shared
    }
}

/// Everything a link task needs.
pub struct Dialer {
    /// Link index (the peer's position in the configuration).
    pub link: usize,
    /// Peer region (the name its certificate must carry).
    pub peer: String,
    /// Where it listens, `host:port`.
    pub address: String,
    /// The dialling endpoint.
    pub client: Client,
    /// Builds this region's hello at dial time.
    pub hello: Arc<dyn Fn() -> Hello + Send + Sync>,
    /// Where events go.
    pub events: std::sync::mpsc::Sender<WanEvent>,
    /// Seed for reconnect jitter.
    pub seed: u64,
    /// Largest snapshot accepted, bytes on the wire.
    pub max_snapshot: usize,
}

/// Starts the task for one link; returns the sender the core queues messages on.
pub fn spawn(dialer: Dialer) -> (LinkSender, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (snapshots, snapshot_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(LinkShared::default());
    let task = tokio::spawn(run(dialer, rx, snapshot_rx, shared.clone()));
    (
        LinkSender {
            tx,
            snapshots,
            shared,
            recorded: None,
        },
        task,
    )
}

/// First byte of a bidirectional stream that carries messages (answered with [`ACK`]).
pub const STREAM_MESSAGES: u8 = b'M';
/// First byte of a bidirectional stream that asks for a snapshot.
pub const STREAM_SNAPSHOT: u8 = b'S';
/// What a receiver answers once a stream's messages are in its agent's hands.
pub const ACK: &[u8] = b"A";
/// What a receiver answers when it refuses a stream as malformed (the sender drops it
/// rather than resending it forever).
pub const REJECT: &[u8] = b"R";
/// What a snapshot request stream carries.
pub const SNAPSHOT_REQUEST: &[u8] = b"SWGSQ";

async fn fetch_snapshot(mut handle: s2n_quic::connection::Handle, limit: usize) -> Result<Vec<u8>> {
    let mut s = handle.open_bidirectional_stream().await?;
    s.send(Bytes::from_static(SNAPSHOT_REQUEST)).await?;
    s.finish()?;
    let mut out = Vec::new();
    while let Some(chunk) = s.receive().await? {
        if out.len() + chunk.len() > limit {
            bail!("snapshot exceeds {limit} bytes");
        }
        out.extend_from_slice(&chunk);
    }
    if out.is_empty() {
        bail!("the peer had no snapshot to give");
    }
    Ok(out)
}

async fn run(
    d: Dialer,
    mut rx: mpsc::UnboundedReceiver<(u64, Bytes)>,
    mut snapshot_rx: mpsc::UnboundedReceiver<()>,
    shared: Arc<LinkShared>,
) {
    let mut pending: VecDeque<(u64, Bytes)> = VecDeque::new();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), d.seed);
    let mut failures_in_a_row = 0u32;
    loop {
        match dial_fresh(&d, &shared).await {
            Ok((conn, round)) => {
                failures_in_a_row = 0;
                backoff.reset();
                shared.connects.fetch_add(1, Ordering::Relaxed);
                *shared.transport.lock().expect("link") = stats_of(&conn.handle());
                shared.connected.store(true, Ordering::Relaxed);
                *shared.last_error.lock().expect("link") = None;
                tracing::info!(peer = %d.peer, address = %d.address, peer_round = round, "WAN link up");
                let _ = d.events.send(WanEvent::Connected {
                    link: d.link,
                    round,
                });
                let outcome =
                    pump(conn, &d, &mut rx, &mut snapshot_rx, &mut pending, &shared).await;
                shared.connected.store(false, Ordering::Relaxed);
                *shared.transport.lock().expect("link") = None;
                let _ = d.events.send(WanEvent::Disconnected { link: d.link });
                match outcome {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(peer = %d.peer, "WAN link down: {e:#}");
                        *shared.last_error.lock().expect("link") = Some(format!("{e:#}"));
                    }
                }
            }
            Err(e) => {
                failures_in_a_row += 1;
                // Log the first failure and then every tenth, so a long outage does not
                // flood the log.
                if failures_in_a_row == 1 || failures_in_a_row.is_multiple_of(10) {
                    tracing::warn!(peer = %d.peer, address = %d.address, attempts = failures_in_a_row, "cannot reach peer: {e:#}");
                }
                *shared.last_error.lock().expect("link") = Some(format!("{e:#}"));
                if failures_in_a_row == 1 {
                    let _ = d.events.send(WanEvent::Disconnected { link: d.link });
                }
            }
        }
        // Wait before redialling, still taking what the core queues meanwhile.
        let wait = tokio::time::sleep(backoff.next_delay());
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                m = rx.recv() => match m {
                    Some(m) => pending.push_back(m),
                    None => return,
                },
                Some(()) = snapshot_rx.recv() => {
                    let _ = d.events.send(WanEvent::Snapshot {
                        link: d.link,
                        bytes: Err("not connected".into()),
                    });
                }
            }
        }
    }
}

/// Whether `conn`'s slow start ended on a packet lost during its handshake.
fn crippled_in_handshake(conn: &Connection) -> bool {
    stats_of(&conn.handle()).is_some_and(|s| s.lock().expect("stats").left_slow_start_in_handshake)
}

/// [`dial`], once more if the connection lost a packet during its handshake (its first
/// flight reached a peer that was not listening yet, say) and so left slow start at the
/// initial window: the fresh connection starts with a whole slow start ahead of it, the
/// old one is closed once the fresh one is up (kept if the redial fails).
async fn dial_fresh(d: &Dialer, shared: &LinkShared) -> Result<(Connection, u64)> {
    let (conn, round) = dial(d).await?;
    if !crippled_in_handshake(&conn) {
        return Ok((conn, round));
    }
    match dial(d).await {
        Ok(fresh) => {
            shared.fresh_redials.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                peer = %d.peer,
                "a packet lost during the handshake ended slow start at the initial window; \
                 replaced the connection with a fresh one"
            );
            conn.close(0u32.into());
            Ok(fresh)
        }
        Err(e) => {
            tracing::debug!(peer = %d.peer, "keeping the first connection: {e:#}");
            Ok((conn, round))
        }
    }
}

/// Dials the peer and runs the application handshake; returns the connection and the
/// peer's finished rounds.
async fn dial(d: &Dialer) -> Result<(Connection, u64)> {
    let attempt = async {
        let addr = tokio::net::lookup_host(&d.address)
            .await
            .with_context(|| format!("resolving {}", d.address))?
            .next()
            .ok_or_else(|| anyhow!("{} resolves to no address", d.address))?;
        let mut conn = d
            .client
            .connect(Connect::new(addr).with_server_name(d.peer.as_str()))
            .await
            .context("QUIC/TLS handshake")?;
        conn.keep_alive(true)?;
        let mut stream = conn.open_bidirectional_stream().await?;
        stream.send(Bytes::from(encode_hello(&(d.hello)()))).await?;
        stream.finish()?;
        let mut answer = Vec::new();
        while let Some(chunk) = stream.receive().await? {
            answer.extend_from_slice(&chunk);
            if answer.len() > MAX_HANDSHAKE_BYTES {
                bail!("the peer's verdict exceeds {MAX_HANDSHAKE_BYTES} bytes");
            }
        }
        match decode_verdict(&answer).map_err(|e| anyhow!("the peer's verdict: {e}"))? {
            Verdict::Welcome { region, round } => {
                if region != d.peer {
                    bail!("dialled {} but {region:?} answered", d.peer);
                }
                Ok((conn, round))
            }
            Verdict::Refused { code, reason } => {
                tracing::error!(peer = %d.peer, code, "peer refused this region: {reason}");
                bail!("refused by {} (code {code}): {reason}", d.peer)
            }
        }
    };
    tokio::time::timeout(DIAL_TIMEOUT, attempt)
        .await
        .map_err(|_| anyhow!("no answer within {DIAL_TIMEOUT:?}"))?
}

/// A stream's messages with their sequence numbers, for acknowledging and resending.
type Group = Vec<(u64, Bytes)>;

/// Sends queued messages on `conn` until the queue closes (Ok) or the connection breaks
/// (Err, with every unacknowledged message back at the front of `pending`, in order).
async fn pump(
    conn: Connection,
    d: &Dialer,
    rx: &mut mpsc::UnboundedReceiver<(u64, Bytes)>,
    snapshot_rx: &mut mpsc::UnboundedReceiver<()>,
    pending: &mut VecDeque<(u64, Bytes)>,
    shared: &LinkShared,
) -> Result<()> {
    let (handle, mut acceptor) = conn.split();
    let mut in_flight: JoinSet<Result<Group, anyhow::Error>> = JoinSet::new();
    // Set once the last launched stream has handed all its bytes to QUIC's send buffer.
    let mut last_handed: Option<oneshot::Receiver<()>> = None;
    let mut busy_since: Option<Instant> = None;
    let mut error: Option<anyhow::Error> = None;
    let mut queue_open = true;
    loop {
        // Launch everything pending, grouped into streams.
        if error.is_none() && !pending.is_empty() {
            let batch: Vec<(u64, Bytes)> = pending.drain(..).collect();
            let sizes: Vec<usize> = batch.iter().map(|(_, m)| m.len()).collect();
            let groups = group_for_streams(&sizes, STREAM_TARGET_BYTES);
            let mut batch: Vec<Option<(u64, Bytes)>> = batch.into_iter().map(Some).collect();
            for g in groups {
                let group: Group = g
                    .into_iter()
                    .map(|i| batch[i].take().expect("each message is in one group"))
                    .collect();
                let mut handle = handle.clone();
                busy_since.get_or_insert_with(Instant::now);
                let (handed, next) = oneshot::channel();
                let previous = last_handed.replace(next);
                in_flight.spawn(async move {
                    let mut bytes = vec![STREAM_MESSAGES];
                    bytes.extend(encode_stream(group.iter().map(|(_, m)| &m[..])));
                    // Delivered once the peer's agent has the messages: it answers ACK
                    // only after handing them over (a QUIC acknowledgement alone would not
                    // survive the peer stopping before it read them).
                    let sent = async {
                        // Streams take the link in the order their messages were queued:
                        // each starts once the one before has handed its last bytes to
                        // the send buffer. Started together, QUIC would share the link
                        // between them, and a round's update would arrive only when the
                        // newer rounds queued behind it had crossed too.
                        if let Some(previous) = previous {
                            // An error means the previous stream failed; its bytes are
                            // not ahead of ours then.
                            let _ = previous.await;
                        }
                        let mut s = handle.open_bidirectional_stream().await?;
                        // In pieces: the stream takes a whole chunk however large, and
                        // waits for room in its send buffer only before the next one.
                        let bytes = Bytes::from(bytes);
                        let mut at = 0;
                        while at < bytes.len() {
                            let end = (at + SEND_PIECE_BYTES).min(bytes.len());
                            s.send(bytes.slice(at..end)).await?;
                            at = end;
                        }
                        s.finish()?;
                        let _ = handed.send(());
                        let mut answer = Vec::new();
                        while let Some(chunk) = s.receive().await? {
                            answer.extend_from_slice(&chunk);
                            if answer.len() > ACK.len() {
                                break;
                            }
                        }
                        if answer == REJECT {
                            return anyhow::Ok(false);
                        }
                        if answer != ACK {
                            bail!("the peer did not acknowledge a stream");
                        }
                        anyhow::Ok(true)
                    };
                    match sent.await {
                        Ok(true) => Ok(group),
                        Ok(false) => {
                            tracing::error!(
                                messages = group.len(),
                                "the peer refused a stream as malformed; its messages are dropped"
                            );
                            Ok(group)
                        }
                        Err(e) => Err(e),
                    }
                });
            }
        }
        if in_flight.is_empty() {
            if let Some(start) = busy_since.take() {
                shared
                    .busy_micros
                    .fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            if let Some(e) = error.take() {
                // Everything sent on this connection and not acknowledged goes first on the
                // next, in order: taken from the store, so a stream task that failed in any
                // way (a panic included) loses nothing.
                // What is still in the channel is in the store too: take it first, so it is
                // sent once, after the older messages.
                while let Ok(m) = rx.try_recv() {
                    pending.push_back(m);
                }
                let queued: std::collections::HashSet<u64> =
                    pending.iter().map(|(seq, _)| *seq).collect();
                let resend: Vec<(u64, Bytes)> = shared
                    .unacknowledged_entries()
                    .into_iter()
                    .filter(|(seq, _)| !queued.contains(seq))
                    .collect();
                for m in resend.into_iter().rev() {
                    pending.push_front(m);
                }
                return Err(e);
            }
            if !queue_open {
                handle.close(0u32.into());
                return Ok(());
            }
        }
        tokio::select! {
            m = rx.recv(), if queue_open && error.is_none() => match m {
                Some(m) => {
                    pending.push_back(m);
                    while let Ok(m) = rx.try_recv() {
                        pending.push_back(m);
                    }
                }
                None => queue_open = false,
            },
            Some(()) = snapshot_rx.recv() => {
                let (handle, events, link, limit) =
                    (handle.clone(), d.events.clone(), d.link, d.max_snapshot);
                tokio::spawn(async move {
                    let bytes = fetch_snapshot(handle, limit).await.map_err(|e| format!("{e:#}"));
                    let _ = events.send(WanEvent::Snapshot { link, bytes });
                });
            }
            done = in_flight.join_next(), if !in_flight.is_empty() => match done {
                Some(Ok(Ok(group))) => shared.acked(&group),
                Some(Ok(Err(e))) => {
                    error.get_or_insert(e);
                }
                Some(Err(join)) => {
                    error.get_or_insert(anyhow!("a stream task failed: {join}"));
                }
                None => {}
            },
            // Nothing is expected from the peer on this connection: this only returns
            // when the connection closes, which is how an idle link notices.
            r = acceptor.accept_receive_stream(), if error.is_none() => {
                let e = match r {
                    Ok(_) => anyhow!("the peer opened a stream on an outgoing link"),
                    Err(e) => anyhow!("connection closed: {e}"),
                };
                error = Some(e);
            }
        }
        if error.is_some() {
            // Fail the remaining streams fast; they are resent on the next connection.
            handle.close(LINK_BROKEN.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Congestion, TlsConfig, WanConfig};
    use crate::wan::handshake::{Expectation, PROTOCOL_VERSION};
    use crate::wan::inbound::{Acceptor, serve};
    use crate::wan::telemetry::LinkTelemetry;
    use crate::wan::{certs, endpoint, tls::TlsIdentity};
    use std::collections::BTreeSet;
    use std::net::SocketAddr;

    fn identity(dir: &std::path::Path, region: &str) -> TlsIdentity {
        TlsIdentity::load(&TlsConfig {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{region}.pem")),
            key: dir.join(format!("{region}.key")),
        })
        .unwrap()
    }

    fn wan() -> WanConfig {
        WanConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            bandwidth_mbps: 100.0,
            rtt_ms: 10.0,
            peer_deadline_s: 2.0,
            congestion: Congestion::Cubic,
            initial_window: crate::config::InitialWindow::Link,
        }
    }

    /// Starts the accepting side of `us-east` on `listen`; returns the endpoint's task and
    /// the receiver of its events.
    fn accepting(
        dir: &std::path::Path,
        listen: SocketAddr,
    ) -> (
        tokio::task::JoinHandle<()>,
        SocketAddr,
        std::sync::mpsc::Receiver<WanEvent>,
    ) {
        accepting_with(dir, listen, 1 << 20)
    }

    /// [`accepting`] taking messages of up to `max_message` bytes.
    fn accepting_with(
        dir: &std::path::Path,
        listen: SocketAddr,
        max_message: usize,
    ) -> (
        tokio::task::JoinHandle<()>,
        SocketAddr,
        std::sync::mpsc::Receiver<WanEvent>,
    ) {
        let server = endpoint::server(
            &wan(),
            listen,
            &identity(dir, "us-east"),
            &["eu-west".into()],
            LinkTelemetry::default(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let acceptor = Arc::new(Acceptor {
            expect: Expectation {
                region: "us-east".into(),
                peers: vec!["eu-west".into()],
                manifest: "m".into(),
            },
            round: Arc::new(AtomicU64::new(0)),
            events: tx,
            max_message,
            refusals: Arc::default(),
            bad_streams: Arc::default(),
            open: std::sync::RwLock::new(true),
        });
        (tokio::spawn(serve(server, acceptor)), addr, rx)
    }

    /// Collects distinct message payloads until `want` have arrived (or 20 s pass).
    fn collect(rx: &std::sync::mpsc::Receiver<WanEvent>, got: &mut BTreeSet<Vec<u8>>, want: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < want && Instant::now() < deadline {
            if let Ok(WanEvent::Message { bytes, .. }) = rx.recv_timeout(Duration::from_millis(50))
            {
                got.insert(bytes);
            }
        }
    }

    fn relay_to(listen: SocketAddr, upstream: SocketAddr) -> crate::wan::relay::Relay {
        let shaping = crate::wan::shaper::Shaping::new(1000.0, 1.0);
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(crate::wan::relay::start(
                crate::wan::relay::RelayConfig::both_ways(listen, upstream, shaping, 1),
            ))
        })
        .unwrap()
    }

    /// Starts `eu-west`'s link to `us-east` at `addr`; returns its sender and its events.
    fn dialling(
        dir: &std::path::Path,
        addr: SocketAddr,
    ) -> (LinkSender, std::sync::mpsc::Receiver<WanEvent>) {
        dialling_with(&wan(), dir, addr)
    }

    /// [`dialling`] with the dialling endpoint built from `wan`.
    fn dialling_with(
        wan: &WanConfig,
        dir: &std::path::Path,
        addr: SocketAddr,
    ) -> (LinkSender, std::sync::mpsc::Receiver<WanEvent>) {
        let client = endpoint::client(
            wan,
            &identity(dir, "eu-west"),
            "127.0.0.1:0".parse().unwrap(),
            LinkTelemetry::default(),
        )
        .unwrap();
        let (events, link_events) = std::sync::mpsc::channel();
        let (sender, _task) = spawn(Dialer {
            link: 0,
            peer: "us-east".into(),
            address: addr.to_string(),
            client,
            hello: Arc::new(|| Hello {
                protocol: PROTOCOL_VERSION,
                region: "eu-west".into(),
                manifest: "m".into(),
                round: 0,
            }),
            events,
            seed: 1,
            max_snapshot: 1 << 20,
        });
        (sender, link_events)
    }

    /// Waits up to 10 s for the link to be up.
    async fn until_connected(shared: &LinkShared) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !shared.connected.load(Ordering::Relaxed) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(shared.connected.load(Ordering::Relaxed), "link up");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_starts_with_the_configured_initial_window() {
        let dir = tempfile::tempdir().unwrap();
        certs::init(&["us-east".into(), "eu-west".into()], dir.path(), false).unwrap();
        let (_server, addr, _rx) = accepting(dir.path(), "127.0.0.1:0".parse().unwrap());
        let window = |initial_window| {
            let wan = WanConfig {
                initial_window,
                ..wan()
            };
            let (sender, _events) = dialling_with(&wan, dir.path(), addr);
            async move {
                let shared = sender.shared().clone();
                until_connected(&shared).await;
                shared.transport().unwrap().congestion_window
            }
        };
        // 100 Mbit/s at 10 ms: 125,000 bytes in flight fill the link.
        let link = window(crate::config::InitialWindow::Link).await;
        assert!(link >= 125_000, "link: {link}");
        // RFC 9002's ten datagrams, grown only by the handshake's few acknowledged bytes.
        let standard = window(crate::config::InitialWindow::Standard).await;
        assert!(standard < 30_000, "standard: {standard}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_whose_handshake_lost_its_first_flight_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        certs::init(&["us-east".into(), "eu-west".into()], dir.path(), false).unwrap();
        // A peer that is up before the dial: one connection, kept.
        let (_server, addr, _rx) = accepting(dir.path(), "127.0.0.1:0".parse().unwrap());
        let (sender, _events) = dialling(dir.path(), addr);
        let shared = sender.shared().clone();
        until_connected(&shared).await;
        assert_eq!(shared.fresh_redials.load(Ordering::Relaxed), 0);
        assert!(!shared.transport().unwrap().left_slow_start_in_handshake);
        // A peer that starts listening after the first flight was sent: that flight is
        // lost, the handshake completes on a retransmission with slow start over, and the
        // link replaces the connection before using it.
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (sender, _events) = dialling(dir.path(), port);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (_late, _, rx) = accepting(dir.path(), port);
        let shared = sender.shared().clone();
        until_connected(&shared).await;
        assert_eq!(shared.fresh_redials.load(Ordering::Relaxed), 1);
        assert!(!shared.transport().unwrap().left_slow_start_in_handshake);
        // And the replacement carries messages.
        assert!(sender.send(b"after the replacement".to_vec()));
        let mut got = BTreeSet::new();
        tokio::task::block_in_place(|| collect(&rx, &mut got, 1));
        assert!(got.contains(&b"after the replacement"[..]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_messages_cross_the_link_in_the_order_queued() {
        let dir = tempfile::tempdir().unwrap();
        certs::init(&["us-east".into(), "eu-west".into()], dir.path(), false).unwrap();
        const LEN: usize = 3_000_000;
        let (_server, upstream, rx) =
            accepting_with(dir.path(), "127.0.0.1:0".parse().unwrap(), LEN);
        // 48 Mbit/s: the two messages take about a second to cross.
        let shaping = crate::wan::shaper::Shaping::new(48.0, 2.0);
        let relay = crate::wan::relay::start(crate::wan::relay::RelayConfig::both_ways(
            "127.0.0.1:0".parse().unwrap(),
            upstream,
            shaping,
            1,
        ))
        .await
        .unwrap();
        let (sender, _events) = dialling(dir.path(), relay.local_addr());
        until_connected(&sender.shared().clone()).await;
        let start = Instant::now();
        for first_byte in [1u8, 2] {
            assert!(sender.send(vec![first_byte; LEN]));
        }
        let arrivals = tokio::task::block_in_place(|| {
            let mut at = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            while at.len() < 2 && Instant::now() < deadline {
                if let Ok(WanEvent::Message { bytes, .. }) =
                    rx.recv_timeout(Duration::from_millis(20))
                {
                    at.push((bytes[0], start.elapsed().as_secs_f64()));
                }
            }
            at
        });
        assert_eq!(arrivals.len(), 2, "both arrive: {arrivals:?}");
        assert_eq!((arrivals[0].0, arrivals[1].0), (1, 2), "in order");
        // The first is not held back by the second: sharing the link from the start, both
        // would finish together; in order, the first finishes well before (the second's
        // start overlaps only the first's last send buffer, 1 MiB here).
        let (first, second) = (arrivals[0].1, arrivals[1].1);
        assert!(
            first < 0.85 * second,
            "first after {first:.2} s, second after {second:.2} s"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_link_redials_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        certs::init(&["us-east".into(), "eu-west".into()], dir.path(), false).unwrap();
        let (_server, upstream, rx) = accepting(dir.path(), "127.0.0.1:0".parse().unwrap());
        // The link runs through a relay, which the test cuts and restores.
        let relay = relay_to("127.0.0.1:0".parse().unwrap(), upstream);
        let addr = relay.local_addr();
        let (sender, link_events) = dialling(dir.path(), addr);
        // A first batch arrives: small messages and one large enough for its own stream.
        let message = |i: u32| {
            let len = if i % 40 == 7 { 600_000 } else { 100 };
            let mut m = vec![i as u8; len];
            m[..4].copy_from_slice(&i.to_be_bytes());
            m
        };
        for i in 0..50 {
            assert!(sender.send(message(i)));
        }
        let mut got = BTreeSet::new();
        tokio::task::block_in_place(|| collect(&rx, &mut got, 50));
        assert_eq!(got.len(), 50);
        // The path goes away long enough for the connection to time out; what is queued
        // meanwhile waits.
        drop(relay);
        for i in 50..120 {
            sender.send(message(i));
        }
        let shared = sender.shared().clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared.connected.load(Ordering::Relaxed) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !shared.connected.load(Ordering::Relaxed),
            "the link noticed"
        );
        // The path comes back on the same address: the link redials and delivers the rest.
        let _relay = relay_to(addr, upstream);
        tokio::task::block_in_place(|| collect(&rx, &mut got, 120));
        let want: BTreeSet<Vec<u8>> = (0..120).map(message).collect();
        assert!(
            want.is_subset(&got),
            "missing {} of 120",
            want.difference(&got).count()
        );
        // Everything is acknowledged, and the link reported going down and up again.
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared.unacked_messages.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(shared.unacked_messages.load(Ordering::Relaxed), 0);
        assert_eq!(shared.unacked_bytes.load(Ordering::Relaxed), 0);
        assert!(shared.connects.load(Ordering::Relaxed) >= 2);
        let seen: Vec<WanEvent> = link_events.try_iter().collect();
        assert!(
            seen.iter()
                .any(|e| matches!(e, WanEvent::Disconnected { .. }))
        );
        assert!(shared.goodput_bps() > 0.0);
        // A message the peer refuses as malformed (an empty one) is dropped after the
        // peer says so, not resent forever over new connections.
        let connects = shared.connects.load(Ordering::Relaxed);
        assert!(sender.send(Vec::new()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared.unacked_messages.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(shared.unacked_messages.load(Ordering::Relaxed), 0);
        assert_eq!(
            shared.connects.load(Ordering::Relaxed),
            connects,
            "no redial"
        );
    }
}
