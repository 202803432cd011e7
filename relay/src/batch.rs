//! Batched UDP I/O for the forwarder: one `recvmmsg` takes up to [`BATCH`] datagrams off a
//! socket, one `sendmmsg` sends what the batch led to (forwards, `Bound` answers, hints, STUN
//! answers), to any number of destinations. Frames of one batch that go to the same destination
//! with the same size leave as one UDP GSO message (`UDP_SEGMENT`), which the kernel cuts into
//! datagrams: a burst to one peer costs one trip through the stack.
//!
//! What the kernel supports is probed once ([`Caps::probe`]) and only ever lowered: a kernel
//! without `recvmmsg`/`sendmmsg` (`ENOSYS`) gets plain `recv_from`/`send_to` for good, one that
//! refuses GSO at send time (`EIO`: no checksum offload on the route; `EINVAL`: a segment larger
//! than the route's MTU) gets that batch resent unsegmented and no GSO (or none of that segment
//! size) from then on. Order is kept per destination: frames to one address leave in the order
//! they arrived.
//!
//! Buffers are owned by each receive task ([`RecvBatch`], [`Outbox`]) and allocated once: nothing
//! here allocates per datagram or per batch.
//!
//! Crates: receiving uses `nix::sys::socket::recvmmsg` (no allocation, kernel-written addresses).
//! Sending calls `libc::sendmmsg` directly: nix's `sendmmsg` gives every message the same control
//! messages (GSO needs a segment size per message, and none on single datagrams) and reports the
//! sent count only through an iterator that reads address slots it never wrote. quinn-udp batches
//! receives and does GSO, but sends one `sendmsg` per destination; a relay fans out to many peers
//! per batch, and that per-datagram system call is what batching is here to remove.

use std::io;
use std::io::IoSliceMut;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
use socket2::SockAddr;
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::stun::ANSWER_BUF;

/// Datagrams per receive call, and so most messages per send call.
pub const BATCH: usize = 32;
/// Receive room per datagram: the largest UDP payload, so nothing is ever truncated.
const SLOT: usize = 65536;
/// Distance between slots: not a multiple of 4 KiB, so the slots' first bytes (where the headers
/// are read) fall in different cache sets.
const STRIDE: usize = SLOT + 64;
/// Most segments of one GSO message (the kernel's `UDP_MAX_SEGMENTS` is 64 on older kernels).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes of one GSO message (one IP packet before segmentation).
const GSO_MAX_BYTES: usize = 65000;

/// What the kernel accepts, probed at start and lowered, never raised, when a call is refused.
/// One per process, shared by all receive tasks.
#[derive(Debug)]
pub struct Caps {
    mmsg: AtomicBool,
    gso: AtomicBool,
    /// GSO is used only for segments up to this size (lowered when the kernel refuses one).
    gso_max_seg: AtomicUsize,
}

impl Caps {
    /// Fixed capabilities (tests, and a forced fallback).
    pub fn new(mmsg: bool, gso: bool) -> Caps {
        Caps {
            mmsg: AtomicBool::new(mmsg),
            gso: AtomicBool::new(gso && mmsg),
            gso_max_seg: AtomicUsize::new(SLOT),
        }
    }

    /// Asks the kernel, on `sock`: `sendmmsg`/`recvmmsg` with no messages (harmless, `ENOSYS`
    /// where missing) and whether the `UDP_SEGMENT` option exists.
    pub fn probe(sock: &UdpSocket) -> Caps {
        let fd = sock.as_raw_fd();
        // SAFETY: a zero-length message vector; the kernel reads nothing through the pointer.
        let send = unsafe { libc::sendmmsg(fd, std::ptr::null_mut(), 0, libc::MSG_DONTWAIT) };
        // SAFETY: as above.
        let recv = unsafe {
            libc::recvmmsg(
                fd,
                std::ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        let mmsg = send >= 0 && recv >= 0;
        let gso =
            nix::sys::socket::getsockopt(sock, nix::sys::socket::sockopt::UdpGsoSegment).is_ok();
        Caps::new(mmsg, gso)
    }

    /// Whether `recvmmsg`/`sendmmsg` are used.
    pub fn mmsg(&self) -> bool {
        self.mmsg.load(Ordering::Relaxed)
    }

    /// Whether UDP GSO is used (only together with `sendmmsg`).
    pub fn gso(&self) -> bool {
        self.gso.load(Ordering::Relaxed)
    }

    fn gso_max_seg(&self) -> usize {
        self.gso_max_seg.load(Ordering::Relaxed)
    }

    fn refuse_mmsg(&self, e: &io::Error) {
        if self.mmsg.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %e, "the kernel refuses recvmmsg/sendmmsg: one datagram per system call from now on");
        }
        self.gso.store(false, Ordering::Relaxed);
    }

    /// The kernel refused a GSO message of segments of `seg` bytes with `e`.
    fn refuse_gso(&self, seg: usize, e: &io::Error) {
        let too_big = matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EMSGSIZE));
        if too_big && seg > 576 {
            // Probably larger than the route's MTU: keep GSO for smaller segments.
            let old = self.gso_max_seg.fetch_min(seg - 1, Ordering::Relaxed);
            if old >= seg {
                tracing::info!(error = %e, segment = seg, "UDP GSO refused for this segment size: smaller ones only from now on");
            }
        } else if self.gso.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %e, "the kernel refuses UDP GSO: unsegmented sends from now on");
        }
    }
}

/// Whether `e` says the system call itself is missing or unusable (not a per-datagram error).
fn mmsg_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

/// Whether `e`, from a GSO message, is the kernel refusing GSO (rather than the destination).
fn gso_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO)
            | Some(libc::EINVAL)
            | Some(libc::EMSGSIZE)
            | Some(libc::EOPNOTSUPP)
            | Some(libc::ENOPROTOOPT)
    )
}

fn std_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// The datagrams of one receive call, in arrival order. Owned by one receive task.
pub struct RecvBatch {
    slots: Box<[u8]>,
    /// Slot of datagram `i` (the same unless one was skipped).
    slot: [usize; BATCH],
    lens: [usize; BATCH],
    from: [SocketAddr; BATCH],
    n: usize,
    hdrs: MultiHeaders<SockaddrStorage>,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch").field("n", &self.n).finish()
    }
}

// SAFETY: the raw pointers inside `hdrs` (nix's preallocated headers) point to the batch's own
// heap buffers or are rewritten by each `recvmmsg_now` (through `&mut self`) before the kernel
// uses them; nothing ties them to a thread.
unsafe impl Send for RecvBatch {}
// SAFETY: as above; `&RecvBatch` reads only the plain fields.
unsafe impl Sync for RecvBatch {}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    /// Room for [`BATCH`] datagrams of any size (zeroed lazily by the allocator: only the
    /// pages datagrams are written to become resident).
    pub fn new() -> RecvBatch {
        RecvBatch {
            slots: vec![0u8; BATCH * STRIDE].into_boxed_slice(),
            slot: [0; BATCH],
            lens: [0; BATCH],
            from: [SocketAddr::from(([0, 0, 0, 0], 0)); BATCH],
            n: 0,
            hdrs: MultiHeaders::preallocate(BATCH, None),
        }
    }

    /// Datagrams in the batch.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Datagram `i`: its source and bytes.
    pub fn get(&self, i: usize) -> (SocketAddr, &[u8]) {
        let at = self.slot[i] * STRIDE;
        (self.from[i], &self.slots[at..at + self.lens[i]])
    }

    /// Waits for datagrams and takes up to [`BATCH`] of them (at least one).
    pub async fn recv(&mut self, sock: &UdpSocket, caps: &Caps) -> io::Result<usize> {
        self.n = 0;
        loop {
            if !caps.mmsg() {
                let (n, from) = sock.recv_from(&mut self.slots[..SLOT]).await?;
                self.slot[0] = 0;
                self.lens[0] = n;
                self.from[0] = from;
                self.n = 1;
                return Ok(1);
            }
            sock.readable().await?;
            let fd = sock.as_raw_fd();
            match sock.try_io(Interest::READABLE, || self.recvmmsg_now(fd)) {
                Ok(0) => continue,
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if mmsg_refused(&e) => caps.refuse_mmsg(&e),
                Err(e) => return Err(e),
            }
        }
    }

    fn recvmmsg_now(&mut self, fd: i32) -> io::Result<usize> {
        let mut chunks = self.slots.chunks_mut(STRIDE);
        let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] = std::array::from_fn(|_| {
            let chunk = chunks.next().unwrap_or_default();
            let end = chunk.len().min(SLOT);
            [IoSliceMut::new(&mut chunk[..end])]
        });
        let got = recvmmsg(fd, &mut self.hdrs, iovs.iter_mut(), MsgFlags::empty(), None)
            .map_err(io::Error::from)?;
        let mut n = 0;
        for (i, m) in got.enumerate() {
            // A datagram without a usable source (not IPv4/IPv6) cannot be answered: skip it.
            let Some(from) = m.address.as_ref().and_then(std_addr) else {
                continue;
            };
            self.slot[n] = i;
            self.lens[n] = m.bytes;
            self.from[n] = from;
            n += 1;
        }
        self.n = n;
        Ok(n)
    }
}

/// Where the bytes of an outgoing datagram are.
#[derive(Clone, Copy, Debug)]
enum Src {
    /// Datagram `i` of the receive batch (a forwarded frame, unchanged).
    Rx(usize),
    /// Reply slot `i` of the outbox.
    Reply(usize),
}

#[derive(Clone, Copy, Debug)]
struct Item {
    via: usize,
    to: SocketAddr,
    src: Src,
    len: usize,
}

/// One message for the kernel: the segments `order[first..first + count]`, all to `to` from
/// socket `via`; with more than one, a GSO message of `seg`-byte segments (the last may be
/// shorter).
#[derive(Clone, Copy, Debug)]
struct Msg {
    via: usize,
    to: SocketAddr,
    first: usize,
    count: usize,
    seg: usize,
}

/// Room for one `UDP_SEGMENT` control message (`CMSG_SPACE(2)` is 24 bytes on Linux).
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf([u8; 32]);

/// What one receive batch sends: forwards (bytes still in the [`RecvBatch`]) and answers (bytes
/// in the outbox's own reply slots), in the order they were decided. Owned by one receive task;
/// everything is allocated once.
pub struct Outbox {
    items: Vec<Item>,
    replies: Box<[u8]>,
    nreplies: usize,
    order: Vec<usize>,
    msgs: Vec<Msg>,
    hdrs: Box<[libc::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    names: Vec<SockAddr>,
    cmsgs: Box<[CmsgBuf]>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("items", &self.items)
            .finish()
    }
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: the raw pointers in `hdrs` and `iovs` are scratch, written and used only inside
// `sendmmsg_now` (pointing into data it borrows for that call, through `&mut self`); they are never
// read elsewhere, so moving or sharing an Outbox between threads is as safe as its plain data.
unsafe impl Send for Outbox {}
// SAFETY: as above; `&Outbox` gives no access to the pointers.
unsafe impl Sync for Outbox {}

impl Outbox {
    /// An empty outbox with room for [`BATCH`] datagrams and [`BATCH`] answers.
    pub fn new() -> Outbox {
        // SAFETY: mmsghdr and iovec are plain C structs for which all-zero is a valid value.
        let (hdr, iov) = unsafe {
            (
                std::mem::zeroed::<libc::mmsghdr>(),
                std::mem::zeroed::<libc::iovec>(),
            )
        };
        Outbox {
            items: Vec::with_capacity(BATCH),
            replies: vec![0u8; BATCH * ANSWER_BUF].into_boxed_slice(),
            nreplies: 0,
            order: Vec::with_capacity(BATCH),
            msgs: Vec::with_capacity(BATCH),
            hdrs: vec![hdr; BATCH].into_boxed_slice(),
            iovs: vec![iov; BATCH].into_boxed_slice(),
            names: Vec::with_capacity(BATCH),
            cmsgs: vec![CmsgBuf([0; 32]); BATCH].into_boxed_slice(),
        }
    }

    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The next reply slot ([`ANSWER_BUF`] bytes) to write an answer into; [`Outbox::reply`]
    /// queues it.
    pub fn reply_buf(&mut self) -> &mut [u8] {
        let at = self.nreplies.min(BATCH - 1) * ANSWER_BUF;
        &mut self.replies[at..at + ANSWER_BUF]
    }

    /// Queues the first `len` bytes of the reply slot for `to`, from socket `via`. Returns
    /// false (and queues nothing) when the outbox is full.
    pub fn reply(&mut self, via: usize, to: SocketAddr, len: usize) -> bool {
        if self.items.len() >= BATCH || self.nreplies >= BATCH {
            return false;
        }
        self.items.push(Item {
            via,
            to,
            src: Src::Reply(self.nreplies),
            len: len.min(ANSWER_BUF),
        });
        self.nreplies += 1;
        true
    }

    /// Queues datagram `i` of the receive batch, unchanged, for `to`, from socket `via`.
    /// Returns false (and queues nothing) when the outbox is full.
    pub fn forward(&mut self, via: usize, to: SocketAddr, rx: &RecvBatch, i: usize) -> bool {
        if self.items.len() >= BATCH || i >= rx.len() {
            return false;
        }
        self.items.push(Item {
            via,
            to,
            src: Src::Rx(i),
            len: rx.lens[i],
        });
        true
    }

    fn bytes<'a>(&'a self, rx: &'a RecvBatch, item: &Item) -> &'a [u8] {
        match item.src {
            Src::Rx(i) => rx.get(i).1,
            Src::Reply(j) => &self.replies[j * ANSWER_BUF..j * ANSWER_BUF + item.len],
        }
    }

    /// Groups the queue into messages: with GSO, each item starts a message that takes the
    /// following items to the same destination while they have its size (one shorter one may
    /// end it); an item to that destination that does not fit stops the grouping there, so
    /// frames to one destination never overtake each other.
    fn plan(&mut self, caps: &Caps) {
        self.order.clear();
        self.msgs.clear();
        let gso = caps.gso();
        let max_seg = caps.gso_max_seg();
        let n = self.items.len();
        let mut taken: u64 = 0;
        for i in 0..n {
            if taken & (1 << i) != 0 {
                continue;
            }
            taken |= 1 << i;
            let it = self.items[i];
            let first = self.order.len();
            self.order.push(i);
            let (mut count, mut total) = (1, it.len);
            if gso && it.len > 0 && it.len <= max_seg && it.len <= usize::from(u16::MAX) {
                for j in i + 1..n {
                    let o = self.items[j];
                    if taken & (1 << j) != 0 || o.via != it.via || o.to != it.to {
                        continue;
                    }
                    if o.len > it.len
                        || o.len == 0
                        || count >= GSO_MAX_SEGMENTS
                        || total + o.len > GSO_MAX_BYTES
                    {
                        break;
                    }
                    taken |= 1 << j;
                    self.order.push(j);
                    count += 1;
                    total += o.len;
                    if o.len < it.len {
                        break;
                    }
                }
            }
            self.msgs.push(Msg {
                via: it.via,
                to: it.to,
                first,
                count,
                seg: it.len,
            });
        }
    }

    /// Sends everything queued (waiting for socket room when the kernel buffer is full) and
    /// empties the outbox. Returns the datagrams that could not be sent.
    pub async fn flush(
        &mut self,
        sockets: &[std::sync::Arc<UdpSocket>],
        rx: &RecvBatch,
        caps: &Caps,
    ) -> usize {
        if self.items.is_empty() {
            return 0;
        }
        self.plan(caps);
        let mut errors = 0;
        let mut a = 0;
        while a < self.msgs.len() {
            let via = self.msgs[a].via;
            let mut b = a + 1;
            while b < self.msgs.len() && self.msgs[b].via == via {
                b += 1;
            }
            match sockets.get(via) {
                Some(sock) => {
                    let (failed, added) = self.send_run(sock, a, b, rx, caps).await;
                    errors += failed;
                    b += added;
                }
                None => errors += self.msgs[a..b].iter().map(|m| m.count).sum::<usize>(),
            }
            a = b;
        }
        self.items.clear();
        self.nreplies = 0;
        errors
    }

    /// Sends `msgs[a..b]` from `sock`. Returns the datagrams not sent and the messages added
    /// by splitting refused GSO messages.
    async fn send_run(
        &mut self,
        sock: &UdpSocket,
        a: usize,
        b: usize,
        rx: &RecvBatch,
        caps: &Caps,
    ) -> (usize, usize) {
        let (mut k, mut end) = (a, b);
        let (mut failed, mut added) = (0, 0);
        while k < end {
            if !caps.mmsg() {
                failed += self.send_plain(sock, k, end, rx).await;
                break;
            }
            let fd = sock.as_raw_fd();
            match sock.try_io(Interest::WRITABLE, || self.sendmmsg_now(fd, k, end, rx)) {
                Ok(sent) => k += sent.max(1),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if sock.writable().await.is_err() {
                        failed += self.msgs[k..end].iter().map(|m| m.count).sum::<usize>();
                        break;
                    }
                }
                Err(e) if mmsg_refused(&e) => caps.refuse_mmsg(&e),
                Err(e) if self.msgs[k].count > 1 && gso_refused(&e) => {
                    caps.refuse_gso(self.msgs[k].seg, &e);
                    let grown = self.split(k);
                    end += grown;
                    added += grown;
                }
                Err(e) => {
                    // This destination (or this datagram) is refused; the rest still go.
                    tracing::trace!(error = %e, to = %self.msgs[k].to, "udp send");
                    failed += self.msgs[k].count;
                    k += 1;
                }
            }
        }
        (failed, added)
    }

    /// Replaces GSO message `k` by one message per segment; returns how many were added.
    fn split(&mut self, k: usize) -> usize {
        let m = self.msgs[k];
        self.msgs[k].count = 1;
        for s in 1..m.count {
            let item = self.items[self.order[m.first + s]];
            // Within capacity: there are never more messages than items.
            self.msgs.insert(
                k + s,
                Msg {
                    count: 1,
                    first: m.first + s,
                    seg: item.len,
                    ..m
                },
            );
        }
        m.count - 1
    }

    /// One `send_to` per datagram (the fallback).
    async fn send_plain(&self, sock: &UdpSocket, a: usize, b: usize, rx: &RecvBatch) -> usize {
        let mut failed = 0;
        for m in &self.msgs[a..b] {
            for s in 0..m.count {
                let item = self.items[self.order[m.first + s]];
                let bytes = self.bytes(rx, &item);
                let r = match sock.try_send_to(bytes, m.to) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        sock.send_to(bytes, m.to).await
                    }
                    r => r,
                };
                if let Err(e) = r {
                    tracing::trace!(error = %e, to = %m.to, "udp send");
                    failed += 1;
                }
            }
        }
        failed
    }

    /// One `sendmmsg` for as many of `msgs[a..b]` as fit; returns how many the kernel took.
    fn sendmmsg_now(&mut self, fd: i32, a: usize, b: usize, rx: &RecvBatch) -> io::Result<usize> {
        let b = b.min(a + BATCH);
        self.names.clear();
        let mut iov_at = 0;
        for m in &self.msgs[a..b] {
            self.names.push(SockAddr::from(m.to));
            for s in 0..m.count {
                let item = self.items[self.order[m.first + s]];
                let bytes = match item.src {
                    Src::Rx(i) => rx.get(i).1,
                    Src::Reply(j) => &self.replies[j * ANSWER_BUF..j * ANSWER_BUF + item.len],
                };
                self.iovs[iov_at + s] = libc::iovec {
                    iov_base: bytes.as_ptr() as *mut libc::c_void,
                    iov_len: bytes.len(),
                };
            }
            iov_at += m.count;
        }
        iov_at = 0;
        for (h, m) in self.msgs[a..b].iter().enumerate() {
            let name = &self.names[h];
            // SAFETY: all-zero is a valid msghdr; every pointer set below points into buffers
            // (`names`, `iovs`, `cmsgs`, the datagrams) that live, unmoved, until the
            // sendmmsg call below has returned.
            let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
            hdr.msg_name = name.as_ptr() as *mut libc::c_void;
            hdr.msg_namelen = name.len();
            hdr.msg_iov = self.iovs[iov_at..].as_mut_ptr();
            hdr.msg_iovlen = m.count as _;
            if m.count > 1 {
                let c = &mut self.cmsgs[h];
                c.0 = [0; 32];
                hdr.msg_control = c.0.as_mut_ptr() as *mut libc::c_void;
                // SAFETY: CMSG_* only compute sizes and offsets.
                hdr.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
                // SAFETY: msg_control points to 32 zeroed, 8-aligned bytes, at least
                // CMSG_SPACE(2); CMSG_FIRSTHDR therefore returns a pointer into them.
                unsafe {
                    let cm = libc::CMSG_FIRSTHDR(&hdr);
                    (*cm).cmsg_level = libc::SOL_UDP;
                    (*cm).cmsg_type = libc::UDP_SEGMENT;
                    (*cm).cmsg_len = libc::CMSG_LEN(2) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cm) as *mut u16, m.seg as u16);
                }
            }
            self.hdrs[h] = libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            };
            iov_at += m.count;
        }
        // SAFETY: hdrs[..b - a] were filled above and point to live buffers (see there).
        let r = unsafe { libc::sendmmsg(fd, self.hdrs.as_mut_ptr(), (b - a) as u32, 0) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    async fn sock() -> Arc<UdpSocket> {
        Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap())
    }

    /// Receives until `n` datagrams arrived (or a second passed); the datagrams in order.
    async fn drain(s: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while got.len() < n {
            match tokio::time::timeout(Duration::from_secs(1), s.recv_from(&mut buf)).await {
                Ok(Ok((len, _))) => got.push(buf[..len].to_vec()),
                _ => break,
            }
        }
        got
    }

    fn dgram(tag: u8, seq: u8, len: usize) -> Vec<u8> {
        let mut d = vec![tag; len];
        d[1] = seq;
        d
    }

    fn all_modes() -> [Caps; 3] {
        [
            Caps::new(true, true),
            Caps::new(true, false),
            Caps::new(false, false),
        ]
    }

    #[tokio::test]
    async fn a_batch_takes_every_queued_datagram_in_order() {
        for caps in all_modes() {
            let (relay, client) = (sock().await, sock().await);
            let to = relay.local_addr().unwrap();
            for seq in 0..10u8 {
                client
                    .send_to(&dgram(7, seq, 100 + seq as usize), to)
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut rx = RecvBatch::new();
            let mut seen = 0u8;
            while seen < 10 {
                let n = rx.recv(&relay, &caps).await.unwrap();
                assert_eq!(n, if caps.mmsg() { 10 } else { 1 });
                for i in 0..n {
                    let (from, d) = rx.get(i);
                    assert_eq!(from, client.local_addr().unwrap());
                    assert_eq!(d, dgram(7, seen, 100 + seen as usize));
                    seen += 1;
                }
            }
        }
    }

    /// Forwards and replies to three destinations, interleaved, with runs of equal sizes (GSO
    /// material) and odd sizes: each destination gets its own datagrams, whole and in order,
    /// however they were grouped.
    #[tokio::test]
    async fn every_destination_gets_its_datagrams_in_order() {
        for caps in all_modes() {
            let relay = sock().await;
            let client = sock().await;
            let peers = [sock().await, sock().await, sock().await];
            let sizes: [&[usize]; 3] = [
                &[140; 12],
                &[1400, 1400, 300, 1400, 1400, 1500, 140],
                &[60, 60, 60, 60, 60, 60, 60, 60, 70],
            ];
            let mut sent = 0;
            let mut expect: [Vec<Vec<u8>>; 3] = Default::default();
            let rest =
                (0..3).flat_map(|p| sizes[p].iter().enumerate().map(move |(s, &l)| (p, s, l)));
            let mut all: Vec<(usize, usize, usize)> = rest.collect();
            // Interleave destinations: sort by sequence number.
            all.sort_by_key(|&(p, s, _)| (s, p));
            for &(p, s, len) in &all {
                client
                    .send_to(
                        &dgram(p as u8 + 1, s as u8, len),
                        relay.local_addr().unwrap(),
                    )
                    .await
                    .unwrap();
                expect[p].push(dgram(p as u8 + 1, s as u8, len));
                sent += 1;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let sockets = vec![relay.clone()];
            let mut rx = RecvBatch::new();
            let mut tx = Outbox::new();
            let mut done = 0;
            while done < sent {
                let n = rx.recv(&relay, &caps).await.unwrap();
                for i in 0..n {
                    let (_, d) = rx.get(i);
                    let p = usize::from(d[0] - 1);
                    let to = peers[p].local_addr().unwrap();
                    if d.len() == 60 {
                        // Answers from the reply slots are interleaved with forwards.
                        let len = d.len();
                        let copy = d.to_vec();
                        tx.reply_buf()[..len].copy_from_slice(&copy);
                        assert!(tx.reply(0, to, len));
                    } else {
                        assert!(tx.forward(0, to, &rx, i));
                    }
                }
                assert_eq!(tx.flush(&sockets, &rx, &caps).await, 0);
                assert!(tx.is_empty());
                done += n;
            }
            for p in 0..3 {
                assert_eq!(
                    drain(&peers[p], expect[p].len()).await,
                    expect[p],
                    "peer {p}"
                );
            }
        }
    }

    #[test]
    fn grouping_keeps_each_destination_in_order() {
        let caps = Caps::new(true, true);
        let mut tx = Outbox::new();
        let d = SocketAddr::from(([127, 0, 0, 1], 1));
        let e = SocketAddr::from(([127, 0, 0, 1], 2));
        for (to, len) in [
            (d, 100),
            (e, 10),
            (d, 100),
            (d, 50),
            (d, 100),
            (e, 10),
            (d, 120),
        ] {
            tx.items.push(Item {
                via: 0,
                to,
                src: Src::Reply(0),
                len,
            });
        }
        tx.plan(&caps);
        let groups: Vec<Vec<usize>> = tx
            .msgs
            .iter()
            .map(|m| tx.order[m.first..m.first + m.count].to_vec())
            .collect();
        // d: 100,100,50 (a shorter one ends a group), then 100 alone (120 is larger), then 120.
        assert_eq!(groups, vec![vec![0, 2, 3], vec![1, 5], vec![4], vec![6]]);
        let without = Caps::new(true, false);
        tx.plan(&without);
        assert_eq!(tx.msgs.len(), 7);
    }

    /// A socket with UDP checksums off (SO_NO_CHECK) makes the kernel refuse GSO (EINVAL): the
    /// batch is resent unsegmented, and GSO is not tried again for that size.
    #[tokio::test]
    async fn refused_gso_is_resent_unsegmented() {
        let caps = Caps::probe(&*sock().await);
        if !caps.gso() {
            return; // nothing to refuse on this kernel
        }
        let relay = sock().await;
        let one: libc::c_int = 1;
        // SAFETY: a valid fd and a c_int option value.
        let r = unsafe {
            libc::setsockopt(
                relay.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_NO_CHECK,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        let (client, peer) = (sock().await, sock().await);
        for (seq, len) in [
            (0u8, 1000usize),
            (1, 1000),
            (2, 1000),
            (3, 100),
            (4, 100),
            (5, 100),
        ] {
            client
                .send_to(&dgram(9, seq, len), relay.local_addr().unwrap())
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut rx = RecvBatch::new();
        let mut tx = Outbox::new();
        let n = rx.recv(&relay, &caps).await.unwrap();
        assert_eq!(n, 6);
        for i in 0..n {
            tx.forward(0, peer.local_addr().unwrap(), &rx, i);
        }
        assert_eq!(tx.flush(std::slice::from_ref(&relay), &rx, &caps).await, 0);
        let got = drain(&peer, 6).await;
        let want: Vec<Vec<u8>> = [
            (0u8, 1000usize),
            (1, 1000),
            (2, 1000),
            (3, 100),
            (4, 100),
            (5, 100),
        ]
        .iter()
        .map(|&(s, l)| dgram(9, s, l))
        .collect();
        assert_eq!(got, want);
        // 1000-byte segments were refused (EINVAL): only smaller ones from now on; the
        // 100-byte run then made GSO go away entirely.
        assert!(caps.gso_max_seg() < 1000);
        assert!(!caps.gso());
        assert!(caps.mmsg());
    }
}
