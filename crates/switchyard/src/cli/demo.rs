//! `switchyard demo`: the whole product on one machine, on a private
//! PostgreSQL: the simulated issuer with 10,000 cards, the switch with 100
//! terminals of one merchant.
//!
//! `--serve` keeps it running for real terminals (or `switchyard load`) until
//! SIGTERM; without it, a short scripted day runs through it and the money
//! is checked: the issuer's balances against the switch's journal.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Args;
use embedded_pg::{EmbeddedPg, Options};
use iso8583::Dialect;
use issuer_sim::{Issuer, IssuerConfig, PanKey};
use loadgen::Terminal;
use switch::terminals::Fleet;
use switch::{Config, PanHashKey};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Failure;
use super::serve::shutdown_on_signals;

/// The demo's merchant.
pub const MERCHANT: &str = "898310048160001";

/// The demo's cards: 10,000 of them, 10,000,000 fen each (enough for a
/// minute of `mixed.toml` at full speed), expiring 2030-12.
const ISSUER: &str = r#"
[[cards]]
first = "6222020000000000001"
last = "6222020000000010000"
expiry = "3012"
balance = 10000000
limit = 50000000
"#;

/// The demo's fleet: 1,000 terminals of one merchant.
const FLEET: &str = r#"
[[merchants]]
id = "898310048160001"
name = "Switchyard Demo Store"
mcc = "5411"

[[terminals]]
first = "T0000001"
last = "T0001000"
merchant = "898310048160001"
"#;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep running for terminals until SIGTERM instead of running the scripted day.
    #[arg(long)]
    pub serve: bool,
    /// Where terminals connect.
    #[arg(long, default_value = "127.0.0.1:8583")]
    pub listen: String,
    /// The scenario to play after the scripted day (default: the embedded
    /// config/load/smoke.toml); its [faults] are applied to the demo's issuer.
    #[arg(long, conflicts_with = "serve")]
    pub scenario: Option<std::path::PathBuf>,
    /// Also write the scenario's report as one self-contained HTML page.
    #[arg(long, value_name = "FILE", conflicts_with = "serve")]
    pub html: Option<std::path::PathBuf>,
}

/// The running demo: private PostgreSQL, issuer, switch.
pub struct Stack {
    /// The switch's terminal address.
    pub switch_addr: String,
    /// The issuer's address.
    pub issuer_addr: String,
    /// The database.
    pub url: String,
    /// The issuer (its faults can be changed while it runs).
    pub issuer: Arc<Issuer>,
    /// The issuer's database.
    pub issuer_pool: sqlx::PgPool,
    /// The switch.
    pub switch: Arc<switch::Switch>,
    /// Stops everything.
    pub shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pg: EmbeddedPg,
}

impl Stack {
    /// Starts PostgreSQL, the issuer and the switch (listening on `listen`).
    pub async fn start(listen: &str, shutdown: CancellationToken) -> anyhow::Result<Stack> {
        let pg = EmbeddedPg::start(Options::default()).await?;
        let url = pg.create_database("switchyard_demo").await?;

        let issuer_config =
            IssuerConfig::from_toml(ISSUER, "(demo issuer)").map_err(|e| anyhow!("{e}"))?;
        let issuer_pool = sqlx::PgPool::connect(&url).await?;
        issuer_sim::migrate(&issuer_pool)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let issuer_key = PanKey::random();
        issuer_sim::seed_cards(&issuer_pool, &issuer_key, &issuer_config.cards)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let issuer_listener = TcpListener::bind("127.0.0.1:0").await?;
        let issuer_addr = issuer_listener.local_addr()?.to_string();
        let issuer = Arc::new(Issuer::new(
            issuer_config,
            issuer_key.clone(),
            issuer_pool.clone(),
        ));
        let mut tasks = Vec::new();
        let (i, stop) = (issuer.clone(), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = issuer_sim::run(issuer_listener, i, stop).await {
                tracing::warn!(error = %e, "issuer stopped");
            }
        }));

        let mut config = Config::parse(
            &format!("listen = \"{listen}\"\n[rules]\nissuer_timeout = \"2s\"\n[[issuers]]\nname = \"sim\"\nbins = [\"622202\"]\naddress = \"{issuer_addr}\"\n"),
            "(demo switch)",
        )
        .map_err(|e| anyhow!("{e}"))?;
        config.seed.terminals = None;
        let pool = switch::connect(&url, 16).await?;
        let switch = switch::start(
            Arc::new(config),
            pool.clone(),
            PanHashKey::generate(),
            &shutdown,
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
        Fleet::parse(FLEET, "(demo fleet)")
            .map_err(|e| anyhow!("{e}"))?
            .store(&pool)
            .await?;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        let switch_addr = listener.local_addr()?.to_string();
        tasks.push(tokio::spawn(switch::run(
            listener,
            switch.clone(),
            shutdown.clone(),
        )));
        if !switch.links[0].wait_up(Duration::from_secs(10)).await {
            bail!("the switch could not sign on to the issuer at {issuer_addr}");
        }
        Ok(Stack {
            switch_addr,
            issuer_addr,
            url,
            issuer,
            issuer_pool,
            switch,
            shutdown,
            tasks,
            pg,
        })
    }

    /// Stops the switch and the issuer, then PostgreSQL.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        self.switch.pool.close().await;
        self.issuer_pool.close().await;
        self.pg.stop();
    }
}

/// `switchyard demo`.
pub async fn run(args: &DemoArgs) -> Result<(), Failure> {
    if args.serve {
        let shutdown = shutdown_on_signals();
        let stack = Stack::start(&args.listen, shutdown.clone()).await?;
        println!(
            "switchyard demo: terminals connect to {} (cup-pos)",
            stack.switch_addr
        );
        println!(
            "  issuer (iso87) at {}; PostgreSQL at {}",
            stack.issuer_addr, stack.url
        );
        println!("  terminals T0000001-T0001000 of merchant {MERCHANT} (Switchyard Demo Store)");
        println!(
            "  cards 6222020000000000001-6222020000000010000, expiry 3012, 10,000,000 fen each"
        );
        println!("  stop with Ctrl-C or SIGTERM");
        shutdown.cancelled().await;
        stack.stop().await;
        return Ok(());
    }
    let scenario = match &args.scenario {
        Some(path) => loadgen::scenario::Scenario::load(path),
        None => {
            loadgen::scenario::Scenario::parse(loadgen::scenario::SMOKE, "config/load/smoke.toml")
        }
    }
    .map_err(|p| Failure::Input(anyhow!("{p}")))?;
    let stack = Stack::start("127.0.0.1:0", CancellationToken::new()).await?;
    let result = scripted_day(&stack, scenario, args.html.as_deref()).await;
    stack.stop().await;
    result.map_err(Failure::Other)
}

/// A short day at the demo store, then the money check.
async fn scripted_day(
    stack: &Stack,
    scenario: loadgen::scenario::Scenario,
    html: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let dialect = Arc::new(Dialect::cup_pos());
    // The last terminal: the smoke scenario's terminals settle their own batches.
    let mut t = Terminal::connect(&stack.switch_addr, "T0000100", MERCHANT, dialect).await?;
    let line = |what: &str, rc: &str, extra: &str| println!("{what:<34} -> {rc} {extra}");
    let r = t.sign_on().await?;
    line("sign-on T0000100", r.rc(), &format!("batch {:06}", t.batch));
    let mut approved: i64 = 0;
    let mut sales = Vec::new();
    for (pan, amount) in [
        ("6222020000000000001", 12_345u64),
        ("6222020000000000002", 880),
        ("6222020000000000003", 99_900),
    ] {
        let stan = t.next_stan();
        let r = t.exchange(&t.purchase(stan, pan, "3012", amount)?).await?;
        sales.push((pan, amount, stan, r.clone()));
        line(
            &format!("purchase {amount} fen"),
            r.rc(),
            &format!(
                "rrn {} auth {}",
                r.field(37).unwrap_or("-"),
                r.field(38).unwrap_or("-")
            ),
        );
        if r.rc() == "00" {
            approved += amount as i64;
        }
    }
    let stan = t.next_stan();
    let frame = t.purchase(stan, "6222020000000000004", "3012", 500)?;
    let first = t.exchange(&frame).await?;
    let again = t.exchange(&frame).await?;
    line(
        "purchase 500 fen, sent twice",
        again.rc(),
        if again.body == first.body {
            "(same stored reply; charged once)"
        } else {
            "(REPLIES DIFFER)"
        },
    );
    if first.rc() == "00" {
        approved += 500;
    }
    // The 880 fen sale was a mistake: void it. The 99,900 one is half returned.
    fn original<'a>(
        batch: u32,
        sale: &'a (&str, u64, u32, loadgen::Reply),
    ) -> loadgen::Original<'a> {
        let (_, _, stan, reply) = sale;
        loadgen::Original {
            batch,
            stan: *stan,
            rrn: reply.field(37).unwrap_or(""),
            auth_code: reply.field(38).unwrap_or(""),
            date: reply.field(13).unwrap_or(""),
        }
    }
    let stan = t.next_stan();
    let r = t
        .exchange(&t.void(stan, sales[1].0, "3012", 880, &original(t.batch, &sales[1]))?)
        .await?;
    line(
        "void of the 880 fen purchase",
        r.rc(),
        "(the money goes back)",
    );
    if r.rc() == "00" {
        approved -= 880;
    }
    let stan = t.next_stan();
    let r = t
        .exchange(&t.refund(
            stan,
            sales[2].0,
            "3012",
            49_950,
            &original(t.batch, &sales[2]),
        )?)
        .await?;
    line(
        "refund 49950 of 99900 fen",
        r.rc(),
        "(an advice: forwarded to the issuer)",
    );
    if r.rc() == "00" {
        approved -= 49_950;
    }
    let stan = t.next_stan();
    let r = t
        .exchange(&t.balance_inquiry(stan, "6222020000000000001", "3012")?)
        .await?;
    line("balance inquiry", r.rc(), r.field(54).unwrap_or(""));
    let stan = t.next_stan();
    let r = t
        .exchange(&t.purchase(stan, "6222020000000000005", "3012", 20_000_000)?)
        .await?;
    line("purchase 20,000,000 fen", r.rc(), "(insufficient funds)");

    // Then the scenario (smoke by default): its terminals, every kind of
    // request, open loop, each settling its batch with its own totals; the
    // issuer misbehaves as its [faults] say, and recovers afterwards.
    println!();
    let f = scenario.faults;
    if !f.none() {
        stack.issuer.faults().update(|c| {
            c.latency = issuer_sim::Latency::Fixed(f.latency);
            c.drop_reply = f.drop_reply;
            c.late_reply = f.late_reply;
            c.late_by = Duration::from_millis(2_500);
            c.close_connection = f.close_connection;
        });
    }
    let outputs = super::load::Outputs { json: None, html };
    let played = super::load::play(&stack.switch_addr, scenario, outputs).await;
    stack.issuer.faults().clear();
    played.map_err(|e| anyhow!("{e}"))?;
    // The money check: entry by entry, the journal against the issuer's
    // clearing file, once the advices have drained; and the card totals.
    let drained = tokio::time::Instant::now() + Duration::from_secs(30);
    while switch::reconcile::pending_advices(&stack.switch.pool).await? > 0 {
        if tokio::time::Instant::now() > drained {
            bail!("advices did not drain within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut clearing = Vec::new();
    issuer_sim::clearing(
        &stack.issuer_pool,
        chrono::Utc::now().date_naive(),
        &mut clearing,
    )
    .await
    .map_err(|e| anyhow!("{e}"))?;
    let issuer =
        switch::reconcile::read_clearing(&String::from_utf8_lossy(&clearing), "(clearing)")
            .map_err(|e| anyhow!(e))?;
    let journal = switch::reconcile::journal_effects(&stack.switch.pool, None).await?;
    let result = switch::reconcile::compare(&journal, &issuer);
    let totals = issuer_sim::balances(&stack.issuer_pool)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    println!();
    println!(
        "reconcile: {} rrns matched, {} break(s); journal net {} fen, issuer net {} fen",
        result.matched,
        result.breaks.len(),
        result.journal_total,
        result.issuer_total
    );
    println!(
        "cards:     opening {} fen, now {} fen, difference {} (the scripted day's net: {approved})",
        totals.opening,
        totals.balance,
        totals.opening - totals.balance
    );
    for b in &result.breaks {
        println!("  {b}");
    }
    if !result.balanced() || totals.balance - totals.opening != result.journal_total {
        bail!("money check FAILED: the issuer's balances and the journal disagree");
    }
    println!("money check: balanced to the fen");
    Ok(())
}
