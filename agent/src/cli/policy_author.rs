//! `weightgrad policy new` and `weightgrad policy build`: a policy crate from nothing, and
//! its component from the crate, with cargo as the only other tool.

use crate::policy::scaffold;
use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use weightgrad_sdk_build as sdk_build;

/// Writes a new policy crate in `parent/name`, refusing to touch anything that exists.
pub fn new(parent: &Path, name: &str, from: Option<&str>) -> Result<()> {
    let files = scaffold::policy_crate(name, from)?;
    let dir = parent.join(name);
    std::fs::create_dir(&dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => anyhow!(
            "{} already exists; `policy new` writes a new directory and overwrites nothing",
            dir.display()
        ),
        _ => anyhow!("cannot create {}: {e}", dir.display()),
    })?;
    // The directory is ours: on failure nothing half-written is left behind.
    if let Err(e) = write_files(&dir, &files) {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    println!(
        "created the policy crate {name} in {} ({}SDK {}, contract {})",
        dir.display(),
        from.map(|b| format!("from the built-in {b}, "))
            .unwrap_or_default(),
        env!("CARGO_PKG_VERSION"),
        weightgrad_sdk::CONTRACT
    );
    println!("next: cd {name} && cargo test && weightgrad policy build");
    Ok(())
}

fn write_files(dir: &Path, files: &[scaffold::ScaffoldFile]) -> Result<()> {
    use std::io::Write;
    for file in files {
        let path = dir.join(&file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut f| f.write_all(file.contents.as_bytes()))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// What `cargo metadata` says of the policy crate to build.
#[derive(Debug, PartialEq, Eq)]
struct PolicyCrate {
    /// The package's name.
    package: String,
    /// Its library's name (the core module's file stem).
    lib: String,
    /// Where cargo builds it.
    target_dir: PathBuf,
}

/// Finds the package whose manifest is `manifest` in `cargo metadata --no-deps` output
/// and its `cdylib` library.
fn policy_crate_of(metadata: &serde_json::Value, manifest: &Path) -> Result<PolicyCrate> {
    let packages = metadata["packages"].as_array().cloned().unwrap_or_default();
    let package = packages
        .iter()
        .find(|p| p["manifest_path"].as_str().map(Path::new) == Some(manifest))
        .ok_or_else(|| {
            anyhow!(
                "{} is a workspace, not a package: give the policy crate's own directory",
                manifest.display()
            )
        })?;
    let name = package["name"].as_str().unwrap_or_default().to_string();
    let lib = package["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| {
            t["crate_types"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == "cdylib"))
        })
        .and_then(|t| t["name"].as_str())
        .ok_or_else(|| {
            anyhow!(
                "{name} builds no cdylib, so cargo makes no WebAssembly module of it: add\n\n\
                 [lib]\ncrate-type = [\"cdylib\", \"rlib\"]\n\nto {}",
                manifest.display()
            )
        })?;
    let target_dir = metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("cargo metadata gave no target directory"))?;
    Ok(PolicyCrate {
        package: name,
        lib: lib.replace('-', "_"),
        target_dir,
    })
}

fn cargo_metadata(manifest: &Path) -> Result<serde_json::Value> {
    let cargo = sdk_build::cargo();
    let output = Command::new(&cargo)
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--manifest-path",
        ])
        .arg(manifest)
        .output()
        .map_err(|e| {
            anyhow!(
                "cannot run {cargo} ({e}): building a policy needs Rust's cargo; install it \
                 with rustup (https://rustup.rs)"
            )
        })?;
    if !output.status.success() {
        bail!(
            "cargo cannot read {}:\n{}",
            manifest.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    serde_json::from_slice(&output.stdout).context("cargo metadata printed no JSON")
}

/// Builds the policy crate in `dir` into a component, admits it as an agent would, and
/// writes it to `output` (or `<target>/weightgrad/<package>.wasm`).
pub fn build(dir: &Path, output: Option<&Path>) -> Result<()> {
    let manifest = dir.join("Cargo.toml");
    if !manifest.is_file() {
        bail!(
            "{} holds no Cargo.toml: `weightgrad policy new NAME` writes a policy crate",
            dir.display()
        );
    }
    let manifest = manifest
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", manifest.display()))?;
    let krate = policy_crate_of(&cargo_metadata(&manifest)?, &manifest)?;
    sdk_build::ensure_target(dir, |note| eprintln!("{note}"))?;
    eprintln!(
        "building {} for {} (release)",
        krate.package,
        sdk_build::TARGET
    );
    sdk_build::cargo_build_with(
        &manifest,
        &[&krate.package],
        &krate.target_dir,
        sdk_build::Diagnostics::Shown,
    )?;
    let core_path = sdk_build::core_module_path(&krate.target_dir, &krate.lib);
    let core = std::fs::read(&core_path)
        .with_context(|| format!("the build left no module at {}", core_path.display()))?;
    super::policy::exports_the_contract(&core).map_err(|e| anyhow!("{}: {e:#}", krate.package))?;
    let component = sdk_build::componentize(&core)?;
    let output = output.map(Path::to_path_buf).unwrap_or_else(|| {
        krate
            .target_dir
            .join("weightgrad")
            .join(format!("{}.wasm", krate.package))
    });
    // Admitted before it is written: a refused build writes no component to push.
    super::policy::admit_and_describe(&krate.package, &component)
        .map_err(|e| anyhow!("{e:#} (refused at admission; nothing written)"))?;
    super::policy::write_component(&output, &component)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn metadata(crate_types: &[&str]) -> serde_json::Value {
        json!({
            "packages": [{
                "name": "my-policy",
                "manifest_path": "/w/my-policy/Cargo.toml",
                "targets": [{ "name": "my-policy", "crate_types": crate_types }],
            }],
            "target_directory": "/w/my-policy/target",
        })
    }

    #[test]
    fn the_crate_is_read_off_cargo_metadata() {
        let krate = policy_crate_of(
            &metadata(&["cdylib", "rlib"]),
            Path::new("/w/my-policy/Cargo.toml"),
        )
        .unwrap();
        assert_eq!(
            krate,
            PolicyCrate {
                package: "my-policy".into(),
                lib: "my_policy".into(),
                target_dir: "/w/my-policy/target".into(),
            }
        );
    }

    #[test]
    fn a_crate_without_cdylib_or_a_workspace_root_is_refused_with_the_fix() {
        let e = policy_crate_of(&metadata(&["lib"]), Path::new("/w/my-policy/Cargo.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("builds no cdylib") && e.contains("crate-type = [\"cdylib\", \"rlib\"]"),
            "{e}"
        );
        let e = policy_crate_of(&metadata(&["cdylib"]), Path::new("/w/Cargo.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a workspace, not a package"), "{e}");
    }

    #[test]
    fn new_refuses_to_overwrite_and_leaves_nothing_on_a_bad_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("taken")).unwrap();
        std::fs::write(dir.path().join("taken/keep"), b"mine").unwrap();
        let e = new(dir.path(), "taken", None).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        assert_eq!(
            std::fs::read(dir.path().join("taken/keep")).unwrap(),
            b"mine"
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("taken")).unwrap().count(),
            1
        );
        assert!(new(dir.path(), "1bad", None).is_err());
        assert!(!dir.path().join("1bad").exists());
        new(dir.path(), "fresh", Some("gaia")).unwrap();
        for file in [
            "Cargo.toml",
            "Cargo.lock",
            "src/lib.rs",
            "weightgrad-sdk/wit/policy.wit",
        ] {
            assert!(dir.path().join("fresh").join(file).is_file(), "{file}");
        }
    }
}
