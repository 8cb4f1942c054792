//! Policies that pass admission but fail later in a run, pushed to three live agents: each
//! is rolled back by the agents themselves within the breaker's three calls, quarantined,
//! and refused when pushed again; every round runs once, per-link conservation holds,
//! accuracy stays within a point of the same run without pushes, and the logs hold a few
//! lines per failure, not one per round. And a canary rollout that stops at the first
//! agent when the policy fails there.

use serde_json::Value;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;
use weightgrad_tests::admin::*;
use weightgrad_tests::binary;
use weightgrad_tests::cluster::*;
use weightgrad_tests::guests;

/// The breaker's default: failed calls in a row before the agent rolls back.
const ROLLBACK_AFTER: u64 = 3;

/// Six agents on two cores can miss a 10 ms deadline now and then: a good policy must
/// not fail here, and the failing ones fail the same way with more time.
const POLICY: &str = "[policy]\ndeadline_ms = 250";

/// The misbehaviours, and the failure kind each must be reported as.
const KINDS: [(&str, &str); 7] = [
    ("loop", "timeout"),
    ("grow", "memory"),
    ("panic", "trap"),
    ("bits77", "invalid"),
    ("count", "invalid"),
    ("huge", "oversized"),
    // A state that doubles at every call: oversized once it outgrows its limit.
    ("double", "oversized"),
];

fn round(admin: SocketAddr) -> u64 {
    get(admin, "/status").1["round"].as_u64().unwrap()
}

/// The breaker's quarantine entry for `digest` on an agent, once there.
fn quarantined(admin: SocketAddr, digest: &str) -> Option<Value> {
    let (_, p) = get(admin, "/policies");
    p["breaker"]["quarantined"]
        .as_array()?
        .iter()
        .find(|q| q["digest"] == digest)
        .cloned()
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[test]
fn policies_failing_mid_run_are_rolled_back_by_the_agents_and_quarantined() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let epochs = 40;
    // The same run without pushes, for the accuracy reference.
    let plain_dir = tempfile::tempdir().unwrap();
    let (mut plain, _) = cluster(plain_dir.path(), epochs, POLICY);
    plain.iter_mut().for_each(Agent::start);
    let plain: Vec<Value> = finish_all(&mut plain, Duration::from_secs(600));
    let total = plain[0]["rounds"].as_u64().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (mut agents, admin) = cluster(dir.path(), epochs, POLICY);
    agents.iter_mut().for_each(Agent::start);
    admin.iter().copied().for_each(wait_ready);
    let weightgrad = get(admin[0], "/policies").1["active"]["digest"].clone();
    let mut digests = Vec::new();
    for (misbehaviour, kind) in KINDS {
        // It passes admission (the golden input is round 8) and every round until a few
        // rounds from now.
        let from = (admin.iter().map(|&a| round(a)).max().unwrap() + 4).max(9);
        assert!(from + 40 < total, "{misbehaviour}: the run is too short");
        let component = guests::unruly(&format!("{misbehaviour}@{from}"));
        let digest = sha256(&component);
        digests.push((misbehaviour, digest.clone()));
        for &a in &admin {
            let (code, body) = put_policy(a, Some(TOKEN), &component);
            assert_eq!(code, 200, "{misbehaviour} at {a}: {body}");
        }
        for &a in &admin {
            wait_for(
                &format!("{a} to roll {misbehaviour} back"),
                Duration::from_secs(120),
                || quarantined(a, &digest).is_some(),
            );
            let q = quarantined(a, &digest).unwrap();
            assert_eq!(q["kind"], kind, "{misbehaviour} at {a}: {q}");
            assert_eq!(q["failures"], ROLLBACK_AFTER, "{q}");
            let (first, back) = (
                q["first_failure_round"].as_u64().unwrap(),
                q["rolled_back_round"].as_u64().unwrap(),
            );
            assert!(
                first >= from,
                "{misbehaviour} failed before round {from}: {q}"
            );
            assert_eq!(
                back - first,
                ROLLBACK_AFTER - 1,
                "rolled back within {ROLLBACK_AFTER} calls of the first failure: {q}"
            );
            let (_, p) = get(a, "/policies");
            assert_eq!(p["active"]["digest"], weightgrad, "{a}: {p}");
            assert!(p["previous"].is_null(), "{p}");
        }
        // Pushed again: refused, naming the quarantine; nothing changes.
        let (code, body) = put_policy(admin[0], Some(TOKEN), &component);
        assert_eq!(code, 409, "{body}");
        assert_eq!(body["kind"], "quarantined");
        assert!(
            body["error"].as_str().unwrap().contains(kind),
            "the refusal names the failure: {body}"
        );
    }
    // The status page and the CLI show the quarantine with its reason, once the status is
    // next published (between rounds, at most 200 ms apart; /policies reads the runtime).
    wait_for(
        "the status to show the quarantine",
        Duration::from_secs(30),
        || {
            get(admin[1], "/status").1["policy"]["breaker"]["quarantined"]
                .as_array()
                .is_some_and(|q| q.len() == KINDS.len())
        },
    );
    let out = Command::new(binary())
        .args(["status", "--agent", &format!("http://{}", admin[1])])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.matches("quarantined: unruly").count(),
        KINDS.len(),
        "{text}"
    );
    assert!(text.contains("memory"), "{text}");
    let (_, metrics) = get(admin[2], "/metrics");
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(
        metrics.contains(&format!(
            "weightgrad_policy_rollbacks_total{{region=\"ap-southeast\",cause=\"breaker\"}} {}",
            KINDS.len()
        )),
        "{metrics}"
    );
    // The gauge is published between rounds, at most 200 ms apart.
    let gauge = format!(
        "weightgrad_policy_quarantined{{region=\"ap-southeast\"}} {}",
        KINDS.len()
    );
    wait_for("the quarantine gauge", Duration::from_secs(30), || {
        get(admin[2], "/metrics")
            .1
            .as_str()
            .unwrap()
            .contains(&gauge)
    });
    let reports: Vec<Value> = finish_all(&mut agents, Duration::from_secs(600));
    // Every round ran once, every peer's rounds arrived, nothing refused or lost.
    assert_complete_and_conserved(&reports, total);
    assert_nothing_refused(&reports);
    assert_within_a_point(&reports, &plain, "with failing policies pushed");
    // A few warnings per failure kind and agent: the first failure of each policy, at
    // most a summary of its repeats, and the rollback; not one per failed call.
    for a in &agents {
        let log = a.log();
        let warnings: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .filter(|l| l.contains("weightgrad::policy::runtime"))
            .collect();
        assert!(
            warnings.len() <= 3 * KINDS.len(),
            "{}: {} policy warnings:\n{}",
            a.name,
            warnings.len(),
            warnings.join("\n")
        );
        assert_eq!(
            warnings
                .iter()
                .filter(|l| l.contains("rolled back"))
                .count(),
            KINDS.len(),
            "{}",
            a.name
        );
        assert!(
            !warnings.iter().any(|l| l.contains("wasm backtrace")),
            "a backtrace at warning level"
        );
        // And per failing policy, from any module: its first failure, at most one summary
        // of repeats, and its rollback.
        for (misbehaviour, digest) in &digests {
            let about: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .filter(|l| l.contains(digest.as_str()))
                .collect();
            assert!(
                (2..=3).contains(&about.len()),
                "{}: {} warnings about {misbehaviour}:\n{}",
                a.name,
                about.len(),
                about.join("\n")
            );
        }
    }
}

#[test]
fn a_bad_policy_pushed_with_a_canary_never_reaches_the_other_agents() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (mut agents, admin) = cluster(dir.path(), 200, POLICY);
    agents.iter_mut().for_each(Agent::start);
    admin.iter().copied().for_each(wait_ready);
    let urls: Vec<String> = admin.iter().map(|a| format!("http://{a}")).collect();
    let push = |file: &std::path::Path, canary: &str| {
        Command::new(binary())
            .args([
                "policy",
                "push",
                "--agents",
                &urls.join(","),
                "--canary",
                canary,
            ])
            .arg("--token-file")
            .arg(dir.path().join("token"))
            .arg(file)
            .output()
            .unwrap()
    };
    // Past the golden input's round 8, so that it passes admission.
    let from = (round(admin[0]) + 3).max(9);
    let bad = dir.path().join("bad.wasm");
    std::fs::write(&bad, guests::unruly(&format!("panic@{from}"))).unwrap();
    let out = push(&bad, "10");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the rollout must fail: {stderr}");
    assert!(stderr.contains("canary"), "{stderr}");
    assert!(stderr.contains("not pushed to the other 2"), "{stderr}");
    // The canary runs weightgrad again; the others never saw the bad policy.
    let (_, p) = get(admin[0], "/policies");
    assert_eq!(p["active"]["name"], "weightgrad", "{p}");
    for &a in &admin[1..] {
        let (_, p) = get(a, "/policies");
        assert_eq!(p["active"]["name"], "weightgrad", "{p}");
        assert_eq!(p["swaps"], 0, "{a} was never swapped: {p}");
        assert!(
            p["breaker"]["quarantined"].as_array().unwrap().is_empty(),
            "{p}"
        );
    }
    // A good policy passes its canary and reaches every agent.
    let good = dir.path().join("gaia.wasm");
    std::fs::write(&good, builtin("gaia", dir.path())).unwrap();
    let out = push(&good, "5");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("5 rounds with no failure"));
    for &a in &admin {
        assert_eq!(get(a, "/policies").1["active"]["name"], "gaia");
    }
    for a in &mut agents {
        a.kill();
    }
}
