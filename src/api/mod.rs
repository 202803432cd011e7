//! The local HTTP API (and web UI) on `api.listen`: what the CLI talks to.
//!
//! Routes: `POST /party/create {name, password?}`, `POST /party/join {party_id, password?}`,
//! `POST /party/leave`, `POST /login/code` (for `lanrage ui`), `GET /status`, `GET /parties`,
//! `GET /session`, `GET /login?code=…`, `GET /events` (live snapshots, see [`events`]), and `GET /`,
//! `/ui.js`, `/ui.css` for the web UI. Errors
//! are `{"error": "..."}` with a fitting status code. Bodies are capped at 16 KiB.
//!
//! Three guards, outermost first:
//! 1. security headers on every answer (CSP, no framing, see [`ui`]);
//! 2. origin: a web page on another origin must not drive the daemon: requests with a foreign
//!    `Origin` (or a `Host` that is not this listener, as in DNS rebinding) get 403;
//! 3. credential: every request that is not a GET or HEAD needs the API token or a browser
//!    session (see [`auth`]), else 401. GETs never change state here, so reads stay open to
//!    local users.
//!
//! `GET /metrics` (Prometheus text, see [`metrics`]) is such a read, open like `/status`.

pub mod auth;
pub mod events;
pub mod metrics;
pub mod token_file;
pub mod ui;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use self::auth::{ApiToken, Auth, Credential};
use crate::discovery::Source;
use crate::party::EngineError;
pub(crate) use crate::throttle::LogThrottle;

/// Largest request body accepted.
pub const MAX_BODY: usize = 16 * 1024;

/// An error answer: HTTP status and a one-line message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// What went wrong, for a human.
    pub message: String,
    /// A short stable code for programs (`password_required`, ...), when there is one.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            code: None,
        }
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: 404,
            message: message.into(),
            code: None,
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
            code: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = match self.code {
            Some(code) => serde_json::json!({ "error": self.message, "code": code }),
            None => serde_json::json!({ "error": self.message }),
        };
        (status, Json(body)).into_response()
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

pub use lanrage_proto::api::status::{BroadcastView, NodeView, PartyView, PeerView, StatusView};

/// What readers that follow the daemon live (the web UI's event stream, `/metrics`) get: one
/// snapshot published by the control task (at most every [`SNAPSHOT_EVERY`]), so they never
/// queue requests on it.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// As `GET /status`.
    pub status: StatusView,
    /// As `GET /parties`.
    pub parties: Vec<PartyListing>,
}

/// How often the control task publishes a new [`Snapshot`] at most.
pub const SNAPSHOT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// The receiving end of the published snapshots (`None` before the first).
pub type Snapshots = tokio::sync::watch::Receiver<Option<Arc<Snapshot>>>;

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
    /// The control protocol its host speaks (joining needs the same as this node's).
    #[serde(default = "protocol_1")]
    pub protocol: u8,
}

fn protocol_1() -> u8 {
    1
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

/// At most one warning per this interval for each kind of refused request: local users and web
/// pages control how often they happen.
const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The origin guard's state: where we listen, and its refusals (counted, logs throttled).
struct OriginGuard {
    listen: SocketAddr,
    log: parking_lot::Mutex<LogThrottle>,
    refused: AtomicU64,
}

/// What the handlers share: the way to the control task, the published snapshots and the
/// credentials.
#[derive(Clone)]
struct AppState {
    tx: Tx,
    snapshots: Snapshots,
    auth: Arc<Auth>,
    listen: SocketAddr,
    /// The open `/events` streams (bounded).
    event_streams: Arc<events::EventStreams>,
}

/// Serves the API on `listener` until the task is aborted; state-changing requests need `token`
/// (or a browser session made from it).
pub async fn serve(
    listener: TcpListener,
    listen: SocketAddr,
    tx: Tx,
    snapshots: Snapshots,
    token: ApiToken,
) {
    let auth = Arc::new(Auth::new(token, listen.port()));
    let app = router(listen, tx, snapshots, auth);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "API server stopped");
    }
}

/// The API's routes behind the security headers, the origin guard, the credential check and the
/// body limit.
pub fn router(listen: SocketAddr, tx: Tx, snapshots: Snapshots, auth: Arc<Auth>) -> Router {
    let state = AppState {
        tx,
        snapshots,
        auth: auth.clone(),
        listen,
        event_streams: Arc::default(),
    };
    let [csp, frames, sniff, referrer] = ui::security_header_layers();
    Router::new()
        .route("/", get(ui::index))
        .route("/ui.js", get(ui::script))
        .route("/ui.css", get(ui::style))
        .route("/status", get(status))
        .route("/events", get(live_events))
        .route("/parties", get(parties))
        .route("/metrics", get(metrics_text))
        .route("/session", get(session))
        .route("/login", get(login))
        .route("/login/code", post(login_code))
        .route("/party/create", post(create))
        .route("/party/join", post(join))
        .route("/party/leave", post(leave))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn_with_state(auth, require_credential))
        .layer(middleware::from_fn_with_state(
            Arc::new(OriginGuard {
                listen,
                log: parking_lot::Mutex::new(LogThrottle::new(LOG_EVERY)),
                refused: AtomicU64::new(0),
            }),
            guard,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(csp)
        .layer(frames)
        .layer(sniff)
        .layer(referrer)
        .with_state(state)
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

async fn guard(State(g): State<Arc<OriginGuard>>, req: Request, next: Next) -> Response {
    let hosts = allowed_hosts(g.listen);
    let origin_ok = req.headers().get(header::ORIGIN).is_none_or(|origin| {
        origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("http://"))
            .is_some_and(|o| hosts.iter().any(|h| h == o))
    });
    // Browsers say where a request comes from even when they send no Origin (an `<img>` or a
    // no-cors GET from another site, which could otherwise fill the live view's slots).
    let site_ok = req
        .headers()
        .get("sec-fetch-site")
        .is_none_or(|site| matches!(site.as_bytes(), b"same-origin" | b"none"));
    let origin_ok = origin_ok && site_ok;
    let host_ok = req
        .headers()
        .get(header::HOST)
        .is_none_or(|host| host.to_str().is_ok_and(|h| hosts.iter().any(|a| a == h)));
    if origin_ok && host_ok {
        return next.run(req).await;
    }
    g.refused.fetch_add(1, Ordering::Relaxed);
    if let Some(suppressed) = g.log.lock().allow(Instant::now()) {
        tracing::warn!(
            origin = ?req.headers().get(header::ORIGIN),
            host = ?req.headers().get(header::HOST),
            suppressed,
            "refused an API request from a foreign web origin or with a foreign Host header"
        );
    }
    ApiError {
        status: 403,
        message: if origin_ok {
            "unexpected Host header".into()
        } else {
            "requests from other web origins are refused".into()
        },
        code: None,
    }
    .into_response()
}

/// Lets reads through; anything else needs the token or a session (recorded as a request
/// extension for handlers that accept only one of them).
async fn require_credential(
    State(auth): State<Arc<Auth>>,
    mut req: Request,
    next: Next,
) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return next.run(req).await;
    }
    match auth.check(req.headers(), Instant::now()) {
        Ok(credential) => {
            req.extensions_mut().insert(credential);
            next.run(req).await
        }
        Err(_) => {
            let mut resp = ApiError {
                status: 401,
                message: auth::HOW_TO_AUTHENTICATE.into(),
                code: None,
            }
            .into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"lanrage\""),
            );
            resp
        }
    }
}

fn rejection(r: JsonRejection) -> ApiError {
    ApiError {
        status: r.status().as_u16(),
        message: r.body_text(),
        code: None,
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
        code: None,
    })?;
    rx.await.map_err(|_| ApiError {
        status: 503,
        message: "daemon is shutting down".into(),
        code: None,
    })
}

async fn status(State(st): State<AppState>) -> Result<Json<StatusView>, ApiError> {
    Ok(Json(
        ask(&st.tx, |reply| ApiRequest::Status { reply }).await?,
    ))
}

async fn parties(State(st): State<AppState>) -> Result<Json<Vec<PartyListing>>, ApiError> {
    Ok(Json(
        ask(&st.tx, |reply| ApiRequest::Parties { reply }).await?,
    ))
}

/// `GET /metrics`: Prometheus text from the latest snapshot; open like `/status`.
async fn metrics_text(State(st): State<AppState>) -> Response {
    metrics::respond(&st.snapshots)
}

async fn create(
    State(st): State<AppState>,
    body: Result<Json<CreateBody>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(b) = body.map_err(rejection)?;
    Ok(Json(
        ask(&st.tx, |reply| ApiRequest::Create {
            name: b.name,
            password: b.password,
            reply,
        })
        .await??,
    ))
}

async fn join(
    State(st): State<AppState>,
    body: Result<Json<JoinBody>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(b) = body.map_err(rejection)?;
    Ok(Json(
        ask(&st.tx, |reply| ApiRequest::Join {
            party_id: b.party_id,
            password: b.password,
            reply,
        })
        .await??,
    ))
}

async fn leave(State(st): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(
        ask(&st.tx, |reply| ApiRequest::Leave { reply }).await??,
    ))
}

/// `GET /events`: the published snapshots as server-sent events (see [`events`]).
async fn live_events(State(st): State<AppState>) -> Response {
    events::events(st.event_streams, st.snapshots).await
}

/// `GET /session`: whether this browser is logged in (the page shows how to log in if not).
async fn session(State(st): State<AppState>, headers: HeaderMap) -> Json<serde_json::Value> {
    let authenticated = st.auth.has_session(&headers, Instant::now());
    Json(serde_json::json!({
        "authenticated": authenticated,
        "session_idle_secs": auth::SESSION_IDLE.as_secs(),
    }))
}

/// `POST /login/code` (API token only): a one-time code for `GET /login?code=…`.
async fn login_code(
    State(st): State<AppState>,
    credential: Option<Extension<Credential>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if credential.map(|Extension(c)| c) != Some(Credential::Token) {
        return Err(ApiError {
            status: 403,
            message: "login codes are given only for the API token (run `lanrage ui`)".into(),
            code: None,
        });
    }
    let code = st.auth.issue_login_code(Instant::now());
    let host = match st.listen.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => {
            SocketAddr::from(([127, 0, 0, 1], st.listen.port()))
        }
        ip if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, st.listen.port()))
        }
        _ => st.listen,
    };
    Ok(Json(serde_json::json!({
        "code": code,
        "url": format!("http://{host}/login?code={code}"),
        "expires_in_secs": auth::LOGIN_CODE_TTL.as_secs(),
    })))
}

#[derive(Deserialize)]
struct LoginQuery {
    code: Option<String>,
}

/// `GET /login?code=…`: a valid unused code becomes a session cookie and a redirect to `/`
/// (the code leaves the address bar); anything else gets a page saying to run `lanrage ui`.
async fn login(
    State(st): State<AppState>,
    query: Result<Query<LoginQuery>, QueryRejection>,
) -> Response {
    let code = query.ok().and_then(|Query(q)| q.code).unwrap_or_default();
    let no_store = (header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    match st.auth.redeem_login_code(&code, Instant::now()) {
        Some(secret) => {
            let cookie = st.auth.session_cookie(&secret);
            match HeaderValue::from_str(&cookie) {
                Ok(cookie) => (
                    StatusCode::SEE_OTHER,
                    [
                        (header::LOCATION, HeaderValue::from_static("/")),
                        (header::SET_COOKIE, cookie),
                        no_store,
                    ],
                )
                    .into_response(),
                Err(_) => ApiError {
                    status: 500,
                    message: "could not make a session cookie".into(),
                    code: None,
                }
                .into_response(),
            }
        }
        None => (
            StatusCode::FORBIDDEN,
            [no_store],
            Html(ui::LOGIN_FAILED_HTML),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    const LISTEN: &str = "127.0.0.1:8666";
    const ORIGIN: &str = "http://127.0.0.1:8666";

    /// A router whose control task answers every request (creates succeed), and its token.
    fn app() -> (Router, ApiToken, Arc<Auth>) {
        app_with(tokio::sync::watch::channel(None).1)
    }

    /// This node's status as the fake control task reports it.
    fn status_view(name: &str) -> StatusView {
        StatusView {
            node: NodeView {
                id: "n".into(),
                name: name.into(),
                public_key: "k".into(),
                virtual_ip: None,
                nat_type: "unknown".into(),
                public_endpoint: None,
                control_server: None,
                control_error: None,
            },
            party: None,
            joining: None,
            counters: std::collections::HashMap::new(),
            broadcast: Default::default(),
        }
    }

    /// As [`app`], reading published snapshots from `snapshots`.
    fn app_with(snapshots: Snapshots) -> (Router, ApiToken, Arc<Auth>) {
        let (tx, mut rx) = mpsc::channel(8);
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                match req {
                    ApiRequest::Create { name, reply, .. } => {
                        let _ = reply.send(Ok(serde_json::json!({ "party_id": name })));
                    }
                    ApiRequest::Join { reply, .. } | ApiRequest::Leave { reply } => {
                        let _ = reply.send(Ok(serde_json::json!({})));
                    }
                    ApiRequest::Parties { reply } => {
                        let _ = reply.send(Vec::new());
                    }
                    ApiRequest::Status { reply } => {
                        let _ = reply.send(status_view("alice"));
                    }
                }
            }
        });
        let token = ApiToken::generate();
        let auth = Arc::new(Auth::new(token.clone(), 8666));
        (
            router(LISTEN.parse().unwrap(), tx, snapshots, auth.clone()),
            token,
            auth,
        )
    }

    async fn send(app: &Router, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("Host", LISTEN);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = if method == "POST" && path == "/party/create" {
            req = req.header("Content-Type", "application/json");
            Body::from(r#"{"name":"lan"}"#)
        } else {
            Body::empty()
        };
        app.clone().oneshot(req.body(body).unwrap()).await.unwrap()
    }

    async fn text(resp: Response) -> String {
        let bytes = axum::body::to_bytes(resp.into_body(), MAX_BODY)
            .await
            .unwrap();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn assert_security_headers(resp: &Response, what: &str) {
        for (name, value) in ui::security_headers() {
            assert_eq!(
                resp.headers().get(&name),
                Some(&value),
                "{what}: header {name}"
            );
        }
    }

    #[tokio::test]
    async fn state_changes_need_a_credential_reads_do_not() {
        let (app, token, _) = app();
        for path in [
            "/party/create",
            "/party/join",
            "/party/leave",
            "/login/code",
        ] {
            let resp = send(&app, "POST", path, &[]).await;
            assert_eq!(resp.status(), 401, "{path}");
            assert_security_headers(&resp, path);
            let body = text(resp).await;
            assert!(
                body.contains("lanrage ui") && body.contains("operator_group"),
                "{body}"
            );
        }
        let wrong = format!("Bearer {}", ApiToken::generate().as_str());
        let resp = send(&app, "POST", "/party/create", &[("Authorization", &wrong)]).await;
        assert_eq!(resp.status(), 401);
        for path in ["/status", "/parties", "/session", "/", "/ui.js", "/ui.css"] {
            let resp = send(&app, "GET", path, &[]).await;
            assert_eq!(resp.status(), 200, "{path}");
            assert_security_headers(&resp, path);
        }
        let bearer = format!("Bearer {}", token.as_str());
        let resp = send(&app, "POST", "/party/create", &[("Authorization", &bearer)]).await;
        assert_eq!(resp.status(), 200);
        assert!(text(resp).await.contains("lan"));
    }

    #[tokio::test]
    async fn login_code_gives_a_cookie_session_once() {
        let (app, token, _) = app();
        let bearer = format!("Bearer {}", token.as_str());
        let resp = send(&app, "POST", "/login/code", &[("Authorization", &bearer)]).await;
        assert_eq!(resp.status(), 200);
        let v: serde_json::Value = serde_json::from_str(&text(resp).await).unwrap();
        let url = v["url"].as_str().unwrap().to_owned();
        let path = url
            .strip_prefix("http://127.0.0.1:8666")
            .expect(&url)
            .to_owned();
        assert!(path.starts_with("/login?code="), "{url}");

        let resp = send(&app, "GET", &path, &[]).await;
        assert_eq!(resp.status(), 303);
        assert_eq!(resp.headers()[header::LOCATION], "/");
        assert_security_headers(&resp, "login");
        let cookie = resp.headers()[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        let pair = cookie.split(';').next().unwrap().to_owned();

        let again = send(&app, "GET", &path, &[]).await;
        assert_eq!(again.status(), 403);
        assert!(again.headers().get(header::SET_COOKIE).is_none());
        assert!(text(again).await.contains("lanrage ui"));

        let resp = send(&app, "GET", "/session", &[("Cookie", &pair)]).await;
        assert!(text(resp).await.contains(r#""authenticated":true"#));
        let resp = send(
            &app,
            "POST",
            "/party/create",
            &[("Cookie", &pair), ("Origin", ORIGIN)],
        )
        .await;
        assert_eq!(resp.status(), 200);
        // The cookie does not let a foreign page in, nor mint more login codes.
        let resp = send(
            &app,
            "POST",
            "/party/leave",
            &[("Cookie", &pair), ("Origin", "http://evil.example")],
        )
        .await;
        assert_eq!(resp.status(), 403);
        assert_security_headers(&resp, "foreign origin");
        // Nor a cross-site GET without Origin (an <img>, a no-cors fetch): it says where it
        // comes from in Sec-Fetch-Site. The page itself and typed addresses pass.
        for (site, want) in [
            ("cross-site", 403),
            ("same-site", 403),
            ("same-origin", 200),
            ("none", 200),
        ] {
            let resp = send(&app, "GET", "/status", &[("Sec-Fetch-Site", site)]).await;
            assert_eq!(resp.status(), want, "Sec-Fetch-Site: {site}");
        }
        let resp = send(
            &app,
            "POST",
            "/login/code",
            &[("Cookie", &pair), ("Origin", ORIGIN)],
        )
        .await;
        assert_eq!(resp.status(), 403);
        // DNS rebinding: right cookie, wrong Host.
        let req = Request::builder()
            .method("POST")
            .uri("/party/leave")
            .header("Host", "evil.example:8666")
            .header("Cookie", &pair)
            .body(Body::empty())
            .unwrap();
        assert_eq!(app.clone().oneshot(req).await.unwrap().status(), 403);
    }

    #[tokio::test]
    async fn page_has_no_inline_script_or_style() {
        let (app, _, _) = app();
        let resp = send(&app, "GET", "/", &[]).await;
        assert_eq!(
            resp.headers()[header::CONTENT_SECURITY_POLICY],
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
        );
        assert_eq!(resp.headers()[header::X_FRAME_OPTIONS], "DENY");
        let html = text(resp).await.to_ascii_lowercase();
        assert_no_inline_code(&html);
        let resp = send(&app, "GET", "/ui.js", &[]).await;
        assert!(resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/javascript"));
        let resp = send(&app, "GET", "/ui.css", &[]).await;
        assert!(resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/css"));
        assert_no_inline_code(&ui::LOGIN_FAILED_HTML.to_ascii_lowercase());
    }

    /// The page's script never parses strings as HTML (names come from the network) and sets no
    /// style attribute (the CSP forbids inline style; CSSOM and classes are fine).
    #[test]
    fn page_script_never_parses_html_and_page_keeps_its_names() {
        for banned in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "setAttribute(\"style\"",
            "eval(",
            "new Function",
        ] {
            assert!(!ui::UI_JS.contains(banned), "ui.js uses {banned}");
        }
        // The accessible names the browser tests rely on (the page contract).
        for name in [
            ">This node</h2>",
            ">Party</h2>",
            ">Parties nearby</h2>",
            ">Join by id</h2>",
            ">Create a party</h2>",
            "<caption>Members</caption>",
            ">Copy party id</button>",
            ">Leave party</button>",
            ">Party id</label>",
            ">Password</label>",
            ">Join</button>",
            ">Party name</label>",
            ">Password (optional)</label>",
            ">Create</button>",
            "role=\"alert\"",
            "role=\"status\"",
        ] {
            assert!(ui::INDEX_HTML.contains(name), "index.html lacks {name}");
        }
        for column in [
            "Name",
            "Virtual IP",
            "Path",
            "Latency",
            "Last handshake",
            "In",
            "Out",
        ] {
            assert!(
                ui::INDEX_HTML.contains(&format!(
                    "<th scope=\"col\" role=\"columnheader\">{column}</th>"
                )),
                "no column {column}"
            );
        }
        assert!(ui::UI_JS.contains("new EventSource(\"/events\")"));
    }

    /// No `<style>`, no `style=`, no event handler attribute, and every `<script>` has a `src`.
    fn assert_no_inline_code(html: &str) {
        assert!(!html.contains("<style"), "inline <style>");
        assert!(!html.contains(" style="), "style attribute");
        for (i, _) in html.match_indices("<script") {
            let tag_end = html[i..].find('>').map(|e| i + e).unwrap();
            assert!(html[i..tag_end].contains(" src="), "inline <script> at {i}");
            assert!(
                html[tag_end..].starts_with("></script>"),
                "script with a body at {i}"
            );
        }
        let attrs = html
            .split('<')
            .filter_map(|tag| tag.split('>').next())
            .flat_map(|tag| tag.split_whitespace().skip(1));
        for attr in attrs {
            assert!(!attr.starts_with("on"), "event handler attribute {attr}");
        }
    }

    fn snapshot(name: &str) -> Option<Arc<Snapshot>> {
        Some(Arc::new(Snapshot {
            status: status_view(name),
            parties: Vec::new(),
        }))
    }

    /// The next SSE message (up to the blank line), skipping keep-alive comments; panics after
    /// 5 s (the snapshot is due at once).
    async fn next_event(body: &mut axum::body::BodyDataStream, buf: &mut String) -> String {
        use futures_util::StreamExt as _;
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                if let Some(end) = buf.find("\n\n") {
                    let msg: String = buf.drain(..end + 2).collect();
                    if msg.lines().all(|l| l.starts_with(':')) {
                        continue;
                    }
                    return msg;
                }
                let chunk = body.next().await.expect("stream ended").unwrap();
                buf.push_str(std::str::from_utf8(&chunk).unwrap());
            }
        })
        .await
        .expect("no event within 5 s")
    }

    #[tokio::test]
    async fn events_stream_the_snapshot_at_once_and_on_change_without_login() {
        let (publish, snapshots) = tokio::sync::watch::channel(None);
        let (app, _, _) = app_with(snapshots);
        // Nothing published yet: the stream opens and waits.
        let resp = send(&app, "GET", "/events", &[("Origin", ORIGIN)]).await;
        assert_eq!(resp.status(), 200);
        assert_security_headers(&resp, "/events");
        assert!(resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let mut body = resp.into_body().into_data_stream();
        let mut buf = String::new();
        publish.send_replace(snapshot("first"));
        let msg = next_event(&mut body, &mut buf).await;
        assert!(msg.starts_with("event: snapshot\ndata: {"), "{msg}");
        let data = msg
            .trim_end()
            .strip_prefix("event: snapshot\ndata: ")
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["status"]["node"]["name"], "first");
        assert!(v["parties"].is_array());

        // A second client gets the current one at once; both get the next.
        let resp = send(&app, "GET", "/events", &[]).await;
        let mut body2 = resp.into_body().into_data_stream();
        let mut buf2 = String::new();
        assert!(next_event(&mut body2, &mut buf2)
            .await
            .contains(r#""name":"first""#));
        publish.send_replace(snapshot("<img src=x onerror=alert(1)>"));
        for (body, buf) in [(&mut body, &mut buf), (&mut body2, &mut buf2)] {
            let msg = next_event(body, buf).await;
            assert!(
                msg.contains(r#""name":"<img src=x onerror=alert(1)>""#),
                "{msg}"
            );
        }

        // The publisher gone (daemon stopping): the streams end.
        drop(publish);
        use futures_util::StreamExt as _;
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while body.next().await.is_some() {}
        });
        end.await.expect("stream did not end");
    }

    #[tokio::test]
    async fn events_streams_are_bounded_and_freed_on_disconnect() {
        let (_publish, snapshots) = tokio::sync::watch::channel(snapshot("a"));
        let (app, _, _) = app_with(snapshots);
        let mut open = Vec::new();
        for i in 0..events::MAX_STREAMS {
            let resp = send(&app, "GET", "/events", &[]).await;
            assert_eq!(resp.status(), 200, "stream {i}");
            open.push(resp);
        }
        let resp = send(&app, "GET", "/events", &[]).await;
        assert_eq!(resp.status(), 503);
        assert_security_headers(&resp, "/events refused");
        assert!(text(resp).await.contains("too many"));
        // A client going away (its response body dropped) frees its place.
        open.pop();
        let resp = send(&app, "GET", "/events", &[]).await;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body().into_data_stream();
        assert!(next_event(&mut body, &mut String::new())
            .await
            .contains(r#""name":"a""#));
        // Other routes are not affected by the open streams.
        assert_eq!(send(&app, "GET", "/status", &[]).await.status(), 200);
    }
}
