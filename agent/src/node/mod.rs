//! One region as its own process (`weightgrad agent`): loads its data shard, model and
//! policy from the configuration, starts the QUIC endpoints, one link task per peer and the
//! accepting side, and runs the [`core`] loop until the run is over or it is told to stop.

pub mod checkpoint;
pub mod core;
pub mod evaluator;
pub mod liveness;
pub mod status;

use crate::admin::{AdminState, auth::Token};
use crate::config::AgentConfig;
use crate::lan::RegionTrainer;
use crate::policies::merge_mode_for;
use crate::policy::{Breaker, PolicyRuntime, Sandbox, SandboxLimits, builtin_wasm};
use crate::sync::{RegionSync, SyncConfig};
use crate::train::dataset::RegionLayout;
use crate::wan::handshake::{Expectation, Hello, PROTOCOL_VERSION};
use crate::wan::inbound::{self, Acceptor};
use crate::wan::link::{self, Dialer};
use crate::wan::telemetry::LinkTelemetry;
use crate::wan::{endpoint, tls::TlsIdentity};
use anyhow::{Context, Result, anyhow, bail};
pub use core::{AgentReport, Core, Evaluation, LinkReport, WanCounters};
use status::Status;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Loads the policy the configuration names (a built-in or a `.wasm` file) into the
/// sandbox and self-tests it.
pub fn load_policy(cfg: &AgentConfig) -> Result<PolicyRuntime> {
    let bytes = match cfg.policy.wasm_path() {
        Some(path) => std::fs::read(&path)
            .with_context(|| format!("policy.source: reading {}", path.display()))?,
        None => builtin_wasm(&cfg.policy.source)
            .ok_or_else(|| {
                anyhow!(
                    "policy.source: {:?} is neither a built-in policy nor a .wasm file",
                    cfg.policy.source
                )
            })?
            .to_vec(),
    };
    let sandbox = Arc::new(Sandbox::new(SandboxLimits {
        deadline: Duration::from_millis(cfg.policy.deadline_ms),
        ..SandboxLimits::default()
    })?);
    let breaker = Breaker {
        rollback_after: cfg.policy.rollback_after,
    };
    PolicyRuntime::with_breaker(sandbox, &bytes, cfg.policy.on_failure, breaker)
        .map_err(|e| anyhow!("policy.source: {}: {e}", cfg.policy.source))
}

/// Runs the agent until its run is over or `stop` is set.
pub fn run(cfg: AgentConfig, stop: Arc<AtomicBool>) -> Result<AgentReport> {
    let t = &cfg.training;
    let region_index = cfg.data.shard.index;
    let source = cfg.data_source().map_err(anyhow::Error::msg)?;
    let data = source.load(t.seed)?;
    let strategy = cfg.shard_strategy().map_err(anyhow::Error::msg)?;
    let spec = cfg.model_spec().map_err(anyhow::Error::msg)?;
    let layout = RegionLayout {
        regions: cfg.data.shard.count,
        workers: t.workers,
        batch_size: t.batch_size,
        strategy,
        seed: t.seed,
    };
    let shards = layout
        .worker_shards(&data.train.labels, region_index)
        .iter()
        .map(|idx| data.train.subset(idx))
        .collect();
    let mut trainer = RegionTrainer::new(
        &cfg.region,
        &spec,
        shards,
        data.train.classes,
        t.batch_size,
        t.seed,
        t.seed.wrapping_add(region_index as u64 * 7919),
    )?;
    trainer.set_placement(cfg.lan);
    let spe = layout.steps_per_epoch(&data.train.labels);
    let total_rounds = spe * t.epochs as u64;
    let policy = Arc::new(load_policy(&cfg)?);
    let policy_name = policy.active().info.name.clone();
    let peers: Vec<String> = cfg.peers.iter().map(|p| p.name.clone()).collect();
    let merge = merge_mode_for(&policy_name);
    // Audit per-link conservation while its f64 sums stay small (≤ 256 MiB).
    let numel: usize = trainer.metas().iter().map(|m| m.numel).sum();
    let audit = numel * (peers.len() + 1) * 8 <= 256 << 20;
    let sync_cfg = SyncConfig {
        max_staleness: t.max_staleness,
        merge,
        audit,
        ..SyncConfig::default()
    };
    // A frame the peers would refuse as too large would be lost: refuse such a model here.
    let limits = sync_cfg.limits;
    if let Some((i, m)) = trainer
        .metas()
        .iter()
        .enumerate()
        .find(|(_, m)| !limits.admits_tensor(m.numel))
    {
        anyhow::bail!(
            "training.model {}: tensor {i} has {} elements; one update frame for it could \
             exceed the {}-byte frame limit, which peers refuse (at most about {} elements \
             per tensor)",
            t.model,
            m.numel,
            limits.max_frame,
            (limits
                .max_frame
                .saturating_sub(limits.max_header + weightgrad_codec::frame::PREAMBLE)
                / 4)
            .min(limits.max_payload / 4)
            .min(limits.max_elements)
        );
    }
    let max_message = sync_cfg.limits.max_frame;
    let mut sync = RegionSync::new(
        &cfg.region,
        &peers,
        trainer.metas().to_vec(),
        sync_cfg,
        t.seed ^ ((region_index as u64 + 1) << 32),
    );
    sync.start(&trainer.weights);
    let manifest = trainer.manifest_hash();
    tracing::info!(
        region = %cfg.region,
        policy = %policy_name,
        digest = %policy.active().digest,
        model = %t.model,
        manifest = %manifest,
        rounds = total_rounds,
        samples = trainer.samples(),
        "agent starting"
    );

    let token = match &cfg.admin.token_file {
        Some(path) => Some(Token::from_file(path).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let identity = TlsIdentity::load(&cfg.tls)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("weightgrad-wan")
        .build()?;
    let _guard = runtime.enter();
    let prometheus = match crate::telemetry::install(&cfg.region) {
        Ok(h) => {
            crate::telemetry::spawn_upkeep(h.clone());
            Some(h)
        }
        Err(e) => {
            tracing::warn!("metrics disabled: {e:#}");
            None
        }
    };
    let status = Arc::new(RwLock::new(Status {
        region: cfg.region.clone(),
        state: "starting",
        total_rounds,
        ..Status::default()
    }));
    let mut loaded_at = HashMap::new();
    loaded_at.insert(policy.active().digest.clone(), status::now_rfc3339());
    let admin = Arc::new(AdminState {
        status: status.clone(),
        policy: policy.clone(),
        compatible: Box::new(move |p| {
            let theirs = merge_mode_for(&p.info.name);
            if theirs == merge {
                Ok(())
            } else {
                Err(format!(
                    "policy {} merges updates as {theirs:?}, this run as {merge:?}; a run keeps its merge mode",
                    p.info.name
                ))
            }
        }),
        token,
        prometheus,
        loaded_at: Mutex::new(loaded_at),
        max_body: SandboxLimits::default().max_component_bytes,
    });
    runtime.block_on(crate::admin::serve(cfg.admin.listen, admin))?;
    let telemetry = LinkTelemetry::default();
    let server = endpoint::server(
        &cfg.wan,
        cfg.wan.listen,
        &identity,
        &peers,
        telemetry.clone(),
    )?;
    let bind: SocketAddr = if cfg.wan.listen.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let client = endpoint::client(&cfg.wan, &identity, bind, telemetry.clone())?;
    let (events_tx, events_rx) = std::sync::mpsc::channel();
    let round = Arc::new(AtomicU64::new(0));
    let checkpoint_path = checkpoint::path(&cfg.checkpoint.dir, &cfg.region);
    let resume = checkpoint::AgentCheckpoint::load(&checkpoint_path)?;
    if let Some(ck) = &resume {
        ck.check(&cfg.region, &manifest, total_rounds, &checkpoint_path)?;
        // Hellos and welcomes tell peers where this region stands from the start.
        round.store(ck.sync.round(), std::sync::atomic::Ordering::Relaxed);
    }
    let acceptor = Arc::new(Acceptor {
        expect: Expectation {
            region: cfg.region.clone(),
            peers: peers.clone(),
            manifest: manifest.clone(),
        },
        round: round.clone(),
        events: events_tx.clone(),
        max_message,
        refusals: Arc::new(AtomicU64::new(0)),
        bad_streams: Arc::new(AtomicU64::new(0)),
        open: RwLock::new(true),
    });
    let wan_counters = WanCounters {
        tls_refusals: telemetry.tls_refusals.clone(),
        handshake_refusals: acceptor.refusals.clone(),
        bad_streams: acceptor.bad_streams.clone(),
    };
    tracing::info!(listen = %server.local_addr()?, "WAN endpoint listening");
    runtime.spawn(inbound::serve(server, acceptor.clone()));
    let hello = {
        let (region, manifest, round) = (cfg.region.clone(), manifest.clone(), round.clone());
        Arc::new(move || Hello {
            protocol: PROTOCOL_VERSION,
            region: region.clone(),
            manifest: manifest.clone(),
            round: round.load(std::sync::atomic::Ordering::Relaxed),
        })
    };
    let links = cfg
        .peers
        .iter()
        .enumerate()
        .map(|(l, p)| {
            link::spawn(Dialer {
                link: l,
                peer: p.name.clone(),
                address: p.address.clone(),
                client: client.clone(),
                hello: hello.clone(),
                events: events_tx.clone(),
                seed: t.seed ^ (region_index as u64) << 8 ^ l as u64,
                max_snapshot: core::MAX_SNAPSHOT_BYTES,
            })
            .0
        })
        .collect();
    drop(events_tx);
    runtime.spawn(watch_signals(stop.clone()));
    if cfg.peers.is_empty() {
        bail!("peers: an agent needs at least one peer (use `weightgrad train` for one region)");
    }
    let core = Core {
        region: cfg.region.clone(),
        trainer,
        sync,
        policy,
        manifest,
        test: Arc::new(data.test),
        links,
        configured: (cfg.wan.bandwidth_mbps * 1e6, cfg.wan.rtt_ms / 1e3),
        total_rounds,
        steps_per_epoch: spe,
        evaluate_every: crate::train::evaluation_interval(t.evaluate_every_rounds, spe),
        lr: t.lr,
        regions: (peers.len() + 1) as u32,
        deadline: Duration::try_from_secs_f64(cfg.wan.peer_deadline_s).unwrap_or(Duration::MAX),
        round,
        stop,
        wan_counters,
        status,
        acceptor,
        checkpoint_path,
        checkpoint_every: cfg.checkpoint.every_rounds,
        resume,
        overlap: t.overlap && merge == crate::sync::MergeMode::Sum,
        evaluate_in_background: t.evaluate_in_background,
    };
    let report = core.run(events_rx);
    // The links' queues are closed now: their tasks close the connections. Give the
    // closes a moment to reach the peers.
    runtime.block_on(tokio::time::sleep(Duration::from_millis(300)));
    drop(client);
    runtime.shutdown_timeout(Duration::from_secs(1));
    report
}

/// Sets `stop` on SIGINT or SIGTERM.
async fn watch_signals(stop: Arc<AtomicBool>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::warn!("cannot install signal handlers; stop the agent with SIGKILL");
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("stop requested: finishing the current round");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}
