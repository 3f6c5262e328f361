//! `switchyard issuer`: the simulated issuer as a server of its own, and
//! `switchyard issuer clearing --date D`.

use std::io::ErrorKind::BrokenPipe;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand};
use issuer_sim::{Issuer, IssuerConfig, PanKey};
use tokio::net::TcpListener;

use super::serve::shutdown_on_signals;
use super::{Failure, db};

#[derive(Debug, Args)]
pub struct IssuerArgs {
    /// The issuer's config file.
    #[arg(long, default_value = "config/issuer-sim.toml")]
    pub config: PathBuf,
    /// Listen here instead of the config's `listen`.
    #[arg(long)]
    pub listen: Option<String>,
    #[command(subcommand)]
    pub command: Option<IssuerCommand>,
}

#[derive(Debug, Subcommand)]
pub enum IssuerCommand {
    /// Write one day's postings as CSV (a UTC day, as `reconcile --date`
    /// counts), or every day's.
    Clearing {
        /// The day, YYYY-MM-DD; every day when absent.
        #[arg(long)]
        date: Option<chrono::NaiveDate>,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn load(path: &std::path::Path) -> Result<IssuerConfig, Failure> {
    IssuerConfig::load(path).map_err(|e| Failure::Other(anyhow!("{e}")))
}

/// The threads the issuer runs on (`limits.threads`): read before the
/// runtime is built; a config that cannot be read gets one thread and its
/// problems reported by [`run`].
pub fn threads(args: &IssuerArgs) -> usize {
    IssuerConfig::load(&args.config).map_or(1, |c| c.limits.threads)
}

/// A clearing file that could not be written, said once: a CSV error says
/// "writing the clearing file" itself. On standard output, its reader
/// closing it (`| head`) is no failure to say.
fn clearing_failure(e: issuer_sim::Error, to_stdout: bool) -> Failure {
    if to_stdout && e.io().is_some_and(|io| io.kind() == BrokenPipe) {
        return Failure::StdoutClosed;
    }
    match e {
        issuer_sim::Error::Csv(_) => Failure::Other(anyhow!("{e}")),
        e => Failure::Other(anyhow!("writing the clearing file: {e}")),
    }
}

/// `switchyard issuer`: serves, or with `clearing`, writes a day's postings.
pub async fn run(args: &IssuerArgs) -> Result<(), Failure> {
    let config = load(&args.config)?;
    if let Some(IssuerCommand::Clearing { date, out }) = &args.command {
        // Postings hold masked PANs only: the clearing file needs no key.
        let (pool, _database) = books(&config, false).await?;
        let result = match out {
            Some(path) => {
                let file = std::fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?;
                issuer_sim::clearing(&pool, *date, file).await
            }
            None => issuer_sim::clearing(&pool, *date, std::io::stdout().lock()).await,
        };
        return result
            .map(|_| ())
            .map_err(|e| clearing_failure(e, out.is_none()));
    }
    let key = PanKey::load(&config.keys).map_err(|e| {
        let named = config.keys.pan_key_file.is_some();
        Failure::Other(anyhow!(
            "{}",
            super::admin::key_problem(&args.config, "pan_key_file", named, e)
        ))
    })?;
    let (pool, database) = books(&config, true).await?;
    database.say("the issuer's books");
    let seeded = issuer_sim::seed_cards(&pool, &key, &config.cards)
        .await
        .map_err(|e| anyhow!("seeding cards: {e}"))?;
    let listen = args
        .listen
        .clone()
        .unwrap_or_else(|| config.listen.to_string());
    let listener = TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    println!(
        "switchyard issuer listening on {} (iso87); {seeded} new cards",
        listener.local_addr().map_err(anyhow::Error::from)?
    );
    let shutdown = shutdown_on_signals();
    let issuer = Arc::new(Issuer::new(config, key, pool));
    issuer_sim::run(listener, issuer, shutdown)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    drop(database);
    Ok(())
}

/// The issuer's books, migrated (and the private server behind them, when
/// there is one); `serving` as [`db::open`]'s `lasting`.
async fn books(
    config: &IssuerConfig,
    serving: bool,
) -> Result<(sqlx::PgPool, db::Database), Failure> {
    let database = db::open(
        config.database.url.as_deref(),
        config.database.embedded_data_dir.as_deref(),
        "switchyard",
        "the issuer's books (the card balances and postings)",
        serving,
    )
    .await?;
    let pool = issuer_sim::connect(&database.url)
        .await
        .with_context(|| db::connecting(&database.url))?;
    issuer_sim::migrate(&pool)
        .await
        .map_err(|e| anyhow!("issuer migrations: {e}"))?;
    Ok((pool, database))
}

#[cfg(test)]
mod tests {
    use super::{Failure, clearing_failure};

    /// A CSV writer's error, as the clearing file meets it.
    fn csv_error(kind: std::io::ErrorKind) -> issuer_sim::Error {
        struct Failing(std::io::ErrorKind);
        impl std::io::Write for Failing {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(self.0.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Err(self.0.into())
            }
        }
        let mut csv = csv::WriterBuilder::new()
            .buffer_capacity(1)
            .from_writer(Failing(kind));
        issuer_sim::Error::Csv(csv.write_record(["a", "b"]).unwrap_err())
    }

    #[test]
    fn a_clearing_file_that_cannot_be_written_is_said_once() {
        let said = clearing_failure(csv_error(std::io::ErrorKind::StorageFull), false).to_string();
        assert_eq!(
            said.matches("writing the clearing file").count(),
            1,
            "{said}"
        );
        let said = clearing_failure(issuer_sim::Error::Database(sqlx::Error::PoolTimedOut), true)
            .to_string();
        assert!(
            said.starts_with("writing the clearing file: database: "),
            "{said}"
        );
    }

    #[test]
    fn a_clearing_file_whose_reader_went_away_is_no_failure_to_say() {
        let pipe = std::io::ErrorKind::BrokenPipe;
        assert!(matches!(
            clearing_failure(csv_error(pipe), true),
            Failure::StdoutClosed
        ));
        assert!(matches!(
            clearing_failure(issuer_sim::Error::Io(pipe.into()), true),
            Failure::StdoutClosed
        ));
        // To a file (--out), a broken pipe is a failure like any other.
        assert!(matches!(
            clearing_failure(csv_error(pipe), false),
            Failure::Other(_)
        ));
    }
}
