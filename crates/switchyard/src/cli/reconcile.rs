//! `switchyard reconcile`: the switch's journal against the issuer's
//! clearing file; non-zero exit on any break of the money invariant.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::Args;
use switch::reconcile;

use super::Failure;
use super::ops::journal_pool;

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// The issuer's clearing file (`switchyard issuer clearing [--date D] --out F`;
    /// with --date, only its postings of that day are compared).
    #[arg(long)]
    pub clearing_file: PathBuf,
    /// The day (UTC, as the clearing file counts days, not the business day
    /// `txn show` gives); all entries when absent.
    #[arg(long)]
    pub date: Option<chrono::NaiveDate>,
    /// Wait this long for unanswered advices to drain first (e.g. 60s).
    #[arg(long, value_parser = |t: &str| settings::parse_duration(t).ok_or_else(|| format!("{t:?} is not a duration like 60s")))]
    pub wait: Option<Duration>,
    /// The switch's config file (for the database).
    #[arg(long, default_value = "config/switchyard.toml")]
    pub config: PathBuf,
}

/// `switchyard reconcile`.
pub async fn run(args: &ReconcileArgs) -> Result<(), Failure> {
    let (pool, _db) = journal_pool(&args.config).await?;
    let deadline = tokio::time::Instant::now() + args.wait.unwrap_or_default();
    let pending = loop {
        let pending = reconcile::pending_advices(&pool)
            .await
            .context("reading the advice queue")?;
        if pending == 0 || tokio::time::Instant::now() >= deadline {
            break pending;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let text = std::fs::read_to_string(&args.clearing_file)
        .with_context(|| format!("cannot read {}", args.clearing_file.display()))?;
    let file = args.clearing_file.display().to_string();
    let issuer = reconcile::read_clearing_on(&text, &file, args.date)
        .map_err(|e| Failure::Input(anyhow!(e)))?;
    let days = reconcile::posting_days(&text);
    if let Some(date) = args.date.filter(|d| !days.is_empty() && !days.contains(d)) {
        let days: Vec<String> = days.iter().map(ToString::to_string).collect();
        return Err(Failure::Input(anyhow!(
            "{file} holds postings of {} (UTC days), none of --date {date}: the file of that day is `switchyard issuer clearing --date {date}`",
            days.join(", ")
        )));
    }
    let journal = reconcile::journal_effects(&pool, args.date)
        .await
        .context("reading the journal")?;
    if journal.is_empty() && issuer.is_empty() {
        // An empty day, or a business day taken for a UTC day.
        if let Some(date) = args.date {
            let of_business_day = reconcile::of_business_day(&pool, date)
                .await
                .context("reading the journal")?;
            if of_business_day > 0 {
                return Err(Failure::Input(anyhow!(
                    "no journal entry was received on {date} (a UTC day), but {of_business_day} have {date} for their business day: --date counts UTC days, as the clearing file does; check each UTC day the business day spans"
                )));
            }
        }
        let day = args
            .date
            .map_or(String::new(), |d| format!(" received on {d} (a UTC day)"));
        println!(
            "nothing to check: no journal entry{day} went to the issuer, and {file} holds no posting"
        );
        return Ok(());
    }
    let mut result = reconcile::compare(&journal, &issuer);
    if let Some(date) = args.date {
        // A day's file cannot see the whole of an entry whose postings
        // cross midnight: those breaks are the next day's to settle.
        let rrns: Vec<&str> = result.breaks.iter().map(reconcile::Break::rrn).collect();
        let across = reconcile::across_midnight(&pool, date, &rrns)
            .await
            .context("reading the journal")?;
        result.carry(&across);
    }
    println!(
        "matched {} rrns ({} more with nothing due and nothing posted); journal net {} fen, issuer net {} fen; {} break(s); {} carried over; {} advice(s) pending",
        result.matched,
        result.nothing_due,
        result.journal_total,
        result.issuer_total,
        result.breaks.len(),
        result.carried.len(),
        pending
    );
    for b in &result.breaks {
        println!("  {b}");
    }
    for b in &result.carried {
        println!("  carried over (its postings cross midnight): {b}");
    }
    if pending > 0 {
        return Err(Failure::Other(anyhow!(
            "{pending} advice(s) not answered yet: the check is not final"
        )));
    }
    if !result.balanced_but_carried() {
        let hint = if issuer.is_empty() {
            format!(" ({file} holds no posting: is it the issuer's file of these days?)")
        } else {
            String::new()
        };
        return Err(Failure::Other(anyhow!(
            "the money invariant is broken{hint}"
        )));
    }
    if !result.carried.is_empty() {
        return Err(Failure::Other(anyhow!(
            "{} entries cross midnight: the check is not final; run it without --date, on a file of all days, to decide them",
            result.carried.len()
        )));
    }
    println!("money check: balanced to the fen");
    Ok(())
}
