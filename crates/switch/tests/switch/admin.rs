//! The admin listener over real HTTP: `/health` and `/metrics`.

use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves `switch`'s admin endpoints on a port of their own; the token stops it.
async fn admin_of(switch: &Arc<Switch>) -> (String, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    tokio::spawn(switch::admin::serve(listener, switch.clone(), stop.clone()));
    (addr, stop)
}

/// One HTTP/1.1 request, written by hand: status code and body.
async fn get(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a whole response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// The value of one sample line of `/metrics` (`name{labels}` exactly).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    })
}

#[tokio::test]
async fn metrics_count_what_the_terminals_were_answered() {
    let w = world().await;
    let (admin, _stop) = admin_of(&w.switch).await;
    let mut t = w.signed_on("T0000015").await;
    let stan = t.next_stan();
    let first = t.purchase(stan, CARD, EXPIRY, 100).unwrap();
    assert_eq!(t.exchange(&first).await.unwrap().rc(), "00");
    // Its repeat, answered with the stored reply, counts with its code.
    assert_eq!(t.exchange(&first).await.unwrap().rc(), "00");
    // Over the card's single-transaction limit (the issuer's 61).
    let stan = t.next_stan();
    let r = t
        .exchange(&t.purchase(stan, CARD, EXPIRY, 600_000).unwrap())
        .await
        .unwrap();
    let declined = r.rc().to_string();
    assert_ne!(declined, "00");
    let (status, m) = get(&admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(&m, r#"switchyard_requests_total{kind="purchase",rc="00"}"#),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            &format!(r#"switchyard_requests_total{{kind="purchase",rc="{declined}"}}"#)
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, r#"switchyard_requests_total{kind="sign_on",rc="00"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "switchyard_request_duration_seconds_count"),
        Some(4.0)
    );
    assert_eq!(sample(&m, "switchyard_terminal_connections"), Some(1.0));
    assert_eq!(
        sample(&m, r#"switchyard_issuer_link_up{issuer="sim"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, r#"switchyard_advices{state="pending"}"#),
        Some(0.0)
    );
    assert!(
        sample(&m, "switchyard_journal_writes_total").unwrap() >= 3.0,
        "{m}"
    );
    assert!(m.ends_with("# EOF\n"), "OpenMetrics text: {m}");
    assert!(!m.contains(CARD), "no card data");
    drop(t);
    // The connection gauge follows the terminal away.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, m) = get(&admin, "GET", "/metrics").await;
        if sample(&m, "switchyard_terminal_connections") == Some(0.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connection still counted: {m}"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn health_says_what_the_switch_can_serve() {
    let w = world().await;
    let (admin, _stop) = admin_of(&w.switch).await;
    let (status, body) = get(&admin, "GET", "/health").await;
    assert_eq!(status, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["database"], "ok");
    assert_eq!(h["issuers"]["sim"], "up");
    assert_eq!(get(&admin, "POST", "/health").await.0, 405);
    assert_eq!(get(&admin, "GET", "/").await.0, 404);

    // A second issuer nobody answers for: the switch still serves the first's cards.
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let nowhere = gone.local_addr().unwrap().to_string();
    drop(gone);
    let (two, _addr, two_stop) = w
        .another_switch_with(|c| {
            let mut other = c.issuers[0].clone();
            other.name = "gone".into();
            other.bins = vec!["9".into()];
            other.address = nowhere.clone();
            c.issuers.push(other);
        })
        .await;
    let (admin2, _stop2) = admin_of(&two).await;
    let (status, body) = get(&admin2, "GET", "/health").await;
    assert_eq!(status, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["status"], "degraded");
    assert_eq!(h["issuers"]["gone"], "down");

    // A switch whose only issuer is away: not serving terminals yet, then
    // serving what needs no issuer (reversals, refunds, settlements).
    let shutdown = CancellationToken::new();
    let config = switch_config(&nowhere, |_| {});
    let pool = switch::connect(&w.url, 2).await.unwrap();
    let lonely = switch::start(
        Arc::new(config),
        pool,
        w.switch.key.clone(),
        None,
        &shutdown,
    )
    .await
    .unwrap();
    let (admin3, _stop3) = admin_of(&lonely).await;
    let (status, body) = get(&admin3, "GET", "/health").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"starting\""), "{body}");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let serving = tokio::spawn(switch::run(listener, lonely.clone(), shutdown.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let body = loop {
        let (status, body) = get(&admin3, "GET", "/health").await;
        if status == 200 {
            break body;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::task::yield_now().await;
    };
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["status"], "degraded", "{body}");
    assert_eq!(h["issuers"]["sim"], "down", "{body}");
    let (_, m) = get(&admin3, "GET", "/metrics").await;
    assert_eq!(sample(&m, "switchyard_database_up"), Some(1.0), "{m}");
    assert_eq!(
        sample(&m, r#"switchyard_build_info{version="0.1.0"}"#),
        Some(1.0),
        "{m}"
    );

    // Stopping: a load balancer must send no new terminal there.
    two_stop.cancel();
    let (status, body) = get(&admin2, "GET", "/health").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"stopping\""), "{body}");
    shutdown.cancel();
    serving.await.unwrap();
}

#[tokio::test]
async fn without_its_database_metrics_still_answer_and_health_says_failing() {
    let w = world().await;
    // A switch on a database that is going away: its own, dropped under it.
    let url = embedded_pg::test_database().await;
    let shutdown = CancellationToken::new();
    let (lonely, _addr, _run) = start_switch(
        &url,
        switch_config(&w.issuer_addr, |_| {}),
        w.switch.key.clone(),
        &shutdown,
    )
    .await;
    let (admin, _stop) = admin_of(&lonely).await;
    let (_, m) = get(&admin, "GET", "/metrics").await;
    assert_eq!(
        sample(&m, r#"switchyard_advices{state="pending"}"#),
        Some(0.0)
    );
    lonely.pool.close().await;
    // Past the second the last look is kept for.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (status, body) = get(&admin, "GET", "/health").await;
        if status == 503 {
            break body;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(body.contains("\"failing\""), "{body}");
    let (status, m) = get(&admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(sample(&m, "switchyard_database_up"), Some(0.0), "{m}");
    assert!(
        !m.contains("switchyard_advices{"),
        "no stale queue figures: {m}"
    );
    assert_eq!(
        sample(&m, r#"switchyard_issuer_link_up{issuer="sim"}"#),
        Some(1.0)
    );
    shutdown.cancel();
}
