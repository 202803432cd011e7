//! Outgoing datagrams to one destination, laid out back to back for one segmented send (UDP
//! GSO): every datagram but the last the same size.
//!
//! Why: a TCP burst read from the party device becomes dozens of equal-sized WireGuard
//! datagrams to one peer; the kernel takes them in one `sendmsg` and splits them itself, instead
//! of one system call each. Pure layout: what goes where and when the batch must be sent first;
//! the sending is the caller's.

use std::net::SocketAddr;

/// The most bytes one segmented send may carry (a UDP datagram's limit, less headers).
pub const MAX_BATCH_BYTES: usize = 65_000;

/// Whether a datagram just written into the slot joined the batch.
#[derive(Debug, PartialEq, Eq)]
pub enum Commit {
    /// It is part of the batch.
    Joined,
    /// It is longer than the batch's segments: send the batch without it
    /// ([`SendBatch::contents`] still excludes it), then [`SendBatch::restart`].
    Alone,
}

/// Datagrams to one destination, back to back in one buffer allocated once.
pub struct SendBatch {
    buf: Vec<u8>,
    to: Option<SocketAddr>,
    /// The size of each datagram (the first one's).
    stride: usize,
    count: usize,
    /// Bytes of the datagrams in the batch.
    bytes: usize,
    /// A shorter datagram came last: nothing may follow it.
    closed: bool,
    max_segments: usize,
    /// Where a datagram that did not join was written and its length, waiting for
    /// [`SendBatch::restart`].
    pending: Option<(usize, usize)>,
}

impl SendBatch {
    /// A batch of at most `max_segments` datagrams (1: every datagram is sent alone) of up to
    /// `max_datagram` bytes each.
    pub fn new(max_segments: usize, max_datagram: usize) -> Self {
        SendBatch {
            buf: vec![0u8; MAX_BATCH_BYTES.max(max_datagram) + max_datagram],
            to: None,
            stride: 0,
            count: 0,
            bytes: 0,
            closed: false,
            max_segments: max_segments.max(1),
            pending: None,
        }
    }

    /// Lowers the batch limit (the kernel refused segmentation: every datagram goes alone).
    pub fn set_max_segments(&mut self, n: usize) {
        self.max_segments = n.max(1);
    }

    /// Whether a datagram of up to `max_len` bytes to `to` can be written now; `false`: send the
    /// batch first (it is for somewhere else, closed, or full).
    pub fn fits(&self, to: SocketAddr, max_len: usize) -> bool {
        if self.pending.is_some() {
            return false;
        }
        self.count == 0
            || (self.to == Some(to)
                && !self.closed
                && self.count < self.max_segments
                && self.bytes + max_len <= MAX_BATCH_BYTES)
    }

    /// Where the next datagram to `to` is written (after [`SendBatch::fits`] said yes).
    pub fn slot(&mut self, to: SocketAddr) -> &mut [u8] {
        self.to = Some(to);
        &mut self.buf[self.bytes..]
    }

    /// The datagram of `len` bytes written into the slot is ready.
    pub fn commit(&mut self, len: usize) -> Commit {
        if self.count == 0 {
            self.stride = len;
            self.bytes = len;
            self.count = 1;
            return Commit::Joined;
        }
        if len > self.stride {
            self.pending = Some((self.bytes, len));
            return Commit::Alone;
        }
        self.closed = len < self.stride;
        self.bytes += len;
        self.count += 1;
        Commit::Joined
    }

    /// After the batch was sent for [`Commit::Alone`]: the waiting datagram starts a new batch.
    pub fn restart(&mut self) {
        let Some((at, len)) = self.pending.take() else {
            return;
        };
        self.buf.copy_within(at..at + len, 0);
        self.count = 1;
        self.bytes = len;
        self.stride = len;
        self.closed = false;
    }

    /// Whether no more datagram may join.
    pub fn is_full(&self) -> bool {
        self.count >= self.max_segments || self.closed
    }

    /// Whether nothing waits to be sent.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The datagrams to send, where, and their segment size (`None`: a single datagram).
    pub fn contents(&self) -> Option<(&[u8], SocketAddr, Option<usize>)> {
        let to = self.to?;
        if self.count == 0 {
            return None;
        }
        let segment = (self.count > 1).then_some(self.stride);
        Some((&self.buf[..self.bytes], to, segment))
    }

    /// Empties the batch (after sending it); a datagram waiting for [`SendBatch::restart`] stays.
    pub fn clear(&mut self) {
        self.count = 0;
        self.bytes = 0;
        self.stride = 0;
        self.closed = false;
        if self.pending.is_none() {
            self.to = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    fn put(b: &mut SendBatch, dst: SocketAddr, len: usize, fill: u8) -> Commit {
        assert!(b.fits(dst, len));
        b.slot(dst)[..len].fill(fill);
        b.commit(len)
    }

    #[test]
    fn equal_datagrams_to_one_place_are_one_segmented_send() {
        let mut b = SendBatch::new(64, 1500);
        for i in 0..3 {
            assert_eq!(put(&mut b, to(1), 100, i), Commit::Joined);
        }
        let (bytes, dst, seg) = b.contents().unwrap();
        assert_eq!((bytes.len(), dst, seg), (300, to(1), Some(100)));
        assert_eq!(bytes[250], 2);
        b.clear();
        assert!(b.contents().is_none() && b.is_empty());
    }

    #[test]
    fn a_shorter_datagram_closes_the_batch_and_a_single_one_has_no_segment_size() {
        let mut b = SendBatch::new(64, 1500);
        put(&mut b, to(1), 100, 1);
        assert_eq!(b.contents().unwrap().2, None);
        put(&mut b, to(1), 60, 2);
        assert!(b.is_full());
        assert!(!b.fits(to(1), 60));
        assert_eq!(b.contents().unwrap().0.len(), 160);
    }

    #[test]
    fn another_destination_or_a_full_batch_must_be_sent_first() {
        let mut b = SendBatch::new(2, 1500);
        put(&mut b, to(1), 100, 1);
        assert!(!b.fits(to(2), 100));
        put(&mut b, to(1), 100, 1);
        assert!(b.is_full() && !b.fits(to(1), 100));
        let mut b = SendBatch::new(64, 1500);
        for _ in 0..(MAX_BATCH_BYTES / 1500) {
            put(&mut b, to(1), 1500, 0);
        }
        assert!(!b.fits(to(1), 1500), "over the size of one UDP datagram");
    }

    #[test]
    fn a_longer_datagram_goes_after_the_batch_in_a_new_one() {
        let mut b = SendBatch::new(64, 1500);
        put(&mut b, to(1), 100, 1);
        put(&mut b, to(1), 100, 2);
        assert_eq!(put(&mut b, to(1), 150, 3), Commit::Alone);
        assert_eq!(b.contents().unwrap().0.len(), 200, "without the longer one");
        assert!(!b.fits(to(1), 10), "the longer one waits");
        b.clear();
        b.restart();
        let (bytes, dst, seg) = b.contents().unwrap();
        assert_eq!((bytes.len(), dst, seg), (150, to(1), None));
        assert!(bytes.iter().all(|&x| x == 3));
    }

    #[test]
    fn with_segmentation_refused_every_datagram_goes_alone() {
        let mut b = SendBatch::new(64, 1500);
        b.set_max_segments(1);
        put(&mut b, to(1), 100, 1);
        assert!(b.is_full());
    }
}
