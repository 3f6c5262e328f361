//! What an operator asks when a merchant calls: a transaction with its whole
//! history (the sale, its void, the reversal of the void, each refund, the
//! advices sent to the issuer), and a batch's settlement with what matched.

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::journal;

/// One journal entry, as an operator reads it (the PAN masked).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Entry {
    /// Row id.
    pub id: i64,
    /// RRN.
    pub rrn: String,
    /// What it was.
    pub kind: String,
    /// Its state.
    pub state: String,
    /// Fen.
    pub amount: i64,
    /// Refunded so far.
    pub refunded_amount: i64,
    /// F41.
    pub terminal_id: String,
    /// F42.
    pub merchant_id: String,
    /// Batch.
    pub batch: i32,
    /// STAN.
    pub stan: i32,
    /// The terminal's MTI.
    pub mti: i16,
    /// F3.
    pub processing_code: String,
    /// First 6 / last 4.
    pub pan_masked: Option<String>,
    /// The answer.
    pub response_code: Option<String>,
    /// The auth code.
    pub auth_code: Option<String>,
    /// The rule that decided.
    pub rule: Option<String>,
    /// F63.1.
    pub operator: Option<String>,
    /// F39 of a reversal.
    pub reversal_reason: Option<String>,
    /// What it refers to.
    pub original_id: Option<i64>,
    /// How the terminal named the original.
    pub original_ref: Option<String>,
    /// The issuer.
    pub issuer: Option<String>,
    /// Business day.
    pub business_date: NaiveDate,
    /// When it arrived.
    pub received_at: DateTime<Utc>,
    /// When it was decided.
    pub completed_at: Option<DateTime<Utc>>,
    /// Whether its reply is stored (what a repeat is answered with).
    pub replied: bool,
}

/// An advice to the issuer and how it went.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AdviceRow {
    /// The entry it belongs to.
    pub journal_id: i64,
    /// reversal, refund, completion.
    pub kind: String,
    /// pending or done.
    pub state: String,
    /// Tries so far.
    pub attempts: i32,
    /// The issuer's answer.
    pub response_code: Option<String>,
    /// The last failure.
    pub last_error: Option<String>,
}

/// A transaction with everything related to it.
#[derive(Debug, Clone)]
pub struct History {
    /// The entry asked for.
    pub id: i64,
    /// The whole family, oldest first: the original and everything that refers to it.
    pub entries: Vec<Entry>,
    /// Their advices.
    pub advices: Vec<AdviceRow>,
}

/// How the operator names a transaction.
#[derive(Debug, Clone)]
pub enum Selector {
    /// By RRN.
    Rrn(String),
    /// By terminal, batch and STAN (the first such entry: a sale rather than its reversal).
    Terminal {
        /// F41.
        terminal_id: String,
        /// Batch.
        batch: i32,
        /// STAN.
        stan: i32,
    },
}

const ENTRY: &str = "SELECT id, rrn, kind, state, amount, refunded_amount, terminal_id, merchant_id, batch, stan, mti,
    processing_code, pan_masked, response_code, auth_code, rule, operator, reversal_reason, original_id,
    original_ref, issuer, business_date, received_at, completed_at, reply IS NOT NULL AS replied
    FROM journal";

/// The history of a transaction, or `None` when there is no such one.
pub async fn history(pool: &PgPool, selector: &Selector) -> Result<Option<History>, sqlx::Error> {
    let id: Option<i64> = match selector {
        Selector::Rrn(rrn) => {
            sqlx::query_scalar("SELECT id FROM journal WHERE id = $2 AND rrn = $1")
                .bind(rrn)
                .bind(journal::rrn_id(rrn))
                .fetch_optional(pool)
                .await?
        }
        Selector::Terminal { terminal_id, batch, stan } => {
            sqlx::query_scalar("SELECT id FROM journal WHERE terminal_id = $1 AND batch = $2 AND stan = $3 ORDER BY id LIMIT 1")
                .bind(terminal_id)
                .bind(batch)
                .bind(stan)
                .fetch_optional(pool)
                .await?
        }
    };
    let Some(id) = id else {
        return Ok(None);
    };
    // A reversal that came before its original (R3) names none: it is of
    // the family of the request of its key (terminal, batch, STAN), which
    // it reversed on arrival, both ways.
    let entries: Vec<Entry> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH RECURSIVE start AS (
            SELECT coalesce((
                SELECT o.id FROM journal r JOIN journal o
                    ON o.merchant_id = r.merchant_id AND o.terminal_id = r.terminal_id
                   AND o.batch = r.batch AND o.stan = r.stan AND o.mti_class <> 4
                WHERE r.id = $1 AND r.mti_class = 4 AND r.original_id IS NULL
                ORDER BY o.id LIMIT 1), $1) AS id),
         up AS (
            SELECT id, original_id FROM journal WHERE id = (SELECT id FROM start)
            UNION SELECT j.id, j.original_id FROM journal j JOIN up ON j.id = up.original_id),
         down AS (
            SELECT id FROM up WHERE original_id IS NULL
            UNION SELECT j.id FROM journal j JOIN down ON j.original_id = down.id),
         markers AS (
            SELECT r.id FROM journal d JOIN journal r
                ON r.merchant_id = d.merchant_id AND r.terminal_id = d.terminal_id
               AND r.batch = d.batch AND r.stan = d.stan AND r.mti_class = 4
            WHERE d.id IN (SELECT id FROM down) AND d.mti_class <> 4 AND r.original_id IS NULL)
         {ENTRY} WHERE id IN (SELECT id FROM down) OR id IN (SELECT id FROM markers) OR id = $1
         ORDER BY id"
    )))
    .bind(id)
    .fetch_all(pool)
    .await?;
    let ids: Vec<i64> = entries.iter().map(|e| e.id).collect();
    let advices = sqlx::query_as(
        "SELECT journal_id, kind, state, attempts, response_code, last_error FROM advices
         WHERE journal_id = ANY($1) ORDER BY id",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    Ok(Some(History {
        id,
        entries,
        advices,
    }))
}

fn fen(amount: i64) -> String {
    format!("{}.{:02}", amount / 100, amount % 100)
}

impl History {
    /// The history as JSON.
    pub fn to_json(&self) -> Value {
        let entry = |e: &Entry| {
            json!({
                "id": e.id, "rrn": e.rrn, "kind": e.kind, "state": e.state, "amount": e.amount,
                "refunded_amount": e.refunded_amount, "terminal": e.terminal_id, "merchant": e.merchant_id,
                "batch": e.batch, "stan": e.stan, "mti": format!("{:04}", e.mti), "processing_code": e.processing_code,
                "pan": e.pan_masked, "response_code": e.response_code, "auth_code": e.auth_code, "rule": e.rule,
                "operator": e.operator, "reversal_reason": e.reversal_reason, "original_id": e.original_id,
                "original_ref": e.original_ref, "issuer": e.issuer, "business_date": e.business_date.to_string(),
                "received_at": e.received_at.to_rfc3339(), "completed_at": e.completed_at.map(|t| t.to_rfc3339()),
                "reply_stored": e.replied,
                "advices": self.advices.iter().filter(|a| a.journal_id == e.id).map(|a| json!({
                    "kind": a.kind, "state": a.state, "attempts": a.attempts,
                    "response_code": a.response_code, "last_error": a.last_error,
                })).collect::<Vec<_>>(),
            })
        };
        json!({ "selected": self.id, "history": self.entries.iter().map(entry).collect::<Vec<_>>() })
    }

    /// The history for people: one block per entry, oldest first.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for e in &self.entries {
            let mark = if e.id == self.id { "▶" } else { " " };
            out.push_str(&format!(
                "{mark} {} UTC {:<17} {:<18} {:>12} CNY  rrn {}  rc {}  auth {}\n",
                e.received_at.format("%Y-%m-%d %H:%M:%S"),
                e.kind,
                e.state,
                fen(e.amount),
                e.rrn,
                e.response_code.as_deref().unwrap_or("--"),
                e.auth_code.as_deref().unwrap_or("------"),
            ));
            out.push_str(&format!(
                "    terminal {} merchant {} batch {:06} stan {:06} mti {:04} card {} business day {}\n",
                e.terminal_id,
                e.merchant_id,
                e.batch,
                e.stan,
                e.mti,
                e.pan_masked.as_deref().unwrap_or("-"),
                e.business_date
            ));
            let mut notes = Vec::new();
            if let Some(o) = e.original_id {
                notes.push(format!("refers to #{o}"));
            }
            if let Some(r) = &e.rule {
                notes.push(format!("rule {r}"));
            }
            if let Some(op) = &e.operator {
                notes.push(format!("operator {op}"));
            }
            if let Some(r) = &e.reversal_reason {
                notes.push(format!("reversal reason {r}"));
            }
            if e.refunded_amount > 0 {
                notes.push(format!("refunded {}", fen(e.refunded_amount)));
            }
            if let Some(r) = &e.original_ref {
                notes.push(format!("named as {r}"));
            }
            if !e.replied && !matches!(e.state.as_str(), "received" | "sent") {
                // Decided by the recovery sweep (a reversal nobody repeated,
                // a row its switch left `sent`), or its reply could not be
                // stored: the terminal may not know this outcome.
                notes.push(
                    "no reply stored: its terminal may not have heard this outcome, a repeat hears it"
                        .to_string(),
                );
            }
            if !notes.is_empty() {
                out.push_str(&format!("    #{} {}\n", e.id, notes.join(", ")));
            }
            for a in self.advices.iter().filter(|a| a.journal_id == e.id) {
                out.push_str(&format!(
                    "    advice {} to the issuer: {} after {} attempt(s){}{}\n",
                    a.kind,
                    a.state,
                    a.attempts,
                    a.response_code
                        .as_deref()
                        .map(|rc| format!(", rc {rc}"))
                        .unwrap_or_default(),
                    a.last_error
                        .as_deref()
                        .filter(|_| a.state != "done")
                        .map(|e| format!(", last error: {e}"))
                        .unwrap_or_default(),
                ));
            }
        }
        out
    }
}

/// A batch's settlement and how its upload matched the journal.
#[derive(Debug, Clone)]
pub struct SettlementReport {
    /// F41.
    pub terminal_id: String,
    /// Batch.
    pub batch: i32,
    /// The settlement, when there was one: terminal totals, switch totals, balanced.
    pub settlement: Option<(String, String, bool)>,
    /// In both, same STAN and amount: (STAN, amount, kind).
    pub matched: Vec<(i32, i64, String)>,
    /// Uploaded by the terminal, not in the journal (or another amount): (STAN, amount).
    pub only_terminal: Vec<(i32, i64)>,
    /// In the journal's totals, not uploaded: (STAN, amount, kind).
    pub only_switch: Vec<(i32, i64, String)>,
}

/// Settlement F48 totals for people: each part's debits, credits and
/// reconciliation code; as given when they cannot be read so.
fn totals(f48: &str) -> String {
    let part = |p: &str| -> Option<String> {
        let n = |r: std::ops::Range<usize>| p.get(r)?.parse::<i64>().ok();
        Some(format!(
            "debits {} fen ({}), credits {} fen ({}), code {}",
            n(0..12)?,
            n(12..15)?,
            n(15..27)?,
            n(27..30)?,
            p.get(30..31)?
        ))
    };
    match (f48.get(..31).and_then(part), f48.get(31..62).and_then(part)) {
        (Some(domestic), Some(foreign)) if f48.len() == 62 => {
            format!("domestic {domestic}; foreign {foreign}")
        }
        _ => f48.to_string(),
    }
}

/// Compares a batch's upload with the journal entries its settlement counted.
pub async fn settlement_report(
    pool: &PgPool,
    terminal_id: &str,
    batch: i32,
) -> Result<SettlementReport, sqlx::Error> {
    let settlement: Option<(String, String, bool)> = sqlx::query_as(
        "SELECT terminal_totals, switch_totals, balanced FROM settlements WHERE terminal_id = $1 AND batch = $2",
    )
    .bind(terminal_id)
    .bind(batch)
    .fetch_optional(pool)
    .await?;
    let journal: Vec<(i32, i64, String)> = sqlx::query_as(
        "SELECT stan, amount, kind FROM journal WHERE terminal_id = $1 AND batch = $2 AND (
            (kind IN ('purchase', 'completion', 'completion_advice') AND state IN ('approved', 'voided', 'partially_refunded', 'refunded'))
            OR (kind IN ('void', 'completion_void', 'refund') AND state = 'approved'))
         ORDER BY stan",
    )
    .bind(terminal_id)
    .bind(batch)
    .fetch_all(pool)
    .await?;
    let uploaded: Vec<(i32, i64)> =
        sqlx::query_as("SELECT stan, amount FROM batch_uploads WHERE terminal_id = $1 AND batch = $2 ORDER BY stan")
            .bind(terminal_id)
            .bind(batch)
            .fetch_all(pool)
            .await?;
    let matched: Vec<(i32, i64, String)> = journal
        .iter()
        .filter(|(s, a, _)| uploaded.contains(&(*s, *a)))
        .cloned()
        .collect();
    let only_switch = journal
        .iter()
        .filter(|(s, a, _)| !uploaded.contains(&(*s, *a)))
        .cloned()
        .collect();
    let only_terminal = uploaded
        .iter()
        .filter(|(s, a)| !journal.iter().any(|(js, ja, _)| js == s && ja == a))
        .cloned()
        .collect();
    Ok(SettlementReport {
        terminal_id: terminal_id.to_string(),
        batch,
        settlement,
        matched,
        only_terminal,
        only_switch,
    })
}

impl SettlementReport {
    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "terminal": self.terminal_id,
            "batch": self.batch,
            "settlement": self.settlement.as_ref().map(|(t, s, b)| json!({"terminal_totals": t, "switch_totals": s, "balanced": b})),
            "matched": self.matched.iter().map(|(s, a, k)| json!({"stan": s, "amount": a, "kind": k})).collect::<Vec<_>>(),
            "only_terminal": self.only_terminal.iter().map(|(s, a)| json!({"stan": s, "amount": a})).collect::<Vec<_>>(),
            "only_switch": self.only_switch.iter().map(|(s, a, k)| json!({"stan": s, "amount": a, "kind": k})).collect::<Vec<_>>(),
        })
    }

    /// For people.
    pub fn to_text(&self) -> String {
        self.text(true)
    }

    /// For people, the matched transactions only counted: what differs.
    pub fn differences(&self) -> String {
        self.text(false)
    }

    fn text(&self, matched: bool) -> String {
        let mut out = format!("terminal {} batch {:06}\n", self.terminal_id, self.batch);
        match &self.settlement {
            Some((t, s, b)) => out.push_str(&format!(
                "settlement: {}\n  terminal {}\n  switch   {}\n",
                if *b { "balanced" } else { "NOT balanced" },
                totals(t),
                totals(s)
            )),
            None => out.push_str("settlement: none yet\n"),
        }
        let uploaded = self.matched.len() + self.only_terminal.len();
        if uploaded == 0 {
            let why = match &self.settlement {
                Some((_, _, true)) => "none was due: the settlement balanced",
                Some(_) => "none yet: the terminal sends it after an unbalanced settlement",
                None => "none yet",
            };
            out.push_str(&format!(
                "batch upload: {why}; the journal counted {} transactions\n",
                self.only_switch.len()
            ));
            return out;
        }
        out.push_str(&format!("matched: {}\n", self.matched.len()));
        for (s, a, k) in self.matched.iter().filter(|_| matched) {
            out.push_str(&format!("  stan {s:06} {:>12} {k}\n", fen(*a)));
        }
        out.push_str(&format!(
            "only the terminal had: {}\n",
            self.only_terminal.len()
        ));
        for (s, a) in &self.only_terminal {
            out.push_str(&format!("  stan {s:06} {:>12}\n", fen(*a)));
        }
        out.push_str(&format!(
            "only the switch had: {}\n",
            self.only_switch.len()
        ));
        for (s, a, k) in &self.only_switch {
            out.push_str(&format!("  stan {s:06} {:>12} {k}\n", fen(*a)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(balanced: bool, uploaded: bool) -> SettlementReport {
        let ours = format!(
            "{:012}{:03}{:012}{:03}1{}1",
            2_500,
            2,
            500,
            1,
            "0".repeat(30)
        );
        SettlementReport {
            terminal_id: "T0000001".into(),
            batch: 7,
            settlement: Some((ours.clone(), ours, balanced)),
            matched: if uploaded {
                vec![(1, 2_000, "purchase".into())]
            } else {
                Vec::new()
            },
            only_terminal: Vec::new(),
            only_switch: vec![(2, 500, "purchase".into()), (3, 500, "refund".into())],
        }
    }

    #[test]
    fn a_settlement_report_reads_the_totals_and_says_why_nothing_was_uploaded() {
        let text = report(true, false).to_text();
        assert!(
            text.contains(
                "terminal domestic debits 2500 fen (2), credits 500 fen (1), code 1; foreign debits 0 fen (0), credits 0 fen (0), code 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("batch upload: none was due: the settlement balanced; the journal counted 2 transactions"),
            "{text}"
        );
        assert!(!text.contains("only the switch had"), "{text}");
        let text = report(false, false).to_text();
        assert!(
            text.contains("batch upload: none yet: the terminal sends it"),
            "{text}"
        );
        let text = report(false, true).to_text();
        assert!(text.contains("matched: 1\n"), "{text}");
        assert!(text.contains("only the switch had: 2\n"), "{text}");
        assert_eq!(totals("12x"), "12x", "unreadable totals as given");
    }
}
