//! Bearer tokens: 256 random bits handed to a peer that proved its key, bound to that key, with
//! an expiry. The relay keeps only BLAKE2s(token), so a leaked state directory holds no usable
//! token. Times are Unix seconds because tokens survive restarts.
//!
//! Refresh issues a new token and shortens the old one to [`REFRESH_GRACE_SECS`] (requests in
//! flight with the old token still work). Each peer holds at most [`MAX_PER_PEER`] tokens; a new
//! one evicts the one expiring first. Every change is appended to the caller's journal.

use std::collections::HashMap;

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

/// Why a token was not accepted.
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
}

/// A live token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenEntry {
    /// The key it acts as.
    pub key: PublicKey,
    /// Unix seconds.
    pub expires_at: u64,
}

/// All live tokens.
#[derive(Debug, Default)]
pub struct TokenStore {
    ttl: u64,
    max: usize,
    by_hash: HashMap<TokenHash, TokenEntry>,
    by_key: HashMap<PublicKey, Vec<TokenHash>>,
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

impl TokenStore {
    /// Tokens live `ttl` seconds; at most `max` at once.
    pub fn new(ttl: u64, max: usize) -> Self {
        TokenStore {
            ttl,
            max,
            ..Default::default()
        }
    }

    /// A new token for `key`: returns its text and expiry.
    pub fn issue(
        &mut self,
        key: PublicKey,
        now: u64,
        journal: &mut Vec<Record>,
    ) -> Result<(String, u64), TokenError> {
        let held = self.by_key.get(&key).map_or(0, Vec::len);
        if held >= MAX_PER_PEER {
            let oldest = self.by_key.get(&key).and_then(|hs| {
                hs.iter()
                    .min_by_key(|h| self.by_hash.get(*h).map(|e| e.expires_at))
                    .copied()
            });
            if let Some(h) = oldest {
                self.remove(&h, journal);
            }
        } else if self.by_hash.len() >= self.max {
            self.sweep(now, journal);
            if self.by_hash.len() >= self.max {
                return Err(TokenError::Full);
            }
        }
        let raw: [u8; 32] = rand::random();
        let text = B64URL.encode(raw);
        let hash = hash_token(&text).ok_or(TokenError::Unknown)?;
        let expires_at = now + self.ttl;
        self.insert(hash, TokenEntry { key, expires_at });
        journal.push(Record::Token {
            hash,
            key,
            expires_at,
        });
        Ok((text, expires_at))
    }

    /// Restores a stored token (load).
    pub fn insert(&mut self, hash: TokenHash, entry: TokenEntry) {
        if let Some(old) = self.by_hash.insert(hash, entry) {
            if old.key != entry.key {
                self.unindex(&old.key, &hash);
            } else {
                return;
            }
        }
        self.by_key.entry(entry.key).or_default().push(hash);
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

    /// Replaces a valid token with a new one; the old one works for [`REFRESH_GRACE_SECS`] more.
    pub fn refresh(
        &mut self,
        hash: &TokenHash,
        now: u64,
        journal: &mut Vec<Record>,
    ) -> Result<(String, u64), TokenError> {
        let key = self.check(hash, now)?;
        let (text, exp) = self.issue(key, now, journal)?;
        if let Some(e) = self.by_hash.get_mut(hash) {
            let shortened = e.expires_at.min(now + REFRESH_GRACE_SECS);
            if shortened != e.expires_at {
                e.expires_at = shortened;
                journal.push(Record::Token {
                    hash: *hash,
                    key,
                    expires_at: shortened,
                });
            }
        }
        Ok((text, exp))
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

    /// The whole store as records (snapshots).
    pub fn records(&self, out: &mut Vec<Record>) {
        for (hash, e) in &self.by_hash {
            out.push(Record::Token {
                hash: *hash,
                key: e.key,
                expires_at: e.expires_at,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: PublicKey = PublicKey([5; 32]);

    #[test]
    fn issue_check_expire() {
        let mut s = TokenStore::new(100, 10);
        let mut j = Vec::new();
        let (tok, exp) = s.issue(KEY, 1000, &mut j).unwrap();
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
        assert!(matches!(j[0], Record::Token { hash, .. } if hash == h));
        assert!(!format!("{j:?}").contains(&tok));
        assert_eq!(s.sweep(1100, &mut j), 1);
        assert_eq!(s.check(&h, 1000), Err(TokenError::Unknown));
        assert_eq!(s.peers(), 0);
        assert!(matches!(j.last(), Some(Record::TokenGone { .. })));
    }

    #[test]
    fn refresh_rotates_with_grace() {
        let mut s = TokenStore::new(1000, 10);
        let mut j = Vec::new();
        let (old, _) = s.issue(KEY, 0, &mut j).unwrap();
        let old_h = hash_token(&old).unwrap();
        let (new, exp) = s.refresh(&old_h, 500, &mut j).unwrap();
        assert_eq!(exp, 1500);
        assert_eq!(s.check(&hash_token(&new).unwrap(), 1400), Ok(KEY));
        assert_eq!(s.check(&old_h, 500 + REFRESH_GRACE_SECS - 1), Ok(KEY));
        assert_eq!(
            s.check(&old_h, 500 + REFRESH_GRACE_SECS),
            Err(TokenError::Expired)
        );
        // An expired token cannot be refreshed.
        assert_eq!(s.refresh(&old_h, 600, &mut j), Err(TokenError::Expired));
    }

    #[test]
    fn limits_per_peer_and_total() {
        let mut s = TokenStore::new(1000, 10);
        let mut j = Vec::new();
        let first = s.issue(KEY, 0, &mut j).unwrap().0;
        for t in 1..MAX_PER_PEER as u64 + 2 {
            s.issue(KEY, t, &mut j).unwrap();
        }
        assert_eq!(s.len(), MAX_PER_PEER);
        assert_eq!(
            s.check(&hash_token(&first).unwrap(), 5),
            Err(TokenError::Unknown)
        );
        for i in 0..2 {
            s.issue(PublicKey([i; 32]), 0, &mut j).unwrap();
        }
        assert_eq!(
            s.issue(PublicKey([9; 32]), 0, &mut j),
            Err(TokenError::Full)
        );
        // Expired tokens make room.
        assert!(s.issue(PublicKey([9; 32]), 5000, &mut j).is_ok());
        assert_eq!(s.peers(), 1);
    }
}
