//! Talking to a running agent's admin API: `weightgrad status`, `weightgrad policy push`
//! and `weightgrad policy rollback`.

use crate::admin::auth::Token;
use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Options of `weightgrad status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The agent's admin URL, e.g. http://127.0.0.1:9464.
    #[arg(long)]
    agent: String,
    /// Print the JSON as the agent sent it.
    #[arg(long)]
    json: bool,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(30)))
        .build()
        .into()
}

fn url(base: &str, path: &str) -> String {
    format!("{}{path}", base.trim_end_matches('/'))
}

/// Reads the token file the way the agent does (so a short token fails here too).
fn bearer(token_file: &Path) -> Result<String> {
    Token::from_file(token_file)
        .map_err(|e| anyhow!(e.replace("admin.token_file", "--token-file")))?;
    Ok(format!(
        "Bearer {}",
        std::fs::read_to_string(token_file)?.trim()
    ))
}

/// The body as JSON, or an error carrying the agent's message.
fn json_reply(what: &str, mut reply: ureq::http::Response<ureq::Body>) -> Result<Value> {
    let status = reply.status();
    let text = reply
        .body_mut()
        .read_to_string()
        .with_context(|| format!("{what}: reading the reply"))?;
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if !status.is_success() {
        let msg = value
            .get("error")
            .and_then(Value::as_str)
            .map_or_else(|| value.to_string(), str::to_string);
        bail!("{what}: the agent answered {status}: {msg}");
    }
    Ok(value)
}

/// Runs `weightgrad status`.
pub fn status(args: StatusArgs) -> Result<()> {
    let reply = agent()
        .get(url(&args.agent, "/status"))
        .call()
        .with_context(|| format!("cannot reach {}", args.agent))?;
    let s = json_reply("status", reply)?;
    if args.json {
        println!("{s}");
        return Ok(());
    }
    println!(
        "{} — {} — round {}/{} — loss {} — test top-1 {}",
        s["region"].as_str().unwrap_or("?"),
        s["state"].as_str().unwrap_or("?"),
        s["round"],
        s["total_rounds"],
        s["loss"],
        s["test_accuracy"]
    );
    println!(
        "policy {} {} ({}…), since {}",
        s["policy"]["name"].as_str().unwrap_or("?"),
        s["policy"]["version"].as_str().unwrap_or("?"),
        &s["policy"]["digest"].as_str().unwrap_or("?")
            [..12.min(s["policy"]["digest"].as_str().unwrap_or("?").len())],
        s["policy"]["loaded_at"].as_str().unwrap_or("?")
    );
    println!(
        "WAN sent {} B, received {} B; LAN {} B",
        s["bytes"]["wan_sent"], s["bytes"]["wan_received"], s["bytes"]["lan"]
    );
    for p in s["peers"].as_array().into_iter().flatten() {
        println!(
            "  peer {:<16} {:<9} rtt {:>8} ms  goodput {:>12} bit/s  staleness {}",
            p["name"].as_str().unwrap_or("?"),
            p["state"].as_str().unwrap_or("?"),
            p["rtt_ms"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.1}")),
            p["goodput_bps"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.0}")),
            p["staleness"]
        );
    }
    Ok(())
}

/// `weightgrad policy push`.
pub fn push(agent_url: &str, token_file: &Path, file: &PathBuf) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let reply = agent()
        .put(url(agent_url, "/policies"))
        .header("Authorization", bearer(token_file)?)
        .header("Content-Type", "application/wasm")
        .send(&bytes[..])
        .with_context(|| format!("cannot reach {agent_url}"))?;
    let v = json_reply("policy push", reply)?;
    println!(
        "{}; previous: {}",
        active(&v),
        v["previous"]["digest"].as_str().unwrap_or("none")
    );
    Ok(())
}

/// `active: NAME VERSION (DIGEST)` from a `/policies` answer.
fn active(v: &Value) -> String {
    format!(
        "active: {} {} ({})",
        v["active"]["name"].as_str().unwrap_or("?"),
        v["active"]["version"].as_str().unwrap_or("?"),
        v["active"]["digest"].as_str().unwrap_or("?")
    )
}

/// `weightgrad policy rollback`.
pub fn rollback(agent_url: &str, token_file: &Path) -> Result<()> {
    let reply = agent()
        .post(url(agent_url, "/policies/rollback"))
        .header("Authorization", bearer(token_file)?)
        .send_empty()
        .with_context(|| format!("cannot reach {agent_url}"))?;
    let v = json_reply("policy rollback", reply)?;
    println!("{}", active(&v));
    Ok(())
}
