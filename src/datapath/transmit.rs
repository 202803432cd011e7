//! Outgoing datagrams that a datapath core has made and the I/O edge has not sent yet
//! ([`Transmits::poll_transmit`]), grouped into segmented sends (UDP GSO): datagrams to one
//! destination laid out back to back, every one but the last the same size.
//!
//! Why: a TCP burst read from the party device becomes dozens of equal-sized WireGuard
//! datagrams to one peer; the kernel takes them in one `sendmsg` and splits them itself, instead
//! of one system call each. And the cores stay free of I/O: they write datagrams here, and the
//! edge sends what is ready after each device read or received datagram, so nothing waits for
//! more than the work the kernel already handed over.
//!
//! One buffer, grown to its high-water mark once and reused: no allocation per datagram. A batch
//! is sealed (ready to send) when the next datagram goes elsewhere, is longer, would make it too
//! big, or when it is full or closed by a shorter datagram; [`Transmits::seal`] seals it at once
//! (a lone game packet, the end of a device round).

use std::net::SocketAddr;

/// The most bytes one segmented send may carry (a UDP datagram's limit, less headers).
pub const MAX_BATCH_BYTES: usize = 65_000;
/// The most bytes waiting to be sent before new datagrams are refused. The edge sends what is
/// ready after every device read, and what was sent no longer takes room (the open batch moves
/// to the start), so the datapath's own work stays far below this (the most one read makes is
/// a 64 KiB burst for each of [`crate::wire::MAX_MEMBERS`] members); it bounds memory whatever
/// happens.
pub const MAX_QUEUED_BYTES: usize = 4 << 20;

/// One send for the I/O edge: `contents` to `to`, cut into datagrams of `segment` bytes (the last
/// may be shorter) or a single datagram when `segment` is `None`.
#[derive(Debug, PartialEq, Eq)]
pub struct Transmit<'a> {
    /// Where on the network (a relay, for a relayed peer).
    pub to: SocketAddr,
    /// The datagrams, back to back.
    pub contents: &'a [u8],
    /// The size of each datagram when there are several.
    pub segment: Option<usize>,
}

/// Datagrams to one destination, back to back from `start`.
#[derive(Clone, Copy, Debug)]
struct Batch {
    start: usize,
    bytes: usize,
    to: SocketAddr,
    /// The size of each datagram (the first one's).
    stride: usize,
    count: usize,
}

/// The datagrams waiting to be sent.
pub struct Transmits {
    buf: Vec<u8>,
    /// Where the next datagram is written.
    end: usize,
    /// Batches ready to send, in order; those before `next` were handed out.
    sealed: Vec<Batch>,
    next: usize,
    /// The batch still taking datagrams.
    open: Option<Batch>,
    /// Where the slot handed out last goes.
    slot_to: Option<SocketAddr>,
    max_segments: usize,
}

impl Transmits {
    /// A queue whose batches carry at most `max_segments` datagrams (1: every datagram is sent
    /// alone), with room for a full batch and one more datagram of `max_datagram` bytes at the
    /// start.
    pub fn new(max_segments: usize, max_datagram: usize) -> Self {
        Transmits {
            buf: vec![0u8; MAX_BATCH_BYTES.max(max_datagram) + max_datagram],
            end: 0,
            sealed: Vec::new(),
            next: 0,
            open: None,
            slot_to: None,
            max_segments: max_segments.max(1),
        }
    }

    /// Lowers the batch limit (the kernel refused segmentation: every datagram goes alone).
    pub fn set_max_segments(&mut self, n: usize) {
        self.max_segments = n.max(1);
    }

    /// Room for the next datagram of up to `max_len` bytes to `to`: write it there, then
    /// [`Transmits::commit`]. An open batch it cannot join is sealed first. `None`: too much is
    /// waiting already ([`MAX_QUEUED_BYTES`]); drop the datagram.
    pub fn slot(&mut self, to: SocketAddr, max_len: usize) -> Option<&mut [u8]> {
        if let Some(open) = &self.open {
            let joins = open.to == to
                && open.count < self.max_segments
                && open.bytes + max_len <= MAX_BATCH_BYTES;
            if !joins {
                self.seal();
            }
        }
        let want = self.end.checked_add(max_len)?;
        if want > self.buf.len() {
            if want > MAX_QUEUED_BYTES {
                return None;
            }
            self.buf.resize(want, 0);
        }
        self.slot_to = Some(to);
        Some(&mut self.buf[self.end..want])
    }

    /// The datagram of `len` bytes written into the slot is ready. It joins the open batch or
    /// starts one (sealing the open one when it is longer than that batch's datagrams); a batch
    /// that is full, or closed by a shorter datagram, is sealed.
    pub fn commit(&mut self, len: usize) {
        let Some(to) = self.slot_to.take() else {
            return;
        };
        debug_assert!(self.end + len <= self.buf.len(), "longer than its slot");
        let len = len.min(self.buf.len() - self.end);
        let start = self.end;
        self.end += len;
        match &mut self.open {
            Some(open) if len <= open.stride => {
                open.bytes += len;
                open.count += 1;
                if open.count >= self.max_segments || len < open.stride {
                    self.seal();
                }
            }
            _ => {
                self.seal();
                self.open = Some(Batch {
                    start,
                    bytes: len,
                    to,
                    stride: len,
                    count: 1,
                });
                if self.max_segments == 1 {
                    self.seal();
                }
            }
        }
    }

    /// Seals the open batch: it is sent as it is, and the next datagram starts a new one.
    pub fn seal(&mut self) {
        if let Some(open) = self.open.take() {
            self.sealed.push(open);
        }
    }

    /// Whether a sealed batch waits for [`Transmits::poll_transmit`].
    pub fn has_ready(&self) -> bool {
        self.next < self.sealed.len()
    }

    /// Whether nothing waits at all (sealed or open).
    pub fn is_empty(&self) -> bool {
        !self.has_ready() && self.open.is_none()
    }

    /// The next sealed batch to send, in the order they were made. Once every sealed batch was
    /// handed out the buffer is reused from its start.
    pub fn poll_transmit(&mut self) -> Option<Transmit<'_>> {
        if !self.has_ready() {
            self.sealed.clear();
            self.next = 0;
            match &mut self.open {
                None => self.end = 0,
                Some(open) if open.start > 0 => {
                    // Everything before it was sent: the open batch moves to the start, so the
                    // buffer holds at most what one round of reads has not sent yet.
                    self.buf.copy_within(open.start..open.start + open.bytes, 0);
                    open.start = 0;
                    self.end = open.bytes;
                }
                Some(_) => {}
            }
            return None;
        }
        let b = self.sealed[self.next];
        self.next += 1;
        Some(Transmit {
            to: b.to,
            contents: &self.buf[b.start..b.start + b.bytes],
            segment: (b.count > 1).then_some(b.stride),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    fn put(t: &mut Transmits, dst: SocketAddr, len: usize, fill: u8) {
        t.slot(dst, len).unwrap()[..len].fill(fill);
        t.commit(len);
    }

    fn drain(t: &mut Transmits) -> Vec<(usize, SocketAddr, Option<usize>, u8)> {
        let mut out = Vec::new();
        while let Some(x) = t.poll_transmit() {
            out.push((
                x.contents.len(),
                x.to,
                x.segment,
                x.contents[x.contents.len() - 1],
            ));
        }
        out
    }

    #[test]
    fn equal_datagrams_to_one_place_are_one_segmented_send() {
        let mut t = Transmits::new(64, 1500);
        for i in 0..3 {
            put(&mut t, to(1), 100, i);
        }
        assert!(!t.has_ready(), "an open batch waits for more or for seal");
        t.seal();
        assert_eq!(drain(&mut t), vec![(300, to(1), Some(100), 2)]);
        assert!(t.is_empty());
        assert_eq!(t.end, 0, "the buffer is reused from its start");
    }

    #[test]
    fn a_shorter_datagram_closes_the_batch_and_a_single_one_has_no_segment_size() {
        let mut t = Transmits::new(64, 1500);
        put(&mut t, to(1), 100, 1);
        t.seal();
        assert_eq!(drain(&mut t), vec![(100, to(1), None, 1)]);
        put(&mut t, to(1), 100, 1);
        put(&mut t, to(1), 60, 2);
        assert!(t.has_ready(), "closed by the shorter datagram");
        assert_eq!(drain(&mut t), vec![(160, to(1), Some(100), 2)]);
    }

    #[test]
    fn another_destination_or_a_full_batch_is_a_send_of_its_own() {
        let mut t = Transmits::new(2, 1500);
        put(&mut t, to(1), 100, 1);
        put(&mut t, to(2), 100, 2);
        put(&mut t, to(2), 100, 3);
        put(&mut t, to(2), 100, 4);
        t.seal();
        assert_eq!(
            drain(&mut t),
            vec![
                (100, to(1), None, 1),
                (200, to(2), Some(100), 3),
                (100, to(2), None, 4)
            ]
        );
        let mut t = Transmits::new(64, 1500);
        for _ in 0..(MAX_BATCH_BYTES / 1500) + 1 {
            put(&mut t, to(1), 1500, 0);
        }
        t.seal();
        let sends = drain(&mut t);
        assert_eq!(sends.len(), 2, "over the size of one UDP datagram");
        assert!(sends[0].0 <= MAX_BATCH_BYTES);
    }

    #[test]
    fn a_longer_datagram_starts_a_new_batch_after_the_open_one() {
        let mut t = Transmits::new(64, 1500);
        put(&mut t, to(1), 100, 1);
        put(&mut t, to(1), 100, 2);
        put(&mut t, to(1), 150, 3);
        t.seal();
        assert_eq!(
            drain(&mut t),
            vec![(200, to(1), Some(100), 2), (150, to(1), None, 3)]
        );
    }

    #[test]
    fn with_segmentation_refused_every_datagram_goes_alone() {
        let mut t = Transmits::new(64, 1500);
        t.set_max_segments(1);
        put(&mut t, to(1), 100, 1);
        put(&mut t, to(1), 100, 2);
        assert_eq!(
            drain(&mut t),
            vec![(100, to(1), None, 1), (100, to(1), None, 2)]
        );
    }

    #[test]
    fn an_open_batch_survives_handing_out_the_sealed_ones() {
        let mut t = Transmits::new(64, 1500);
        put(&mut t, to(1), 100, 1);
        put(&mut t, to(2), 100, 2);
        assert_eq!(drain(&mut t), vec![(100, to(1), None, 1)]);
        assert_eq!(t.end, 100, "the open batch moved to the start");
        put(&mut t, to(2), 100, 3);
        t.seal();
        let moved = t.poll_transmit().unwrap();
        assert!(moved.contents[..100].iter().all(|&x| x == 2));
        assert!(moved.contents[100..].iter().all(|&x| x == 3));
        assert_eq!(drain(&mut t), vec![]);
        assert_eq!(t.end, 0);
    }

    #[test]
    fn memory_is_bounded_when_nothing_is_sent() {
        let mut t = Transmits::new(64, 1500);
        let mut refused = false;
        for i in 0..10_000u16 {
            match t.slot(to(i), 1500) {
                Some(s) => {
                    s.fill(0);
                    t.commit(1500);
                }
                None => {
                    refused = true;
                    break;
                }
            }
        }
        assert!(refused);
        assert!(t.buf.len() <= MAX_QUEUED_BYTES);
    }
}
