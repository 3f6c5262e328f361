//! Group commit: many concurrent writers share one statement and one commit.
//!
//! A [`Batcher`] takes jobs from any number of tasks. While fewer than
//! `in_flight` batches are at the database, the next job goes out at once
//! (with whatever else is already waiting, and whatever the tasks already
//! woken hand in during one turn of the scheduler), so a quiet system pays
//! no extra latency; when every slot is busy, the jobs that arrive meanwhile gather
//! into the next batch, so a busy one pays one round trip and one WAL flush
//! for dozens of them. The batch function answers each job itself (each job
//! carries its own reply channel).
//!
//! With a `delay`, a batch goes no sooner than that long after its first
//! job was handed in, so that more join it: fewer, larger statements for at
//! most that much latency. The delay runs from the job's arrival, not from
//! the moment a slot is free: a job that already waited that long for a
//! busy slot goes at once, so under load, where batches are large anyway,
//! the delay costs nothing. Worth it where a statement costs far more than a row, as on a
//! small machine where each statement (executor start-up, the commit's WAL
//! flush, the wake-ups) costs PostgreSQL a few hundred microseconds of CPU.
//!
//! Two jobs with the same key never share a batch: a multi-row statement
//! cannot apply two changes to one row in order (two debits of one card,
//! two requests with one journal key), so the later one waits for the next
//! batch. Across concurrent batches the database's row locks keep the order.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Semaphore, mpsc, oneshot};

/// How big, how many, and how long a batch waits for company.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most jobs in one batch.
    pub max_batch: usize,
    /// Batches at the database at once.
    pub in_flight: usize,
    /// How long after its first job arrived a batch may wait for more
    /// (zero: it goes with what is there).
    pub delay: std::time::Duration,
}

/// Where jobs are handed in. Cloning it is cheap; the batching task ends
/// when the last clone is dropped and the batches in flight have finished.
#[derive(Debug)]
pub struct Batcher<J> {
    jobs: mpsc::UnboundedSender<Arrived<J>>,
    counts: Arc<Counts>,
}

/// What a [`Batcher`]'s batches have been, since it started: how many,
/// with how many jobs, and how long they took in all (from the moment a
/// batch left to the moment its jobs were answered). Two readings apart
/// tell what a stage did between them: its batches' size, how long one
/// took, and, with one batch in flight, how much of the time the stage was
/// at the database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Batches answered.
    pub batches: u64,
    /// Jobs in them.
    pub jobs: u64,
    /// Their durations, summed.
    pub busy: std::time::Duration,
    /// Jobs dropped unsent for waiting longer than the batcher's
    /// `max_wait` ([`Batcher::start_waiting_at_most`]).
    pub expired: u64,
}

impl Stats {
    /// One line for a log or a report, the batches of `over` (two readings
    /// apart): how many, their size in `what`, how long one took, and the
    /// share of `over` they took together (with one batch in flight, how
    /// busy the stage kept its database; above 100 % with more).
    pub fn summary(&self, what: &str, over: std::time::Duration) -> String {
        if self.batches == 0 {
            return format!("no {what}");
        }
        let n = self.batches as f64;
        let expired = match self.expired {
            0 => String::new(),
            e => format!("; {e} {what} dropped unsent, kept waiting too long"),
        };
        format!(
            "{} batches of {:.1} {what}, {:.2} ms each, busy {:.0} % of the time{expired}",
            self.batches,
            self.jobs as f64 / n,
            self.busy.as_secs_f64() * 1e3 / n,
            100.0 * self.busy.as_secs_f64() / over.as_secs_f64().max(1e-9),
        )
    }
}

impl std::ops::Sub for Stats {
    type Output = Stats;

    fn sub(self, earlier: Stats) -> Stats {
        Stats {
            batches: self.batches.saturating_sub(earlier.batches),
            jobs: self.jobs.saturating_sub(earlier.jobs),
            busy: self.busy.saturating_sub(earlier.busy),
            expired: self.expired.saturating_sub(earlier.expired),
        }
    }
}

/// Calls `report` every `every` with the batches of that interval (two
/// readings of `read` apart) and the interval's length, skipping intervals
/// without a batch, until `stop` completes. With `every` zero it returns at
/// once. A log line for operators: how a stage's batches went lately.
pub async fn report_every(
    every: std::time::Duration,
    read: impl Fn() -> Stats,
    report: impl Fn(Stats, std::time::Duration),
    stop: impl Future<Output = ()>,
) {
    if every.is_zero() {
        return;
    }
    let start = tokio::time::Instant::now();
    let mut ticks = tokio::time::interval_at(start + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = (read(), start);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = ticks.tick() => {}
        }
        let now = (read(), tokio::time::Instant::now());
        let batches = now.0 - last.0;
        if batches.batches > 0 {
            report(batches, now.1.duration_since(last.1));
        }
        last = now;
    }
}

/// The running totals behind [`Stats`].
#[derive(Debug, Default)]
struct Counts {
    batches: AtomicU64,
    jobs: AtomicU64,
    busy_ns: AtomicU64,
    expired: AtomicU64,
}

impl Counts {
    fn add(&self, jobs: usize, took: std::time::Duration) {
        self.jobs.fetch_add(jobs as u64, Ordering::Relaxed);
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.busy_ns.fetch_add(ns, Ordering::Relaxed);
        // Last, so that a reading never counts a batch without its jobs.
        self.batches.fetch_add(1, Ordering::Release);
    }

    fn read(&self) -> Stats {
        let batches = self.batches.load(Ordering::Acquire);
        Stats {
            batches,
            jobs: self.jobs.load(Ordering::Relaxed),
            busy: std::time::Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed)),
            expired: self.expired.load(Ordering::Relaxed),
        }
    }
}

/// A job and when it was handed in.
#[derive(Debug)]
struct Arrived<J> {
    at: tokio::time::Instant,
    job: J,
}

impl<J> Clone for Batcher<J> {
    fn clone(&self) -> Batcher<J> {
        Batcher {
            jobs: self.jobs.clone(),
            counts: self.counts.clone(),
        }
    }
}

/// The batching task has stopped (the runtime is shutting down); the job
/// comes back.
#[derive(Debug)]
pub struct Stopped<J>(pub J);

impl<J: Send + 'static> Batcher<J> {
    /// Starts the batching task on the current runtime. `key` names what two
    /// jobs of one batch must not share; `run` executes a batch and answers
    /// every job in it.
    pub fn start<K, F, Fut>(limits: Limits, key: impl Fn(&J) -> K + Send + 'static, run: F) -> Self
    where
        K: Eq + Hash + Send + 'static,
        F: Fn(Vec<J>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Self::start_waiting_at_most(limits, None, key, run)
    }

    /// As [`Batcher::start`]; a job that has waited longer than `max_wait`
    /// for a batch (the batches in flight stuck, the database away) is
    /// dropped instead of sent, so that whoever waits for it hears it
    /// failed (its reply channel closes) rather than wait on, and is told
    /// later than any use. The drops are counted in [`Stats::expired`].
    pub fn start_waiting_at_most<K, F, Fut>(
        limits: Limits,
        max_wait: Option<std::time::Duration>,
        key: impl Fn(&J) -> K + Send + 'static,
        run: F,
    ) -> Self
    where
        K: Eq + Hash + Send + 'static,
        F: Fn(Vec<J>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let counts = Arc::new(Counts::default());
        tokio::spawn(gather(limits, max_wait, rx, key, run, counts.clone()));
        Batcher { jobs: tx, counts }
    }

    /// Its batches so far.
    pub fn stats(&self) -> Stats {
        self.counts.read()
    }

    /// Hands a job in.
    pub fn submit(&self, job: J) -> Result<(), Stopped<J>> {
        let at = tokio::time::Instant::now();
        self.jobs
            .send(Arrived { at, job })
            .map_err(|e| Stopped(e.0.job))
    }
}

async fn gather<J, K, F, Fut>(
    limits: Limits,
    max_wait: Option<std::time::Duration>,
    mut rx: mpsc::UnboundedReceiver<Arrived<J>>,
    key: impl Fn(&J) -> K,
    run: F,
    counts: Arc<Counts>,
) where
    J: Send + 'static,
    K: Eq + Hash,
    F: Fn(Vec<J>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let max_batch = limits.max_batch.max(1);
    let slots = Arc::new(Semaphore::new(limits.in_flight.max(1)));
    // Jobs that met a job with their key in the batch being gathered.
    let mut deferred: VecDeque<Arrived<J>> = VecDeque::new();
    // Whether a job waited too long to be sent (it is dropped and counted).
    let expired = |job: &Arrived<J>| {
        let late = max_wait.is_some_and(|w| job.at.elapsed() > w);
        if late {
            counts.expired.fetch_add(1, Ordering::Relaxed);
        }
        late
    };
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = loop {
            let job = match deferred.pop_front() {
                Some(job) => job,
                None => match rx.recv().await {
                    Some(job) => job,
                    None => return,
                },
            };
            if !expired(&job) {
                break job;
            }
        };
        let leaves = first.at + limits.delay;
        let mut keys = HashSet::new();
        keys.insert(key(&first.job));
        let mut batch = vec![first.job];
        for _ in 0..deferred.len() {
            let Some(job) = deferred.pop_front() else {
                break;
            };
            if expired(&job) {
                continue;
            }
            if batch.len() < max_batch && keys.insert(key(&job.job)) {
                batch.push(job.job);
            } else {
                deferred.push_back(job);
            }
        }
        // Jobs come in bursts: the replies of one read, the requests a
        // committed batch lets go. Before the batch leaves, the tasks
        // already woken get one turn to hand theirs in, so that a burst
        // shares one statement instead of its first job going alone.
        let mut yielded = false;
        while batch.len() < max_batch {
            let job = match rx.try_recv() {
                Ok(job) => job,
                Err(_) if !yielded => {
                    yielded = true;
                    tokio::task::yield_now().await;
                    continue;
                }
                Err(_) if limits.delay.is_zero() => break,
                Err(_) => match tokio::time::timeout_at(leaves, rx.recv()).await {
                    Ok(Some(job)) => job,
                    Ok(None) | Err(_) => break,
                },
            };
            if expired(&job) {
                continue;
            }
            if keys.insert(key(&job.job)) {
                batch.push(job.job);
            } else {
                deferred.push_back(job);
            }
        }
        let jobs = batch.len();
        let left = tokio::time::Instant::now();
        let done = run(batch);
        let counts = counts.clone();
        tokio::spawn(async move {
            done.await;
            counts.add(jobs, left.elapsed());
            drop(slot);
        });
    }
}

/// A batched statement: writes `items` with `ctx` (a pool), one result per
/// item, in order.
pub type Write<C, T, R, E> =
    for<'a> fn(&'a C, &'a [T]) -> Pin<Box<dyn Future<Output = Result<Vec<R>, E>> + Send + 'a>>;

/// Where one job's result goes.
pub type Reply<R, E> = oneshot::Sender<Result<R, E>>;

/// What [`write_all`] does with an error.
#[derive(Debug, Clone, Copy)]
pub struct OnError<E> {
    /// Errors worth retrying the whole batch for (a deadlock between two
    /// batches), and how often.
    pub retry: fn(&E) -> bool,
    /// How often.
    pub retries: usize,
    /// Errors one item can cause (bad data, a constraint): the batch is run
    /// again item by item, so that the bad one fails alone. Any other error
    /// (the connection, the pool) is every item's: each gets a copy at once.
    pub split: fn(&E) -> bool,
    /// A copy of an error, for each item's reply.
    pub copy: fn(&E) -> E,
}

/// Runs `write` on the whole batch and answers each job, handling errors as
/// `on_error` says. Returns the error that split the batch or failed it
/// (for a batch of one, only an error that is not the item's own).
pub async fn write_all<C, T, R, E>(
    ctx: &C,
    items: Vec<T>,
    replies: Vec<Reply<R, E>>,
    on_error: OnError<E>,
    write: Write<C, T, R, E>,
) -> Option<E> {
    let mut attempt = 0;
    let failed = loop {
        match write(ctx, &items).await {
            Ok(results) => {
                for (reply, r) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(r));
                }
                return None;
            }
            Err(e) if (on_error.retry)(&e) && attempt < on_error.retries => attempt += 1,
            Err(e) => break e,
        }
    };
    if items.len() == 1 {
        let reply = replies.into_iter().next()?;
        // The item's own fault: it has its error, there is nothing more to
        // say. Otherwise (the connection, the pool) the caller hears it too,
        // as from a batch of many.
        if (on_error.split)(&failed) {
            let _ = reply.send(Err(failed));
            return None;
        }
        let _ = reply.send(Err((on_error.copy)(&failed)));
        return Some(failed);
    }
    if !(on_error.split)(&failed) {
        for reply in replies {
            let _ = reply.send(Err((on_error.copy)(&failed)));
        }
        return Some(failed);
    }
    for (item, reply) in items.iter().zip(replies) {
        let one = match write(ctx, std::slice::from_ref(item)).await {
            Ok(mut r) if r.len() == 1 => Ok(r.remove(0)),
            Ok(_) => continue,
            Err(e) => Err(e),
        };
        let _ = reply.send(one);
    }
    Some(failed)
}

/// Errors of PostgreSQL batches (sqlx).
pub mod postgres {
    use std::time::Duration;

    use sqlx::pool::PoolConnection;
    use sqlx::postgres::PgPoolOptions;
    use sqlx::{PgPool, Postgres};

    use super::OnError;

    /// The connections batches run on: those of `pool`, one per batch in
    /// flight (all batchers' together) and as many spare, that plan each
    /// statement once.
    ///
    /// A batched statement is the same text every time and only its arrays
    /// change, so planning it for every execution (what PostgreSQL does
    /// when it cannot price a generic plan, as for arrays of unknown
    /// length) cost as much as executing it. Generic plans cannot see how
    /// small a table is, so sequential scans are priced out: every batched
    /// statement reaches its rows through a key, and a plan made while a
    /// table was empty must not scan it once it is large. A statement
    /// stuck for 10 s fails its batch rather than hold every later one. JIT
    /// compilation is off: a sequential scan priced out (of a sequence, a
    /// tiny table) costs a plan 10^10, far past the JIT threshold, and
    /// compiling a batch's expressions costs more than running them.
    /// A connection is not pinged before each batch (see [`pool_options`]).
    /// A batch waits at most `acquire` for a connection (the database
    /// away), then fails.
    pub fn batch_pool(pool: &PgPool, in_flight: usize, acquire: Duration) -> PgPool {
        let options = (*pool.connect_options()).clone().options([
            ("plan_cache_mode", "force_generic_plan"),
            ("enable_seqscan", "off"),
            ("jit", "off"),
            ("statement_timeout", "10s"),
        ]);
        // Kept open for good: a connection closed for idling or age takes
        // its plans with it, and the batch that opens its successor plans
        // again (see `switch`'s plan_ahead).
        pool_options()
            .max_connections(2 * in_flight.max(1) as u32)
            .acquire_timeout(acquire)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_lazy_with(options)
    }

    /// Every connection `batches` may open, opened now and held together
    /// (so that each is a different one), to ready them before traffic.
    /// Stops at the first that cannot be had within 5 s (the server full,
    /// say) and returns those opened: the rest open, unreadied, when
    /// traffic needs them. An error only when not even one opens.
    pub async fn open_all(batches: &PgPool) -> Result<Vec<PoolConnection<Postgres>>, sqlx::Error> {
        let size = batches.options().get_max_connections() as usize;
        let mut conns = Vec::with_capacity(size);
        for _ in 0..size {
            let opened = tokio::time::timeout(Duration::from_secs(5), batches.acquire())
                .await
                .unwrap_or(Err(sqlx::Error::PoolTimedOut));
            match opened {
                Ok(conn) => conns.push(conn),
                Err(e) if conns.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(conns)
    }

    /// Pool options for a hot path: a connection is handed out without the
    /// ping sqlx sends by default before every acquire. That ping is a
    /// round trip of its own, which doubled the statements PostgreSQL
    /// served under load; a connection that died while idle fails the one
    /// statement that finds it dead (its batch is answered as failed) and
    /// is dropped from the pool.
    pub fn pool_options() -> PgPoolOptions {
        PgPoolOptions::new().test_before_acquire(false)
    }

    /// Whether a batch failed because its connection was lost (PostgreSQL
    /// restarted or ended the session, the socket broke) rather than for
    /// its rows: the other idle connections are likely dead too.
    pub fn lost_connection(e: &sqlx::Error) -> bool {
        match e {
            sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
            // Operator intervention (57P01 admin shutdown, 57P02 crash
            // shutdown, 57P03 cannot connect now) and connection exceptions.
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|c| c.starts_with("57P") || c.starts_with("08")),
            _ => false,
        }
    }

    /// Pings every idle connection of `batches` and closes those that do
    /// not answer; returns how many. Connections are not pinged before
    /// each batch ([`pool_options`]), so after PostgreSQL restarts each
    /// dead one would fail a batch of its own; called once a batch failed
    /// for its connection, only the one batch fails.
    ///
    /// The pings go side by side, a second at most each (a half-open socket
    /// answers nothing), so the pool is short of its idle connections for
    /// at most that long.
    pub async fn drop_dead(batches: &PgPool) -> usize {
        use sqlx::Connection;
        let mut idle = Vec::new();
        while let Some(conn) = batches.try_acquire() {
            idle.push(conn);
        }
        let mut pings = tokio::task::JoinSet::new();
        for mut conn in idle {
            pings.spawn(async move {
                let ping = tokio::time::timeout(Duration::from_secs(1), conn.ping()).await;
                let alive = matches!(ping, Ok(Ok(())));
                if !alive {
                    // Closed, not handed back: the pool opens a new one.
                    conn.close_on_drop();
                }
                usize::from(!alive)
            });
        }
        pings.join_all().await.into_iter().sum()
    }

    /// After a batch of `batches` failed with `failed`: when it failed for
    /// its connection, [`drop_dead`]; returns how many were closed.
    pub async fn close_dead_after(batches: &PgPool, failed: &sqlx::Error) -> usize {
        if lost_connection(failed) {
            drop_dead(batches).await
        } else {
            0
        }
    }

    /// Deadlocks and serialization failures are retried three times;
    /// data exceptions (class 22) and constraint violations (class 23)
    /// belong to one row and split the batch; anything else (the
    /// connection, the pool, the protocol) fails every row at once.
    pub const ON_ERROR: OnError<sqlx::Error> = OnError {
        retry: |e| code(e).is_some_and(|c| c == "40P01" || c == "40001"),
        retries: 3,
        split: |e| code(e).is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
        // Said plainly: sqlx's `Protocol` would prefix "encountered
        // unexpected or invalid data", which sent operators looking for bad
        // data during a database outage.
        copy: |e| sqlx::Error::InvalidArgument(format!("the batch failed: {}", Said(e))),
    };

    /// A sqlx error as an operator reads it in a log line: a PostgreSQL
    /// error by its message and SQLSTATE (sqlx's own words add "at line N",
    /// the line of PostgreSQL's C source that raised it, which tells an
    /// operator nothing), anything else as sqlx says it.
    #[derive(Debug, Clone, Copy)]
    pub struct Said<'a>(pub &'a sqlx::Error);

    impl std::fmt::Display for Said<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self.0 {
                sqlx::Error::Database(db) => write!(
                    f,
                    "{} (SQLSTATE {})",
                    db.message(),
                    db.code().as_deref().unwrap_or("?")
                ),
                e => e.fmt(f),
            }
        }
    }

    fn code(e: &sqlx::Error) -> Option<String> {
        match e {
            sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::oneshot;

    struct Job {
        key: u32,
        done: oneshot::Sender<usize>,
    }

    /// Batches finish only when released, and record their keys.
    struct Database {
        batches: Mutex<Vec<Vec<u32>>>,
        started: AtomicUsize,
        release: Semaphore,
    }

    fn start(limits: Limits) -> (Arc<Database>, Batcher<Job>) {
        start_waiting_at_most(limits, None)
    }

    fn start_waiting_at_most(
        limits: Limits,
        max_wait: Option<std::time::Duration>,
    ) -> (Arc<Database>, Batcher<Job>) {
        let db = Arc::new(Database {
            batches: Mutex::new(Vec::new()),
            started: AtomicUsize::new(0),
            release: Semaphore::new(0),
        });
        let shared = db.clone();
        let batcher = Batcher::start_waiting_at_most(
            limits,
            max_wait,
            |j: &Job| j.key,
            move |jobs: Vec<Job>| {
                let db = shared.clone();
                db.started.fetch_add(1, Ordering::SeqCst);
                async move {
                    db.release.acquire().await.unwrap().forget();
                    let n = jobs.len();
                    db.batches
                        .lock()
                        .unwrap()
                        .push(jobs.iter().map(|j| j.key).collect());
                    for j in jobs {
                        let _ = j.done.send(n);
                    }
                }
            },
        );
        (db, batcher)
    }

    fn submit(b: &Batcher<Job>, key: u32) -> oneshot::Receiver<usize> {
        let (done, rx) = oneshot::channel();
        b.submit(Job { key, done }).map_err(|_| ()).unwrap();
        rx
    }

    /// Submits `key` and waits until its batch holds the only slot.
    async fn occupy(db: &Database, b: &Batcher<Job>, key: u32) -> oneshot::Receiver<usize> {
        let rx = submit(b, key);
        while db.started.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        rx
    }

    async fn sizes(rx: Vec<oneshot::Receiver<usize>>) -> Vec<usize> {
        let mut out = Vec::new();
        for r in rx {
            out.push(r.await.unwrap());
        }
        out
    }

    const ONE_SLOT: Limits = Limits {
        delay: std::time::Duration::ZERO,
        max_batch: 100,
        in_flight: 1,
    };

    #[tokio::test(start_paused = true)]
    async fn jobs_kept_waiting_past_max_wait_are_dropped_unsent() {
        let second = std::time::Duration::from_secs(1);
        let (db, b) = start_waiting_at_most(ONE_SLOT, Some(second));
        // The one slot is stuck (the database away) while three wait.
        let first = occupy(&db, &b, 0).await;
        let stale: Vec<_> = (1..=3).map(|k| submit(&b, k)).collect();
        tokio::time::advance(second * 2).await;
        let fresh = submit(&b, 4);
        db.release.add_permits(2);
        assert_eq!(first.await.unwrap(), 1);
        for rx in stale {
            assert!(rx.await.is_err(), "dropped: its waiter hears it failed");
        }
        assert_eq!(fresh.await.unwrap(), 1, "the fresh one goes alone");
        assert_eq!(*db.batches.lock().unwrap(), vec![vec![0], vec![4]]);
        assert_eq!(b.stats().expired, 3);
    }

    #[tokio::test]
    async fn jobs_that_arrive_while_the_slot_is_busy_share_the_next_batch() {
        let (db, b) = start(ONE_SLOT);
        let first = occupy(&db, &b, 0).await;
        let rest: Vec<_> = (1..=10).map(|k| submit(&b, k)).collect();
        db.release.add_permits(2);
        assert_eq!(first.await.unwrap(), 1, "the first goes out alone");
        assert_eq!(sizes(rest).await, vec![10; 10], "the ten waited together");
    }

    #[tokio::test]
    async fn a_burst_handed_in_by_tasks_woken_together_shares_one_batch() {
        let (db, b) = start(ONE_SLOT);
        db.release.add_permits(10);
        // The first task hands its job in and wakes four more, as a read of
        // four replies would: they run after the batcher has woken.
        let go = Arc::new(tokio::sync::Notify::new());
        let burst: Vec<_> = (1..=4)
            .map(|k| {
                let (b, go) = (b.clone(), go.clone());
                tokio::spawn(async move {
                    go.notified().await;
                    submit(&b, k).await.unwrap()
                })
            })
            .collect();
        tokio::task::yield_now().await;
        let first = submit(&b, 0);
        go.notify_waiters();
        assert_eq!(
            first.await.unwrap(),
            5,
            "the first waited one turn for the rest"
        );
        for task in burst {
            assert_eq!(task.await.unwrap(), 5);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_waits_its_delay_for_company_then_goes() {
        let delay = std::time::Duration::from_millis(5);
        let (db, b) = start(Limits {
            max_batch: 100,
            in_flight: 1,
            delay,
        });
        db.release.add_permits(10);
        let started = tokio::time::Instant::now();
        let first = submit(&b, 0);
        tokio::task::yield_now().await;
        // Within the delay: they join the first job although a slot is free.
        let company: Vec<_> = [1, 2].map(|k| submit(&b, k)).into();
        assert_eq!(first.await.unwrap(), 3);
        assert!(started.elapsed() >= delay, "the batch waited its delay");
        assert_eq!(sizes(company).await, vec![3, 3]);
        // Alone, a job still goes once its delay is over.
        let alone = submit(&b, 3);
        assert_eq!(alone.await.unwrap(), 1);
        let batches = db.batches.lock().unwrap().clone();
        assert_eq!(batches, vec![vec![0, 1, 2], vec![3]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_that_waited_for_a_busy_slot_does_not_wait_its_delay_again() {
        let delay = std::time::Duration::from_millis(5);
        let (db, b) = start(Limits {
            max_batch: 100,
            in_flight: 1,
            delay,
        });
        let blocker = submit(&b, 99);
        tokio::time::sleep(delay * 2).await;
        assert_eq!(
            db.started.load(Ordering::SeqCst),
            1,
            "the first batch is out"
        );
        let waiting = submit(&b, 1);
        tokio::time::sleep(delay * 2).await;
        let freed = tokio::time::Instant::now();
        db.release.add_permits(2);
        assert_eq!(blocker.await.unwrap(), 1);
        assert_eq!(waiting.await.unwrap(), 1);
        assert_eq!(
            tokio::time::Instant::now(),
            freed,
            "its delay ran while the slot was busy"
        );
    }

    #[tokio::test]
    async fn two_jobs_with_one_key_never_share_a_batch() {
        let (db, b) = start(ONE_SLOT);
        let blocker = occupy(&db, &b, 99).await;
        let waiting: Vec<_> = [1, 2, 1, 3, 1].map(|k| submit(&b, k)).into();
        db.release.add_permits(4);
        blocker.await.unwrap();
        sizes(waiting).await;
        let batches = db.batches.lock().unwrap().clone();
        assert_eq!(batches, vec![vec![99], vec![1, 2, 3], vec![1], vec![1]]);
    }

    #[tokio::test]
    async fn a_batch_is_cut_at_its_limit() {
        let (db, b) = start(Limits {
            max_batch: 3,
            in_flight: 1,
            delay: std::time::Duration::ZERO,
        });
        let blocker = occupy(&db, &b, 99).await;
        let waiting: Vec<_> = (0..7).map(|k| submit(&b, k)).collect();
        db.release.add_permits(4);
        blocker.await.unwrap();
        assert_eq!(sizes(waiting).await, vec![3, 3, 3, 3, 3, 3, 1]);
    }

    #[tokio::test]
    async fn with_a_free_slot_a_job_does_not_wait_for_a_busy_one() {
        let (db, b) = start(Limits {
            max_batch: 100,
            in_flight: 2,
            delay: std::time::Duration::ZERO,
        });
        let slow = occupy(&db, &b, 1).await;
        let quick = submit(&b, 2);
        while db.started.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        db.release.add_permits(1);
        // One of the two finished; both were at the database at once.
        let batches = loop {
            let b = db.batches.lock().unwrap().clone();
            if !b.is_empty() {
                break b;
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(batches.len(), 1);
        db.release.add_permits(1);
        slow.await.unwrap();
        quick.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn stats_count_the_batches_their_jobs_and_the_time_they_took() {
        let took = std::time::Duration::from_millis(5);
        let b = Batcher::start(
            ONE_SLOT,
            |j: &Job| j.key,
            move |jobs: Vec<Job>| async move {
                tokio::time::sleep(took).await;
                let n = jobs.len();
                for j in jobs {
                    let _ = j.done.send(n);
                }
            },
        );
        assert_eq!(b.stats(), Stats::default());
        let first = submit(&b, 0);
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        // The first is at the "database"; these wait for the next batch.
        let rest: Vec<_> = (1..=4).map(|k| submit(&b, k)).collect();
        assert_eq!(first.await.unwrap(), 1);
        let before = b.stats();
        assert_eq!(sizes(rest).await, vec![4; 4]);
        // The second batch's count lands after its jobs are answered.
        let after = loop {
            let s = b.stats();
            if s.batches == 2 {
                break s;
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(
            after,
            Stats {
                batches: 2,
                jobs: 5,
                busy: took * 2,
                expired: 0,
            }
        );
        assert_eq!(
            after - before,
            Stats {
                batches: 1,
                jobs: 4,
                busy: took,
                expired: 0,
            }
        );
        assert_eq!(before - after, Stats::default(), "never below zero");
    }

    #[test]
    fn a_summary_gives_size_time_and_share_of_the_time() {
        let s = Stats {
            batches: 100,
            jobs: 410,
            busy: std::time::Duration::from_millis(500),
            expired: 0,
        };
        assert_eq!(
            s.summary("writes", std::time::Duration::from_secs(2)),
            "100 batches of 4.1 writes, 5.00 ms each, busy 25 % of the time"
        );
        assert_eq!(
            Stats { expired: 7, ..s }.summary("writes", std::time::Duration::from_secs(2)),
            "100 batches of 4.1 writes, 5.00 ms each, busy 25 % of the time; 7 writes dropped unsent, kept waiting too long"
        );
        assert_eq!(
            Stats::default().summary("writes", std::time::Duration::ZERO),
            "no writes"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reports_come_each_interval_with_its_own_batches_and_none_when_quiet() {
        let second = std::time::Duration::from_secs(1);
        let counts = Arc::new(Counts::default());
        let reports = std::sync::Mutex::new(Vec::new());
        let stop = tokio::time::sleep(second * 9 / 2);
        let work = async {
            counts.add(3, second / 10);
            tokio::time::sleep(second * 5 / 2).await;
            // The second interval was quiet; the third has one batch.
            counts.add(1, second / 5);
        };
        tokio::join!(
            report_every(
                second,
                || counts.read(),
                |s, over| reports.lock().unwrap().push((s, over)),
                stop,
            ),
            work
        );
        let reports = reports.into_inner().unwrap();
        let one = |batches, jobs, busy| Stats {
            batches,
            jobs,
            busy,
            expired: 0,
        };
        assert_eq!(
            reports,
            vec![
                (one(1, 3, second / 10), second),
                (one(1, 1, second / 5), second)
            ]
        );
        // Zero: no reports, and it returns at once.
        report_every(
            std::time::Duration::ZERO,
            || counts.read(),
            |_, _| panic!("no report"),
            std::future::pending(),
        )
        .await;
    }

    /// Items above 100 are refused by the "database"; 7 deadlocks once.
    fn refusing(
        ctx: &AtomicUsize,
        items: &[u32],
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u32>, String>> + Send + 'static>> {
        let calls = ctx.fetch_add(1, Ordering::SeqCst);
        let items = items.to_vec();
        Box::pin(async move {
            if items.contains(&7) && calls == 0 {
                return Err("deadlock".to_string());
            }
            if items.contains(&404) {
                return Err("connection lost".to_string());
            }
            match items.iter().find(|&&i| i > 100) {
                Some(i) => Err(format!("{i} refused")),
                None => Ok(items.iter().map(|i| i * 2).collect()),
            }
        })
    }

    async fn write(items: Vec<u32>) -> (usize, Option<String>, Vec<Result<u32, String>>) {
        let calls = AtomicUsize::new(0);
        let (replies, answers): (Vec<_>, Vec<_>) = items.iter().map(|_| oneshot::channel()).unzip();
        let on_error = OnError {
            retry: |e: &String| e == "deadlock",
            retries: 2,
            split: |e: &String| e.ends_with("refused"),
            copy: String::clone,
        };
        let split = write_all(&calls, items, replies, on_error, refusing).await;
        let mut got = Vec::new();
        for a in answers {
            got.push(a.await.unwrap());
        }
        (calls.load(Ordering::SeqCst), split, got)
    }

    #[tokio::test]
    async fn one_bad_item_fails_alone() {
        let (calls, split, got) = write(vec![1, 200, 3]).await;
        assert_eq!(split.as_deref(), Some("200 refused"));
        assert_eq!(got, vec![Ok(2), Err("200 refused".into()), Ok(6)]);
        assert_eq!(calls, 4, "the batch, then each alone");
    }

    #[tokio::test]
    async fn a_lost_connection_fails_every_item_at_once() {
        let (calls, split, got) = write(vec![1, 404, 3]).await;
        assert_eq!(split.as_deref(), Some("connection lost"));
        assert_eq!(got, vec![Err("connection lost".to_string()); 3]);
        assert_eq!(calls, 1, "no item is tried again alone");
    }

    #[tokio::test]
    async fn a_batch_of_one_says_a_lost_connection_but_not_its_own_fault() {
        let (_, split, got) = write(vec![404]).await;
        assert_eq!(split.as_deref(), Some("connection lost"));
        assert_eq!(got, vec![Err("connection lost".to_string())]);
        let (_, split, got) = write(vec![200]).await;
        assert_eq!(split, None);
        assert_eq!(got, vec![Err("200 refused".to_string())]);
    }

    #[tokio::test]
    async fn a_deadlock_is_retried_whole() {
        let (calls, split, got) = write(vec![7, 8]).await;
        assert_eq!(split, None);
        assert_eq!(got, vec![Ok(14), Ok(16)]);
        assert_eq!(calls, 2);
    }
}
