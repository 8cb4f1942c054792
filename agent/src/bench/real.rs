//! `weightgrad bench --real`: runs a policy as real agent processes talking QUIC through
//! the WAN emulator (one relay per direction of dialling, shaped like the scenario's
//! links), then runs the simulator with its per-step cost set to the agents' measured
//! per-round work and each link's loss to the share of its datagrams that began a
//! queue-drop episode in the emulator, over several draws of the links' jitter and loss
//! (`--sim-draws`), so the two can be compared on WAN bytes and on time.

use crate::config::{Congestion, InitialWindow};
use crate::node::Evaluation;
use crate::sim::{EvalPoint, SimConfig, SimReport, run};
use crate::train::DataSplit;
use crate::train::dataset::DataSource;
use crate::wan::relay::{self, Relay, RelayConfig};
use crate::wan::shaper::Shaping;
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A policy run for real and in the simulator.
#[derive(Debug, Clone, Serialize)]
pub struct RealCheck {
    /// Policy name.
    pub policy: String,
    /// WAN bytes all agents sent.
    pub real_wan_bytes: u64,
    /// WAN bytes in the simulator: the mean over [`Self::sim_wan_bytes_draws`], rounded.
    pub sim_wan_bytes: u64,
    /// The simulator's WAN bytes for each draw of the links' jitter and loss, in draw
    /// order: where a run's timing moves its trajectory (a policy reading its links'
    /// backlog, staleness changing which updates are non-zero), its bytes move with it.
    pub sim_wan_bytes_draws: Vec<u64>,
    /// Seconds from the first round to every region having every peer's last round (the
    /// slowest region).
    pub real_seconds: f64,
    /// Virtual seconds of the simulator with the measured per-round cost and queue drops:
    /// the mean over [`Self::sim_seconds_draws`].
    pub sim_seconds: f64,
    /// The simulator's virtual seconds for each draw of the links' jitter and loss, in
    /// draw order (0, 1, ...).
    pub sim_seconds_draws: Vec<f64>,
    /// Seconds from the first agent's first round to the first evaluation round at which
    /// every agent had reached the target top-1 (when the last of them measured it); none
    /// when they never did.
    pub real_seconds_to_target: Option<f64>,
    /// WAN bytes all agents had sent by that evaluation.
    pub real_wan_bytes_to_target: Option<u64>,
    /// The same in the simulator, virtual seconds (mean over the draws that reached it).
    pub sim_seconds_to_target: Option<f64>,
    /// How many of the simulator's draws reached the target.
    pub sim_draws_reaching_target: usize,
    /// The measured per-round cost (mean over regions), seconds: the region's own work
    /// (step, policy, encoding, evaluations) plus decoding and merging its peers' updates.
    pub busy_seconds_per_round: f64,
    /// Of it, decoding and merging peers' updates (mean over regions), seconds.
    pub receive_seconds_per_round: f64,
    /// How long one test-set evaluation held its agent (mean over regions), seconds: part
    /// of the per-round cost, which the calibrated simulator charges where the agents
    /// spend it (between two steps, holding the region) rather than spread over every
    /// step. About zero where the agents evaluate beside training.
    pub evaluation_seconds: f64,
    /// Lowest final top-1 of the agents.
    pub real_accuracy: f64,
    /// Lowest final top-1 in the simulator (mean over the draws).
    pub sim_accuracy: f64,
    /// Datagrams the WAN emulator delivered, every direction.
    pub emulator_datagrams: u64,
    /// Datagrams it dropped on a full queue (a queue of one bandwidth-delay product),
    /// every direction: each a lost datagram its sender resends.
    pub emulator_queue_drops: u64,
    /// The congestion episodes those drops fell in, every direction: drops within a round
    /// trip of an episode's first are one episode (the senders react to them once).
    pub emulator_queue_drop_episodes: u64,
    /// UDP datagrams the host's kernel dropped on full socket receive buffers while the
    /// agents ran (`RcvbufErrors` in `/proc/net/snmp`, every socket on the host): losses
    /// outside the emulator, from an agent or the relay not reading in time. `None` where
    /// the counter cannot be read.
    pub host_receive_buffer_drops: Option<u64>,
    /// Compute threads each agent had ([`compute_threads`]).
    pub compute_threads: usize,
    /// Datagram bytes the emulator delivered on the links' data directions over the update
    /// bytes the agents counted: what their transport added (the simulator's links are
    /// calibrated per link by it).
    pub wire_overhead: f64,
    /// Mean over the agents' steps and links of the rounds the peer's delivered rounds
    /// were behind the agent's finished ones when a step started: the staleness the
    /// agents actually trained at.
    pub real_rounds_behind_mean: f64,
    /// The same in the simulator (mean over the draws).
    pub sim_rounds_behind_mean: f64,
    /// The largest share of the run any agent's link was busy (a stream sent and not yet
    /// acknowledged by the peer): near 1 where a link sets the pace.
    pub real_busiest_link_busy_share: f64,
    /// The same in the simulator ([`SimReport::busiest_link_busy_share`], mean over the
    /// draws).
    pub sim_busiest_link_busy_share: f64,
    /// What the emulator measured on each link's data direction, which the simulator was
    /// calibrated by: kept so the calibrated simulation can be studied again without
    /// running the agents.
    pub links: Vec<LinkMeasure>,
    /// The agents' evaluations on one clock ([`curve`]): `virtual_seconds` holds real
    /// seconds from the earliest first round; no LAN bytes.
    pub curve: Vec<EvalPoint>,
}

#[cfg(test)]
impl RealCheck {
    /// A check of `policy` with every figure zero or empty, for tests to fill in.
    pub(crate) fn placeholder(policy: &str) -> Self {
        Self {
            policy: policy.into(),
            real_wan_bytes: 0,
            sim_wan_bytes: 0,
            sim_wan_bytes_draws: Vec::new(),
            real_seconds: 0.0,
            sim_seconds: 0.0,
            sim_seconds_draws: Vec::new(),
            real_seconds_to_target: None,
            real_wan_bytes_to_target: None,
            sim_seconds_to_target: None,
            sim_draws_reaching_target: 0,
            busy_seconds_per_round: 0.0,
            receive_seconds_per_round: 0.0,
            evaluation_seconds: 0.0,
            real_accuracy: 0.0,
            sim_accuracy: 0.0,
            emulator_datagrams: 0,
            emulator_queue_drops: 0,
            emulator_queue_drop_episodes: 0,
            host_receive_buffer_drops: None,
            compute_threads: 1,
            wire_overhead: 1.0,
            real_rounds_behind_mean: 0.0,
            sim_rounds_behind_mean: 0.0,
            real_busiest_link_busy_share: 0.0,
            sim_busiest_link_busy_share: 0.0,
            links: Vec::new(),
            curve: Vec::new(),
        }
    }
}

impl RealCheck {
    /// Real over simulated WAN bytes.
    pub fn bytes_ratio(&self) -> f64 {
        self.real_wan_bytes as f64 / self.sim_wan_bytes.max(1) as f64
    }

    /// Real over simulated time.
    pub fn time_ratio(&self) -> f64 {
        self.real_seconds / self.sim_seconds.max(1e-9)
    }
}

struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The `RcvbufErrors` counter of the `Udp:` lines of a `/proc/net/snmp` text.
fn udp_receive_buffer_errors(snmp: &str) -> Option<u64> {
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let column = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(column)?.parse().ok()
}

/// This host's UDP receive-buffer drops so far (Linux only).
fn host_receive_buffer_errors() -> Option<u64> {
    udp_receive_buffer_errors(&std::fs::read_to_string("/proc/net/snmp").ok()?)
}

/// A TOML string literal holding `s`.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// `p` as a TOML string, made absolute: an agent reads a config's relative paths against
/// the config file's directory, not the bench's working directory.
fn toml_path(p: &Path) -> String {
    let p = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    toml_string(&p.display().to_string())
}

/// The agent config's `[data]` keys that name `source` (the shard is written apart).
fn data_keys(source: &DataSource) -> String {
    match source {
        DataSource::Digits => "kind = \"digits\"\n".to_string(),
        DataSource::Idx { dir } => format!("kind = \"idx\"\npath = {}\n", toml_path(dir)),
        DataSource::Cifar10 { dir } => format!("kind = \"cifar10\"\npath = {}\n", toml_path(dir)),
        DataSource::Csv {
            train,
            test,
            label_column,
        } => {
            let mut t = format!("kind = \"csv\"\npath = {}\n", toml_path(train));
            if let Some(test) = test {
                t += &format!("test = {}\n", toml_path(test));
            }
            if let Some(c) = label_column {
                t += &format!("label_column = {}\n", toml_string(c));
            }
            t
        }
        DataSource::Text { path, window } => {
            format!(
                "kind = \"text\"\npath = {}\nwindow = {window}\n",
                toml_path(path)
            )
        }
    }
}

/// How the real agents of a check run.
pub struct Agents<'a> {
    /// The `weightgrad` binary they run.
    pub exe: &'a Path,
    /// Their working directory: certificates, configs, logs, reports, state.
    pub dir: &'a Path,
    /// Their WAN connections' congestion controller.
    pub congestion: Congestion,
    /// Where their connections' congestion windows start.
    pub initial_window: InitialWindow,
    /// Whether a round's WAN work runs beside the next step (`[training] overlap`).
    pub overlap: bool,
    /// How long the run may take before it is stopped as stuck.
    pub timeout: Duration,
    /// Draws of the links' jitter and loss the simulator's prediction averages (at least
    /// one): a WAN-bound run's time depends on where its losses fall.
    pub sim_draws: u64,
}

/// One agent of a `--real` run: what its config file says.
struct AgentSlot<'a> {
    cfg: &'a SimConfig,
    congestion: Congestion,
    initial_window: InitialWindow,
    overlap: bool,
    source: &'a DataSource,
    policy: &'a str,
    /// Region index in `cfg.topology`.
    region: usize,
    listen: SocketAddr,
    /// Per region index, the address this agent dials it at (its own slot unused).
    peers_via: &'a [String],
    certs: &'a Path,
    state: &'a Path,
}

/// The agent config file for `slot`: the scenario's region, link, data, model and
/// training settings, as the simulator runs them.
fn agent_config(slot: &AgentSlot<'_>) -> Result<String> {
    let cfg = slot.cfg;
    let regions = &cfg.topology.regions;
    let (i, n) = (slot.region, regions.len());
    let region = &regions[i];
    // Flow-control windows are sized from `[wan]`: give the region's link with the largest
    // bandwidth-delay product, so that no link of it is held back by its window.
    let link = (0..n)
        .filter(|&j| j != i)
        .map(|j| cfg.topology.link(i, j))
        .max_by(|a, b| (a.bandwidth_bps * a.rtt_s).total_cmp(&(b.bandwidth_bps * b.rtt_s)))
        .context("a scenario region with no peer")?;
    let shard = match cfg.sharding {
        crate::train::dataset::ShardStrategy::Iid => "iid",
        crate::train::dataset::ShardStrategy::LabelSkew => "label-skew",
    };
    // The config's own spelling of the controller (its serde names).
    let congestion = toml::Value::try_from(slot.congestion)?;
    let initial_window = toml::Value::try_from(slot.initial_window)?;
    let mut t = format!(
        "region = {}\n[wan]\nlisten = \"{}\"\nbandwidth_mbps = {}\nrtt_ms = {}\npeer_deadline_s = 120\ncongestion = {congestion}\ninitial_window = {initial_window}\n",
        toml_string(region),
        slot.listen,
        link.bandwidth_bps / 1e6,
        link.rtt_s * 1e3
    );
    for (j, peer) in regions.iter().enumerate().filter(|(j, _)| *j != i) {
        writeln!(
            t,
            "[[peers]]\nname = {}\naddress = {}",
            toml_string(peer),
            toml_string(&slot.peers_via[j])
        )?;
    }
    writeln!(
        t,
        "[tls]\nca = {}\ncert = {}\nkey = {}",
        toml_path(&slot.certs.join("ca.pem")),
        toml_path(&slot.certs.join(format!("{region}.pem"))),
        toml_path(&slot.certs.join(format!("{region}.key")))
    )?;
    writeln!(
        t,
        "[data]\n{}[data.shard]\nindex = {i}\ncount = {n}\nstrategy = \"{shard}\"\n[training]\nmodel = {}\nworkers = {}\nbatch_size = {}\nepochs = {}\nlr = {}\nseed = {}\nmax_staleness = {}\noverlap = {}",
        data_keys(slot.source),
        toml_string(&cfg.model.to_string()),
        cfg.workers,
        cfg.batch_size,
        cfg.epochs,
        cfg.lr,
        cfg.seed,
        cfg.sync.max_staleness,
        slot.overlap
    )?;
    if let Some(every) = cfg.evaluate_every {
        writeln!(t, "evaluate_every_rounds = {every}")?;
    }
    writeln!(
        t,
        "[policy]\nsource = {}\n[admin]\nlisten = \"127.0.0.1:0\"\n[checkpoint]\ndir = {}\nevery_rounds = 1000000000",
        toml_string(slot.policy),
        toml_path(slot.state)
    )?;
    Ok(t)
}

/// The agents' evaluations on one clock, from their reports (`training_started_unix` and
/// `evaluations`): for each round every agent evaluated, the seconds from the earliest
/// first round to the last agent's evaluation of it, the WAN bytes all agents had sent by
/// their evaluations of it, and the lowest top-1. Empty when an agent never started a round
/// (there is no common clock then).
pub fn curve(reports: &[serde_json::Value]) -> Vec<EvalPoint> {
    let Some(start) = reports
        .iter()
        .map(|r| r["training_started_unix"].as_f64())
        .collect::<Option<Vec<f64>>>()
        .map(|starts| starts.into_iter().fold(f64::INFINITY, f64::min))
    else {
        return Vec::new();
    };
    // Written by this binary's agents: a report without them has no evaluations.
    let evaluations = |r: &serde_json::Value| -> Vec<Evaluation> {
        serde_json::from_value(r["evaluations"].clone()).unwrap_or_default()
    };
    let all: Vec<Vec<Evaluation>> = reports.iter().map(evaluations).collect();
    let Some(first) = all.first() else {
        return Vec::new();
    };
    first
        .iter()
        .filter_map(|e| {
            let at: Vec<&Evaluation> = all
                .iter()
                .map(|evals| evals.iter().find(|x| x.round == e.round))
                .collect::<Option<_>>()?;
            Some(EvalPoint {
                round: e.round,
                virtual_seconds: at
                    .iter()
                    .map(|x| x.unix_seconds)
                    .fold(f64::NEG_INFINITY, f64::max)
                    - start,
                wan_bytes: at.iter().map(|x| x.wan_bytes).sum(),
                lan_bytes: 0,
                min_accuracy: at
                    .iter()
                    .map(|x| x.test_accuracy)
                    .fold(f64::INFINITY, f64::min),
            })
        })
        .collect()
}

/// The first point of the agents' [`curve`] at which every agent's test top-1 was at least
/// `target`: its seconds on the agents' clock and the WAN bytes sent by then.
pub fn first_reaching(reports: &[serde_json::Value], target: f64) -> Option<(f64, u64)> {
    crate::sim::first_reaching(&curve(reports), target).map(|p| (p.virtual_seconds, p.wan_bytes))
}

/// Compute threads for each of `agents` agents sharing this host's cores: its share, at
/// least one (a peer's ranks get one each). A thread pool larger than its share spins
/// waiting for threads another agent's work has taken the cores from.
pub fn compute_threads(agents: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / agents.max(1)).max(1)
}

/// Runs `policy` under `cfg` as real `agents`, each reading its shard of `source` (loaded
/// here as `data`), then the calibrated simulation on the same data; `policy` must be a
/// built-in name. Time and WAN bytes to target are measured to the top-1 `target`.
pub fn check(
    cfg: &SimConfig,
    source: &DataSource,
    data: &DataSplit,
    policy: &str,
    target: f64,
    agents: &Agents<'_>,
) -> Result<RealCheck> {
    // The agents' configs name their certificates, shards and state by this path, and
    // each config's relative paths are read against the config file's own directory.
    let dir = &std::path::absolute(agents.dir)
        .with_context(|| format!("resolving {}", agents.dir.display()))?;
    let exe = agents.exe;
    if cfg.link_drop.is_some() {
        bail!("--real does not emulate a link that changes mid-run; pick another scenario");
    }
    let regions = &cfg.topology.regions;
    let n = regions.len();
    std::fs::create_dir_all(dir)?;
    let certs = dir.join("certs");
    if !certs.join("ca.pem").exists() {
        crate::wan::certs::init(regions, &certs, false)?;
    }
    let listen: Vec<SocketAddr> = (0..n)
        .map(|_| crate::loopback_port::unused())
        .collect::<Result<_>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // Each relay with the link its clients' data crosses (dialler to listener).
    let mut relays: Vec<(Relay, (usize, usize))> = Vec::new();
    let mut via = vec![vec![String::new(); n]; n];
    for (i, row) in via.iter_mut().enumerate() {
        for (j, slot) in row.iter_mut().enumerate().filter(|(j, _)| *j != i) {
            let shape = |a: usize, b: usize| {
                let l = cfg.topology.link(a, b);
                let mut s = Shaping::new(l.bandwidth_bps / 1e6, l.rtt_s * 1e3 / 2.0);
                s.jitter_s = (l.jitter_s / 2.0).min(s.delay_s);
                s.loss = l.loss;
                s
            };
            let r = rt.block_on(relay::start(RelayConfig {
                listen: "127.0.0.1:0".parse()?,
                upstream: listen[j],
                up: shape(i, j),
                down: shape(j, i),
                seed: cfg.seed ^ (i * n + j) as u64,
            }))?;
            *slot = r.local_addr().to_string();
            relays.push((r, (i, j)));
        }
    }
    let mut children = Children(Vec::new());
    let threads = compute_threads(n);
    let host_drops_before = host_receive_buffer_errors();
    let run_dir = dir.join(policy);
    std::fs::create_dir_all(&run_dir)?;
    for (i, region) in regions.iter().enumerate() {
        let t = agent_config(&AgentSlot {
            cfg,
            congestion: agents.congestion,
            initial_window: agents.initial_window,
            overlap: agents.overlap,
            source,
            policy,
            region: i,
            listen: listen[i],
            peers_via: &via[i],
            certs: &certs,
            state: &run_dir.join(format!("state-{region}")),
        })?;
        let config = run_dir.join(format!("{region}.toml"));
        std::fs::write(&config, t)?;
        // A leftover checkpoint would resume an old run.
        let _ = std::fs::remove_dir_all(run_dir.join(format!("state-{region}")));
        let log = std::fs::File::create(run_dir.join(format!("{region}.log")))?;
        children.0.push(
            Command::new(exe)
                .arg("agent")
                .arg("--config")
                .arg(&config)
                .arg("--report")
                .arg(run_dir.join(format!("{region}.json")))
                .env("RAYON_NUM_THREADS", threads.to_string())
                .env("CANDLE_NUM_THREADS", threads.to_string())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", exe.display()))?,
        );
    }
    let deadline = Instant::now() + agents.timeout;
    for (i, child) in children.0.iter_mut().enumerate() {
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    let log = run_dir.join(format!("{}.log", regions[i]));
                    bail!(
                        "agent {} failed ({status}); see {}; it ended with:\n{}",
                        regions[i],
                        log.display(),
                        super::child_log::tail(&log, super::child_log::QUOTED_LINES)
                    );
                }
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "agents still running after {} s (raise --real-timeout-minutes if the run needs longer); see {}",
                    agents.timeout.as_secs(),
                    run_dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let host_receive_buffer_drops = host_drops_before
        .zip(host_receive_buffer_errors())
        .map(|(before, after)| after.saturating_sub(before));
    let (mut datagrams, mut queue_drops, mut queue_drop_episodes) = (0, 0, 0);
    let mut measured = Vec::new();
    for (r, link) in &relays {
        for d in [&r.stats().up, &r.stats().down] {
            datagrams += d.delivered.load(Ordering::Relaxed);
            queue_drops += d.queue_drops.load(Ordering::Relaxed);
            queue_drop_episodes += d.queue_drop_episodes.load(Ordering::Relaxed);
        }
        // The data direction: the dialler's updates to the listener.
        let up = &r.stats().up;
        let (delivered, dropped, episodes) = (
            up.delivered.load(Ordering::Relaxed),
            up.queue_drops.load(Ordering::Relaxed),
            up.queue_drop_episodes.load(Ordering::Relaxed),
        );
        measured.push(LinkMeasure {
            link: *link,
            queue_loss: episodes as f64 / (delivered + dropped).max(1) as f64,
            queue_drops: dropped,
            queue_drop_episodes: episodes,
            wire_bytes: up.delivered_bytes.load(Ordering::Relaxed),
            update_bytes: 0,
        });
    }
    drop(relays);
    let reports: Vec<serde_json::Value> = regions
        .iter()
        .map(|r| {
            let path = run_dir.join(format!("{r}.json"));
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok(serde_json::from_str(&text)?)
        })
        .collect::<Result<_>>()?;
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let real_wan_bytes = reports
        .iter()
        .map(|r| r["wan_bytes"].as_u64().unwrap_or(0))
        .sum();
    let real_seconds = reports
        .iter()
        .map(|r| f(r, "training_seconds"))
        .fold(0.0, f64::max);
    let mean = |k: &str| reports.iter().map(|r| f(r, k)).sum::<f64>() / n as f64;
    let receive = mean("receive_seconds_per_round");
    // The agents count decoding between rounds in their busy time, and decoding beside a
    // step inside it.
    let busy = mean("busy_seconds_per_round");
    let costs = MeasuredCosts::of(&reports, busy);
    let real_accuracy = reports
        .iter()
        .map(|r| f(r, "test_accuracy"))
        .fold(1.0, f64::min);
    // What each region's agent sent each peer, as it counted the bytes it encoded.
    for m in &mut measured {
        let (from, to) = m.link;
        m.update_bytes = reports[from]["links"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["peer"] == regions[to].as_str())
            .and_then(|l| l["bytes_sent"].as_u64())
            .unwrap_or(0);
    }
    let wire_overhead = measured.iter().map(|m| m.wire_bytes).sum::<u64>() as f64
        / measured.iter().map(|m| m.update_bytes).sum::<u64>().max(1) as f64;
    let calibrated = calibrated(cfg, costs, &measured);
    let draws = (0..agents.sim_draws.max(1))
        .map(|link_draw| {
            let c = SimConfig {
                link_draw,
                ..calibrated.clone()
            };
            simulate(&c, data, policy)
        })
        .collect::<Result<Vec<_>>>()?;
    let sim = Prediction::of(&draws, target);
    let real_to_target = first_reaching(&reports, target);
    let agent_links: Vec<&serde_json::Value> = reports
        .iter()
        .flat_map(|r| r["links"].as_array().into_iter().flatten())
        .collect();
    let real_rounds_behind_mean = agent_links
        .iter()
        .map(|l| l["rounds_behind_mean"].as_f64().unwrap_or(f64::NAN))
        .sum::<f64>()
        / agent_links.len().max(1) as f64;
    let real_busiest_link_busy_share = agent_links
        .iter()
        .map(|l| (l["busy_seconds"].as_f64().unwrap_or(0.0) / real_seconds).min(1.0))
        .fold(0.0, f64::max);
    Ok(RealCheck {
        real_rounds_behind_mean,
        sim_rounds_behind_mean: sim.rounds_behind_mean,
        real_busiest_link_busy_share,
        sim_busiest_link_busy_share: sim.busiest_link_busy_share,
        sim_seconds_draws: sim.seconds_draws,
        sim_wan_bytes_draws: sim.wan_bytes_draws,
        links: measured,
        curve: curve(&reports),
        real_seconds_to_target: real_to_target.map(|t| t.0),
        real_wan_bytes_to_target: real_to_target.map(|t| t.1),
        sim_seconds_to_target: sim.seconds_to_target,
        sim_draws_reaching_target: sim.draws_reaching_target,
        policy: policy.to_string(),
        real_wan_bytes,
        sim_wan_bytes: sim.wan_bytes,
        real_seconds,
        sim_seconds: sim.seconds,
        busy_seconds_per_round: busy,
        receive_seconds_per_round: receive,
        evaluation_seconds: costs.evaluation_s,
        real_accuracy,
        emulator_datagrams: datagrams,
        emulator_queue_drops: queue_drops,
        emulator_queue_drop_episodes: queue_drop_episodes,
        host_receive_buffer_drops,
        compute_threads: threads,
        wire_overhead,
        sim_accuracy: sim.accuracy,
    })
}

/// The simulator's prediction for a `--real` run: the mean over draws of the links'
/// jitter and loss.
#[derive(Debug, Clone, PartialEq)]
struct Prediction {
    seconds: f64,
    seconds_draws: Vec<f64>,
    /// Mean over the draws that reached the target; none when none did.
    seconds_to_target: Option<f64>,
    draws_reaching_target: usize,
    wan_bytes: u64,
    wan_bytes_draws: Vec<u64>,
    /// Mean of each draw's lowest top-1.
    accuracy: f64,
    rounds_behind_mean: f64,
    busiest_link_busy_share: f64,
}

impl Prediction {
    /// The prediction from each draw's report, for time to `target` top-1.
    fn of(draws: &[SimReport], target: f64) -> Self {
        let mean = |f: &dyn Fn(&SimReport) -> f64| {
            draws.iter().map(f).sum::<f64>() / draws.len().max(1) as f64
        };
        let reached: Vec<f64> = draws
            .iter()
            .filter_map(|d| d.first_reaching(target).map(|p| p.virtual_seconds))
            .collect();
        Self {
            seconds: mean(&|d| d.virtual_seconds),
            seconds_draws: draws.iter().map(|d| d.virtual_seconds).collect(),
            seconds_to_target: (!reached.is_empty())
                .then(|| reached.iter().sum::<f64>() / reached.len() as f64),
            draws_reaching_target: reached.len(),
            wan_bytes: mean(&|d| d.wan_bytes as f64).round() as u64,
            wan_bytes_draws: draws.iter().map(|d| d.wan_bytes).collect(),
            accuracy: mean(&|d| d.lowest_accuracy()),
            rounds_behind_mean: mean(&|d| d.rounds_behind_mean),
            busiest_link_busy_share: mean(&|d| d.busiest_link_busy_share),
        }
    }
}

/// What the emulator measured on one link's data direction during a `--real` run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LinkMeasure {
    /// (from, to): the sending region and its peer, as indices in the scenario's regions.
    pub link: (usize, usize),
    /// Share of the direction's datagrams that began a queue-drop episode: the loss rate
    /// the simulator's link is given (a loss there costs its resent bytes, and a round
    /// trip when it falls in its stream's last round trip of sending).
    pub queue_loss: f64,
    /// Datagrams the direction's queue dropped.
    pub queue_drops: u64,
    /// The congestion episodes they fell in (`DirectionStats::queue_drop_episodes`).
    pub queue_drop_episodes: u64,
    /// Datagram bytes it delivered: the updates with their transport's packets around them
    /// (headers, acknowledgements, retransmissions).
    pub wire_bytes: u64,
    /// Bytes of updates the sender counted for this peer.
    pub update_bytes: u64,
}

/// The agents' measured time per round, as the calibrated simulator charges it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct MeasuredCosts {
    /// A round's work outside evaluations, seconds (the simulator's step).
    step_s: f64,
    /// How long one evaluation holds the region, seconds: the agents' evaluation time
    /// between rounds, or with evaluations beside training (`evaluate_in_background`) the
    /// time a round waited for a full queue of them, which is usually none.
    evaluation_s: f64,
    /// Every agent ran its WAN work beside the next step (their reports' `overlap`), so
    /// a round's messages left after an evaluation, not before it.
    overlap: bool,
}

impl MeasuredCosts {
    /// From the agents' reports: `busy` (their mean work per round, evaluations included)
    /// less their mean evaluation time per round (the `evaluate` of their round costs:
    /// what evaluations held the rounds up), and one evaluation's mean hold (each
    /// region's evaluation time over its evaluations; a bench's agents start fresh, so
    /// every round they report is one they trained).
    fn of(reports: &[serde_json::Value], busy: f64) -> Self {
        let n = reports.len().max(1) as f64;
        let evaluate_per_round = |r: &serde_json::Value| {
            r["round_costs"]["evaluate"]
                .as_f64()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .unwrap_or(0.0)
        };
        let per_round = reports.iter().map(evaluate_per_round).sum::<f64>() / n;
        let evaluation_s = reports
            .iter()
            .map(|r| {
                let rounds = r["rounds"].as_u64().unwrap_or(0) as f64;
                let evaluations = r["evaluations"].as_array().map_or(0, Vec::len).max(1) as f64;
                evaluate_per_round(r) * rounds / evaluations
            })
            .sum::<f64>()
            / n;
        Self {
            step_s: (busy - per_round).max(0.0),
            evaluation_s,
            overlap: !reports.is_empty() && reports.iter().all(|r| r["overlap"] == true),
        }
    }
}

/// The simulator's setup for comparing with the agents: their measured per-round work
/// outside evaluations as its step cost, and their measured evaluation time as a hold
/// on the region after each evaluation (an agent evaluates between two steps, and its
/// links drain meanwhile; the same time spread over every step would not let them);
/// each link's loss raised by the share of the link's
/// datagrams that began a queue-drop episode (those drops are the agents' own congestion
/// control overfilling the queue, which the simulator's links, carrying their whole
/// bandwidth from the first byte, would not have; a full queue drops datagrams in runs,
/// so episodes, not dropped datagrams, are the rate; the simulator charges a lost packet
/// its resent bytes, and a round trip when it falls in its stream's last round trip of
/// sending; the agents' congestion control backing off after an episode is not
/// modelled); and each link's bandwidth, which the simulator spends on update bytes
/// alone, cut by the measured share of the wire that was not update bytes (packet
/// headers, acknowledgements, retransmissions; a lost packet's resend is so charged
/// twice, here and by the simulator's loss: a share of a percent at the rates measured).
fn calibrated(cfg: &SimConfig, costs: MeasuredCosts, measured: &[LinkMeasure]) -> SimConfig {
    let mut c = cfg.clone();
    c.compute_s = costs.step_s;
    c.evaluate_s = costs.evaluation_s;
    c.overlap = costs.overlap;
    for m in measured {
        let (from, to) = m.link;
        let link = &mut c.topology.links[from][to];
        let share = m.queue_loss.clamp(0.0, 1.0);
        // Dropped by either: 1 - (1 - loss)(1 - share).
        link.loss += share - link.loss * share;
        if m.update_bytes > 0 && m.wire_bytes > m.update_bytes {
            link.bandwidth_bps *= m.update_bytes as f64 / m.wire_bytes as f64;
        }
    }
    c
}

fn simulate(cfg: &SimConfig, data: &DataSplit, policy: &str) -> Result<SimReport> {
    let mut c = cfg.clone();
    c.sync.merge = crate::policies::merge_mode_for(policy);
    let p = crate::policies::builtin(policy).map_err(anyhow::Error::msg)?;
    run(&c, p.as_ref(), data, &mut |_, _| {})
}

/// The lowest and highest of the draws' figures, each as `show` writes it
/// ("lowest–highest"), or a dash for none.
fn draw_range<T: Copy + PartialOrd>(draws: &[T], show: impl Fn(T) -> String) -> String {
    let Some((&first, rest)) = draws.split_first() else {
        return "—".into();
    };
    let (lowest, highest) = rest.iter().fold((first, first), |(lo, hi), &d| {
        (if d < lo { d } else { lo }, if d > hi { d } else { hi })
    });
    format!("{}–{}", show(lowest), show(highest))
}

/// The simulator's seconds to the target, saying how many draws reached it when not all.
fn sim_to_target(c: &RealCheck) -> String {
    match c.sim_seconds_to_target {
        Some(s) if c.sim_draws_reaching_target < c.sim_seconds_draws.len() => format!(
            "{s:.2} ({} of {} draws)",
            c.sim_draws_reaching_target,
            c.sim_seconds_draws.len()
        ),
        other => seconds(other),
    }
}

/// Seconds with two decimals, or a dash for a target never reached.
fn seconds(s: Option<f64>) -> String {
    or_dash(s.map(|s| format!("{s:.2}")))
}

/// The value, or a dash where there is none.
fn or_dash(v: Option<impl std::fmt::Display>) -> String {
    v.map_or_else(|| "—".to_string(), |v| v.to_string())
}

/// The checks as a Markdown table.
pub fn markdown(checks: &[RealCheck]) -> String {
    let mut out = String::from(
        "| policy | WAN bytes, agents | WAN bytes, simulator (draws: lowest–highest) | ratio | seconds, agents | virtual s, simulator (draws: lowest–highest) | ratio | seconds to target, agents / simulator | WAN bytes to target, agents | measured work per round | of it, receiving | top-1 agents / simulator | emulator queue drops | host receive-buffer drops | wire bytes / update bytes | rounds behind at a step, agents / simulator | busiest link busy, agents / simulator |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for c in checks {
        let _ = writeln!(
            out,
            "| {} | {} | {} ({}) | {:.3} | {:.2} | {:.2} ({}) | {:.3} | {} / {} | {} | {:.1} ms | {:.1} ms | {:.2}% / {:.2}% | {} ({} episodes) of {} | {} | {:.3} | {:.1} / {:.1} | {:.0}% / {:.0}% |",
            c.policy,
            c.real_wan_bytes,
            c.sim_wan_bytes,
            draw_range(&c.sim_wan_bytes_draws, |b| b.to_string()),
            c.bytes_ratio(),
            c.real_seconds,
            c.sim_seconds,
            draw_range(&c.sim_seconds_draws, |s| format!("{s:.2}")),
            c.time_ratio(),
            seconds(c.real_seconds_to_target),
            sim_to_target(c),
            or_dash(c.real_wan_bytes_to_target),
            c.busy_seconds_per_round * 1e3,
            c.receive_seconds_per_round * 1e3,
            c.real_accuracy * 100.0,
            c.sim_accuracy * 100.0,
            c.emulator_queue_drops,
            c.emulator_queue_drop_episodes,
            c.emulator_datagrams,
            or_dash(c.host_receive_buffer_drops),
            c.wire_overhead,
            c.real_rounds_behind_mean,
            c.sim_rounds_behind_mean,
            c.real_busiest_link_busy_share * 100.0,
            c.sim_busiest_link_busy_share * 100.0
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;
    use crate::train::ModelSpec;
    use std::path::PathBuf;

    fn config_for(source: &DataSource, model: ModelSpec) -> AgentConfig {
        let mut cfg = SimConfig::demo(3, 7);
        cfg.model = model;
        config_of_region(&cfg, source, 1)
    }

    fn config_of_region(cfg: &SimConfig, source: &DataSource, region: usize) -> AgentConfig {
        let via: Vec<String> = (0..3).map(|j| format!("127.0.0.1:{}", 5000 + j)).collect();
        let text = agent_config(&AgentSlot {
            cfg,
            congestion: Congestion::Bbr,
            initial_window: InitialWindow::Standard,
            overlap: false,
            source,
            policy: "weightgrad",
            region,
            listen: "127.0.0.1:4433".parse().unwrap(),
            peers_via: &via,
            certs: Path::new("/tmp/certs with space"),
            state: Path::new("/tmp/state \"quoted\""),
        })
        .unwrap();
        AgentConfig::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn the_prediction_is_the_mean_over_the_link_draws() {
        let draw = |seconds: f64, bytes: u64, reached_at: Option<f64>| SimReport {
            policy: "p".into(),
            regions: ["a", "b"]
                .iter()
                .enumerate()
                .map(|(i, name)| crate::sim::RegionReport {
                    name: (*name).into(),
                    // The lowest region's: seconds / 20.
                    test_accuracy: seconds / 20.0 + i as f64 * 0.1,
                    test_loss: 0.5,
                })
                .collect(),
            wan_bytes: bytes,
            lan_bytes: 0,
            virtual_seconds: seconds,
            rounds: 10,
            curve: vec![EvalPoint {
                round: 10,
                virtual_seconds: reached_at.unwrap_or(seconds),
                wan_bytes: bytes,
                lan_bytes: 0,
                min_accuracy: if reached_at.is_some() { 0.9 } else { 0.1 },
            }],
            rejected: 0,
            rounds_behind_mean: seconds / 10.0,
            rounds_behind_max: 3,
            busiest_link_busy_share: seconds / 100.0,
        };
        let p = Prediction::of(
            &[
                draw(10.0, 100, Some(4.0)),
                draw(14.0, 200, None),
                draw(12.0, 302, Some(8.0)),
            ],
            0.85,
        );
        assert_eq!(p.seconds, 12.0);
        assert_eq!(p.seconds_draws, vec![10.0, 14.0, 12.0]);
        assert_eq!(p.wan_bytes, 201, "200.67 rounded");
        assert_eq!(p.wan_bytes_draws, vec![100, 200, 302]);
        assert_eq!(
            p.seconds_to_target,
            Some(6.0),
            "over the draws that reached it"
        );
        assert!((p.rounds_behind_mean - 1.2).abs() < 1e-12);
        // Each draw's lowest region (0.5, 0.7, 0.6), averaged; the busy shares likewise.
        assert!((p.accuracy - 0.6).abs() < 1e-12, "{}", p.accuracy);
        assert!((p.busiest_link_busy_share - 0.12).abs() < 1e-12);
        assert_eq!(p.draws_reaching_target, 2);
        assert_eq!(
            Prediction::of(&[draw(10.0, 100, None)], 0.85).seconds_to_target,
            None
        );
    }

    #[test]
    fn the_table_gives_the_draws_range_and_how_many_reached_the_target() {
        let secs = |s: f64| format!("{s:.2}");
        assert_eq!(draw_range(&[], secs), "—");
        assert_eq!(draw_range(&[3.0, 1.5, 2.0], secs), "1.50–3.00");
        assert_eq!(draw_range(&[7u64], |b| b.to_string()), "7–7");
        assert_eq!(draw_range(&[20u64, 9, 31], |b| b.to_string()), "9–31");
        let mut c: RealCheck = RealCheck {
            sim_seconds_to_target: Some(5.0),
            sim_draws_reaching_target: 4,
            sim_seconds_draws: vec![1.0; 4],
            ..RealCheck::placeholder("p")
        };
        assert_eq!(sim_to_target(&c), "5.00");
        c.sim_draws_reaching_target = 3;
        assert_eq!(sim_to_target(&c), "5.00 (3 of 4 draws)");
        c.sim_seconds_to_target = None;
        c.sim_draws_reaching_target = 0;
        assert_eq!(sim_to_target(&c), "—");
    }

    #[test]
    fn each_agent_trains_the_benchs_model_on_its_shard_of_the_same_data() {
        let csv = DataSource::Csv {
            train: PathBuf::from("/data/train rows.csv"),
            test: Some(PathBuf::from("/data/test.csv")),
            label_column: Some("class".into()),
        };
        let sources = [
            DataSource::Digits,
            DataSource::Idx {
                dir: PathBuf::from("/data/mnist"),
            },
            DataSource::Cifar10 {
                dir: PathBuf::from("/data/cifar-10"),
            },
            csv,
        ];
        for source in &sources {
            let model = crate::bench::default_model(source);
            let a = config_for(source, model.clone());
            assert_eq!(a.data_source().unwrap(), *source);
            assert_eq!(a.model_spec().unwrap(), model);
            assert_eq!((a.data.shard.index, a.data.shard.count), (1, 3));
            assert_eq!(a.region, "eu-west");
            assert_eq!(a.training.seed, 7);
            let peers: Vec<_> = a
                .peers
                .iter()
                .map(|p| (p.name.as_str(), p.address.as_str()))
                .collect();
            assert_eq!(
                peers,
                [
                    ("us-east", "127.0.0.1:5000"),
                    ("ap-southeast", "127.0.0.1:5002")
                ]
            );
            assert_eq!(a.tls.ca, Path::new("/tmp/certs with space/ca.pem"));
            assert_eq!(a.wan.congestion, Congestion::Bbr);
            assert_eq!(a.wan.initial_window, InitialWindow::Standard);
            assert!(!a.training.overlap);
        }
        let wide = ModelSpec::parse("mlp:1024,1024").unwrap();
        assert_eq!(
            config_for(&DataSource::Digits, wide.clone())
                .model_spec()
                .unwrap(),
            wide
        );
    }

    #[test]
    fn time_to_target_is_the_first_round_every_agent_reached_it_on_one_clock() {
        let report = |start: f64, evals: &[(u64, f64, f64, u64)]| {
            serde_json::json!({
                "training_started_unix": start,
                "evaluations": evals.iter().map(|&(round, unix_seconds, test_accuracy, wan_bytes)| {
                    serde_json::json!({
                        "round": round, "unix_seconds": unix_seconds,
                        "test_accuracy": test_accuracy, "wan_bytes": wan_bytes,
                    })
                }).collect::<Vec<_>>(),
            })
        };
        let reports = [
            // Reaches 0.9 at round 20, but the other agent only at round 30.
            report(
                100.0,
                &[
                    (10, 110.0, 0.5, 10),
                    (20, 120.0, 0.91, 20),
                    (30, 130.0, 0.95, 30),
                ],
            ),
            report(
                99.0,
                &[
                    (10, 112.0, 0.6, 1),
                    (20, 125.0, 0.89, 2),
                    (30, 131.5, 0.9, 3),
                ],
            ),
        ];
        // From the earlier start (99) to the later evaluation of round 30 (131.5).
        assert_eq!(first_reaching(&reports, 0.9), Some((32.5, 33)));
        assert_eq!(first_reaching(&reports, 0.5), Some((13.0, 11)));
        assert_eq!(first_reaching(&reports, 0.96), None);
        // An agent that never started a round: no common clock, no time to target.
        let unstarted = serde_json::json!({"training_started_unix": null, "evaluations": []});
        assert_eq!(
            first_reaching(&[reports[0].clone(), unstarted.clone()], 0.5),
            None
        );
        // The curve the plots draw: every common round, lowest top-1, summed bytes.
        let points: Vec<(u64, f64, u64, f64)> = curve(&reports)
            .iter()
            .map(|p| (p.round, p.virtual_seconds, p.wan_bytes, p.min_accuracy))
            .collect();
        assert_eq!(
            points,
            [
                (10, 13.0, 11, 0.5),
                (20, 26.0, 22, 0.89),
                (30, 32.5, 33, 0.9)
            ]
        );
        assert!(curve(&[reports[0].clone(), unstarted]).is_empty());
    }

    #[test]
    fn data_given_relative_to_the_bench_is_named_absolute_to_the_agents() {
        let keys = data_keys(&DataSource::Csv {
            train: "blobs.csv".into(),
            test: Some("held-out.csv".into()),
            label_column: None,
        });
        let cwd = std::env::current_dir().unwrap();
        let want = |f: &str| toml_path(&cwd.join(f));
        assert!(
            keys.contains(&format!("path = {}", want("blobs.csv"))),
            "{keys}"
        );
        assert!(
            keys.contains(&format!("test = {}", want("held-out.csv"))),
            "{keys}"
        );
        assert!(cwd.is_absolute());
    }

    #[test]
    fn agents_evaluate_at_the_benchs_interval() {
        let mut cfg = SimConfig::demo(3, 7);
        assert_eq!(
            config_of_region(&cfg, &DataSource::Digits, 0)
                .training
                .evaluate_every_rounds,
            None,
            "an epoch, the agent's default"
        );
        cfg.evaluate_every = Some(25);
        let agent = config_of_region(&cfg, &DataSource::Digits, 0);
        assert_eq!(agent.training.evaluate_every_rounds, Some(25));
    }

    #[test]
    fn the_simulator_takes_the_measured_work_and_each_links_queue_drops_as_loss() {
        let mut cfg = SimConfig::demo(3, 7);
        crate::bench::apply_scenario("ec2-3dc", &mut cfg).unwrap();
        cfg.topology.links[1][2].loss = 0.5;
        let drops = |link, queue_loss| LinkMeasure {
            link,
            queue_loss,
            queue_drops: 0,
            queue_drop_episodes: 0,
            wire_bytes: 100,
            update_bytes: 100,
        };
        let costs = MeasuredCosts {
            step_s: 0.07,
            evaluation_s: 0.3,
            overlap: true,
        };
        let c = calibrated(&cfg, costs, &[drops((0, 2), 0.01), drops((1, 2), 0.5)]);
        assert_eq!((c.compute_s, c.evaluate_s, c.overlap), (0.07, 0.3, true));
        assert_eq!(c.topology.link(0, 2).loss, 0.01);
        assert_eq!(
            c.topology.link(2, 0).loss,
            0.0,
            "only the direction measured"
        );
        // Both losses apply: a datagram crosses when neither drops it.
        assert_eq!(c.topology.link(1, 2).loss, 0.75);
        // Nothing else about a link changes.
        assert_eq!(
            c.topology.link(0, 2).bandwidth_bps,
            cfg.topology.link(0, 2).bandwidth_bps
        );
    }

    #[test]
    fn the_simulator_spends_each_links_bandwidth_as_the_agents_wire_did() {
        let mut cfg = SimConfig::demo(3, 7);
        crate::bench::apply_scenario("ec2-3dc", &mut cfg).unwrap();
        let sent = |link, wire_bytes, update_bytes| LinkMeasure {
            link,
            queue_loss: 0.0,
            queue_drops: 0,
            queue_drop_episodes: 0,
            wire_bytes,
            update_bytes,
        };
        let c = calibrated(
            &cfg,
            MeasuredCosts {
                step_s: 0.07,
                evaluation_s: 0.0,
                overlap: false,
            },
            &[
                sent((0, 1), 110, 100),
                sent((1, 0), 0, 0),
                sent((2, 0), 90, 100),
            ],
        );
        let (was, now) = (cfg.topology.link(0, 1), c.topology.link(0, 1));
        assert!((now.bandwidth_bps / was.bandwidth_bps - 100.0 / 110.0).abs() < 1e-12);
        assert_eq!(now.loss, was.loss);
        // Nothing measured, or less on the wire than counted (a run cut short): unchanged.
        for (from, to) in [(1, 0), (2, 0), (0, 2)] {
            assert_eq!(
                c.topology.link(from, to).bandwidth_bps,
                cfg.topology.link(from, to).bandwidth_bps
            );
        }
    }

    #[test]
    fn an_evaluation_is_charged_where_the_agents_spend_it_not_over_every_step() {
        let report = |busy: f64, evaluate: f64, evaluations: usize| {
            serde_json::json!({
                "rounds": 100,
                "overlap": true,
                "busy_seconds_per_round": busy,
                "round_costs": { "step": 0.005, "evaluate": evaluate },
                "evaluations": vec![serde_json::json!({}); evaluations],
            })
        };
        // 4 ms of evaluating a round over 100 rounds and 4 evaluations: 100 ms each; the
        // other region 2 ms a round over 5 evaluations: 40 ms each.
        let reports = [report(0.012, 0.004, 4), report(0.010, 0.002, 5)];
        let costs = MeasuredCosts::of(&reports, 0.011);
        assert!((costs.step_s - 0.008).abs() < 1e-12, "{costs:?}");
        assert!((costs.evaluation_s - 0.07).abs() < 1e-12, "{costs:?}");
        assert!(costs.overlap, "{costs:?}");
        // A report without the breakdown (an older agent): all of it is the step, and
        // without overlap the messages leave before an evaluation.
        let old = serde_json::json!({ "rounds": 100, "busy_seconds_per_round": 0.01 });
        assert_eq!(
            MeasuredCosts::of(&[old], 0.01),
            MeasuredCosts {
                step_s: 0.01,
                evaluation_s: 0.0,
                overlap: false,
            }
        );
    }

    #[test]
    fn co_located_agents_share_the_cores_and_each_gets_at_least_one() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(compute_threads(1), cores);
        assert_eq!(compute_threads(cores * 2), 1);
        assert_eq!(compute_threads(0), cores);
        assert!((1..=8).all(|n| compute_threads(n) * n <= cores.max(n)));
    }

    #[test]
    fn receive_buffer_errors_are_read_from_the_udp_lines() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 13720613 1310 5771 8464219 6254 0\n\
                    UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    UdpLite: 0 0 0 0 0 0\n";
        assert_eq!(udp_receive_buffer_errors(snmp), Some(6254));
        assert_eq!(udp_receive_buffer_errors("Ip: a\nIp: 1\n"), None);
        assert_eq!(
            udp_receive_buffer_errors("Udp: InErrors\nUdp: 3\n"),
            None,
            "no RcvbufErrors column"
        );
    }

    #[test]
    fn each_agents_windows_cover_its_link_with_the_largest_bandwidth_delay_product() {
        let wan_of = |scenario: &str, region: usize| {
            let mut cfg = SimConfig::demo(3, 7);
            crate::bench::apply_scenario(scenario, &mut cfg).unwrap();
            let wan = config_of_region(&cfg, &DataSource::Digits, region).wan;
            (wan.bandwidth_mbps, wan.rtt_ms)
        };
        // paper-3dc: every link 100 Mbit/s, so the longest round trip wins; us-east's link
        // to the next region (eu-west, 80 ms) is not its longest (ap-southeast, 230 ms).
        let paper: Vec<(f64, f64)> = (0..3).map(|r| wan_of("paper-3dc", r)).collect();
        assert_eq!(paper, [(100.0, 230.0), (100.0, 160.0), (100.0, 230.0)]);
        // asymmetric: us-east <-> ap-southeast is thin (10 Mbit/s over 230 ms, 0.29 MB in
        // flight), so ap-southeast's windows follow its 100 Mbit/s link to eu-west
        // (160 ms, 2 MB) and us-east's its link to eu-west (80 ms, 1 MB).
        let asym: Vec<(f64, f64)> = (0..3).map(|r| wan_of("asymmetric", r)).collect();
        assert_eq!(asym, [(100.0, 80.0), (100.0, 160.0), (100.0, 160.0)]);
    }
}
