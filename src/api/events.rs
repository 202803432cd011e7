//! `GET /events`: the published [`Snapshot`]s as server-sent events, for the web page.
//!
//! The page opens one `EventSource('/events')` and gets an event `snapshot` (data: the
//! snapshot's JSON) at once, then one each time the control task publishes a new snapshot (at
//! most every [`super::SNAPSHOT_EVERY`]). Streams read the `watch` channel only, never the control
//! task's request channel, so a page left open (or many) adds no work to the control task. A
//! `watch` keeps only the newest value: a slow reader skips snapshots instead of queueing them.
//!
//! Readable without login like `GET /status` (a local user may read the status anyway), so the
//! number of open streams is bounded ([`MAX_STREAMS`]; more get 503, counted and logged at most
//! every ten seconds): each stream holds a [`StreamSlot`] that frees its place when the client
//! goes away and the response body is dropped.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};

use super::{ApiError, LogThrottle, Snapshot, Snapshots, LOG_EVERY};

/// At most this many `/events` streams at once (a page per browser tab; more is a misbehaving
/// or hostile local client).
pub const MAX_STREAMS: usize = 16;

/// A keep-alive comment is sent after this long without an event, so proxies and browsers do
/// not time the stream out and a vanished client is noticed (the write fails).
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The open streams and the refused ones (shared by all `/events` requests).
pub struct EventStreams {
    open: AtomicUsize,
    refused: AtomicU64,
    log: parking_lot::Mutex<LogThrottle>,
}

impl Default for EventStreams {
    fn default() -> Self {
        EventStreams {
            open: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            log: parking_lot::Mutex::new(LogThrottle::new(LOG_EVERY)),
        }
    }
}

impl EventStreams {
    /// Streams open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Streams refused because [`MAX_STREAMS`] were open.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// A place for one more stream, or `None` when [`MAX_STREAMS`] are open.
    fn try_open(self: &Arc<Self>) -> Option<StreamSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_STREAMS).then_some(n + 1)
            })
            .ok()
            .map(|_| StreamSlot(self.clone()))
    }
}

/// One open stream's place among the [`MAX_STREAMS`]; given back when dropped (with the
/// response body, when the client disconnects).
pub struct StreamSlot(Arc<EventStreams>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The SSE event for one snapshot. Serialising plain data cannot fail; if it ever did, the
/// stream says so in a comment rather than ending.
fn event(snapshot: &Snapshot) -> Event {
    Event::default()
        .event("snapshot")
        .json_data(snapshot)
        .unwrap_or_else(|e| Event::default().comment(format!("snapshot not serialisable: {e}")))
}

/// The stream of events for one client: the current snapshot at once (if there is one yet),
/// then each new one; ends when the publisher is gone (the daemon is stopping).
fn snapshot_events(
    mut rx: Snapshots,
    slot: StreamSlot,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    // Mark the current value seen: it is sent first, and `changed()` then waits for a newer one.
    let first = rx.borrow_and_update().clone();
    stream::unfold(
        (rx, first, slot),
        |(mut rx, mut pending, slot)| async move {
            loop {
                if let Some(snapshot) = pending.take() {
                    return Some((Ok(event(&snapshot)), (rx, None, slot)));
                }
                rx.changed().await.ok()?;
                pending = rx.borrow_and_update().clone();
            }
        },
    )
}

/// `GET /events`.
pub async fn events(streams: Arc<EventStreams>, snapshots: Snapshots) -> Response {
    let Some(slot) = streams.try_open() else {
        streams.refused.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = streams.log.lock().allow(Instant::now()) {
            tracing::warn!(
                max = MAX_STREAMS,
                suppressed,
                "refused an /events stream: too many open"
            );
        }
        return ApiError {
            status: 503,
            message: format!("too many live views open (at most {MAX_STREAMS}); close a tab"),
            code: None,
        }
        .into_response();
    };
    Sse::new(snapshot_events(snapshots, slot))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}
