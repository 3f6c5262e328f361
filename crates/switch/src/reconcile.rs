//! The money check: the switch's journal against the issuer's clearing file.
//!
//! Every journal entry implies what the issuer should have done to the card
//! balance under its RRN: an approved purchase or completion a debit (also
//! when voided or refunded later: those are entries of their own), an
//! approved void, completion void or refund a credit, anything reversed,
//! declined, or a balance inquiry nothing (a reversal advice travels under
//! the reversed entry's RRN, so a reversed sale nets to zero at the issuer
//! too). The clearing file says what the issuer did, per posting; summed by
//! RRN the two must agree to the fen. Anything else is a break of the money
//! invariant.

use std::collections::{BTreeMap, HashSet};

use chrono::NaiveDate;
use sqlx::PgPool;

/// How one RRN compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Break {
    /// The journal expects a balance change the issuer does not have.
    MissingAtIssuer {
        /// RRN.
        rrn: String,
        /// What the journal expects (negative: a debit).
        expected: i64,
    },
    /// The issuer changed a balance under an RRN the journal does not know.
    MissingInJournal {
        /// RRN.
        rrn: String,
        /// What the issuer did.
        posted: i64,
    },
    /// Both know the RRN, with different amounts.
    AmountDiffers {
        /// RRN.
        rrn: String,
        /// The journal's figure.
        expected: i64,
        /// The issuer's.
        posted: i64,
    },
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Break::MissingAtIssuer { rrn, expected } => {
                write!(
                    f,
                    "rrn {rrn}: journal expects {expected} fen, the issuer posted nothing"
                )
            }
            Break::MissingInJournal { rrn, posted } => {
                write!(
                    f,
                    "rrn {rrn}: the issuer posted {posted} fen, the journal has no such entry"
                )
            }
            Break::AmountDiffers {
                rrn,
                expected,
                posted,
            } => {
                write!(
                    f,
                    "rrn {rrn}: journal expects {expected} fen, the issuer posted {posted}"
                )
            }
        }
    }
}

impl Break {
    /// The RRN it is about.
    pub fn rrn(&self) -> &str {
        match self {
            Break::MissingAtIssuer { rrn, .. }
            | Break::MissingInJournal { rrn, .. }
            | Break::AmountDiffers { rrn, .. } => rrn,
        }
    }

    /// What the journal expects and what the issuer posted, in fen.
    fn sides(&self) -> (i64, i64) {
        match *self {
            Break::MissingAtIssuer { expected, .. } => (expected, 0),
            Break::MissingInJournal { posted, .. } => (0, posted),
            Break::AmountDiffers {
                expected, posted, ..
            } => (expected, posted),
        }
    }
}

/// The result of a comparison.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciliation {
    /// RRNs the issuer posted and the journal agrees with (zero-effect
    /// ones included).
    pub matched: usize,
    /// Journal entries the issuer was sent but posted nothing for, rightly:
    /// nothing was due (the request never reached it, say).
    pub nothing_due: usize,
    /// Net balance change the journal expects, fen.
    pub journal_total: i64,
    /// Net balance change the issuer posted, fen.
    pub issuer_total: i64,
    /// Every disagreement.
    pub breaks: Vec<Break>,
    /// Disagreements of a day's check on entries whose postings cross the
    /// day's edge ([`Reconciliation::carry`]): the day's file cannot tell
    /// whether they are the money's.
    pub carried: Vec<Break>,
}

impl Reconciliation {
    /// True when the money invariant holds.
    pub fn balanced(&self) -> bool {
        self.breaks.is_empty() && self.carried.is_empty() && self.journal_total == self.issuer_total
    }

    /// True when nothing but carried-over entries stands in the way: the
    /// day shows no break of its own, and the totals agree but for them. The
    /// check is not final: a check of all days (no `--date`) decides them.
    pub fn balanced_but_carried(&self) -> bool {
        let (expected, posted) = self
            .carried
            .iter()
            .map(Break::sides)
            .fold((0, 0), |(e, p), (de, dp)| (e + de, p + dp));
        self.breaks.is_empty() && self.journal_total - expected == self.issuer_total - posted
    }

    /// Sets aside, as carried over, the breaks on `rrns`.
    pub fn carry(&mut self, rrns: &HashSet<String>) {
        let (carried, breaks) = std::mem::take(&mut self.breaks)
            .into_iter()
            .partition(|b| rrns.contains(b.rrn()));
        self.breaks = breaks;
        self.carried = carried;
    }
}

/// Of `rrns`, those whose postings a check of `date` (UTC) cannot see whole:
/// the entry was received on another day, or the issuer heard of it after
/// the day ended (its outcome, or an advice answered later or not yet), so
/// its postings are in two days' clearing files. A day's file cannot
/// decide their breaks; a check of all days can.
pub async fn across_midnight(
    pool: &PgPool,
    date: NaiveDate,
    rrns: &[&str],
) -> Result<HashSet<String>, sqlx::Error> {
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT j.rrn FROM journal j
         WHERE j.rrn = ANY($1) AND (
            (j.received_at AT TIME ZONE 'UTC')::date <> $2
            OR (j.completed_at AT TIME ZONE 'UTC')::date > $2
            OR EXISTS (SELECT 1 FROM advices a WHERE a.journal_id = j.id
                       AND (a.done_at IS NULL OR (a.done_at AT TIME ZONE 'UTC')::date > $2)))",
    )
    .bind(rrns)
    .bind(date)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Compares what the journal expects per RRN with what the issuer posted.
pub fn compare(journal: &[(String, i64)], issuer: &[(String, i64)]) -> Reconciliation {
    let mut expected: BTreeMap<&str, i64> = BTreeMap::new();
    for (rrn, amount) in journal {
        *expected.entry(rrn).or_default() += amount;
    }
    let mut posted: BTreeMap<&str, i64> = BTreeMap::new();
    for (rrn, amount) in issuer {
        *posted.entry(rrn).or_default() += amount;
    }
    let mut r = Reconciliation {
        journal_total: expected.values().sum(),
        issuer_total: posted.values().sum(),
        ..Reconciliation::default()
    };
    for (rrn, &e) in &expected {
        match posted.get(rrn) {
            Some(&p) if p == e => r.matched += 1,
            Some(&p) => r.breaks.push(Break::AmountDiffers {
                rrn: rrn.to_string(),
                expected: e,
                posted: p,
            }),
            None if e == 0 => r.nothing_due += 1,
            None => r.breaks.push(Break::MissingAtIssuer {
                rrn: rrn.to_string(),
                expected: e,
            }),
        }
    }
    for (rrn, &p) in &posted {
        if !expected.contains_key(rrn) && p != 0 {
            r.breaks.push(Break::MissingInJournal {
                rrn: rrn.to_string(),
                posted: p,
            });
        }
    }
    r
}

/// What the journal expects the issuer to have done, per entry, for the
/// entries received on `date` (UTC, as the clearing file counts days), or
/// for all entries when `date` is `None`.
pub async fn journal_effects(
    pool: &PgPool,
    date: Option<NaiveDate>,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT rrn, CASE
                WHEN kind IN ('purchase', 'completion', 'completion_advice')
                     AND state IN ('approved', 'voided', 'partially_refunded', 'refunded') THEN -amount
                WHEN kind IN ('void', 'completion_void', 'refund') AND state = 'approved' THEN amount
                ELSE 0 END
         FROM journal
         WHERE issuer IS NOT NULL AND ($1::date IS NULL OR (received_at AT TIME ZONE 'UTC')::date = $1)",
    )
    .bind(date)
    .fetch_all(pool)
    .await
}

/// How many entries that went to the issuer have `date` for their
/// business day: a check of the UTC day `date` that finds none of them
/// was likely given a business day.
pub async fn of_business_day(pool: &PgPool, date: NaiveDate) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM journal WHERE issuer IS NOT NULL AND business_date = $1",
    )
    .bind(date)
    .fetch_one(pool)
    .await
}

/// Advices not answered yet (the check is only meaningful once they drain).
pub async fn pending_advices(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM advices WHERE state = 'pending'")
        .fetch_one(pool)
        .await
}

/// Journal rows still `sent`: at the issuer, or left there by a switch that
/// died before their outcome. Once nothing is in flight the recovery sweep
/// reverses them (after `issuer_timeout` + 2 s); the money check is only
/// meaningful when there are none, and their advices have drained.
pub async fn in_flight(pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM journal WHERE state = 'sent' ORDER BY id")
        .fetch_all(pool)
        .await
}

/// The days (UTC) of the postings of a clearing file, from its `time`
/// column (RFC 3339); none when it has no such column.
pub fn posting_days(text: &str) -> std::collections::BTreeSet<NaiveDate> {
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let Some(time) = reader
        .headers()
        .ok()
        .and_then(|h| h.iter().position(|h| h == "time"))
    else {
        return Default::default();
    };
    reader
        .records()
        .filter_map(Result::ok)
        .filter_map(|r| day_of(&r, time))
        .collect()
}

/// The day (UTC) of a clearing record's `time`, column `time`.
fn day_of(record: &csv::StringRecord, time: usize) -> Option<NaiveDate> {
    chrono::DateTime::parse_from_rfc3339(record.get(time)?)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc).date_naive())
}

/// Reads the issuer's clearing file: per posting, its RRN and balance change.
pub fn read_clearing(text: &str, origin: &str) -> Result<Vec<(String, i64)>, String> {
    read_clearing_on(text, origin, None)
}

/// [`read_clearing`], of the postings of `day` (UTC, from the `time`
/// column) only when given: a file of every day checked for one.
pub fn read_clearing_on(
    text: &str,
    origin: &str,
    day: Option<NaiveDate>,
) -> Result<Vec<(String, i64)>, String> {
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| format!("{origin}: {e}"))?
        .clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| format!("{origin}: no column {name:?} in the header"))
    };
    let (rrn, change) = (col("rrn")?, col("balance_change")?);
    let time = col("time").ok();
    let mut out = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| format!("{origin}: {e}"))?;
        if day.is_some() && time.is_some_and(|t| day_of(&record, t) != day) {
            continue;
        }
        let line = record.position().map_or(0, |p| p.line());
        let amount: i64 =
            record.get(change).unwrap_or("").parse().map_err(|_| {
                format!("{origin}:{line}: balance_change is not a whole number of fen")
            })?;
        out.push((record.get(rrn).unwrap_or("").to_string(), amount));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(r: &[(&str, i64)]) -> Vec<(String, i64)> {
        r.iter().map(|(a, b)| (a.to_string(), *b)).collect()
    }

    #[test]
    fn agreeing_sides_balance() {
        // A sale voided (two entries), a reversed sale (nets to zero at the
        // issuer under one RRN), and an inquiry.
        let journal = rows(&[("1", -500), ("2", 500), ("3", 0), ("4", 0)]);
        let issuer = rows(&[("1", -500), ("2", 500), ("3", -700), ("3", 700), ("4", 0)]);
        let r = compare(&journal, &issuer);
        assert!(r.balanced(), "{r:?}");
        assert_eq!(r.matched, 4);
        // An entry the issuer never saw, with nothing due: no break, and
        // not counted as matched (a file of no postings matches nothing).
        let r = compare(&rows(&[("5", 0)]), &[]);
        assert!(r.balanced());
        assert_eq!((r.matched, r.nothing_due), (0, 1));
    }

    #[test]
    fn the_days_of_a_clearing_file_come_from_its_time_column() {
        let csv = "posting_id,time,rrn,balance_change
\
                   1,2026-12-07T23:59:59.900Z,000000000001,-500
\
                   2,2026-12-08T00:00:00.100Z,000000000002,-700
";
        let days: Vec<_> = posting_days(csv).into_iter().collect();
        assert_eq!(
            days,
            ["2026-12-07", "2026-12-08"].map(|d| d.parse::<NaiveDate>().unwrap())
        );
        assert!(posting_days("rrn,balance_change\n1,0\n").is_empty());
        // A file of every day, checked for one.
        let on = |d: &str| read_clearing_on(csv, "c.csv", Some(d.parse().unwrap())).unwrap();
        assert_eq!(on("2026-12-07"), rows(&[("000000000001", -500)]));
        assert_eq!(on("2026-12-08"), rows(&[("000000000002", -700)]));
    }

    #[test]
    fn every_kind_of_break_is_named() {
        let journal = rows(&[("1", -500), ("2", -300), ("3", 0)]);
        let issuer = rows(&[("2", -200), ("9", -100)]);
        let r = compare(&journal, &issuer);
        assert!(!r.balanced());
        assert_eq!(
            r.breaks,
            vec![
                Break::MissingAtIssuer {
                    rrn: "1".into(),
                    expected: -500
                },
                Break::AmountDiffers {
                    rrn: "2".into(),
                    expected: -300,
                    posted: -200
                },
                Break::MissingInJournal {
                    rrn: "9".into(),
                    posted: -100
                },
            ]
        );
        assert_eq!(
            r.breaks[0].to_string(),
            "rrn 1: journal expects -500 fen, the issuer posted nothing"
        );
    }

    #[test]
    fn the_clearing_file_is_read_by_column_name() {
        let csv = "posting_id,rrn,balance_change\n1,000000000001,-500\n2,000000000001,500\n";
        assert_eq!(
            read_clearing(csv, "c.csv").unwrap(),
            rows(&[("000000000001", -500), ("000000000001", 500)])
        );
        assert!(
            read_clearing("rrn\n1\n", "c.csv")
                .unwrap_err()
                .contains("no column \"balance_change\"")
        );
        assert!(
            read_clearing("rrn,balance_change\n1,x\n", "c.csv")
                .unwrap_err()
                .contains("c.csv:2")
        );
    }
}
