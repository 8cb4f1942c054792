//! Builds the suite's policy guests (`tests/guests/`) as components into OUT_DIR, and a
//! component of the previous contract version that the host must refuse.

use std::env;
use std::path::{Path, PathBuf};

/// (name, package) of every guest the suite embeds.
const GUESTS: [(&str, &str); 1] = [("unruly", "weightgrad-test-guest-unruly")];

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest
        .parent()
        .expect("the suite lives inside the workspace")
        .to_path_buf();
    for path in [
        "tests/guests",
        "sdk/src",
        "sdk/wit",
        "sdk/Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // The agent's build script builds the shipped policies into the same directory.
    let nested = out
        .ancestors()
        .nth(4)
        .map(|t| t.join("wasm-guests"))
        .unwrap_or_else(|| out.join("wasm-guests"));
    weightgrad_sdk_build::ensure_target(&root, |note| println!("cargo:warning={note}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let packages = GUESTS.map(|(_, package)| package);
    weightgrad_sdk_build::cargo_build(&root.join("Cargo.toml"), &packages, &nested)
        .unwrap_or_else(|e| panic!("building the test guests: {e}"));
    for (name, package) in GUESTS {
        let component = weightgrad_sdk_build::component_of(&nested, package)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        std::fs::write(out.join(format!("{name}.wasm")), component).expect("write the component");
        // The core module too: the harness writes a mode into it for each variant.
        let core = weightgrad_sdk_build::core_module_path(&nested, package);
        std::fs::copy(&core, out.join(format!("{name}-core.wasm")))
            .unwrap_or_else(|e| panic!("copy {}: {e}", core.display()));
    }
    std::fs::write(
        out.join("wrong-version.wasm"),
        wrong_version_component(&root),
    )
    .expect("write the wrong-version fixture");
}

/// A component that exports the policy interface under the previous contract version,
/// 2.0.0 (functions that only trap).
fn wrong_version_component(root: &Path) -> Vec<u8> {
    let wit_path = root.join("sdk/wit/policy.wit");
    let wit = std::fs::read_to_string(&wit_path).expect("read the contract");
    let other = wit.replace(
        "package weightgrad:policy@3.0.0;",
        "package weightgrad:policy@2.0.0;",
    );
    assert_ne!(
        wit, other,
        "the contract's package line changed; update tests/build.rs"
    );
    let mut resolve = wit_parser::Resolve::default();
    let package = resolve
        .push_str(&wit_path, &other)
        .expect("parse the 2.0.0 contract");
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
    .expect("embed the 2.0.0 metadata");
    weightgrad_sdk_build::componentize(&module).expect("encode the 2.0.0 fixture")
}
