//! The web UI's files, embedded in the binary, and the security headers every API answer carries.
//!
//! The page has no inline script or style, so the Content-Security-Policy can forbid both: an
//! injected `<script>` or `onerror=` (for example through a hostile member name that escaped the
//! page's escaping) does not run. `frame-ancestors 'none'` and `X-Frame-Options: DENY` keep other
//! sites from framing the page (clickjacking).

use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use tower_http::set_header::SetResponseHeaderLayer;

/// The page.
pub const INDEX_HTML: &str = include_str!("ui/index.html");
/// Its script (served at `/ui.js`).
pub const UI_JS: &str = include_str!("ui/ui.js");
/// Its style sheet (served at `/ui.css`).
pub const UI_CSS: &str = include_str!("ui/ui.css");

/// Sent with every answer: only this origin's own script, style, images and API; no plugins,
/// no inline code, no framing, forms post only here.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// The security headers, as (name, value), in the order they are applied.
pub fn security_headers() -> [(HeaderName, HeaderValue); 4] {
    [
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
    ]
}

/// One tower-http layer per security header (each overrides whatever a handler set).
pub fn security_header_layers() -> [SetResponseHeaderLayer<HeaderValue>; 4] {
    security_headers().map(|(name, value)| SetResponseHeaderLayer::overriding(name, value))
}

/// `GET /`.
pub async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

/// `GET /ui.js`.
pub async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        UI_JS,
    )
        .into_response()
}

/// `GET /ui.css`.
pub async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], UI_CSS).into_response()
}

/// The page a browser gets for a used, expired or wrong login link.
pub const LOGIN_FAILED_HTML: &str =
    "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<title>lanrage: login link not valid</title></head><body>\n<h1>This login link is not valid</h1>\n\
<p>It was already used, is older than a minute, or is wrong.</p>\n\
<p>Run <code>lanrage ui</code> again on this computer and open the new link it prints.</p>\n\
</body></html>\n";
