//! Bearer tokens: 256 random bits handed to a peer that proved its key, bound to that key, with
//! an expiry. The relay keeps only BLAKE2s(token), so a leaked state directory holds no usable
//! token. Times are Unix seconds because tokens survive restarts.
//!
//! Capacity and who may fill it:
//! - Registration needs only a key anyone can make, so the table could be filled by one client
//!   making keys. Three things stop that: a key in no party gets a token with the short
//!   `unaffiliated` lifetime (made long when the key joins or creates a party, see
//!   [`TokenStore::affiliate`]); each source (IPv4 address or IPv6 /64, see
//!   [`crate::ratelimit::source_key`]) holds at most `max_per_source` live tokens; and the whole
//!   table holds at most `max`.
//! - Refresh replaces a token in place: it never fails for capacity, so a full table (whoever
//!   filled it) never locks out peers that already have a token. The old token keeps working for
//!   [`REFRESH_GRACE_SECS`] (requests in flight with it still work).
//! - Each peer holds at most [`MAX_PER_PEER`] tokens; a new one evicts the one expiring first.
//!
//! Revocation: every token remembers the access-key generation it was registered under
//! ([`access_generation`]); when the operator changes `control.access_key`, refresh refuses
//! tokens of older generations, so they run out within their lifetime.
//!
//! Every change is appended to the caller's journal.

use std::collections::HashMap;
use std::net::IpAddr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use blake2::{Blake2s256, Digest};
use lanrage_proto::ids::PublicKey;

use crate::store::Record;

/// How long a refreshed-away token keeps working.
pub const REFRESH_GRACE_SECS: u64 = 30;
/// Most live tokens per peer key.
pub const MAX_PER_PEER: usize = 8;

/// A token's hash: the map key and what is stored.
pub type TokenHash = [u8; 32];

/// Which access key a token was registered under: 8 bytes of a hash of it (`None`: the relay
/// had none). A hash, not the key, is what the state directory holds.
pub type Generation = [u8; 8];

/// The generation of `access_key` (`None` when the relay has no access key).
pub fn access_generation(access_key: Option<&str>) -> Option<Generation> {
    access_key.map(|k| {
        let d = Blake2s256::new_with_prefix(b"lanrage relay access key generation")
            .chain_update(k.as_bytes())
            .finalize();
        let mut g = [0u8; 8];
        g.copy_from_slice(&d[..8]);
        g
    })
}

/// Why a token was not accepted or issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token we issued (or malformed, or revoked).
    #[error("unknown token")]
    Unknown,
    /// Issued by us but past its expiry.
    #[error("token expired")]
    Expired,
    /// `control.max_tokens` reached.
    #[error("too many tokens")]
    Full,
    /// `control.max_tokens_per_ip` reached for the caller's source.
    #[error("too many tokens registered from your address; try again later")]
    SourceFull,
    /// Registered under an access key the relay no longer has.
    #[error("the relay's access key changed; register again")]
    Revoked,
}

/// A live token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenEntry {
    /// The key it acts as.
    pub key: PublicKey,
    /// Unix seconds.
    pub expires_at: u64,
    /// Source it was registered from (an IPv4 address or IPv6 /64), if known.
    pub source: Option<IpAddr>,
    /// Access-key generation it was registered under.
    pub generation: Option<Generation>,
    /// Short-lived until its key joins a party.
    pub provisional: bool,
}

impl TokenEntry {
    /// An entry as old journals describe it (no source, no generation, full lifetime).
    pub fn legacy(key: PublicKey, expires_at: u64) -> Self {
        TokenEntry {
            key,
            expires_at,
            source: None,
            generation: None,
            provisional: false,
        }
    }

    fn record(&self, hash: TokenHash) -> Record {
        Record::TokenV2 {
            hash,
            key: self.key,
            expires_at: self.expires_at,
            source: self.source,
            generation: self.generation,
            provisional: self.provisional,
        }
    }
}

/// Lifetimes and caps, from `[control]`.
#[derive(Clone, Copy, Debug)]
pub struct TokenLimits {
    /// Lifetime of a token whose key is in a party.
    pub ttl: u64,
    /// Lifetime of a token whose key is in no party (at most `ttl`).
    pub unaffiliated_ttl: u64,
    /// Most tokens.
    pub max: usize,
    /// Most tokens per source.
    pub max_per_source: usize,
}

/// All live tokens.
#[derive(Debug)]
pub struct TokenStore {
    limits: TokenLimits,
    by_hash: HashMap<TokenHash, TokenEntry>,
    by_key: HashMap<PublicKey, Vec<TokenHash>>,
    per_source: HashMap<IpAddr, usize>,
}

/// The hash under which a token's text is stored, or `None` if it cannot be one of ours.
pub fn hash_token(text: &str) -> Option<TokenHash> {
    let raw = B64URL.decode(text.trim()).ok()?;
    if raw.len() != 32 {
        return None;
    }
    Some(
        Blake2s256::new_with_prefix(b"lanrage relay token")
            .chain_update(&raw)
            .finalize()
            .into(),
    )
}

fn new_token() -> Result<(String, TokenHash), TokenError> {
    let raw: [u8; 32] = rand::random();
    let text = B64URL.encode(raw);
    let hash = hash_token(&text).ok_or(TokenError::Unknown)?;
    Ok((text, hash))
}

impl TokenStore {
    /// An empty store.
    pub fn new(limits: TokenLimits) -> Self {
        TokenStore {
            limits: TokenLimits {
                unaffiliated_ttl: limits.unaffiliated_ttl.min(limits.ttl),
                ..limits
            },
            by_hash: HashMap::new(),
            by_key: HashMap::new(),
            per_source: HashMap::new(),
        }
    }

    fn lifetime(&self, affiliated: bool) -> u64 {
        if affiliated {
            self.limits.ttl
        } else {
            self.limits.unaffiliated_ttl
        }
    }

    /// A new token for `key`, registered from `source` (a [`crate::ratelimit::source_key`])
    /// under access-key `generation`; `affiliated` says whether the key is in a party (else the
    /// token is short-lived). Returns its text and expiry.
    pub fn issue(
        &mut self,
        key: PublicKey,
        source: IpAddr,
        generation: Option<Generation>,
        affiliated: bool,
        now: u64,
        journal: &mut Vec<Record>,
    ) -> Result<(String, u64), TokenError> {
        if self.per_source.get(&source).copied().unwrap_or(0) >= self.limits.max_per_source {
            self.sweep(now, journal);
            if self.per_source.get(&source).copied().unwrap_or(0) >= self.limits.max_per_source {
                return Err(TokenError::SourceFull);
            }
        }
        let held = self.by_key.get(&key).map_or(0, Vec::len);
        if held >= MAX_PER_PEER {
            self.evict_oldest(&key, None, journal);
        } else if self.by_hash.len() >= self.limits.max {
            self.sweep(now, journal);
            if self.by_hash.len() >= self.limits.max {
                return Err(TokenError::Full);
            }
        }
        let (text, hash) = new_token()?;
        let entry = TokenEntry {
            key,
            expires_at: now + self.lifetime(affiliated),
            source: Some(source),
            generation,
            provisional: !affiliated,
        };
        self.insert(hash, entry);
        journal.push(entry.record(hash));
        Ok((text, entry.expires_at))
    }

    fn evict_oldest(&mut self, key: &PublicKey, keep: Option<&TokenHash>, j: &mut Vec<Record>) {
        let oldest = self.by_key.get(key).and_then(|hs| {
            hs.iter()
                .filter(|h| Some(*h) != keep)
                .min_by_key(|h| self.by_hash.get(*h).map(|e| e.expires_at))
                .copied()
        });
        if let Some(h) = oldest {
            self.remove(&h, j);
        }
    }

    /// Restores a stored token (load), or replaces one with the same hash.
    pub fn insert(&mut self, hash: TokenHash, entry: TokenEntry) {
        if let Some(old) = self.by_hash.insert(hash, entry) {
            self.uncount(&old.source);
            if old.key != entry.key {
                self.unindex(&old.key, &hash);
                self.by_key.entry(entry.key).or_default().push(hash);
            }
        } else {
            self.by_key.entry(entry.key).or_default().push(hash);
        }
        if let Some(s) = entry.source {
            *self.per_source.entry(s).or_default() += 1;
        }
    }

    fn uncount(&mut self, source: &Option<IpAddr>) {
        if let Some(s) = source {
            if let Some(n) = self.per_source.get_mut(s) {
                *n -= 1;
                if *n == 0 {
                    self.per_source.remove(s);
                }
            }
        }
    }

    fn unindex(&mut self, key: &PublicKey, hash: &TokenHash) {
        if let Some(list) = self.by_key.get_mut(key) {
            list.retain(|h| h != hash);
            if list.is_empty() {
                self.by_key.remove(key);
            }
        }
    }

    /// Forgets a token.
    pub fn remove(&mut self, hash: &TokenHash, journal: &mut Vec<Record>) {
        if let Some(e) = self.by_hash.remove(hash) {
            self.unindex(&e.key, hash);
            self.uncount(&e.source);
            journal.push(Record::TokenGone { hash: *hash });
        }
    }

    /// Which key a presented token acts as.
    pub fn check(&self, hash: &TokenHash, now: u64) -> Result<PublicKey, TokenError> {
        match self.by_hash.get(hash) {
            None => Err(TokenError::Unknown),
            Some(e) if e.expires_at <= now => Err(TokenError::Expired),
            Some(e) => Ok(e.key),
        }
    }

    /// Replaces a valid token with a new one for the same key, source and generation, without
    /// any capacity check (it takes the old one's place; the old one works for
    /// [`REFRESH_GRACE_SECS`] more). `required` is the relay's current access-key generation when
    /// it has an access key: a token from another generation is refused ([`TokenError::Revoked`]).
    pub fn refresh(
        &mut self,
        hash: &TokenHash,
        required: Option<Generation>,
        affiliated: bool,
        now: u64,
        journal: &mut Vec<Record>,
    ) -> Result<(String, u64), TokenError> {
        self.check(hash, now)?;
        let old = *self.by_hash.get(hash).ok_or(TokenError::Unknown)?;
        if required.is_some() && old.generation != required {
            return Err(TokenError::Revoked);
        }
        let (text, new_hash) = new_token()?;
        let entry = TokenEntry {
            expires_at: now + self.lifetime(affiliated),
            provisional: !affiliated,
            ..old
        };
        self.insert(new_hash, entry);
        journal.push(entry.record(new_hash));
        let shortened = old.expires_at.min(now + REFRESH_GRACE_SECS);
        if shortened != old.expires_at {
            let retired = TokenEntry {
                expires_at: shortened,
                provisional: false,
                ..old
            };
            self.insert(*hash, retired);
            journal.push(retired.record(*hash));
        }
        if self.by_key.get(&old.key).map_or(0, Vec::len) > MAX_PER_PEER {
            self.evict_oldest(&old.key, Some(&new_hash), journal);
        }
        Ok((text, entry.expires_at))
    }

    /// `key` joined or created a party: its provisional tokens get the full lifetime from now.
    pub fn affiliate(&mut self, key: &PublicKey, now: u64, journal: &mut Vec<Record>) {
        let ttl = self.limits.ttl;
        let Some(hashes) = self.by_key.get(key) else {
            return;
        };
        for h in hashes {
            if let Some(e) = self.by_hash.get_mut(h) {
                if e.provisional && e.expires_at > now {
                    e.provisional = false;
                    e.expires_at = e.expires_at.max(now + ttl);
                    journal.push(e.record(*h));
                }
            }
        }
    }

    /// Drops expired tokens; returns how many.
    pub fn sweep(&mut self, now: u64, journal: &mut Vec<Record>) -> usize {
        let expired: Vec<TokenHash> = self
            .by_hash
            .iter()
            .filter(|(_, e)| e.expires_at <= now)
            .map(|(h, _)| *h)
            .collect();
        for h in &expired {
            self.remove(h, journal);
        }
        expired.len()
    }

    /// Distinct keys holding a token: the "registered peers".
    pub fn peers(&self) -> usize {
        self.by_key.len()
    }

    /// Live tokens.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// A token's entry (tests and tools).
    pub fn entry(&self, hash: &TokenHash) -> Option<&TokenEntry> {
        self.by_hash.get(hash)
    }

    /// The whole store as records (snapshots).
    pub fn records(&self, out: &mut Vec<Record>) {
        for (hash, e) in &self.by_hash {
            out.push(e.record(*hash));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: PublicKey = PublicKey([5; 32]);

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, n])
    }

    fn store(ttl: u64, max: usize) -> TokenStore {
        TokenStore::new(TokenLimits {
            ttl,
            unaffiliated_ttl: ttl,
            max,
            max_per_source: 1000,
        })
    }

    #[test]
    fn issue_check_expire() {
        let mut s = store(100, 10);
        let mut j = Vec::new();
        let (tok, exp) = s.issue(KEY, ip(1), None, true, 1000, &mut j).unwrap();
        assert_eq!(exp, 1100);
        assert_eq!(tok.len(), 43);
        let h = hash_token(&tok).unwrap();
        assert_eq!(s.check(&h, 1099), Ok(KEY));
        assert_eq!(s.check(&h, 1100), Err(TokenError::Expired));
        assert_eq!(
            s.check(&hash_token(&B64URL.encode([0u8; 32])).unwrap(), 1000),
            Err(TokenError::Unknown)
        );
        assert!(hash_token("not a token").is_none());
        // Only the hash is journaled.
        assert!(matches!(j[0], Record::TokenV2 { hash, .. } if hash == h));
        assert!(!format!("{j:?}").contains(&tok));
        assert_eq!(s.sweep(1100, &mut j), 1);
        assert_eq!(s.check(&h, 1000), Err(TokenError::Unknown));
        assert_eq!(s.peers(), 0);
        assert!(matches!(j.last(), Some(Record::TokenGone { .. })));
    }

    #[test]
    fn refresh_rotates_with_grace() {
        let mut s = store(1000, 10);
        let mut j = Vec::new();
        let (old, _) = s.issue(KEY, ip(1), None, true, 0, &mut j).unwrap();
        let old_h = hash_token(&old).unwrap();
        let (new, exp) = s.refresh(&old_h, None, true, 500, &mut j).unwrap();
        assert_eq!(exp, 1500);
        assert_eq!(s.check(&hash_token(&new).unwrap(), 1400), Ok(KEY));
        assert_eq!(s.check(&old_h, 500 + REFRESH_GRACE_SECS - 1), Ok(KEY));
        assert_eq!(
            s.check(&old_h, 500 + REFRESH_GRACE_SECS),
            Err(TokenError::Expired)
        );
        // An expired token cannot be refreshed.
        assert_eq!(
            s.refresh(&old_h, None, true, 600, &mut j),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn limits_per_peer_and_total() {
        let mut s = store(1000, 10);
        let mut j = Vec::new();
        let first = s.issue(KEY, ip(1), None, true, 0, &mut j).unwrap().0;
        for t in 1..MAX_PER_PEER as u64 + 2 {
            s.issue(KEY, ip(1), None, true, t, &mut j).unwrap();
        }
        assert_eq!(s.len(), MAX_PER_PEER);
        assert_eq!(
            s.check(&hash_token(&first).unwrap(), 5),
            Err(TokenError::Unknown)
        );
        for i in 0..2 {
            s.issue(PublicKey([i; 32]), ip(1), None, true, 0, &mut j)
                .unwrap();
        }
        assert_eq!(
            s.issue(PublicKey([9; 32]), ip(1), None, true, 0, &mut j),
            Err(TokenError::Full)
        );
        // Expired tokens make room.
        assert!(s
            .issue(PublicKey([9; 32]), ip(1), None, true, 5000, &mut j)
            .is_ok());
        assert_eq!(s.peers(), 1);
    }

    #[test]
    fn a_full_table_never_blocks_refresh() {
        let mut s = store(1000, 3);
        let mut j = Vec::new();
        let (mine, _) = s.issue(KEY, ip(1), None, true, 0, &mut j).unwrap();
        // Someone fills the table with fresh keys.
        for i in 0..2 {
            s.issue(PublicKey([i; 32]), ip(2), None, true, 0, &mut j)
                .unwrap();
        }
        assert_eq!(
            s.issue(PublicKey([9; 32]), ip(2), None, true, 0, &mut j),
            Err(TokenError::Full)
        );
        // The peer that already had a token keeps one, refresh after refresh.
        let mut h = hash_token(&mine).unwrap();
        for t in [100, 200, 300] {
            let (next, exp) = s.refresh(&h, None, true, t, &mut j).unwrap();
            assert_eq!(exp, t + 1000);
            h = hash_token(&next).unwrap();
        }
        assert_eq!(s.check(&h, 1200), Ok(KEY));
    }

    #[test]
    fn tokens_per_source_are_capped() {
        let mut s = TokenStore::new(TokenLimits {
            ttl: 1000,
            unaffiliated_ttl: 100,
            max: 100,
            max_per_source: 2,
        });
        let mut j = Vec::new();
        for i in 0..2 {
            s.issue(PublicKey([i; 32]), ip(1), None, false, 0, &mut j)
                .unwrap();
        }
        assert_eq!(
            s.issue(PublicKey([7; 32]), ip(1), None, false, 0, &mut j),
            Err(TokenError::SourceFull)
        );
        // Another source is not affected; the capped one gets room when its tokens expire
        // (short-lived: these keys joined no party).
        assert!(s
            .issue(PublicKey([7; 32]), ip(2), None, false, 0, &mut j)
            .is_ok());
        assert!(s
            .issue(PublicKey([8; 32]), ip(1), None, false, 100, &mut j)
            .is_ok());
    }

    #[test]
    fn keys_in_no_party_get_short_tokens_until_they_join() {
        let mut s = TokenStore::new(TokenLimits {
            ttl: 86400,
            unaffiliated_ttl: 600,
            max: 100,
            max_per_source: 100,
        });
        let mut j = Vec::new();
        let (t, exp) = s.issue(KEY, ip(1), None, false, 1000, &mut j).unwrap();
        assert_eq!(exp, 1600);
        let h = hash_token(&t).unwrap();
        // Refresh while still in no party: short again.
        let (t2, exp) = s.refresh(&h, None, false, 1500, &mut j).unwrap();
        assert_eq!(exp, 2100);
        let h2 = hash_token(&t2).unwrap();
        // Joining a party makes the live token long; the refreshed-away one stays short.
        s.affiliate(&KEY, 1550, &mut j);
        assert_eq!(s.entry(&h2).unwrap().expires_at, 1550 + 86400);
        assert_eq!(s.entry(&h).unwrap().expires_at, 1500 + REFRESH_GRACE_SECS);
        assert!(matches!(
            j.last(),
            Some(Record::TokenV2 {
                provisional: false,
                ..
            })
        ));
        let (_, exp) = s.refresh(&h2, None, true, 2000, &mut j).unwrap();
        assert_eq!(exp, 2000 + 86400);
    }

    #[test]
    fn refresh_is_refused_after_the_access_key_changed() {
        let mut s = store(1000, 10);
        let mut j = Vec::new();
        let old_gen = access_generation(Some("the-first-access-key"));
        let new_gen = access_generation(Some("the-second-access-key"));
        assert_ne!(old_gen, new_gen);
        assert_eq!(access_generation(None), None);
        let (t, _) = s.issue(KEY, ip(1), old_gen, true, 0, &mut j).unwrap();
        let h = hash_token(&t).unwrap();
        assert_eq!(
            s.refresh(&h, new_gen, true, 10, &mut j),
            Err(TokenError::Revoked)
        );
        // Tokens from before the relay had a key are refused too once it has one.
        let (open, _) = s.issue(KEY, ip(1), None, true, 0, &mut j).unwrap();
        assert_eq!(
            s.refresh(&hash_token(&open).unwrap(), new_gen, true, 10, &mut j),
            Err(TokenError::Revoked)
        );
        assert!(s.refresh(&h, old_gen, true, 10, &mut j).is_ok());
        // The generation is what is stored, never the key.
        assert!(!format!("{j:?}").contains("access-key"));
    }
}
