//! Offloads on the party device: the virtio-net header in front of every frame when the device is
//! opened with `IFF_VNET_HDR` (tun-rs `offload(true)`).
//!
//! Why: without offloads the kernel hands the daemon one MTU-sized packet per read and takes one
//! per write, so a TCP download costs four system calls per 1400 bytes. With them the kernel
//! hands over a TCP (or UDP-GSO) super-packet of up to 64 KiB that we split here (TSO), and takes
//! back runs of one flow's decrypted segments coalesced into one super-packet (GRO), which it
//! splits again or passes up whole. The same trick took wireguard-go past 10 Gbit/s.
//!
//! tun-rs has the segmentation and coalescing code (`gso_split`, `GROTable`, taken from
//! wireguard-go), but its device helpers assume an IP header right after the virtio-net header:
//! true on a TUN device, not on our TAP device, where an Ethernet header sits in between. This
//! module is that difference: it moves the header offsets by the link header's length (`link`:
//! 14 on TAP, 0 on TUN) and hands tun-rs the IP packet alone. Pure byte work, no I/O.

use std::io;

use tun_rs::{
    gso_split, ExpandBuffer, GROTable, VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_UDP_L4,
};

/// Length of the virtio-net header in front of every frame on an offloading device.
pub const VNET_HLEN: usize = tun_rs::VIRTIO_NET_HDR_LEN;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the kernel left the transport checksum for us to finish.
const NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_ECN`: a flag on the GSO type (the burst carries ECN's CWR).
const GSO_ECN: u8 = 0x80;
/// `VIRTIO_NET_HDR_GSO_NONE`.
const GSO_NONE: u8 = 0;
/// Written into the flags byte of every pending packet's header before coalescing: tun-rs
/// rewrites the header of each packet that is to be written and leaves the packets it merged
/// into another untouched, so the mark tells them apart.
const MERGED: u8 = 0xff;
/// Segments one device read can split into: 64 KiB at Linux's smallest TCP MSS (48).
pub const MAX_SEGMENTS: usize = 65535 / 48 + 1;

/// Why a device read was dropped.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// Shorter than its headers, or offsets past its end.
    Malformed,
    /// A super-packet that is not IPv4 TCP or UDP (the party is IPv4).
    Unsupported,
    /// tun-rs refused to split it.
    Split,
}

/// What one read from an offloading device holds.
#[derive(Debug, PartialEq, Eq)]
pub enum DeviceRead {
    /// One frame at `buf[VNET_HLEN..n]`, its checksum complete.
    One,
    /// A super-packet split into this many IP packets in [`Segments`].
    Split(usize),
}

/// Room for the IP packets one super-packet splits into; allocated once per task.
pub struct Segments {
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
}

impl Segments {
    /// Room for [`MAX_SEGMENTS`] packets of up to `mtu` bytes.
    pub fn new(mtu: usize) -> Self {
        Segments {
            bufs: vec![vec![0u8; mtu.max(576)]; MAX_SEGMENTS],
            sizes: vec![0; MAX_SEGMENTS],
        }
    }

    /// The `i`th IP packet of the last split.
    pub fn get(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.sizes[i]]
    }
}

/// Reads the virtio-net header of `buf[..n]` (a frame read from the device with `link` bytes of
/// link header before its IP header) and either finishes the frame's checksum in place or splits
/// the super-packet into `segs`.
pub fn device_read(
    buf: &mut [u8],
    n: usize,
    link: usize,
    segs: &mut Segments,
) -> Result<DeviceRead, ReadError> {
    if n <= VNET_HLEN + link || n > buf.len() {
        return Err(ReadError::Malformed);
    }
    let mut hdr = VirtioNetHdr::decode(&buf[..VNET_HLEN]).map_err(|_| ReadError::Malformed)?;
    let ip = &mut buf[VNET_HLEN + link..n];
    if hdr.gso_type == GSO_NONE {
        if hdr.flags & NEEDS_CSUM != 0 {
            let start = usize::from(hdr.csum_start)
                .checked_sub(link)
                .ok_or(ReadError::Malformed)?;
            finish_checksum(ip, start, usize::from(hdr.csum_offset))?;
        }
        return Ok(DeviceRead::One);
    }
    let start = hdr
        .csum_start
        .checked_sub(link as u16)
        .ok_or(ReadError::Malformed)?;
    if ip.first().map(|b| b >> 4) != Some(4) || usize::from(start) < 20 {
        return Err(ReadError::Unsupported);
    }
    // Like tun-rs's own reader: trust our parse of the transport header, not hdr_len.
    let transport = match hdr.gso_type & !GSO_ECN {
        VIRTIO_NET_HDR_GSO_TCPV4 => {
            let off = *ip
                .get(usize::from(start) + 12)
                .ok_or(ReadError::Malformed)?;
            let len = u16::from(off >> 4) * 4;
            if !(20..=60).contains(&len) {
                return Err(ReadError::Malformed);
            }
            len
        }
        VIRTIO_NET_HDR_GSO_UDP_L4 => 8,
        _ => return Err(ReadError::Unsupported),
    };
    hdr.csum_start = start;
    hdr.hdr_len = start.checked_add(transport).ok_or(ReadError::Malformed)?;
    let csum_end = usize::from(start) + usize::from(hdr.csum_offset) + 2;
    if ip.len() < usize::from(hdr.hdr_len) || ip.len() < csum_end {
        return Err(ReadError::Malformed);
    }
    gso_split(ip, hdr, &mut segs.bufs, &mut segs.sizes, 0, false)
        .map(DeviceRead::Split)
        .map_err(|_| ReadError::Split)
}

/// Finishes a transport checksum the kernel left partial: the ones' complement sum from `start`
/// to the end, folded into the pseudo-header sum already at `start + offset`.
fn finish_checksum(ip: &mut [u8], start: usize, offset: usize) -> Result<(), ReadError> {
    let at = start.checked_add(offset).ok_or(ReadError::Malformed)?;
    if at + 2 > ip.len() {
        return Err(ReadError::Malformed);
    }
    let initial = u16::from_be_bytes([ip[at], ip[at + 1]]);
    ip[at] = 0;
    ip[at + 1] = 0;
    let sum = !tun_rs::checksum(&ip[start..], u64::from(initial));
    ip[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// Decrypted IP packets waiting to be written to the device, coalesced by flow before each
/// write when the device takes a virtio-net header. Every buffer is allocated once, with room
/// for a whole super-packet. (tun-rs 2.8's coalescing copies each candidate packet into a
/// short-lived buffer of its own: one allocation per coalesced packet that is not ours to avoid
/// without writing our own GRO.)
pub struct DeviceBatch {
    bufs: Vec<PacketBuf>,
    /// Where each prepared frame starts in its buffer (`None`: merged into another).
    starts: Vec<Option<usize>>,
    len: usize,
    gro: GROTable,
    link: usize,
    vnet: bool,
    udp_gro: bool,
}

/// Where each pending IP packet starts in its buffer: room for the virtio-net and link headers.
pub const PACKET_AT: usize = 32;
/// The largest super-packet the kernel takes.
const MAX_SUPER: usize = 65535;

impl DeviceBatch {
    /// A batch of up to `max` packets of up to `mtu` bytes for a device with `link` bytes of link
    /// header, which takes a virtio-net header (`vnet`) and UDP segmentation (`udp_gro`, Linux
    /// 6.2+).
    pub fn new(max: usize, mtu: usize, link: usize, vnet: bool, udp_gro: bool) -> Self {
        let cap = PACKET_AT + if vnet { MAX_SUPER } else { mtu.max(576) };
        DeviceBatch {
            bufs: (0..max.max(1)).map(|_| PacketBuf::new(cap)).collect(),
            starts: vec![None; max.max(1)],
            len: 0,
            gro: GROTable::new(),
            link,
            vnet,
            udp_gro,
        }
    }

    /// Whether there is room for another packet.
    pub fn has_room(&self) -> bool {
        self.len < self.bufs.len()
    }

    /// Pending packets.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The next free buffer, from [`PACKET_AT`] on: decrypt into it, then [`DeviceBatch::commit`].
    /// `None` when the batch is full. Not zeroed: it may hold an earlier packet (another peer's
    /// plaintext), so read only what was written into it.
    pub fn slot(&mut self, max_packet: usize) -> Option<&mut [u8]> {
        let buf = self.bufs.get_mut(self.len)?;
        buf.set_len(PACKET_AT + max_packet);
        Some(&mut buf.as_mut()[PACKET_AT..])
    }

    /// Keeps the first `len` bytes of the slot as a pending packet.
    pub fn commit(&mut self, len: usize) {
        if let Some(buf) = self.bufs.get_mut(self.len) {
            buf.set_len((PACKET_AT + len).min(buf.len));
            self.len += 1;
        }
    }

    /// Coalesces the pending packets (on an offloading device) and puts in front of each what
    /// the device expects: the virtio-net header (if any) and the link header that `link_header`
    /// fills in from the IP packet. Then [`DeviceBatch::frames`] are ready to write. Returns how
    /// many of them are coalesced super-packets.
    pub fn prepare(&mut self, mut link_header: impl FnMut(&[u8], &mut [u8])) -> usize {
        let mut supers = 0;
        let pending = &mut self.bufs[..self.len];
        let coalesced = self.vnet && {
            for buf in pending.iter_mut() {
                buf.as_mut()[PACKET_AT - VNET_HLEN] = MERGED;
            }
            self.gro.apply_gro(pending, PACKET_AT, self.udp_gro).is_ok()
        };
        let link = self.link;
        for (buf, start) in pending.iter_mut().zip(self.starts.iter_mut()) {
            *start = None;
            let buf = buf.as_mut();
            let link_at = PACKET_AT - link;
            let frame_at = if self.vnet {
                let hdr = if coalesced {
                    if buf[PACKET_AT - VNET_HLEN] == MERGED {
                        continue; // merged into an earlier packet of its flow
                    }
                    let Ok(mut hdr) = VirtioNetHdr::decode(&buf[PACKET_AT - VNET_HLEN..PACKET_AT])
                    else {
                        continue;
                    };
                    // tun-rs counts offsets from the IP header; the kernel counts from the start
                    // of the frame.
                    if hdr.flags & NEEDS_CSUM != 0 {
                        hdr.csum_start += link as u16;
                    }
                    if hdr.gso_type != GSO_NONE {
                        hdr.hdr_len += link as u16;
                        supers += 1;
                    }
                    hdr
                } else {
                    VirtioNetHdr::default()
                };
                let at = link_at - VNET_HLEN;
                if hdr.encode(&mut buf[at..link_at]).is_err() {
                    continue;
                }
                at
            } else {
                link_at
            };
            if link > 0 {
                let (head, packet) = buf.split_at_mut(PACKET_AT);
                link_header(packet, &mut head[link_at..]);
            }
            *start = Some(frame_at);
        }
        supers
    }

    /// The frames [`DeviceBatch::prepare`] made, in order.
    pub fn frames(&self) -> impl Iterator<Item = &[u8]> {
        self.bufs[..self.len]
            .iter()
            .zip(&self.starts)
            .filter_map(|(buf, start)| start.map(|at| &buf.as_ref()[at..]))
    }

    /// Empties the batch (after writing its frames).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// [`DeviceBatch::prepare`], hand each frame to `write`, [`DeviceBatch::clear`].
    #[cfg(test)]
    fn drain(&mut self, link_header: impl FnMut(&[u8], &mut [u8]), write: impl FnMut(&[u8])) {
        self.prepare(link_header);
        self.frames().for_each(write);
        self.clear();
    }
}

/// One pending packet's buffer. Its bytes are initialized once, up to the most it has held, and
/// never again: the packet's end is `len`. Why: a `Vec` cut to each packet's length would zero
/// the next slot (an MTU and more) for every packet, which was 9% of the receive side's CPU at
/// 100-byte packets. tun-rs's coalescing grows a flow's packet through [`ExpandBuffer`]
/// (appending to the first, or prepending into a later one and swapping the two), within the
/// capacity it checks first.
struct PacketBuf {
    bytes: Vec<u8>,
    len: usize,
    /// What tun-rs may fill: the header room and the largest super-packet the kernel takes
    /// (kept apart from the `Vec`'s capacity, which an oversized slot could raise).
    capacity: usize,
}

impl PacketBuf {
    fn new(capacity: usize) -> Self {
        PacketBuf {
            bytes: Vec::with_capacity(capacity),
            len: 0,
            capacity,
        }
    }

    /// Sets the packet's end, initializing bytes only the first time they are reached.
    fn set_len(&mut self, len: usize) {
        if len > self.bytes.len() {
            self.bytes.resize(len, 0);
        }
        self.len = len;
    }
}

impl AsRef<[u8]> for PacketBuf {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl AsMut<[u8]> for PacketBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[..self.len]
    }
}

impl ExpandBuffer for PacketBuf {
    fn buf_capacity(&self) -> usize {
        self.capacity
    }

    fn buf_resize(&mut self, new_len: usize, value: u8) {
        let old = self.len;
        self.set_len(new_len);
        if new_len > old {
            self.bytes[old..new_len].fill(value);
        }
    }

    fn buf_extend_from_slice(&mut self, src: &[u8]) {
        let at = self.len;
        self.set_len(at + src.len());
        self.bytes[at..self.len].copy_from_slice(src);
    }
}

/// Whether an error from a device with a virtio-net header means "this kernel cannot" rather
/// than "this packet is bad".
pub fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP packet from 10.66.0.2:5000 to 10.66.0.1:6000 with sequence `seq` and
    /// `payload` bytes of `fill`, checksums valid.
    fn tcp(seq: u32, payload: usize, fill: u8) -> Vec<u8> {
        let builder = etherparse::PacketBuilder::ipv4([10, 66, 0, 2], [10, 66, 0, 1], 64)
            .tcp(5000, 6000, seq, 65535)
            .ack(1);
        let data = vec![fill; payload];
        let mut out = Vec::new();
        builder.write(&mut out, &data).unwrap();
        out
    }

    fn ipv4_len(pkt: &[u8]) -> usize {
        usize::from(u16::from_be_bytes([pkt[2], pkt[3]]))
    }

    #[test]
    fn a_run_of_one_flow_is_written_once_with_a_gso_header_behind_the_link_header() {
        let mut batch = DeviceBatch::new(8, 1400, 14, true, false);
        for i in 0..4u32 {
            let pkt = tcp(1 + i * 1000, 1000, i as u8);
            let slot = batch.slot(1400).unwrap();
            slot[..pkt.len()].copy_from_slice(&pkt);
            batch.commit(pkt.len());
        }
        let mut frames = Vec::new();
        batch.drain(|_, eth| eth.fill(0xee), |f| frames.push(f.to_vec()));
        assert_eq!(frames.len(), 1);
        let f = &frames[0];
        let hdr = VirtioNetHdr::decode(&f[..VNET_HLEN]).unwrap();
        assert_eq!(hdr.gso_type, VIRTIO_NET_HDR_GSO_TCPV4);
        assert_eq!(hdr.gso_size, 1000);
        assert_eq!(hdr.csum_start, 14 + 20, "counted from the Ethernet header");
        assert_eq!(hdr.hdr_len, 14 + 20 + 20);
        assert_eq!(&f[VNET_HLEN..VNET_HLEN + 14], &[0xee; 14]);
        let ip = &f[VNET_HLEN + 14..];
        assert_eq!(ipv4_len(ip), 20 + 20 + 4000);
        assert_eq!(ip.len(), 4040);
        assert!(batch.is_empty());
    }

    #[test]
    fn reused_buffers_hold_exactly_each_new_packet_also_when_tun_rs_grows_them() {
        let mut batch = DeviceBatch::new(8, 1400, 14, true, false);
        let mut round = |packets: &[Vec<u8>]| {
            for pkt in packets {
                let slot = batch.slot(1400).unwrap();
                slot[..pkt.len()].copy_from_slice(pkt);
                batch.commit(pkt.len());
            }
            let mut frames = Vec::new();
            batch.drain(|_, eth| eth.fill(0), |f| frames.push(f.to_vec()));
            frames
        };
        // A long run grows the first buffer; a short lone packet then reuses it.
        let run: Vec<_> = (0..4u32).map(|i| tcp(1 + i * 1000, 1000, 0xaa)).collect();
        assert_eq!(round(&run).len(), 1);
        let lone = tcp(1, 10, 0x55);
        let frames = round(std::slice::from_ref(&lone));
        assert_eq!(frames.len(), 1);
        let hdr = VirtioNetHdr::decode(&frames[0][..VNET_HLEN]).unwrap();
        assert_eq!(
            (hdr.gso_type, hdr.gso_size, hdr.flags),
            (GSO_NONE, 0, 0),
            "no stale offload header in front of it"
        );
        assert_eq!(
            &frames[0][VNET_HLEN + 14..],
            &lone[..],
            "no stale bytes after it"
        );
        // Out of order: tun-rs prepends the earlier segment, growing its buffer in place.
        let (first, second) = (tcp(1, 500, 1), tcp(501, 500, 2));
        let frames = round(&[second, first]);
        assert_eq!(frames.len(), 1);
        let ip = &frames[0][VNET_HLEN + 14..];
        assert_eq!(ip.len(), 40 + 1000);
        assert_eq!(ipv4_len(ip), 40 + 1000);
        assert!(ip[40..540].iter().all(|&b| b == 1));
        assert!(ip[540..].iter().all(|&b| b == 2));
    }

    /// However large a buffer's allocation grew, one flow is coalesced into super-packets of
    /// at most 64 KiB (an IP length field), and no payload is lost.
    #[test]
    fn super_packets_stay_within_64_kib_even_after_an_oversized_slot() {
        let mut batch = DeviceBatch::new(64, 1400, 14, true, false);
        let _ = batch.slot(200_000); // grows the first buffer's allocation past its capacity
        let packets: Vec<_> = (0..50u32).map(|i| tcp(1 + i * 1400, 1400, 7)).collect();
        for pkt in &packets {
            let slot = batch.slot(1500).unwrap();
            slot[..pkt.len()].copy_from_slice(pkt);
            batch.commit(pkt.len());
        }
        let mut frames = Vec::new();
        batch.drain(|_, eth| eth.fill(0), |f| frames.push(f.to_vec()));
        assert!(
            frames.len() >= 2,
            "70 000 bytes of payload need two super-packets"
        );
        let mut payload = 0;
        for f in &frames {
            let ip = &f[VNET_HLEN + 14..];
            assert_eq!(
                ipv4_len(ip),
                ip.len(),
                "the IP length field holds the whole packet"
            );
            assert!(ip.len() <= 65535);
            payload += ip.len() - 40;
        }
        assert_eq!(payload, 50 * 1400);
    }

    #[test]
    fn what_does_not_coalesce_is_written_alone_with_an_empty_header() {
        let mut batch = DeviceBatch::new(8, 1400, 14, true, false);
        // Two flows' worth: a gap in the sequence numbers breaks the run.
        for (seq, fill) in [(1u32, 1u8), (5001, 2)] {
            let pkt = tcp(seq, 100, fill);
            let slot = batch.slot(1400).unwrap();
            slot[..pkt.len()].copy_from_slice(&pkt);
            batch.commit(pkt.len());
        }
        let mut frames = Vec::new();
        batch.drain(|_, eth| eth.fill(1), |f| frames.push(f.to_vec()));
        assert_eq!(frames.len(), 2);
        for (f, fill) in frames.iter().zip([1u8, 2]) {
            assert_eq!(&f[..VNET_HLEN], &[0u8; VNET_HLEN]);
            assert_eq!(*f.last().unwrap(), fill);
        }
    }

    #[test]
    fn without_a_virtio_header_frames_are_the_link_header_and_the_packet() {
        let mut batch = DeviceBatch::new(2, 1400, 0, false, false);
        let pkt = tcp(1, 10, 7);
        let slot = batch.slot(1400).unwrap();
        slot[..pkt.len()].copy_from_slice(&pkt);
        batch.commit(pkt.len());
        assert!(batch.has_room());
        let mut frames = Vec::new();
        batch.drain(
            |_, _| unreachable!("no link header on TUN"),
            |f| frames.push(f.to_vec()),
        );
        assert_eq!(frames, vec![pkt]);
    }

    #[test]
    fn a_tso_read_from_tap_splits_into_mss_sized_packets_with_valid_checksums() {
        // What the kernel hands a TAP device with TSO: one 3000-byte TCP payload, gso_size 1000,
        // the checksum partial (pseudo-header sum only), IP length of the whole.
        let whole = tcp(100, 3000, 9);
        let mut buf = vec![0u8; VNET_HLEN + 14];
        let hdr = VirtioNetHdr {
            flags: NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: 14 + 40,
            gso_size: 1000,
            csum_start: 14 + 20,
            csum_offset: 16,
        };
        hdr.encode(&mut buf[..VNET_HLEN]).unwrap();
        buf.extend_from_slice(&whole);
        let n = buf.len();
        buf.resize(n + 100, 0);
        let mut segs = Segments::new(1400);
        let got = device_read(&mut buf, n, 14, &mut segs).unwrap();
        assert_eq!(got, DeviceRead::Split(3));
        for i in 0..3 {
            let p = segs.get(i);
            assert_eq!(p.len(), 1040);
            let parsed = etherparse::SlicedPacket::from_ip(p).unwrap();
            let Some(etherparse::TransportSlice::Tcp(t)) = parsed.transport else {
                panic!("not tcp")
            };
            assert_eq!(t.sequence_number(), 100 + 1000 * i as u32);
            let etherparse::NetSlice::Ipv4(ip) = parsed.net.unwrap() else {
                panic!()
            };
            let want = t
                .to_header()
                .calc_checksum_ipv4(&ip.header().to_header(), t.payload())
                .unwrap();
            assert_eq!(t.checksum(), want, "segment {i} checksum");
        }
    }

    #[test]
    fn a_partial_checksum_is_finished_and_hostile_offsets_are_refused() {
        let mut pkt = tcp(1, 50, 3);
        let good = pkt.clone();
        // Replace the TCP checksum with the pseudo-header sum, as the kernel leaves it.
        let src = [10u8, 66, 0, 2];
        let dst = [10u8, 66, 0, 1];
        let tcp_len = (pkt.len() - 20) as u16;
        let mut sum: u32 = 0;
        for w in [src, dst] {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
            sum += u32::from(u16::from_be_bytes([w[2], w[3]]));
        }
        sum += 6 + u32::from(tcp_len);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        pkt[36..38].copy_from_slice(&(sum as u16).to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: NEEDS_CSUM,
            csum_start: 14 + 20,
            csum_offset: 16,
            ..Default::default()
        };
        let mut buf = vec![0u8; VNET_HLEN + 14];
        hdr.encode(&mut buf[..VNET_HLEN]).unwrap();
        buf.extend_from_slice(&pkt);
        let n = buf.len();
        let mut segs = Segments::new(1400);
        assert_eq!(device_read(&mut buf, n, 14, &mut segs), Ok(DeviceRead::One));
        assert_eq!(&buf[VNET_HLEN + 14..n], &good[..]);

        for (start, offset) in [(0u16, 16u16), (14 + 20, 4000), (u16::MAX, u16::MAX)] {
            let hdr = VirtioNetHdr {
                flags: NEEDS_CSUM,
                csum_start: start,
                csum_offset: offset,
                ..Default::default()
            };
            hdr.encode(&mut buf[..VNET_HLEN]).unwrap();
            assert_eq!(
                device_read(&mut buf, n, 14, &mut segs),
                Err(ReadError::Malformed)
            );
        }
        assert_eq!(
            device_read(&mut buf, 5, 14, &mut segs),
            Err(ReadError::Malformed)
        );
    }
}
