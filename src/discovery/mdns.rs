//! mDNS/DNS-SD on the LAN: parties this node hosts are announced as standard DNS-SD instances of
//! `_lanrage._udp.local.` (so `avahi-browse -r _lanrage._udp` shows them), and instances announced
//! by others are browsed, resolved and offered as joinable parties.
//!
//! Instance names are always `"<party name> <party id>"` (e.g. `Friday night k3m9-x2pq-7hvd-a8te`):
//! unique even when two parties share a name, stable while a party lives (even when the host
//! changes), and still readable in generic DNS-SD browsers. The name part is trimmed so the label
//! fits DNS's 63-byte limit, and `.`/`\`/control characters in it become `_`. The TXT record is
//! authoritative; nothing is parsed back out of the instance name.
//!
//! TXT keys: `id`, `name`, `host` (host node id), `host_name`, `key` (host public key, base64),
//! `members`, `protected` (`1`/`0`), `version`. SRV port = the host's UDP port; A records = the
//! host's LAN addresses, under the per-node host name `lanrage-<node id>.local.`.
//!
//! Liveness: mdns-sd caches records for their TTL (120 s for SRV/A, 75 min for PTR/TXT, and the
//! TTL setters are not public), and a crashed announcer never says goodbye. So the browser asks
//! mdns-sd to re-confirm every instance it knows every [`VERIFY_EVERY`] with
//! [`ServiceDaemon::verify`] (RFC 6762 §10.4): mdns-sd lowers the expiry of the instance's SRV and
//! address records to `now + timeout`, queries SRV/A/AAAA twice (1 s apart), and a live announcer's
//! answer restores the full TTL; if nobody answers, the SRV record expires and mdns-sd reports
//! `ServiceRemoved`, which drops the party here. A dead announcer thus vanishes within
//! `VERIFY_EVERY + VERIFY_TIMEOUT` (8 s). mdns-sd does not report successful re-confirmations (a
//! refreshed but unchanged record produces no event), so the removal event is the only signal.
//!
//! Announcements skip RFC 6762 probing: the instance name embeds the random party id and the host
//! name embeds the node id, so there is nothing to conflict with, and skipping it makes updates
//! immediate. An update (member count, host, addresses) is a plain re-register of the same
//! fullname: mdns-sd replaces its own record set and multicasts the new records with the
//! cache-flush bit, so browsers replace the old TXT in place. (Unregister + register would be
//! wrong: mdns-sd re-sends the goodbye 120 ms later, which could kill the fresh announcement.)
//! Announcements are also repeated every [`REANNOUNCE_EVERY`], so browsers that missed one (or
//! that saw a former host's goodbye for the same instance) pick the party up again quickly
//! instead of waiting for their own, exponentially backed-off, browse queries.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mdns_sd::{
    IfKind, RecvTimeoutError, ResolvedService, ServiceDaemon, ServiceEvent, ServiceInfo,
    TxtProperties,
};
use parking_lot::Mutex;

use super::file::{name_ok, validate_ad, MAX_ENDPOINTS};
use super::{PartyAd, AD_VERSION};
use crate::ids::{NodeId, PartyId};

/// The DNS-SD service type lanrage parties are announced under.
pub const SERVICE_TYPE: &str = "_lanrage._udp.local.";
/// Most parties kept from browsing (a hostile LAN cannot make us grow without bound).
pub const MAX_PARTIES: usize = 256;
/// How often every known instance is re-confirmed.
pub const VERIFY_EVERY: Duration = Duration::from_secs(5);
/// How long an instance has to answer a re-confirmation before it is dropped.
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(3);
/// How often this node repeats its own announcements.
pub const REANNOUNCE_EVERY: Duration = Duration::from_secs(30);
/// Granularity of the background thread's timers.
const TICK: Duration = Duration::from_millis(250);
/// Verifications issued per tick at most, so a full map does not flood mdns-sd's command queue
/// (it holds 100 commands); even [`MAX_PARTIES`] instances are all covered within 8 ticks (2 s).
const MAX_VERIFIES_PER_TICK: usize = 32;
/// The longest DNS label.
const MAX_LABEL_BYTES: usize = 63;

/// Why an mDNS operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MdnsError {
    /// The mdns-sd daemon refused or is gone (e.g. it could not start, or was shut down).
    #[error("mDNS: {0}")]
    Daemon(#[from] mdns_sd::Error),
    /// The announcement is not something browsers would accept (see [`super::file`]'s rules).
    #[error("invalid party announcement: {0}")]
    Invalid(&'static str),
    /// Starting the background browse thread failed.
    #[error("mDNS: spawn browse thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// A party found by browsing.
struct Seen {
    ad: PartyAd,
    /// When it was (last) resolved; the newest wins if one party id shows up under several names.
    /// When to ask mdns-sd to re-confirm it next.
    next_verify: Instant,
}

/// A party this node announces.
struct Announced {
    /// What was registered (for re-announcing).
    info: ServiceInfo,
    /// The inputs it was built from, to skip re-registering unchanged content.
    inputs: (PartyAd, Vec<Ipv4Addr>, u16),
    last_sent: Instant,
}

/// State shared with the background thread.
struct Shared {
    /// Browsed parties by instance fullname (as mdns-sd spells it).
    seen: Mutex<HashMap<String, Seen>>,
    /// Our own announcements by party id. Held while talking to the daemon, so re-announcing
    /// cannot resurrect a withdrawn party.
    announced: Mutex<HashMap<PartyId, Announced>>,
    stop: AtomicBool,
}

/// The LAN discovery source: one mdns-sd daemon that announces the parties this node hosts and
/// browses for everyone else's. Usable from async code: nothing here blocks on the network except
/// [`Mdns::shutdown`], which waits briefly for goodbyes to leave.
pub struct Mdns {
    daemon: ServiceDaemon,
    shared: Arc<Shared>,
}

impl Mdns {
    /// Start the mDNS daemon; never announce or browse on the interfaces named in `exclude` (the
    /// TUN interface, e.g. "lanrage0": parties must be found on the real LAN, not through the
    /// tunnel). Loopback stays enabled, as mdns-sd defaults.
    pub fn start(exclude: &[String]) -> Result<Self, MdnsError> {
        Self::start_on_port(exclude, mdns_sd::MDNS_PORT)
    }

    /// [`Self::start`] on a non-standard port (tests use one, so they neither see nor disturb
    /// the real LAN).
    fn start_on_port(exclude: &[String], port: u16) -> Result<Self, MdnsError> {
        let daemon = ServiceDaemon::new_with_port(port)?;
        let events = match configure_and_browse(&daemon, exclude) {
            Ok(rx) => rx,
            Err(e) => {
                let _ = daemon.shutdown();
                return Err(e.into());
            }
        };
        let shared = Arc::new(Shared {
            seen: Mutex::new(HashMap::new()),
            announced: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
        });
        let worker = {
            let daemon = daemon.clone();
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("lanrage-mdns".into())
                .spawn(move || browse_loop(daemon, shared, events))
        };
        if let Err(e) = worker {
            let _ = daemon.shutdown();
            return Err(MdnsError::Thread(e));
        }
        Ok(Mdns { daemon, shared })
    }

    /// Register or update (members count changed, host changed) the announcement of a party this
    /// node hosts. `addrs` are this node's LAN addresses (each is announced only on the interface
    /// whose subnet contains it; empty = let mdns-sd use every enabled interface's addresses) and
    /// `port` is the daemon's UDP port. `ad.endpoints` is not sent: browsers rebuild endpoints
    /// from the A records × SRV port, which is what they can actually reach. Calling it again
    /// with unchanged content does nothing (repeating is done in the background).
    pub fn announce(&self, ad: &PartyAd, addrs: &[Ipv4Addr], port: u16) -> Result<(), MdnsError> {
        validate_ad(ad).map_err(MdnsError::Invalid)?;
        if port == 0 {
            return Err(MdnsError::Invalid("port 0"));
        }
        let mut addrs = addrs.to_vec();
        addrs.sort();
        addrs.dedup();
        let inputs = (ad.clone(), addrs, port);

        let mut announced = self.shared.announced.lock();
        if let Some(old) = announced.get(&ad.id) {
            if old.inputs == inputs {
                return Ok(());
            }
            if old.info.get_fullname() != instance_fullname(ad) {
                // Renamed: the old instance name must go away.
                let _ = self.daemon.unregister(old.info.get_fullname());
                announced.remove(&ad.id);
            }
        }
        let info = service_info(ad, &inputs.1, port)?;
        self.daemon.register(info.clone())?;
        tracing::debug!(party = %ad.id, instance = info.get_fullname(), "mDNS: announced party");
        announced.insert(
            ad.id,
            Announced {
                info,
                inputs,
                last_sent: Instant::now(),
            },
        );
        Ok(())
    }

    /// Send goodbye for the party (party ended or host role moved away). No-op if not announced.
    pub fn withdraw(&self, id: PartyId) {
        let mut announced = self.shared.announced.lock();
        if let Some(old) = announced.remove(&id) {
            if let Err(e) = self.daemon.unregister(old.info.get_fullname()) {
                tracing::debug!(party = %id, "mDNS: unregister failed: {e}");
            }
        }
    }

    /// Parties currently seen on the LAN (our own announcements included), fresh only: every
    /// entry has been (re)confirmed by its announcer within the last few seconds, or is being
    /// re-confirmed right now. One entry per announcing host: a party normally has one, two
    /// after a network split (the daemon merges them).
    pub fn parties(&self) -> Vec<PartyAd> {
        let seen = self.shared.seen.lock();
        let mut out: Vec<PartyAd> = seen.values().map(|s| s.ad.clone()).collect();
        out.sort_by(|a, b| (a.id, &a.host_key).cmp(&(b.id, &b.host_key)));
        out.dedup_by(|a, b| a.id == b.id && a.host_key == b.host_key);
        out
    }

    /// Stop: goodbye for everything announced, shut the daemon down. Blocks briefly (normally a
    /// few milliseconds, at most about a second) so the goodbyes are on the wire before the daemon
    /// exits. Idempotent; also run on drop.
    pub fn shutdown(&self) {
        if self.shared.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        let announced: Vec<Announced> = self
            .shared
            .announced
            .lock()
            .drain()
            .map(|(_, a)| a)
            .collect();
        let pending: Vec<_> = announced
            .iter()
            .filter_map(|a| self.daemon.unregister(a.info.get_fullname()).ok())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(1);
        for rx in &pending {
            let _ = rx.recv_deadline(deadline);
        }
        if !pending.is_empty() {
            // mdns-sd repeats each goodbye 120 ms later; let that go out too.
            thread::sleep(Duration::from_millis(150));
        }
        let _ = self.daemon.stop_browse(SERVICE_TYPE);
        if let Ok(rx) = self.daemon.shutdown() {
            let _ = rx.recv_deadline(deadline.max(Instant::now() + Duration::from_millis(200)));
        }
        self.shared.seen.lock().clear();
    }
}

/// Excludes the interfaces named in `exclude` (before anything is sent), then starts browsing.
fn configure_and_browse(
    daemon: &ServiceDaemon,
    exclude: &[String],
) -> Result<mdns_sd::Receiver<ServiceEvent>, mdns_sd::Error> {
    for name in exclude {
        daemon.disable_interface(IfKind::Name(name.clone()))?;
    }
    daemon.browse(SERVICE_TYPE)
}

impl Drop for Mdns {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The background thread: applies browse events to the map, re-confirms known instances and
/// repeats our announcements. Ends when [`Mdns::shutdown`] runs or the daemon goes away.
fn browse_loop(
    daemon: ServiceDaemon,
    shared: Arc<Shared>,
    mut events: mdns_sd::Receiver<ServiceEvent>,
) {
    let mut next_housekeeping = Instant::now();
    while !shared.stop.load(Ordering::SeqCst) {
        match events.recv_timeout(TICK) {
            Ok(event) => handle_event(&shared, event),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                if shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                // mdns-sd drops a subscription whose channel filled up. Start over: a new browse
                // replays the daemon's cache, so nothing live is lost for long.
                tracing::debug!("mDNS: browse subscription ended; browsing again");
                thread::sleep(Duration::from_secs(1));
                shared.seen.lock().clear();
                match daemon.browse(SERVICE_TYPE) {
                    Ok(rx) => events = rx,
                    Err(mdns_sd::Error::DaemonShutdown) => break,
                    Err(e) => tracing::warn!("mDNS: browse failed: {e}"),
                }
                continue;
            }
        }
        let now = Instant::now();
        if now >= next_housekeeping {
            next_housekeeping = now + TICK;
            verify_due(&daemon, &shared, now);
            reannounce_due(&daemon, &shared, now);
        }
    }
    tracing::debug!("mDNS: browse thread stopped");
}

/// Applies one browse event.
fn handle_event(shared: &Shared, event: ServiceEvent) {
    match event {
        ServiceEvent::ServiceResolved(svc) => {
            if !svc.ty_domain.eq_ignore_ascii_case(SERVICE_TYPE) {
                return;
            }
            let mut seen = shared.seen.lock();
            match ad_from_resolved(&svc) {
                Ok(ad) => {
                    let now = Instant::now();
                    if !seen.contains_key(&svc.fullname) && seen.len() >= MAX_PARTIES {
                        tracing::debug!(
                            instance = svc.fullname,
                            "mDNS: too many parties; ignoring"
                        );
                        return;
                    }
                    tracing::debug!(instance = svc.fullname, party = %ad.id, "mDNS: party resolved");
                    seen.insert(
                        svc.fullname.clone(),
                        Seen {
                            ad,
                            next_verify: now + VERIFY_EVERY,
                        },
                    );
                }
                Err(why) => {
                    tracing::debug!(instance = svc.fullname, "mDNS: ignoring instance: {why}");
                    // An update that made it invalid must not leave the old content listed.
                    seen.remove(&svc.fullname);
                }
            }
        }
        ServiceEvent::ServiceRemoved(_, fullname) => {
            let removed = shared.seen.lock().remove(&fullname).is_some();
            if removed {
                tracing::debug!(instance = fullname, "mDNS: party gone");
            }
        }
        _ => {}
    }
}

/// Asks mdns-sd to re-confirm the instances that are due (a bounded number per call).
fn verify_due(daemon: &ServiceDaemon, shared: &Shared, now: Instant) {
    let mut seen = shared.seen.lock();
    let mut due: Vec<(&String, &mut Seen)> = seen
        .iter_mut()
        .filter(|(_, s)| s.next_verify <= now)
        .collect();
    due.sort_by_key(|(_, s)| s.next_verify);
    for (fullname, s) in due.into_iter().take(MAX_VERIFIES_PER_TICK) {
        match daemon.verify(fullname.clone(), VERIFY_TIMEOUT) {
            Ok(()) => s.next_verify = now + VERIFY_EVERY,
            // Queue full: try again next tick.
            Err(mdns_sd::Error::Again) => break,
            Err(e) => {
                tracing::debug!(instance = fullname, "mDNS: verify failed: {e}");
                break;
            }
        }
    }
}

/// Repeats our own announcements that were last sent more than [`REANNOUNCE_EVERY`] ago.
fn reannounce_due(daemon: &ServiceDaemon, shared: &Shared, now: Instant) {
    let mut announced = shared.announced.lock();
    if shared.stop.load(Ordering::SeqCst) {
        return;
    }
    for a in announced.values_mut() {
        if now.duration_since(a.last_sent) < REANNOUNCE_EVERY {
            continue;
        }
        match daemon.register(a.info.clone()) {
            Ok(()) => a.last_sent = now,
            Err(e) => {
                tracing::debug!(
                    instance = a.info.get_fullname(),
                    "mDNS: re-announce failed: {e}"
                );
                break;
            }
        }
    }
}

/// The DNS-SD instance label for a party: `"<name> <id> <host>"` (host: the first 8 hex digits
/// of the host's node id), the name part sanitized and trimmed so the label fits in 63 bytes.
/// Naming the host keeps two hosts of one party (a healed network split) from overwriting each
/// other's records, so each can see the other and they can merge.
fn instance_name(ad: &PartyAd) -> String {
    let host = ad.host_id.to_string();
    let id = format!("{} {}", ad.id, &host[..8]);
    let budget = MAX_LABEL_BYTES - id.len() - 1;
    let mut name = String::new();
    for c in ad.name.chars() {
        let c = if c == '.' || c == '\\' || c.is_control() {
            '_'
        } else {
            c
        };
        if name.len() + c.len_utf8() > budget {
            break;
        }
        name.push(c);
    }
    let name = name.trim();
    if name.is_empty() {
        id
    } else {
        format!("{name} {id}")
    }
}

/// The full DNS-SD name of a party's instance.
fn instance_fullname(ad: &PartyAd) -> String {
    format!("{}.{SERVICE_TYPE}", instance_name(ad))
}

/// The TXT properties announcing `ad`.
fn txt_properties(ad: &PartyAd) -> Vec<(&'static str, String)> {
    vec![
        ("id", ad.id.to_string()),
        ("name", ad.name.clone()),
        ("host", ad.host_id.to_string()),
        ("host_name", ad.host_name.clone()),
        ("key", ad.host_key.clone()),
        ("members", ad.members.to_string()),
        (
            "protected",
            if ad.protected { "1" } else { "0" }.to_string(),
        ),
        ("version", ad.version.to_string()),
    ]
}

/// The mdns-sd registration for `ad`.
fn service_info(ad: &PartyAd, addrs: &[Ipv4Addr], port: u16) -> Result<ServiceInfo, MdnsError> {
    let host = format!("lanrage-{}.local.", ad.host_id);
    let ips: Vec<IpAddr> = addrs.iter().copied().map(IpAddr::V4).collect();
    let props = txt_properties(ad);
    let mut info = ServiceInfo::new(
        SERVICE_TYPE,
        &instance_name(ad),
        &host,
        &ips[..],
        port,
        &props[..],
    )?;
    if addrs.is_empty() {
        info = info.enable_addr_auto();
    }
    info.set_requires_probe(false);
    Ok(info)
}

/// Builds a [`PartyAd`] from a resolved instance (TXT + addresses × port).
fn ad_from_resolved(svc: &ResolvedService) -> Result<PartyAd, &'static str> {
    let addrs: Vec<Ipv4Addr> = svc.get_addresses_v4().into_iter().collect();
    ad_from_txt(&svc.txt_properties, &addrs, svc.port)
}

/// Builds a [`PartyAd`] from TXT properties, IPv4 addresses and the SRV port, rejecting anything
/// missing, malformed or absurd. Endpoints are sorted with non-loopback addresses first.
fn ad_from_txt(
    txt: &TxtProperties,
    addrs: &[Ipv4Addr],
    port: u16,
) -> Result<PartyAd, &'static str> {
    fn get<'a>(txt: &'a TxtProperties, key: &'static str) -> Result<&'a str, &'static str> {
        match txt.get_property_val(key) {
            Some(Some(v)) => std::str::from_utf8(v).map_err(|_| "TXT value is not UTF-8"),
            _ => Err("TXT key missing"),
        }
    }
    let version: u32 = get(txt, "version")?.parse().map_err(|_| "bad version")?;
    if version != AD_VERSION {
        return Err("unsupported version");
    }
    let id: PartyId = get(txt, "id")?.parse().map_err(|_| "bad party id")?;
    let host_id: NodeId = get(txt, "host")?.parse().map_err(|_| "bad host id")?;
    let name = get(txt, "name")?;
    let host_name = get(txt, "host_name")?;
    if !name_ok(name) || !name_ok(host_name) {
        return Err("bad name");
    }
    let members = get(txt, "members")?;
    if members.is_empty() || !members.bytes().all(|b| b.is_ascii_digit()) {
        return Err("bad member count");
    }
    let members: u32 = members.parse().map_err(|_| "bad member count")?;
    let protected = match get(txt, "protected")? {
        "1" => true,
        "0" => false,
        _ => return Err("bad protected flag"),
    };
    if port == 0 {
        return Err("port 0");
    }
    let mut ips: Vec<Ipv4Addr> = addrs
        .iter()
        .copied()
        .filter(|a| !a.is_unspecified() && !a.is_multicast() && !a.is_broadcast())
        .collect();
    ips.sort_by_key(|a| (a.is_loopback(), *a));
    ips.dedup();
    ips.truncate(MAX_ENDPOINTS);
    if ips.is_empty() {
        return Err("no usable address");
    }
    let ad = PartyAd {
        id,
        name: name.to_string(),
        host_id,
        host_name: host_name.to_string(),
        host_key: get(txt, "key")?.to_string(),
        endpoints: ips
            .into_iter()
            .map(|ip| SocketAddr::V4(SocketAddrV4::new(ip, port)))
            .collect(),
        members,
        protected,
        version,
    };
    validate_ad(&ad)?;
    Ok(ad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mdns_sd::IntoTxtProperties;

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn ad() -> PartyAd {
        PartyAd {
            id: PartyId([7; 10]),
            name: "Friday night".into(),
            host_id: NodeId([3; 8]),
            host_name: "alice".into(),
            host_key: KEY.into(),
            endpoints: vec![SocketAddr::from(([192, 168, 1, 10], 4242))],
            members: 3,
            protected: true,
            version: AD_VERSION,
        }
    }

    fn props(ad: &PartyAd) -> TxtProperties {
        txt_properties(ad).as_slice().into_txt_properties()
    }

    #[test]
    fn txt_roundtrip() {
        let a = ad();
        let back = ad_from_txt(&props(&a), &[Ipv4Addr::new(192, 168, 1, 10)], 4242).unwrap();
        assert_eq!(back, a);

        let mut b = ad();
        b.protected = false;
        b.members = u32::MAX;
        b.name = "ünïcødé 🎮".into();
        b.endpoints = vec![
            SocketAddr::from(([10, 0, 0, 2], 9)),
            SocketAddr::from(([127, 0, 0, 1], 9)),
        ];
        let back = ad_from_txt(
            &props(&b),
            &[
                Ipv4Addr::LOCALHOST,
                Ipv4Addr::new(10, 0, 0, 2),
                Ipv4Addr::new(224, 0, 0, 251),
            ],
            9,
        )
        .unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn service_info_carries_the_txt() {
        let a = ad();
        let info = service_info(&a, &[Ipv4Addr::new(192, 168, 1, 10)], 4242).unwrap();
        assert_eq!(
            info.get_fullname(),
            format!("Friday night {} 03030303._lanrage._udp.local.", a.id)
        );
        assert_eq!(info.get_hostname(), "lanrage-0303030303030303.local.");
        let back = ad_from_txt(
            info.get_properties(),
            &[Ipv4Addr::new(192, 168, 1, 10)],
            info.get_port(),
        )
        .unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn hostile_txt_is_rejected() {
        let ip = [Ipv4Addr::new(192, 168, 1, 10)];
        let good = txt_properties(&ad());
        let with = |key: &str, val: Option<&str>| -> TxtProperties {
            let mut v: Vec<(String, String)> = good
                .iter()
                .filter(|(k, _)| *k != key)
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            if let Some(val) = val {
                v.push((key.to_string(), val.to_string()));
            }
            v.as_slice().into_txt_properties()
        };
        let long = "x".repeat(65);
        let cases: &[(&str, Option<&str>)] = &[
            ("id", None),
            ("id", Some("not-an-id")),
            ("id", Some("")),
            ("host", Some("xyz")),
            ("host", None),
            ("name", None),
            ("name", Some(&long)),
            ("name", Some("evil\u{1b}]0;pwned\u{7}")),
            ("host_name", Some(&long)),
            ("key", Some("short")),
            ("key", None),
            ("members", Some("-1")),
            ("members", Some("+3")),
            ("members", Some("99999999999")),
            ("members", Some("")),
            ("protected", Some("yes")),
            ("version", Some("2")),
            ("version", Some("")),
            ("version", None),
        ];
        for (key, val) in cases {
            assert!(
                ad_from_txt(&with(key, *val), &ip, 4242).is_err(),
                "{key}={val:?} accepted"
            );
        }
        // Port 0 or no usable address.
        assert!(ad_from_txt(&props(&ad()), &ip, 0).is_err());
        assert!(ad_from_txt(&props(&ad()), &[], 4242).is_err());
        assert!(ad_from_txt(
            &props(&ad()),
            &[Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST],
            4242
        )
        .is_err());
        // Too many addresses are capped, not rejected.
        let many: Vec<Ipv4Addr> = (1..=40).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        assert_eq!(
            ad_from_txt(&props(&ad()), &many, 1)
                .unwrap()
                .endpoints
                .len(),
            MAX_ENDPOINTS
        );
        // Raw TXT wire data: non-UTF-8 values, keys without values, truncated strings.
        for raw in [
            &b"\x05id=\xff\xfe\x00"[..],
            b"\x02id",
            b"\xffshort",
            b"\x00\x00\x00",
            b"",
        ] {
            let txt = TxtProperties::from(raw);
            assert!(ad_from_txt(&txt, &ip, 4242).is_err());
        }
    }

    #[test]
    fn hostile_txt_never_panics() {
        use proptest::prelude::*;
        proptest!(|(raw in proptest::collection::vec(any::<u8>(), 0..600), port in any::<u16>())| {
            let txt = TxtProperties::from(&raw[..]);
            let _ = ad_from_txt(&txt, &[Ipv4Addr::new(10, 0, 0, 1)], port);
        });
    }

    #[test]
    fn instance_names() {
        let mut a = ad();
        let id = format!("{} {}", a.id, &a.host_id.to_string()[..8]);
        assert_eq!(instance_name(&a), format!("Friday night {id}"));
        // Same name, different id: different instance.
        let mut b = ad();
        b.id = PartyId([8; 10]);
        assert_ne!(instance_name(&a), instance_name(&b));
        // Dots, backslashes and control characters are replaced.
        a.name = "a.b\\c\td".into();
        assert_eq!(instance_name(&a), format!("a_b_c_d {id}"));
        // Long names are cut at a character boundary to fit a DNS label.
        a.name = "é".repeat(32);
        let n = instance_name(&a);
        assert!(n.len() <= MAX_LABEL_BYTES, "{n}");
        assert!(n.starts_with("éééé") && n.ends_with(&format!(" {id}")));
        // An empty or blank name leaves just the id.
        a.name = "   ".into();
        assert_eq!(instance_name(&a), id);
        // The full name is a valid mdns-sd service name for every 64-byte name.
        a.name = "x".repeat(64);
        assert!(service_info(&a, &[Ipv4Addr::LOCALHOST], 1).is_ok());
    }

    #[test]
    fn invalid_announcements_are_refused_without_a_daemon() {
        let mut a = ad();
        a.name = "x".repeat(65);
        assert!(validate_ad(&a).is_err());
    }
}

#[cfg(test)]
mod loopback_tests {
    //! Two `Mdns` instances in one machine, over loopback multicast, on a random non-standard
    //! port (so the real LAN is neither seen nor disturbed).
    use super::*;

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

        // A crashed announcer (no goodbye) disappears through verification. The crash is
        // simulated by making its daemon drop every interface: that sends nothing and leaves the
        // multicast group, so it stops answering, exactly like a dead process.
        let crasher = Mdns::start_on_port(&[], port).unwrap();
        let crashed = PartyId::random();
        crasher
            .announce(&party(crashed, 1), &[Ipv4Addr::LOCALHOST], 4242)
            .unwrap();
        let seen = wait_for(&browser, within, |p| p.iter().any(|a| a.id == crashed));
        assert!(seen.is_some(), "second announcement not seen");
        crasher.daemon.disable_interface(IfKind::All).unwrap();
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
