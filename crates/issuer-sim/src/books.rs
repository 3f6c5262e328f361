//! The issuer's books in PostgreSQL (schema `issuer`): cards keyed by the
//! keyed PAN hash, and one posting per message of the switch.
//!
//! Exactly once: a message first claims its key (acquirer, link STAN, F7,
//! MTI class) with `INSERT ... ON CONFLICT DO NOTHING`; the decision, the
//! card's new balance and the posting's outcome are written in the same
//! transaction. A repeat, even one arriving while the first is still being
//! decided, waits on the unique index and then reads the stored outcome: no
//! in-memory bookkeeping, and a crash never leaves half a posting.
//!
//! Locks are always taken newest first: the message's own row, then the
//! original it names (then that one's original), then the card; so two
//! follow-ons of one original queue behind each other instead of deadlocking.
//! New authorisations, decided in batches ([`authorise_many`]), lock their
//! cards (in id order) before they claim their keys, and wait on nothing
//! else but a repeat of their own key. Should PostgreSQL still find a
//! deadlock, the transaction is retried.

use chrono::Datelike;
use iso8583::Pan;
use sqlx::{PgConnection, PgPool};
use tracing::{debug, warn};

use crate::Error;
use crate::config::{CardRange, CardStatus};
use crate::key::PanKey;
use crate::request::{Kind, PostingKey, Request};

/// The response codes the issuer answers with.
pub(crate) mod code {
    pub const APPROVED: &str = "00";
    pub const INVALID_TRANSACTION: &str = "12";
    pub const INVALID_AMOUNT: &str = "13";
    pub const INVALID_CARD: &str = "14";
    pub const NOT_FOUND: &str = "25";
    pub const FORMAT_ERROR: &str = "30";
    pub const INSUFFICIENT_FUNDS: &str = "51";
    pub const OVER_LIMIT: &str = "61";
    pub const AMOUNT_MISMATCH: &str = "64";
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

#[derive(Debug, sqlx::FromRow)]
struct Posting {
    id: i64,
    fingerprint: Option<Vec<u8>>,
    kind: String,
    card_id: Option<i64>,
    amount: i64,
    balance_change: i64,
    hold_change: i64,
    response_code: Option<String>,
    auth_code: Option<String>,
    available_reply: Option<i64>,
    original_id: Option<i64>,
    state: String,
    refunded: i64,
    reversed: bool,
}

#[derive(Debug, sqlx::FromRow)]
struct Card {
    id: i64,
    pan_hash: Vec<u8>,
    pan_masked: String,
    balance: i64,
    held: i64,
}

/// The decision about one message, before it is written.
#[derive(Debug)]
struct Decided {
    code: &'static str,
    card: Option<(i64, String)>,
    balance_change: i64,
    hold_change: i64,
    /// Approvals of this kind carry an auth code (F38).
    auth: bool,
    available: Option<i64>,
    original_id: Option<i64>,
    note: Option<String>,
}

impl Decided {
    fn new() -> Decided {
        Decided {
            code: code::APPROVED,
            card: None,
            balance_change: 0,
            hold_change: 0,
            auth: false,
            available: None,
            original_id: None,
            note: None,
        }
    }

    fn decline(mut self, code: &'static str, note: impl Into<String>) -> Decided {
        self.code = code;
        self.balance_change = 0;
        self.hold_change = 0;
        self.auth = false;
        self.note = Some(note.into());
        self
    }

    fn on(mut self, card: &Card) -> Decided {
        self.card = Some((card.id, card.pan_masked.clone()));
        self
    }
}

/// Whether a database error is worth a retry of the whole transaction.
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
    if let Some(pan_hash) = pan_hash.filter(|_| req.kind.is_new()) {
        // New authorisations are decided by one statement, batched or not.
        let auth = NewAuth {
            req: req.clone(),
            pan_hash,
            fingerprint,
        };
        if let Some(Some(outcome)) = authorise_many(pool, std::slice::from_ref(&auth))
            .await?
            .pop()
        {
            return Ok(outcome);
        }
        // Its key was taken: `apply_in` finds the stored posting.
    }
    let mut attempt = 0;
    loop {
        let mut tx = pool.begin().await?;
        let result = match apply_in(&mut tx, req, pan_hash.as_ref(), &fingerprint).await {
            Ok(outcome) => tx.commit().await.map(|()| outcome),
            Err(e) => Err(e),
        };
        match result {
            Err(e) if retryable(&e) && attempt < 5 => {
                attempt += 1;
                debug!(error = %e, attempt, "retrying after a deadlock");
            }
            other => return other,
        }
    }
}

async fn apply_in(
    tx: &mut PgConnection,
    req: &Request,
    pan_hash: Option<&[u8; 32]>,
    fingerprint: &[u8; 32],
) -> Result<Outcome, sqlx::Error> {
    let claimed: Option<i64> = sqlx::query_scalar(
        "INSERT INTO issuer.postings (acquirer, stan, transmitted, mti_class, mti, forwarding, fingerprint,
             kind, processing_code, condition_code, pan_masked, amount, rrn, terminal, merchant,
             original_ref, reason, state)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, 'processing')
         ON CONFLICT ON CONSTRAINT postings_key DO NOTHING
         RETURNING id",
    )
    .bind(&req.key.acquirer)
    .bind(&req.key.stan)
    .bind(&req.key.transmitted)
    .bind(req.key.class)
    .bind(req.mti.to_string())
    .bind(&req.forwarding)
    .bind(fingerprint.to_vec())
    .bind(req.kind.as_str())
    .bind(&req.processing)
    .bind(&req.condition)
    .bind(req.pan.as_ref().map(Pan::masked))
    .bind(req.amount)
    .bind(&req.rrn)
    .bind(&req.terminal)
    .bind(&req.merchant)
    .bind(req.original.as_ref().map(|o| &o.raw))
    .bind(&req.reason)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(id) = claimed else {
        return existing(tx, req, fingerprint).await;
    };

    let decided = match req.kind {
        // Decided by `authorise_many`; a key it found taken is taken here too.
        Kind::BalanceInquiry | Kind::Purchase | Kind::PreAuth => {
            Decided::new().decline(code::SYSTEM_ERROR, "a new authorisation off its path")
        }
        Kind::Reversal => reverse(tx, req, id).await?,
        _ => follow_on(tx, req, pan_hash).await?,
    };
    let approved = decided.code == code::APPROVED;
    let auth_code = (approved && decided.auth).then(|| auth_code(id));
    let (card_id, pan_masked) = decided.card.clone().unzip();
    sqlx::query(
        "UPDATE issuer.postings SET card_id = $2, pan_masked = coalesce($3, pan_masked),
             balance_change = $4, hold_change = $5, response_code = $6, auth_code = $7,
             available_reply = $8, original_id = $9, state = $10, note = $11, updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(card_id)
    .bind(pan_masked)
    .bind(decided.balance_change)
    .bind(decided.hold_change)
    .bind(decided.code)
    .bind(&auth_code)
    .bind(decided.available)
    .bind(decided.original_id)
    .bind(if approved { "approved" } else { "declined" })
    .bind(&decided.note)
    .execute(&mut *tx)
    .await?;
    if let Some(note) = &decided.note {
        debug!(
            kind = req.kind.as_str(),
            code = decided.code,
            note,
            "decided"
        );
    }
    Ok(Outcome {
        code: decided.code.to_string(),
        auth_code,
        available: decided.available,
    })
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
pub(crate) async fn authorise_many(
    pool: &PgPool,
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
                     THEN lpad((((id % 1000000) * 7919 + 13) % 1000000)::text, 6, '0') END AS auth_code,
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

/// A six-digit auth code: unique among any million consecutive postings
/// (7919 is prime to 10^6), and the same for every repeat.
fn auth_code(id: i64) -> String {
    format!("{:06}", (id.rem_euclid(1_000_000) * 7919 + 13) % 1_000_000)
}

/// The key is taken: a repeat, a different message reusing the key, or the
/// original of a reversal that came first.
async fn existing(
    tx: &mut PgConnection,
    req: &Request,
    fingerprint: &[u8; 32],
) -> Result<Outcome, sqlx::Error> {
    let row = lock_by_key(tx, &req.key)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?;
    match &row.fingerprint {
        None => {
            // Its reversal overtook it: the switch has given up on it. It is
            // declined and never posted, however often it is repeated.
            sqlx::query(
                "UPDATE issuer.postings SET fingerprint = $2, mti = $3, kind = $4, processing_code = $5,
                     condition_code = $6, pan_masked = $7, amount = $8, rrn = $9, terminal = $10,
                     merchant = $11, original_ref = $12, forwarding = $13, response_code = $14,
                     state = 'declined', note = 'declined: its reversal arrived first',
                     created_at = now(), updated_at = now()
                 WHERE id = $1",
            )
            .bind(row.id)
            .bind(fingerprint.to_vec())
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
            .execute(&mut *tx)
            .await?;
            Ok(Outcome::code_only(code::TOO_LATE))
        }
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
        Some(_) => {
            warn!(kind = %row.kind, "a different message reuses the key of an earlier one");
            Ok(Outcome::code_only(code::DUPLICATE))
        }
    }
}

async fn lock_by_key(
    tx: &mut PgConnection,
    key: &PostingKey,
) -> Result<Option<Posting>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM issuer.postings
         WHERE acquirer = $1 AND stan = $2 AND transmitted = $3 AND mti_class = $4
         FOR UPDATE",
    )
    .bind(&key.acquirer)
    .bind(&key.stan)
    .bind(&key.transmitted)
    .bind(key.class)
    .fetch_optional(&mut *tx)
    .await
}

async fn lock_by_id(tx: &mut PgConnection, id: i64) -> Result<Posting, sqlx::Error> {
    sqlx::query_as("SELECT * FROM issuer.postings WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_one(&mut *tx)
        .await
}

async fn lock_card(tx: &mut PgConnection, id: i64) -> Result<Card, sqlx::Error> {
    sqlx::query_as("SELECT * FROM issuer.cards WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_one(&mut *tx)
        .await
}

async fn move_money(
    tx: &mut PgConnection,
    card: i64,
    balance: i64,
    hold: i64,
) -> Result<(), sqlx::Error> {
    if balance != 0 || hold != 0 {
        sqlx::query(
            "UPDATE issuer.cards SET balance = balance + $2, held = held + $3 WHERE id = $1",
        )
        .bind(card)
        .bind(balance)
        .bind(hold)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

async fn set_state(
    tx: &mut PgConnection,
    id: i64,
    state: &str,
    refunded: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE issuer.postings SET state = $2, refunded = $3, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(state)
    .bind(refunded)
    .execute(&mut *tx)
    .await?;
    Ok(())
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

/// Void, refund, pre-auth cancel, completion, completion void: the
/// original named by F90 decides.
async fn follow_on(
    tx: &mut PgConnection,
    req: &Request,
    pan_hash: Option<&[u8; 32]>,
) -> Result<Decided, sqlx::Error> {
    let reference = req.original.as_ref().expect("read() requires F90");
    let d = Decided::new();
    let orig = lock_by_key(tx, &reference.key).await?;
    let Some(orig) = orig.filter(|o| o.fingerprint.is_some()) else {
        return Ok(d.decline(code::NOT_FOUND, "original not found"));
    };
    let d = Decided {
        original_id: Some(orig.id),
        ..d
    };
    let wanted: &[&str] = match req.kind {
        Kind::Void => &["purchase"],
        Kind::CompletionVoid => &["completion"],
        Kind::PreAuthCancel | Kind::Completion => &["preauth"],
        _ => &["purchase", "completion"],
    };
    if !wanted.contains(&orig.kind.as_str()) {
        return Ok(d.decline(
            code::INVALID_TRANSACTION,
            format!("the original is a {}", orig.kind),
        ));
    }
    let open = match req.kind {
        Kind::Refund => ["approved", "partially_refunded"].contains(&orig.state.as_str()),
        _ => orig.state == "approved",
    };
    if !open {
        return Ok(d.decline(
            code::INVALID_TRANSACTION,
            format!("the original is {}", orig.state),
        ));
    }
    let full_amount = matches!(
        req.kind,
        Kind::Void | Kind::CompletionVoid | Kind::PreAuthCancel
    );
    if full_amount && req.amount != orig.amount {
        return Ok(d.decline(code::AMOUNT_MISMATCH, "not the original's amount"));
    }
    if req.kind == Kind::Refund && orig.refunded + req.amount > orig.amount {
        return Ok(d.decline(
            code::OVER_LIMIT,
            "refunds would exceed the original's amount",
        ));
    }
    let card = lock_card(tx, orig.card_id.ok_or(sqlx::Error::RowNotFound)?).await?;
    let d = d.on(&card);
    if pan_hash.is_some_and(|h| h.as_slice() != card.pan_hash.as_slice()) {
        return Ok(d.decline(code::INVALID_CARD, "not the original's card"));
    }
    let (balance, hold, state, refunded) = match req.kind {
        Kind::Void | Kind::CompletionVoid => (-orig.balance_change, 0, "voided", orig.refunded),
        Kind::PreAuthCancel => (0, -orig.hold_change, "cancelled", orig.refunded),
        Kind::Completion => {
            // A completion request may overdraw by no more than the hold it
            // releases; a completion advice is already done at the
            // terminal and is posted as it is.
            if !req.is_advice() && req.amount > card.balance - card.held + orig.hold_change {
                return Ok(d.decline(code::INSUFFICIENT_FUNDS, "insufficient funds"));
            }
            (-req.amount, -orig.hold_change, "completed", orig.refunded)
        }
        _ => {
            let refunded = orig.refunded + req.amount;
            let state = if refunded == orig.amount {
                "refunded"
            } else {
                "partially_refunded"
            };
            (req.amount, 0, state, refunded)
        }
    };
    move_money(tx, card.id, balance, hold).await?;
    set_state(tx, orig.id, state, refunded).await?;
    Ok(Decided {
        balance_change: balance,
        hold_change: hold,
        auth: !req.is_advice(),
        ..d
    })
}

/// A reversal advice: undo exactly what the original posted, once; or, when
/// the original has not arrived, leave a row under its key so that it is
/// declined when it does. Always answered `00` once recorded.
async fn reverse(tx: &mut PgConnection, req: &Request, own: i64) -> Result<Decided, sqlx::Error> {
    let reference = req.original.as_ref().expect("read() requires F90");
    let d = Decided::new();
    if matches!(reference.mti.class(), 4 | 8) {
        return Ok(Decided {
            note: Some(format!(
                "nothing to reverse: the original is a {}",
                reference.mti
            )),
            ..d
        });
    }
    let awaited: Option<i64> = sqlx::query_scalar(
        "INSERT INTO issuer.postings (acquirer, stan, transmitted, mti_class, mti, kind, amount, state,
             reversed, reversal_id, note)
         VALUES ($1, $2, $3, $4, $5, 'awaited', $6, 'awaited', true, $7, 'its reversal arrived first')
         ON CONFLICT ON CONSTRAINT postings_key DO NOTHING
         RETURNING id",
    )
    .bind(&reference.key.acquirer)
    .bind(&reference.key.stan)
    .bind(&reference.key.transmitted)
    .bind(reference.key.class)
    .bind(reference.mti.to_string())
    .bind(req.amount)
    .bind(own)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(awaited) = awaited {
        return Ok(Decided {
            original_id: Some(awaited),
            note: Some("original not seen: it will be declined 68".into()),
            ..d
        });
    }
    let orig = lock_by_key(tx, &reference.key)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?;
    let d = Decided {
        original_id: Some(orig.id),
        ..d
    };
    let note = |n: &str| Some(n.to_string());
    if orig.fingerprint.is_none() {
        return Ok(Decided {
            note: note("original not seen (already marked)"),
            ..d
        });
    }
    if orig.reversed {
        return Ok(Decided {
            note: note("already reversed"),
            ..d
        });
    }
    if orig.response_code.as_deref() != Some(code::APPROVED) {
        mark_reversed(tx, orig.id, &orig.state, own).await?;
        return Ok(Decided {
            note: note("the original was declined: nothing to undo"),
            ..d
        });
    }
    if orig.state != "approved" {
        // Voided, refunded, cancelled or completed since: its effect is no
        // longer its own to undo. The switch does not reverse such originals.
        warn!(state = %orig.state, "reversal of an original with follow-ons: not applied");
        return Ok(Decided {
            note: Some(format!("not applied: the original is {}", orig.state)),
            ..d
        });
    }
    let parent = match orig.original_id {
        Some(id) => Some(lock_by_id(tx, id).await?),
        None => None,
    };
    let card = lock_card(tx, orig.card_id.ok_or(sqlx::Error::RowNotFound)?).await?;
    let (balance, hold) = (-orig.balance_change, -orig.hold_change);
    move_money(tx, card.id, balance, hold).await?;
    mark_reversed(tx, orig.id, "reversed", own).await?;
    if let Some(parent) = parent {
        // The original's own original gets back the state it had before.
        let (state, refunded) = match orig.kind.as_str() {
            "refund" => {
                let refunded = parent.refunded - orig.amount;
                let state = if refunded == 0 {
                    "approved"
                } else {
                    "partially_refunded"
                };
                (state, refunded)
            }
            _ => ("approved", parent.refunded),
        };
        set_state(tx, parent.id, state, refunded).await?;
    }
    if req.amount != orig.amount {
        warn!(
            reversal = req.amount,
            original = orig.amount,
            "reversal amount differs from the original's; the original's posting is undone"
        );
    }
    Ok(Decided {
        balance_change: balance,
        hold_change: hold,
        note: note("applied"),
        ..d.on(&card)
    })
}

async fn mark_reversed(
    tx: &mut PgConnection,
    id: i64,
    state: &str,
    by: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE issuer.postings SET reversed = true, reversal_id = $3, state = $2, updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(state)
    .bind(by)
    .execute(&mut *tx)
    .await?;
    Ok(())
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

    #[test]
    fn auth_codes_are_six_digits_and_distinct() {
        let codes: std::collections::HashSet<String> = (1..=10_000).map(auth_code).collect();
        assert_eq!(codes.len(), 10_000);
        assert!(
            codes
                .iter()
                .all(|c| c.len() == 6 && c.bytes().all(|b| b.is_ascii_digit()))
        );
    }
}
