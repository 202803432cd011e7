//! Wiring: lock the state directory, load the key and the stored state, bind the sockets, start
//! the tasks (UDP receivers, HTTP, a 1 s sweeper, the store thread), stop cleanly on
//! SIGTERM/SIGINT with a final flush.
//!
//! The store gets its own OS thread because `fdatasync` blocks: every `store.flush_interval_ms` it
//! takes the pending records from the core (one short lock), commits them as one batch and, when
//! the journal is long, writes a snapshot taken under that same lock ([`Flusher`]). A batch whose
//! write fails stays in the store, encoded once, and is retried with backoff (from the flush
//! interval, doubling, up to [`MAX_RETRY_BACKOFF`]); nothing new is committed meanwhile, and the
//! control plane refuses state changes (503) until the retry succeeds, so the relay recovers by
//! itself when space returns and memory stays bounded while it does not.
//!
//! HTTP connections (control plane and metrics listener) are served with hyper directly rather
//! than `axum::serve`, which has no limits: every connection needs a slot under
//! `control.max_connections` and `control.max_connections_per_ip` ([`ConnLimits`]; over either it
//! is closed at once and counted), and must send each request head within
//! `control.header_timeout_secs` of connecting or of its previous answer (hyper's
//! `header_read_timeout`, which also ends idle keep-alive connections). The router bounds the rest
//! of a request ([`crate::http::REQUEST_TIMEOUT`]). Without these, a few hundred clients opening
//! connections and sending nothing would hold the control plane's file descriptors forever.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower_service::Service;

use crate::config::Config;
use crate::identity::Identity;
use crate::ratelimit::source_key;
use crate::state::Relay;
use crate::store::{FileStore, Record, Store, StoreError};

/// Longest wait between two retries of a failed write (the first retry comes after one flush
/// interval, then the wait doubles): how long the relay may take to notice that space is back.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(2);
/// While writes keep failing, a reminder is logged this often (the first failure at once).
const FAILING_LOG_EVERY: Duration = Duration::from_secs(60);

/// Moves pending records from the core into the store, on the store thread. Time comes in
/// (`now`) and the time of the next round goes out, so tests drive it without sleeping.
#[derive(Debug)]
pub struct Flusher {
    interval: Duration,
    backoff: Duration,
    retry_at: Option<Instant>,
    failing_since: Option<Instant>,
    last_log: Option<Instant>,
}

impl Flusher {
    /// A flusher running every `interval` while writes succeed.
    pub fn new(interval: Duration) -> Self {
        Flusher {
            interval,
            backoff: interval,
            retry_at: None,
            failing_since: None,
            last_log: None,
        }
    }

    /// One round at `now`: retries a failed write when its backoff is over; otherwise (or once
    /// that worked) commits the pending records as one batch and compacts when the store asks.
    /// Returns when the next round is due.
    pub fn run(&mut self, relay: &Relay, store: &mut dyn Store, now: Instant) -> Instant {
        let waiting = store.backlog();
        if waiting > 0 {
            if let Some(at) = self.retry_at.filter(|at| now < *at) {
                return at;
            }
            match store.retry() {
                Ok(()) => self.recovered(relay, waiting, now),
                Err(e) => return self.failed(relay, store, &e, now),
            }
        }
        let compact = store.wants_compaction();
        let (batch, snapshot) = {
            let mut core = relay.core.lock();
            let batch = std::mem::take(&mut core.pending);
            let snapshot = compact.then(|| Relay::snapshot(&core));
            (batch, snapshot)
        };
        if !batch.is_empty() {
            if let Err(e) = store.commit(&batch) {
                // The store keeps the batch (its backlog): no need to hold it here too.
                return self.failed(relay, store, &e, now);
            }
            relay.metrics.store_commits.fetch_add(1, Ordering::Relaxed);
            relay
                .metrics
                .store_records
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        if let Some(snapshot) = snapshot {
            match store.compact(&snapshot) {
                Ok(()) => {
                    relay
                        .metrics
                        .store_compactions
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(records = snapshot.len(), "wrote a state snapshot");
                }
                Err(e) => {
                    relay.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "cannot write snapshot; the journal keeps growing");
                }
            }
        }
        now + self.interval
    }

    /// The final round when stopping: retries at once whatever the backoff says. Returns how
    /// many changes could not be saved.
    pub fn finish(&mut self, relay: &Relay, store: &mut dyn Store, now: Instant) -> usize {
        self.retry_at = None;
        self.run(relay, store, now);
        store.backlog() + relay.core.lock().pending.len()
    }

    fn failed(
        &mut self,
        relay: &Relay,
        store: &dyn Store,
        e: &StoreError,
        now: Instant,
    ) -> Instant {
        relay.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
        relay.metrics.store_blocked.store(1, Ordering::Relaxed);
        let backlog = store.backlog();
        {
            let mut core = relay.core.lock();
            core.saving.failure = Some(e.cause());
            core.saving.backlog = backlog;
        }
        let first = self.failing_since.is_none();
        self.backoff = if first {
            self.interval
        } else {
            (self.backoff * 2).min(MAX_RETRY_BACKOFF.max(self.interval))
        };
        let since = *self.failing_since.get_or_insert(now);
        if first {
            self.last_log = Some(now);
            tracing::error!(error = %e, unsaved = backlog, "cannot save state: refusing state changes (503) until the journal can be written again; retrying by itself (lanrage_relay_store_blocked = 1)");
        } else if self
            .last_log
            .is_none_or(|t| now.saturating_duration_since(t) >= FAILING_LOG_EVERY)
        {
            self.last_log = Some(now);
            tracing::warn!(error = %e, unsaved = backlog, failing_for_secs = now.saturating_duration_since(since).as_secs(), "still cannot save state; state changes are refused meanwhile");
        }
        let at = now + self.backoff;
        self.retry_at = Some(at);
        at
    }

    fn recovered(&mut self, relay: &Relay, records: usize, now: Instant) {
        {
            let mut core = relay.core.lock();
            core.saving.failure = None;
            core.saving.backlog = 0;
        }
        relay.metrics.store_blocked.store(0, Ordering::Relaxed);
        relay.metrics.store_commits.fetch_add(1, Ordering::Relaxed);
        relay
            .metrics
            .store_records
            .fetch_add(records as u64, Ordering::Relaxed);
        let failed_for = self
            .failing_since
            .map_or(0, |t| now.saturating_duration_since(t).as_secs());
        tracing::warn!(
            records,
            failed_for_secs = failed_for,
            "the journal is writable again; state changes are saved and accepted again"
        );
        self.failing_since = None;
        self.retry_at = None;
        self.backoff = self.interval;
    }
}

/// Creates the state directory (0700) and takes its lock, then loads or creates the relay key:
/// in that order, so two relays started at once on a new directory cannot both make a key (the
/// loser's key would end up nowhere, or worse, replace the winner's).
pub fn prepare_state_dir(cfg: &Config) -> anyhow::Result<(File, Identity)> {
    let dir = &cfg.control.state_dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let lock = lock_state_dir(cfg)?;
    let identity = Identity::load_or_create(dir)?;
    Ok((lock, identity))
}

fn lock_state_dir(cfg: &Config) -> anyhow::Result<File> {
    let path = cfg.control.state_dir.join("lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        anyhow::bail!(
            "another lanrage-relay is using {} (control.state_dir)",
            cfg.control.state_dir.display()
        );
    }
    Ok(f)
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Open connections, in total and per source (IPv4 address or IPv6 /64).
#[derive(Debug)]
pub struct ConnLimits {
    max: usize,
    max_per_source: usize,
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

impl ConnLimits {
    /// At most `max` connections, `max_per_source` from one source.
    pub fn new(max: usize, max_per_source: usize) -> Self {
        ConnLimits {
            max,
            max_per_source,
            total: 0,
            per_source: HashMap::new(),
        }
    }

    /// Takes a slot for a connection from `ip`, or refuses.
    pub fn open(&mut self, ip: IpAddr) -> bool {
        let key = source_key(ip);
        let n = self.per_source.get(&key).copied().unwrap_or(0);
        if self.total >= self.max || n >= self.max_per_source {
            return false;
        }
        self.total += 1;
        self.per_source.insert(key, n + 1);
        true
    }

    /// Gives back the slot of a connection from `ip`.
    pub fn close(&mut self, ip: IpAddr) {
        let key = source_key(ip);
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.per_source.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&key);
            }
        }
    }

    /// Open connections.
    pub fn total(&self) -> usize {
        self.total
    }
}

/// A connection's slot, given back when the connection task ends (however it ends).
struct Slot {
    limits: Arc<Mutex<ConnLimits>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limits.lock().close(self.ip);
    }
}

/// Serves `app` on `listener` until `stop` changes (see the module docs for the limits).
async fn serve_http(
    listener: TcpListener,
    app: Router,
    relay: Arc<Relay>,
    limits: Arc<Mutex<ConnLimits>>,
    mut stop: watch::Receiver<bool>,
) {
    let header_timeout = Duration::from_secs(relay.cfg.control.header_timeout_secs);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors, mostly: do not spin on it.
                    tracing::debug!(error = %e, "accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        if !limits.lock().open(peer.ip()) {
            relay
                .metrics
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        let slot = Slot {
            limits: limits.clone(),
            ip: peer.ip(),
        };
        let app = app.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                let mut app = app.clone();
                async move { app.call(req).await }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// State from an older relay holds party password verifiers, which this relay neither uses nor
/// keeps: commit what loading changed, then compact, so the snapshot and the journal no longer
/// hold them. Not fatal: if the disk refuses now, the flusher retries the batch as usual and the
/// verifiers go with the next compaction.
fn purge_verifiers(relay: &Relay, store: &mut dyn Store) {
    let (batch, snapshot) = {
        let mut core = relay.core.lock();
        let batch = std::mem::take(&mut core.pending);
        (batch, Relay::snapshot(&core))
    };
    match store.commit(&batch).and_then(|()| store.compact(&snapshot)) {
        Ok(()) => tracing::info!(
            "rewrote the state without the party password verifiers of an older relay"
        ),
        Err(e) => {
            relay.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "cannot rewrite the state without the password verifiers of an older relay now; they stay on disk until the next snapshot");
        }
    }
}

async fn listen(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({key}): {e}"))
}

/// Runs the relay until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let (_lock, identity) = prepare_state_dir(&cfg)?;
    let mut store = FileStore::new(&cfg.control.state_dir, cfg.store.compact_after_records);
    let records = store
        .load()
        .map_err(|e| anyhow::anyhow!("cannot load state: {e}"))?;
    let relay = Arc::new(Relay::new(cfg, identity));
    relay.load(&records);
    if records.iter().any(Record::holds_verifier) {
        purge_verifiers(&relay, &mut store);
    }

    // One receive task per two CPUs (at most 4): a batching task forwards a few hundred
    // thousand datagrams per second on one core, and the kernel's own network processing (the
    // larger part of each datagram's cost) needs the others. On a 2-core host, a second task per
    // address only halved the batches and cost more per datagram (BENCHMARKS.md).
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get() / 2)
        .clamp(1, 4);
    let sockets = Arc::new(crate::udp::bind_sockets(
        &relay.layout,
        relay.cfg.udp.socket_buffer_bytes,
        workers,
    )?);
    let listener = listen(relay.cfg.control.listen, "control.listen").await?;
    let metrics_listener =
        listen(relay.cfg.control.metrics_listen, "control.metrics_listen").await?;
    {
        let core = relay.core.lock();
        tracing::info!(
            key = %relay.identity.public,
            udp = ?relay.layout.sockets.iter().map(|s| s.bind).collect::<Vec<_>>(),
            public = ?relay.layout.public_addrs(),
            nat_discovery = relay.stun.discovery(),
            control = %relay.cfg.control.listen,
            metrics = %relay.cfg.control.metrics_listen,
            parties = core.registry.party_count(),
            tokens = core.tokens.len(),
            sessions = relay.table.lock().len(),
            "lanrage-relay started"
        );
    }

    let (stop_store, store_rx) = mpsc::channel::<()>();
    let interval = Duration::from_millis(relay.cfg.store.flush_interval_ms);
    let store_relay = relay.clone();
    let store_thread = std::thread::Builder::new()
        .name("store".into())
        .spawn(move || {
            let mut store = store;
            let mut flusher = Flusher::new(interval);
            let mut next = Instant::now() + interval;
            loop {
                let wait = next.saturating_duration_since(Instant::now());
                if !matches!(
                    store_rx.recv_timeout(wait),
                    Err(mpsc::RecvTimeoutError::Timeout)
                ) {
                    let lost = flusher.finish(&store_relay, &mut store, Instant::now());
                    if lost > 0 {
                        tracing::error!(
                            unsaved = lost,
                            "stopping with state changes that could not be saved; they are lost"
                        );
                    }
                    break;
                }
                next = flusher.run(&store_relay, &mut store, Instant::now());
            }
        })?;

    let caps = Arc::new(sockets.first().and_then(|g| g.first()).map_or_else(
        || crate::batch::Caps::new(false, false),
        |s| crate::batch::Caps::probe(s),
    ));
    tracing::info!(
        mmsg = caps.mmsg(),
        gso = caps.gso(),
        "udp batching (recvmmsg/sendmmsg, UDP GSO)"
    );
    let mut tasks = Vec::new();
    for (idx, group) in sockets.iter().enumerate() {
        for worker in 0..group.len() {
            tasks.push(tokio::spawn(crate::udp::serve_socket(
                relay.clone(),
                sockets.clone(),
                idx,
                worker,
                caps.clone(),
            )));
        }
    }
    let sweeper = relay.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            sweeper.sweep(Instant::now());
        }
    }));

    let limits = Arc::new(Mutex::new(ConnLimits::new(
        relay.cfg.control.max_connections,
        relay.cfg.control.max_connections_per_ip,
    )));
    let (stop_http, stop_rx) = watch::channel(false);
    tokio::spawn(serve_http(
        listener,
        crate::http::router(relay.clone()),
        relay.clone(),
        limits.clone(),
        stop_rx.clone(),
    ));
    tokio::spawn(serve_http(
        metrics_listener,
        crate::http::metrics_router(relay.clone()),
        relay.clone(),
        limits.clone(),
        stop_rx,
    ));

    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_http.send(true);
    // Long polls may hold connections open; do not wait for them long.
    let deadline = Instant::now() + Duration::from_secs(2);
    while limits.lock().total() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in &tasks {
        t.abort();
    }
    let _ = stop_store.send(());
    let _ = tokio::task::spawn_blocking(move || store_thread.join()).await;
    tracing::info!("state flushed; bye");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, Record, StoreError};
    use lanrage_proto::ids::PartyId;

    #[test]
    fn connection_slots_are_capped_in_total_and_per_source() {
        let mut l = ConnLimits::new(5, 2);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(l.open(ip("192.0.2.1")));
        assert!(l.open(ip("192.0.2.1")));
        assert!(!l.open(ip("192.0.2.1")), "per source");
        // One IPv6 /64 is one source.
        assert!(l.open(ip("2001:db8::1")));
        assert!(l.open(ip("2001:db8::2:3")));
        assert!(!l.open(ip("2001:db8::ffff")), "per /64");
        assert!(l.open(ip("192.0.2.2")));
        assert!(!l.open(ip("192.0.2.3")), "in total");
        l.close(ip("192.0.2.1"));
        assert!(l.open(ip("192.0.2.3")));
        assert_eq!(l.total(), 5);
    }

    #[test]
    fn the_state_dir_is_locked_before_the_key_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.control.state_dir = dir.path().join("state");
        std::fs::create_dir_all(&cfg.control.state_dir).unwrap();
        // Another relay holds the lock on a new directory.
        let other = lock_state_dir(&cfg).unwrap();
        let Err(err) = prepare_state_dir(&cfg) else {
            panic!("started on a locked directory")
        };
        let err = err.to_string();
        assert!(err.contains("another lanrage-relay"), "{err}");
        assert!(
            !cfg.control
                .state_dir
                .join(crate::identity::KEY_FILE)
                .exists(),
            "a key was made without the lock"
        );
        drop(other);
        let (_lock, id) = prepare_state_dir(&cfg).unwrap();
        let again = Identity::load_or_create(&cfg.control.state_dir).unwrap();
        assert_eq!(id.public, again.public);
    }

    /// A store whose writes fail (as a full disk does) while `fail` is set; counts what it does.
    #[derive(Default)]
    struct Flaky {
        inner: MemoryStore,
        fail: bool,
        backlog: Vec<Record>,
        /// Records handed to `commit` (each is encoded once, there).
        encoded: usize,
        /// Write attempts.
        writes: usize,
    }

    impl Store for Flaky {
        fn load(&mut self) -> Result<Vec<Record>, StoreError> {
            self.inner.load()
        }
        fn commit(&mut self, batch: &[Record]) -> Result<(), StoreError> {
            self.encoded += batch.len();
            self.backlog.extend_from_slice(batch);
            self.retry()
        }
        fn retry(&mut self) -> Result<(), StoreError> {
            if self.backlog.is_empty() {
                return Ok(());
            }
            self.writes += 1;
            if self.fail {
                return Err(StoreError {
                    path: "journal.bin".into(),
                    message: "No space left on device".into(),
                    disk_full: true,
                });
            }
            self.inner.commit(&std::mem::take(&mut self.backlog))
        }
        fn backlog(&self) -> usize {
            self.backlog.len()
        }
        fn wants_compaction(&self) -> bool {
            false
        }
        fn compact(&mut self, state: &[Record]) -> Result<(), StoreError> {
            self.inner.compact(state)
        }
    }

    fn relay(max_unsaved: usize) -> Relay {
        let mut cfg = Config::default();
        cfg.udp.listen = vec!["127.0.0.1:3478".parse().unwrap()];
        cfg.store.max_unsaved_records = max_unsaved;
        Relay::new(
            cfg,
            Identity::from_secret(x25519_dalek::StaticSecret::random_from_rng(
                rand::rngs::OsRng,
            )),
        )
    }

    fn gone(n: u32) -> Record {
        let mut id = [0u8; 10];
        id[..4].copy_from_slice(&n.to_le_bytes());
        Record::PartyGone { id: PartyId(id) }
    }

    #[test]
    fn a_blocked_store_is_reported_and_nothing_is_lost() {
        let relay = relay(1000);
        let mut store = Flaky {
            fail: true,
            ..Default::default()
        };
        let mut f = Flusher::new(Duration::from_millis(100));
        let t0 = Instant::now();
        relay.core.lock().pending.push(gone(1));
        let next = f.run(&relay, &mut store, t0);
        assert_eq!(next, t0 + Duration::from_millis(100));
        assert_eq!(relay.metrics.store_blocked.load(Ordering::Relaxed), 1);
        assert_eq!(relay.metrics.store_errors.load(Ordering::Relaxed), 1);
        let text = relay.metrics_text();
        assert!(text.contains("lanrage_relay_store_blocked 1\n"), "{text}");
        assert!(
            text.contains("lanrage_relay_store_unsaved_records 1\n"),
            "{text}"
        );
        // Later changes wait in the core, behind the failed batch, in order.
        relay.core.lock().pending.push(gone(2));
        store.fail = false;
        f.run(&relay, &mut store, next);
        assert_eq!(relay.metrics.store_blocked.load(Ordering::Relaxed), 0);
        assert_eq!(store.inner.records, vec![gone(1), gone(2)]);
        assert!(relay.core.lock().pending.is_empty());
        assert!(relay.core.lock().saving.failure.is_none());
        assert!(relay
            .metrics_text()
            .contains("lanrage_relay_store_unsaved_records 0\n"));
    }

    #[test]
    fn a_failing_write_is_retried_with_backoff_without_encoding_it_again() {
        let relay = relay(1000);
        let mut store = Flaky {
            fail: true,
            ..Default::default()
        };
        let interval = Duration::from_millis(100);
        let mut f = Flusher::new(interval);
        let t0 = Instant::now();
        let batch: Vec<Record> = (0..500).map(gone).collect();
        relay.core.lock().pending.extend(batch.iter().cloned());
        // Ten minutes of a full disk, the flusher woken whenever it asks (and every 100 ms
        // besides, as if the thread woke early).
        let mut now = t0;
        let mut next = f.run(&relay, &mut store, now);
        let mut gaps = Vec::new();
        let mut last_write = (store.writes, now);
        while now < t0 + Duration::from_secs(600) {
            now = (now + interval).min(next);
            next = f.run(&relay, &mut store, now);
            if store.writes != last_write.0 {
                gaps.push(now - last_write.1);
                last_write = (store.writes, now);
            }
            // The control plane refuses changes meanwhile, so nothing new piles up.
            assert!(relay.core.lock().pending.is_empty());
        }
        // Encoded once; retried after 100 ms, then doubling up to 2 s: about 300 retries in ten
        // minutes, not the 6 000 a retry every flush would be.
        assert_eq!(store.encoded, batch.len());
        assert!(store.writes <= 310, "{} writes", store.writes);
        assert!(store.writes >= 290, "{} writes", store.writes);
        assert_eq!(gaps[..3], [interval, interval * 2, interval * 4]);
        assert!(gaps.iter().all(|g| *g <= MAX_RETRY_BACKOFF), "{gaps:?}");
        assert_eq!(relay.metrics.store_blocked.load(Ordering::Relaxed), 1);
        // Space is back: within one backoff it is written, and the relay takes changes again.
        store.fail = false;
        let back = now;
        while relay.metrics.store_blocked.load(Ordering::Relaxed) == 1 {
            now = next;
            next = f.run(&relay, &mut store, now);
        }
        assert!(now - back <= MAX_RETRY_BACKOFF);
        assert_eq!(store.inner.records, batch);
        assert_eq!(next, now + interval);
    }

    #[test]
    fn state_changes_are_refused_while_a_write_fails_and_taken_again_after() {
        use lanrage_proto::api::{ChallengeRequest, RegisterRequest};
        use lanrage_proto::auth::SharedKey;
        use lanrage_proto::ids::PublicKey;
        let relay = relay(1000);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let register = |relay: &Relay| {
            let secret = x25519_dalek::StaticSecret::random_from_rng(rand::rngs::OsRng);
            let key = PublicKey::from(&secret);
            let ch = relay
                .challenge(
                    &ChallengeRequest {
                        key,
                        access_key: None,
                    },
                    ip,
                )
                .unwrap();
            use base64::Engine;
            let b64 = base64::engine::general_purpose::STANDARD;
            let raw: [u8; 32] = b64.decode(&ch.challenge).unwrap().try_into().unwrap();
            let proof = SharedKey::for_peer(&secret, &ch.relay_key)
                .unwrap()
                .register_proof(&raw, &key);
            relay.register(
                &RegisterRequest {
                    key,
                    challenge: ch.challenge,
                    proof: b64.encode(proof),
                    access_key: None,
                },
                ip,
            )
        };
        let mut store = Flaky {
            fail: true,
            ..Default::default()
        };
        let mut f = Flusher::new(Duration::from_millis(100));
        let t0 = Instant::now();
        let token = register(&relay).unwrap();
        let caller = relay.authenticate(Some(&token.token)).unwrap();
        f.run(&relay, &mut store, t0);
        assert_eq!(store.backlog(), 1);
        // Every change is refused with a clear 503 while the write fails; nothing piles up.
        let e = register(&relay).unwrap_err();
        assert_eq!(e.status, 503);
        assert_eq!(
            e.message,
            "the relay cannot save state: disk full; try again later"
        );
        assert!(e.retry_after.is_some());
        for _ in 0..1000 {
            let e = relay
                .create_party(
                    &caller,
                    lanrage_proto::api::CreatePartyRequest {
                        name: "lan".into(),
                        ..Default::default()
                    },
                    ip,
                )
                .unwrap_err();
            assert_eq!(e.status, 503, "{e:?}");
            assert_eq!(relay.refresh(&caller).unwrap_err().status, 503);
        }
        assert!(relay.core.lock().pending.is_empty());
        assert_eq!(relay.metrics.writes_refused.load(Ordering::Relaxed), 2001);
        assert!(relay
            .metrics_text()
            .contains("lanrage_relay_writes_refused_total 2001\n"));
        // Reads still work.
        assert!(relay.authenticate(Some(&token.token)).is_ok());
        // Space is back: the next retry writes the backlog and changes are taken again.
        store.fail = false;
        f.run(&relay, &mut store, t0 + MAX_RETRY_BACKOFF);
        let view = relay
            .create_party(
                &caller,
                lanrage_proto::api::CreatePartyRequest {
                    name: "lan".into(),
                    ..Default::default()
                },
                ip,
            )
            .unwrap();
        assert_eq!(view.party.name, "lan");
        f.run(&relay, &mut store, t0 + MAX_RETRY_BACKOFF * 2);
        assert!(store.inner.records.len() >= 2);
    }

    #[test]
    fn too_many_unsaved_changes_are_refused_even_without_a_failure() {
        let relay = relay(3);
        // A slow disk: three changes wait and no write has failed.
        relay.core.lock().pending.extend((0..3).map(gone));
        let secret = x25519_dalek::StaticSecret::random_from_rng(rand::rngs::OsRng);
        let key = lanrage_proto::ids::PublicKey::from(&secret);
        let caller = crate::state::Caller {
            key,
            peer: lanrage_proto::ids::PeerId::from_key(&key),
            token: [0; 32],
        };
        let e = relay
            .create_party(
                &caller,
                lanrage_proto::api::CreatePartyRequest {
                    name: "lan".into(),
                    ..Default::default()
                },
                "192.0.2.1".parse().unwrap(),
            )
            .unwrap_err();
        assert_eq!(
            (e.status, e.message.as_str()),
            (
                503,
                "the relay cannot save state fast enough; try again later"
            )
        );
    }
}
