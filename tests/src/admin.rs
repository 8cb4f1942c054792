//! Talking to agents' admin APIs in tests: three regions with admin listeners and a token,
//! and the calls the tests make.

use crate::binary;
use crate::cluster::{Agent, REGIONS, free_port, loopback_regions, wait_for};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The admin token the test clusters share.
pub const TOKEN: &str = "an-admin-token-for-tests-0123456789";

/// An HTTP client that returns error statuses as answers.
pub fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// (status, body as JSON or as a string).
pub fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value) {
    let mut r = r.unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// `PUT /policies` with `body`, with the bearer token when given.
pub fn put_policy(admin: SocketAddr, token: Option<&str>, body: &[u8]) -> (u16, Value) {
    let mut req = http().put(format!("http://{admin}/policies"));
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    reply(req.send(body))
}

/// `POST /policies/rollback` with the token.
pub fn rollback(admin: SocketAddr) -> (u16, Value) {
    reply(
        http()
            .post(format!("http://{admin}/policies/rollback"))
            .header("Authorization", format!("Bearer {TOKEN}"))
            .send_empty(),
    )
}

/// `GET path`.
pub fn get(admin: SocketAddr, path: &str) -> (u16, Value) {
    reply(http().get(format!("http://{admin}{path}")).call())
}

/// Waits for an agent's admin API to answer and report it is training.
pub fn wait_ready(admin: SocketAddr) {
    wait_for(
        &format!("{admin} to be ready"),
        Duration::from_secs(90),
        || {
            http()
                .get(format!("http://{admin}/readyz"))
                .call()
                .is_ok_and(|r| r.status() == 200)
        },
    );
}

/// A built-in policy's component, as `weightgrad policy export` writes it.
pub fn builtin(name: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("{name}.wasm"));
    let st = Command::new(binary())
        .args(["policy", "export", name, "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(st.status.success());
    std::fs::read(out).unwrap()
}

/// Three regions on loopback with admin listeners and the token in `dir/token`; `epochs`
/// per region, and `extra` further `[training]` keys (it may open further sections).
pub fn cluster(dir: &Path, epochs: usize, extra: &str) -> (Vec<Agent>, Vec<SocketAddr>) {
    let token = dir.join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let admin: Vec<SocketAddr> = REGIONS.iter().map(|_| free_port()).collect();
    let training = |i: usize| {
        format!(
            "epochs = {epochs}\n{extra}\n[admin]\nlisten = \"{}\"\ntoken_file = \"{}\"",
            admin[i],
            token.display()
        )
    };
    let agents = loopback_regions(dir, "peer_deadline_s = 60", &training, "");
    (agents, admin)
}
