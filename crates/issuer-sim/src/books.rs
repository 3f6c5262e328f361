//! The issuer's books in PostgreSQL (schema `issuer`): cards keyed by the
//! keyed PAN hash, and one posting per message of the switch.
//!
//! Exactly once: a message claims its key (acquirer, link STAN, F7, MTI
//! class) with `INSERT ... ON CONFLICT DO NOTHING` in the one statement that
//! decides it: the posting is written with its outcome, and the card and the
//! original change only when the claim succeeded (they are changed from what
//! the claim returned). A repeat, even one arriving while the first is still
//! being decided, waits for it (on the original both lock, or on the unique
//! index), changes nothing, and then reads the stored outcome ([`repeat`]):
//! no in-memory bookkeeping, and a crash never leaves half a posting.
//!
//! Locks are always taken in one order: the original a message names (then
//! that one's original), then the card, then the message's own key; so two
//! follow-ons of one original queue behind each other on it instead of
//! deadlocking. New authorisations, decided in batches ([`authorise_many`]),
//! lock their cards (in id order) before they claim their keys; follow-ons,
//! decided in batches too ([`follow_on_many`]), lock all their originals
//! (in id order), then their cards (in id order), then claim their keys. A
//! reversal whose original has not arrived claims its own key, then the
//! original's. Should PostgreSQL still find a deadlock, the statement is
//! retried.

use chrono::Datelike;
use iso8583::Pan;
use sqlx::PgPool;
use tracing::{debug, warn};

use crate::Error;
use crate::config::{CardRange, CardStatus};
use crate::key::PanKey;
use crate::request::{Kind, PostingKey, Request};

/// The response codes the issuer answers with outside its statements (the
/// declines they decide, 14, 25, 51, 61, 64 and the rest, are in their SQL).
pub(crate) mod code {
    pub const APPROVED: &str = "00";
    pub const INVALID_TRANSACTION: &str = "12";
    pub const INVALID_AMOUNT: &str = "13";
    pub const FORMAT_ERROR: &str = "30";
    /// The original of a reversal that overtook it: too late, never posted.
    pub const TOO_LATE: &str = "68";
    pub const DUPLICATE: &str = "94";
    pub const SYSTEM_ERROR: &str = "96";
}

/// What the reply carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub code: String,
    pub auth_code: Option<String>,
    /// F54's available balance (balance inquiry).
    pub available: Option<i64>,
}

impl Outcome {
    pub(crate) fn code_only(code: &str) -> Outcome {
        Outcome {
            code: code.to_string(),
            auth_code: None,
            available: None,
        }
    }
}

/// Creates schema `issuer` and applies `migrations/issuer`, with sqlx's
/// bookkeeping table in that schema too (`issuer._sqlx_migrations`), apart
/// from the switch's.
pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    let mut migrator = sqlx::migrate!("../../migrations/issuer");
    migrator.create_schema("issuer");
    migrator.dangerous_set_table_name("issuer._sqlx_migrations");
    migrator.run(pool).await?;
    Ok(())
}

/// Refuses a key other than the one the database was first used with.
pub async fn check_key(pool: &PgPool, key: &PanKey) -> Result<(), Error> {
    let check = key.check_value().to_vec();
    sqlx::query("INSERT INTO issuer.meta (key_check) VALUES ($1) ON CONFLICT (id) DO NOTHING")
        .bind(&check)
        .execute(pool)
        .await?;
    let stored: Vec<u8> = sqlx::query_scalar("SELECT key_check FROM issuer.meta")
        .fetch_one(pool)
        .await?;
    if stored == check {
        Ok(())
    } else {
        Err(Error::KeyMismatch)
    }
}

/// Seeds the card ranges; returns how many cards were new. Idempotent: a
/// card already there keeps its balance (and its opening balance).
pub async fn seed_cards(pool: &PgPool, key: &PanKey, ranges: &[CardRange]) -> Result<u64, Error> {
    check_key(pool, key).await?;
    let mut tx = pool.begin().await?;
    let mut inserted = 0;
    for range in ranges {
        let pans: Vec<Pan> = range.pans().collect();
        for chunk in pans.chunks(20_000) {
            let hashes: Vec<Vec<u8>> = chunk.iter().map(|p| key.hash(p).to_vec()).collect();
            let masked: Vec<String> = chunk.iter().map(Pan::masked).collect();
            inserted += sqlx::query(
                "INSERT INTO issuer.cards (pan_hash, pan_masked, expiry, status, opening_balance, balance, txn_limit)
                 SELECT h, m, $3, $4, $5, $5, $6 FROM unnest($1::bytea[], $2::text[]) AS t (h, m)
                 ON CONFLICT (pan_hash) DO NOTHING",
            )
            .bind(&hashes)
            .bind(&masked)
            .bind(&range.expiry)
            .bind(range.status.as_str())
            .bind(range.balance)
            .bind(range.limit)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
    }
    tx.commit().await?;
    Ok(inserted)
}

/// The sums over every card, and over every posting: after any run,
/// `opening + posted == balance` and `posted_holds == held`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    /// Cards.
    pub cards: i64,
    /// Sum of opening balances, fen.
    pub opening: i64,
    /// Sum of current balances, fen.
    pub balance: i64,
    /// Sum of open holds, fen.
    pub held: i64,
    /// Sum of every posting's effect on balances (debits negative), fen.
    pub posted: i64,
    /// Sum of every posting's effect on holds, fen.
    pub posted_holds: i64,
}

impl Totals {
    /// True when the cards agree with the postings, to the fen.
    pub fn consistent(&self) -> bool {
        self.opening + self.posted == self.balance && self.posted_holds == self.held
    }
}

/// The totals of the books.
pub async fn balances(pool: &PgPool) -> Result<Totals, Error> {
    let (cards, opening, balance, held): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(opening_balance), 0)::int8, coalesce(sum(balance), 0)::int8,
                coalesce(sum(held), 0)::int8
         FROM issuer.cards",
    )
    .fetch_one(pool)
    .await?;
    let (posted, posted_holds): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(balance_change), 0)::int8, coalesce(sum(hold_change), 0)::int8
         FROM issuer.postings",
    )
    .fetch_one(pool)
    .await?;
    Ok(Totals {
        cards,
        opening,
        balance,
        held,
        posted,
        posted_holds,
    })
}

/// One card's money.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardBalance {
    /// The PAN, masked.
    pub pan: String,
    /// Whether it may be used.
    pub status: CardStatus,
    /// As seeded, fen.
    pub opening: i64,
    /// The ledger balance, fen.
    pub balance: i64,
    /// Open pre-authorisation holds, fen.
    pub held: i64,
}

impl CardBalance {
    /// What can be spent: balance less holds.
    pub fn available(&self) -> i64 {
        self.balance - self.held
    }
}

/// The money of the card `pan`, when the issuer has it.
pub async fn balance(pool: &PgPool, key: &PanKey, pan: &Pan) -> Result<Option<CardBalance>, Error> {
    let row: Option<(String, String, i64, i64, i64)> = sqlx::query_as(
        "SELECT pan_masked, status, opening_balance, balance, held FROM issuer.cards WHERE pan_hash = $1",
    )
    .bind(key.hash(pan).to_vec())
    .fetch_optional(pool)
    .await?;
    Ok(
        row.map(|(pan, status, opening, balance, held)| CardBalance {
            pan,
            status: CardStatus::from_word(&status).unwrap_or(CardStatus::Blocked),
            opening,
            balance,
            held,
        }),
    )
}

/// Whether a database error is worth another try of the whole statement.
fn retryable(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40P01" | "40001")))
}

/// Decides and records one message, exactly once; returns what to answer.
pub(crate) async fn apply(
    pool: &PgPool,
    key: &PanKey,
    req: &Request,
) -> Result<Outcome, sqlx::Error> {
    let pan_hash = req.pan.as_ref().map(|p| key.hash(p));
    let fingerprint = req.fingerprint(pan_hash.as_ref());
    let mut attempt = 0;
    let decided = loop {
        let result = match req.kind {
            Kind::BalanceInquiry | Kind::Purchase | Kind::PreAuth => {
                // `read` refuses a new authorisation without a card.
                let Some(pan_hash) = pan_hash else {
                    return Ok(Outcome::code_only(code::FORMAT_ERROR));
                };
                // New authorisations are decided by one statement, batched or not.
                let auth = NewAuth {
                    req: req.clone(),
                    pan_hash,
                    fingerprint,
                };
                authorise_many(pool, std::slice::from_ref(&auth))
                    .await
                    .map(|mut outcomes| outcomes.pop().flatten())
            }
            Kind::Reversal => reverse(pool, req, &fingerprint).await,
            _ => {
                // `read` refuses a follow-on without F90.
                let Some(original) = req.original.as_ref() else {
                    return Ok(Outcome::code_only(code::FORMAT_ERROR));
                };
                // Follow-ons are decided by one statement, batched or not.
                let follow_on = FollowOn {
                    req: req.clone(),
                    original: original.key.clone(),
                    pan_hash,
                    fingerprint,
                };
                follow_on_many(pool, std::slice::from_ref(&follow_on))
                    .await
                    .and_then(|mut judged| match judged.pop() {
                        Some(Judged::Decided(outcome)) => Ok(Some(outcome)),
                        Some(Judged::Taken) => Ok(None),
                        // Alone, nothing comes first: its original was
                        // approved but has no card, which cannot be.
                        Some(Judged::Deferred) | None => Err(sqlx::Error::RowNotFound),
                    })
            }
        };
        match result {
            Err(e) if retryable(&e) && attempt < 5 => {
                attempt += 1;
                debug!(error = %e, attempt, "retrying after a deadlock or a race");
            }
            other => break other?,
        }
    };
    match decided {
        Some(outcome) => Ok(outcome),
        None => repeat(pool, req, &fingerprint).await,
    }
}

/// What the statement that decides a reversal returns.
#[derive(Debug, sqlx::FromRow)]
struct Posted {
    /// The message claimed its key: the posting is its own.
    inserted: bool,
    /// `None`: the original was approved but has no card, which cannot be.
    code: Option<String>,
    auth_code: Option<String>,
    note: Option<String>,
    /// What the original was before (reversal only).
    original_state: Option<String>,
    original_amount: Option<i64>,
    /// Which rule decided (reversal only).
    step: Option<String>,
}

impl Posted {
    /// The answer; `None` when the key was taken.
    fn outcome(self, req: &Request) -> Result<Option<Outcome>, sqlx::Error> {
        let code = self.code.ok_or(sqlx::Error::RowNotFound)?;
        if !self.inserted {
            return Ok(None);
        }
        if let Some(note) = &self.note {
            debug!(kind = req.kind.as_str(), code, note, "decided");
        }
        Ok(Some(Outcome {
            code,
            auth_code: self.auth_code,
            available: None,
        }))
    }
}

/// The message's own posting for the statement of [`reverse`]: its
/// columns are $1 to $17, the original's key $18 to $21.
fn posting<'q>(
    sql: &'static str,
    req: &'q Request,
    fingerprint: &'q [u8; 32],
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, Posted, sqlx::postgres::PgArguments> {
    let reference = req.original.as_ref().expect("read() requires F90");
    sqlx::query_as(sql)
        .bind(&req.key.acquirer)
        .bind(&req.key.stan)
        .bind(&req.key.transmitted)
        .bind(req.key.class)
        .bind(req.mti.to_string())
        .bind(&req.forwarding)
        .bind(fingerprint.as_slice())
        .bind(req.kind.as_str())
        .bind(&req.processing)
        .bind(&req.condition)
        .bind(req.pan.as_ref().map(Pan::masked))
        .bind(req.amount)
        .bind(&req.rrn)
        .bind(&req.terminal)
        .bind(&req.merchant)
        .bind(&reference.raw)
        .bind(&req.reason)
        .bind(&reference.key.acquirer)
        .bind(&reference.key.stan)
        .bind(&reference.key.transmitted)
        .bind(reference.key.class)
}

/// A follow-on (void, refund, pre-auth cancel, completion, completion void;
/// a request or an advice) for [`follow_on_many`].
#[derive(Debug, Clone)]
pub(crate) struct FollowOn {
    pub req: Request,
    /// The posting key of the original F90 names.
    pub original: PostingKey,
    /// The card presented; an advice carries none, and is not checked
    /// against the original's card.
    pub pan_hash: Option<[u8; 32]>,
    pub fingerprint: [u8; 32],
}

/// What [`follow_on_many`] did with one follow-on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Judged {
    /// Decided and posted under its key.
    Decided(Outcome),
    /// Its key was already taken: a repeat, answered from the stored
    /// posting ([`repeat`]).
    Taken,
    /// Not decided: another follow-on of the batch came first on its
    /// original or on its card. Nothing of it was written; it is to be
    /// decided again, alone. (Alone, it is never deferred: `Deferred` then
    /// means its original was approved but has no card, which cannot be.)
    Deferred,
}

/// Decides and records many follow-ons in one statement (group commit):
/// each one's original, named by F90, decides. The statement locks the
/// originals (in id order), checks each against its original, locks the
/// cards of those that passed (in id order), writes each posting with its
/// outcome under the message's key, and, only where that key was free,
/// moves the money and settles the original. One follow-on is a batch of
/// one: this is also the statement of the one-by-one path ([`apply`]).
///
/// A multi-row `UPDATE ... FROM` applies one change per target row, and
/// each follow-on is judged on its original and its card as they were when
/// the statement began. So two follow-ons that would both change one
/// original (a void and a refund of one sale) or one card (follow-ons of two
/// sales of one card) are never decided together: of those the original's
/// checks let through, the first of each original, and of those the first
/// on each card, is decided; the others come back [`Judged::Deferred`],
/// having written nothing. Follow-ons the original's checks decline touch
/// neither, so they are decided whatever else is in the batch. The card is
/// found through the original (an advice carries no PAN), which is why this
/// is found out here and cannot be left to the batch's key.
///
/// For each, in order, what became of it.
pub(crate) async fn follow_on_many<'c>(
    pool: impl sqlx::PgExecutor<'c>,
    follow_ons: &[FollowOn],
) -> Result<Vec<Judged>, sqlx::Error> {
    fn col<'r, T>(f: &'r [FollowOn], v: impl Fn(&'r FollowOn) -> T) -> Vec<T> {
        f.iter().map(v).collect()
    }
    #[derive(sqlx::FromRow)]
    struct Decision {
        ord: i64,
        inserted: bool,
        /// `None`: deferred.
        code: Option<String>,
        auth_code: Option<String>,
        note: Option<String>,
        kind: String,
    }
    // What each kind wants of its original: a void a purchase, a completion
    // void a completion, a cancel or completion a pre-auth, a refund either
    // of the first two; approved, or for a refund partly refunded too; the
    // original's full amount for a void, completion void or cancel. A
    // request (not an advice) is answered with an auth code, and a
    // completion request may overdraw by no more than the hold it releases
    // (a completion advice is already done at the terminal and is posted as
    // it is).
    let rows: Vec<Decision> = sqlx::query_as(
        "WITH req AS (
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int2[], $5::text[], $6::text[],
                                 $7::bytea[], $8::text[], $9::text[], $10::text[], $11::text[], $12::int8[],
                                 $13::text[], $14::text[], $15::text[], $16::text[], $17::text[],
                                 $18::text[], $19::text[], $20::int2[], $21::bytea[], $22::bool[])
                WITH ORDINALITY
                AS r(acquirer, stan, transmitted, mti_class, mti, forwarding, fingerprint, kind,
                     processing_code, condition_code, pan_masked, amount, rrn, terminal, merchant,
                     original_ref, orig_acquirer, orig_stan, orig_transmitted, orig_class, pan_hash,
                     request, ord)),
         orig AS MATERIALIZED (
            SELECT o.* FROM issuer.postings o
            WHERE (o.acquirer, o.stan, o.transmitted, o.mti_class) IN
                (SELECT orig_acquirer, orig_stan, orig_transmitted, orig_class FROM req)
            ORDER BY o.id
            FOR UPDATE OF o),
         checked AS (
            SELECT r.*, CASE WHEN o.fingerprint IS NOT NULL THEN o.id END AS original_id, o.card_id,
                o.amount AS original_amount, o.refunded AS original_refunded,
                o.balance_change AS original_balance, o.hold_change AS original_hold,
                CASE WHEN o.fingerprint IS NULL THEN ARRAY['25', 'original not found']
                     WHEN NOT CASE r.kind WHEN 'void' THEN o.kind = 'purchase'
                                          WHEN 'completion_void' THEN o.kind = 'completion'
                                          WHEN 'preauth_cancel' THEN o.kind = 'preauth'
                                          WHEN 'completion' THEN o.kind = 'preauth'
                                          ELSE o.kind IN ('purchase', 'completion') END
                         THEN ARRAY['12', 'the original is a ' || o.kind]
                     WHEN NOT CASE r.kind WHEN 'refund' THEN o.state IN ('approved', 'partially_refunded')
                                          ELSE o.state = 'approved' END
                         THEN ARRAY['12', 'the original is ' || o.state]
                     WHEN r.kind IN ('void', 'completion_void', 'preauth_cancel') AND r.amount <> o.amount
                         THEN ARRAY['64', 'not the original''s amount']
                     WHEN r.kind = 'refund' AND o.refunded + r.amount > o.amount
                         THEN ARRAY['61', 'refunds would exceed the original''s amount']
                END AS declined
            FROM req r LEFT JOIN orig o
                ON (o.acquirer, o.stan, o.transmitted, o.mti_class)
                 = (r.orig_acquirer, r.orig_stan, r.orig_transmitted, r.orig_class)),
         -- Of those the original's checks let through: the first of each
         -- original, and of those the first on each card; the rest wait.
         firsts AS (
            SELECT k.*, k.declined IS NULL AND row_number() OVER (
                PARTITION BY k.declined IS NULL, k.original_id ORDER BY k.ord) = 1 AS first_of_original
            FROM checked k),
         queued AS (
            SELECT f.*, f.declined IS NULL AND NOT (f.first_of_original AND row_number() OVER (
                PARTITION BY f.first_of_original, f.card_id ORDER BY f.ord) = 1) AS deferred
            FROM firsts f),
         card AS MATERIALIZED (
            SELECT c.id, c.pan_hash, c.pan_masked, c.balance - c.held AS available
            FROM issuer.cards c
            WHERE c.id IN (SELECT card_id FROM queued WHERE declined IS NULL AND NOT deferred)
            ORDER BY c.id
            FOR UPDATE OF c),
         decided AS (
            SELECT nextval('issuer.postings_id_seq') AS id, q.*, c.id AS posting_card,
                c.pan_masked AS posting_masked,
                CASE WHEN NOT q.deferred THEN coalesce(q.declined, CASE
                    WHEN c.id IS NULL THEN NULL
                    WHEN c.pan_hash <> q.pan_hash THEN ARRAY['14', 'not the original''s card']
                    WHEN q.kind = 'completion' AND q.request AND q.amount > c.available + q.original_hold
                        THEN ARRAY['51', 'insufficient funds']
                    ELSE ARRAY['00', NULL] END) END AS decision
            FROM queued q LEFT JOIN card c ON c.id = q.card_id AND q.declined IS NULL AND NOT q.deferred),
         money AS (
            SELECT d.*, d.decision[1] AS code, d.decision[2] AS note,
                CASE WHEN d.decision[1] <> '00' THEN 0
                     WHEN d.kind IN ('void', 'completion_void') THEN -d.original_balance
                     WHEN d.kind = 'completion' THEN -d.amount
                     WHEN d.kind = 'refund' THEN d.amount
                     ELSE 0 END AS balance_change,
                CASE WHEN d.decision[1] = '00' AND d.kind IN ('preauth_cancel', 'completion')
                     THEN -d.original_hold ELSE 0 END AS hold_change,
                d.original_refunded + CASE d.kind WHEN 'refund' THEN d.amount ELSE 0 END AS refunded,
                CASE d.kind WHEN 'preauth_cancel' THEN 'cancelled'
                            WHEN 'completion' THEN 'completed'
                            WHEN 'refund' THEN CASE WHEN d.original_refunded + d.amount = d.original_amount
                                                    THEN 'refunded' ELSE 'partially_refunded' END
                            ELSE 'voided' END AS settles_as
            FROM decided d),
         posted AS (
            INSERT INTO issuer.postings (id, acquirer, stan, transmitted, mti_class, mti, forwarding,
                fingerprint, kind, processing_code, condition_code, card_id, pan_masked, amount,
                balance_change, hold_change, response_code, auth_code, rrn, terminal, merchant,
                original_ref, original_id, state, note)
            SELECT id, acquirer, stan, transmitted, mti_class, mti, forwarding, fingerprint, kind,
                processing_code, condition_code, posting_card, coalesce(posting_masked, pan_masked),
                amount, balance_change, hold_change, code,
                CASE WHEN code = '00' AND request THEN issuer.auth_code(id) END, rrn, terminal, merchant,
                original_ref, original_id, CASE WHEN code = '00' THEN 'approved' ELSE 'declined' END, note
            FROM money WHERE code IS NOT NULL
            ON CONFLICT ON CONSTRAINT postings_key DO NOTHING
            RETURNING id, card_id, balance_change, hold_change, original_id, response_code, auth_code),
         moved AS (
            UPDATE issuer.cards c SET balance = c.balance + p.balance_change, held = c.held + p.hold_change
            FROM posted p
            WHERE c.id = p.card_id AND (p.balance_change <> 0 OR p.hold_change <> 0)),
         settled AS (
            UPDATE issuer.postings o SET state = m.settles_as, refunded = m.refunded, updated_at = now()
            FROM posted p JOIN money m ON m.id = p.id
            WHERE o.id = p.original_id AND p.response_code = '00')
         SELECT m.ord, p.id IS NOT NULL AS inserted, m.code, p.auth_code, m.note, m.kind
         FROM money m LEFT JOIN posted p ON p.id = m.id",
    )
    .bind(col(follow_ons, |f| f.req.key.acquirer.as_str()))
    .bind(col(follow_ons, |f| f.req.key.stan.as_str()))
    .bind(col(follow_ons, |f| f.req.key.transmitted.as_str()))
    .bind(col(follow_ons, |f| f.req.key.class))
    .bind(col(follow_ons, |f| f.req.mti.to_string()))
    .bind(col(follow_ons, |f| f.req.forwarding.as_deref()))
    .bind(col(follow_ons, |f| f.fingerprint.as_slice()))
    .bind(col(follow_ons, |f| f.req.kind.as_str()))
    .bind(col(follow_ons, |f| f.req.processing.as_str()))
    .bind(col(follow_ons, |f| f.req.condition.as_deref()))
    .bind(col(follow_ons, |f| f.req.pan.as_ref().map(Pan::masked)))
    .bind(col(follow_ons, |f| f.req.amount))
    .bind(col(follow_ons, |f| f.req.rrn.as_deref()))
    .bind(col(follow_ons, |f| f.req.terminal.as_deref()))
    .bind(col(follow_ons, |f| f.req.merchant.as_deref()))
    .bind(col(follow_ons, |f| f.req.original.as_ref().map(|o| o.raw.as_str())))
    .bind(col(follow_ons, |f| f.original.acquirer.as_str()))
    .bind(col(follow_ons, |f| f.original.stan.as_str()))
    .bind(col(follow_ons, |f| f.original.transmitted.as_str()))
    .bind(col(follow_ons, |f| f.original.class))
    .bind(col(follow_ons, |f| f.pan_hash.as_ref().map(|h| h.as_slice())))
    .bind(col(follow_ons, |f| !f.req.is_advice()))
    .fetch_all(pool)
    .await?;
    let mut out = vec![Judged::Deferred; follow_ons.len()];
    for d in rows {
        let Some(slot) = usize::try_from(d.ord - 1).ok().and_then(|i| out.get_mut(i)) else {
            continue;
        };
        *slot = match d.code {
            None => Judged::Deferred,
            Some(_) if !d.inserted => Judged::Taken,
            Some(code) => {
                if let Some(note) = &d.note {
                    debug!(kind = d.kind, code, note, "decided");
                }
                Judged::Decided(Outcome {
                    code,
                    auth_code: d.auth_code,
                    available: None,
                })
            }
        };
    }
    Ok(out)
}

/// A reversal advice: undo exactly what the original posted, once; or, when
/// the original has not arrived, leave a row under its key so that it is
/// declined when it does. Always answered `00` once recorded. One statement,
/// as [`follow_on_many`]: the original (then its own original, then the
/// card) is locked and judged, the posting written under the message's key,
/// and only when that key was free is anything else changed. `None` when it
/// was taken.
async fn reverse(
    pool: &PgPool,
    req: &Request,
    fingerprint: &[u8; 32],
) -> Result<Option<Outcome>, sqlx::Error> {
    let reference = req.original.as_ref().expect("read() requires F90");
    // $22 whether the original is something that posts (a reversal or a
    // network message is not), $23 the original's MTI.
    let posted = posting(
        "WITH orig AS MATERIALIZED (
            SELECT * FROM issuer.postings
            WHERE $22 AND acquirer = $18 AND stan = $19 AND transmitted = $20 AND mti_class = $21
            FOR UPDATE),
         judged AS (
            SELECT o.id AS orig_id, o.kind AS orig_kind, o.state AS orig_state, o.amount AS orig_amount,
                o.balance_change AS orig_balance, o.hold_change AS orig_hold, o.card_id AS orig_card,
                o.original_id AS orig_parent,
                CASE WHEN NOT $22 THEN 'not_reversible'
                     WHEN o.id IS NULL THEN 'not_seen'
                     WHEN o.fingerprint IS NULL THEN 'marked'
                     WHEN o.reversed THEN 'reversed'
                     WHEN o.response_code IS DISTINCT FROM '00' THEN 'declined'
                     WHEN o.state <> 'approved' THEN 'followed'
                     ELSE 'applied' END AS step
            FROM (VALUES (true)) AS one LEFT JOIN orig o ON true),
         parent AS MATERIALIZED (
            SELECT p.id, p.refunded FROM issuer.postings p JOIN judged j ON p.id = j.orig_parent
            WHERE j.step = 'applied'
            FOR UPDATE OF p),
         card AS MATERIALIZED (
            SELECT c.id, c.pan_masked FROM issuer.cards c JOIN judged j ON c.id = j.orig_card
                LEFT JOIN parent ON true
            WHERE j.step = 'applied'
            FOR UPDATE OF c),
         decided AS (
            SELECT nextval('issuer.postings_id_seq') AS id, j.*,
                CASE WHEN j.step = 'not_seen' THEN nextval('issuer.postings_id_seq')
                     ELSE j.orig_id END AS original_id,
                CASE WHEN j.step <> 'applied' OR c.id IS NOT NULL THEN '00' END AS code,
                CASE j.step WHEN 'not_reversible' THEN 'nothing to reverse: the original is a ' || $23
                            WHEN 'not_seen' THEN 'original not seen: it will be declined 68'
                            WHEN 'marked' THEN 'original not seen (already marked)'
                            WHEN 'reversed' THEN 'already reversed'
                            WHEN 'declined' THEN 'the original was declined: nothing to undo'
                            WHEN 'followed' THEN 'not applied: the original is ' || j.orig_state
                            ELSE 'applied' END AS note,
                c.id AS posting_card, c.pan_masked AS posting_masked,
                CASE WHEN j.step = 'applied' THEN -j.orig_balance ELSE 0 END AS balance_change,
                CASE WHEN j.step = 'applied' THEN -j.orig_hold ELSE 0 END AS hold_change,
                pa.id AS parent_id,
                CASE WHEN j.orig_kind = 'refund' THEN pa.refunded - j.orig_amount
                     ELSE pa.refunded END AS parent_refunded
            FROM judged j LEFT JOIN card c ON true LEFT JOIN parent pa ON true),
         posted AS (
            INSERT INTO issuer.postings (id, acquirer, stan, transmitted, mti_class, mti, forwarding,
                fingerprint, kind, processing_code, condition_code, card_id, pan_masked, amount,
                balance_change, hold_change, response_code, rrn, terminal, merchant, original_ref,
                original_id, reason, state, note)
            SELECT id, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, posting_card,
                coalesce(posting_masked, $11), $12, balance_change, hold_change, code, $13, $14, $15,
                $16, original_id, $17, 'approved', note
            FROM decided WHERE code IS NOT NULL
            ON CONFLICT ON CONSTRAINT postings_key DO NOTHING
            RETURNING id),
         awaited AS (
            INSERT INTO issuer.postings (id, acquirer, stan, transmitted, mti_class, mti, kind, amount,
                state, reversed, reversal_id, note)
            SELECT d.original_id, $18, $19, $20, $21, $23, 'awaited', $12, 'awaited', true, p.id,
                'its reversal arrived first'
            FROM posted p JOIN decided d ON d.id = p.id
            WHERE d.step = 'not_seen'
            ON CONFLICT ON CONSTRAINT postings_key DO NOTHING
            RETURNING id),
         marked AS (
            UPDATE issuer.postings o SET reversed = true, reversal_id = p.id, updated_at = now(),
                state = CASE d.step WHEN 'applied' THEN 'reversed' ELSE o.state END
            FROM posted p JOIN decided d ON d.id = p.id
            WHERE o.id = d.original_id AND d.step IN ('declined', 'applied')),
         -- The original's own original gets back the state it had before.
         restored AS (
            UPDATE issuer.postings o SET refunded = d.parent_refunded, updated_at = now(),
                state = CASE WHEN d.orig_kind = 'refund' AND d.parent_refunded <> 0
                             THEN 'partially_refunded' ELSE 'approved' END
            FROM posted p JOIN decided d ON d.id = p.id
            WHERE o.id = d.parent_id),
         moved AS (
            UPDATE issuer.cards c SET balance = c.balance + d.balance_change, held = c.held + d.hold_change
            FROM posted p JOIN decided d ON d.id = p.id
            WHERE c.id = d.posting_card AND (d.balance_change <> 0 OR d.hold_change <> 0))
         SELECT p.id IS NOT NULL AS inserted, d.code, NULL::text AS auth_code, d.note,
             d.orig_state AS original_state, d.orig_amount AS original_amount, d.step,
             -- The original was not there to lock, yet its key is taken now:
             -- it was being written when this statement began. Undone and
             -- tried again, it is found.
             CASE WHEN p.id IS NOT NULL AND d.step = 'not_seen' AND NOT EXISTS (SELECT FROM awaited)
                  THEN issuer.try_again('the original of a reversal turned up meanwhile') END
         FROM decided d LEFT JOIN posted p ON p.id = d.id",
        req,
        fingerprint,
    )
    .bind(!matches!(reference.mti.class(), 4 | 8))
    .bind(reference.mti.to_string())
    .fetch_one(pool)
    .await?;
    if posted.inserted {
        match posted.step.as_deref() {
            // Voided, refunded, cancelled or completed since: its effect is no
            // longer its own to undo. The switch does not reverse such originals.
            Some("followed") => warn!(
                state = posted.original_state.as_deref().unwrap_or_default(),
                "reversal of an original with follow-ons: not applied"
            ),
            Some("applied") if posted.original_amount != Some(req.amount) => warn!(
                reversal = req.amount,
                original = posted.original_amount,
                "reversal amount differs from the original's; the original's posting is undone"
            ),
            _ => {}
        }
    }
    posted.outcome(req)
}

/// The key is taken: a repeat, a different message reusing the key, or the
/// original of a reversal that came first. One statement: the row under the
/// key, locked, and, when it is a reversal's mark, declined for good.
pub(crate) async fn repeat(
    pool: &PgPool,
    req: &Request,
    fingerprint: &[u8; 32],
) -> Result<Outcome, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Taken {
        fingerprint: Option<Vec<u8>>,
        kind: String,
        response_code: Option<String>,
        auth_code: Option<String>,
        available_reply: Option<i64>,
        overtaken: bool,
    }
    // Its reversal overtook it: the switch has given up on it. It is
    // declined and never posted, however often it is repeated.
    let row: Taken = sqlx::query_as(
        "WITH taken AS MATERIALIZED (
            SELECT id, fingerprint, kind, response_code, auth_code, available_reply
            FROM issuer.postings
            WHERE acquirer = $1 AND stan = $2 AND transmitted = $3 AND mti_class = $4
            FOR UPDATE),
         overtaken AS (
            UPDATE issuer.postings p SET fingerprint = $5, mti = $6, kind = $7, processing_code = $8,
                condition_code = $9, pan_masked = $10, amount = $11, rrn = $12, terminal = $13,
                merchant = $14, original_ref = $15, forwarding = $16, response_code = $17,
                state = 'declined', note = 'declined: its reversal arrived first',
                created_at = now(), updated_at = now()
            FROM taken t
            WHERE p.id = t.id AND t.fingerprint IS NULL
            RETURNING p.id)
         SELECT t.fingerprint, t.kind, t.response_code, t.auth_code, t.available_reply,
             EXISTS (SELECT FROM overtaken) AS overtaken
         FROM taken t",
    )
    .bind(&req.key.acquirer)
    .bind(&req.key.stan)
    .bind(&req.key.transmitted)
    .bind(req.key.class)
    .bind(fingerprint.as_slice())
    .bind(req.mti.to_string())
    .bind(req.kind.as_str())
    .bind(&req.processing)
    .bind(&req.condition)
    .bind(req.pan.as_ref().map(Pan::masked))
    .bind(req.amount)
    .bind(&req.rrn)
    .bind(&req.terminal)
    .bind(&req.merchant)
    .bind(req.original.as_ref().map(|o| &o.raw))
    .bind(&req.forwarding)
    .bind(code::TOO_LATE)
    .fetch_optional(pool)
    .await?
    .ok_or(sqlx::Error::RowNotFound)?;
    match &row.fingerprint {
        _ if row.overtaken => Ok(Outcome::code_only(code::TOO_LATE)),
        Some(stored) if stored.as_slice() == fingerprint => {
            debug!("repeat: the stored outcome");
            Ok(Outcome {
                code: row
                    .response_code
                    .unwrap_or_else(|| code::SYSTEM_ERROR.into()),
                auth_code: row.auth_code,
                available: row.available_reply,
            })
        }
        _ => {
            warn!(kind = %row.kind, "a different message reuses the key of an earlier one");
            Ok(Outcome::code_only(code::DUPLICATE))
        }
    }
}

/// A new authorisation (balance inquiry, purchase, pre-authorisation) for
/// [`authorise_many`].
#[derive(Debug, Clone)]
pub(crate) struct NewAuth {
    pub req: Request,
    pub pan_hash: [u8; 32],
    pub fingerprint: [u8; 32],
}

/// Decides and records many new authorisations in one statement (group
/// commit), with the card's own checks: its status,
/// expiry, limit and available balance, locked (in id order) while they
/// are read and moved. No two may be for one card. For each, in order, the
/// outcome, or `None` when its key was already taken (a repeat: the caller
/// takes the one-by-one path, which answers it from the stored posting).
pub(crate) async fn authorise_many<'c>(
    pool: impl sqlx::PgExecutor<'c>,
    auths: &[NewAuth],
) -> Result<Vec<Option<Outcome>>, sqlx::Error> {
    fn col<'r, T>(a: &'r [NewAuth], f: impl Fn(&'r NewAuth) -> T) -> Vec<T> {
        a.iter().map(f).collect()
    }
    let today = chrono::Utc::now().date_naive();
    #[derive(sqlx::FromRow)]
    struct Decision {
        ord: i64,
        inserted: bool,
        code: String,
        auth_code: Option<String>,
        available: Option<i64>,
    }
    let rows: Vec<Decision> = sqlx::query_as(
        "WITH req AS (
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int2[], $5::text[], $6::text[],
                                 $7::bytea[], $8::text[], $9::text[], $10::text[], $11::text[], $12::int8[],
                                 $13::text[], $14::text[], $15::text[], $16::bytea[], $17::bool[])
                WITH ORDINALITY
                AS r(acquirer, stan, transmitted, mti_class, mti, forwarding, fingerprint, kind,
                     processing_code, condition_code, pan_masked, amount, rrn, terminal, merchant,
                     pan_hash, expired, ord)),
         card AS (
            SELECT * FROM issuer.cards WHERE pan_hash = ANY($16) ORDER BY id FOR UPDATE),
         looked AS (
            SELECT r.*, nextval('issuer.postings_id_seq') AS id, c.id AS card_id,
                coalesce(c.pan_masked, r.pan_masked) AS masked, c.balance - c.held AS available,
                c.status AS card_status,
                CASE WHEN c.id IS NULL THEN '14'
                     WHEN c.status = 'lost' THEN '41'
                     WHEN c.status = 'stolen' THEN '43'
                     WHEN c.status <> 'active' THEN '62'
                     WHEN c.expiry < $18 OR r.expired THEN '54'
                     WHEN r.kind = 'balance_inquiry' THEN '00'
                     WHEN r.amount > c.txn_limit THEN '61'
                     WHEN r.amount > c.balance - c.held THEN '51'
                     ELSE '00' END AS code
            FROM req r LEFT JOIN card c ON c.pan_hash = r.pan_hash),
         decided AS (
            SELECT l.*,
                CASE WHEN code = '00' AND kind = 'purchase' THEN -amount ELSE 0 END AS balance_change,
                CASE WHEN code = '00' AND kind = 'preauth' THEN amount ELSE 0 END AS hold_change,
                CASE WHEN code = '00' AND kind <> 'balance_inquiry'
                     THEN issuer.auth_code(id) END AS auth_code,
                CASE WHEN code = '00' AND kind = 'balance_inquiry' THEN available END AS available_reply,
                CASE code WHEN '14' THEN 'unknown card' WHEN '41' THEN 'card is lost'
                          WHEN '43' THEN 'card is stolen' WHEN '62' THEN 'card is ' || card_status
                          WHEN '54' THEN 'expired' WHEN '61' THEN 'above the card''s limit'
                          WHEN '51' THEN 'insufficient funds' END AS note
            FROM looked l),
         posted AS (
            INSERT INTO issuer.postings (id, acquirer, stan, transmitted, mti_class, mti, forwarding,
                fingerprint, kind, processing_code, condition_code, card_id, pan_masked, amount,
                balance_change, hold_change, response_code, auth_code, available_reply, rrn, terminal,
                merchant, state, note)
            SELECT id, acquirer, stan, transmitted, mti_class, mti, forwarding, fingerprint, kind,
                processing_code, condition_code, card_id, masked, amount, balance_change, hold_change,
                code, auth_code, available_reply, rrn, terminal, merchant,
                CASE WHEN code = '00' THEN 'approved' ELSE 'declined' END, note
            FROM decided
            ON CONFLICT ON CONSTRAINT postings_key DO NOTHING
            RETURNING id, card_id, balance_change, hold_change),
         moved AS (
            UPDATE issuer.cards c SET balance = c.balance + p.balance_change, held = c.held + p.hold_change
            FROM posted p
            WHERE c.id = p.card_id AND (p.balance_change <> 0 OR p.hold_change <> 0))
         SELECT d.ord, p.id IS NOT NULL AS inserted, d.code, d.auth_code, d.available_reply AS available
         FROM decided d LEFT JOIN posted p ON p.id = d.id",
    )
    .bind(col(auths, |a| a.req.key.acquirer.as_str()))
    .bind(col(auths, |a| a.req.key.stan.as_str()))
    .bind(col(auths, |a| a.req.key.transmitted.as_str()))
    .bind(col(auths, |a| a.req.key.class))
    .bind(col(auths, |a| a.req.mti.to_string()))
    .bind(col(auths, |a| a.req.forwarding.as_deref()))
    .bind(col(auths, |a| a.fingerprint.as_slice()))
    .bind(col(auths, |a| a.req.kind.as_str()))
    .bind(col(auths, |a| a.req.processing.as_str()))
    .bind(col(auths, |a| a.req.condition.as_deref()))
    .bind(col(auths, |a| a.req.pan.as_ref().map(Pan::masked)))
    .bind(col(auths, |a| a.req.amount))
    .bind(col(auths, |a| a.req.rrn.as_deref()))
    .bind(col(auths, |a| a.req.terminal.as_deref()))
    .bind(col(auths, |a| a.req.merchant.as_deref()))
    .bind(col(auths, |a| a.pan_hash.as_slice()))
    .bind(col(auths, |a| {
        a.req.expiry.as_deref().is_some_and(|e| expired(e, today))
    }))
    .bind(format!("{:02}{:02}", today.year() % 100, today.month()))
    .fetch_all(pool)
    .await?;
    let mut out: Vec<Option<Outcome>> = vec![None; auths.len()];
    for d in rows {
        let slot = usize::try_from(d.ord - 1).ok().and_then(|i| out.get_mut(i));
        if let (true, Some(slot)) = (d.inserted, slot) {
            *slot = Some(Outcome {
                code: d.code,
                auth_code: d.auth_code,
                available: d.available,
            });
        }
    }
    Ok(out)
}

/// YYMM before the current month (UTC); an unreadable expiry counts as expired.
fn expired(yymm: &str, today: chrono::NaiveDate) -> bool {
    let (Some(yy), Some(mm)) = (
        yymm.get(..2).and_then(|s| s.parse::<i32>().ok()),
        yymm.get(2..4).and_then(|s| s.parse::<u32>().ok()),
    ) else {
        return true;
    };
    !(1..=12).contains(&mm) || (2000 + yy, mm) < (today.year(), today.month())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_checked_against_the_current_month() {
        let today = chrono::NaiveDate::from_ymd_opt(2026, 6, 15).unwrap();
        assert!(!expired("2606", today));
        assert!(expired("2605", today));
        assert!(!expired("3012", today));
        assert!(expired("2512", today));
        assert!(expired("2613", today));
        assert!(expired("26", today));
    }
}
