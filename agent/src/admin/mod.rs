//! The admin and metrics HTTP API (axum): `GET /metrics`, `/healthz`, `/readyz`, `/status`,
//! `/policies`; `PUT /policies` (a `.wasm` body) and `POST /policies/rollback`, which need
//! the bearer token. Errors are JSON `{"error": ...}` with 400/401/413/422/409 as fits.

pub mod auth;

use crate::node::status::{Status, now_rfc3339};
use crate::policy::{CompiledPolicy, PolicyFailure, PolicyRuntime};
use auth::Token;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::extract::{DefaultBodyLimit, State};
use axum::handler::Handler;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

/// Checks a candidate policy against the running agent; the error says why it does not fit.
pub type CompatibilityCheck = Box<dyn Fn(&CompiledPolicy) -> Result<(), String> + Send + Sync>;

/// What the admin API reads and changes.
pub struct AdminState {
    /// The status the core publishes.
    pub status: Arc<RwLock<Status>>,
    /// The policy runtime the core decides with.
    pub policy: Arc<PolicyRuntime>,
    /// Checks a candidate before a swap (e.g. that it keeps the run's merge mode).
    pub compatible: CompatibilityCheck,
    /// The bearer token for mutating calls (none: they are refused).
    pub token: Option<Token>,
    /// Renders the metrics.
    pub prometheus: Option<PrometheusHandle>,
    /// When each policy digest became active.
    pub loaded_at: Mutex<HashMap<String, String>>,
    /// Largest `.wasm` body accepted.
    pub max_body: usize,
}

/// A JSON error response.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The routes, ready to serve.
pub fn router(state: Arc<AdminState>) -> Router {
    let max_body = state.max_body;
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics_text))
        .route(
            "/policies",
            get(policies).put(push_policy.layer(from_fn_with_state(state.clone(), require_token))),
        )
        .route(
            "/policies/rollback",
            post(rollback.layer(from_fn_with_state(state.clone(), require_token))),
        )
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// In front of every mutating call: the token is checked before anything of the request's
/// body is read, so a caller without it cannot make the agent take in a body.
async fn require_token(State(s): State<Arc<AdminState>>, request: Request, next: Next) -> Response {
    match authorize(&s, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refusal) => *refusal,
    }
}

async fn readyz(State(s): State<Arc<AdminState>>) -> Response {
    let state = s.status.read().expect("status").state;
    match state {
        "training" | "waiting" | "finished" => (StatusCode::OK, "ready\n").into_response(),
        other => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {other}"),
        ),
    }
}

async fn status(State(s): State<Arc<AdminState>>) -> Json<Status> {
    Json(s.status.read().expect("status").clone())
}

async fn metrics_text(State(s): State<Arc<AdminState>>) -> Response {
    match &s.prometheus {
        Some(h) => {
            h.run_upkeep();
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                h.render(),
            )
                .into_response()
        }
        None => error(StatusCode::NOT_FOUND, "metrics are not enabled"),
    }
}

fn describe(s: &AdminState, p: &CompiledPolicy) -> Value {
    json!({
        "name": p.info.name,
        "version": p.info.version,
        "digest": p.digest,
        "loaded_at": s.loaded_at.lock().expect("loaded_at").get(&p.digest).cloned(),
    })
}

fn policies_json(s: &AdminState) -> Value {
    json!({
        "active": describe(s, &s.policy.active()),
        "previous": s.policy.previous().map(|p| describe(s, &p)),
        "failures": s.policy.failures(),
        "swaps": s.policy.swaps(),
        "breaker": s.policy.breaker(),
    })
}

/// Whether the request's query asks to `force` (`?force=true` or `?force=1`).
fn forced(uri: &axum::http::Uri) -> bool {
    uri.query().is_some_and(|q| {
        q.split('&')
            .any(|kv| matches!(kv, "force" | "force=true" | "force=1"))
    })
}

async fn policies(State(s): State<Arc<AdminState>>) -> Json<Value> {
    Json(policies_json(&s))
}

fn authorize(s: &AdminState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(token) = &s.token else {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "mutating calls are disabled: the agent has no admin token (admin.token_file)",
        )));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(p) if token.matches(p) => Ok(()),
        Some(_) => Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "wrong bearer token",
        ))),
        None => Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "missing `Authorization: Bearer <token>`",
        ))),
    }
}

/// How far past the limit an oversized policy body is still read (and dropped) before the
/// 413: a client that writes its whole body before reading the answer (most do, without
/// `Expect: 100-continue`) then reads the refusal instead of a reset connection.
const OVERSIZED_DRAIN_BYTES: usize = 64 << 20;

/// The request body if it holds at most `limit` bytes; otherwise a 413, sent once the body
/// has been read to its end (or [`OVERSIZED_DRAIN_BYTES`] past the limit).
async fn read_policy_body(mut body: Body, limit: usize) -> Result<Bytes, Response> {
    use http_body_util::BodyExt;
    let mut kept = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| error(StatusCode::BAD_REQUEST, format!("unreadable body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen <= limit {
            kept.extend_from_slice(&data);
        } else if seen > limit.saturating_add(OVERSIZED_DRAIN_BYTES) {
            break;
        }
    }
    if seen > limit {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the policy exceeds the {limit}-byte limit"),
        ));
    }
    Ok(Bytes::from(kept))
}

/// Behind [`require_token`].
async fn push_policy(
    State(s): State<Arc<AdminState>>,
    uri: axum::http::Uri,
    body: Body,
) -> Response {
    let force = forced(&uri);
    let body = match read_policy_body(body, s.max_body).await {
        Ok(b) => b,
        Err(refusal) => return refusal,
    };
    if body.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "empty body: send the policy's .wasm",
        );
    }
    // Compiling and self-testing takes tens of milliseconds: off the async workers.
    let state = s.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        state
            .policy
            .swap_checked(&body, force, |p| (state.compatible)(p))
    })
    .await;
    match outcome {
        Ok(Ok(report)) => {
            s.loaded_at
                .lock()
                .expect("loaded_at")
                .insert(report.digest.clone(), now_rfc3339());
            metrics::counter!(crate::telemetry::POLICY_SWAPS).increment(1);
            tracing::info!(policy = %report.active.name, version = %report.active.version, digest = %report.digest, previous = %report.previous_digest, "policy swapped");
            (StatusCode::OK, Json(policies_json(&s))).into_response()
        }
        Ok(Err(failure)) => {
            tracing::warn!(kind = failure.kind(), "refused a policy: {failure}");
            let status = match failure {
                PolicyFailure::Oversized(_) => StatusCode::PAYLOAD_TOO_LARGE,
                PolicyFailure::Quarantined(_) => StatusCode::CONFLICT,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            (
                status,
                Json(json!({ "error": failure.to_string(), "kind": failure.kind() })),
            )
                .into_response()
        }
        Err(join) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("checking the policy failed: {join}"),
        ),
    }
}

/// Behind [`require_token`].
async fn rollback(State(s): State<Arc<AdminState>>) -> Response {
    match s.policy.rollback() {
        Ok(report) => {
            s.loaded_at
                .lock()
                .expect("loaded_at")
                .insert(report.digest.clone(), now_rfc3339());
            metrics::counter!(crate::telemetry::POLICY_SWAPS).increment(1);
            metrics::counter!(crate::telemetry::POLICY_ROLLBACKS, "cause" => "operator")
                .increment(1);
            tracing::info!(policy = %report.active.name, digest = %report.digest, "policy rolled back");
            (StatusCode::OK, Json(policies_json(&s))).into_response()
        }
        Err(e) => error(StatusCode::CONFLICT, e),
    }
}

/// Binds `listen` and serves until the runtime stops; the error names the address.
pub async fn serve(listen: std::net::SocketAddr, state: Arc<AdminState>) -> anyhow::Result<()> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("admin.listen: cannot bind {listen}"))?;
    tracing::info!(listen = %listener.local_addr()?, "admin API listening");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(state)).await {
            tracing::error!("admin API stopped: {e}");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_policy_body_over_the_limit_is_refused_with_413() {
        let ok = read_policy_body(Body::from(vec![7u8; 1000]), 1000)
            .await
            .unwrap();
        assert_eq!(ok.len(), 1000);
        // The end-to-end side (the sender still writing when the answer comes) is
        // tests/tests/agent_admin.rs's 9 MiB push.
        let refused = read_policy_body(Body::from(vec![7u8; 1001]), 1000)
            .await
            .unwrap_err();
        assert_eq!(refused.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let far_over = read_policy_body(Body::from(vec![7u8; 70 << 20]), 1000)
            .await
            .unwrap_err();
        assert_eq!(far_over.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
