//! `GET /metrics`: the published [`Snapshot`] as OpenMetrics text, for Prometheus.
//!
//! Built with `prometheus-client` (the Prometheus project's Rust client): a fresh registry per
//! scrape, filled from the snapshot, so the series of a member who left disappear with it, and
//! label values that come from the network are escaped by the crate. Series:
//!
//! - `lanrage_peer_latency_seconds{peer}` (gauge; members with a measured path only),
//!   `lanrage_peer_rx_bytes_total{peer}`, `lanrage_peer_tx_bytes_total{peer}`,
//!   `lanrage_peer_rx_packets_total{peer}`, `lanrage_peer_tx_packets_total{peer}`: one per member
//!   other than this node; `peer` is the member's node id (names collide and are chosen by
//!   the members, ids are not);
//! - `lanrage_peers{connection}`: members other than this node by path (`direct`, `relayed`,
//!   `connecting`, `failed`, each present even at 0);
//! - `lanrage_handshakes_total`: completed WireGuard handshakes;
//! - `lanrage_drops_total{reason}`: packets and messages dropped, one `reason` per status
//!   counter in [`DROP_COUNTERS`] that this daemon has (mDNS ones only with mDNS on, control
//!   ones once they happened);
//! - `lanrage_broadcast_forwarded_total{kind}`, `lanrage_broadcast_dropped_total{kind,reason}`.
//!
//! The text is OpenMetrics 1.0 (see [`CONTENT_TYPE`] for why). It exposes member ids and
//! traffic figures, never names; anyone who can reach the listener can read it.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

use super::{ApiError, Snapshot, Snapshots};

/// The content type of the answer. OpenMetrics 1.0 is the first format in Prometheus' default
/// `scrape_protocols` (it asks for it before the 0.0.4 text), what `prometheus-client` writes
/// natively, and its `# EOF` line lets a scraper tell a cut-off answer from a complete one.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The status counters that count something dropped (the `reason` of `lanrage_drops_total`):
/// the datapath's (garbage, WireGuard packets that fail, packets with a source or destination
/// that is not the member's, unroutable packets), discovery's, the path layer's and NAT
/// detection's refused probes and answers, and control datagrams the seal layer refused.
pub const DROP_COUNTERS: &[&str] = &[
    "udp_garbage",
    "wg_invalid",
    "wg_unknown_peer",
    "bad_source",
    "bad_destination",
    "control_dropped",
    "stun_ignored",
    "relay_no_route",
    "relay_unexpected",
    "roam_dropped",
    "no_route",
    "not_ipv4",
    "no_endpoint",
    "mdns_rate_limited",
    "mdns_malformed",
    "mdns_wrong_port",
    "mdns_instances_refused",
    "mdns_queue_dropped",
    "discovery_file_dropped",
    "path_probe_malformed",
    "path_probe_unknown_key",
    "path_probe_bad_mac",
    "path_probe_unexpected",
    "path_relay_ignored",
    "path_queue_dropped",
    "nat_malformed",
    "nat_dropped",
    "control_bad_header",
    "control_rate_limited",
    "control_weak_key",
    "control_auth_failed",
    "control_replayed",
    "control_malformed",
    "control_other_version",
];

/// The `connection` values of `lanrage_peers` always present (0 included), so a dashboard sees
/// "0 relayed" rather than no data. Other values a future status may use are added as seen.
pub const CONNECTIONS: &[&str] = &["direct", "relayed", "connecting", "failed"];

/// One label: name and value.
type Labels<const N: usize> = [(&'static str, String); N];
/// A counter family keyed by one label.
type Counters1 = Family<Labels<1>, Counter>;

/// The OpenMetrics text for `snapshot` (always ends with `# EOF`).
pub fn render(snapshot: &Snapshot) -> String {
    let status = &snapshot.status;
    let mut registry = Registry::with_prefix("lanrage");

    let latency = Family::<Labels<1>, Gauge<f64, AtomicU64>>::default();
    let [rx_bytes, tx_bytes, rx_packets, tx_packets] = [(); 4].map(|_| Counters1::default());
    let peers = Family::<Labels<1>, Gauge>::default();
    for connection in CONNECTIONS {
        peers
            .get_or_create(&[("connection", connection.to_string())])
            .set(0);
    }
    let members = status.party.iter().flat_map(|p| p.peers.iter());
    for peer in members.filter(|p| p.id != status.node.id && p.connection != "self") {
        let id = [("peer", peer.id.clone())];
        if let Some(ms) = peer.latency_ms.filter(|ms| ms.is_finite()) {
            latency.get_or_create(&id).set(ms / 1000.0);
        }
        rx_bytes.get_or_create(&id).inc_by(peer.rx_bytes);
        tx_bytes.get_or_create(&id).inc_by(peer.tx_bytes);
        rx_packets.get_or_create(&id).inc_by(peer.rx_packets);
        tx_packets.get_or_create(&id).inc_by(peer.tx_packets);
        peers
            .get_or_create(&[("connection", peer.connection.clone())])
            .inc();
    }
    registry.register_with_unit(
        "peer_latency",
        "Smoothed round-trip time to the member on the path in use",
        Unit::Seconds,
        latency,
    );
    registry.register_with_unit(
        "peer_rx",
        "Payload bytes received from the member through the tunnel",
        Unit::Bytes,
        rx_bytes,
    );
    registry.register_with_unit(
        "peer_tx",
        "Payload bytes sent to the member through the tunnel",
        Unit::Bytes,
        tx_bytes,
    );
    registry.register(
        "peer_rx_packets",
        "Packets received from the member through the tunnel",
        rx_packets,
    );
    registry.register(
        "peer_tx_packets",
        "Packets sent to the member through the tunnel",
        tx_packets,
    );
    registry.register(
        "peers",
        "Party members other than this node, by path (direct, relayed, connecting, failed)",
        peers,
    );

    let handshakes = Counter::<u64>::default();
    handshakes.inc_by(status.counters.get("wg_handshakes").copied().unwrap_or(0));
    registry.register(
        "handshakes",
        "Completed WireGuard handshakes with members",
        handshakes,
    );

    let drops = Counters1::default();
    for reason in DROP_COUNTERS {
        if let Some(n) = status.counters.get(*reason) {
            drops
                .get_or_create(&[("reason", reason.to_string())])
                .inc_by(*n);
        }
    }
    registry.register(
        "drops",
        "Packets and messages dropped, by reason (the status counter of that name)",
        drops,
    );

    let forwarded = Counters1::default();
    for (kind, n) in &status.broadcast.forwarded_total {
        forwarded
            .get_or_create(&[("kind", kind.clone())])
            .inc_by(*n);
    }
    registry.register(
        "broadcast_forwarded",
        "Broadcast and multicast packets forwarded into and out of the party, by kind",
        forwarded,
    );
    let dropped = Family::<Labels<2>, Counter>::default();
    for (kind, reasons) in &status.broadcast.dropped_total {
        for (reason, n) in reasons {
            dropped
                .get_or_create(&[("kind", kind.clone()), ("reason", reason.clone())])
                .inc_by(*n);
        }
    }
    registry.register(
        "broadcast_dropped",
        "Broadcast and multicast packets not forwarded, by kind and reason",
        dropped,
    );

    let mut text = String::with_capacity(4096);
    if let Err(e) = encode(&mut text, &registry) {
        // Writing into a String fails only if a value's formatting does; say so rather than
        // serve a partial exposition as if it were whole (it lacks `# EOF`).
        tracing::error!(error = %e, "could not encode metrics");
    }
    text
}

/// The `GET /metrics` answer from the latest snapshot: 503 before the daemon published one.
pub fn respond(snapshots: &Snapshots) -> Response {
    let Some(snapshot) = snapshots.borrow().clone() else {
        return ApiError {
            status: 503,
            message: "no metrics yet: the daemon is starting".into(),
            code: None,
        }
        .into_response();
    };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
        render(&snapshot),
    )
        .into_response()
}

/// Connections the metrics port serves at once; more are closed at once (a scraper needs one).
pub const MAX_CONNECTIONS: usize = 16;
/// How long one connection may take, from accept to the end of the answer (one request each).
pub const CONNECTION_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves [`only_metrics`] on `listener` (`[metrics] listen`) until the task is aborted. The
/// port faces the LAN: at most [`MAX_CONNECTIONS`] connections, one request each, each done
/// within [`CONNECTION_DEADLINE`], so idle connections cannot eat the daemon's file descriptors.
pub async fn serve(listener: tokio::net::TcpListener, snapshots: Snapshots) {
    let app = only_metrics(snapshots);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                tracing::debug!(error = %e, "metrics: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closed at once
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, connection).await;
            drop(slot);
        });
    }
}

/// `GET /metrics` and nothing else. Any Host (remote scrapers name this host as they know it),
/// but never a browser: a request with an `Origin` or any `Sec-Fetch-*` header (which browsers
/// add to every request, also after DNS rebinding makes a page "same-origin" with this port) is
/// refused, so a web page a browser on the LAN visits cannot read member ids and traffic.
pub fn only_metrics(snapshots: Snapshots) -> axum::Router {
    axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move |headers: axum::http::HeaderMap| {
                let snapshots = snapshots.clone();
                async move {
                    if from_a_browser(&headers) {
                        return ApiError {
                            status: 403,
                            message: "browsers may not read this port; scrape it with Prometheus"
                                .into(),
                            code: None,
                        }
                        .into_response();
                    }
                    respond(&snapshots)
                }
            }),
        )
        .fallback(|| async { ApiError::not_found("only /metrics is served here") })
}

/// Whether a request carries what browsers add and scrapers do not.
fn from_a_browser(headers: &axum::http::HeaderMap) -> bool {
    headers.contains_key(header::ORIGIN)
        || headers.keys().any(|k| k.as_str().starts_with("sec-fetch-"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{NodeView, PartyView, PeerView, StatusView};
    use std::collections::{BTreeMap, HashMap};

    fn peer(id: &str, connection: &str) -> PeerView {
        PeerView {
            id: id.into(),
            name: format!("name-of-{id}"),
            virtual_ip: "10.66.0.2".into(),
            connection: connection.into(),
            relay: None,
            endpoint: None,
            latency_ms: None,
            last_handshake_secs: None,
            rx_bytes: 0,
            tx_bytes: 0,
            rx_packets: 0,
            tx_packets: 0,
        }
    }

    /// This node (`me`) in a party with `others`.
    fn snapshot(others: Vec<PeerView>) -> Snapshot {
        let mut peers = vec![peer("me", "self")];
        peers.extend(others);
        Snapshot {
            status: StatusView {
                node: NodeView {
                    id: "me".into(),
                    name: "alice".into(),
                    public_key: "k".into(),
                    virtual_ip: Some("10.66.0.1".into()),
                    nat_type: "unknown".into(),
                    public_endpoint: None,
                    control_server: None,
                    control_error: None,
                },
                party: Some(PartyView {
                    id: "p".into(),
                    name: "lan".into(),
                    host_id: "me".into(),
                    protected: false,
                    peers,
                }),
                joining: None,
                counters: HashMap::new(),
                broadcast: Default::default(),
            },
            parties: Vec::new(),
        }
    }

    /// Every line, for exact-line checks (series order within a family is not fixed).
    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn renders_every_series_from_the_snapshot() {
        let mut bob = peer("bob", "direct");
        bob.latency_ms = Some(12.5);
        bob.rx_bytes = 1000;
        bob.tx_bytes = 2000;
        bob.rx_packets = 10;
        bob.tx_packets = 20;
        let carol = peer("carol", "relayed");
        let mut s = snapshot(vec![bob, carol]);
        s.status.counters = HashMap::from([
            ("wg_handshakes".into(), 3),
            ("udp_garbage".into(), 4),
            ("mdns_malformed".into(), 5),
            ("tx_packets".into(), 99), // traffic, not a drop
        ]);
        s.status.broadcast.forwarded_total = BTreeMap::from([("broadcast".into(), 7)]);
        s.status.broadcast.dropped_total = BTreeMap::from([(
            "multicast".into(),
            BTreeMap::from([("rate_limited".into(), 2)]),
        )]);
        let text = render(&s);
        let lines = lines(&text);
        for want in [
            "# TYPE lanrage_peer_latency_seconds gauge",
            "# UNIT lanrage_peer_latency_seconds seconds",
            "lanrage_peer_latency_seconds{peer=\"bob\"} 0.0125",
            "# TYPE lanrage_peer_rx_bytes counter",
            "lanrage_peer_rx_bytes_total{peer=\"bob\"} 1000",
            "lanrage_peer_tx_bytes_total{peer=\"bob\"} 2000",
            "lanrage_peer_rx_packets_total{peer=\"bob\"} 10",
            "lanrage_peer_tx_packets_total{peer=\"bob\"} 20",
            "lanrage_peer_rx_packets_total{peer=\"carol\"} 0",
            "# TYPE lanrage_peers gauge",
            "lanrage_peers{connection=\"direct\"} 1",
            "lanrage_peers{connection=\"relayed\"} 1",
            "lanrage_peers{connection=\"connecting\"} 0",
            "lanrage_peers{connection=\"failed\"} 0",
            "# TYPE lanrage_handshakes counter",
            "lanrage_handshakes_total 3",
            "lanrage_drops_total{reason=\"udp_garbage\"} 4",
            "lanrage_drops_total{reason=\"mdns_malformed\"} 5",
            "lanrage_broadcast_forwarded_total{kind=\"broadcast\"} 7",
            "lanrage_broadcast_dropped_total{kind=\"multicast\",reason=\"rate_limited\"} 2",
        ] {
            assert!(lines.contains(&want), "no line {want:?} in\n{text}");
        }
        // This node is no peer; carol has no latency yet; traffic counters are not drops.
        assert!(!text.contains("peer=\"me\""), "{text}");
        assert!(!text.contains("connection=\"self\""), "{text}");
        assert!(!text.contains("lanrage_peer_latency_seconds{peer=\"carol\"}"));
        assert!(!text.contains("tx_packets\"}"), "{text}");
        // Names never appear, only ids.
        assert!(!text.contains("name-of-"), "{text}");
        assert_eq!(lines.last(), Some(&"# EOF"));
    }

    #[test]
    fn a_departed_member_has_no_series() {
        let text = render(&snapshot(vec![
            peer("bob", "direct"),
            peer("carol", "direct"),
        ]));
        assert!(text.contains("peer=\"carol\""), "{text}");
        assert!(text.contains("lanrage_peers{connection=\"direct\"} 2\n"));
        let text = render(&snapshot(vec![peer("bob", "direct")]));
        assert!(!text.contains("carol"), "{text}");
        assert!(text.contains("lanrage_peers{connection=\"direct\"} 1\n"));
        // Out of any party: the families are there, empty, and the peers gauge says 0.
        let mut s = snapshot(Vec::new());
        s.status.party = None;
        let text = render(&s);
        assert!(!text.contains("peer=\""), "{text}");
        assert!(text.contains("lanrage_peers{connection=\"direct\"} 0\n"));
        assert!(text.contains("lanrage_handshakes_total 0\n"));
    }

    #[test]
    fn label_values_from_the_network_are_escaped() {
        // A member id is ours to check elsewhere, but whatever reaches the label must not
        // break out of it: quotes, backslashes and newlines are escaped.
        let hostile = "x\"} 1\nlanrage_evil{a=\"\\";
        let text = render(&snapshot(vec![peer(hostile, "direct\n")]));
        assert!(
            text.contains(r#"lanrage_peer_rx_bytes_total{peer="x\"} 1\nlanrage_evil{a=\"\\"} 0"#),
            "{text}"
        );
        assert!(text.contains(r#"lanrage_peers{connection="direct\n"} 1"#));
        assert!(
            !text.lines().any(|l| l.starts_with("lanrage_evil")),
            "{text}"
        );
        assert_parses(&text);
    }

    /// OpenMetrics text as a scraper reads it: metadata lines, then `name{labels} value`
    /// samples of declared families, and `# EOF` last, once.
    fn assert_parses(text: &str) {
        let mut families = Vec::new();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.last(), Some(&"# EOF"), "{text}");
        for line in &lines[..lines.len() - 1] {
            if let Some(meta) = line.strip_prefix("# ") {
                let mut parts = meta.splitn(3, ' ');
                let kind = parts.next().unwrap();
                assert!(["HELP", "TYPE", "UNIT"].contains(&kind), "{line}");
                if kind == "TYPE" {
                    families.push(parts.next().unwrap().to_owned());
                }
                continue;
            }
            // The value is after the last space outside the label braces.
            let end_labels = line.rfind('}').unwrap_or(0);
            let (series, value) = line[end_labels..].rsplit_once(' ').unwrap();
            let series = &line[..end_labels + series.len()];
            value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
            let name = series.split('{').next().unwrap();
            assert!(
                families
                    .iter()
                    .any(|f| name == f || name.strip_suffix("_total") == Some(f)),
                "sample {name} of no declared family"
            );
        }
    }

    #[test]
    fn output_parses() {
        let mut bob = peer("bob", "direct");
        bob.latency_ms = Some(0.25);
        assert_parses(&render(&snapshot(vec![bob])));
    }

    async fn get(app: &axum::Router, path: &str, host: &str) -> (StatusCode, String) {
        use tower::ServiceExt;
        let req = axum::http::Request::get(path)
            .header(header::HOST, host)
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn served_without_login_on_the_api_and_alone_on_the_metrics_listener() {
        let (_tx, rx) =
            tokio::sync::watch::channel(Some(std::sync::Arc::new(snapshot(vec![peer(
                "bob", "direct",
            )]))));
        let (api_tx, _api_rx) = tokio::sync::mpsc::channel(1);
        let token = crate::api::auth::ApiToken::generate();
        let auth = std::sync::Arc::new(crate::api::auth::Auth::new(token, 8666));
        let api = crate::api::router("127.0.0.1:8666".parse().unwrap(), api_tx, rx.clone(), auth);
        let (code, text) = get(&api, "/metrics", "127.0.0.1:8666").await;
        assert_eq!(code, 200, "{text}");
        assert!(text.contains("lanrage_peer_rx_packets_total{peer=\"bob\"} 0\n"));
        // The API keeps its Host guard (DNS rebinding) for /metrics too.
        assert_eq!(get(&api, "/metrics", "evil.example:8666").await.0, 403);
        // The metrics listener takes any Host and serves nothing else.
        let only = only_metrics(rx);
        let (code, text) = get(&only, "/metrics", "lanrage-host.lan:9666").await;
        assert_eq!(code, 200);
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(get(&only, "/status", "192.0.2.10:9666").await.0, 404);
        // A browser (DNS rebinding, or any page) is refused; a scraper by name is not.
        for (name, value) in [
            ("origin", "http://evil.example"),
            ("sec-fetch-site", "same-origin"),
            ("sec-fetch-mode", "cors"),
        ] {
            let req = axum::http::Request::builder()
                .uri("/metrics")
                .header("host", "192.0.2.10:9666")
                .header(name, value)
                .body(axum::body::Body::empty())
                .unwrap();
            let resp = tower::ServiceExt::oneshot(only.clone(), req).await.unwrap();
            assert_eq!(resp.status(), 403, "{name}");
        }
        assert_eq!(get(&only, "/", "192.0.2.10:9666").await.0, 404);
    }

    #[tokio::test]
    async fn answers_503_before_the_first_snapshot_then_the_text() {
        let (tx, rx) = tokio::sync::watch::channel(None);
        let resp = respond(&rx);
        assert_eq!(resp.status(), 503);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&body).contains("starting"));
        tx.send_replace(Some(std::sync::Arc::new(snapshot(vec![peer(
            "bob", "direct",
        )]))));
        let resp = respond(&rx);
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&body).contains("peer=\"bob\""));
    }
}
