//! Operator commands: `switchyard txn show` and `switchyard settlement report`.

use std::path::PathBuf;

use anyhow::{Context, anyhow};
use clap::Args;
use switch::audit::{self, Selector};

use super::serve::load_config;
use super::{Failure, db};

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The transaction's RRN.
    #[arg(long, conflicts_with_all = ["terminal", "batch", "stan"], required_unless_present = "terminal")]
    pub rrn: Option<String>,
    /// The terminal (with --batch and --stan).
    #[arg(long, requires_all = ["batch", "stan"])]
    pub terminal: Option<String>,
    /// The batch number.
    #[arg(long)]
    pub batch: Option<i32>,
    /// The STAN.
    #[arg(long)]
    pub stan: Option<i32>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The switch's config file (for the database).
    #[arg(long, default_value = "config/switchyard.toml")]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The terminal.
    #[arg(long)]
    pub terminal: String,
    /// The batch number.
    #[arg(long)]
    pub batch: i32,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The switch's config file (for the database).
    #[arg(long, default_value = "config/switchyard.toml")]
    pub config: PathBuf,
}

/// The journal's database: `DATABASE_URL`, else the config's `database.url`,
/// else the private server in its `database.embedded_data_dir`.
pub async fn journal_pool(
    config: &std::path::Path,
) -> Result<(sqlx::PgPool, db::Database), Failure> {
    let database = match std::env::var("DATABASE_URL") {
        Ok(url) => db::open(Some(&url), None, "switchyard", "", false).await?,
        Err(_) => super::serve::journal(&load_config(config)?, false).await?,
    };
    let pool = switch::connect(&database.url, 2)
        .await
        .with_context(|| db::connecting(&database.url))?;
    Ok((pool, database))
}

/// `switchyard txn show`.
pub async fn show(args: &ShowArgs) -> Result<(), Failure> {
    let (pool, _db) = journal_pool(&args.config).await?;
    let selector = match (&args.rrn, &args.terminal, args.batch, args.stan) {
        (Some(rrn), ..) => Selector::Rrn(rrn.clone()),
        (None, Some(t), Some(batch), Some(stan)) => Selector::Terminal {
            terminal_id: t.clone(),
            batch,
            stan,
        },
        _ => {
            return Err(Failure::Input(anyhow!(
                "give --rrn, or --terminal with --batch and --stan"
            )));
        }
    };
    let history = audit::history(&pool, &selector)
        .await
        .context("reading the journal")?;
    let Some(history) = history else {
        return Err(Failure::Input(anyhow!(
            "no such transaction (an RRN is the 12 digits of F37 in the reply; `txn show --terminal T --batch B --stan S` finds one by the terminal's numbers; a request answered before it was journalled, 30 malformed, 97 or 03 unknown, 77 another batch or A0 its MAC, is only in the switch's log)"
        )));
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&history.to_json()).map_err(anyhow::Error::from)?
        );
    } else {
        print!("{}", history.to_text());
    }
    Ok(())
}

/// `switchyard settlement report`.
pub async fn report(args: &ReportArgs) -> Result<(), Failure> {
    let (pool, _db) = journal_pool(&args.config).await?;
    let report = audit::settlement_report(&pool, &args.terminal, args.batch)
        .await
        .context("reading the journal")?;
    let empty = report.matched.is_empty()
        && report.only_terminal.is_empty()
        && report.only_switch.is_empty();
    if report.settlement.is_none() && empty {
        return Err(Failure::Input(anyhow!(
            "terminal {} has no settlement and no transaction in batch {:06}",
            args.terminal,
            args.batch
        )));
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.to_json()).map_err(anyhow::Error::from)?
        );
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}
