//! The UDP edge: binds the sockets of the [`crate::stun::Layout`] and moves bytes between them
//! and the sans-IO cores. Per datagram: relay frames (`RL`) go to the session table, STUN-looking
//! datagrams to the STUN responder (whose answers then need the per-source and global STUN budget,
//! [`crate::stun::StunLimiter`]), anything else is counted and dropped.
//!
//! Each receive task owns its receive batch and its outbox ([`crate::batch`]) for its whole life
//! and forwards data frames from the receive buffers themselves, so forwarding allocates nothing.
//! A batch of datagrams takes one `recvmmsg`, one lock of the session table and one `sendmmsg`
//! (with plain `recv_from`/`send_to` where the kernel refuses those). Several tasks (one per CPU,
//! at most 4) receive on each socket so the table's lock, not one core, is the limit. Sends only
//! wait for socket space when the kernel buffer is full.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use lanrage_proto::frame;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use crate::batch::{Caps, Outbox, RecvBatch};
use crate::sessions::Verdict;
use crate::state::Relay;
use crate::stun::{Answer, Ignored, Layout};

/// Binds every socket of the layout (in index order), with the configured buffer sizes.
pub fn bind_sockets(layout: &Layout, buffer_bytes: usize) -> anyhow::Result<Vec<Arc<UdpSocket>>> {
    let mut out = Vec::new();
    for spec in &layout.sockets {
        let addr = spec.bind;
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .map_err(|e| anyhow::anyhow!("udp socket for {addr}: {e}"))?;
        if addr.is_ipv6() {
            let _ = s.set_only_v6(false);
        }
        let _ = s.set_recv_buffer_size(buffer_bytes);
        let _ = s.set_send_buffer_size(buffer_bytes);
        s.set_nonblocking(true)?;
        s.bind(&addr.into()).map_err(|e| {
            let origin = if spec.configured {
                "udp.listen"
            } else {
                "the RFC 5780 cross socket derived from udp.listen"
            };
            anyhow::anyhow!("cannot bind UDP {addr} ({origin}): {e}")
        })?;
        let std: std::net::UdpSocket = s.into();
        out.push(Arc::new(UdpSocket::from_std(std)?));
    }
    Ok(out)
}

/// Receives on socket `idx` until the task is aborted: a batch of datagrams at a time
/// ([`RecvBatch`]), decided under one lock of the session table, sent with one `sendmmsg`
/// ([`Outbox`]).
pub async fn serve_socket(
    relay: Arc<Relay>,
    sockets: Arc<Vec<Arc<UdpSocket>>>,
    idx: usize,
    caps: Arc<Caps>,
) {
    let sock = sockets[idx].clone();
    let mut rx = RecvBatch::new();
    let mut tx = Outbox::new();
    loop {
        if let Err(e) = rx.recv(&sock, &caps).await {
            // ICMP errors surface here on some systems; they are not fatal.
            tracing::trace!(error = %e, "udp recv");
            continue;
        }
        decide(&relay, idx, &rx, &mut tx, Instant::now());
        let failed = tx.flush(&sockets, &rx, &caps).await;
        if failed > 0 {
            relay
                .metrics
                .send_errors
                .fetch_add(failed as u64, Ordering::Relaxed);
        }
    }
}

/// What to send for each datagram of `rx` (received on socket `idx`): relay frames go to the
/// session table (locked once for the whole batch), STUN-looking datagrams to the STUN
/// responder and its budget, anything else is counted and dropped.
pub fn decide(relay: &Relay, idx: usize, rx: &RecvBatch, tx: &mut Outbox, now: Instant) {
    let n = rx.len();
    let relay_frames = (0..n)
        .filter(|&i| frame::is_relay_frame(rx.get(i).1))
        .count();
    if relay_frames > 0 {
        let mut table = relay.table.lock();
        for i in 0..n {
            let (from, d) = rx.get(i);
            if !frame::is_relay_frame(d) {
                continue;
            }
            match table.handle(now, idx, from, d, tx.reply_buf()) {
                Verdict::Forward { via, to } => {
                    tx.forward(via, to, rx, i);
                }
                Verdict::Reply { via, to, len } => {
                    tx.reply(via, to, len);
                }
                Verdict::Drop {
                    hint: Some(len), ..
                } => {
                    tx.reply(idx, from, len);
                }
                Verdict::Drop { hint: None, .. } => {}
            }
        }
    }
    if relay_frames == n {
        return;
    }
    for i in 0..n {
        let (from, d) = rx.get(i);
        if frame::is_relay_frame(d) {
            continue;
        }
        if d.len() >= 20 && d[0] & 0xC0 == 0 {
            match relay.stun.answer(idx, from, d, tx.reply_buf()) {
                Answer::Send {
                    via,
                    to,
                    len,
                    error,
                } => {
                    if relay.stun_limits.lock().allow(to.ip(), now) {
                        let m = if error {
                            &relay.metrics.stun_error
                        } else {
                            &relay.metrics.stun_success
                        };
                        m.fetch_add(1, Ordering::Relaxed);
                        tx.reply(via, to, len);
                    } else {
                        relay.metrics.stun_limited.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Answer::Ignore(Ignored::WouldAmplify) => {
                    relay.metrics.stun_oversized.fetch_add(1, Ordering::Relaxed);
                }
                Answer::Ignore(_) => {
                    relay.metrics.stun_ignored.fetch_add(1, Ordering::Relaxed);
                }
            }
        } else {
            relay
                .metrics
                .unknown_protocol
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}
