//! The local HTTP API (and web UI) on `api.listen`: what the CLI talks to.
//!
//! Routes: `POST /party/create {name, password?}`, `POST /party/join {party_id, password?}`,
//! `POST /party/leave`, `GET /status`, `GET /parties`, and `GET /` for the web UI. Errors are
//! `{"error": "..."}` with a fitting status code. A web page on another origin must not drive
//! the daemon: requests with a foreign `Origin` (or a `Host` that is not this listener, as in DNS
//! rebinding) get 403. Bodies are capped at 16 KiB.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::discovery::Source;
use crate::party::EngineError;

/// Largest request body accepted.
pub const MAX_BODY: usize = 16 * 1024;

/// An error answer: HTTP status and a one-line message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// What went wrong, for a human.
    pub message: String,
}

impl ApiError {
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
        }
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: 404,
            message: message.into(),
        }
    }
    /// 409 for state conflicts, 400 for invalid input.
    pub fn conflict_or_bad(e: &EngineError) -> Self {
        let status = match e {
            EngineError::Invalid(_) => 400,
            EngineError::AlreadyInParty(_) | EngineError::NotInParty => 409,
        };
        ApiError {
            status,
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

/// A request from the API to the control task, with the channel for its answer.
pub enum ApiRequest {
    /// `GET /status`.
    Status {
        /// Where the answer goes.
        reply: oneshot::Sender<StatusView>,
    },
    /// `GET /parties`.
    Parties {
        /// Where the answer goes.
        reply: oneshot::Sender<Vec<PartyListing>>,
    },
    /// `POST /party/create`.
    Create {
        /// Party name.
        name: String,
        /// Optional password.
        password: Option<String>,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<serde_json::Value, ApiError>>,
    },
    /// `POST /party/join`.
    Join {
        /// Party id as typed.
        party_id: String,
        /// Optional password.
        password: Option<String>,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<serde_json::Value, ApiError>>,
    },
    /// `POST /party/leave`.
    Leave {
        /// Where the answer goes.
        reply: oneshot::Sender<Result<serde_json::Value, ApiError>>,
    },
}

/// `GET /status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    /// This node.
    pub node: NodeView,
    /// The party we are in, if any.
    pub party: Option<PartyView>,
    /// The party being joined, if a join is under way.
    pub joining: Option<String>,
    /// Drop and traffic counters (for troubleshooting).
    pub counters: HashMap<String, u64>,
}

/// This node, in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// WireGuard public key, base64.
    pub public_key: String,
    /// Virtual IP while in a party.
    pub virtual_ip: Option<String>,
    /// NAT type as seen by STUN ("unknown" without STUN servers).
    pub nat_type: String,
}

/// A party, in `/status` and in create/join answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartyView {
    /// Party id.
    pub id: String,
    /// Party name.
    pub name: String,
    /// Node id of the host.
    pub host_id: String,
    /// Whether a password is needed to join.
    pub protected: bool,
    /// Every member, this node included.
    pub peers: Vec<PeerView>,
}

/// A member, in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerView {
    /// Node id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Virtual IP.
    pub virtual_ip: String,
    /// self, direct, relayed, connecting or failed.
    pub connection: String,
    /// UDP endpoint in use.
    pub endpoint: Option<String>,
    /// Round-trip time of the last heartbeat.
    pub latency_ms: Option<f64>,
    /// Seconds since the last WireGuard handshake.
    pub last_handshake_secs: Option<u64>,
}

/// A visible party, in `/parties`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartyListing {
    /// Party id.
    pub id: String,
    /// Party name.
    pub name: String,
    /// Host's display name.
    pub host: String,
    /// Host's node id.
    pub host_id: String,
    /// Member count.
    pub members: u32,
    /// Whether a password is needed.
    pub protected: bool,
    /// Where it was seen.
    pub source: Source,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    password: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinBody {
    party_id: String,
    password: Option<String>,
}

type Tx = mpsc::Sender<ApiRequest>;

/// Serves the API on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, listen: SocketAddr, tx: Tx) {
    let app = router(listen, tx);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "API server stopped");
    }
}

/// The API's routes with the origin guard and body limit.
pub fn router(listen: SocketAddr, tx: Tx) -> Router {
    Router::new()
        .route("/", get(ui))
        .route("/status", get(status))
        .route("/parties", get(parties))
        .route("/party/create", post(create))
        .route("/party/join", post(join))
        .route("/party/leave", post(leave))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn_with_state(listen, guard))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(tx)
}

/// The hosts and origins a request may name: this listener, as an IP or as localhost.
fn allowed_hosts(listen: SocketAddr) -> Vec<String> {
    let port = listen.port();
    let mut hosts = vec![
        listen.to_string(),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ];
    hosts.dedup();
    hosts
}

async fn guard(State(listen): State<SocketAddr>, req: Request, next: Next) -> Response {
    let hosts = allowed_hosts(listen);
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let ok = origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("http://"))
            .is_some_and(|o| hosts.iter().any(|h| h == o));
        if !ok {
            tracing::warn!(origin = ?origin, "refused an API request from a foreign origin");
            return ApiError {
                status: 403,
                message: "requests from other web origins are refused".into(),
            }
            .into_response();
        }
    }
    if let Some(host) = req.headers().get(header::HOST) {
        if !host.to_str().is_ok_and(|h| hosts.iter().any(|a| a == h)) {
            tracing::warn!(host = ?host, "refused an API request with a foreign Host header");
            return ApiError {
                status: 403,
                message: "unexpected Host header".into(),
            }
            .into_response();
        }
    }
    next.run(req).await
}

fn rejection(r: JsonRejection) -> ApiError {
    ApiError {
        status: r.status().as_u16(),
        message: r.body_text(),
    }
}

async fn ask<T>(
    tx: &Tx,
    make: impl FnOnce(oneshot::Sender<T>) -> ApiRequest,
) -> Result<T, ApiError> {
    let (reply, rx) = oneshot::channel();
    tx.send(make(reply)).await.map_err(|_| ApiError {
        status: 503,
        message: "daemon is shutting down".into(),
    })?;
    rx.await.map_err(|_| ApiError {
        status: 503,
        message: "daemon is shutting down".into(),
    })
}

async fn status(State(tx): State<Tx>) -> Result<Json<StatusView>, ApiError> {
    Ok(Json(ask(&tx, |reply| ApiRequest::Status { reply }).await?))
}

async fn parties(State(tx): State<Tx>) -> Result<Json<Vec<PartyListing>>, ApiError> {
    Ok(Json(ask(&tx, |reply| ApiRequest::Parties { reply }).await?))
}

async fn create(
    State(tx): State<Tx>,
    body: Result<Json<CreateBody>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(b) = body.map_err(rejection)?;
    Ok(Json(
        ask(&tx, |reply| ApiRequest::Create {
            name: b.name,
            password: b.password,
            reply,
        })
        .await??,
    ))
}

async fn join(
    State(tx): State<Tx>,
    body: Result<Json<JoinBody>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(b) = body.map_err(rejection)?;
    Ok(Json(
        ask(&tx, |reply| ApiRequest::Join {
            party_id: b.party_id,
            password: b.password,
            reply,
        })
        .await??,
    ))
}

async fn leave(State(tx): State<Tx>) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(ask(&tx, |reply| ApiRequest::Leave { reply }).await??))
}

async fn ui() -> Html<&'static str> {
    Html(include_str!("ui.html"))
}
