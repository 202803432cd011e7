//! The UDP edge: binds the sockets of the [`crate::stun::Layout`] and moves bytes between them
//! and the sans-IO cores. Per datagram: relay frames (`RL`) go to the session table, STUN-looking
//! datagrams to the STUN responder (whose answers then need the per-source and global STUN budget,
//! [`crate::stun::StunLimiter`]), anything else is counted and dropped.
//!
//! Each receive task owns one 64 KiB receive buffer and one small reply buffer for its whole life,
//! and forwards data frames from the receive buffer itself, so forwarding allocates nothing. Several
//! tasks (one per CPU, at most 4) receive on each socket so the table's lock, not one core, is the
//! limit. Sends try the non-blocking path first and only wait for socket space when the kernel
//! buffer is full.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use lanrage_proto::frame;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use crate::sessions::Verdict;
use crate::state::Relay;
use crate::stun::{Answer, Ignored, Layout, ANSWER_BUF};

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

async fn send(sock: &UdpSocket, bytes: &[u8], to: SocketAddr) -> io::Result<()> {
    match sock.try_send_to(bytes, to) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            sock.send_to(bytes, to).await.map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// Receives on socket `idx` until the task is aborted.
pub async fn serve_socket(relay: Arc<Relay>, sockets: Arc<Vec<Arc<UdpSocket>>>, idx: usize) {
    let sock = sockets[idx].clone();
    let mut buf = vec![0u8; 65536].into_boxed_slice();
    let mut out = vec![0u8; ANSWER_BUF].into_boxed_slice();
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors surface here on some systems; they are not fatal.
                tracing::trace!(error = %e, "udp recv");
                continue;
            }
        };
        let d = &buf[..n];
        let now = Instant::now();
        let sent = if frame::is_relay_frame(d) {
            let verdict = relay.table.lock().handle(now, idx, from, d, &mut out);
            match verdict {
                Verdict::Forward { via, to } => send(&sockets[via], d, to).await,
                Verdict::Reply { via, to, len } => send(&sockets[via], &out[..len], to).await,
                Verdict::Drop {
                    hint: Some(len), ..
                } => send(&sock, &out[..len], from).await,
                Verdict::Drop { hint: None, .. } => Ok(()),
            }
        } else if n >= 20 && d[0] & 0xC0 == 0 {
            match relay.stun.answer(idx, from, d, &mut out) {
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
                        send(&sockets[via], &out[..len], to).await
                    } else {
                        relay.metrics.stun_limited.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                }
                Answer::Ignore(Ignored::WouldAmplify) => {
                    relay.metrics.stun_oversized.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Answer::Ignore(_) => {
                    relay.metrics.stun_ignored.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
            }
        } else {
            relay
                .metrics
                .unknown_protocol
                .fetch_add(1, Ordering::Relaxed);
            Ok(())
        };
        if let Err(e) = sent {
            relay.metrics.send_errors.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(error = %e, "udp send");
        }
    }
}
