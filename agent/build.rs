//! Builds the shipped policies (and the test fixture guest) for wasm32-unknown-unknown,
//! turns each core module into a component, and leaves them in OUT_DIR for `include_bytes!`.
//!
//! The wasm32 target is listed in rust-toolchain.toml, but rustup adds listed targets only
//! when it installs a toolchain; if the target is missing, this script adds it with rustup.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// (name, package) of every guest embedded in the agent.
const GUESTS: [(&str, &str); 9] = [
    ("full-sync", "weightgrad-policy-full-sync"),
    ("gaia", "weightgrad-policy-gaia"),
    ("terngrad", "weightgrad-policy-terngrad"),
    ("qsgd", "weightgrad-policy-qsgd"),
    ("topk", "weightgrad-policy-topk"),
    ("weightgrad", "weightgrad-policy-weightgrad"),
    ("diloco", "weightgrad-policy-diloco"),
    ("adaptive", "weightgrad-policy-adaptive"),
    ("unruly", "weightgrad-test-guest-unruly"),
];

const TARGET: &str = "wasm32-unknown-unknown";

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest
        .parent()
        .expect("the agent lives inside the workspace")
        .to_path_buf();
    for dir in ["policies", "sdk", "agent/tests/guests"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("Cargo.lock").display()
    );
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // One nested target directory for every profile (test, check, clippy), beside the
    // outer one, so each guest is compiled once.
    let nested = out
        .ancestors()
        .nth(4)
        .map(|t| t.join("wasm-guests"))
        .unwrap_or_else(|| out.join("wasm-guests"));

    ensure_target();
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--release", "--target", TARGET, "--manifest-path"])
        .arg(root.join("Cargo.toml"));
    for (_, package) in GUESTS {
        cmd.args(["-p", package]);
    }
    // The nested build is a plain build: nothing of the outer one's flags, wrappers or
    // jobserver leaks in.
    for (key, _) in env::vars() {
        if key.starts_with("CARGO_PROFILE_")
            || key.starts_with("CARGO_ENCODED_")
            || matches!(
                key.as_str(),
                "RUSTFLAGS"
                    | "RUSTC_WRAPPER"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "CLIPPY_ARGS"
                    | "CARGO_BUILD_TARGET"
                    | "CARGO_MAKEFLAGS"
                    | "MAKEFLAGS"
                    | "MFLAGS"
                    | "CARGO_TARGET_DIR"
            )
        {
            cmd.env_remove(&key);
        }
    }
    // Set after the scrub above, which removes an outer CARGO_TARGET_DIR (CI may point it
    // outside the clone): the guests always build into the nested directory read below.
    cmd.env("CARGO_TARGET_DIR", &nested);
    let output = cmd.output().expect("run cargo for the wasm32 guests");
    if !output.status.success() {
        panic!(
            "building the policy guests for {TARGET} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    for (name, package) in GUESTS {
        let core = nested
            .join(TARGET)
            .join("release")
            .join(format!("{}.wasm", package.replace('-', "_")));
        let module =
            std::fs::read(&core).unwrap_or_else(|e| panic!("read {}: {e}", core.display()));
        let component = wit_component::ComponentEncoder::default()
            .module(&module)
            .and_then(|e| e.validate(true).encode())
            .unwrap_or_else(|e| panic!("make {name} a component: {e:#}"));
        std::fs::write(out.join(format!("{name}.wasm")), component).expect("write the component");
    }
    std::fs::write(
        out.join("wrong-version.wasm"),
        wrong_version_component(&root),
    )
    .expect("write the wrong-version fixture");
}

/// A test fixture: a component that exports the policy interface under the previous
/// contract version, 1.0.0 (functions that only trap), so the host must refuse it by version.
fn wrong_version_component(root: &Path) -> Vec<u8> {
    let wit_path = root.join("sdk/wit/policy.wit");
    let wit = std::fs::read_to_string(&wit_path).expect("read the contract");
    let other = wit.replace(
        "package weightgrad:policy@2.0.0;",
        "package weightgrad:policy@1.0.0;",
    );
    assert_ne!(
        wit, other,
        "the contract's package line changed; update build.rs"
    );
    let mut resolve = wit_parser::Resolve::default();
    let package = resolve
        .push_str(&wit_path, &other)
        .expect("parse the 1.0.0 contract");
    let world = resolve
        .select_world(&[package], Some("guest"))
        .expect("the guest world");
    let mut module =
        wit_component::dummy_module(&resolve, world, wit_parser::ManglingAndAbi::Standard32);
    wit_component::embed_component_metadata(
        &mut module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )
    .expect("embed the 1.0.0 metadata");
    wit_component::ComponentEncoder::default()
        .module(&module)
        .and_then(|e| e.validate(true).encode())
        .expect("encode the 1.0.0 fixture")
}

/// Adds the wasm32 target with rustup when the active toolchain lacks it.
fn ensure_target() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let installed = |root: &Path| root.join("lib/rustlib").join(TARGET).exists();
    if sysroot.as_deref().is_some_and(installed) {
        return;
    }
    println!(
        "cargo:warning=the {TARGET} target is missing; adding it with `rustup target add {TARGET}`"
    );
    let status = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("`rustup target add {TARGET}` failed ({s}); add the target by hand"),
        Err(e) => panic!(
            "the {TARGET} target is missing and rustup could not be run ({e}); \
             install the target for this toolchain to build the policies"
        ),
    }
}
