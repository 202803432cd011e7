//! The HTTP/JSON control plane on `control.listen` (axum). Handlers only parse and render: the
//! rules live in [`crate::state::Relay`]. Route table and bodies: [`lanrage_proto::api`].
//!
//! Order of checks for every request: per-source-IP rate limit (429), body cap (413), then for
//! authenticated routes the bearer token (401) and the per-token rate limit (429), then malformed
//! ids or bodies (400), then the registry's 404 / 403 / 409. Errors are `{"error": "..."}`.
//! Source IPs are the TCP peers: behind a reverse proxy they are the proxy's.
//!
//! A request (body included) must be answered within [`REQUEST_TIMEOUT`] or gets 408: the
//! connection layer ([`crate::server`]) bounds how long a request head may take, this bounds a
//! body sent slowly.
//!
//! Create and join bodies with a `password` field get 400 [`PASSWORD_REFUSED`] (rather than the
//! generic unknown-field message), so a client written for a relay that checked passwords learns
//! why.
//!
//! `GET /metrics` is not on this router but on [`metrics_router`], served on its own listener
//! (`control.metrics_listen`): behind a reverse proxy on the same host every client of the control
//! plane comes from 127.0.0.1, so an address check here would let everyone in.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use lanrage_proto::api::{
    ChallengeRequest, CreatePartyRequest, ErrorBody, HeartbeatRequest, JoinRequest,
    RegisterRequest, RosterRequest, SessionRequest, SignalRequest, SignalsResponse, MAX_WAIT_SECS,
    PASSWORD_REFUSED,
};

/// Longest a request may take from its head to its answer (the longest long poll plus room for
/// a slow network); a client dribbling its body gets 408 after this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(MAX_WAIT_SECS + 15);
use lanrage_proto::ids::{PartyId, PeerId};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::state::{ApiError, Caller, Relay};

type Shared = State<Arc<Relay>>;
type Peer = ConnectInfo<SocketAddr>;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (
            status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

fn reply<T: Serialize>(status: StatusCode, r: Result<T, ApiError>) -> Response {
    match r {
        Ok(v) => (status, Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

fn empty(status: StatusCode, r: Result<(), ApiError>) -> Response {
    match r {
        Ok(()) => status.into_response(),
        Err(e) => e.into_response(),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

fn auth(r: &Relay, headers: &HeaderMap) -> Result<Caller, ApiError> {
    r.authenticate(bearer(headers))
}

fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(400, format!("malformed request body: {e}")))
}

/// Refuses a body that carries a `password` field, with the reason (the party's host checks
/// passwords, not the relay).
fn refuse_password(body: &[u8]) -> Result<(), ApiError> {
    #[derive(serde::Deserialize)]
    struct Probe {
        password: Option<serde::de::IgnoredAny>,
    }
    match serde_json::from_slice::<Probe>(body) {
        Ok(Probe { password: Some(_) }) => Err(ApiError::new(400, PASSWORD_REFUSED)),
        _ => Ok(()),
    }
}

/// A JSON body, or the default for an empty one.
fn json_or_default<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        json(body)
    }
}

fn party_id(s: &str) -> Result<PartyId, ApiError> {
    s.parse()
        .map_err(|e| ApiError::new(400, format!("malformed party id: {e}")))
}

fn peer_id(s: &str) -> Result<PeerId, ApiError> {
    s.parse()
        .map_err(|e| ApiError::new(400, format!("malformed peer id: {e}")))
}

/// The control-plane router for `relay`.
pub fn router(relay: Arc<Relay>) -> Router {
    let cap = relay.cfg.control.max_body_bytes;
    Router::new()
        .route("/auth/challenge", post(challenge))
        .route("/auth/register", post(register))
        .route("/auth/refresh", post(refresh))
        .route("/parties", post(create_party))
        .route("/parties/{id}", get(party_info))
        .route("/parties/{id}/join", post(join))
        .route("/parties/{id}/roster", put(roster))
        .route("/parties/{id}/peers", get(peers))
        .route("/parties/{id}/peers/{peer}", delete(leave))
        .route("/parties/{id}/peers/{peer}/heartbeat", post(heartbeat))
        .route("/parties/{id}/peers/{peer}/signal", post(signal))
        .route("/parties/{id}/signals", get(signals))
        .route("/parties/{id}/sessions", post(session))
        .route("/relays", get(relays))
        .fallback(|| async { ApiError::new(404, "no such route") })
        .layer(DefaultBodyLimit::max(cap))
        .layer(middleware::from_fn_with_state(relay.clone(), edge))
        .with_state(relay)
}

/// The router of the metrics listener: `GET /metrics` only.
pub fn metrics_router(relay: Arc<Relay>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(404, "no such route") })
        .with_state(relay)
}

/// Per-IP rate limit, the request deadline and response counting, around every route.
async fn edge(State(r): Shared, ConnectInfo(peer): Peer, req: Request, next: Next) -> Response {
    let resp = match r.limit_ip(peer.ip()) {
        Ok(()) => match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
            Ok(resp) => resp,
            Err(_) => ApiError::new(408, "request not finished in time").into_response(),
        },
        Err(e) => e.into_response(),
    };
    r.metrics.http_response(resp.status().as_u16());
    resp
}

async fn challenge(State(r): Shared, ConnectInfo(peer): Peer, body: Bytes) -> Response {
    reply(
        StatusCode::OK,
        json::<ChallengeRequest>(&body).and_then(|req| r.challenge(&req, peer.ip())),
    )
}

async fn register(State(r): Shared, ConnectInfo(peer): Peer, body: Bytes) -> Response {
    reply(
        StatusCode::OK,
        json::<RegisterRequest>(&body).and_then(|req| r.register(&req, peer.ip())),
    )
}

async fn refresh(State(r): Shared, headers: HeaderMap) -> Response {
    reply(
        StatusCode::OK,
        auth(&r, &headers).and_then(|c| r.refresh(&c)),
    )
}

async fn create_party(
    State(r): Shared,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let res = (|| {
        let c = auth(&r, &headers)?;
        refuse_password(&body)?;
        let req: CreatePartyRequest = json(&body)?;
        r.create_party(&c, req, peer.ip())
    })();
    reply(StatusCode::CREATED, res)
}

async fn party_info(State(r): Shared, headers: HeaderMap, Path(id): Path<String>) -> Response {
    reply(
        StatusCode::OK,
        auth(&r, &headers).and_then(|c| r.info(&c, party_id(&id)?)),
    )
}

async fn join(
    State(r): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let res = (|| {
        let c = auth(&r, &headers)?;
        let id = party_id(&id)?;
        refuse_password(&body)?;
        let req: JoinRequest = json_or_default(&body)?;
        r.join(&c, id, req)
    })();
    reply(StatusCode::OK, res)
}

async fn roster(
    State(r): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let res = (|| {
        let c = auth(&r, &headers)?;
        let id = party_id(&id)?;
        let req: RosterRequest = json(&body)?;
        r.publish_roster(&c, id, req)
    })();
    reply(StatusCode::OK, res)
}

async fn peers(State(r): Shared, headers: HeaderMap, Path(id): Path<String>) -> Response {
    reply(
        StatusCode::OK,
        auth(&r, &headers).and_then(|c| r.peers(&c, party_id(&id)?)),
    )
}

async fn leave(
    State(r): Shared,
    headers: HeaderMap,
    Path((id, peer)): Path<(String, String)>,
) -> Response {
    empty(
        StatusCode::NO_CONTENT,
        auth(&r, &headers).and_then(|c| r.leave(&c, party_id(&id)?, peer_id(&peer)?)),
    )
}

async fn heartbeat(
    State(r): Shared,
    headers: HeaderMap,
    Path((id, peer)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let res = (|| {
        let c = auth(&r, &headers)?;
        let (id, peer) = (party_id(&id)?, peer_id(&peer)?);
        let req: HeartbeatRequest = json_or_default(&body)?;
        r.heartbeat(&c, id, peer, req.endpoints)
    })();
    reply(StatusCode::OK, res)
}

async fn signal(
    State(r): Shared,
    headers: HeaderMap,
    Path((id, peer)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let res = (|| {
        let c = auth(&r, &headers)?;
        let (id, peer) = (party_id(&id)?, peer_id(&peer)?);
        let req: SignalRequest = json(&body)?;
        r.signal_with_nat(&c, id, peer, req.endpoints, req.nonce, req.nat)
    })();
    empty(StatusCode::ACCEPTED, res)
}

fn wait_secs(query: Option<&str>) -> Result<u64, ApiError> {
    let mut wait = 0;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("wait_secs", v)) => {
                wait = v
                    .parse::<u64>()
                    .map_err(|_| ApiError::new(400, "wait_secs must be a number"))?;
            }
            _ => {
                return Err(ApiError::new(
                    400,
                    format!("unknown query parameter {pair:?}"),
                ))
            }
        }
    }
    Ok(wait.min(MAX_WAIT_SECS))
}

/// Long poll: answers as soon as a signal is waiting, or after `wait_secs` with none.
async fn signals(
    State(r): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let setup = auth(&r, &headers).and_then(|c| Ok((c, party_id(&id)?, wait_secs(q.as_deref())?)));
    let (c, id, wait) = match setup {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    // The first check also proves membership before a wake-up is made for this member.
    match r.take_signals(&c, id) {
        Err(e) => return e.into_response(),
        Ok(s) if !s.is_empty() || wait == 0 => {
            return reply(StatusCode::OK, Ok(SignalsResponse { signals: s }));
        }
        Ok(_) => {}
    }
    let waiter = r.waiter(id, c.peer);
    loop {
        let notified = waiter.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match r.take_signals(&c, id) {
            Err(e) => return e.into_response(),
            Ok(s) if !s.is_empty() || tokio::time::Instant::now() >= deadline => {
                return reply(StatusCode::OK, Ok(SignalsResponse { signals: s }));
            }
            Ok(_) => {}
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

async fn session(
    State(r): Shared,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let res = (|| {
        let c = auth(&r, &headers)?;
        let id = party_id(&id)?;
        let req: SessionRequest = json(&body)?;
        r.open_session(&c, id, req.peer, peer.ip())
    })();
    reply(StatusCode::OK, res)
}

async fn relays(State(r): Shared) -> Response {
    reply(StatusCode::OK, Ok(r.relays()))
}

async fn metrics(State(r): Shared, ConnectInfo(peer): Peer) -> Response {
    if !r.cfg.metrics_allowed(peer.ip()) {
        return ApiError::new(
            403,
            "metrics are not served to this address (control.metrics_from)",
        )
        .into_response();
    }
    let mut resp = r.metrics_text().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    resp
}
