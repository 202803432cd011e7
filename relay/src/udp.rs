//! The UDP edge: binds the sockets of the [`crate::stun::Layout`] and moves bytes between them
//! and the sans-IO cores. Per datagram: relay frames (`RL`) go to the session table, STUN-looking
//! datagrams to the STUN responder (whose answers then need the per-source and global STUN budget,
//! [`crate::stun::StunLimiter`]), anything else is counted and dropped.
//!
//! Each receive task owns its receive batch and its outbox ([`crate::batch`]) for its whole life
//! and forwards data frames from the receive buffers themselves, so forwarding allocates nothing.
//! A batch of datagrams takes one `recvmmsg`, one lock of the session table and one `sendmmsg`
//! (with plain `recv_from`/`send_to` where the kernel refuses those). Each address has a group of
//! sockets (one per two CPUs, at most 4, sharing the address with `SO_REUSEPORT`), one receive
//! task each, so the table's lock, not one core, is the limit; the kernel keeps each flow on one socket,
//! so frames of a flow are forwarded in the order they came. Sends only wait for socket space when
//! the kernel buffer is full.

use std::net::SocketAddr;
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

fn bind_one(
    addr: SocketAddr,
    buffer_bytes: usize,
    reuse_port: bool,
) -> std::io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(false);
    }
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    let _ = s.set_recv_buffer_size(buffer_bytes);
    let _ = s.set_send_buffer_size(buffer_bytes);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Binds every socket of the layout (in index order), with the configured buffer sizes: a group
/// of `workers` sockets per address. With more than one, the group shares the address with
/// `SO_REUSEPORT`, and the kernel hands each flow (source and destination address and port) to
/// one socket of the group, so each receive task sees its flows whole and in order and several
/// cores forward at once. The address is first bound alone, so a port another program holds
/// (even one that set `SO_REUSEPORT` itself) is still "already in use".
pub fn bind_sockets(
    layout: &Layout,
    buffer_bytes: usize,
    workers: usize,
) -> anyhow::Result<Vec<Vec<Arc<UdpSocket>>>> {
    let mut out = Vec::new();
    for spec in &layout.sockets {
        let origin = if spec.configured {
            "udp.listen"
        } else {
            "the RFC 5780 cross socket derived from udp.listen"
        };
        let what = |addr: SocketAddr, e: std::io::Error| {
            anyhow::anyhow!("cannot bind UDP {addr} ({origin}): {e}")
        };
        let alone = bind_one(spec.bind, buffer_bytes, false).map_err(|e| what(spec.bind, e))?;
        let group = if workers <= 1 {
            vec![alone]
        } else {
            let addr = alone.local_addr()?;
            drop(alone);
            (0..workers)
                .map(|_| bind_one(addr, buffer_bytes, true).map_err(|e| what(addr, e)))
                .collect::<anyhow::Result<Vec<_>>>()?
        };
        out.push(
            group
                .into_iter()
                .map(|s| UdpSocket::from_std(s).map(Arc::new))
                .collect::<std::io::Result<Vec<_>>>()?,
        );
    }
    Ok(out)
}

/// Receives on member `worker` of socket group `idx` until the task is aborted: a batch of
/// datagrams at a time ([`RecvBatch`]), decided under one lock of the session table, sent with
/// one `sendmmsg` ([`Outbox`]) from this worker's member of each group.
pub async fn serve_socket(
    relay: Arc<Relay>,
    groups: Arc<Vec<Vec<Arc<UdpSocket>>>>,
    idx: usize,
    worker: usize,
    caps: Arc<Caps>,
) {
    let sockets: Vec<Arc<UdpSocket>> = groups
        .iter()
        .filter_map(|g| g.get(worker).or_else(|| g.first()).cloned())
        .collect();
    let Some(sock) = sockets.get(idx).cloned() else {
        return;
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::SocketSpec;

    fn layout(bind: SocketAddr) -> Layout {
        Layout {
            sockets: vec![SocketSpec {
                bind,
                public: bind,
                cell: None,
                configured: true,
            }],
            grid: None,
        }
    }

    /// Two tasks, each on its own socket of a group, forward eight flows sent as fast as they
    /// go: every destination sees its flow in order (the kernel keeps a flow on one socket, the
    /// task's batch keeps it in order). Two tasks reading one shared socket reorder here.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_keeps_every_flow_in_order() {
        let groups = bind_sockets(&layout("127.0.0.1:0".parse().unwrap()), 1 << 22, 2).unwrap();
        let addr = groups[0][0].local_addr().unwrap();
        let caps = Arc::new(Caps::probe(&groups[0][0]));
        let mut dests = Vec::new();
        for _ in 0..8 {
            let d = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            d.set_read_timeout(Some(std::time::Duration::from_millis(500)))
                .unwrap();
            dests.push(d);
        }
        let to: Arc<Vec<SocketAddr>> =
            Arc::new(dests.iter().map(|d| d.local_addr().unwrap()).collect());
        let mut tasks = Vec::new();
        for member in &groups[0] {
            let (sock, caps, to) = (member.clone(), caps.clone(), to.clone());
            tasks.push(tokio::spawn(async move {
                let (mut rx, mut tx) = (RecvBatch::new(), Outbox::new());
                let sockets = vec![sock.clone()];
                loop {
                    let Ok(n) = rx.recv(&sock, &caps).await else {
                        continue;
                    };
                    for i in 0..n {
                        let flow = usize::from(rx.get(i).1[0]) % to.len();
                        tx.forward(0, to[flow], &rx, i);
                    }
                    tx.flush(&sockets, &rx, &caps).await;
                }
            }));
        }
        const N: u32 = 3000;
        let mut threads = Vec::new();
        for (flow, d) in dests.into_iter().enumerate() {
            threads.push(std::thread::spawn(move || {
                let (mut last, mut got, mut late) = (0u32, 0u32, 0u32);
                let mut buf = [0u8; 64];
                while let Ok(n) = d.recv(&mut buf) {
                    if n < 5 || usize::from(buf[0]) != flow {
                        continue;
                    }
                    let seq = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
                    late += u32::from(seq <= last);
                    last = last.max(seq);
                    got += 1;
                    if seq == N {
                        break;
                    }
                }
                (got, late)
            }));
            threads.push(std::thread::spawn(move || {
                let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                for seq in 1..=N {
                    let mut d = [flow as u8; 40];
                    d[1..5].copy_from_slice(&seq.to_be_bytes());
                    let _ = s.send_to(&d, addr);
                }
                (0, 0)
            }));
        }
        let results: Vec<(u32, u32)> = tokio::task::spawn_blocking(move || {
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        })
        .await
        .unwrap();
        for t in tasks {
            t.abort();
        }
        let got: u32 = results.iter().map(|r| r.0).sum();
        let late: u32 = results.iter().map(|r| r.1).sum();
        assert!(got > 8 * N / 4, "too few arrived to tell: {results:?}");
        assert_eq!(late, 0, "a flow was reordered: {results:?}");
    }

    #[tokio::test]
    async fn a_group_shares_one_address_and_a_taken_port_stays_taken() {
        let groups = bind_sockets(&layout("127.0.0.1:0".parse().unwrap()), 1 << 16, 3).unwrap();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].len(), 3);
        let addr = groups[0][0].local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        for s in &groups[0] {
            assert_eq!(s.local_addr().unwrap(), addr);
        }
        // Another program on the port, even one that shares with SO_REUSEPORT itself.
        let other = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        other.set_reuse_port(true).unwrap();
        other
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let taken = other.local_addr().unwrap().as_socket().unwrap();
        let err = bind_sockets(&layout(taken), 1 << 16, 2).unwrap_err();
        assert!(err.to_string().contains("cannot bind UDP"), "{err}");
        assert!(err.to_string().contains("udp.listen"), "{err}");
    }
}
