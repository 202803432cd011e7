//! Counters and the Prometheus text for `GET /metrics`.
//!
//! The text is OpenMetrics 1.0 written by `prometheus-client` (the Prometheus project's Rust
//! client; Prometheus asks for OpenMetrics first by default) from a fresh registry per scrape,
//! served as [`CONTENT_TYPE`].
//!
//! Counters touched outside the locks (STUN, datagrams of unknown protocols, HTTP answers, store
//! commits) are relaxed atomics here; the session table counts its own forwards and drops under
//! its lock ([`crate::sessions::TableStats`]); gauges (sessions, peers, parties) are read from the
//! state when rendering. Names:
//!
//! - `lanrage_relay_sessions`, `lanrage_relay_sessions_active` (both sides bound)
//! - `lanrage_relay_forwarded_packets_total`, `lanrage_relay_forwarded_bytes_total`
//! - `lanrage_relay_drops_total{reason=...}` (the session table's reasons, plus `unknown_protocol`
//!   for datagrams that are neither STUN nor relay frames, and `send_error`)
//! - `lanrage_relay_binds_total`, `lanrage_relay_rebinds_total`, `lanrage_relay_rebind_hints_total`,
//!   `lanrage_relay_bind_challenges_total`, `lanrage_relay_hints_limited_total`
//! - `lanrage_relay_stun_requests_total{result="success"|"error"|"ignored"|"oversized"|"rate_limited"}`
//! - `lanrage_relay_registered_peers`, `lanrage_relay_tokens`, `lanrage_relay_parties`,
//!   `lanrage_relay_party_members` (admitted), `lanrage_relay_party_applicants`
//! - `lanrage_relay_http_responses_total{code=...}`, `lanrage_relay_rate_limited_total{scope="ip"|"token"}`
//! - `lanrage_relay_http_connections_refused_total` (connection caps)
//! - `lanrage_relay_store_commits_total`, `lanrage_relay_store_records_total`,
//!   `lanrage_relay_store_compactions_total`, `lanrage_relay_store_errors_total`,
//!   `lanrage_relay_store_blocked` (1 while a failed write waits to be retried: state changes are
//!   not being saved, and requests that would change state are refused),
//!   `lanrage_relay_store_unsaved_records` (changes in memory not yet durable),
//!   `lanrage_relay_writes_refused_total` (requests answered 503 because state cannot be saved)

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::sessions::{DropReason, TableStats};

/// The content type of `GET /metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// HTTP status codes counted individually (others go to "other").
const CODES: [u16; 11] = [200, 201, 202, 204, 400, 401, 403, 404, 409, 429, 503];

/// Atomic counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// STUN requests answered with success.
    pub stun_success: AtomicU64,
    /// STUN requests answered with an error (420).
    pub stun_error: AtomicU64,
    /// STUN-looking datagrams not answered.
    pub stun_ignored: AtomicU64,
    /// STUN requests not answered because the answer would be larger (a 420).
    pub stun_oversized: AtomicU64,
    /// STUN requests not answered because of the per-source or global answer budget.
    pub stun_limited: AtomicU64,
    /// Datagrams that are neither STUN nor relay frames.
    pub unknown_protocol: AtomicU64,
    /// `send_to` failures.
    pub send_errors: AtomicU64,
    /// HTTP answers by code (index in `CODES`, last = other).
    pub http: [AtomicU64; CODES.len() + 1],
    /// Requests refused by the per-IP limiter.
    pub limited_ip: AtomicU64,
    /// Requests refused by the per-token limiter.
    pub limited_token: AtomicU64,
    /// TCP connections closed at once because of `control.max_connections(_per_ip)`.
    pub connections_refused: AtomicU64,
    /// Store batches committed.
    pub store_commits: AtomicU64,
    /// Records committed.
    pub store_records: AtomicU64,
    /// Snapshots written.
    pub store_compactions: AtomicU64,
    /// Store failures.
    pub store_errors: AtomicU64,
    /// 1 while a failed write waits to be retried (state changes are refused), else 0.
    pub store_blocked: AtomicU64,
    /// Requests refused because state cannot be saved.
    pub writes_refused: AtomicU64,
}

/// Gauges read from the state at render time.
#[derive(Clone, Debug, Default)]
pub struct Gauges {
    /// Relay sessions.
    pub sessions: usize,
    /// Sessions with both sides bound.
    pub sessions_active: usize,
    /// Distinct keys holding a token.
    pub registered_peers: usize,
    /// Live tokens.
    pub tokens: usize,
    /// Parties.
    pub parties: usize,
    /// Admitted memberships.
    pub members: usize,
    /// Applicants (joined, not admitted by the party's host).
    pub applicants: usize,
    /// Changes in memory not yet durable (pending and the store's backlog).
    pub unsaved: usize,
}

impl Metrics {
    /// Counts one HTTP answer.
    pub fn http_response(&self, code: u16) {
        let i = CODES.iter().position(|c| *c == code).unwrap_or(CODES.len());
        self.http[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The OpenMetrics text exposition (ends with `# EOF`), from a fresh registry: values are
    /// read from the atomics, `table` and `g` at this moment.
    pub fn render(&self, table: &TableStats, g: &Gauges) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut r = Registry::with_prefix("lanrage_relay");
        let gauge = |r: &mut Registry, name: &str, help: &str, v: usize| {
            r.register(name, help, ConstGauge::new(v as u64));
        };
        let counter = |r: &mut Registry, name: &str, help: &str, v: u64| {
            r.register(name, help, ConstCounter::new(v));
        };
        let family = |r: &mut Registry, name: &str, help: &str, label: &'static str, rows| {
            let f = Family::<[(&'static str, String); 1], Counter>::default();
            for (value, n) in rows {
                f.get_or_create(&[(label, value)]).inc_by(n);
            }
            r.register(name, help, f);
        };
        gauge(&mut r, "sessions", "Relay sessions", g.sessions);
        gauge(
            &mut r,
            "sessions_active",
            "Relay sessions with both members bound",
            g.sessions_active,
        );
        counter(
            &mut r,
            "forwarded_packets",
            "Data frames forwarded",
            table.forwarded_packets,
        );
        counter(
            &mut r,
            "forwarded_bytes",
            "Bytes of data frames forwarded",
            table.forwarded_bytes,
        );
        let mut drops: Vec<(String, u64)> = DropReason::ALL
            .iter()
            .enumerate()
            .map(|(i, r)| (r.label().to_string(), table.drops[i]))
            .collect();
        drops.push(("unknown_protocol".into(), get(&self.unknown_protocol)));
        drops.push(("send_error".into(), get(&self.send_errors)));
        family(
            &mut r,
            "drops",
            "Datagrams not forwarded, by reason",
            "reason",
            drops,
        );
        counter(&mut r, "binds", "Accepted bind frames", table.binds);
        counter(
            &mut r,
            "rebinds",
            "Binds that moved a member to a new address (NAT rebinding)",
            table.rebinds,
        );
        counter(&mut r, "rebind_hints", "Rebind hints sent", table.hints);
        counter(
            &mut r,
            "bind_challenges",
            "Bind challenges sent (address proofs asked for)",
            table.challenges,
        );
        counter(
            &mut r,
            "hints_limited",
            "Rebind hints and bind challenges not sent because of the per-source or global budget",
            table.answers_limited,
        );
        family(
            &mut r,
            "stun_requests",
            "STUN datagrams by outcome",
            "result",
            vec![
                ("success".into(), get(&self.stun_success)),
                ("error".into(), get(&self.stun_error)),
                ("ignored".into(), get(&self.stun_ignored)),
                ("oversized".into(), get(&self.stun_oversized)),
                ("rate_limited".into(), get(&self.stun_limited)),
            ],
        );
        gauge(
            &mut r,
            "registered_peers",
            "Distinct peer keys holding a valid token",
            g.registered_peers,
        );
        gauge(&mut r, "tokens", "Live bearer tokens", g.tokens);
        gauge(&mut r, "parties", "Parties", g.parties);
        gauge(
            &mut r,
            "party_members",
            "Admitted party memberships",
            g.members,
        );
        gauge(
            &mut r,
            "party_applicants",
            "Peers that joined a party and are not admitted by its host (yet)",
            g.applicants,
        );
        let mut http: Vec<(String, u64)> = CODES
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), get(&self.http[i])))
            .collect();
        http.push(("other".into(), get(&self.http[CODES.len()])));
        family(
            &mut r,
            "http_responses",
            "Control-plane answers by status code",
            "code",
            http,
        );
        family(
            &mut r,
            "rate_limited",
            "Control-plane requests refused by rate limits",
            "scope",
            vec![
                ("ip".into(), get(&self.limited_ip)),
                ("token".into(), get(&self.limited_token)),
            ],
        );
        counter(
            &mut r,
            "http_connections_refused",
            "Control-plane connections closed at once by the connection caps",
            get(&self.connections_refused),
        );
        counter(
            &mut r,
            "store_commits",
            "Store batches made durable",
            get(&self.store_commits),
        );
        counter(
            &mut r,
            "store_records",
            "Store records made durable",
            get(&self.store_records),
        );
        counter(
            &mut r,
            "store_compactions",
            "Snapshots written",
            get(&self.store_compactions),
        );
        counter(
            &mut r,
            "store_errors",
            "Store failures",
            get(&self.store_errors),
        );
        r.register(
            "store_blocked",
            "1 while state changes cannot be saved (a failed write waits to be retried; changes are refused)",
            ConstGauge::new(get(&self.store_blocked)),
        );
        gauge(
            &mut r,
            "store_unsaved_records",
            "Changes in memory not yet durable",
            g.unsaved,
        );
        counter(
            &mut r,
            "writes_refused",
            "Control-plane requests refused (503) because state cannot be saved",
            get(&self.writes_refused),
        );
        let mut text = String::with_capacity(8192);
        if let Err(e) = encode(&mut text, &r) {
            // Only a value's formatting can fail; the answer then lacks `# EOF`, so a scraper
            // sees it is incomplete.
            tracing::error!(error = %e, "could not encode metrics");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.stun_success.fetch_add(3, Ordering::Relaxed);
        m.http_response(401);
        m.http_response(418);
        let mut t = TableStats {
            forwarded_packets: 7,
            ..Default::default()
        };
        t.drops[1] = 2;
        let text = m.render(
            &t,
            &Gauges {
                sessions: 4,
                parties: 1,
                ..Default::default()
            },
        );
        assert!(text.contains("lanrage_relay_forwarded_packets_total 7\n"));
        assert!(text.contains("lanrage_relay_drops_total{reason=\"unknown_session\"} 2\n"));
        assert!(text.contains("lanrage_relay_stun_requests_total{result=\"success\"} 3\n"));
        assert!(text.contains("lanrage_relay_http_responses_total{code=\"401\"} 1\n"));
        assert!(text.contains("lanrage_relay_http_responses_total{code=\"other\"} 1\n"));
        assert!(text.contains("lanrage_relay_sessions 4\n"));
        assert!(text.contains("# TYPE lanrage_relay_parties gauge\n"));
        assert!(text.contains("# TYPE lanrage_relay_forwarded_packets counter\n"));
        assert!(text.ends_with("\n# EOF\n"), "{text}");
        // Every sample line is "name{labels} value".
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = line.rsplit_once(' ').unwrap();
            v.parse::<u64>().unwrap();
        }
    }
}
