//! Group commit for what an issuer decides most: those arriving together
//! are decided and posted in one statement and one commit
//! ([`books::decide_many`]): new authorisations (balance inquiries,
//! purchases, pre-authorisations), at most one per card in a batch, and
//! follow-ons (voids, refunds, pre-auth cancels, completions and completion
//! voids, requests and advices), at most one per original. Reversals are
//! decided one statement each ([`books::apply`]), repeats from the stored
//! posting ([`books::repeat`]).

use std::sync::OnceLock;

use group_commit::postgres::{ON_ERROR, batch_pool};
use group_commit::{Batcher, Limits, Reply, write_all};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tracing::warn;

use crate::books::{self, Batched, Decided, FollowOn, Judged, NewAuth, Outcome};
use crate::key::PanKey;
use crate::request::{Kind, PostingKey, Request};

#[derive(Debug)]
struct Job {
    message: Batched,
    done: Reply<Decided, sqlx::Error>,
}

/// What two messages of one batch must not share.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// A new authorisation's card: two of one card are decided one after
    /// the other, each on what the other left.
    Card([u8; 32]),
    /// A follow-on's original: two follow-ons of one original (a void and a
    /// refund of one sale, or copies of one message) never share a batch,
    /// so each is judged on what the other did. Their card is known only
    /// once the original is read (an advice carries no PAN), so two
    /// follow-ons of one card, or a follow-on and an authorisation of one
    /// card, may share one: the statement decides the first of them and
    /// leaves the others undecided, and they are decided alone
    /// ([`Judged::Deferred`]).
    Original(PostingKey),
}

/// The batching of new authorisations and follow-ons, started on first use
/// (on the runtime that serves the switch).
#[derive(Debug, Default)]
pub(crate) struct Batches {
    batcher: OnceLock<Batcher<Job>>,
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

    fn batcher(&self, limits: Limits, pool: &PgPool) -> &Batcher<Job> {
        self.batcher.get_or_init(|| {
            let batches = batch_pool(pool, limits.in_flight);
            Batcher::start(
                limits,
                |j: &Job| match &j.message {
                    Batched::New(a) => Key::Card(a.pan_hash),
                    Batched::FollowOn(f) => Key::Original(f.original.clone()),
                },
                move |jobs| decide_many(batches.clone(), jobs),
            )
        })
    }

    /// Hands a message to the next batch; `None` when the batching task has
    /// stopped (the runtime is shutting down).
    async fn submit(
        &self,
        limits: Limits,
        pool: &PgPool,
        message: Batched,
    ) -> Option<Result<Decided, sqlx::Error>> {
        let (done, answer) = oneshot::channel();
        self.batcher(limits, pool)
            .submit(Job { message, done })
            .ok()?;
        Some(answer.await.unwrap_or(Err(sqlx::Error::WorkerCrashed)))
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
        match self.submit(limits, pool, Batched::New(auth)).await {
            None => books::apply(pool, key, req).await,
            Some(Ok(Decided::New(Some(outcome)))) => Ok(outcome),
            // Its key was taken: a repeat, answered from the stored posting.
            Some(Ok(_)) => books::repeat(pool, req, &fingerprint).await,
            Some(Err(e)) => Err(e),
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
        match self
            .submit(limits, pool, Batched::FollowOn(follow_on))
            .await
        {
            None => books::apply(pool, key, req).await,
            Some(Ok(Decided::FollowOn(Judged::Decided(outcome)))) => Ok(outcome),
            // Its key was taken: a repeat, answered from the stored posting.
            Some(Ok(Decided::FollowOn(Judged::Taken))) => {
                books::repeat(pool, req, &fingerprint).await
            }
            // Another of its card came first in the batch, which is
            // committed now: decided alone.
            Some(Ok(_)) => books::apply(pool, key, req).await,
            Some(Err(e)) => Err(e),
        }
    }
}

async fn decide_many(pool: PgPool, jobs: Vec<Job>) {
    let (messages, dones): (Vec<Batched>, Vec<_>) =
        jobs.into_iter().map(|j| (j.message, j.done)).unzip();
    let split = write_all(&pool, messages, dones, ON_ERROR, |pool, messages| {
        Box::pin(books::decide_many(pool, messages))
    })
    .await;
    if let Some(e) = split {
        warn!(error = %e, "a batch of authorisations and follow-ons failed");
    }
}
