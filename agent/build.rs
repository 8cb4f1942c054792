//! Builds the shipped policies for wasm32-unknown-unknown, turns each core module into a
//! component, and leaves them in OUT_DIR for `include_bytes!` (with `weightgrad-sdk-build`,
//! which also adds the wasm32 target when the toolchain lacks it).

use std::env;
use std::path::PathBuf;

/// (name, package) of every guest embedded in the agent.
const GUESTS: [(&str, &str); 8] = [
    ("full-sync", "weightgrad-policy-full-sync"),
    ("gaia", "weightgrad-policy-gaia"),
    ("terngrad", "weightgrad-policy-terngrad"),
    ("qsgd", "weightgrad-policy-qsgd"),
    ("topk", "weightgrad-policy-topk"),
    ("weightgrad", "weightgrad-policy-weightgrad"),
    ("diloco", "weightgrad-policy-diloco"),
    ("adaptive", "weightgrad-policy-adaptive"),
];

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest
        .parent()
        .expect("the agent lives inside the workspace")
        .to_path_buf();
    for dir in ["policies", "sdk/src", "sdk/wit", "sdk/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("Cargo.lock").display()
    );
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // One nested target directory for every profile (test, check, clippy) and for the
    // tests' guests too, beside the outer one, so each guest is compiled once.
    let nested = out
        .ancestors()
        .nth(4)
        .map(|t| t.join("wasm-guests"))
        .unwrap_or_else(|| out.join("wasm-guests"));
    weightgrad_sdk_build::ensure_target(&root, |note| println!("cargo:warning={note}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let packages = GUESTS.map(|(_, package)| package);
    weightgrad_sdk_build::cargo_build(&root.join("Cargo.toml"), &packages, &nested)
        .unwrap_or_else(|e| panic!("building the policy guests: {e}"));
    for (name, package) in GUESTS {
        let component = weightgrad_sdk_build::component_of(&nested, package)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        std::fs::write(out.join(format!("{name}.wasm")), component).expect("write the component");
    }
}
