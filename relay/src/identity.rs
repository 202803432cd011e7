//! The relay's static X25519 key, kept in `state_dir/relay.key` (base64, mode 0600), made on
//! first start. Peers pin its public half (served by `GET /relays`); registration proofs and
//! per-session bind keys are derived from Diffie-Hellman with it, so losing or replacing the file
//! invalidates every client's pin and every derived key. An unreadable, malformed or
//! group/world-readable key file is an error, never silently replaced.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
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
                let id = Self::from_secret(StaticSecret::random_from_rng(rand::rngs::OsRng));
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
                if let Ok(d) = fs::File::open(state_dir) {
                    let _ = d.sync_all();
                }
                tracing::info!(path = %path.display(), key = %id.public, "created a new relay key");
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
