//! Counters and the Prometheus text for `GET /metrics`.
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

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sessions::{DropReason, TableStats};

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

    /// The Prometheus text exposition.
    pub fn render(&self, table: &TableStats, g: &Gauges) -> String {
        let mut s = String::with_capacity(4096);
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, rows: &[(String, u64)]| {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(s, "{name}{labels} {v}");
            }
        };
        let one = |v: u64| vec![(String::new(), v)];
        metric(
            "lanrage_relay_sessions",
            "gauge",
            "Relay sessions.",
            &one(g.sessions as u64),
        );
        metric(
            "lanrage_relay_sessions_active",
            "gauge",
            "Relay sessions with both members bound.",
            &one(g.sessions_active as u64),
        );
        metric(
            "lanrage_relay_forwarded_packets_total",
            "counter",
            "Data frames forwarded.",
            &one(table.forwarded_packets),
        );
        metric(
            "lanrage_relay_forwarded_bytes_total",
            "counter",
            "Bytes of data frames forwarded.",
            &one(table.forwarded_bytes),
        );
        let mut drops: Vec<(String, u64)> = DropReason::ALL
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("{{reason=\"{}\"}}", r.label()), table.drops[i]))
            .collect();
        drops.push((
            "{reason=\"unknown_protocol\"}".into(),
            get(&self.unknown_protocol),
        ));
        drops.push(("{reason=\"send_error\"}".into(), get(&self.send_errors)));
        metric(
            "lanrage_relay_drops_total",
            "counter",
            "Datagrams not forwarded, by reason.",
            &drops,
        );
        metric(
            "lanrage_relay_binds_total",
            "counter",
            "Accepted bind frames.",
            &one(table.binds),
        );
        metric(
            "lanrage_relay_rebinds_total",
            "counter",
            "Binds that moved a member to a new address (NAT rebinding).",
            &one(table.rebinds),
        );
        metric(
            "lanrage_relay_rebind_hints_total",
            "counter",
            "Rebind hints sent.",
            &one(table.hints),
        );
        metric(
            "lanrage_relay_bind_challenges_total",
            "counter",
            "Bind challenges sent (address proofs asked for).",
            &one(table.challenges),
        );
        metric(
            "lanrage_relay_hints_limited_total",
            "counter",
            "Rebind hints and bind challenges not sent because of the per-source or global budget.",
            &one(table.answers_limited),
        );
        metric(
            "lanrage_relay_stun_requests_total",
            "counter",
            "STUN datagrams by outcome.",
            &[
                ("{result=\"success\"}".into(), get(&self.stun_success)),
                ("{result=\"error\"}".into(), get(&self.stun_error)),
                ("{result=\"ignored\"}".into(), get(&self.stun_ignored)),
                ("{result=\"oversized\"}".into(), get(&self.stun_oversized)),
                ("{result=\"rate_limited\"}".into(), get(&self.stun_limited)),
            ],
        );
        metric(
            "lanrage_relay_registered_peers",
            "gauge",
            "Distinct peer keys holding a valid token.",
            &one(g.registered_peers as u64),
        );
        metric(
            "lanrage_relay_tokens",
            "gauge",
            "Live bearer tokens.",
            &one(g.tokens as u64),
        );
        metric(
            "lanrage_relay_parties",
            "gauge",
            "Parties.",
            &one(g.parties as u64),
        );
        metric(
            "lanrage_relay_party_members",
            "gauge",
            "Admitted party memberships.",
            &one(g.members as u64),
        );
        metric(
            "lanrage_relay_party_applicants",
            "gauge",
            "Peers that joined a party and are not admitted by its host (yet).",
            &one(g.applicants as u64),
        );
        let mut http: Vec<(String, u64)> = CODES
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("{{code=\"{c}\"}}"), get(&self.http[i])))
            .collect();
        http.push(("{code=\"other\"}".into(), get(&self.http[CODES.len()])));
        metric(
            "lanrage_relay_http_responses_total",
            "counter",
            "Control-plane answers by status code.",
            &http,
        );
        metric(
            "lanrage_relay_rate_limited_total",
            "counter",
            "Control-plane requests refused by rate limits.",
            &[
                ("{scope=\"ip\"}".into(), get(&self.limited_ip)),
                ("{scope=\"token\"}".into(), get(&self.limited_token)),
            ],
        );
        metric(
            "lanrage_relay_http_connections_refused_total",
            "counter",
            "Control-plane connections closed at once by the connection caps.",
            &one(get(&self.connections_refused)),
        );
        metric(
            "lanrage_relay_store_commits_total",
            "counter",
            "Store batches made durable.",
            &one(get(&self.store_commits)),
        );
        metric(
            "lanrage_relay_store_records_total",
            "counter",
            "Store records made durable.",
            &one(get(&self.store_records)),
        );
        metric(
            "lanrage_relay_store_compactions_total",
            "counter",
            "Snapshots written.",
            &one(get(&self.store_compactions)),
        );
        metric(
            "lanrage_relay_store_errors_total",
            "counter",
            "Store failures.",
            &one(get(&self.store_errors)),
        );
        metric(
            "lanrage_relay_store_blocked",
            "gauge",
            "1 while state changes cannot be saved (a failed write waits to be retried; changes are refused).",
            &one(get(&self.store_blocked)),
        );
        metric(
            "lanrage_relay_store_unsaved_records",
            "gauge",
            "Changes in memory not yet durable.",
            &one(g.unsaved as u64),
        );
        metric(
            "lanrage_relay_writes_refused_total",
            "counter",
            "Control-plane requests refused (503) because state cannot be saved.",
            &one(get(&self.writes_refused)),
        );
        s
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
        // Every sample line is "name{labels} value".
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = line.rsplit_once(' ').unwrap();
            v.parse::<u64>().unwrap();
        }
    }
}
