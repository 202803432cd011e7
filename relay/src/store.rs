//! Durable state behind a small trait, so a shared database can back several control servers
//! later; the embedded implementation is a journal plus a snapshot in `state_dir`.
//!
//! What is stored: tokens (hashes only), parties (name, the `protected` flag, the host, the last
//! published roster version), members (key, name, endpoints, whether and when admitted), relay
//! sessions (id and the two members). No password verifier: the party's host checks passwords
//! (journals of older relays hold verifiers in [`Record::Party`]; they are read and dropped, and
//! the state is compacted at once so they leave the disk). What is not: heartbeat times (reset to
//! "now" on load, so peers are not expired for the relay's own downtime), signals (seconds-lived),
//! UDP bindings (peers re-bind within one round trip when the relay answers their next data frame
//! with a `Rebind` hint, or at their next keepalive), challenges and rate-limit buckets.
//!
//! Every change is an idempotent [`Record`] (put or delete by key); the state is the fold of all
//! records in order. The control plane collects records in memory and a flusher commits them
//! every `store.flush_interval_ms` as one batch.
//!
//! [`FileStore`] — why a journal and not a snapshot per batch: heartbeats and signals are not
//! persisted, so batches are small and rare, but the state can be large (10 000 parties × 32
//! members); appending a few records and one `fdatasync` per batch costs the same whatever the
//! state size, while rewriting a snapshot every batch would not. Layout:
//! - `journal.bin`: the header `"LRJRNL02"`, then frames
//!   `len (u32 LE) | seq (u64 LE) | check (8) | postcard(Record)`, with
//!   `check = BLAKE2s("lanrage relay journal" || seq || payload)[..8]`. A batch is its records'
//!   frames followed by one end-of-batch marker (a frame with an empty payload), written with one
//!   `write` and one `fdatasync`. On load, reading stops at the first frame that is short or fails
//!   its check (a torn last write after kill -9 or power loss), records after the last marker are
//!   dropped (a batch is applied whole or not at all: half a batch can leave, say, a party without
//!   its creator), and the file is truncated there: at most the batch being written is lost.
//!   The header is what makes "no marker yet" unambiguous: it is written when the journal is
//!   created and kept when a compaction empties it (the journal is cut back to the header), so in a
//!   journal with a header, records without a marker after them are always a torn batch, the first
//!   batch of a new or freshly compacted journal included. A file holding only a prefix of the
//!   header (a crash while creating it) is an empty journal.
//! - Journals without the header were written by relays before it existed. Their frames are read
//!   the way those relays read them (records after the last marker dropped; a journal with no
//!   marker at all is from before markers and is read whole, which is also what those relays did
//!   with a torn first batch: that one ambiguous case cannot be told apart), then the journal is
//!   rewritten at once with the header and a marker after what was kept (to `journal.tmp`,
//!   fsynced, renamed over `journal.bin`), so every batch written from then on is unambiguous.
//!   The header cannot be mistaken for a frame of such a journal: read as a length it is over
//!   1 GB, far above the largest record.
//! - A write that fails (disk full, I/O error) may still have appended part of the batch. The
//!   store remembers the journal's length before each write and cuts it back there before
//!   anything else is appended; otherwise every later batch would sit behind a torn frame and be
//!   dropped at the next load. If it cannot cut now, it cuts before the next write, and writes
//!   nothing until it could.
//! - A batch whose write failed is kept, encoded once, as the store's backlog
//!   ([`Store::backlog`]) and written again by [`Store::retry`], byte for byte: retrying while the
//!   disk stays full costs one `write` and one `ftruncate`, not a new encoding of everything that
//!   piled up. The caller ([`crate::server::Flusher`]) retries with backoff and commits nothing
//!   new meanwhile; the control plane refuses state changes while there is a backlog, so what
//!   waits in memory stays bounded (see [`crate::state`]).
//! - `snapshot.bin`: `"LRSNAP01" | last_seq (u64 LE) | count (u64 LE) | frames | BLAKE2s(all before)`.
//!   After `store.compact_after_records` journal records the whole state is written to
//!   `snapshot.tmp`, fsynced, renamed over `snapshot.bin`, the directory fsynced, then the journal
//!   cut back to its header. Journal frames with `seq <= last_seq` are skipped on load, so a crash
//!   between the rename and the cut re-applies nothing twice (and records are idempotent anyway).
//!   A snapshot that fails its checksum stops the relay: it was renamed into place whole, so that
//!   is disk corruption for the operator to look at, not something to paper over.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use blake2::{Blake2s256, Digest};
use lanrage_proto::ids::{PartyId, PeerId, PublicKey, SessionId};
use serde::{Deserialize, Serialize};

/// Journal file name inside the state directory.
pub const JOURNAL_FILE: &str = "journal.bin";
/// Snapshot file name inside the state directory.
pub const SNAPSHOT_FILE: &str = "snapshot.bin";
const SNAPSHOT_MAGIC: &[u8; 8] = b"LRSNAP01";
/// First bytes of every journal written by this version (see the module docs).
const JOURNAL_MAGIC: &[u8; 8] = b"LRJRNL02";
const JOURNAL_HEADER: u64 = JOURNAL_MAGIC.len() as u64;
const FRAME_HEADER: usize = 4 + 8 + 8;
/// Largest single record (a party member with 8 endpoints is ~200 bytes).
const MAX_RECORD: usize = 64 * 1024;

/// One durable change. Postcard-encoded: variants are only ever appended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// A token exists (or its expiry changed).
    Token {
        /// BLAKE2s of the token.
        hash: [u8; 32],
        /// The key it acts as.
        key: PublicKey,
        /// Unix seconds.
        expires_at: u64,
    },
    /// A token is gone.
    TokenGone {
        /// BLAKE2s of the token.
        hash: [u8; 32],
    },
    /// A party exists (written by older relays only; superseded by [`Record::PartyV2`]).
    /// Loaded as a party without a host yet (its earliest member becomes the host) and with the
    /// verifier dropped.
    Party {
        /// Its id.
        id: PartyId,
        /// Its name.
        name: String,
        /// Password verifier for protected parties (read, never used, never written).
        verifier: Option<LegacyVerifier>,
        /// Unix seconds.
        created_at: u64,
    },
    /// A party and everything in it are gone.
    PartyGone {
        /// Its id.
        id: PartyId,
    },
    /// A member exists (or changed name or endpoints). Written by older relays only
    /// (superseded by [`Record::MemberV2`]); loaded as an admitted member, admitted in the order
    /// the records come.
    Member {
        /// Which party.
        party: PartyId,
        /// The member's key (its id derives from it).
        key: PublicKey,
        /// Display name.
        name: String,
        /// Advertised endpoints.
        endpoints: Vec<SocketAddr>,
        /// Unix seconds.
        joined_at: u64,
    },
    /// A member left or timed out.
    MemberGone {
        /// Which party.
        party: PartyId,
        /// Which member.
        peer: PeerId,
    },
    /// A relay session exists.
    Session {
        /// Its id.
        id: SessionId,
        /// The party both members are in.
        party: PartyId,
        /// One member.
        a: PublicKey,
        /// The other.
        b: PublicKey,
    },
    /// A relay session is gone.
    SessionGone {
        /// Its id.
        id: SessionId,
    },
    /// A token exists (or changed), with what its limits and revocation need. Supersedes
    /// [`Record::Token`], which older journals and snapshots still hold (loaded as a token with
    /// no source, no access-key generation and the full lifetime).
    TokenV2 {
        /// BLAKE2s of the token.
        hash: [u8; 32],
        /// The key it acts as.
        key: PublicKey,
        /// Unix seconds.
        expires_at: u64,
        /// The source it was registered from, as counted by `control.max_tokens_per_ip`
        /// (an IPv4 address or an IPv6 /64).
        source: Option<IpAddr>,
        /// Which access key it was registered under (see `tokens::access_generation`).
        generation: Option<[u8; 8]>,
        /// Issued with the short lifetime of keys in no party; extended when the key joins one.
        provisional: bool,
    },
    /// A party exists (or its name, flag, host or roster version changed).
    PartyV2 {
        /// Its id.
        id: PartyId,
        /// Its name.
        name: String,
        /// Whether its host asks for a password (informational).
        protected: bool,
        /// Unix seconds.
        created_at: u64,
        /// The relay's current host.
        host: PeerId,
        /// The last roster version published (0: none).
        roster_version: u64,
    },
    /// A member or applicant exists (or changed name, endpoints or admission).
    MemberV2 {
        /// Which party.
        party: PartyId,
        /// The member's key (its id derives from it).
        key: PublicKey,
        /// Display name.
        name: String,
        /// Advertised endpoints.
        endpoints: Vec<SocketAddr>,
        /// Unix seconds.
        joined_at: u64,
        /// `Some(order)` when admitted (smaller: admitted earlier; the earliest-admitted member
        /// succeeds a host that leaves), `None` for an applicant.
        admitted: Option<u64>,
    },
}

/// A party password verifier as relays before the one-authority change stored it: a random salt
/// and a stretched hash. Only here so their journals and snapshots still decode (postcard is not
/// self-describing: the layout must match); it is dropped on load and never written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyVerifier {
    /// Random per party.
    pub salt: [u8; 16],
    /// The stretched hash.
    pub hash: [u8; 32],
}

impl Record {
    /// Whether this record holds a password verifier (from an older relay): the relay compacts
    /// its state at start when any does, so verifiers leave the disk.
    pub fn holds_verifier(&self) -> bool {
        matches!(
            self,
            Record::Party {
                verifier: Some(_),
                ..
            }
        )
    }
}

/// A storage failure (I/O or corruption), with the file it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct StoreError {
    /// The file.
    pub path: String,
    /// What went wrong.
    pub message: String,
    /// The filesystem is full (or the quota used up): freeing space fixes it.
    pub disk_full: bool,
}

impl StoreError {
    fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        StoreError {
            path: path.display().to_string(),
            message: e.to_string(),
            disk_full: false,
        }
    }

    /// An I/O error, recognising a full disk.
    fn from_io(path: &Path, e: &std::io::Error) -> Self {
        let disk_full = e.kind() == std::io::ErrorKind::StorageFull
            || e.kind() == std::io::ErrorKind::QuotaExceeded
            || matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT));
        StoreError {
            disk_full,
            ..StoreError::io(path, e)
        }
    }

    /// What went wrong in a few words, for clients whose changes are refused meanwhile.
    pub fn cause(&self) -> String {
        if self.disk_full {
            "disk full".into()
        } else {
            format!("storage error ({})", self.message)
        }
    }
}

/// Where the relay's durable state lives. Implementations must make a committed batch durable
/// before returning, and after a crash expose a prefix of whole batches (at most the last one lost).
pub trait Store: Send {
    /// Everything stored, in order: folding these records rebuilds the state.
    fn load(&mut self) -> Result<Vec<Record>, StoreError>;
    /// Makes a batch durable. If that fails, the store keeps the batch as its backlog (after any
    /// earlier backlog, in order) and makes it durable before anything committed later: the
    /// caller retries with [`Store::retry`], not by committing the batch again.
    fn commit(&mut self, batch: &[Record]) -> Result<(), StoreError>;
    /// Tries again to make the backlog durable (`Ok` at once if there is none).
    fn retry(&mut self) -> Result<(), StoreError>;
    /// Records committed but not durable yet (a failed write's batch): while there are any,
    /// state changes are not being saved.
    fn backlog(&self) -> usize;
    /// Whether the store would like a [`Store::compact`] now.
    fn wants_compaction(&self) -> bool;
    /// Replaces everything committed so far with `state` (the current state as put records,
    /// reflecting exactly the batches committed so far). Refused while there is a backlog.
    fn compact(&mut self, state: &[Record]) -> Result<(), StoreError>;
}

/// A store that forgets everything on exit (tests, and to show the trait is all a backend needs).
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// All committed records (or the last compacted state plus later batches).
    pub records: Vec<Record>,
}

impl Store for MemoryStore {
    fn load(&mut self) -> Result<Vec<Record>, StoreError> {
        Ok(self.records.clone())
    }
    fn commit(&mut self, batch: &[Record]) -> Result<(), StoreError> {
        self.records.extend_from_slice(batch);
        Ok(())
    }
    fn retry(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    fn backlog(&self) -> usize {
        0
    }
    fn wants_compaction(&self) -> bool {
        false
    }
    fn compact(&mut self, state: &[Record]) -> Result<(), StoreError> {
        self.records = state.to_vec();
        Ok(())
    }
}

/// The embedded store: `journal.bin` + `snapshot.bin` in one directory (see the module docs).
pub struct FileStore {
    dir: PathBuf,
    journal: Option<File>,
    /// Bytes of whole batches in the journal.
    journal_len: u64,
    /// Set after a failed write: the journal must be cut back to this length before anything
    /// else is appended.
    cut_to: Option<u64>,
    /// Encoded batches (frames and markers) whose write failed, oldest first.
    backlog: Vec<u8>,
    /// Records in `backlog`.
    backlog_records: u64,
    /// Highest sequence number in the journal (durable).
    last_seq: u64,
    /// Highest sequence number encoded (durable or in the backlog).
    next_seq: u64,
    journal_records: u64,
    compact_after: u64,
    #[cfg(test)]
    faults: Faults,
}

/// Injected failures (tests only): the store's reaction to errors cannot be tested otherwise.
#[cfg(test)]
#[derive(Debug, Default)]
struct Faults {
    /// The next append writes this many bytes, then fails.
    partial_write: Option<usize>,
    /// Truncations fail.
    fail_cut: bool,
    /// Every append writes nothing and fails as a full disk would.
    full: bool,
}

fn check(seq: u64, payload: &[u8]) -> [u8; 8] {
    let d = Blake2s256::new()
        .chain_update(b"lanrage relay journal")
        .chain_update(seq.to_le_bytes())
        .chain_update(payload)
        .finalize();
    let mut c = [0u8; 8];
    c.copy_from_slice(&d[..8]);
    c
}

fn raw_frame(seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&check(seq, payload));
    out.extend_from_slice(payload);
}

fn frame(seq: u64, record: &Record, out: &mut Vec<u8>) {
    let payload = postcard::to_allocvec(record).unwrap_or_default();
    raw_frame(seq, &payload, out);
}

/// The end-of-batch marker: a frame with an empty payload (no record encodes to nothing).
fn marker(seq: u64, out: &mut Vec<u8>) {
    raw_frame(seq, &[], out);
}

/// A parsed journal frame: a record, or the end of a batch.
#[derive(Debug)]
enum Item {
    Record(u64, Record),
    End,
}

/// Parses frames from `bytes` (at most `max` records); returns them, each with the offset just
/// after it, and how many bytes were valid.
fn parse_frames(bytes: &[u8], max: Option<u64>) -> (Vec<(Item, usize)>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    let mut records = 0u64;
    while max.is_none_or(|m| records < m) {
        let Some(hdr) = bytes.get(pos..pos + FRAME_HEADER) else {
            break;
        };
        let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
        let mut seq_b = [0u8; 8];
        seq_b.copy_from_slice(&hdr[4..12]);
        let seq = u64::from_le_bytes(seq_b);
        if len > MAX_RECORD {
            break;
        }
        let Some(payload) = bytes.get(pos + FRAME_HEADER..pos + FRAME_HEADER + len) else {
            break;
        };
        if hdr[12..20] != check(seq, payload) {
            break;
        }
        let end = pos + FRAME_HEADER + len;
        if payload.is_empty() {
            out.push((Item::End, end));
        } else {
            let Ok(record) = postcard::from_bytes::<Record>(payload) else {
                break;
            };
            out.push((Item::Record(seq, record), end));
            records += 1;
        }
        pos = end;
    }
    (out, pos)
}

fn open_journal(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| StoreError::io(path, e))
}

impl FileStore {
    /// A store in `dir` (created if missing). Nothing is read until [`Store::load`].
    pub fn new(dir: &Path, compact_after: u64) -> Self {
        FileStore {
            dir: dir.to_path_buf(),
            journal: None,
            journal_len: 0,
            cut_to: None,
            backlog: Vec::new(),
            backlog_records: 0,
            last_seq: 0,
            next_seq: 0,
            journal_records: 0,
            compact_after,
            #[cfg(test)]
            faults: Faults::default(),
        }
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join(JOURNAL_FILE)
    }

    /// Appends and syncs `buf`.
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let file = self
            .journal
            .as_mut()
            .ok_or_else(|| std::io::Error::other("store not loaded"))?;
        #[cfg(test)]
        if let Some(n) = self.faults.partial_write.take() {
            file.write_all(&buf[..n.min(buf.len())])?;
            return Err(std::io::Error::other("injected partial write"));
        }
        #[cfg(test)]
        if self.faults.full {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        file.write_all(buf)?;
        file.sync_data()
    }

    /// Cuts the journal back to `len` bytes (the end of its last whole batch).
    fn cut(&mut self, len: u64) -> std::io::Result<()> {
        #[cfg(test)]
        if self.faults.fail_cut {
            return Err(std::io::Error::other("injected truncation failure"));
        }
        let file = self
            .journal
            .as_mut()
            .ok_or_else(|| std::io::Error::other("store not loaded"))?;
        file.set_len(len)?;
        file.sync_data()
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::io(&self.dir, e))
    }

    /// Reads a journal without the header the way relays before it did, and rewrites it with
    /// the header and a marker after what was kept (see the module docs). Returns the frames
    /// kept and the new journal's length.
    fn convert_legacy(&self, bytes: &[u8]) -> Result<(Vec<(Item, usize)>, usize), StoreError> {
        let path = self.journal_path();
        let (mut items, mut valid) = parse_frames(bytes, None);
        // With markers, only whole batches count: cut after the last one.
        if let Some(last_end) = items.iter().rposition(|(i, _)| matches!(i, Item::End)) {
            valid = items[last_end].1;
            items.truncate(last_end + 1);
        }
        if valid < bytes.len() {
            tracing::warn!(file = %path.display(), kept = valid, dropped = bytes.len() - valid, "journal ends with a torn or corrupt batch (crash during a write); truncating it there");
        }
        let mut out = Vec::with_capacity(JOURNAL_MAGIC.len() + valid + FRAME_HEADER);
        out.extend_from_slice(JOURNAL_MAGIC);
        out.extend_from_slice(&bytes[..valid]);
        if items.last().is_some_and(|(i, _)| !matches!(i, Item::End)) {
            marker(0, &mut out);
        }
        let tmp = self.dir.join("journal.tmp");
        let mut f = File::create(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
        f.write_all(&out)
            .and_then(|_| f.sync_all())
            .map_err(|e| StoreError::io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| StoreError::io(&path, e))?;
        self.sync_dir()?;
        tracing::info!(file = %path.display(), records = items.iter().filter(|(i, _)| matches!(i, Item::Record(..))).count(), "journal from an older relay converted to the current format");
        Ok((items, out.len()))
    }

    fn read_snapshot(&self) -> Result<(u64, Vec<Record>), StoreError> {
        let path = self.dir.join(SNAPSHOT_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, Vec::new())),
            Err(e) => return Err(StoreError::io(&path, e)),
        };
        let corrupt = |what: &str| {
            StoreError::io(&path, format!("corrupt snapshot ({what}); restore it from a backup or move it away to start empty"))
        };
        if bytes.len() < 8 + 8 + 8 + 32 || &bytes[..8] != SNAPSHOT_MAGIC {
            return Err(corrupt("bad header"));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if Blake2s256::digest(body).as_slice() != sum {
            return Err(corrupt("checksum mismatch"));
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&body[8..16]);
        let last_seq = u64::from_le_bytes(n);
        n.copy_from_slice(&body[16..24]);
        let count = u64::from_le_bytes(n);
        let (items, used) = parse_frames(&body[24..], Some(count));
        let records: Vec<Record> = items
            .into_iter()
            .filter_map(|(i, _)| match i {
                Item::Record(_, r) => Some(r),
                Item::End => None,
            })
            .collect();
        if records.len() as u64 != count || 24 + used != body.len() {
            return Err(corrupt("record count"));
        }
        Ok((last_seq, records))
    }
}

impl Store for FileStore {
    fn load(&mut self) -> Result<Vec<Record>, StoreError> {
        fs::create_dir_all(&self.dir).map_err(|e| StoreError::io(&self.dir, e))?;
        let (snap_seq, mut records) = self.read_snapshot()?;
        let path = self.journal_path();
        let mut file = open_journal(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| StoreError::io(&path, e))?;
        let (items, valid) = if let Some(body) = bytes.strip_prefix(JOURNAL_MAGIC) {
            // Only whole batches count: cut after the last marker (none: nothing is whole).
            let (mut items, _) = parse_frames(body, None);
            let end = match items.iter().rposition(|(i, _)| matches!(i, Item::End)) {
                Some(last) => {
                    let end = items[last].1;
                    items.truncate(last + 1);
                    end
                }
                None => {
                    items.clear();
                    0
                }
            };
            if JOURNAL_MAGIC.len() + end < bytes.len() {
                tracing::warn!(file = %path.display(), kept = JOURNAL_MAGIC.len() + end, dropped = bytes.len() - JOURNAL_MAGIC.len() - end, "journal ends with a torn or corrupt batch (crash during a write); truncating it there");
                file.set_len(JOURNAL_HEADER + end as u64)
                    .and_then(|_| file.sync_all())
                    .map_err(|e| StoreError::io(&path, e))?;
            }
            (items, JOURNAL_MAGIC.len() + end)
        } else if JOURNAL_MAGIC.starts_with(&bytes) {
            // New, or a crash while its header was being written.
            file.set_len(0)
                .and_then(|_| file.write_all(JOURNAL_MAGIC))
                .and_then(|_| file.sync_all())
                .map_err(|e| StoreError::io(&path, e))?;
            (Vec::new(), JOURNAL_MAGIC.len())
        } else {
            let (items, valid) = self.convert_legacy(&bytes)?;
            file = open_journal(&path)?;
            (items, valid)
        };
        self.last_seq = snap_seq;
        self.journal_records = 0;
        for (item, _) in items {
            let Item::Record(seq, r) = item else {
                continue;
            };
            self.journal_records += 1;
            if seq > snap_seq {
                records.push(r);
                self.last_seq = self.last_seq.max(seq);
            }
        }
        self.journal = Some(file);
        self.journal_len = valid as u64;
        self.cut_to = None;
        self.backlog.clear();
        self.backlog_records = 0;
        self.next_seq = self.last_seq;
        self.sync_dir()?;
        Ok(records)
    }

    fn commit(&mut self, batch: &[Record]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        // Encoded once: a failed write keeps these bytes and writes them again as they are.
        self.backlog.reserve(batch.len() * 128 + FRAME_HEADER);
        for r in batch {
            self.next_seq += 1;
            frame(self.next_seq, r, &mut self.backlog);
        }
        self.next_seq += 1;
        marker(self.next_seq, &mut self.backlog);
        self.backlog_records += batch.len() as u64;
        self.retry()
    }

    fn retry(&mut self) -> Result<(), StoreError> {
        if self.backlog.is_empty() {
            return Ok(());
        }
        let path = self.journal_path();
        if let Some(len) = self.cut_to {
            self.cut(len).map_err(|e| {
                StoreError::io(
                    &path,
                    format!("a failed write left a torn batch at the end that cannot be cut off ({e}); not writing until it can"),
                )
            })?;
            self.cut_to = None;
        }
        let buf = std::mem::take(&mut self.backlog);
        let written = self.append(&buf);
        self.backlog = buf;
        if let Err(e) = written {
            // Part of the backlog may be in the file: cut it off now, or before the next write.
            let len = self.journal_len;
            if self.cut(len).is_err() {
                self.cut_to = Some(len);
            }
            return Err(StoreError::from_io(&path, &e));
        }
        self.journal_len += self.backlog.len() as u64;
        self.last_seq = self.next_seq;
        self.journal_records += self.backlog_records;
        self.backlog.clear();
        self.backlog_records = 0;
        // Do not keep a large buffer after a large backlog.
        self.backlog.shrink_to(64 * 1024);
        Ok(())
    }

    fn backlog(&self) -> usize {
        self.backlog_records as usize
    }

    fn wants_compaction(&self) -> bool {
        self.journal_records >= self.compact_after
    }

    fn compact(&mut self, state: &[Record]) -> Result<(), StoreError> {
        if !self.backlog.is_empty() {
            // The state holds the backlog's changes, but the journal after the snapshot would
            // later replay them on top of newer ones.
            return Err(StoreError::io(
                &self.journal_path(),
                "not compacting while a failed write is waiting to be retried",
            ));
        }
        let tmp = self.dir.join("snapshot.tmp");
        let path = self.dir.join(SNAPSHOT_FILE);
        let mut buf = Vec::with_capacity(64 + state.len() * 128);
        buf.extend_from_slice(SNAPSHOT_MAGIC);
        buf.extend_from_slice(&self.last_seq.to_le_bytes());
        buf.extend_from_slice(&(state.len() as u64).to_le_bytes());
        for r in state {
            frame(0, r, &mut buf);
        }
        let sum = Blake2s256::digest(&buf);
        buf.extend_from_slice(&sum);
        let mut f = File::create(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
        f.write_all(&buf)
            .and_then(|_| f.sync_all())
            .map_err(|e| StoreError::io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| StoreError::io(&path, e))?;
        self.sync_dir()?;
        let jpath = self.dir.join(JOURNAL_FILE);
        if let Some(j) = self.journal.as_mut() {
            // Back to the header (kept: see the module docs).
            j.set_len(JOURNAL_HEADER)
                .and_then(|_| j.sync_all())
                .map_err(|e| StoreError::io(&jpath, e))?;
        }
        // Whatever a failed write left is gone with the rest of the journal.
        self.journal_len = JOURNAL_HEADER;
        self.cut_to = None;
        self.journal_records = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn party(n: u8) -> Record {
        Record::Party {
            id: PartyId([n; 10]),
            name: format!("p{n}"),
            verifier: None,
            created_at: u64::from(n),
        }
    }

    #[test]
    fn commit_load_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileStore::new(dir.path(), 100);
        assert!(s.load().unwrap().is_empty());
        s.commit(&[party(1), party(2)]).unwrap();
        s.commit(&[Record::PartyGone {
            id: PartyId([1; 10]),
        }])
        .unwrap();
        drop(s);
        let mut s = FileStore::new(dir.path(), 100);
        assert_eq!(
            s.load().unwrap(),
            vec![
                party(1),
                party(2),
                Record::PartyGone {
                    id: PartyId([1; 10])
                }
            ]
        );
        // Appends continue after a reload.
        s.commit(&[party(3)]).unwrap();
        let mut s = FileStore::new(dir.path(), 100);
        assert_eq!(s.load().unwrap().len(), 4);
    }

    #[test]
    fn torn_tail_is_cut_and_earlier_batches_survive() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileStore::new(dir.path(), 100);
        s.load().unwrap();
        s.commit(&[party(1)]).unwrap();
        s.commit(&[party(2), party(3)]).unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let full = fs::read(&path).unwrap();
        // Every possible torn length keeps exactly the whole batches before the tear: never
        // half of the second one.
        for cut in 0..full.len() {
            fs::write(&path, &full[..cut]).unwrap();
            let mut s = FileStore::new(dir.path(), 100);
            let got = s.load().unwrap();
            assert!([0, 1, 3].contains(&got.len()), "cut at {cut}: {got:?}");
            assert_eq!(got[..], [party(1), party(2), party(3)][..got.len()]);
            assert!(fs::metadata(&path).unwrap().len() as usize <= cut.max(JOURNAL_MAGIC.len()));
            // And the store stays writable after the cut.
            s.commit(&[party(9)]).unwrap();
            let mut s = FileStore::new(dir.path(), 100);
            assert_eq!(s.load().unwrap().last(), Some(&party(9)));
        }
        // A flipped byte at the end (the last batch's marker) drops just that batch.
        let mut bad = full.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        fs::write(&path, &bad).unwrap();
        let mut s = FileStore::new(dir.path(), 100);
        assert_eq!(s.load().unwrap(), vec![party(1)]);
    }

    #[test]
    fn journals_without_batch_markers_are_read_whole() {
        // What relays before batch markers wrote: records only.
        let dir = tempfile::tempdir().unwrap();
        let mut old = Vec::new();
        for (seq, n) in [(1, 1), (2, 2)] {
            frame(seq, &party(n), &mut old);
        }
        fs::write(dir.path().join(JOURNAL_FILE), &old).unwrap();
        let mut s = FileStore::new(dir.path(), 100);
        assert_eq!(s.load().unwrap(), vec![party(1), party(2)]);
        // It was converted at once: header, the old frames, a marker after them.
        let path = dir.path().join(JOURNAL_FILE);
        let converted = fs::read(&path).unwrap();
        assert!(converted.starts_with(JOURNAL_MAGIC));
        assert_eq!(&converted[JOURNAL_MAGIC.len()..][..old.len()], &old[..]);
        s.commit(&[party(3), party(4)]).unwrap();
        let mut s = FileStore::new(dir.path(), 100);
        assert_eq!(
            s.load().unwrap(),
            vec![party(1), party(2), party(3), party(4)]
        );
        // So a torn batch written after the conversion is dropped, not read half.
        let full = fs::read(&path).unwrap();
        fs::write(&path, &full[..full.len() - 30]).unwrap();
        let mut s = FileStore::new(dir.path(), 100);
        assert_eq!(s.load().unwrap(), vec![party(1), party(2)]);
    }

    #[test]
    fn journals_without_the_header_keep_their_batch_markers() {
        // What relays with markers but before the header wrote: two batches, the second torn.
        let dir = tempfile::tempdir().unwrap();
        let mut old = Vec::new();
        frame(1, &party(1), &mut old);
        marker(2, &mut old);
        let whole = old.len();
        frame(3, &party(2), &mut old);
        frame(4, &party(3), &mut old);
        marker(5, &mut old);
        fs::write(dir.path().join(JOURNAL_FILE), &old[..old.len() - 3]).unwrap();
        let mut s = FileStore::new(dir.path(), 100);
        assert_eq!(s.load().unwrap(), vec![party(1)]);
        let converted = fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
        assert_eq!(converted.len(), JOURNAL_MAGIC.len() + whole);
        s.commit(&[party(4)]).unwrap();
        let mut s = FileStore::new(dir.path(), 100);
        assert_eq!(s.load().unwrap(), vec![party(1), party(4)]);
    }

    #[test]
    fn a_failed_write_is_cut_off_so_later_batches_survive() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileStore::new(dir.path(), 100);
        s.load().unwrap();
        s.commit(&[party(1)]).unwrap();
        // The disk fills up halfway through the next batch: it becomes the backlog.
        s.faults.partial_write = Some(30);
        assert!(s.commit(&[party(2), party(3)]).is_err());
        assert_eq!(s.backlog(), 2);
        // A batch committed meanwhile queues behind it; the retry writes both.
        s.faults.full = true;
        let err = s.commit(&[party(4)]).unwrap_err();
        assert!(err.disk_full && err.cause() == "disk full", "{err}");
        assert_eq!(s.backlog(), 3);
        s.faults.full = false;
        s.retry().unwrap();
        assert_eq!(s.backlog(), 0);
        s.commit(&[party(5)]).unwrap();
        let mut r = FileStore::new(dir.path(), 100);
        assert_eq!(
            r.load().unwrap(),
            vec![party(1), party(2), party(3), party(4), party(5)]
        );
    }

    #[test]
    fn a_full_disk_keeps_the_batch_encoded_once_and_writes_it_when_space_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let mut s = FileStore::new(dir.path(), 1);
        s.load().unwrap();
        s.commit(&[party(1)]).unwrap();
        let len = fs::metadata(&path).unwrap().len();
        s.faults.full = true;
        let batch: Vec<Record> = (2..=200).map(party).collect();
        assert!(s.commit(&batch).unwrap_err().disk_full);
        let encoded = s.backlog.clone();
        for _ in 0..5 {
            assert!(s.retry().unwrap_err().disk_full);
        }
        // The same bytes wait, nothing was appended, nothing is compacted behind their back.
        assert_eq!(s.backlog, encoded);
        assert_eq!(s.backlog(), batch.len());
        assert_eq!(fs::metadata(&path).unwrap().len(), len);
        assert!(s.wants_compaction());
        assert!(s.compact(&[party(1)]).is_err());
        // Space is back.
        s.faults.full = false;
        s.retry().unwrap();
        assert_eq!(s.backlog(), 0);
        let mut want = vec![party(1)];
        want.extend(batch.iter().cloned());
        assert_eq!(FileStore::new(dir.path(), 1).load().unwrap(), want);
        s.compact(&want).unwrap();
        assert_eq!(FileStore::new(dir.path(), 1).load().unwrap(), want);
    }

    #[test]
    fn a_journal_that_cannot_be_cut_is_not_written_until_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileStore::new(dir.path(), 100);
        s.load().unwrap();
        s.commit(&[party(1)]).unwrap();
        s.faults.partial_write = Some(30);
        s.faults.fail_cut = true;
        assert!(s.commit(&[party(2)]).is_err());
        // Nothing is appended behind the torn tail while it cannot be cut.
        let len = fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap().len();
        let err = s.commit(&[party(3)]).unwrap_err().to_string();
        assert!(err.contains("cannot be cut"), "{err}");
        let err = s.retry().unwrap_err().to_string();
        assert!(err.contains("cannot be cut"), "{err}");
        assert_eq!(
            fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap().len(),
            len
        );
        assert_eq!(s.backlog(), 2);
        // Once it can, it cuts and carries on.
        s.faults.fail_cut = false;
        s.retry().unwrap();
        assert_eq!(s.backlog(), 0);
        let mut r = FileStore::new(dir.path(), 100);
        assert_eq!(r.load().unwrap(), vec![party(1), party(2), party(3)]);
    }

    #[test]
    fn compaction_replaces_journal_and_skips_old_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileStore::new(dir.path(), 2);
        s.load().unwrap();
        s.commit(&[party(1), party(2)]).unwrap();
        assert!(s.wants_compaction());
        let journal_before = fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
        s.compact(&[party(2)]).unwrap();
        assert!(!s.wants_compaction());
        assert_eq!(
            fs::read(dir.path().join(JOURNAL_FILE)).unwrap(),
            JOURNAL_MAGIC
        );
        s.commit(&[party(3)]).unwrap();
        let mut r = FileStore::new(dir.path(), 2);
        assert_eq!(r.load().unwrap(), vec![party(2), party(3)]);
        // Crash between the snapshot rename and the journal truncation: old frames are skipped.
        let after = fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
        let mut both = journal_before.clone();
        both.extend_from_slice(&after[JOURNAL_MAGIC.len()..]);
        fs::write(dir.path().join(JOURNAL_FILE), both).unwrap();
        let mut r = FileStore::new(dir.path(), 2);
        assert_eq!(r.load().unwrap(), vec![party(2), party(3)]);
    }

    #[test]
    fn a_torn_first_batch_after_a_compaction_is_not_half_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileStore::new(dir.path(), 1);
        s.load().unwrap();
        s.commit(&[party(1)]).unwrap();
        s.compact(&[party(1)]).unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let base = fs::metadata(&path).unwrap().len() as usize;
        // The first batch after the compaction: nothing before it marks a batch boundary.
        s.commit(&[party(2), party(3)]).unwrap();
        drop(s);
        let full = fs::read(&path).unwrap();
        for cut in base..full.len() {
            fs::write(&path, &full[..cut]).unwrap();
            let got = FileStore::new(dir.path(), 1).load().unwrap();
            assert_eq!(got, vec![party(1)], "cut at {cut} of {}", full.len());
        }
        fs::write(&path, &full).unwrap();
        let got = FileStore::new(dir.path(), 1).load().unwrap();
        assert_eq!(got, vec![party(1), party(2), party(3)]);
    }

    #[test]
    fn a_torn_first_batch_of_a_new_journal_is_not_half_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileStore::new(dir.path(), 100);
        s.load().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let base = fs::metadata(&path).unwrap().len() as usize;
        s.commit(&[party(1), party(2)]).unwrap();
        drop(s);
        let full = fs::read(&path).unwrap();
        for cut in base..full.len() {
            fs::write(&path, &full[..cut]).unwrap();
            let mut s = FileStore::new(dir.path(), 100);
            assert_eq!(s.load().unwrap(), vec![], "cut at {cut} of {}", full.len());
            // Still writable, and what is written next is read back whole.
            s.commit(&[party(3)]).unwrap();
            assert_eq!(
                FileStore::new(dir.path(), 100).load().unwrap(),
                vec![party(3)]
            );
        }
    }

    #[test]
    fn corrupt_snapshot_refuses_to_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileStore::new(dir.path(), 1);
        s.load().unwrap();
        s.commit(&[party(1)]).unwrap();
        s.compact(&[party(1)]).unwrap();
        let path = dir.path().join(SNAPSHOT_FILE);
        let mut b = fs::read(&path).unwrap();
        b[30] ^= 1;
        fs::write(&path, b).unwrap();
        let err = FileStore::new(dir.path(), 1)
            .load()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("snapshot.bin") && err.contains("corrupt"),
            "{err}"
        );
    }
}
