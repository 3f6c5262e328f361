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

/// The columns of an [`Original`], over a `journal` row; `$f11` is
/// `'pending'` ([`finds_ctes`]). The generic plan the writer keeps is made
/// while the advice queue is short (and kept until its statistics change),
/// so each advice is looked up by its `(journal_id, kind)`, never by a
/// pass over the queue: `pending` as a parameter keeps that plan off the
/// partial index of pending advices, and the follow-ons' advices are a
/// subquery per follow-on, which a join was not (its plan read every
/// reversal advice ever queued for each original with a follow-on, 2,000
/// and growing in a run with an issuer outage).
macro_rules! original_columns {
    () => {
        "id, rrn, kind, state, amount, refunded_amount, batch, stan, business_date, pan_hash,
        auth_code, mti, processing_code, issuer, link_stan, link_f7, institution_id, forwarding_id,
        original_id, received_at,
        EXISTS (SELECT 1 FROM advices a WHERE a.journal_id = journal.id
                AND a.state = $f11 AND a.kind = 'reversal')
        OR EXISTS (SELECT 1 FROM journal f WHERE f.original_id = journal.id
                   AND (SELECT a.state = $f11 FROM advices a
                        WHERE a.journal_id = f.id AND a.kind = 'reversal'))
        AS family_pending"
    };
}

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
    /// The original this request refers to, when matched.
    pub original_id: Option<i64>,
    /// The rule that decided (V1, R2, ...), for the audit trail.
    pub rule: Option<&'static str>,
    /// F63.1, when the terminal sends an operator.
    pub operator: Option<String>,
    /// F39 of a reversal.
    pub reversal_reason: Option<String>,
    /// How the terminal named the original (F61, F37, F38).
    pub original_ref: Option<String>,
    /// The original's new state when this request claims it (a void makes
    /// it `voided`): one conditional UPDATE in the same statement as the
    /// insert, so of two racing claims exactly one wins.
    pub claim: Option<&'static str>,
    /// Journal it only while `batch` is still the terminal's open batch:
    /// the router checked the batch against a terminal read a moment ago,
    /// and a batch settled since (by another switch process) takes nothing
    /// more ([`Insert::BatchClosed`]); nor does one closing at this very
    /// moment ([`settle`]), however freshly the terminal was read.
    /// Settlements and uploads, which name a batch that may just have
    /// closed, do not ask for it.
    pub open_batch: bool,
    /// F32 of its messages to the issuer (the config's `institution_id`),
    /// kept so that a follow-on's F90 names it as it was sent.
    pub institution_id: &'a str,
    /// F33 of its messages (`forwarding_id`).
    pub forwarding_id: &'a str,
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
    /// Journalled `received`, to be decided by a following statement (refunds).
    Hold,
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
    /// Whether the claim on the original (if any) was won.
    pub claimed: bool,
}

impl Written {
    /// Its outcome, for [`complete`]: the state and code it ends with, its
    /// auth code and the terminal's reply.
    pub fn outcome(
        &self,
        state: State,
        rc: ResponseCode,
        auth_code: Option<&str>,
        reply: Vec<u8>,
    ) -> Completion {
        Completion {
            id: self.id,
            state,
            rc,
            auth_code: auth_code.map(str::to_string),
            reply,
            claimed: self.claimed,
        }
    }
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
    /// Not written: the batch it asked for ([`NewEntry::open_batch`]) is
    /// no longer the terminal's open one (`77`).
    BatchClosed,
}

/// SQL: a row that asks for its batch to be open (`$open`, with the
/// terminal `$terminal` and the batch `$batch`) is written only when it is.
///
/// The terminal's row is read `FOR SHARE` and stays locked until the row
/// is committed, so the close of the batch ([`settle`], which takes it
/// `FOR UPDATE` first) waits for every insert that found the batch open,
/// and then sees it. Without the lock the two overlap under READ
/// COMMITTED: the insert's snapshot shows the batch open, the close's
/// does not show the insert, and a sale is approved in a batch already
/// settled without it. An insert that asks for the lock while the close
/// holds it reads the terminal again once the close commits, and finds
/// the new batch. `FOR KEY SHARE` would not do: it does not conflict with
/// an UPDATE that changes no key, so a change of `batch` made without an
/// explicit lock would pass it by.
const BATCH_OPEN: &str = "(NOT $open OR EXISTS (SELECT 1 FROM terminals t
    WHERE t.id = $terminal AND t.batch = $batch FOR SHARE))";

fn batch_open(open: &str, terminal: &str, batch: &str) -> String {
    BATCH_OPEN
        .replace("$open", open)
        .replace("$terminal", terminal)
        .replace("$batch", batch)
}

/// Writes a request, or finds the earlier one with its key: a
/// [`write_many`] of one.
pub async fn insert(
    pool: &PgPool,
    e: &NewEntry<'_>,
    d: Disposition<'_>,
) -> Result<Insert, sqlx::Error> {
    match write_one(pool, Write::Request(Box::new(Row::of(e, d)))).await? {
        Some(Wrote::Request(Some(written))) => Ok(Insert::New(written)),
        _ => not_inserted(pool, e).await,
    }
}

/// Why a request was not written: its key was taken by an earlier request,
/// or the batch it asked for is closed.
pub async fn not_inserted(pool: &PgPool, e: &NewEntry<'_>) -> Result<Insert, sqlx::Error> {
    match earlier(pool, e).await? {
        Some(earlier) => Ok(Insert::Duplicate(earlier)),
        None if e.open_batch => Ok(Insert::BatchClosed),
        None => Err(sqlx::Error::RowNotFound),
    }
}

/// A request for [`write_many`]: what [`insert`] takes, owned.
#[derive(Debug, Clone)]
pub struct Row {
    /// F41.
    pub terminal_id: String,
    /// F42.
    pub merchant_id: String,
    /// F60.2.
    pub batch: i32,
    /// F11.
    pub stan: i32,
    /// The terminal's MTI.
    pub mti: i16,
    /// What it asks for.
    pub kind: &'static str,
    /// F3.
    pub processing_code: String,
    /// F25.
    pub pos_condition: String,
    /// F4, fen.
    pub amount: i64,
    /// Keyed PAN hash.
    pub pan_hash: Option<Vec<u8>>,
    /// First 6 / last 4.
    pub pan_masked: Option<String>,
    /// What a duplicate must match.
    pub digest: Vec<u8>,
    /// `sent`, `received` or a final state.
    pub state: &'static str,
    /// The code of a row answered by the switch itself.
    pub response_code: Option<String>,
    /// The issuer of a `sent` row.
    pub issuer: Option<String>,
    /// F7 on the issuer link.
    pub link_f7: Option<String>,
    /// The business day.
    pub business_date: NaiveDate,
    /// The original, when matched.
    pub original_id: Option<i64>,
    /// The rule that decided.
    pub rule: Option<&'static str>,
    /// F63.1.
    pub operator: Option<String>,
    /// F39 of a reversal.
    pub reversal_reason: Option<String>,
    /// How the terminal named the original.
    pub original_ref: Option<String>,
    /// Written only while its batch is open ([`NewEntry::open_batch`]).
    pub open_batch: bool,
    /// The original's new state when this request claims it ([`NewEntry::claim`]).
    pub claim: Option<&'static str>,
    /// F32 of its messages ([`NewEntry::institution_id`]).
    pub institution_id: String,
    /// F33 of its messages.
    pub forwarding_id: String,
}

impl Row {
    /// Whether it claims its original ([`NewEntry::claim`]): only a row
    /// written `sent` does.
    pub fn claims(&self) -> bool {
        self.claim.is_some() && self.state == State::Sent.as_str()
    }

    /// The unique request key (merchant, terminal, batch, STAN, MTI class).
    pub fn key(&self) -> (String, String, i32, i32, i16) {
        (
            self.merchant_id.clone(),
            self.terminal_id.clone(),
            self.batch,
            self.stan,
            self.mti / 100,
        )
    }

    /// The row of a request.
    pub fn of(e: &NewEntry<'_>, d: Disposition<'_>) -> Row {
        let (state, rc, issuer, f7) = match d {
            Disposition::Forward { issuer, f7 } => (State::Sent, None, Some(issuer), Some(f7)),
            Disposition::Answer(state, rc) => (state, Some(rc.as_str().to_string()), None, None),
            Disposition::Hold => (State::Received, None, None, None),
        };
        Row {
            terminal_id: e.terminal_id.to_string(),
            merchant_id: e.merchant_id.to_string(),
            batch: e.batch,
            stan: e.stan,
            mti: e.mti as i16,
            kind: e.kind.as_str(),
            processing_code: e.processing_code.to_string(),
            pos_condition: e.pos_condition.to_string(),
            amount: e.amount,
            pan_hash: e.pan_hash.map(|h| h.to_vec()),
            pan_masked: e.pan_masked.clone(),
            digest: e.digest.to_vec(),
            state: state.as_str(),
            response_code: rc,
            issuer: issuer.map(str::to_string),
            link_f7: f7.map(str::to_string),
            business_date: e.business_date,
            original_id: e.original_id,
            rule: e.rule,
            operator: e.operator.clone(),
            reversal_reason: e.reversal_reason.clone(),
            original_ref: e.original_ref.clone(),
            open_batch: e.open_batch,
            claim: e.claim,
            institution_id: e.institution_id.to_string(),
            forwarding_id: e.forwarding_id.to_string(),
        }
    }
}

/// A write of the journal's group commit.
#[derive(Debug, Clone)]
pub enum Write {
    /// A request's row ([`insert`]), boxed: it is ten times the size of an
    /// outcome.
    Request(Box<Row>),
    /// An outcome ([`complete`]).
    Outcome(Completion),
    /// A read of the originals a related request names ([`find`]): it
    /// writes nothing, and rides in the batch so that it costs a few index
    /// probes instead of a statement and a round trip of its own.
    Find(Find),
    /// A journalled advice applied to its original (`applies_ctes`).
    Apply(Apply),
    /// A journalled reversal, decided (`reversals_ctes`).
    Reversal(Reversal),
}

/// An advice the switch answers itself (a refund, a completion advice),
/// journalled `received`, to apply to its original: see `applies_ctes`.
#[derive(Debug, Clone)]
pub struct Apply {
    /// The advice's own row.
    pub row_id: i64,
    /// The original it applies to.
    pub original_id: i64,
    /// Its amount, fen.
    pub amount: i64,
    /// Refund or completion.
    pub kind: AdviceKind,
    /// Its approved reply from the MTI on, stored by the statement that
    /// approves it (for repeats, D1).
    pub reply: Vec<u8>,
}

/// What a [`Write`] did.
#[derive(Debug, Clone)]
pub enum Wrote {
    /// The row written, or `None` when its key was taken or its batch
    /// closed (the caller asks [`not_inserted`] which).
    Request(Option<Written>),
    /// The state written, or `None` when the row was no longer `sent`.
    Outcome(Option<String>),
    /// What a [`Write::Find`] found, newest first.
    Found(Vec<Original>),
    /// Whether a [`Write::Apply`] claimed its original and approved its row.
    Applied(bool),
    /// Whether a [`Write::Reversal`] changed its original and was approved.
    Reversed(bool),
}

/// What two writes of one batch must not share.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WriteKey {
    /// A request's unique key.
    Request(String, String, i32, i32, i16),
    /// The row an outcome completes.
    Outcome(i64),
    /// A read (two equal reads in one batch would be answered alike; the
    /// second simply goes with the next).
    Find(Find),
    /// The original an advice applies to, or a reversal reverses: two
    /// such changes of one original (two partial refunds) are made one
    /// after the other, each to what the other left. A claim (a void) is
    /// keyed as its request, so it may meet one of these on its original:
    /// PostgreSQL then makes one of the two changes, and the other is told
    /// it lost (its claim, `Applied(false)`, `Reversed(false)`), as if it
    /// had come second.
    Original(i64),
    /// A reversal's own row, when it changes no original.
    Row(i64),
}

impl Write {
    /// Two writes with one key cannot share a statement.
    pub fn key(&self) -> WriteKey {
        match self {
            Write::Request(r) => {
                let (m, t, b, s, c) = r.key();
                WriteKey::Request(m, t, b, s, c)
            }
            Write::Outcome(c) => WriteKey::Outcome(c.id),
            Write::Find(f) => WriteKey::Find(f.clone()),
            Write::Apply(a) => WriteKey::Original(a.original_id),
            // A mark never shares a batch with its original's outcome
            // (both change the `sent` row), a reversal never with another
            // change of its original.
            Write::Reversal(r) => match (r.step, r.original) {
                (ReversalStep::Mark, Some(o)) => WriteKey::Outcome(o),
                (ReversalStep::Reverse(_), Some(o)) => WriteKey::Original(o),
                _ => WriteKey::Row(r.row),
            },
        }
    }
}

/// How a related request names its original.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Find {
    /// A terminal's entry by merchant, batch, STAN and MTI class (voids,
    /// reversals).
    ByStan {
        /// F42.
        merchant_id: String,
        /// F41.
        terminal_id: String,
        /// The original's batch.
        batch: i32,
        /// The original's STAN.
        stan: i32,
        /// The original's MTI class.
        mti_class: i16,
    },
    /// The entry with this RRN at this merchant (refunds), found through
    /// the id the RRN is made of ([`rrn_id`]).
    ByRrn {
        /// F37.
        rrn: String,
        /// F42.
        merchant_id: String,
    },
    /// A card's pre-authorisations with this auth code (cancels and
    /// completions).
    Preauths {
        /// F38.
        auth_code: String,
        /// The keyed PAN hash.
        pan_hash: [u8; 32],
    },
}

impl Find {
    /// Which branch of the statement's `found` answers it.
    fn how(&self) -> i16 {
        match self {
            Find::ByStan { .. } => 1,
            Find::ByRrn { .. } => 2,
            Find::Preauths { .. } => 3,
        }
    }

    fn merchant(&self) -> Option<&str> {
        match self {
            Find::ByStan { merchant_id, .. } | Find::ByRrn { merchant_id, .. } => Some(merchant_id),
            Find::Preauths { .. } => None,
        }
    }

    /// Terminal, batch, STAN and MTI class.
    fn by_stan(&self) -> Option<(&str, i32, i32, i16)> {
        match self {
            Find::ByStan {
                terminal_id,
                batch,
                stan,
                mti_class,
                ..
            } => Some((terminal_id, *batch, *stan, *mti_class)),
            _ => None,
        }
    }

    fn rrn(&self) -> Option<&str> {
        match self {
            Find::ByRrn { rrn, .. } => Some(rrn),
            _ => None,
        }
    }

    /// Auth code and card.
    fn preauths(&self) -> Option<(&str, &[u8])> {
        match self {
            Find::Preauths {
                auth_code,
                pan_hash,
            } => Some((auth_code, pan_hash)),
            _ => None,
        }
    }
}

/// The requests' rows: `INSERT ... SELECT FROM unnest($1 .. $26)` as the
/// CTE `new`, and, when `claims`, the claims of those written as the CTE
/// `claimed` (a batch without a claim leaves those CTEs out: every CTE
/// that writes the journal is a node PostgreSQL starts, and opens the
/// journal's indexes for, at every execution, whether it has rows or not).
///
/// - R3: a reversal of this very request came first (it was delayed on the
///   way): its approval is reversed on arrival (`reversal_requested`).
/// - A row that asks for its batch to be open is written only while it is.
/// - A claim (a void's `voided`) is one conditional UPDATE of the original,
///   made only for a row that was written `sent` (only a `sent` row's
///   outcome gives a claim back): of two racing claims exactly
///   one wins, and of two in one batch PostgreSQL updates the original once,
///   for one of them.
fn requests_cte(claims: bool) -> String {
    let sql = format!(
        "req AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::int[], $5::int2[], $6::text[],
                             $7::text[], $8::text[], $9::int8[], $10::bytea[], $11::text[], $12::bytea[],
                             $13::text[], $14::text[], $15::text[], $16::text[], $17::date[], $18::int8[],
                             $19::text[], $20::text[], $21::text[], $22::text[], $23::bool[], $24::text[],
                             $25::text[], $26::text[])
              AS r(terminal_id, merchant_id, batch, stan, mti, processing_code, pos_condition, kind,
                   amount, pan_hash, pan_masked, digest, state, rc, issuer, f7, business_date,
                   original_id, rule, operator, reversal_reason, original_ref, open_batch, claim,
                   institution_id, forwarding_id)),
     new AS (
        INSERT INTO journal (id, rrn, terminal_id, merchant_id, batch, stan, mti, mti_class, processing_code,
            pos_condition, kind, amount, pan_hash, pan_masked, request_digest, state, response_code,
            issuer, link_stan, link_f7, business_date, sent_at, completed_at,
            original_id, rule, operator, reversal_reason, original_ref, reversal_requested,
            institution_id, forwarding_id)
         SELECT r.id, lpad((r.id % 1000000000000)::text, 12, '0'),
            r.terminal_id, r.merchant_id, r.batch, r.stan, r.mti, r.mti / 100, r.processing_code,
            r.pos_condition, r.kind, r.amount, r.pan_hash, r.pan_masked, r.digest, r.state, r.rc,
            r.issuer, CASE WHEN r.state = 'sent' THEN nextval('link_stan')::int END, r.f7, r.business_date,
            CASE WHEN r.state = 'sent' THEN now() END, CASE WHEN r.state <> 'sent' THEN now() END,
            r.original_id, r.rule, r.operator, r.reversal_reason, r.original_ref,
            r3.reversed IS NOT NULL, r.institution_id, r.forwarding_id
         -- The id drawn once per row, and the RRN (F37) made of it (see
         -- `migrations/switch/0006`).
         FROM (SELECT *, nextval('journal_id_seq') AS id FROM req) r
         -- R3 as a probe of `journal_reversals` per row. Written as `EXISTS`,
         -- the plan the writer keeps (made while the journal was small)
         -- hashes every reversal in the journal once per batch instead, which
         -- grows with the journal: 1,260 rows a batch after 20 s at 3,000/s.
         LEFT JOIN LATERAL (SELECT true AS reversed FROM journal x
                WHERE r.mti / 100 <> 4 AND x.terminal_id = r.terminal_id AND x.batch = r.batch
                AND x.stan = r.stan AND x.mti_class = 4 AND x.merchant_id = r.merchant_id
                AND x.state IN ('received', 'approved')
                LIMIT 1) r3 ON true
         WHERE {}
         ON CONFLICT ON CONSTRAINT journal_request_key DO NOTHING
         RETURNING id, rrn, link_stan, merchant_id, terminal_id, batch, stan, mti_class)",
        batch_open("r.open_batch", "r.terminal_id", "r.batch")
    );
    if !claims {
        return sql;
    }
    format!(
        "{sql},
     -- An original another transaction has locked is not waited for: its
     -- claim is lost (the holder is claiming, reversing or refunding it),
     -- and the batch's other rows are not held up behind that lock.
     claimable AS (
        SELECT x.id FROM journal x
        WHERE x.id IN (SELECT original_id FROM req WHERE claim IS NOT NULL AND state = 'sent')
          AND x.state = 'approved'
        FOR NO KEY UPDATE SKIP LOCKED),
     claimed AS (
        UPDATE journal o SET state = c.claim
        FROM (SELECT n.id, r.original_id, r.claim FROM new n JOIN req r
              ON r.terminal_id = n.terminal_id AND r.batch = n.batch AND r.stan = n.stan
                 AND r.mti / 100 = n.mti_class AND r.merchant_id = n.merchant_id
              WHERE r.claim IS NOT NULL AND r.state = 'sent') c
        WHERE o.id = c.original_id AND o.state = 'approved' AND o.id IN (SELECT id FROM claimable)
        RETURNING c.id)"
    )
}

/// The outcomes: `UPDATE ... FROM unnest(...)` of [`complete`] with its
/// parameters from `$first` on, as the CTEs `ended`, `undone` (only when
/// `undo`: some row of the batch holds a claim it may have to give back)
/// and `queued`.
fn outcomes_ctes(first: usize, undo: bool) -> String {
    let undone = if undo {
        format!("{UNDO_CLAIM},")
    } else {
        String::new()
    };
    let sql = format!(
        "ended AS (
        UPDATE journal SET
            state = CASE WHEN u.to_state = 'approved' AND reversal_requested THEN 'reversed' ELSE u.to_state END,
            response_code = u.rc, auth_code = u.auth, reply = u.body, completed_at = now()
        FROM unnest($o1::int8[], $o2::text[], $o3::text[], $o4::text[], $o5::bytea[])
             AS u(row_id, to_state, rc, auth, body)
        -- `sent` as a parameter ($o6): a generic plan, made while the
        -- journal was small, then cannot choose to scan the partial index of
        -- in-flight rows (and hash them against the outcomes), which also
        -- reads every entry a completed row left there until it is marked
        -- dead; it probes the primary key once per outcome instead.
        WHERE journal.id = u.row_id AND journal.state = $o6
        RETURNING {ENDED}),
     {undone}
     queued AS ({QUEUE_REVERSAL})"
    );
    numbered(&sql, "o", OUTCOME_PARAMS, first)
}

/// `sql` with its parameters `$<part>1` to `$<part><count>` numbered from
/// `$first` on: [`write_many`]'s statement is put together from parts, each
/// written with parameters of its own. The highest is replaced first, so
/// that `$f1` does not take the start of `$f10`.
fn numbered(sql: &str, part: &str, count: usize, first: usize) -> String {
    (1..=count).rev().fold(sql.to_string(), |sql, n| {
        sql.replace(&format!("${part}{n}"), &format!("${}", first + n - 1))
    })
}

/// What a batch of [`write_many`] holds, which picks its statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    /// Requests' rows: none, or some, with or without claims.
    requests: Option<Claims>,
    /// Outcomes: none, or some, with or without a row holding a claim.
    outcomes: Option<Claims>,
    /// Whether it reads originals ([`Write::Find`]).
    finds: bool,
    /// Whether it applies advices ([`Write::Apply`]).
    applies: bool,
    /// Whether it decides reversals ([`Write::Reversal`]).
    reversals: bool,
}

/// Whether any write of its kind in a batch claims (or holds a claim on)
/// an original.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claims {
    None,
    Some,
}

/// The parameters of each part of [`write_many`]'s statement.
const REQUEST_PARAMS: usize = 26;
const OUTCOME_PARAMS: usize = 6;
const FIND_PARAMS: usize = 11;
const APPLY_PARAMS: usize = 5;
const REVERSAL_PARAMS: usize = 6;

impl Shape {
    /// Its place in [`WRITE_SQL`].
    fn index(self) -> usize {
        let i = |c: Option<Claims>| match c {
            None => 0,
            Some(Claims::None) => 1,
            Some(Claims::Some) => 2,
        };
        (((i(self.requests) * 3 + i(self.outcomes)) * 2 + usize::from(self.finds)) * 2
            + usize::from(self.applies))
            * 2
            + usize::from(self.reversals)
    }

    /// The statement for this shape; it answers one row per written
    /// request (`'r'` and the request's key), per written outcome (`'o'`
    /// and the state), per original found (`'f'`, the find's ordinal and
    /// the original), per advice applied (`'a'` and its row) and per
    /// reversal approved (`'v'` and its row). The columns only a found
    /// original has are there only when the batch finds.
    fn sql(self) -> String {
        let extra = |found: bool| {
            if !self.finds {
                String::new()
            } else if found {
                ", ord, kind, amount::int8 AS amount, refunded_amount::int8 AS refunded_amount,
                 business_date, pan_hash, auth_code, mti, processing_code, issuer, link_f7,
                 institution_id, forwarding_id, original_id, received_at, family_pending"
                    .to_string()
            } else {
                ", NULL::int8 AS ord, NULL::text AS kind, NULL::int8 AS amount,
                 NULL::int8 AS refunded_amount, NULL::date AS business_date, NULL::bytea AS pan_hash,
                 NULL::text AS auth_code, NULL::int2 AS mti, NULL::text AS processing_code,
                 NULL::text AS issuer, NULL::text AS link_f7, NULL::text AS institution_id,
                 NULL::text AS forwarding_id, NULL::int8 AS original_id,
                 NULL::timestamptz AS received_at, NULL::bool AS family_pending"
                    .to_string()
            }
        };
        let written = |claims| {
            let claimed = match claims {
                Claims::Some => "id IN (SELECT id FROM claimed)",
                Claims::None => "false",
            };
            format!(
                "SELECT 'r' AS what, id, rrn, link_stan, merchant_id, terminal_id, batch, stan,
                    mti_class, NULL::text AS state, {claimed} AS claimed{} FROM new",
                extra(false)
            )
        };
        let ended_rows = format!(
            "SELECT 'o' AS what, id, NULL::text AS rrn, NULL::int AS link_stan,
                NULL::text AS merchant_id, NULL::text AS terminal_id, NULL::int AS batch,
                NULL::int AS stan, NULL::int2 AS mti_class, state, NULL::bool AS claimed{} FROM ended",
            extra(false)
        );
        // The rows an advice or a reversal approved: their ids alone.
        let approved = |what: &str, cte: &str| {
            format!(
                "SELECT '{what}' AS what, id, NULL::text AS rrn, NULL::int AS link_stan,
                    NULL::text AS merchant_id, NULL::text AS terminal_id, NULL::int AS batch,
                    NULL::int AS stan, NULL::int2 AS mti_class, NULL::text AS state,
                    NULL::bool AS claimed{} FROM {cte}",
                extra(false)
            )
        };
        let found_rows = format!(
            "SELECT 'f' AS what, id, rrn, link_stan, NULL::text AS merchant_id,
                NULL::text AS terminal_id, batch, stan, NULL::int2 AS mti_class, state::text,
                NULL::bool AS claimed{} FROM found",
            extra(true)
        );
        let mut ctes = Vec::new();
        let mut selects = Vec::new();
        let mut next = 1;
        if let Some(r) = self.requests {
            ctes.push(requests_cte(r == Claims::Some));
            selects.push(written(r));
            next += REQUEST_PARAMS;
        }
        if let Some(o) = self.outcomes {
            ctes.push(outcomes_ctes(next, o == Claims::Some));
            selects.push(ended_rows);
            next += OUTCOME_PARAMS;
        }
        if self.finds {
            ctes.push(finds_ctes(next));
            selects.push(found_rows);
            next += FIND_PARAMS;
        }
        if self.applies {
            ctes.push(applies_ctes(next));
            selects.push(approved("a", "approved"));
            next += APPLY_PARAMS;
        }
        if self.reversals {
            ctes.push(reversals_ctes(next));
            selects.push(approved("v", "acknowledged"));
        }
        if selects.is_empty() {
            return String::new();
        }
        format!("WITH {} {}", ctes.join(",\n"), selects.join(" UNION ALL "))
    }
}

/// The reads of the batch's [`Write::Find`]s, from parameter `$first` on,
/// as the CTE `found`: each find's ordinal (from 1) with every original it
/// names, by the branch its `how` picks (the others are not run for it).
fn finds_ctes(first: usize) -> String {
    let sql = format!(
        "finds AS (
        SELECT * FROM unnest($f1::int2[], $f2::text[], $f3::text[], $f4::int[], $f5::int[],
                             $f6::int2[], $f7::int8[], $f8::text[], $f9::text[], $f10::bytea[])
            WITH ORDINALITY AS f(how, merchant_id, terminal_id, batch, stan, mti_class, id, rrn,
                                 auth_code, pan_hash, ord)),
     found AS (
        SELECT f.ord, o.* FROM finds f CROSS JOIN LATERAL (
            SELECT {cols} FROM journal
            WHERE f.how = 1 AND merchant_id = f.merchant_id AND terminal_id = f.terminal_id
              AND batch = f.batch AND stan = f.stan AND mti_class = f.mti_class
            UNION ALL
            SELECT {cols} FROM journal
            WHERE f.how = 2 AND id = f.id AND rrn = f.rrn AND merchant_id = f.merchant_id
            UNION ALL
            SELECT {cols} FROM journal
            WHERE f.how = 3 AND kind = 'preauth' AND pan_hash = f.pan_hash
              AND auth_code = f.auth_code) o)",
        cols = original_columns!()
    );
    numbered(&sql, "f", FIND_PARAMS, first)
}

/// The statements of [`write_many`], one per [`Shape`] (by
/// [`Shape::index`]): a batch without claims, the usual one, takes the
/// leaner statement, and one that reads no original, applies no advice or
/// decides no reversal leaves those parts out.
static WRITE_SQL: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(|| Shape::all().map(Shape::sql).collect());

impl Shape {
    /// Every shape, in the order of [`Shape::index`].
    fn all() -> impl Iterator<Item = Shape> {
        let kinds = [None, Some(Claims::None), Some(Claims::Some)];
        kinds
            .into_iter()
            .flat_map(move |requests| kinds.into_iter().map(move |outcomes| (requests, outcomes)))
            .flat_map(|(requests, outcomes)| {
                [false, true].map(move |finds| (requests, outcomes, finds))
            })
            .flat_map(|(requests, outcomes, finds)| {
                [false, true].map(move |applies| (requests, outcomes, finds, applies))
            })
            .flat_map(|(requests, outcomes, finds, applies)| {
                [false, true].map(|reversals| Shape {
                    requests,
                    outcomes,
                    finds,
                    applies,
                    reversals,
                })
            })
    }

    /// Whether a batch can have this shape: it holds at least one write.
    fn writes(self) -> bool {
        self.requests.is_some()
            || self.outcomes.is_some()
            || self.finds
            || self.applies
            || self.reversals
    }
}

/// Plans every statement of [`write_many`] on `conn`, each run once with
/// no rows. PostgreSQL plans a statement on each connection at its first
/// execution, a few milliseconds for the larger shapes; done before
/// traffic, the first batches after a start do not queue behind it.
pub async fn plan_writes(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    let none = Parts::default();
    for shape in Shape::all().filter(|s| s.writes()) {
        statement(shape, &none).fetch_all(&mut *conn).await?;
    }
    Ok(())
}

/// The writes of one batch of [`write_many`], by part of its statement.
#[derive(Debug, Default)]
struct Parts<'w> {
    rows: Vec<&'w Row>,
    outcomes: Vec<&'w Completion>,
    finds: Vec<&'w Find>,
    applies: Vec<&'w Apply>,
    reversals: Vec<&'w Reversal>,
}

fn col<'r, T, U>(items: &'r [&'r T], f: impl Fn(&'r T) -> U) -> Vec<U> {
    items.iter().map(|i| f(i)).collect()
}
#[derive(sqlx::FromRow)]
struct Done {
    what: String,
    id: i64,
    rrn: Option<String>,
    link_stan: Option<i32>,
    merchant_id: Option<String>,
    terminal_id: Option<String>,
    batch: Option<i32>,
    stan: Option<i32>,
    mti_class: Option<i16>,
    state: Option<String>,
    claimed: Option<bool>,
    // Only in a batch that finds originals.
    #[sqlx(default)]
    ord: Option<i64>,
    #[sqlx(default)]
    kind: Option<String>,
    #[sqlx(default)]
    amount: Option<i64>,
    #[sqlx(default)]
    refunded_amount: Option<i64>,
    #[sqlx(default)]
    business_date: Option<NaiveDate>,
    #[sqlx(default)]
    pan_hash: Option<Vec<u8>>,
    #[sqlx(default)]
    auth_code: Option<String>,
    #[sqlx(default)]
    mti: Option<i16>,
    #[sqlx(default)]
    processing_code: Option<String>,
    #[sqlx(default)]
    issuer: Option<String>,
    #[sqlx(default)]
    link_f7: Option<String>,
    #[sqlx(default)]
    institution_id: Option<String>,
    #[sqlx(default)]
    forwarding_id: Option<String>,
    #[sqlx(default)]
    original_id: Option<i64>,
    #[sqlx(default)]
    received_at: Option<chrono::DateTime<chrono::Utc>>,
    #[sqlx(default)]
    family_pending: Option<bool>,
}

/// `shape`'s statement with the columns of `parts` bound (empty arrays for
/// a part the shape has and `parts` lacks).
fn statement<'q>(
    shape: Shape,
    parts: &'q Parts<'q>,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, Done, sqlx::postgres::PgArguments> {
    let mut q = sqlx::query_as::<_, Done>(sqlx::AssertSqlSafe(WRITE_SQL[shape.index()].as_str()));
    if shape.requests.is_some() {
        q = q
            .bind(col(&parts.rows, |r| r.terminal_id.as_str()))
            .bind(col(&parts.rows, |r| r.merchant_id.as_str()))
            .bind(col(&parts.rows, |r| r.batch))
            .bind(col(&parts.rows, |r| r.stan))
            .bind(col(&parts.rows, |r| r.mti))
            .bind(col(&parts.rows, |r| r.processing_code.as_str()))
            .bind(col(&parts.rows, |r| r.pos_condition.as_str()))
            .bind(col(&parts.rows, |r| r.kind))
            .bind(col(&parts.rows, |r| r.amount))
            .bind(col(&parts.rows, |r| r.pan_hash.as_deref()))
            .bind(col(&parts.rows, |r| r.pan_masked.as_deref()))
            .bind(col(&parts.rows, |r| r.digest.as_slice()))
            .bind(col(&parts.rows, |r| r.state))
            .bind(col(&parts.rows, |r| r.response_code.as_deref()))
            .bind(col(&parts.rows, |r| r.issuer.as_deref()))
            .bind(col(&parts.rows, |r| r.link_f7.as_deref()))
            .bind(col(&parts.rows, |r| r.business_date))
            .bind(col(&parts.rows, |r| r.original_id))
            .bind(col(&parts.rows, |r| r.rule))
            .bind(col(&parts.rows, |r| r.operator.as_deref()))
            .bind(col(&parts.rows, |r| r.reversal_reason.as_deref()))
            .bind(col(&parts.rows, |r| r.original_ref.as_deref()))
            .bind(col(&parts.rows, |r| r.open_batch))
            .bind(col(&parts.rows, |r| r.claim))
            .bind(col(&parts.rows, |r| r.institution_id.as_str()))
            .bind(col(&parts.rows, |r| r.forwarding_id.as_str()));
    }
    if shape.outcomes.is_some() {
        q = q
            .bind(col(&parts.outcomes, |c| c.id))
            .bind(col(&parts.outcomes, |c| c.state.as_str()))
            .bind(col(&parts.outcomes, |c| c.rc.as_str()))
            .bind(col(&parts.outcomes, |c| c.auth_code.as_deref()))
            .bind(col(&parts.outcomes, |c| c.reply.as_slice()))
            .bind(State::Sent.as_str());
    }
    if shape.finds {
        q = q
            .bind(col(&parts.finds, Find::how))
            .bind(col(&parts.finds, Find::merchant))
            .bind(col(&parts.finds, |f| f.by_stan().map(|k| k.0)))
            .bind(col(&parts.finds, |f| f.by_stan().map(|k| k.1)))
            .bind(col(&parts.finds, |f| f.by_stan().map(|k| k.2)))
            .bind(col(&parts.finds, |f| f.by_stan().map(|k| k.3)))
            .bind(col(&parts.finds, |f| f.rrn().and_then(rrn_id)))
            .bind(col(&parts.finds, Find::rrn))
            .bind(col(&parts.finds, |f| f.preauths().map(|p| p.0)))
            .bind(col(&parts.finds, |f| f.preauths().map(|p| p.1)))
            .bind("pending");
    }
    if shape.applies {
        q = q
            .bind(col(&parts.applies, |a| a.row_id))
            .bind(col(&parts.applies, |a| a.original_id))
            .bind(col(&parts.applies, |a| a.amount))
            .bind(col(&parts.applies, |a| a.kind.as_str()))
            .bind(col(&parts.applies, |a| a.reply.as_slice()));
    }
    if shape.reversals {
        q = q
            .bind(col(&parts.reversals, |r| r.row))
            .bind(col(&parts.reversals, |r| r.rule))
            .bind(col(&parts.reversals, |r| r.original))
            .bind(col(&parts.reversals, |r| r.reply.as_deref()))
            .bind(col(&parts.reversals, Reversal::step))
            .bind(col(&parts.reversals, Reversal::network_reason));
    }
    q
}

/// Writes requests' rows and outcomes, reads originals, applies advices and
/// decides reversals, together in one statement and one commit (group
/// commit; see `Shape::sql`): for each write, in order, what it did. No
/// two writes may share a [`WriteKey`]. A request and its own outcome never
/// meet in one batch: the outcome comes from the issuer, after the row is
/// durable.
pub async fn write_many(pool: &PgPool, writes: &[Write]) -> Result<Vec<Wrote>, sqlx::Error> {
    let mut parts = Parts::default();
    for w in writes {
        match w {
            Write::Request(r) => parts.rows.push(r),
            Write::Outcome(c) => parts.outcomes.push(c),
            Write::Find(f) => parts.finds.push(f),
            Write::Apply(a) => parts.applies.push(a),
            Write::Reversal(r) => parts.reversals.push(r),
        }
    }
    let claims = |any: bool| if any { Claims::Some } else { Claims::None };
    let shape = Shape {
        requests: (!parts.rows.is_empty()).then(|| claims(parts.rows.iter().any(|r| r.claims()))),
        outcomes: (!parts.outcomes.is_empty())
            .then(|| claims(parts.outcomes.iter().any(|c| c.claimed))),
        finds: !parts.finds.is_empty(),
        applies: !parts.applies.is_empty(),
        reversals: !parts.reversals.is_empty(),
    };
    if writes.is_empty() {
        return Ok(Vec::new());
    }
    let done = statement(shape, &parts).fetch_all(pool).await?;
    let mut written = std::collections::HashMap::new();
    let mut ended = std::collections::HashMap::new();
    let mut found: Vec<Vec<Original>> = vec![Vec::new(); parts.finds.len()];
    let mut approved = std::collections::HashSet::new();
    let mut acknowledged = std::collections::HashSet::new();
    for d in done {
        match d.what.as_str() {
            "v" => {
                acknowledged.insert(d.id);
            }
            "o" => {
                ended.insert(d.id, d.state);
            }
            "a" => {
                approved.insert(d.id);
            }
            "f" => {
                let at = d.ord.and_then(|o| usize::try_from(o - 1).ok());
                let (Some(list), Some(kind), Some(state), Some(amount), Some(business_date)) = (
                    at.and_then(|at| found.get_mut(at)),
                    d.kind,
                    d.state,
                    d.amount,
                    d.business_date,
                ) else {
                    return Err(sqlx::Error::Protocol(
                        "a found original without its ordinal or its columns".into(),
                    ));
                };
                list.push(Original {
                    id: d.id,
                    rrn: d.rrn.unwrap_or_default(),
                    kind,
                    state,
                    amount,
                    refunded_amount: d.refunded_amount.unwrap_or(0),
                    batch: d.batch.unwrap_or_default(),
                    stan: d.stan.unwrap_or_default(),
                    business_date,
                    pan_hash: d.pan_hash,
                    auth_code: d.auth_code,
                    mti: d.mti.unwrap_or_default(),
                    processing_code: d.processing_code.unwrap_or_default(),
                    issuer: d.issuer,
                    link_stan: d.link_stan,
                    link_f7: d.link_f7,
                    institution_id: d.institution_id,
                    forwarding_id: d.forwarding_id,
                    original_id: d.original_id,
                    received_at: d.received_at.unwrap_or_default(),
                    family_pending: d.family_pending.unwrap_or(false),
                });
            }
            _ => {
                let key = WriteKey::Request(
                    d.merchant_id.unwrap_or_default(),
                    d.terminal_id.unwrap_or_default(),
                    d.batch.unwrap_or_default(),
                    d.stan.unwrap_or_default(),
                    d.mti_class.unwrap_or_default(),
                );
                let row = Written {
                    id: d.id,
                    rrn: d.rrn.unwrap_or_default(),
                    link_stan: d.link_stan,
                    claimed: d.claimed.unwrap_or(false),
                };
                written.insert(key, row);
            }
        }
    }
    let mut found = found.into_iter();
    Ok(writes
        .iter()
        .map(|w| match w {
            Write::Request(_) => Wrote::Request(written.remove(&w.key())),
            Write::Outcome(c) => Wrote::Outcome(ended.remove(&c.id).flatten()),
            Write::Find(_) => {
                let mut originals = found.next().unwrap_or_default();
                // Newest first.
                originals.sort_by_key(|o| std::cmp::Reverse(o.id));
                Wrote::Found(originals)
            }
            Write::Apply(a) => Wrote::Applied(approved.contains(&a.row_id)),
            Write::Reversal(r) => Wrote::Reversed(acknowledged.contains(&r.row)),
        })
        .collect())
}

/// A [`write_many`] of one: what the write did.
pub(crate) async fn write_one(pool: &PgPool, write: Write) -> Result<Option<Wrote>, sqlx::Error> {
    Ok(write_many(pool, std::slice::from_ref(&write)).await?.pop())
}

/// The originals `f` names, newest first, as a batch of one.
pub async fn find(pool: &PgPool, f: &Find) -> Result<Vec<Original>, sqlx::Error> {
    match write_one(pool, Write::Find(f.clone())).await? {
        Some(Wrote::Found(originals)) => Ok(originals),
        _ => Ok(Vec::new()),
    }
}

/// The earlier request with the key of `e`, if any.
pub async fn earlier(pool: &PgPool, e: &NewEntry<'_>) -> Result<Option<Earlier>, sqlx::Error> {
    sqlx::query_as::<_, (i64, Vec<u8>, String, Option<String>, String, Option<Vec<u8>>)>(
        "SELECT id, request_digest, state, response_code, rrn, reply FROM journal
         WHERE merchant_id = $1 AND terminal_id = $2 AND batch = $3 AND stan = $4 AND mti_class = $5",
    )
    .bind(e.merchant_id)
    .bind(e.terminal_id)
    .bind(e.batch)
    .bind(e.stan)
    .bind((e.mti / 100) as i16)
    .fetch_optional(pool)
    .await
    .map(|row| {
        row.map(|(id, digest, state, response_code, rrn, reply)| Earlier {
            id,
            digest,
            state,
            response_code,
            rrn,
            reply,
        })
    })
}

/// Gives a claimed original back when the claiming request did not end
/// approved (a declined or unknown void leaves its purchase approved).
const UNDO_CLAIM: &str = "
    undone AS (
        UPDATE journal o SET state = 'approved'
        FROM ended
        WHERE o.id = ended.original_id AND ended.state IN ('declined', 'unknown', 'reversed')
          AND o.state = CASE ended.kind WHEN 'void' THEN 'voided' WHEN 'completion_void' THEN 'voided'
                                         WHEN 'preauth_cancel' THEN 'cancelled' WHEN 'completion' THEN 'completed' END
          -- Only the row that holds the claim gives it back (a losing void
          -- left `sent` by a crash does not reopen the winner's sale).
          AND NOT EXISTS (SELECT 1 FROM journal x WHERE x.original_id = o.id AND x.id <> ended.id
                          AND x.kind = ended.kind AND x.state IN ('sent', 'approved'))
        RETURNING o.id)";

/// The reversal advice queued for rows that end `unknown` (F39 `68`, no
/// timely answer), or approved after a reversal asked for them (R3: `06`).
const QUEUE_REVERSAL: &str = "
    INSERT INTO advices (journal_id, kind, mti, issuer, processing_code, pos_condition, amount,
        reason, original_mti, original_stan, original_f7, original_institution_id,
        original_forwarding_id)
    SELECT id, 'reversal', 420, issuer, processing_code, pos_condition, amount,
        coalesce(reason, '68'), mti, link_stan, link_f7, institution_id, forwarding_id
    FROM ended WHERE state IN ('unknown', 'reversed') AND issuer IS NOT NULL
    ON CONFLICT (journal_id, kind) DO NOTHING";

/// The columns `ended` returns for [`UNDO_CLAIM`] and [`QUEUE_REVERSAL`].
const ENDED: &str =
    "id, original_id, kind, state, issuer, processing_code, pos_condition, amount, mti,
    link_stan, link_f7, institution_id, forwarding_id, CASE WHEN reversal_requested AND state <> 'unknown' THEN '06' END AS reason";

/// Records the outcome of a `sent` row and its reply; gives a claimed
/// original back when the row did not end approved; and when a reversal
/// came while the row was at the issuer (R3), an approval ends `reversed`
/// with its reversal advice queued. Returns the state written, or `None`
/// when the row is no longer `sent` (the sweeper gave up on it: the approval
/// will be reversed).
pub async fn complete(pool: &PgPool, outcome: Completion) -> Result<Option<String>, sqlx::Error> {
    match write_one(pool, Write::Outcome(outcome)).await? {
        Some(Wrote::Outcome(state)) => Ok(state),
        _ => Ok(None),
    }
}

/// An outcome for [`write_many`]: what [`complete`] takes, owned.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The `sent` row.
    pub id: i64,
    /// Approved or declined.
    pub state: State,
    /// F39.
    pub rc: ResponseCode,
    /// F38.
    pub auth_code: Option<String>,
    /// The terminal's reply from the MTI on.
    pub reply: Vec<u8>,
    /// The row holds a claim on its original ([`Written::claimed`]), to be
    /// given back if it does not end approved.
    pub claimed: bool,
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

/// T1: the issuer did not answer in time. Marks the row `unknown` with its
/// `98` reply and queues a reversal advice, in one statement. False when the
/// row was no longer `sent`.
pub async fn give_up(pool: &PgPool, id: i64, reply: &[u8]) -> Result<bool, sqlx::Error> {
    let sql = format!(
        "WITH ended AS (
            UPDATE journal SET state = 'unknown', response_code = '98', reply = $2, completed_at = now()
            WHERE id = $1 AND state = 'sent'
            RETURNING {ENDED}),
         {UNDO_CLAIM},
         queued AS ({QUEUE_REVERSAL})
         SELECT id FROM ended"
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
///
/// The sweep runs every second. It reads the partial index of rows in
/// flight, which keeps an entry for every row that was ever `sent` until
/// vacuum removes it. A plain index scan marks the entries of completed
/// rows dead in the index as it passes them, so the next sweep skips them;
/// the bitmap scan the planner prefers does not, and visited every
/// completed row since the last vacuum, every second: 34 ms for the
/// 280,000 rows of 50 s at 6,000/s (0.3 ms as a plain index scan).
pub async fn recover_forgotten(pool: &PgPool, older_than: Duration) -> Result<u64, sqlx::Error> {
    let sql = format!(
        "WITH ended AS (
            UPDATE journal SET state = 'unknown', response_code = '98', completed_at = now()
            WHERE state = 'sent' AND sent_at < now() - make_interval(secs => $1)
            RETURNING {ENDED}),
         {UNDO_CLAIM},
         queued AS ({QUEUE_REVERSAL})
         SELECT id FROM ended"
    );
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL enable_bitmapscan = off")
        .execute(&mut *tx)
        .await?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(older_than.as_secs_f64())
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(rows.len() as u64)
}

/// A reversal left `received` without a reply: the journal failed under
/// it, or its switch died deciding it, and its terminal did not send it
/// again. What its row holds is all [`crate::Switch::decide_reversal`]
/// needs (R1 finds the original by it).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Undecided {
    /// Its row.
    pub id: i64,
    /// Its RRN.
    pub rrn: String,
    /// F42.
    pub merchant_id: String,
    /// F41.
    pub terminal_id: String,
    /// The batch it names.
    pub batch: i32,
    /// F11, the original's own STAN.
    pub stan: i32,
    /// F3, the original's.
    pub processing_code: String,
    /// Fen, the original's.
    pub amount: i64,
    /// The business day it arrived on.
    pub business_date: NaiveDate,
    /// F39 of the 0400.
    pub reversal_reason: Option<String>,
    /// How it named its original (F60.1 gives the original's MTI class);
    /// none for a row written before reversals kept it.
    pub original_ref: Option<String>,
}

/// Reversals left `received` without a reply for longer than `older_than`
/// (a live switch decides its own well within that), oldest first, at
/// most `limit`: read through the partial index of undecided reversals
/// (`migrations/switch/0013`), with a plain index scan, as
/// [`recover_forgotten`] reads its own: every reversal passes through the
/// index, and only a plain scan marks the entries of decided ones dead.
pub async fn undecided_reversals(
    pool: &PgPool,
    older_than: Duration,
    limit: i64,
) -> Result<Vec<Undecided>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL enable_bitmapscan = off")
        .execute(&mut *tx)
        .await?;
    let rows = sqlx::query_as(
        "SELECT id, rrn, merchant_id, terminal_id, batch, stan, processing_code, amount,
                business_date, reversal_reason, original_ref
         FROM journal
         WHERE state = 'received' AND kind = 'reversal' AND reply IS NULL
           AND received_at < now() - make_interval(secs => $1)
         ORDER BY received_at LIMIT $2",
    )
    .bind(older_than.as_secs_f64())
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows)
}

/// Takes over a `received` row without a reply that is older than
/// `older_than` (its switch died before deciding it, or the journal failed
/// under it): `Some` for the one caller that wins, which decides it anew
/// (a repeat, or the recovery sweep), with whether the batch it names is
/// still its terminal's open batch (S1: a settled batch takes no
/// reversal). Its arrival time restarts, so a second taker waits instead
/// of taking it too, and a settlement of the batch waits for its decision;
/// the terminal is read `FOR SHARE`, as a request's insert reads it, so
/// that a settlement closing the batch at this moment is waited for, and
/// seen.
pub async fn adopt(
    pool: &PgPool,
    id: i64,
    older_than: Duration,
) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE journal SET received_at = now()
         WHERE id = $1 AND state = 'received' AND reply IS NULL
           AND received_at < now() - make_interval(secs => $2)
         RETURNING EXISTS (SELECT 1 FROM terminals t
                           WHERE t.id = journal.terminal_id AND t.batch = journal.batch
                           FOR SHARE)",
    )
    .bind(id)
    .bind(older_than.as_secs_f64())
    .fetch_optional(pool)
    .await
}

/// A row as a duplicate waiting for it sees it ([`outcome`]).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Outcome {
    /// Its state.
    pub state: String,
    /// Its F39.
    pub response_code: Option<String>,
    /// Its stored reply.
    pub reply: Option<Vec<u8>>,
    /// Decided without a reply that will ever be stored: decided seconds
    /// ago (a reply stored apart is stored a moment after the decision),
    /// by the recovery sweep, which has no request to reply to (a reversal
    /// nobody repeated, a row left `sent`).
    pub replyless: bool,
}

/// The state and stored reply of a row (a duplicate waiting for its original).
pub async fn outcome(pool: &PgPool, id: i64) -> Result<Outcome, sqlx::Error> {
    sqlx::query_as(
        "SELECT state, response_code, reply,
                reply IS NULL AND state NOT IN ('received', 'sent')
                AND completed_at IS NOT NULL AND completed_at < now() - interval '2 seconds'
                AS replyless
         FROM journal WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
}

/// An earlier entry a related request refers to.
#[derive(Debug, Clone)]
pub struct Original {
    /// Row id.
    pub id: i64,
    /// Its RRN.
    pub rrn: String,
    /// What it was.
    pub kind: String,
    /// Its state now.
    pub state: String,
    /// Its amount, fen.
    pub amount: i64,
    /// Refunded so far.
    pub refunded_amount: i64,
    /// Its batch.
    pub batch: i32,
    /// Its STAN.
    pub stan: i32,
    /// Its business day.
    pub business_date: NaiveDate,
    /// Keyed PAN hash.
    pub pan_hash: Option<Vec<u8>>,
    /// Its auth code.
    pub auth_code: Option<String>,
    /// Its terminal MTI (also the network MTI).
    pub mti: i16,
    /// Its F3.
    pub processing_code: String,
    /// The issuer it went to.
    pub issuer: Option<String>,
    /// F11 on the issuer link.
    pub link_stan: Option<i32>,
    /// F7 on the issuer link.
    pub link_f7: Option<String>,
    /// F32 it was sent with (none for a row written before they were kept).
    pub institution_id: Option<String>,
    /// F33 it was sent with.
    pub forwarding_id: Option<String>,
    /// What it refers to in turn (the purchase of a void).
    pub original_id: Option<i64>,
    /// When it arrived.
    pub received_at: chrono::DateTime<chrono::Utc>,
    /// A reversal advice of its family (of it, or of a void of it) was
    /// still pending when it was read: a request about it must not
    /// overtake that reversal ([`crate::advice::flush_family`]). Read with
    /// the entry, so that the usual case, nothing pending, costs no
    /// statement of its own.
    pub family_pending: bool,
}

/// The journal id an RRN stands for: the RRN is the id's last twelve
/// digits (see the `rrn` column), so a lookup by RRN goes through the
/// primary key instead of an index of its own that every insert would pay
/// for. `None` for what is not an RRN at all.
pub fn rrn_id(rrn: &str) -> Option<i64> {
    (rrn.len() == 12 && rrn.bytes().all(|b| b.is_ascii_digit()))
        .then(|| rrn.parse().ok())
        .flatten()
}

/// What a reversal (R1-R5) does to its original, decided from what it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReversalStep {
    /// Nothing (more) to reverse (R3: no original, or one declined,
    /// reversed or unknown): the reversal is approved, and is the mark an
    /// original arriving later is checked against.
    Approve,
    /// R3: the original is still at the issuer: marked, so that its
    /// approval is reversed the moment it arrives.
    Mark,
    /// R2: the approved original is reversed with this F39 for the issuer:
    /// what it had claimed is given back (the purchase of a reversed void
    /// is approved again) and its 0420 is queued.
    Reverse(&'static str),
}

/// A journalled (`received`) reversal, decided: its row, the rule that
/// decided, the original it matched, its approved reply (stored by the
/// statement that approves it, for repeats, D1), and what it does.
#[derive(Debug, Clone)]
pub struct Reversal {
    /// The reversal's own row.
    pub row: i64,
    /// R2 or R3.
    pub rule: &'static str,
    /// The original, when found (required by [`ReversalStep::Mark`] and
    /// [`ReversalStep::Reverse`]).
    pub original: Option<i64>,
    /// The reply from its MTI on; none when the recovery sweep decides a
    /// reversal no terminal is waiting for (a repeat is answered from its
    /// state).
    pub reply: Option<Vec<u8>>,
    /// What it does to its original.
    pub step: ReversalStep,
}

impl Reversal {
    fn step(&self) -> &'static str {
        match self.step {
            ReversalStep::Approve => "approve",
            ReversalStep::Mark => "mark",
            ReversalStep::Reverse(_) => "reverse",
        }
    }

    fn network_reason(&self) -> Option<&'static str> {
        match self.step {
            ReversalStep::Reverse(reason) => Some(reason),
            _ => None,
        }
    }
}

/// The reversals of a batch ([`Write::Reversal`]), from parameter `$first`
/// on, as the CTEs `reversals` to `acknowledged`: each changes its original
/// as its step says, and its own row is approved only when that change was
/// made (the original is no longer as it was read otherwise: the caller
/// reads it again). `acknowledged` holds the reversals approved.
fn reversals_ctes(first: usize) -> String {
    let sql = "reversals AS (
        SELECT * FROM unnest($v1::int8[], $v2::text[], $v3::int8[], $v4::bytea[], $v5::text[],
                             $v6::text[])
            AS v(row_id, rule, original_id, reply, step, reason)),
     -- The reversals' own rows, still undecided, locked first: of two
     -- deciders of one row (a repeat or the recovery sweep that took over
     -- a row whose switch was only slow), the second finds it decided and
     -- changes nothing, whatever it decided (the sweep may refuse by S1
     -- what the first reverses).
     reversal_rows AS (
        SELECT j.id FROM journal j
        WHERE j.id IN (SELECT row_id FROM reversals) AND j.state = 'received'
        ORDER BY j.id FOR UPDATE),
     -- The originals they change, locked in id order: the batches of two
     -- switch processes meet on them in one order.
     reversal_originals AS (
        SELECT o.id FROM journal o
        WHERE o.id IN (SELECT original_id FROM reversals
                       WHERE step <> 'approve' AND row_id IN (SELECT id FROM reversal_rows))
        ORDER BY o.id FOR UPDATE),
     marked AS (
        UPDATE journal o SET reversal_requested = true
        FROM reversals v
        WHERE v.step = 'mark' AND o.id = v.original_id AND o.state = 'sent'
          AND v.row_id IN (SELECT id FROM reversal_rows)
          AND o.id IN (SELECT id FROM reversal_originals)
        RETURNING v.row_id),
     reversed AS (
        UPDATE journal o SET state = 'reversed'
        FROM reversals v
        WHERE v.step = 'reverse' AND o.id = v.original_id AND o.state = 'approved'
          AND v.row_id IN (SELECT id FROM reversal_rows)
          AND o.id IN (SELECT id FROM reversal_originals)
        RETURNING v.row_id, v.reason, o.id, o.original_id, o.kind, o.issuer, o.processing_code,
            o.pos_condition, o.amount, o.mti, o.link_stan, o.link_f7, o.institution_id,
            o.forwarding_id),
     restored AS (
        UPDATE journal p SET state = 'approved'
        FROM reversed r
        WHERE p.id = r.original_id
          AND p.state = CASE r.kind WHEN 'void' THEN 'voided' WHEN 'completion_void' THEN 'voided'
                                    WHEN 'preauth_cancel' THEN 'cancelled' WHEN 'completion' THEN 'completed' END),
     unwound AS (
        INSERT INTO advices (journal_id, kind, mti, issuer, processing_code, pos_condition, amount,
            reason, original_mti, original_stan, original_f7, original_institution_id,
            original_forwarding_id)
        SELECT id, 'reversal', 420, issuer, processing_code, pos_condition, amount, reason, mti,
            link_stan, link_f7, institution_id, forwarding_id
        FROM reversed WHERE issuer IS NOT NULL
        ON CONFLICT (journal_id, kind) DO NOTHING),
     acknowledged AS (
        UPDATE journal j SET state = 'approved', response_code = '00', rule = v.rule,
            original_id = v.original_id, reply = v.reply, completed_at = now()
        FROM reversals v
        WHERE j.id = v.row_id AND j.state = 'received' AND j.id IN (SELECT id FROM reversal_rows)
          AND (v.step = 'approve' OR v.row_id IN (SELECT row_id FROM marked)
               OR v.row_id IN (SELECT row_id FROM reversed))
        RETURNING j.id)";
    numbered(sql, "v", REVERSAL_PARAMS, first)
}

/// An advice the switch answers itself once journalled (F6 refunds, and
/// completion advices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdviceKind {
    /// F3: the original's refunded amount grows, never above its amount.
    Refund,
    /// P3: the pre-authorisation completes, once.
    Completion,
}

impl AdviceKind {
    /// The advice's kind in the queue.
    fn as_str(self) -> &'static str {
        match self {
            AdviceKind::Refund => "refund",
            AdviceKind::Completion => "completion",
        }
    }
}

/// The advices of a batch ([`Write::Apply`]), from parameter `$first` on,
/// as the CTEs `applies` to `advised`: each applied to its original in the
/// statement that approves it. The original is claimed (a refund adds to
/// its refunded amount, so concurrent partial refunds can never sum above
/// it; a completion completes the pre-authorisation once), the advice's
/// row becomes approved with its reply stored, and the 0220 is queued for
/// the issuer. `approved` holds the rows of the advices applied.
fn applies_ctes(first: usize) -> String {
    let sql = "applies AS (
        SELECT * FROM unnest($p1::int8[], $p2::int8[], $p3::int8[], $p4::text[], $p5::bytea[])
            AS a(row_id, original_id, amount, advice, reply)),
     -- The advices' own rows, still undecided, locked first: of two
     -- switches deciding one row (a repeat took over a row whose switch
     -- was only slow), the second finds it decided and claims nothing.
     mine AS (
        SELECT j.id FROM journal j
        WHERE j.id IN (SELECT row_id FROM applies) AND j.state = 'received'
        ORDER BY j.id FOR UPDATE),
     -- Their originals, locked in id order, as the reversals' are: the
     -- batches of two switch processes meet on them in one order.
     apply_originals AS (
        SELECT o.id FROM journal o
        WHERE o.id IN (SELECT original_id FROM applies WHERE row_id IN (SELECT id FROM mine))
        ORDER BY o.id FOR UPDATE),
     applied AS (
        UPDATE journal o SET
            refunded_amount = o.refunded_amount + CASE a.advice WHEN 'refund' THEN a.amount ELSE 0 END,
            state = CASE WHEN a.advice = 'completion' THEN 'completed'
                         WHEN o.refunded_amount + a.amount = o.amount THEN 'refunded'
                         ELSE 'partially_refunded' END
        FROM applies a
        WHERE o.id = a.original_id AND a.row_id IN (SELECT id FROM mine)
          AND o.id IN (SELECT id FROM apply_originals)
          AND CASE a.advice
                WHEN 'refund' THEN o.state IN ('approved', 'partially_refunded')
                                   AND o.refunded_amount + a.amount <= o.amount
                ELSE o.state = 'approved' AND a.amount > 0 END
        RETURNING a.row_id, o.id, o.issuer, o.mti, o.link_stan, o.link_f7, o.institution_id,
            o.forwarding_id),
     -- The original as the issuer knows it: an online request by its own
     -- link STAN and F7, an advice (a completion advice) by its advice's.
     origin AS (
        SELECT c.row_id, c.issuer,
            CASE WHEN c.link_stan IS NULL THEN d.mti ELSE c.mti END AS mti,
            coalesce(c.link_stan, d.link_stan) AS link_stan, coalesce(c.link_f7, d.link_f7) AS link_f7,
            c.institution_id, c.forwarding_id
        FROM applied c LEFT JOIN advices d ON d.journal_id = c.id AND d.kind IN ('completion', 'refund')),
     approved AS (
        UPDATE journal r SET state = 'approved', response_code = '00', issuer = origin.issuer,
            reply = a.reply, completed_at = now()
        FROM origin JOIN applies a ON a.row_id = origin.row_id
        WHERE r.id = origin.row_id AND r.state = 'received'
        RETURNING r.id, r.issuer, r.processing_code, r.pos_condition, r.amount, a.advice,
            origin.mti AS original_mti, origin.link_stan AS original_stan, origin.link_f7 AS original_f7,
            origin.institution_id AS original_institution_id,
            origin.forwarding_id AS original_forwarding_id),
     advised AS (
        INSERT INTO advices (journal_id, kind, mti, issuer, processing_code, pos_condition, amount,
            original_mti, original_stan, original_f7, original_institution_id,
            original_forwarding_id)
        SELECT id, advice, 220, issuer, processing_code, pos_condition, amount,
            original_mti, original_stan, original_f7, original_institution_id,
            original_forwarding_id
        FROM approved WHERE issuer IS NOT NULL)";
    numbered(sql, "p", APPLY_PARAMS, first)
}

/// The state of an entry as it is now: a read of its own, after a claim
/// was lost, so that it sees what the winner committed.
pub async fn state_of(pool: &PgPool, id: i64) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT state FROM journal WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// An advice the issuer answered, for [`answer_advices`].
#[derive(Debug, Clone)]
pub struct Answered {
    /// The advice.
    pub id: i64,
    /// The issuer's F39.
    pub rc: String,
}

/// Marks answered advices done and moves their journal entries to their
/// final state, in one statement (group commit): an `unknown` entry whose
/// reversal the issuer answered is `reversed`. A refund or completion advice
/// the issuer declines is `failed`: the terminal was told `00`, so an
/// operator must look (reconcile names it). An advice no longer pending (a
/// second worker answered it too) is left alone.
pub async fn answer_advices(pool: &PgPool, answered: &[Answered]) -> Result<Vec<()>, sqlx::Error> {
    sqlx::query(
        "WITH a AS (
            UPDATE advices SET state = CASE WHEN u.rc <> '00' AND kind <> 'reversal' THEN 'failed' ELSE 'done' END,
                response_code = u.rc, done_at = now()
            FROM unnest($1::int8[], $2::text[]) AS u(advice_id, rc)
            -- `pending` as a parameter ($3), as in `original_columns!`: not
            -- a pass over the queue's partial index for every batch.
            WHERE id = u.advice_id AND state = $3 RETURNING journal_id, kind)
         UPDATE journal j SET state = 'reversed'
         FROM a WHERE j.id = a.journal_id AND a.kind = 'reversal' AND j.state = 'unknown'",
    )
    .bind(answered.iter().map(|a| a.id).collect::<Vec<_>>())
    .bind(answered.iter().map(|a| a.rc.as_str()).collect::<Vec<_>>())
    .bind("pending")
    .execute(pool)
    .await?;
    Ok(vec![(); answered.len()])
}

/// V6: whether `original` is its terminal's last approved transaction of the batch.
pub async fn is_last_approved(pool: &PgPool, original: &Original) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT NOT EXISTS (
            SELECT 1 FROM journal j JOIN journal o ON o.id = $1
            WHERE j.terminal_id = o.terminal_id AND j.batch = o.batch AND j.id > o.id AND j.state = 'approved'
              AND j.kind IN ('purchase', 'completion', 'completion_advice', 'preauth', 'preauth_cancel',
                             'void', 'completion_void', 'refund'))",
    )
    .bind(original.id)
    .fetch_one(pool)
    .await
}

/// S1: the batch's totals as F48 of a settlement counts them: domestic
/// debit amount n12, count n3, credit amount n12, count n3, code `0`, then
/// the same for foreign cards. Debits are purchases and completions the
/// issuer approved (voided or refunded later or not); credits are approved
/// voids, completion voids and refunds; reversed entries count in neither.
/// One expression, with the terminal and batch as `terminal` and `batch`
/// (parameters of the statement it goes into), for [`batch_totals`] and
/// for [`settle`], which closes a batch only on the totals it replied with.
fn totals_f48(terminal: &str, batch: &str) -> String {
    format!(
        "(SELECT lpad(dd::text, 12, '0') || lpad((dn % 1000)::text, 3, '0')
                 || lpad(cd::text, 12, '0') || lpad((cn % 1000)::text, 3, '0') || '0'
                 || lpad(df::text, 12, '0') || lpad((dfn % 1000)::text, 3, '0')
                 || lpad(cf::text, 12, '0') || lpad((cfn % 1000)::text, 3, '0') || '0'
          FROM (SELECT coalesce(sum(amount) FILTER (WHERE debit AND domestic), 0)::bigint AS dd,
                       count(*) FILTER (WHERE debit AND domestic) AS dn,
                       coalesce(sum(amount) FILTER (WHERE credit AND domestic), 0)::bigint AS cd,
                       count(*) FILTER (WHERE credit AND domestic) AS cn,
                       coalesce(sum(amount) FILTER (WHERE debit AND NOT domestic), 0)::bigint AS df,
                       count(*) FILTER (WHERE debit AND NOT domestic) AS dfn,
                       coalesce(sum(amount) FILTER (WHERE credit AND NOT domestic), 0)::bigint AS cf,
                       count(*) FILTER (WHERE credit AND NOT domestic) AS cfn
                FROM (SELECT amount,
                        kind IN ('purchase', 'completion', 'completion_advice')
                            AND state IN ('approved', 'voided', 'partially_refunded', 'refunded') AS debit,
                        kind IN ('void', 'completion_void', 'refund') AND state = 'approved' AS credit,
                        coalesce(pan_masked LIKE '62%', true) AS domestic
                      FROM journal WHERE terminal_id = {terminal} AND batch = {batch}) counted) sums)"
    )
}

/// The batch's totals as F48 of a settlement counts them ([`totals_f48`]).
pub async fn batch_totals(
    pool: &PgPool,
    terminal_id: &str,
    batch: i32,
) -> Result<String, sqlx::Error> {
    let sql = format!("SELECT {}", totals_f48("$1", "$2"));
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(terminal_id)
        .bind(batch)
        .fetch_one(pool)
        .await
}

/// A settlement to record ([`settle`]).
#[derive(Debug, Clone)]
pub struct Settlement<'a> {
    /// Its journal row, written `received` before the batch closes.
    pub row_id: i64,
    /// F41.
    pub terminal_id: &'a str,
    /// F42.
    pub merchant_id: &'a str,
    /// The batch it closes.
    pub batch: i32,
    /// F48 as the terminal sent it.
    pub terminal_totals: &'a str,
    /// The journal's figures, each part with the reconciliation code the
    /// reply gave it (1 matched, 2 not).
    pub switch_totals: &'a str,
    /// The journal's figures as [`batch_totals`] read them (code `0`): the
    /// batch closes only while they are still the journal's.
    pub totals_read: &'a str,
    /// Whether they agree.
    pub balanced: bool,
    /// F63.1.
    pub operator: Option<String>,
    /// The approved reply, from the MTI on.
    pub reply: &'a [u8],
}

/// What [`settle`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The batch closed, the settlement recorded and its row approved.
    Closed,
    /// Not closed: a request of the batch is still at the issuer or being
    /// decided, and would be left out of the totals (not forced).
    InFlight,
    /// Not closed: one was decided since the totals were read, which the
    /// reply would leave out (not forced): read them again.
    Stale,
    /// Not closed: another switch process closed the batch since it was read.
    Elsewhere,
}

/// S1: closes the batch (the next one opens), records the settlement, and
/// approves its journal row with its reply, in one statement; unless a
/// request of the batch received within `in_flight` is still `sent` or
/// `received` (its outcome would be missing from the totals the reply
/// carries), or the batch's totals are no longer `totals_read` (one was
/// decided since), each as `force` does not say otherwise.
pub async fn settle(
    pool: &PgPool,
    s: &Settlement<'_>,
    force: Force,
    in_flight: Duration,
) -> Result<Settled, sqlx::Error> {
    // The batch is closed by this transaction alone: its terminal row,
    // locked first, waits for every request still being journalled into
    // the batch (they hold it `FOR SHARE`, see `BATCH_OPEN`), and keeps
    // out those that come after until the batch is closed or left open.
    // Taken in a statement of its own, so that the next one reads the
    // journal in a snapshot that has the rows of those it waited for.
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT 1 FROM terminals WHERE id = $1 AND batch = $2 FOR UPDATE")
        .bind(s.terminal_id)
        .bind(s.batch)
        .fetch_optional(&mut *tx)
        .await?;
    // The totals again, in the statement's own snapshot: an outcome that
    // landed since they were read (a sale of another connection, answered
    // just now) makes them stale, as much as one still at the issuer does.
    let sql = format!(
        "WITH busy AS (
            SELECT EXISTS (SELECT 1 FROM journal
                WHERE merchant_id = $2 AND terminal_id = $1 AND batch = $3 AND id <> $8
                  AND state IN ('sent', 'received')
                  AND received_at > now() - make_interval(secs => $11)) AS in_flight,
               {} IS DISTINCT FROM $12 AS stale),
         closed AS (
            UPDATE terminals SET batch = batch % 999999 + 1
            WHERE id = $1 AND batch = $3
              AND ($10 OR NOT (SELECT in_flight FROM busy))
              AND ($13 OR NOT (SELECT stale FROM busy)) RETURNING id),
         recorded AS (
            INSERT INTO settlements (terminal_id, batch, merchant_id, terminal_totals, switch_totals,
                balanced, operator)
            SELECT $1, $3, $2, $4, $5, $6, $7 FROM closed
            ON CONFLICT (terminal_id, batch) DO NOTHING),
         answered AS (
            UPDATE journal SET state = 'approved', response_code = '00', reply = $9, completed_at = now()
            FROM closed WHERE journal.id = $8 AND journal.state = 'received'
            RETURNING journal.id)
         SELECT EXISTS (SELECT 1 FROM answered), (SELECT in_flight FROM busy),
                (SELECT stale FROM busy)",
        totals_f48("$1", "$3")
    );
    let (answered, in_flight_left, stale): (bool, bool, bool) =
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(s.terminal_id)
            .bind(s.merchant_id)
            .bind(s.batch)
            .bind(s.terminal_totals)
            .bind(s.switch_totals)
            .bind(s.balanced)
            .bind(s.operator.as_deref())
            .bind(s.row_id)
            .bind(s.reply)
            .bind(force.in_flight)
            .bind(in_flight.as_secs_f64())
            .bind(s.totals_read)
            .bind(force.stale)
            .fetch_one(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok(if answered {
        Settled::Closed
    } else if stale && !force.stale {
        Settled::Stale
    } else if in_flight_left && !force.in_flight {
        Settled::InFlight
    } else {
        Settled::Elsewhere
    })
}

/// What [`settle`] closes a batch despite.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Force {
    /// A request of the batch still at the issuer or being decided: after
    /// the settlement waited what an answer may take.
    pub in_flight: bool,
    /// Totals that changed since they were read: only after the settlement
    /// read them again many times over, under a churn that never stops.
    pub stale: bool,
}

/// One batch upload record (the PAN masked; the clear one is never kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// 00 domestic, 01 foreign.
    pub card_type: String,
    /// The transaction's STAN.
    pub stan: i32,
    /// The card, masked.
    pub pan_masked: Option<String>,
    /// Fen.
    pub amount: i64,
}

/// Stores batch upload records (a repeated record is kept once).
pub async fn store_uploads(
    pool: &PgPool,
    terminal_id: &str,
    batch: i32,
    records: &[Upload],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO batch_uploads (terminal_id, batch, stan, card_type, pan_masked, amount)
         SELECT $1, $2, * FROM unnest($3::int[], $4::text[], $5::text[], $6::bigint[])
         ON CONFLICT (terminal_id, batch, stan) DO NOTHING",
    )
    .bind(terminal_id)
    .bind(batch)
    .bind(records.iter().map(|r| r.stan).collect::<Vec<_>>())
    .bind(
        records
            .iter()
            .map(|r| r.card_type.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        records
            .iter()
            .map(|r| r.pan_masked.clone())
            .collect::<Vec<_>>(),
    )
    .bind(records.iter().map(|r| r.amount).collect::<Vec<_>>())
    .execute(pool)
    .await?;
    Ok(())
}

/// Ends a row the switch decided itself (`received` or `sent` that never
/// left), with its rule, code and reply. False when the row was decided
/// already (a repeat took it over).
pub async fn decide(
    pool: &PgPool,
    id: i64,
    rule: &str,
    rc: ResponseCode,
    reply: Option<&[u8]>,
) -> Result<bool, sqlx::Error> {
    sqlx::query(
        "UPDATE journal SET state = 'declined', rule = $2, response_code = $3, reply = $4, completed_at = now()
         WHERE id = $1 AND state IN ('received', 'sent')",
    )
    .bind(id)
    .bind(rule)
    .bind(rc.as_str())
    .bind(reply)
    .execute(pool)
    .await
    .map(|done| done.rows_affected() == 1)
}
