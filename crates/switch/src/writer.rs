//! The journal writer: group commit for the two writes of every forwarded
//! request, its `sent` row and its outcome, and for what related requests
//! read and write beside them (their originals, refunds and completion
//! advices applied, reversals decided).
//!
//! Requests' rows and outcomes arriving together share one statement, an
//! `INSERT ... SELECT FROM unnest(...)` beside an `UPDATE ... FROM
//! unnest(...)`: one round trip and one WAL flush for dozens of
//! transactions, with nothing answered before its own row is durable. Each
//! statement costs PostgreSQL far more than its rows do (starting the
//! executor, the commit's WAL flush, the wake-ups), so rows and outcomes
//! share one rather than take one each. The ordering guarantees of
//! [`crate::journal`] hold row by row, because each row's statement is the
//! same set-based SQL.
//!
//! A request that claims an original (a void, a cancel) carries its claim
//! into the batch: a conditional UPDATE of the original, in the statement
//! that writes the row. The read of an original, an advice applied to one
//! and a reversal decided ride in the batch too, each as a part of the
//! statement that only a batch holding one carries. A batch that fails for
//! one row's sake is retried row by row, so one bad write fails alone.
//!
//! Terminals are read once and kept for a short while ([`Writer::terminal`]):
//! a statement per request only to learn what rarely changes was a quarter
//! of the statements PostgreSQL ran under load.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use group_commit::postgres::{ON_ERROR, Said, batch_pool};
use group_commit::{Batcher, Limits, write_all};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tracing::warn;

use crate::journal::{
    self, Answered, Apply, Completion, Disposition, Find, Insert, NewEntry, Original, Reversal,
    Row, Write, Wrote,
};
use crate::terminals::{self, Terminal};

type Reply<T> = group_commit::Reply<T, sqlx::Error>;

/// A write (or a read) of the journal, waiting for its batch.
#[derive(Debug)]
struct Job {
    write: Write,
    done: Reply<Wrote>,
}

/// An advice's answer, waiting for its batch.
#[derive(Debug)]
struct Answer {
    answered: Answered,
    done: Reply<()>,
}

/// A terminal lookup, waiting for its batch.
#[derive(Debug)]
struct Lookup {
    id: String,
    done: Reply<Option<Terminal>>,
}

/// The journal's group-commit writer (and the terminal lookup every
/// request starts with, cached and batched).
#[derive(Debug, Clone)]
pub struct Writer {
    pool: PgPool,
    batches: PgPool,
    writes: Batcher<Job>,
    answers: Batcher<Answer>,
    lookups: Batcher<Lookup>,
    terminals: Arc<TerminalCache>,
}

/// Terminals as last read, each with the time it was read.
#[derive(Debug)]
struct TerminalCache {
    ttl: Duration,
    read: Mutex<HashMap<String, (Arc<Terminal>, Instant)>>,
}

impl TerminalCache {
    fn get(&self, id: &str) -> Option<Arc<Terminal>> {
        let read = self.read.lock().unwrap_or_else(|e| e.into_inner());
        read.get(id)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(t, _)| t.clone())
    }

    fn put(&self, t: Arc<Terminal>) {
        if self.ttl.is_zero() {
            return;
        }
        let mut read = self.read.lock().unwrap_or_else(|e| e.into_inner());
        read.insert(t.id.clone(), (t, Instant::now()));
    }

    fn forget(&self, id: &str) {
        let mut read = self.read.lock().unwrap_or_else(|e| e.into_inner());
        read.remove(id);
    }
}

impl Writer {
    /// Starts the batching tasks on the current runtime. The batches go
    /// over connections of their own, opened as needed with the options of
    /// `pool`, one per batch in flight. A write, read or lookup that waits
    /// longer than `max_wait` for its batch to leave (the database away or
    /// stuck) fails unsent, rather than be done after its request gave up
    /// (rule T2: the request hears 96 and is not forwarded); so does a
    /// batch that cannot get a connection in that time. A write waits at
    /// most twice `max_wait` in all: to leave, and for a connection.
    pub fn start(
        pool: PgPool,
        limits: Limits,
        terminal_cache: Duration,
        max_wait: Duration,
    ) -> Writer {
        // Three stages, each with its batches in flight.
        let batches = batch_pool(&pool, 3 * limits.in_flight, max_wait);
        let p = batches.clone();
        let writes = Batcher::start_waiting_at_most(
            limits,
            Some(max_wait),
            |j: &Job| j.write.key(),
            move |batch| write(p.clone(), batch),
        );
        let p = batches.clone();
        let answers = Batcher::start_waiting_at_most(
            limits,
            Some(max_wait),
            |a: &Answer| a.answered.id,
            move |batch| answer(p.clone(), batch),
        );
        let p = batches.clone();
        let lookups = Batcher::start_waiting_at_most(
            limits,
            Some(max_wait),
            |l: &Lookup| l.id.clone(),
            move |batch| look_up(p.clone(), batch),
        );
        Writer {
            pool,
            batches,
            writes,
            answers,
            lookups,
            terminals: Arc::new(TerminalCache {
                ttl: terminal_cache,
                read: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Opens every connection the batches may use and plans the journal's
    /// statements on each ([`journal::plan_writes`]), so that the first
    /// transactions after a start do not wait for either. Returns how many
    /// connections were readied.
    pub async fn plan(&self) -> Result<usize, sqlx::Error> {
        let mut conns = group_commit::postgres::open_all(&self.batches).await?;
        // Each connection's server process plans its own: side by side.
        futures::future::try_join_all(conns.iter_mut().map(|c| journal::plan_writes(c))).await?;
        Ok(conns.len())
    }

    /// The terminal with its merchant: as read within the cache's time, or
    /// [`terminals::find`] batched with the lookups of concurrent requests.
    /// What it says of the open batch may be late by that time; the
    /// journal insert of a request that relies on it checks it again
    /// ([`NewEntry::open_batch`](crate::journal::NewEntry::open_batch)).
    /// `fresh` reads it anew, for a request that decides by the open batch
    /// itself.
    pub async fn terminal(
        &self,
        id: &str,
        fresh: bool,
    ) -> Result<Option<Arc<Terminal>>, sqlx::Error> {
        if let Some(t) = self.terminals.get(id).filter(|_| !fresh) {
            return Ok(Some(t));
        }
        let (done, answer) = oneshot::channel();
        let lookup = Lookup {
            id: id.to_string(),
            done,
        };
        let found = if self.lookups.submit(lookup).is_err() {
            terminals::find(&self.pool, id).await?
        } else {
            answer.await.map_err(|_| stopped())??
        };
        Ok(found.map(|t| {
            let t = Arc::new(t);
            self.terminals.put(t.clone());
            t
        }))
    }

    /// Keeps a terminal just read with a write of its own (a sign-on), as
    /// if looked up now.
    pub fn keep_terminal(&self, t: Terminal) {
        self.terminals.put(Arc::new(t));
    }

    /// Drops what the cache knows of a terminal: this switch settled its
    /// batch, or found its batch closed by another.
    pub fn forget_terminal(&self, id: &str) {
        self.terminals.forget(id);
    }

    /// The journal's write batches so far (requests' rows, outcomes and
    /// what rides with them; not the terminal lookups or advice answers).
    pub fn stats(&self) -> group_commit::Stats {
        self.writes.stats()
    }

    /// [`journal::insert`], batched with concurrent requests.
    pub async fn insert(
        &self,
        e: &NewEntry<'_>,
        d: Disposition<'_>,
    ) -> Result<Insert, sqlx::Error> {
        match self.submit(Write::Request(Box::new(Row::of(e, d)))).await? {
            Some(Wrote::Request(Some(w))) => Ok(Insert::New(w)),
            _ => journal::not_inserted(&self.pool, e).await,
        }
    }

    /// [`journal::complete`], batched with concurrent outcomes.
    pub async fn complete(&self, completion: Completion) -> Result<Option<String>, sqlx::Error> {
        match self.submit(Write::Outcome(completion)).await? {
            Some(Wrote::Outcome(state)) => Ok(state),
            _ => Ok(None),
        }
    }

    /// A journalled reversal decided ([`Write::Reversal`]), batched with
    /// concurrent writes: false when its original was no longer as read.
    pub async fn reverse(&self, reversal: Reversal) -> Result<bool, sqlx::Error> {
        match self.submit(Write::Reversal(reversal)).await? {
            Some(Wrote::Reversed(approved)) => Ok(approved),
            _ => Ok(false),
        }
    }

    /// A journalled advice applied to its original ([`Write::Apply`]),
    /// batched with concurrent writes: false when the claim was lost.
    pub async fn apply(&self, apply: Apply) -> Result<bool, sqlx::Error> {
        match self.submit(Write::Apply(apply)).await? {
            Some(Wrote::Applied(applied)) => Ok(applied),
            _ => Ok(false),
        }
    }

    /// [`journal::find`], in the next batch of writes: the originals a
    /// related request names, newest first.
    pub async fn find(&self, f: Find) -> Result<Vec<Original>, sqlx::Error> {
        match self.submit(Write::Find(f)).await? {
            Some(Wrote::Found(originals)) => Ok(originals),
            _ => Ok(Vec::new()),
        }
    }

    /// [`journal::answer_advices`] for one advice, batched with the answers
    /// of others.
    pub async fn advice_answered(&self, id: i64, rc: &str) -> Result<(), sqlx::Error> {
        let answered = Answered {
            id,
            rc: rc.to_string(),
        };
        let (done, answer) = oneshot::channel();
        if let Err(stopped) = self.answers.submit(Answer { answered, done }) {
            let answered = stopped.0.answered;
            return journal::answer_advices(&self.pool, &[answered])
                .await
                .map(drop);
        }
        answer.await.map_err(|_| stopped())?
    }

    /// Hands a write to the next batch and says what it did; when the
    /// batching task has stopped (the runtime is shutting down), the write
    /// goes alone, as a batch of one.
    async fn submit(&self, write: Write) -> Result<Option<Wrote>, sqlx::Error> {
        let (done, answer) = oneshot::channel();
        match self.writes.submit(Job { write, done }) {
            Ok(()) => answer.await.map_err(|_| stopped())?.map(Some),
            Err(stopped) => journal::write_one(&self.pool, stopped.0.write).await,
        }
    }
}

/// A job whose batch never answered it: the database kept it waiting
/// past the writer's `max_wait` (it was dropped unsent), or the writer
/// stopped.
fn stopped() -> sqlx::Error {
    sqlx::Error::InvalidArgument(
        "not written: the database kept the write waiting too long (or the writer stopped)".into(),
    )
}

async fn write(pool: PgPool, batch: Vec<Job>) {
    let (writes, dones): (Vec<Write>, Vec<_>) =
        batch.into_iter().map(|j| (j.write, j.done)).unzip();
    let split = write_all(&pool, writes, dones, ON_ERROR, |pool, writes| {
        Box::pin(journal::write_many(pool, writes))
    })
    .await;
    if let Some(e) = split {
        warn!(error = %Said(&e), "a batch of journal writes failed");
        after_failure(&pool, &e).await;
    }
}

/// After a batch failed for its connection: the other idle ones are
/// checked, so that a PostgreSQL restart fails one batch, not one per
/// connection left from before it.
async fn after_failure(pool: &PgPool, e: &sqlx::Error) {
    let dropped = group_commit::postgres::close_dead_after(pool, e).await;
    if dropped > 0 {
        warn!(dropped, "closed journal connections the database had ended");
    }
}

async fn answer(pool: PgPool, batch: Vec<Answer>) {
    let (answered, dones): (Vec<Answered>, Vec<_>) =
        batch.into_iter().map(|a| (a.answered, a.done)).unzip();
    let split = write_all(&pool, answered, dones, ON_ERROR, |pool, answered| {
        Box::pin(journal::answer_advices(pool, answered))
    })
    .await;
    if let Some(e) = split {
        warn!(error = %Said(&e), "a batch of advice answers failed");
        after_failure(&pool, &e).await;
    }
}

async fn look_up(pool: PgPool, batch: Vec<Lookup>) {
    let (ids, dones): (Vec<String>, Vec<_>) = batch.into_iter().map(|l| (l.id, l.done)).unzip();
    let failed = write_all(&pool, ids, dones, ON_ERROR, |pool, ids| {
        Box::pin(terminals::find_many(pool, ids))
    })
    .await;
    if let Some(e) = failed {
        after_failure(&pool, &e).await;
    }
}
