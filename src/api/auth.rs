//! Who may change the daemon's state through the local API.
//!
//! The API listens on loopback TCP, which every local user can reach, while the daemon runs as
//! root. So every request that is not a read (any method but GET and HEAD) needs a credential:
//!
//! - the **API token**, `Authorization: Bearer <token>`: random, made at each daemon start and
//!   written to a file only root and the `api.operator_group` can read (see [`super::token_file`]);
//!   the CLI sends it;
//! - a **browser session**, the cookie `lanrage_session_<port>` (HttpOnly, SameSite=Strict): a
//!   token holder asks for a one-time login code (`lanrage ui`), the browser opens
//!   `/login?code=…`, gets the cookie and is redirected to `/` so the code leaves the address bar.
//!   A session ends after [`SESSION_IDLE`] without a state-changing request, or when the daemon
//!   restarts.
//!
//! Reads (`GET /status`, `/parties`, the page itself) stay open to local users: they show what
//! anyone on the LAN sees anyway. Secrets are compared in constant time (`subtle`); sessions and
//! codes are kept only as Blake2s digests, so a lookup's timing says nothing about a secret. Both
//! tables are bounded (expired entries are swept, then the oldest go).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use blake2::{Blake2s256, Digest};
use parking_lot::Mutex;
use rand::RngCore;
use subtle::ConstantTimeEq;

use super::LogThrottle;

/// A browser session ends after this long without a state-changing request (documented in the
/// README).
pub const SESSION_IDLE: Duration = Duration::from_secs(12 * 3600);
/// A login code from `lanrage ui` must be used within this time, once.
pub const LOGIN_CODE_TTL: Duration = Duration::from_secs(60);
/// At most this many browser sessions; beyond it the least recently used one ends.
pub const MAX_SESSIONS: usize = 64;
/// At most this many unused login codes; beyond it the oldest one is dropped.
pub const MAX_LOGIN_CODES: usize = 16;
/// Name of the session cookie, followed by the API port: browsers share cookies between the
/// ports of one host, so two daemons on one machine must not overwrite each other's session.
pub const COOKIE_PREFIX: &str = "lanrage_session_";
/// Longest token accepted from a file or a header.
const MAX_TOKEN_LEN: usize = 128;

/// What the 401 answer tells a client.
pub const HOW_TO_AUTHENTICATE: &str = "this needs the daemon's API token: use the lanrage CLI \
     as root or as a member of the api.operator_group group; in a browser, open the login link \
     that `lanrage ui` prints";

/// The daemon's API token: 32 random bytes in URL-safe base64, made at each start.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(String);

impl ApiToken {
    /// A fresh random token.
    pub fn generate() -> Self {
        ApiToken(random_secret())
    }

    /// A token as read from a file or a header: trimmed, 16 to 128 URL-safe base64 characters.
    pub fn parse(text: &str) -> Option<Self> {
        let t = text.trim();
        let ok = (16..=MAX_TOKEN_LEN).contains(&t.len())
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        ok.then(|| ApiToken(t.to_owned()))
    }

    /// The token's text, for the token file and the `Authorization` header.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` is this token, in time independent of where they differ.
    pub fn matches(&self, candidate: &str) -> bool {
        self.0.as_bytes().ct_eq(candidate.as_bytes()).into()
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken(<secret>)")
    }
}

/// 32 random bytes from the OS, URL-safe base64 without padding (43 characters).
fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    B64URL.encode(bytes)
}

fn digest(secret: &str) -> [u8; 32] {
    Blake2s256::digest(secret.as_bytes()).into()
}

/// What let a request through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credential {
    /// The API token (the CLI).
    Token,
    /// A browser session cookie.
    Session,
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// Neither a token nor a session cookie.
    #[error("no credential")]
    Missing,
    /// An `Authorization` header that is not this daemon's token (perhaps a former daemon's).
    #[error("wrong API token")]
    BadToken,
    /// A session cookie that is unknown or idle for too long.
    #[error("unknown or expired session")]
    BadSession,
}

/// Counters of what the API refused, for troubleshooting and metrics.
#[derive(Debug, Default)]
pub struct AuthCounters {
    /// State-changing requests refused for want of a credential.
    pub refused: AtomicU64,
    /// Login codes exchanged for a session.
    pub logins: AtomicU64,
    /// Login attempts with a used, expired or wrong code.
    pub bad_login_codes: AtomicU64,
}

#[derive(Default)]
struct Tables {
    /// Session digest -> last state-changing use.
    sessions: HashMap<[u8; 32], Instant>,
    /// Login code digest -> when it was issued.
    codes: HashMap<[u8; 32], Instant>,
}

impl Tables {
    fn sweep(&mut self, now: Instant) {
        self.sessions
            .retain(|_, used| now.saturating_duration_since(*used) < SESSION_IDLE);
        self.codes
            .retain(|_, issued| now.saturating_duration_since(*issued) < LOGIN_CODE_TTL);
    }
}

/// The API's credentials: the token, the browser sessions and the pending login codes.
pub struct Auth {
    token: ApiToken,
    cookie_name: String,
    tables: Mutex<Tables>,
    log: Mutex<LogThrottle>,
    /// What was refused and granted.
    pub counters: AuthCounters,
}

impl Auth {
    /// Credentials for the API on `port`, accepting `token`.
    pub fn new(token: ApiToken, port: u16) -> Self {
        Auth {
            token,
            cookie_name: format!("{COOKIE_PREFIX}{port}"),
            tables: Mutex::default(),
            log: Mutex::new(LogThrottle::new(super::LOG_EVERY)),
            counters: AuthCounters::default(),
        }
    }

    /// The session cookie's name.
    pub fn cookie_name(&self) -> &str {
        &self.cookie_name
    }

    /// Checks a state-changing request's credential; a valid session counts as used now.
    pub fn check(&self, headers: &HeaderMap, now: Instant) -> Result<Credential, Denied> {
        let result = self.check_inner(headers, now, true);
        if let Err(denied) = result {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = self.log.lock().allow(now) {
                tracing::warn!(reason = %denied, suppressed, "refused a state-changing API request without a valid credential");
            }
        }
        result
    }

    /// Whether the request carries a live session cookie (does not count as use).
    pub fn has_session(&self, headers: &HeaderMap, now: Instant) -> bool {
        self.session_of(headers)
            .is_some_and(|s| self.session_alive(&s, now, false))
    }

    fn check_inner(
        &self,
        headers: &HeaderMap,
        now: Instant,
        touch: bool,
    ) -> Result<Credential, Denied> {
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let candidate = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .filter(|t| t.len() <= MAX_TOKEN_LEN);
            return match candidate {
                Some(t) if self.token.matches(t) => Ok(Credential::Token),
                _ => Err(Denied::BadToken),
            };
        }
        match self.session_of(headers) {
            Some(s) if self.session_alive(&s, now, touch) => Ok(Credential::Session),
            Some(_) => Err(Denied::BadSession),
            None => Err(Denied::Missing),
        }
    }

    /// The value of our session cookie in the request's `Cookie` headers, if any.
    fn session_of(&self, headers: &HeaderMap) -> Option<String> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, _)| *name == self.cookie_name)
            .map(|(_, value)| value.trim_matches('"').to_owned())
            .filter(|v| !v.is_empty() && v.len() <= MAX_TOKEN_LEN)
    }

    fn session_alive(&self, secret: &str, now: Instant, touch: bool) -> bool {
        let key = digest(secret);
        let mut tables = self.tables.lock();
        let Some(used) = tables.sessions.get_mut(&key) else {
            return false;
        };
        if now.saturating_duration_since(*used) >= SESSION_IDLE {
            tables.sessions.remove(&key);
            return false;
        }
        if touch {
            *used = now;
        }
        true
    }

    /// A new one-time login code, valid for [`LOGIN_CODE_TTL`] (for `lanrage ui`).
    pub fn issue_login_code(&self, now: Instant) -> String {
        let code = random_secret();
        let mut tables = self.tables.lock();
        tables.sweep(now);
        while tables.codes.len() >= MAX_LOGIN_CODES {
            let Some(oldest) = tables
                .codes
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| *k)
            else {
                break;
            };
            tables.codes.remove(&oldest);
        }
        tables.codes.insert(digest(&code), now);
        code
    }

    /// Exchanges an unused, unexpired login code for a new session; returns the session secret
    /// (the cookie's value). A code works once.
    pub fn redeem_login_code(&self, code: &str, now: Instant) -> Option<String> {
        let mut tables = self.tables.lock();
        tables.sweep(now);
        let valid = code.len() <= MAX_TOKEN_LEN && tables.codes.remove(&digest(code)).is_some();
        if !valid {
            drop(tables);
            self.counters
                .bad_login_codes
                .fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = self.log.lock().allow(now) {
                tracing::warn!(
                    suppressed,
                    "refused a used, expired or wrong web UI login code"
                );
            }
            return None;
        }
        while tables.sessions.len() >= MAX_SESSIONS {
            let Some(lru) = tables
                .sessions
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| *k)
            else {
                break;
            };
            tables.sessions.remove(&lru);
        }
        let secret = random_secret();
        tables.sessions.insert(digest(&secret), now);
        drop(tables);
        self.counters.logins.fetch_add(1, Ordering::Relaxed);
        tracing::info!("a browser logged in to the web UI");
        Some(secret)
    }

    /// The `Set-Cookie` value for a session: HttpOnly (scripts cannot read it), SameSite=Strict
    /// (other sites' pages never send it), no `Secure` (plain http on loopback), no `Max-Age`
    /// (the server ends it after [`SESSION_IDLE`] idle; the browser forgets it when closed).
    pub fn session_cookie(&self, secret: &str) -> String {
        format!(
            "{}={secret}; HttpOnly; SameSite=Strict; Path=/",
            self.cookie_name
        )
    }

    /// Number of live sessions and pending codes (tests).
    pub fn table_sizes(&self) -> (usize, usize) {
        let t = self.tables.lock();
        (t.sessions.len(), t.codes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn auth() -> Auth {
        Auth::new(ApiToken::generate(), 8666)
    }

    fn with(name: header::HeaderName, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn token_must_match_exactly() {
        let a = auth();
        let now = Instant::now();
        let good = format!("Bearer {}", a.token.as_str());
        assert_eq!(
            a.check(&with(header::AUTHORIZATION, &good), now),
            Ok(Credential::Token)
        );
        let short = &good[..good.len() - 1];
        for bad in [short, "Bearer ", "Basic abc", "Bearer x"] {
            assert_eq!(
                a.check(&with(header::AUTHORIZATION, bad), now),
                Err(Denied::BadToken),
                "{bad}"
            );
        }
        let other = format!("Bearer {}", ApiToken::generate().as_str());
        assert_eq!(
            a.check(&with(header::AUTHORIZATION, &other), now),
            Err(Denied::BadToken)
        );
        assert_eq!(a.check(&HeaderMap::new(), now), Err(Denied::Missing));
        assert_eq!(a.counters.refused.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn token_parse_refuses_junk() {
        assert!(ApiToken::parse("short").is_none());
        assert!(ApiToken::parse(&"a".repeat(129)).is_none());
        assert!(ApiToken::parse("abcdefghijklmnop qrstuvwxyz").is_none());
        let t = ApiToken::generate();
        assert_eq!(
            ApiToken::parse(&format!("{}\n", t.as_str())),
            Some(t.clone())
        );
        assert!(!format!("{t:?}").contains(t.as_str()));
    }

    #[test]
    fn login_code_works_once_and_gives_a_session() {
        let a = auth();
        let now = Instant::now();
        let code = a.issue_login_code(now);
        let secret = a.redeem_login_code(&code, now).expect("fresh code");
        assert!(a.redeem_login_code(&code, now).is_none(), "second use");
        assert!(a.redeem_login_code("nonsense", now).is_none());
        assert_eq!(a.counters.bad_login_codes.load(Ordering::Relaxed), 2);
        let cookie = a.session_cookie(&secret);
        assert!(cookie.starts_with("lanrage_session_8666="), "{cookie}");
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
        assert!(cookie.contains("Path=/") && !cookie.contains("Secure"));
        let h = with(
            header::COOKIE,
            &format!("other=1; lanrage_session_8666={secret}; x=y"),
        );
        assert_eq!(a.check(&h, now), Ok(Credential::Session));
        // Another port's cookie of the same value is not ours.
        let h = with(header::COOKIE, &format!("lanrage_session_8667={secret}"));
        assert_eq!(a.check(&h, now), Err(Denied::Missing));
    }

    #[test]
    fn login_code_expires() {
        let a = auth();
        let t0 = Instant::now();
        let code = a.issue_login_code(t0);
        assert!(a
            .redeem_login_code(&code, t0 + LOGIN_CODE_TTL + Duration::from_secs(1))
            .is_none());
    }

    #[test]
    fn session_expires_when_idle_and_use_keeps_it() {
        let a = auth();
        let t0 = Instant::now();
        let code = a.issue_login_code(t0);
        let secret = a.redeem_login_code(&code, t0).unwrap();
        let h = with(header::COOKIE, &format!("lanrage_session_8666={secret}"));
        let half = SESSION_IDLE / 2 + Duration::from_secs(1);
        assert_eq!(a.check(&h, t0 + half), Ok(Credential::Session));
        // Peeking (the page asking whether it is logged in) does not extend it.
        assert!(a.has_session(&h, t0 + 2 * half));
        assert_eq!(a.check(&h, t0 + 2 * half), Ok(Credential::Session));
        assert!(!a.has_session(&h, t0 + 2 * half + SESSION_IDLE));
        assert_eq!(
            a.check(&h, t0 + 2 * half + SESSION_IDLE),
            Err(Denied::BadSession)
        );
    }

    #[test]
    fn tables_are_bounded() {
        let a = auth();
        let now = Instant::now();
        let mut secrets = Vec::new();
        for i in 0..(MAX_SESSIONS as u64 + 10) {
            let t = now + Duration::from_millis(i);
            let code = a.issue_login_code(t);
            secrets.push(a.redeem_login_code(&code, t).unwrap());
        }
        for i in 0..100u64 {
            a.issue_login_code(now + Duration::from_millis(1000 + i));
        }
        let (sessions, codes) = a.table_sizes();
        assert_eq!((sessions, codes), (MAX_SESSIONS, MAX_LOGIN_CODES));
        // The least recently used sessions went first.
        let h = |s: &str| with(header::COOKIE, &format!("lanrage_session_8666={s}"));
        assert!(!a.has_session(&h(&secrets[0]), now));
        assert!(a.has_session(&h(secrets.last().unwrap()), now));
    }
}
