//! Wiring: load the key and the stored state, bind the sockets, start the tasks (UDP receivers,
//! HTTP, a 1 s sweeper, the store thread), stop cleanly on SIGTERM/SIGINT with a final flush.
//!
//! The store gets its own OS thread because `fdatasync` blocks: every `store.flush_interval_ms` it
//! takes the pending records from the core (one short lock), commits them as one batch and, when
//! the journal is long, writes a snapshot taken under that same lock.

use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::identity::Identity;
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
        match store.commit(&batch) {
            Ok(()) => {
                relay.metrics.store_commits.fetch_add(1, Ordering::Relaxed);
                relay
                    .metrics
                    .store_records
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                relay.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, records = batch.len(), "cannot commit state; will retry");
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

/// Runs the relay until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let identity = Identity::load_or_create(&cfg.control.state_dir)?;
    let _lock = lock_state_dir(&cfg)?;
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
    let listener = tokio::net::TcpListener::bind(relay.cfg.control.listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {} (control.listen): {e}",
                relay.cfg.control.listen
            )
        })?;
    {
        let core = relay.core.lock();
        tracing::info!(
            key = %relay.identity.public,
            udp = ?relay.layout.sockets.iter().map(|s| s.bind).collect::<Vec<_>>(),
            public = ?relay.layout.public_addrs(),
            nat_discovery = relay.stun.discovery(),
            control = %relay.cfg.control.listen,
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

    let app = crate::http::router(relay.clone());
    let (stop_http_tx, stop_http_rx) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async {
            let _ = stop_http_rx.await;
        })
        .await
    });

    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_http_tx.send(());
    // Long polls may hold connections open; do not wait for them long.
    let _ = tokio::time::timeout(Duration::from_secs(2), http).await;
    for t in &tasks {
        t.abort();
    }
    let _ = stop_store.send(());
    let _ = tokio::task::spawn_blocking(move || store_thread.join()).await;
    tracing::info!("state flushed; bye");
    Ok(())
}
