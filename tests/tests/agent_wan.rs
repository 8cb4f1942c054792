//! `weightgrad agent` processes talking QUIC to each other: three regions through the WAN
//! emulator train digits and agree with the simulator; peers with the wrong CA, the wrong
//! name or another model are refused with the reason logged on both sides; a region that
//! is stopped and restarted rejoins from a live peer's model while the others go on.

use serde_json::Value;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;
use weightgrad::wan::relay::{self, Relay, RelayConfig};
use weightgrad::wan::shaper::Shaping;
use weightgrad_tests::binary;
use weightgrad_tests::cluster::*;

#[test]
fn three_agents_through_the_wan_emulator_train_digits_and_match_the_simulator() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let listen: Vec<SocketAddr> = REGIONS.iter().map(|_| free_port()).collect();
    // One relay per direction of dialling: i dials j through relays[i][j], which shapes
    // both directions at 50 Mbit/s with the pair's one-way delay (RTT 40, 80, 120 ms).
    let one_way_ms = |i: usize, j: usize| match (i.min(j), i.max(j)) {
        (0, 1) => 20.0,
        (1, 2) => 40.0,
        _ => 60.0,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut relays: Vec<Relay> = Vec::new();
    let mut via = vec![vec![String::new(); 3]; 3];
    for (i, row) in via.iter_mut().enumerate() {
        for (j, slot) in row.iter_mut().enumerate() {
            if i == j {
                continue;
            }
            let shaping = Shaping::new(50.0, one_way_ms(i, j));
            let r = rt
                .block_on(relay::start(RelayConfig::both_ways(
                    "127.0.0.1:0".parse().unwrap(),
                    listen[j],
                    shaping,
                    (i * 3 + j) as u64,
                )))
                .unwrap();
            *slot = r.local_addr().to_string();
            relays.push(r);
        }
    }
    let mut agents = three_regions(
        dir.path(),
        &listen,
        |i, j| via[i][j].clone(),
        "",
        &|_| String::new(),
        "",
    );
    agents.iter_mut().for_each(Agent::start);
    let reports: Vec<Value> = finish_all(&mut agents, Duration::from_secs(600));
    for r in &reports {
        let acc = r["test_accuracy"].as_f64().unwrap();
        assert!(acc >= 0.95, "{}: top-1 {acc}", r["region"]);
        assert_eq!(r["interrupted"], false);
        for l in r["links"].as_array().unwrap() {
            assert_eq!(l["rejected"], 0, "{}: {l}", r["region"]);
            assert!(l["connects"].as_u64().unwrap() >= 1);
        }
    }
    // The relays carried it all.
    assert!(relays.iter().all(|r| {
        r.stats()
            .up
            .delivered_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    }));
    // The simulator, same seed, policy and regions.
    let data = weightgrad::train::dataset::embedded_digits().unwrap();
    let policy = weightgrad::policies::builtin("weightgrad").unwrap();
    let sim = weightgrad::sim::run(
        &weightgrad::sim::SimConfig::demo(3, 0),
        policy.as_ref(),
        &data,
        &mut |_, _| {},
    )
    .unwrap();
    let real = sum(&reports, "wan_bytes");
    let ratio = real as f64 / sim.wan_bytes as f64;
    eprintln!(
        "WAN bytes: agents {real}, simulator {} (ratio {ratio:.4}); top-1 {:?}",
        sim.wan_bytes,
        reports
            .iter()
            .map(|r| r["test_accuracy"].as_f64().unwrap())
            .collect::<Vec<_>>()
    );
    assert!((0.9..=1.1).contains(&ratio), "ratio {ratio}");
    assert_eq!(reports[0]["rounds"].as_u64(), Some(sim.rounds));
}

/// Starts a lone `us-east` whose peers are `eu-west` and an absent `ap-southeast`, and an
/// intruder configured as
/// `claimed` with `cert_name`'s certificate from `certs_of_intruder`, training `model`.
/// Waits until both logs show what they must, then stops both.
fn refused(
    intruder_certs: &str,
    cert_name: &str,
    model: &str,
    server_log_needle: &str,
    intruder_log_needle: &str,
) {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    certs(&good, &["us-east", "eu-west", "ap-southeast"]);
    let other = dir.path().join("other");
    certs(&other, &["eu-west"]);
    let intruder_dir = if intruder_certs == "other" {
        // Another CA's certificate, but it trusts (and so can verify) us-east's CA.
        std::fs::copy(good.join("ca.pem"), other.join("ca.pem")).unwrap();
        other
    } else {
        good.clone()
    };
    let (a, b, absent) = (free_port(), free_port(), free_port());
    write_config(
        dir.path(),
        &good,
        "us-east",
        "us-east",
        0,
        2,
        a,
        &[
            ("eu-west", b.to_string()),
            ("ap-southeast", absent.to_string()),
        ],
        "peer_deadline_s = 600",
        "epochs = 1",
        "",
    );
    write_config(
        dir.path(),
        &intruder_dir,
        "eu-west",
        cert_name,
        1,
        2,
        b,
        &[("us-east", a.to_string())],
        "peer_deadline_s = 600",
        &format!("epochs = 1\nmodel = \"{model}\""),
        "",
    );
    let mut server = Agent::new(dir.path(), "us-east");
    let mut intruder = Agent::new(dir.path(), "eu-west");
    server.start();
    intruder.start();
    wait_for(
        &format!(
            "{server_log_needle:?} in us-east's log and {intruder_log_needle:?} in the intruder's"
        ),
        Duration::from_secs(60),
        || server.log().contains(server_log_needle) && intruder.log().contains(intruder_log_needle),
    );
    // Neither trained with the other.
    assert!(!server.log().contains("WAN link up"), "{}", server.log());
    // Stopped with SIGTERM, the agent reports its refusals.
    server.terminate();
    let report = server.finish(Duration::from_secs(60));
    assert_eq!(report["interrupted"], true);
    let refusals =
        report["tls_refusals"].as_u64().unwrap() + report["handshake_refusals"].as_u64().unwrap();
    assert!(refusals >= 1, "{report}");
    intruder.kill();
}

#[test]
fn a_certificate_from_another_ca_is_refused_and_both_sides_log_it() {
    refused(
        "other",
        "eu-west",
        "mlp",
        "TLS handshake failed",
        "cannot reach peer",
    );
}

#[test]
fn a_certificate_naming_another_region_is_refused_and_both_sides_log_it() {
    // ap-southeast's valid certificate, claiming to be eu-west.
    refused(
        "good",
        "ap-southeast",
        "mlp",
        "claims region \"eu-west\" but its certificate names ap-southeast",
        "peer refused this region: claims region \"eu-west\"",
    );
}

#[test]
fn a_peer_training_another_model_is_refused_and_both_sides_log_it() {
    refused(
        "good",
        "eu-west",
        "mlp:32",
        "trains another model",
        "peer refused this region: region eu-west trains another model",
    );
}

#[test]
fn a_stopped_region_is_excluded_and_rejoins_from_a_live_peers_model() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // Long enough that the others are far from done when the stopped region returns: a
    // region that finishes while a peer is excluded exits without counting it again.
    let mut agents = loopback_regions(
        dir.path(),
        "peer_deadline_s = 2",
        &|_| "epochs = 40".into(),
        "",
    );
    agents.iter_mut().for_each(Agent::start);
    // Let the run get going, then stop ap-southeast hard.
    wait_for("epoch 3 at ap-southeast", Duration::from_secs(120), || {
        latest_round(&agents[2].log()) >= 45
    });
    agents[2].kill();
    let stopped_at = latest_round(&agents[2].log());
    // The others notice, exclude it after the deadline, and keep training.
    let before = latest_round(&agents[0].log());
    wait_for(
        "us-east to exclude ap-southeast",
        Duration::from_secs(30),
        || {
            agents[0]
                .log()
                .contains("peer unreachable past the deadline")
        },
    );
    wait_for(
        "us-east to train three epochs without it",
        Duration::from_secs(120),
        || latest_round(&agents[0].log()) >= before + 45,
    );
    // Restart it: it takes a live peer's model and finishes the run with the others, who
    // count it towards their mirror clocks again.
    let logged: Vec<usize> = agents[..2].iter().map(|a| a.log().len()).collect();
    agents[2].start();
    let back = |agent: &Agent, from: usize| {
        agent.log()[from..]
            .lines()
            .any(|l| l.contains("peer is back") && l.contains("ap-southeast"))
    };
    wait_for(
        "us-east and eu-west to count ap-southeast again",
        Duration::from_secs(60),
        || back(&agents[0], logged[0]) && back(&agents[1], logged[1]),
    );
    let reports: Vec<Value> = finish_all(&mut agents, Duration::from_secs(600));
    let restarted = &reports[2];
    assert!(
        restarted["snapshots_adopted"].as_u64().unwrap() >= 1,
        "{restarted}"
    );
    assert!(
        reports[0]["snapshots_served"].as_u64().unwrap()
            + reports[1]["snapshots_served"].as_u64().unwrap()
            >= 1
    );
    assert!(agents[2].log().contains("adopted the peer's model"));
    let total = reports[0]["rounds"].as_u64().unwrap();
    for r in &reports {
        assert_eq!(r["rounds"].as_u64(), Some(total), "{r}");
        let acc = r["test_accuracy"].as_f64().unwrap();
        assert!(acc >= 0.93, "{}: top-1 {acc}", r["region"]);
    }
    eprintln!(
        "stopped at round {stopped_at}; final top-1 {:?}",
        reports
            .iter()
            .map(|r| r["test_accuracy"].as_f64().unwrap())
            .collect::<Vec<_>>()
    );
}

#[test]
fn sigterm_checkpoints_and_a_restart_continues_from_the_same_round() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut agents = loopback_regions(
        dir.path(),
        "peer_deadline_s = 120",
        &|_| "epochs = 20".into(),
        "every_rounds = 100000",
    );
    agents.iter_mut().for_each(Agent::start);
    wait_for("epoch 4 at ap-southeast", Duration::from_secs(120), || {
        latest_round(&agents[2].log()) >= 60
    });
    agents[2].terminate();
    let stopped = agents[2].finish(Duration::from_secs(60));
    assert_eq!(stopped["interrupted"], true);
    let at = stopped["rounds"].as_u64().unwrap();
    assert!(at >= 60);
    assert!(
        agents[2].log().contains("checkpoint written"),
        "{}",
        agents[2].log()
    );
    // The others wait for it (well within the deadline) and it comes back.
    agents[2].start();
    let reports: Vec<Value> = finish_all(&mut agents, Duration::from_secs(600));
    let log = agents[2].log();
    let resumed = log
        .lines()
        .find(|l| l.contains("resuming from checkpoint"))
        .unwrap_or_else(|| panic!("no resume in\n{log}"));
    assert!(resumed.contains(&format!("round={at}")), "{resumed}");
    let total = reports[0]["rounds"].as_u64().unwrap();
    assert_complete_and_conserved(&reports, total);
    assert_nothing_refused(&reports);
    for r in &reports {
        assert_eq!(r["snapshots_adopted"], 0, "{r}");
        let acc = r["test_accuracy"].as_f64().unwrap();
        assert!(acc >= 0.93, "{}: top-1 {acc}", r["region"]);
    }
    eprintln!("stopped at round {at}; resumed; all finished {total} rounds");
}

/// Three regions on loopback, 20 epochs, a checkpoint every `every` rounds.
fn loopback_cluster(dir: &std::path::Path, every: u64) -> Vec<Agent> {
    loopback_regions(
        dir,
        "peer_deadline_s = 120",
        &|_| "epochs = 20".into(),
        &format!("every_rounds = {every}"),
    )
}

#[test]
fn sigkill_loses_at_most_the_work_since_the_last_checkpoint_and_the_region_catches_up() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    // The fault-free run, for the accuracy reference.
    let plain_dir = tempfile::tempdir().unwrap();
    let mut plain = loopback_cluster(plain_dir.path(), 20);
    plain.iter_mut().for_each(Agent::start);
    let plain: Vec<Value> = finish_all(&mut plain, Duration::from_secs(600));

    let dir = tempfile::tempdir().unwrap();
    let mut agents = loopback_cluster(dir.path(), 20);
    agents.iter_mut().for_each(Agent::start);
    // Kill between checkpoints (written at 40, 60, ...), with no chance to clean up.
    wait_for("round 75 at ap-southeast", Duration::from_secs(120), || {
        latest_round(&agents[2].log()) >= 75
    });
    agents[2].kill();
    let log_before = agents[2].log();
    let last_checkpoint = max_logged(&log_before, "checkpoint written", "round=")
        .expect("a periodic checkpoint before the kill");
    assert_eq!(last_checkpoint % 20, 0);
    agents[2].start();
    let reports: Vec<Value> = finish_all(&mut agents, Duration::from_secs(600));
    let log = agents[2].log();
    let resumed = log
        .lines()
        .find(|l| l.contains("resuming from checkpoint"))
        .unwrap_or_else(|| panic!("no resume in\n{log}"));
    assert!(
        resumed.contains(&format!("round={last_checkpoint}")),
        "{resumed}"
    );
    assert!(resumed.contains("clean=false"), "{resumed}");
    // It caught up from a live peer rather than waiting for rounds nobody will resend.
    assert!(
        reports[2]["snapshots_adopted"].as_u64().unwrap() >= 1,
        "{}",
        reports[2]
    );
    let total = plain[0]["rounds"].as_u64().unwrap();
    assert_complete_and_conserved(&reports, total);
    assert_within_a_point(&reports, &plain, "after the kill");
}

/// Three regions, each pair through a relay (50 Mbit/s, 10 ms one way) that the test can cut,
/// restore or reshape; deadline 2 s, 30 epochs (long enough that the others are still
/// training when a cut region returns: one that finishes while a peer is excluded never
/// counts it again).
struct Relayed {
    rt: tokio::runtime::Runtime,
    /// (dialler, dialled, relay address, upstream, relay while up).
    relays: Vec<(usize, usize, SocketAddr, SocketAddr, Option<Relay>)>,
    agents: Vec<Agent>,
}

impl Relayed {
    fn new(dir: &std::path::Path) -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let listen: Vec<SocketAddr> = REGIONS.iter().map(|_| free_port()).collect();
        let mut relays = Vec::new();
        for i in 0..3 {
            for j in (0..3).filter(|&j| j != i) {
                let r = Self::relay(&rt, "127.0.0.1:0".parse().unwrap(), listen[j]);
                relays.push((i, j, r.local_addr(), listen[j], Some(r)));
            }
        }
        let addr: Vec<(usize, usize, String)> = relays
            .iter()
            .map(|(i, j, a, _, _)| (*i, *j, a.to_string()))
            .collect();
        let agents = three_regions(
            dir,
            &listen,
            move |i, j| {
                addr.iter()
                    .find(|(a, b, _)| *a == i && *b == j)
                    .map(|(_, _, s)| s.clone())
                    .unwrap()
            },
            "peer_deadline_s = 2",
            &|_| "epochs = 30".into(),
            "",
        );
        Self { rt, relays, agents }
    }

    /// A path at 50 Mbit/s and 10 ms one way.
    fn relay(rt: &tokio::runtime::Runtime, listen: SocketAddr, upstream: SocketAddr) -> Relay {
        Self::shaped(rt, listen, upstream, Shaping::new(50.0, 10.0))
    }

    fn shaped(
        rt: &tokio::runtime::Runtime,
        listen: SocketAddr,
        upstream: SocketAddr,
        shaping: Shaping,
    ) -> Relay {
        rt.block_on(relay::start(RelayConfig::both_ways(
            listen, upstream, shaping, 1,
        )))
        .unwrap()
    }

    /// Replaces the paths between `a` and `b` with ones shaped like `shaping`.
    fn reshape(&mut self, a: usize, b: usize, shaping: Shaping) {
        for (i, j, addr, upstream, relay) in &mut self.relays {
            if (*i, *j) == (a, b) || (*i, *j) == (b, a) {
                if let Some(old) = relay.take() {
                    self.rt.block_on(old.stop());
                }
                *relay = Some(Self::shaped(&self.rt, *addr, *upstream, shaping));
            }
        }
    }

    /// Cuts (or restores) every path to and from `region`.
    fn set_partitioned(&mut self, region: usize, cut: bool) {
        for (i, j, addr, upstream, relay) in &mut self.relays {
            if *i == region || *j == region {
                if let Some(old) = relay.take() {
                    self.rt.block_on(old.stop());
                }
                if !cut {
                    *relay = Some(Self::relay(&self.rt, *addr, *upstream));
                }
            }
        }
    }
}

/// The fault-free run through the relays, with the fault tests' seeds: their accuracy
/// reference, run once for all of them.
fn fault_free() -> &'static [Value] {
    static RUN: std::sync::OnceLock<Vec<Value>> = std::sync::OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut plain = Relayed::new(dir.path());
        plain.agents.iter_mut().for_each(Agent::start);
        finish_all(&mut plain.agents, Duration::from_secs(600))
    })
}

#[test]
fn a_partitioned_region_goes_on_alone_and_merges_back_through_its_residuals() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let plain = fault_free();
    let dir = tempfile::tempdir().unwrap();
    let mut run = Relayed::new(dir.path());
    run.agents.iter_mut().for_each(Agent::start);
    wait_for("round 60 at ap-southeast", Duration::from_secs(120), || {
        latest_round(&run.agents[2].log()) >= 60
    });
    run.set_partitioned(2, true);
    // Both sides exclude each other past the deadline and go on.
    wait_for("both sides to exclude", Duration::from_secs(60), || {
        run.agents[0]
            .log()
            .contains("peer unreachable past the deadline")
            && run.agents[2]
                .log()
                .contains("peer unreachable past the deadline")
    });
    let (east, south) = (
        latest_round(&run.agents[0].log()),
        latest_round(&run.agents[2].log()),
    );
    wait_for("both sides to train on", Duration::from_secs(60), || {
        latest_round(&run.agents[0].log()) >= east + 15
            && latest_round(&run.agents[2].log()) >= south + 15
    });
    let logged = run.agents[0].log().len();
    run.set_partitioned(2, false);
    wait_for(
        "us-east to count ap-southeast again",
        Duration::from_secs(60),
        || {
            run.agents[0].log()[logged..]
                .lines()
                .any(|l| l.contains("peer is back") && l.contains("ap-southeast"))
        },
    );
    let reports: Vec<Value> = finish_all(&mut run.agents, Duration::from_secs(600));
    let total = plain[0]["rounds"].as_u64().unwrap();
    assert_complete_and_conserved(&reports, total);
    // Merged through the residuals, not by taking anyone's model.
    for r in &reports {
        assert_eq!(r["snapshots_adopted"], 0, "{r}");
    }
    assert_within_a_point(&reports, plain, "after the partition");
}

#[test]
fn a_damaged_checkpoint_stops_the_agent_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut agents = loopback_regions(dir.path(), "", &|_| "epochs = 1".into(), "");
    let state = dir.path().join("state-us-east");
    std::fs::create_dir_all(&state).unwrap();
    let ckpt = state.join("us-east.ckpt");
    for damage in [&b"WGCK\x28\xb5\x2f\xfdjunk"[..], b"not a checkpoint", b""] {
        std::fs::write(&ckpt, damage).unwrap();
        let out = Command::new(binary())
            .args(["agent", "--config"])
            .arg(&agents[0].config)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("us-east.ckpt") && err.contains("damaged") && err.contains("move it away"),
            "{err}"
        );
    }
    // Moved away, the agent starts.
    std::fs::remove_file(&ckpt).unwrap();
    agents[0].start();
    wait_for("us-east to listen", Duration::from_secs(60), || {
        agents[0].log().contains("WAN endpoint listening")
    });
    agents[0].kill();
}

#[test]
fn restarting_every_region_in_turn_loses_nothing() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = |dir: &std::path::Path| {
        loopback_regions(
            dir,
            "peer_deadline_s = 120",
            &|_| "epochs = 30".into(),
            "every_rounds = 100000",
        )
    };
    // The same run without restarts, for the accuracy reference.
    let plain_dir = tempfile::tempdir().unwrap();
    let mut plain = cluster(plain_dir.path());
    plain.iter_mut().for_each(Agent::start);
    let plain: Vec<Value> = finish_all(&mut plain, Duration::from_secs(600));
    assert_complete_and_conserved(&plain, plain[0]["rounds"].as_u64().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let mut agents = cluster(dir.path());
    agents.iter_mut().for_each(Agent::start);
    for agent in agents.iter_mut() {
        let at = latest_round(&agent.log());
        wait_for("some progress", Duration::from_secs(120), || {
            latest_round(&agent.log()) >= at + 30
        });
        agent.terminate();
        let stopped = agent.finish(Duration::from_secs(60));
        assert_eq!(stopped["interrupted"], true, "{stopped}");
        agent.start();
    }
    let reports: Vec<Value> = finish_all(&mut agents, Duration::from_secs(600));
    let total = reports[0]["rounds"].as_u64().unwrap();
    assert_complete_and_conserved(&reports, total);
    assert_nothing_refused(&reports);
    for (r, a) in reports.iter().zip(&agents) {
        assert!(a.log().contains("resuming from checkpoint"), "{}", a.name);
        assert_eq!(r["snapshots_adopted"], 0, "{r}");
        assert!(r["test_accuracy"].as_f64().unwrap() >= 0.95, "{r}");
    }
    assert_within_a_point(&reports, &plain, "after restarting every region in turn");
}

#[test]
fn a_link_falling_to_a_tenth_mid_run_keeps_every_region_training() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let plain = fault_free();
    let mut run = Relayed::new(dir.path());
    run.agents.iter_mut().for_each(Agent::start);
    wait_for("round 60 at us-east", Duration::from_secs(120), || {
        latest_round(&run.agents[0].log()) >= 60
    });
    // us-east ↔ eu-west falls to a tenth of its bandwidth.
    run.reshape(0, 1, Shaping::new(5.0, 10.0));
    let reports: Vec<Value> = finish_all(&mut run.agents, Duration::from_secs(600));
    let total = plain[0]["rounds"].as_u64().unwrap();
    assert_complete_and_conserved(&reports, total);
    assert_within_a_point(&reports, plain, "after the link fell to a tenth");
}
