//! The shared discovery file: several daemons (separate processes, possibly in different network
//! namespaces, sharing one filesystem) each publish the parties they host into one JSON file, and
//! everyone reads it to list joinable parties. This is the discovery path for setups where
//! multicast does not reach (containers, namespaces, test rigs).
//!
//! Format (pretty JSON, meant to be readable by humans):
//!
//! ```json
//! {
//!   "version": 1,
//!   "parties": [ { ...PartyAd fields..., "last_seen_unix_ms": 1700000000000 } ]
//! }
//! ```
//!
//! Concurrency: every read-modify-write holds an exclusive `flock` on a sibling `<file>.lock`
//! (never deleted, so every process locks the same inode), and replaces the file by writing a
//! temporary file in the same directory, fsyncing it and renaming it over the old one. Readers take
//! no lock: `rename` is atomic, so a reader sees either the old or the new complete file, never a
//! half-written one. That keeps `read` lock-free (a stuck writer cannot stall listing parties) and
//! lets readers work without write access to the directory.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use parking_lot::Mutex;
use serde::de::{IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use super::{PartyAd, AD_VERSION};
use crate::ids::{NodeId, PartyId};

/// Version of the file's outer format (not of the entries, which carry [`AD_VERSION`]).
const FILE_VERSION: u64 = 1;
/// Files larger than this are treated as corrupt rather than read into memory.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// At most this many entries are kept (the newest win).
pub const MAX_ENTRIES: usize = 256;
/// At most this many entries are examined per read (writers never write more than
/// [`MAX_ENTRIES`]); the rest of the list is skipped unexamined, so a file of tiny junk entries
/// costs one linear scan and no per-entry work.
pub const MAX_EXAMINED: usize = 2 * MAX_ENTRIES;
/// An unchanged problem summary is logged again at most this often.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);
/// Longest reason quoted in a summary line (reasons can quote file content).
const MAX_REASON_CHARS: usize = 120;
/// Longest accepted party name or host name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;
/// Most endpoints an announcement may carry.
pub const MAX_ENDPOINTS: usize = 16;
/// How long a writer waits for the lock before giving up (a stopped process may hold it).
const LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// Temporary files left behind by a writer that crashed are removed once this old.
const TEMP_MAX_AGE: Duration = Duration::from_secs(60);

/// Why a discovery-file operation failed. Corrupt file content is not an error (it is logged and
/// rebuilt); I/O problems and publishing an invalid announcement are.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// An I/O operation on the file, its lock file, its directory or a temporary file failed.
    #[error("discovery file {path}: {op}: {source}")]
    Io {
        /// The path the operation was on.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another process held the lock for longer than the lock timeout.
    #[error("discovery file {0}: timed out waiting for the lock")]
    LockTimeout(PathBuf),
    /// The announcement to publish breaks the rules readers enforce (see `validate_ad`).
    #[error("invalid party announcement: {0}")]
    Invalid(&'static str),
    /// Serializing the new content failed (should not happen).
    #[error("discovery file {path}: serialize: {source}")]
    Serialize {
        /// The discovery file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
}

/// Checks that an announcement (from the file or from the network) is sane enough to show and to
/// act on: known format version, bounded names without control characters, a plausible key and
/// a bounded number of endpoints. Shared with the mDNS source so both sources apply the same rules.
pub(crate) fn validate_ad(ad: &PartyAd) -> Result<(), &'static str> {
    if ad.version != AD_VERSION {
        return Err("unsupported version");
    }
    if !name_ok(&ad.name) {
        return Err("bad party name");
    }
    if !name_ok(&ad.host_name) {
        return Err("bad host name");
    }
    if ad.endpoints.len() > MAX_ENDPOINTS {
        return Err("too many endpoints");
    }
    if ad
        .endpoints
        .iter()
        .any(|e| e.port() == 0 || e.ip().is_unspecified() || e.ip().is_multicast())
    {
        return Err("bad endpoint");
    }
    // 32 bytes in base64 is 44 characters; refuse to decode anything much longer.
    if ad.host_key.len() > 64 {
        return Err("bad host key");
    }
    match base64::engine::general_purpose::STANDARD.decode(&ad.host_key) {
        Ok(k) if k.len() == 32 => {}
        _ => return Err("bad host key"),
    }
    Ok(())
}

/// Whether a party or host name is acceptable: at most [`MAX_NAME_BYTES`] bytes and no control
/// or bidi characters ([`crate::names`]: names end up on terminals and web pages).
pub(crate) fn name_ok(name: &str) -> bool {
    name.len() <= MAX_NAME_BYTES && crate::names::is_safe(name)
}

/// One entry of the file: the announcement plus when its host last refreshed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    ad: PartyAd,
    last_seen_unix_ms: u64,
}

/// The file as written.
#[derive(Serialize)]
struct Contents<'a> {
    version: u64,
    parties: &'a [Entry],
}

/// What loading the file found.
struct Loaded {
    /// Valid entries (not yet filtered for staleness).
    entries: Vec<Entry>,
    /// False if anything had to be dropped or the file was unreadable, i.e. a rewrite would change it.
    clean: bool,
}

/// What was wrong with the file at one read: at most one summary line per read says it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Problem {
    /// Larger than [`MAX_FILE_BYTES`].
    TooLarge,
    /// Not the documented envelope.
    Corrupt(String),
    /// Some entries were dropped or not examined.
    Entries {
        kept: usize,
        dropped: usize,
        first_reason: String,
        /// Entries past [`MAX_EXAMINED`], skipped unread.
        skipped: usize,
    },
}

impl Problem {
    /// Entries this read did not keep (for the counter).
    fn lost(&self) -> u64 {
        match self {
            Problem::Entries {
                dropped, skipped, ..
            } => (dropped + skipped) as u64,
            _ => 0,
        }
    }

    /// Whether `other` is the same problem (the count of kept entries may move).
    fn same(&self, other: &Problem) -> bool {
        match (self, other) {
            (
                Problem::Entries {
                    dropped: a,
                    first_reason: r,
                    skipped: s,
                    ..
                },
                Problem::Entries {
                    dropped: b,
                    first_reason: q,
                    skipped: t,
                    ..
                },
            ) => a == b && r == q && s == t,
            _ => self == other,
        }
    }
}

/// When each problem was last logged, shared by the clones of one handle.
#[derive(Debug, Default)]
struct Reporter {
    last: Mutex<Option<(Problem, Instant)>>,
    dropped: AtomicU64,
}

impl Reporter {
    /// Counts and logs what one read found: one line at most, and an unchanged problem only
    /// once per [`SUMMARY_EVERY`]. `None` = the file was fine (a later problem logs again).
    fn report(&self, path: &Path, problem: Option<Problem>, now: Instant) {
        let mut last = self.last.lock();
        let Some(problem) = problem else {
            *last = None;
            return;
        };
        self.dropped.fetch_add(problem.lost(), Ordering::Relaxed);
        if let Some((old, at)) = last.as_ref() {
            if old.same(&problem) && now.saturating_duration_since(*at) < SUMMARY_EVERY {
                return;
            }
        }
        let path = path.display();
        match &problem {
            Problem::TooLarge => {
                tracing::warn!(path = %path, "discovery file is larger than {MAX_FILE_BYTES} bytes; ignoring it (it will be rebuilt on the next write)")
            }
            Problem::Corrupt(why) => {
                tracing::warn!(path = %path, "discovery file is corrupt ({why}); ignoring it (it will be rebuilt on the next write)")
            }
            Problem::Entries {
                kept,
                dropped,
                first_reason,
                skipped,
            } => {
                let more = if *skipped > 0 {
                    format!(
                        "; stopped after examining {MAX_EXAMINED} entries, {skipped} more not read"
                    )
                } else {
                    String::new()
                };
                tracing::warn!(path = %path, "discovery file: kept {kept} entries, dropped {dropped} (first reason: {first_reason}){more}");
            }
        }
        *last = Some((problem, now));
    }
}

/// A reason fit for a log line: control characters removed, at most [`MAX_REASON_CHARS`].
fn clean_reason(reason: &dyn std::fmt::Display) -> String {
    let text = reason.to_string();
    let mut out: String = text
        .chars()
        .filter(|c| !crate::names::is_unsafe(*c))
        .take(MAX_REASON_CHARS)
        .collect();
    if text.chars().count() > MAX_REASON_CHARS {
        out.push('…');
    }
    out
}

/// The file's envelope, read without building a tree of the whole document.
#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    parties: Option<Parties>,
}

/// The `parties` list, examined entry by entry: at most [`MAX_EXAMINED`] entries are decoded and
/// validated (each on its own, so one bad entry drops only itself), the rest are skipped.
#[derive(Default)]
struct Parties {
    entries: Vec<Entry>,
    dropped: usize,
    first_reason: Option<String>,
    skipped: usize,
}

impl<'de> Deserialize<'de> for Parties {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Parties;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of parties")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Parties, A::Error> {
                let mut out = Parties::default();
                let mut examined = 0usize;
                loop {
                    if examined >= MAX_EXAMINED {
                        match seq.next_element::<IgnoredAny>()? {
                            Some(_) => out.skipped += 1,
                            None => break,
                        }
                        continue;
                    }
                    let Some(raw) = seq.next_element::<&'de RawValue>()? else {
                        break;
                    };
                    examined += 1;
                    let why = match serde_json::from_str::<Entry>(raw.get()) {
                        Ok(entry) => match validate_ad(&entry.ad) {
                            Ok(()) => {
                                out.entries.push(entry);
                                continue;
                            }
                            Err(why) => {
                                clean_reason(&format_args!("entry #{}: {why}", examined - 1))
                            }
                        },
                        Err(e) => clean_reason(&format_args!("entry #{}: {e}", examined - 1)),
                    };
                    out.dropped += 1;
                    out.first_reason.get_or_insert(why);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V)
    }
}

/// Handle on one shared discovery file (config key `discovery.file`). Cheap; holds no open files.
/// All methods block on filesystem I/O, so async callers use `spawn_blocking`.
#[derive(Clone, Debug)]
pub struct DiscoveryFile {
    path: PathBuf,
    lock_path: PathBuf,
    stale_after: Duration,
    reporter: Arc<Reporter>,
}

impl DiscoveryFile {
    /// A handle on the file at `path`; entries not refreshed within `stale_after` are ignored and
    /// pruned, so a host that crashed disappears from listings on its own.
    pub fn new(path: PathBuf, stale_after: Duration) -> Self {
        let mut lock_name = path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        lock_name.push(".lock");
        let lock_path = path.with_file_name(lock_name);
        DiscoveryFile {
            path,
            lock_path,
            stale_after,
            reporter: Arc::default(),
        }
    }

    /// Entries dropped (invalid) or skipped (past [`MAX_EXAMINED`]) over all reads so far, for
    /// metrics: a file that keeps growing this is being written by something broken or hostile.
    pub fn dropped_entries(&self) -> u64 {
        self.reporter.dropped.load(Ordering::Relaxed)
    }

    /// The discovery file's path (for messages and status output).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Upsert this party's entry with last_seen = now; prune stale entries. Hosts call this
    /// periodically (well within `stale_after`) to keep their entry alive.
    pub fn publish(&self, ad: &PartyAd) -> Result<(), FileError> {
        self.publish_at(ad, now_unix_ms())
    }

    /// Remove the party's entry (party ended or this node stopped hosting it), whoever its host is.
    pub fn withdraw(&self, id: PartyId) -> Result<(), FileError> {
        self.withdraw_at(id, None, now_unix_ms())
    }

    /// Remove the party's entry only if `host` is still the host named in it. A former host uses
    /// this so that it does not delete an entry the new host has already published.
    pub fn withdraw_if_host(&self, id: PartyId, host: NodeId) -> Result<(), FileError> {
        self.withdraw_at(id, Some(host), now_unix_ms())
    }

    /// Non-stale entries (last_seen within stale_after of now), at most one per party and host
    /// (a party has two hosts only after a network split, until they merge).
    pub fn read(&self) -> Result<Vec<PartyAd>, FileError> {
        self.read_at(now_unix_ms())
    }

    /// [`Self::publish`] with an explicit clock.
    fn publish_at(&self, ad: &PartyAd, now: u64) -> Result<(), FileError> {
        // Refuse here what every reader would drop anyway, so the mistake shows up at the source.
        validate_ad(ad).map_err(FileError::Invalid)?;
        let entry = Entry {
            ad: ad.clone(),
            last_seen_unix_ms: now,
        };
        self.modify(now, |entries| {
            entries.retain(|e| (e.ad.id, e.ad.host_id) != (ad.id, ad.host_id));
            entries.insert(0, entry);
            true
        })
    }

    /// [`Self::withdraw`] / [`Self::withdraw_if_host`] with an explicit clock.
    fn withdraw_at(&self, id: PartyId, host: Option<NodeId>, now: u64) -> Result<(), FileError> {
        self.modify(now, |entries| {
            let before = entries.len();
            entries.retain(|e| e.ad.id != id || host.is_some_and(|h| h != e.ad.host_id));
            entries.len() != before
        })
    }

    /// [`Self::read`] with an explicit clock.
    fn read_at(&self, now: u64) -> Result<Vec<PartyAd>, FileError> {
        let loaded = self.load()?;
        Ok(self
            .fresh(loaded.entries, now)
            .into_iter()
            .map(|e| e.ad)
            .collect())
    }

    /// Whether an entry last seen at `last_seen` is still live at `now`. Entries dated in the
    /// future by more than `stale_after` come from a broken clock or a forger and count as stale.
    fn is_fresh(&self, last_seen: u64, now: u64) -> bool {
        let window = u64::try_from(self.stale_after.as_millis()).unwrap_or(u64::MAX);
        last_seen.abs_diff(now) <= window
    }

    /// Keeps fresh entries, one per (party, host) (the newest), newest first, at most
    /// [`MAX_ENTRIES`].
    fn fresh(&self, entries: Vec<Entry>, now: u64) -> Vec<Entry> {
        let mut newest: HashMap<(PartyId, NodeId), Entry> = HashMap::new();
        for e in entries
            .into_iter()
            .filter(|e| self.is_fresh(e.last_seen_unix_ms, now))
        {
            match newest.get(&(e.ad.id, e.ad.host_id)) {
                Some(old) if old.last_seen_unix_ms >= e.last_seen_unix_ms => {}
                _ => {
                    newest.insert((e.ad.id, e.ad.host_id), e);
                }
            }
        }
        let mut out: Vec<Entry> = newest.into_values().collect();
        out.sort_by(|a, b| {
            b.last_seen_unix_ms
                .cmp(&a.last_seen_unix_ms)
                .then(a.ad.id.cmp(&b.ad.id))
        });
        out.truncate(MAX_ENTRIES);
        out
    }

    /// Read-modify-write under the exclusive lock. `change` edits the (fresh, deduplicated)
    /// entries and says whether it changed anything; the file is rewritten if it did, or if
    /// pruning or repair is needed.
    fn modify(
        &self,
        now: u64,
        change: impl FnOnce(&mut Vec<Entry>) -> bool,
    ) -> Result<(), FileError> {
        if let Some(dir) = self.dir() {
            fs::create_dir_all(dir).map_err(|e| self.io_err(dir, "create directory", e))?;
        }
        let _lock = self.lock()?;
        let loaded = self.load()?;
        let total = loaded.entries.len();
        let mut entries = self.fresh(loaded.entries, now);
        let pruned = entries.len() != total;
        let changed = change(&mut entries);
        if !(changed || pruned || !loaded.clean) {
            return Ok(());
        }
        // `change` may have pushed past the cap; keep the first ones (the changed entry is put first).
        entries.truncate(MAX_ENTRIES);
        self.write(&entries)
    }

    /// The directory holding the file ("" means the current directory).
    fn dir(&self) -> Option<&Path> {
        self.path.parent().filter(|p| !p.as_os_str().is_empty())
    }

    fn io_err(&self, path: &Path, op: &'static str, source: io::Error) -> FileError {
        FileError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }

    /// Takes the exclusive lock on `<file>.lock`, waiting up to [`LOCK_TIMEOUT`]. The lock is
    /// released when the returned file is closed (also if this process dies).
    fn lock(&self) -> Result<File, FileError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.lock_path)
            .map_err(|e| self.io_err(&self.lock_path, "open lock file", e))?;
        let deadline = Instant::now() + LOCK_TIMEOUT;
        let mut backoff = Duration::from_millis(1);
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(fs::TryLockError::WouldBlock) => {}
                Err(fs::TryLockError::Error(e)) => {
                    return Err(self.io_err(&self.lock_path, "lock", e))
                }
            }
            if Instant::now() >= deadline {
                return Err(FileError::LockTimeout(self.path.clone()));
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }

    /// Loads the file. Missing means empty; unreadable content is treated as empty (the next
    /// write rebuilds it); invalid entries are dropped one by one. Whatever was wrong is summed
    /// up in one log line at most (see [`Reporter`]).
    fn load(&self) -> Result<Loaded, FileError> {
        let (loaded, problem) = match self.read_bytes()? {
            None => (
                Loaded {
                    entries: Vec::new(),
                    clean: true,
                },
                None,
            ),
            Some(None) => (
                Loaded {
                    entries: Vec::new(),
                    clean: false,
                },
                Some(Problem::TooLarge),
            ),
            // An empty file (e.g. created by `touch`) is not worth a warning.
            Some(Some(bytes)) if bytes.iter().all(u8::is_ascii_whitespace) => (
                Loaded {
                    entries: Vec::new(),
                    clean: false,
                },
                None,
            ),
            Some(Some(bytes)) => parse(&bytes),
        };
        self.reporter.report(&self.path, problem, Instant::now());
        Ok(loaded)
    }

    /// Reads the whole file. `None`: missing. `Some(None)`: larger than [`MAX_FILE_BYTES`]
    /// (never read past that: one byte more than allowed is read to tell, without trusting
    /// metadata, as the file may be replaced between stat and read).
    fn read_bytes(&self) -> Result<Option<Option<Vec<u8>>>, FileError> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io_err(&self.path, "open", e)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| self.io_err(&self.path, "read", e))?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Ok(Some(None));
        }
        Ok(Some(Some(bytes)))
    }

    /// Atomically replaces the file with `entries`: temp file in the same directory, fsync,
    /// rename, then fsync the directory so the rename itself survives a crash.
    fn write(&self, entries: &[Entry]) -> Result<(), FileError> {
        let mut json = serde_json::to_vec_pretty(&Contents {
            version: FILE_VERSION,
            parties: entries,
        })
        .map_err(|source| FileError::Serialize {
            path: self.path.clone(),
            source,
        })?;
        json.push(b'\n');

        self.remove_old_temps();
        let tmp = self.temp_path();
        if let Err(e) = self.replace_with(&tmp, &json) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        // Best effort: not every filesystem lets a directory be opened and synced.
        if let Ok(d) = File::open(self.dir().unwrap_or(Path::new("."))) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Writes `json` to the new file `tmp`, fsyncs it and renames it over the discovery file.
    fn replace_with(&self, tmp: &Path, json: &[u8]) -> Result<(), FileError> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
            .map_err(|e| self.io_err(tmp, "create temporary file", e))?;
        f.write_all(json)
            .map_err(|e| self.io_err(tmp, "write temporary file", e))?;
        f.sync_all()
            .map_err(|e| self.io_err(tmp, "fsync temporary file", e))?;
        drop(f);
        fs::rename(tmp, &self.path).map_err(|e| self.io_err(&self.path, "rename into place", e))
    }

    /// Prefix of this file's temporary files (hidden, next to the file).
    fn temp_prefix(&self) -> String {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!(".{name}.tmp.")
    }

    /// A fresh temporary path in the file's directory, unique per process and call.
    fn temp_path(&self) -> PathBuf {
        let unique = format!(
            "{}{}.{:016x}",
            self.temp_prefix(),
            std::process::id(),
            rand::random::<u64>()
        );
        self.path.with_file_name(unique)
    }

    /// Removes temporary files left by writers that crashed between create and rename. Runs under
    /// the lock, so no live writer's temp file is older than [`TEMP_MAX_AGE`].
    fn remove_old_temps(&self) {
        let prefix = self.temp_prefix();
        let Ok(dir) = fs::read_dir(self.dir().unwrap_or(Path::new("."))) else {
            return;
        };
        for entry in dir.flatten() {
            if !entry.file_name().to_string_lossy().starts_with(&prefix) {
                continue;
            }
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > TEMP_MAX_AGE);
            if old {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// Parses file content, never failing: whatever cannot be understood is dropped and described
/// in the returned problem. Work is one linear pass over at most [`MAX_FILE_BYTES`] plus the
/// decoding of at most [`MAX_EXAMINED`] entries.
fn parse(bytes: &[u8]) -> (Loaded, Option<Problem>) {
    let corrupt = |why: &dyn std::fmt::Display| {
        (
            Loaded {
                entries: Vec::new(),
                clean: false,
            },
            Some(Problem::Corrupt(clean_reason(why))),
        )
    };
    let envelope: Envelope = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return corrupt(&e),
    };
    match envelope.version {
        Some(FILE_VERSION) => {}
        Some(v) => return corrupt(&format_args!("unsupported version {v}")),
        None => return corrupt(&"missing version"),
    }
    let Some(parties) = envelope.parties else {
        return corrupt(&"missing parties list");
    };
    let clean = parties.dropped == 0 && parties.skipped == 0;
    let problem = (!clean).then(|| Problem::Entries {
        kept: parties.entries.len(),
        dropped: parties.dropped,
        first_reason: parties.first_reason.clone().unwrap_or_default(),
        skipped: parties.skipped,
    });
    (
        Loaded {
            entries: parties.entries,
            clean,
        },
        problem,
    )
}

/// Wall-clock now in Unix milliseconds (the file is shared between processes, so monotonic
/// clocks do not work here). A clock before 1970 reads as 0.
fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::SocketAddr;
    use std::sync::Arc;

    const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    const STALE: Duration = Duration::from_secs(30);
    const T0: u64 = 1_700_000_000_000;

    fn ad(n: u8, name: &str) -> PartyAd {
        PartyAd {
            id: PartyId([n; 10]),
            name: name.to_string(),
            host_id: NodeId([n; 8]),
            host_name: format!("host{n}"),
            host_key: KEY.to_string(),
            endpoints: vec![SocketAddr::from(([192, 168, 1, n], 51820))],
            members: 1,
            protected: n.is_multiple_of(2),
            version: AD_VERSION,
            proto: crate::wire::WIRE_VERSION,
        }
    }

    fn setup() -> (tempfile::TempDir, DiscoveryFile) {
        let dir = tempfile::tempdir().unwrap();
        let file = DiscoveryFile::new(dir.path().join("sub/discovery.json"), STALE);
        (dir, file)
    }

    #[test]
    fn missing_file_is_empty() {
        let (_dir, file) = setup();
        assert!(file.read().unwrap().is_empty());
        // Withdrawing from a missing file is fine too, and creates nothing to withdraw from.
        file.withdraw(PartyId([1; 10])).unwrap();
        assert!(file.read().unwrap().is_empty());
    }

    #[test]
    fn publish_read_roundtrip() {
        let (_dir, file) = setup();
        let a = ad(1, "Friday night");
        let b = ad(2, "Quake");
        file.publish_at(&a, T0).unwrap();
        file.publish_at(&b, T0 + 1).unwrap();
        let mut got = file.read_at(T0 + 2).unwrap();
        got.sort_by_key(|p| p.id);
        assert_eq!(got, vec![a.clone(), b]);

        // Upsert: same id, new content, still one entry.
        let mut a2 = a;
        a2.members = 5;
        file.publish_at(&a2, T0 + 3).unwrap();
        let got = file.read_at(T0 + 4).unwrap();
        assert_eq!(got.len(), 2);
        assert!(got.contains(&a2));

        // Human readable, with the documented shape.
        let text = fs::read_to_string(file.path()).unwrap();
        assert!(text.contains("\n  \"version\": 1"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["parties"][0]["last_seen_unix_ms"], T0 + 3);
        assert_eq!(v["parties"][0]["name"], "Friday night");
        // The real clock works too.
        file.publish(&ad(3, "now")).unwrap();
        assert!(file
            .read()
            .unwrap()
            .iter()
            .any(|p| p.id == PartyId([3; 10])));
    }

    #[test]
    fn withdraw_removes_entry() {
        let (_dir, file) = setup();
        file.publish_at(&ad(1, "a"), T0).unwrap();
        file.publish_at(&ad(2, "b"), T0).unwrap();
        file.withdraw_at(PartyId([1; 10]), None, T0).unwrap();
        let got = file.read_at(T0).unwrap();
        assert_eq!(got, vec![ad(2, "b")]);
        file.withdraw(PartyId([2; 10])).unwrap();
        assert!(file.read().unwrap().is_empty());
    }

    #[test]
    fn withdraw_if_host_spares_new_host() {
        let (_dir, file) = setup();
        let mut moved = ad(1, "a");
        moved.host_id = NodeId([9; 8]);
        file.publish_at(&moved, T0).unwrap();
        // The former host (NodeId([1; 8])) withdraws: the new host's entry stays.
        file.withdraw_at(PartyId([1; 10]), Some(NodeId([1; 8])), T0)
            .unwrap();
        assert_eq!(file.read_at(T0).unwrap(), vec![moved]);
        file.withdraw_at(PartyId([1; 10]), Some(NodeId([9; 8])), T0)
            .unwrap();
        assert!(file.read_at(T0).unwrap().is_empty());
    }

    #[test]
    fn stale_entries_are_hidden_and_pruned() {
        let (_dir, file) = setup();
        let stale_ms = STALE.as_millis() as u64;
        file.publish_at(&ad(1, "old"), T0).unwrap();
        file.publish_at(&ad(2, "new"), T0 + stale_ms).unwrap();
        // Exactly stale_after old: still fresh.
        assert_eq!(file.read_at(T0 + stale_ms).unwrap().len(), 2);
        // One ms later the old one is hidden…
        assert_eq!(file.read_at(T0 + stale_ms + 1).unwrap(), vec![ad(2, "new")]);
        // …and the next write prunes it from the file.
        file.publish_at(&ad(3, "newer"), T0 + stale_ms + 1).unwrap();
        let text = fs::read_to_string(file.path()).unwrap();
        assert!(!text.contains("\"old\""), "{text}");
        // Entries from the future beyond stale_after are bogus.
        let now = T0 + stale_ms + 1;
        let future = Entry {
            ad: ad(4, "future"),
            last_seen_unix_ms: now + stale_ms + 1,
        };
        let near_future = Entry {
            ad: ad(5, "near future"),
            last_seen_unix_ms: now + stale_ms,
        };
        let newer = Entry {
            ad: ad(3, "newer"),
            last_seen_unix_ms: now,
        };
        file.write(&[future, near_future, newer]).unwrap();
        let names: Vec<String> = file
            .read_at(T0 + stale_ms + 1)
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert!(!names.contains(&"future".to_string()), "{names:?}");
        assert!(names.contains(&"newer".to_string()));
        assert!(names.contains(&"near future".to_string()));
        // …and a write prunes it.
        file.withdraw_at(PartyId([9; 10]), None, now).unwrap();
        let text = fs::read_to_string(file.path()).unwrap();
        assert!(!text.contains("\"future\""), "{text}");
    }

    #[test]
    fn corrupt_file_is_ignored_and_rebuilt() {
        let (_dir, file) = setup();
        fs::create_dir_all(file.path().parent().unwrap()).unwrap();
        for junk in [
            &b"{not json"[..],
            b"[]",
            b"{\"version\": 1}",
            b"{\"version\": 7, \"parties\": []}",
            b"{\"version\": 1, \"parties\": {}}",
            b"\xff\xfe\x00",
            b"",
        ] {
            fs::write(file.path(), junk).unwrap();
            assert!(file.read_at(T0).unwrap().is_empty());
            file.publish_at(&ad(1, "a"), T0).unwrap();
            assert_eq!(file.read_at(T0).unwrap(), vec![ad(1, "a")]);
            let v: serde_json::Value =
                serde_json::from_slice(&fs::read(file.path()).unwrap()).unwrap();
            assert_eq!(v["version"], 1);
        }
    }

    #[test]
    fn bad_entries_are_dropped_individually() {
        let (_dir, file) = setup();
        let good = serde_json::to_value(Entry {
            ad: ad(1, "good"),
            last_seen_unix_ms: T0,
        })
        .unwrap();
        let mut long_name = good.clone();
        long_name["name"] = "x".repeat(65).into();
        long_name["id"] = serde_json::to_value(PartyId([2; 10])).unwrap();
        let mut many_endpoints = good.clone();
        many_endpoints["endpoints"] = serde_json::to_value(vec!["10.0.0.1:1"; 17]).unwrap();
        many_endpoints["id"] = serde_json::to_value(PartyId([3; 10])).unwrap();
        let mut wrong_version = good.clone();
        wrong_version["version"] = 2.into();
        let mut bad_key = good.clone();
        bad_key["host_key"] = "not base64!".into();
        let mut control = good.clone();
        control["host_name"] = "evil\u{1b}[2J".into();
        let mut no_last_seen = good.clone();
        no_last_seen
            .as_object_mut()
            .unwrap()
            .remove("last_seen_unix_ms");
        let doc = serde_json::json!({
            "version": 1,
            "parties": [long_name, many_endpoints, wrong_version, bad_key, control, no_last_seen, 42, "x", good],
        });
        fs::create_dir_all(file.path().parent().unwrap()).unwrap();
        fs::write(file.path(), serde_json::to_vec(&doc).unwrap()).unwrap();
        assert_eq!(file.read_at(T0).unwrap(), vec![ad(1, "good")]);
        // A write rewrites the file without the bad entries.
        file.withdraw_at(PartyId([9; 10]), None, T0).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&fs::read(file.path()).unwrap()).unwrap();
        assert_eq!(v["parties"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn oversize_file_is_treated_as_corrupt() {
        let (_dir, file) = setup();
        file.publish_at(&ad(1, "a"), T0).unwrap();
        // Valid JSON, but padded past the cap with whitespace.
        let mut text = fs::read(file.path()).unwrap();
        text.resize(MAX_FILE_BYTES as usize + 1, b' ');
        fs::write(file.path(), &text).unwrap();
        assert!(file.read_at(T0).unwrap().is_empty());
        file.publish_at(&ad(2, "b"), T0).unwrap();
        assert_eq!(file.read_at(T0).unwrap(), vec![ad(2, "b")]);
        assert!(fs::metadata(file.path()).unwrap().len() < 4096);
    }

    #[test]
    fn entry_count_is_capped() {
        let (_dir, file) = setup();
        let entries: Vec<Entry> = (0..300u16)
            .map(|i| {
                let mut a = ad(1, "x");
                a.id = PartyId([(i >> 8) as u8, i as u8, 0, 0, 0, 0, 0, 0, 0, 1]);
                Entry {
                    ad: a,
                    last_seen_unix_ms: T0 + u64::from(i),
                }
            })
            .collect();
        fs::create_dir_all(file.path().parent().unwrap()).unwrap();
        file.write(&entries).unwrap();
        assert_eq!(file.read_at(T0 + 300).unwrap().len(), MAX_ENTRIES);
        // Our own entry always makes it in, even when the file is full of newer ones.
        file.publish_at(&ad(7, "mine"), T0).unwrap();
        let got = file.read_at(T0 + 300).unwrap();
        assert_eq!(got.len(), MAX_ENTRIES);
        assert!(got.contains(&ad(7, "mine")));
    }

    #[test]
    fn invalid_own_ad_is_not_published() {
        let (_dir, file) = setup();
        let err = file.publish_at(&ad(1, &"x".repeat(65)), T0).unwrap_err();
        assert!(matches!(err, FileError::Invalid(_)), "{err}");
        assert!(file.read_at(T0).unwrap().is_empty());
    }

    #[test]
    fn concurrent_writers() {
        let dir = tempfile::tempdir().unwrap();
        let path = Arc::new(dir.path().join("shared.json"));
        let threads: Vec<_> = (0..8u8)
            .map(|n| {
                let path = Arc::clone(&path);
                std::thread::spawn(move || {
                    // Each thread has its own handle, hence its own lock file description,
                    // like separate processes.
                    let file = DiscoveryFile::new((*path).clone(), Duration::from_secs(3600));
                    for i in 0..20 {
                        let mut a = ad(n, &format!("party {n}"));
                        a.members = i + 1;
                        file.publish(&a).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let file = DiscoveryFile::new((*path).clone(), Duration::from_secs(3600));
        let mut got = file.read().unwrap();
        got.sort_by_key(|p| p.id);
        assert_eq!(got.len(), 8);
        for (n, p) in got.iter().enumerate() {
            assert_eq!(p.id, PartyId([n as u8; 10]));
            assert_eq!(p.members, 20);
        }
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&*path).unwrap()).unwrap();
        assert_eq!(v["parties"].as_array().unwrap().len(), 8);
        // No temporary files left behind.
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    /// Collects everything logged (formatted) while `f` runs on this thread.
    fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone, Default)]
        struct Buf(Arc<parking_lot::Mutex<Vec<u8>>>);
        impl io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let out = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8_lossy(&buf.0.lock()).into_owned();
        (out, text)
    }

    /// Issue 6 finding 5: 500k junk entries in the right envelope wrote 824 MB of log in 10 s
    /// (one warning per entry, every second). Now: one summary line for the first read, nothing
    /// for identical re-reads, bounded work, and a counter.
    #[test]
    fn junk_entries_make_one_summary_line() {
        let (_dir, file) = setup();
        fs::create_dir_all(file.path().parent().unwrap()).unwrap();
        let mut doc = String::from("{\"version\": 1, \"parties\": [");
        for i in 0..500_000 {
            doc.push_str(if i == 0 { "0" } else { ",0" });
        }
        doc.push_str("]}");
        assert!(doc.len() as u64 <= MAX_FILE_BYTES, "{}", doc.len());
        fs::write(file.path(), &doc).unwrap();

        let start = Instant::now();
        let (got, log) = logged(|| {
            (0..10)
                .map(|_| file.read_at(T0).unwrap().len())
                .collect::<Vec<_>>()
        });
        assert_eq!(got, vec![0; 10]);
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 1, "{log}");
        assert!(
            lines[0].contains("kept 0 entries, dropped 512 (first reason: entry #0: invalid type")
                && lines[0].contains("stopped after examining 512 entries, 499488 more not read"),
            "{log}"
        );
        // Ten reads of a 1 MB file take well under a second even in a debug build.
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(file.dropped_entries(), 10 * 500_000);

        // A different problem is reported at once; the same one again after it went away.
        let good = serde_json::to_value(Entry {
            ad: ad(1, "good"),
            last_seen_unix_ms: T0,
        })
        .unwrap();
        let doc = serde_json::json!({"version": 1, "parties": [good, "x"]});
        fs::write(file.path(), serde_json::to_vec(&doc).unwrap()).unwrap();
        let (got, log) = logged(|| (file.read_at(T0).unwrap(), file.read_at(T0).unwrap()));
        assert_eq!(got, (vec![ad(1, "good")], vec![ad(1, "good")]));
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(
            log.contains("kept 1 entries, dropped 1 (first reason: entry #1: invalid type: string"),
            "{log}"
        );
        file.publish_at(&ad(2, "b"), T0).unwrap();
        let (clean, log) = logged(|| file.read_at(T0).unwrap());
        assert_eq!(clean.len(), 2);
        assert!(log.is_empty(), "{log}");
        fs::write(file.path(), serde_json::to_vec(&doc).unwrap()).unwrap();
        let (_, log) = logged(|| file.read_at(T0).unwrap());
        assert_eq!(log.lines().count(), 1, "{log}");

        // Oversize and corrupt files: one line each, not repeated.
        fs::write(file.path(), vec![b' '; MAX_FILE_BYTES as usize + 1]).unwrap();
        let (_, log) = logged(|| (file.read_at(T0).unwrap(), file.read_at(T0).unwrap()));
        assert_eq!(log.lines().count(), 1, "{log}");
        fs::write(file.path(), b"{\"version\": 1, \"parties\": [\x1b").unwrap();
        let (_, log) = logged(|| (file.read_at(T0).unwrap(), file.read_at(T0).unwrap()));
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(!log.contains('\u{1b}'));
    }

    /// Reasons quoting file content are cut and stripped of control characters.
    #[test]
    fn summary_reasons_are_short_and_clean() {
        let (_dir, file) = setup();
        fs::create_dir_all(file.path().parent().unwrap()).unwrap();
        let mut bad = serde_json::to_value(Entry {
            ad: ad(1, "good"),
            last_seen_unix_ms: T0,
        })
        .unwrap();
        bad["members"] = format!("\u{1b}[2J{}", "y".repeat(10_000)).into();
        let doc = serde_json::json!({"version": 1, "parties": [bad]});
        fs::write(file.path(), serde_json::to_vec(&doc).unwrap()).unwrap();
        let (_, log) = logged(|| file.read_at(T0).unwrap());
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(log.len() < 600, "{log}");
        assert!(!log.contains('\u{1b}'), "{log}");
    }

    proptest! {
        #[test]
        fn arbitrary_content_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let (_dir, file) = setup();
            fs::create_dir_all(file.path().parent().unwrap()).unwrap();
            fs::write(file.path(), &bytes).unwrap();
            let _ = file.read_at(T0).unwrap();
            file.publish_at(&ad(1, "a"), T0).unwrap();
            prop_assert_eq!(file.read_at(T0).unwrap(), vec![ad(1, "a")]);
        }

        #[test]
        fn arbitrary_json_entries_never_panic(
            name in ".{0,80}",
            members in any::<u32>(),
            last_seen in any::<u64>(),
            version in any::<u32>(),
            endpoints in proptest::collection::vec("[0-9.:]{0,24}", 0..20),
        ) {
            let (_dir, file) = setup();
            let doc = serde_json::json!({"version": 1, "parties": [{
                "id": PartyId([1; 10]), "name": name, "host_id": NodeId([1; 8]), "host_name": "h",
                "host_key": KEY, "endpoints": endpoints, "members": members, "protected": false,
                "version": version, "last_seen_unix_ms": last_seen,
            }]});
            fs::create_dir_all(file.path().parent().unwrap()).unwrap();
            fs::write(file.path(), serde_json::to_vec(&doc).unwrap()).unwrap();
            let _ = file.read_at(T0).unwrap();
        }
    }
}
