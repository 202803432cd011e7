//! mDNS messages on the wire (RFC 6762 framing, RFC 1035 encoding) through the `simple-dns`
//! crate: parsing untrusted datagrams, with the header's counts checked against the datagram's
//! size before the crate sizes anything by them, and building the few messages lanrage sends.

use simple_dns::rdata::{RData, A, PTR, SRV, TXT};
use simple_dns::{
    Label, Name, Packet, PacketFlag, Question, ResourceRecord, CLASS, QCLASS, QTYPE, TYPE,
};

/// Largest mDNS message: 9000 bytes including the IPv4 and UDP headers (RFC 6762 §17). Anything
/// longer is dropped unread.
pub const MAX_MESSAGE: usize = 9000 - 20 - 8;
/// Messages lanrage builds stay below a typical Ethernet MTU (no IP fragmentation).
pub const MAX_BUILT: usize = 1400;
/// DNS header length.
const HEADER: usize = 12;
/// Smallest question: root name (1) + type + class.
const MIN_QUESTION: usize = 5;
/// Smallest record: root name (1) + type + class + TTL + rdlength.
const MIN_RECORD: usize = 11;

/// `_lanrage._udp.local.`, the DNS-SD service type parties are announced under.
pub const SERVICE: [&[u8]; 3] = [b"_lanrage", b"_udp", b"local"];
/// `_services._dns-sd._udp.local.`, DNS-SD service type enumeration (RFC 6763 §9).
pub const SERVICES: [&[u8]; 4] = [b"_services", b"_dns-sd", b"_udp", b"local"];
/// `local.`, where host names live.
pub const LOCAL: [&[u8]; 1] = [b"local"];

/// Why a datagram is not an mDNS message we read.
#[derive(Debug, thiserror::Error)]
pub enum Malformed {
    /// Longer than [`MAX_MESSAGE`] (or truncated on receipt).
    #[error("longer than {MAX_MESSAGE} bytes")]
    TooLong,
    /// Shorter than a DNS header.
    #[error("shorter than a DNS header")]
    Short,
    /// The header announces more entries than the datagram can hold.
    #[error("header counts exceed the message size")]
    Counts,
    /// The DNS encoding is broken.
    #[error("DNS: {0}")]
    Dns(#[from] simple_dns::SimpleDnsError),
}

/// Parses one datagram. Work and memory are linear in its length, which is at most
/// [`MAX_MESSAGE`]: the counts in the header are checked against the length first (every entry
/// takes at least 5 or 11 bytes), so the parser never reserves room for 4 × 65535 entries that a
/// 12-byte datagram claims to hold.
pub fn parse(bytes: &[u8]) -> Result<Packet<'_>, Malformed> {
    if bytes.len() > MAX_MESSAGE {
        return Err(Malformed::TooLong);
    }
    if bytes.len() < HEADER {
        return Err(Malformed::Short);
    }
    let count = |at: usize| usize::from(u16::from_be_bytes([bytes[at], bytes[at + 1]]));
    let least = count(4) * MIN_QUESTION + (count(6) + count(8) + count(10)) * MIN_RECORD;
    if least > bytes.len() - HEADER {
        return Err(Malformed::Counts);
    }
    Ok(Packet::parse(bytes)?)
}

/// Whether `name` is exactly `labels` (ASCII case-insensitive, as DNS compares names).
pub fn name_is(name: &Name<'_>, labels: &[&[u8]]) -> bool {
    let got = name.get_labels();
    got.len() == labels.len()
        && got
            .iter()
            .zip(labels)
            .all(|(g, l)| g.as_ref().eq_ignore_ascii_case(l))
}

/// The first label of `name` if the rest of it is `parent` (e.g. the instance label of
/// `<instance>._lanrage._udp.local.`).
pub fn child_of<'n>(name: &'n Name<'_>, parent: &[&[u8]]) -> Option<&'n [u8]> {
    let labels = name.get_labels();
    if labels.len() != parent.len() + 1 {
        return None;
    }
    labels[1..]
        .iter()
        .zip(parent)
        .all(|(g, l)| g.as_ref().eq_ignore_ascii_case(l))
        .then(|| labels[0].as_ref())
}

/// A name from raw labels (each at most 63 bytes, which the callers guarantee).
pub fn name<'a>(labels: &[&'a [u8]]) -> Name<'a> {
    let labels: Vec<Label<'a>> = labels.iter().map(|l| Label::new_unchecked(*l)).collect();
    Name::new_with_labels(&labels)
}

/// `<first>.<rest...>` as a name.
pub fn name_under<'a>(first: &'a [u8], rest: &[&'a [u8]]) -> Name<'a> {
    let mut labels = Vec::with_capacity(rest.len() + 1);
    labels.push(first);
    labels.extend_from_slice(rest);
    name(&labels)
}

/// A PTR record.
pub fn ptr<'a>(owner: Name<'a>, target: Name<'a>, ttl: u32) -> ResourceRecord<'a> {
    ResourceRecord::new(owner, CLASS::IN, ttl, RData::PTR(PTR(target)))
}

/// An SRV record (priority and weight 0), with the cache-flush bit (it is unique to its owner).
pub fn srv<'a>(owner: Name<'a>, target: Name<'a>, port: u16, ttl: u32) -> ResourceRecord<'a> {
    ResourceRecord::new(
        owner,
        CLASS::IN,
        ttl,
        RData::SRV(SRV {
            priority: 0,
            weight: 0,
            port,
            target,
        }),
    )
    .with_cache_flush(true)
}

/// A TXT record from key/value pairs, with the cache-flush bit. Pairs whose key is not printable
/// ASCII or that do not fit a 255-byte string are left out (lanrage's own never are).
pub fn txt<'a>(
    owner: Name<'a>,
    pairs: &[(Vec<u8>, Option<Vec<u8>>)],
    ttl: u32,
) -> ResourceRecord<'a> {
    let mut record = TXT::new();
    for (key, value) in pairs {
        if let Ok(key) = std::str::from_utf8(key) {
            let _ = record.add_attribute(key, value.as_deref());
        }
    }
    ResourceRecord::new(owner, CLASS::IN, ttl, RData::TXT(record.into_owned()))
        .with_cache_flush(true)
}

/// An A record, with the cache-flush bit.
pub fn a<'a>(owner: Name<'a>, addr: std::net::Ipv4Addr, ttl: u32) -> ResourceRecord<'a> {
    ResourceRecord::new(owner, CLASS::IN, ttl, RData::A(A::from(addr))).with_cache_flush(true)
}

/// A response (id 0, authoritative, no questions) carrying `answers`. `None` if it cannot be
/// encoded.
pub fn response(answers: Vec<ResourceRecord<'_>>) -> Option<Vec<u8>> {
    let mut p = Packet::new_reply(0);
    p.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
    p.answers = answers;
    p.build_bytes_vec_compressed().ok()
}

/// A legacy unicast response (RFC 6762 §6.7): the query's id and questions echoed.
pub fn legacy_response<'a>(
    id: u16,
    questions: Vec<Question<'a>>,
    answers: Vec<ResourceRecord<'a>>,
) -> Option<Vec<u8>> {
    let mut p = Packet::new_reply(id);
    p.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
    p.questions = questions;
    p.answers = answers;
    p.build_bytes_vec_compressed().ok()
}

/// A multicast query (id 0, QM questions) for `(name, type)` pairs.
pub fn query(questions: &[(Name<'_>, TYPE)]) -> Option<Vec<u8>> {
    let mut p = Packet::new_query(0);
    p.questions = questions
        .iter()
        .map(|(n, t)| Question::new(n.clone(), QTYPE::TYPE(*t), QCLASS::CLASS(CLASS::IN), false))
        .collect();
    p.build_bytes_vec_compressed().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn counts_are_checked_before_parsing() {
        // A bare header claiming 65535 entries per section.
        let mut h = vec![0u8; 12];
        h[4..12].fill(0xff);
        assert!(matches!(parse(&h), Err(Malformed::Counts)));
        assert!(matches!(parse(&h[..5]), Err(Malformed::Short)));
        assert!(matches!(
            parse(&vec![0u8; MAX_MESSAGE + 1]),
            Err(Malformed::TooLong)
        ));
        // An empty message is fine.
        assert!(parse(&[0u8; 12]).is_ok());
    }

    #[test]
    fn built_messages_parse_back() {
        let owner = name_under(b"Party X k3m9", &SERVICE);
        let host = name_under(b"lanrage-0303030303030303", &LOCAL);
        let pairs = vec![
            (b"id".to_vec(), Some(b"k3m9".to_vec())),
            (b"flag".to_vec(), None),
        ];
        let bytes = response(vec![
            ptr(name(&SERVICE), owner.clone(), 4500),
            srv(owner.clone(), host.clone(), 4242, 120),
            txt(owner.clone(), &pairs, 4500),
            a(host.clone(), std::net::Ipv4Addr::new(192, 0, 2, 10), 120),
        ])
        .unwrap();
        let p = parse(&bytes).unwrap();
        assert!(p.has_flags(PacketFlag::RESPONSE));
        assert_eq!(p.answers.len(), 4);
        match &p.answers[0].rdata {
            RData::PTR(PTR(t)) => assert_eq!(child_of(t, &SERVICE), Some(&b"Party X k3m9"[..])),
            other => panic!("{other:?}"),
        }
        assert!(name_is(&p.answers[0].name, &SERVICE));
        assert!(p.answers[1].cache_flush);
        match &p.answers[2].rdata {
            RData::TXT(t) => {
                let got: Vec<_> = t.iter_raw().collect();
                assert_eq!(
                    got,
                    vec![(&b"id"[..], Some(&b"k3m9"[..])), (&b"flag"[..], None)]
                );
            }
            other => panic!("{other:?}"),
        }
        let q = query(&[(name(&SERVICE), TYPE::PTR)]).unwrap();
        let q = parse(&q).unwrap();
        assert!(!q.has_flags(PacketFlag::RESPONSE));
        assert!(name_is(
            &q.questions[0].qname,
            &[b"_LANRAGE", b"_udp", b"LOCAL"]
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = parse(&bytes);
        }
    }
}
