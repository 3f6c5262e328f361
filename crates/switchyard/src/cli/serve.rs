//! `switchyard serve` and `switchyard migrate`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use clap::Args;
use switch::{Config, PanHashKey};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Failure, db};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The switch's config file.
    #[arg(long, default_value = "config/switchyard.toml")]
    pub config: PathBuf,
    /// Listen here instead of the config's `listen`.
    #[arg(long)]
    pub listen: Option<String>,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The switch's config file (for the database); default
    /// config/switchyard.toml when it exists.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Reads a switch config, every problem listed.
pub fn load_config(path: &std::path::Path) -> Result<Config, Failure> {
    Config::load(path).map_err(|problems| Failure::Other(anyhow!("{problems}")))
}

/// The threads `serve` runs on (`limits.threads`): read before the runtime
/// is built; a config that cannot be read gets one thread and its problems
/// reported by [`serve`].
pub fn threads(args: &ServeArgs) -> usize {
    Config::load(&args.config).map_or(1, |c| c.limits.threads)
}

/// The config named, else config/switchyard.toml when there is one, else
/// the defaults (for commands that only need the database, which
/// `DATABASE_URL` can name).
pub fn config_or_default(path: Option<&std::path::Path>) -> Result<Config, Failure> {
    let default = std::path::Path::new("config/switchyard.toml");
    match path {
        Some(p) => load_config(p),
        None if default.exists() => load_config(default),
        None => Ok(Config::default()),
    }
}

/// A token cancelled by SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down: no new connections; finishing what is in flight");
        t.cancel();
    });
    token
}

/// `switchyard serve`.
pub async fn serve(args: &ServeArgs) -> Result<(), Failure> {
    let mut config = load_config(&args.config)?;
    if let Some(listen) = &args.listen {
        config.listen.clone_from(listen);
    }
    let key = PanHashKey::load(config.keys.pan_hash_key_file.as_deref()).map_err(|e| {
        let named = config.keys.pan_hash_key_file.is_some();
        Failure::Other(anyhow::anyhow!(
            "{}",
            super::admin::key_problem(&args.config, "pan_hash_key_file", named, e)
        ))
    })?;
    let terminal_keys = switch::keys::terminal_derivation_key(
        config.keys.terminal_master_derivation_key_file.as_deref(),
    )
    .map_err(|e| {
        let named = config.keys.terminal_master_derivation_key_file.is_some();
        Failure::Other(anyhow::anyhow!(
            "{}",
            super::admin::key_problem(
                &args.config,
                "terminal_master_derivation_key_file",
                named,
                e
            )
        ))
    })?;
    if config.keys.terminal_master_derivation_key_file.is_some()
        && std::env::var_os(switch::keys::TERMINAL_ENV).is_some_and(|v| !v.is_empty())
    {
        tracing::warn!(
            "{} is set too and not used: keys.terminal_master_derivation_key_file wins",
            switch::keys::TERMINAL_ENV
        );
    }
    match &terminal_keys {
        Some(key) => tracing::info!(
            from = %config
                .keys
                .terminal_master_derivation_key_file
                .as_deref()
                .map_or(switch::keys::TERMINAL_ENV.to_string(), |p| p.display().to_string()),
            check_value = %hex::encode_upper(&key.check_value()[..3]),
            "terminals get working keys at sign-on; MACs are checked (K3)"
        ),
        None => tracing::info!(
            "no terminal master derivation key: terminals get no working keys and no MAC is checked"
        ),
    }
    let database = journal(&config, true).await?;
    database.say("the journal");
    let pool = switch::connect(&database.url, config.database.max_connections)
        .await
        .with_context(|| db::connecting(&database.url))?;
    let shutdown = shutdown_on_signals();
    let listener = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let admin = match &config.admin.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("admin.listen: listening on {addr}"))?,
        ),
        None => None,
    };
    let config = Arc::new(config);
    let switch = switch::start(config, pool, key, terminal_keys, &shutdown)
        .await
        .map_err(anyhow::Error::from)?;
    // Served until the switch has drained, saying `stopping` meanwhile.
    let admin_stop = CancellationToken::new();
    let _admin_stop = admin_stop.clone().drop_guard();
    if let Some(admin) = admin {
        println!(
            "switchyard admin on http://{} (/health, /metrics)",
            admin.local_addr().map_err(anyhow::Error::from)?
        );
        tokio::spawn(switch::admin::serve(admin, switch.clone(), admin_stop));
    }
    // Terminals that connect at once (a restart after a crash) wait in the
    // listen queue for the issuer links rather than hear 91; for at most
    // each link's connect timeout: an issuer that is down does not keep the
    // switch from serving what needs no issuer.
    for (link, issuer) in switch.links.iter().zip(&switch.config.issuers) {
        if !link.wait_up(issuer.connect_timeout).await {
            tracing::warn!(issuer = %issuer.name, "issuer link not up yet; serving anyway");
        }
    }
    println!(
        "switchyard listening on {} (terminals, cup-pos)",
        listener.local_addr().map_err(anyhow::Error::from)?
    );
    // A second signal while in flight requests finish: stop at once (the
    // private PostgreSQL, if any, still stopped and removed on the way out).
    let running = switch.clone();
    let drained = tokio::select! {
        drained = switch::run(listener, switch, shutdown.clone()) => drained,
        () = second_signal(shutdown) => {
            tracing::warn!(
                "second signal: stopping at once; the next start reverses what is left at the issuer"
            );
            drop(database);
            return Err(Failure::Other(anyhow::anyhow!(
                "stopped at once by a second signal: the next start reverses what was left at the issuer"
            )));
        }
    };
    drop(database);
    let stopped_because = running.stopped_because.lock().ok().and_then(|w| w.clone());
    if let Some(why) = stopped_because {
        return Err(Failure::Other(anyhow::anyhow!("stopped by itself: {why}")));
    }
    if !drained {
        return Err(Failure::Other(anyhow::anyhow!(
            "stopped with requests still in flight after limits.shutdown_grace: the next start reverses what they left at the issuer"
        )));
    }
    tracing::info!("switch stopped: everything in flight was answered");
    Ok(())
}

/// A SIGTERM or SIGINT after `shutdown`: an operator who presses Ctrl-C
/// twice wants it stopped now. Nothing is lost by it: the next start
/// reverses what was left at the issuer.
async fn second_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    shutdown.cancelled().await;
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// The journal's database as the config names it; `lasting` as
/// [`db::open`]'s.
pub async fn journal(config: &Config, lasting: bool) -> anyhow::Result<db::Database> {
    db::open(
        config.database.url.as_deref(),
        config.database.embedded_data_dir.as_deref(),
        "switchyard",
        "the journal (and with it what the switch left at the issuer)",
        lasting,
    )
    .await
}

/// A small pool on the config's database with the switch schema up to date
/// (and the private server behind it, when there is one).
pub async fn migrated_pool(config: &Config) -> Result<(sqlx::PgPool, db::Database), Failure> {
    migrated(config).await.map(|(pool, db, _)| (pool, db))
}

/// [`migrated_pool`], and how many migrations it applied.
async fn migrated(config: &Config) -> Result<(sqlx::PgPool, db::Database, usize), Failure> {
    let database = journal(config, false).await?;
    let pool = switch::connect(&database.url, 2)
        .await
        .with_context(|| db::connecting(&database.url))?;
    let applied = switch::migrate(&pool)
        .await
        .context("applying migrations")?;
    Ok((pool, database, applied))
}

/// `switchyard migrate`.
pub async fn migrate(args: &MigrateArgs) -> Result<(), Failure> {
    let (_, _db, applied) = migrated(&config_or_default(args.config.as_deref())?).await?;
    match applied {
        0 => println!("the switch schema was up to date: nothing to apply"),
        n => println!("applied {n} migrations: the switch schema is up to date"),
    }
    Ok(())
}
