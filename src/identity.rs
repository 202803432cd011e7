//! This node's long-term X25519 key pair: made on first start, kept mode 0600 in the state
//! directory (see `lanrage_proto::keyfile`). The same key is the WireGuard static key and seals
//! lanrage's control messages; the node id derives from its public half.

use std::path::Path;

use anyhow::Context;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::ids::NodeId;

/// File name of the private key inside the state directory.
pub const KEY_FILE: &str = "private.key";

/// The node's key pair and the id derived from it.
#[derive(Clone)]
pub struct Identity {
    /// Private half: never leaves this process except into `private.key`.
    pub secret: StaticSecret,
    /// Public half: shared with peers and in announcements.
    pub public: [u8; 32],
    /// Derived from `public`.
    pub id: NodeId,
}

impl Identity {
    /// Builds an identity from a private key.
    pub fn from_secret(secret: StaticSecret) -> Self {
        let public = PublicKey::from(&secret).to_bytes();
        Identity {
            secret,
            public,
            id: NodeId::from_public_key(&public),
        }
    }

    /// A fresh random identity (tests).
    pub fn generate() -> Self {
        Self::from_secret(StaticSecret::random_from_rng(rand::rngs::OsRng))
    }

    /// Public key in base64, as WireGuard tools print it.
    pub fn public_b64(&self) -> String {
        B64.encode(self.public)
    }

    /// Loads `state_dir/private.key`, or makes and stores a new key if there is none. A bad or
    /// exposed key file is an error, not replaced: a new key would change the node's id and IP.
    pub fn load_or_create(state_dir: &Path) -> anyhow::Result<Self> {
        let (secret, created) = lanrage_proto::keyfile::load_or_create(state_dir, KEY_FILE)
            .with_context(|| {
                format!(
                    "node.state_dir = {:?}: the node key ({KEY_FILE}) cannot be kept there",
                    state_dir.display().to_string()
                )
            })?;
        let id = Self::from_secret(secret);
        if created {
            tracing::info!(path = %state_dir.join(KEY_FILE).display(), node_id = %id.id, "created a new node key");
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
        assert_eq!((a.public, a.id), (b.public, b.id));
        assert_eq!(a.id, NodeId::from_public_key(&a.public));
    }
}
