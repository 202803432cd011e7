//! A node's long-term X25519 private key on disk: base64 in one file, mode 0600, in a 0700
//! directory, made on first start. An unreadable, malformed or group/world-readable key file is
//! an error and never silently replaced: a new key would change the node's identity (the
//! daemon's id and address, every relay client's pinned key).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use x25519_dalek::StaticSecret;

/// Why the key could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The directory could not be made or the file read or written (the cause follows in the
    /// error chain, so it is printed once).
    #[error("cannot create, read or write {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Others may read the key.
    #[error("{path} is readable by other users (mode {mode:o}); run: chmod 600 {path}")]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// Not base64 of 32 bytes.
    #[error("{0}: not a base64 X25519 key (32 bytes)")]
    Malformed(String),
}

/// Loads `dir/file`, or makes, stores and returns a new key if there is none. The `bool` says
/// whether the key is new (worth a log line).
pub fn load_or_create(dir: &Path, file: &str) -> Result<(StaticSecret, bool), KeyFileError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KeyFileError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    let path = dir.join(file);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let mode = fs::metadata(&path).map_err(io(&path))?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(KeyFileError::Exposed {
                    path: path.display().to_string(),
                    mode: mode & 0o777,
                });
            }
            let key: [u8; 32] = B64
                .decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| KeyFileError::Malformed(path.display().to_string()))?;
            Ok((StaticSecret::from(key), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = StaticSecret::random_from_rng(rand::rngs::OsRng);
            let tmp = dir.join(format!("{file}.tmp"));
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io(&tmp))?;
            f.write_all(format!("{}\n", B64.encode(secret.to_bytes())).as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(io(&tmp))?;
            fs::rename(&tmp, &path).map_err(io(&path))?;
            if let Ok(d) = fs::File::open(dir) {
                let _ = d.sync_all(); // make the rename itself durable
            }
            Ok((secret, true))
        }
        Err(e) => Err(KeyFileError::Io { path, source: e }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_and_kept_private() {
        let dir = tempfile::tempdir().unwrap();
        let (a, new_a) = load_or_create(dir.path(), "k").unwrap();
        let (b, new_b) = load_or_create(dir.path(), "k").unwrap();
        assert!(new_a && !new_b);
        assert_eq!(a.to_bytes(), b.to_bytes());
        let mode = fs::metadata(dir.path().join("k"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn exposed_or_garbage_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path(), "k").unwrap();
        let path = dir.path().join("k");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(dir.path(), "k"),
            Err(KeyFileError::Exposed { .. })
        ));
        fs::write(&path, "not base64!").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_create(dir.path(), "k"),
            Err(KeyFileError::Malformed(_))
        ));
    }
}
