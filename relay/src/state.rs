//! The relay's shared state and the operations the control plane performs on it, without HTTP:
//! the HTTP layer ([`crate::http`]) only parses requests and renders answers, so the auth and
//! membership rules are tested here directly.
//!
//! Two locks, always taken in this order when both are needed: `core` (registry, tokens,
//! challenges, rate limiters, per-source counts, pending journal records) and `table` (the UDP
//! session table, taken per forwarded datagram and otherwise only briefly). Anything that changes
//! which sessions exist (opening, leaving, sweeping) holds `core` while it touches `table`, so the
//! registry and the table never disagree about a session for longer than one such operation.
//! Diffie-Hellman happens outside `core`. No party password is checked here: the party's host
//! does (see `lanrage_proto::api`).
//!
//! Per-source limits count by [`source_key`] (IPv4 address or IPv6 /64): live tokens, outstanding
//! challenges, live parties and sessions. Behind a reverse proxy every client has
//! the proxy's address; see `relay/OPERATOR.md`.
//!
//! Changes wait in `Core::pending` until the store thread commits them ([`crate::server::Flusher`]).
//! What waits is bounded: every request that would add records (register, refresh, create, join,
//! publishing a roster, leave, a heartbeat that changes endpoints, opening a session) is refused with 503 while a
//! write has failed and waits to be retried ([`Saving`]; the disk is full, say) or while
//! `store.max_unsaved_records` changes wait. Expiry (the sweep) is never refused: it only removes
//! things, so while requests are refused it adds at most one record per thing that exists.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use lanrage_proto::api::{
    ChallengeRequest, ChallengeResponse, CreatePartyRequest, HeartbeatResponse, JoinRequest,
    PartyInfo, PartyView, PeersResponse, RegisterRequest, RelayInfo, RelaysResponse, RosterRequest,
    SessionResponse, Signal, TokenResponse,
};
use lanrage_proto::auth::{SharedKey, CHALLENGE_LEN};
use lanrage_proto::ids::{PartyId, PeerId, PublicKey, SessionId};
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::challenge::{ChallengeError, Challenges};
use crate::config::Config;
use crate::identity::Identity;
use crate::metrics::{Gauges, Metrics};
use crate::ratelimit::{source_key, KeyedLimiter};
use crate::registry::{NewParty, Registry, RegistryError, RegistryLimits};
use crate::sessions::{SessionLimits, SessionTable};
use crate::store::Record;
use crate::stun::{Layout, StunLimiter, StunResponder};
use crate::tokens::{
    access_generation, hash_token, Generation, TokenError, TokenHash, TokenLimits, TokenStore,
};

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

    /// 429 for a per-source cap on live things (tokens, challenges, parties, sessions): they
    /// go away by themselves, so retrying later helps.
    fn source_cap(message: impl Into<String>, retry_after: u64) -> Self {
        ApiError {
            status: 429,
            message: message.into(),
            retry_after: Some(retry_after),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match e {
            RegistryError::Invalid(_) => 400,
            RegistryError::Forbidden(_) => 403,
            RegistryError::NotFound(_) => 404,
            RegistryError::Full(_) | RegistryError::Conflict(_) => 409,
        };
        ApiError {
            status,
            message: e.to_string(),
            retry_after: None,
        }
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Unknown | TokenError::Expired | TokenError::Revoked => {
                ApiError::new(401, e.to_string())
            }
            TokenError::Full => ApiError::new(409, e.to_string()),
            TokenError::SourceFull => ApiError::source_cap(e.to_string(), 60),
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

/// How many live things (parties, sessions) each source made, so one source cannot take a
/// relay-wide limit for itself. Not persisted: after a restart, restored things count for nobody.
#[derive(Debug)]
pub struct PerSource<T> {
    max: usize,
    owner: HashMap<T, IpAddr>,
    counts: HashMap<IpAddr, usize>,
}

impl<T: Hash + Eq + Copy> PerSource<T> {
    /// At most `max` per source.
    pub fn new(max: usize) -> Self {
        PerSource {
            max,
            owner: HashMap::new(),
            counts: HashMap::new(),
        }
    }

    /// Whether `source` may make one more.
    pub fn has_room(&self, source: &IpAddr) -> bool {
        self.counts.get(source).copied().unwrap_or(0) < self.max
    }

    /// `item` was made by `source`.
    pub fn add(&mut self, item: T, source: IpAddr) {
        if self.owner.insert(item, source).is_none() {
            *self.counts.entry(source).or_default() += 1;
        }
    }

    /// `item` is gone.
    pub fn remove(&mut self, item: &T) {
        if let Some(source) = self.owner.remove(item) {
            if let Some(n) = self.counts.get_mut(&source) {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(&source);
                }
            }
        }
    }
}

/// Whether changes can be saved now: set by the store thread, read by every request that would
/// change state.
#[derive(Debug, Default)]
pub struct Saving {
    /// Why the last write failed, while its batch waits to be retried.
    pub failure: Option<String>,
    /// Records the store holds from failed writes.
    pub backlog: usize,
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
    /// Who created each live party.
    pub party_sources: PerSource<PartyId>,
    /// Who opened each live session.
    pub session_sources: PerSource<SessionId>,
    /// Changes not yet committed to the store.
    pub pending: Vec<Record>,
    /// Whether the store can save them.
    pub saving: Saving,
    shared: HashMap<PublicKey, SharedKey>,
}

impl Core {
    /// Runs `f` with the pending journal records (the borrow checker will not lend `pending`
    /// and the rest of `self` at once otherwise).
    fn journal<T>(&mut self, f: impl FnOnce(&mut Core, &mut Vec<Record>) -> T) -> T {
        let mut j = std::mem::take(&mut self.pending);
        let out = f(self, &mut j);
        self.pending = j;
        out
    }

    /// The registry dropped these sessions: forget who opened them.
    fn sessions_gone(&mut self, ids: &[SessionId]) {
        for id in ids {
            self.session_sources.remove(id);
        }
    }
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
    /// STUN answer budgets (per source and global).
    pub stun_limits: Mutex<StunLimiter>,
    /// One wake-up per member with a long poll waiting, so a signal wakes only its recipient.
    waiters: Mutex<HashMap<(PartyId, PeerId), Arc<Notify>>>,
    /// The access key's generation, when there is one (tokens of other generations cannot be
    /// refreshed).
    generation: Option<Generation>,
}

impl Relay {
    /// A relay with empty state.
    pub fn new(cfg: Config, identity: Identity) -> Self {
        let now = Instant::now();
        let layout = Layout::from_config(&cfg);
        let c = &cfg.control;
        let core = Core {
            registry: Registry::new(RegistryLimits::from(&cfg.parties), unix_now().1 / 1000),
            tokens: TokenStore::new(TokenLimits {
                ttl: c.token_ttl_secs,
                unaffiliated_ttl: c.unaffiliated_token_ttl_secs,
                max: c.max_tokens,
                max_per_source: c.max_tokens_per_ip,
            }),
            challenges: Challenges::new(
                Duration::from_secs(c.challenge_ttl_secs),
                MAX_CHALLENGES,
                c.max_challenges_per_ip,
            ),
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
            party_sources: PerSource::new(cfg.parties.max_parties_per_ip),
            session_sources: PerSource::new(cfg.relay.max_sessions_per_ip),
            pending: Vec::new(),
            saving: Saving::default(),
            shared: HashMap::new(),
        };
        let mut table = SessionTable::new(SessionLimits::from(&cfg.relay), now);
        table.set_own_addresses(
            layout
                .sockets
                .iter()
                .flat_map(|s| [s.bind, s.public])
                .collect::<Vec<_>>(),
        );
        Relay {
            stun: StunResponder::new(layout.clone()),
            stun_limits: Mutex::new(StunLimiter::new(
                cfg.udp.stun_per_source_per_sec,
                cfg.udp.stun_per_sec,
                now,
            )),
            layout,
            identity,
            core: Mutex::new(core),
            table: Mutex::new(table),
            metrics: Metrics::default(),
            waiters: Mutex::new(HashMap::new()),
            generation: access_generation(cfg.control.access_key.as_deref()),
            cfg,
        }
    }

    /// Refuses a request that would change state while changes cannot be saved (a failed write
    /// waits to be retried, or too many changes wait): 503 naming the cause, and counted.
    fn writable(&self, core: &Core) -> Result<(), ApiError> {
        let refused = if let Some(cause) = &core.saving.failure {
            ApiError {
                status: 503,
                message: format!("the relay cannot save state: {cause}; try again later"),
                retry_after: Some(10),
            }
        } else if core.pending.len() + core.saving.backlog >= self.cfg.store.max_unsaved_records {
            ApiError {
                status: 503,
                message: "the relay cannot save state fast enough; try again later".into(),
                retry_after: Some(1),
            }
        } else {
            return Ok(());
        };
        self.metrics.writes_refused.fetch_add(1, Ordering::Relaxed);
        Err(refused)
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
                } => core
                    .tokens
                    .insert(*hash, crate::tokens::TokenEntry::legacy(*key, *expires_at)),
                Record::TokenV2 {
                    hash,
                    key,
                    expires_at,
                    source,
                    generation,
                    provisional,
                } => core.tokens.insert(
                    *hash,
                    crate::tokens::TokenEntry {
                        key: *key,
                        expires_at: *expires_at,
                        source: *source,
                        generation: *generation,
                        provisional: *provisional,
                    },
                ),
                Record::TokenGone { hash } => core.tokens.remove(hash, &mut discard),
                other => core.registry.restore(other, now),
            }
        }
        core.journal(|core, j| {
            core.tokens.sweep(unix, j);
            let (empty, _) = core.registry.repair(j);
            if !empty.is_empty() {
                tracing::warn!(
                    parties = empty.len(),
                    "dropped parties without admitted members (left by a torn journal batch)"
                );
            }
        });
        let legacy = records
            .iter()
            .filter(|r| matches!(r, Record::Party { .. }))
            .count();
        if legacy > 0 {
            tracing::info!(
                records = legacy,
                "read parties stored by an older relay: their password verifiers are dropped (the party's host checks passwords), their members count as admitted and the earliest as host"
            );
        }
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
            // Restored unbound: binds captured before this start are worthless (each side's first
            // bind needs a cookie from this process).
            if table.insert(id, party, members, now).is_err() {
                core.journal(|core, j| core.registry.forget_session(&party, id, j));
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
        let r = self
            .core
            .lock()
            .ip_limiter
            .check(&source_key(ip), Instant::now());
        r.map_err(|wait| {
            self.metrics.limited_ip.fetch_add(1, Ordering::Relaxed);
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
            self.metrics.limited_token.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::limited(wait));
        }
        Ok(Caller {
            key,
            peer: PeerId::from_key(&key),
            token: hash,
        })
    }

    fn check_access_key(&self, given: Option<&str>) -> Result<(), ApiError> {
        if let Some(want) = &self.cfg.control.access_key {
            let given = given.unwrap_or("");
            if !constant_time_eq(given.as_bytes(), want.as_bytes()) {
                return Err(ApiError::new(
                    403,
                    "this relay needs an access key (access_key)",
                ));
            }
        }
        Ok(())
    }

    /// `POST /auth/challenge` from `ip`.
    pub fn challenge(
        &self,
        req: &ChallengeRequest,
        ip: IpAddr,
    ) -> Result<ChallengeResponse, ApiError> {
        self.check_access_key(req.access_key.as_deref())?;
        let c = self
            .core
            .lock()
            .challenges
            .issue(req.key, source_key(ip), Instant::now())
            .map_err(|e| match e {
                ChallengeError::SourceFull => {
                    ApiError::source_cap(e.to_string(), self.cfg.control.challenge_ttl_secs)
                }
                _ => ApiError::new(503, e.to_string()),
            })?;
        Ok(ChallengeResponse {
            challenge: B64.encode(c),
            relay_key: self.identity.public,
            expires_in_secs: self.cfg.control.challenge_ttl_secs,
        })
    }

    /// `POST /auth/register` from `ip`.
    pub fn register(&self, req: &RegisterRequest, ip: IpAddr) -> Result<TokenResponse, ApiError> {
        self.check_access_key(req.access_key.as_deref())?;
        let challenge: [u8; CHALLENGE_LEN] = B64
            .decode(&req.challenge)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| ApiError::new(400, "challenge must be 32 bytes of base64"))?;
        let proof = B64
            .decode(&req.proof)
            .map_err(|_| ApiError::new(400, "proof must be base64"))?;
        let mut core = self.core.lock();
        // Before the challenge is used up: the client may retry with it.
        self.writable(&core)?;
        core.challenges
            .take(&challenge, &req.key, Instant::now())
            .map_err(|e| match e {
                ChallengeError::Full | ChallengeError::SourceFull => {
                    ApiError::new(503, e.to_string())
                }
                _ => ApiError::new(401, e.to_string()),
            })?;
        drop(core);
        // Diffie-Hellman outside the lock.
        let shared = SharedKey::for_relay(&self.identity.secret, &req.key)
            .ok_or_else(|| ApiError::new(400, "weak key"))?;
        if !shared.verify_register_proof(&challenge, &req.key, &proof) {
            return Err(ApiError::new(401, "proof does not match the key"));
        }
        let (unix, _) = unix_now();
        let mut core = self.core.lock();
        self.writable(&core)?;
        let affiliated = core.registry.in_any_party(&PeerId::from_key(&req.key));
        let generation = self.generation;
        let issued = core.journal(|core, j| {
            core.tokens
                .issue(req.key, source_key(ip), generation, affiliated, unix, j)
        });
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
        self.writable(&core)?;
        let affiliated = core.registry.in_any_party(&caller.peer);
        let generation = self.generation;
        let (token, expires_at) = core.journal(|core, j| {
            core.tokens
                .refresh(&caller.token, generation, affiliated, unix, j)
        })?;
        Ok(TokenResponse {
            token,
            peer: caller.peer,
            expires_at,
            expires_in_secs: expires_at - unix,
        })
    }

    /// Drops sessions the registry ended from the UDP table and the per-source counts (call
    /// with `core` held: the lock order).
    fn end_sessions(&self, core: &mut Core, ended: &[SessionId]) {
        if ended.is_empty() {
            return;
        }
        core.sessions_gone(ended);
        let mut table = self.table.lock();
        for id in ended {
            table.remove(id);
        }
    }

    /// `POST /parties` from `ip`: a new party with the caller as its host, or (same id, same
    /// host) an update of it.
    pub fn create_party(
        &self,
        caller: &Caller,
        req: CreatePartyRequest,
        ip: IpAddr,
    ) -> Result<PartyView, ApiError> {
        let source = source_key(ip);
        let new = NewParty {
            id: req.id,
            name: req.name,
            protected: req.protected,
            peer_name: req.peer_name,
            endpoints: req.endpoints,
        };
        let (unix, _) = unix_now();
        let mut core = self.core.lock();
        self.writable(&core)?;
        let exists = new.id.is_some_and(|id| core.registry.contains(&id));
        if !exists && !core.party_sources.has_room(&source) {
            return Err(ApiError::source_cap(
                "too many parties created from your address (parties.max_parties_per_ip)",
                60,
            ));
        }
        let created = core.journal(|core, j| {
            let created = core
                .registry
                .create(caller.key, new, Instant::now(), unix, j)?;
            core.tokens.affiliate(&caller.key, unix, j);
            Ok::<_, RegistryError>(created)
        })?;
        if created.new {
            core.party_sources.add(created.view.party.id, source);
        }
        Ok(created.view)
    }

    /// `POST /parties/{id}/join`: the caller becomes an applicant (or updates itself).
    pub fn join(
        &self,
        caller: &Caller,
        party: PartyId,
        req: JoinRequest,
    ) -> Result<PartyView, ApiError> {
        let (unix, _) = unix_now();
        let mut core = self.core.lock();
        self.writable(&core)?;
        let (view, ended) = core.journal(|core, j| {
            let out = core.registry.join(
                caller.key,
                &party,
                req.peer_name,
                req.endpoints,
                Instant::now(),
                unix,
                j,
            )?;
            core.tokens.affiliate(&caller.key, unix, j);
            Ok::<_, RegistryError>(out)
        })?;
        self.end_sessions(&mut core, &ended);
        Ok(view)
    }

    /// `PUT /parties/{id}/roster`: the host (or its successor) publishes who is admitted.
    pub fn publish_roster(
        &self,
        caller: &Caller,
        party: PartyId,
        req: RosterRequest,
    ) -> Result<PartyView, ApiError> {
        let mut core = self.core.lock();
        self.writable(&core)?;
        let (view, ended) = core.journal(|core, j| {
            core.registry.publish(
                &caller.peer,
                &party,
                req.version,
                &req.members,
                Instant::now(),
                j,
            )
        })?;
        self.end_sessions(&mut core, &ended);
        Ok(view)
    }

    /// `DELETE /parties/{id}/peers/{peer}`.
    pub fn leave(&self, caller: &Caller, party: PartyId, peer: PeerId) -> Result<(), ApiError> {
        let mut core = self.core.lock();
        self.writable(&core)?;
        let ended = core.journal(|core, j| core.registry.leave(&caller.peer, &party, &peer, j))?;
        if !core.registry.contains(&party) {
            core.party_sources.remove(&party);
        }
        self.end_sessions(&mut core, &ended);
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
        let now = Instant::now();
        let mut core = self.core.lock();
        let changes = endpoints
            .as_deref()
            .is_some_and(|e| core.registry.endpoints_differ(&party, &peer, e));
        if changes && caller.peer == peer {
            if let Err(e) = self.writable(&core) {
                // The member stays in the party (the relay's disk is not its fault); only the
                // change is refused, and its signals wait for a heartbeat that gets through.
                core.registry.touch(&party, &peer, now);
                return Err(e);
            }
        }
        core.journal(|core, j| {
            core.registry
                .heartbeat(&caller.peer, &party, &peer, endpoints, now, j)
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
        self.signal_with_nat(caller, party, to, endpoints, nonce, None)
    }

    /// [`Relay::signal`] carrying the sender's NAT.
    pub fn signal_with_nat(
        &self,
        caller: &Caller,
        party: PartyId,
        to: PeerId,
        endpoints: Vec<std::net::SocketAddr>,
        nonce: u64,
        nat: Option<lanrage_proto::api::NatInfo>,
    ) -> Result<(), ApiError> {
        self.core.lock().registry.signal_with_nat(
            &caller.peer,
            &party,
            &to,
            endpoints,
            nonce,
            nat,
            Instant::now(),
        )?;
        // Wake the recipient's long poll only: one shared wake-up for every poll would make each
        // signal cost every waiting connection a lock and an inbox check.
        let waiter = self.waiters.lock().get(&(party, to)).cloned();
        if let Some(n) = waiter {
            n.notify_waiters();
        }
        Ok(())
    }

    /// The wake-up a member's long poll waits on (made on first use, dropped by the sweep when
    /// nobody waits any more). Call only for a verified member, so strangers cannot grow the map.
    pub fn waiter(&self, party: PartyId, peer: PeerId) -> Arc<Notify> {
        self.waiters
            .lock()
            .entry((party, peer))
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    /// Signals waiting for the caller (no waiting; see the HTTP long poll).
    pub fn take_signals(&self, caller: &Caller, party: PartyId) -> Result<Vec<Signal>, ApiError> {
        Ok(self
            .core
            .lock()
            .registry
            .take_signals(&caller.peer, &party, Instant::now())?)
    }

    /// `POST /parties/{id}/sessions` from `ip`.
    pub fn open_session(
        &self,
        caller: &Caller,
        party: PartyId,
        other: PeerId,
        ip: IpAddr,
    ) -> Result<SessionResponse, ApiError> {
        let source = source_key(ip);
        let now = Instant::now();
        let mut core = self.core.lock();
        self.writable(&core)?;
        let (id, a, b, existed) = core.journal(|core, j| {
            core.registry
                .session(&caller.peer, &party, &other, SessionId::random(), j)
        })?;
        if !existed && !core.session_sources.has_room(&source) {
            core.journal(|core, j| core.registry.forget_session(&party, id, j));
            return Err(ApiError::source_cap(
                "too many relay sessions opened from your address (relay.max_sessions_per_ip)",
                60,
            ));
        }
        // A session the registry knows but the table dropped (a full table at load) is put back
        // rather than handed out dead.
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
                core.journal(|core, j| core.registry.forget_session(&party, id, j));
                core.sessions_gone(&[id]);
                return Err(ApiError::new(409, e.to_string()));
            }
        }
        if !existed {
            core.session_sources.add(id, source);
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
                applicants: core.registry.applicant_count(),
                unsaved: core.pending.len() + core.saving.backlog,
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

    /// Periodic cleanup: idle sessions, silent members, empty parties, expired tokens and
    /// challenges, idle rate-limit buckets, wake-ups nobody waits on.
    ///
    /// Holds `core` throughout and takes `table` inside it (the lock order): if the table were
    /// swept first, an `open_session` between the two steps could put an idle session back into
    /// the table just before the registry forgot it, and the pair's next request would get a
    /// different session than the one its peer is bound to.
    pub fn sweep(&self, now: Instant) {
        let (unix, _) = unix_now();
        let mut core = self.core.lock();
        let idle = self.table.lock().sweep(now);
        let swept = core.journal(|core, j| {
            for (id, party) in &idle {
                core.registry.forget_session(party, *id, j);
            }
            let swept = core.registry.sweep(now, j);
            core.tokens.sweep(unix, j);
            swept
        });
        let idle_ids: Vec<SessionId> = idle.iter().map(|(id, _)| *id).collect();
        core.sessions_gone(&idle_ids);
        core.sessions_gone(&swept.sessions);
        for party in &swept.parties {
            core.party_sources.remove(party);
        }
        core.challenges.sweep(now);
        core.ip_limiter.sweep(now);
        core.token_limiter.sweep(now);
        if !swept.sessions.is_empty() {
            let mut table = self.table.lock();
            for id in &swept.sessions {
                table.remove(id);
            }
        }
        drop(core);
        self.waiters.lock().retain(|_, n| Arc::strong_count(n) > 1);
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
    use lanrage_proto::frame::{encode_bind, Bind, Frame};
    use x25519_dalek::StaticSecret;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    fn config(access_key: Option<&str>) -> Config {
        let mut cfg = Config::default();
        cfg.udp.listen = vec!["127.0.0.1:3478".parse().unwrap()];
        cfg.control.access_key = access_key.map(str::to_string);
        cfg.control.token_rate_per_sec = 1000;
        cfg.control.token_burst = 1000;
        cfg
    }

    fn relay_with(cfg: Config) -> Relay {
        Relay::new(
            cfg,
            Identity::from_secret(StaticSecret::random_from_rng(rand::rngs::OsRng)),
        )
    }

    fn relay(access_key: Option<&str>) -> Relay {
        relay_with(config(access_key))
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

    fn register_from(
        r: &Relay,
        p: &Peer,
        access_key: Option<&str>,
        ip: IpAddr,
    ) -> Result<TokenResponse, ApiError> {
        let req = ChallengeRequest {
            key: p.key,
            access_key: access_key.map(str::to_string),
        };
        let ch = r.challenge(&req, ip)?;
        let raw: [u8; 32] = B64.decode(&ch.challenge).unwrap().try_into().unwrap();
        let proof = SharedKey::for_peer(&p.secret, &ch.relay_key)
            .unwrap()
            .register_proof(&raw, &p.key);
        r.register(
            &RegisterRequest {
                key: p.key,
                challenge: ch.challenge,
                proof: B64.encode(proof),
                access_key: access_key.map(str::to_string),
            },
            ip,
        )
    }

    fn register(r: &Relay, p: &Peer, access_key: Option<&str>) -> Result<TokenResponse, ApiError> {
        register_from(r, p, access_key, IP)
    }

    fn caller(r: &Relay, p: &Peer) -> Caller {
        let t = register(r, p, None).unwrap();
        r.authenticate(Some(&t.token)).unwrap()
    }

    fn open(name: &str) -> CreatePartyRequest {
        CreatePartyRequest {
            name: name.into(),
            ..Default::default()
        }
    }

    /// The host publishes `members` (and itself) as admitted.
    fn admit(r: &Relay, host: &Caller, party: PartyId, version: u64, members: &[&Caller]) {
        let mut list: Vec<PeerId> = members.iter().map(|c| c.peer).collect();
        list.push(host.peer);
        r.publish_roster(
            host,
            party,
            RosterRequest {
                version,
                members: list,
            },
        )
        .unwrap();
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
        let ch = r
            .challenge(
                &ChallengeRequest {
                    key: alice.key,
                    access_key: None,
                },
                IP,
            )
            .unwrap();
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
        assert_eq!(r.register(&req, IP).unwrap_err().status, 401);
        // The challenge was used up by the failed try.
        let good = SharedKey::for_peer(&alice.secret, &ch.relay_key)
            .unwrap()
            .register_proof(&raw, &alice.key);
        let req = RegisterRequest {
            proof: B64.encode(good),
            ..req
        };
        assert_eq!(r.register(&req, IP).unwrap_err().status, 401);
        assert_eq!(r.authenticate(None).unwrap_err().status, 401);
        assert_eq!(r.authenticate(Some("garbage")).unwrap_err().status, 401);
        let bad = RegisterRequest {
            key: alice.key,
            challenge: "!!".into(),
            proof: "AA==".into(),
            access_key: None,
        };
        assert_eq!(r.register(&bad, IP).unwrap_err().status, 400);
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
    fn challenges_need_the_access_key_too_and_are_capped_per_source() {
        let mut cfg = config(Some("0123456789abcdef-secret"));
        cfg.control.max_challenges_per_ip = 3;
        let r = relay_with(cfg);
        let ask = |key: Option<&str>, ip: IpAddr| {
            r.challenge(
                &ChallengeRequest {
                    key: peer().key,
                    access_key: key.map(str::to_string),
                },
                ip,
            )
        };
        // Strangers cannot even fill the challenge table.
        assert_eq!(ask(None, IP).unwrap_err().status, 403);
        assert_eq!(ask(Some("wrong-wrong-wrong"), IP).unwrap_err().status, 403);
        assert_eq!(r.core.lock().challenges.len(), 0);
        for _ in 0..3 {
            ask(Some("0123456789abcdef-secret"), IP).unwrap();
        }
        let e = ask(Some("0123456789abcdef-secret"), IP).unwrap_err();
        assert_eq!((e.status, e.retry_after.is_some()), (429, true));
        // Per source: another address (or another IPv6 /64) is not affected; the same /64 is.
        let v6a: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:0:1::2".parse().unwrap();
        for _ in 0..3 {
            ask(Some("0123456789abcdef-secret"), v6a).unwrap();
        }
        assert_eq!(
            ask(Some("0123456789abcdef-secret"), v6b)
                .unwrap_err()
                .status,
            429
        );
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
        r.core
            .lock()
            .tokens
            .insert(hash, crate::tokens::TokenEntry::legacy(p.key, 1));
        assert_eq!(r.authenticate(Some(&t2.token)).unwrap_err().status, 401);
    }

    #[test]
    fn one_source_cannot_fill_the_token_table_or_lock_out_refresh() {
        let mut cfg = config(None);
        cfg.control.max_tokens = 6;
        cfg.control.max_tokens_per_ip = 4;
        let r = relay_with(cfg);
        let other: IpAddr = "198.51.100.7".parse().unwrap();
        let victim = register_from(&r, &peer(), None, other).unwrap();
        // An attacker with fresh keys gets four tokens from its address, then 429.
        for _ in 0..4 {
            register(&r, &peer(), None).unwrap();
        }
        let e = register(&r, &peer(), None).unwrap_err();
        assert_eq!((e.status, e.retry_after), (429, Some(60)));
        // Others can still register until the table is full...
        register_from(&r, &peer(), None, "198.51.100.8".parse().unwrap()).unwrap();
        assert_eq!(
            register_from(&r, &peer(), None, "198.51.100.9".parse().unwrap())
                .unwrap_err()
                .status,
            409
        );
        // ...and a full table never stops a peer that has a token from refreshing it.
        let mut token = victim.token;
        for _ in 0..3 {
            let c = r.authenticate(Some(&token)).unwrap();
            token = r.refresh(&c).unwrap().token;
        }
        assert!(r.authenticate(Some(&token)).is_ok());
    }

    #[test]
    fn tokens_of_keys_in_no_party_are_short_until_they_join() {
        let mut cfg = config(None);
        cfg.control.token_ttl_secs = 86400;
        cfg.control.unaffiliated_token_ttl_secs = 600;
        let r = relay_with(cfg);
        let (a, b) = (peer(), peer());
        let ta = register(&r, &a, None).unwrap();
        assert!(ta.expires_in_secs <= 600);
        let ca = r.authenticate(Some(&ta.token)).unwrap();
        // Refreshing while in no party: still short.
        let ta = r.refresh(&ca).unwrap();
        assert!(ta.expires_in_secs <= 600);
        let ca = r.authenticate(Some(&ta.token)).unwrap();
        let id = r.create_party(&ca, open("lan"), IP).unwrap().party.id;
        let entry = *r.core.lock().tokens.entry(&ca.token).unwrap();
        assert!(entry.expires_at >= unix_now().0 + 86000, "{entry:?}");
        assert!(!entry.provisional);
        // Joining does the same; later registrations and refreshes are long from the start.
        let cb = caller(&r, &b);
        r.join(&cb, id, JoinRequest::default()).unwrap();
        assert!(r.core.lock().tokens.entry(&cb.token).unwrap().expires_at >= unix_now().0 + 86000);
        assert!(register(&r, &b, None).unwrap().expires_in_secs > 86000);
        assert!(r.refresh(&cb).unwrap().expires_in_secs > 86000);
    }

    #[test]
    fn changing_the_access_key_revokes_refresh() {
        let r = relay(Some("the-first-access-key"));
        let p = peer();
        let t = register(&r, &p, Some("the-first-access-key")).unwrap();
        let records = std::mem::take(&mut r.core.lock().pending);
        // Same state, same relay key, new access key.
        let r2 = relay_with(config(Some("the-second-access-key")));
        let r2 = Relay::new(r2.cfg.clone(), r.identity.clone());
        r2.load(&records);
        let c = r2.authenticate(Some(&t.token)).unwrap();
        assert_eq!(r2.refresh(&c).unwrap_err().status, 401);
        // The old relay (old key) still refreshes it.
        let c = r.authenticate(Some(&t.token)).unwrap();
        assert!(r.refresh(&c).is_ok());
    }

    #[test]
    fn party_auth_matrix() {
        let r = relay(None);
        let (a, b, c, d) = (peer(), peer(), peer(), peer());
        let (ca, cb, cc, cd) = (
            caller(&r, &a),
            caller(&r, &b),
            caller(&r, &c),
            caller(&r, &d),
        );
        let v = r
            .create_party(
                &ca,
                CreatePartyRequest {
                    name: "lan".into(),
                    protected: true,
                    ..Default::default()
                },
                IP,
            )
            .unwrap();
        let id = v.party.id;
        assert!(v.party.protected, "shown to joiners; checked by the host");
        // b and c join: applicants that see the host only.
        let vb = r.join(&cb, id, JoinRequest::default()).unwrap();
        assert_eq!(vb.peers.len(), 1);
        assert!(vb.peers[0].host && vb.peers[0].peer == ca.peer);
        r.join(&cc, id, JoinRequest::default()).unwrap();
        // Reading: applicants yes, strangers 403, unknown party 404.
        assert!(r.info(&cb, id).is_ok());
        assert_eq!(r.info(&cd, id).unwrap_err().status, 403);
        assert_eq!(r.peers(&cd, id).unwrap_err().status, 403);
        assert_eq!(r.info(&ca, PartyId([0; 10])).unwrap_err().status, 404);
        // Acting for another peer: 403.
        assert_eq!(r.leave(&cb, id, ca.peer).unwrap_err().status, 403);
        assert_eq!(r.heartbeat(&cb, id, ca.peer, None).unwrap_err().status, 403);
        assert_eq!(r.leave(&cd, id, ca.peer).unwrap_err().status, 403);
        // Applicants reach the host only.
        let ep = vec!["198.51.100.7:51820".parse().unwrap()];
        r.signal(&cb, id, ca.peer, ep.clone(), 5).unwrap();
        assert_eq!(
            r.signal(&cb, id, cc.peer, ep.clone(), 5)
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(
            r.open_session(&cb, id, cc.peer, IP).unwrap_err().status,
            403
        );
        let host_b = r.open_session(&cb, id, ca.peer, IP).unwrap();
        // Only the host publishes; then b is admitted and reaches admitted members.
        let roster = RosterRequest {
            version: 1,
            members: vec![ca.peer, cb.peer],
        };
        assert_eq!(
            r.publish_roster(&cb, id, roster.clone())
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(
            r.publish_roster(&cd, id, roster.clone())
                .unwrap_err()
                .status,
            403
        );
        let v = r.publish_roster(&ca, id, roster).unwrap();
        assert_eq!(v.party.members, 2);
        assert_eq!(v.peers.len(), 3, "the host sees the applicant c too");
        assert_eq!(r.peers(&cb, id).unwrap().peers.len(), 2, "b does not");
        // Sessions: strangers 403, unknown peers 404, a pair gets one session.
        assert_eq!(
            r.open_session(&cd, id, ca.peer, IP).unwrap_err().status,
            403
        );
        assert_eq!(
            r.open_session(&ca, id, cd.peer, IP).unwrap_err().status,
            404
        );
        assert_eq!(
            r.open_session(&cb, id, cc.peer, IP).unwrap_err().status,
            403
        );
        let s2 = r.open_session(&ca, id, cb.peer, IP).unwrap();
        assert_eq!(host_b.session, s2.session);
        assert_eq!(r.table.lock().len(), 1);
        assert_eq!(
            r.signal(&cd, id, ca.peer, ep.clone(), 5)
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
        assert!(text.contains("lanrage_relay_party_members 1\n"), "{text}");
        assert!(
            text.contains("lanrage_relay_party_applicants 1\n"),
            "{text}"
        );
        assert!(
            text.contains("lanrage_relay_registered_peers 4\n"),
            "{text}"
        );
        assert!(!text.contains("password"), "{text}");
    }

    #[test]
    fn a_demoted_member_loses_its_sessions_with_members_in_the_udp_table_too() {
        let r = relay(None);
        let (a, b, c) = (peer(), peer(), peer());
        let (ca, cb, cc) = (caller(&r, &a), caller(&r, &b), caller(&r, &c));
        let id = r.create_party(&ca, open("lan"), IP).unwrap().party.id;
        r.join(&cb, id, JoinRequest::default()).unwrap();
        r.join(&cc, id, JoinRequest::default()).unwrap();
        admit(&r, &ca, id, 1, &[&cb, &cc]);
        let bc = r.open_session(&cb, id, cc.peer, IP).unwrap().session;
        let ab = r.open_session(&ca, id, cb.peer, IP).unwrap().session;
        admit(&r, &ca, id, 2, &[&cc]);
        // b is an applicant again: its session with c is gone everywhere, the one with the host
        // stays (b can rejoin through it).
        let table = r.table.lock();
        assert!(!table.contains(&bc));
        assert!(table.contains(&ab));
        drop(table);
        assert_eq!(r.core.lock().registry.sessions().len(), 1);
        assert!(r
            .core
            .lock()
            .pending
            .contains(&Record::SessionGone { id: bc }));
    }

    #[test]
    fn create_with_the_clients_id_is_idempotent_for_its_host_only() {
        let mut cfg = config(None);
        cfg.parties.max_parties_per_ip = 1;
        let r = relay_with(cfg);
        let (ca, cb) = (caller(&r, &peer()), caller(&r, &peer()));
        let pid: PartyId = "k3m9-x2pq-7hvd-a8te".parse().unwrap();
        let req = |name: &str| CreatePartyRequest {
            id: Some(pid),
            name: name.into(),
            ..Default::default()
        };
        assert_eq!(r.create_party(&ca, req("lan"), IP).unwrap().party.id, pid);
        // Repeating it (a lost answer, a relay restart) neither fails nor counts as a second
        // party of this source (whose limit is one).
        let v = r.create_party(&ca, req("lan night"), IP).unwrap();
        assert_eq!((v.party.id, v.party.name.as_str()), (pid, "lan night"));
        assert_eq!(r.core.lock().registry.party_count(), 1);
        assert_eq!(
            r.create_party(&cb, req("mine"), IP).unwrap_err().status,
            409
        );
        let elsewhere: IpAddr = "198.51.100.3".parse().unwrap();
        assert_eq!(
            r.create_party(&cb, req("mine"), elsewhere)
                .unwrap_err()
                .status,
            409
        );
    }

    #[test]
    fn parties_and_sessions_per_source_are_capped() {
        let mut cfg = config(None);
        cfg.parties.max_parties_per_ip = 2;
        cfg.relay.max_sessions_per_ip = 1;
        let r = relay_with(cfg);
        let (a, b, c) = (
            caller(&r, &peer()),
            caller(&r, &peer()),
            caller(&r, &peer()),
        );
        let p1 = r.create_party(&a, open("one"), IP).unwrap().party.id;
        let p2 = r.create_party(&b, open("two"), IP).unwrap().party.id;
        let e = r.create_party(&c, open("three"), IP).unwrap_err();
        assert_eq!(e.status, 429);
        let elsewhere: IpAddr = "198.51.100.30".parse().unwrap();
        r.create_party(&c, open("three"), elsewhere).unwrap();
        // Leaving (the party empties and is deleted) gives the place back.
        r.leave(&b, p2, b.peer).unwrap();
        r.create_party(&b, open("two again"), IP).unwrap();
        r.join(&b, p1, JoinRequest::default()).unwrap();
        r.join(&c, p1, JoinRequest::default()).unwrap();
        admit(&r, &a, p1, 1, &[&b, &c]);
        r.open_session(&a, p1, b.peer, IP).unwrap();
        // The same session again is no new session; a new pair is.
        r.open_session(&b, p1, a.peer, IP).unwrap();
        assert_eq!(r.open_session(&a, p1, c.peer, IP).unwrap_err().status, 429);
        assert_eq!(r.table.lock().len(), 1);
        assert_eq!(
            r.core.lock().registry.sessions().len(),
            1,
            "not left behind"
        );
        r.open_session(&a, p1, c.peer, elsewhere).unwrap();
    }

    #[test]
    fn sweep_holds_core_before_it_touches_the_table() {
        // The race: the sweep takes an idle session out of the table, open_session (holding core)
        // puts it back, then the sweep makes the registry forget it; the pair ends up on two
        // sessions. Holding core while the sweep runs must keep the table untouched.
        let r = Arc::new(relay(None));
        let (a, b) = (caller(&r, &peer()), caller(&r, &peer()));
        let id = r.create_party(&a, open("lan"), IP).unwrap().party.id;
        r.join(&b, id, JoinRequest::default()).unwrap();
        let s = r.open_session(&a, id, b.peer, IP).unwrap().session;
        let core = r.core.lock();
        let sweeper = {
            let r = r.clone();
            std::thread::spawn(move || r.sweep(Instant::now() + Duration::from_secs(3600)))
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            r.table.lock().contains(&s),
            "the sweep changed the table before taking core"
        );
        drop(core);
        sweeper.join().unwrap();
        // Registry and table agree afterwards (both dropped it: it was idle and members silent).
        assert_eq!(
            r.table.lock().contains(&s),
            !r.core.lock().registry.sessions().is_empty()
        );
    }

    #[tokio::test]
    async fn a_signal_wakes_only_its_recipient() {
        let r = relay(None);
        let (a, b, c) = (
            caller(&r, &peer()),
            caller(&r, &peer()),
            caller(&r, &peer()),
        );
        let id = r.create_party(&a, open("lan"), IP).unwrap().party.id;
        r.join(&b, id, JoinRequest::default()).unwrap();
        r.join(&c, id, JoinRequest::default()).unwrap();
        {
            let (wa, wc) = (r.waiter(id, a.peer), r.waiter(id, c.peer));
            let (na, nc) = (wa.notified(), wc.notified());
            tokio::pin!(na);
            tokio::pin!(nc);
            na.as_mut().enable();
            nc.as_mut().enable();
            r.signal(&b, id, a.peer, vec![], 1).unwrap();
            tokio::time::timeout(Duration::from_secs(1), na)
                .await
                .expect("the recipient is woken");
            assert!(
                tokio::time::timeout(Duration::from_millis(100), nc)
                    .await
                    .is_err(),
                "another member was woken"
            );
        }
        // Nobody waits any more: the sweep forgets the wake-ups.
        r.sweep(Instant::now());
        assert!(r.waiters.lock().is_empty());
    }

    #[test]
    fn state_reloads_from_records() {
        let r = relay(None);
        let (a, b) = (peer(), peer());
        let token_a = register(&r, &a, None).unwrap().token;
        let ca = r.authenticate(Some(&token_a)).unwrap();
        let cb = caller(&r, &b);
        let id = r.create_party(&ca, open("lan"), IP).unwrap().party.id;
        r.join(&cb, id, JoinRequest::default()).unwrap();
        admit(&r, &ca, id, 1, &[&cb]);
        let s = r.open_session(&ca, id, cb.peer, IP).unwrap();
        let records = std::mem::take(&mut r.core.lock().pending);
        let r2 = Relay::new(r.cfg.clone(), r.identity.clone());
        r2.load(&records);
        // Same tokens, same party (host, admitted member), same session.
        assert_eq!(r2.authenticate(Some(&token_a)).unwrap().peer, ca.peer);
        assert_eq!(r2.peers(&ca, id).unwrap().peers.len(), 2);
        assert_eq!(
            r2.open_session(&cb, id, ca.peer, IP).unwrap().session,
            s.session
        );
        assert_eq!(r2.table.lock().len(), 1);
        // Snapshotting r2 gives records that load into the same state again.
        let snap = Relay::snapshot(&r2.core.lock());
        let r3 = Relay::new(r.cfg.clone(), r.identity.clone());
        r3.load(&snap);
        let peers = r3.peers(&cb, id).unwrap().peers;
        assert_eq!(
            peers
                .iter()
                .map(|m| (m.host, m.admitted))
                .collect::<Vec<_>>(),
            [(true, true), (false, true)]
        );
        assert_eq!(r3.info(&cb, id).unwrap().roster_version, 1);
        assert_eq!(r3.core.lock().tokens.len(), 2);
        assert_eq!(r3.table.lock().len(), 1);
    }

    #[test]
    fn while_changes_cannot_be_saved_heartbeats_keep_members_but_not_new_endpoints() {
        let r = relay(None);
        let (a, b) = (peer(), peer());
        let (ca, cb) = (caller(&r, &a), caller(&r, &b));
        let id = r.create_party(&ca, open("lan"), IP).unwrap().party.id;
        r.core.lock().pending.clear();
        r.core.lock().saving.failure = Some("disk full".into());
        let moved: Vec<std::net::SocketAddr> = vec!["198.51.100.1:5000".parse().unwrap()];
        // Staying alive changes nothing stored: fine.
        r.heartbeat(&ca, id, ca.peer, None).unwrap();
        // New endpoints would: refused, and not taken.
        let e = r
            .heartbeat(&ca, id, ca.peer, Some(moved.clone()))
            .unwrap_err();
        assert_eq!(
            (e.status, e.message.as_str()),
            (
                503,
                "the relay cannot save state: disk full; try again later"
            )
        );
        assert!(r.peers(&ca, id).unwrap().peers[0].endpoints.is_empty());
        // So are joins and leaving.
        assert_eq!(
            r.join(&cb, id, JoinRequest::default()).unwrap_err().status,
            503
        );
        assert_eq!(r.leave(&ca, id, ca.peer).unwrap_err().status, 503);
        assert!(r.core.lock().pending.is_empty());
        // Saving works again: all of it goes through.
        r.core.lock().saving.failure = None;
        r.heartbeat(&ca, id, ca.peer, Some(moved.clone())).unwrap();
        assert_eq!(r.peers(&ca, id).unwrap().peers[0].endpoints, moved);
        r.join(&cb, id, JoinRequest::default()).unwrap();
        assert!(!r.core.lock().pending.is_empty());
    }

    #[test]
    fn restored_sessions_take_no_bind_captured_before_the_restart() {
        let r = relay(None);
        let (a, b) = (peer(), peer());
        let (ca, cb) = (caller(&r, &a), caller(&r, &b));
        let id = r.create_party(&ca, open("lan"), IP).unwrap().party.id;
        r.join(&cb, id, JoinRequest::default()).unwrap();
        let s = r.open_session(&ca, id, cb.peer, IP).unwrap().session;
        let key = SharedKey::for_peer(&a.secret, &r.identity.public)
            .unwrap()
            .bind_key(s);
        let from = "198.51.100.1:4000".parse().unwrap();
        let encode = |counter: u64, cookie: Option<&[u8; 16]>| {
            let mut buf = [0u8; 80];
            let bind = Bind {
                session: s,
                peer: ca.peer,
                counter,
            };
            let n = encode_bind(&bind, cookie, &key, &mut buf).unwrap();
            buf[..n].to_vec()
        };
        let mut out = [0u8; 64];
        // Bind through the challenge, as a client does; someone captures the accepted bind.
        let handle = |r: &Relay, f: &[u8], out: &mut [u8; 64]| {
            r.table.lock().handle(Instant::now(), 0, from, f, out)
        };
        let challenge = |v: crate::sessions::Verdict, out: &[u8; 64]| {
            let crate::sessions::Verdict::Drop {
                hint: Some(len), ..
            } = v
            else {
                panic!("{v:?}")
            };
            match lanrage_proto::frame::decode(&out[..len]) {
                Ok(Frame::Challenge(c)) => c.cookie,
                other => panic!("{other:?}"),
            }
        };
        let cookie = challenge(handle(&r, &encode(1, None), &mut out), &out);
        let captured = encode(2, Some(&cookie));
        assert!(matches!(
            handle(&r, &captured, &mut out),
            crate::sessions::Verdict::Reply { .. }
        ));
        let records = std::mem::take(&mut r.core.lock().pending);
        let r2 = Relay::new(r.cfg.clone(), r.identity.clone());
        r2.load(&records);
        // After the restart the captured bind, even from the address it was made at, only gets
        // a challenge...
        let v = handle(&r2, &captured, &mut out);
        assert!(matches!(
            v,
            crate::sessions::Verdict::Drop {
                reason: crate::sessions::DropReason::BadCookie,
                hint: Some(_)
            }
        ));
        let cookie = challenge(v, &out);
        assert_eq!(r2.table.lock().active(), 0);
        assert_eq!(r2.table.lock().stats.binds, 0);
        // ...which the peer itself answers, counting from wherever it likes.
        assert!(matches!(
            handle(&r2, &encode(1, Some(&cookie)), &mut out),
            crate::sessions::Verdict::Reply { .. }
        ));
    }

    #[test]
    fn load_drops_parties_left_empty_by_a_torn_batch() {
        let r = relay(None);
        let records = vec![Record::Party {
            id: PartyId([3; 10]),
            name: "torn".into(),
            verifier: None,
            created_at: 0,
        }];
        r.load(&records);
        assert_eq!(r.core.lock().registry.party_count(), 0);
        assert!(r.core.lock().pending.contains(&Record::PartyGone {
            id: PartyId([3; 10])
        }));
    }
}
