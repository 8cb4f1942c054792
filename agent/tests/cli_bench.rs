//! `weightgrad bench` as users run it: JSON results with the documented fields, the
//! Markdown table and plots under `--out`, and clear errors for bad options.

mod common;

use common::{last_json_line, weightgrad, weightgrad_ok};

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
fn bad_bench_options_are_named() {
    let out = weightgrad(&["bench", "--scenario", "moon"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scenario \"moon\""));
    let out = weightgrad(&["bench", "--policies", "nope", "--epochs", "1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown policy \"nope\""));
    let out = weightgrad(&["bench", "--target-accuracy", "95"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a fraction"));
}
