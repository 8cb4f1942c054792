//! A policy author's path through the real binary, outside the workspace: `policy new`,
//! `cargo test`, `policy build`, `policy check` and `policy push` to a training agent, as
//! the policy guide shows them; and `policy build` refusing what an agent would refuse.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use weightgrad_tests::admin::{cluster, get, wait_ready};
use weightgrad_tests::binary;
use weightgrad_tests::cluster::{Agent, wait_for};

/// The guide's first-policy commands: the `sh` block after the marker that names this file.
fn guide_commands() -> String {
    let guide = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/policy-guide.md");
    let text = std::fs::read_to_string(&guide).unwrap();
    let marker = "<!-- tests/tests/policy_author.rs runs this block";
    let after = &text[text.find(marker).expect("the guide's marked block")..];
    let block = after
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .map(|(block, _)| block)
        .expect("a sh block after the marker");
    block.to_string()
}

/// A temporary directory outside the workspace, as a user's would be.
fn outside_the_workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .canonicalize()
        .unwrap();
    assert!(!dir.path().canonicalize().unwrap().starts_with(&workspace));
    dir
}

/// A directory holding `weightgrad` (a link to the binary under test), for `PATH`.
fn bin_dir(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(binary(), bin.join("weightgrad")).unwrap();
    bin
}

/// The environment a user's shell would have: `weightgrad` on `PATH`, and none of the
/// suite's cargo settings (its target directory above all).
fn user_command(program: &str, bin: &Path, cwd: &Path) -> Command {
    let mut cmd = Command::new(program);
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![bin.to_path_buf()];
    paths.extend(std::env::split_paths(&path));
    cmd.current_dir(cwd)
        .env("PATH", std::env::join_paths(paths).unwrap())
        .env_remove("CARGO_TARGET_DIR");
    cmd
}

fn shown(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_guides_first_policy_goes_from_new_to_a_training_agent() {
    let commands = guide_commands();
    for step in [
        "weightgrad policy new",
        "cargo test",
        "weightgrad policy build",
        "weightgrad policy check",
        "weightgrad policy push",
    ] {
        assert!(
            commands.contains(step),
            "the guide lost {step:?}:\n{commands}"
        );
    }
    let run = tempfile::tempdir().unwrap();
    // Enough epochs to outlast the cold builds on a loaded machine; the test stops them.
    let (mut agents, admin) = cluster(run.path(), 100_000, "");
    agents.iter_mut().for_each(Agent::start);
    let a = admin[0];
    wait_ready(a);

    let work = outside_the_workspace();
    let bin = bin_dir(work.path());
    // The edit: 4 bits instead of the template's 8.
    let editor = work.path().join("edit.sh");
    std::fs::write(&editor, "#!/bin/sh\nsed -i 's/bits: 8,/bits: 4,/' \"$1\"\n").unwrap();
    std::fs::set_permissions(&editor, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = work.path().join("first-policy.sh");
    std::fs::write(&script, &commands).unwrap();
    let out = user_command("sh", &bin, work.path())
        .arg("-eux")
        .arg(&script)
        .env("EDITOR", &editor)
        .env("AGENT", format!("http://{a}"))
        .env("TOKEN_FILE", run.path().join("token"))
        .output()
        .unwrap();
    let log = shown(&out);
    assert!(
        out.status.success(),
        "the guide's commands failed:\n{log}\n--- the agent\n{}",
        weightgrad_tests::cluster::tail(&agents[0].log())
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("test golden::plans_the_golden_input_validly ... ok"),
        "{log}"
    );
    assert!(stdout.contains("policy   my-policy 0.1.0"), "{log}");
    assert!(stdout.contains("send tau=0.01 bits=4"), "the edit: {log}");
    assert!(!stdout.contains("bits=8"), "the edit: {log}");

    // The agent runs it, and keeps training under it.
    let (_, policies) = get(a, "/policies");
    assert_eq!(policies["active"]["name"], "my-policy", "{policies}");
    assert_eq!(policies["previous"]["name"], "weightgrad", "{policies}");
    let round = get(a, "/status").1["round"].as_u64().unwrap();
    wait_for(
        "five rounds under my-policy",
        Duration::from_secs(90),
        || get(a, "/status").1["round"].as_u64().unwrap() >= round + 5,
    );
    let (_, policies) = get(a, "/policies");
    assert_eq!(
        policies["active"]["name"], "my-policy",
        "still active after five rounds (no rollback): {policies}"
    );
    assert!(agents.iter().all(|agent| !agent.log().contains("panicked")));
    for agent in &mut agents {
        agent.kill();
    }
}

/// `weightgrad policy build` in `dir`: its output, and whether it wrote the component.
fn build(bin: &Path, dir: &Path) -> (Output, bool) {
    let out = user_command("weightgrad", bin, dir)
        .args(["policy", "build"])
        .output()
        .unwrap();
    let written = dir.join("target/weightgrad/strict.wasm").exists();
    (out, written)
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert_eq!(
        text.matches(from).count(),
        1,
        "{from:?} in {}",
        path.display()
    );
    std::fs::write(path, text.replace(from, to)).unwrap();
}

#[test]
fn policy_build_refuses_what_an_agent_would_refuse_and_says_why() {
    let work = outside_the_workspace();
    let bin = bin_dir(work.path());
    let new = |args: &[&str]| {
        user_command("weightgrad", &bin, work.path())
            .args(["policy", "new"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = new(&["strict", "--from", "gaia"]);
    assert!(out.status.success(), "{}", shown(&out));
    let again = new(&["strict"]);
    assert!(
        !again.status.success()
            && String::from_utf8_lossy(&again.stderr).contains("already exists"),
        "{}",
        shown(&again)
    );
    let dir = work.path().join("strict");
    let lib = dir.join("src/lib.rs");

    // A plan the agent would refuse: refused at admission, with the reason, nothing written.
    edit(&lib, "bits: 32,", "bits: 9,");
    let (out, written) = build(&bin, &dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !written, "{}", shown(&out));
    assert!(
        err.contains("strict: returned an invalid plan")
            && err.contains("9 bits is not allowed")
            && err.contains("refused at admission; nothing written"),
        "{}",
        shown(&out)
    );
    edit(&lib, "bits: 9,", "bits: 32,");

    // No export; another SDK's contract version: each refused with its reason, then undone.
    let refused_after = |file: &Path, from: &str, to: &str, reason: &str| {
        edit(file, from, to);
        let (out, written) = build(&bin, &dir);
        assert!(!out.status.success() && !written, "{}", shown(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(reason),
            "{reason}: {}",
            shown(&out)
        );
        edit(file, to, from);
    };
    refused_after(
        &lib,
        "weightgrad_sdk::export_policy!(Gaia);",
        "// no export",
        "exports nothing",
    );
    refused_after(
        &dir.join("weightgrad-sdk/wit/policy.wit"),
        "package weightgrad:policy@3.0.0;",
        "package weightgrad:policy@1.0.0;",
        "contract version 1.0.0",
    );

    // Fixed, it builds; its core module is refused by `check` with the way out, and
    // `--componentize` makes the same component.
    let (out, written) = build(&bin, &dir);
    assert!(out.status.success() && written, "{}", shown(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("policy   strict 0.1.0"));
    let core = dir.join("target/wasm32-unknown-unknown/release/strict.wasm");
    let check = |args: &[&str]| {
        user_command("weightgrad", &bin, &dir)
            .args(["policy", "check"])
            .args(args)
            .arg(&core)
            .output()
            .unwrap()
    };
    let out = check(&[]);
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("is a core module")
            && String::from_utf8_lossy(&out.stderr).contains("--componentize"),
        "{}",
        shown(&out)
    );
    let made = work.path().join("made.wasm");
    let out = check(&["--componentize", "-o", made.to_str().unwrap()]);
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(
        std::fs::read(&made).unwrap(),
        std::fs::read(dir.join("target/weightgrad/strict.wasm")).unwrap()
    );
}

#[test]
fn policy_build_without_cargo_says_what_to_install() {
    let work = outside_the_workspace();
    let out = Command::new(binary())
        .args(["policy", "new", "lonely"])
        .current_dir(work.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", shown(&out));
    let out = Command::new(binary())
        .args(["policy", "build", "lonely"])
        .current_dir(work.path())
        .env("PATH", "/nonexistent")
        .env_remove("CARGO")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot run cargo") && err.contains("rustup"),
        "{}",
        shown(&out)
    );
    let out = Command::new(binary())
        .args(["policy", "build", "nowhere"])
        .current_dir(work.path())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds no Cargo.toml"),
        "{}",
        shown(&out)
    );
}
