//! `weightgrad policy`: write and build a policy crate, check a policy component, list and
//! export the built-in ones, and push or roll back a running agent's policy.

use crate::policy::{
    BUILTIN_WASM, PolicyRuntime, Sandbox, SandboxLimits, builtin_wasm, golden_input,
};
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use weightgrad_sdk_build::{WasmKind, wasm_kind};

/// Options of `weightgrad policy`.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Write a new policy crate in ./NAME: a commented policy, a native test and the SDK.
    New {
        /// The crate's (and the policy's) name.
        name: String,
        /// Start from a built-in policy's source instead of the template.
        #[arg(long, value_name = "BUILTIN")]
        from: Option<String>,
    },
    /// Build a policy crate into a component and check it as an agent admits it.
    Build {
        /// The crate's directory.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Where to write the component [default: <target>/weightgrad/<package>.wasm].
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Validate a policy component: contract, limits, self-test; print a sample round.
    Check {
        /// The component (.wasm), or a core module with --componentize.
        file: PathBuf,
        /// Make a core module a component first (written to --output).
        #[arg(long)]
        componentize: bool,
        /// Where --componentize writes the component [default: FILE.component.wasm].
        #[arg(short, long, requires = "componentize")]
        output: Option<PathBuf>,
    },
    /// List the built-in policies.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Swap running agents' policy (checked there first; the old one is kept for rollback).
    Push {
        /// The agent's admin URL, e.g. http://127.0.0.1:9464.
        #[arg(long, conflicts_with = "agents", required_unless_present = "agents")]
        agent: Option<String>,
        /// Several agents' admin URLs, comma-separated, pushed in this order.
        #[arg(long, value_delimiter = ',')]
        agents: Vec<String>,
        /// File holding the agents' admin token.
        #[arg(long)]
        token_file: PathBuf,
        /// Push to the first agent only, wait until it has run this many rounds under the
        /// policy with no failed call, then push to the rest; a failure stops the rollout
        /// and rolls the first agent back.
        #[arg(long, value_name = "ROUNDS")]
        canary: Option<u64>,
        /// Seconds to wait for the canary's rounds before giving up (and rolling it back).
        #[arg(long, default_value_t = 600, value_name = "SECONDS")]
        canary_timeout: u64,
        /// Push even a component the agent quarantined after it failed there.
        #[arg(long)]
        force: bool,
        /// The component (.wasm).
        file: PathBuf,
    },
    /// Swap a running agent back to its previous policy.
    Rollback {
        /// The agent's admin URL.
        #[arg(long)]
        agent: String,
        /// File holding the agent's admin token.
        #[arg(long)]
        token_file: PathBuf,
    },
    /// Write a built-in policy's component to a file.
    Export {
        /// Built-in name.
        name: String,
        /// Where to write it.
        #[arg(short, long)]
        output: PathBuf,
    },
}

/// Runs `weightgrad policy ...`.
pub fn run(args: PolicyArgs) -> Result<()> {
    match args.command {
        PolicyCommand::New { name, from } => {
            super::policy_author::new(Path::new("."), &name, from.as_deref())
        }
        PolicyCommand::Build { dir, output } => {
            super::policy_author::build(&dir, output.as_deref())
        }
        PolicyCommand::Check {
            file,
            componentize,
            output,
        } => check(&file, componentize, output.as_deref()),
        PolicyCommand::List { json } => list(json),
        PolicyCommand::Push {
            agent,
            agents,
            token_file,
            canary,
            canary_timeout,
            force,
            file,
        } => {
            let plan = super::admin_client::PushPlan {
                agents: agent.into_iter().chain(agents).collect(),
                force,
                canary,
                canary_timeout: std::time::Duration::from_secs(canary_timeout),
            };
            if plan.canary == Some(0) {
                bail!("--canary: at least 1 round");
            }
            super::admin_client::push(&plan, &token_file, &file)
        }
        PolicyCommand::Rollback { agent, token_file } => {
            super::admin_client::rollback(&agent, &token_file)
        }
        PolicyCommand::Export { name, output } => {
            let Some(bytes) = builtin_wasm(&name) else {
                bail!(
                    "unknown built-in policy {name:?}; built-ins are {}",
                    BUILTIN_WASM.map(|(n, _)| n).join(", ")
                );
            };
            std::fs::write(&output, bytes)
                .with_context(|| format!("cannot write {}", output.display()))?;
            println!(
                "wrote {name} ({} bytes) to {}",
                bytes.len(),
                output.display()
            );
            Ok(())
        }
    }
}

fn check(file: &Path, componentize: bool, output: Option<&Path>) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    if wasm_kind(&bytes) != WasmKind::CoreModule {
        if componentize {
            eprintln!(
                "{} is not a core module; checking it as it is",
                file.display()
            );
        }
        return admit_and_describe(&file.display().to_string(), &bytes);
    }
    exports_the_contract(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: a core module, not a policy component: {e}",
            file.display()
        )
    })?;
    if !componentize {
        bail!(
            "{file} is a core module carrying the {contract} contract, not a component: \
             `weightgrad policy check --componentize {file}` makes it one (or build its crate \
             with `weightgrad policy build`)",
            file = file.display(),
            contract = weightgrad_sdk::CONTRACT
        );
    }
    let component = weightgrad_sdk_build::componentize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let output = output
        .map(Path::to_path_buf)
        .unwrap_or_else(|| file.with_extension("component.wasm"));
    admit_and_describe(&output.display().to_string(), &component)?;
    write_component(&output, &component)
}

/// Checks that a core module's component-type metadata exports the contract's interface;
/// the error says what it exports instead and what to do about it.
pub(super) fn exports_the_contract(core: &[u8]) -> Result<()> {
    let exports = weightgrad_sdk_build::exported_interfaces(core)?;
    if !exports.iter().any(|e| e == weightgrad_sdk::EXPORT) {
        bail!("{}", crate::policy::export_mismatch(&exports));
    }
    Ok(())
}

/// Writes an admitted component to `path` (atomically, creating its directory) and says
/// where, with its size and digest.
pub(super) fn write_component(path: &Path, component: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    crate::atomic_file::write(path, &[component])
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!(
        "wrote {} ({} bytes, sha256:{})",
        path.display(),
        component.len(),
        hex::encode(Sha256::digest(component))
    );
    Ok(())
}

/// Admits a component in the agent's sandbox (contract, limits, self-test) and prints who
/// it is and its decisions for a sample round; errors are prefixed with `label`.
pub(super) fn admit_and_describe(label: &str, bytes: &[u8]) -> Result<()> {
    let sandbox = Sandbox::new(SandboxLimits::default())?;
    let policy =
        PolicyRuntime::admit(&sandbox, bytes).map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
    let input = golden_input();
    // The sample round describes the policy's decisions; it is not a speed check (a busy
    // host must not refuse a good policy because its 10 ms budget went on waiting for a
    // core), so it runs within the admission budget as the self-test does.
    let output = sandbox
        .decide_within(&policy, &input, sandbox.admission_budget())
        .map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
    println!(
        "{}: ok\n  policy   {} {}\n  about    {}\n  digest   sha256:{}\n  contract {}",
        label,
        policy.info.name,
        policy.info.version,
        policy.info.description,
        policy.digest,
        weightgrad_sdk::CONTRACT
    );
    println!(
        "  sample round (round {}, 2 links, 4 tensors):",
        input.context.round
    );
    for (link, plan) in input.links.iter().zip(&output.links) {
        let plans: Vec<String> = plan
            .tensors
            .iter()
            .map(|p| {
                if p.send {
                    format!("send tau={} bits={}", p.tau, p.bits)
                } else {
                    "hold".into()
                }
            })
            .collect();
        println!("    to {:<13} {}", link.link.peer, plans.join(" | "));
    }
    match output.lan.mode {
        weightgrad_sdk::LanMode::Gradient => println!(
            "    LAN: gradient mode, weights at {} bits, gradients {:?}",
            output.lan.weight_bits, output.lan.gradient_bits
        ),
        weightgrad_sdk::LanMode::Data(d) => println!(
            "    LAN: data mode, {} bits per feature ({:?} ranges), refinement {}",
            d.feature_bits,
            d.scale,
            if d.refine_bits == 0 {
                "none".to_string()
            } else {
                format!(
                    "{} bits on weights at {} bits",
                    d.refine_bits, output.lan.weight_bits
                )
            }
        ),
    }
    Ok(())
}

fn list(as_json: bool) -> Result<()> {
    let sandbox = Sandbox::new(SandboxLimits::default())?;
    let mut rows = Vec::new();
    for (name, bytes) in BUILTIN_WASM {
        let policy = sandbox
            .load(bytes)
            .map_err(|e| anyhow::anyhow!("built-in {name}: {e}"))?;
        rows.push(json!({
            "name": name,
            "version": policy.info.version,
            "description": policy.info.description,
            "digest": format!("sha256:{}", hex::encode(Sha256::digest(bytes))),
            "bytes": bytes.len(),
        }));
    }
    if as_json {
        println!("{}", serde_json::Value::Array(rows));
    } else {
        for r in &rows {
            println!(
                "{:<11} {:<6} {:>7} bytes  {}",
                r["name"].as_str().unwrap_or_default(),
                r["version"].as_str().unwrap_or_default(),
                r["bytes"],
                r["description"].as_str().unwrap_or_default()
            );
        }
    }
    Ok(())
}
