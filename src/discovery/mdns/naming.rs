//! How a [`PartyAd`] is spelled in DNS-SD: the instance label, the host name, and the TXT
//! key/value pairs, and back (a browsed instance becomes a [`PartyAd`] only if every field is
//! present and sane).
//!
//! Instance labels are `"<party name> <party id> <host8>"` (host8: the first 8 hex digits of the
//! host's node id): unique even when two parties share a name, stable while a party lives, and
//! still readable in generic DNS-SD browsers. The name part is trimmed so the label fits DNS's
//! 63-byte limit, and `.`/`\`/control characters in it become `_`. The TXT record is
//! authoritative; nothing is parsed back out of the instance name.
//!
//! TXT keys: `id`, `name`, `host` (host node id), `host_name`, `key` (host public key, base64),
//! `members`, `protected` (`1`/`0`), `version`, `proto` (the control protocol; absent = 1). SRV port = the host's UDP port; A records = the
//! host's LAN addresses, under the per-node host name `lanrage-<node id>.local.`.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use super::super::file::{name_ok, validate_ad, MAX_ENDPOINTS};
use super::super::{PartyAd, AD_VERSION};
use crate::ids::{NodeId, PartyId};

/// The longest DNS label.
pub const MAX_LABEL_BYTES: usize = 63;

/// TXT key/value pairs as carried in a TXT record (RFC 6763 §6): the key, and the value if the
/// string had a `=`.
pub type TxtPairs = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// The DNS-SD instance label for a party: `"<name> <id> <host>"` (host: the first 8 hex digits
/// of the host's node id), the name part sanitized and trimmed so the label fits in 63 bytes.
/// Naming the host keeps two hosts of one party (a healed network split) from overwriting each
/// other's records, so each can see the other and they can merge.
pub fn instance_label(ad: &PartyAd) -> String {
    let host = ad.host_id.to_string();
    let id = format!("{} {}", ad.id, &host[..8]);
    let budget = MAX_LABEL_BYTES - id.len() - 1;
    let mut name = String::new();
    for c in ad.name.chars() {
        let c = if c == '.' || c == '\\' || crate::names::is_unsafe(c) {
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

/// The host label (`lanrage-<node id>`, under `.local.`) that a node's A records use.
pub fn host_label(host: NodeId) -> String {
    format!("lanrage-{host}")
}

/// The TXT pairs announcing `ad`.
pub fn txt_pairs(ad: &PartyAd) -> TxtPairs {
    [
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
        ("proto", ad.proto.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.as_bytes().to_vec(), Some(v.into_bytes())))
    .collect()
}

/// The value of `key` (RFC 6763 §6.4: keys compare case-insensitively, and only the first
/// occurrence counts). `None` if absent or given without a value.
fn txt_value<'a>(txt: &'a [(Vec<u8>, Option<Vec<u8>>)], key: &str) -> Option<&'a [u8]> {
    txt.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key.as_bytes()))
        .and_then(|(_, v)| v.as_deref())
}

/// Builds a [`PartyAd`] from TXT pairs, IPv4 addresses and the SRV port, rejecting anything
/// missing, malformed or absurd. Endpoints are sorted with non-loopback addresses first and
/// capped at [`MAX_ENDPOINTS`].
pub fn ad_from_txt(
    txt: &[(Vec<u8>, Option<Vec<u8>>)],
    addrs: &[Ipv4Addr],
    port: u16,
) -> Result<PartyAd, &'static str> {
    let get = |key: &'static str| -> Result<&str, &'static str> {
        let v = txt_value(txt, key).ok_or("TXT key missing")?;
        std::str::from_utf8(v).map_err(|_| "TXT value is not UTF-8")
    };
    let version: u32 = get("version")?.parse().map_err(|_| "bad version")?;
    if version != AD_VERSION {
        return Err("unsupported version");
    }
    // Absent before protocol 2.
    let proto: u8 = match txt_value(txt, "proto") {
        None => 1,
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|p| *p != 0)
            .ok_or("bad protocol version")?,
    };
    let id: PartyId = get("id")?.parse().map_err(|_| "bad party id")?;
    let host_id: NodeId = get("host")?.parse().map_err(|_| "bad host id")?;
    let name = get("name")?;
    let host_name = get("host_name")?;
    if !name_ok(name) || !name_ok(host_name) {
        return Err("bad name");
    }
    let members = get("members")?;
    if members.is_empty() || !members.bytes().all(|b| b.is_ascii_digit()) {
        return Err("bad member count");
    }
    let members: u32 = members.parse().map_err(|_| "bad member count")?;
    let protected = match get("protected")? {
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
        host_key: get("key")?.to_string(),
        endpoints: ips
            .into_iter()
            .map(|ip| SocketAddr::V4(SocketAddrV4::new(ip, port)))
            .collect(),
        members,
        protected,
        version,
        proto,
    };
    validate_ad(&ad)?;
    Ok(ad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    pub(crate) fn ad() -> PartyAd {
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
            proto: crate::wire::WIRE_VERSION,
        }
    }

    #[test]
    fn txt_roundtrip() {
        let a = ad();
        let back = ad_from_txt(&txt_pairs(&a), &[Ipv4Addr::new(192, 168, 1, 10)], 4242).unwrap();
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
            &txt_pairs(&b),
            &[
                Ipv4Addr::LOCALHOST,
                Ipv4Addr::new(10, 0, 0, 2),
                Ipv4Addr::new(224, 0, 0, 251),
            ],
            9,
        )
        .unwrap();
        assert_eq!(back, b);

        // Keys are case-insensitive and the first occurrence wins (RFC 6763 §6.4).
        let mut txt = txt_pairs(&a);
        txt.insert(0, (b"MEMBERS".to_vec(), Some(b"9".to_vec())));
        txt.push((b"members".to_vec(), Some(b"1".to_vec())));
        let back = ad_from_txt(&txt, &[Ipv4Addr::new(192, 168, 1, 10)], 4242).unwrap();
        assert_eq!(back.members, 9);
    }

    #[test]
    fn hostile_txt_is_rejected() {
        let ip = [Ipv4Addr::new(192, 168, 1, 10)];
        let good = txt_pairs(&ad());
        let with = |key: &str, val: Option<&[u8]>| -> TxtPairs {
            let mut v: TxtPairs = good
                .iter()
                .filter(|(k, _)| k != key.as_bytes())
                .cloned()
                .collect();
            if let Some(val) = val {
                v.push((key.as_bytes().to_vec(), Some(val.to_vec())));
            }
            v
        };
        let long = "x".repeat(65);
        let cases: &[(&str, Option<&[u8]>)] = &[
            ("id", None),
            ("id", Some(b"not-an-id")),
            ("id", Some(b"")),
            ("host", Some(b"xyz")),
            ("host", None),
            ("name", None),
            ("name", Some(long.as_bytes())),
            ("name", Some("evil\u{1b}]0;pwned\u{7}".as_bytes())),
            ("name", Some(b"\xff\xfe")),
            ("host_name", Some(long.as_bytes())),
            ("key", Some(b"short")),
            ("key", None),
            ("members", Some(b"-1")),
            ("members", Some(b"+3")),
            ("members", Some(b"99999999999")),
            ("members", Some(b"")),
            ("protected", Some(b"yes")),
            ("version", Some(b"2")),
            ("version", Some(b"")),
            ("version", None),
        ];
        for (key, val) in cases {
            assert!(
                ad_from_txt(&with(key, *val), &ip, 4242).is_err(),
                "{key}={val:?} accepted"
            );
        }
        // A key without a value counts as missing.
        let mut no_value = with("id", None);
        no_value.push((b"id".to_vec(), None));
        assert!(ad_from_txt(&no_value, &ip, 4242).is_err());
        // Port 0 or no usable address.
        assert!(ad_from_txt(&good, &ip, 0).is_err());
        assert!(ad_from_txt(&good, &[], 4242).is_err());
        assert!(ad_from_txt(&good, &[Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST], 4242).is_err());
        // Too many addresses are capped, not rejected.
        let many: Vec<Ipv4Addr> = (1..=40).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        assert_eq!(
            ad_from_txt(&good, &many, 1).unwrap().endpoints.len(),
            MAX_ENDPOINTS
        );
    }

    proptest! {
        #[test]
        fn hostile_txt_never_panics(
            pairs in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..12),
                 proptest::option::of(proptest::collection::vec(any::<u8>(), 0..80))),
                0..12),
            port in any::<u16>(),
        ) {
            let _ = ad_from_txt(&pairs, &[Ipv4Addr::new(10, 0, 0, 1)], port);
        }
    }

    #[test]
    fn instance_labels() {
        let mut a = ad();
        let id = format!("{} {}", a.id, &a.host_id.to_string()[..8]);
        assert_eq!(instance_label(&a), format!("Friday night {id}"));
        // Same name, different id: different instance.
        let mut b = ad();
        b.id = PartyId([8; 10]);
        assert_ne!(instance_label(&a), instance_label(&b));
        // Dots, backslashes and control characters are replaced.
        a.name = "a.b\\c\td".into();
        assert_eq!(instance_label(&a), format!("a_b_c_d {id}"));
        // Long names are cut at a character boundary to fit a DNS label.
        a.name = "é".repeat(32);
        let n = instance_label(&a);
        assert!(n.len() <= MAX_LABEL_BYTES, "{n}");
        assert!(n.starts_with("éééé") && n.ends_with(&format!(" {id}")));
        // An empty or blank name leaves just the id.
        a.name = "   ".into();
        assert_eq!(instance_label(&a), id);
        // Every 64-byte name fits.
        a.name = "x".repeat(64);
        assert!(instance_label(&a).len() <= MAX_LABEL_BYTES);
        assert_eq!(host_label(a.host_id), "lanrage-0303030303030303");
    }
}
