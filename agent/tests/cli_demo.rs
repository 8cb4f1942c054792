//! `weightgrad demo` through the real binary: the JSON contract and clear errors.

mod common;

use common::{last_json_line, weightgrad, weightgrad_ok};

#[test]
fn demo_json_has_the_documented_fields() {
    let out = weightgrad_ok(&[
        "demo",
        "--regions",
        "2",
        "--epochs",
        "1",
        "--compare",
        "full-sync",
        "--json",
    ]);
    let v = last_json_line(&out);
    assert_eq!(v["policy"], "weightgrad");
    assert_eq!(v["regions"].as_array().unwrap().len(), 2);
    for r in v["regions"].as_array().unwrap() {
        let acc = r["test_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
    }
    for key in ["wan_bytes", "lan_bytes", "virtual_seconds", "rounds"] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}");
        assert!(v["baseline"][key].as_f64().unwrap() > 0.0, "baseline {key}");
    }
    assert_eq!(v["baseline"]["policy"], "full-sync");
    assert!(v["wan_bytes"].as_u64() < v["baseline"]["wan_bytes"].as_u64());
    // Present either way: a number, or null when the baseline's accuracy was never reached.
    assert!(v["wan_bytes_ratio"].is_number() || v["wan_bytes_ratio"].is_null());
    assert!(v["time_ratio"].is_number() || v["time_ratio"].is_null());
}

#[test]
fn demo_rejects_unknown_policies_and_too_few_regions() {
    let out = weightgrad(&["demo", "--policy", "magic"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown policy \"magic\""),
        "{err}"
    );
    assert!(
        err.contains("full-sync, gaia, terngrad, qsgd, topk, weightgrad, diloco, adaptive"),
        "{err}"
    );
    let out = weightgrad(&["demo", "--regions", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("at least 2"), "{err}");
}

/// WAN bytes at the first evaluation where every region has at least `target` top-1.
fn bytes_to(curve: &serde_json::Value, target: f64) -> Option<f64> {
    curve
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["min_accuracy"].as_f64().unwrap() >= target - 1e-9)
        .map(|p| p["wan_bytes"].as_f64().unwrap())
}

/// The README's main command, with the figures `docs/benchmarks.md` reports for it (seed 0,
/// virtual time, so exact): a change that loses them has to show up here, not only in the
/// docs.
#[test]
fn the_main_command_keeps_its_documented_targets() {
    let out = weightgrad_ok(&["demo", "--compare", "full-sync", "--json"]);
    let v = last_json_line(&out);
    let lowest = |r: &serde_json::Value| {
        r["regions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["test_accuracy"].as_f64().unwrap())
            .fold(f64::INFINITY, f64::min)
    };
    let (ours, baseline) = (lowest(&v), lowest(&v["baseline"]));
    assert!(ours >= 0.95, "lowest region {ours}");
    assert!(
        ours >= baseline - 0.005,
        "{ours} against full-sync's {baseline}"
    );
    let ratio = v["wan_bytes_ratio"].as_f64();
    assert!(
        ratio.is_some_and(|r| r >= 50.0),
        "bytes to the baseline's accuracy: {ratio:?}"
    );
    let to_95 = |c| bytes_to(c, 0.95).expect("95% reached");
    let saving = to_95(&v["baseline"]["curve"]) / to_95(&v["curve"]);
    assert!(saving >= 100.0, "bytes to 95%: {saving:.1}x");
}
