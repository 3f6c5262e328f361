//! The journal in PostgreSQL: one row per terminal request.
//!
//! The order of writes is the product: the `sent` row is durable before a
//! request leaves for the issuer, and the outcome is durable before the
//! terminal hears it. Every change of state is one conditional UPDATE, so a
//! late issuer reply and the sweeper that gave up on it cannot both win.
//! Duplicates are caught by the unique request key, across switch processes.

use std::time::Duration;

use chrono::NaiveDate;
use sqlx::PgPool;

use crate::model::{Kind, ResponseCode, State};

/// A request about to be journalled.
#[derive(Debug, Clone)]
pub struct NewEntry<'a> {
    /// F41.
    pub terminal_id: &'a str,
    /// F42.
    pub merchant_id: &'a str,
    /// F60.2.
    pub batch: i32,
    /// F11.
    pub stan: i32,
    /// The terminal's MTI.
    pub mti: u16,
    /// What it asks for.
    pub kind: Kind,
    /// F3.
    pub processing_code: &'a str,
    /// F25.
    pub pos_condition: &'a str,
    /// F4, fen.
    pub amount: i64,
    /// Keyed PAN hash.
    pub pan_hash: Option<[u8; 32]>,
    /// First 6 / last 4.
    pub pan_masked: Option<String>,
    /// What a duplicate must match (D1 / D2).
    pub digest: [u8; 32],
    /// The business day.
    pub business_date: NaiveDate,
}

/// Where the request goes.
#[derive(Debug, Clone, Copy)]
pub enum Disposition<'a> {
    /// To this issuer, with this F7: the row is written `sent`, with a link STAN.
    Forward {
        /// The issuer's name.
        issuer: &'a str,
        /// F7 of the network request.
        f7: &'a str,
    },
    /// Answered by the switch itself with this code: the row is written final.
    Answer(State, ResponseCode),
}

/// A freshly written row.
#[derive(Debug, Clone)]
pub struct Written {
    /// Row id.
    pub id: i64,
    /// The switch-assigned RRN (F37).
    pub rrn: String,
    /// F11 on the issuer link, for forwarded requests.
    pub link_stan: Option<i32>,
}

/// The earlier request with the same key.
#[derive(Debug, Clone)]
pub struct Earlier {
    /// Row id.
    pub id: i64,
    /// Its digest (D1 when equal, D2 otherwise).
    pub digest: Vec<u8>,
    /// Its state.
    pub state: String,
    /// Its response code, once it has one.
    pub response_code: Option<String>,
    /// Its RRN.
    pub rrn: String,
    /// Its reply from the MTI on, once stored.
    pub reply: Option<Vec<u8>>,
}

/// What writing a request found.
#[derive(Debug, Clone)]
pub enum Insert {
    /// A new request.
    New(Written),
    /// The key was taken.
    Duplicate(Earlier),
}

/// Writes a request, or finds the earlier one with its key.
pub async fn insert(
    pool: &PgPool,
    e: &NewEntry<'_>,
    d: Disposition<'_>,
) -> Result<Insert, sqlx::Error> {
    let (state, rc, issuer, f7) = match d {
        Disposition::Forward { issuer, f7 } => (State::Sent, None, Some(issuer), Some(f7)),
        Disposition::Answer(state, rc) => (state, Some(rc.as_str().to_string()), None, None),
    };
    let row: Option<(i64, String, Option<i32>)> = sqlx::query_as(
        "INSERT INTO journal (terminal_id, merchant_id, batch, stan, mti, mti_class, processing_code,
             pos_condition, kind, amount, pan_hash, pan_masked, request_digest, state, response_code,
             issuer, link_stan, link_f7, business_date, sent_at, completed_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
             $16, CASE WHEN $14 = 'sent' THEN nextval('link_stan')::int END, $17, $18,
             CASE WHEN $14 = 'sent' THEN now() END, CASE WHEN $14 <> 'sent' THEN now() END)
         ON CONFLICT ON CONSTRAINT journal_request_key DO NOTHING
         RETURNING id, rrn, link_stan",
    )
    .bind(e.terminal_id)
    .bind(e.merchant_id)
    .bind(e.batch)
    .bind(e.stan)
    .bind(e.mti as i16)
    .bind((e.mti / 100) as i16)
    .bind(e.processing_code)
    .bind(e.pos_condition)
    .bind(e.kind.as_str())
    .bind(e.amount)
    .bind(e.pan_hash.map(|h| h.to_vec()))
    .bind(e.pan_masked.as_deref())
    .bind(e.digest.to_vec())
    .bind(state.as_str())
    .bind(rc)
    .bind(issuer)
    .bind(f7)
    .bind(e.business_date)
    .fetch_optional(pool)
    .await?;
    if let Some((id, rrn, link_stan)) = row {
        return Ok(Insert::New(Written { id, rrn, link_stan }));
    }
    let earlier: Earlier = sqlx::query_as::<_, (i64, Vec<u8>, String, Option<String>, String, Option<Vec<u8>>)>(
        "SELECT id, request_digest, state, response_code, rrn, reply FROM journal
         WHERE merchant_id = $1 AND terminal_id = $2 AND batch = $3 AND stan = $4 AND mti_class = $5",
    )
    .bind(e.merchant_id)
    .bind(e.terminal_id)
    .bind(e.batch)
    .bind(e.stan)
    .bind((e.mti / 100) as i16)
    .fetch_one(pool)
    .await
    .map(|(id, digest, state, response_code, rrn, reply)| Earlier {
        id,
        digest,
        state,
        response_code,
        rrn,
        reply,
    })?;
    Ok(Insert::Duplicate(earlier))
}

/// Records the outcome of a `sent` row and its reply. False when the row is
/// no longer `sent` (the sweeper gave up on it: the approval will be reversed).
pub async fn complete(
    pool: &PgPool,
    id: i64,
    state: State,
    rc: ResponseCode,
    auth_code: Option<&str>,
    reply: &[u8],
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE journal SET state = $2, response_code = $3, auth_code = $4, reply = $5, completed_at = now()
         WHERE id = $1 AND state = 'sent'",
    )
    .bind(id)
    .bind(state.as_str())
    .bind(rc.as_str())
    .bind(auth_code)
    .bind(reply)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Stores the reply of a row the switch answered itself.
pub async fn store_reply(pool: &PgPool, id: i64, reply: &[u8]) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE journal SET reply = $2 WHERE id = $1 AND reply IS NULL")
        .bind(id)
        .bind(reply)
        .execute(pool)
        .await?;
    Ok(())
}

/// The reversal advice queued for rows that end `unknown`.
const QUEUE_REVERSAL: &str = "
    INSERT INTO advices (journal_id, kind, mti, issuer, processing_code, pos_condition, amount,
        reason, original_mti, original_stan, original_f7)
    SELECT id, 'reversal', 420, issuer, processing_code, pos_condition, amount,
        '68', mti, link_stan, link_f7
    FROM gave_up
    ON CONFLICT (journal_id, kind) DO NOTHING";

/// T1: the issuer did not answer in time. Marks the row `unknown` with its
/// `98` reply and queues a reversal advice, in one statement. False when the
/// row was no longer `sent`.
pub async fn give_up(pool: &PgPool, id: i64, reply: &[u8]) -> Result<bool, sqlx::Error> {
    let sql = format!(
        "WITH gave_up AS (
            UPDATE journal SET state = 'unknown', response_code = '98', reply = $2, completed_at = now()
            WHERE id = $1 AND state = 'sent'
            RETURNING id, issuer, processing_code, pos_condition, amount, mti, link_stan, link_f7)
         {QUEUE_REVERSAL}
         RETURNING journal_id"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(reply)
        .fetch_optional(pool)
        .await?;
    Ok(row.is_some())
}

/// Rows left `sent` for longer than `older_than` belong to a switch that
/// died between asking the issuer and writing the outcome (a live one gives
/// up at its own deadline): mark them `unknown` and queue their reversals.
/// Returns how many.
pub async fn recover_forgotten(pool: &PgPool, older_than: Duration) -> Result<u64, sqlx::Error> {
    let sql = format!(
        "WITH gave_up AS (
            UPDATE journal SET state = 'unknown', response_code = '98', completed_at = now()
            WHERE state = 'sent' AND sent_at < now() - make_interval(secs => $1)
            RETURNING id, issuer, processing_code, pos_condition, amount, mti, link_stan, link_f7)
         {QUEUE_REVERSAL}
         RETURNING journal_id"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(older_than.as_secs_f64())
        .fetch_all(pool)
        .await?;
    Ok(rows.len() as u64)
}

/// The state and stored reply of a row (a duplicate waiting for its original).
pub async fn outcome(
    pool: &PgPool,
    id: i64,
) -> Result<(String, Option<String>, Option<Vec<u8>>), sqlx::Error> {
    sqlx::query_as("SELECT state, response_code, reply FROM journal WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
}
