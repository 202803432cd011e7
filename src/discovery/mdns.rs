//! mDNS/DNS-SD on the LAN: parties this node hosts are announced as standard DNS-SD instances of
//! `_lanrage._udp.local.` (so `avahi-browse -r _lanrage._udp` shows them), and instances announced
//! by others are browsed, resolved and offered as joinable parties.
//!
//! This is lanrage's own small mDNS stack, because a general one keeps whatever a LAN host sends
//! it: mdns-sd 0.21 (the newest) cached every record of any response that carried one PTR for a
//! browsed service, without a cap, and a host flooding such responses grew the daemon by
//! gigabytes. Here only records about `_lanrage._udp.local.` are kept, in bounded tables, and the
//! work per datagram and per second is bounded too (see [`core`] for every bound and why it
//! holds). [`message`] parses and builds DNS messages through the `simple-dns` crate; [`naming`]
//! spells a party in DNS-SD terms; this module is the I/O edge.
//!
//! The edge: one thread ("lanrage-mdns", so a flood never competes with the async runtime) owns
//! one UDP socket on port 5353 (`SO_REUSEADDR` + `SO_REUSEPORT`, so it coexists with avahi and
//! other mDNS stacks), joined to 224.0.0.251 on every IPv4 interface except the excluded ones
//! (the TUN interface: parties are found on the real LAN, never through the tunnel), with
//! `IP_MULTICAST_ALL` off (so group traffic from other interfaces is never delivered) and
//! multicast loop on (so several daemons on one machine see each other). A datagram is attributed
//! to the interface whose subnet holds its source address; datagrams from anywhere else are
//! dropped (mDNS is link-local, RFC 6762 §11). Interfaces are re-read every few seconds. IPv4
//! only: the endpoints a party is joined at are IPv4, so there is nothing to find over IPv6.
//!
//! Liveness: every instance is re-confirmed every [`VERIFY_EVERY`]; a crashed announcer (no
//! goodbye) vanishes within [`VERIFY_EVERY`] + [`VERIFY_TIMEOUT`] (8 s). Announcements skip RFC
//! 6762 probing: the instance name embeds the random party id and the host name embeds the node
//! id, so there is nothing to conflict with, and skipping it makes updates immediate. An update is
//! announced twice, 1 s apart, with the cache-flush bit; announcements repeat every
//! [`REANNOUNCE_EVERY`]; a withdraw sends goodbyes (TTL 0) twice, 250 ms apart, and a
//! re-announcement in between cancels the second one.

pub mod core;
pub mod message;
pub mod naming;

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use socket2::{Domain, InterfaceIndexOrAddress, Protocol, SockRef, Socket, Type};

use self::core::{Core, Iface, Stats, GROUP, MAX_OWN};
pub use self::core::{REANNOUNCE_EVERY, VERIFY_EVERY, VERIFY_TIMEOUT};
use super::file::validate_ad;
use super::PartyAd;
use crate::ids::PartyId;

/// The DNS-SD service type lanrage parties are announced under.
pub const SERVICE_TYPE: &str = "_lanrage._udp.local.";
/// The mDNS port.
pub const MDNS_PORT: u16 = 5353;
/// Most parties listed from browsing.
pub const MAX_PARTIES: usize = self::core::MAX_INSTANCES;
/// How long the thread waits for a datagram before looking at its timers and commands.
const TICK: Duration = Duration::from_millis(25);
/// The read budget is counted per slice of this length.
const SLICE: Duration = Duration::from_millis(100);
/// Most datagrams read per [`SLICE`] (2000/s). Beyond that the thread sleeps until the slice
/// ends and the kernel drops what does not fit its receive buffer: a flood costs bounded CPU.
const READS_PER_SLICE: u32 = 200;
/// Receive buffer asked of the kernel (the queue of unread datagrams).
const RECV_BUFFER: usize = 256 * 1024;
/// How often the interfaces are re-read.
const IFACE_CHECK: Duration = Duration::from_secs(5);
/// Most interfaces mDNS runs on.
const MAX_IFACES: usize = 32;
/// Drops and refusals are summarised in the log at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// How long [`Mdns::shutdown`] waits for goodbyes to leave.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

/// Why an mDNS operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MdnsError {
    /// The socket could not be set up.
    #[error("mDNS: {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The announcement is not something browsers would accept (see [`super::file`]'s rules).
    #[error("invalid party announcement: {0}")]
    Invalid(&'static str),
    /// Starting the background thread failed.
    #[error("mDNS: spawn thread: {0}")]
    Thread(#[source] io::Error),
    /// [`Mdns::shutdown`] ran.
    #[error("mDNS is shut down")]
    Stopped,
    /// Too many parties announced at once.
    #[error("mDNS: at most {MAX_OWN} parties can be announced")]
    Full,
}

/// What the API asked to announce; the thread brings the core in line with it.
#[derive(Default)]
struct Wanted {
    parties: BTreeMap<PartyId, (PartyAd, Vec<Ipv4Addr>, u16)>,
    version: u64,
}

/// State shared with the thread.
#[derive(Default)]
struct Shared {
    wanted: Mutex<Wanted>,
    /// What the thread last published: parties seen (ours included).
    parties: Mutex<Vec<PartyAd>>,
    /// The core's counters, as last published.
    stats: Mutex<Stats>,
    stop: AtomicBool,
    /// Tests: end the thread without goodbyes, as a killed process would.
    crash: AtomicBool,
}

/// The LAN discovery source: announces the parties this node hosts and browses for everyone
/// else's. Usable from async code: nothing here blocks on the network except
/// [`Mdns::shutdown`], which waits briefly for goodbyes to leave.
pub struct Mdns {
    shared: Arc<Shared>,
    worker: Mutex<Option<thread::JoinHandle<()>>>,
}

impl Mdns {
    /// Start mDNS on port 5353; never announce or browse on the interfaces named in `exclude`
    /// (the TUN interface, e.g. "lanrage0": parties must be found on the real LAN, not through the
    /// tunnel). Loopback stays enabled.
    pub fn start(exclude: &[String]) -> Result<Self, MdnsError> {
        Self::start_on_port(exclude, MDNS_PORT)
    }

    /// [`Self::start`] on a non-standard port (tests use one, so they neither see nor disturb
    /// the real LAN).
    fn start_on_port(exclude: &[String], port: u16) -> Result<Self, MdnsError> {
        let socket = open_socket(port)?;
        let shared = Arc::new(Shared::default());
        let worker = {
            let shared = Arc::clone(&shared);
            let exclude = exclude.to_vec();
            thread::Builder::new()
                .name("lanrage-mdns".into())
                .spawn(move || run(socket, port, exclude, shared))
                .map_err(MdnsError::Thread)?
        };
        Ok(Mdns {
            shared,
            worker: Mutex::new(Some(worker)),
        })
    }

    /// Register or update (members count changed, host changed) the announcement of a party this
    /// node hosts. `addrs` are this node's LAN addresses (each is announced only on the interface
    /// whose subnet contains it; empty = each interface's own address) and `port` is the daemon's
    /// UDP port. `ad.endpoints` is not sent: browsers rebuild endpoints from the A records × SRV
    /// port, which is what they can actually reach. Calling it again with unchanged content does
    /// nothing (repeating is done in the background).
    pub fn announce(&self, ad: &PartyAd, addrs: &[Ipv4Addr], port: u16) -> Result<(), MdnsError> {
        validate_ad(ad).map_err(MdnsError::Invalid)?;
        if port == 0 {
            return Err(MdnsError::Invalid("port 0"));
        }
        if self.shared.stop.load(Ordering::SeqCst) {
            return Err(MdnsError::Stopped);
        }
        let mut addrs = addrs.to_vec();
        addrs.sort();
        addrs.dedup();
        let entry = (ad.clone(), addrs, port);
        let mut wanted = self.shared.wanted.lock();
        if wanted.parties.get(&ad.id) == Some(&entry) {
            return Ok(());
        }
        if !wanted.parties.contains_key(&ad.id) && wanted.parties.len() >= MAX_OWN {
            return Err(MdnsError::Full);
        }
        wanted.parties.insert(ad.id, entry);
        wanted.version += 1;
        tracing::debug!(party = %ad.id, "mDNS: announcing party");
        Ok(())
    }

    /// Send goodbye for the party (party ended or host role moved away). No-op if not announced.
    pub fn withdraw(&self, id: PartyId) {
        let mut wanted = self.shared.wanted.lock();
        if wanted.parties.remove(&id).is_some() {
            wanted.version += 1;
        }
    }

    /// Parties currently seen on the LAN (our own announcements included), fresh only: every
    /// entry has been (re)confirmed by its announcer within the last few seconds, or is being
    /// re-confirmed right now. One entry per announcing host: a party normally has one, two
    /// after a network split (the daemon merges them).
    pub fn parties(&self) -> Vec<PartyAd> {
        self.shared.parties.lock().clone()
    }

    /// What the mDNS core counted (datagrams dropped over budget, malformed, refused instances…).
    pub fn stats(&self) -> Stats {
        self.shared.stats.lock().clone()
    }

    /// Whether the mDNS thread ended without being asked to (a panic): the daemon then stops
    /// with an error instead of listing ever staler parties.
    pub fn has_failed(&self) -> bool {
        !self.shared.stop.load(Ordering::SeqCst)
            && self.worker.lock().as_ref().is_some_and(|w| w.is_finished())
    }

    /// Stop: goodbye for everything announced, then the thread ends. Blocks briefly (normally a
    /// few hundred milliseconds, at most about a second) so the goodbyes are on the wire first.
    /// Idempotent; also run on drop.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let Some(worker) = self.worker.lock().take() else {
            return;
        };
        let deadline = Instant::now() + SHUTDOWN_WAIT + Duration::from_millis(500);
        while !worker.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        if worker.is_finished() {
            let _ = worker.join();
        }
        self.shared.parties.lock().clear();
    }

    /// Tests: end the thread without goodbyes, like a killed process.
    #[cfg(test)]
    fn crash(&self) {
        self.shared.crash.store(true, Ordering::SeqCst);
        if let Some(worker) = self.worker.lock().take() {
            let _ = worker.join();
        }
    }
}

impl Drop for Mdns {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The mDNS socket: port `port` on every address, shared with other mDNS stacks.
fn open_socket(port: u16) -> Result<UdpSocket, MdnsError> {
    let io = |op: &'static str| move |source| MdnsError::Io { op, source };
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(io("socket"))?;
    // SO_REUSEADDR alone lets every mDNS stack bind 5353 and get every multicast datagram. Not
    // SO_REUSEPORT: sockets of one user with it form a load-balancing group, and the kernel
    // then hands a datagram meant for another stack (a root avahi listening on the party
    // interface) to this socket instead, which drops it.
    s.set_reuse_address(true).map_err(io("SO_REUSEADDR"))?;
    s.set_multicast_all_v4(false)
        .map_err(io("IP_MULTICAST_ALL"))?;
    s.set_multicast_loop_v4(true)
        .map_err(io("IP_MULTICAST_LOOP"))?;
    s.set_multicast_ttl_v4(255)
        .map_err(io("IP_MULTICAST_TTL"))?;
    // Best effort: the kernel may cap it.
    let _ = s.set_recv_buffer_size(RECV_BUFFER);
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())
        .map_err(io("bind"))?;
    s.set_read_timeout(Some(TICK)).map_err(io("SO_RCVTIMEO"))?;
    Ok(s.into())
}

/// This machine's IPv4 interfaces, minus `exclude`, at most [`MAX_IFACES`], one address each.
fn lan_ifaces(exclude: &[String]) -> Vec<Iface> {
    let Ok(all) = if_addrs::get_if_addrs() else {
        return Vec::new();
    };
    let mut out: Vec<Iface> = Vec::new();
    for i in all {
        let (if_addrs::IfAddr::V4(v4), Some(index)) = (&i.addr, i.index) else {
            continue;
        };
        if exclude.contains(&i.name)
            || i.oper_status == if_addrs::IfOperStatus::Down
            || out.iter().any(|o| o.index == index)
        {
            continue;
        }
        out.push(Iface {
            index,
            addr: v4.ip,
            prefix: v4.prefixlen,
        });
        if out.len() >= MAX_IFACES {
            break;
        }
    }
    out.sort_by_key(|i| i.index);
    out
}

/// The background thread: reads datagrams within the read budget, runs the core's timers,
/// sends what it produces, applies announce/withdraw requests and publishes the parties seen.
fn run(socket: UdpSocket, port: u16, exclude: Vec<String>, shared: Arc<Shared>) {
    let mut core = Core::new(port, Instant::now());
    let mut joined: HashSet<u32> = HashSet::new();
    let mut failed: HashSet<u32> = HashSet::new();
    let mut seen_version = 0u64;
    let mut next_iface_check = Instant::now();
    let mut slice_end = Instant::now() + SLICE;
    let mut reads = 0u32;
    let mut buf = vec![0u8; message::MAX_MESSAGE + 1];
    let mut logged = Stats::default();
    let mut next_log = Instant::now() + LOG_EVERY;
    loop {
        if shared.crash.load(Ordering::SeqCst) {
            return;
        }
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let now = Instant::now();
        if now >= next_iface_check {
            next_iface_check = now + IFACE_CHECK;
            let ifaces = join_ifaces(&socket, lan_ifaces(&exclude), &mut joined, &mut failed);
            core.set_ifaces(now, ifaces);
        }
        {
            let wanted = shared.wanted.lock();
            if wanted.version != seen_version {
                seen_version = wanted.version;
                for id in core.announced() {
                    if !wanted.parties.contains_key(&id) {
                        core.withdraw(now, id);
                    }
                }
                for (ad, addrs, port) in wanted.parties.values() {
                    core.announce(now, ad, addrs, *port);
                }
            }
        }
        if now >= core.poll_timeout() {
            core.handle_timeout(now);
        }
        flush(&socket, &mut core);
        if core.take_changed() {
            let mut parties = core.parties();
            parties.truncate(MAX_PARTIES);
            *shared.parties.lock() = parties;
        }
        let stats = core.stats().clone();
        if now >= next_log {
            next_log = now + LOG_EVERY;
            log_drops(&logged, &stats);
            logged = stats.clone();
        }
        *shared.stats.lock() = stats;

        if now >= slice_end {
            slice_end = now + SLICE;
            reads = 0;
        }
        if reads >= READS_PER_SLICE {
            thread::sleep(slice_end.saturating_duration_since(now));
            continue;
        }
        match socket.recv_from(&mut buf) {
            Ok((n, SocketAddr::V4(src))) => {
                reads += 1;
                // One byte more than the largest message fits the buffer: longer ones were cut.
                if n > message::MAX_MESSAGE {
                    continue;
                }
                let Some(iface) = core
                    .ifaces()
                    .iter()
                    .find(|i| i.contains(*src.ip()))
                    .copied()
                else {
                    continue;
                };
                core.handle_packet(Instant::now(), src, iface, &buf[..n]);
            }
            Ok(_) => reads += 1,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                tracing::debug!("mDNS: receive failed: {e}");
                thread::sleep(SLICE);
            }
        }
    }
    // Goodbyes, then the socket closes (which leaves the groups).
    let deadline = Instant::now() + SHUTDOWN_WAIT;
    core.withdraw_all(Instant::now());
    while core.goodbyes_pending() && Instant::now() < deadline {
        let now = Instant::now();
        if now >= core.poll_timeout() {
            core.handle_timeout(now);
        }
        flush(&socket, &mut core);
        thread::sleep(
            core.poll_timeout()
                .saturating_duration_since(Instant::now())
                .min(TICK),
        );
    }
    flush(&socket, &mut core);
}

/// Joins the mDNS group on every interface of `ifaces` not joined yet and leaves it on those that
/// are gone. Returns the interfaces that are joined (an interface that refuses is logged once).
fn join_ifaces(
    socket: &UdpSocket,
    ifaces: Vec<Iface>,
    joined: &mut HashSet<u32>,
    failed: &mut HashSet<u32>,
) -> Vec<Iface> {
    let sock = SockRef::from(socket);
    let gone: Vec<u32> = joined
        .iter()
        .copied()
        .filter(|j| !ifaces.iter().any(|i| i.index == *j))
        .collect();
    for index in gone {
        let _ = sock.leave_multicast_v4_n(&GROUP, &InterfaceIndexOrAddress::Index(index));
        joined.remove(&index);
    }
    failed.retain(|index| ifaces.iter().any(|i| i.index == *index));
    ifaces
        .into_iter()
        .filter(|i| {
            if joined.contains(&i.index) {
                return true;
            }
            match sock.join_multicast_v4_n(&GROUP, &InterfaceIndexOrAddress::Index(i.index)) {
                Ok(()) => {
                    joined.insert(i.index);
                    failed.remove(&i.index);
                    true
                }
                Err(e) => {
                    if failed.insert(i.index) {
                        tracing::debug!(interface = i.index, "mDNS: cannot join the group: {e}");
                    }
                    false
                }
            }
        })
        .collect()
}

/// Sends everything the core has queued.
fn flush(socket: &UdpSocket, core: &mut Core) {
    let sock = SockRef::from(socket);
    while let Some(t) = core.poll_transmit() {
        if let Some(via) = t.via {
            if sock.set_multicast_if_v4(&via.addr).is_err() {
                continue;
            }
        }
        if let Err(e) = socket.send_to(&t.bytes, t.dest) {
            tracing::trace!(dest = %t.dest, "mDNS: send failed: {e}");
        }
    }
}

/// One log line per [`LOG_EVERY`] at most about what a LAN host made us drop.
fn log_drops(before: &Stats, now: &Stats) {
    let over = now.rate_limited.saturating_sub(before.rate_limited);
    let malformed = now.malformed.saturating_sub(before.malformed);
    let refused = now
        .instances_refused
        .saturating_sub(before.instances_refused);
    if over + malformed + refused > 0 {
        tracing::warn!(
            over_budget = over,
            malformed,
            instances_refused = refused,
            "mDNS: dropped datagrams from the LAN in the last minute (a host is flooding or misbehaving)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::AD_VERSION;
    use crate::ids::NodeId;

    #[test]
    fn invalid_announcements_are_refused_without_a_network() {
        let mdns = Mdns::start_on_port(&[], 0).unwrap();
        let mut a = PartyAd {
            id: PartyId([7; 10]),
            name: "x".repeat(65),
            host_id: NodeId([3; 8]),
            host_name: "alice".into(),
            host_key: "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into(),
            endpoints: vec![],
            members: 1,
            protected: false,
            version: AD_VERSION,
            proto: crate::wire::WIRE_VERSION,
        };
        assert!(matches!(
            mdns.announce(&a, &[], 1),
            Err(MdnsError::Invalid(_))
        ));
        a.name = "ok".into();
        assert!(matches!(
            mdns.announce(&a, &[], 0),
            Err(MdnsError::Invalid(_))
        ));
    }
}
#[cfg(test)]
mod loopback_tests {
    //! Two `Mdns` instances in one machine, over loopback multicast, on a random non-standard
    //! port (so the real LAN is neither seen nor disturbed).
    use super::*;
    use crate::discovery::AD_VERSION;
    use crate::ids::NodeId;
    use std::net::SocketAddr;

    fn party(id: PartyId, members: u32) -> PartyAd {
        PartyAd {
            id,
            name: "Loop party".into(),
            host_id: NodeId([3; 8]),
            host_name: "alice".into(),
            host_key: "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into(),
            endpoints: vec![SocketAddr::from(([127, 0, 0, 1], 4242))],
            members,
            protected: false,
            version: AD_VERSION,
            proto: crate::wire::WIRE_VERSION,
        }
    }

    /// Polls `m.parties()` until `pred` holds; returns how long that took.
    fn wait_for(m: &Mdns, within: Duration, pred: impl Fn(&[PartyAd]) -> bool) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < within {
            if pred(&m.parties()) {
                return Some(start.elapsed());
            }
            thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// A random port below Linux's ephemeral range, so it does not collide with sockets that
    /// other tests bind to port 0.
    fn test_port() -> u16 {
        rand::random::<u16>() % 12000 + 20000
    }

    #[test]
    fn announce_update_withdraw_and_crash() {
        let port = test_port();
        let host = Mdns::start_on_port(&["lanrage-test0".to_string()], port).unwrap();
        let browser = Mdns::start_on_port(&[], port).unwrap();
        let id = PartyId::random();
        let within = Duration::from_secs(10);

        host.announce(&party(id, 1), &[Ipv4Addr::LOCALHOST], 4242)
            .unwrap();
        assert!(
            wait_for(&browser, within, |p| p == [party(id, 1)]).is_some(),
            "announcement not seen"
        );
        // Our own announcement is listed too.
        assert!(wait_for(&host, within, |p| p == [party(id, 1)]).is_some());

        // An update (member count) replaces the entry in place.
        host.announce(&party(id, 2), &[Ipv4Addr::LOCALHOST], 4242)
            .unwrap();
        assert!(
            wait_for(&browser, within, |p| p == [party(id, 2)]).is_some(),
            "update not seen"
        );

        // A crashed announcer (no goodbye) disappears through re-confirmation. The crash ends
        // its thread without goodbyes and closes its socket, exactly like a dead process.
        let crasher = Mdns::start_on_port(&[], port).unwrap();
        let crashed = PartyId::random();
        crasher
            .announce(&party(crashed, 1), &[Ipv4Addr::LOCALHOST], 4242)
            .unwrap();
        let seen = wait_for(&browser, within, |p| p.iter().any(|a| a.id == crashed));
        assert!(seen.is_some(), "second announcement not seen");
        crasher.crash();
        let gone = wait_for(
            &browser,
            VERIFY_EVERY + VERIFY_TIMEOUT + Duration::from_secs(4),
            |p| p.iter().all(|a| a.id != crashed),
        );
        assert!(gone.is_some(), "crashed announcer still listed");

        // Meanwhile the live announcer went through a verification round and is still listed,
        // also by itself.
        thread::sleep(Duration::from_secs(1));
        assert_eq!(browser.parties(), [party(id, 2)]);
        assert_eq!(host.parties(), [party(id, 2)]);

        // Renaming re-announces under the new instance name and says goodbye to the old one.
        let mut renamed = party(id, 2);
        renamed.name = "Renamed".into();
        host.announce(&renamed, &[Ipv4Addr::LOCALHOST], 4242)
            .unwrap();
        assert!(
            wait_for(&browser, within, |p| p == [renamed.clone()]).is_some(),
            "rename not seen"
        );

        // Goodbye.
        host.withdraw(id);
        assert!(
            wait_for(&browser, within, |p| p.is_empty()).is_some(),
            "withdraw not seen"
        );
        host.withdraw(id); // no-op

        host.shutdown();
        host.shutdown(); // idempotent
        assert!(host
            .announce(&party(id, 1), &[Ipv4Addr::LOCALHOST], 4242)
            .is_err());
    }
}
