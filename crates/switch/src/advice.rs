//! Store and forward: advices (reversal 0420, and later refund and
//! completion 0220) live in PostgreSQL until the issuer answers them.
//!
//! The worker takes due advices with `FOR UPDATE SKIP LOCKED` (several
//! switch processes share the queue), leases them, and sends each on its own
//! task: one stuck advice never holds up the others. The first try goes as
//! 0420, every later one as the repeat 0421, with the same F11 and F7 so the
//! issuer recognises it. Failures back off exponentially per advice. The
//! same loop also gives up on `sent` rows a dead switch left behind.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use iso8583::{Message, MessageWriter, Mti};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::journal;
use crate::link::{LinkError, MatchKey};
use crate::router::Switch;
use group_commit::postgres::Said;

/// An advice taken from the queue.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Due {
    id: i64,
    journal_id: i64,
    kind: String,
    mti: i16,
    issuer: String,
    processing_code: String,
    pos_condition: String,
    amount: i64,
    reason: Option<String>,
    original_mti: Option<i16>,
    original_stan: Option<i32>,
    original_f7: Option<String>,
    /// F32 and F33 the original was sent with (none for one journalled
    /// before they were kept: the config's).
    original_institution_id: Option<String>,
    original_forwarding_id: Option<String>,
    link_stan: i32,
    link_f7: String,
    attempts: i32,
    rrn: String,
    terminal_id: String,
    merchant_id: String,
    /// F32 and F33 of the advice's own row, as every message of it carries
    /// them (none for a row journalled before they were kept).
    institution_id: Option<String>,
    forwarding_id: Option<String>,
}

/// How long the worker lets advices gather after it is woken, so that one
/// statement takes several of them: an advice is not awaited by a terminal
/// (the terminal has its answer), and one that must go first goes at once
/// ([`flush_family`]).
const GATHER: Duration = Duration::from_millis(50);

/// Runs the advice queue until shutdown.
pub async fn run(switch: Arc<Switch>, shutdown: CancellationToken) {
    warn_of_strays(&switch).await;
    let grace = Duration::from_secs(2);
    let mut sending: JoinSet<()> = JoinSet::new();
    // Looking for what a dead switch left is for the poll, not for every
    // wake-up: those come with every reversal and refund under load.
    let mut recovered_at: Option<tokio::time::Instant> = None;
    loop {
        let forgotten_after = switch.config.rules.issuer_timeout + grace;
        let recovery_due =
            recovered_at.is_none_or(|at| at.elapsed() >= switch.config.advice.poll_interval);
        // A connection first, waited for at most until a stop: with the
        // database away, each statement below would wait out the pool's
        // timeout for one, and a stop the whole shutdown grace. Only the
        // wait is given up, never a statement: one already sent runs
        // whether or not its answer is still awaited.
        tokio::select! {
            conn = switch.pool.acquire() => drop(conn),
            () = shutdown.cancelled() => break,
        }
        let recovered = if recovery_due {
            recovered_at = Some(tokio::time::Instant::now());
            journal::recover_forgotten(&switch.pool, forgotten_after).await
        } else {
            Ok(0)
        };
        match recovered {
            Ok(0) => {}
            Ok(n) => info!(
                count = n,
                "reversing transactions left `sent` at the issuer without an outcome (a switch stopped, or the journal failed)"
            ),
            Err(e) => warn!(error = %Said(&e), "recovery sweep failed"),
        }
        if recovery_due && let Err(e) = switch.decide_undecided_reversals(forgotten_after).await {
            warn!(error = %Said(&e), "recovery sweep of undecided reversals failed");
        }
        // At most a batch at the issuer at once: what is still being sent
        // leaves that much less room.
        while sending.try_join_next().is_some() {}
        let room = (switch.config.advice.batch as usize).saturating_sub(sending.len());
        let mut more = false;
        match take_due(&switch, room).await {
            Ok(due) => {
                // As many as there was room for: more may be due (a queue
                // that grew while the issuer was away), taken as soon as
                // there is room again.
                more = room > 0 && due.len() >= room;
                for advice in due {
                    let s = switch.clone();
                    sending.spawn(async move { send(&s, advice).await });
                }
            }
            Err(e) => warn!(error = %Said(&e), "reading the advice queue failed"),
        }
        if more {
            // The next go as soon as any of these is answered, not at the
            // next poll.
            tokio::select! {
                _ = sending.join_next() => {}
                () = shutdown.cancelled() => break,
            }
            continue;
        }
        tokio::select! {
            () = switch.advice_wake.notified() => {
                tokio::select! {
                    () = tokio::time::sleep(GATHER) => {}
                    () = shutdown.cancelled() => break,
                }
            }
            () = tokio::time::sleep(switch.config.advice.poll_interval) => {}
            () = shutdown.cancelled() => break,
        }
    }
    // What is in flight finishes (or times out) and is recorded; what is not
    // taken stays queued for the next start.
    while sending.join_next().await.is_some() {}
}

/// Says at start-up which stored advices are for an issuer the config no
/// longer names (`[[issuers]]`): they stay queued, untouched, until it does.
async fn warn_of_strays(switch: &Switch) {
    let known: Vec<&str> = switch.links.iter().map(|l| l.name()).collect();
    let strays: Result<Vec<(String, i64)>, _> = sqlx::query_as(
        "SELECT issuer, count(*) FROM advices
         WHERE state = 'pending' AND issuer <> ALL($1)
         GROUP BY issuer ORDER BY issuer",
    )
    .bind(&known)
    .fetch_all(&switch.pool)
    .await;
    match strays {
        Ok(strays) => {
            for (issuer, count) in strays {
                warn!(
                    issuer,
                    count,
                    "stored advices for an issuer not in [[issuers]]: they stay queued until it is configured"
                );
            }
        }
        Err(e) => warn!(error = %Said(&e), "reading the advice queue failed"),
    }
}

/// Takes the due advices, leasing them so no other worker takes them while
/// they are being sent. Only those for an issuer whose link is up: the
/// others stay queued, due, and go once it is back (or, for an issuer the
/// config does not name, once it does), with no attempt spent meanwhile.
async fn take_due(switch: &Switch, room: usize) -> Result<Vec<Due>, sqlx::Error> {
    if room == 0 {
        return Ok(Vec::new());
    }
    let up: Vec<&str> = switch
        .links
        .iter()
        .filter(|l| l.is_up())
        .map(|l| l.name())
        .collect();
    if up.is_empty() {
        return Ok(Vec::new());
    }
    take_due_from(
        &switch.pool,
        u32::try_from(room).unwrap_or(u32::MAX),
        switch.config.rules.issuer_timeout * 2,
        &up,
    )
    .await
}

/// [`take_due`] on `pool`: at most `batch` due advices, only for the
/// issuers in `up`, each leased for `lease`.
///
/// An advice waits for an older pending one in its family: a reversal
/// queued earlier goes first (a refund must not reach the issuer before the
/// reversal of the void that made its sale refundable again), and so does
/// the advice of the original it names (a refund of a completion advice).
/// Each candidate's family is found by probes from its own journal row:
/// written as a join over the pending advices, it was a pass over the
/// queue per candidate (13,000 rows read to take 31 of 400), quadratic in
/// a queue that grew while the issuer was away. The states are compared
/// outside the probes so that no plan can read the partial index of
/// pending advices for them, whatever the statistics say.
pub async fn take_due_from(
    pool: &PgPool,
    batch: u32,
    lease: Duration,
    up: &[&str],
) -> Result<Vec<Due>, sqlx::Error> {
    sqlx::query_as::<_, Due>(
        "WITH due AS (
            SELECT a.id FROM advices a JOIN journal j ON j.id = a.journal_id
            WHERE a.state = 'pending' AND a.next_attempt_at <= now() AND a.issuer = ANY($3)
              AND NOT 'pending' = ANY (ARRAY(
                SELECT b.state FROM advices b WHERE b.journal_id = j.original_id AND b.id < a.id))
              AND NOT EXISTS (
                SELECT 1 FROM journal bj
                WHERE bj.original_id = ANY (ARRAY[j.original_id, j.id])
                  AND 'pending' = ANY (ARRAY(
                    SELECT b.state FROM advices b
                    WHERE b.journal_id = bj.id AND b.kind = 'reversal' AND b.id < a.id)))
            ORDER BY a.next_attempt_at LIMIT $1 FOR UPDATE OF a SKIP LOCKED)
         UPDATE advices a SET next_attempt_at = now() + make_interval(secs => $2),
             leased_until = now() + make_interval(secs => $2), attempts = a.attempts + 1
         FROM due, journal j
         WHERE a.id = due.id AND j.id = a.journal_id
         RETURNING a.id, a.journal_id, a.kind, a.mti, a.issuer, a.processing_code, a.pos_condition,
             a.amount, a.reason, a.original_mti, a.original_stan, a.original_f7,
             a.original_institution_id, a.original_forwarding_id, a.link_stan, a.link_f7,
             a.attempts, j.rrn, j.terminal_id, j.merchant_id, j.institution_id, j.forwarding_id",
    )
    .bind(i64::from(batch))
    .bind(lease.as_secs_f64())
    .bind(up)
    .fetch_all(pool)
    .await
}

/// Sends now the pending reversal advices of `original`'s family (the
/// reversal of a void of this sale, say), so that a new request about it
/// does not overtake them at the issuer. True when none is left pending.
/// The family is looked at first, so a request about a family with nothing
/// pending (nearly every one) costs one read. An advice the worker has in
/// flight (leased) is not sent a second time: until its answer is recorded
/// the family is not clear, and the request is declined `91`.
pub(crate) async fn flush_family(switch: &Switch, original: i64) -> Result<bool, sqlx::Error> {
    let clear = || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT NOT EXISTS (SELECT 1 FROM advices a JOIN journal j ON j.id = a.journal_id
             WHERE a.state = 'pending' AND a.kind = 'reversal' AND (j.id = $1 OR j.original_id = $1))",
        )
        .bind(original)
        .fetch_one(&switch.pool)
        .await
    };
    if clear().await? {
        return Ok(true);
    }
    let lease = switch.config.rules.issuer_timeout * 2;
    let due: Vec<Due> = sqlx::query_as(
        "WITH due AS (
            SELECT a.id FROM advices a JOIN journal j ON j.id = a.journal_id
            WHERE a.state = 'pending' AND a.kind = 'reversal' AND (j.id = $1 OR j.original_id = $1)
              AND NOT coalesce(a.leased_until > now(), false)
            ORDER BY a.id FOR UPDATE OF a SKIP LOCKED)
         UPDATE advices a SET next_attempt_at = now() + make_interval(secs => $2),
             leased_until = now() + make_interval(secs => $2), attempts = a.attempts + 1
         FROM due, journal j
         WHERE a.id = due.id AND j.id = a.journal_id
         RETURNING a.id, a.journal_id, a.kind, a.mti, a.issuer, a.processing_code, a.pos_condition,
             a.amount, a.reason, a.original_mti, a.original_stan, a.original_f7,
             a.original_institution_id, a.original_forwarding_id, a.link_stan, a.link_f7,
             a.attempts, j.rrn, j.terminal_id, j.merchant_id, j.institution_id, j.forwarding_id",
    )
    .bind(original)
    .bind(lease.as_secs_f64())
    .fetch_all(&switch.pool)
    .await?;
    for advice in due {
        send(switch, advice).await;
    }
    clear().await
}

/// F90: original MTI, F11, F7, F32, F33, the last two as the original was
/// sent with them.
fn original_data(advice: &Due, config: &Config) -> String {
    format!(
        "{:04}{:06}{:0>10}{:0>11}{:0>11}",
        advice.original_mti.unwrap_or(0),
        advice.original_stan.unwrap_or(0),
        advice.original_f7.as_deref().unwrap_or(""),
        advice
            .original_institution_id
            .as_deref()
            .unwrap_or(&config.institution_id),
        advice
            .original_forwarding_id
            .as_deref()
            .unwrap_or(&config.forwarding_id),
    )
}

async fn send(switch: &Switch, advice: Due) {
    let first = Mti::new(advice.mti as u16).unwrap_or(Mti::REVERSAL_ADVICE);
    // `attempts` counts this try (taken, it is counted): the first send
    // is the only one at 1. A try whose end was never recorded (the switch
    // stopped meanwhile) still counts, so what follows it is a repeat.
    let mti = if advice.attempts <= 1 {
        first
    } else {
        first.repeat()
    };
    let Some(link) = switch.links.iter().find(|l| l.name() == advice.issuer) else {
        // Never sent, so not an attempt ([`take_due`] leaves these queued;
        // [`flush_family`] takes a family's whatever their issuer).
        warn!(advice = advice.id, issuer = %advice.issuer, "no link for this issuer in the config");
        return retry_soon(switch, &advice, "no such issuer in the config").await;
    };
    let cfg = &switch.config;
    let mut buf = BytesMut::with_capacity(256);
    let built = (|| {
        let mut w = MessageWriter::new(&switch.network_dialect, &mut buf, mti, &[], &[])?;
        w.digits(3, &advice.processing_code)?;
        w.number(4, advice.amount as u64)?;
        w.digits(7, &advice.link_f7)?;
        w.number(11, advice.link_stan as u64)?;
        w.digits(25, &advice.pos_condition)?;
        // Every try as the first: the issuer keys a message by its F32.
        w.digits(
            32,
            advice
                .institution_id
                .as_deref()
                .unwrap_or(&cfg.institution_id),
        )?;
        w.digits(
            33,
            advice
                .forwarding_id
                .as_deref()
                .unwrap_or(&cfg.forwarding_id),
        )?;
        w.text(37, &advice.rrn)?;
        if let Some(reason) = &advice.reason {
            w.text(39, reason)?;
        }
        w.text(41, &advice.terminal_id)?;
        w.text(42, &advice.merchant_id)?;
        w.digits(90, &original_data(&advice, cfg))?;
        w.finish()
    })();
    if let Err(e) = built {
        // Never sent, so not an attempt; the dialect will not change until
        // the switch restarts: tried again at the longest wait.
        warn!(advice = advice.id, error = %e, "advice does not fit the network dialect");
        let wait = switch.config.advice.retry_max;
        return retry_after(switch, &advice, &e.to_string(), -1, wait).await;
    }
    let frame = buf.freeze();
    let key = Message::parse(&switch.network_dialect, &frame[2..])
        .ok()
        .as_ref()
        .and_then(MatchKey::of)
        .expect("we built it with F11 and F7");
    match link.exchange(frame, key, cfg.rules.issuer_timeout).await {
        Ok(reply) => {
            let rc = Message::parse(&switch.network_dialect, &reply)
                .ok()
                .and_then(|m| m.text(39).map(str::to_string));
            match rc.as_deref() {
                // Not an answer to the advice: without a code its outcome is
                // unknown, and 96 or 91 say the issuer could not take it now.
                // Sent again, as when no reply came.
                None | Some("96" | "91") => {
                    let why = rc.map_or("a reply without a response code".into(), |rc| {
                        format!("the issuer answered {rc}")
                    });
                    warn!(advice = advice.id, rrn = %advice.rrn, kind = %advice.kind, "{why}: the advice goes again");
                    reschedule(switch, &advice, &why).await;
                }
                Some(rc) => {
                    if let Err(e) = done(switch, &advice, rc).await {
                        warn!(advice = advice.id, error = %Said(&e), "recording an answered advice failed; it will be repeated");
                    } else {
                        info!(advice = advice.id, journal = advice.journal_id, kind = %advice.kind, rrn = %advice.rrn, rc = %rc, "advice answered");
                    }
                }
            }
        }
        // Never sent: the link is down. Not an attempt (the first one that
        // reaches the issuer is still the original MTI), and no longer a
        // wait: the advice goes soon after the link is back, not after a
        // back-off that doubled all through the outage.
        Err(e @ LinkError::NotSent) => {
            retry_soon(switch, &advice, &e.to_string()).await;
        }
        Err(e) => reschedule(switch, &advice, &e.to_string()).await,
    }
}

/// Marks the advice answered and moves its journal entry to its final state
/// ([`journal::answer_advices`], batched with the answers of others).
async fn done(switch: &Switch, advice: &Due, rc: &str) -> Result<(), sqlx::Error> {
    if rc != "00" && advice.kind != "reversal" {
        warn!(advice = advice.id, rrn = %advice.rrn, kind = %advice.kind, rc, "the issuer declined an advice");
    }
    switch.writer.advice_answered(advice.id, rc).await
}

/// Schedules the next try after a failed attempt (counted when it was
/// taken): the wait doubles from `retry_initial` to `retry_max`.
async fn reschedule(switch: &Switch, advice: &Due, error: &str) {
    let cfg = &switch.config.advice;
    let failed_before = (advice.attempts - 1).clamp(0, 20) as u32;
    let wait = cfg
        .retry_initial
        .saturating_mul(2u32.saturating_pow(failed_before))
        .min(cfg.retry_max);
    retry_after(switch, advice, error, 0, wait).await;
}

/// Schedules the next try `retry_initial` from now, and takes back the
/// attempt counted when it was taken: the advice never left.
async fn retry_soon(switch: &Switch, advice: &Due, error: &str) {
    retry_after(
        switch,
        advice,
        error,
        -1,
        switch.config.advice.retry_initial,
    )
    .await;
}

/// Ends a try: `attempts` moves the count by that much.
async fn retry_after(switch: &Switch, advice: &Due, error: &str, attempts: i32, wait: Duration) {
    let result = sqlx::query(
        "UPDATE advices SET attempts = attempts + $4, last_error = $2,
             next_attempt_at = now() + make_interval(secs => $3), leased_until = NULL
         WHERE id = $1 AND state = 'pending'",
    )
    .bind(advice.id)
    .bind(error)
    .bind(wait.as_secs_f64())
    .bind(attempts)
    .execute(&switch.pool)
    .await;
    if let Err(e) = result {
        warn!(advice = advice.id, error = %Said(&e), "rescheduling an advice failed; its lease will expire");
    }
}
