//! `GET /metrics` across a real network: two daemons in a party (one namespace each), traffic
//! between them, the host's metrics read on its API and, through `[metrics] listen`, from a
//! third namespace that cannot reach the API.
//!
//! Needs root, iproute2 and iputils-ping; skipped with a message otherwise, except under CI.

mod lab;

use std::time::Duration;

use lab::*;

/// Where alice serves metrics for other hosts: her LAN address.
fn metrics_listen() -> String {
    format!("{}:9666", underlay_ip(0))
}

/// The value of the sample line that starts with `series ` (exact name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `GET /metrics` at `addr` from inside host `i`: (status code, content type, body).
fn scrape(lab: &Lab, i: usize, addr: String) -> (u16, String, String) {
    lab.in_host(i, move || {
        let r = http_request_full(&addr, "GET", "/metrics", &[], None)
            .unwrap_or_else(|e| panic!("GET http://{addr}/metrics: {e}"));
        let ct = r.header("content-type").unwrap_or_default().to_owned();
        (r.code, ct, r.body)
    })
}

#[test]
fn a_member_s_traffic_shows_in_metrics_and_its_series_go_when_it_leaves() {
    let Some(mut lab) = Lab::new("metrics", 3) else {
        return;
    };
    lab.spawn(
        0,
        NodeOpts::new(NAMES[0]).env("LANRAGE__METRICS__LISTEN", &metrics_listen()),
    );
    lab.spawn(1, NodeOpts::new(NAMES[1]));
    let (alice, bob) = (lab.node(0), lab.node(1));
    let party = alice.create_party("metrics-night", None);
    assert!(
        wait_until(Duration::from_secs(10), || bob
            .listed_party(&party)
            .is_some()),
        "bob does not see alice's party"
    );
    bob.join_ok(&party, None);
    assert!(
        bob.ping_within(HOST_VIP, Duration::from_secs(10)),
        "bob cannot ping alice through the party"
    );
    let bob_id = bob.id();
    let rx = format!("lanrage_peer_rx_packets_total{{peer=\"{bob_id}\"}}");
    let tx = format!("lanrage_peer_tx_packets_total{{peer=\"{bob_id}\"}}");

    // On the API (loopback, no login): bob's packets arrived, over a direct path.
    let text = wait_for(Duration::from_secs(10), || {
        let (code, _, text) = scrape(&lab, 0, API.to_owned());
        let ok = code == 200
            && sample(&text, &rx).is_some_and(|n| n > 0.0)
            && sample(&text, &tx).is_some_and(|n| n > 0.0)
            && sample(&text, "lanrage_peers{connection=\"direct\"}") == Some(1.0);
        ok.then_some(text)
    })
    .unwrap_or_else(|| {
        let (code, _, text) = scrape(&lab, 0, API.to_owned());
        panic!("no traffic from bob ({bob_id}) in alice's metrics ({code}):\n{text}")
    });
    for series in [
        format!("lanrage_peer_rx_bytes_total{{peer=\"{bob_id}\"}}"),
        format!("lanrage_peer_tx_bytes_total{{peer=\"{bob_id}\"}}"),
        "lanrage_handshakes_total".to_owned(),
    ] {
        assert!(
            sample(&text, &series).is_some_and(|n| n > 0.0),
            "{series} in\n{text}"
        );
    }
    assert!(
        sample(
            &text,
            &format!("lanrage_peer_latency_seconds{{peer=\"{bob_id}\"}}")
        )
        .is_some_and(|s| s > 0.0 && s < 1.0),
        "latency in\n{text}"
    );
    assert_eq!(
        sample(&text, "lanrage_peers{connection=\"relayed\"}"),
        Some(0.0)
    );
    assert!(
        !text.contains(&alice.id()),
        "alice is no peer of hers:\n{text}"
    );
    assert!(!text.contains("bob"), "names are not exposed:\n{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");

    // From another host: the metrics listener answers (any Host header), the API is not there.
    let (code, content_type, remote) = scrape(&lab, 2, metrics_listen());
    assert_eq!(code, 200, "{remote}");
    assert!(
        content_type.starts_with("application/openmetrics-text; version=1.0.0"),
        "{content_type}"
    );
    assert!(sample(&remote, &rx).is_some_and(|n| n > 0.0), "{remote}");
    let listen = metrics_listen();
    let (status, api) = lab.in_host(2, move || {
        let status = http_request(&listen, "GET", "/status", &[], None).map(|r| r.0);
        let api = http_request(
            &format!("{}:8666", underlay_ip(0)),
            "GET",
            "/status",
            &[],
            None,
        );
        (status.ok(), api.map(|r| r.0).map_err(|e| e.kind()))
    });
    assert_eq!(
        status,
        Some(404),
        "the metrics listener serves only /metrics"
    );
    assert!(
        api.is_err(),
        "the API must not be reachable from the LAN: {api:?}"
    );

    // Bob leaves: his series are gone from alice's metrics within seconds.
    bob.leave();
    let gone = wait_until(Duration::from_secs(6), || {
        let (_, _, text) = scrape(&lab, 0, API.to_owned());
        !text.contains(&bob_id)
            && sample(&text, "lanrage_peers{connection=\"direct\"}") == Some(0.0)
    });
    let (_, _, text) = scrape(&lab, 0, metrics_listen());
    assert!(
        gone,
        "bob's series still in alice's metrics after he left:\n{text}"
    );
    assert!(!text.contains(&bob_id), "{text}");
}
