//! The simulated issuer end to end: a fresh PostgreSQL database per test,
//! the server on a real TCP port 0, and raw iso87 frames built with
//! `MessageWriter`, as the switch sends them. No sleep synchronises
//! anything: tests wait on replies, on end of stream, or on the fault
//! counters; timeouts are only upper bounds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use iso8583::{Dialect, FieldType, Frame, FrameCodec, Message, MessageWriter, Mti, Pan};
use issuer_sim::{
    CLEARING_HEADER, CardBalance, ConfigError, Error, Issuer, IssuerConfig, PanKey, Totals,
    balance, balances, clearing, migrate, run, seed_cards,
};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

/// What the issuer logged, every test's (installed by [`capture_logs`]).
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
            .with_max_level(tracing::Level::INFO)
            .with_writer(|| Captured)
            .with_ansi(false)
            .init();
    });
}

/// Upper bound on any wait; a healthy run takes milliseconds.
const PATIENCE: Duration = Duration::from_secs(30);

/// Cards: 100 ordinary ones (1 000 yuan, limit 500 yuan), a blocked one, an
/// expired one. Four batches of authorisations, and four of follow-ons, at
/// the database at once.
const CARDS: &str = r#"
institution_id = "62220200"
[limits]
batches_in_flight = 4
# A batch goes at once: the tests that catch batches in flight hold their
# slots with single messages.
batch_delay = "0s"

[[cards]]
first = "6222020000000000001"
last = "6222020000000000100"
expiry = "3012"
balance = 100000
limit = 50000

[[cards]]
first = "6222029000000000001"
last = "6222029000000000001"
status = "blocked"

[[cards]]
first = "6222029000000000004"
last = "6222029000000000004"
expiry = "2001"
"#;

const ACQUIRER: &str = "48560000";
const FORWARDER: &str = "48561000";
const F7: &str = "0615123045";

fn pan(n: u32) -> String {
    format!("62220200000000{n:05}")
}

// ---------------------------------------------------------------- harness

struct Sim {
    pool: PgPool,
    key: PanKey,
    issuer: Arc<Issuer>,
    addr: SocketAddr,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), Error>>,
}

impl Sim {
    async fn start() -> Sim {
        Sim::start_with(CARDS).await
    }

    /// A sim of its own database with `config` (cards and limits).
    async fn start_with(config: &str) -> Sim {
        let url = embedded_pg::test_database().await;
        Sim::start_on(
            PgConnectOptions::from_str(&url).expect("a database URL"),
            None,
            config,
        )
        .await
    }

    /// A sim whose issuer reaches PostgreSQL through a relay that counts the
    /// statements it sends.
    async fn start_counting() -> (Sim, Arc<AtomicUsize>) {
        let url = embedded_pg::test_database().await;
        let options = PgConnectOptions::from_str(&url).expect("a database URL");
        let (relayed, statements) = counting_relay(&options).await;
        (
            Sim::start_on(options, Some(relayed), CARDS).await,
            statements,
        )
    }

    /// The test's own queries go to `options`, the issuer's to `issuer`
    /// when given, else to the same pool.
    async fn start_on(
        options: PgConnectOptions,
        issuer: Option<PgConnectOptions>,
        config: &str,
    ) -> Sim {
        let pool = PgPoolOptions::new()
            .max_connections(24)
            .connect_with(options)
            .await
            .expect("test database");
        migrate(&pool).await.expect("migrations");
        let issuer_pool = issuer.map_or_else(
            || pool.clone(),
            |options| {
                PgPoolOptions::new()
                    .max_connections(24)
                    .connect_lazy_with(options)
            },
        );
        let config = IssuerConfig::from_toml(config, "cards.toml").expect("valid config");
        let key = PanKey::random();
        let seeded = seed_cards(&pool, &key, &config.cards).await.unwrap();
        assert_eq!(seeded, 102);
        let issuer = Arc::new(Issuer::new(config, key.clone(), issuer_pool));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(run(listener, issuer.clone(), shutdown.clone()));
        Sim {
            pool,
            key,
            issuer,
            addr,
            shutdown,
            server,
        }
    }

    async fn connect(&self) -> Conn {
        Conn {
            stream: TcpStream::connect(self.addr).await.unwrap(),
            buf: BytesMut::new(),
            codec: FrameCodec::new(&Dialect::iso87(), 2048),
            dialect: Dialect::iso87(),
        }
    }

    async fn card(&self, n: u32) -> CardBalance {
        balance(&self.pool, &self.key, &Pan::new(&pan(n)).unwrap())
            .await
            .unwrap()
            .expect("a seeded card")
    }

    async fn totals(&self) -> Totals {
        balances(&self.pool).await.unwrap()
    }

    /// Stops the server; it must return once its connections are done.
    async fn stop(self) {
        let totals = self.totals().await;
        assert!(totals.consistent(), "books out of balance: {totals:?}");
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.server)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }
}

/// One switch connection.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    codec: FrameCodec,
    dialect: Dialect,
}

/// A reply, its fields in clear.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    mti: String,
    fields: BTreeMap<usize, String>,
}

impl Reply {
    fn f(&self, n: usize) -> Option<&str> {
        self.fields.get(&n).map(String::as_str)
    }

    fn rc(&self) -> &str {
        self.f(39).expect("every reply has F39")
    }

    fn numbers(&self) -> Vec<usize> {
        self.fields.keys().copied().collect()
    }
}

impl Conn {
    async fn send(&mut self, frame: &[u8]) {
        self.stream.write_all(frame).await.unwrap();
    }

    /// The next frame, or `None` at end of stream.
    async fn next_frame(&mut self) -> Option<Bytes> {
        loop {
            match self.codec.decode(&mut self.buf).expect("frames") {
                Some(Frame::Message(body)) => return Some(body),
                Some(Frame::KeepAlive) => continue,
                None => {}
            }
            let n = tokio::time::timeout(PATIENCE, self.stream.read_buf(&mut self.buf))
                .await
                .expect("a reply in time")
                .unwrap();
            if n == 0 {
                return None;
            }
        }
    }

    async fn recv(&mut self) -> Reply {
        let body = self.next_frame().await.expect("a reply, not end of stream");
        let msg = Message::parse(&self.dialect, &body).expect("the reply parses");
        Reply {
            mti: msg.mti().to_string(),
            fields: msg
                .fields()
                .map(|(n, v)| (n, v.to_clear_string()))
                .collect(),
        }
    }

    async fn exchange(&mut self, req: &Req) -> Reply {
        self.send(&req.frame()).await;
        let reply = self.recv().await;
        assert_eq!(
            reply.f(11),
            req.fields.get(&11).map(String::as_str),
            "matched by F11"
        );
        reply
    }

    /// Reads to end of stream; returns the bytes that came.
    async fn drain(&mut self) -> Vec<u8> {
        let mut rest = self.buf.to_vec();
        tokio::time::timeout(PATIENCE, self.stream.read_to_end(&mut rest))
            .await
            .expect("end of stream in time")
            .unwrap();
        rest
    }
}

/// A network request as the switch builds it: fields by number, in clear
/// (`b` fields in hex).
#[derive(Debug, Clone)]
struct Req {
    mti: Mti,
    fields: BTreeMap<usize, String>,
}

impl Req {
    fn new(mti: &str, stan: u32) -> Req {
        let mut fields = BTreeMap::new();
        fields.insert(7, F7.to_string());
        fields.insert(11, format!("{stan:06}"));
        fields.insert(32, ACQUIRER.to_string());
        fields.insert(33, FORWARDER.to_string());
        fields.insert(37, format!("{:012}", 100_000 + stan));
        fields.insert(41, "TERM0001".to_string());
        fields.insert(42, "898100012345678".to_string());
        Req {
            mti: mti.parse().unwrap(),
            fields,
        }
    }

    fn with(mut self, n: usize, value: impl Into<String>) -> Req {
        self.fields.insert(n, value.into());
        self
    }

    fn without(mut self, n: usize) -> Req {
        self.fields.remove(&n);
        self
    }

    fn rrn(&self) -> &str {
        &self.fields[&37]
    }

    /// F90 naming this message.
    fn f90(&self) -> String {
        format!(
            "{}{}{}{:0>11}{:0>11}",
            self.mti, self.fields[&11], self.fields[&7], self.fields[&32], self.fields[&33]
        )
    }

    fn frame(&self) -> Bytes {
        let dialect = Dialect::iso87();
        let mut buf = BytesMut::new();
        let mut w = MessageWriter::new(&dialect, &mut buf, self.mti, &[], &[]).unwrap();
        for (&n, v) in &self.fields {
            match dialect.field(n).unwrap().ty {
                FieldType::Numeric | FieldType::Track => w.digits(n, v),
                FieldType::Binary => w.binary(n, &hex::decode(v).unwrap()),
                _ => w.text(n, v),
            }
            .unwrap();
        }
        w.finish().unwrap();
        buf.freeze()
    }
}

/// A TCP relay in front of PostgreSQL for the issuer's connections, counting
/// the statements they send: simple queries (BEGIN and COMMIT are these) and
/// Execute messages of the extended protocol. Preparing a statement and the
/// pool's ping on acquiring a connection (a bare Sync) are not statements.
/// Returns the options to connect through it (without TLS, which would hide
/// the messages).
async fn counting_relay(server: &PgConnectOptions) -> (PgConnectOptions, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relayed = server
        .clone()
        .host("127.0.0.1")
        .port(listener.local_addr().unwrap().port())
        .ssl_mode(PgSslMode::Disable);
    let upstream = format!("{}:{}", server.get_host(), server.get_port());
    let statements = Arc::new(AtomicUsize::new(0));
    let counted = statements.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(&upstream).await.unwrap();
            let (mut from_server, mut to_server) = server.into_split();
            let (mut from_client, mut to_client) = client.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut from_server, &mut to_client).await });
            let counted = counted.clone();
            tokio::spawn(async move {
                // Until the startup message, messages have no type byte.
                let (mut started, mut pending, mut chunk) = (false, BytesMut::new(), [0; 8192]);
                loop {
                    let n = match from_client.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&chunk[..n]);
                    loop {
                        let head = usize::from(started);
                        let Some(len) = pending.get(head..head + 4) else {
                            break;
                        };
                        let len = head + u32::from_be_bytes(len.try_into().unwrap()) as usize;
                        if pending.len() < len {
                            break;
                        }
                        let message = pending.split_to(len);
                        if !started {
                            // An SSLRequest or GSSENCRequest is followed by
                            // the startup message proper.
                            started =
                                !matches!(&message[4..8], [4, 210, 22, 47] | [4, 210, 22, 48]);
                        } else if matches!(message[0], b'Q' | b'E') {
                            counted.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    // Counted before PostgreSQL can answer them.
                    if to_server.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (relayed, statements)
}

fn purchase(stan: u32, card: u32, amount: u64) -> Req {
    Req::new("0200", stan)
        .with(2, pan(card))
        .with(3, "000000")
        .with(4, format!("{amount:012}"))
        .with(22, "021")
        .with(25, "00")
        .with(49, "156")
        .with(52, "0123456789ABCDEF")
}

fn follow_on(mti: &str, stan: u32, f3: &str, f25: &str, amount: u64, original: &Req) -> Req {
    Req::new(mti, stan)
        .with(3, f3)
        .with(4, format!("{amount:012}"))
        .with(25, f25)
        .with(90, original.f90())
}

fn void(stan: u32, amount: u64, original: &Req) -> Req {
    follow_on("0200", stan, "200000", "00", amount, original).with(2, original.fields[&2].clone())
}

fn refund(stan: u32, amount: u64, original: &Req) -> Req {
    follow_on("0220", stan, "200000", "00", amount, original)
}

fn preauth(stan: u32, card: u32, amount: u64) -> Req {
    Req::new("0100", stan)
        .with(2, pan(card))
        .with(3, "030000")
        .with(4, format!("{amount:012}"))
        .with(25, "06")
}

fn reversal(stan: u32, original: &Req) -> Req {
    Req::new("0420", stan)
        .with(3, original.fields[&3].clone())
        .with(4, original.fields[&4].clone())
        .with(25, original.fields[&25].clone())
        .with(39, "68")
        .with(90, original.f90())
}

fn echo(stan: u32) -> Req {
    Req::new("0800", stan).with(70, "301")
}

/// Holds the row lock of card `n` in a transaction of its own, so that
/// whatever touches the card waits: the way to catch a message while it is
/// still being decided.
async fn hold_card(sim: &Sim, n: u32) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = sim.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM issuer.cards WHERE pan_hash = $1 FOR UPDATE")
        .bind(sim.key.hash(&Pan::new(&pan(n)).unwrap()).to_vec())
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// Waits until `n` sessions of the test database wait on a lock (a
/// condition, re-checked; the bound is only an upper bound).
async fn until_waiting_on_locks(sim: &Sim, n: i64) {
    let check = async {
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&sim.pool)
            .await
            .unwrap();
            if waiting >= n {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(PATIENCE, check)
        .await
        .unwrap_or_else(|_| panic!("{n} sessions never waited on locks"));
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purchase_is_approved_debited_and_answered_with_the_contract_fields() {
    let sim = Sim::start().await;
    let mut link = sim.connect().await;
    let req = purchase(1, 1, 12_345).with(14, "3012");
    let reply = link.exchange(&req).await;
    assert_eq!(reply.mti, "0210");
    assert_eq!(reply.rc(), "00");
    assert_eq!(
        reply.numbers(),
        [3, 4, 7, 11, 32, 33, 37, 38, 39, 41, 42],
        "echoes and F38/F39, never F2, F35 or F52"
    );
    for n in [3, 4, 7, 11, 32, 33, 37, 41, 42] {
        assert_eq!(reply.f(n), Some(req.fields[&n].as_str()), "F{n} echoed");
    }
    let auth = reply.f(38).unwrap();
    assert!(auth.len() == 6 && auth.bytes().all(|b| b.is_ascii_digit()));
    let card = sim.card(1).await;
    assert_eq!(
        (card.opening, card.balance, card.held),
        (100_000, 87_655, 0)
    );
    assert_eq!(card.pan, "622202*********0001");
    sim.stop().await;
}

#[tokio::test]
async fn the_issuer_logs_how_its_authorisations_were_batched() {
    capture_logs();
    // Other sims log every 60 s: this one's lines are its own.
    let every = "authorisation batches, last 250ms: ";
    let sim =
        Sim::start_with(&CARDS.replace("[limits]\n", "[limits]\nstats_interval = \"250ms\"\n"))
            .await;
    let mut link = sim.connect().await;
    for (stan, card) in [(1, 1), (2, 2), (3, 3)] {
        let reply = link.exchange(&purchase(stan, card, 100)).await;
        assert_eq!(reply.rc(), "00");
    }
    // Three authorisations, in one or more intervals: the lines add up to
    // them.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let (mut batches, mut authorisations) = (0.0, 0.0);
    while authorisations < 3.0 - 1e-6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{authorisations} authorisations logged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let logs = String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned();
        (batches, authorisations) = (0.0, 0.0);
        for line in logs
            .lines()
            .filter_map(|l| l.split_once(every).map(|(_, r)| r))
        {
            // "N batches of M authorisations, T ms each, busy P % of the time"
            let words: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(words[1..3], ["batches", "of"], "{line}");
            assert_eq!(words[4], "authorisations,", "{line}");
            assert!(line.ends_with("% of the time"), "{line}");
            let n: f64 = words[0].parse().unwrap();
            let per: f64 = words[3].parse().unwrap();
            assert!(n >= 1.0 && per >= 1.0, "{line}");
            batches += n;
            // The size is rounded to a tenth: a line's authorisations are whole.
            authorisations += (n * per).round();
        }
    }
    assert_eq!(authorisations, 3.0, "no more than were sent");
    assert!(
        batches <= authorisations,
        "{batches} batches of {authorisations}"
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_decline_names_its_reason_and_moves_no_money() {
    let sim = Sim::start().await;
    let mut link = sim.connect().await;
    let blocked = purchase(1, 1, 100).with(2, "6222029000000000001");
    let expired_card = purchase(2, 1, 100).with(2, "6222029000000000004");
    let cases = [
        (purchase(3, 99_999, 100), "14", "unknown card"),
        (blocked, "62", "blocked card"),
        (expired_card, "54", "card expired"),
        (purchase(4, 2, 100).with(14, "2001"), "54", "F14 expired"),
        (
            purchase(5, 2, 100)
                .without(2)
                .with(35, format!("{}=20011011234", pan(2))),
            "54",
            "track expiry in the past",
        ),
        (purchase(6, 2, 50_001), "61", "above the card's limit"),
        (purchase(7, 2, 0), "13", "zero amount"),
        (
            purchase(8, 2, 100).with(3, "990000"),
            "12",
            "unknown processing code",
        ),
        (purchase(9, 2, 100).without(32), "30", "no acquirer"),
        (purchase(10, 2, 100).without(25), "30", "no condition code"),
        (
            void(11, 100, &purchase(999, 2, 100)),
            "25",
            "void of nothing",
        ),
    ];
    for (req, code, why) in &cases {
        let reply = link.exchange(req).await;
        assert_eq!(reply.rc(), *code, "{why}");
        assert_eq!(reply.f(38), None, "{why}: no auth code");
    }
    // Insufficient funds: two purchases of the limit empty the card.
    assert_eq!(link.exchange(&purchase(20, 3, 50_000)).await.rc(), "00");
    assert_eq!(link.exchange(&purchase(21, 3, 50_000)).await.rc(), "00");
    assert_eq!(link.exchange(&purchase(22, 3, 1)).await.rc(), "51");
    assert_eq!(sim.card(2).await.balance, 100_000);
    assert_eq!(sim.card(3).await.balance, 0);
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_inquiry_answers_the_available_balance_in_f54() {
    let sim = Sim::start().await;
    let mut link = sim.connect().await;
    let inquiry = |stan| {
        Req::new("0200", stan)
            .with(3, "310000")
            .with(25, "00")
            .with(35, format!("{}=30121011234", pan(5)))
    };
    let reply = link.exchange(&inquiry(1)).await;
    assert_eq!((reply.mti.as_str(), reply.rc()), ("0210", "00"));
    assert_eq!(reply.f(54), Some("1002156C000000100000"));
    assert_eq!(reply.f(38), None);
    assert_eq!(reply.numbers(), [3, 7, 11, 32, 33, 37, 39, 41, 42, 54]);
    assert_eq!(link.exchange(&preauth(2, 5, 30_000)).await.rc(), "00");
    let reply = link.exchange(&inquiry(3)).await;
    assert_eq!(
        reply.f(54),
        Some("1002156C000000070000"),
        "holds are not available"
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_purchase_is_posted_once_sequentially_and_concurrently() {
    let sim = Sim::start().await;
    let mut link = sim.connect().await;

    // Sequential repeat: the same reply, one debit.
    let req = purchase(1, 1, 1_000);
    let first = link.exchange(&req).await;
    let again = link.exchange(&req).await;
    assert_eq!(first, again);
    assert_eq!(sim.card(1).await.balance, 99_000);

    // Concurrent repeats: 8 copies in one burst on one connection and 4 on
    // each of two others, all while the first is still being decided (the
    // card is held: the first waits on it, and so do the copies that went to
    // the database in the other batches in flight; the rest queue for
    // batches of their own, as two writes to one card never share a batch).
    let req = purchase(2, 2, 2_000);
    let frame = req.frame();
    let burst: Vec<u8> = (0..8).flat_map(|_| frame.to_vec()).collect();
    let mut others = [sim.connect().await, sim.connect().await];
    let held = hold_card(&sim, 2).await;
    link.send(&burst).await;
    for other in &mut others {
        for _ in 0..4 {
            other.send(&frame).await;
        }
    }
    until_waiting_on_locks(&sim, 2).await;
    held.commit().await.unwrap();
    let mut replies = Vec::new();
    for _ in 0..8 {
        replies.push(link.recv().await);
    }
    for other in &mut others {
        for _ in 0..4 {
            replies.push(other.recv().await);
        }
    }
    assert!(replies.iter().all(|r| *r == replies[0]), "{replies:#?}");
    assert_eq!(replies[0].rc(), "00");
    assert_eq!(sim.card(2).await.balance, 98_000, "debited once");

    // The same key with other content is not a repeat: 94, nothing posted.
    let reply = link.exchange(&purchase(2, 2, 2_001)).await;
    assert_eq!(reply.rc(), "94");
    assert_eq!(sim.card(2).await.balance, 98_000);
    let postings: i64 = sqlx::query_scalar("SELECT count(*) FROM issuer.postings")
        .fetch_one(&sim.pool)
        .await
        .unwrap();
    assert_eq!(postings, 2);
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_advice_is_applied_once_even_when_repeated_as_0421() {
    let sim = Sim::start().await;
    let mut link = sim.connect().await;
    let original = purchase(1, 1, 7_000);
    assert_eq!(link.exchange(&original).await.rc(), "00");
    assert_eq!(sim.card(1).await.balance, 93_000);

    let advice = reversal(2, &original);
    let reply = link.exchange(&advice).await;
    assert_eq!((reply.mti.as_str(), reply.rc()), ("0430", "00"));
    assert_eq!(reply.numbers(), [3, 4, 7, 11, 32, 33, 37, 39, 41, 42]);
    assert_eq!(sim.card(1).await.balance, 100_000);

    let mut repeat = advice.clone();
    repeat.mti = "0421".parse().unwrap();
    let reply = link.exchange(&repeat).await;
    assert_eq!((reply.mti.as_str(), reply.rc()), ("0430", "00"));
    // Another advice for the same original (say, from a restarted switch).
    assert_eq!(link.exchange(&reversal(3, &original)).await.rc(), "00");
    assert_eq!(sim.card(1).await.balance, 100_000, "credited back once");
    // A reversed purchase cannot be voided.
    assert_eq!(link.exchange(&void(4, 7_000, &original)).await.rc(), "12");
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_that_overtakes_its_original_keeps_it_from_being_posted() {
    let sim = Sim::start().await;
    let mut link = sim.connect().await;
    let original = purchase(1, 1, 7_000);
    assert_eq!(link.exchange(&reversal(2, &original)).await.rc(), "00");
    let reply = link.exchange(&original).await;
    assert_eq!((reply.mti.as_str(), reply.rc()), ("0210", "68"));
    assert_eq!(reply.f(38), None);
    assert_eq!(
        link.exchange(&original).await.rc(),
        "68",
        "and so is its repeat"
    );
    assert_eq!(sim.card(1).await.balance, 100_000, "never posted");

    // The same for a pre-authorisation: no hold.
    let hold = preauth(3, 2, 5_000);
    assert_eq!(link.exchange(&reversal(4, &hold)).await.rc(), "00");
    assert_eq!(link.exchange(&hold).await.rc(), "68");
    assert_eq!(sim.card(2).await.held, 0);

    // A reversal arriving while its original waits for its card (a new
    // authorisation locks the card before it claims its key) comes first:
    // it is answered at once, and the original is declined, never posted.
    let original = purchase(5, 3, 9_000);
    let held = hold_card(&sim, 3).await;
    link.send(&original.frame()).await;
    until_waiting_on_locks(&sim, 1).await;
    let mut other = sim.connect().await;
    other.send(&reversal(6, &original).frame()).await;
    assert_eq!(other.recv().await.rc(), "00");
    held.commit().await.unwrap();
    assert_eq!(link.recv().await.rc(), "68");
    assert_eq!(sim.card(3).await.balance, 100_000, "never posted");

    let original = purchase(1, 1, 7_000);
    let (state, reversed): (String, bool) = sqlx::query_as(
        "SELECT state, reversed FROM issuer.postings WHERE rrn = $1 AND kind = 'purchase'",
    )
    .bind(original.rrn())
    .fetch_one(&sim.pool)
    .await
    .unwrap();
    assert_eq!((state.as_str(), reversed), ("declined", true));
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voids_refunds_and_preauthorisations_move_the_money_exactly() {
    let sim = Sim::start().await;
    let mut link = sim.connect().await;
    let mut stan = 0;
    let mut next = || {
        stan += 1;
        stan
    };

    // Void: the full amount back, once; not twice, not another amount.
    let p = purchase(next(), 1, 10_000);
    assert_eq!(link.exchange(&p).await.rc(), "00");
    assert_eq!(link.exchange(&void(next(), 9_999, &p)).await.rc(), "64");
    let v = void(next(), 10_000, &p);
    let reply = link.exchange(&v).await;
    assert_eq!(reply.rc(), "00");
    assert!(reply.f(38).is_some());
    assert_eq!(sim.card(1).await.balance, 100_000);
    assert_eq!(link.exchange(&void(next(), 10_000, &p)).await.rc(), "12");
    let other_card = void(next(), 10_000, &p).with(2, pan(9));
    assert_eq!(
        link.exchange(&other_card).await.rc(),
        "12",
        "already voided"
    );
    // A reversal of the void debits again and revives the purchase.
    assert_eq!(link.exchange(&reversal(next(), &v)).await.rc(), "00");
    assert_eq!(sim.card(1).await.balance, 90_000);
    let wrong_card = void(next(), 10_000, &p).with(2, pan(9));
    assert_eq!(link.exchange(&wrong_card).await.rc(), "14");
    assert_eq!(link.exchange(&void(next(), 10_000, &p)).await.rc(), "00");
    assert_eq!(sim.card(1).await.balance, 100_000);

    // Refunds: partial, repeated, never above the original.
    let p = purchase(next(), 2, 20_000);
    assert_eq!(link.exchange(&p).await.rc(), "00");
    let r = refund(next(), 5_000, &p);
    let reply = link.exchange(&r).await;
    assert_eq!(
        (reply.mti.as_str(), reply.rc(), reply.f(38)),
        ("0230", "00", None)
    );
    assert_eq!(link.exchange(&refund(next(), 15_001, &p)).await.rc(), "61");
    assert_eq!(sim.card(2).await.balance, 85_000);
    assert_eq!(link.exchange(&refund(next(), 15_000, &p)).await.rc(), "00");
    assert_eq!(sim.card(2).await.balance, 100_000);
    assert_eq!(link.exchange(&refund(next(), 1, &p)).await.rc(), "12");
    // Reversing one refund makes room for it again.
    assert_eq!(link.exchange(&reversal(next(), &r)).await.rc(), "00");
    assert_eq!(sim.card(2).await.balance, 95_000);
    assert_eq!(link.exchange(&refund(next(), 5_000, &p)).await.rc(), "00");
    assert_eq!(sim.card(2).await.balance, 100_000);

    // Pre-authorisation and cancel: a hold, released.
    let a = preauth(next(), 3, 30_000);
    let reply = link.exchange(&a).await;
    assert_eq!((reply.mti.as_str(), reply.rc()), ("0110", "00"));
    let card = sim.card(3).await;
    assert_eq!(
        (card.balance, card.held, card.available()),
        (100_000, 30_000, 70_000)
    );
    let cancel = |stan, amount| follow_on("0100", stan, "200000", "06", amount, &a);
    assert_eq!(link.exchange(&cancel(next(), 29_000)).await.rc(), "64");
    assert_eq!(link.exchange(&cancel(next(), 30_000)).await.rc(), "00");
    assert_eq!(sim.card(3).await.held, 0);
    assert_eq!(link.exchange(&cancel(next(), 30_000)).await.rc(), "12");

    // Completion: the hold released, the completion amount debited; its void
    // credits it back.
    let a = preauth(next(), 4, 40_000);
    assert_eq!(link.exchange(&a).await.rc(), "00");
    let c = follow_on("0200", next(), "000000", "06", 45_000, &a);
    let reply = link.exchange(&c).await;
    assert_eq!(reply.rc(), "00");
    assert!(reply.f(38).is_some());
    let card = sim.card(4).await;
    assert_eq!((card.balance, card.held), (55_000, 0));
    let again = follow_on("0200", next(), "000000", "06", 40_000, &a);
    assert_eq!(
        link.exchange(&again).await.rc(),
        "12",
        "a pre-auth completes once"
    );
    let cv = follow_on("0200", next(), "200000", "06", 45_000, &c);
    assert_eq!(link.exchange(&cv).await.rc(), "00");
    assert_eq!(sim.card(4).await.balance, 100_000);

    // Completion advice (0220, repeated 0221), then its reversal: the hold
    // comes back, the debit goes.
    let a = preauth(next(), 5, 10_000);
    assert_eq!(link.exchange(&a).await.rc(), "00");
    let advice = follow_on("0220", next(), "000000", "06", 10_000, &a);
    let reply = link.exchange(&advice).await;
    assert_eq!(
        (reply.mti.as_str(), reply.rc(), reply.f(38)),
        ("0230", "00", None)
    );
    let mut repeat = advice.clone();
    repeat.mti = "0221".parse().unwrap();
    assert_eq!(link.exchange(&repeat).await, reply);
    let card = sim.card(5).await;
    assert_eq!((card.balance, card.held), (90_000, 0));
    assert_eq!(link.exchange(&reversal(next(), &advice)).await.rc(), "00");
    let card = sim.card(5).await;
    assert_eq!((card.balance, card.held), (100_000, 10_000));
    // ... and of the pre-auth itself: the hold goes too.
    assert_eq!(link.exchange(&reversal(next(), &a)).await.rc(), "00");
    assert_eq!(sim.card(5).await.held, 0);

    let totals = sim.totals().await;
    assert_eq!(totals.balance, totals.opening + totals.posted);
    assert_eq!(totals.held, 0);
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_reply_is_answered_from_the_stored_outcome_when_repeated() {
    let sim = Sim::start().await;
    let faults = sim.issuer.faults();
    let mut counts = faults.watch();
    let mut link = sim.connect().await;
    let req = purchase(1, 1, 3_000);

    faults.update(|f| f.drop_reply = 1.0);
    link.send(&req.frame()).await;
    tokio::time::timeout(PATIENCE, counts.wait_for(|c| c.dropped == 1))
        .await
        .expect("the reply is dropped")
        .unwrap();
    faults.clear();
    // Nothing came for the purchase: the next frame is the echo's answer.
    let reply = link.exchange(&echo(2)).await;
    assert_eq!(
        (reply.mti.as_str(), reply.rc(), reply.f(70)),
        ("0810", "00", Some("301"))
    );
    assert_eq!(sim.card(1).await.balance, 97_000, "posted all the same");

    let reply = link.exchange(&req).await;
    assert_eq!((reply.mti.as_str(), reply.rc()), ("0210", "00"));
    assert!(reply.f(38).is_some());
    assert_eq!(sim.card(1).await.balance, 97_000, "and only once");
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_issuer_closes_its_connections_and_serves_again_on_the_same_address() {
    // What `issuer_restart_at` in a scenario does to the demo's issuer.
    let mut sim = Sim::start().await;
    let mut link = sim.connect().await;
    assert_eq!(link.exchange(&purchase(1, 1, 700)).await.rc(), "00");

    sim.shutdown.cancel();
    tokio::time::timeout(PATIENCE, &mut sim.server)
        .await
        .expect("the server stops")
        .unwrap()
        .unwrap();
    assert!(
        link.next_frame().await.is_none(),
        "the connection is closed"
    );
    assert!(
        TcpStream::connect(sim.addr).await.is_err(),
        "nobody listens"
    );

    // The same issuer, the same books, the same address.
    let listener = TcpListener::bind(sim.addr).await.unwrap();
    sim.shutdown = CancellationToken::new();
    sim.server = tokio::spawn(run(listener, sim.issuer.clone(), sim.shutdown.clone()));
    let mut link = sim.connect().await;
    assert_eq!(link.exchange(&purchase(2, 1, 300)).await.rc(), "00");
    assert_eq!(sim.card(1).await.balance, 99_000);
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_reply_closes_the_connection_and_the_repeat_is_answered() {
    let sim = Sim::start().await;
    let faults = sim.issuer.faults();
    let mut link = sim.connect().await;
    let req = purchase(1, 1, 4_000);

    faults.update(|f| f.close_connection = 1.0);
    link.send(&req.frame()).await;
    let got = link.drain().await;
    assert!(got.len() >= 2, "part of a reply came: {got:?}");
    let declared = usize::from(u16::from_be_bytes([got[0], got[1]]));
    assert!(got.len() < 2 + declared, "half a frame, then end of stream");
    assert_eq!(faults.counts().closed, 1);

    faults.clear();
    let mut link = sim.connect().await;
    let reply = link.exchange(&req).await;
    assert_eq!((reply.mti.as_str(), reply.rc()), ("0210", "00"));
    assert_eq!(sim.card(1).await.balance, 96_000, "debited once");
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reply_comes_after_later_ones() {
    let sim = Sim::start().await;
    let faults = sim.issuer.faults();
    let mut counts = faults.watch();
    let mut link = sim.connect().await;

    faults.update(|f| {
        f.late_reply = 1.0;
        f.late_by = Duration::from_millis(300);
    });
    let req = purchase(1, 1, 5_000);
    link.send(&req.frame()).await;
    tokio::time::timeout(PATIENCE, counts.wait_for(|c| c.late == 1))
        .await
        .expect("the reply is held back")
        .unwrap();
    faults.clear();
    assert_eq!(
        link.exchange(&echo(2)).await.mti,
        "0810",
        "the echo overtakes it"
    );
    let late = link.recv().await;
    assert_eq!(
        (late.mti.as_str(), late.f(11), late.rc()),
        ("0210", Some("000001"), "00")
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_replies_are_posted_but_wait_while_network_management_is_answered() {
    // What the demo does before it kills the switch: a transaction stays at
    // the issuer, decided and posted, for as long as it is held.
    let sim = Sim::start().await;
    let faults = sim.issuer.faults();
    let mut link = sim.connect().await;
    faults.hold();
    link.send(&purchase(1, 1, 2_500).frame()).await;
    tokio::time::timeout(PATIENCE, async {
        while sim.card(1).await.balance != 97_500 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the purchase is posted while its reply is held");
    let reply = link.exchange(&echo(2)).await;
    assert_eq!(
        (reply.mti.as_str(), reply.f(11)),
        ("0810", Some("000002")),
        "the echo is answered; the purchase's reply is not"
    );
    faults.release();
    let reply = link.recv().await;
    assert_eq!(
        (reply.mti.as_str(), reply.f(11), reply.rc()),
        ("0210", Some("000001"), "00")
    );
    assert_eq!(sim.card(1).await.balance, 97_500, "debited once");
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_management_and_malformed_messages() {
    let sim = Sim::start().await;
    let mut link = sim.connect().await;
    for (code, rc) in [("001", "00"), ("301", "00"), ("002", "00"), ("999", "12")] {
        let reply = link.exchange(&Req::new("0800", 1).with(70, code)).await;
        assert_eq!(
            (reply.mti.as_str(), reply.rc(), reply.f(70)),
            ("0810", rc, Some(code))
        );
    }

    // A bad field after F11: answered 30, with F7 and F11 for matching.
    let mut frame = purchase(2, 1, 100).frame().to_vec();
    let at = frame
        .windows(8)
        .position(|w| w == b"TERM0001")
        .expect("F41 in the frame");
    frame[at] = 0x07;
    link.send(&frame).await;
    let reply = link.recv().await;
    assert_eq!(reply.mti, "0210");
    assert_eq!(reply.numbers(), [7, 11, 39]);
    assert_eq!((reply.f(11), reply.rc()), (Some("000002"), "30"));

    // A frame whose F11 cannot be read: the connection is closed.
    let mut bad = BytesMut::new();
    bad.extend_from_slice(&[0, 16]);
    bad.extend_from_slice(b"0200");
    bad.extend_from_slice(&[0x08, 0, 0, 0, 0, 0, 0, 0]); // field 5: not in the dialect
    bad.extend_from_slice(b"1234");
    link.send(&bad).await;
    assert_eq!(link.next_frame().await, None, "closed");
    assert_eq!(sim.card(1).await.balance, 100_000);
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clearing_file_lists_the_day_with_rrn_amount_and_final_state() {
    let sim = Sim::start().await;
    let mut link = sim.connect().await;
    let p1 = purchase(1, 1, 10_000);
    let p2 = purchase(2, 2, 20_000);
    let declined = purchase(3, 3, 60_000);
    let v = void(4, 10_000, &p1);
    let r = refund(5, 5_000, &p2);
    let rev = reversal(6, &p2);
    let inquiry = Req::new("0200", 7)
        .with(2, pan(4))
        .with(3, "310000")
        .with(4, "000000000000")
        .with(25, "00");
    for (req, rc) in [
        (&p1, "00"),
        (&p2, "00"),
        (&declined, "61"),
        (&v, "00"),
        (&r, "00"),
        (&rev, "00"),
        (&inquiry, "00"),
    ] {
        assert_eq!(link.exchange(req).await.rc(), rc);
    }
    let today = chrono::Utc::now().date_naive();
    let mut out = Vec::new();
    let n = clearing(&sim.pool, Some(today), &mut out).await.unwrap();
    assert_eq!(n, 7);
    let text = String::from_utf8(out).unwrap();
    for card in 1..=4 {
        assert!(
            !text.contains(&pan(card)),
            "no clear PAN in the clearing file"
        );
    }
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    assert_eq!(reader.headers().unwrap(), CLEARING_HEADER.as_slice());
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    let col = |name: &str| CLEARING_HEADER.iter().position(|h| *h == name).unwrap();
    let row = |rrn: &str| {
        rows.iter()
            .find(|r| &r[col("rrn")] == rrn)
            .unwrap_or_else(|| panic!("no line for {rrn}"))
            .clone()
    };
    let pick = |r: &csv::StringRecord, names: &[&str]| -> Vec<String> {
        names.iter().map(|n| r[col(n)].to_string()).collect()
    };
    let names = [
        "kind",
        "pan",
        "amount",
        "effect",
        "response_code",
        "state",
        "reversed",
    ];
    assert_eq!(
        pick(&row(p1.rrn()), &names),
        [
            "purchase",
            "622202*********0001",
            "10000",
            "debit",
            "00",
            "voided",
            "false"
        ]
    );
    assert_eq!(
        pick(&row(v.rrn()), &names),
        [
            "void",
            "622202*********0001",
            "10000",
            "credit",
            "00",
            "approved",
            "false"
        ]
    );
    assert_eq!(
        pick(&row(p2.rrn()), &names),
        [
            "purchase",
            "622202*********0002",
            "20000",
            "debit",
            "00",
            "partially_refunded",
            "false"
        ],
        "a purchase with follow-ons is not reversed"
    );
    assert_eq!(
        pick(&row(r.rrn()), &names),
        [
            "refund",
            "622202*********0002",
            "5000",
            "credit",
            "00",
            "approved",
            "false"
        ]
    );
    assert_eq!(
        pick(&row(rev.rrn()), &["kind", "effect", "original", "note"]),
        [
            "reversal",
            "none",
            p2.f90().as_str(),
            "not applied: the original is partially_refunded"
        ]
    );
    assert_eq!(
        pick(
            &row(declined.rrn()),
            &[
                "kind",
                "amount",
                "effect",
                "response_code",
                "state",
                "auth_code"
            ]
        ),
        ["purchase", "60000", "none", "61", "declined", ""]
    );
    assert_eq!(
        pick(&row(inquiry.rrn()), &["kind", "amount", "effect"]),
        ["balance_inquiry", "0", "none"]
    );
    let p1_row = row(p1.rrn());
    assert_eq!(
        pick(
            &p1_row,
            &[
                "acquirer",
                "stan",
                "transmitted",
                "mti",
                "processing_code",
                "terminal",
                "merchant"
            ]
        ),
        [
            "00048560000",
            "000001",
            F7,
            "0200",
            "000000",
            "TERM0001",
            "898100012345678"
        ]
    );
    assert_eq!(p1_row[col("auth_code")].len(), 6);

    let mut out = Vec::new();
    let yesterday = today.pred_opt().unwrap();
    assert_eq!(
        clearing(&sim.pool, Some(yesterday), &mut out)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        String::from_utf8(out).unwrap().lines().count(),
        1,
        "the header only"
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_clear_pan_track_or_pin_block_is_stored() {
    let sim = Sim::start().await;
    let mut link = sim.connect().await;
    let p = purchase(1, 1, 1_000).with(14, "3012");
    let track = purchase(2, 2, 1_000)
        .without(2)
        .with(35, format!("{}=30121011234", pan(2)));
    let unknown = purchase(3, 77_777, 1_000);
    for req in [
        &p,
        &track,
        &unknown,
        &void(4, 1_000, &p),
        &reversal(5, &track),
        &reversal(6, &purchase(7, 3, 1)),
    ] {
        link.exchange(req).await;
    }
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'issuer'",
    )
    .fetch_all(&sim.pool)
    .await
    .unwrap();
    assert!(tables.contains(&"cards".to_string()) && tables.contains(&"postings".to_string()));
    let mut dump = String::new();
    for table in &tables {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT t::text FROM issuer.\"{table}\" t"
        )))
        .fetch_all(&sim.pool)
        .await
        .unwrap();
        dump.push_str(&rows.join("\n"));
    }
    assert!(
        dump.contains("622202*********0001"),
        "masked PANs are there"
    );
    for secret in [
        pan(1),
        pan(2),
        pan(3),
        pan(77_777),
        "30121011234".into(),
        "0123456789abcdef".into(),
    ] {
        assert!(
            !dump.to_lowercase().contains(&secret.to_lowercase()),
            "{secret} is stored"
        );
    }
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeding_is_idempotent_fast_and_bound_to_its_key() {
    let url = embedded_pg::test_database().await;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .unwrap();
    migrate(&pool).await.unwrap();
    migrate(&pool).await.expect("migrating twice is harmless");
    let shipped = IssuerConfig::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../config/issuer-sim.toml"
    ))
    .unwrap();
    let key = PanKey::random();
    let started = std::time::Instant::now();
    assert_eq!(
        seed_cards(&pool, &key, &shipped.cards).await.unwrap(),
        10_004
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );

    // Spend on one card, seed again: nothing new, nothing reset.
    let first = Pan::new("6222020000000000001").unwrap();
    sqlx::query("UPDATE issuer.cards SET balance = balance - 500 WHERE pan_hash = $1")
        .bind(key.hash(&first).to_vec())
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(seed_cards(&pool, &key, &shipped.cards).await.unwrap(), 0);
    let card = balance(&pool, &key, &first).await.unwrap().unwrap();
    assert_eq!((card.opening, card.balance), (1_000_000, 999_500));
    let totals = balances(&pool).await.unwrap();
    assert_eq!(totals.cards, 10_004);
    assert_eq!(totals.opening - totals.balance, 500);

    assert!(matches!(
        seed_cards(&pool, &PanKey::random(), &shipped.cards).await,
        Err(Error::KeyMismatch)
    ));
    // The switch's tables live beside the issuer's without a clash.
    let bookkeeping: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'issuer' AND table_name = '_sqlx_migrations'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(bookkeeping, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_name_file_line_and_key() {
    let path = std::env::temp_dir().join(format!("issuer-bad-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:9583\"\n\n[faults]\nlate_reply = \"often\"\nlatency = { distribution = \"uniform\", min_ms = 9, max_ms = 3 }\n[[cards]]\nfirst = \"6222020000000000001\"\nlast = \"6222020000000000002\"\nbalance = -1\nstatus = \"frozen\"\n",
    )
    .unwrap();
    let err = IssuerConfig::load(&path).unwrap_err();
    let shown = err.to_string();
    let file = path.display().to_string();
    let ConfigError::Invalid { problems } = err else {
        panic!("{shown}")
    };
    let lines: Vec<(usize, &str)> = problems
        .0
        .iter()
        .map(|p| (p.line, p.key.as_str()))
        .collect();
    assert_eq!(
        lines,
        [
            (4, "faults.late_reply"),
            (5, "faults.latency.max_ms"),
            (9, "cards[0].balance"),
            (10, "cards[0].status"),
        ],
        "{shown}"
    );
    assert!(
        shown.starts_with(&format!(
            "{file}:4: faults.late_reply: expected a number, found string"
        )),
        "{shown}"
    );
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        IssuerConfig::load(&path),
        Err(ConfigError::Read { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchases_that_arrive_together_share_one_statement_and_one_commit() {
    let sim = Sim::start().await;
    let mut link = sim.connect().await;
    // Four purchases wait on held cards: every batch slot (`batches_in_flight`)
    // is at the database. One at a time, or they would share a batch.
    let held = hold_cards(&sim, 1..=4).await;
    for card in 1..=4 {
        link.send(&purchase(card, card, 1_000).frame()).await;
        until_waiting_on_locks(&sim, i64::from(card)).await;
    }
    // Twenty more, on other cards, arrive meanwhile: they gather into one batch.
    let burst: Vec<u8> = (5..=24)
        .flat_map(|card| purchase(card, card, 2_000).frame().to_vec())
        .collect();
    link.send(&burst).await;
    for tx in held {
        tx.commit().await.unwrap();
    }
    for _ in 0..24 {
        assert_eq!(link.recv().await.rc(), "00");
    }
    // Rows written by one statement carry one transaction id. (Usually all
    // twenty share one; a burst read in two pieces may make it two or three.)
    let commits: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT xmin::text) FROM issuer.postings WHERE amount = 2000",
    )
    .fetch_one(&sim.pool)
    .await
    .unwrap();
    assert!(commits < 10, "the twenty took {commits} commits");
    for card in 5..=24 {
        assert_eq!(sim.card(card).await.balance, 98_000);
    }
    sim.stop().await;
}

/// Sends `req` and counts the statements the issuer sent PostgreSQL until
/// it answered.
async fn statements_for(link: &mut Conn, statements: &AtomicUsize, req: &Req) -> (Reply, usize) {
    statements.store(0, Ordering::SeqCst);
    let reply = link.exchange(req).await;
    (reply, statements.load(Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_ons_and_reversals_are_each_decided_and_committed_by_one_statement() {
    let (sim, statements) = Sim::start_counting().await;
    let mut link = sim.connect().await;
    let mut cost = async |req: &Req| statements_for(&mut link, &statements, req).await;

    // One autocommitted statement each: no BEGIN, no COMMIT, nothing else.
    let p = purchase(1, 1, 10_000);
    assert_eq!(cost(&p).await.0.rc(), "00");
    let v = void(2, 10_000, &p);
    let (voided, n) = cost(&v).await;
    assert_eq!((voided.rc(), n), ("00", 1), "a void");
    let p = purchase(3, 2, 20_000);
    assert_eq!(cost(&p).await.0.rc(), "00");
    let (reply, n) = cost(&refund(4, 5_000, &p)).await;
    assert_eq!((reply.rc(), n), ("00", 1), "a refund");
    let p = purchase(5, 3, 7_000);
    assert_eq!(cost(&p).await.0.rc(), "00");
    let (reply, n) = cost(&reversal(6, &p)).await;
    assert_eq!((reply.rc(), n), ("00", 1), "a reversal");
    let a = preauth(7, 4, 30_000);
    assert_eq!(cost(&a).await.0.rc(), "00");
    let c = follow_on("0200", 8, "000000", "06", 30_000, &a);
    let (reply, n) = cost(&c).await;
    assert_eq!((reply.rc(), n), ("00", 1), "a completion");
    // A decline, and a reversal whose original has not arrived, likewise.
    let (reply, n) = cost(&void(9, 10_000, &p)).await;
    assert_eq!((reply.rc(), n), ("12", 1), "a declined void");
    let (reply, n) = cost(&reversal(10, &purchase(11, 5, 1_000))).await;
    assert_eq!(
        (reply.rc(), n),
        ("00", 1),
        "a reversal ahead of its original"
    );
    // A repeat: the statement that finds its key taken, then the stored outcome.
    let (reply, n) = cost(&v).await;
    assert_eq!((&reply, n), (&voided, 2), "a repeated void");

    let card = |n| sim.card(n);
    assert_eq!(card(1).await.balance, 100_000);
    assert_eq!(card(2).await.balance, 85_000);
    assert_eq!(card(3).await.balance, 100_000);
    let completed = card(4).await;
    assert_eq!((completed.balance, completed.held), (70_000, 0));
    // The void's auth code is its posting's.
    let id: i64 = sqlx::query_scalar("SELECT id FROM issuer.postings WHERE rrn = $1")
        .bind(v.rrn())
        .fetch_one(&sim.pool)
        .await
        .unwrap();
    let expected = format!("{:06}", (id % 1_000_000 * 7919 + 13) % 1_000_000);
    assert_eq!(voided.f(38), Some(expected.as_str()));
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_a_void_and_of_a_reversal_arriving_together_post_once() {
    let sim = Sim::start().await;
    let mut links = [sim.connect().await, sim.connect().await];
    let sale = purchase(1, 1, 10_000);
    let mistake = purchase(2, 1, 3_000);
    assert_eq!(links[0].exchange(&sale).await.rc(), "00");
    assert_eq!(links[0].exchange(&mistake).await.rc(), "00");
    assert_eq!(sim.card(1).await.balance, 87_000);

    // Three copies of each on each link while the card is held: the first
    // of each waits for the card, the others for the original it holds.
    // Copies of the void never share a batch (they name one original), so
    // four are at the database at once (`batches_in_flight`), each in a
    // batch of its own, and two wait for a batch: ten wait on locks.
    let void = void(3, 10_000, &sale).frame();
    let reversal = reversal(4, &mistake).frame();
    let held = hold_card(&sim, 1).await;
    for link in &mut links {
        for _ in 0..3 {
            link.send(&void).await;
            link.send(&reversal).await;
        }
    }
    until_waiting_on_locks(&sim, 10).await;
    held.commit().await.unwrap();
    let mut replies = Vec::new();
    for link in &mut links {
        for _ in 0..6 {
            replies.push(link.recv().await);
        }
    }
    let (voids, reversals): (Vec<_>, Vec<_>) = replies.iter().partition(|r| r.mti == "0210");
    assert!(
        voids.iter().all(|r| *r == voids[0] && r.rc() == "00"),
        "{voids:#?}"
    );
    assert!(
        reversals
            .iter()
            .all(|r| *r == reversals[0] && r.rc() == "00"),
        "{reversals:#?}"
    );
    assert_eq!((voids.len(), reversals.len()), (6, 6));
    assert_eq!(sim.card(1).await.balance, 100_000, "credited once each");
    let postings: i64 = sqlx::query_scalar("SELECT count(*) FROM issuer.postings")
        .fetch_one(&sim.pool)
        .await
        .unwrap();
    assert_eq!(postings, 4);
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_codes_are_six_digits_and_distinct() {
    let sim = Sim::start().await;
    let (distinct, six_digits): (i64, bool) = sqlx::query_as(
        "SELECT count(DISTINCT issuer.auth_code(i)), bool_and(issuer.auth_code(i) ~ '^[0-9]{6}$')
         FROM generate_series(1, 10000) AS i",
    )
    .fetch_one(&sim.pool)
    .await
    .unwrap();
    assert_eq!((distinct, six_digits), (10_000, true));
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_that_races_its_original_into_the_books_is_tried_again_and_applied() {
    let sim = Sim::start().await;
    let mut link = sim.connect().await;
    // The original's statement between its INSERT and its commit, played by
    // a transaction of the test's own: a purchase of 7 000 fen on card 1,
    // approved and posted. The reversal cannot see it, finds its key taken
    // when it leaves its mark, and is undone and tried again.
    let original = purchase(1, 1, 7_000);
    let mut writing = sim.pool.begin().await.unwrap();
    sqlx::query(
        "WITH card AS (
            UPDATE issuer.cards SET balance = balance - 7000 WHERE pan_hash = $1
            RETURNING id, pan_masked)
         INSERT INTO issuer.postings (acquirer, stan, transmitted, mti_class, mti, fingerprint, kind,
             processing_code, condition_code, card_id, pan_masked, amount, balance_change,
             response_code, auth_code, rrn, state)
         SELECT $2, $3, $4, 2, '0200', decode('00', 'hex'), 'purchase', '000000', '00', id, pan_masked, 7000,
             -7000, '00', '123456', $5, 'approved'
         FROM card",
    )
    .bind(sim.key.hash(&Pan::new(&pan(1)).unwrap()).to_vec())
    .bind(format!("{ACQUIRER:0>11}"))
    .bind(&original.fields[&11])
    .bind(F7)
    .bind(original.rrn())
    .execute(&mut *writing)
    .await
    .unwrap();
    link.send(&reversal(2, &original).frame()).await;
    until_waiting_on_locks(&sim, 1).await;
    writing.commit().await.unwrap();
    assert_eq!(link.recv().await.rc(), "00");
    assert_eq!(sim.card(1).await.balance, 100_000, "reversed");
    let (state, note): (String, String) = sqlx::query_as(
        "SELECT o.state, r.note FROM issuer.postings r JOIN issuer.postings o ON o.id = r.original_id
         WHERE r.kind = 'reversal'",
    )
    .fetch_one(&sim.pool)
    .await
    .unwrap();
    assert_eq!((state.as_str(), note.as_str()), ("reversed", "applied"));
    let postings: i64 = sqlx::query_scalar("SELECT count(*) FROM issuer.postings")
        .fetch_one(&sim.pool)
        .await
        .unwrap();
    assert_eq!(postings, 2, "no mark left behind");
    sim.stop().await;
}

async fn hold_cards(
    sim: &Sim,
    cards: std::ops::RangeInclusive<u32>,
) -> Vec<sqlx::Transaction<'static, sqlx::Postgres>> {
    let mut held = Vec::new();
    for card in cards {
        held.push(hold_card(sim, card).await);
    }
    held
}

/// Takes every follow-on batch slot (`batches_in_flight`, four): a void of
/// a purchase on each of `cards`, each sent alone and left waiting at the
/// database for its card, held. Follow-ons sent now gather for the next
/// batch, which goes when a held card is committed. Returns the held cards.
async fn occupy_follow_on_slots(
    sim: &Sim,
    link: &mut Conn,
    cards: [u32; 4],
    stan: u32,
) -> Vec<sqlx::Transaction<'static, sqlx::Postgres>> {
    let mut held = Vec::new();
    for (n, card) in (0..).zip(cards) {
        let sale = purchase(stan + 2 * n, card, 1_000);
        assert_eq!(link.exchange(&sale).await.rc(), "00");
        held.push(hold_card(sim, card).await);
        link.send(&void(stan + 2 * n + 1, 1_000, &sale).frame())
            .await;
        until_waiting_on_locks(sim, i64::from(n) + 1).await;
    }
    held
}

/// Sends `burst` in one write, then an echo: once the echo is answered, the
/// issuer has read every message of the burst and handed it in.
async fn send_burst(link: &mut Conn, burst: &[Req], echo_stan: u32) {
    let frames: Vec<u8> = burst.iter().flat_map(|r| r.frame().to_vec()).collect();
    link.send(&frames).await;
    assert_eq!(link.exchange(&echo(echo_stan)).await.mti, "0810");
}

/// The next `n` replies, by F11.
async fn replies_by_stan(link: &mut Conn, n: usize) -> BTreeMap<String, Reply> {
    let mut replies = BTreeMap::new();
    for _ in 0..n {
        let reply = link.recv().await;
        replies.insert(reply.f(11).unwrap().to_string(), reply);
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_ons_of_distinct_originals_arriving_together_share_one_statement() {
    let (sim, statements) = Sim::start_counting().await;
    let mut link = sim.connect().await;
    // The originals, one card each.
    let sale = purchase(1, 5, 10_000);
    let refunded = purchase(2, 6, 20_000);
    let fully = purchase(3, 7, 7_000);
    let to_complete = preauth(4, 8, 30_000);
    let to_cancel = preauth(5, 9, 30_000);
    let completed_by_advice = preauth(6, 10, 10_000);
    let completed = preauth(7, 11, 40_000);
    let wrong_amount = purchase(8, 12, 10_000);
    for req in [
        &sale,
        &refunded,
        &fully,
        &to_complete,
        &to_cancel,
        &completed_by_advice,
        &completed,
        &wrong_amount,
    ] {
        assert_eq!(link.exchange(req).await.rc(), "00");
    }
    let completion = follow_on("0200", 9, "000000", "06", 45_000, &completed);
    assert_eq!(link.exchange(&completion).await.rc(), "00");

    let held = occupy_follow_on_slots(&sim, &mut link, [1, 2, 3, 4], 100).await;
    // Every kind of follow-on, requests and advices, approved and declined.
    let burst = [
        void(11, 10_000, &sale),
        refund(12, 5_000, &refunded),
        refund(13, 7_000, &fully),
        follow_on("0200", 14, "000000", "06", 30_000, &to_complete),
        follow_on("0100", 15, "200000", "06", 30_000, &to_cancel),
        follow_on("0220", 16, "000000", "06", 10_000, &completed_by_advice),
        follow_on("0200", 17, "200000", "06", 45_000, &completion),
        void(18, 9_999, &wrong_amount),
        void(19, 100, &purchase(99, 13, 100)),
    ];
    send_burst(&mut link, &burst, 20).await;
    statements.store(0, Ordering::SeqCst);
    for tx in held {
        tx.commit().await.unwrap();
    }
    let replies = replies_by_stan(&mut link, 4 + burst.len()).await;
    assert_eq!(
        statements.load(Ordering::SeqCst),
        1,
        "nine follow-ons, one statement"
    );
    let answered = |stan: u32| {
        let r = &replies[&format!("{stan:06}")];
        (r.mti.as_str(), r.rc(), r.f(38).is_some())
    };
    assert_eq!(answered(11), ("0210", "00", true), "void");
    assert_eq!(answered(12), ("0230", "00", false), "refund advice");
    assert_eq!(answered(13), ("0230", "00", false), "full refund advice");
    assert_eq!(answered(14), ("0210", "00", true), "completion");
    assert_eq!(answered(15), ("0110", "00", true), "pre-auth cancel");
    assert_eq!(answered(16), ("0230", "00", false), "completion advice");
    assert_eq!(answered(17), ("0210", "00", true), "completion void");
    assert_eq!(answered(18), ("0210", "64", false), "not the amount");
    assert_eq!(answered(19), ("0210", "25", false), "no original");
    for stan in [101, 103, 105, 107] {
        assert_eq!(answered(stan), ("0210", "00", true), "the slots' voids");
    }

    let money = async |n| {
        let c = sim.card(n).await;
        (c.balance, c.held)
    };
    assert_eq!(money(5).await, (100_000, 0));
    assert_eq!(money(6).await, (85_000, 0));
    assert_eq!(money(7).await, (100_000, 0));
    assert_eq!(money(8).await, (70_000, 0));
    assert_eq!(money(9).await, (100_000, 0));
    assert_eq!(money(10).await, (90_000, 0));
    assert_eq!(money(11).await, (100_000, 0));
    assert_eq!(money(12).await, (90_000, 0));
    let originals = [
        &sale,
        &refunded,
        &fully,
        &to_complete,
        &to_cancel,
        &completed_by_advice,
        &completed,
        &wrong_amount,
        &completion,
    ];
    let states: Vec<String> =
        sqlx::query_scalar("SELECT state FROM issuer.postings WHERE rrn = ANY($1) ORDER BY rrn")
            .bind(originals.map(|r| r.rrn().to_string()))
            .fetch_all(&sim.pool)
            .await
            .unwrap();
    assert_eq!(
        states,
        [
            "voided",
            "partially_refunded",
            "refunded",
            "completed",
            "cancelled",
            "completed",
            "completed",
            "approved",
            "voided"
        ]
    );
    let commits: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT xmin::text) FROM issuer.postings WHERE stan::int BETWEEN 11 AND 19",
    )
    .fetch_one(&sim.pool)
    .await
    .unwrap();
    assert_eq!(commits, 1, "posted by one commit");
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_ons_of_one_card_arriving_together_each_apply_once() {
    let (sim, statements) = Sim::start_counting().await;
    let mut link = sim.connect().await;
    // Three sales on card 5; a void and two refund advices, which carry no
    // PAN: the card is known only from their originals.
    let sales = [
        purchase(1, 5, 10_000),
        purchase(2, 5, 3_000),
        purchase(3, 5, 2_000),
    ];
    for sale in &sales {
        assert_eq!(link.exchange(sale).await.rc(), "00");
    }
    assert_eq!(sim.card(5).await.balance, 85_000);
    let held = occupy_follow_on_slots(&sim, &mut link, [1, 2, 3, 4], 100).await;
    let burst = [
        void(11, 10_000, &sales[0]),
        refund(12, 1_000, &sales[1]),
        refund(13, 2_000, &sales[2]),
    ];
    send_burst(&mut link, &burst, 20).await;
    statements.store(0, Ordering::SeqCst);
    for tx in held {
        tx.commit().await.unwrap();
    }
    let replies = replies_by_stan(&mut link, 4 + burst.len()).await;
    for stan in ["000011", "000012", "000013"] {
        assert_eq!(replies[stan].rc(), "00", "{stan}");
    }
    // The batch decides the first on the card; the other two, deferred,
    // are decided alone after it: three statements, however they fell.
    assert_eq!(statements.load(Ordering::SeqCst), 3);
    assert_eq!(
        sim.card(5).await.balance,
        98_000,
        "each credited once: 85 000 + 10 000 + 1 000 + 2 000"
    );
    let follow_ons: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT f.kind::text, o.state::text, f.balance_change FROM issuer.postings f
         JOIN issuer.postings o ON o.id = f.original_id
         WHERE f.stan::int BETWEEN 11 AND 13 ORDER BY f.stan",
    )
    .fetch_all(&sim.pool)
    .await
    .unwrap();
    assert_eq!(
        follow_ons,
        [
            ("void".into(), "voided".into(), 10_000),
            ("refund".into(), "partially_refunded".into(), 1_000),
            ("refund".into(), "refunded".into(), 2_000),
        ]
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_ons_of_one_original_arriving_together_are_judged_one_after_the_other() {
    let sim = Sim::start().await;
    let mut link = sim.connect().await;
    let voided_or_refunded = purchase(1, 1, 10_000);
    let overdrawn = purchase(2, 2, 10_000);
    let refunded_twice = purchase(3, 3, 10_000);
    for sale in [&voided_or_refunded, &overdrawn, &refunded_twice] {
        assert_eq!(link.exchange(sale).await.rc(), "00");
    }
    // All together while the cards are held: the two of one original never
    // share a batch, so one batch waits for the cards, and another for the
    // originals the first holds.
    let held = hold_cards(&sim, 1..=3).await;
    let burst = [
        void(11, 10_000, &voided_or_refunded),
        refund(12, 5_000, &voided_or_refunded),
        refund(13, 6_000, &overdrawn),
        refund(14, 6_000, &overdrawn),
        refund(15, 4_000, &refunded_twice),
        refund(16, 4_000, &refunded_twice),
    ];
    send_burst(&mut link, &burst, 20).await;
    until_waiting_on_locks(&sim, 2).await;
    for tx in held {
        tx.commit().await.unwrap();
    }
    let replies = replies_by_stan(&mut link, burst.len()).await;
    let codes = |a: &str, b: &str| {
        let mut pair = [replies[a].rc(), replies[b].rc()];
        pair.sort_unstable();
        pair
    };
    // A void and a refund of one sale: whichever comes first wins, the
    // other finds the sale voided or refunded.
    assert_eq!(codes("000011", "000012"), ["00", "12"]);
    let (balance, state) = if replies["000011"].rc() == "00" {
        (100_000, "voided")
    } else {
        (95_000, "partially_refunded")
    };
    assert_eq!(sim.card(1).await.balance, balance);
    // Two refunds that together exceed the sale: one is refused 61.
    assert_eq!(codes("000013", "000014"), ["00", "61"]);
    assert_eq!(sim.card(2).await.balance, 96_000);
    // Two that fit: both apply.
    assert_eq!(codes("000015", "000016"), ["00", "00"]);
    assert_eq!(sim.card(3).await.balance, 98_000);
    let originals: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state::text, refunded FROM issuer.postings WHERE stan::int <= 3 ORDER BY stan",
    )
    .fetch_all(&sim.pool)
    .await
    .unwrap();
    assert_eq!(originals[0].0, state);
    assert_eq!(originals[1], ("partially_refunded".into(), 6_000));
    assert_eq!(originals[2], ("partially_refunded".into(), 8_000));
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_on_repeated_in_its_burst_is_answered_from_its_posting() {
    let sim = Sim::start().await;
    let mut links = [sim.connect().await, sim.connect().await];
    let sale = purchase(1, 1, 20_000);
    let to_void = purchase(2, 2, 10_000);
    assert_eq!(links[0].exchange(&sale).await.rc(), "00");
    assert_eq!(links[0].exchange(&to_void).await.rc(), "00");
    // A refund advice, its 0221 repeat and another copy; a void and two
    // copies; on both links, while the cards are held.
    let advice = refund(3, 5_000, &sale);
    let mut repeat = advice.clone();
    repeat.mti = "0221".parse().unwrap();
    let v = void(4, 10_000, &to_void);
    let burst: Vec<u8> = [&advice, &v, &repeat, &v, &advice, &v]
        .iter()
        .flat_map(|r| r.frame().to_vec())
        .collect();
    let held = hold_cards(&sim, 1..=2).await;
    for link in &mut links {
        link.send(&burst).await;
    }
    until_waiting_on_locks(&sim, 2).await;
    for tx in held {
        tx.commit().await.unwrap();
    }
    let mut replies = Vec::new();
    for link in &mut links {
        for _ in 0..6 {
            replies.push(link.recv().await);
        }
    }
    let (voids, advices): (Vec<_>, Vec<_>) = replies.iter().partition(|r| r.mti == "0210");
    assert_eq!((voids.len(), advices.len()), (6, 6));
    assert!(
        voids.iter().all(|r| *r == voids[0] && r.rc() == "00"),
        "{voids:#?}"
    );
    assert!(voids[0].f(38).is_some());
    assert!(
        advices
            .iter()
            .all(|r| *r == advices[0] && r.mti == "0230" && r.rc() == "00"),
        "{advices:#?}"
    );
    assert_eq!(sim.card(1).await.balance, 85_000, "refunded once");
    assert_eq!(sim.card(2).await.balance, 100_000, "voided once");
    let postings: i64 = sqlx::query_scalar("SELECT count(*) FROM issuer.postings")
        .fetch_one(&sim.pool)
        .await
        .unwrap();
    assert_eq!(postings, 4, "two sales, one refund, one void");
    sim.stop().await;
}
