//! The party's one UDP socket at the I/O edge: batched receive (`recvmmsg` plus UDP GRO, so one
//! system call brings in dozens of datagrams) and segmented send (UDP GSO), from `quinn-udp`,
//! the kept crate behind quinn, which probes what the kernel supports.
//!
//! Each offload has a fallback: a segmented send the kernel refuses goes out again datagram by
//! datagram. EIO (a kernel or NIC driver that cannot segment) also ends segmented sends for
//! good; EMSGSIZE or EINVAL (the path's MTU is below a segment: the kernel fragments single
//! datagrams but never segmented ones) costs only that batch. The kernel's arrival stamps
//! (SO_TIMESTAMPNS, switched on by quinn-udp) feed [`super::codel`].

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagram buffers one receive call fills (each can hold a GRO train of datagrams).
pub const RECV_BATCH: usize = 16;

/// The socket and what the kernel lets us do with it.
pub struct UdpEdge {
    socket: UdpSocket,
    state: Option<UdpSocketState>,
    /// Segmented sends were refused once: never again.
    no_gso: AtomicBool,
    /// Segmented sends resent as single datagrams.
    pub gso_fallbacks: AtomicU64,
}

impl UdpEdge {
    /// Wraps the bound socket; `batched = false` (or a socket quinn-udp cannot set up) keeps plain
    /// one-datagram calls.
    pub fn new(socket: std::net::UdpSocket, batched: bool) -> io::Result<Self> {
        let state = if batched {
            match UdpSocketState::new((&socket).into()) {
                Ok(s) => {
                    restore_fragmentation(&socket);
                    Some(s)
                }
                Err(e) => {
                    tracing::info!(error = %e, "UDP batching unavailable; one datagram per call");
                    None
                }
            }
        } else {
            None
        };
        socket.set_nonblocking(true)?;
        Ok(UdpEdge {
            socket: UdpSocket::from_std(socket)?,
            state,
            no_gso: AtomicBool::new(false),
            gso_fallbacks: AtomicU64::new(0),
        })
    }

    /// The tokio socket, for single sends (control messages, handshakes).
    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// How many datagrams one segmented send may carry (1: no segmentation).
    pub fn max_segments(&self) -> usize {
        match &self.state {
            Some(s) if !self.no_gso.load(Ordering::Relaxed) => s.max_gso_segments().max(1),
            _ => 1,
        }
    }

    /// How many datagrams of up to `mtu` bytes one receive buffer must hold.
    pub fn gro_segments(&self) -> usize {
        self.state.as_ref().map_or(1, |s| s.gro_segments().max(1))
    }

    /// Waits for datagrams and fills `bufs` (`meta[i]` says what `bufs[i]` holds: `len` bytes,
    /// datagrams of `stride` bytes each from `addr`). Returns how many buffers were filled.
    pub async fn recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        let Some(state) = &self.state else {
            let (Some(buf), Some(m)) = (bufs.first_mut(), meta.first_mut()) else {
                return Ok(0);
            };
            let (n, addr) = self.socket.recv_from(buf).await?;
            m.addr = addr;
            m.len = n;
            m.stride = n;
            return Ok(1);
        };
        loop {
            self.socket.readable().await?;
            match self.socket.try_io(Interest::READABLE, || {
                state.recv((&self.socket).into(), bufs, meta)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    /// Sends `contents` to `to`: datagrams of `segment` bytes each (the last may be shorter) in
    /// one call, or one datagram when `segment` is `None`.
    pub async fn send(&self, contents: &[u8], to: SocketAddr, segment: Option<usize>) {
        let segmented = segment.filter(|s| *s > 0 && *s < contents.len());
        let Some(state) = self.state.as_ref().filter(|_| segmented.is_some()) else {
            self.send_one(contents, to).await;
            return;
        };
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: segmented,
            src_ip: None,
        };
        let result = loop {
            match self.socket.try_io(Interest::WRITABLE, || {
                state.try_send((&self.socket).into(), &transmit)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = self.socket.writable().await {
                        break Err(e);
                    }
                }
                r => break r,
            }
        };
        match result {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EIO) | Some(libc::EINVAL) | Some(libc::EMSGSIZE)
                ) =>
            {
                if e.raw_os_error() == Some(libc::EIO) && !self.no_gso.swap(true, Ordering::Relaxed)
                {
                    tracing::info!(error = %e, "the kernel refused a segmented UDP send; sending datagrams one by one from now on");
                }
                self.gso_fallbacks.fetch_add(1, Ordering::Relaxed);
                for datagram in contents.chunks(segmented.unwrap_or(contents.len())) {
                    self.send_one(datagram, to).await;
                }
            }
            Err(e) => tracing::trace!(%to, error = %e, "udp send failed"),
        }
    }

    /// One datagram, waiting for socket space only when the kernel buffer is full.
    pub async fn send_one(&self, bytes: &[u8], to: SocketAddr) {
        match self.socket.try_send_to(bytes, to) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let _ = self.socket.send_to(bytes, to).await;
            }
            Err(e) => tracing::trace!(%to, error = %e, "udp send failed"),
        }
    }
}

/// quinn-udp forbids fragmentation (IP_PMTUDISC_PROBE, for QUIC's own path MTU discovery); the
/// party relies on the kernel's default instead: DF set, and datagrams fragmented once a router
/// said the path is narrower, so a game's big datagram still arrives behind a small-MTU link.
fn restore_fragmentation(socket: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let set = |level, name, value: libc::c_int| {
        // SAFETY: setsockopt on an open socket with a pointer to a live c_int and its size.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    if set(
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_WANT,
    ) != 0
    {
        tracing::debug!("could not restore path MTU discovery on the UDP socket");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CoDel needs the kernel's arrival stamp on every received datagram.
    #[tokio::test]
    async fn received_datagrams_carry_the_kernels_arrival_time() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let edge = UdpEdge::new(socket, true).unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(b"hello", addr).unwrap();
        let mut buf = vec![0u8; 65536];
        let mut bufs = [IoSliceMut::new(&mut buf)];
        let mut meta = [RecvMeta::default()];
        let n = edge.recv(&mut bufs, &mut meta).await.unwrap();
        assert_eq!((n, meta[0].len), (1, 5));
        let at = meta[0].timestamp.expect("an arrival timestamp");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        assert!(now >= at && now - at < std::time::Duration::from_secs(5));
    }

    /// A segmented send to a path narrower than a segment is refused by the kernel; every
    /// datagram still arrives, and segmentation stays on for other batches.
    #[tokio::test]
    async fn a_refused_segmented_send_goes_out_datagram_by_datagram() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let edge = UdpEdge::new(socket, true).unwrap();
        if edge.max_segments() < 2 {
            return; // no UDP GSO here: nothing to refuse
        }
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let to = receiver.local_addr().unwrap();
        // Two 60 000-byte segments: 120 000 bytes is more than one UDP send may carry, so the
        // kernel refuses the segmented send (EMSGSIZE), as it does behind a narrow path.
        let contents = vec![7u8; 2 * 60_000];
        edge.send(&contents, to, Some(60_000)).await;
        let mut buf = vec![0u8; 65536];
        for _ in 0..2 {
            assert_eq!(receiver.recv(&mut buf).unwrap(), 60_000);
        }
        assert_eq!(edge.gso_fallbacks.load(Ordering::Relaxed), 1);
        assert!(!edge.no_gso.load(Ordering::Relaxed));
    }
}
