//! Blocking HTTP(S) client for a lanrage-relay control plane (routes in `lanrage_proto::api`).
//!
//! ureq with rustls: the daemon already uses ureq for its CLI, it needs no async runtime of its
//! own, and rustls (ring) needs no system OpenSSL. The daemon runs each call on a blocking thread
//! ([`super::exec`]). Answers are size-limited and parsed into proto types; nothing from the
//! server is trusted beyond its shape (the relay's key is checked against the pin, if any).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use lanrage_proto::api::{
    ChallengeResponse, CreatePartyRequest, ErrorBody, JoinRequest, NatInfo, PartyView,
    PeersResponse, RelaysResponse, RosterRequest, SessionResponse, SignalRequest, SignalsResponse,
    TokenResponse,
};
use lanrage_proto::auth::{SharedKey, CHALLENGE_LEN};
use lanrage_proto::ids::{PartyId, PeerId, PublicKey};
use serde::de::DeserializeOwned;
use serde_json::json;
use x25519_dalek::StaticSecret;

/// Largest answer body read from the server.
const MAX_BODY: u64 = 256 * 1024;
/// Deadline of a normal request (connect + answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call failed.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct CallError {
    /// HTTP status, if the server answered.
    pub status: Option<u16>,
    /// What went wrong, for logs and the CLI.
    pub message: String,
    /// The server's `Retry-After`, if any.
    pub retry_after: Option<Duration>,
}

impl CallError {
    fn local(message: impl Into<String>) -> Self {
        CallError {
            status: None,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Our token is unknown or expired: register again.
    pub fn is_unauthorized(&self) -> bool {
        self.status == Some(401)
    }
}

/// Checks a `control.server` value: `http://` or `https://`, a host, nothing after the port.
pub fn parse_server(server: &str) -> Result<String, String> {
    let s = server.trim().trim_end_matches('/');
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| format!("{server:?} must start with http:// or https://"))?;
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ', '@']) {
        return Err(format!(
            "{server:?} must be just a scheme, a host and optionally a port (like https://relay.example.org or http://203.0.113.1:8667)"
        ));
    }
    Ok(s.to_string())
}

/// Parses a base64 public key (the `control.relay_key` pin).
pub fn parse_key(s: &str) -> Option<PublicKey> {
    let bytes = B64.decode(s.trim()).ok()?;
    Some(PublicKey(bytes.try_into().ok()?))
}

/// A bearer token and when to renew it.
#[derive(Clone, Debug)]
struct Token {
    token: String,
    /// Renew after this (two thirds of its life), seconds since the epoch.
    renew_at: u64,
}

/// One control server, as this node talks to it.
pub struct ControlApi {
    base: String,
    agent: ureq::Agent,
    access_key: Option<String>,
    pin: Option<PublicKey>,
    secret: StaticSecret,
    key: PublicKey,
    token: parking_lot::Mutex<Option<Token>>,
    relay_key: parking_lot::Mutex<Option<PublicKey>>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ControlApi {
    /// A client for `server` (already checked by [`parse_server`]). `ca_pem`: CA certificates
    /// to trust instead of the public web roots.
    pub fn new(
        server: &str,
        access_key: Option<String>,
        pin: Option<PublicKey>,
        ca_pem: Option<&[u8]>,
        secret: StaticSecret,
    ) -> Result<Self, String> {
        let base = parse_server(server)?;
        let mut tls = ureq::tls::TlsConfig::builder().provider(ureq::tls::TlsProvider::Rustls);
        if let Some(pem) = ca_pem {
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err("control.ca_file holds no PEM certificate".into());
            }
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .user_agent(concat!("lanrage/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls.build())
            .build()
            .into();
        let key = PublicKey::from(&secret);
        Ok(ControlApi {
            base,
            agent,
            access_key,
            pin,
            secret,
            key,
            token: parking_lot::Mutex::new(None),
            relay_key: parking_lot::Mutex::new(None),
        })
    }

    /// The server, for logs.
    pub fn server(&self) -> &str {
        &self.base
    }

    /// The relay's key as learnt at registration.
    pub fn relay_key(&self) -> Option<PublicKey> {
        *self.relay_key.lock()
    }

    /// Our shared key with the relay (bind keys for relay sessions come from it).
    pub fn shared_key(&self) -> Option<SharedKey> {
        SharedKey::for_peer(&self.secret, &self.relay_key()?)
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        auth: bool,
        timeout: Duration,
    ) -> Result<(u16, Option<T>), CallError> {
        let url = format!("{}{}", self.base, path);
        let bearer = if auth {
            let t = self.token.lock().clone();
            match t {
                Some(t) => Some(format!("Bearer {}", t.token)),
                None => return Err(CallError::local("not registered")),
            }
        } else {
            None
        };
        let result = match method {
            "GET" | "DELETE" => {
                let mut req = if method == "GET" {
                    self.agent.get(&url)
                } else {
                    self.agent.delete(&url)
                };
                if let Some(b) = &bearer {
                    req = req.header("Authorization", b);
                }
                req.config().timeout_global(Some(timeout)).build().call()
            }
            _ => {
                let mut req = if method == "PUT" {
                    self.agent.put(&url)
                } else {
                    self.agent.post(&url)
                };
                if let Some(b) = &bearer {
                    req = req.header("Authorization", b);
                }
                let req = req.config().timeout_global(Some(timeout)).build();
                match body {
                    Some(b) => req.send_json(b),
                    None => req.send_empty(),
                }
            }
        };
        let mut resp = result.map_err(|e| CallError::local(format!("{}: {e}", self.base)))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(600)));
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_string()
            .unwrap_or_default();
        if !(200..300).contains(&status) {
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|e| e.error)
                .unwrap_or_else(|_| format!("HTTP {status}"));
            if status == 401 && auth {
                *self.token.lock() = None;
            }
            return Err(CallError {
                status: Some(status),
                message: format!("{}: {}", self.base, crate::names::printable(&message, 200)),
                retry_after,
            });
        }
        if text.trim().is_empty() {
            return Ok((status, None));
        }
        serde_json::from_str(&text)
            .map(|v| (status, Some(v)))
            .map_err(|e| CallError::local(format!("{}: unexpected answer: {e}", self.base)))
    }

    fn expect<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, CallError> {
        match self.call(method, path, body, true, REQUEST_TIMEOUT)? {
            (_, Some(v)) => Ok(v),
            (_, None) => Err(CallError::local(format!("{}: empty answer", self.base))),
        }
    }

    /// Registers (or renews) our token when needed. Cheap when the token is fresh.
    pub fn ensure_registered(&self) -> Result<(), CallError> {
        let now = unix_now();
        let current = self.token.lock().clone();
        if let Some(t) = current {
            if now < t.renew_at {
                return Ok(());
            }
            match self.call::<TokenResponse>("POST", "/auth/refresh", None, true, REQUEST_TIMEOUT) {
                Ok((_, Some(t))) => {
                    self.store_token(t);
                    return Ok(());
                }
                Ok((_, None)) => {}
                Err(e) if e.status.is_none() => return Err(e),
                Err(_) => {} // expired or refused: register from scratch
            }
        }
        self.register()
    }

    fn store_token(&self, t: TokenResponse) {
        let renew_at = unix_now().saturating_add((t.expires_in_secs / 3).saturating_mul(2).max(10));
        *self.token.lock() = Some(Token {
            token: t.token,
            renew_at,
        });
    }

    fn register(&self) -> Result<(), CallError> {
        let mut body = json!({ "key": self.key });
        if let Some(a) = &self.access_key {
            body["access_key"] = json!(a);
        }
        let (_, ch) = self.call::<ChallengeResponse>(
            "POST",
            "/auth/challenge",
            Some(body),
            false,
            REQUEST_TIMEOUT,
        )?;
        let ch = ch.ok_or_else(|| CallError::local("empty challenge"))?;
        if let Some(pin) = self.pin {
            if pin != ch.relay_key {
                return Err(CallError::local(format!(
                    "{} answers with relay key {} but control.relay_key pins {}: refusing it",
                    self.base, ch.relay_key, pin
                )));
            }
        }
        let challenge: [u8; CHALLENGE_LEN] = B64
            .decode(&ch.challenge)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| CallError::local("malformed challenge"))?;
        let shared = SharedKey::for_peer(&self.secret, &ch.relay_key)
            .ok_or_else(|| CallError::local("the relay's key is not usable"))?;
        let proof = shared.register_proof(&challenge, &self.key);
        let mut body = json!({
            "key": self.key,
            "challenge": ch.challenge,
            "proof": B64.encode(proof),
        });
        if let Some(a) = &self.access_key {
            body["access_key"] = json!(a);
        }
        let (_, t) = self.call::<TokenResponse>(
            "POST",
            "/auth/register",
            Some(body),
            false,
            REQUEST_TIMEOUT,
        )?;
        let t = t.ok_or_else(|| CallError::local("empty token answer"))?;
        *self.relay_key.lock() = Some(ch.relay_key);
        self.store_token(t);
        Ok(())
    }

    /// `GET /relays`, checked against the pin.
    pub fn relays(&self) -> Result<RelaysResponse, CallError> {
        let (_, r) = self.call::<RelaysResponse>("GET", "/relays", None, false, REQUEST_TIMEOUT)?;
        let mut r = r.ok_or_else(|| CallError::local("empty relay list"))?;
        if let Some(pin) = self.pin {
            r.relays.retain(|x| x.key == pin);
        }
        r.relays.truncate(8);
        for x in &mut r.relays {
            x.udp.truncate(4);
        }
        Ok(r)
    }

    /// Registers our party (we host it); idempotent.
    pub fn create_party(
        &self,
        id: PartyId,
        name: &str,
        protected: bool,
        peer_name: &str,
        endpoints: &[std::net::SocketAddr],
    ) -> Result<PartyView, CallError> {
        let req = CreatePartyRequest {
            id: Some(id),
            name: name.to_string(),
            protected,
            peer_name: Some(peer_name.to_string()),
            endpoints: endpoints.to_vec(),
        };
        self.expect("POST", "/parties", serde_json::to_value(req).ok())
    }

    /// Applies to join a party: the answer names its host.
    pub fn join_party(
        &self,
        id: PartyId,
        peer_name: &str,
        endpoints: &[std::net::SocketAddr],
    ) -> Result<PartyView, CallError> {
        let req = JoinRequest {
            peer_name: Some(peer_name.to_string()),
            endpoints: endpoints.to_vec(),
        };
        self.expect(
            "POST",
            &format!("/parties/{id}/join"),
            serde_json::to_value(req).ok(),
        )
    }

    /// Publishes the party's membership (host first), as its host.
    pub fn publish_roster(
        &self,
        id: PartyId,
        version: u64,
        members: &[PeerId],
    ) -> Result<(), CallError> {
        self.call::<serde_json::Value>(
            "PUT",
            &format!("/parties/{id}/roster"),
            serde_json::to_value(RosterRequest {
                version,
                members: members.to_vec(),
            })
            .ok(),
            true,
            REQUEST_TIMEOUT,
        )
        .map(|_| ())
    }

    /// Members (and, for the host, applicants).
    pub fn peers(&self, id: PartyId) -> Result<PeersResponse, CallError> {
        self.expect("GET", &format!("/parties/{id}/peers"), None)
    }

    /// Leaves the party on the server.
    pub fn leave(&self, id: PartyId) -> Result<(), CallError> {
        let me = PeerId::from_key(&self.key);
        self.call::<serde_json::Value>(
            "DELETE",
            &format!("/parties/{id}/peers/{me}"),
            None,
            true,
            REQUEST_TIMEOUT,
        )
        .map(|_| ())
    }

    /// Heartbeat with our endpoints; returns the server's member timeout and roster version.
    pub fn heartbeat(
        &self,
        id: PartyId,
        endpoints: &[std::net::SocketAddr],
    ) -> Result<lanrage_proto::api::HeartbeatResponse, CallError> {
        let me = PeerId::from_key(&self.key);
        self.expect(
            "POST",
            &format!("/parties/{id}/peers/{me}/heartbeat"),
            Some(json!({ "endpoints": endpoints })),
        )
    }

    /// Tells `to` where we can be reached.
    pub fn signal(
        &self,
        id: PartyId,
        to: PeerId,
        endpoints: &[std::net::SocketAddr],
        nonce: u64,
        nat: Option<NatInfo>,
    ) -> Result<(), CallError> {
        let req = SignalRequest {
            endpoints: endpoints.to_vec(),
            nonce,
            nat,
        };
        self.call::<serde_json::Value>(
            "POST",
            &format!("/parties/{id}/peers/{to}/signal"),
            serde_json::to_value(req).ok(),
            true,
            REQUEST_TIMEOUT,
        )
        .map(|_| ())
    }

    /// Long-polls our signal inbox.
    pub fn signals(&self, id: PartyId, wait: Duration) -> Result<SignalsResponse, CallError> {
        let secs = wait.as_secs().min(lanrage_proto::api::MAX_WAIT_SECS);
        match self.call(
            "GET",
            &format!("/parties/{id}/signals?wait_secs={secs}"),
            None,
            true,
            Duration::from_secs(secs) + REQUEST_TIMEOUT,
        )? {
            (_, Some(v)) => Ok(v),
            (_, None) => Ok(SignalsResponse {
                signals: Vec::new(),
            }),
        }
    }

    /// A relay session with `peer` (both ask; both get the same one).
    pub fn session(&self, id: PartyId, peer: PeerId) -> Result<SessionResponse, CallError> {
        self.expect(
            "POST",
            &format!("/parties/{id}/sessions"),
            Some(json!({ "peer": peer })),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_values() {
        assert_eq!(
            parse_server("http://203.0.113.1:8667/").unwrap(),
            "http://203.0.113.1:8667"
        );
        assert!(parse_server("https://relay.example.org").is_ok());
        assert!(parse_server("ftp://x").is_err());
        assert!(parse_server("http://").is_err());
        assert!(parse_server("http://x/path").is_err());
        assert!(parse_server("http://user@x").is_err());
    }

    #[test]
    fn keys() {
        assert!(parse_key(&B64.encode([7u8; 32])).is_some());
        assert!(parse_key("short").is_none());
    }
}
