//! `weightgrad bench` as users run it: JSON results with the documented fields, the
//! Markdown table and plots under `--out`, and clear errors for bad options.

use weightgrad_tests::{
    last_json_line, weightgrad, weightgrad_in, weightgrad_ok, weightgrad_ok_in,
};

#[test]
fn bench_reports_every_policy_and_writes_table_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = weightgrad_ok(&[
        "bench",
        "--policies",
        "full-sync,gaia",
        "--scenario",
        "link-drop",
        "--epochs",
        "2",
        "--target-accuracy",
        "0.6",
        "--json",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let v = last_json_line(&out);
    let results = v["results"].as_array().unwrap();
    let names: Vec<&str> = results
        .iter()
        .map(|r| r["policy"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["full-sync", "gaia", "lan-only"]);
    for r in results {
        for key in [
            "final_accuracy",
            "reached_target",
            "wan_bytes_to_target",
            "virtual_seconds_to_target",
            "lan_bytes_to_target",
        ] {
            assert!(r.get(key).is_some(), "{key} missing in {r}");
        }
    }
    assert!(
        results[1]["wan_bytes_to_target"].as_u64().unwrap()
            < results[0]["wan_bytes_to_target"].as_u64().unwrap()
    );
    let md = std::fs::read_to_string(out_dir.join("results.md")).unwrap();
    assert!(md.contains("| gaia |"));
    for svg in ["accuracy_vs_wan_bytes.svg", "accuracy_vs_time.svg"] {
        let text = std::fs::read_to_string(out_dir.join(svg)).unwrap();
        assert!(
            text.starts_with("<svg") && text.contains("full-sync"),
            "{svg}"
        );
    }
}

#[test]
fn bench_over_seeds_reports_each_seed_and_the_spread() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = weightgrad_ok(&[
        "bench",
        "--policies",
        "full-sync,weightgrad",
        "--epochs",
        "2",
        "--target-accuracy",
        "0.6",
        "--seeds",
        "0,1,2",
        "--json",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let v = last_json_line(&out);
    assert_eq!(v["seeds"], serde_json::json!([0, 1, 2]));
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    for (seed, run) in runs.iter().enumerate() {
        assert_eq!(run["seed"], seed, "{run}");
    }
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let summary = v["summary"].as_array().unwrap();
    assert_eq!(summary.len(), 3, "full-sync, weightgrad, lan-only");
    let mut spread = 0.0;
    for (k, s) in summary.iter().enumerate() {
        assert_eq!(s["seeds"], 3, "{s}");
        let column = |key: &str| -> Vec<f64> {
            runs.iter()
                .filter_map(|r| r["results"][k][key].as_f64())
                .collect()
        };
        let accuracy = column("final_accuracy");
        let m = s["final_accuracy"]["mean"].as_f64().unwrap();
        assert!((m - mean(&accuracy)).abs() < 1e-12, "{s}");
        spread += s["final_accuracy"]["std"].as_f64().unwrap();
        // Speedups are each seed's own, averaged.
        let speedups = column("speedup_vs_full_sync");
        match s["speedup_vs_full_sync"]["mean"].as_f64() {
            Some(m) => assert!((m - mean(&speedups)).abs() < 1e-9, "{s}"),
            None => assert!(speedups.is_empty(), "{s}"),
        }
    }
    assert!(spread > 0.0, "the seeds gave identical runs: {v}");
    let md = std::fs::read_to_string(out_dir.join("results.md")).unwrap();
    for part in [
        "## Seed 0",
        "## Seed 2",
        "## Over the seeds",
        "| weightgrad | ",
    ] {
        assert!(md.contains(part), "{part} missing from\n{md}");
    }
    assert!(out_dir.join("accuracy_vs_time-seed1.svg").is_file());
}

#[test]
fn bad_bench_options_are_named() {
    let out = weightgrad(&["bench", "--scenario", "moon"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scenario \"moon\""));
    let out = weightgrad(&["bench", "--policies", "nope", "--epochs", "1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown policy \"nope\""));
    let out = weightgrad(&["bench", "--target-accuracy", "95"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"95\" is neither a fraction in 0..=1 nor full-sync"),
        "{err}"
    );
    // A language model needs text, and text a language model.
    let out = weightgrad(&["bench", "--model", "transformer:1,8,2,8", "--epochs", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is a language model"),
        "{err}"
    );
    let out = weightgrad(&["bench", "--policies", "weightgrad:speed=2", "--epochs", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown knob \"speed\""), "{err}");
}

/// Two well-separated classes in four features, `rows` rows with a header.
fn blobs_csv(path: &std::path::Path, rows: usize) {
    let mut text = String::from("a,b,c,d,class\n");
    for i in 0..rows {
        let label = i % 2;
        let centre = if label == 0 { -1.5 } else { 1.5 };
        let j = |k: usize| ((i * 37 + k * 11) % 100) as f64 / 100.0 - 0.5;
        text.push_str(&format!(
            "{},{},{},{},{label}\n",
            centre + j(0),
            centre - j(1),
            -centre + j(2),
            j(3)
        ));
    }
    std::fs::write(path, text).unwrap();
}

/// `weightgrad bench` arguments for logistic regression on `csv` (from [`blobs_csv`]):
/// full-sync and weightgrad, three epochs, to 90%, then `more`.
fn csv_bench<'a>(csv: &'a std::path::Path, more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "bench",
        "--dataset",
        "csv",
        "--data",
        csv.to_str().unwrap(),
        "--label-column",
        "class",
        "--policies",
        "full-sync,weightgrad",
        "--epochs",
        "3",
        "--lr",
        "0.03",
        "--target-accuracy",
        "0.9",
    ];
    args.extend_from_slice(more);
    args
}

#[test]
fn bench_trains_logistic_regression_on_a_csv_and_runs_it_as_real_agents() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("blobs.csv");
    blobs_csv(&csv, 600);
    // A stand-in for another system: it reads the setup and shards the bench wrote and
    // reports a result with every epoch's evaluation.
    let peer = dir.path().join("peer.py");
    std::fs::write(&peer, STAND_IN_PEER).unwrap();
    let peer = format!("stand-in=python3 {}", peer.display());
    // `--out` relative to the working directory: the agents' configs must still name
    // their certificates and shards where they are.
    let out = weightgrad_ok_in(
        dir.path(),
        &csv_bench(
            &csv,
            &[
                "--real",
                "full-sync",
                "--congestion",
                "bbr",
                "--sim-draws",
                "3",
                "--peer",
                &peer,
                "--json",
                "--out",
                "out",
            ],
        ),
    );
    let v = last_json_line(&out);
    let w = &v["setup"];
    assert_eq!(w["model"], "logreg", "{w}");
    // The peer saw the agents' run: three regions, six shaped links, its shards.
    let p = &v["peers"][0];
    assert_eq!(p["name"], "stand-in", "{p}");
    assert_eq!(p["seconds_to_target"], 2.0, "{p}");
    assert_eq!(p["wan_bytes_to_target"], 2000, "{p}");
    assert_eq!(
        p["result"]["notes"],
        "3 regions, 6 links, 480 samples, layers [4, 2]"
    );
    assert_eq!(w["architecture"], "logreg[4-2]", "{w}");
    assert_eq!(w["params"], 10, "{w}");
    for r in v["results"].as_array().unwrap() {
        assert_eq!(r["reached_target"], true, "{r}");
    }
    // The agents read their shards of the same CSV: full-sync sends every update, so their
    // bytes match the simulator's closely, and they learn the same problem.
    let real = &v["real"][0];
    let (a, s) = (
        real["real_wan_bytes"].as_f64().unwrap(),
        real["sim_wan_bytes"].as_f64().unwrap(),
    );
    assert!((a / s - 1.0).abs() < 0.1, "agents {a}, simulator {s}");
    assert!(real["real_accuracy"].as_f64().unwrap() > 0.9, "{real}");
    // The simulator's time and bytes are the means over the draws of the links' jitter
    // and loss (the bytes rounded), each draw's kept beside them.
    let mean_of_draws = |key: &str| {
        let draws: Vec<f64> = real[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} in {real}"))
            .iter()
            .map(|d| d.as_f64().unwrap())
            .collect();
        assert_eq!(draws.len(), 3, "{key} in {real}");
        draws.iter().sum::<f64>() / 3.0
    };
    let mean = mean_of_draws("sim_seconds_draws");
    assert!(
        (real["sim_seconds"].as_f64().unwrap() - mean).abs() < 1e-9 * mean,
        "{real}"
    );
    assert_eq!(s, mean_of_draws("sim_wan_bytes_draws").round(), "{real}");
    // Decoding and merging peers' updates is part of the measured work, not all of it.
    let (work, receiving) = (
        real["busy_seconds_per_round"].as_f64().unwrap(),
        real["receive_seconds_per_round"].as_f64().unwrap(),
    );
    assert!(receiving > 0.0 && receiving < work, "{real}");
    assert!(real.get("host_receive_buffer_drops").is_some(), "{real}");
    // Time and bytes to the target on the agents' common clock: within the run.
    let to_target = real["real_seconds_to_target"].as_f64().expect("reached");
    assert!(
        to_target > 0.0 && to_target <= real["real_seconds"].as_f64().unwrap(),
        "{real}"
    );
    let bytes_to_target = real["real_wan_bytes_to_target"].as_f64().unwrap();
    assert!(bytes_to_target > 0.0 && bytes_to_target <= a, "{real}");
    // The curve the real plots draw: the agents' evaluations on their common clock.
    let curve = real["curve"].as_array().unwrap();
    assert!(!curve.is_empty(), "{real}");
    let seconds: Vec<f64> = curve
        .iter()
        .map(|p| p["virtual_seconds"].as_f64().unwrap())
        .collect();
    assert!(seconds.windows(2).all(|w| w[0] <= w[1]), "{seconds:?}");
    assert!(
        curve
            .iter()
            .any(|p| p["virtual_seconds"] == real["real_seconds_to_target"])
    );
    for svg in [
        "real_accuracy_vs_time.svg",
        "real_accuracy_vs_wan_bytes.svg",
    ] {
        let text = std::fs::read_to_string(dir.path().join("out").join(svg)).unwrap();
        assert!(
            text.starts_with("<svg") && text.contains("full-sync") && text.contains("real agents"),
            "{svg}"
        );
    }
    let agent =
        std::fs::read_to_string(dir.path().join("out/real/full-sync/us-east.toml")).unwrap();
    assert!(agent.contains("congestion = \"bbr\""), "{agent}");
    // The staleness both trained at, from the agents' reports and the simulator's: every
    // step counted (a region with a peer at 0 rounds starts its second step 1 behind).
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("out/real/full-sync/us-east.json")).unwrap(),
    )
    .unwrap();
    for link in report["links"].as_array().unwrap() {
        let mean = link["rounds_behind_mean"].as_f64().unwrap();
        let max = link["rounds_behind_max"].as_f64().unwrap();
        assert!(mean > 0.0 && mean <= max, "{link}");
    }
    let evaluation = &report["evaluations"][0];
    assert_eq!(
        evaluation["peer_rounds_complete"].as_array().unwrap().len(),
        2,
        "{evaluation}"
    );
    for side in ["real_rounds_behind_mean", "sim_rounds_behind_mean"] {
        assert!(real[side].as_f64().unwrap() > 0.0, "{side}: {real}");
    }
    // How busy the busiest link was, in both: each link sent every round, so some time.
    for side in [
        "real_busiest_link_busy_share",
        "sim_busiest_link_busy_share",
    ] {
        let share = real[side].as_f64().unwrap();
        assert!(share > 0.0 && share <= 1.0, "{side}: {real}");
    }
    for link in report["links"].as_array().unwrap() {
        assert!(link["busy_seconds"].as_f64().unwrap() > 0.0, "{link}");
    }
    // The emulator's measurements the simulator was calibrated by: every directed link.
    let measured = real["links"].as_array().unwrap();
    assert_eq!(measured.len(), 6, "{real}");
    for m in measured {
        assert!(m["update_bytes"].as_u64().unwrap() > 0, "{m}");
        assert!(m["wire_bytes"].as_u64() > m["update_bytes"].as_u64(), "{m}");
    }
    let md = std::fs::read_to_string(dir.path().join("out/results.md")).unwrap();
    assert!(
        md.contains("model `logreg` (logreg[4-2], 10 parameters"),
        "{md}"
    );
    assert!(md.contains("| stand-in | 2.00 | 2000 | 95.00% |"), "{md}");
    assert!(
        md.contains("its bytes and time the means over 3 draw(s) of the links' jitter and loss"),
        "{md}"
    );
    assert!(
        md.contains(
            "rounds behind at a step, agents / simulator | busiest link busy, agents / simulator |"
        ),
        "{md}"
    );
    let svg = std::fs::read_to_string(dir.path().join("out/real_accuracy_vs_time.svg")).unwrap();
    assert!(svg.contains("stand-in"), "the peer is not in the plot");
}

#[test]
fn concurrent_real_policies_and_peers_run_for_every_seed_at_once_after_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("blobs.csv");
    blobs_csv(&csv, 600);
    let peer = dir.path().join("peer.py");
    std::fs::write(&peer, STAND_IN_PEER).unwrap();
    let peer = format!("stand-in=python3 {}", peer.display());
    let out = weightgrad_ok_in(
        dir.path(),
        &csv_bench(
            &csv,
            &[
                "--seeds",
                "0,1",
                "--real",
                "full-sync,weightgrad,weightgrad",
                "--real-concurrent",
                "full-sync",
                "--peer",
                &peer,
                "--peer-concurrent",
                "--json",
                "--out",
                "out",
            ],
        ),
    );
    let v = last_json_line(&out);
    // Each seed's checks keep --real's order; a policy named twice ran twice.
    for run in v["runs"].as_array().unwrap() {
        let policies: Vec<&str> = run["real"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["policy"].as_str().unwrap())
            .collect();
        assert_eq!(policies, ["full-sync", "weightgrad", "weightgrad"], "{run}");
        // Two runs of the agents, each timed on its own wall clock.
        assert_ne!(
            run["real"][1]["real_seconds"], run["real"][2]["real_seconds"],
            "{run}"
        );
        assert_eq!(run["peers"][0]["name"], "stand-in", "{run}");
    }
    // When each run's agents trained: (start, end), unix seconds, over the regions.
    let span = |seed: u64, policy: &str| -> (f64, f64) {
        let mut span = (f64::INFINITY, f64::NEG_INFINITY);
        for region in ["us-east", "eu-west", "ap-southeast"] {
            let path = dir
                .path()
                .join(format!("out/real/seed-{seed}/{policy}/{region}.json"));
            let r: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let start = r["training_started_unix"].as_f64().unwrap();
            span.0 = span.0.min(start);
            span.1 = span.1.max(start + r["training_seconds"].as_f64().unwrap());
        }
        span
    };
    let (a, b) = (span(0, "full-sync"), span(1, "full-sync"));
    assert!(
        a.0 < b.1 && b.0 < a.1,
        "the seeds' full-sync runs did not overlap: {a:?} {b:?}"
    );
    for seed in [0, 1] {
        let alone = span(seed, "weightgrad");
        assert!(
            alone.1 <= a.0.min(b.0),
            "seed {seed}'s weightgrad ran beside the concurrent runs: {alone:?}, {a:?}, {b:?}"
        );
        // The peers started with the concurrent agents, not after them.
        let started: f64 = std::fs::read_to_string(
            dir.path()
                .join(format!("out/real/seed-{seed}/peer-stand-in/started")),
        )
        .unwrap()
        .parse()
        .unwrap();
        assert!(
            started < a.1.max(b.1),
            "seed {seed}'s peer started at {started}, after the concurrent runs: {a:?} {b:?}"
        );
    }
}

/// A peer that trains nothing: it notes when it started (unix seconds, in `started` in its
/// setup directory), checks what the bench wrote and reports one evaluation per epoch, a
/// second and 1000 bytes apart, at 85% and then 95%.
#[test]
fn a_failing_peer_is_reported_with_the_end_of_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("blobs.csv");
    blobs_csv(&csv, 200);
    let peer = dir.path().join("broken.py");
    std::fs::write(
        &peer,
        "import sys\nprint('rank 0 starting')\nsys.exit('rank 1 unreachable through its relay')\n",
    )
    .unwrap();
    let peer = format!("broken=python3 {}", peer.display());
    let out = weightgrad_in(
        dir.path(),
        // The data named relative to the bench's working directory, as a user would.
        &csv_bench(
            std::path::Path::new("blobs.csv"),
            &["--real", "full-sync", "--peer", &peer],
        ),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    // The cause is in the bench's own error, not only in a log file.
    assert!(err.contains("peer broken failed (exit status: 1)"), "{err}");
    assert!(
        err.contains("  | rank 0 starting\n  | rank 1 unreachable through its relay"),
        "{err}"
    );
}

const STAND_IN_PEER: &str = r#"
import json, os, struct, sys, time
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
setup_dir = args["--setup"]
open(os.path.join(setup_dir, "started"), "w").write(repr(time.time()))
setup = json.load(open(os.path.join(setup_dir, "setup.json")))
samples = 0
for shard in setup["shards"]:
    raw = open(os.path.join(setup_dir, shard), "rb").read()
    (n,) = struct.unpack_from("<Q", raw, 0)
    samples += json.loads(raw[8:8 + n])["labels"]["shape"][0]
curve = [{"round": (e + 1) * setup["rounds_per_epoch"], "seconds": e + 1.0,
          "wan_bytes": (e + 1) * 1000, "min_accuracy": 0.85 if e == 0 else 0.95}
         for e in range(setup["epochs"])]
notes = f"{len(setup['regions'])} regions, {len(setup['links'])} links, {samples} samples, layers {setup['layers']}"
json.dump({"wan_bytes": 9000, "seconds": 9.0, "final_accuracy": 0.95, "curve": curve,
           "notes": notes}, open(args["--result"], "w"))
"#;

/// A CIFAR-10 binary directory whose classes differ by brightness: `train` records in
/// `data_batch_1.bin`, `test` in `test_batch.bin`.
fn tiny_cifar(dir: &std::path::Path, train: usize, test: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let batch = |n: usize, salt: usize| {
        let mut b = Vec::with_capacity(n * 3073);
        for i in 0..n {
            let label = (i % 2) as u8;
            b.push(label);
            b.extend(
                (0..3072).map(|p| (label as usize * 160 + (p * 7 + i * 13 + salt) % 64) as u8),
            );
        }
        b
    };
    std::fs::write(dir.join("data_batch_1.bin"), batch(train, 0)).unwrap();
    std::fs::write(dir.join("test_batch.bin"), batch(test, 5)).unwrap();
}

#[test]
fn bench_trains_the_cnn_on_a_cifar_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cifar = dir.path().join("cifar");
    tiny_cifar(&cifar, 96, 20);
    let out = weightgrad_ok(&[
        "bench",
        "--dataset",
        "cifar10",
        "--data",
        cifar.to_str().unwrap(),
        "--policies",
        "full-sync",
        "--epochs",
        "1",
        "--target-accuracy",
        "0.1",
        "--json",
    ]);
    let v = last_json_line(&out);
    let w = &v["setup"];
    assert_eq!(w["model"], "cnn", "{w}");
    assert_eq!(w["architecture"], "cnn[3x32x32-10]", "{w}");
    let names: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["policy"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["full-sync", "lan-only"]);
    assert!(v["results"][0]["wan_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn bad_workload_options_are_named() {
    for (args, want) in [
        (vec!["bench", "--dataset", "csv"], "needs --data"),
        (vec!["bench", "--model", "rnn"], "unknown model"),
        (vec!["bench", "--compute-ms=-1"], "--compute-ms"),
        (vec!["bench", "--bandwidth-scale", "0"], "--bandwidth-scale"),
        (vec!["bench", "--lr", "0"], "--lr"),
        (vec!["bench", "--jobs", "0"], "--jobs"),
        (
            vec!["bench", "--real", "weightgrad", "--congestion", "reno"],
            "invalid value 'reno'",
        ),
        (vec!["bench", "--congestion", "bbr"], "--real"),
        (vec!["bench", "--peer", "x=true"], "--real"),
        (vec!["bench", "--peer-concurrent"], "--peer"),
        (vec!["bench", "--real-concurrent", "full-sync"], "--real"),
        (
            vec![
                "bench",
                "--real",
                "weightgrad",
                "--real-concurrent",
                "full-sync",
            ],
            "--real-concurrent names full-sync, which --real does not run",
        ),
        (
            vec![
                "bench",
                "--real",
                "weightgrad",
                "--real-timeout-minutes",
                "0",
            ],
            "--real-timeout-minutes must be at least 1",
        ),
        (
            vec!["bench", "--real", "weightgrad", "--sim-draws", "0"],
            "--sim-draws must be at least 1",
        ),
        (vec!["bench", "--sim-draws", "2"], "--real"),
        (
            vec!["bench", "--real", "weightgrad", "--peer", "no-command"],
            "NAME=COMMAND",
        ),
        (
            vec![
                "bench",
                "--model",
                "cnn",
                "--real",
                "weightgrad",
                "--peer",
                "x=true",
            ],
            "MLP and logistic-regression models only",
        ),
        (
            vec!["bench", "--max-staleness", "18446744073709551615"],
            "is more than 1000000 rounds",
        ),
        (vec!["bench", "--max-staleness", "1,4,1"], "bound 1 twice"),
        (vec!["bench", "--seeds", "0,1,0"], "seed 0 twice"),
        (
            vec!["bench", "--seed", "1", "--seeds", "0,1"],
            "cannot be used with",
        ),
        (
            vec!["bench", "--max-staleness", "1,4", "--real", "weightgrad"],
            "one --max-staleness",
        ),
        (
            vec![
                "bench",
                "--dataset",
                "cifar10",
                "--data",
                "/nonexistent/cifar",
            ],
            "/nonexistent/cifar",
        ),
    ] {
        let out = weightgrad(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
    }
}
