//! The relay's static X25519 key, kept in `state_dir/relay.key` (base64, mode 0600), made on
//! first start. Peers pin its public half (served by `GET /relays`); registration proofs and
//! per-session bind keys are derived from Diffie-Hellman with it, so losing or replacing the file
//! invalidates every client's pin and every derived key. An unreadable, malformed or
//! group/world-readable key file is an error, never silently replaced.

use std::path::Path;

use lanrage_proto::ids::PublicKey;
use x25519_dalek::StaticSecret;

/// File name of the key inside the state directory.
pub const KEY_FILE: &str = "relay.key";

/// The relay's key pair.
#[derive(Clone)]
pub struct Identity {
    /// Private half: never leaves this process except into `relay.key`.
    pub secret: StaticSecret,
    /// Public half.
    pub public: PublicKey,
}

impl Identity {
    /// Builds an identity from a private key.
    pub fn from_secret(secret: StaticSecret) -> Self {
        let public = PublicKey::from(&secret);
        Identity { secret, public }
    }

    /// Loads `state_dir/relay.key`, or makes and stores a new key if there is none.
    pub fn load_or_create(state_dir: &Path) -> anyhow::Result<Self> {
        let (secret, created) = lanrage_proto::keyfile::load_or_create(state_dir, KEY_FILE)?;
        let id = Self::from_secret(secret);
        if created {
            tracing::info!(path = %state_dir.join(KEY_FILE).display(), key = %id.public, "created a new relay key");
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_stable_across_loads() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        let b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.public, b.public);
        assert_eq!(a.public, PublicKey::from(&a.secret));
    }
}
