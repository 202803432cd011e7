//! Where the API token lives on disk, so that the CLI finds it without flags.
//!
//! The daemon writes its token to `/run/lanrage/api-<port>-<netns>.token`: `<port>` is the port
//! of `api.listen` and `<netns>` the inode of the daemon's network namespace
//! (`/proc/self/ns/net`). The CLI computes the same name from the API address it talks to and its
//! own namespace, so it needs no extra flag whether it got the address from `--config`, the
//! default config or `--api`, and several daemons on one machine (one per network namespace, all
//! on 127.0.0.1:8666, as in the test lab) never share a file. `LANRAGE_API_TOKEN_FILE` overrides
//! the path for the CLI.
//!
//! The file is mode 0640, owned by the daemon's user (root) and by `api.operator_group` when set
//! (else root's group), replaced atomically (a temporary file renamed over it) and removed when
//! the daemon stops. The directory is 0711: every user can pass through it to a file whose name
//! they know, none can list it, and only the file's own mode decides who reads the token.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::auth::ApiToken;
use crate::config::ApiConfig;

/// Directory of the token files.
pub const RUNTIME_DIR: &str = "/run/lanrage";
/// Environment variable that tells the CLI where the token file is.
pub const TOKEN_FILE_ENV: &str = "LANRAGE_API_TOKEN_FILE";
/// Mode of the token file: the owner writes, the operator group reads, others nothing.
pub const TOKEN_MODE: u32 = 0o640;
/// Mode of [`RUNTIME_DIR`]: traversable by all, listable and writable only by root.
pub const DIR_MODE: u32 = 0o711;
/// A token file longer than this is not ours.
const MAX_FILE_LEN: u64 = 1024;

/// Why the token file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// `api.operator_group` names no group on this system.
    #[error("api.operator_group: there is no group named {0:?} on this system (create it with `groupadd --system {0}`, or remove the key)")]
    UnknownGroup(String),
    /// The group database could not be read.
    #[error("api.operator_group: cannot look up group {name:?}: {source}")]
    GroupLookup {
        /// The configured name.
        name: String,
        /// What failed.
        source: nix::Error,
    },
    /// The runtime directory is not what it must be.
    #[error("{path}: {problem}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The file does not hold a token.
    #[error("{0}: not an API token")]
    Malformed(PathBuf),
}

impl TokenFileError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> Self + '_ {
        move |source| TokenFileError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// The I/O error kind, if this is an I/O error (the CLI words permission problems itself).
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            TokenFileError::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
}

/// Inode of this process's network namespace: tells namespaces apart on one machine.
pub fn current_netns() -> io::Result<u64> {
    Ok(fs::metadata("/proc/self/ns/net")?.ino())
}

/// File name of the token of the daemon whose API is on `port` in namespace `netns`.
pub fn file_name(port: u16, netns: u64) -> String {
    format!("api-{port}-{netns}.token")
}

/// Where the daemon with its API on `port` in this network namespace keeps its token.
pub fn default_path(port: u16) -> io::Result<PathBuf> {
    Ok(Path::new(RUNTIME_DIR).join(file_name(port, current_netns()?)))
}

/// The group id for `api.operator_group`, or a clear error naming the key.
pub fn resolve_group(name: &str) -> Result<u32, TokenFileError> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(TokenFileError::UnknownGroup(name.to_owned())),
        Err(source) => Err(TokenFileError::GroupLookup {
            name: name.to_owned(),
            source,
        }),
    }
}

/// Name of group `gid`, if it has one (for the CLI's hints).
pub fn group_name(gid: u32) -> Option<String> {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
}

/// What the daemon calls at start: resolves `api.operator_group` and publishes a new token in
/// [`RUNTIME_DIR`] for the API on `api.listen`.
pub fn publish_for(api: &ApiConfig) -> Result<TokenFile, TokenFileError> {
    let gid = api
        .operator_group
        .as_deref()
        .map(resolve_group)
        .transpose()?;
    TokenFile::publish(Path::new(RUNTIME_DIR), api.listen.port(), gid)
}

/// The published token file; removed when dropped (if it still holds this daemon's token).
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    token: ApiToken,
}

impl TokenFile {
    /// Makes a new token and writes it to `dir/`[`file_name`]`(port, this namespace)`, readable
    /// by the owner and by group `gid` (the resolved `api.operator_group`), or by the owner's
    /// group when `None`. Creates `dir` (mode [`DIR_MODE`]) if needed.
    pub fn publish(dir: &Path, port: u16, gid: Option<u32>) -> Result<Self, TokenFileError> {
        prepare_dir(dir)?;
        let netns = current_netns().map_err(TokenFileError::io(Path::new("/proc/self/ns/net")))?;
        let path = dir.join(file_name(port, netns));
        let token = ApiToken::generate();
        write_atomically(&path, &format!("{}\n", token.as_str()), gid)?;
        tracing::info!(path = %path.display(), "wrote the API token for the CLI");
        Ok(TokenFile { path, token })
    }

    /// The token.
    pub fn token(&self) -> &ApiToken {
        &self.token
    }

    /// Where it was written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        // A daemon started right after us may already have replaced the file: leave its token.
        if read(&self.path).is_ok_and(|t| t == self.token) {
            if let Err(e) = fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove the API token file");
            }
        }
    }
}

/// Creates `dir` or checks it: a real directory (not a symlink) owned by us, then sets
/// [`DIR_MODE`].
fn prepare_dir(dir: &Path) -> Result<(), TokenFileError> {
    match fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(TokenFileError::io(dir)(e)),
    }
    let meta = fs::symlink_metadata(dir).map_err(TokenFileError::io(dir))?;
    let problem = |problem: String| TokenFileError::Directory {
        path: dir.to_path_buf(),
        problem,
    };
    if !meta.file_type().is_dir() {
        return Err(problem("is not a directory (remove it)".into()));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(problem(format!(
            "is owned by uid {}, not by the daemon's user (uid {euid}); remove it",
            meta.uid()
        )));
    }
    if meta.mode() & 0o7777 != DIR_MODE {
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
            .map_err(TokenFileError::io(dir))?;
    }
    Ok(())
}

fn write_atomically(path: &Path, text: &str, gid: Option<u32>) -> Result<(), TokenFileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp); // left by a killed daemon with the same pid
    let result = (|| {
        // Created 0600 and only then given to the group: never readable by anyone else.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(TokenFileError::io(&tmp))?;
        if let Some(gid) = gid {
            std::os::unix::fs::fchown(&f, None, Some(gid)).map_err(TokenFileError::io(&tmp))?;
        }
        f.set_permissions(fs::Permissions::from_mode(TOKEN_MODE))
            .map_err(TokenFileError::io(&tmp))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(TokenFileError::io(&tmp))?;
        fs::rename(&tmp, path).map_err(TokenFileError::io(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads a token file (at most 1 KiB).
pub fn read(path: &Path) -> Result<ApiToken, TokenFileError> {
    let f = fs::File::open(path).map_err(TokenFileError::io(path))?;
    let mut text = String::new();
    f.take(MAX_FILE_LEN)
        .read_to_string(&mut text)
        .map_err(TokenFileError::io(path))?;
    ApiToken::parse(&text).ok_or_else(|| TokenFileError::Malformed(path.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_token_is_private_atomic_and_removed() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("run");
        let gid = nix::unistd::getegid().as_raw();
        let tf = TokenFile::publish(&dir, 8666, Some(gid)).unwrap();
        let name = tf
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert_eq!(name, file_name(8666, current_netns().unwrap()));
        let meta = fs::metadata(tf.path()).unwrap();
        assert_eq!(meta.mode() & 0o777, TOKEN_MODE);
        assert_eq!(meta.gid(), gid);
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o7777, DIR_MODE);
        assert_eq!(&read(tf.path()).unwrap(), tf.token());
        // Nothing but the token file is left in the directory.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);

        // A second daemon (restart) replaces the token; the first one's drop leaves it alone.
        let tf2 = TokenFile::publish(&dir, 8666, None).unwrap();
        assert_ne!(tf.token(), tf2.token());
        let path = tf.path().to_path_buf();
        drop(tf);
        assert_eq!(&read(&path).unwrap(), tf2.token());
        drop(tf2);
        assert!(!path.exists());
    }

    #[test]
    fn directory_mode_is_fixed_and_symlinks_refused() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("run");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let _tf = TokenFile::publish(&dir, 1, None).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o7777, DIR_MODE);
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let err = TokenFile::publish(&link, 2, None).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
    }

    #[test]
    fn unknown_group_names_the_key() {
        let err = resolve_group("lanrage-no-such-group-x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("api.operator_group"), "{err}");
        assert!(err.contains("lanrage-no-such-group-x"), "{err}");
        assert_eq!(resolve_group("root").unwrap(), 0);
    }

    #[test]
    fn junk_token_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        fs::write(&p, "not a token!").unwrap();
        assert!(matches!(read(&p), Err(TokenFileError::Malformed(_))));
        fs::write(&p, "a".repeat(5000)).unwrap();
        assert!(matches!(read(&p), Err(TokenFileError::Malformed(_))));
        assert_eq!(
            read(&dir.path().join("missing")).unwrap_err().io_kind(),
            Some(io::ErrorKind::NotFound)
        );
    }
}
