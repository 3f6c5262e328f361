//! Group commit for what an issuer decides most: those arriving together
//! are decided and posted in one statement and one commit. New
//! authorisations (balance inquiries, purchases, pre-authorisations) go to
//! [`books::authorise_many`], at most one per card in a batch; follow-ons
//! (voids, refunds, pre-auth cancels, completions and completion voids,
//! requests and advices) to [`books::follow_on_many`], at most one per
//! original in a batch. Reversals are decided one statement each
//! ([`books::apply`]), repeats from the stored posting ([`books::repeat`]).

use std::sync::OnceLock;

use group_commit::postgres::{ON_ERROR, Said, batch_pool, open_all};
use group_commit::{Batcher, Limits, Reply, write_all};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tracing::warn;

use crate::books::{self, FollowOn, Judged, NewAuth, Outcome};
use crate::key::PanKey;
use crate::request::{Kind, Request};

#[derive(Debug)]
struct AuthJob {
    auth: NewAuth,
    done: Reply<Option<Outcome>, sqlx::Error>,
}

#[derive(Debug)]
struct FollowOnJob {
    follow_on: FollowOn,
    done: Reply<Judged, sqlx::Error>,
}

#[derive(Debug)]
struct Batchers {
    authorisations: Batcher<AuthJob>,
    follow_ons: Batcher<FollowOnJob>,
    /// The connections the batches go over.
    connections: PgPool,
}

/// The batching of new authorisations and of follow-ons, started on first
/// use (on the runtime that serves the switch).
#[derive(Debug, Default)]
pub(crate) struct Batches {
    batchers: OnceLock<Batchers>,
}

impl Batches {
    /// Decides and records one message, exactly once; returns what to answer.
    pub(crate) async fn decide(
        &self,
        limits: Limits,
        pool: &PgPool,
        key: &PanKey,
        req: &Request,
    ) -> Result<Outcome, sqlx::Error> {
        match req.kind {
            Kind::Reversal => books::apply(pool, key, req).await,
            kind if kind.is_new() => self.authorise(limits, pool, key, req).await,
            _ => self.follow_on(limits, pool, key, req).await,
        }
    }

    /// Starts the batching, opens every connection the batches may use and
    /// plans their statements on each (each run once with no rows), so
    /// that the first messages after a start wait for neither. Returns how
    /// many connections were readied.
    pub(crate) async fn plan(&self, limits: Limits, pool: &PgPool) -> Result<usize, sqlx::Error> {
        let mut conns = open_all(&self.batchers(limits, pool).connections).await?;
        // Each connection's server process plans its own: side by side.
        futures::future::try_join_all(conns.iter_mut().map(|conn| async move {
            books::authorise_many(&mut **conn, &[]).await?;
            books::follow_on_many(&mut **conn, &[]).await
        }))
        .await?;
        Ok(conns.len())
    }

    /// The authorisations' batches so far.
    pub(crate) fn authorisation_stats(&self) -> group_commit::Stats {
        self.batchers
            .get()
            .map(|b| b.authorisations.stats())
            .unwrap_or_default()
    }

    fn batchers(&self, limits: Limits, pool: &PgPool) -> &Batchers {
        self.batchers.get_or_init(|| {
            // Two kinds of batches, each with its batches in flight.
            let batches = batch_pool(
                pool,
                2 * limits.in_flight,
                std::time::Duration::from_secs(30),
            );
            let p = batches.clone();
            let authorisations = Batcher::start(
                limits,
                |j: &AuthJob| j.auth.pan_hash,
                move |jobs| authorise_many(p.clone(), jobs),
            );
            // Keyed by the original: two follow-ons of one original (a void
            // and a refund of one sale, or copies of one message) never share
            // a batch, so each is judged on what the other did. Their card is
            // known only once the original is read (an advice carries no
            // PAN), so two follow-ons of one card may share one: the
            // statement decides the first of them and leaves the others
            // undecided, and they are decided alone ([`Judged::Deferred`]).
            let b = batches.clone();
            let follow_ons = Batcher::start(
                limits,
                |j: &FollowOnJob| j.follow_on.original.clone(),
                move |jobs| follow_on_many(b.clone(), jobs),
            );
            Batchers {
                authorisations,
                follow_ons,
                connections: batches,
            }
        })
    }

    async fn authorise(
        &self,
        limits: Limits,
        pool: &PgPool,
        key: &PanKey,
        req: &Request,
    ) -> Result<Outcome, sqlx::Error> {
        let Some(pan) = req.pan.as_ref() else {
            return books::apply(pool, key, req).await;
        };
        let pan_hash = key.hash(pan);
        let fingerprint = req.fingerprint(Some(&pan_hash));
        let auth = NewAuth {
            fingerprint,
            pan_hash,
            req: req.clone(),
        };
        let (done, answer) = oneshot::channel();
        let job = AuthJob { auth, done };
        let batcher = &self.batchers(limits, pool).authorisations;
        if batcher.submit(job).is_err() {
            return books::apply(pool, key, req).await;
        }
        match answer.await.map_err(|_| sqlx::Error::WorkerCrashed)?? {
            Some(outcome) => Ok(outcome),
            // Its key was taken: a repeat, answered from the stored posting.
            None => books::repeat(pool, req, &fingerprint).await,
        }
    }

    async fn follow_on(
        &self,
        limits: Limits,
        pool: &PgPool,
        key: &PanKey,
        req: &Request,
    ) -> Result<Outcome, sqlx::Error> {
        let Some(original) = req.original.as_ref() else {
            return books::apply(pool, key, req).await;
        };
        let pan_hash = req.pan.as_ref().map(|p| key.hash(p));
        let fingerprint = req.fingerprint(pan_hash.as_ref());
        let follow_on = FollowOn {
            original: original.key.clone(),
            pan_hash,
            fingerprint,
            req: req.clone(),
        };
        let (done, answer) = oneshot::channel();
        let job = FollowOnJob { follow_on, done };
        let batcher = &self.batchers(limits, pool).follow_ons;
        if batcher.submit(job).is_err() {
            return books::apply(pool, key, req).await;
        }
        match answer.await.map_err(|_| sqlx::Error::WorkerCrashed)?? {
            Judged::Decided(outcome) => Ok(outcome),
            // Its key was taken: a repeat, answered from the stored posting.
            Judged::Taken => books::repeat(pool, req, &fingerprint).await,
            // Another of its card came first in the batch, which is
            // committed now: decided alone.
            Judged::Deferred => books::apply(pool, key, req).await,
        }
    }
}

async fn authorise_many(pool: PgPool, jobs: Vec<AuthJob>) {
    let (auths, dones): (Vec<NewAuth>, Vec<_>) = jobs.into_iter().map(|j| (j.auth, j.done)).unzip();
    let split = write_all(&pool, auths, dones, ON_ERROR, |pool, auths| {
        Box::pin(books::authorise_many(pool, auths))
    })
    .await;
    if let Some(e) = split {
        warn!(error = %Said(&e), "a batch of authorisations failed");
        closed_dead(&pool, &e).await;
    }
}

async fn follow_on_many(pool: PgPool, jobs: Vec<FollowOnJob>) {
    let (follow_ons, dones): (Vec<FollowOn>, Vec<_>) =
        jobs.into_iter().map(|j| (j.follow_on, j.done)).unzip();
    let split = write_all(&pool, follow_ons, dones, ON_ERROR, |pool, follow_ons| {
        Box::pin(books::follow_on_many(pool, follow_ons))
    })
    .await;
    if let Some(e) = split {
        warn!(error = %Said(&e), "a batch of follow-ons failed");
        closed_dead(&pool, &e).await;
    }
}

/// After a batch failed for its connection (PostgreSQL restarted), the
/// other dead connections go too, so that one batch fails, not one each.
async fn closed_dead(pool: &PgPool, e: &sqlx::Error) {
    let dropped = group_commit::postgres::close_dead_after(pool, e).await;
    if dropped > 0 {
        warn!(dropped, "closed connections the database had ended");
    }
}
