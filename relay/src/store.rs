//! Durable state behind a small trait, so a shared database can back several control servers
//! later; the embedded implementation is a journal plus a snapshot in `state_dir`.
//!
//! What is stored: tokens (hashes only), parties (name, password verifier), members (key, name,
//! endpoints), relay sessions (id and the two members). What is not: heartbeat times (reset to
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
//! - `journal.bin`: frames `len (u32 LE) | seq (u64 LE) | check (8) | postcard(Record)`, with
//!   `check = BLAKE2s("lanrage relay journal" || seq || payload)[..8]`. A batch is one `write` and
//!   one `fdatasync`. On load, reading stops at the first frame that is short or fails its check
//!   (a torn last write after kill -9 or power loss) and the file is truncated there: at most the
//!   batch being written is lost.
//! - `snapshot.bin`: `"LRSNAP01" | last_seq (u64 LE) | count (u64 LE) | frames | BLAKE2s(all before)`.
//!   After `store.compact_after_records` journal records the whole state is written to
//!   `snapshot.tmp`, fsynced, renamed over `snapshot.bin`, the directory fsynced, then the journal
//!   truncated. Journal frames with `seq <= last_seq` are skipped on load, so a crash between the
//!   rename and the truncation re-applies nothing twice (and records are idempotent anyway).
//!   A snapshot that fails its checksum stops the relay: it was renamed into place whole, so that
//!   is disk corruption for the operator to look at, not something to paper over.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use blake2::{Blake2s256, Digest};
use lanrage_proto::ids::{PartyId, PeerId, PublicKey, SessionId};
use serde::{Deserialize, Serialize};

use crate::password::Verifier;

/// Journal file name inside the state directory.
pub const JOURNAL_FILE: &str = "journal.bin";
/// Snapshot file name inside the state directory.
pub const SNAPSHOT_FILE: &str = "snapshot.bin";
const SNAPSHOT_MAGIC: &[u8; 8] = b"LRSNAP01";
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
    /// A party exists.
    Party {
        /// Its id.
        id: PartyId,
        /// Its name.
        name: String,
        /// Password verifier for protected parties.
        verifier: Option<Verifier>,
        /// Unix seconds.
        created_at: u64,
    },
    /// A party and everything in it are gone.
    PartyGone {
        /// Its id.
        id: PartyId,
    },
    /// A member exists (or changed name or endpoints).
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
}

/// A storage failure (I/O or corruption), with the file it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct StoreError {
    /// The file.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

impl StoreError {
    fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        StoreError {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}

/// Where the relay's durable state lives. Implementations must make a committed batch durable
/// before returning, and after a crash expose a prefix of whole batches (at most the last one lost).
pub trait Store: Send {
    /// Everything stored, in order: folding these records rebuilds the state.
    fn load(&mut self) -> Result<Vec<Record>, StoreError>;
    /// Makes a batch durable.
    fn commit(&mut self, batch: &[Record]) -> Result<(), StoreError>;
    /// Whether the store would like a [`Store::compact`] now.
    fn wants_compaction(&self) -> bool;
    /// Replaces everything committed so far with `state` (the current state as put records,
    /// reflecting exactly the batches committed so far).
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
    last_seq: u64,
    journal_records: u64,
    compact_after: u64,
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

fn frame(seq: u64, record: &Record, out: &mut Vec<u8>) {
    let payload = postcard::to_allocvec(record).unwrap_or_default();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&check(seq, &payload));
    out.extend_from_slice(&payload);
}

/// Parses frames from `bytes`; returns the records with their seqs and how many bytes were valid.
fn parse_frames(bytes: &[u8], max: Option<u64>) -> (Vec<(u64, Record)>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while max.is_none_or(|m| (out.len() as u64) < m) {
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
        let Ok(record) = postcard::from_bytes::<Record>(payload) else {
            break;
        };
        out.push((seq, record));
        pos += FRAME_HEADER + len;
    }
    (out, pos)
}

impl FileStore {
    /// A store in `dir` (created if missing). Nothing is read until [`Store::load`].
    pub fn new(dir: &Path, compact_after: u64) -> Self {
        FileStore {
            dir: dir.to_path_buf(),
            journal: None,
            last_seq: 0,
            journal_records: 0,
            compact_after,
        }
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::io(&self.dir, e))
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
        let (records, used) = parse_frames(&body[24..], Some(count));
        if records.len() as u64 != count || 24 + used != body.len() {
            return Err(corrupt("record count"));
        }
        Ok((last_seq, records.into_iter().map(|(_, r)| r).collect()))
    }
}

impl Store for FileStore {
    fn load(&mut self) -> Result<Vec<Record>, StoreError> {
        fs::create_dir_all(&self.dir).map_err(|e| StoreError::io(&self.dir, e))?;
        let (snap_seq, mut records) = self.read_snapshot()?;
        let path = self.dir.join(JOURNAL_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StoreError::io(&path, e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| StoreError::io(&path, e))?;
        let (frames, valid) = parse_frames(&bytes, None);
        if valid < bytes.len() {
            tracing::warn!(file = %path.display(), kept = valid, dropped = bytes.len() - valid, "journal ends with a torn or corrupt record (crash during a write); truncating it there");
            file.set_len(valid as u64)
                .map_err(|e| StoreError::io(&path, e))?;
            file.sync_all().map_err(|e| StoreError::io(&path, e))?;
        }
        self.last_seq = snap_seq;
        self.journal_records = 0;
        for (seq, r) in frames {
            self.journal_records += 1;
            if seq > snap_seq {
                records.push(r);
                self.last_seq = self.last_seq.max(seq);
            }
        }
        self.journal = Some(file);
        self.sync_dir()?;
        Ok(records)
    }

    fn commit(&mut self, batch: &[Record]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(JOURNAL_FILE);
        let file = self
            .journal
            .as_mut()
            .ok_or_else(|| StoreError::io(&path, "store not loaded"))?;
        let mut buf = Vec::with_capacity(batch.len() * 128);
        let mut seq = self.last_seq;
        for r in batch {
            seq += 1;
            frame(seq, r, &mut buf);
        }
        file.write_all(&buf).map_err(|e| StoreError::io(&path, e))?;
        file.sync_data().map_err(|e| StoreError::io(&path, e))?;
        self.last_seq = seq;
        self.journal_records += batch.len() as u64;
        Ok(())
    }

    fn wants_compaction(&self) -> bool {
        self.journal_records >= self.compact_after
    }

    fn compact(&mut self, state: &[Record]) -> Result<(), StoreError> {
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
            j.set_len(0)
                .and_then(|_| j.sync_all())
                .map_err(|e| StoreError::io(&jpath, e))?;
        }
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
        // Every possible torn length keeps exactly the whole records before the tear.
        for cut in 0..full.len() {
            fs::write(&path, &full[..cut]).unwrap();
            let mut s = FileStore::new(dir.path(), 100);
            let got = s.load().unwrap();
            assert!(got.len() <= 3);
            assert_eq!(got[..], [party(1), party(2), party(3)][..got.len()]);
            assert!(fs::metadata(&path).unwrap().len() as usize <= cut);
            // And the store stays writable after the cut.
            s.commit(&[party(9)]).unwrap();
            let mut s = FileStore::new(dir.path(), 100);
            assert_eq!(s.load().unwrap().last(), Some(&party(9)));
        }
        // A flipped byte in the last record drops just that record.
        let mut bad = full.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        fs::write(&path, &bad).unwrap();
        let mut s = FileStore::new(dir.path(), 100);
        assert_eq!(s.load().unwrap(), vec![party(1), party(2)]);
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
            fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap().len(),
            0
        );
        s.commit(&[party(3)]).unwrap();
        let mut r = FileStore::new(dir.path(), 2);
        assert_eq!(r.load().unwrap(), vec![party(2), party(3)]);
        // Crash between the snapshot rename and the journal truncation: old frames are skipped.
        let after = fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
        let mut both = journal_before.clone();
        both.extend_from_slice(&after);
        fs::write(dir.path().join(JOURNAL_FILE), both).unwrap();
        let mut r = FileStore::new(dir.path(), 2);
        assert_eq!(r.load().unwrap(), vec![party(2), party(3)]);
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
