//! Helpers shared by the tests that drive the real `weightgrad` binary.

#![allow(dead_code)] // each test binary uses its own subset

pub mod cluster;

use serde_json::Value;
use std::process::{Command, Output};

/// Runs the binary under test with `args`.
pub fn weightgrad(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weightgrad"))
        .args(args)
        .output()
        .expect("run weightgrad")
}

/// Runs the binary under test and fails the test, showing stderr, unless it succeeds.
pub fn weightgrad_ok(args: &[&str]) -> Output {
    let out = weightgrad(args);
    assert!(
        out.status.success(),
        "weightgrad {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The last line of stdout, parsed as JSON.
pub fn last_json_line(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().expect("stdout has a line");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line {line:?} is not JSON: {e}"))
}
