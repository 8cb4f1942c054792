//! The accepting side: every connection runs the application handshake (identity from the
//! verified certificate, protocol version, region, model manifest); admitted peers' streams
//! are split into messages and handed to the agent's core. Refusals are logged here and sent
//! to the peer, which logs them too.

use super::framing::decode_stream;
use super::handshake::{Expectation, MAX_HANDSHAKE_BYTES, Verdict, encode_verdict};
use super::link::{
    ACK, REJECT, SNAPSHOT_REQUEST, STREAM_MESSAGES, STREAM_SNAPSHOT, STREAM_TARGET_BYTES, WanEvent,
};
use super::telemetry::stats_of;
use anyhow::{Result, anyhow, bail};
use bytes::Bytes;
use s2n_quic::stream::{BidirectionalStream, PeerStream};
use s2n_quic::{Connection, Server};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How long a new connection has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the accepting side shares with the agent.
pub struct Acceptor {
    /// The checks every hello must pass.
    pub expect: Expectation,
    /// This region's finished rounds (for the welcome).
    pub round: Arc<AtomicU64>,
    /// Where events go.
    pub events: std::sync::mpsc::Sender<WanEvent>,
    /// Largest message accepted on a stream.
    pub max_message: usize,
    /// Hellos refused so far.
    pub refusals: Arc<AtomicU64>,
    /// Streams dropped as malformed so far.
    pub bad_streams: Arc<AtomicU64>,
    /// Whether messages are still handed to the core (closed for a final checkpoint).
    pub open: RwLock<bool>,
}

impl Acceptor {
    /// Stops handing messages to the core; returns once no stream is still handing some
    /// over, so the core can drain its queue knowing nothing more will arrive.
    pub fn close(&self) {
        *self.open.write().expect("gate") = false;
    }
}

/// Accepts connections until the endpoint closes.
pub async fn serve(mut server: Server, acceptor: Arc<Acceptor>) {
    while let Some(conn) = server.accept().await {
        tokio::spawn(connection(conn, acceptor.clone()));
    }
}

async fn read_to_end(
    stream: &mut s2n_quic::stream::ReceiveStream,
    limit: usize,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = stream.receive().await? {
        if out.len() + chunk.len() > limit {
            bail!("stream exceeds {limit} bytes");
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

async fn connection(mut conn: Connection, a: Arc<Acceptor>) {
    let remote = conn
        .remote_addr()
        .map_or_else(|_| "?".to_string(), |r| r.to_string());
    let cert_names = stats_of(&conn.handle())
        .map(|s| s.lock().expect("stats").peer_names.clone())
        .unwrap_or_default();
    let hello = async {
        let stream = conn
            .accept_bidirectional_stream()
            .await?
            .ok_or_else(|| anyhow!("closed before its hello"))?;
        let (mut rx, tx) = stream.split();
        let bytes = read_to_end(&mut rx, MAX_HANDSHAKE_BYTES).await?;
        anyhow::Ok((bytes, tx))
    };
    let (bytes, mut tx) = match tokio::time::timeout(HELLO_TIMEOUT, hello).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::warn!(%remote, "WAN connection dropped before its handshake: {e:#}");
            return;
        }
        Err(_) => {
            tracing::warn!(%remote, "WAN connection sent no hello within {HELLO_TIMEOUT:?}");
            conn.close(1u32.into());
            return;
        }
    };
    let hello = match a.expect.admit(&bytes, &cert_names) {
        Ok(h) => h,
        Err(refused) => {
            a.refusals.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%remote, certificate = %cert_names.join(","), code = refused.kind as u32, "refused a peer: {refused}");
            // Tell the peer why, let the verdict arrive, then close with the code.
            let _ = tx
                .send(Bytes::from(encode_verdict(&refused.verdict())))
                .await;
            let _ = tokio::time::timeout(Duration::from_secs(5), tx.close()).await;
            conn.close((refused.kind as u32).into());
            return;
        }
    };
    let link = a
        .expect
        .peers
        .iter()
        .position(|p| *p == hello.region)
        .expect("admitted hellos name a configured peer");
    let welcome = Verdict::Welcome {
        region: a.expect.region.clone(),
        round: a.round.load(Ordering::Relaxed),
    };
    if tx
        .send(Bytes::from(encode_verdict(&welcome)))
        .await
        .is_err()
        || tx.close().await.is_err()
    {
        tracing::warn!(peer = %hello.region, %remote, "WAN connection lost during its handshake");
        return;
    }
    tracing::info!(peer = %hello.region, %remote, peer_round = hello.round, "peer connected");
    let region = hello.region.clone();
    let _ = a.events.send(WanEvent::PeerHello { link, hello });
    loop {
        match conn.accept().await {
            Ok(Some(PeerStream::Bidirectional(stream))) => {
                tokio::spawn(serve_stream(stream, link, a.clone(), region.clone()));
            }
            Ok(Some(PeerStream::Receive(_))) => {
                a.bad_streams.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %region, "dropped a unidirectional stream (not part of the protocol)");
            }
            Ok(None) => break,
            Err(e) => {
                tracing::info!(peer = %region, "peer's connection closed: {e}");
                break;
            }
        }
    }
}

/// One stream from an admitted peer: messages (handed to the core, then acknowledged) or
/// a snapshot request.
async fn serve_stream(stream: BidirectionalStream, link: usize, a: Arc<Acceptor>, peer: String) {
    let (mut rx, mut tx) = stream.split();
    // A stream holds one large message or small ones up to the target.
    let limit = a.max_message.max(STREAM_TARGET_BYTES).saturating_add(5);
    let bytes = match read_to_end(&mut rx, limit).await {
        Ok(bytes) => bytes,
        Err(e) => {
            // A broken connection: the sender resends what was not acknowledged.
            tracing::debug!(%peer, "stream cut short: {e:#}");
            return;
        }
    };
    match bytes.split_first() {
        Some((&STREAM_MESSAGES, body)) => match decode_stream(body, a.max_message) {
            Ok(messages) => {
                {
                    // Closed at shutdown: what is not handed over by then is not
                    // acknowledged, so the sender keeps it and sends it again.
                    let open = a.open.read().expect("gate");
                    if !*open {
                        return;
                    }
                    for m in messages {
                        let handed = a.events.send(WanEvent::Message {
                            link,
                            bytes: m.to_vec(),
                        });
                        if handed.is_err() {
                            // The core is gone: no acknowledgement, the sender keeps it.
                            return;
                        }
                    }
                }
                let _ = tx.send(Bytes::from_static(ACK)).await;
                let _ = tx.close().await;
            }
            Err(e) => {
                a.bad_streams.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, "refused a malformed stream: {e}");
                // Say so, or the sender would resend it forever.
                let _ = tx.send(Bytes::from_static(REJECT)).await;
                let _ = tx.close().await;
            }
        },
        Some((&STREAM_SNAPSHOT, _)) if bytes == SNAPSHOT_REQUEST => {
            serve_snapshot(tx, link, a, peer).await;
        }
        _ => {
            a.bad_streams.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "dropped a stream of unknown kind");
        }
    }
}

/// Answers a peer's snapshot request with this region's state (from the core).
async fn serve_snapshot(
    mut tx: s2n_quic::stream::SendStream,
    link: usize,
    a: Arc<Acceptor>,
    peer: String,
) {
    let outcome = async {
        let (reply, answer) = tokio::sync::oneshot::channel();
        a.events
            .send(WanEvent::SnapshotRequest { link, reply })
            .map_err(|_| anyhow!("the agent is shutting down"))?;
        let bytes = tokio::time::timeout(Duration::from_secs(60), answer)
            .await
            .map_err(|_| anyhow!("no snapshot within 60 s"))?
            .map_err(|_| anyhow!("the agent dropped the request"))?;
        let size = bytes.len();
        tx.send(Bytes::from(bytes)).await?;
        tx.close().await?;
        anyhow::Ok(size)
    };
    match outcome.await {
        Ok(size) => tracing::info!(%peer, bytes = size, "served a snapshot"),
        Err(e) => tracing::warn!(%peer, "snapshot request failed: {e:#}"),
    }
}
