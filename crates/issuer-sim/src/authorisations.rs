//! Group commit for new authorisations (balance inquiries, purchases,
//! pre-authorisations), the bulk of what an issuer decides: those arriving
//! together are decided and posted in one statement and one commit
//! ([`books::authorise_many`]), at most one per card in a batch. Follow-ons,
//! reversals and advices are decided one statement each ([`books::apply`]),
//! repeats from the stored posting ([`books::repeat`]).

use std::sync::OnceLock;

use group_commit::postgres::{ON_ERROR, batch_pool};
use group_commit::{Batcher, Limits, Reply, write_all};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tracing::warn;

use crate::books::{self, NewAuth, Outcome};
use crate::key::PanKey;
use crate::request::Request;

#[derive(Debug)]
struct Job {
    auth: NewAuth,
    done: Reply<Option<Outcome>, sqlx::Error>,
}

/// The batching of new authorisations, started on first use (on the
/// runtime that serves the switch).
#[derive(Debug, Default)]
pub(crate) struct Authorisations {
    batcher: OnceLock<Batcher<Job>>,
}

impl Authorisations {
    /// Decides and records one message, exactly once; returns what to answer.
    pub(crate) async fn decide(
        &self,
        limits: Limits,
        pool: &PgPool,
        key: &PanKey,
        req: &Request,
    ) -> Result<Outcome, sqlx::Error> {
        let Some(pan) = req.pan.as_ref().filter(|_| req.kind.is_new()) else {
            return books::apply(pool, key, req).await;
        };
        let pan_hash = key.hash(pan);
        let fingerprint = req.fingerprint(Some(&pan_hash));
        let auth = NewAuth {
            fingerprint,
            pan_hash,
            req: req.clone(),
        };
        let batcher = self.batcher.get_or_init(|| {
            let pool = batch_pool(pool, limits.in_flight);
            Batcher::start(
                limits,
                |j: &Job| j.auth.pan_hash,
                move |jobs| write(pool.clone(), jobs),
            )
        });
        let (done, answer) = oneshot::channel();
        if batcher.submit(Job { auth, done }).is_err() {
            return books::apply(pool, key, req).await;
        }
        match answer.await.map_err(|_| sqlx::Error::WorkerCrashed)?? {
            Some(outcome) => Ok(outcome),
            // Its key was taken: a repeat, answered from the stored posting.
            None => books::repeat(pool, req, &fingerprint).await,
        }
    }
}

async fn write(pool: PgPool, jobs: Vec<Job>) {
    let (auths, dones): (Vec<NewAuth>, Vec<_>) = jobs.into_iter().map(|j| (j.auth, j.done)).unzip();
    let split = write_all(&pool, auths, dones, ON_ERROR, |pool, auths| {
        Box::pin(books::authorise_many(pool, auths))
    })
    .await;
    if let Some(e) = split {
        warn!(error = %e, "a batch of authorisations failed");
    }
}
