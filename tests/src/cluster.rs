//! Running `weightgrad agent` processes in tests: configs, certificates, processes and
//! their logs and reports.

use crate::binary;
use serde_json::Value;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The heavy tests of a binary share two cores: run them one at a time.
pub static HEAVY: Mutex<()> = Mutex::new(());

pub const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-southeast"];

/// A loopback address free for UDP and TCP that no other socket will be given before the
/// process it is meant for binds it (see `weightgrad::loopback_port`).
pub fn free_port() -> SocketAddr {
    weightgrad::loopback_port::unused().expect("a free loopback port")
}

/// One agent process, its files, and its log.
pub struct Agent {
    pub name: String,
    pub config: PathBuf,
    pub log: PathBuf,
    pub report: PathBuf,
    pub child: Option<Child>,
}

impl Agent {
    pub fn new(dir: &Path, name: &str) -> Self {
        Self {
            name: name.into(),
            config: dir.join(format!("{name}.toml")),
            log: dir.join(format!("{name}.log")),
            report: dir.join(format!("{name}.json")),
            child: None,
        }
    }

    pub fn start(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            Command::new(binary())
                .args(["agent", "--config"])
                .arg(&self.config)
                .arg("--report")
                .arg(&self.report)
                .env("WEIGHTGRAD_LOG", "warn,weightgrad=debug")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to finish its run and returns its report.
    pub fn finish(&mut self, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().expect("started");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "{} exited with {status}:\n{}",
                    self.name,
                    tail(&self.log())
                );
                self.child = None;
                let text = std::fs::read_to_string(&self.report).unwrap();
                return serde_json::from_str(&text).unwrap();
            }
            if Instant::now() > deadline {
                let log = self.log();
                self.kill();
                panic!(
                    "{} did not finish in {within:?}:\n{}",
                    self.name,
                    tail(&log)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

pub fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes a config for `name` (shard `index` of `count`) listening on `listen`, dialling
/// `peers` (name, address); `wan`, `training` and `checkpoint` are extra keys for those
/// sections (`training` may open further sections, such as `[admin]`).
#[allow(clippy::too_many_arguments)]
pub fn write_config(
    dir: &Path,
    certs: &Path,
    name: &str,
    cert_name: &str,
    index: usize,
    count: usize,
    listen: SocketAddr,
    peers: &[(&str, String)],
    wan: &str,
    training: &str,
    checkpoint: &str,
) -> PathBuf {
    let mut t = format!(
        "region = \"{name}\"\n[wan]\nlisten = \"{listen}\"\nbandwidth_mbps = 50\nrtt_ms = 80\n{wan}\n"
    );
    for (p, addr) in peers {
        t += &format!("[[peers]]\nname = \"{p}\"\naddress = \"{addr}\"\n");
    }
    t += &format!(
        "[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/{cert_name}.pem\"\nkey = \"{c}/{cert_name}.key\"\n",
        c = certs.display()
    );
    t += &format!("[data.shard]\nindex = {index}\ncount = {count}\n[training]\n{training}\n");
    t += &format!(
        "[checkpoint]\ndir = \"{}/state-{name}\"\n{checkpoint}\n",
        dir.display()
    );
    if !t.contains("[admin]") && !wan.contains("[admin]") {
        t += "[admin]\nlisten = \"127.0.0.1:0\"\n";
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, t).unwrap();
    path
}

pub fn certs(dir: &Path, regions: &[&str]) {
    let list = regions.join(",");
    let out = Command::new(binary())
        .args(["certs", "init", "--regions", &list, "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn sum(reports: &[Value], key: &str) -> u64 {
    reports.iter().map(|r| r[key].as_u64().unwrap()).sum()
}

/// The highest `key=` value on log lines containing `marker`.
pub fn max_logged(log: &str, marker: &str, key: &str) -> Option<u64> {
    log.lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| {
            l.split(key)
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .max()
}

/// The last round an agent logged at an epoch's end (0 before the first).
pub fn latest_round(log: &str) -> u64 {
    max_logged(log, "round round=", "round=").unwrap_or(0)
}

/// Certificates and configs in `dir` for `names`, each region one shard of as many: region
/// `i` listens on `listen[i]` and dials peer `j` at `address(i, j)`; `wan` and `checkpoint`
/// are extra keys for those sections, `training(i)` for region `i`'s `[training]` (it may
/// open further sections, such as `[admin]`). Returns the agents, not started.
pub fn regions(
    dir: &Path,
    names: &[&str],
    listen: &[SocketAddr],
    address: impl Fn(usize, usize) -> String,
    wan: &str,
    training: &dyn Fn(usize) -> String,
    checkpoint: &str,
) -> Vec<Agent> {
    let certs_dir = dir.join("certs");
    certs(&certs_dir, names);
    (0..names.len())
        .map(|i| {
            let peers: Vec<(&str, String)> = (0..names.len())
                .filter(|&j| j != i)
                .map(|j| (names[j], address(i, j)))
                .collect();
            write_config(
                dir,
                &certs_dir,
                names[i],
                names[i],
                i,
                names.len(),
                listen[i],
                &peers,
                wan,
                &training(i),
                checkpoint,
            );
            Agent::new(dir, names[i])
        })
        .collect()
}

/// [`regions`] for the three `REGIONS`.
pub fn three_regions(
    dir: &Path,
    listen: &[SocketAddr],
    address: impl Fn(usize, usize) -> String,
    wan: &str,
    training: &dyn Fn(usize) -> String,
    checkpoint: &str,
) -> Vec<Agent> {
    regions(dir, &REGIONS, listen, address, wan, training, checkpoint)
}

/// [`regions`] for `names`, dialling each other directly on loopback.
pub fn loopback(
    dir: &Path,
    names: &[&str],
    wan: &str,
    training: &dyn Fn(usize) -> String,
    checkpoint: &str,
) -> Vec<Agent> {
    let listen: Vec<SocketAddr> = names.iter().map(|_| free_port()).collect();
    let to = listen.clone();
    regions(
        dir,
        names,
        &listen,
        move |_, j| to[j].to_string(),
        wan,
        training,
        checkpoint,
    )
}

/// The three `REGIONS` dialling each other directly on loopback.
pub fn loopback_regions(
    dir: &Path,
    wan: &str,
    training: &dyn Fn(usize) -> String,
    checkpoint: &str,
) -> Vec<Agent> {
    loopback(dir, &REGIONS, wan, training, checkpoint)
}

/// Waits for every agent to finish its run (each within `within`) and returns the reports.
pub fn finish_all(agents: &mut [Agent], within: Duration) -> Vec<Value> {
    agents.iter_mut().map(|a| a.finish(within)).collect()
}

impl Agent {
    /// Sends SIGTERM (the agent finishes its round, checkpoints and exits).
    pub fn terminate(&self) {
        let pid = self.child.as_ref().expect("started").id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success(), "kill -TERM {pid}");
    }
}

/// Every region ran all `total` rounds, every peer's rounds all arrived everywhere, and on
/// every link Σ sent + adjustments + residual = Σ local updates (relative gap < 1e-5).
pub fn assert_complete_and_conserved(reports: &[Value], total: u64) {
    for r in reports {
        assert_eq!(r["rounds"].as_u64(), Some(total), "{r}");
        for l in r["links"].as_array().unwrap() {
            assert_eq!(l["peer_rounds_complete"].as_u64(), Some(total), "{l}");
            let e = l["conservation_error"].as_f64().unwrap();
            assert!(
                e < 1e-5,
                "{}→{}: conservation error {e}",
                r["region"],
                l["peer"]
            );
        }
    }
}

/// Each region's final top-1 is at most one point below the same region's in `baseline`
/// (printed with `label`, e.g. "after the kill").
pub fn assert_within_a_point(reports: &[Value], baseline: &[Value], label: &str) {
    for (r, p) in reports.iter().zip(baseline) {
        let (acc, base) = (
            r["test_accuracy"].as_f64().unwrap(),
            p["test_accuracy"].as_f64().unwrap(),
        );
        eprintln!("{}: top-1 {acc} {label}, {base} without", r["region"]);
        assert!(acc >= base - 0.01, "{}: {acc} vs {base}", r["region"]);
    }
}

/// No link of any region refused a message.
pub fn assert_nothing_refused(reports: &[Value]) {
    for r in reports {
        for l in r["links"].as_array().unwrap() {
            assert_eq!(l["rejected"], 0, "{}: {l}", r["region"]);
        }
    }
}
