//! Steering programs that did not choose an interface into the party, by policy routing.
//!
//! A game that looks for LAN servers usually sends to 255.255.255.255 (or to a multicast group)
//! from a socket that bound no address and no device. The kernel routes such a datagram by the
//! main table, so it leaves through the default route (the physical LAN) and never reaches the
//! party. While we are in a party, [`Steering`] installs policy-routing rules (all `lookup
//! <table>`, at one preference) that send exactly those datagrams into the party interface:
//!
//! - `from 0.0.0.0/32 to 255.255.255.255/32 ipproto udp dport A-B` per capture port range,
//! - `from 0.0.0.0/32 to 224.0.0.0/4 ipproto udp dport A-B` per capture port range,
//! - `from 0.0.0.0/32 to G/32` per capture multicast group (joins without an interface too),
//!
//! (A socket bound to the VIP needs no rule: the kernel sends a broadcast or multicast from a
//! bound local address out of that address's interface without consulting the rules.)
//!
//! with `255.255.255.255/32 dev IF scope link` and `224.0.0.0/4 dev IF scope link` in the table.
//! A rule's source `0.0.0.0/32` matches only sockets that bound no address, so a program bound to
//! its LAN address (a DHCP client, a LAN-only game server) keeps using the LAN, as do broadcasts to
//! ports outside the capture list. The kernel then picks the VIP as source (the route is
//! scope link on the party interface), so unicast replies come back through the party.
//!
//! Why rules and not nftables marks: a rule can select the UDP destination port itself
//! (`FRA_IP_PROTO` and `FRA_DPORT_RANGE`, Linux 4.17+), so nothing has to mark packets and there
//! is no firewall state to share with the user's own ruleset; the cost is one rule per port
//! range, which the config bounds ([`MAX_PORT_RANGES`], [`MAX_GROUPS`]).
//!
//! The rule set is computed by the pure [`plan`]; [`Steering`] talks to the kernel over a
//! synchronous `NETLINK_ROUTE` socket (request, then wait for the ACK: a few tens of
//! microseconds per rule), installs only the difference between what is installed and what is
//! wanted, and removes everything in its table at start (leftovers of a crashed run) and in
//! `Drop`. The messages are built with `netlink-packet-route`, already in the build through
//! tun-rs; the ACKs are read by hand (four fixed fields), so a strange kernel answer is an
//! error, never a panic.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage, RulePortRange};
use netlink_packet_route::{AddressFamily, IpProtocol, RouteNetlinkMessage};
use netlink_sys::constants::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};

/// The routing table our rules look up (RFC 6666's number, like the relay's discard prefix; any
/// table the user does not use works).
pub const DEFAULT_TABLE: u32 = 6666;
/// The preference of our rules: after the `local` table (0), well before `main` (32766), so a
/// broadcast is steered before the default route claims it.
pub const DEFAULT_PREF: u32 = 6600;
/// At most this many capture port ranges (each costs two rules).
pub const MAX_PORT_RANGES: usize = 64;
/// At most this many capture multicast groups (each costs one rule).
pub const MAX_GROUPS: usize = 64;

/// The limited broadcast address as a /32.
const LIMITED_BROADCAST: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::BROADCAST, 32);
/// All of IPv4 multicast.
const MULTICAST: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4);
/// The source selector of a socket that bound no address.
const UNBOUND: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 32);

/// How long one kernel answer may take before the request fails (the kernel answers in
/// microseconds; this only bounds a wedged socket).
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a whole dump (start-up sweep) may take.
const DUMP_TIMEOUT: Duration = Duration::from_secs(5);
/// Receive buffer: the kernel's dump datagrams are at most 32 KiB.
const RECV_BUF: usize = 64 * 1024;
/// Leftover rules or routes removed by one sweep, at most (a crashed run leaves at most
/// 2 * [`MAX_PORT_RANGES`] + [`MAX_GROUPS`] rules; the rest would be someone else's mess).
const MAX_SWEEP: usize = 1024;

/// Tables the kernel or every system uses; sweeping one of them would cut the host off.
const RESERVED_TABLES: [u32; 5] = [0, 252, 253, 254, 255];
/// The preference of the `main` rule: ours must come before it.
const MAIN_PREF: u32 = 32766;

// Netlink message types and header offsets (linux/netlink.h), for reading answers by hand.
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// What to steer into the party interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SteerSpec {
    /// The party interface (lanrage0).
    pub ifindex: u32,
    /// Our virtual IP on it.
    pub vip: Ipv4Addr,
    /// UDP capture port ranges.
    pub ports: Vec<RangeInclusive<u16>>,
    /// Capture multicast groups.
    pub groups: Vec<Ipv4Addr>,
}

/// One policy-routing rule of the plan (`from <from> to <to> [ipproto udp dport A-B] lookup
/// <table>`), as data so it can be tested and logged without a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SteerRule {
    /// Source selector: `0.0.0.0/32` (a socket that bound no address).
    pub from: Ipv4Net,
    /// Destination selector.
    pub to: Ipv4Net,
    /// UDP destination ports (first, last), or `None` for any protocol and port.
    pub udp_dports: Option<(u16, u16)>,
}

impl fmt::Display for SteerRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "from {} to {}", self.from, self.to)?;
        if let Some((first, last)) = self.udp_dports {
            write!(f, " ipproto udp dport {first}-{last}")?;
        }
        Ok(())
    }
}

/// One route of the plan, in our table: `<to> dev <ifindex> scope link`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SteerRoute {
    /// Destination prefix.
    pub to: Ipv4Net,
    /// Interface index of the party interface.
    pub ifindex: u32,
}

impl fmt::Display for SteerRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} dev #{} scope link", self.to, self.ifindex)
    }
}

/// Everything a [`SteerSpec`] asks the kernel for: rules sorted and without duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SteerPlan {
    /// The rules, each `lookup <table>` at the steering preference.
    pub rules: Vec<SteerRule>,
    /// The routes in the table.
    pub routes: Vec<SteerRoute>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// The rules and routes that steer `spec` into the party (pure; see the module docs). Refuses,
/// with an `InvalidInput` error naming the problem, more than [`MAX_PORT_RANGES`] ranges or
/// [`MAX_GROUPS`] groups, an empty port range, a group that is not IPv4 multicast (it would steer
/// unicast traffic), interface index 0 and a VIP that cannot be a source address.
pub fn plan(spec: &SteerSpec) -> io::Result<SteerPlan> {
    if spec.ifindex == 0 {
        return Err(invalid(
            "steering: interface index 0 is no interface".into(),
        ));
    }
    let vip = spec.vip;
    if vip.is_unspecified() || vip.is_broadcast() || vip.is_multicast() || vip.is_loopback() {
        return Err(invalid(format!(
            "steering: {vip} cannot be the party's source address"
        )));
    }
    if spec.ports.len() > MAX_PORT_RANGES {
        return Err(invalid(format!(
            "steering: {} capture port ranges, at most {MAX_PORT_RANGES} are supported",
            spec.ports.len()
        )));
    }
    if spec.groups.len() > MAX_GROUPS {
        return Err(invalid(format!(
            "steering: {} capture groups, at most {MAX_GROUPS} are supported",
            spec.groups.len()
        )));
    }
    let mut rules = BTreeSet::new();
    for range in &spec.ports {
        let (first, last) = (*range.start(), *range.end());
        if first > last {
            return Err(invalid(format!(
                "steering: empty capture port range {first}-{last}"
            )));
        }
        for to in [LIMITED_BROADCAST, MULTICAST] {
            rules.insert(SteerRule {
                from: UNBOUND,
                to,
                udp_dports: Some((first, last)),
            });
        }
    }
    for &group in &spec.groups {
        if !group.is_multicast() {
            return Err(invalid(format!(
                "steering: capture group {group} is not an IPv4 multicast address"
            )));
        }
        rules.insert(SteerRule {
            from: UNBOUND,
            to: Ipv4Net::from(group),
            udp_dports: None,
        });
    }
    let routes = [LIMITED_BROADCAST, MULTICAST]
        .into_iter()
        .map(|to| SteerRoute {
            to,
            ifindex: spec.ifindex,
        })
        .collect();
    Ok(SteerPlan {
        rules: rules.into_iter().collect(),
        routes,
    })
}

/// The policy-routing rules and routes installed for the party, kept equal to one
/// [`SteerSpec`] (or to nothing) by [`Steering::apply`], removed on drop. Owns its table: at
/// start it removes every rule and route that uses the table (a crashed run's leftovers).
pub struct Steering {
    nl: Netlink,
    table: u32,
    pref: u32,
    /// Rules we installed (or found already there when adding: then we own them too).
    rules: BTreeSet<SteerRule>,
    /// Routes we installed, by destination: the interface index.
    routes: BTreeMap<Ipv4Net, u32>,
    /// The spec the kernel holds exactly (`Some(None)`: nothing), if the last change succeeded:
    /// applying it again costs nothing.
    applied: Option<Option<SteerSpec>>,
}

impl fmt::Debug for Steering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Steering")
            .field("table", &self.table)
            .field("pref", &self.pref)
            .field("rules", &self.rules.len())
            .field("routes", &self.routes.len())
            .finish()
    }
}

impl Steering {
    /// Opens a netlink socket; removes stale rules/routes left by a crashed run (everything with
    /// our table id). Refuses the system's tables (main, local, default) and a preference outside
    /// 1..32766 (the rules must come after `local` and before `main`).
    pub fn new(table: u32, pref: u32) -> io::Result<Self> {
        if RESERVED_TABLES.contains(&table) {
            return Err(invalid(format!(
                "steering: table {table} belongs to the system, choose another"
            )));
        }
        if pref == 0 || pref >= MAIN_PREF {
            return Err(invalid(format!(
                "steering: rule preference {pref} must be between 1 and {}",
                MAIN_PREF - 1
            )));
        }
        let mut steering = Steering {
            nl: Netlink::open()?,
            table,
            pref,
            rules: BTreeSet::new(),
            routes: BTreeMap::new(),
            applied: None,
        };
        let (rules, routes) = steering.sweep()?;
        if rules + routes > 0 {
            tracing::info!(
                table,
                rules,
                routes,
                "steering: removed rules and routes left by an earlier run"
            );
        }
        Ok(steering)
    }

    /// Makes the installed rules/routes exactly `spec` (None: none). Idempotent; synchronous
    /// (only the difference to what is installed goes to the kernel; nothing when unchanged).
    /// New rules and routes are added before old ones are removed, so a change of port list
    /// never leaves a gap. On error what succeeded stays installed and is remembered: the next
    /// call (or the drop) picks up from there.
    pub fn apply(&mut self, spec: Option<&SteerSpec>) -> io::Result<()> {
        if matches!(&self.applied, Some(applied) if applied.as_ref() == spec) {
            return Ok(());
        }
        self.applied = None;
        let want = match spec {
            Some(spec) => plan(spec)?,
            None => SteerPlan::default(),
        };
        let want_rules: BTreeSet<SteerRule> = want.rules.iter().copied().collect();
        let want_routes: BTreeMap<Ipv4Net, u32> =
            want.routes.iter().map(|r| (r.to, r.ifindex)).collect();
        let started = Instant::now();
        let (mut added, mut removed) = (0usize, 0usize);

        for (&to, &ifindex) in &want_routes {
            if self.routes.get(&to) == Some(&ifindex) {
                continue;
            }
            let route = SteerRoute { to, ifindex };
            let msg = RouteNetlinkMessage::NewRoute(route_message(&route, self.table));
            self.nl
                .ack(msg, NLM_F_CREATE | NLM_F_REPLACE)
                .map_err(|e| context(e, format_args!("adding route {route}")))?;
            self.routes.insert(to, ifindex);
            added += 1;
        }
        for rule in want_rules
            .difference(&self.rules)
            .copied()
            .collect::<Vec<_>>()
        {
            let msg = RouteNetlinkMessage::NewRule(rule_message(&rule, self.table, self.pref));
            match self.nl.ack(msg, NLM_F_CREATE | NLM_F_EXCL) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(context(e, format_args!("adding rule `{rule}`"))),
            }
            self.rules.insert(rule);
            added += 1;
        }
        for rule in self
            .rules
            .difference(&want_rules)
            .copied()
            .collect::<Vec<_>>()
        {
            let msg = RouteNetlinkMessage::DelRule(rule_message(&rule, self.table, self.pref));
            match self.nl.ack(msg, 0) {
                Ok(()) => {}
                Err(e) if is_gone(&e) => {}
                Err(e) => return Err(context(e, format_args!("removing rule `{rule}`"))),
            }
            self.rules.remove(&rule);
            removed += 1;
        }
        let stale: Vec<_> = self
            .routes
            .iter()
            .filter(|(to, _)| !want_routes.contains_key(to))
            .map(|(&to, &ifindex)| SteerRoute { to, ifindex })
            .collect();
        for route in stale {
            let msg = RouteNetlinkMessage::DelRoute(route_message(&route, self.table));
            match self.nl.ack(msg, 0) {
                Ok(()) => {}
                Err(e) if is_gone(&e) => {}
                Err(e) => return Err(context(e, format_args!("removing route {route}"))),
            }
            self.routes.remove(&route.to);
            removed += 1;
        }
        if added + removed > 0 {
            tracing::debug!(
                added,
                removed,
                rules = self.rules.len(),
                took_us = started.elapsed().as_micros() as u64,
                "steering: rules and routes updated"
            );
        }
        self.applied = Some(spec.cloned());
        Ok(())
    }

    /// Puts back rules and routes someone else removed (systemd-networkd deletes rules it did
    /// not create when it reconfigures a link; `ip rule flush` does too). Call it now and then:
    /// it costs two netlink dumps. `Ok(true)`: something was missing and has been reinstalled.
    pub fn repair(&mut self) -> io::Result<bool> {
        let Some(Some(spec)) = self.applied.clone() else {
            return Ok(false);
        };
        let (table, pref) = (self.table, self.pref);
        let mut rules = 0usize;
        let mut get = RuleMessage::default();
        get.header.family = AddressFamily::Inet;
        self.nl
            .dump(RouteNetlinkMessage::GetRule(get), |msg| {
                if let RouteNetlinkMessage::NewRule(rule) = msg {
                    let ours = rule_table(&rule) == table
                        && rule
                            .attributes
                            .iter()
                            .any(|a| matches!(a, RuleAttribute::Priority(p) if *p == pref));
                    rules += usize::from(ours);
                }
            })
            .map_err(|e| context(e, "listing routing rules"))?;
        let mut routes = 0usize;
        let mut get = RouteMessage::default();
        get.header.address_family = AddressFamily::Inet;
        get.attributes.push(RouteAttribute::Table(table));
        match self.nl.dump(RouteNetlinkMessage::GetRoute(get), |msg| {
            if let RouteNetlinkMessage::NewRoute(route) = msg {
                routes += usize::from(route_table(&route) == table);
            }
        }) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(context(e, "listing routes")),
        }
        if rules >= self.rules.len() && routes >= self.routes.len() {
            return Ok(false);
        }
        // Forget what we believe is installed and add it all again (existing ones are kept).
        self.rules.clear();
        self.routes.clear();
        self.applied = None;
        self.apply(Some(&spec))?;
        Ok(true)
    }

    /// Removes every IPv4 rule that looks up our table and every route in it. Returns how many
    /// rules and routes it removed.
    fn sweep(&mut self) -> io::Result<(usize, usize)> {
        self.applied = None;
        let table = self.table;
        let mut rules = Vec::new();
        let mut get = RuleMessage::default();
        get.header.family = AddressFamily::Inet;
        self.nl
            .dump(RouteNetlinkMessage::GetRule(get), |msg| {
                if let RouteNetlinkMessage::NewRule(rule) = msg {
                    if rule_table(&rule) == table && rules.len() < MAX_SWEEP {
                        rules.push(rule);
                    }
                }
            })
            .map_err(|e| context(e, "listing routing rules"))?;
        let mut routes = Vec::new();
        let mut get = RouteMessage::default();
        get.header.address_family = AddressFamily::Inet;
        // Lets a kernel with strict checking send only our table.
        get.attributes.push(RouteAttribute::Table(table));
        match self.nl.dump(RouteNetlinkMessage::GetRoute(get), |msg| {
            if let RouteNetlinkMessage::NewRoute(route) = msg {
                if route_table(&route) == table && routes.len() < MAX_SWEEP {
                    routes.push(route);
                }
            }
        }) {
            Ok(()) => {}
            // A filtered dump of a table that does not exist.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(context(e, "listing routes")),
        }
        let (n_rules, n_routes) = (rules.len(), routes.len());
        for rule in rules {
            match self.nl.ack(RouteNetlinkMessage::DelRule(rule), 0) {
                Ok(()) => {}
                Err(e) if is_gone(&e) => {}
                Err(e) => return Err(context(e, "removing a leftover rule")),
            }
        }
        for route in routes {
            match self.nl.ack(RouteNetlinkMessage::DelRoute(route), 0) {
                Ok(()) => {}
                Err(e) if is_gone(&e) => {}
                Err(e) => return Err(context(e, "removing a leftover route")),
            }
        }
        self.rules.clear();
        self.routes.clear();
        self.applied = Some(None);
        Ok((n_rules, n_routes))
    }
}

impl Drop for Steering {
    /// Removes everything it installed; if that fails, everything in its table.
    fn drop(&mut self) {
        if let Err(e) = self.apply(None) {
            tracing::warn!(error = %e, "steering: cleanup failed, sweeping the table");
            if let Err(e) = self.sweep() {
                tracing::warn!(error = %e, table = self.table, "steering: sweep failed");
            }
        }
    }
}

/// Deleting something that is not there (any more) is what we wanted.
fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH))
}

fn context(e: io::Error, what: impl fmt::Display) -> io::Error {
    io::Error::new(e.kind(), format!("steering: {what}: {e}"))
}

/// `rtm_table`/`frh.table` hold 8 bits; larger ids travel in the TABLE attribute only.
fn header_table(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(0)
}

fn rule_message(rule: &SteerRule, table: u32, pref: u32) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.src_len = rule.from.prefix_len();
    msg.header.dst_len = rule.to.prefix_len();
    msg.header.table = header_table(table);
    msg.header.action = RuleAction::ToTable;
    msg.attributes.push(RuleAttribute::Table(table));
    msg.attributes.push(RuleAttribute::Priority(pref));
    msg.attributes
        .push(RuleAttribute::Source(IpAddr::V4(rule.from.network())));
    msg.attributes
        .push(RuleAttribute::Destination(IpAddr::V4(rule.to.network())));
    if let Some((start, end)) = rule.udp_dports {
        msg.attributes
            .push(RuleAttribute::IpProtocol(IpProtocol::Udp));
        msg.attributes
            .push(RuleAttribute::DestinationPortRange(RulePortRange {
                start,
                end,
            }));
    }
    msg
}

fn route_message(route: &SteerRoute, table: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = AddressFamily::Inet;
    msg.header.destination_prefix_length = route.to.prefix_len();
    msg.header.table = header_table(table);
    msg.header.protocol = RouteProtocol::Static;
    msg.header.scope = RouteScope::Link;
    msg.header.kind = RouteType::Unicast;
    msg.attributes.push(RouteAttribute::Table(table));
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(
            route.to.network(),
        )));
    msg.attributes.push(RouteAttribute::Oif(route.ifindex));
    msg
}

fn rule_table(rule: &RuleMessage) -> u32 {
    rule.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(rule.header.table))
}

fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

/// A synchronous `NETLINK_ROUTE` socket: one request at a time, answers matched by sequence
/// number, every wait bounded.
struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Best effort (Linux 4.20+): the kernel then filters the route dump by table.
        let _ = socket.set_netlink_get_strict_chk(true);
        socket2::SockRef::from(&socket).set_read_timeout(Some(REPLY_TIMEOUT))?;
        Ok(Netlink {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// Replaces the socket after a wait gave up (answers to the abandoned request, or the rest
    /// of an abandoned dump, must not confuse the next one).
    fn reset(&mut self) {
        match Netlink::open() {
            Ok(fresh) => {
                *self = Netlink {
                    seq: self.seq,
                    ..fresh
                }
            }
            Err(e) => tracing::warn!(error = %e, "steering: cannot reopen the netlink socket"),
        }
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1).max(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        let sent = self.socket.send(&out, 0)?;
        if sent != out.len() {
            return Err(io::Error::other(format!(
                "netlink: sent {sent} of {} bytes",
                out.len()
            )));
        }
        Ok(self.seq)
    }

    /// Receives one datagram into `self.buf`.
    fn recv(&mut self) -> io::Result<()> {
        self.buf.clear();
        self.buf.reserve(RECV_BUF);
        let capacity = self.buf.capacity();
        let n = match self.socket.recv(&mut self.buf, libc::MSG_TRUNC) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "netlink: the kernel did not answer",
                ))
            }
            Err(e) => return Err(e),
        };
        if n > capacity {
            return Err(io::Error::other(format!(
                "netlink: answer of {n} bytes truncated"
            )));
        }
        Ok(())
    }

    /// Sends a request that is answered by an ACK only; returns the kernel's error as an
    /// `io::Error` with its errno.
    fn ack(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let seq = self.send(msg, flags | NLM_F_ACK)?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let result = self.wait_ack(seq, deadline);
        if result.as_ref().is_err_and(|e| e.raw_os_error().is_none()) {
            self.reset();
        }
        result
    }

    fn wait_ack(&mut self, seq: u32, deadline: Instant) -> io::Result<()> {
        loop {
            self.recv()?;
            for msg in Messages::new(&self.buf) {
                if msg.seq != seq {
                    continue;
                }
                if msg.kind == NLMSG_ERROR {
                    return match msg.code {
                        Some(0) => Ok(()),
                        Some(code) => Err(io::Error::from_raw_os_error(code.saturating_abs())),
                        None => Err(io::Error::other("netlink: short error message")),
                    };
                }
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "netlink: no acknowledgement",
                ));
            }
        }
    }

    /// Sends a dump request and hands every decodable answer to `visit`.
    fn dump(
        &mut self,
        msg: RouteNetlinkMessage,
        visit: impl FnMut(RouteNetlinkMessage),
    ) -> io::Result<()> {
        let seq = self.send(msg, NLM_F_DUMP)?;
        let deadline = Instant::now() + DUMP_TIMEOUT;
        let result = self.wait_dump(seq, deadline, visit);
        if result.is_err() {
            self.reset();
        }
        result
    }

    fn wait_dump(
        &mut self,
        seq: u32,
        deadline: Instant,
        mut visit: impl FnMut(RouteNetlinkMessage),
    ) -> io::Result<()> {
        let mut undecodable = 0usize;
        loop {
            self.recv()?;
            for msg in Messages::new(&self.buf) {
                if msg.seq != seq {
                    continue;
                }
                match msg.kind {
                    NLMSG_DONE | NLMSG_ERROR => {
                        if undecodable > 0 {
                            tracing::debug!(undecodable, "steering: skipped undecodable answers");
                        }
                        return match msg.code {
                            Some(0) | None if msg.kind == NLMSG_DONE => Ok(()),
                            Some(0) => Ok(()),
                            Some(code) => Err(io::Error::from_raw_os_error(code.saturating_abs())),
                            None => Err(io::Error::other("netlink: short error message")),
                        };
                    }
                    _ => match NetlinkMessage::<RouteNetlinkMessage>::deserialize(msg.bytes) {
                        Ok(packet) => {
                            if let NetlinkPayload::InnerMessage(inner) = packet.payload {
                                visit(inner);
                            }
                        }
                        Err(_) => undecodable += 1,
                    },
                }
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "netlink: dump did not finish",
                ));
            }
        }
    }
}

/// One netlink message of a received datagram, its fixed fields read by hand.
struct Message<'a> {
    kind: u16,
    seq: u32,
    /// The errno of an `NLMSG_ERROR` or `NLMSG_DONE` (negative or 0), if the payload holds one.
    code: Option<i32>,
    bytes: &'a [u8],
}

/// The messages of one datagram; stops at the first malformed length.
struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Messages<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Messages { rest: buf }
    }
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at + 4)?;
    Some(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

impl<'a> Iterator for Messages<'a> {
    type Item = Message<'a>;

    fn next(&mut self) -> Option<Message<'a>> {
        let len = read_u32(self.rest, 0)? as usize;
        if len < NLMSG_HDRLEN || len > self.rest.len() {
            self.rest = &[];
            return None;
        }
        let bytes = &self.rest[..len];
        self.rest = self.rest.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        let kind = u16::from_ne_bytes([bytes[4], bytes[5]]);
        let seq = read_u32(bytes, 8)?;
        let code = read_u32(bytes, NLMSG_HDRLEN).map(|c| c as i32);
        Some(Message {
            kind,
            seq,
            code,
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SteerSpec {
        SteerSpec {
            ifindex: 7,
            vip: Ipv4Addr::new(10, 66, 0, 5),
            ports: vec![2342..=2342, 27015..=27020],
            groups: vec![Ipv4Addr::new(224, 0, 2, 60)],
        }
    }

    fn shown(plan: &SteerPlan) -> Vec<String> {
        plan.rules.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn plan_has_the_architecture_rules() {
        let plan = plan(&spec()).expect("valid spec");
        let mut want = vec![
            "from 0.0.0.0/32 to 255.255.255.255/32 ipproto udp dport 2342-2342",
            "from 0.0.0.0/32 to 255.255.255.255/32 ipproto udp dport 27015-27020",
            "from 0.0.0.0/32 to 224.0.0.0/4 ipproto udp dport 2342-2342",
            "from 0.0.0.0/32 to 224.0.0.0/4 ipproto udp dport 27015-27020",
            "from 0.0.0.0/32 to 224.0.2.60/32",
        ];
        let mut got = shown(&plan);
        want.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, want);
        let routes: Vec<String> = plan.routes.iter().map(ToString::to_string).collect();
        assert_eq!(
            routes,
            [
                "255.255.255.255/32 dev #7 scope link",
                "224.0.0.0/4 dev #7 scope link"
            ]
        );
    }

    #[test]
    fn plan_without_ports_or_groups_has_only_the_routes() {
        let plan = plan(&SteerSpec {
            ports: vec![],
            groups: vec![],
            ..spec()
        })
        .expect("valid spec");
        assert!(shown(&plan).is_empty());
        assert_eq!(plan.routes.len(), 2);
    }

    #[test]
    fn plan_merges_duplicates() {
        let mut s = spec();
        s.ports.push(2342..=2342);
        s.groups.push(Ipv4Addr::new(224, 0, 2, 60));
        assert_eq!(
            plan(&s).expect("valid").rules,
            plan(&spec()).expect("valid").rules
        );
    }

    #[test]
    fn plan_is_bounded_and_refuses_nonsense() {
        let too_many_ports = SteerSpec {
            ports: (0..=MAX_PORT_RANGES as u16).map(|p| p..=p).collect(),
            ..spec()
        };
        let e = plan(&too_many_ports).expect_err("too many ranges");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("at most 64"), "{e}");
        let at_limit = SteerSpec {
            ports: (1..=MAX_PORT_RANGES as u16).map(|p| p..=p).collect(),
            groups: (1..=MAX_GROUPS as u8)
                .map(|g| Ipv4Addr::new(239, 1, 1, g))
                .collect(),
            ..spec()
        };
        assert_eq!(
            plan(&at_limit).expect("at the limit").rules.len(),
            2 * MAX_PORT_RANGES + MAX_GROUPS
        );
        let too_many_groups = SteerSpec {
            groups: vec![Ipv4Addr::new(239, 1, 1, 1); MAX_GROUPS + 1],
            ..spec()
        };
        assert!(plan(&too_many_groups).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let empty = SteerSpec {
            ports: vec![20..=10],
            ..spec()
        };
        assert!(plan(&empty)
            .expect_err("empty")
            .to_string()
            .contains("20-10"));
        let unicast_group = SteerSpec {
            groups: vec![Ipv4Addr::new(192, 0, 2, 1)],
            ..spec()
        };
        assert!(plan(&unicast_group).is_err());
        for vip in [
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::new(224, 0, 0, 1),
            Ipv4Addr::LOCALHOST,
        ] {
            assert!(plan(&SteerSpec { vip, ..spec() }).is_err(), "{vip}");
        }
        assert!(plan(&SteerSpec {
            ifindex: 0,
            ..spec()
        })
        .is_err());
    }

    #[test]
    fn rule_message_matches_iproute2() {
        // `ip rule add from 0.0.0.0/32 to 255.255.255.255 ipproto udp dport 2342 lookup 6666
        // pref 6600` sends: family inet, src_len 32, dst_len 32, table 0 (> 255 goes in
        // FRA_TABLE), action FR_ACT_TO_TBL.
        let rule = plan(&spec()).expect("valid").rules[0];
        let msg = rule_message(&rule, DEFAULT_TABLE, DEFAULT_PREF);
        assert_eq!(msg.header.family, AddressFamily::Inet);
        assert_eq!(
            (msg.header.src_len, msg.header.dst_len),
            (32, rule.to.prefix_len())
        );
        assert_eq!(msg.header.table, 0);
        assert_eq!(msg.header.action, RuleAction::ToTable);
        assert_eq!(rule_table(&msg), DEFAULT_TABLE);
        assert!(msg
            .attributes
            .contains(&RuleAttribute::Priority(DEFAULT_PREF)));
        assert_eq!(header_table(100), 100);
        let route = route_message(&plan(&spec()).expect("valid").routes[0], DEFAULT_TABLE);
        assert_eq!(route_table(&route), DEFAULT_TABLE);
        assert_eq!(route.header.scope, RouteScope::Link);
    }

    #[test]
    fn steering_can_live_in_a_tokio_task() {
        fn send<T: Send>() {}
        send::<Steering>();
    }

    #[test]
    fn steering_refuses_system_tables_and_prefs() {
        for table in [0, 252, 253, 254, 255] {
            let e = Steering::new(table, DEFAULT_PREF).expect_err("system table");
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        }
        for pref in [0, MAIN_PREF, u32::MAX] {
            assert!(Steering::new(DEFAULT_TABLE, pref).is_err());
        }
    }

    #[test]
    fn messages_never_panic_on_garbage() {
        // Lengths that lie, truncated headers, error messages without a code.
        let mut ack = vec![0u8; 36];
        ack[0..4].copy_from_slice(&36u32.to_ne_bytes());
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack[8..12].copy_from_slice(&9u32.to_ne_bytes());
        ack[16..20].copy_from_slice(&(-libc::EEXIST).to_ne_bytes());
        let msgs: Vec<_> = Messages::new(&ack).collect();
        assert_eq!(msgs.len(), 1);
        assert_eq!(
            (msgs[0].kind, msgs[0].seq, msgs[0].code),
            (NLMSG_ERROR, 9, Some(-libc::EEXIST))
        );
        let mut short = ack[..16].to_vec();
        short[0..4].copy_from_slice(&16u32.to_ne_bytes());
        assert_eq!(Messages::new(&short).next().map(|m| m.code), Some(None));
        for len in [0u32, 3, 15, 37, u32::MAX] {
            let mut bad = ack.clone();
            bad[0..4].copy_from_slice(&len.to_ne_bytes());
            assert_eq!(Messages::new(&bad).count(), 0, "len {len}");
        }
        for cut in 0..ack.len() {
            let _ = Messages::new(&ack[..cut]).count();
        }
    }
}
