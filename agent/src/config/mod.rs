//! The agent's configuration file (`weightgrad agent --config region.toml`): one region's
//! identity, its WAN endpoint and peers, TLS files, data, model and training settings,
//! policy, admin endpoint and checkpoints.
//!
//! Parsing is strict: unknown keys and values of the wrong type are errors naming the key,
//! the line and the file; [`AgentConfig::load`] then checks what TOML cannot (addresses,
//! names, ranges, required paths), and [`AgentConfig::check_files`] that every file it
//! names is there and readable. Relative paths are taken from the config file's directory.

use crate::lan::LanPlacement;
use crate::policy::FailStrategy;
use crate::train::ModelSpec;
use crate::train::dataset::{DataSource, ShardStrategy};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A configuration problem: the file and what is wrong, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", file.display())]
pub struct ConfigError {
    /// The configuration file.
    pub file: PathBuf,
    /// What is wrong with it.
    pub problem: String,
}

/// One region's agent configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This region's name; peers' certificates must name it.
    pub region: String,
    /// WAN endpoint and link settings.
    pub wan: WanConfig,
    /// Other regions, one entry each.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Mutual-TLS files.
    pub tls: TlsConfig,
    /// Training data.
    #[serde(default)]
    pub data: DataConfig,
    /// Model and training settings.
    #[serde(default)]
    pub training: TrainingConfig,
    /// The region's LAN.
    #[serde(default)]
    pub lan: LanPlacement,
    /// The policy.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Admin and metrics HTTP endpoint.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Checkpoints.
    pub checkpoint: CheckpointConfig,
}

/// Congestion controller for WAN connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Congestion {
    /// CUBIC (the default).
    #[default]
    Cubic,
    /// BBR.
    Bbr,
}

/// Where a WAN connection's congestion window starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum InitialWindow {
    /// One bandwidth-delay product of the configured link (`bandwidth_mbps` × `rtt_ms`;
    /// the default): the first update crosses at the link's rate instead of after seconds
    /// of slow start, and bursty traffic that never fills the window (an update every few
    /// rounds) is not held to the few packets a short-lived window allows.
    #[default]
    Link,
    /// RFC 9002's ten datagrams (about 12 kB), for paths shared with traffic the
    /// agents must not burst into.
    Standard,
}

/// The WAN endpoint and what its links look like (flow-control windows are sized from
/// bandwidth × RTT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WanConfig {
    /// UDP address the QUIC endpoint listens on.
    pub listen: SocketAddr,
    /// Expected link bandwidth, Mbit/s.
    #[serde(default = "default_bandwidth_mbps")]
    pub bandwidth_mbps: f64,
    /// Expected round-trip time, milliseconds.
    #[serde(default = "default_rtt_ms")]
    pub rtt_ms: f64,
    /// Seconds a peer may stay unreachable before the others stop waiting for it.
    #[serde(default = "default_peer_deadline_s")]
    pub peer_deadline_s: f64,
    /// Congestion controller.
    #[serde(default)]
    pub congestion: Congestion,
    /// Where each connection's congestion window starts.
    #[serde(default)]
    pub initial_window: InitialWindow,
}

fn default_bandwidth_mbps() -> f64 {
    100.0
}
fn default_rtt_ms() -> f64 {
    150.0
}
fn default_peer_deadline_s() -> f64 {
    30.0
}

impl WanConfig {
    /// Bytes in flight needed to fill the link: bandwidth × RTT.
    pub fn bandwidth_delay_bytes(&self) -> u64 {
        (self.bandwidth_mbps * 1e6 / 8.0 * self.rtt_ms / 1e3).ceil() as u64
    }
}

/// A peer region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its region name (its certificate must carry it).
    pub name: String,
    /// Where its QUIC endpoint listens, `host:port`.
    pub address: String,
}

/// Mutual-TLS files (PEM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The CA every peer's certificate must chain to.
    pub ca: PathBuf,
    /// This region's certificate.
    pub cert: PathBuf,
    /// This region's private key.
    pub key: PathBuf,
}

/// Where this region's training data comes from, and which part of it is this region's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `digits` (embedded), `idx`, `cifar10`, `csv` or `text`.
    #[serde(default = "default_data_kind")]
    pub kind: String,
    /// Directory (idx, cifar10), training CSV file or text file.
    pub path: Option<PathBuf>,
    /// Test CSV (csv only; default: hold out 20% of `path`).
    pub test: Option<PathBuf>,
    /// Label column of a CSV (name or index; default: the last).
    pub label_column: Option<String>,
    /// Bytes per sample of a text corpus (text only; default 64).
    pub window: Option<usize>,
    /// Which shard of the data this region trains on.
    #[serde(default)]
    pub shard: ShardConfig,
}

fn default_data_kind() -> String {
    "digits".into()
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            kind: default_data_kind(),
            path: None,
            test: None,
            label_column: None,
            window: None,
            shard: ShardConfig::default(),
        }
    }
}

/// This region's share of a data set that several regions read (index of count).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    /// This region's shard, `0..count`.
    #[serde(default)]
    pub index: usize,
    /// Shards in all (1: the whole set is this region's).
    #[serde(default = "one")]
    pub count: usize,
    /// `iid` or `label-skew`.
    #[serde(default = "default_strategy")]
    pub strategy: String,
}

fn one() -> usize {
    1
}
fn default_strategy() -> String {
    "iid".into()
}

impl Default for ShardConfig {
    fn default() -> Self {
        Self {
            index: 0,
            count: 1,
            strategy: default_strategy(),
        }
    }
}

/// Model and training settings; every region of a run must agree on them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// `mlp`, `mlp:W1,W2,...`, `cnn` or `logreg`.
    #[serde(default = "default_model")]
    pub model: String,
    /// Workers in this region.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Samples per worker per step.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Passes over this region's data.
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Base learning rate (Adam, cosine schedule).
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Seed shared by every region (initial weights, data order).
    #[serde(default)]
    pub seed: u64,
    /// Rounds this region may run ahead of the slowest live peer.
    #[serde(default = "one_u64")]
    pub max_staleness: u64,
    /// Run a round's WAN work (encoding what it sends, decoding what peers send) beside
    /// the next step where the staleness bound allows, instead of after it. The bytes and
    /// the model are the same either way for the same delivery of peers' messages; this
    /// region's own setting (regions need not agree). Not with a mean merge (diloco).
    #[serde(default = "yes")]
    pub overlap: bool,
    /// Rounds between evaluations on the test set (default: one epoch's rounds). The run's
    /// last round is always evaluated.
    #[serde(default)]
    pub evaluate_every_rounds: Option<u64>,
    /// Evaluate on the test set in a thread beside training, on a snapshot of the weights,
    /// instead of between two rounds: the same records (taken when the snapshot is), without
    /// holding the rounds up. With one compute thread the evaluations run at the lowest CPU
    /// priority, on the time training leaves.
    #[serde(default = "yes")]
    pub evaluate_in_background: bool,
}

fn yes() -> bool {
    true
}

fn default_model() -> String {
    "mlp".into()
}
fn default_workers() -> usize {
    2
}
fn default_batch() -> usize {
    16
}
fn default_epochs() -> usize {
    30
}
fn default_lr() -> f64 {
    1e-3
}
fn one_u64() -> u64 {
    1
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            model: default_model(),
            workers: default_workers(),
            batch_size: default_batch(),
            epochs: default_epochs(),
            lr: default_lr(),
            seed: 0,
            max_staleness: 1,
            overlap: true,
            evaluate_every_rounds: None,
            evaluate_in_background: true,
        }
    }
}

/// Which policy decides, and what a round does when it fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// A built-in policy name, or a path to a `.wasm` component.
    #[serde(default = "default_policy")]
    pub source: String,
    /// `last-good`, `closed` or `open`.
    #[serde(default)]
    pub on_failure: FailStrategy,
    /// Failed calls in a row after which the agent rolls the policy back by itself and
    /// quarantines it (0: never).
    #[serde(default = "default_rollback_after")]
    pub rollback_after: u32,
    /// Wall-clock budget of one policy call, milliseconds (a host busy on every core may
    /// need more than the default).
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
}

fn default_deadline_ms() -> u64 {
    crate::policy::SandboxLimits::default().deadline.as_millis() as u64
}

fn default_rollback_after() -> u32 {
    crate::policy::Breaker::default().rollback_after
}

fn default_policy() -> String {
    "weightgrad".into()
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            source: default_policy(),
            on_failure: FailStrategy::default(),
            rollback_after: default_rollback_after(),
            deadline_ms: default_deadline_ms(),
        }
    }
}

impl PolicyConfig {
    /// The component file, when `source` names one rather than a built-in policy.
    pub fn wasm_path(&self) -> Option<PathBuf> {
        self.source
            .ends_with(".wasm")
            .then(|| PathBuf::from(&self.source))
    }
}

/// The admin and metrics HTTP endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// TCP address; loopback unless you mean otherwise.
    #[serde(default = "default_admin")]
    pub listen: SocketAddr,
    /// File holding the bearer token for mutating calls; without it they are refused.
    pub token_file: Option<PathBuf>,
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin(),
            token_file: None,
        }
    }
}

/// Checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Directory for checkpoints (created if missing).
    pub dir: PathBuf,
    /// Rounds between periodic checkpoints.
    #[serde(default = "default_every")]
    pub every_rounds: u64,
}

fn default_every() -> u64 {
    50
}

impl AgentConfig {
    /// Reads, parses and validates `path`; relative paths in it become relative to its
    /// directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            problem: format!("cannot read: {e}"),
        })?;
        let mut cfg = Self::parse(&text).map_err(|problem| ConfigError {
            file: path.to_owned(),
            problem,
        })?;
        if let Some(base) = path.parent() {
            cfg.resolve_paths(base);
        }
        Ok(cfg)
    }

    /// Parses and validates TOML text; the error names the key (and line) at fault.
    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: Self = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.tls.ca);
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        if let Some(p) = &mut self.data.path {
            fix(p);
        }
        if let Some(p) = &mut self.data.test {
            fix(p);
        }
        if let Some(p) = &mut self.admin.token_file {
            fix(p);
        }
        fix(&mut self.checkpoint.dir);
        if let Some(mut p) = self.policy.wasm_path() {
            fix(&mut p);
            self.policy.source = p.display().to_string();
        }
    }

    /// Checks what the TOML types cannot.
    fn validate(&self) -> Result<(), String> {
        check_name("region", &self.region)?;
        let w = &self.wan;
        positive("wan.bandwidth_mbps", w.bandwidth_mbps)?;
        positive("wan.rtt_ms", w.rtt_ms)?;
        positive("wan.peer_deadline_s", w.peer_deadline_s)?;
        let mut seen = std::collections::HashSet::new();
        for (i, p) in self.peers.iter().enumerate() {
            check_name(&format!("peers[{i}].name"), &p.name)?;
            if p.name == self.region {
                return Err(format!(
                    "peers[{i}].name: {:?} is this region itself",
                    p.name
                ));
            }
            if !seen.insert(&p.name) {
                return Err(format!("peers[{i}].name: {:?} is listed twice", p.name));
            }
            check_address(&format!("peers[{i}].address"), &p.address)?;
        }
        self.data_source()?;
        let s = &self.data.shard;
        if s.count == 0 || s.index >= s.count {
            return Err(format!(
                "data.shard: index {} of count {} (need 0 <= index < count)",
                s.index, s.count
            ));
        }
        self.shard_strategy()?;
        let t = &self.training;
        let model = self.model_spec()?;
        self.data_source()?
            .check_model(&model)
            .map_err(|e| format!("training.model: {e}"))?;
        for (key, v) in [
            ("training.workers", t.workers),
            ("training.batch_size", t.batch_size),
            ("training.epochs", t.epochs),
            ("policy.deadline_ms", self.policy.deadline_ms as usize),
        ] {
            if v == 0 {
                return Err(format!("{key}: must be at least 1"));
            }
        }
        positive("training.lr", t.lr)?;
        if t.evaluate_every_rounds == Some(0) {
            return Err("training.evaluate_every_rounds: must be at least 1".into());
        }
        // Upper bounds keep the run's arithmetic (rounds = steps per epoch × epochs, the
        // staleness window) far from overflow; no real run comes near them.
        for (key, v, max) in [
            ("training.workers", t.workers as u64, 1024),
            ("training.batch_size", t.batch_size as u64, 1 << 16),
            ("training.epochs", t.epochs as u64, 1_000_000),
            ("training.max_staleness", t.max_staleness, 1_000_000),
            (
                "training.evaluate_every_rounds",
                t.evaluate_every_rounds.unwrap_or(1),
                1_000_000_000,
            ),
            ("data.shard.count", s.count as u64, 1024),
            (
                "policy.rollback_after",
                u64::from(self.policy.rollback_after),
                1_000_000,
            ),
        ] {
            if v > max {
                return Err(format!("{key}: {v} is more than {max}"));
            }
        }
        if self.policy.source.is_empty() {
            return Err("policy.source: empty; name a built-in policy or a .wasm file".into());
        }
        if self.policy.wasm_path().is_none()
            && !crate::policies::BUILTIN.contains(&self.policy.source.as_str())
        {
            return Err(format!(
                "policy.source: {:?} is neither a built-in policy ({}) nor a .wasm file",
                self.policy.source,
                crate::policies::BUILTIN.join(", ")
            ));
        }
        if self.checkpoint.every_rounds == 0 {
            return Err("checkpoint.every_rounds: must be at least 1".into());
        }
        Ok(())
    }

    /// The data source this config names.
    pub fn data_source(&self) -> Result<DataSource, String> {
        let d = &self.data;
        let need = |what: &str| {
            d.path
                .clone()
                .ok_or_else(|| format!("data.path: data.kind {:?} needs {what}", d.kind))
        };
        if d.test.is_some() && d.kind != "csv" {
            return Err(format!(
                "data.test: only csv data has a separate test file, not {:?}",
                d.kind
            ));
        }
        if d.window.is_some() && d.kind != "text" {
            return Err(format!(
                "data.window: only text data has a window, not {:?}",
                d.kind
            ));
        }
        match d.kind.as_str() {
            "digits" if d.path.is_none() => Ok(DataSource::Digits),
            "digits" | "idx" | "mnist" | "fashion-mnist" => Ok(DataSource::Idx {
                dir: need("a directory of IDX files")?,
            }),
            "cifar10" => Ok(DataSource::Cifar10 {
                dir: need("a directory of CIFAR-10 batches")?,
            }),
            "csv" => Ok(DataSource::Csv {
                train: need("a CSV file")?,
                test: d.test.clone(),
                label_column: d.label_column.clone(),
            }),
            "text" => match d.window.unwrap_or(crate::train::dataset::DEFAULT_WINDOW) {
                0 => Err("data.window: must be at least 1 byte".into()),
                window => Ok(DataSource::Text {
                    path: need("a UTF-8 text file")?,
                    window,
                }),
            },
            other => Err(format!(
                "data.kind: unknown kind {other:?}; expected digits, idx, mnist, fashion-mnist, cifar10, csv or text"
            )),
        }
    }

    /// The shard strategy this config names.
    pub fn shard_strategy(&self) -> Result<ShardStrategy, String> {
        self.data
            .shard
            .strategy
            .parse()
            .map_err(|e| format!("data.shard.strategy: {e}"))
    }

    /// The model this config names.
    pub fn model_spec(&self) -> Result<ModelSpec, String> {
        ModelSpec::parse(&self.training.model).map_err(|e| format!("training.model: {e}"))
    }

    /// Checks that every file the config names exists and is readable, and that the
    /// checkpoint directory can be created. Returns one problem per line.
    pub fn check_files(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (key, path, label) in [
            ("tls.ca", &self.tls.ca, "CERTIFICATE"),
            ("tls.cert", &self.tls.cert, "CERTIFICATE"),
            ("tls.key", &self.tls.key, "PRIVATE KEY"),
        ] {
            match std::fs::read_to_string(path) {
                Err(e) => problems.push(format!("{key}: cannot read {}: {e}", path.display())),
                Ok(text) if !text.contains(&format!("{label}-----")) => {
                    problems.push(format!("{key}: {} holds no PEM {label}", path.display()))
                }
                Ok(_) => {}
            }
        }
        let mut file = |key: &str, p: &Path| {
            if let Err(e) = std::fs::File::open(p) {
                problems.push(format!("{key}: cannot read {}: {e}", p.display()));
            }
        };
        if let Some(p) = &self.admin.token_file {
            file("admin.token_file", p);
        }
        if let Some(p) = self.policy.wasm_path() {
            file("policy.source", &p);
        }
        match self.data_source() {
            Ok(DataSource::Text { path, .. }) => file("data.path", &path),
            Ok(DataSource::Csv { train, test, .. }) => {
                file("data.path", &train);
                if let Some(t) = test {
                    file("data.test", &t);
                }
            }
            Ok(DataSource::Idx { dir } | DataSource::Cifar10 { dir }) if !dir.is_dir() => {
                problems.push(format!("data.path: {} is not a directory", dir.display()));
            }
            _ => {}
        }
        if let Some(token) = &self.admin.token_file
            && let Ok(text) = std::fs::read_to_string(token)
            && text.trim().len() < 16
        {
            problems.push(format!(
                "admin.token_file: {} holds a token shorter than 16 characters",
                token.display()
            ));
        }
        let dir = &self.checkpoint.dir;
        if dir.exists() && !dir.is_dir() {
            problems.push(format!(
                "checkpoint.dir: {} is not a directory",
                dir.display()
            ));
        }
        problems
    }
}

fn check_name(key: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{key}: {name:?} is not a region name (1-63 of a-z, 0-9 and '-', not starting or ending with '-'; it goes into certificates as a DNS name)"
        ))
    }
}

fn check_address(key: &str, address: &str) -> Result<(), String> {
    let port_ok = address
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty())
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .is_some_and(|p| p > 0);
    if port_ok {
        Ok(())
    } else {
        Err(format!("{key}: {address:?} is not host:port"))
    }
}

fn positive(key: &str, v: f64) -> Result<(), String> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(format!("{key}: {v} must be a finite number above 0"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = r#"
region = "us-east"

[wan]
listen = "0.0.0.0:4433"
bandwidth_mbps = 50
rtt_ms = 120

[[peers]]
name = "eu-west"
address = "eu-west.example.net:4433"

[[peers]]
name = "ap-southeast"
address = "10.0.3.7:4433"

[tls]
ca = "certs/ca.pem"
cert = "certs/us-east.pem"
key = "certs/us-east.key"

[data.shard]
index = 0
count = 3

[checkpoint]
dir = "state"
"#;

    #[test]
    fn a_minimal_config_parses_with_defaults() {
        let cfg = AgentConfig::parse(EXAMPLE).unwrap();
        assert_eq!(cfg.region, "us-east");
        assert_eq!(cfg.peers.len(), 2);
        assert_eq!(cfg.data_source().unwrap(), DataSource::Digits);
        assert_eq!(cfg.training.workers, 2);
        assert_eq!(cfg.policy.source, "weightgrad");
        assert_eq!(cfg.policy.on_failure, FailStrategy::LastGood);
        assert_eq!(cfg.admin.listen, "127.0.0.1:9464".parse().unwrap());
        assert_eq!(cfg.wan.congestion, Congestion::Cubic);
        assert_eq!(cfg.wan.initial_window, InitialWindow::Link);
        // 50 Mbit/s × 120 ms = 750 kB in flight.
        assert_eq!(cfg.wan.bandwidth_delay_bytes(), 750_000);
        assert!(!cfg.lan.data_mode_allowed() || !cfg.lan.crosses_wan);
    }

    fn err(text: &str) -> String {
        AgentConfig::parse(text).unwrap_err()
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let typo = EXAMPLE.replace("rtt_ms = 120", "rtt_msec = 120");
        let e = err(&typo);
        assert!(e.contains("rtt_msec") && e.contains("line"), "{e}");
        let e = err(&EXAMPLE.replace("listen = \"0.0.0.0:4433\"", "listen = \"nowhere\""));
        assert!(e.contains("listen"), "{e}");
        let e = err(&EXAMPLE.replace("rtt_ms = 120", "rtt_ms = -1"));
        assert!(e.contains("wan.rtt_ms"), "{e}");
        let e = err(&EXAMPLE.replace("name = \"eu-west\"", "name = \"us-east\""));
        assert!(e.contains("peers[0].name") && e.contains("itself"), "{e}");
        let e = err(&EXAMPLE.replace("name = \"ap-southeast\"", "name = \"eu-west\""));
        assert!(e.contains("peers[1].name") && e.contains("twice"), "{e}");
        let e = err(&EXAMPLE.replace("10.0.3.7:4433", "10.0.3.7"));
        assert!(e.contains("peers[1].address"), "{e}");
        let e = err(&EXAMPLE.replace("region = \"us-east\"", "region = \"US East\""));
        assert!(e.contains("region:"), "{e}");
        let e = err(&EXAMPLE.replace("index = 0", "index = 3"));
        assert!(e.contains("data.shard"), "{e}");
        let e = err(&format!("{EXAMPLE}\n[training]\nmodel = \"transformer\"\n"));
        assert!(e.contains("training.model"), "{e}");
        let e = err(&format!("{EXAMPLE}\n[policy]\nsource = \"nonesuch\"\n"));
        assert!(
            e.contains("policy.source") && e.contains("weightgrad"),
            "{e}"
        );
        let e = err(&format!("{EXAMPLE}\n[policy]\non_failure = \"maybe\"\n"));
        assert!(e.contains("maybe"), "{e}");
        let e = err(&EXAMPLE.replace("[data.shard]", "[data]\nkind = \"csv\"\n[data.shard]"));
        assert!(e.contains("data.path"), "{e}");
        let e = err(&EXAMPLE.replace("[checkpoint]\ndir = \"state\"", ""));
        assert!(e.contains("checkpoint"), "{e}");
        let e = err(&format!("{EXAMPLE}\n[lan]\ncrosses_wan = \"yes\"\n"));
        assert!(e.contains("crosses_wan"), "{e}");
        let e = err(&EXAMPLE.replace("rtt_ms = 120", "rtt_ms = 120\ninitial_window = \"huge\""));
        assert!(e.contains("huge") && e.contains("link"), "{e}");
    }

    #[test]
    fn numbers_too_large_for_a_run_are_refused_by_name() {
        for (extra, key) in [
            (
                "[training]\nepochs = 18446744073709551615",
                "training.epochs",
            ),
            (
                "[training]\nmax_staleness = 18446744073709551615",
                "training.max_staleness",
            ),
            ("[training]\nbatch_size = 100000", "training.batch_size"),
            ("[training]\nworkers = 5000", "training.workers"),
            (
                "[training]\nevaluate_every_rounds = 2000000000",
                "training.evaluate_every_rounds",
            ),
        ] {
            let e = err(&format!("{EXAMPLE}\n{extra}\n"));
            assert!(e.contains(key) && e.contains("more than"), "{key}: {e}");
        }
        let e = err(&EXAMPLE.replace("count = 3", "count = 4096"));
        assert!(e.contains("data.shard.count"), "{e}");
        assert!(AgentConfig::parse(&format!("{EXAMPLE}\n[training]\nepochs = 1000000\n")).is_ok());
        let e = err(&format!(
            "{EXAMPLE}\n[training]\nevaluate_every_rounds = 0\n"
        ));
        assert!(
            e.contains("training.evaluate_every_rounds") && e.contains("at least 1"),
            "{e}"
        );
        let every = AgentConfig::parse(&format!(
            "{EXAMPLE}\n[training]\nevaluate_every_rounds = 25\n"
        ));
        assert_eq!(every.unwrap().training.evaluate_every_rounds, Some(25));
    }

    #[test]
    fn paths_are_relative_to_the_file_and_missing_files_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region.toml");
        std::fs::write(&path, EXAMPLE).unwrap();
        let cfg = AgentConfig::load(&path).unwrap();
        assert_eq!(cfg.tls.ca, dir.path().join("certs/ca.pem"));
        assert_eq!(cfg.checkpoint.dir, dir.path().join("state"));
        let problems = cfg.check_files();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].starts_with("tls.ca: cannot read"),
            "{problems:?}"
        );
        std::fs::create_dir(dir.path().join("certs")).unwrap();
        for f in ["ca.pem", "us-east.pem", "us-east.key"] {
            std::fs::write(dir.path().join("certs").join(f), "x").unwrap();
        }
        let problems = cfg.check_files();
        assert!(
            problems[0].contains("tls.ca") && problems[0].contains("no PEM CERTIFICATE"),
            "{problems:?}"
        );
        assert!(
            problems[2].contains("tls.key") && problems[2].contains("no PEM PRIVATE KEY"),
            "{problems:?}"
        );
        crate::wan::certs::init(&["us-east".to_string()], &dir.path().join("certs"), true).unwrap();
        assert!(cfg.check_files().is_empty(), "{:?}", cfg.check_files());
        let e = AgentConfig::load(&dir.path().join("absent.toml")).unwrap_err();
        assert!(e.to_string().contains("absent.toml: cannot read"), "{e}");
    }
}
