//! Builds policy crates into `weightgrad:policy` components: adds the
//! `wasm32-unknown-unknown` target when the toolchain lacks it, runs cargo for that target
//! with a clean environment, and turns each core module into a component in-process.
//!
//! One implementation for the three places that build guests: the agent's build script
//! (the shipped policies), the end-to-end tests' build script (their fixture guests) and
//! `weightgrad policy build` (a user's policy crate).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The target policies are compiled for: no WASI, no imports.
pub const TARGET: &str = "wasm32-unknown-unknown";

/// Why building a guest failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The wasm32 target is missing and could not be added.
    #[error("the {TARGET} target is missing and could not be added: {0}")]
    Target(String),
    /// Cargo could not be started.
    #[error("cannot run {cargo}: {error}")]
    Cargo {
        /// The cargo command tried.
        cargo: String,
        /// What the OS said.
        error: String,
    },
    /// Cargo ran and failed; its diagnostics follow.
    #[error("cargo build --target {TARGET} failed:\n{0}")]
    Compile(String),
    /// The build finished without the expected core module.
    #[error("the build left no core module at {path}: {error}")]
    Missing {
        /// Where the module was expected.
        path: PathBuf,
        /// What reading it said.
        error: String,
    },
    /// The core module could not be made a component.
    #[error("cannot make a component of {module}: {error}")]
    Componentize {
        /// Which module.
        module: String,
        /// The encoder's reason.
        error: String,
    },
}

/// Environment variables of an outer cargo build that must not leak into the nested one:
/// its profile, flags, wrappers, target and jobserver, and its target directory.
fn leaks(key: &str) -> bool {
    key.starts_with("CARGO_PROFILE_")
        || key.starts_with("CARGO_ENCODED_")
        || matches!(
            key,
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
}

/// The cargo to run: the one running this build (`CARGO`) or `cargo` on `PATH`.
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Makes sure the toolchain that builds in `dir` has the wasm32 target: when its sysroot
/// lacks it, calls `on_add` (to tell the user) and runs `rustup target add`.
///
/// `rust-toolchain.toml` lists the target, but rustup adds listed targets only when it
/// installs a toolchain, so an already-installed toolchain may lack it.
pub fn ensure_target(dir: &Path, on_add: impl FnOnce(&str)) -> Result<(), BuildError> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .current_dir(dir)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if sysroot
        .as_deref()
        .is_some_and(|root| root.join("lib/rustlib").join(TARGET).exists())
    {
        return Ok(());
    }
    on_add(&format!(
        "the {TARGET} target is missing; adding it with `rustup target add {TARGET}`"
    ));
    match Command::new("rustup")
        .current_dir(dir)
        .args(["target", "add", TARGET])
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(BuildError::Target(format!(
            "`rustup target add {TARGET}` failed ({}): {}; add the target by hand",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ))),
        Err(e) => Err(BuildError::Target(format!(
            "rustup could not be run ({e}); install the {TARGET} target for this toolchain"
        ))),
    }
}

/// Where cargo's diagnostics go during a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Diagnostics {
    /// Kept, and returned in [`BuildError::Compile`] on failure (build scripts).
    Captured,
    /// Printed as cargo writes them (a user at a terminal sees progress and errors).
    Shown,
}

/// A release build of `packages` of the workspace or crate at `manifest` for the wasm32
/// target into `target_dir`, in an environment scrubbed of the outer build's settings.
pub fn cargo_build(
    manifest: &Path,
    packages: &[&str],
    target_dir: &Path,
) -> Result<(), BuildError> {
    cargo_build_with(manifest, packages, target_dir, Diagnostics::Captured)
}

/// [`cargo_build`], with cargo's diagnostics captured or shown.
pub fn cargo_build_with(
    manifest: &Path,
    packages: &[&str],
    target_dir: &Path,
    diagnostics: Diagnostics,
) -> Result<(), BuildError> {
    let cargo = cargo();
    let mut cmd = Command::new(&cargo);
    if let Some(dir) = manifest.parent().filter(|d| !d.as_os_str().is_empty()) {
        cmd.current_dir(dir);
    }
    cmd.args(["build", "--release", "--target", TARGET, "--manifest-path"])
        .arg(manifest);
    for package in packages {
        cmd.args(["-p", package]);
    }
    for (key, _) in std::env::vars() {
        if leaks(&key) {
            cmd.env_remove(&key);
        }
    }
    // After the scrub, which removes an outer CARGO_TARGET_DIR.
    cmd.env("CARGO_TARGET_DIR", target_dir);
    let not_run = |e: std::io::Error| BuildError::Cargo {
        cargo: cargo.clone(),
        error: e.to_string(),
    };
    match diagnostics {
        Diagnostics::Captured => {
            let output = cmd.output().map_err(not_run)?;
            if output.status.success() {
                Ok(())
            } else {
                Err(BuildError::Compile(
                    String::from_utf8_lossy(&output.stderr).into_owned(),
                ))
            }
        }
        Diagnostics::Shown => {
            // Cargo's own output goes to stderr; stdout stays the caller's.
            let status = cmd
                .stdout(std::process::Stdio::null())
                .status()
                .map_err(not_run)?;
            if status.success() {
                Ok(())
            } else {
                Err(BuildError::Compile(format!(
                    "cargo exited with {status}; its errors are above"
                )))
            }
        }
    }
}

/// Where [`cargo_build`] leaves the core module of the library crate `lib_name` (its
/// `[lib] name`, or the package name with `-` as `_`).
pub fn core_module_path(target_dir: &Path, lib_name: &str) -> PathBuf {
    target_dir
        .join(TARGET)
        .join("release")
        .join(format!("{}.wasm", lib_name.replace('-', "_")))
}

/// Reads the core module of `lib_name` from `target_dir` and makes it a component.
pub fn component_of(target_dir: &Path, lib_name: &str) -> Result<Vec<u8>, BuildError> {
    let path = core_module_path(target_dir, lib_name);
    let module = std::fs::read(&path).map_err(|e| BuildError::Missing {
        path: path.clone(),
        error: e.to_string(),
    })?;
    componentize(&module).map_err(|e| match e {
        BuildError::Componentize { error, .. } => BuildError::Componentize {
            module: path.display().to_string(),
            error,
        },
        other => other,
    })
}

/// What kind of WebAssembly binary some bytes are, read off their preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasmKind {
    /// A core module (what cargo builds for wasm32).
    CoreModule,
    /// A component (what the agent runs).
    Component,
    /// Not WebAssembly at all.
    Other,
}

/// Reads the preamble of `bytes`: `\0asm`, then a version and layer (layer 0 a core
/// module, 1 a component).
pub fn wasm_kind(bytes: &[u8]) -> WasmKind {
    match bytes {
        [0, b'a', b's', b'm', _, _, 0, 0, ..] => WasmKind::CoreModule,
        [0, b'a', b's', b'm', _, _, 1, 0, ..] => WasmKind::Component,
        _ => WasmKind::Other,
    }
}

/// The interfaces a core module's component-type metadata (as `wit-bindgen` embeds it)
/// says it exports, by their full names (`weightgrad:policy/policy@3.0.0`); empty when
/// it carries no such metadata (it was not built with a WIT export).
pub fn exported_interfaces(module: &[u8]) -> Result<Vec<String>, BuildError> {
    let (_, bindgen) =
        wit_component::metadata::decode(module).map_err(|e| BuildError::Componentize {
            module: "the module".into(),
            error: format!("{e:#}"),
        })?;
    let world = &bindgen.resolve.worlds[bindgen.world];
    Ok(world
        .exports
        .keys()
        .map(|key| bindgen.resolve.name_world_key(key))
        .collect())
}

/// Turns a core module that carries its component-type metadata (as `wit-bindgen`
/// embeds it) into a component, validated.
pub fn componentize(module: &[u8]) -> Result<Vec<u8>, BuildError> {
    wit_component::ComponentEncoder::default()
        .module(module)
        .and_then(|e| e.validate(true).encode())
        .map_err(|e| BuildError::Componentize {
            module: "the module".into(),
            error: format!("{e:#}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outer_builds_settings_are_scrubbed_and_others_kept() {
        for key in [
            "RUSTFLAGS",
            "CARGO_TARGET_DIR",
            "CARGO_PROFILE_DEV_OPT_LEVEL",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_MAKEFLAGS",
        ] {
            assert!(leaks(key), "{key}");
        }
        for key in ["PATH", "HOME", "RUSTUP_TOOLCHAIN", "CARGO_HOME"] {
            assert!(!leaks(key), "{key}");
        }
    }

    #[test]
    fn bytes_that_are_not_a_core_module_are_refused_with_a_reason() {
        let e = componentize(b"not wasm").unwrap_err().to_string();
        assert!(e.starts_with("cannot make a component of"), "{e}");
    }

    /// A core module for `wit` (its world `w`), with or without the component-type metadata.
    fn module_of(wit: &str, with_metadata: bool) -> Vec<u8> {
        let mut resolve = wit_parser::Resolve::default();
        let package = resolve.push_str("test.wit", wit).unwrap();
        let world = resolve.select_world(&[package], Some("w")).unwrap();
        let mut module =
            wit_component::dummy_module(&resolve, world, wit_parser::ManglingAndAbi::Standard32);
        if with_metadata {
            wit_component::embed_component_metadata(
                &mut module,
                &resolve,
                world,
                wit_component::StringEncoding::UTF8,
            )
            .unwrap();
        }
        module
    }

    const GREETER: &str =
        "package test:demo@1.2.3; interface greet { hi: func(); } world w { export greet; }";

    #[test]
    fn the_preamble_tells_modules_from_components() {
        let module = module_of(GREETER, true);
        assert_eq!(wasm_kind(&module), WasmKind::CoreModule);
        assert_eq!(wasm_kind(b"not wasm"), WasmKind::Other);
        assert_eq!(wasm_kind(b""), WasmKind::Other);
        let component = componentize(&module).unwrap();
        assert_eq!(wasm_kind(&component), WasmKind::Component);
    }

    #[test]
    fn the_metadata_names_the_exported_interfaces_with_their_version() {
        assert_eq!(
            exported_interfaces(&module_of(GREETER, true)).unwrap(),
            ["test:demo/greet@1.2.3"]
        );
        assert!(
            exported_interfaces(&module_of(GREETER, false))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_missing_module_names_its_path() {
        let dir = std::env::temp_dir().join("weightgrad-sdk-build-no-such-dir");
        let e = component_of(&dir, "my-policy").unwrap_err().to_string();
        assert!(e.contains("my_policy.wasm"), "{e}");
    }
}
