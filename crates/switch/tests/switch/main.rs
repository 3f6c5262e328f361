//! The switch end to end: simulated terminals over real TCP, the switch, the
//! simulated issuer over real TCP, both on a real PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use iso8583::{Dialect, Mti};
use loadgen::{Field, Terminal};
use sqlx::PgPool;
use switch::config::{Config, Issuer as IssuerRoute};
use switch::{PanHashKey, Switch};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod admin;
mod fleet;
mod k3;
mod model;
mod related;

const MERCHANT: &str = "898310048160001";
const CARD: &str = "6222020000000000001";
const EXPIRY: &str = "3012";

/// One world: a database, an issuer and a switch.
struct World {
    url: String,
    pool: PgPool,
    issuer_pool: PgPool,
    issuer: Arc<issuer_sim::Issuer>,
    issuer_key: issuer_sim::PanKey,
    issuer_addr: String,
    switch_addr: String,
    switch: Arc<Switch>,
    dialect: Arc<Dialect>,
    shutdown: CancellationToken,
    run: Option<tokio::task::JoinHandle<bool>>,
}

/// Every log line of every test in this binary, at debug level, so a test
/// can prove no clear PAN is ever logged.
static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct Captured;

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(|| Captured)
            .with_ansi(false)
            .init();
    });
}

const CARDS: &str = r#"
[[cards]]
first = "6222020000000000001"
last = "6222020000000000100"
expiry = "3012"
balance = 1000000
limit = 500000

[[cards]]
first = "6222020000000000200"
last = "6222020000000000200"
expiry = "2001"
balance = 1000000

[[cards]]
first = "6222020000000000300"
last = "6222020000000000300"
expiry = "3012"
balance = 500
"#;

const FLEET: &str = r#"
[[merchants]]
id = "898310048160001"
name = "Switchyard Test Store"

[[merchants]]
id = "898310048160002"
name = "Closed Store"
enabled = false

[[terminals]]
first = "T0000001"
last = "T0000020"
merchant = "898310048160001"

[[terminals]]
id = "T0000099"
merchant = "898310048160001"
enabled = false

[[terminals]]
id = "T0000098"
merchant = "898310048160002"
"#;

/// An issuer on `url`, its connections with `settings` (PostgreSQL's).
async fn start_issuer(
    url: &str,
    settings: &[(&str, &str)],
) -> (
    Arc<issuer_sim::Issuer>,
    issuer_sim::PanKey,
    String,
    PgPool,
    CancellationToken,
) {
    let config = issuer_sim::IssuerConfig::from_toml(CARDS, "test-issuer.toml").unwrap();
    let options = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(url)
        .unwrap()
        .options(settings.iter().copied());
    let pool = PgPool::connect_with(options).await.unwrap();
    issuer_sim::migrate(&pool).await.unwrap();
    let key = issuer_sim::PanKey::random();
    issuer_sim::seed_cards(&pool, &key, &config.cards)
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let issuer = Arc::new(issuer_sim::Issuer::new(config, key.clone(), pool.clone()));
    let stop = CancellationToken::new();
    tokio::spawn(issuer_sim::run(listener, issuer.clone(), stop.clone()));
    (issuer, key, addr, pool, stop)
}

fn switch_config(issuer_addr: &str, tweak: impl FnOnce(&mut Config)) -> Config {
    let mut config = Config::default();
    // A second of planning per switch would triple the suite's time; one
    // test plans ahead.
    config.database.plan_ahead = false;
    config.rules.issuer_timeout = Duration::from_millis(1500);
    config.advice.retry_initial = Duration::from_millis(100);
    config.advice.retry_max = Duration::from_millis(400);
    config.advice.poll_interval = Duration::from_millis(100);
    config.issuers = vec![IssuerRoute {
        name: "sim".into(),
        bins: vec!["622202".into()],
        address: issuer_addr.to_string(),
        connections: 1,
        echo_interval: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(2),
        reconnect_max: Duration::from_millis(200),
    }];
    tweak(&mut config);
    config
}

/// Starts a switch on `url` and returns its address.
async fn start_switch(
    url: &str,
    config: Config,
    key: PanHashKey,
    shutdown: &CancellationToken,
) -> (Arc<Switch>, String, tokio::task::JoinHandle<bool>) {
    start_switch_keyed(url, config, key, None, shutdown).await
}

/// [`start_switch`] handing out terminal working keys derived from
/// `terminal_keys` (K3).
async fn start_switch_keyed(
    url: &str,
    config: Config,
    key: PanHashKey,
    terminal_keys: Option<switch::DerivationKey>,
    shutdown: &CancellationToken,
) -> (Arc<Switch>, String, tokio::task::JoinHandle<bool>) {
    let pool = switch::connect(url, 8).await.unwrap();
    let switch = switch::start(Arc::new(config), pool.clone(), key, terminal_keys, shutdown)
        .await
        .unwrap();
    switch::terminals::Fleet::parse(FLEET, "fleet.toml")
        .unwrap()
        .store(&pool)
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let run = tokio::spawn(switch::run(listener, switch.clone(), shutdown.clone()));
    assert!(
        switch.links[0].wait_up(Duration::from_secs(5)).await,
        "issuer link up"
    );
    (switch, addr, run)
}

async fn world_with(tweak: impl FnOnce(&mut Config)) -> World {
    world_on(tweak, &[]).await
}

/// A world whose issuer's connections have PostgreSQL `settings`.
async fn world_on(tweak: impl FnOnce(&mut Config), issuer_settings: &[(&str, &str)]) -> World {
    world_of(tweak, issuer_settings, None).await
}

/// A world whose switch hands out terminal working keys (K3).
async fn keyed_world(kdk: &switch::DerivationKey) -> World {
    world_of(|_| {}, &[], Some(kdk.clone())).await
}

async fn world_of(
    tweak: impl FnOnce(&mut Config),
    issuer_settings: &[(&str, &str)],
    terminal_keys: Option<switch::DerivationKey>,
) -> World {
    capture_logs();
    let url = embedded_pg::test_database().await;
    let (issuer, issuer_key, issuer_addr, issuer_pool, _stop) =
        start_issuer(&url, issuer_settings).await;
    let shutdown = CancellationToken::new();
    let config = switch_config(&issuer_addr, tweak);
    let (switch, switch_addr, run) = start_switch_keyed(
        &url,
        config,
        PanHashKey::generate(),
        terminal_keys,
        &shutdown,
    )
    .await;
    World {
        pool: switch.pool.clone(),
        url,
        issuer_pool,
        issuer,
        issuer_key,
        issuer_addr,
        switch_addr,
        switch,
        dialect: Arc::new(Dialect::cup_pos()),
        shutdown,
        run: Some(run),
    }
}

async fn world() -> World {
    world_with(|_| {}).await
}

impl World {
    /// Another switch on this world's database, issuer and key, with the
    /// tests' config; stops when the token is cancelled.
    async fn another_switch(&self) -> (Arc<Switch>, String, CancellationToken) {
        self.another_switch_with(|_| {}).await
    }

    /// [`World::another_switch`] with the tests' config changed by `tweak`.
    async fn another_switch_with(
        &self,
        tweak: impl FnOnce(&mut Config),
    ) -> (Arc<Switch>, String, CancellationToken) {
        let shutdown = CancellationToken::new();
        let config = switch_config(&self.issuer_addr, tweak);
        let (switch, addr, _run) =
            start_switch(&self.url, config, self.switch.key.clone(), &shutdown).await;
        (switch, addr, shutdown)
    }

    async fn terminal(&self, id: &str) -> Terminal {
        Terminal::connect(&self.switch_addr, id, MERCHANT, self.dialect.clone())
            .await
            .unwrap()
    }

    async fn signed_on(&self, id: &str) -> Terminal {
        let mut t = self.terminal(id).await;
        let reply = t.sign_on().await.unwrap();
        assert_eq!(reply.rc(), "00");
        t
    }

    async fn balance(&self, pan: &str) -> i64 {
        let pan = iso8583::Pan::new(pan).unwrap();
        issuer_sim::balance(&self.issuer_pool, &self.issuer_key, &pan)
            .await
            .unwrap()
            .expect("a seeded card")
            .balance
    }

    async fn journal_state(&self, rrn: &str) -> String {
        sqlx::query_scalar("SELECT state FROM journal WHERE rrn = $1")
            .bind(rrn)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// The state of a terminal's only row.
    async fn journal_state_of(&self, terminal: &str) -> String {
        sqlx::query_scalar("SELECT state FROM journal WHERE terminal_id = $1")
            .bind(terminal)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// A connection of its own in an open transaction that has run
    /// `locking` (a `SELECT ... FOR ...`): it holds those row locks until
    /// committed.
    async fn holding(&self, locking: String) -> sqlx::PgConnection {
        let mut conn =
            <sqlx::PgConnection as sqlx::Connection>::connect_with(&self.pool.connect_options())
                .await
                .unwrap();
        sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(locking))
            .execute(&mut conn)
            .await
            .unwrap();
        conn
    }

    /// Waits until a session of this database waits for a lock.
    async fn until_a_lock_is_awaited(&self, what: &str) {
        self.until(
            Duration::from_secs(10),
            what,
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock')",
        )
        .await;
    }

    /// Waits (up to `limit`) until `query` returns true.
    async fn until(&self, limit: Duration, what: &str, query: &str) {
        until(&self.pool, limit, what, query).await;
    }
}

/// Waits (up to `limit`) until `query` returns true on `pool`.
async fn until(pool: &PgPool, limit: Duration, what: &str, query: &str) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let done: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(query.to_string()))
            .fetch_one(pool)
            .await
            .unwrap();
        if done {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sign_on_returns_the_open_batch() {
    let w = world().await;
    sqlx::query("UPDATE terminals SET batch = 42 WHERE id = 'T0000002'")
        .execute(&w.pool)
        .await
        .unwrap();
    let mut t = w.terminal("T0000002").await;
    let reply = t.sign_on().await.unwrap();
    assert_eq!(reply.mti, Mti::NETWORK.reply());
    assert_eq!(reply.rc(), "00");
    assert_eq!(reply.field(60), Some("00000042001"));
    assert_eq!(t.batch, 42);
    assert_eq!(reply.field(11), Some("000001"));
    assert_eq!(reply.field(41), Some("T0000002"));
}

#[tokio::test]
async fn a_terminal_that_never_signed_on_is_told_to_sign_on() {
    let w = world().await;
    let mut t = w.terminal("T0000003").await;
    // Batch 1 is what an unsigned terminal's row holds; it was never given.
    t.batch = 1;
    let stan = t.next_stan();
    let reply = t
        .exchange(&t.purchase(stan, CARD, EXPIRY, 100).unwrap())
        .await
        .unwrap();
    assert_eq!(reply.rc(), "77", "sign on again: {reply:?}");
    // Signed on (through another switch process: this one's cache has the
    // terminal as unsigned), it transacts.
    let (_other, other_addr, other_stop) = w.another_switch().await;
    let mut elsewhere = Terminal::connect(&other_addr, "T0000003", MERCHANT, w.dialect.clone())
        .await
        .unwrap();
    assert_eq!(elsewhere.sign_on().await.unwrap().rc(), "00");
    let stan = t.next_stan();
    let reply = t
        .exchange(&t.purchase(stan, CARD, EXPIRY, 100).unwrap())
        .await
        .unwrap();
    assert_eq!(reply.rc(), "00");
    other_stop.cancel();
}

#[tokio::test]
async fn a_purchase_whose_f2_and_track_name_two_cards_is_declined_14_unsent() {
    let w = world().await;
    let mut t = w.signed_on("T0000004").await;
    let other = "6222020000000000002";
    let before = (w.balance(CARD).await, w.balance(other).await);
    let stan = t.next_stan();
    let f60 = t.f60("22");
    let track = format!("{other}D{EXPIRY}1011234");
    let frame = hand_made_purchase(
        &t,
        stan,
        &[(35, Field::Digits(&track)), (60, Field::Digits(&f60))],
    );
    assert_eq!(t.exchange(&frame).await.unwrap().rc(), "14");
    assert_eq!(
        (w.balance(CARD).await, w.balance(other).await),
        before,
        "neither card charged"
    );
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM journal WHERE terminal_id = 'T0000004'")
            .fetch_one(&w.pool)
            .await
            .unwrap();
    assert_eq!(rows, 0, "not forwarded");
}

#[tokio::test]
async fn a_purchase_is_approved_journalled_and_debited() {
    let w = world().await;
    let mut t = w.signed_on("T0000001").await;
    let before = w.balance(CARD).await;
    let stan = t.next_stan();
    let reply = t
        .exchange(&t.purchase(stan, CARD, EXPIRY, 12_345).unwrap())
        .await
        .unwrap();
    assert_eq!(reply.mti, Mti::FINANCIAL.reply());
    assert_eq!(reply.rc(), "00", "{reply:?}");
    assert_eq!(reply.field(4), Some("000000012345"));
    assert_eq!(reply.field(11).unwrap(), format!("{stan:06}"));
    assert_eq!(reply.field(38).map(str::len), Some(6), "auth code");
    assert_eq!(
        reply.prefix[..5],
        [0x60, 0x00, 0x00, 0x00, 0x03],
        "TPDU swapped"
    );
    let rrn = reply.field(37).unwrap();
    assert_eq!(rrn.len(), 12);
    assert_eq!(w.journal_state(rrn).await, "approved");
    assert_eq!(w.balance(CARD).await, before - 12_345);
    let (masked, amount): (String, i64) =
        sqlx::query_as("SELECT pan_masked, amount FROM journal WHERE rrn = $1")
            .bind(rrn)
            .fetch_one(&w.pool)
            .await
            .unwrap();
    assert_eq!(masked, "622202*********0001");
    assert_eq!(amount, 12_345);
}

#[tokio::test]
async fn the_switch_logs_how_its_journal_writes_were_batched() {
    // Other worlds log every 60 s: this one's lines are its own.
    let every = "journal batches, last 250ms: ";
    let w = world_with(|c| c.database.stats_interval = Duration::from_millis(250)).await;
    let mut t = w.signed_on("T0000001").await;
    for amount in [100, 200, 300] {
        let stan = t.next_stan();
        let reply = t
            .exchange(&t.purchase(stan, CARD, EXPIRY, amount).unwrap())
            .await
            .unwrap();
        assert_eq!(reply.rc(), "00");
    }
    // Each purchase is two writes (its row, then its outcome), in one or
    // more intervals: the lines add up to at least the six.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (mut batches, mut writes) = (0.0, 0.0);
    while writes < 6.0 - 1e-6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{writes} writes logged in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let logs = String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned();
        (batches, writes) = (0.0, 0.0);
        for line in logs
            .lines()
            .filter_map(|l| l.split_once(every).map(|(_, r)| r))
        {
            // "N batches of M writes, T ms each, busy P % of the time"
            let words: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(words[1..3], ["batches", "of"], "{line}");
            assert_eq!(words[4], "writes,", "{line}");
            assert!(line.ends_with("% of the time"), "{line}");
            let n: f64 = words[0].parse().unwrap();
            let per: f64 = words[3].parse().unwrap();
            assert!(n >= 1.0 && per >= 1.0, "{line}");
            batches += n;
            // The size is rounded to a tenth: a line's writes are whole.
            writes += (n * per).round();
        }
    }
    assert!(batches <= writes, "{batches} batches of {writes} writes");
}

#[tokio::test]
async fn a_switch_that_plans_ahead_opens_its_batch_connections_before_serving() {
    let w = world_with(|c| c.database.plan_ahead = true).await;
    // Each batch connection's last statement is the journal's batch
    // statement, run with no rows: three batchers (writes, answers,
    // lookups), two connections each per batch in flight.
    let planned: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'WITH req AS%INSERT INTO journal%'",
    )
    .fetch_one(&w.pool)
    .await
    .unwrap();
    assert_eq!(planned, 6);
    let journal: i64 = sqlx::query_scalar("SELECT count(*) FROM journal")
        .fetch_one(&w.pool)
        .await
        .unwrap();
    assert_eq!(journal, 0, "planning writes nothing");
    let mut t = w.signed_on("T0000001").await;
    let stan = t.next_stan();
    let reply = t
        .exchange(&t.purchase(stan, CARD, EXPIRY, 100).unwrap())
        .await
        .unwrap();
    assert_eq!(reply.rc(), "00", "{reply:?}");
}

#[tokio::test]
async fn declines_come_from_the_issuer_with_its_codes() {
    let w = world().await;
    let mut t = w.signed_on("T0000003").await;
    for (pan, expiry, amount, rc) in [
        ("6222020000000000300", "3012", 501, "51"), // insufficient funds
        ("6222020000000000200", "2001", 100, "54"), // expired
        ("6222020000000009999", "3012", 100, "14"), // unknown card
        ("6222020000000000002", "3012", 500_001, "61"), // over the card's limit
    ] {
        let stan = t.next_stan();
        let reply = t
            .exchange(&t.purchase(stan, pan, expiry, amount).unwrap())
            .await
            .unwrap();
        assert_eq!(reply.rc(), rc, "{pan}");
        assert_eq!(reply.field(38), None, "no auth code on a decline");
        assert_eq!(w.journal_state(reply.field(37).unwrap()).await, "declined");
    }
    assert_eq!(w.balance("6222020000000000300").await, 500);
}

#[tokio::test]
async fn balance_inquiry_returns_the_available_balance() {
    let w = world().await;
    let mut t = w.signed_on("T0000004").await;
    let stan = t.next_stan();
    let reply = t
        .exchange(
            &t.balance_inquiry(stan, "6222020000000000005", EXPIRY)
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(reply.rc(), "00");
    assert_eq!(reply.field(54), Some("1002156C000001000000"));
}

#[tokio::test]
async fn unknown_terminal_merchant_and_batch_are_refused() {
    let w = world().await;
    let mut unknown = w.terminal("T9999999").await;
    assert_eq!(unknown.sign_on().await.unwrap().rc(), "97");
    let mut disabled = w.terminal("T0000099").await;
    assert_eq!(disabled.sign_on().await.unwrap().rc(), "97");
    let mut closed = Terminal::connect(
        &w.switch_addr,
        "T0000098",
        "898310048160002",
        w.dialect.clone(),
    )
    .await
    .unwrap();
    assert_eq!(closed.sign_on().await.unwrap().rc(), "03");
    let mut wrong_merchant = Terminal::connect(
        &w.switch_addr,
        "T0000005",
        "898310048160002",
        w.dialect.clone(),
    )
    .await
    .unwrap();
    assert_eq!(wrong_merchant.sign_on().await.unwrap().rc(), "03");
    let mut t = w.signed_on("T0000005").await;
    t.batch += 1;
    let stan = t.next_stan();
    let reply = t
        .exchange(&t.purchase(stan, CARD, EXPIRY, 100).unwrap())
        .await
        .unwrap();
    assert_eq!(reply.rc(), "77");
}

#[tokio::test]
async fn a_repeated_purchase_gets_the_stored_reply_and_the_issuer_is_asked_once() {
    let w = world().await;
    let mut t = w.signed_on("T0000006").await;
    let pan = "6222020000000000006";
    let before = w.balance(pan).await;
    let stan = t.next_stan();
    let frame = t.purchase(stan, pan, EXPIRY, 1_000).unwrap();
    let first = t.exchange(&frame).await.unwrap();
    let again = t.exchange(&frame).await.unwrap();
    assert_eq!(first.rc(), "00");
    assert_eq!(again.body, first.body, "byte for byte the same reply");
    // Same key, other content: D2.
    let other = t.purchase(stan, pan, EXPIRY, 2_000).unwrap();
    assert_eq!(t.exchange(&other).await.unwrap().rc(), "94");
    assert_eq!(w.balance(pan).await, before - 1_000);
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM journal WHERE terminal_id = 'T0000006' AND kind = 'purchase'",
    )
    .fetch_one(&w.pool)
    .await
    .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn concurrent_duplicates_and_one_still_at_the_issuer_are_asked_once() {
    let w = world().await;
    // The issuer takes its time, so the copies arrive while the first is there.
    w.issuer
        .faults()
        .update(|f| f.latency = issuer_sim::Latency::Fixed(Duration::from_millis(300)));
    let pan = "6222020000000000007";
    let before = w.balance(pan).await;
    let mut t = w.signed_on("T0000007").await;
    let stan = t.next_stan();
    let frame = t.purchase(stan, pan, EXPIRY, 700).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let mut copy = Terminal::connect(&w.switch_addr, "T0000007", MERCHANT, w.dialect.clone())
            .await
            .unwrap();
        let frame = frame.clone();
        tasks.push(tokio::spawn(
            async move { copy.exchange(&frame).await.unwrap() },
        ));
    }
    let replies: Vec<_> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for r in &replies {
        assert_eq!(r.rc(), "00");
        assert_eq!(r.body, replies[0].body);
    }
    assert_eq!(w.balance(pan).await, before - 700);
}

#[tokio::test]
async fn two_switch_processes_on_one_database_ask_the_issuer_once() {
    let w = world().await;
    w.issuer
        .faults()
        .update(|f| f.latency = issuer_sim::Latency::Fixed(Duration::from_millis(200)));
    let (_other, other_addr, other_shutdown) = w.another_switch().await;
    let pan = "6222020000000000008";
    let before = w.balance(pan).await;
    let mut a = w.signed_on("T0000008").await;
    let mut b = Terminal::connect(&other_addr, "T0000008", MERCHANT, w.dialect.clone())
        .await
        .unwrap();
    b.batch = a.batch;
    let stan = a.next_stan();
    let frame = a.purchase(stan, pan, EXPIRY, 800).unwrap();
    let (ra, rb) = tokio::join!(a.exchange(&frame), b.exchange(&frame));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.rc(), "00");
    assert_eq!(ra.body, rb.body);
    assert_eq!(w.balance(pan).await, before - 800);
    other_shutdown.cancel();
}

#[tokio::test]
async fn an_issuer_that_cannot_be_reached_is_warned_of_once_with_its_address() {
    capture_logs();
    let url = embedded_pg::test_database().await;
    // A port nothing listens on.
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let shutdown = CancellationToken::new();
    let config = switch_config(&address, |c| c.issuers[0].name = "unreachable".into());
    let pool = switch::connect(&url, 4).await.unwrap();
    let _switch = switch::start(
        Arc::new(config),
        pool,
        PanHashKey::generate(),
        None,
        &shutdown,
    )
    .await
    .unwrap();
    let lines = || -> Vec<String> {
        String::from_utf8_lossy(&LOGS.lock().unwrap())
            .lines()
            .filter(|l| l.contains("link=unreachable#0"))
            .map(str::to_string)
            .collect()
    };
    // Three tries at least (100, 200 ms apart): the first warned of, the
    // same failure again at debug level.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lines()
        .iter()
        .filter(|l| l.contains("connect failed"))
        .count()
        < 2
    {
        assert!(std::time::Instant::now() < deadline, "{:#?}", lines());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let warned: Vec<String> = lines()
        .into_iter()
        .filter(|l| l.contains(" WARN "))
        .collect();
    assert_eq!(warned.len(), 1, "{warned:#?}");
    assert!(
        warned[0].contains(&format!("address={address}"))
            && warned[0].contains("declined 91")
            && warned[0].contains("error="),
        "{warned:#?}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_request_the_journal_kept_waiting_too_long_is_declined_unsent() {
    let w = world().await;
    let (pan1, pan2) = ("6222020000000000017", "6222020000000000018");
    let before = w.balance(pan2).await;
    let mut t1 = w.signed_on("T0000017").await;
    let mut t2 = w.signed_on("T0000018").await;
    // The journal locked away: the first request's batch is stuck on it.
    let mut lock = w.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE journal IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let stan1 = t1.next_stan();
    t1.send_raw(&t1.purchase(stan1, pan1, EXPIRY, 1_700).unwrap())
        .await
        .unwrap();
    w.until_a_lock_is_awaited("the first batch stuck").await;
    // The second waits behind it for longer than half the issuer timeout
    // (1.5 s here): the length of the outage is what is tested.
    let stan2 = t2.next_stan();
    t2.send_raw(&t2.purchase(stan2, pan2, EXPIRY, 1_800).unwrap())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    lock.commit().await.unwrap();
    assert_eq!(
        t1.recv().await.unwrap().rc(),
        "00",
        "the stuck batch goes on"
    );
    // T2: never written, never forwarded; the terminal hears 96.
    assert_eq!(t2.recv().await.unwrap().rc(), "96");
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM journal WHERE terminal_id = 'T0000018' AND stan = $1",
    )
    .bind(stan2 as i32)
    .fetch_one(&w.pool)
    .await
    .unwrap();
    assert_eq!(rows, 0, "not written after its terminal was answered");
    assert_eq!(w.balance(pan2).await, before, "not forwarded");
    assert!(w.switch.writer.stats().expired >= 1);
}

#[tokio::test]
async fn connections_postgresql_ended_are_found_and_closed_together() {
    let w = world().await;
    let batches = group_commit::postgres::batch_pool(&w.pool, 2, Duration::from_secs(5));
    let mut conns = group_commit::postgres::open_all(&batches).await.unwrap();
    assert_eq!(conns.len(), 4);
    let mut pids = Vec::new();
    for c in &mut conns {
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut **c)
            .await
            .unwrap();
        pids.push(pid);
    }
    drop(conns);
    // Back in the pool (a connection dropped goes back in a task of its own).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while batches.num_idle() < 4 {
        assert!(std::time::Instant::now() < deadline, "connections back");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // PostgreSQL ends three of them, as a restart ends them all.
    for pid in &pids[..3] {
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(&w.pool)
            .await
            .unwrap();
    }
    let ended = format!(
        "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid IN ({}, {}, {}))",
        pids[0], pids[1], pids[2]
    );
    w.until(Duration::from_secs(10), "the backends gone", &ended)
        .await;
    assert_eq!(group_commit::postgres::drop_dead(&batches).await, 3);
    // What is left serves: the survivor, and new connections for the rest.
    for _ in 0..4 {
        sqlx::query("SELECT 1").execute(&batches).await.unwrap();
    }
    assert!(group_commit::postgres::lost_connection(&sqlx::Error::Io(
        std::io::ErrorKind::BrokenPipe.into()
    )));
    assert!(!group_commit::postgres::lost_connection(
        &sqlx::Error::RowNotFound
    ));
}

#[tokio::test]
async fn a_switch_with_another_pan_hash_key_is_refused_by_the_journal() {
    let w = world().await;
    let other = PanHashKey::generate();
    let refused = switch::check_key(&w.pool, &other).await.unwrap_err();
    assert!(
        matches!(refused, switch::StartError::KeyMismatch),
        "{refused}"
    );
    assert!(refused.to_string().contains("SWITCHYARD_PAN_HASH_KEY"));
    let started = switch::start(
        Arc::new(switch_config(&w.issuer_addr, |_| {})),
        w.pool.clone(),
        other,
        None,
        &CancellationToken::new(),
    )
    .await;
    assert!(matches!(started, Err(switch::StartError::KeyMismatch)));
    // The journal's own key passes, however often.
    switch::check_key(&w.pool, &w.switch.key).await.unwrap();
}

#[tokio::test]
async fn database_errors_are_said_by_their_message_and_sqlstate() {
    let w = world().await;
    let e = sqlx::query("SELECT 1 / 0")
        .execute(&w.pool)
        .await
        .unwrap_err();
    assert!(e.to_string().contains(" at line "), "sqlx's own words: {e}");
    let said = group_commit::postgres::Said(&e).to_string();
    assert_eq!(said, "division by zero (SQLSTATE 22012)");
    // What each write of a failed batch is answered, and logs.
    let copy = (group_commit::postgres::ON_ERROR.copy)(&e).to_string();
    assert_eq!(copy, "the batch failed: division by zero (SQLSTATE 22012)");
    let copy = (group_commit::postgres::ON_ERROR.copy)(&sqlx::Error::PoolTimedOut).to_string();
    assert_eq!(
        copy,
        "the batch failed: pool timed out while waiting for an open connection"
    );
}

#[tokio::test]
async fn a_stop_lets_a_request_at_the_issuer_get_the_issuers_answer() {
    let w = world().await;
    w.issuer
        .faults()
        .update(|f| f.latency = issuer_sim::Latency::Fixed(Duration::from_millis(400)));
    let shutdown = CancellationToken::new();
    let config = switch_config(&w.issuer_addr, |_| {});
    let (_other, addr, run) = start_switch(&w.url, config, w.switch.key.clone(), &shutdown).await;
    let pan = "6222020000000000016";
    let before = w.balance(pan).await;
    let mut t = Terminal::connect(&addr, "T0000016", MERCHANT, w.dialect.clone())
        .await
        .unwrap();
    assert_eq!(t.sign_on().await.unwrap().rc(), "00");
    let stan = t.next_stan();
    t.send_raw(&t.purchase(stan, pan, EXPIRY, 1_600).unwrap())
        .await
        .unwrap();
    w.until(
        Duration::from_secs(5),
        "the purchase at the issuer",
        "SELECT EXISTS (SELECT 1 FROM journal WHERE terminal_id = 'T0000016' AND state = 'sent')",
    )
    .await;
    // SIGTERM now: the link stays up until the answer is in.
    shutdown.cancel();
    let reply = t.recv().await.unwrap();
    assert_eq!(reply.rc(), "00", "the issuer's approval, not 98");
    assert!(run.await.unwrap(), "everything in flight was answered");
    w.issuer.faults().clear();
    assert_eq!(w.balance(pan).await, before - 1_600);
    let advices: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM advices a JOIN journal j ON j.id = a.journal_id WHERE j.terminal_id = 'T0000016'",
    )
    .fetch_one(&w.pool)
    .await
    .unwrap();
    assert_eq!(advices, 0, "nothing to reverse");
    // Stopped: no new connection is taken.
    assert!(
        Terminal::connect(&addr, "T0000016", MERCHANT, w.dialect.clone())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn an_issuer_timeout_answers_98_and_the_reversal_is_applied_once_the_issuer_is_back() {
    let w = world().await;
    let pan = "6222020000000000009";
    let before = w.balance(pan).await;
    let mut t = w.signed_on("T0000009").await;
    // The issuer posts the purchase but its reply never arrives.
    w.issuer.faults().update(|f| f.drop_reply = 1.0);
    let stan = t.next_stan();
    let reply = t
        .exchange(&t.purchase(stan, pan, EXPIRY, 900).unwrap())
        .await
        .unwrap();
    assert_eq!(reply.rc(), "98");
    let rrn = reply.field(37).unwrap().to_string();
    assert_eq!(w.balance(pan).await, before - 900, "the issuer did post it");
    // The first reversal advice (0420) is lost the same way; its repeat
    // (0421) is retried until the issuer answers again.
    w.until(
        Duration::from_secs(10),
        "a first advice attempt, failed",
        &format!("SELECT EXISTS (SELECT 1 FROM advices a JOIN journal j ON j.id = a.journal_id WHERE j.rrn = '{rrn}' AND a.last_error IS NOT NULL)"),
    )
    .await;
    w.issuer.faults().clear();
    w.until(
        Duration::from_secs(15),
        "the reversal advice to be answered",
        &format!("SELECT state = 'reversed' FROM journal WHERE rrn = '{rrn}'"),
    )
    .await;
    assert_eq!(w.balance(pan).await, before, "reversed exactly once");
    let (attempts, rc): (i32, String) = sqlx::query_as(
        "SELECT a.attempts, a.response_code FROM advices a JOIN journal j ON j.id = a.journal_id WHERE j.rrn = $1",
    )
    .bind(&rrn)
    .fetch_one(&w.pool)
    .await
    .unwrap();
    assert!(
        attempts >= 2,
        "the first advice was dropped too, so a repeat was needed"
    );
    assert_eq!(rc, "00");
    // A duplicate of the timed-out request hears the same 98.
    let again = t
        .exchange(&t.purchase(stan, pan, EXPIRY, 900).unwrap())
        .await
        .unwrap();
    assert_eq!(again.rc(), "98");
}

#[tokio::test]
async fn an_issuer_that_dies_mid_reply_is_reversed_too() {
    let w = world().await;
    let pan = "6222020000000000010";
    let before = w.balance(pan).await;
    let mut t = w.signed_on("T0000010").await;
    w.issuer.faults().update(|f| f.close_connection = 1.0);
    let stan = t.next_stan();
    let reply = t
        .exchange(&t.purchase(stan, pan, EXPIRY, 1_000).unwrap())
        .await
        .unwrap();
    assert_eq!(reply.rc(), "98");
    let rrn = reply.field(37).unwrap().to_string();
    w.issuer.faults().clear();
    w.until(
        Duration::from_secs(15),
        "the reversal after the broken connection",
        &format!("SELECT state = 'reversed' FROM journal WHERE rrn = '{rrn}'"),
    )
    .await;
    assert_eq!(w.balance(pan).await, before);
    // The link is back: the next purchase goes through.
    assert!(w.switch.links[0].wait_up(Duration::from_secs(5)).await);
    let stan = t.next_stan();
    let reply = t
        .exchange(&t.purchase(stan, pan, EXPIRY, 10).unwrap())
        .await
        .unwrap();
    assert_eq!(reply.rc(), "00");
}

#[tokio::test]
async fn sent_rows_of_a_crashed_switch_are_reversed_at_restart() {
    reversed_after_a_crash("T0000011", "6222020000000000011", |_| {}).await;
}

#[tokio::test]
async fn a_reversal_after_the_institution_id_changed_names_the_original_as_it_was_sent() {
    // The operator gives the acquirer a new institution id before the
    // restart: the issuer keeps the sale under the one it was sent with.
    reversed_after_a_crash("T0000012", "6222020000000000012", |c| {
        c.institution_id = "48569999".into();
        c.forwarding_id = "48569998".into();
    })
    .await;
}

/// A purchase on `terminal` left `sent` by a switch that died between
/// asking the issuer and recording the answer is reversed, at the issuer
/// too, by a switch started afterwards with the tests' config changed by
/// `tweak`.
async fn reversed_after_a_crash(terminal: &str, pan: &str, tweak: impl FnOnce(&mut Config)) {
    let mut w = world().await;
    let before = w.balance(pan).await;
    let mut t = w.signed_on(terminal).await;
    // Slow issuer answers keep the row `sent` while the switch stops.
    w.issuer
        .faults()
        .update(|f| f.latency = issuer_sim::Latency::Fixed(Duration::from_millis(800)));
    let stan = t.next_stan();
    let frame = t.purchase(stan, pan, EXPIRY, 1_100).unwrap();
    t.send_raw(&frame).await.unwrap();
    w.until(
        Duration::from_secs(5),
        "the sent row",
        "SELECT EXISTS (SELECT 1 FROM journal WHERE state = 'sent')",
    )
    .await;
    // The first switch goes away; then its row is put back as a crash would
    // have left it: `sent`, posted at the issuer, no outcome, no advice.
    w.shutdown.cancel();
    w.run.take().expect("running").await.unwrap();
    sqlx::query("UPDATE journal SET state = 'sent', reply = NULL, sent_at = now() - interval '1 hour' WHERE terminal_id = $1")
        .bind(terminal)
        .execute(&w.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM advices")
        .execute(&w.pool)
        .await
        .unwrap();
    w.issuer.faults().clear();
    let (_s, _addr, restart) = w.another_switch_with(tweak).await;
    w.until(
        Duration::from_secs(15),
        "recovery to reverse the sent row and the issuer to answer its advice",
        "SELECT EXISTS (SELECT 1 FROM advices WHERE state = 'done' AND response_code = '00')",
    )
    .await;
    assert_eq!(w.journal_state_of(terminal).await, "reversed");
    assert_eq!(
        w.balance(pan).await,
        before,
        "the issuer's posting was reversed"
    );
    restart.cancel();
}

/// How a stand-in issuer answers a message, given its MTI and how many of
/// that MTI came before it: its F39, or none at all.
type IssuerAnswer = fn(&str, usize) -> Option<&'static str>;

/// An issuer that answers every request as `answer` says, approvals with
/// `f54` as their F54, and sign-ons and echoes with 00: replies the
/// simulator never sends.
async fn approving_issuer(listener: TcpListener, f54: &'static str, answer: IssuerAnswer) {
    use bytes::BytesMut;
    use iso8583::{Frame, FrameCodec, Message, MessageWriter};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::codec::Decoder;
    let counts = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        usize,
    >::new()));
    while let Ok((mut stream, _)) = listener.accept().await {
        let counts = counts.clone();
        tokio::spawn(async move {
            let dialect = Dialect::iso87();
            let mut codec = FrameCodec::new(&dialect, 65_535);
            let mut buf = BytesMut::new();
            while stream.read_buf(&mut buf).await.unwrap_or(0) > 0 {
                while let Ok(Some(frame)) = codec.decode(&mut buf) {
                    let Frame::Message(body) = frame else {
                        continue;
                    };
                    let msg = Message::parse(&dialect, &body).unwrap();
                    let financial = msg.mti().class() != 8;
                    let mti = msg.mti().to_string();
                    let before = {
                        let mut counts = counts.lock().unwrap();
                        let n = counts.entry(mti.clone()).or_default();
                        *n += 1;
                        *n - 1
                    };
                    let rc = if financial {
                        answer(&mti, before)
                    } else {
                        Some("00")
                    };
                    let approved = financial && rc == Some("00");
                    let mut out = BytesMut::new();
                    let mut w = MessageWriter::reply(&dialect, &mut out, &msg);
                    for n in [3, 4, 7, 11] {
                        w.copy(n, &msg).unwrap();
                    }
                    if approved {
                        w.text(38, "A1B2C3").unwrap();
                    }
                    if let Some(rc) = rc {
                        w.text(39, rc).unwrap();
                    }
                    if approved && !f54.is_empty() {
                        w.text(54, f54).unwrap();
                    }
                    w.copy(70, &msg).unwrap();
                    w.finish().unwrap();
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

/// A terminal signed on to a switch of its own, whose issuer approves
/// everything with `f54`, on the terminal dialect `terminal_dialect`.
async fn beside_an_approving_issuer(
    f54: &'static str,
    terminal_dialect: Option<(&str, Dialect)>,
) -> (Terminal, CancellationToken) {
    let (t, shutdown, _) = beside_an_issuer(f54, terminal_dialect, |_, _| Some("00")).await;
    (t, shutdown)
}

/// As [`beside_an_approving_issuer`], the issuer answering as `answer`
/// says; with the switch's database.
async fn beside_an_issuer(
    f54: &'static str,
    terminal_dialect: Option<(&str, Dialect)>,
    answer: IssuerAnswer,
) -> (Terminal, CancellationToken, PgPool) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer_addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(approving_issuer(listener, f54, answer));
    let url = embedded_pg::test_database().await;
    let shutdown = CancellationToken::new();
    let (path, dialect) = match terminal_dialect {
        Some((path, dialect)) => (Some(path.into()), dialect),
        None => (None, Dialect::cup_pos()),
    };
    let config = switch_config(&issuer_addr, |c| c.dialects.terminal = path);
    let (switch, addr, _run) = start_switch(&url, config, PanHashKey::generate(), &shutdown).await;
    let mut t = Terminal::connect(&addr, "T0000001", MERCHANT, Arc::new(dialect))
        .await
        .unwrap();
    assert_eq!(t.sign_on().await.unwrap().rc(), "00");
    (t, shutdown, switch.pool.clone())
}

#[tokio::test]
async fn an_advice_a_stopped_switch_had_taken_goes_again_as_a_repeat() {
    // The issuer declines a 0420 for good (12) and approves a 0421: which
    // one the advice ends with tells which was sent.
    let (_t, shutdown, pool) = beside_an_issuer("", None, |mti, _| match mti {
        "0420" => Some("12"),
        _ => Some("00"),
    })
    .await;
    // Queued for an issuer this switch does not serve, so that its worker
    // leaves it alone while another switch takes it, as a switch that
    // stops before it records the answer does.
    queue_reversals(&pool, "T0000003", &["elsewhere"]).await;
    let taken = switch::advice::take_due_from(&pool, 1, Duration::from_millis(1), &["elsewhere"])
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    // That switch is gone; the issuer is this one's now.
    sqlx::query("UPDATE advices SET issuer = 'sim'")
        .execute(&pool)
        .await
        .unwrap();
    let (state, attempts) = until_decided(&pool).await;
    let rc: Option<String> = sqlx::query_scalar("SELECT response_code FROM advices")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        (state.as_str(), rc.as_deref()),
        ("done", Some("00")),
        "the try after a taken one is a repeat (0421)"
    );
    assert_eq!(attempts, 2);
    shutdown.cancel();
}

/// Queues, for each of `issuers`, a reversal of a purchase of `terminal`
/// that ended unknown (STANs 1 upwards), as a switch that gave up on it
/// leaves it.
async fn queue_reversals(pool: &PgPool, terminal: &str, issuers: &[&str]) {
    sqlx::query(
        "WITH sales AS (
            INSERT INTO journal (id, rrn, terminal_id, merchant_id, batch, stan, mti, mti_class,
                 processing_code, kind, request_digest, state, business_date)
            SELECT id, lpad((id % 1000000000000)::text, 12, '0'), $2, $1, 1, stan, 200, 2,
                 '000000', 'purchase', '\\x00', 'unknown', current_date
            FROM (SELECT nextval('journal_id_seq') AS id, stan::int, issuer
                  FROM unnest($3::text[]) WITH ORDINALITY AS i(issuer, stan)) n
            RETURNING id, stan)
         INSERT INTO advices (journal_id, kind, mti, issuer, processing_code, pos_condition, amount)
         SELECT s.id, 'reversal', 420, ($3::text[])[s.stan], '000000', '00', 100 FROM sales s",
    )
    .bind(MERCHANT)
    .bind(terminal)
    .bind(issuers)
    .execute(pool)
    .await
    .unwrap();
}

/// Waits until the one advice is no longer pending; its state and attempts.
async fn until_decided(pool: &PgPool) -> (String, i32) {
    until(
        pool,
        Duration::from_secs(15),
        "the advice to be decided",
        "SELECT state <> 'pending' FROM advices",
    )
    .await;
    sqlx::query_as("SELECT state, attempts FROM advices")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_advice_answered_without_a_code_or_with_96_goes_again() {
    // The 0420 is answered without F39, its first repeat 96, the next 00.
    let (_t, shutdown, pool) = beside_an_issuer("", None, |mti, before| match (mti, before) {
        ("0420", 0) => None,
        ("0421", 0) => Some("96"),
        _ => Some("00"),
    })
    .await;
    queue_reversals(&pool, "T0000002", &["sim"]).await;
    let (state, attempts) = until_decided(&pool).await;
    let (rc, error): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT response_code, last_error FROM advices")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), rc.as_deref()), ("done", Some("00")));
    assert_eq!(attempts, 3, "sent three times: no code, 96, 00");
    assert_eq!(error.as_deref(), Some("the issuer answered 96"));
    let journal: String =
        sqlx::query_scalar("SELECT state FROM journal WHERE terminal_id = 'T0000002'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(journal, "reversed");
    shutdown.cancel();
}

#[tokio::test]
async fn a_reply_carries_the_available_balance_of_several_the_issuer_sent() {
    // The ledger balance, then the available one: 40 characters, twice
    // what a terminal's F54 holds.
    let (mut t, shutdown) =
        beside_an_approving_issuer("1001156C0000000200001002156C000000015000", None).await;
    let stan = t.next_stan();
    let reply = t
        .exchange(&t.balance_inquiry(stan, CARD, EXPIRY).unwrap())
        .await
        .unwrap();
    assert_eq!(reply.rc(), "00");
    assert_eq!(reply.field(54), Some("1002156C000000015000"));
    shutdown.cancel();
}

#[tokio::test]
async fn what_the_terminal_dialect_cannot_carry_is_left_out_not_sent_half_built() {
    // A terminal dialect of an operator's whose F54 is shorter than any
    // balance: the approval is still a whole frame, without F54.
    let path = std::env::temp_dir().join(format!("switch-short-f54-{}.toml", std::process::id()));
    let text = include_str!("../../../../config/dialects/cup-pos.toml").replace(
        r#"54 = { format = "an...20""#,
        r#"54 = { format = "an...10""#,
    );
    assert!(text.contains(r#"54 = { format = "an...10""#));
    std::fs::write(&path, &text).unwrap();
    let dialect = Dialect::from_toml(&text, "short-f54.toml").unwrap();
    let (mut t, shutdown) = beside_an_approving_issuer(
        "1002156C000000015000",
        Some((path.to_str().unwrap(), dialect)),
    )
    .await;
    let stan = t.next_stan();
    let reply = t
        .exchange(&t.balance_inquiry(stan, CARD, EXPIRY).unwrap())
        .await
        .unwrap();
    assert_eq!(reply.rc(), "00");
    assert_eq!(reply.field(38), Some("A1B2C3"), "{reply:?}");
    assert_eq!(reply.field(54), None);
    shutdown.cancel();
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn framing_errors_close_the_connection_and_an_oversized_length_is_not_read() {
    let w = world().await;
    let mut t = w.terminal("T0000012").await;
    // 0xFFFF announces 65535 bytes: refused at once, nothing more is read.
    t.send_raw(&[0xFF, 0xFF, 0x60]).await.unwrap();
    assert!(matches!(
        t.recv().await,
        Err(loadgen::terminal::TerminalError::Closed)
    ));
    let mut t = w.terminal("T0000012").await;
    t.send_raw(&[0x00, 0x03, 0x60, 0x00, 0x03]).await.unwrap();
    assert!(matches!(
        t.recv().await,
        Err(loadgen::terminal::TerminalError::Closed)
    ));
    // Keep-alives get no answer and keep the connection.
    let mut t = w.signed_on("T0000012").await;
    t.keep_alive().await.unwrap();
    let stan = t.next_stan();
    let reply = t
        .exchange(&t.balance_inquiry(stan, CARD, EXPIRY).unwrap())
        .await
        .unwrap();
    assert_eq!(reply.rc(), "00");
}

/// A purchase of 100 fen on [`CARD`], field by field and without F35 or
/// F60 unless `extra` gives them: frames a terminal of ours would not send.
fn hand_made_purchase(t: &Terminal, stan: u32, extra: &[(usize, Field<'_>)]) -> bytes::BytesMut {
    let mut fields = vec![
        (2, Field::Digits(CARD)),
        (3, Field::Digits("000000")),
        (4, Field::Number(100)),
        (11, Field::Number(stan.into())),
        (14, Field::Digits(EXPIRY)),
        (22, Field::Digits("021")),
        (25, Field::Digits("00")),
        (49, Field::Text("156")),
    ];
    fields.extend_from_slice(extra);
    fields.sort_by_key(|(n, _)| *n);
    t.request(Mti::FINANCIAL, &fields).unwrap()
}

#[tokio::test]
async fn a_transaction_without_its_batch_is_answered_30_not_77() {
    let w = world().await;
    let mut t = w.signed_on("T0000014").await;
    let stan = t.next_stan();
    let frame = hand_made_purchase(&t, stan, &[]);
    let reply = t.exchange(&frame).await.unwrap();
    assert_eq!(reply.rc(), "30", "F60 missing: {reply:?}");
    // A sign-on without it too (its F60.3 says what it is), not 12.
    let frame = t.request(Mti::NETWORK, &[(11, Field::Number(9))]).unwrap();
    assert_eq!(t.exchange(&frame).await.unwrap().rc(), "30");
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM journal WHERE terminal_id = 'T0000014'")
            .fetch_one(&w.pool)
            .await
            .unwrap();
    assert_eq!(rows, 0, "nothing journalled, nothing forwarded");
}

#[tokio::test]
async fn a_message_with_a_bad_field_is_answered_30_when_its_stan_and_terminal_can_be_read() {
    let w = world().await;
    let mut t = w.signed_on("T0000013").await;
    let stan = t.next_stan();
    let mut frame = t
        .request(
            Mti::FINANCIAL,
            &[
                (3, Field::Digits("000000")),
                (4, Field::Number(100)),
                (11, Field::Number(stan.into())),
                (49, Field::Text("156")),
            ],
        )
        .unwrap();
    // Corrupt F49 (after F41/F42): "1x6" is not an an3 value.
    let at = frame.len() - 2;
    frame[at] = b'-';
    let reply = t.exchange(&frame).await.unwrap();
    assert_eq!(reply.rc(), "30");
    assert_eq!(reply.field(11).unwrap(), format!("{stan:06}"));
    assert_eq!(reply.field(41), Some("T0000013"));
    // Bad content in front of F41, in a field whose length is known: the
    // field is left out, and the STAN and terminal after it are read.
    let stan = t.next_stan();
    let mut frame = t
        .request(
            Mti::FINANCIAL,
            &[
                (3, Field::Digits("000000")),
                (11, Field::Number(stan.into())),
            ],
        )
        .unwrap();
    frame[2 + 5 + 6 + 2 + 8] = 0xAB; // F3's first byte: not BCD
    let reply = t.exchange(&frame).await.unwrap();
    assert_eq!(reply.rc(), "30");
    assert_eq!(reply.field(11).unwrap(), format!("{stan:06}"));
    assert_eq!(reply.field(41), Some("T0000013"));
    assert_eq!(reply.field(3), None, "what could not be read is not echoed");
    // Bytes after the last field, counted by the length prefix; then bit 1
    // (a secondary bitmap) set in a dialect that has none: the frame can be
    // framed and its STAN and terminal read, so the answer is 30 too.
    let (stan, stan2) = (t.next_stan(), t.next_stan());
    let request = |stan: u32| {
        t.request(
            Mti::FINANCIAL,
            &[
                (3, Field::Digits("000000")),
                (11, Field::Number(stan.into())),
            ],
        )
        .unwrap()
    };
    let mut frame = request(stan);
    frame.extend_from_slice(&[0xDE, 0xAD]);
    let len = u16::try_from(frame.len() - 2).unwrap();
    frame[..2].copy_from_slice(&len.to_be_bytes());
    let mut secondary = request(stan2);
    secondary[2 + 5 + 6 + 2] |= 0x80;
    for (frame, stan) in [(frame, stan), (secondary, stan2)] {
        let reply = t.exchange(&frame).await.unwrap();
        assert_eq!(reply.rc(), "30");
        assert_eq!(reply.field(11).unwrap(), format!("{stan:06}"));
        assert_eq!(reply.field(41), Some("T0000013"));
    }
    // A length in front of F41 that cannot be read: nothing after it can,
    // the terminal cannot be named, and the connection is closed instead.
    let stan = t.next_stan();
    let mut frame = t
        .request(
            Mti::FINANCIAL,
            &[(2, Field::Digits(CARD)), (11, Field::Number(stan.into()))],
        )
        .unwrap();
    frame[2 + 5 + 6 + 2 + 8] = 0xAB; // F2's length prefix: not BCD
    t.send_raw(&frame).await.unwrap();
    assert!(matches!(
        t.recv().await,
        Err(loadgen::terminal::TerminalError::Closed)
    ));
}

#[tokio::test]
async fn no_clear_pan_in_the_logs() {
    let w = world().await;
    let mut t = w.signed_on("T0000015").await;
    let pan = "6222020000000000015";
    let stan = t.next_stan();
    t.exchange(&t.purchase(stan, pan, EXPIRY, 100).unwrap())
        .await
        .unwrap();
    w.issuer.faults().update(|f| f.drop_reply = 1.0);
    let stan = t.next_stan();
    t.exchange(&t.purchase(stan, pan, EXPIRY, 200).unwrap())
        .await
        .unwrap();
    w.issuer.faults().clear();
    let logs = String::from_utf8_lossy(&LOGS.lock().unwrap()).to_string();
    assert!(
        logs.contains("issuer did not answer"),
        "the timeout was logged"
    );
    assert!(!logs.contains(pan), "clear PAN in the logs");
    assert!(
        !logs.contains("6222020000000000001"),
        "clear PAN of another test in the logs"
    );
}

#[tokio::test]
async fn no_clear_pan_in_the_database_of_either_side() {
    let w = world().await;
    let mut t = w.signed_on("T0000014").await;
    let pan = "6222020000000000014";
    for amount in [100, 200] {
        let stan = t.next_stan();
        t.exchange(&t.purchase(stan, pan, EXPIRY, amount).unwrap())
            .await
            .unwrap();
    }
    w.issuer.faults().update(|f| f.drop_reply = 1.0);
    let stan = t.next_stan();
    t.exchange(&t.purchase(stan, pan, EXPIRY, 300).unwrap())
        .await
        .unwrap();
    w.issuer.faults().clear();
    let bin = embedded_pg::find_binaries().unwrap();
    let dump = std::process::Command::new(bin.join("pg_dump"))
        .arg("--data-only")
        .arg(&w.url)
        .output()
        .unwrap();
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(
        text.contains("622202*********0014"),
        "the masked PAN is there"
    );
    assert!(
        text.contains("switch.journal") && text.contains("issuer."),
        "both schemas dumped"
    );
    // As digits (packed BCD reads the same in hex), as ASCII in hex (a
    // bytea of the clear text), as track data either case, the PIN block.
    let ascii_hex = hex::encode(pan);
    for secret in [
        pan,
        &ascii_hex,
        "6222020000000000014D3012",
        "6222020000000000014d3012",
        "1111111111111111",
    ] {
        assert!(!text.contains(secret), "{secret} found in the dump");
    }
}

/// A purchase of 100 fen on `T0000001`, batch 1, for the journal's own
/// functions.
fn purchase(stan: i32) -> switch::journal::NewEntry<'static> {
    switch::journal::NewEntry {
        terminal_id: "T0000001",
        merchant_id: MERCHANT,
        batch: 1,
        stan,
        mti: 200,
        kind: switch::model::Kind::Purchase,
        processing_code: "000000",
        pos_condition: "00",
        amount: 100,
        pan_hash: Some([7; 32]),
        pan_masked: Some("622202*********0001".into()),
        digest: [stan as u8; 32],
        business_date: chrono::Utc::now().date_naive(),
        original_id: None,
        rule: None,
        operator: None,
        reversal_reason: None,
        original_ref: None,
        claim: None,
        open_batch: true,
        institution_id: "48560000",
        forwarding_id: "48561000",
    }
}

const FORWARD: switch::journal::Disposition<'static> = switch::journal::Disposition::Forward {
    issuer: "sim",
    f7: "1203120000",
};

/// The outcome of row `id`, code 00, for the journal's own functions.
fn outcome(id: i64, state: switch::model::State) -> switch::journal::Write {
    switch::journal::Write::Outcome(switch::journal::Completion {
        id,
        state,
        rc: switch::model::ResponseCode::APPROVED,
        auth_code: Some("123456".into()),
        reply: vec![2, 16],
        claimed: false,
    })
}

/// Settings that make PostgreSQL send back the plan of every statement as
/// a notice, with the rows each node read (a session library: the private
/// test server's superuser, or DATABASE_URL's role, may load it).
const AUTO_EXPLAIN: [(&str, &str); 4] = [
    ("session_preload_libraries", "auto_explain"),
    ("auto_explain.log_min_duration", "0"),
    ("auto_explain.log_analyze", "on"),
    ("auto_explain.log_level", "notice"),
];

/// One connection with the journal writer's settings that sends back every
/// plan as a notice, with the rows each node read; and, held until the
/// test ends, the right to read the log of plans: one such test at a
/// time, so that no other's plans land among its own.
async fn explained(w: &World) -> (PgPool, tokio::sync::MutexGuard<'static, ()>) {
    static PLANS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let turn = PLANS.lock().await;
    let explained = (*group_commit::postgres::batch_pool(&w.pool, 1, Duration::from_secs(30))
        .connect_options())
    .clone()
    .options(AUTO_EXPLAIN);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(explained)
        .await
        .expect("auto_explain is loaded per session, which needs a superuser: the private test server's, or DATABASE_URL's role");
    (pool, turn)
}

/// Rows read by the scans of the plans logged since `seen` whose line
/// matches `scan`: the rows each returned and those its filter removed
/// (EXPLAIN gives both per loop), times loops.
fn rows_read(seen: usize, scan: impl Fn(&str) -> bool) -> (usize, u64) {
    let logs = String::from_utf8_lossy(&LOGS.lock().unwrap()[seen..]).into_owned();
    let lines: Vec<&str> = logs.lines().collect();
    let probes: Vec<(u64, u64)> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| scan(l))
        .filter_map(|(i, l)| {
            let (_, counts) = l.rsplit_once(" rows=")?;
            let (rows, loops) = counts.trim_end_matches(')').split_once(" loops=")?;
            let rows: u64 = rows.parse().ok()?;
            // The node's own detail lines, up to the next node.
            let removed: u64 = lines[i + 1..]
                .iter()
                .take_while(|d| !d.contains("->") && !d.contains("(cost="))
                .filter_map(|d| d.split_once("Rows Removed by Filter: "))
                .filter_map(|(_, n)| n.trim().parse::<u64>().ok())
                .sum();
            Some((rows + removed, loops.parse().ok()?))
        })
        .collect();
    let read = probes.iter().map(|(rows, loops)| rows * loops).sum();
    (probes.len(), read)
}

/// The ids of the rows a batch wrote, each a new request's.
fn ids(answers: Vec<switch::journal::Wrote>) -> Vec<i64> {
    answers
        .into_iter()
        .map(|a| match a {
            switch::journal::Wrote::Request(Some(written)) => written.id,
            other => panic!("a new row: {other:?}"),
        })
        .collect()
}

/// Purchases `stans` of T0000001, to be journalled `sent`.
fn purchases(stans: std::ops::RangeInclusive<i32>) -> Vec<switch::journal::Write> {
    use switch::journal::{Row, Write};
    stans
        .map(|stan| Write::Request(Box::new(Row::of(&purchase(stan), FORWARD))))
        .collect()
}

#[tokio::test]
async fn the_cost_of_a_journal_batch_does_not_grow_with_the_journal() {
    use switch::journal::{self, Wrote};
    let w = world().await;
    let (one, _turn) = explained(&w).await;
    let batch = purchases;
    // The writer plans its statement once, while the journal is small...
    let answers = journal::write_many(&one, &batch(1..=20)).await.unwrap();
    assert!(answers.iter().all(|a| matches!(a, Wrote::Request(Some(_)))));
    // ...and keeps the plan as reversals pile up, none of the new requests.
    sqlx::query(
        "INSERT INTO journal (id, rrn, terminal_id, merchant_id, batch, stan, mti, mti_class,
             processing_code, kind, request_digest, state, business_date)
         SELECT id, lpad((id % 1000000000000)::text, 12, '0'), 'T0000002', $1, 1, g, 400, 4, '000000',
             'reversal', '\\x00', 'approved', current_date
         FROM (SELECT g, nextval('journal_id_seq') AS id FROM generate_series(1, 2000) g) n",
    )
    .bind(MERCHANT)
    .execute(&w.pool)
    .await
    .unwrap();
    let seen = LOGS.lock().unwrap().len();
    let answers = journal::write_many(&one, &batch(21..=40)).await.unwrap();
    assert!(answers.iter().all(|a| matches!(a, Wrote::Request(Some(_)))));
    // R3 looks for a reversal of each new request: a probe per row, which
    // finds none. Not a pass over the 2,000 reversals.
    let (probes, read) = rows_read(seen, |l| l.contains(" on journal x "));
    assert!(probes > 0, "the batch's plan was sent back");
    assert!(read < 20, "{read} reversals read to write 20 rows");
}

#[tokio::test]
async fn an_outcome_batch_reads_its_own_rows_however_many_are_in_flight() {
    use switch::journal::{self, Write, Wrote};
    use switch::model::State;
    let w = world().await;
    let (one, _turn) = explained(&w).await;
    let outcomes = |ids: &[i64]| -> Vec<Write> {
        ids.iter().map(|&id| outcome(id, State::Approved)).collect()
    };
    // The writer plans its outcome statement once, while the journal is
    // small...
    let first = ids(journal::write_many(&one, &purchases(1..=20)).await.unwrap());
    journal::write_many(&one, &outcomes(&first)).await.unwrap();
    // ...and keeps the plan while 2,000 other requests are at the issuer.
    let waiting = ids(journal::write_many(&w.pool, &purchases(1001..=3000))
        .await
        .unwrap());
    assert_eq!(waiting.len(), 2000);
    let next = ids(journal::write_many(&one, &purchases(21..=40))
        .await
        .unwrap());
    let seen = LOGS.lock().unwrap().len();
    let ended = journal::write_many(&one, &outcomes(&next)).await.unwrap();
    assert!(ended.iter().all(|e| matches!(e, Wrote::Outcome(Some(_)))));
    // Twenty outcomes find their twenty rows by their ids: not by a pass
    // over every row in flight (nor the entries completed rows left in the
    // index of rows in flight).
    let (probes, read) = rows_read(seen, |l| l.contains("Scan") && l.contains("journal"));
    assert!(probes > 0, "the batch's plan was sent back");
    assert!(read <= 20, "{read} journal rows read to record 20 outcomes");
}

/// A world whose switch has stopped: the advice queue the test fills is
/// its own, no live advice loop takes from it.
async fn stopped_world() -> World {
    let mut w = world().await;
    w.shutdown.cancel();
    w.run.take().expect("running").await.unwrap();
    w
}

#[tokio::test]
async fn the_writers_reads_and_answers_do_not_grow_with_the_advice_queue() {
    use switch::journal::{self, Find, Write, Wrote};
    use switch::model::State;
    let w = stopped_world().await;
    let (one, _turn) = explained(&w).await;
    let sale = ids(journal::write_many(&one, &purchases(1..=1)).await.unwrap());
    journal::write_many(&one, &[outcome(sale[0], State::Approved)])
        .await
        .unwrap();
    let find = || {
        [Write::Find(Find::ByStan {
            merchant_id: MERCHANT.into(),
            terminal_id: "T0000001".into(),
            batch: 1,
            stan: 1,
            mti_class: 2,
        })]
    };
    // The writer plans its read and its answers to advices once, while
    // the advice queue is empty...
    journal::write_many(&one, &find()).await.unwrap();
    journal::answer_advices(&one, &[]).await.unwrap();
    // ...and keeps the plan while 2,000 reversals wait for an issuer that
    // is down and 2,000 more were delivered, none of them this sale's or
    // of the refund it has had since.
    sqlx::query(
        "WITH rows AS (
            INSERT INTO journal (id, rrn, terminal_id, merchant_id, batch, stan, mti, mti_class,
                 processing_code, kind, request_digest, state, business_date, original_id)
            SELECT id, lpad((id % 1000000000000)::text, 12, '0'), 'T0000002', $1, 1, g, 200, 2,
                 '000000', CASE WHEN g = 0 THEN 'refund' ELSE 'purchase' END, '\\x00',
                 CASE WHEN g = 0 THEN 'approved' ELSE 'unknown' END, current_date,
                 CASE WHEN g = 0 THEN $2 END
            FROM (SELECT g, nextval('journal_id_seq') AS id FROM generate_series(0, 4000) g) n
            RETURNING id, stan)
         INSERT INTO advices (journal_id, kind, mti, issuer, processing_code, pos_condition, amount,
             state)
         SELECT id, 'reversal', 420, 'sim', '000000', '00', 100,
             CASE WHEN stan <= 2000 THEN 'pending' ELSE 'done' END
         FROM rows WHERE stan > 0",
    )
    .bind(MERCHANT)
    .bind(sale[0])
    .execute(&w.pool)
    .await
    .unwrap();
    let seen = LOGS.lock().unwrap().len();
    let answers = journal::write_many(&one, &find()).await.unwrap();
    match &answers[..] {
        [Wrote::Found(originals)] => {
            assert_eq!(originals.iter().map(|o| o.id).collect::<Vec<_>>(), sale);
            assert!(!originals[0].family_pending);
        }
        other => panic!("one read: {other:?}"),
    }
    // Whether a reversal of the sale or of its refund is pending is a probe
    // by journal id each: not a pass over the queue.
    let (probes, read) = rows_read(seen, |l| l.contains(" on advices "));
    assert!(probes > 0, "the batch's plan was sent back");
    assert!(read < 20, "{read} advices read to find none pending");
    // An answer marks its advice done by the advice's id.
    let first: i64 = sqlx::query_scalar("SELECT min(id) FROM advices")
        .fetch_one(&w.pool)
        .await
        .unwrap();
    let seen = LOGS.lock().unwrap().len();
    let answer = journal::Answered {
        id: first,
        rc: "00".into(),
    };
    journal::answer_advices(&one, &[answer]).await.unwrap();
    let (probes, read) = rows_read(seen, |l| l.contains(" on advices "));
    assert!(probes > 0, "the batch's plan was sent back");
    assert!(read < 20, "{read} advices read to answer one");
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM advices WHERE state = 'pending'")
        .fetch_one(&w.pool)
        .await
        .unwrap();
    assert_eq!(pending, 1999);
}

#[tokio::test]
async fn taking_due_advices_does_not_grow_with_the_queue() {
    let w = stopped_world().await;
    let (one, _turn) = explained(&w).await;
    let lease = Duration::from_secs(10);
    // Planned while the queue is empty...
    let taken = switch::advice::take_due_from(&one, 50, lease, &["sim"])
        .await
        .unwrap();
    assert!(taken.is_empty());
    // ...then 2,000 reversals queued while the issuer was away, and after
    // them 20 refunds of their sales, each behind its sale's reversal.
    sqlx::query(
        "WITH sales AS (
            INSERT INTO journal (id, rrn, terminal_id, merchant_id, batch, stan, mti, mti_class,
                 processing_code, kind, request_digest, state, business_date)
            SELECT id, lpad((id % 1000000000000)::text, 12, '0'), 'T0000002', $1, 1, g, 200, 2,
                 '000000', 'purchase', '\\x00', 'unknown', current_date
            FROM (SELECT g, nextval('journal_id_seq') AS id FROM generate_series(1, 2000) g) n
            RETURNING id)
         INSERT INTO advices (journal_id, kind, mti, issuer, processing_code, pos_condition, amount)
         SELECT id, 'reversal', 420, 'sim', '000000', '00', 100 FROM sales",
    )
    .bind(MERCHANT)
    .execute(&w.pool)
    .await
    .unwrap();
    sqlx::query(
        "WITH refunds AS (
            INSERT INTO journal (id, rrn, terminal_id, merchant_id, batch, stan, mti, mti_class,
                 processing_code, kind, request_digest, state, business_date, original_id)
            SELECT id, lpad((id % 1000000000000)::text, 12, '0'), 'T0000003', $1, 1, stan, 220, 2,
                 '200000', 'refund', '\\x00', 'approved', current_date, sale
            FROM (SELECT nextval('journal_id_seq') AS id, stan, id AS sale FROM journal
                  WHERE terminal_id = 'T0000002' AND stan <= 20) s
            RETURNING id)
         -- Due before the reversals: only the family rule holds them back.
         INSERT INTO advices (journal_id, kind, mti, issuer, processing_code, pos_condition, amount,
             next_attempt_at)
         SELECT id, 'refund', 220, 'sim', '200000', '00', 100, now() - interval '1 hour' FROM refunds",
    )
    .bind(MERCHANT)
    .execute(&w.pool)
    .await
    .unwrap();
    let seen = LOGS.lock().unwrap().len();
    let taken = switch::advice::take_due_from(&one, 50, lease, &["sim"])
        .await
        .unwrap();
    assert_eq!(taken.len(), 50);
    // A refund waits for its sale's reversal.
    let refunds: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM advices WHERE kind = 'refund' AND next_attempt_at > now()",
    )
    .fetch_one(&w.pool)
    .await
    .unwrap();
    assert_eq!(refunds, 0, "a refund overtook its sale's reversal");
    // Fifty taken, and the twenty held back, by probes from each
    // candidate's own row: not a pass over the queue of 2,020.
    let (probes, read) = rows_read(seen, |l| {
        l.contains(" on advices ") || l.contains(" on journal ")
    });
    assert!(probes > 0, "the plan was sent back");
    assert!(read < 600, "{read} rows read to take 50 advices");
    // No advice is taken for an issuer whose link is not up.
    let none = switch::advice::take_due_from(&one, 50, lease, &["other"])
        .await
        .unwrap();
    assert!(none.is_empty());
}

#[tokio::test]
async fn a_days_check_carries_over_what_crosses_midnight_and_still_finds_breaks() {
    use switch::reconcile::{self, Break};
    let w = stopped_world().await;
    let day = chrono::NaiveDate::from_ymd_opt(2026, 3, 14).unwrap();
    // (terminal, stan, amount, received, completed), approved purchases:
    // posted before midnight; received before and answered after it; one
    // the issuer never posted; and one of the day before, reversed on the
    // day (its reversal advice answered then).
    for (stan, amount, received, completed) in [
        (1, 700, "2026-03-14 10:00:00", "2026-03-14 10:00:01"),
        (2, 500, "2026-03-14 23:59:59.5", "2026-03-15 00:00:00.3"),
        (3, 300, "2026-03-14 12:00:00", "2026-03-14 12:00:01"),
        (4, 200, "2026-03-13 23:00:00", "2026-03-13 23:00:01"),
    ] {
        sqlx::query(
            "INSERT INTO journal (id, rrn, terminal_id, merchant_id, batch, stan, mti, mti_class,
                 processing_code, kind, amount, request_digest, state, issuer, business_date,
                 received_at, completed_at)
             SELECT id, 'R' || lpad($2::text, 11, '0'), 'T0000005', $1, 1, $2, 200, 2, '000000',
                 'purchase', $3, '\\x00', CASE WHEN $2 = 4 THEN 'reversed' ELSE 'approved' END,
                 'sim', $4::timestamptz::date, $4::timestamptz, $5::timestamptz
             FROM (SELECT nextval('journal_id_seq') AS id) n",
        )
        .bind(MERCHANT)
        .bind(stan)
        .bind(amount)
        .bind(format!("{received}+00"))
        .bind(format!("{completed}+00"))
        .execute(&w.pool)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO advices (journal_id, kind, mti, issuer, processing_code, pos_condition, amount,
             state, response_code, done_at)
         SELECT id, 'reversal', 420, 'sim', '000000', '00', 200, 'done', '00',
             '2026-03-14 09:00:00+00' FROM journal WHERE stan = 4 AND terminal_id = 'T0000005'",
    )
    .execute(&w.pool)
    .await
    .unwrap();
    // The issuer's file of the day: the first purchase, and the reversal of
    // the day before's.
    let clearing = [
        ("R00000000001".to_string(), -700),
        ("R00000000004".to_string(), 200),
    ];
    let journal = reconcile::journal_effects(&w.pool, Some(day))
        .await
        .unwrap();
    let mut result = reconcile::compare(&journal, &clearing);
    let rrns: Vec<&str> = result.breaks.iter().map(Break::rrn).collect();
    let across = reconcile::across_midnight(&w.pool, day, &rrns)
        .await
        .unwrap();
    result.carry(&across);
    let carried: Vec<&str> = result.carried.iter().map(Break::rrn).collect();
    assert_eq!(carried, ["R00000000002", "R00000000004"]);
    // The one the issuer never posted is a break all the same.
    assert_eq!(
        result.breaks,
        [Break::MissingAtIssuer {
            rrn: "R00000000003".into(),
            expected: -300
        }]
    );
    assert!(!result.balanced_but_carried());
    // Without it, the day balances but for what it carried over, which a
    // day's file cannot decide: not balanced, and no break of its own.
    sqlx::query("UPDATE journal SET state = 'declined' WHERE rrn = 'R00000000003'")
        .execute(&w.pool)
        .await
        .unwrap();
    let journal = reconcile::journal_effects(&w.pool, Some(day))
        .await
        .unwrap();
    let mut result = reconcile::compare(&journal, &clearing);
    let rrns: Vec<&str> = result.breaks.iter().map(Break::rrn).collect();
    result.carry(
        &reconcile::across_midnight(&w.pool, day, &rrns)
            .await
            .unwrap(),
    );
    assert!(result.breaks.is_empty());
    assert!(result.balanced_but_carried(), "{result:?}");
    assert!(!result.balanced());
}

#[tokio::test]
async fn advices_for_an_issuer_not_in_the_config_stay_queued_untouched() {
    let w = stopped_world().await;
    // Two reversals queued before a restart: one for the configured issuer,
    // one for an issuer since removed from `[[issuers]]`.
    queue_reversals(&w.pool, "T0000004", &["sim", "gone"]).await;
    let (_s, _addr, restart) = w.another_switch().await;
    // The configured issuer's advice goes, in the same pass over the queue
    // that leaves the other...
    w.until(
        Duration::from_secs(15),
        "the configured issuer's advice to be answered",
        "SELECT state = 'done' FROM advices WHERE issuer = 'sim'",
    )
    .await;
    // ...untouched: no attempt spent, so its first real send is still 0420.
    let (state, attempts): (String, i32) =
        sqlx::query_as("SELECT state, attempts FROM advices WHERE issuer = 'gone'")
            .fetch_one(&w.pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), attempts), ("pending", 0));
    // And the operator is told at start-up.
    let logs = String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned();
    assert!(
        logs.lines()
            .any(|l| l.contains("not in [[issuers]]") && l.contains("issuer=\"gone\"")),
        "no start-up warning for the stray advice"
    );
    restart.cancel();
}

#[tokio::test]
async fn of_two_claims_on_one_original_in_one_batch_one_wins() {
    use switch::journal::{self, NewEntry, Row, Write, Wrote};
    use switch::model::{Kind, State};
    let w = world().await;
    let sale = match journal::write_many(
        &w.pool,
        &[Write::Request(Box::new(Row::of(&purchase(1), FORWARD)))],
    )
    .await
    .unwrap()
    .pop()
    {
        Some(Wrote::Request(Some(written))) => written.id,
        other => panic!("a new row: {other:?}"),
    };
    journal::write_many(&w.pool, &[outcome(sale, State::Approved)])
        .await
        .unwrap();
    let void = |stan| {
        Write::Request(Box::new(Row::of(
            &NewEntry {
                kind: Kind::Void,
                processing_code: "200000",
                original_id: Some(sale),
                claim: Some("voided"),
                ..purchase(stan)
            },
            FORWARD,
        )))
    };
    let answers = journal::write_many(&w.pool, &[void(2), void(3)])
        .await
        .unwrap();
    let claimed: Vec<bool> = answers
        .iter()
        .map(|a| match a {
            Wrote::Request(Some(written)) => written.claimed,
            other => panic!("both voids are journalled: {other:?}"),
        })
        .collect();
    assert_eq!(claimed.iter().filter(|c| **c).count(), 1, "{claimed:?}");
    let state: String = sqlx::query_scalar("SELECT state FROM journal WHERE id = $1")
        .bind(sale)
        .fetch_one(&w.pool)
        .await
        .unwrap();
    assert_eq!(state, "voided");
}

#[tokio::test]
async fn rows_and_outcomes_of_one_batch_each_get_their_own_answer() {
    use switch::journal::{self, Row, Write, Wrote};
    use switch::model::State;
    let w = world().await;
    let row = |stan| Write::Request(Box::new(Row::of(&purchase(stan), FORWARD)));
    let first = journal::write_many(&w.pool, &[row(1), row(2)])
        .await
        .unwrap();
    let ids: Vec<i64> = first
        .iter()
        .map(|r| match r {
            Wrote::Request(Some(w)) => w.id,
            other => panic!("a new row: {other:?}"),
        })
        .collect();
    // One statement: two outcomes (one of a row no longer sent), a new
    // row, a row whose key is taken and one for a closed batch.
    let mut closed = Row::of(&purchase(4), FORWARD);
    closed.batch = 2;
    let mixed = [
        outcome(ids[0], State::Approved),
        row(3),
        outcome(ids[1], State::Declined),
        row(1),
        Write::Request(Box::new(closed)),
    ];
    let answers = journal::write_many(&w.pool, &mixed).await.unwrap();
    assert!(matches!(&answers[0], Wrote::Outcome(Some(s)) if s == "approved"));
    assert!(
        matches!(&answers[1], Wrote::Request(Some(r)) if r.id > ids[1] && r.link_stan.is_some())
    );
    assert!(matches!(&answers[2], Wrote::Outcome(Some(s)) if s == "declined"));
    assert!(matches!(&answers[3], Wrote::Request(None)), "key taken");
    assert!(matches!(&answers[4], Wrote::Request(None)), "batch closed");
    let again = journal::write_many(&w.pool, &[outcome(ids[0], State::Declined)])
        .await
        .unwrap();
    assert!(matches!(&again[0], Wrote::Outcome(None)), "no longer sent");
    let states: Vec<String> =
        sqlx::query_scalar("SELECT state FROM journal WHERE terminal_id = 'T0000001' ORDER BY id")
            .fetch_all(&w.pool)
            .await
            .unwrap();
    assert_eq!(states, ["approved", "declined", "sent"]);
}

#[tokio::test]
async fn reads_of_originals_ride_in_a_batch_of_writes_each_with_its_own_answer() {
    use switch::journal::{self, Find, NewEntry, Row, Write, Wrote};
    use switch::model::{Kind, State};
    let w = world().await;
    let preauth = |stan| NewEntry {
        kind: Kind::PreAuth,
        processing_code: "030000",
        ..purchase(stan)
    };
    let first = journal::write_many(
        &w.pool,
        &[
            Write::Request(Box::new(Row::of(&purchase(1), FORWARD))),
            Write::Request(Box::new(Row::of(&preauth(2), FORWARD))),
            Write::Request(Box::new(Row::of(&preauth(3), FORWARD))),
        ],
    )
    .await
    .unwrap();
    let written: Vec<journal::Written> = first
        .into_iter()
        .map(|a| match a {
            Wrote::Request(Some(written)) => written,
            other => panic!("a new row: {other:?}"),
        })
        .collect();
    journal::write_many(
        &w.pool,
        &written
            .iter()
            .map(|r| outcome(r.id, State::Approved))
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let by_stan = |stan| {
        Write::Find(Find::ByStan {
            merchant_id: MERCHANT.into(),
            terminal_id: "T0000001".into(),
            batch: 1,
            stan,
            mti_class: 2,
        })
    };
    let by_rrn = |rrn: &str| {
        Write::Find(Find::ByRrn {
            rrn: rrn.into(),
            merchant_id: MERCHANT.into(),
        })
    };
    // One statement: a new row, reads by STAN, by RRN and of a card's
    // pre-authorisations, and reads that find nothing.
    let mixed = [
        by_stan(1),
        Write::Request(Box::new(Row::of(&purchase(4), FORWARD))),
        by_rrn(&written[0].rrn),
        Write::Find(Find::Preauths {
            auth_code: "123456".into(),
            pan_hash: [7; 32],
        }),
        by_stan(99),
        by_rrn("not an rrn"),
        Write::Find(Find::Preauths {
            auth_code: "123456".into(),
            pan_hash: [8; 32],
        }),
    ];
    let answers = journal::write_many(&w.pool, &mixed).await.unwrap();
    let found = |i: usize| match &answers[i] {
        Wrote::Found(originals) => originals.clone(),
        other => panic!("answer {i} is a read: {other:?}"),
    };
    let sale = found(0);
    assert_eq!(sale.len(), 1);
    assert_eq!(
        (sale[0].id, sale[0].kind.as_str(), sale[0].state.as_str()),
        (written[0].id, "purchase", "approved")
    );
    assert_eq!((sale[0].amount, sale[0].stan, sale[0].batch), (100, 1, 1));
    assert_eq!(sale[0].pan_hash.as_deref(), Some(&[7u8; 32][..]));
    assert_eq!(sale[0].link_stan, written[0].link_stan);
    assert!(!sale[0].family_pending);
    assert!(matches!(&answers[1], Wrote::Request(Some(_))));
    assert_eq!(
        found(2).iter().map(|o| o.id).collect::<Vec<_>>(),
        [written[0].id]
    );
    // Both pre-authorisations of the card, newest first.
    let holds = found(3);
    assert_eq!(
        holds.iter().map(|o| o.id).collect::<Vec<_>>(),
        [written[2].id, written[1].id]
    );
    assert!(
        holds
            .iter()
            .all(|o| o.auth_code.as_deref() == Some("123456"))
    );
    assert!(found(4).is_empty() && found(5).is_empty() && found(6).is_empty());
    // A read alone is a batch of one.
    let alone = journal::find(
        &w.pool,
        &Find::ByRrn {
            rrn: written[0].rrn.clone(),
            merchant_id: MERCHANT.into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(alone.len(), 1);
    assert_eq!(alone[0].id, written[0].id);
}

#[tokio::test]
async fn advices_of_one_batch_are_each_applied_to_their_own_original() {
    use switch::journal::{self, AdviceKind, Apply, Disposition, NewEntry, Row, Write, Wrote};
    use switch::model::{Kind, State};
    let w = world().await;
    let preauth = NewEntry {
        kind: Kind::PreAuth,
        processing_code: "030000",
        ..purchase(3)
    };
    let originals = ids(journal::write_many(
        &w.pool,
        &[
            Write::Request(Box::new(Row::of(&purchase(1), FORWARD))),
            Write::Request(Box::new(Row::of(&purchase(2), FORWARD))),
            Write::Request(Box::new(Row::of(&preauth, FORWARD))),
        ],
    )
    .await
    .unwrap());
    journal::write_many(
        &w.pool,
        &originals
            .iter()
            .map(|&id| outcome(id, State::Approved))
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    // Three advices journalled `received`: a partial refund, a refund of
    // more than is left, a completion.
    let advice = |stan, kind, amount, original| {
        Write::Request(Box::new(Row::of(
            &NewEntry {
                kind,
                mti: 220,
                processing_code: "200000",
                amount,
                original_id: Some(original),
                ..purchase(stan)
            },
            Disposition::Hold,
        )))
    };
    let rows = ids(journal::write_many(
        &w.pool,
        &[
            advice(11, Kind::Refund, 40, originals[0]),
            advice(12, Kind::Refund, 101, originals[1]),
            advice(13, Kind::CompletionAdvice, 90, originals[2]),
        ],
    )
    .await
    .unwrap());
    let apply = |i: usize, kind, amount| {
        Write::Apply(Apply {
            row_id: rows[i],
            original_id: originals[i],
            amount,
            kind,
            reply: vec![2, 48],
        })
    };
    // One statement: the three advices applied, beside a new request.
    let answers = journal::write_many(
        &w.pool,
        &[
            apply(0, AdviceKind::Refund, 40),
            Write::Request(Box::new(Row::of(&purchase(4), FORWARD))),
            apply(1, AdviceKind::Refund, 101),
            apply(2, AdviceKind::Completion, 90),
        ],
    )
    .await
    .unwrap();
    assert!(matches!(answers[0], Wrote::Applied(true)));
    assert!(matches!(answers[1], Wrote::Request(Some(_))));
    assert!(
        matches!(answers[2], Wrote::Applied(false)),
        "over the amount"
    );
    assert!(matches!(answers[3], Wrote::Applied(true)));
    let row = |id: i64| {
        let pool = w.pool.clone();
        async move {
            sqlx::query_as::<_, (String, i64, Option<Vec<u8>>)>(
                "SELECT state, refunded_amount::int8, reply FROM journal WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(
        row(originals[0]).await,
        ("partially_refunded".into(), 40, Some(vec![2, 16]))
    );
    assert_eq!(
        row(originals[1]).await,
        ("approved".into(), 0, Some(vec![2, 16]))
    );
    assert_eq!(row(originals[2]).await.0, "completed");
    assert_eq!(
        row(rows[0]).await,
        ("approved".into(), 0, Some(vec![2, 48]))
    );
    assert_eq!(
        row(rows[1]).await,
        ("received".into(), 0, None),
        "left to be decided"
    );
    assert_eq!(row(rows[2]).await.0, "approved");
    // Their 0220s are queued, each naming its original as the issuer knows it.
    let queued: Vec<(i64, String, i16, Option<i32>)> = sqlx::query_as(
        "SELECT journal_id, kind::text, mti, original_stan FROM advices ORDER BY journal_id",
    )
    .fetch_all(&w.pool)
    .await
    .unwrap();
    let link_stan = |id: i64| {
        let pool = w.pool.clone();
        async move {
            sqlx::query_scalar::<_, Option<i32>>("SELECT link_stan FROM journal WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        queued,
        [
            (rows[0], "refund".into(), 220, link_stan(originals[0]).await),
            (
                rows[2],
                "completion".into(),
                220,
                link_stan(originals[2]).await
            )
        ]
    );
}

#[tokio::test]
async fn reversals_of_one_batch_each_change_their_own_original() {
    use switch::journal::{self, Disposition, NewEntry, Reversal, ReversalStep, Row, Write, Wrote};
    use switch::model::{Kind, State};
    let w = world().await;
    let write = |writes: Vec<Write>| {
        let pool = w.pool.clone();
        async move { journal::write_many(&pool, &writes).await.unwrap() }
    };
    let row = |e: &NewEntry<'_>, d| Write::Request(Box::new(Row::of(e, d)));
    // A sale and its approved void; a sale still at the issuer; a sale
    // approved, and one declined.
    let sales = ids(write(vec![
        row(&purchase(1), FORWARD),
        row(&purchase(2), FORWARD),
        row(&purchase(3), FORWARD),
        row(&purchase(4), FORWARD),
    ])
    .await);
    write(vec![
        outcome(sales[0], State::Approved),
        outcome(sales[2], State::Approved),
        outcome(sales[3], State::Declined),
    ])
    .await;
    let void = NewEntry {
        kind: Kind::Void,
        processing_code: "200000",
        original_id: Some(sales[0]),
        claim: Some("voided"),
        ..purchase(5)
    };
    let void = ids(write(vec![row(&void, FORWARD)]).await)[0];
    write(vec![outcome(void, State::Approved)]).await;
    // Five reversals, journalled `received`.
    let reversal = |stan| NewEntry {
        kind: Kind::Reversal,
        mti: 400,
        ..purchase(stan)
    };
    let rows = ids(write(
        (11..=15)
            .map(|s| row(&reversal(s), Disposition::Hold))
            .collect(),
    )
    .await);
    let decided = |i: usize, rule, original: Option<i64>, step| {
        Write::Reversal(Reversal {
            row: rows[i],
            rule,
            original,
            reply: Some(vec![4, 16 + i as u8]),
            step,
        })
    };
    // One statement: the void reversed (its sale approved again), the sale
    // at the issuer marked, nothing to reverse, a declined sale, and a
    // reversal of a sale no longer approved (it was, when read).
    let answers = write(vec![
        decided(0, "R2", Some(void), ReversalStep::Reverse("06")),
        decided(1, "R3", Some(sales[1]), ReversalStep::Mark),
        outcome(sales[2], State::Declined),
        decided(2, "R3", None, ReversalStep::Approve),
        decided(3, "R3", Some(sales[3]), ReversalStep::Approve),
        decided(4, "R2", Some(sales[1]), ReversalStep::Reverse("68")),
    ])
    .await;
    assert!(matches!(answers[0], Wrote::Reversed(true)));
    assert!(matches!(answers[1], Wrote::Reversed(true)));
    assert!(matches!(answers[2], Wrote::Outcome(None)), "not sent");
    assert!(matches!(answers[3], Wrote::Reversed(true)));
    assert!(matches!(answers[4], Wrote::Reversed(true)));
    assert!(matches!(answers[5], Wrote::Reversed(false)), "still sent");
    let state = |id: i64| {
        let pool = w.pool.clone();
        async move {
            sqlx::query_as::<_, (String, bool, Option<i64>, Option<String>)>(
                "SELECT state, reversal_requested, original_id, rule FROM journal WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(state(void).await.0, "reversed");
    assert_eq!(state(sales[0]).await.0, "approved", "the void's sale");
    assert_eq!(state(sales[1]).await.0, "sent");
    assert!(state(sales[1]).await.1, "marked: reversed on arrival");
    assert_eq!(
        state(rows[0]).await,
        ("approved".into(), false, Some(void), Some("R2".into()))
    );
    assert_eq!(
        state(rows[1]).await,
        ("approved".into(), false, Some(sales[1]), Some("R3".into()))
    );
    assert_eq!(
        state(rows[2]).await,
        ("approved".into(), false, None, Some("R3".into()))
    );
    assert_eq!(state(rows[3]).await.0, "approved");
    assert_eq!(state(rows[4]).await.0, "received", "left to be read again");
    // Only the reversed void goes to the issuer, with its own reason.
    let queued: Vec<(i64, String, Option<String>)> =
        sqlx::query_as("SELECT journal_id, kind::text, reason FROM advices")
            .fetch_all(&w.pool)
            .await
            .unwrap();
    assert_eq!(queued, [(void, "reversal".into(), Some("06".into()))]);
}

#[tokio::test]
async fn a_reversal_decided_by_another_meanwhile_changes_nothing() {
    use switch::journal::{self, Disposition, NewEntry, Reversal, ReversalStep, Row, Write, Wrote};
    use switch::model::{Kind, ResponseCode, State};
    let w = world().await;
    let write = |writes: Vec<Write>| {
        let pool = w.pool.clone();
        async move { journal::write_many(&pool, &writes).await.unwrap() }
    };
    let row = |e: &NewEntry<'_>, d| Write::Request(Box::new(Row::of(e, d)));
    let sale = ids(write(vec![row(&purchase(21), FORWARD)]).await)[0];
    write(vec![outcome(sale, State::Approved)]).await;
    let reversal = NewEntry {
        kind: Kind::Reversal,
        mti: 400,
        ..purchase(21)
    };
    let reversal = ids(write(vec![row(&reversal, Disposition::Hold)]).await)[0];
    // The recovery sweep took the row over from a slow switch and refused
    // it (S1: its batch settled meanwhile)...
    assert!(
        journal::decide(
            &w.pool,
            reversal,
            "S1",
            ResponseCode::INVALID_TRANSACTION,
            None
        )
        .await
        .unwrap()
    );
    // ...then the slow switch's decision, made from the sale as it read it,
    // reaches the journal: it must not reverse the settled sale.
    let answers = write(vec![Write::Reversal(Reversal {
        row: reversal,
        rule: "R2",
        original: Some(sale),
        reply: Some(vec![4, 16]),
        step: ReversalStep::Reverse("68"),
    })])
    .await;
    assert!(matches!(answers[0], Wrote::Reversed(false)));
    let states: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, state::text FROM journal WHERE id IN ($1, $2) ORDER BY id")
            .bind(sale)
            .bind(reversal)
            .fetch_all(&w.pool)
            .await
            .unwrap();
    assert_eq!(
        states,
        [(sale, "approved".into()), (reversal, "declined".into())]
    );
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM advices")
        .fetch_one(&w.pool)
        .await
        .unwrap();
    assert_eq!(queued, 0, "no 0420 for the issuer");
}

#[tokio::test]
async fn idle_and_half_sent_connections_are_closed_busy_ones_are_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = world_with(|c| {
        c.limits.idle_timeout = Duration::from_millis(600);
        c.limits.frame_timeout = Duration::from_millis(200);
    })
    .await;
    /// How long from `started` until the switch closes `s` (reading and
    /// dropping anything). `started` is taken before the switch's timer can
    /// have started (before connecting, before writing), not when this is
    /// first polled: the sign-on of the busy terminal comes in between.
    async fn closed_after(
        s: &mut tokio::net::TcpStream,
        started: tokio::time::Instant,
    ) -> Duration {
        let mut buf = [0u8; 512];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
                .await
                .expect("closed in time")
                .unwrap_or(0);
            if n == 0 {
                return started.elapsed();
            }
        }
    }
    // Idle: closed after the idle timeout.
    let idle_since = tokio::time::Instant::now();
    let mut idle = tokio::net::TcpStream::connect(&w.switch_addr)
        .await
        .unwrap();
    // Half a frame: closed after the frame timeout, well before the idle one.
    let half_connected = tokio::time::Instant::now();
    let mut half = tokio::net::TcpStream::connect(&w.switch_addr)
        .await
        .unwrap();
    let half_since = tokio::time::Instant::now();
    half.write_all(&[0x00, 0x40, 0x60, 0x00]).await.unwrap();
    // Busy: a keep-alive every 150 ms for twice the idle timeout, then a
    // sign-on that is answered.
    let mut busy = w.signed_on("T0000001").await;
    let keep_busy = async {
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            busy.keep_alive().await.unwrap();
        }
        busy.sign_on().await.unwrap()
    };
    let (idle_after, half_after, reply) = tokio::join!(
        closed_after(&mut idle, idle_since),
        closed_after(&mut half, half_since),
        keep_busy
    );
    // The switch's timers start after these instants, so the lower bounds
    // hold however slow the machine is.
    assert!(
        idle_after >= Duration::from_millis(600) && idle_after < Duration::from_secs(3),
        "idle closed after {idle_after:?}"
    );
    assert!(
        half_after >= Duration::from_millis(200),
        "half a frame closed after {half_after:?}"
    );
    // The idle timeout would close it no earlier than 600 ms after it was
    // opened: closed before that, it was the frame timeout.
    let half_open = half_since + half_after - half_connected;
    assert!(
        half_open < Duration::from_millis(600),
        "half a frame closed {half_open:?} after connecting: by the idle timeout"
    );
    assert_eq!(reply.rc(), "00", "a busy connection stays open");
}
