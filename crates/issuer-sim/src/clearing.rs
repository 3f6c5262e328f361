//! The clearing file: one day's postings as CSV, for reconciliation with
//! the switch's journal by RRN, amount and final state.
//!
//! The day is the UTC day of the time each posting was recorded. Every
//! posting is there, declines and balance inquiries included (amount 0,
//! effect `none`), with its state as it is when the file is written: a
//! purchase voided the next day shows `voided` in a file written after that.
//! A reversal that came before its original is a `reversal` line whose note
//! says so; the original, if it came, is a line declined `68`, reversed.

use std::io::Write;

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use futures::TryStreamExt;
use sqlx::PgPool;

use crate::Error;

/// The header row.
pub const CLEARING_HEADER: [&str; 22] = [
    "posting_id",
    "time",
    "acquirer",
    "stan",
    "transmitted",
    "mti",
    "processing_code",
    "kind",
    "pan",
    "amount",
    "effect",
    "auth_code",
    "response_code",
    "rrn",
    "terminal",
    "merchant",
    "original",
    "reversed",
    "state",
    "balance_change",
    "hold_change",
    "note",
];

#[derive(sqlx::FromRow)]
struct Line {
    id: i64,
    created_at: DateTime<Utc>,
    acquirer: String,
    stan: String,
    transmitted: String,
    mti: String,
    processing_code: Option<String>,
    kind: String,
    pan_masked: Option<String>,
    amount: i64,
    balance_change: i64,
    hold_change: i64,
    auth_code: Option<String>,
    response_code: Option<String>,
    rrn: Option<String>,
    terminal: Option<String>,
    merchant: Option<String>,
    original_ref: Option<String>,
    reversed: bool,
    state: String,
    note: Option<String>,
}

/// What a posting did to the card: `debit`, `credit` (balance), else
/// `hold`, `release` (holds), else `none`. A completion both releases its
/// hold and debits: `debit`; its exact figures are in `balance_change` and
/// `hold_change`.
fn effect(balance: i64, hold: i64) -> &'static str {
    match (balance.signum(), hold.signum()) {
        (-1, _) => "debit",
        (1, _) => "credit",
        (_, 1) => "hold",
        (_, -1) => "release",
        _ => "none",
    }
}

/// Writes the postings of `date` (UTC), or of every day when `None`, to
/// `out`; returns how many.
pub async fn clearing(
    pool: &PgPool,
    date: Option<NaiveDate>,
    out: impl Write,
) -> Result<u64, Error> {
    let start = date.map(|d| d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    let end = start.map(|s| s + chrono::Duration::days(1));
    let mut lines = sqlx::query_as::<_, Line>(
        "SELECT id, created_at, acquirer, stan, transmitted, mti, processing_code, kind, pan_masked,
                amount, balance_change, hold_change, auth_code, response_code, rrn, terminal, merchant,
                original_ref, reversed, state, note
         FROM issuer.postings
         WHERE kind <> 'awaited' AND ($1::timestamptz IS NULL OR created_at >= $1)
           AND ($2::timestamptz IS NULL OR created_at < $2)
         ORDER BY id",
    )
    .bind(start)
    .bind(end)
    .fetch(pool);
    let mut csv = csv::Writer::from_writer(out);
    csv.write_record(CLEARING_HEADER)?;
    let mut count = 0;
    while let Some(l) = lines.try_next().await? {
        let amount = if l.kind == "balance_inquiry" {
            0
        } else {
            l.amount
        };
        csv.write_record([
            l.id.to_string().as_str(),
            &l.created_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            &l.acquirer,
            &l.stan,
            &l.transmitted,
            &l.mti,
            l.processing_code.as_deref().unwrap_or(""),
            &l.kind,
            l.pan_masked.as_deref().unwrap_or(""),
            &amount.to_string(),
            effect(l.balance_change, l.hold_change),
            l.auth_code.as_deref().unwrap_or(""),
            l.response_code.as_deref().unwrap_or(""),
            l.rrn.as_deref().unwrap_or(""),
            l.terminal.as_deref().unwrap_or(""),
            l.merchant.as_deref().unwrap_or(""),
            l.original_ref.as_deref().unwrap_or(""),
            if l.reversed { "true" } else { "false" },
            &l.state,
            &l.balance_change.to_string(),
            &l.hold_change.to_string(),
            l.note.as_deref().unwrap_or(""),
        ])?;
        count += 1;
    }
    csv.flush()?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effects() {
        assert_eq!(effect(-100, 0), "debit");
        assert_eq!(effect(-100, -120), "debit");
        assert_eq!(effect(100, 120), "credit");
        assert_eq!(effect(0, 100), "hold");
        assert_eq!(effect(0, -100), "release");
        assert_eq!(effect(0, 0), "none");
    }
}
