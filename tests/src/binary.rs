//! The `weightgrad` binary the suite runs: the one `WEIGHTGRAD_BIN` names (a release or
//! CUDA build, say), or else the agent's binary as cargo builds it in the profile and
//! target directory of the running test.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The binary under test, found or built once per test process.
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| locate().unwrap_or_else(|e| panic!("the weightgrad binary: {e}")))
}

fn locate() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("WEIGHTGRAD_BIN") {
        let path = resolve(Path::new(&path), workspace());
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("WEIGHTGRAD_BIN: {} is not a file", path.display()))
        };
    }
    build()
}

/// The workspace root, where `cargo test` is typically run from.
fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the suite lives inside the workspace")
}

/// A relative `WEIGHTGRAD_BIN` is read from the workspace root: cargo runs each test in
/// its own crate's directory, not where the command was typed.
fn resolve(path: &Path, workspace: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        workspace.join(path)
    }
}

/// Where the running test executable says its build put things: the target directory,
/// the target triple when one was given, and the profile.
#[derive(Debug, PartialEq, Eq)]
struct BuildPlace {
    target_dir: PathBuf,
    triple: Option<String>,
    profile: String,
}

/// Reads a [`BuildPlace`] off a test executable's path:
/// `TARGET_DIR/[TRIPLE/]PROFILE_DIR/deps/NAME`, where the target directory is the one
/// holding cargo's `CACHEDIR.TAG` and `debug` is the directory of the `test` profile (and
/// of `dev`).
fn build_place(exe: &Path, is_target_dir: impl Fn(&Path) -> bool) -> Option<BuildPlace> {
    let deps = exe
        .parent()
        .filter(|d| d.file_name() == Some("deps".as_ref()))?;
    let profile_dir = deps.parent()?;
    let name = profile_dir.file_name()?.to_str()?;
    // `cargo test` builds in the `test` profile, whose directory is `debug`; building the
    // binary in `test` too shares every dependency with the suite's own build (in `dev`,
    // the proc-macros and build scripts, and so nearly every crate, were built twice).
    let profile = if name == "debug" { "test" } else { name }.to_string();
    let above = profile_dir.parent()?;
    if is_target_dir(above) {
        return Some(BuildPlace {
            target_dir: above.to_path_buf(),
            triple: None,
            profile,
        });
    }
    let root = above.parent().filter(|r| is_target_dir(r))?;
    Some(BuildPlace {
        target_dir: root.to_path_buf(),
        triple: Some(above.file_name()?.to_str()?.to_string()),
        profile,
    })
}

fn build() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this test: {e}"))?;
    let place = build_place(&exe, |d| d.join("CACHEDIR.TAG").is_file()).ok_or_else(|| {
        format!(
            "{} is not in a cargo target directory; set WEIGHTGRAD_BIN",
            exe.display()
        )
    })?;
    let workspace = workspace();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace)
        .args([
            "build",
            "--quiet",
            "-p",
            "weightgrad",
            "--bin",
            "weightgrad",
        ])
        .args(["--message-format", "json-render-diagnostics", "--profile"])
        .arg(&place.profile)
        .arg("--target-dir")
        .arg(&place.target_dir)
        .stderr(Stdio::inherit());
    if let Some(triple) = &place.triple {
        cmd.args(["--target", triple]);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`cargo build -p weightgrad` failed ({})",
            out.status
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "weightgrad")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| "cargo built no weightgrad executable".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_binary_path_is_read_from_the_workspace_root() {
        let root = Path::new("/w");
        assert_eq!(
            resolve(Path::new("target/weightgrad-cuda"), root),
            Path::new("/w/target/weightgrad-cuda")
        );
        assert_eq!(
            resolve(Path::new("/c/weightgrad"), root),
            Path::new("/c/weightgrad")
        );
    }

    #[test]
    fn the_build_place_is_read_off_the_test_executables_path() {
        let roots = [Path::new("/t"), Path::new("/w/target")];
        let is_root = |d: &Path| roots.contains(&d);
        assert_eq!(
            build_place(Path::new("/t/debug/deps/agent_wan-1"), is_root),
            Some(BuildPlace {
                target_dir: "/t".into(),
                triple: None,
                profile: "test".into()
            })
        );
        assert_eq!(
            build_place(Path::new("/w/target/release/deps/x"), is_root),
            Some(BuildPlace {
                target_dir: "/w/target".into(),
                triple: None,
                profile: "release".into()
            })
        );
        assert_eq!(
            build_place(Path::new("/t/x86_64-unknown-linux-gnu/ci/deps/x"), is_root),
            Some(BuildPlace {
                target_dir: "/t".into(),
                triple: Some("x86_64-unknown-linux-gnu".into()),
                profile: "ci".into()
            })
        );
        assert_eq!(build_place(Path::new("/t/debug/x"), is_root), None);
        assert_eq!(
            build_place(Path::new("/elsewhere/debug/deps/x"), is_root),
            None
        );
    }
}
