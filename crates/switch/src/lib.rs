//! The Switchyard switch: the terminal frontend, the router, the journal in
//! PostgreSQL, the issuer links and the store-and-forward advice queue.
//!
//! `main` stays thin: [`run`] takes its listener, config, pool and shutdown
//! token, so tests bind port 0 and start several switches in one process.

pub mod admin;
pub mod advice;
pub mod audit;
pub mod config;
pub mod dialects;
pub mod frontend;
pub mod journal;
pub mod k3;
pub mod keys;
pub mod link;
pub mod model;
pub mod reconcile;
mod related;
pub mod repeated;
pub mod router;
pub mod terminals;
pub mod writer;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use iso8583::Dialect;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use iso8583::keys::DerivationKey;
pub use keys::PanHashKey;
pub use router::Switch;

/// The switch's migrations (`migrations/switch`), applied to the `switch` schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/switch");

/// Why the switch cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations.
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A dialect file.
    #[error("dialect: {0}")]
    Dialect(#[from] iso8583::DialectError),
    /// The terminals file.
    #[error("{0}")]
    Terminals(#[from] settings::Problems),
    /// A dialect that does not carry what the switch reads or writes.
    #[error("{}", .0.join("\n"))]
    DialectFit(Vec<String>),
    /// A PAN hash key other than the one the journal was written with.
    #[error(
        "the PAN hash key (keys.pan_hash_key_file or SWITCHYARD_PAN_HASH_KEY) is not the one \
         this journal was written with: under another key no void, refund, completion or \
         repeat would find its original's card"
    )]
    KeyMismatch,
    /// A terminal master derivation key other than the one the terminals'
    /// working keys are under.
    #[error(
        "the terminal master derivation key (keys.terminal_master_derivation_key_file or \
         SWITCHYARD_TERMINAL_MASTER_DERIVATION_KEY; check value {given}) is not the one the \
         terminals' working keys were handed out under (check value {recorded}): every MAC would \
         be wrong and every terminal answered A0. Give that key; or, to change keys on purpose, \
         `switchyard terminals forget-keys` (every terminal then signs on again)"
    )]
    TerminalKeyMismatch {
        /// The check value of the key given.
        given: String,
        /// The check value the journal keeps.
        recorded: String,
    },
    /// No terminal master derivation key, where the terminals' working
    /// keys were handed out under one.
    #[error(
        "no terminal master derivation key (keys.terminal_master_derivation_key_file or \
         SWITCHYARD_TERMINAL_MASTER_DERIVATION_KEY), but this journal's terminals got working \
         keys under one (check value {recorded}; {terminals} hold keys now): without it no MAC is \
         checked. Give the key; \
         or, to stop MACs on purpose, `switchyard terminals forget-keys` (every terminal then \
         signs on again without keys)"
    )]
    TerminalKeyMissing {
        /// How many terminals hold keys.
        terminals: i64,
        /// The check value of the key they got them under.
        recorded: String,
    },
    /// The terminals' keys were forgotten while a running switch's locks
    /// were away (a database restart): it stops rather than go on.
    #[error(
        "the terminals' working keys were forgotten (`switchyard terminals forget-keys`) while \
         this switch's K3 locks were away: it stops; start the switches again as wanted"
    )]
    TerminalKeysForgotten,
    /// A switch with a derivation key where one without serves, or the
    /// other way round.
    #[error(
        "{}: a switch with the derivation key and one without cannot serve one journal together (the one without would take unMACed requests from terminals the other gave keys, and take their keys away at sign-on). Stop every switch on it, then start them all {}",
        if *keyed { "a switch without a terminal master derivation key serves on this database" } else { "a switch with a terminal master derivation key serves on this database" },
        if *keyed { "with the key" } else { "with the key too, or forget its keys (`switchyard terminals forget-keys`) once all are stopped" }
    )]
    OtherKind {
        /// Whether the refused switch had the key.
        keyed: bool,
    },
}

/// A pool on `url` whose connections work in the `switch` schema (created
/// when missing).
///
/// The first connection is made directly, not through a pool: a server that
/// is not there, or a database that is not, is said at once with its cause,
/// where a pool waits out its acquire timeout (30 s) to say only that it
/// timed out.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    use sqlx::{Connection, Executor};
    let options = PgConnectOptions::from_str(url)?;
    let mut setup = sqlx::PgConnection::connect_with(&options).await?;
    setup.execute("CREATE SCHEMA IF NOT EXISTS switch").await?;
    setup.close().await?;
    group_commit::postgres::pool_options()
        .max_connections(max_connections)
        .connect_with(options.options([("search_path", "switch")]))
        .await
}

/// Applies the switch's migrations.
pub async fn migrate(pool: &PgPool) -> Result<usize, sqlx::migrate::MigrateError> {
    let applied = || async {
        // No table yet: none applied.
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await
            .unwrap_or(0)
    };
    let before = applied().await;
    MIGRATOR.run(pool).await?;
    Ok(usize::try_from(applied().await - before).unwrap_or(0))
}

/// Records the PAN hash key's check value when the journal has none, and
/// refuses a key other than the one recorded.
pub async fn check_key(pool: &PgPool, key: &PanHashKey) -> Result<(), StartError> {
    let check = key.check_value().to_vec();
    let recorded =
        sqlx::query("INSERT INTO meta (key_check) VALUES ($1) ON CONFLICT (id) DO NOTHING")
            .bind(&check)
            .execute(pool)
            .await?
            .rows_affected();
    if recorded > 0 {
        let written: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM journal)")
            .fetch_one(pool)
            .await?;
        if written {
            // A journal from before the check: its key cannot be checked,
            // only taken. Said, so that a wrong one is noticed now.
            tracing::warn!(
                "the journal had no PAN hash key check yet: this key is now the journal's, and \
                 every other is refused; if its rows were written under another key, stop and \
                 start with that one (matching by card would find nothing)"
            );
        }
    }
    // A statement of its own: it sees the row another switch starting at
    // the same moment committed.
    let stored: Vec<u8> = sqlx::query_scalar("SELECT key_check FROM meta")
        .fetch_one(pool)
        .await?;
    if stored == check {
        Ok(())
    } else {
        Err(StartError::KeyMismatch)
    }
}

/// Once, at the first start that keeps F32 and F33 per row (migration
/// 0010): the rows journalled before it that a later message may still
/// name (received within the refund and pre-authorisation windows, still
/// `sent`, or with an advice pending) take the config's, as they were sent
/// with them; otherwise a change of `institution_id` afterwards would name
/// them by the new one. Returns how many rows and advices were given them.
///
/// The journal is walked back from its newest row by id, a chunk a
/// transaction (a large journal is not held in one), until a chunk holds
/// nothing received within the windows; the flag is set last, so a start
/// stopped half way does the rest next time. Every switch on the database
/// is upgraded together: an older one still writing would leave its new
/// rows without them.
pub async fn keep_acquirer_of_older_rows(
    pool: &PgPool,
    config: &Config,
) -> Result<u64, sqlx::Error> {
    const CHUNK: i64 = 50_000;
    let days = config
        .rules
        .refund_window_days
        .max(config.rules.preauth_valid_days)
        + 1;
    let kept: Option<bool> = sqlx::query_scalar("SELECT acquirer_kept FROM meta")
        .fetch_optional(pool)
        .await?;
    if kept != Some(false) {
        return Ok(0);
    }
    let ids = (&config.institution_id, &config.forwarding_id);
    // Rows any later message may name whatever their age, and advices.
    let mut given = sqlx::query(
        "UPDATE journal j SET institution_id = $1, forwarding_id = $2
         WHERE j.institution_id IS NULL
           AND (j.state = 'sent'
                OR j.id IN (SELECT journal_id FROM advices WHERE state = 'pending'))",
    )
    .bind(ids.0)
    .bind(ids.1)
    .execute(pool)
    .await?
    .rows_affected();
    given += sqlx::query(
        "UPDATE advices SET original_institution_id = $1, original_forwarding_id = $2
         WHERE original_institution_id IS NULL AND state = 'pending'",
    )
    .bind(ids.0)
    .bind(ids.1)
    .execute(pool)
    .await?
    .rows_affected();
    // The rows of the windows, newest first, by ranges of the primary key.
    let mut below: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) + 1 FROM journal")
        .fetch_one(pool)
        .await?;
    while below > 1 {
        let (changed, any, recent): (i64, bool, bool) = sqlx::query_as(
            "WITH chunk AS (SELECT id, received_at FROM journal WHERE id < $3 AND id >= $3 - $4),
                  given AS (UPDATE journal j SET institution_id = $1, forwarding_id = $2
                            FROM chunk c
                            WHERE j.id = c.id AND j.institution_id IS NULL
                              AND c.received_at > now() - make_interval(days => $5)
                            RETURNING j.id)
             SELECT (SELECT count(*) FROM given), EXISTS (SELECT 1 FROM chunk),
                    EXISTS (SELECT 1 FROM chunk WHERE received_at > now() - make_interval(days => $5))",
        )
        .bind(ids.0)
        .bind(ids.1)
        .bind(below)
        .bind(CHUNK)
        .bind(days as i32)
        .fetch_one(pool)
        .await?;
        given += changed as u64;
        below -= CHUNK;
        // Ids are drawn in time order: a chunk of rows all older than the
        // windows ends the walk (an empty one, ids burned by conflicts, does not).
        if any && !recent {
            break;
        }
    }
    sqlx::query("UPDATE meta SET acquirer_kept = true")
        .execute(pool)
        .await?;
    Ok(given)
}

/// Where a database URL points, for messages: `host:port/database`, the
/// user and password left out.
pub fn database_at(url: &str) -> String {
    match PgConnectOptions::from_str(url) {
        Ok(o) => format!(
            "{}:{}/{}",
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or("(default)")
        ),
        Err(_) => "(a URL that cannot be read)".to_string(),
    }
}

/// The config's terminal and network dialects (the embedded ones when it
/// names none), refused when they do not carry what the switch reads and
/// writes ([`dialects::problems`]).
pub fn load_dialects(config: &Config) -> Result<(Arc<Dialect>, Arc<Dialect>), StartError> {
    let load = |path: &Option<std::path::PathBuf>, embedded: fn() -> Dialect, name: &str| {
        Ok::<_, StartError>(match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).ok();
                (Dialect::load(path)?, path.display().to_string(), text)
            }
            None => (embedded(), format!("(embedded {name})"), None),
        })
    };
    let (terminal, t_origin, t_text) =
        load(&config.dialects.terminal, Dialect::cup_pos, "cup-pos")?;
    let (network, n_origin, n_text) = load(&config.dialects.network, Dialect::iso87, "iso87")?;
    let found = dialects::problems(
        (&terminal, &t_origin, t_text.as_deref()),
        (&network, &n_origin, n_text.as_deref()),
    );
    if !found.is_empty() {
        return Err(StartError::DialectFit(found));
    }
    Ok((Arc::new(terminal), Arc::new(network)))
}

/// Loads the dialects, seeds the terminals file, and starts the issuer links.
pub async fn start(
    config: Arc<Config>,
    pool: PgPool,
    key: PanHashKey,
    terminal_keys: Option<DerivationKey>,
    shutdown: &CancellationToken,
) -> Result<Arc<Switch>, StartError> {
    let (terminal_dialect, network_dialect) = load_dialects(&config)?;
    if config.issuers.is_empty() {
        tracing::warn!(
            "no [[issuers]] in the config: every card is declined 91 (no issuer to route it to)"
        );
    }
    migrate(&pool).await?;
    check_key(&pool, &key).await?;
    let (serving, terminal_keys) = k3::serve(&pool, terminal_keys).await?;
    let kept = keep_acquirer_of_older_rows(&pool, &config).await?;
    if kept > 0 {
        tracing::info!(
            rows = kept,
            institution_id = %config.institution_id,
            forwarding_id = %config.forwarding_id,
            "rows journalled before F32 and F33 were kept now keep the config's"
        );
    }
    if let Some(path) = &config.seed.terminals {
        terminals::Fleet::load(path)?.store(&pool).await?;
    }
    let identity = link::Identity {
        institution_id: config.institution_id.clone(),
        forwarding_id: config.forwarding_id.clone(),
    };
    // A link signing on wakes the advice queue: what waited for the issuer
    // goes at once.
    let advice_wake = Arc::new(Notify::new());
    // The links outlive `shutdown` until `run` has let what is in flight
    // finish. Should `run` not end it (never called, or stuck), the links
    // close a little after the grace.
    let links_stop = CancellationToken::new();
    {
        let (shutdown, links_stop) = (shutdown.clone(), links_stop.clone());
        let grace = config.limits.shutdown_grace + Duration::from_secs(5);
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::select! {
                () = tokio::time::sleep(grace) => links_stop.cancel(),
                () = links_stop.cancelled() => {}
            }
        });
    }
    let links = config
        .issuers
        .iter()
        .map(|i| {
            link::Link::start(
                i,
                network_dialect.clone(),
                identity.clone(),
                advice_wake.clone(),
                links_stop.clone(),
            )
        })
        .collect();
    let writer = writer::Writer::start(
        pool.clone(),
        group_commit::Limits {
            max_batch: config.database.max_batch,
            in_flight: config.database.batches_in_flight,
            delay: config.database.batch_delay,
        },
        config.database.terminal_cache,
        // Half the issuer timeout, for the wait to be sent and again for
        // the batch's connection: a request hears 96 from a journal that is
        // away within the issuer timeout, below the terminal's own (T1).
        config.rules.issuer_timeout / 2,
    );
    if config.database.plan_ahead {
        let planning = std::time::Instant::now();
        match writer.plan().await {
            Ok(n) => tracing::info!(
                connections = n,
                ms = planning.elapsed().as_millis() as u64,
                "journal statements planned"
            ),
            Err(e) => tracing::warn!(
                error = %group_commit::postgres::Said(&e),
                "could not plan the journal's statements ahead; they are planned at first use"
            ),
        }
    }
    Ok(Arc::new(Switch {
        writer,
        config,
        terminal_dialect,
        network_dialect,
        pool,
        key,
        terminal_keys,
        links,
        advice_wake,
        links_stop,
        abandoned: Default::default(),
        serving: tokio::sync::Mutex::new(Some(serving)),
        stopped_because: std::sync::Mutex::new(None),
        stopping: shutdown.clone(),
        metrics: admin::Metrics::new(),
    }))
}

/// Serves terminals on `listener` and runs the advice queue until
/// `shutdown`. Then takes no new connection, request or advice, lets what
/// is in flight finish (the issuer links stay up for it) for at most
/// `limits.shutdown_grace`, and closes the links. True when everything in
/// flight was answered; false when the grace ran out first (what was left
/// at the issuer is reversed by the next start).
pub async fn run(listener: TcpListener, switch: Arc<Switch>, shutdown: CancellationToken) -> bool {
    // `/health` says `starting` until now; the listener's queue holds the
    // terminals that connected meanwhile.
    switch
        .metrics
        .serving
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let advices = tokio::spawn(advice::run(switch.clone(), shutdown.clone()));
    let locks = tokio::spawn(k3::keep_serving(switch.clone(), shutdown.clone()));
    let stats = tokio::spawn(log_batches(switch.clone(), shutdown.clone()));
    let frontend = tokio::spawn(frontend::serve(listener, switch.clone(), shutdown.clone()));
    shutdown.cancelled().await;
    let deadline = tokio::time::Instant::now() + switch.config.limits.shutdown_grace;
    let drained = frontend.await.unwrap_or(false);
    let advices_done = match tokio::time::timeout_at(deadline, advices).await {
        Ok(_) => true,
        Err(_) => {
            tracing::warn!("shutdown grace over with advices still at the issuer");
            false
        }
    };
    let _ = (stats.await, locks.await);
    switch.links_stop.cancel();
    if drained {
        // Nothing of this switch's is left deciding: the locks may go.
        // Otherwise they go with the process (or the dropped switch).
        k3::stop_serving(&switch).await;
    }
    drained && advices_done
}

/// Every `database.stats_interval`, one line on how the journal's writes
/// were grouped since the last (batches, their size, how long one took, how
/// busy they kept the database: near 100 % the database is what holds the
/// rate). A quiet switch logs nothing; zero turns it off.
async fn log_batches(switch: Arc<Switch>, shutdown: CancellationToken) {
    let every = switch.config.database.stats_interval;
    group_commit::report_every(
        every,
        || switch.writer.stats(),
        |batches, over| {
            tracing::info!(
                "journal batches, last {every:?}: {}",
                batches.summary("writes", over)
            );
        },
        shutdown.cancelled(),
    )
    .await;
}
