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
