//! `weightgrad demo` through the real binary: the JSON contract and clear errors.

use weightgrad_tests::{last_json_line, weightgrad, weightgrad_ok};

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

/// The README's main command keeps the accuracy and byte savings `docs/benchmarks.md`
/// reports for it, with margins that seeds 0 to 2 all meet (seed 0 is the documented run:
/// 96.39% everywhere, the baseline's accuracy with 120× fewer bytes, 95% with 115× fewer;
/// seeds 1 and 2 end up to 0.83 points below full-sync and save 84–99× to 95%), so that
/// training noise of the size a different seed or floating-point path brings does not fail
/// it, and a change that loses the savings does.
#[test]
fn the_main_command_keeps_its_accuracy_and_byte_savings() {
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
        ours >= baseline - 0.01,
        "{ours} against full-sync's {baseline}"
    );
    // When weightgrad reaches the baseline's final accuracy, it is with ≥ 50× fewer bytes.
    if let Some(ratio) = v["wan_bytes_ratio"].as_f64() {
        assert!(
            ratio >= 50.0,
            "bytes to the baseline's accuracy: {ratio:.1}x"
        );
    }
    let to_95 = |c| bytes_to(c, 0.95).expect("95% reached");
    let saving = to_95(&v["baseline"]["curve"]) / to_95(&v["curve"]);
    assert!(saving >= 75.0, "bytes to 95%: {saving:.1}x");
}
