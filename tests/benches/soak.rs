//! Soak: five regions on loopback train for a fixed wall time (10 minutes by default), then
//! stop with SIGTERM. Every few seconds each agent's resident memory (`VmRSS`) and open file
//! descriptors are read from /proc. After a warm-up (the first fifth of the run), memory may
//! grow by less than 10% and descriptors not at all; the run fails otherwise, and also when
//! an agent exits early, a link is not conserved or a message was refused.
//!
//! `cargo bench -p weightgrad-tests --bench soak` (set `WEIGHTGRAD_SOAK_SECS` for another length).

use std::time::{Duration, Instant};
use weightgrad_tests::cluster::{Agent, finish_all, loopback};

const REGIONS: [&str; 5] = ["us-east", "us-west", "eu-west", "eu-north", "ap-southeast"];
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// One reading of one agent.
#[derive(Clone, Copy)]
struct Sample {
    at_s: f64,
    rss_kib: u64,
    fds: usize,
}

fn read_sample(pid: u32, at_s: f64) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some(Sample { at_s, rss_kib, fds })
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; a plain `cargo test --benches` run passes nothing and
    // must not soak for ten minutes.
    if !std::env::args().any(|a| a == "--bench") {
        println!("soak: run with `cargo bench -p weightgrad-tests --bench soak`");
        return;
    }
    let secs: u64 = std::env::var("WEIGHTGRAD_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let total = Duration::from_secs(secs);
    let warmup = total / 5;
    let dir = tempfile::tempdir().unwrap();
    // Far more epochs than fit in the soak: it ends by SIGTERM, not by finishing.
    let mut agents = loopback(
        dir.path(),
        &REGIONS,
        "peer_deadline_s = 30",
        &|_| "epochs = 100000".into(),
        "every_rounds = 200",
    );
    agents.iter_mut().for_each(Agent::start);
    let started = Instant::now();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); agents.len()];
    println!(
        "soak: {} regions on loopback for {secs} s (warm-up {} s), sampling every {} s",
        REGIONS.len(),
        warmup.as_secs(),
        SAMPLE_EVERY.as_secs()
    );
    while started.elapsed() < total {
        std::thread::sleep(SAMPLE_EVERY);
        let at = started.elapsed().as_secs_f64();
        for (a, s) in agents.iter_mut().zip(&mut samples) {
            let child = a.child.as_mut().expect("started");
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "{} exited during the soak ({status}):\n{}",
                    a.name,
                    weightgrad_tests::cluster::tail(&a.log())
                );
            }
            if let Some(sample) = read_sample(child.id(), at) {
                s.push(sample);
            }
        }
    }
    agents.iter().for_each(Agent::terminate);
    let reports: Vec<_> = finish_all(&mut agents, Duration::from_secs(120));

    println!(
        "| region | rounds | RSS after warm-up (MiB) | RSS at the end (MiB) | growth | fds after warm-up | fds max after | fds at the end |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut failures = Vec::new();
    let window = 60.0_f64.min(total.as_secs_f64() / 5.0);
    for ((agent, s), report) in agents.iter().zip(&samples).zip(&reports) {
        let w = warmup.as_secs_f64();
        let after_warmup: Vec<&Sample> = s
            .iter()
            .filter(|x| x.at_s >= w && x.at_s < w + window)
            .collect();
        let end: Vec<&Sample> = s
            .iter()
            .filter(|x| x.at_s >= total.as_secs_f64() - window)
            .collect();
        assert!(
            !after_warmup.is_empty() && !end.is_empty(),
            "{}: too few samples",
            agent.name
        );
        let base = median(after_warmup.iter().map(|x| x.rss_kib).collect());
        let last = median(end.iter().map(|x| x.rss_kib).collect());
        let growth = last as f64 / base as f64 - 1.0;
        let fd_base = after_warmup.iter().map(|x| x.fds).max().unwrap();
        let fd_max = s
            .iter()
            .filter(|x| x.at_s >= w)
            .map(|x| x.fds)
            .max()
            .unwrap();
        let fd_end = s.last().unwrap().fds;
        println!(
            "| {} | {} | {:.1} | {:.1} | {:+.1}% | {fd_base} | {fd_max} | {fd_end} |",
            agent.name,
            report["rounds"],
            base as f64 / 1024.0,
            last as f64 / 1024.0,
            growth * 100.0
        );
        if growth >= 0.10 {
            failures.push(format!(
                "{}: RSS grew {:.1}% after warm-up",
                agent.name,
                growth * 100.0
            ));
        }
        if fd_end > fd_base {
            failures.push(format!(
                "{}: open descriptors grew from {fd_base} to {fd_end}",
                agent.name
            ));
        }
        for l in report["links"].as_array().unwrap() {
            let e = l["conservation_error"].as_f64().unwrap_or(f64::NAN);
            if e.is_nan() || e >= 1e-5 {
                failures.push(format!(
                    "{}→{}: conservation error {e}",
                    agent.name, l["peer"]
                ));
            }
            if l["rejected"] != 0 {
                failures.push(format!("{}→{}: messages refused", agent.name, l["peer"]));
            }
        }
    }
    if failures.is_empty() {
        println!("soak: ok");
    } else {
        for f in &failures {
            eprintln!("soak: {f}");
        }
        std::process::exit(1);
    }
}
