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
    let breaker = &s["policy"]["breaker"];
    if let Some(sus) = breaker["suspended"].as_object() {
        println!(
            "  breaker open since round {}: the policy is retried at round {} ({}: {})",
            sus["since_round"],
            sus["next_probe"],
            sus["kind"].as_str().unwrap_or("?"),
            sus["reason"].as_str().unwrap_or("?")
        );
    }
    for q in breaker["quarantined"].as_array().into_iter().flatten() {
        println!(
            "  quarantined: {} {} ({}…): {} failed calls in a row from round {}, rolled back at round {} ({}: {})",
            q["name"].as_str().unwrap_or("?"),
            q["version"].as_str().unwrap_or("?"),
            &q["digest"].as_str().unwrap_or("?")
                [..12.min(q["digest"].as_str().unwrap_or("?").len())],
            q["failures"],
            q["first_failure_round"],
            q["rolled_back_round"],
            q["kind"].as_str().unwrap_or("?"),
            q["reason"].as_str().unwrap_or("?")
        );
    }
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

/// Where `weightgrad policy push` sends a policy, and how.
#[derive(Debug, Clone)]
pub struct PushPlan {
    /// Agents' admin URLs, in order; with a canary the first is it.
    pub agents: Vec<String>,
    /// Push even a component the agent quarantined.
    pub force: bool,
    /// Rounds the first agent must run the policy with no failure before the others get
    /// it.
    pub canary: Option<u64>,
    /// How long to wait for the canary's rounds.
    pub canary_timeout: std::time::Duration,
}

/// `weightgrad policy push`: to every agent in turn, or to a canary first.
pub fn push(plan: &PushPlan, token_file: &Path, file: &PathBuf) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    let token = bearer(token_file)?;
    let Some((first, rest)) = plan.agents.split_first() else {
        bail!("policy push: name an agent (--agent URL or --agents URL,URL,...)");
    };
    push_one(first, &token, &bytes, plan.force)?;
    if let Some(rounds) = plan.canary {
        if let Err(e) = watch_canary(first, &digest, rounds, plan.canary_timeout) {
            // Undo it on the canary unless its breaker already has.
            let rolled = match policies(first) {
                Ok(v) if v["active"]["digest"].as_str() == Some(digest.as_str()) => {
                    match rollback(first, token_file) {
                        Ok(()) => "rolled back",
                        Err(_) => "NOT rolled back (roll it back by hand)",
                    }
                }
                Ok(_) => "already rolled back by the agent",
                Err(_) => "in an unknown state (its /policies did not answer)",
            };
            bail!(
                "canary {first}: {e:#}; the policy was not pushed to the other {} agent(s); \
                 on the canary it is {rolled}",
                rest.len(),
            );
        }
        println!("canary {first}: {rounds} rounds with no failure");
    }
    for agent in rest {
        push_one(agent, &token, &bytes, plan.force)
            .with_context(|| format!("the agents before {agent} run the new policy"))?;
    }
    Ok(())
}

fn push_one(agent_url: &str, bearer: &str, bytes: &[u8], force: bool) -> Result<()> {
    let path = if force {
        "/policies?force=true"
    } else {
        "/policies"
    };
    let reply = agent()
        .put(url(agent_url, path))
        .header("Authorization", bearer)
        .header("Content-Type", "application/wasm")
        .send(bytes)
        .with_context(|| format!("cannot reach {agent_url}"))?;
    let v = json_reply(&format!("policy push to {agent_url}"), reply)?;
    println!(
        "{agent_url}: {}; previous: {}",
        active(&v),
        v["previous"]["digest"].as_str().unwrap_or("none")
    );
    Ok(())
}

fn get_json(agent_url: &str, path: &str) -> Result<Value> {
    let reply = agent()
        .get(url(agent_url, path))
        .call()
        .with_context(|| format!("cannot reach {agent_url}"))?;
    json_reply(path, reply)
}

fn policies(agent_url: &str) -> Result<Value> {
    get_json(agent_url, "/policies")
}

/// Total failed policy calls in a `/policies` answer.
fn failure_total(v: &Value) -> u64 {
    v["failures"]
        .as_object()
        .map_or(0, |m| m.values().filter_map(Value::as_u64).sum())
}

/// Waits until the canary has run `rounds` rounds under the policy `digest` with no
/// failed call; an error says what went wrong.
fn watch_canary(
    agent_url: &str,
    digest: &str,
    rounds: u64,
    timeout: std::time::Duration,
) -> Result<()> {
    // The baseline takes the failures before the round, and each look below the round
    // before the failures: a failure after the baseline is counted, and every round a
    // look counts ran before its failures were read (read the other way round, rounds
    // that ran between the two reads would count with their failed calls unseen).
    let failures_before = failure_total(&policies(agent_url)?);
    let start_round = get_json(agent_url, "/status")?["round"]
        .as_u64()
        .unwrap_or(0);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let s = get_json(agent_url, "/status")?;
        let p = policies(agent_url)?;
        if p["active"]["digest"].as_str() != Some(digest) {
            let why = p["breaker"]["quarantined"]
                .as_array()
                .and_then(|q| q.iter().find(|q| q["digest"].as_str() == Some(digest)))
                .map_or_else(
                    || "another policy became active".to_string(),
                    |q| {
                        format!(
                            "the agent rolled it back ({}: {})",
                            q["kind"].as_str().unwrap_or("?"),
                            q["reason"].as_str().unwrap_or("?")
                        )
                    },
                );
            bail!("{why}");
        }
        let failures = failure_total(&p) - failures_before.min(failure_total(&p));
        if failures > 0 {
            bail!(
                "{failures} failed policy call(s) since the push: {}",
                p["failures"]
            );
        }
        let round = s["round"].as_u64().unwrap_or(0);
        if round >= start_round + rounds {
            return Ok(());
        }
        if s["state"] == "finished" {
            bail!("the run finished at round {round}, before {rounds} rounds under the policy");
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "only {} of {rounds} rounds in {:.0} s",
                round - start_round,
                timeout.as_secs_f64()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
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
