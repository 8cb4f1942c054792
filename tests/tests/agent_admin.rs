//! The admin API of running agents: authentication, policy checks, hot swap and rollback,
//! metrics and status; and fifty swaps while three regions train, which must not skip or
//! repeat a round, break per-link conservation, or cost accuracy.

use serde_json::Value;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;
use weightgrad_tests::admin::*;
use weightgrad_tests::binary;
use weightgrad_tests::cluster::*;

/// `PUT /policies` announcing an 8 MB body it never sends, without a token; the status
/// code of the answer (the test fails if none comes within 5 s).
fn unauthenticated_put_without_body(admin: SocketAddr) -> u16 {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(admin).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        conn,
        "PUT /policies HTTP/1.1\r\nHost: {admin}\r\nContent-Type: application/wasm\r\nContent-Length: 8000000\r\n\r\n"
    )
    .unwrap();
    let mut answer = [0u8; 12];
    conn.read_exact(&mut answer)
        .expect("an answer before the announced body is sent");
    String::from_utf8_lossy(&answer[9..12]).parse().unwrap()
}

#[test]
fn admin_api_refuses_without_token_and_bad_policies_and_swaps_good_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agents, admin) = cluster(dir.path(), 200, "");
    agents.iter_mut().for_each(Agent::start);
    let a = admin[0];
    wait_ready(a);
    assert_eq!(get(a, "/healthz").0, 200);
    let gaia = builtin("gaia", dir.path());
    // No token, a wrong one: 401, nothing changes.
    let (code, body) = put_policy(a, None, &gaia);
    assert_eq!(code, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("Bearer"));
    assert_eq!(put_policy(a, Some("not-the-token-at-all-no"), &gaia).0, 401);
    // The token is checked before the body is read: a caller without one who announces
    // 8 MB and sends none is answered at once, not waited for.
    assert_eq!(unauthenticated_put_without_body(a), 401);
    // Not a component: 422 with the reason.
    let (code, body) = put_policy(a, Some(TOKEN), b"this is not wasm");
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["kind"], "load");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not a valid weightgrad:policy")
    );
    // A valid component that would change the run's merge mode: 422.
    let (code, body) = put_policy(a, Some(TOKEN), &builtin("diloco", dir.path()));
    assert_eq!(code, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("merge mode"),
        "{body}"
    );
    // Over the body limit: 413.
    let (code, body) = put_policy(a, Some(TOKEN), &vec![0u8; 9 << 20]);
    assert_eq!(code, 413, "{body}");
    assert!(body["error"].as_str().unwrap().contains("limit"), "{body}");
    let (_, before) = get(a, "/policies");
    assert_eq!(before["active"]["name"], "weightgrad");
    assert_eq!(before["swaps"], 0);
    // A good one swaps; /policies and /metrics show it.
    let (code, body) = put_policy(a, Some(TOKEN), &gaia);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["active"]["name"], "gaia");
    assert_eq!(body["previous"]["name"], "weightgrad");
    let (_, policies) = get(a, "/policies");
    assert_eq!(policies["active"]["name"], "gaia");
    assert_eq!(policies["swaps"], 1);
    assert!(policies["active"]["loaded_at"].as_str().is_some());
    // Let a few rounds run under the new policy, then read the metrics.
    let round = get(a, "/status").1["round"].as_u64().unwrap();
    wait_for("five more rounds", Duration::from_secs(60), || {
        get(a, "/status").1["round"].as_u64().unwrap() >= round + 5
    });
    let (_, metrics) = get(a, "/metrics");
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(
        metrics.contains("weightgrad_policy_swaps_total{region=\"us-east\"} 1"),
        "{metrics}"
    );
    for name in [
        "weightgrad_wan_bytes_sent_total{region=\"us-east\",peer=\"eu-west\"}",
        "weightgrad_round_duration_seconds_bucket",
        "weightgrad_wan_decoded_bytes_received_total{region=\"us-east\",peer=\"eu-west\"}",
        "weightgrad_bits_chosen_bucket",
        "weightgrad_peer_up{region=\"us-east\",peer=\"ap-southeast\"} 1",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    wait_for(
        "the status page to show gaia",
        Duration::from_secs(30),
        || get(a, "/status").1["policy"]["name"] == "gaia",
    );
    // Rollback: weightgrad again; the CLI says so.
    let out = Command::new(binary())
        .args([
            "policy",
            "rollback",
            "--agent",
            &format!("http://{a}"),
            "--token-file",
        ])
        .arg(dir.path().join("token"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("active: weightgrad"));
    let out = Command::new(binary())
        .args(["status", "--agent", &format!("http://{a}"), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["region"], "us-east");
    assert_eq!(status["peers"].as_array().unwrap().len(), 2);
    assert!(status["round"].as_u64().unwrap() > 0);
    // The agent logged the swaps with digests.
    assert!(agents[0].log().contains("policy swapped"));
    for a in &mut agents {
        a.kill();
    }
}

#[test]
fn fifty_swaps_while_three_regions_train_skip_and_repeat_nothing() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    // Long enough that fifty swaps land well inside the run.
    let epochs = 40;
    // The same run without swaps, for the accuracy reference.
    let plain_dir = tempfile::tempdir().unwrap();
    let (mut plain, _) = cluster(plain_dir.path(), epochs, "");
    plain.iter_mut().for_each(Agent::start);
    let plain: Vec<Value> = finish_all(&mut plain, Duration::from_secs(600));

    let dir = tempfile::tempdir().unwrap();
    let (mut agents, admin) = cluster(dir.path(), epochs, "");
    let wasm = [
        builtin("gaia", dir.path()),
        builtin("weightgrad", dir.path()),
    ];
    agents.iter_mut().for_each(Agent::start);
    admin.iter().copied().for_each(wait_ready);
    // Fifty swaps on every agent while they train: pushes and rollbacks.
    let mut swaps = 0;
    for k in 0..50 {
        for &a in &admin {
            let (code, body) = if k < 2 {
                put_policy(a, Some(TOKEN), &wasm[k % 2])
            } else {
                rollback(a)
            };
            assert_eq!(code, 200, "swap {k} at {a}: {body}");
        }
        swaps += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let mid_run = get(admin[0], "/status").1;
    let reports: Vec<Value> = finish_all(&mut agents, Duration::from_secs(600));
    assert_eq!(swaps, 50);
    assert!(
        mid_run["round"].as_u64().unwrap() < reports[0]["rounds"].as_u64().unwrap(),
        "the swaps happened while training"
    );
    let total = plain[0]["rounds"].as_u64().unwrap();
    // Every round ran once, every peer's rounds all arrived, nothing refused.
    assert_complete_and_conserved(&reports, total);
    assert_nothing_refused(&reports);
    for r in &reports {
        assert_eq!(r["interrupted"], false);
    }
    assert_within_a_point(&reports, &plain, "with swaps");
    assert!(agents[0].log().contains("policy changed"));
}
