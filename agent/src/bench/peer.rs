//! Another system on the bench's shards and emulated links (`bench --real ... --peer
//! NAME=COMMAND`): what users would run instead of the agents, measured the same way.
//!
//! The bench writes what a peer needs to a directory: `setup.json` ([`PeerSetup`]: the
//! regions, every link's emulated bandwidth and delay, the model, the schedule, the target)
//! and each region's training shard and the test set as safetensors (`images` f32
//! `[N, features]`, `labels` u32 `[N]`). It runs `COMMAND --setup DIR --result FILE` and
//! reads the result ([`PeerResult`]): every evaluation with its wall-clock seconds, the WAN
//! bytes the emulated links had carried by then and the lowest top-1 over the regions. Time
//! and bytes to the target come from that curve by the same rule as the agents'.

use crate::sim::{EvalPoint, SimConfig};
use crate::train::{DataSplit, ModelSpec};
use anyhow::{Context, Result, bail};
use safetensors::{Dtype, tensor::TensorView};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `--peer NAME=COMMAND`: a row name and the shell command that runs the peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerCommand {
    /// The peer's row in the tables.
    pub name: String,
    /// Run with `sh -c`, with `--setup DIR --result FILE` appended.
    pub command: String,
}

impl std::str::FromStr for PeerCommand {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, command) = s
            .split_once('=')
            .ok_or_else(|| format!("--peer {s:?}: expected NAME=COMMAND"))?;
        let (name, command) = (name.trim(), command.trim());
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(format!(
                "--peer {s:?}: the name before '=' must be one word"
            ));
        }
        if command.is_empty() {
            return Err(format!("--peer {s:?}: no command after '='"));
        }
        Ok(Self {
            name: name.to_string(),
            command: command.to_string(),
        })
    }
}

/// One directed emulated link, as `weightgrad wan-emu` takes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerLink {
    /// Sending region (index into `regions`).
    pub from: usize,
    /// Receiving region.
    pub to: usize,
    /// Bandwidth, Mbit/s.
    pub mbps: f64,
    /// One-way delay, milliseconds.
    pub delay_ms: f64,
    /// Uniform jitter on the delay, ± milliseconds.
    pub jitter_ms: f64,
}

/// What a peer is told: the run the agents made, so that it can make the same one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerSetup {
    /// Region names, in rank order.
    pub regions: Vec<String>,
    /// Every directed link between two regions.
    pub links: Vec<PeerLink>,
    /// The model as `--model` spells it.
    pub model: String,
    /// The layer widths, input first, classes last (fully connected with ReLU between;
    /// two widths for logistic regression).
    pub layers: Vec<usize>,
    /// Passes over each region's shard.
    pub epochs: usize,
    /// Steps per epoch (every region runs the same number).
    pub rounds_per_epoch: u64,
    /// Steps between evaluations on the test set (and the last step).
    pub evaluate_every_rounds: u64,
    /// Samples per region per step (workers × batch size).
    pub batch_per_region: usize,
    /// Base learning rate (Adam, cosine schedule over the run).
    pub lr: f64,
    /// The seed of the shards and of the agents' initialisation.
    pub seed: u64,
    /// Top-1 every region must reach.
    pub target: f64,
    /// The `weightgrad` binary (for `wan-emu --tcp`).
    pub weightgrad: PathBuf,
    /// Training shard file of each region, in rank order (relative to the directory).
    pub shards: Vec<String>,
    /// The test set's file.
    pub test: String,
}

/// One evaluation of a peer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerPoint {
    /// Steps every region had taken.
    pub round: u64,
    /// Wall-clock seconds from the first step to the last region's evaluation.
    pub seconds: f64,
    /// WAN bytes the emulated links had carried by then, every direction.
    pub wan_bytes: u64,
    /// Lowest top-1 over the regions.
    pub min_accuracy: f64,
}

/// What a peer reports in its result file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerResult {
    /// WAN bytes the emulated links carried over the whole run.
    pub wan_bytes: u64,
    /// Wall-clock seconds of the whole run.
    pub seconds: f64,
    /// Lowest final top-1 over the regions.
    pub final_accuracy: f64,
    /// Every evaluation, in order.
    pub curve: Vec<PeerPoint>,
    /// Free-form notes on how it ran (settings, versions).
    #[serde(default)]
    pub notes: String,
}

impl PeerResult {
    /// Checks the numbers are what they claim to be; `origin` names the file.
    fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |what: String| anyhow::anyhow!("{}: {what}", origin.display());
        if !(self.seconds.is_finite() && self.seconds >= 0.0) {
            return Err(bad(format!("seconds {} is not a duration", self.seconds)));
        }
        if !(0.0..=1.0).contains(&self.final_accuracy) {
            return Err(bad(format!(
                "final_accuracy {} is not in [0, 1]",
                self.final_accuracy
            )));
        }
        if self.curve.is_empty() {
            return Err(bad("the curve has no evaluation".into()));
        }
        for (i, p) in self.curve.iter().enumerate() {
            if !(0.0..=1.0).contains(&p.min_accuracy) || !p.seconds.is_finite() {
                return Err(bad(format!("evaluation {i} is out of range: {p:?}")));
            }
            if let Some(prev) = i.checked_sub(1).map(|j| &self.curve[j])
                && (p.round <= prev.round || p.wan_bytes < prev.wan_bytes)
            {
                return Err(bad(format!(
                    "evaluation {i} does not follow the one before it: {p:?} after {prev:?}"
                )));
            }
        }
        Ok(())
    }
}

/// A peer's run on one seed, as the tables show it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerRun {
    /// Its row name.
    pub name: String,
    /// What it reported.
    pub result: PeerResult,
    /// Seconds to the first evaluation at which every region had reached the target.
    pub seconds_to_target: Option<f64>,
    /// WAN bytes by then.
    pub wan_bytes_to_target: Option<u64>,
}

impl PeerRun {
    /// Its evaluations as the plots take them (real seconds as `virtual_seconds`).
    pub fn curve(&self) -> Vec<EvalPoint> {
        self.result
            .curve
            .iter()
            .map(|p| EvalPoint {
                round: p.round,
                virtual_seconds: p.seconds,
                wan_bytes: p.wan_bytes,
                lan_bytes: 0,
                min_accuracy: p.min_accuracy,
            })
            .collect()
    }
}

/// The hidden widths of a model a peer can build, or why it cannot (checked before the
/// bench starts, so that a run does not fail after its agents).
pub fn hidden_widths(model: &ModelSpec) -> Result<&[usize]> {
    match model {
        ModelSpec::Mlp { hidden } => Ok(hidden.as_slice()),
        ModelSpec::Logreg => Ok(&[]),
        other => bail!(
            "--peer runs MLP and logistic-regression models only (the peer builds its own \
             copy of the model); {other} is not one"
        ),
    }
}

/// `s` quoted for `sh`.
fn shell_quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The setup of `cfg`'s run for a peer (shard file names are the regions').
pub fn setup(cfg: &SimConfig, data: &DataSplit, target: f64, exe: &Path) -> Result<PeerSetup> {
    let hidden = hidden_widths(&cfg.model)?;
    let mut layers = vec![data.train.sample_numel()];
    layers.extend(hidden);
    layers.push(data.train.classes);
    let topo = &cfg.topology;
    let n = topo.regions.len();
    let links = (0..n)
        .flat_map(|a| (0..n).filter(move |&b| b != a).map(move |b| (a, b)))
        .map(|(a, b)| {
            let l = topo.link(a, b);
            PeerLink {
                from: a,
                to: b,
                mbps: l.bandwidth_bps / 1e6,
                delay_ms: l.rtt_s * 1e3 / 2.0,
                jitter_ms: (l.jitter_s * 1e3 / 2.0).min(l.rtt_s * 1e3 / 2.0),
            }
        })
        .collect();
    let rounds_per_epoch = cfg.layout().steps_per_epoch(&data.train.labels);
    Ok(PeerSetup {
        regions: topo.regions.clone(),
        links,
        model: cfg.model.to_string(),
        layers,
        epochs: cfg.epochs,
        rounds_per_epoch,
        evaluate_every_rounds: cfg.evaluation_interval(rounds_per_epoch),
        batch_per_region: cfg.workers * cfg.batch_size,
        lr: cfg.lr,
        seed: cfg.seed,
        target,
        weightgrad: exe.to_path_buf(),
        shards: topo
            .regions
            .iter()
            .map(|r| format!("{r}.safetensors"))
            .collect(),
        test: "test.safetensors".into(),
    })
}

/// `images` and `labels` of `indices` of `set` as safetensors bytes.
fn shard_bytes(set: &crate::train::Dataset, indices: &[usize]) -> Result<Vec<u8>> {
    let numel = set.sample_numel();
    let images: Vec<u8> = indices
        .iter()
        .flat_map(|&i| set.sample(i).iter().flat_map(|v| v.to_le_bytes()))
        .collect();
    let labels: Vec<u8> = indices
        .iter()
        .flat_map(|&i| set.labels[i].to_le_bytes())
        .collect();
    let views = [
        (
            "images",
            TensorView::new(Dtype::F32, vec![indices.len(), numel], &images)?,
        ),
        (
            "labels",
            TensorView::new(Dtype::U32, vec![indices.len()], &labels)?,
        ),
    ];
    Ok(safetensors::serialize(views, None)?)
}

/// Writes `setup` and the data it names to `dir`: each region's training samples (its
/// workers' shards, in worker order) and the test set.
pub fn write(dir: &Path, setup: &PeerSetup, cfg: &SimConfig, data: &DataSplit) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let layout = cfg.layout();
    for (r, file) in setup.shards.iter().enumerate() {
        let indices: Vec<usize> = layout
            .worker_shards(&data.train.labels, r)
            .into_iter()
            .flatten()
            .collect();
        crate::atomic_file::write(&dir.join(file), &[&shard_bytes(&data.train, &indices)?])?;
    }
    let all: Vec<usize> = (0..data.test.len()).collect();
    crate::atomic_file::write(&dir.join(&setup.test), &[&shard_bytes(&data.test, &all)?])?;
    let json = serde_json::to_vec_pretty(setup)?;
    crate::atomic_file::write(&dir.join("setup.json"), &[&json])?;
    Ok(())
}

/// Reads and checks a peer's result file.
pub fn read_result(path: &Path) -> Result<PeerResult> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let result: PeerResult = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a peer result", path.display()))?;
    result.validate(path)?;
    Ok(result)
}

/// The first evaluation at or above `target` (the agents' rule): its seconds and bytes.
fn first_reaching(run_curve: &[EvalPoint], target: f64) -> Option<(f64, u64)> {
    crate::sim::first_reaching(run_curve, target).map(|p| (p.virtual_seconds, p.wan_bytes))
}

/// Runs `peer` on `cfg`'s run in `dir` and reads what it measured; its output goes to
/// `dir/peer.log`. It is stopped as stuck after `timeout`.
pub fn run(
    peer: &PeerCommand,
    cfg: &SimConfig,
    data: &DataSplit,
    target: f64,
    exe: &Path,
    dir: &Path,
    timeout: Duration,
) -> Result<PeerRun> {
    let setup = setup(cfg, data, target, exe)?;
    write(dir, &setup, cfg, data)?;
    let result_path = dir.join("result.json");
    let _ = std::fs::remove_file(&result_path);
    let log_path = dir.join("peer.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let command = format!(
        "{} --setup {} --result {}",
        peer.command,
        shell_quoted(&dir.to_string_lossy()),
        shell_quoted(&result_path.to_string_lossy())
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(&command)
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting peer {}: {command}", peer.name))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "peer {} still running after {} s (raise --real-timeout-minutes if the run needs longer); see {}",
                peer.name,
                timeout.as_secs(),
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if !status.success() {
        bail!(
            "peer {} failed ({status}); see {}; it ended with:\n{}",
            peer.name,
            log_path.display(),
            super::child_log::tail(&log_path, super::child_log::QUOTED_LINES)
        );
    }
    let mut run = PeerRun {
        name: peer.name.clone(),
        result: read_result(&result_path)?,
        seconds_to_target: None,
        wan_bytes_to_target: None,
    };
    let reached = first_reaching(&run.curve(), target);
    (run.seconds_to_target, run.wan_bytes_to_target) = (reached.map(|r| r.0), reached.map(|r| r.1));
    Ok(run)
}

/// The peers' rows beside the agents': time and bytes to the target, final top-1, and
/// each against weightgrad's real run where there is one.
pub fn markdown(peers: &[PeerRun], agents: &[crate::bench::real::RealCheck]) -> String {
    let wg = agents.iter().find(|c| c.policy == "weightgrad");
    let mut out = String::from(
        "| system | seconds to target | WAN bytes to target | final top-1 | seconds, whole run | WAN bytes, whole run | time to target / weightgrad's | bytes to target / weightgrad's |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "—".into(),
    };
    let opt = |v: Option<String>| v.unwrap_or_else(|| "—".into());
    let rows = agents
        .iter()
        .map(|c| {
            (
                format!("{} (agents)", c.policy),
                c.real_seconds_to_target,
                c.real_wan_bytes_to_target,
                c.real_accuracy,
                c.real_seconds,
                c.real_wan_bytes,
            )
        })
        .chain(peers.iter().map(|p| {
            (
                p.name.clone(),
                p.seconds_to_target,
                p.wan_bytes_to_target,
                p.result.final_accuracy,
                p.result.seconds,
                p.result.wan_bytes,
            )
        }));
    for (name, secs, bytes, acc, whole_s, whole_b) in rows {
        out += &format!(
            "| {name} | {} | {} | {:.2}% | {whole_s:.2} | {whole_b} | {} | {} |\n",
            opt(secs.map(|s| format!("{s:.2}"))),
            opt(bytes.map(|b| b.to_string())),
            acc * 100.0,
            ratio(secs, wg.and_then(|w| w.real_seconds_to_target)),
            ratio(
                bytes.map(|b| b as f64),
                wg.and_then(|w| w.real_wan_bytes_to_target.map(|b| b as f64))
            ),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::dataset::embedded_digits;

    #[test]
    fn paths_are_quoted_for_the_shell() {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quoted("a b'c$d")))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a b'c$d");
    }

    #[test]
    fn peer_commands_parse_and_bad_ones_are_named() {
        let p: PeerCommand = "torch-ddp=python3 x.py --rank 4".parse().unwrap();
        assert_eq!(
            (p.name.as_str(), p.command.as_str()),
            ("torch-ddp", "python3 x.py --rank 4")
        );
        for (bad, says) in [
            ("python3 x.py", "NAME=COMMAND"),
            ("two words=x", "one word"),
            ("name=", "no command"),
        ] {
            let e = bad.parse::<PeerCommand>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_setup_and_shards_describe_the_agents_run() {
        let data = embedded_digits().unwrap();
        let mut cfg = SimConfig::demo(3, 4);
        crate::bench::apply_scenario("ec2-3dc", &mut cfg).unwrap();
        cfg.model = ModelSpec::Mlp { hidden: vec![32] };
        let dir = tempfile::tempdir().unwrap();
        let s = setup(&cfg, &data, 0.9, Path::new("/bin/weightgrad")).unwrap();
        assert_eq!(s.layers, vec![64, 32, 10]);
        assert_eq!(s.links.len(), 6);
        let thin = s.links.iter().find(|l| (l.from, l.to) == (2, 0)).unwrap();
        assert!(
            (thin.mbps - 36.4).abs() < 1e-6 && thin.delay_ms == 115.0,
            "{thin:?}"
        );
        write(dir.path(), &s, &cfg, &data).unwrap();
        let back: PeerSetup =
            serde_json::from_slice(&std::fs::read(dir.path().join("setup.json")).unwrap()).unwrap();
        assert_eq!(back, s);
        // The shards partition the training set; each holds its region's workers' samples.
        let mut seen = 0;
        for (r, file) in s.shards.iter().enumerate() {
            let bytes = std::fs::read(dir.path().join(file)).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let labels = st.tensor("labels").unwrap();
            let images = st.tensor("images").unwrap();
            let n = labels.shape()[0];
            assert_eq!(images.shape(), &[n, 64]);
            let want: Vec<usize> = cfg.layout().worker_shards(&data.train.labels, r).concat();
            assert_eq!(n, want.len());
            let first = f32::from_le_bytes(images.data()[..4].try_into().unwrap());
            assert_eq!(first, data.train.sample(want[0])[0]);
            let label = u32::from_le_bytes(labels.data()[..4].try_into().unwrap());
            assert_eq!(label, data.train.labels[want[0]]);
            seen += n;
        }
        assert_eq!(seen, data.train.len());
        cfg.model = ModelSpec::Cnn;
        let e = setup(&cfg, &data, 0.9, Path::new("w")).unwrap_err();
        assert!(
            e.to_string()
                .contains("MLP and logistic-regression models only"),
            "{e}"
        );
    }

    fn point(round: u64, seconds: f64, wan_bytes: u64, acc: f64) -> PeerPoint {
        PeerPoint {
            round,
            seconds,
            wan_bytes,
            min_accuracy: acc,
        }
    }

    #[test]
    fn results_are_checked_and_the_target_is_found_on_the_curve() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("result.json");
        let good = PeerResult {
            wan_bytes: 900,
            seconds: 3.0,
            final_accuracy: 0.96,
            curve: vec![
                point(10, 1.0, 300, 0.5),
                point(20, 2.0, 600, 0.95),
                point(30, 3.0, 900, 0.96),
            ],
            notes: String::new(),
        };
        std::fs::write(&path, serde_json::to_vec(&good).unwrap()).unwrap();
        let back = PeerRun {
            name: "p".into(),
            result: read_result(&path).unwrap(),
            seconds_to_target: None,
            wan_bytes_to_target: None,
        };
        assert_eq!(first_reaching(&back.curve(), 0.95), Some((2.0, 600)));
        assert_eq!(first_reaching(&back.curve(), 0.99), None);
        let mut bad = good.clone();
        bad.curve[2].round = 20;
        std::fs::write(&path, serde_json::to_vec(&bad).unwrap()).unwrap();
        let e = format!("{:#}", read_result(&path).unwrap_err());
        assert!(e.contains("evaluation 2 does not follow"), "{e}");
        let mut bad = good.clone();
        bad.final_accuracy = 96.0;
        std::fs::write(&path, serde_json::to_vec(&bad).unwrap()).unwrap();
        let e = format!("{:#}", read_result(&path).unwrap_err());
        assert!(e.contains("final_accuracy 96 is not in [0, 1]"), "{e}");
        std::fs::write(&path, "{\"seconds\": 1}").unwrap();
        let e = format!("{:#}", read_result(&path).unwrap_err());
        assert!(e.contains("not a peer result"), "{e}");
    }

    /// Runs `command` as a peer on a tiny MLP over the embedded digits, in a directory of
    /// its own (returned, to read its log), stopped after `timeout`.
    fn run_tiny(command: &str, timeout: Duration) -> (Result<PeerRun>, tempfile::TempDir) {
        let data = embedded_digits().unwrap();
        let mut cfg = SimConfig::demo(3, 0);
        cfg.model = ModelSpec::Mlp { hidden: vec![8] };
        let dir = tempfile::tempdir().unwrap();
        let peer: PeerCommand = command.parse().unwrap();
        let result = run(&peer, &cfg, &data, 0.9, Path::new("w"), dir.path(), timeout);
        (result, dir)
    }

    #[test]
    fn a_peer_that_fails_is_named_with_its_log() {
        let hour = Duration::from_secs(3600);
        let (result, dir) = run_tiny("broken=echo oops >&2; exit 3; true", hour);
        let e = result.unwrap_err();
        assert!(e.to_string().contains("peer broken failed"), "{e}");
        let log = std::fs::read_to_string(dir.path().join("peer.log")).unwrap();
        assert!(log.contains("oops"), "{log}");
    }

    #[test]
    fn a_peer_past_its_time_is_stopped_and_named() {
        let began = Instant::now();
        let (result, _dir) = run_tiny("stuck=sleep 30; true", Duration::from_millis(300));
        let e = result.unwrap_err();
        assert!(
            e.to_string().contains("peer stuck still running after 0 s"),
            "{e}"
        );
        assert!(
            began.elapsed() < Duration::from_secs(20),
            "it was not stopped"
        );
    }
}
