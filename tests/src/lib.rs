//! The end-to-end suite's harness: the `weightgrad` binary under test, agent processes
//! and their configurations ([`cluster`]), and the policy guests the tests push
//! ([`guests`]).
//!
//! The suite reaches the agent only as a user does: through the binary and the
//! `weightgrad` library's public API.

pub mod admin;
pub mod binary;
pub mod cluster;
pub mod guests;

pub use binary::binary;
use serde_json::Value;
use std::process::{Command, Output};

/// Runs the binary under test with `args`.
pub fn weightgrad(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .output()
        .expect("run weightgrad")
}

/// Runs the binary under test and fails the test, showing stderr, unless it succeeds.
pub fn weightgrad_ok(args: &[&str]) -> Output {
    succeeded(args, weightgrad(args))
}

/// [`weightgrad`] with `dir` as the working directory (for relative paths in `args`).
pub fn weightgrad_in(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(binary())
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run weightgrad")
}

/// [`weightgrad_ok`] with `dir` as the working directory (for relative paths in `args`).
pub fn weightgrad_ok_in(dir: &std::path::Path, args: &[&str]) -> Output {
    succeeded(args, weightgrad_in(dir, args))
}

fn succeeded(args: &[&str], out: Output) -> Output {
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

/// `found`, or `None` when it is missing: the test then skips and says `missing`, unless
/// `WEIGHTGRAD_REQUIRE_TOOLS=1` (set by `.ci/run`, which installs what the tests need),
/// where it fails with `missing` and `remedy`.
pub fn required<T>(found: Option<T>, missing: &str, remedy: &str) -> Option<T> {
    if found.is_none() {
        assert!(
            std::env::var("WEIGHTGRAD_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "{missing} ({remedy})"
        );
        eprintln!("skipped: {missing}");
    }
    found
}
