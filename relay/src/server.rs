//! Wiring: lock the state directory, load the key and the stored state, bind the sockets, start
//! the tasks (UDP receivers, HTTP, a 1 s sweeper, the store thread), stop cleanly on
//! SIGTERM/SIGINT with a final flush.
//!
//! The store gets its own OS thread because `fdatasync` blocks: every `store.flush_interval_ms` it
//! takes the pending records from the core (one short lock), commits them as one batch and, when
//! the journal is long, writes a snapshot taken under that same lock.
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
use crate::store::{FileStore, Store};

/// Takes the pending records and makes them durable (and compacts when the store asks).
pub fn flush_once(relay: &Relay, store: &mut dyn Store) {
    let compact = store.wants_compaction();
    let (batch, snapshot) = {
        let mut core = relay.core.lock();
        let batch = std::mem::take(&mut core.pending);
        let snapshot = compact.then(|| Relay::snapshot(&core));
        (batch, snapshot)
    };
    if !batch.is_empty() {
        let result = store.commit(&batch);
        let blocked = u64::from(store.blocked());
        if relay.metrics.store_blocked.swap(blocked, Ordering::Relaxed) != blocked && blocked == 0 {
            tracing::warn!("the journal is writable again; state changes are being saved");
        }
        match result {
            Ok(()) => {
                relay.metrics.store_commits.fetch_add(1, Ordering::Relaxed);
                relay
                    .metrics
                    .store_records
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                relay.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                if blocked == 1 {
                    tracing::error!(error = %e, records = batch.len(), "cannot commit state and cannot cut a failed write off the journal: NOT SAVING state changes until it can (they are kept in memory and retried; lanrage_relay_store_blocked = 1)");
                } else {
                    tracing::error!(error = %e, records = batch.len(), "cannot commit state; will retry");
                }
                let mut core = relay.core.lock();
                let later = std::mem::replace(&mut core.pending, batch);
                core.pending.extend(later);
                return;
            }
        }
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

    let sockets = Arc::new(crate::udp::bind_sockets(
        &relay.layout,
        relay.cfg.udp.socket_buffer_bytes,
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
            loop {
                let stopping = !matches!(
                    store_rx.recv_timeout(interval),
                    Err(mpsc::RecvTimeoutError::Timeout)
                );
                flush_once(&store_relay, &mut store);
                if stopping {
                    break;
                }
            }
        })?;

    let mut tasks = Vec::new();
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    for idx in 0..sockets.len() {
        for _ in 0..workers {
            tasks.push(tokio::spawn(crate::udp::serve_socket(
                relay.clone(),
                sockets.clone(),
                idx,
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

    /// A store whose commits fail while `fail` is set, reporting itself blocked meanwhile.
    #[derive(Default)]
    struct Flaky {
        inner: MemoryStore,
        fail: bool,
    }

    impl Store for Flaky {
        fn load(&mut self) -> Result<Vec<Record>, StoreError> {
            self.inner.load()
        }
        fn commit(&mut self, batch: &[Record]) -> Result<(), StoreError> {
            if self.fail {
                return Err(StoreError {
                    path: "journal.bin".into(),
                    message: "injected".into(),
                });
            }
            self.inner.commit(batch)
        }
        fn wants_compaction(&self) -> bool {
            false
        }
        fn compact(&mut self, state: &[Record]) -> Result<(), StoreError> {
            self.inner.compact(state)
        }
        fn blocked(&self) -> bool {
            self.fail
        }
    }

    #[test]
    fn a_blocked_store_is_reported_and_nothing_is_lost() {
        let mut cfg = Config::default();
        cfg.udp.listen = vec!["127.0.0.1:3478".parse().unwrap()];
        let relay = Relay::new(
            cfg,
            Identity::from_secret(x25519_dalek::StaticSecret::random_from_rng(
                rand::rngs::OsRng,
            )),
        );
        let gone = |n: u8| Record::PartyGone {
            id: PartyId([n; 10]),
        };
        let mut store = Flaky {
            fail: true,
            ..Default::default()
        };
        relay.core.lock().pending.push(gone(1));
        flush_once(&relay, &mut store);
        assert_eq!(relay.metrics.store_blocked.load(Ordering::Relaxed), 1);
        assert_eq!(relay.metrics.store_errors.load(Ordering::Relaxed), 1);
        assert!(relay
            .metrics_text()
            .contains("lanrage_relay_store_blocked 1\n"));
        // Later changes queue behind the failed batch, in order.
        relay.core.lock().pending.push(gone(2));
        store.fail = false;
        flush_once(&relay, &mut store);
        assert_eq!(relay.metrics.store_blocked.load(Ordering::Relaxed), 0);
        assert_eq!(store.inner.records, vec![gone(1), gone(2)]);
        assert!(relay.core.lock().pending.is_empty());
    }
}
