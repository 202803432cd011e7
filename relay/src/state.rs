//! The relay's shared state and the operations the control plane performs on it, without HTTP:
//! the HTTP layer ([`crate::http`]) only parses requests and renders answers, so the auth and
//! membership rules are tested here directly.
//!
//! Two locks, always taken in this order when both are needed: `core` (registry, tokens,
//! challenges, rate limiters, pending journal records) and `table` (the UDP session table, taken
//! per forwarded datagram and otherwise only briefly). Password stretching and Diffie-Hellman
//! happen outside `core` where they can.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use lanrage_proto::api::{
    ChallengeResponse, CreatePartyRequest, HeartbeatResponse, JoinRequest, PartyInfo, PartyView,
    PeersResponse, RegisterRequest, RelayInfo, RelaysResponse, SessionResponse, Signal,
    TokenResponse,
};
use lanrage_proto::auth::{SharedKey, CHALLENGE_LEN};
use lanrage_proto::ids::{PartyId, PeerId, PublicKey, SessionId};
use parking_lot::Mutex;

use crate::challenge::{ChallengeError, Challenges};
use crate::config::Config;
use crate::identity::Identity;
use crate::metrics::{Gauges, Metrics};
use crate::password::Verifier;
use crate::ratelimit::KeyedLimiter;
use crate::registry::{check_password, NewParty, Registry, RegistryError, RegistryLimits};
use crate::sessions::{SessionLimits, SessionTable};
use crate::store::Record;
use crate::stun::{Layout, StunResponder};
use crate::tokens::{hash_token, TokenError, TokenHash, TokenStore};

/// Most outstanding registration challenges.
const MAX_CHALLENGES: usize = 100_000;
/// Most tracked source IPs / tokens in the rate limiters.
const MAX_LIMITER_KEYS: usize = 100_000;
/// Most cached peer/relay shared keys.
const MAX_SHARED_KEYS: usize = 200_000;

/// Seconds and microseconds since the Unix epoch.
pub fn unix_now() -> (u64, u64) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.as_micros() as u64)
}

/// A refused request: HTTP status and a message for humans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// What went wrong.
    pub message: String,
    /// Seconds to wait (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with this status.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    fn limited(wait: Duration) -> Self {
        ApiError {
            status: 429,
            message: "rate limited".into(),
            retry_after: Some(wait.as_secs().max(1)),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match e {
            RegistryError::Invalid(_) => 400,
            RegistryError::Forbidden(_) => 403,
            RegistryError::NotFound(_) => 404,
            RegistryError::Full(_) => 409,
            RegistryError::TooManyAttempts => 429,
        };
        let retry_after = (status == 429).then_some(60);
        ApiError {
            status,
            message: e.to_string(),
            retry_after,
        }
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Unknown | TokenError::Expired => ApiError::new(401, e.to_string()),
            TokenError::Full => ApiError::new(409, e.to_string()),
        }
    }
}

/// Who a request acts as, after the token was checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The key the token is bound to.
    pub key: PublicKey,
    /// Its peer id.
    pub peer: PeerId,
    /// The token's hash (for refresh).
    pub token: TokenHash,
}

/// Everything behind the `core` lock.
pub struct Core {
    /// Parties and members.
    pub registry: Registry,
    /// Bearer tokens.
    pub tokens: TokenStore,
    /// Registration challenges.
    pub challenges: Challenges,
    /// Per source IP.
    pub ip_limiter: KeyedLimiter<IpAddr>,
    /// Per token.
    pub token_limiter: KeyedLimiter<TokenHash>,
    /// Changes not yet committed to the store.
    pub pending: Vec<Record>,
    shared: HashMap<PublicKey, SharedKey>,
}

/// The whole relay: configuration, keys, state, counters.
pub struct Relay {
    /// Configuration.
    pub cfg: Config,
    /// UDP sockets.
    pub layout: Layout,
    /// The relay's key.
    pub identity: Identity,
    /// Control-plane state.
    pub core: Mutex<Core>,
    /// UDP session table.
    pub table: Mutex<SessionTable>,
    /// Counters.
    pub metrics: Metrics,
    /// STUN answers.
    pub stun: StunResponder,
    /// Woken whenever a signal is queued (long polls wait on it).
    pub signals: tokio::sync::Notify,
}

impl Relay {
    /// A relay with empty state.
    pub fn new(cfg: Config, identity: Identity) -> Self {
        let now = Instant::now();
        let layout = Layout::from_config(&cfg);
        let c = &cfg.control;
        let core = Core {
            registry: Registry::new(RegistryLimits::from(&cfg.parties), unix_now().1 / 1000),
            tokens: TokenStore::new(c.token_ttl_secs, c.max_tokens),
            challenges: Challenges::new(Duration::from_secs(c.challenge_ttl_secs), MAX_CHALLENGES),
            ip_limiter: KeyedLimiter::new(
                u64::from(c.ip_rate_per_sec),
                u64::from(c.ip_burst),
                MAX_LIMITER_KEYS,
            ),
            token_limiter: KeyedLimiter::new(
                u64::from(c.token_rate_per_sec),
                u64::from(c.token_burst),
                MAX_LIMITER_KEYS,
            ),
            pending: Vec::new(),
            shared: HashMap::new(),
        };
        let table = SessionTable::new(SessionLimits::from(&cfg.relay), now);
        Relay {
            stun: StunResponder::new(layout.clone()),
            layout,
            identity,
            core: Mutex::new(core),
            table: Mutex::new(table),
            metrics: Metrics::default(),
            signals: tokio::sync::Notify::new(),
            cfg,
        }
    }

    fn shared_key(&self, core: &mut Core, key: &PublicKey) -> Option<SharedKey> {
        if let Some(k) = core.shared.get(key) {
            return Some(k.clone());
        }
        let k = SharedKey::for_relay(&self.identity.secret, key)?;
        if core.shared.len() >= MAX_SHARED_KEYS {
            core.shared.clear();
        }
        core.shared.insert(*key, k.clone());
        Some(k)
    }

    /// Rebuilds the state from stored records (at start, before serving).
    pub fn load(&self, records: &[Record]) {
        let now = Instant::now();
        let (unix, _) = unix_now();
        let mut core = self.core.lock();
        let mut discard = Vec::new();
        for r in records {
            match r {
                Record::Token {
                    hash,
                    key,
                    expires_at,
                } => core.tokens.insert(
                    *hash,
                    crate::tokens::TokenEntry {
                        key: *key,
                        expires_at: *expires_at,
                    },
                ),
                Record::TokenGone { hash } => core.tokens.remove(hash, &mut discard),
                other => core.registry.restore(other, now),
            }
        }
        let mut j = std::mem::take(&mut core.pending);
        core.tokens.sweep(unix, &mut j);
        core.pending = j;
        let mut table = self.table.lock();
        for (id, party, a, b) in core.registry.sessions() {
            let (Some(ka), Some(kb)) = (
                self.shared_key(&mut core, &a),
                self.shared_key(&mut core, &b),
            ) else {
                continue;
            };
            let members = [
                (PeerId::from_key(&a), ka.bind_key(id)),
                (PeerId::from_key(&b), kb.bind_key(id)),
            ];
            if table.insert(id, party, members, now).is_err() {
                let mut j = std::mem::take(&mut core.pending);
                core.registry.forget_session(&party, id, &mut j);
                core.pending = j;
            }
        }
    }

    /// The current state as records (snapshots) — call with no other lock held.
    pub fn snapshot(core: &Core) -> Vec<Record> {
        let mut out = Vec::new();
        core.tokens.records(&mut out);
        core.registry.records(&mut out);
        out
    }

    /// Per-IP rate limit, applied to every request.
    pub fn limit_ip(&self, ip: IpAddr) -> Result<(), ApiError> {
        let r = self.core.lock().ip_limiter.check(&ip, Instant::now());
        r.map_err(|wait| {
            self.metrics
                .limited_ip
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            ApiError::limited(wait)
        })
    }

    /// Checks a bearer token (401 if missing, unknown or expired) and its rate limit.
    pub fn authenticate(&self, bearer: Option<&str>) -> Result<Caller, ApiError> {
        let text = bearer.ok_or_else(|| ApiError::new(401, "missing bearer token"))?;
        let hash = hash_token(text).ok_or_else(|| ApiError::new(401, "unknown token"))?;
        let mut core = self.core.lock();
        let key = core.tokens.check(&hash, unix_now().0)?;
        if let Err(wait) = core.token_limiter.check(&hash, Instant::now()) {
            self.metrics
                .limited_token
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(ApiError::limited(wait));
        }
        Ok(Caller {
            key,
            peer: PeerId::from_key(&key),
            token: hash,
        })
    }

    /// `POST /auth/challenge`.
    pub fn challenge(&self, key: PublicKey) -> Result<ChallengeResponse, ApiError> {
        let c = self
            .core
            .lock()
            .challenges
            .issue(key, Instant::now())
            .map_err(|e| ApiError::new(503, e.to_string()))?;
        Ok(ChallengeResponse {
            challenge: B64.encode(c),
            relay_key: self.identity.public,
            expires_in_secs: self.cfg.control.challenge_ttl_secs,
        })
    }

    /// `POST /auth/register`.
    pub fn register(&self, req: &RegisterRequest) -> Result<TokenResponse, ApiError> {
        if let Some(want) = &self.cfg.control.access_key {
            let given = req.access_key.as_deref().unwrap_or("");
            if !constant_time_eq(given.as_bytes(), want.as_bytes()) {
                return Err(ApiError::new(
                    403,
                    "this relay needs an access key (access_key)",
                ));
            }
        }
        let challenge: [u8; CHALLENGE_LEN] = B64
            .decode(&req.challenge)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| ApiError::new(400, "challenge must be 32 bytes of base64"))?;
        let proof = B64
            .decode(&req.proof)
            .map_err(|_| ApiError::new(400, "proof must be base64"))?;
        self.core
            .lock()
            .challenges
            .take(&challenge, &req.key, Instant::now())
            .map_err(|e| match e {
                ChallengeError::Full => ApiError::new(503, e.to_string()),
                _ => ApiError::new(401, e.to_string()),
            })?;
        // Diffie-Hellman outside the lock.
        let shared = SharedKey::for_relay(&self.identity.secret, &req.key)
            .ok_or_else(|| ApiError::new(400, "weak key"))?;
        if !shared.verify_register_proof(&challenge, &req.key, &proof) {
            return Err(ApiError::new(401, "proof does not match the key"));
        }
        let (unix, _) = unix_now();
        let mut core = self.core.lock();
        let mut j = std::mem::take(&mut core.pending);
        let issued = core.tokens.issue(req.key, unix, &mut j);
        core.pending = j;
        if core.shared.len() >= MAX_SHARED_KEYS {
            core.shared.clear();
        }
        core.shared.insert(req.key, shared);
        let (token, expires_at) = issued?;
        Ok(TokenResponse {
            token,
            peer: PeerId::from_key(&req.key),
            expires_at,
            expires_in_secs: expires_at - unix,
        })
    }

    /// `POST /auth/refresh`.
    pub fn refresh(&self, caller: &Caller) -> Result<TokenResponse, ApiError> {
        let (unix, _) = unix_now();
        let mut core = self.core.lock();
        let mut j = std::mem::take(&mut core.pending);
        let r = core.tokens.refresh(&caller.token, unix, &mut j);
        core.pending = j;
        let (token, expires_at) = r?;
        Ok(TokenResponse {
            token,
            peer: caller.peer,
            expires_at,
            expires_in_secs: expires_at - unix,
        })
    }

    fn with_journal<T>(&self, f: impl FnOnce(&mut Core, &mut Vec<Record>) -> T) -> T {
        let mut core = self.core.lock();
        let mut j = std::mem::take(&mut core.pending);
        let out = f(&mut core, &mut j);
        core.pending = j;
        out
    }

    /// `POST /parties`.
    pub fn create_party(
        &self,
        caller: &Caller,
        req: CreatePartyRequest,
    ) -> Result<PartyView, ApiError> {
        let id_hint = PartyId::random();
        let verifier = match &req.password {
            Some(p) => {
                check_password(p)?;
                Some(p)
            }
            None => None,
        };
        // The verifier is salted with the party id, which the registry picks: pick it here.
        let verifier = verifier.map(|p| Verifier::new(&id_hint, p));
        let (unix, _) = unix_now();
        let new = NewParty {
            name: req.name,
            verifier,
            peer_name: req.peer_name,
            endpoints: req.endpoints,
        };
        self.with_journal(|core, j| {
            core.registry
                .create_with_id(caller.key, id_hint, new, Instant::now(), unix, j)
        })
        .map_err(Into::into)
    }

    /// `POST /parties/{id}/join`.
    pub fn join(
        &self,
        caller: &Caller,
        party: PartyId,
        req: JoinRequest,
    ) -> Result<PartyView, ApiError> {
        let verifier =
            self.core
                .lock()
                .registry
                .precheck_join(&party, &caller.key, Instant::now())?;
        let password_ok = match (&verifier, &req.password) {
            (Some(v), Some(p)) => p.len() <= lanrage_proto::api::MAX_PASSWORD && v.check(&party, p),
            _ => false,
        };
        let (unix, _) = unix_now();
        self.with_journal(|core, j| {
            core.registry.join(
                caller.key,
                &party,
                password_ok,
                req.peer_name,
                req.endpoints,
                Instant::now(),
                unix,
                j,
            )
        })
        .map_err(Into::into)
    }

    /// `DELETE /parties/{id}/peers/{peer}`.
    pub fn leave(&self, caller: &Caller, party: PartyId, peer: PeerId) -> Result<(), ApiError> {
        let mut core = self.core.lock();
        let mut j = std::mem::take(&mut core.pending);
        let ended = core.registry.leave(&caller.peer, &party, &peer, &mut j);
        core.pending = j;
        let ended = ended?;
        let mut table = self.table.lock();
        for id in ended {
            table.remove(&id);
        }
        Ok(())
    }

    /// `GET /parties/{id}`.
    pub fn info(&self, caller: &Caller, party: PartyId) -> Result<PartyInfo, ApiError> {
        Ok(self.core.lock().registry.info(&caller.peer, &party)?)
    }

    /// `GET /parties/{id}/peers`.
    pub fn peers(&self, caller: &Caller, party: PartyId) -> Result<PeersResponse, ApiError> {
        Ok(self.core.lock().registry.peers(&caller.peer, &party)?)
    }

    /// `POST /parties/{id}/peers/{peer}/heartbeat`.
    pub fn heartbeat(
        &self,
        caller: &Caller,
        party: PartyId,
        peer: PeerId,
        endpoints: Option<Vec<std::net::SocketAddr>>,
    ) -> Result<HeartbeatResponse, ApiError> {
        self.with_journal(|core, j| {
            core.registry
                .heartbeat(&caller.peer, &party, &peer, endpoints, Instant::now(), j)
        })
        .map_err(Into::into)
    }

    /// `POST /parties/{id}/peers/{peer}/signal`.
    pub fn signal(
        &self,
        caller: &Caller,
        party: PartyId,
        to: PeerId,
        endpoints: Vec<std::net::SocketAddr>,
        nonce: u64,
    ) -> Result<(), ApiError> {
        self.core.lock().registry.signal(
            &caller.peer,
            &party,
            &to,
            endpoints,
            nonce,
            Instant::now(),
        )?;
        self.signals.notify_waiters();
        Ok(())
    }

    /// Signals waiting for the caller (no waiting; see the HTTP long poll).
    pub fn take_signals(&self, caller: &Caller, party: PartyId) -> Result<Vec<Signal>, ApiError> {
        Ok(self
            .core
            .lock()
            .registry
            .take_signals(&caller.peer, &party, Instant::now())?)
    }

    /// `POST /parties/{id}/sessions`.
    pub fn open_session(
        &self,
        caller: &Caller,
        party: PartyId,
        other: PeerId,
    ) -> Result<SessionResponse, ApiError> {
        let now = Instant::now();
        let mut core = self.core.lock();
        let mut j = std::mem::take(&mut core.pending);
        let r = core
            .registry
            .session(&caller.peer, &party, &other, SessionId::random(), &mut j);
        core.pending = j;
        let (id, a, b, existed) = r?;
        // A session the registry knows but the table dropped (idle sweep racing this request) is
        // put back rather than handed out dead.
        if !existed || !self.table.lock().contains(&id) {
            let keys = (
                self.shared_key(&mut core, &a),
                self.shared_key(&mut core, &b),
            );
            let (Some(ka), Some(kb)) = keys else {
                return Err(ApiError::new(400, "weak member key"));
            };
            let members = [
                (PeerId::from_key(&a), ka.bind_key(id)),
                (PeerId::from_key(&b), kb.bind_key(id)),
            ];
            if let Err(e) = self.table.lock().insert(id, party, members, now) {
                let mut j = std::mem::take(&mut core.pending);
                core.registry.forget_session(&party, id, &mut j);
                core.pending = j;
                return Err(ApiError::new(409, e.to_string()));
            }
        }
        Ok(SessionResponse {
            session: id,
            peer: other,
            relay: self.layout.public_addrs(),
            idle_timeout_secs: self.cfg.relay.idle_timeout_secs,
        })
    }

    /// `GET /relays`.
    pub fn relays(&self) -> RelaysResponse {
        RelaysResponse {
            relays: vec![RelayInfo {
                key: self.identity.public,
                udp: self.layout.public_addrs(),
                nat_discovery: self.stun.discovery(),
            }],
        }
    }

    /// `GET /metrics`.
    pub fn metrics_text(&self) -> String {
        let mut g = {
            let core = self.core.lock();
            Gauges {
                registered_peers: core.tokens.peers(),
                tokens: core.tokens.len(),
                parties: core.registry.party_count(),
                members: core.registry.member_count(),
                ..Default::default()
            }
        };
        let stats = {
            let table = self.table.lock();
            g.sessions = table.len();
            g.sessions_active = table.active();
            table.stats.clone()
        };
        self.metrics.render(&stats, &g)
    }

    /// Periodic cleanup: silent members, empty parties, idle sessions, expired tokens and
    /// challenges, idle rate-limit buckets.
    pub fn sweep(&self, now: Instant) {
        let idle = self.table.lock().sweep(now);
        let (unix, _) = unix_now();
        let mut core = self.core.lock();
        let mut j = std::mem::take(&mut core.pending);
        for (id, party) in idle {
            core.registry.forget_session(&party, id, &mut j);
        }
        let swept = core.registry.sweep(now, &mut j);
        core.tokens.sweep(unix, &mut j);
        core.challenges.sweep(now);
        core.ip_limiter.sweep(now);
        core.token_limiter.sweep(now);
        core.pending = j;
        if !swept.sessions.is_empty() {
            let mut table = self.table.lock();
            for id in &swept.sessions {
                table.remove(id);
            }
        }
        if !swept.members.is_empty() {
            tracing::debug!(
                members = swept.members.len(),
                parties = swept.parties.len(),
                "removed silent members"
            );
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use lanrage_proto::api::{CreatePartyRequest, JoinRequest, RegisterRequest};
    use x25519_dalek::StaticSecret;

    fn relay(access_key: Option<&str>) -> Relay {
        let mut cfg = Config::default();
        cfg.udp.listen = vec!["127.0.0.1:3478".parse().unwrap()];
        cfg.control.access_key = access_key.map(str::to_string);
        cfg.control.token_rate_per_sec = 1000;
        cfg.control.token_burst = 1000;
        Relay::new(
            cfg,
            Identity::from_secret(StaticSecret::random_from_rng(rand::rngs::OsRng)),
        )
    }

    struct Peer {
        secret: StaticSecret,
        key: PublicKey,
    }

    fn peer() -> Peer {
        let secret = StaticSecret::random_from_rng(rand::rngs::OsRng);
        Peer {
            key: PublicKey::from(&secret),
            secret,
        }
    }

    fn register(r: &Relay, p: &Peer, access_key: Option<&str>) -> Result<TokenResponse, ApiError> {
        let ch = r.challenge(p.key)?;
        let raw: [u8; 32] = B64.decode(&ch.challenge).unwrap().try_into().unwrap();
        let proof = SharedKey::for_peer(&p.secret, &ch.relay_key)
            .unwrap()
            .register_proof(&raw, &p.key);
        r.register(&RegisterRequest {
            key: p.key,
            challenge: ch.challenge,
            proof: B64.encode(proof),
            access_key: access_key.map(str::to_string),
        })
    }

    fn caller(r: &Relay, p: &Peer) -> Caller {
        let t = register(r, p, None).unwrap();
        r.authenticate(Some(&t.token)).unwrap()
    }

    #[test]
    fn registration_needs_the_private_key_and_a_fresh_challenge() {
        let r = relay(None);
        let (alice, mallory) = (peer(), peer());
        let t = register(&r, &alice, None).unwrap();
        assert_eq!(t.peer, PeerId::from_key(&alice.key));
        let c = r.authenticate(Some(&t.token)).unwrap();
        assert_eq!(c.key, alice.key);
        // Mallory claims Alice's key but cannot compute the proof.
        let ch = r.challenge(alice.key).unwrap();
        let raw: [u8; 32] = B64.decode(&ch.challenge).unwrap().try_into().unwrap();
        let forged = SharedKey::for_peer(&mallory.secret, &ch.relay_key)
            .unwrap()
            .register_proof(&raw, &alice.key);
        let req = RegisterRequest {
            key: alice.key,
            challenge: ch.challenge.clone(),
            proof: B64.encode(forged),
            access_key: None,
        };
        assert_eq!(r.register(&req).unwrap_err().status, 401);
        // The challenge was used up by the failed try.
        let good = SharedKey::for_peer(&alice.secret, &ch.relay_key)
            .unwrap()
            .register_proof(&raw, &alice.key);
        let req = RegisterRequest {
            proof: B64.encode(good),
            ..req
        };
        assert_eq!(r.register(&req).unwrap_err().status, 401);
        assert_eq!(r.authenticate(None).unwrap_err().status, 401);
        assert_eq!(r.authenticate(Some("garbage")).unwrap_err().status, 401);
        let bad = RegisterRequest {
            key: alice.key,
            challenge: "!!".into(),
            proof: "AA==".into(),
            access_key: None,
        };
        assert_eq!(r.register(&bad).unwrap_err().status, 400);
    }

    #[test]
    fn access_key_is_required_when_configured() {
        let r = relay(Some("0123456789abcdef-secret"));
        let p = peer();
        assert_eq!(register(&r, &p, None).unwrap_err().status, 403);
        assert_eq!(
            register(&r, &p, Some("0123456789abcdef-wrong!"))
                .unwrap_err()
                .status,
            403
        );
        assert!(register(&r, &p, Some("0123456789abcdef-secret")).is_ok());
    }

    #[test]
    fn refresh_rotates_and_expired_tokens_are_401() {
        let r = relay(None);
        let p = peer();
        let c = caller(&r, &p);
        let t2 = r.refresh(&c).unwrap();
        assert!(r.authenticate(Some(&t2.token)).is_ok());
        // Expire every token by hand: 401.
        let hash = hash_token(&t2.token).unwrap();
        r.core.lock().tokens.insert(
            hash,
            crate::tokens::TokenEntry {
                key: p.key,
                expires_at: 1,
            },
        );
        assert_eq!(r.authenticate(Some(&t2.token)).unwrap_err().status, 401);
    }

    #[test]
    fn party_auth_matrix() {
        let r = relay(None);
        let (a, b, c) = (peer(), peer(), peer());
        let (ca, cb, cc) = (caller(&r, &a), caller(&r, &b), caller(&r, &c));
        let v = r
            .create_party(
                &ca,
                CreatePartyRequest {
                    name: "lan".into(),
                    password: Some("pw".into()),
                    ..Default::default()
                },
            )
            .unwrap();
        let id = v.party.id;
        assert!(v.party.protected);
        // Wrong / missing password: 403; right one: in.
        assert_eq!(
            r.join(&cb, id, JoinRequest::default()).unwrap_err().status,
            403
        );
        assert_eq!(
            r.join(
                &cb,
                id,
                JoinRequest {
                    password: Some("nope".into()),
                    ..Default::default()
                }
            )
            .unwrap_err()
            .status,
            403
        );
        r.join(
            &cb,
            id,
            JoinRequest {
                password: Some("pw".into()),
                ..Default::default()
            },
        )
        .unwrap();
        // Reading: members yes, strangers 403, unknown party 404.
        assert!(r.info(&cb, id).is_ok());
        assert_eq!(r.info(&cc, id).unwrap_err().status, 403);
        assert_eq!(r.peers(&cc, id).unwrap_err().status, 403);
        assert_eq!(r.info(&ca, PartyId([0; 10])).unwrap_err().status, 404);
        // Acting for another peer: 403.
        assert_eq!(r.leave(&cb, id, ca.peer).unwrap_err().status, 403);
        assert_eq!(r.heartbeat(&cb, id, ca.peer, None).unwrap_err().status, 403);
        assert_eq!(r.leave(&cc, id, ca.peer).unwrap_err().status, 403);
        // Sessions only between members.
        assert_eq!(r.open_session(&cc, id, ca.peer).unwrap_err().status, 403);
        assert_eq!(r.open_session(&ca, id, cc.peer).unwrap_err().status, 404);
        let s1 = r.open_session(&ca, id, cb.peer).unwrap();
        let s2 = r.open_session(&cb, id, ca.peer).unwrap();
        assert_eq!(s1.session, s2.session);
        assert_eq!(r.table.lock().len(), 1);
        // Signals.
        let ep = vec!["198.51.100.7:51820".parse().unwrap()];
        r.signal(&cb, id, ca.peer, ep.clone(), 5).unwrap();
        assert_eq!(
            r.signal(&cc, id, ca.peer, ep.clone(), 5)
                .unwrap_err()
                .status,
            403
        );
        let hb = r.heartbeat(&ca, id, ca.peer, None).unwrap();
        assert_eq!(hb.signals.len(), 1);
        assert_eq!(hb.signals[0].endpoints, ep);
        // Leaving ends the session in the UDP table too.
        r.leave(&cb, id, cb.peer).unwrap();
        assert_eq!(r.table.lock().len(), 0);
        let text = r.metrics_text();
        assert!(text.contains("lanrage_relay_parties 1\n"), "{text}");
        assert!(
            text.contains("lanrage_relay_registered_peers 3\n"),
            "{text}"
        );
    }

    #[test]
    fn state_reloads_from_records() {
        let r = relay(None);
        let (a, b) = (peer(), peer());
        let token_a = register(&r, &a, None).unwrap().token;
        let ca = r.authenticate(Some(&token_a)).unwrap();
        let cb = caller(&r, &b);
        let id = r
            .create_party(
                &ca,
                CreatePartyRequest {
                    name: "lan".into(),
                    ..Default::default()
                },
            )
            .unwrap()
            .party
            .id;
        r.join(&cb, id, JoinRequest::default()).unwrap();
        let s = r.open_session(&ca, id, cb.peer).unwrap();
        let records = std::mem::take(&mut r.core.lock().pending);
        let r2 = Relay::new(r.cfg.clone(), r.identity.clone());
        r2.load(&records);
        // Same tokens, same party, same session.
        assert_eq!(r2.authenticate(Some(&token_a)).unwrap().peer, ca.peer);
        assert_eq!(r2.peers(&ca, id).unwrap().peers.len(), 2);
        assert_eq!(
            r2.open_session(&cb, id, ca.peer).unwrap().session,
            s.session
        );
        assert_eq!(r2.table.lock().len(), 1);
        // Snapshotting r2 gives records that load into the same state again.
        let snap = Relay::snapshot(&r2.core.lock());
        let r3 = Relay::new(r.cfg.clone(), r.identity.clone());
        r3.load(&snap);
        assert_eq!(r3.peers(&cb, id).unwrap().peers.len(), 2);
        assert_eq!(r3.core.lock().tokens.len(), 2);
        assert_eq!(r3.table.lock().len(), 1);
    }
}
