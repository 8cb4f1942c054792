//! The files of a new policy crate, as `weightgrad policy new` writes them: a manifest, a
//! commented `impl Policy` (or a shipped policy's source), a native test on the golden
//! input, and this agent's SDK beside it with a lockfile pinning what it needs, so the
//! crate builds with nothing but cargo and crates.io.
//!
//! Pure: it returns paths and contents; the command line writes them.

use std::path::PathBuf;

/// The SDK's sources this binary carries, by their place in the new crate.
const SDK_SOURCES: [(&str, &str); 3] = [
    (
        "weightgrad-sdk/src/lib.rs",
        include_str!("../../../sdk/src/lib.rs"),
    ),
    (
        "weightgrad-sdk/src/guest.rs",
        include_str!("../../../sdk/src/guest.rs"),
    ),
    ("weightgrad-sdk/wit/policy.wit", weightgrad_sdk::WIT),
];

/// The workspace's lockfile: the versions the SDK was built and tested with.
const WORKSPACE_LOCK: &str = include_str!("../../../Cargo.lock");

/// The shipped policies' sources, for `--from`.
const BUILTIN_SOURCES: [(&str, &str); 8] = [
    (
        "full-sync",
        include_str!("../../../policies/full-sync/src/lib.rs"),
    ),
    ("gaia", include_str!("../../../policies/gaia/src/lib.rs")),
    (
        "terngrad",
        include_str!("../../../policies/terngrad/src/lib.rs"),
    ),
    ("qsgd", include_str!("../../../policies/qsgd/src/lib.rs")),
    ("topk", include_str!("../../../policies/topk/src/lib.rs")),
    (
        "weightgrad",
        include_str!("../../../policies/weightgrad/src/lib.rs"),
    ),
    (
        "diloco",
        include_str!("../../../policies/diloco/src/lib.rs"),
    ),
    (
        "adaptive",
        include_str!("../../../policies/adaptive/src/lib.rs"),
    ),
];

/// The SDK's version: this binary's.
const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// One file of the new crate: its path inside the crate's directory and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaffoldFile {
    /// Relative to the crate's directory.
    pub path: PathBuf,
    /// What it holds.
    pub contents: String,
}

/// Why a crate cannot be scaffolded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScaffoldError {
    /// The name cannot be a crate's.
    #[error(
        "{name:?} cannot name a policy crate: {why} (use letters, digits, '-' and '_', starting with a letter)"
    )]
    Name {
        /// The name given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// `--from` names no shipped policy.
    #[error("unknown built-in policy {0:?}; built-ins are {list}", list = builtin_names().join(", "))]
    UnknownBuiltin(String),
    /// A shipped source lacks what the scaffold rewrites (a bug in this binary).
    #[error("the built-in {0}'s source has no {1}")]
    BuiltinShape(String, &'static str),
}

fn builtin_names() -> Vec<&'static str> {
    BUILTIN_SOURCES.iter().map(|(name, _)| *name).collect()
}

/// Rust keywords and crate names a policy crate cannot take.
const RESERVED: [&str; 44] = [
    "as",
    "async",
    "await",
    "break",
    "const",
    "continue",
    "crate",
    "dyn",
    "else",
    "enum",
    "extern",
    "false",
    "fn",
    "for",
    "gen",
    "if",
    "impl",
    "in",
    "let",
    "loop",
    "match",
    "mod",
    "move",
    "mut",
    "pub",
    "ref",
    "return",
    "self",
    "static",
    "struct",
    "super",
    "trait",
    "true",
    "type",
    "unsafe",
    "use",
    "where",
    "while",
    "alloc",
    "core",
    "std",
    "test",
    "proc_macro",
    "weightgrad_sdk",
];

/// Checks that `name` can name a crate whose library is a policy.
pub fn validate_name(name: &str) -> Result<(), ScaffoldError> {
    let bad = |why| {
        Err(ScaffoldError::Name {
            name: name.into(),
            why,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 64 {
        return bad("it is longer than 64 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return bad("it does not start with a letter");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return bad("it holds a character other than a letter, digit, '-' or '_'");
    }
    if RESERVED.contains(&name.replace('-', "_").as_str()) {
        return bad("it is a Rust keyword or a crate name the policy depends on");
    }
    Ok(())
}

/// `my-policy` → `MyPolicy`: the policy type's name in the template.
fn type_name(name: &str) -> String {
    name.split(['-', '_'])
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// Every file of a new policy crate named `name`: the template, or the shipped policy
/// `from`'s source with the crate's name and version as the policy's.
pub fn policy_crate(name: &str, from: Option<&str>) -> Result<Vec<ScaffoldFile>, ScaffoldError> {
    validate_name(name)?;
    let (source, policy_type) = match from {
        None => {
            let policy_type = type_name(name);
            (template(&policy_type), policy_type)
        }
        Some(builtin) => from_builtin(builtin)?,
    };
    let lib = format!("{source}\n{}", golden_test(&policy_type));
    let mut files = vec![
        file("Cargo.toml", policy_manifest(name, from)),
        file(".gitignore", "/target\n".into()),
        file("src/lib.rs", lib),
        file("weightgrad-sdk/Cargo.toml", sdk_manifest()),
        file("Cargo.lock", policy_lock(WORKSPACE_LOCK)),
    ];
    files.extend(
        SDK_SOURCES
            .iter()
            .map(|(path, contents)| file(path, (*contents).into())),
    );
    Ok(files)
}

fn file(path: &str, contents: String) -> ScaffoldFile {
    ScaffoldFile {
        path: path.into(),
        contents,
    }
}

fn policy_manifest(name: &str, from: Option<&str>) -> String {
    let started = match from {
        Some(builtin) => format!("from the built-in `{builtin}` policy "),
        None => String::new(),
    };
    format!(
        r#"# A WeightGrad policy, started {started}by `weightgrad policy new` (weightgrad {SDK_VERSION}).
# `cargo test` runs its native tests; `weightgrad policy build` makes its component.
[package]
name = "{name}"
version = "0.1.0"
edition = "2024"

# A policy is a library: `cdylib` gives the WebAssembly module, `rlib` the native tests.
[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
# The SDK of the agent that wrote this crate, beside it (contract {contract}).
weightgrad-sdk = {{ path = "weightgrad-sdk" }}

# Its own workspace, wherever it is written.
[workspace]
"#,
        contract = weightgrad_sdk::CONTRACT,
    )
}

fn sdk_manifest() -> String {
    format!(
        r#"# The WeightGrad policy SDK {SDK_VERSION} (contract {contract}), as `weightgrad policy new` writes it.
[package]
name = "weightgrad-sdk"
description = "Policy SDK for WeightGrad: the plain-Rust types a policy reads and returns"
version = "{SDK_VERSION}"
edition = "2024"
rust-version = "{rust_version}"
license = "Apache-2.0"

[dependencies]
serde = {{ version = "1", features = ["derive"] }}

# Guest bindings exist only when compiling a policy to WebAssembly.
[target.'cfg(target_arch = "wasm32")'.dependencies]
wit-bindgen = {{ version = "0.61", default-features = false, features = ["macros", "realloc", "std"] }}
"#,
        contract = weightgrad_sdk::CONTRACT,
        rust_version = env!("CARGO_PKG_RUST_VERSION"),
    )
}

/// The commented template policy, of type `policy_type`.
fn template(policy_type: &str) -> String {
    format!(
        r#"//! A WeightGrad policy. Once per round the agent calls `decide` with the round's
//! statistics (per link, and per tensor on each link); the policy answers, for every link
//! and tensor, whether the accumulated update crosses the WAN, at which significance
//! threshold and bit-width, and how workers talk to their aggregator on the LAN. Every
//! field is described in the SDK's docs (`cargo doc --open`) and the policy guide.

use weightgrad_sdk::{{
    LanPlan, Policy, PolicyInfo, PolicyInput, PolicyOutput, TauSchedule, TensorPlan,
}};

/// The policy's settings. The component makes a fresh value with `Default` for every
/// call: what must persist from one round to the next travels in `input.state` and
/// `PolicyOutput::state`.
#[derive(Debug, Clone, Copy)]
pub struct {policy_type} {{
    /// Significance threshold τ0 on |update / weight| at the start of the run.
    pub tau0: f32,
    /// Bits per value on the WAN: 1 to 8 (stochastic rounding), 16 (bf16) or 32 (fp32).
    pub bits: u8,
}}

impl Default for {policy_type} {{
    fn default() -> Self {{
        Self {{
            tau0: 0.01,
            bits: 8,
        }}
    }}
}}

impl Policy for {policy_type} {{
    fn info(&self) -> PolicyInfo {{
        PolicyInfo {{
            // The crate's name and version: what the agent's /policies and logs show.
            name: env!("CARGO_PKG_NAME").into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "updates above 1% of their weights (falling with the learning rate), 8 bits"
                .into(),
        }}
    }}

    fn decide(&self, input: &PolicyInput) -> PolicyOutput {{
        // One plan for every tensor on every link. For a plan per link or per tensor, build
        // `PolicyOutput {{ links, lan, state }}` from `input.links[l].tensors[t]` instead.
        let plan = TensorPlan {{
            send: true,
            // On the last round before the agent stops, everything held back crosses.
            tau: if input.context.final_round {{
                0.0
            }} else {{
                TauSchedule::LearningRate.tau(self.tau0, &input.context)
            }},
            bits: self.bits,
            // Of the significant elements, at most this fraction of the tensor (1 = all).
            top_fraction: 1.0,
        }};
        // Workers' gradients and weights at full precision on the LAN.
        PolicyOutput::uniform(input, plan, LanPlan::FULL_PRECISION)
    }}
}}

// The component's exports, when compiling to WebAssembly (`weightgrad policy build`).
#[cfg(target_arch = "wasm32")]
weightgrad_sdk::export_policy!({policy_type});
"#
    )
}

/// A shipped policy's source, its name and version made the crate's, and its type.
fn from_builtin(builtin: &str) -> Result<(String, String), ScaffoldError> {
    let (_, source) = BUILTIN_SOURCES
        .iter()
        .find(|(name, _)| *name == builtin)
        .ok_or_else(|| ScaffoldError::UnknownBuiltin(builtin.into()))?;
    let shape = |what| ScaffoldError::BuiltinShape(builtin.into(), what);
    let policy_type = source
        .split("impl Policy for ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .ok_or_else(|| shape("`impl Policy for`"))?
        .to_string();
    let name_field = format!("name: \"{builtin}\".into(),");
    let at = source
        .find(&name_field)
        .ok_or_else(|| shape("name field"))?;
    let (before, after) = source.split_at(at);
    let after = &after[name_field.len()..];
    let version_start = after
        .find("version: \"")
        .ok_or_else(|| shape("version field"))?;
    let version_end = after[version_start..]
        .find(".into(),")
        .map(|end| version_start + end + ".into(),".len())
        .ok_or_else(|| shape("version field"))?;
    let source = format!(
        "// Started from the built-in `{builtin}` policy of weightgrad {SDK_VERSION}.\n\n{before}\
         name: env!(\"CARGO_PKG_NAME\").into(),{between}version: env!(\"CARGO_PKG_VERSION\").into(),{rest}",
        between = &after[..version_start],
        rest = &after[version_end..],
    );
    Ok((source, policy_type))
}

/// The native test every new crate starts with: the plan for the input the agent
/// self-tests every policy on at admission is valid.
fn golden_test(policy_type: &str) -> String {
    format!(
        r#"#[cfg(test)]
mod golden {{
    use super::*;
    use weightgrad_sdk::{{golden_input, validate_output}};

    /// The agent runs this input through every policy before it admits it.
    #[test]
    fn plans_the_golden_input_validly() {{
        let input = golden_input();
        let output = {policy_type}::default().decide(&input);
        assert_eq!(validate_output(&input, &output), Ok(()));
    }}
}}
"#
    )
}

/// The workspace's lockfile cut down to what the SDK depends on (on every target), so the
/// new crate builds with the versions the SDK was tested with. Cargo adds the crate itself
/// on its first build.
fn policy_lock(workspace_lock: &str) -> String {
    let Ok(lock) = workspace_lock.parse::<toml::Table>() else {
        return String::new();
    };
    let packages: Vec<&toml::Table> = lock
        .get("package")
        .and_then(toml::Value::as_array)
        .map(|all| all.iter().filter_map(toml::Value::as_table).collect())
        .unwrap_or_default();
    let field = |p: &toml::Table, key: &str| {
        p.get(key)
            .and_then(toml::Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    // A dependency entry reads "name", "name version" or "name version (source)".
    let matches = |p: &toml::Table, entry: &str| {
        let mut words = entry.split_whitespace();
        words.next() == Some(field(p, "name").as_str())
            && words.next().is_none_or(|v| v == field(p, "version"))
    };
    let mut keep = vec![false; packages.len()];
    let mut todo: Vec<usize> = packages
        .iter()
        .position(|p| field(p, "name") == "weightgrad-sdk")
        .into_iter()
        .collect();
    while let Some(i) = todo.pop() {
        if std::mem::replace(&mut keep[i], true) {
            continue;
        }
        let deps = packages[i]
            .get("dependencies")
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(toml::Value::as_str);
        for dep in deps {
            todo.extend((0..packages.len()).filter(|&j| !keep[j] && matches(packages[j], dep)));
        }
    }
    let mut trimmed = toml::Table::new();
    if let Some(version) = lock.get("version") {
        trimmed.insert("version".into(), version.clone());
    }
    let kept = packages
        .iter()
        .zip(keep)
        .filter(|(_, keep)| *keep)
        .map(|(p, _)| toml::Value::Table((*p).clone()))
        .collect();
    trimmed.insert("package".into(), toml::Value::Array(kept));
    format!(
        "# This file is automatically @generated by Cargo.\n# It is not intended for manual editing.\n{}",
        toml::to_string(&trimmed).unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents<'a>(files: &'a [ScaffoldFile], path: &str) -> &'a str {
        &files
            .iter()
            .find(|f| f.path == std::path::Path::new(path))
            .unwrap_or_else(|| panic!("no {path}"))
            .contents
    }

    #[test]
    fn names_that_cannot_be_crates_are_refused_with_the_reason() {
        for (name, why) in [
            ("", "empty"),
            ("1st", "start with a letter"),
            ("my policy", "character"),
            ("../escape", "start with a letter"),
            ("a/b", "character"),
            ("self", "keyword"),
            ("weightgrad-sdk", "depends on"),
            ("std", "keyword"),
        ] {
            let e = policy_crate(name, None).unwrap_err().to_string();
            assert!(e.contains(why), "{name:?}: {e}");
        }
        for name in ["my-policy", "thrifty", "Gaia_2"] {
            validate_name(name).unwrap();
        }
        assert_eq!(type_name("my-policy"), "MyPolicy");
        assert_eq!(type_name("gaia_v2"), "GaiaV2");
    }

    #[test]
    fn the_template_names_its_type_after_the_crate_and_tests_it() {
        let files = policy_crate("my-policy", None).unwrap();
        let lib = contents(&files, "src/lib.rs");
        assert!(lib.contains("impl Policy for MyPolicy"), "{lib}");
        assert!(lib.contains("export_policy!(MyPolicy)"), "{lib}");
        assert!(lib.contains("MyPolicy::default().decide(&input)"), "{lib}");
        assert!(lib.contains("env!(\"CARGO_PKG_NAME\")"), "{lib}");
        let manifest = contents(&files, "Cargo.toml");
        assert!(manifest.contains("name = \"my-policy\""), "{manifest}");
        assert!(manifest.contains("[workspace]"), "{manifest}");
        assert_eq!(
            contents(&files, "weightgrad-sdk/wit/policy.wit"),
            weightgrad_sdk::WIT
        );
    }

    #[test]
    fn every_builtin_starts_a_crate_under_the_crates_name() {
        for (builtin, source) in BUILTIN_SOURCES {
            let files = policy_crate("mine", Some(builtin)).unwrap();
            let lib = contents(&files, "src/lib.rs");
            assert!(!lib.contains(&format!("name: \"{builtin}\"")), "{builtin}");
            assert_eq!(
                lib.matches("env!(\"CARGO_PKG_NAME\")").count(),
                1,
                "{builtin}"
            );
            assert_eq!(
                lib.matches("env!(\"CARGO_PKG_VERSION\")").count(),
                1,
                "{builtin}"
            );
            // Nothing else of the shipped source changed.
            let (_, policy_type) = from_builtin(builtin).unwrap();
            assert!(lib.contains(&format!("{policy_type}::default().decide")));
            assert_eq!(
                lib.lines().count(),
                source.lines().count() + 2 + golden_test(&policy_type).lines().count() + 1,
                "{builtin}"
            );
        }
        assert_eq!(
            policy_crate("mine", Some("nope")).unwrap_err(),
            ScaffoldError::UnknownBuiltin("nope".into())
        );
        assert_eq!(builtin_names(), crate::policies::BUILTIN);
    }

    #[test]
    fn the_lockfile_pins_the_sdks_dependencies_and_nothing_else() {
        let lock = policy_lock(WORKSPACE_LOCK);
        let parsed: toml::Table = lock.parse().unwrap();
        let names: Vec<&str> = parsed["package"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        for needed in ["weightgrad-sdk", "serde", "serde_derive", "wit-bindgen"] {
            assert!(names.contains(&needed), "{needed} missing: {names:?}");
        }
        for unrelated in ["candle-core", "wasmtime", "weightgrad", "tokio"] {
            assert!(!names.contains(&unrelated), "{unrelated} kept");
        }
        assert_eq!(parsed["version"], toml::Value::Integer(4));
    }

    /// The SDK manifest written beside a new crate declares the dependencies the
    /// workspace's `sdk/Cargo.toml` does, resolved from the workspace's table.
    #[test]
    fn the_sdk_manifest_matches_the_workspaces() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let read = |p: &str| -> toml::Table {
            std::fs::read_to_string(root.join(p))
                .unwrap()
                .parse()
                .unwrap()
        };
        let workspace = read("Cargo.toml");
        let shared = &workspace["workspace"]["dependencies"];
        let sdk = read("sdk/Cargo.toml");
        let written: toml::Table = sdk_manifest().parse().unwrap();
        let as_table = |v: &toml::Value| match v {
            toml::Value::String(version) => toml::Table::from_iter([(
                "version".to_string(),
                toml::Value::String(version.clone()),
            )]),
            other => other.as_table().unwrap().clone(),
        };
        let resolve = |deps: &toml::Value| -> toml::Table {
            deps.as_table()
                .unwrap()
                .iter()
                .map(|(name, spec)| {
                    let mut spec = as_table(spec);
                    if spec.remove("workspace").is_some() {
                        let mut inherited = as_table(&shared[name]);
                        inherited.extend(spec);
                        spec = inherited;
                    }
                    (name.clone(), toml::Value::Table(spec))
                })
                .collect()
        };
        assert_eq!(
            resolve(&written["dependencies"]),
            resolve(&sdk["dependencies"])
        );
        let wasm = |t: &toml::Table| {
            resolve(&t["target"]["cfg(target_arch = \"wasm32\")"]["dependencies"])
        };
        assert_eq!(wasm(&written), wasm(&sdk));
        assert_eq!(
            written["package"]["name"].as_str(),
            sdk["package"]["name"].as_str()
        );
    }
}
