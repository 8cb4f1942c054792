//! Bad input over the real path: an admitted peer (it holds a valid certificate) sends a
//! running agent streams of an unknown kind, malformed framing, and well-framed messages that
//! are garbage, zstd bombs, frames for a tensor the model lacks, or of the wrong length. Each
//! is refused with a reason in the log and counted; the agent keeps training, nothing of the
//! honest peer's updates is lost, and every round of the run completes.

use bytes::Bytes;
use rand::SeedableRng;
use s2n_quic::client::Connect;
use std::time::Duration;
use weightgrad::codec::frame::{
    Compression, EncodeOptions, FrameHeader, FrameMeta, Update, assemble, encode,
};
use weightgrad::codec::quant::{Quantizer, Scheme};
use weightgrad::config::AgentConfig;
use weightgrad::wan::framing::encode_stream;
use weightgrad::wan::handshake::{Hello, PROTOCOL_VERSION, Verdict, decode_verdict, encode_hello};
use weightgrad::wan::link::{ACK, REJECT, STREAM_MESSAGES};
use weightgrad::wan::telemetry::LinkTelemetry;
use weightgrad::wan::{endpoint, tls};
use weightgrad_tests::cluster::*;

/// A frame whose zstd payload expands to 10 MiB while its header declares 1,600 bytes.
fn zstd_bomb(sender: &str) -> Vec<u8> {
    let bomb = zstd::bulk::compress(&vec![0u8; 10 << 20], 3).unwrap();
    let header = FrameHeader {
        sender: sender.into(),
        clock: 0,
        tensor: 0,
        len: 400,
        scheme: Scheme::Fp32,
        scales: vec![],
        sparse: None,
        raw_len: 1600,
        compression: Compression::Zstd,
    };
    assemble(&header, &bomb).unwrap()
}

/// A well-formed fp32 frame for `tensor` with `len` elements.
fn frame(sender: &str, tensor: u32, len: usize) -> Vec<u8> {
    let meta = FrameMeta {
        sender: sender.into(),
        clock: 0,
        tensor,
    };
    let opts = EncodeOptions {
        quantizer: Quantizer::Fp32,
        zstd_level: Some(3),
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    encode(&meta, len, &Update::Dense(vec![0.5; len]), &opts, &mut rng)
        .unwrap()
        .bytes
}

/// Sends one bidirectional stream and returns what the agent answered.
async fn stream(conn: &mut s2n_quic::Connection, bytes: Vec<u8>) -> Vec<u8> {
    let mut s = conn.open_bidirectional_stream().await.unwrap();
    s.send(Bytes::from(bytes)).await.unwrap();
    s.finish().unwrap();
    let mut answer = Vec::new();
    while let Ok(Some(chunk)) = s.receive().await {
        answer.extend_from_slice(&chunk);
    }
    answer
}

#[test]
fn garbage_from_an_admitted_peer_is_refused_and_the_run_goes_on() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // Two regions: us-east, and eu-west, whose certificate the rogue uses too.
    let mut agents = loopback(
        dir.path(),
        &["us-east", "eu-west"],
        "",
        &|_| "epochs = 12".into(),
        "",
    );
    agents.iter_mut().for_each(Agent::start);
    wait_for("us-east to train", Duration::from_secs(60), || {
        latest_round(&agents[0].log()) >= 20
    });

    // The rogue: eu-west's certificate, a correct hello, then bad streams to us-east.
    let cfg = AgentConfig::load(&agents[1].config).unwrap();
    let us_east = AgentConfig::load(&agents[0].config).unwrap().wan.listen;
    let manifest = weightgrad::train::model::Model::new(
        &cfg.model_spec().unwrap(),
        &[64],
        10,
        0,
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .manifest()
    .hash();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let answers = rt.block_on(async {
        let id = tls::TlsIdentity::load(&cfg.tls).unwrap();
        let client = endpoint::client(
            &cfg.wan,
            &id,
            "127.0.0.1:0".parse().unwrap(),
            LinkTelemetry::default(),
        )
        .unwrap();
        let mut conn = client
            .connect(Connect::new(us_east).with_server_name("us-east"))
            .await
            .unwrap();
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            region: "eu-west".into(),
            manifest,
            round: 0,
        };
        let verdict = stream(&mut conn, encode_hello(&hello)).await;
        assert!(
            matches!(decode_verdict(&verdict), Ok(Verdict::Welcome { .. })),
            "{:?}",
            decode_verdict(&verdict)
        );
        let mut answers = Vec::new();
        // A stream of a kind the protocol does not have: dropped without an answer.
        answers.push(stream(&mut conn, b"Xjunk".to_vec()).await);
        // A length prefix promising more than the stream holds: refused as malformed.
        let mut bad_framing = vec![STREAM_MESSAGES];
        bad_framing.extend((1u32 << 30).to_le_bytes());
        bad_framing.extend(b"short");
        answers.push(stream(&mut conn, bad_framing).await);
        // Well-framed messages, each bad in its own way: acknowledged as delivered, then
        // refused one by one by the agent's core.
        let bad: Vec<Vec<u8>> = vec![
            b"not a message".to_vec(),
            zstd_bomb("eu-west"),
            frame("eu-west", 999, 10),
            frame("eu-west", 0, 7),
        ];
        let mut body = vec![STREAM_MESSAGES];
        body.extend(encode_stream(bad.iter().map(Vec::as_slice)));
        answers.push(stream(&mut conn, body).await);
        conn.close(0u32.into());
        answers
    });
    assert_eq!(answers[0], b"", "an unknown stream kind gets no answer");
    assert_eq!(answers[1], REJECT, "malformed framing is refused");
    assert_eq!(answers[2], ACK, "well-framed messages are taken in");

    let reports: Vec<_> = finish_all(&mut agents, Duration::from_secs(300));
    let total = reports[1]["rounds"].as_u64().unwrap();
    assert_complete_and_conserved(&reports, total);
    let us = &reports[0];
    assert_eq!(us["bad_streams"], 2, "{us}");
    assert_eq!(us["links"][0]["rejected"], 4, "{us}");
    assert_eq!(reports[1]["links"][0]["rejected"], 0);
    let log = agents[0].log();
    for reason in [
        "dropped a stream of unknown kind",
        "refused a malformed stream",
        "not a WeightGrad frame (bad magic)",
        "bad compressed payload",
        "tensor 999 does not exist",
        "the frame says 7",
    ] {
        assert!(
            log.contains(reason),
            "us-east's log names {reason:?}:\n{}",
            tail(&log)
        );
    }
}
