//! Would the host's nftables input hook let a packet in? `lanrage doctor` asks this for the
//! daemon's UDP port (a friend's first packet) and for the party interface (a game's packet from
//! a member). This module reads the ruleset as `nft -j list ruleset` prints it and walks the
//! input base chains for one hypothetical packet; it does no I/O, so every case is a unit test.
//!
//! The packet is IPv4, UDP, conntrack state `new`, arriving on a known or unknown interface, to a
//! known or unknown destination port. What a rule tests that the packet does not say (its source
//! address, a named set, a rate limit, iptables-nft `xt` matches) makes the answer
//! [`Fate::Unclear`] when that rule could change the outcome, never a guess.

use serde_json::Value;

/// The packet whose fate is asked.
#[derive(Clone, Copy, Debug)]
pub struct Packet<'a> {
    /// Input interface; `None` = some interface other than `lo`.
    pub iifname: Option<&'a str>,
    /// UDP destination port; `None` = any (a rule that tests it is unclear).
    pub dport: Option<u16>,
}

/// Where a verdict came from: a base chain, and the rule in it that decided (directly or by
/// jumping elsewhere), or its policy when `rule` is `None`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    /// `ip` or `inet`.
    pub family: String,
    /// Table name.
    pub table: String,
    /// Base chain name.
    pub chain: String,
    /// Handle of the deciding rule in the base chain; `None` = the chain's policy.
    pub rule: Option<u64>,
}

impl Place {
    /// The `nft` command that lets `what` (e.g. `udp dport 51820`) in before whatever drops it:
    /// appended when the policy drops, inserted before the deciding rule otherwise.
    pub fn allow_command(&self, what: &str) -> String {
        let (f, t, c) = (
            &self.family,
            quote_name(&self.table),
            quote_name(&self.chain),
        );
        match self.rule {
            None => format!("nft add rule {f} {t} {c} {what} accept"),
            Some(h) => format!("nft insert rule {f} {t} {c} position {h} {what} accept"),
        }
    }
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "table {} {}, chain {}",
            self.family, self.table, self.chain
        )?;
        match self.rule {
            Some(h) => write!(f, ", rule handle {h}"),
            None => write!(f, ", its policy"),
        }
    }
}

/// A table or chain name as `nft` takes it on a command line (plain names stay plain).
fn quote_name(name: &str) -> String {
    if !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        name.to_owned()
    } else {
        format!("'\"{}\"'", name.replace(['\'', '"'], ""))
    }
}

/// What the input hook does with the packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    /// No input base chain for IPv4 (nothing filters input).
    Unfiltered,
    /// Every input base chain accepts it.
    Accepted,
    /// A base chain drops or rejects it.
    Dropped(Place),
    /// A rule whose test depends on what the packet does not say could change the outcome.
    Unclear {
        /// That rule (in its base chain).
        place: Place,
        /// What it tests (e.g. "the source address").
        why: String,
        /// What happens when that rule does not apply.
        otherwise: Box<Fate>,
    },
}

/// Why the ruleset could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the nftables ruleset: {0}")]
pub struct BadRuleset(String);

/// Most chains followed by jumps (nft itself refuses loops; this bounds a hostile input).
const MAX_DEPTH: usize = 16;

struct Chain {
    family: String,
    table: String,
    name: String,
    hook: Option<String>,
    policy: Option<String>,
    rules: Vec<(u64, Vec<Value>)>,
}

/// A parsed ruleset.
pub struct Ruleset {
    chains: Vec<Chain>,
}

impl Ruleset {
    /// Parses `nft -j list ruleset` output.
    pub fn parse(json: &str) -> Result<Ruleset, BadRuleset> {
        let v: Value = serde_json::from_str(json).map_err(|e| BadRuleset(e.to_string()))?;
        let items = v["nftables"]
            .as_array()
            .ok_or_else(|| BadRuleset("no \"nftables\" array".into()))?;
        let text = |o: &Value, k: &str| o[k].as_str().unwrap_or_default().to_owned();
        let mut chains: Vec<Chain> = Vec::new();
        for item in items {
            if let Some(c) = item.get("chain") {
                chains.push(Chain {
                    family: text(c, "family"),
                    table: text(c, "table"),
                    name: text(c, "name"),
                    hook: c["hook"].as_str().map(str::to_owned),
                    policy: c["policy"].as_str().map(str::to_owned),
                    rules: Vec::new(),
                });
            } else if let Some(r) = item.get("rule") {
                let (family, table, chain) =
                    (text(r, "family"), text(r, "table"), text(r, "chain"));
                let exprs = r["expr"].as_array().cloned().unwrap_or_default();
                let handle = r["handle"].as_u64().unwrap_or(0);
                if let Some(c) = chains
                    .iter_mut()
                    .find(|c| c.family == family && c.table == table && c.name == chain)
                {
                    c.rules.push((handle, exprs));
                }
            }
        }
        Ok(Ruleset { chains })
    }

    /// What the IPv4 input hook does with `packet`: every `ip` and `inet` base chain on the
    /// `input` hook must accept it; the first that drops it (or, failing that, the first
    /// unclear one) is reported.
    pub fn fate(&self, packet: Packet) -> Fate {
        let mut fates = Vec::new();
        for c in self.chains.iter().filter(|c| {
            c.hook.as_deref() == Some("input") && matches!(c.family.as_str(), "ip" | "inet")
        }) {
            let policy_drops = c.policy.as_deref() == Some("drop");
            let base = |rule| Place {
                family: c.family.clone(),
                table: c.table.clone(),
                chain: c.name.clone(),
                rule,
            };
            let r = self.walk(c, packet, 0);
            let settle = |o: Outcome| match o {
                Outcome::Accept => Fate::Accepted,
                Outcome::Drop(h) => Fate::Dropped(base(h)),
                Outcome::Fallthrough if policy_drops => Fate::Dropped(base(None)),
                Outcome::Fallthrough => Fate::Accepted,
            };
            let fate = settle(r.outcome);
            let fate = match r.doubt {
                Some(d) if settle(d.outcome) != fate => Fate::Unclear {
                    place: base(Some(d.rule)),
                    why: d.why,
                    otherwise: Box::new(fate),
                },
                _ => fate,
            };
            fates.push(fate);
        }
        if fates.is_empty() {
            return Fate::Unfiltered;
        }
        if let Some(d) = fates.iter().find(|f| matches!(f, Fate::Dropped(_))) {
            return d.clone();
        }
        if let Some(u) = fates.iter().find(|f| matches!(f, Fate::Unclear { .. })) {
            return u.clone();
        }
        Fate::Accepted
    }

    fn chain(&self, family: &str, table: &str, name: &str) -> Option<&Chain> {
        self.chains
            .iter()
            .find(|c| c.family == family && c.table == table && c.name == name)
    }

    /// Runs `packet` through `chain`. Rule handles in the result are this chain's.
    fn walk(&self, chain: &Chain, packet: Packet, depth: usize) -> Walk {
        let mut doubt: Option<Doubt> = None;
        for (handle, exprs) in &chain.rules {
            let (cond, verdict) = rule_parts(exprs, packet);
            let Some(verdict) = verdict else { continue };
            // A vmap decides by a key the packet may not say: then the rule is unclear.
            let (cond, verdict) = match verdict {
                Verdict::Unclear(why) => (
                    match cond {
                        Tri::No => Tri::No,
                        _ => Tri::Maybe(why),
                    },
                    Verdict::Accept,
                ),
                v => (cond, v),
            };
            let outcome = match self.apply(chain, &verdict, packet, depth) {
                Step::Continue => None,
                Step::Stop(o) => Some(o),
            };
            match cond {
                Tri::No => {}
                Tri::Yes => {
                    if let Some(o) = outcome {
                        let o = o.at(*handle);
                        return Walk { outcome: o, doubt };
                    }
                }
                Tri::Maybe(why) => {
                    if doubt.is_none() {
                        if let Some(o) = outcome {
                            doubt = Some(Doubt {
                                rule: *handle,
                                why,
                                outcome: o.at(*handle),
                            });
                        }
                    }
                }
            }
        }
        Walk {
            outcome: Outcome::Fallthrough,
            doubt,
        }
    }

    /// What a verdict does once its rule matched.
    fn apply(&self, chain: &Chain, verdict: &Verdict, packet: Packet, depth: usize) -> Step {
        match verdict {
            Verdict::Accept => Step::Stop(Outcome::Accept),
            Verdict::Drop => Step::Stop(Outcome::Drop(None)),
            Verdict::Continue => Step::Continue,
            Verdict::Return => Step::Stop(Outcome::Fallthrough),
            Verdict::Jump(target) | Verdict::Goto(target) => {
                let Some(sub) = self.chain(&chain.family, &chain.table, target) else {
                    return Step::Continue;
                };
                if depth >= MAX_DEPTH {
                    return Step::Continue;
                }
                let w = self.walk(sub, packet, depth + 1);
                match (w.outcome, verdict) {
                    // A jump that falls through (or returns) goes on after the jump; a goto
                    // ends the calling chain too.
                    (Outcome::Fallthrough, Verdict::Jump(_)) => Step::Continue,
                    (o, _) => Step::Stop(o),
                }
            }
            Verdict::Unclear(_) => Step::Continue,
        }
    }
}

/// What a rule (or a chain it jumps to) does with the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Accept,
    /// Dropped or rejected, at this rule handle (filled in by the chain that asks).
    Drop(Option<u64>),
    /// Nothing decided: the chain's end (or a `return`).
    Fallthrough,
}

impl Outcome {
    /// The outcome as seen from the chain whose rule `handle` led to it.
    fn at(self, handle: u64) -> Outcome {
        match self {
            Outcome::Drop(_) => Outcome::Drop(Some(handle)),
            o => o,
        }
    }
}

enum Step {
    Continue,
    Stop(Outcome),
}

/// The first rule whose test the packet cannot answer and that would decide if it matched.
struct Doubt {
    rule: u64,
    why: String,
    outcome: Outcome,
}

struct Walk {
    outcome: Outcome,
    doubt: Option<Doubt>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tri {
    Yes,
    No,
    Maybe(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    Accept,
    Drop,
    Continue,
    Return,
    Jump(String),
    Goto(String),
    Unclear(String),
}

/// A rule's conditions (all must hold) and its verdict, if it has one.
fn rule_parts(exprs: &[Value], packet: Packet) -> (Tri, Option<Verdict>) {
    let mut cond = Tri::Yes;
    let mut verdict = None;
    for e in exprs {
        let Some((kind, body)) = e.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        let c = match kind.as_str() {
            "match" => eval_match(body, packet),
            "accept" => {
                verdict = Some(Verdict::Accept);
                continue;
            }
            "drop" | "reject" => {
                verdict = Some(Verdict::Drop);
                continue;
            }
            "continue" => {
                verdict = Some(Verdict::Continue);
                continue;
            }
            "return" => {
                verdict = Some(Verdict::Return);
                continue;
            }
            "jump" | "goto" => {
                let target = body["target"].as_str().unwrap_or_default().to_owned();
                verdict = Some(if kind == "jump" {
                    Verdict::Jump(target)
                } else {
                    Verdict::Goto(target)
                });
                continue;
            }
            "vmap" => {
                verdict = Some(eval_vmap(body, packet));
                continue;
            }
            // Statements that do not change the verdict.
            "counter" | "log" | "set" | "mangle" | "notrack" | "meta" | "ct" | "dup" => continue,
            "limit" | "quota" => Tri::Maybe("a rate limit".into()),
            "xt" => Tri::Maybe("an iptables rule (xt)".into()),
            other => Tri::Maybe(format!("`{other}`")),
        };
        cond = match (cond, c) {
            (Tri::No, _) | (_, Tri::No) => Tri::No,
            (Tri::Maybe(w), _) | (_, Tri::Maybe(w)) => Tri::Maybe(w),
            _ => Tri::Yes,
        };
    }
    (cond, verdict)
}

/// What the packet has for the left side of a match.
enum Field<'a> {
    Known(Actual<'a>),
    /// The packet cannot have it (another protocol or address family).
    Absent,
    /// Not said by the packet.
    Unknown(String),
}

#[derive(Clone, Copy)]
enum Actual<'a> {
    Num(u64),
    Text(&'a str),
}

fn field<'a>(left: &Value, packet: Packet<'a>) -> Field<'a> {
    if let Some(p) = left.get("payload") {
        let proto = p["protocol"].as_str().unwrap_or_default();
        let name = p["field"].as_str().unwrap_or_default();
        return match (proto, name) {
            ("udp" | "th", "dport") => match packet.dport {
                Some(port) => Field::Known(Actual::Num(port.into())),
                None => Field::Unknown("the destination port".into()),
            },
            ("udp" | "th", _) => Field::Unknown(format!("the UDP {name}")),
            ("ip", "protocol") => Field::Known(Actual::Text("udp")),
            ("ip", "saddr") => Field::Unknown("the source address".into()),
            ("ip", _) => Field::Unknown(format!("the IP {name}")),
            // Another transport or IPv6: nft adds the protocol test implicitly.
            (
                "tcp" | "icmp" | "icmpv6" | "sctp" | "dccp" | "udplite" | "ip6" | "esp" | "ah"
                | "igmp" | "comp" | "arp",
                _,
            ) => Field::Absent,
            _ => Field::Unknown(format!("{proto} {name}")),
        };
    }
    if let Some(m) = left.get("meta") {
        return match m["key"].as_str().unwrap_or_default() {
            "iifname" | "iif" => match packet.iifname {
                Some(name) => Field::Known(Actual::Text(name)),
                None => Field::Unknown("the input interface".into()),
            },
            "l4proto" => Field::Known(Actual::Text("udp")),
            "nfproto" => Field::Known(Actual::Text("ipv4")),
            "protocol" => Field::Known(Actual::Text("ip")),
            "pkttype" => Field::Known(Actual::Text("host")),
            key => Field::Unknown(format!("meta {key}")),
        };
    }
    if let Some(c) = left.get("ct") {
        return match c["key"].as_str().unwrap_or_default() {
            "state" => Field::Known(Actual::Text("new")),
            key => Field::Unknown(format!("ct {key}")),
        };
    }
    if left.get("fib").is_some() {
        return Field::Unknown("a routing (fib) lookup".into());
    }
    Field::Unknown("an expression lanrage does not read".into())
}

/// Whether `actual` is `right` (a value, a set, a range, a list of flags); `None` when the
/// right side cannot be read here (a named set, a prefix).
fn is_in(actual: Actual, right: &Value) -> Option<bool> {
    match right {
        Value::Number(n) => match actual {
            Actual::Num(a) => Some(n.as_u64() == Some(a)),
            Actual::Text(t) => Some(proto_number(t).is_some_and(|p| n.as_u64() == Some(p))),
        },
        Value::String(s) if s.starts_with('@') => None,
        Value::String(s) => Some(match actual {
            Actual::Text(t) => match s.strip_suffix('*') {
                Some(prefix) => t.starts_with(prefix),
                None => t == s,
            },
            Actual::Num(a) => s.parse::<u64>().ok() == Some(a),
        }),
        Value::Array(items) => any_in(actual, items),
        Value::Object(o) => {
            if let Some(Value::Array(items)) = o.get("set") {
                any_in(actual, items)
            } else if let Some(Value::Array(r)) = o.get("range") {
                let (Actual::Num(a), Some(lo), Some(hi)) = (
                    actual,
                    r.first().and_then(Value::as_u64),
                    r.get(1).and_then(Value::as_u64),
                ) else {
                    return None;
                };
                Some((lo..=hi).contains(&a))
            } else {
                None
            }
        }
        _ => None,
    }
}

fn any_in(actual: Actual, items: &[Value]) -> Option<bool> {
    let mut unknown = false;
    for item in items {
        match is_in(actual, item) {
            Some(true) => return Some(true),
            Some(false) => {}
            None => unknown = true,
        }
    }
    (!unknown).then_some(false)
}

fn proto_number(name: &str) -> Option<u64> {
    match name {
        "udp" => Some(17),
        _ => None,
    }
}

fn eval_match(m: &Value, packet: Packet) -> Tri {
    let op = m["op"].as_str().unwrap_or("==");
    let actual = match field(&m["left"], packet) {
        Field::Absent => return Tri::No,
        Field::Unknown(why) => return Tri::Maybe(why),
        Field::Known(a) => a,
    };
    let right = &m["right"];
    let yes = match op {
        "==" | "in" => is_in(actual, right),
        "!=" => is_in(actual, right).map(|b| !b),
        "<" | ">" | "<=" | ">=" => match (actual, right.as_u64()) {
            (Actual::Num(a), Some(b)) => Some(match op {
                "<" => a < b,
                ">" => a > b,
                "<=" => a <= b,
                _ => a >= b,
            }),
            _ => None,
        },
        _ => None,
    };
    match yes {
        Some(true) => Tri::Yes,
        Some(false) => Tri::No,
        None => Tri::Maybe("a set or value lanrage cannot read".into()),
    }
}

/// `KEY vmap { value : verdict, ... }`: the verdict of the element the packet matches, none
/// if it matches none, or unclear.
fn eval_vmap(body: &Value, packet: Packet) -> Verdict {
    let actual = match field(&body["key"], packet) {
        Field::Absent => return Verdict::Continue,
        Field::Unknown(why) => return Verdict::Unclear(why),
        Field::Known(a) => a,
    };
    let Some(items) = body["data"]["set"].as_array() else {
        return Verdict::Unclear("a named verdict map".into());
    };
    for item in items {
        let (Some(key), Some(v)) = (item.get(0), item.get(1)) else {
            continue;
        };
        match is_in(actual, key) {
            Some(true) => {
                let (_, verdict) = rule_parts(std::slice::from_ref(v), packet);
                return verdict.unwrap_or(Verdict::Continue);
            }
            Some(false) => {}
            None => return Verdict::Unclear("a verdict map key lanrage cannot read".into()),
        }
    }
    Verdict::Continue
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIXED: &str = include_str!("testdata/nft_mixed.json");

    fn udp(port: u16, iif: &'static str) -> Packet<'static> {
        Packet {
            iifname: Some(iif),
            dport: Some(port),
        }
    }

    fn lab_ruleset(extra: &str) -> String {
        format!(
            r#"{{"nftables": [
  {{"table": {{"family": "inet", "name": "filter", "handle": 1}}}},
  {{"chain": {{"family": "inet", "table": "filter", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}}}},
  {{"rule": {{"family": "inet", "table": "filter", "chain": "input", "handle": 2, "expr": [{{"match": {{"op": "==", "left": {{"meta": {{"key": "iifname"}}}}, "right": "lo"}}}}, {{"accept": null}}]}}}},
  {{"rule": {{"family": "inet", "table": "filter", "chain": "input", "handle": 3, "expr": [{{"match": {{"op": "in", "left": {{"ct": {{"key": "state"}}}}, "right": ["established", "related"]}}}}, {{"accept": null}}]}}}}
  {extra}
]}}"#
        )
    }

    #[test]
    fn policy_drop_without_an_accept_drops_and_names_the_fix() {
        let rs = Ruleset::parse(&lab_ruleset("")).unwrap();
        let place = match rs.fate(udp(51820, "eth0")) {
            Fate::Dropped(p) => p,
            other => panic!("{other:?}"),
        };
        assert_eq!(place.rule, None);
        assert_eq!(
            place.allow_command("udp dport 51820"),
            "nft add rule inet filter input udp dport 51820 accept"
        );
        assert_eq!(
            place.to_string(),
            "table inet filter, chain input, its policy"
        );
        // Loopback is let in (the API).
        assert_eq!(rs.fate(udp(8666, "lo")), Fate::Accepted);
        let party = Packet {
            iifname: Some("lanrage0"),
            dport: None,
        };
        assert!(matches!(rs.fate(party), Fate::Dropped(_)));

        let fixed = lab_ruleset(
            r#", {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 4, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 51820}}, {"accept": null}]}},
  {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 5, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lanrage0"}}, {"accept": null}]}}"#,
        );
        let rs = Ruleset::parse(&fixed).unwrap();
        assert_eq!(rs.fate(udp(51820, "eth0")), Fate::Accepted);
        assert_eq!(
            rs.fate(Packet {
                iifname: None,
                dport: Some(51820)
            }),
            Fate::Accepted
        );
        assert_eq!(rs.fate(party), Fate::Accepted);
        assert!(matches!(rs.fate(udp(51821, "eth0")), Fate::Dropped(_)));
    }

    #[test]
    fn sets_ranges_jumps_vmaps_and_rejects() {
        let rs = Ruleset::parse(MIXED).unwrap();
        // ct state new + udp dport { 27015, 51820-51830 } accept.
        assert_eq!(rs.fate(udp(51820, "eth0")), Fate::Accepted);
        assert_eq!(rs.fate(udp(51830, "wlan0")), Fate::Accepted);
        assert_eq!(rs.fate(udp(5353, "wlan0")), Fate::Accepted);
        // iifname "eth*" jump sub → sub drops: the jump rule (12) is where to insert.
        let place = match rs.fate(udp(40000, "eth0")) {
            Fate::Dropped(p) => p,
            other => panic!("{other:?}"),
        };
        assert_eq!(place.rule, Some(12));
        assert_eq!(
            place.allow_command("udp dport 40000"),
            "nft insert rule inet filter input position 12 udp dport 40000 accept"
        );
        // Not eth*: the final reject (15).
        match rs.fate(udp(40000, "wlan0")) {
            Fate::Dropped(p) => assert_eq!(p.rule, Some(15)),
            other => panic!("{other:?}"),
        }
        // Any port on the party interface: some ports are let in, others rejected.
        let party = Packet {
            iifname: Some("lanrage0"),
            dport: None,
        };
        match rs.fate(party) {
            Fate::Unclear {
                place,
                why,
                otherwise,
            } => {
                assert_eq!(place.rule, Some(10));
                assert_eq!(why, "the destination port");
                assert!(matches!(*otherwise, Fate::Dropped(_)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn what_the_packet_does_not_say_is_unclear() {
        let rs = Ruleset::parse(&lab_ruleset(
            r#", {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 4, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "192.0.2.0", "len": 24}}}}, {"accept": null}]}}"#,
        ))
        .unwrap();
        match rs.fate(udp(51820, "eth0")) {
            Fate::Unclear { place, why, .. } => {
                assert_eq!(place.rule, Some(4));
                assert_eq!(why, "the source address");
            }
            other => panic!("{other:?}"),
        }
        // Policy accept with no rules at all: accepted; no input chain: unfiltered.
        let open = r#"{"nftables": [{"chain": {"family": "ip", "table": "t", "name": "in", "hook": "input", "policy": "accept"}}]}"#;
        assert_eq!(
            Ruleset::parse(open).unwrap().fate(udp(1, "eth0")),
            Fate::Accepted
        );
        let v6only = r#"{"nftables": [{"chain": {"family": "ip6", "table": "t", "name": "in", "hook": "input", "policy": "drop"}}]}"#;
        assert_eq!(
            Ruleset::parse(v6only).unwrap().fate(udp(1, "eth0")),
            Fate::Unfiltered
        );
        assert!(Ruleset::parse("not json").is_err());
        assert!(Ruleset::parse("{}").is_err());
    }

    #[test]
    fn hostile_rulesets_end() {
        // A chain that jumps to itself is followed only MAX_DEPTH times.
        let looped = r#"{"nftables": [
          {"chain": {"family": "inet", "table": "t", "name": "in", "hook": "input", "policy": "drop"}},
          {"rule": {"family": "inet", "table": "t", "chain": "in", "handle": 1, "expr": [{"jump": {"target": "in"}}]}}
        ]}"#;
        let rs = Ruleset::parse(looped).unwrap();
        assert!(matches!(rs.fate(udp(1, "eth0")), Fate::Dropped(_)));
        assert_eq!(quote_name("filter"), "filter");
        assert_eq!(quote_name("my table"), "'\"my table\"'");
    }
}
