//! This node's long-term X25519 key pair: made on first start, kept mode 0600 in the state
//! directory. The same key is the WireGuard static key and seals lanrage's control messages;
//! the node id derives from its public half.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

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

    /// A fresh random identity (tests, first start).
    pub fn generate() -> Self {
        Self::from_secret(StaticSecret::random_from_rng(rand::rngs::OsRng))
    }

    /// Public key in base64, as WireGuard tools print it.
    pub fn public_b64(&self) -> String {
        B64.encode(self.public)
    }

    /// Loads `state_dir/private.key`, or makes and stores a new key if there is none.
    /// A key file that is unreadable, malformed or readable by others is an error, not replaced:
    /// silently changing a node's identity would change its id and virtual IP.
    pub fn load_or_create(state_dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(state_dir)
            .map_err(|e| anyhow::anyhow!("cannot create state_dir {}: {e}", state_dir.display()))?;
        let _ = fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700));
        let path = state_dir.join(KEY_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => {
                let mode = fs::metadata(&path)?.permissions().mode();
                if mode & 0o077 != 0 {
                    anyhow::bail!(
                        "{} is readable by other users (mode {:o}); run: chmod 600 {}",
                        path.display(),
                        mode & 0o777,
                        path.display()
                    );
                }
                let bytes = B64
                    .decode(text.trim())
                    .map_err(|e| anyhow::anyhow!("{}: not a base64 key: {e}", path.display()))?;
                let key: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("{}: a key is 32 bytes", path.display()))?;
                Ok(Self::from_secret(StaticSecret::from(key)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Self::generate();
                let tmp = state_dir.join(format!("{KEY_FILE}.tmp"));
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(format!("{}\n", B64.encode(id.secret.to_bytes())).as_bytes())?;
                f.sync_all()?;
                fs::rename(&tmp, &path)?;
                tracing::info!(path = %path.display(), node_id = %id.id, "created a new node key");
                Ok(id)
            }
            Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_and_kept_private() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        let b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.public, b.public);
        assert_eq!(a.id, b.id);
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn world_readable_or_garbage_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Identity::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Identity::load_or_create(dir.path()).is_err());
        fs::write(&path, "not base64!").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Identity::load_or_create(dir.path()).is_err());
    }
}
