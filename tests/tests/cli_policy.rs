//! `weightgrad policy` through the real binary.

use weightgrad_tests::{weightgrad, weightgrad_ok};

#[test]
fn list_export_and_check_round_trip() {
    let out = weightgrad_ok(&["policy", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, weightgrad::policies::BUILTIN);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gaia.wasm");
    weightgrad_ok(&["policy", "export", "gaia", "-o", file.to_str().unwrap()]);
    let out = weightgrad(&["policy", "check", file.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("policy   gaia 1.0.0"),
        "{stdout}"
    );
    assert!(stdout.contains("send tau=0.01 bits=32"), "{stdout}");
}

#[test]
fn unfit_files_exit_non_zero_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not a component").unwrap();
    let out = weightgrad(&["policy", "check", junk.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("junk.wasm") && err.contains("not a valid weightgrad:policy@3.0.0 component"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    let out = weightgrad(&["policy", "check", "/nonexistent/p.wasm"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/p.wasm"));
    let out = weightgrad(&["policy", "export", "nope", "-o", "/tmp/x.wasm"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown built-in policy \"nope\""));
}
