//! Voids, reversals, refunds, pre-authorisation and settlement through the
//! wire: one test per rule and response code of rules.md, the races, and
//! the money at the issuer.

use super::*;
use loadgen::{Original, Reply, Reversed};

/// What a terminal keeps of an approved request to refer to it later.
struct Kept {
    batch: u32,
    stan: u32,
    reply: Reply,
}

impl Kept {
    fn original(&self) -> Original<'_> {
        Original {
            batch: self.batch,
            stan: self.stan,
            rrn: self.reply.field(37).unwrap_or(""),
            auth_code: self.reply.field(38).unwrap_or(""),
            date: self.reply.field(13).unwrap_or(""),
        }
    }

    fn rrn(&self) -> &str {
        self.reply.field(37).unwrap()
    }
}

async fn purchase(t: &mut Terminal, pan: &str, amount: u64) -> Kept {
    let stan = t.next_stan();
    let reply = t
        .exchange(&t.purchase(stan, pan, EXPIRY, amount).unwrap())
        .await
        .unwrap();
    assert_eq!(reply.rc(), "00", "purchase {reply:?}");
    Kept {
        batch: t.batch,
        stan,
        reply,
    }
}

async fn void(t: &mut Terminal, pan: &str, amount: u64, of: &Kept) -> Reply {
    let stan = t.next_stan();
    t.exchange(&t.void(stan, pan, EXPIRY, amount, &of.original()).unwrap())
        .await
        .unwrap()
}

async fn refund(t: &mut Terminal, pan: &str, amount: u64, of: &Kept) -> Reply {
    let stan = t.next_stan();
    t.exchange(&t.refund(stan, pan, EXPIRY, amount, &of.original()).unwrap())
        .await
        .unwrap()
}

/// Waits until every queued advice is answered.
async fn advices_drained(w: &World) {
    w.until(
        Duration::from_secs(15),
        "every advice answered",
        "SELECT NOT EXISTS (SELECT 1 FROM advices WHERE state = 'pending')",
    )
    .await;
}

async fn rule_of(w: &World, rrn: &str) -> (String, Option<String>, Option<i64>) {
    sqlx::query_as("SELECT state, rule, original_id FROM journal WHERE rrn = $1")
        .bind(rrn)
        .fetch_one(&w.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_void_gives_the_money_back_and_cannot_be_voided_or_repeated() {
    let w = world().await;
    let mut t = w.signed_on("T0000001").await;
    let pan = "6222020000000000021";
    let before = w.balance(pan).await;
    let sale = purchase(&mut t, pan, 5_000).await;
    let v = void(&mut t, pan, 5_000, &sale).await;
    assert_eq!(v.rc(), "00", "{v:?}");
    assert_eq!(w.journal_state(sale.rrn()).await, "voided");
    let (state, rule, original) = rule_of(&w, v.field(37).unwrap()).await;
    assert_eq!(
        (state.as_str(), rule.as_deref()),
        ("approved", Some("V1-V6"))
    );
    assert!(original.is_some(), "the audit trail names the original");
    assert_eq!(w.balance(pan).await, before);
    // V5: a sale voided already, and a void itself, cannot be voided.
    assert_eq!(void(&mut t, pan, 5_000, &sale).await.rc(), "12");
    let v_kept = Kept {
        batch: t.batch,
        stan: t.next_stan() - 1,
        reply: v,
    };
    assert_eq!(
        void(&mut t, pan, 5_000, &v_kept).await.rc(),
        "25",
        "a void is not a purchase of this terminal's"
    );
    // F2: a voided sale cannot be refunded.
    assert_eq!(refund(&mut t, pan, 1_000, &sale).await.rc(), "12");
}

#[tokio::test]
async fn void_rules_each_answer_their_code() {
    let w = world().await;
    let mut t = w.signed_on("T0000002").await;
    let pan = "6222020000000000022";
    let sale = purchase(&mut t, pan, 3_000).await;
    // V1: no such original (wrong STAN).
    let missing = Kept {
        batch: sale.batch,
        stan: sale.stan + 500,
        reply: sale.reply.clone(),
    };
    let r = void(&mut t, pan, 3_000, &missing).await;
    assert_eq!(r.rc(), "25");
    assert_eq!(
        rule_of(&w, r.field(37).unwrap()).await.1.as_deref(),
        Some("V1")
    );
    // V3: not the full amount.
    assert_eq!(void(&mut t, pan, 2_999, &sale).await.rc(), "64");
    // V4: another card.
    assert_eq!(
        void(&mut t, "6222020000000000023", 3_000, &sale).await.rc(),
        "14"
    );
    // V2: after settlement the batch is closed; only a refund works.
    let stan = t.next_stan();
    let totals = format!("{:012}{:03}{:012}{:03}0{}", 3_000, 1, 0, 0, "0".repeat(31));
    let s = t
        .exchange(&t.settlement(stan, &totals).unwrap())
        .await
        .unwrap();
    assert_eq!(s.rc(), "00");
    t.sign_on().await.unwrap();
    assert_eq!(void(&mut t, pan, 3_000, &sale).await.rc(), "12");
    assert_eq!(refund(&mut t, pan, 3_000, &sale).await.rc(), "00");
}

#[tokio::test]
async fn void_last_only_refuses_all_but_the_last_transaction() {
    let w = world_with(|c| c.rules.void_last_only = true).await;
    let mut t = w.signed_on("T0000003").await;
    let pan = "6222020000000000024";
    let first = purchase(&mut t, pan, 100).await;
    let last = purchase(&mut t, pan, 200).await;
    let r = void(&mut t, pan, 100, &first).await;
    assert_eq!(r.rc(), "12");
    assert_eq!(
        rule_of(&w, r.field(37).unwrap()).await.1.as_deref(),
        Some("V6")
    );
    assert_eq!(void(&mut t, pan, 200, &last).await.rc(), "00");
}

#[tokio::test]
async fn of_two_concurrent_voids_exactly_one_wins() {
    let w = world().await;
    let mut t = w.signed_on("T0000004").await;
    let pan = "6222020000000000025";
    let before = w.balance(pan).await;
    let sale = purchase(&mut t, pan, 4_000).await;
    let mut tasks = Vec::new();
    for i in 0..4 {
        let mut other = w.signed_on("T0000004").await;
        let original = (sale.batch, sale.stan, sale.rrn().to_string());
        tasks.push(tokio::spawn(async move {
            let stan = 100 + i;
            let o = Original {
                batch: original.0,
                stan: original.1,
                rrn: &original.2,
                auth_code: "",
                date: "",
            };
            other
                .exchange(&other.void(stan, pan, EXPIRY, 4_000, &o).unwrap())
                .await
                .unwrap()
                .rc()
                .to_string()
        }));
    }
    let codes: Vec<String> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(codes.iter().filter(|c| *c == "00").count(), 1, "{codes:?}");
    assert!(codes.iter().all(|c| c == "00" || c == "12"), "{codes:?}");
    assert_eq!(w.balance(pan).await, before, "credited back once");
}

#[tokio::test]
async fn refunds_may_be_partial_and_repeated_but_never_exceed_the_original() {
    let w = world().await;
    let mut t = w.signed_on("T0000005").await;
    let pan = "6222020000000000026";
    let before = w.balance(pan).await;
    let sale = purchase(&mut t, pan, 10_000).await;
    assert_eq!(refund(&mut t, pan, 4_000, &sale).await.rc(), "00");
    assert_eq!(w.journal_state(sale.rrn()).await, "partially_refunded");
    assert_eq!(refund(&mut t, pan, 7_000, &sale).await.rc(), "61", "F3");
    assert_eq!(refund(&mut t, pan, 6_000, &sale).await.rc(), "00");
    assert_eq!(w.journal_state(sale.rrn()).await, "refunded");
    assert_eq!(
        refund(&mut t, pan, 1, &sale).await.rc(),
        "12",
        "F2: nothing left to refund"
    );
    // F1: no such RRN.
    let mut unknown = Kept {
        batch: sale.batch,
        stan: sale.stan,
        reply: sale.reply.clone(),
    };
    unknown.reply.fields.insert(37, "999999999999".into());
    assert_eq!(refund(&mut t, pan, 1, &unknown).await.rc(), "25");
    advices_drained(&w).await;
    assert_eq!(
        w.balance(pan).await,
        before,
        "refunded in full at the issuer, once"
    );
}

#[tokio::test]
async fn concurrent_partial_refunds_never_sum_above_the_original() {
    let w = world().await;
    let mut t = w.signed_on("T0000006").await;
    let pan = "6222020000000000027";
    let sale = purchase(&mut t, pan, 1_000).await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let mut other = w.signed_on("T0000006").await;
        let (batch, stan, rrn, date) = (
            sale.batch,
            sale.stan,
            sale.rrn().to_string(),
            sale.reply.field(13).unwrap().to_string(),
        );
        tasks.push(tokio::spawn(async move {
            let o = Original {
                batch,
                stan,
                rrn: &rrn,
                auth_code: "",
                date: &date,
            };
            other
                .exchange(&other.refund(200 + i, pan, EXPIRY, 300, &o).unwrap())
                .await
                .unwrap()
                .rc()
                .to_string()
        }));
    }
    let codes: Vec<String> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        codes.iter().filter(|c| *c == "00").count(),
        3,
        "3 x 300 fit in 1,000: {codes:?}"
    );
    let refunded: i64 = sqlx::query_scalar("SELECT refunded_amount FROM journal WHERE rrn = $1")
        .bind(sale.rrn())
        .fetch_one(&w.pool)
        .await
        .unwrap();
    assert_eq!(refunded, 900);
}

#[tokio::test]
async fn same_day_refund_deny_sends_the_merchant_to_void() {
    let w = world_with(|c| c.rules.same_day_refund = switch::config::SameDayRefund::Deny).await;
    let mut t = w.signed_on("T0000007").await;
    let pan = "6222020000000000028";
    let sale = purchase(&mut t, pan, 500).await;
    let r = refund(&mut t, pan, 500, &sale).await;
    assert_eq!(r.rc(), "12");
    assert_eq!(
        rule_of(&w, r.field(37).unwrap()).await.1.as_deref(),
        Some("F5")
    );
}

fn reversed<'a>(kept: &'a Kept, pan: &'a str, amount: u64, f60: &'a str) -> Reversed<'a> {
    Reversed {
        pan,
        processing_code: "000000",
        amount,
        stan: kept.stan,
        condition: "00",
        f60,
        f61: None,
    }
}

#[tokio::test]
async fn a_reversal_undoes_the_purchase_once_however_often_it_is_sent() {
    let w = world().await;
    let mut t = w.signed_on("T0000008").await;
    let pan = "6222020000000000029";
    let before = w.balance(pan).await;
    let sale = purchase(&mut t, pan, 2_500).await;
    let f60 = t.f60("22");
    let frame = t
        .reversal(&reversed(&sale, pan, 2_500, &f60), "98")
        .unwrap();
    let r = t.exchange(&frame).await.unwrap();
    assert_eq!(r.mti.to_string(), "0410");
    assert_eq!(r.rc(), "00");
    assert_eq!(w.journal_state(sale.rrn()).await, "reversed");
    let again = t.exchange(&frame).await.unwrap();
    assert_eq!(again.rc(), "00");
    assert_eq!(again.body, r.body, "a repeated reversal changes nothing");
    advices_drained(&w).await;
    assert_eq!(w.balance(pan).await, before);
    let reason: String = sqlx::query_scalar(
        "SELECT reversal_reason FROM journal WHERE kind = 'reversal' AND terminal_id = 'T0000008'",
    )
    .fetch_one(&w.pool)
    .await
    .unwrap();
    assert_eq!(reason, "98", "the audit keeps the reversal reason");
}

#[tokio::test]
async fn a_reversal_into_a_settled_batch_leaves_its_stan_free_in_the_next() {
    let w = world().await;
    let mut t = w.signed_on("T0000014").await;
    let pan = "6222020000000000035";
    let before = w.balance(pan).await;
    let sale = purchase(&mut t, pan, 1_000).await;
    let totals = format!("{:012}{:03}{:012}{:03}0{}", 1_000, 1, 0, 0, "0".repeat(31));
    let stan = t.next_stan();
    let settled = t
        .exchange(&t.settlement(stan, &totals).unwrap())
        .await
        .unwrap();
    assert_eq!(settled.rc(), "00");
    // S1: the settled sale cannot be reversed any more.
    let old_f60 = t.f60("22");
    let late = t
        .reversal(&reversed(&sale, pan, 1_000, &old_f60), "98")
        .unwrap();
    assert_eq!(t.exchange(&late).await.unwrap().rc(), "12");
    // The next batch's transaction of the same STAN is a new one, and its
    // reversal is not the refused one repeated (D1's key holds the batch).
    let signed = t.sign_on().await.unwrap();
    assert_eq!(signed.rc(), "00");
    let reply = t
        .exchange(&t.purchase(sale.stan, pan, EXPIRY, 700).unwrap())
        .await
        .unwrap();
    assert_eq!(reply.rc(), "00");
    let next = Kept {
        batch: t.batch,
        stan: sale.stan,
        reply,
    };
    let f60 = t.f60("22");
    let reversal = t.reversal(&reversed(&next, pan, 700, &f60), "98").unwrap();
    let r = t.exchange(&reversal).await.unwrap();
    assert_eq!(r.rc(), "00", "{r:?}");
    assert_eq!(r.field(60).map(|f| &f[2..8]), Some(&f60[2..8]));
    assert_eq!(w.journal_state(next.rrn()).await, "reversed");
    // The refused one, repeated, is still refused.
    assert_eq!(t.exchange(&late).await.unwrap().rc(), "12");
    advices_drained(&w).await;
    assert_eq!(
        w.balance(pan).await,
        before - 1_000,
        "the settled sale stands"
    );
}

#[tokio::test]
async fn a_reversal_the_journal_failed_under_is_taken_over_by_its_repeat_at_once() {
    // No recovery sweep meanwhile: the repeat is what decides it here.
    let w = world_with(|c| c.advice.poll_interval = Duration::from_secs(600)).await;
    // A switch that would wait 32 s (issuer_timeout + 2 s) for a row another
    // switch may still be deciding.
    let (mut t, shutdown) = failing_reversals(&w, "T0000010", |c| {
        c.rules.issuer_timeout = Duration::from_secs(30);
    })
    .await;
    let pan = "6222020000000000032";
    let sale = purchase(&mut t, pan, 3_300).await;
    let f60 = t.f60("22");
    let frame = t
        .reversal(&reversed(&sale, pan, 3_300, &f60), "98")
        .unwrap();
    // The reversal's row is written; reading its original then fails.
    reversal_left_undecided(&w, &mut t, &frame).await;
    // The repeat: this switch gave the row up, so it is taken over now,
    // not after 32 s.
    let again = tokio::time::timeout(Duration::from_secs(10), t.exchange(&frame))
        .await
        .expect("answered without waiting out issuer_timeout")
        .unwrap();
    assert_eq!(again.rc(), "00");
    assert_eq!(w.journal_state(sale.rrn()).await, "reversed");
    shutdown.cancel();
}

#[tokio::test]
async fn a_reversal_its_switch_died_deciding_is_taken_over_by_the_repeat() {
    // No recovery sweep meanwhile: the repeat is what decides it here.
    let w = world_with(|c| c.advice.poll_interval = Duration::from_secs(600)).await;
    let mut t = w.signed_on("T0000009").await;
    let pan = "6222020000000000031";
    let before = w.balance(pan).await;
    let sale = purchase(&mut t, pan, 4_200).await;
    let f60 = t.f60("22");
    let frame = t
        .reversal(&reversed(&sale, pan, 4_200, &f60), "98")
        .unwrap();
    assert_eq!(t.exchange(&frame).await.unwrap().rc(), "00");
    advices_drained(&w).await;
    // Rewind to what a switch killed right after journalling the 0400
    // leaves: the reversal `received`, undecided, an hour ago; the sale
    // approved; no advice.
    let mut tx = w.pool.begin().await.unwrap();
    for sql in [
        "UPDATE journal SET state = 'approved' WHERE rrn = $1",
        "DELETE FROM advices WHERE journal_id = (SELECT id FROM journal WHERE rrn = $1)",
        "UPDATE journal SET state = 'received', response_code = NULL, reply = NULL, rule = NULL,
             received_at = now() - interval '1 hour'
         WHERE kind = 'reversal' AND original_id = (SELECT id FROM journal WHERE rrn = $1)",
    ] {
        sqlx::query(sql)
            .bind(sale.rrn())
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    // The terminal, never answered, sends it again: it is decided now, not 96.
    let r = t.exchange(&frame).await.unwrap();
    assert_eq!(r.rc(), "00");
    assert_eq!(w.journal_state(sale.rrn()).await, "reversed");
    let again = t.exchange(&frame).await.unwrap();
    assert_eq!(
        again.body, r.body,
        "and its reply is stored for the next repeat"
    );
    advices_drained(&w).await;
    assert_eq!(w.balance(pan).await, before, "reversed once at the issuer");
}

/// A terminal of a switch of its own (the tests' config changed by
/// `tweak`), signed on, on `w`'s database, whose connections give up on a
/// lock after 300 ms: [`reversal_left_undecided`] makes the journal fail
/// under a reversal once its row is written. The returned token stops the
/// switch.
async fn failing_reversals(
    w: &World,
    terminal: &str,
    tweak: impl FnOnce(&mut Config),
) -> (Terminal, CancellationToken) {
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&w.pool)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{db}\" SET lock_timeout = '300ms'"
    )))
    .execute(&w.pool)
    .await
    .unwrap();
    let (_switch, addr, stop) = w.another_switch_with(tweak).await;
    let mut t = Terminal::connect(&addr, terminal, MERCHANT, w.dialect.clone())
        .await
        .unwrap();
    assert_eq!(t.sign_on().await.unwrap().rc(), "00");
    (t, stop)
}

/// Sends `frame` (a reversal) while the advices are locked away: its row
/// is written, the read of its original fails, it is answered 96 and left
/// `received`, as a journal outage or a kill between the insert and the
/// decision leaves it.
async fn reversal_left_undecided(w: &World, t: &mut Terminal, frame: &[u8]) {
    let mut lock = w.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE advices IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    assert_eq!(t.exchange(frame).await.unwrap().rc(), "96");
    lock.commit().await.unwrap();
    let state: String = sqlx::query_scalar(
        "SELECT state FROM journal WHERE kind = 'reversal' AND terminal_id = $1",
    )
    .bind(&t.id)
    .fetch_one(&w.pool)
    .await
    .unwrap();
    assert_eq!(state, "received", "left undecided by the failed read");
}

/// A sale of `amount` through [`failing_reversals`]' switch, and its
/// reversal left undecided: the terminal, that switch's stop token, the
/// sale and the reversal's frame.
async fn a_sale_and_its_undecided_reversal(
    w: &World,
    terminal: &str,
    pan: &str,
    amount: u64,
) -> (Terminal, CancellationToken, Kept, bytes::BytesMut) {
    // No sweep of this switch's meanwhile (the world's must not sweep either).
    let (mut t, stop) = failing_reversals(w, terminal, |c| {
        c.advice.poll_interval = Duration::from_secs(600);
    })
    .await;
    let sale = purchase(&mut t, pan, amount).await;
    let f60 = t.f60("22");
    let frame = t
        .reversal(&reversed(&sale, pan, amount, &f60), "98")
        .unwrap();
    reversal_left_undecided(w, &mut t, &frame).await;
    (t, stop, sale, frame)
}

#[tokio::test]
async fn a_reversal_its_terminal_never_repeats_is_decided_by_the_recovery_sweep() {
    let w = world_with(|c| c.advice.poll_interval = Duration::from_secs(600)).await;
    let pan = "6222020000000000036";
    let before = w.balance(pan).await;
    let (t, stop, sale, frame) =
        a_sale_and_its_undecided_reversal(&w, "T0000011", pan, 2_700).await;
    assert_eq!(w.balance(pan).await, before - 2_700, "the sale charged");
    // Its switch stops, and the terminal gives up: nobody repeats the 0400.
    stop.cancel();
    drop(t);
    // A switch that sweeps: the row is past what a live switch may take
    // (issuer_timeout + 2 s), so the sweep decides it.
    let (_sweeper, _addr, sweeper_stop) = w.another_switch().await;
    w.until(
        Duration::from_secs(15),
        "the sale reversed by the sweep",
        &format!(
            "SELECT state = 'reversed' FROM journal WHERE rrn = '{}'",
            sale.rrn()
        ),
    )
    .await;
    let (rrn, state, rule, rc, reply): (
        String,
        String,
        Option<String>,
        Option<String>,
        Option<Vec<u8>>,
    ) = sqlx::query_as(
        "SELECT rrn, state, rule, response_code, reply FROM journal
             WHERE kind = 'reversal' AND terminal_id = 'T0000011'",
    )
    .fetch_one(&w.pool)
    .await
    .unwrap();
    assert_eq!(
        (state.as_str(), rule.as_deref(), rc.as_deref()),
        ("approved", Some("R2"), Some("00"))
    );
    assert_eq!(reply, None, "no terminal was waiting for a reply");
    // The operator's history says how the sale was named, and that the
    // terminal may not know the reversal's outcome.
    let history = switch::audit::history(&w.pool, &switch::audit::Selector::Rrn(rrn.clone()))
        .await
        .unwrap()
        .expect("the reversal's history");
    let text = history.to_text();
    assert!(
        text.contains(&format!("named as 11={:06} 60.1=22", sale.stan)),
        "{text}"
    );
    assert_eq!(text.matches("no reply stored").count(), 1, "{text}");
    assert!(!text.contains(pan), "{text}");
    advices_drained(&w).await;
    assert_eq!(w.balance(pan).await, before, "reversed at the issuer");
    // A repeat that comes after all hears the reversal approved, at once:
    // not after waiting for a reply (here 32 s) that will never be stored.
    let (_late, late_addr, late_stop) = w
        .another_switch_with(|c| c.rules.issuer_timeout = Duration::from_secs(30))
        .await;
    let mut t = Terminal::connect(&late_addr, "T0000011", MERCHANT, w.dialect.clone())
        .await
        .unwrap();
    let again = tokio::time::timeout(Duration::from_secs(10), t.exchange(&frame))
        .await
        .expect("answered without waiting out issuer_timeout")
        .unwrap();
    assert_eq!(again.rc(), "00");
    assert_eq!(again.field(37), Some(rrn.as_str()), "the reversal's RRN");
    advices_drained(&w).await;
    assert_eq!(w.balance(pan).await, before, "and not reversed twice");
    sweeper_stop.cancel();
    late_stop.cancel();
}

#[tokio::test]
async fn the_sweep_finds_the_preauth_of_a_reversal_written_before_reversals_kept_f60() {
    let w = world_with(|c| c.advice.poll_interval = Duration::from_secs(600)).await;
    let (mut t, stop) = failing_reversals(&w, "T0000012", |c| {
        c.advice.poll_interval = Duration::from_secs(600);
    })
    .await;
    let pan = "6222020000000000037";
    let stan = t.next_stan();
    let pa = t
        .exchange(&t.preauth(stan, pan, EXPIRY, 6_000).unwrap())
        .await
        .unwrap();
    assert_eq!(pa.rc(), "00");
    let preauth = Kept {
        batch: t.batch,
        stan,
        reply: pa,
    };
    let f60 = t.f60("10");
    let mut asked = reversed(&preauth, pan, 6_000, &f60);
    asked.processing_code = "030000";
    asked.condition = "06";
    let frame = t.reversal(&asked, "98").unwrap();
    reversal_left_undecided(&w, &mut t, &frame).await;
    stop.cancel();
    // As an earlier version journalled it: without F60.1, the original's
    // MTI class (0100 here) unknown.
    sqlx::query("UPDATE journal SET original_ref = NULL WHERE kind = 'reversal'")
        .execute(&w.pool)
        .await
        .unwrap();
    let (_sweeper, _addr, sweeper_stop) = w.another_switch().await;
    w.until(
        Duration::from_secs(15),
        "the pre-authorisation reversed by the sweep",
        &format!(
            "SELECT state = 'reversed' FROM journal WHERE rrn = '{}'",
            preauth.rrn()
        ),
    )
    .await;
    advices_drained(&w).await;
    sweeper_stop.cancel();
}

#[tokio::test]
async fn the_sweep_applies_no_reversal_to_a_batch_settled_meanwhile() {
    let w = world_with(|c| c.advice.poll_interval = Duration::from_secs(600)).await;
    let pan = "6222020000000000038";
    let before = w.balance(pan).await;
    let (mut t, stop, sale, _) =
        a_sale_and_its_undecided_reversal(&w, "T0000013", pan, 1_300).await;
    // The batch settles with the sale in it (the settlement waits out the
    // undecided reversal, then closes the batch as it is).
    let totals = format!("{:012}{:03}{:012}{:03}0{}", 1_300, 1, 0, 0, "0".repeat(31));
    let stan = t.next_stan();
    let settled = t
        .exchange(&t.settlement(stan, &totals).unwrap())
        .await
        .unwrap();
    assert_eq!(settled.rc(), "00");
    stop.cancel();
    let (_sweeper, _addr, sweeper_stop) = w.another_switch().await;
    w.until(
        Duration::from_secs(15),
        "the reversal declined by the sweep",
        "SELECT state = 'declined' FROM journal WHERE kind = 'reversal' AND terminal_id = 'T0000013'",
    )
    .await;
    let rule: Option<String> = sqlx::query_scalar(
        "SELECT rule FROM journal WHERE kind = 'reversal' AND terminal_id = 'T0000013'",
    )
    .fetch_one(&w.pool)
    .await
    .unwrap();
    assert_eq!(rule.as_deref(), Some("S1"));
    assert_eq!(w.journal_state(sale.rrn()).await, "approved");
    advices_drained(&w).await;
    assert_eq!(
        w.balance(pan).await,
        before - 1_300,
        "the settled sale stands"
    );
    sweeper_stop.cancel();
}

#[tokio::test]
async fn reversal_rules_r3_r4_r5() {
    let w = world().await;
    let mut t = w.signed_on("T0000009").await;
    let pan = "6222020000000000030";
    let f60 = t.f60("22");
    // R3: nothing to reverse (the original never arrived): 00 all the same.
    let ghost = Kept {
        batch: t.batch,
        stan: 777,
        reply: Reply {
            mti: iso8583::Mti::FINANCIAL,
            prefix: vec![],
            fields: Default::default(),
            body: Default::default(),
            mac_valid: None,
        },
    };
    let r = t
        .exchange(&t.reversal(&reversed(&ghost, pan, 100, &f60), "98").unwrap())
        .await
        .unwrap();
    assert_eq!(r.rc(), "00");
    // R4: another amount.
    let sale = purchase(&mut t, pan, 1_000).await;
    let r = t
        .exchange(&t.reversal(&reversed(&sale, pan, 999, &f60), "06").unwrap())
        .await
        .unwrap();
    assert_eq!(r.rc(), "64");
    // R5: a reversal on the next business day is not applied.
    let other = purchase(&mut t, pan, 1_100).await;
    sqlx::query("UPDATE journal SET business_date = business_date - 1 WHERE rrn = $1")
        .bind(other.rrn())
        .execute(&w.pool)
        .await
        .unwrap();
    let r = t
        .exchange(
            &t.reversal(&reversed(&other, pan, 1_100, &f60), "98")
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.rc(), "12");
    assert_eq!(w.journal_state(other.rrn()).await, "approved");
}

/// A purchase of `amount` sent from one connection of `terminal` and, while
/// it is at the issuer, its reversal (98) from another, answered 00 (R3).
/// Returns the first connection, its purchase's reply still to come.
async fn reversed_while_at_the_issuer(
    w: &World,
    terminal: &str,
    pan: &str,
    amount: u64,
) -> Terminal {
    let mut a = w.signed_on(terminal).await;
    let mut b = w.signed_on(terminal).await;
    let stan = a.next_stan();
    a.send_raw(&a.purchase(stan, pan, EXPIRY, amount).unwrap())
        .await
        .unwrap();
    w.until(
        Duration::from_secs(5),
        "the sale at the issuer",
        &format!(
            "SELECT EXISTS (SELECT 1 FROM journal WHERE terminal_id = '{terminal}' AND state = 'sent')"
        ),
    )
    .await;
    let f60 = a.f60("22");
    let kept = Kept {
        batch: a.batch,
        stan,
        reply: Reply {
            mti: iso8583::Mti::FINANCIAL,
            prefix: vec![],
            fields: Default::default(),
            body: Default::default(),
            mac_valid: None,
        },
    };
    let r = b
        .exchange(
            &b.reversal(&reversed(&kept, pan, amount, &f60), "98")
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.rc(), "00");
    a
}

#[tokio::test]
async fn a_reversal_that_overtakes_its_original_reverses_it_when_the_approval_comes() {
    let w = world().await;
    w.issuer
        .faults()
        .update(|f| f.latency = issuer_sim::Latency::Fixed(Duration::from_millis(600)));
    let pan = "6222020000000000031";
    let before = w.balance(pan).await;
    let mut a = reversed_while_at_the_issuer(&w, "T0000010", pan, 3_300).await;
    let sale = a.recv().await.unwrap();
    w.issuer.faults().clear();
    assert_eq!(
        w.journal_state(sale.field(37).unwrap()).await,
        "reversed",
        "R3: reversed as soon as the approval came"
    );
    advices_drained(&w).await;
    assert_eq!(w.balance(pan).await, before);
}

#[tokio::test]
async fn a_reversal_that_overtakes_an_original_the_issuer_never_answers_tells_it_68() {
    let w = world().await;
    w.issuer.faults().update(|f| f.drop_reply = 1.0);
    let pan = "6222020000000000033";
    let before = w.balance(pan).await;
    let mut a = reversed_while_at_the_issuer(&w, "T0000012", pan, 3_400).await;
    // No answer in time: the sale ends unknown, and the issuer is told
    // why it is reversed: no timely answer (68), not "other" (06).
    assert_eq!(a.recv().await.unwrap().rc(), "98");
    let reason: Option<String> = sqlx::query_scalar(
        "SELECT a.reason FROM advices a JOIN journal j ON j.id = a.journal_id
         WHERE j.terminal_id = 'T0000012' AND j.kind = 'purchase'",
    )
    .fetch_one(&w.pool)
    .await
    .unwrap();
    assert_eq!(reason.as_deref(), Some("68"));
    w.issuer.faults().clear();
    advices_drained(&w).await;
    assert_eq!(w.balance(pan).await, before);
}

#[tokio::test]
async fn a_reversal_of_a_void_restores_the_sale() {
    let w = world().await;
    let mut t = w.signed_on("T0000011").await;
    let pan = "6222020000000000032";
    let before = w.balance(pan).await;
    let sale = purchase(&mut t, pan, 6_000).await;
    let stan = t.next_stan();
    let v = t
        .exchange(&t.void(stan, pan, EXPIRY, 6_000, &sale.original()).unwrap())
        .await
        .unwrap();
    assert_eq!(v.rc(), "00");
    let f60 = t.f60("23");
    let f61 = format!("{:06}{:06}", sale.batch, sale.stan);
    let of_void = Reversed {
        pan,
        processing_code: "200000",
        amount: 6_000,
        stan,
        condition: "00",
        f60: &f60,
        f61: Some(&f61),
    };
    let r = t
        .exchange(&t.reversal(&of_void, "98").unwrap())
        .await
        .unwrap();
    assert_eq!(r.rc(), "00");
    assert_eq!(
        w.journal_state(sale.rrn()).await,
        "approved",
        "the sale stands again"
    );
    assert_eq!(w.journal_state(v.field(37).unwrap()).await, "reversed");
    advices_drained(&w).await;
    assert_eq!(
        w.balance(pan).await,
        before - 6_000,
        "the issuer debits again, once"
    );
}

#[tokio::test]
async fn preauth_cancel_completion_and_their_rules() {
    let w = world().await;
    let mut t = w.signed_on("T0000012").await;
    let pan = "6222020000000000033";
    let before = w.balance(pan).await;
    let stan = t.next_stan();
    let pa = t
        .exchange(&t.preauth(stan, pan, EXPIRY, 10_000).unwrap())
        .await
        .unwrap();
    assert_eq!(pa.mti.to_string(), "0110");
    assert_eq!(pa.rc(), "00");
    let pa = Kept {
        batch: t.batch,
        stan,
        reply: pa,
    };
    // V5: a purchase void whose F61 names the pre-authorisation names a
    // transaction, of the wrong kind: 12, not 25 (V1 keys by batch and STAN).
    let r = void(&mut t, pan, 10_000, &pa).await;
    assert_eq!(r.rc(), "12", "{r:?}");
    assert_eq!(
        rule_of(&w, r.field(37).unwrap()).await.1.as_deref(),
        Some("V5")
    );
    // P3: a completion may exceed the pre-auth by the tolerance (15%), not more.
    let stan = t.next_stan();
    let over = t
        .exchange(
            &t.completion(stan, pan, EXPIRY, 11_501, &pa.original())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(over.rc(), "64");
    // P1: an unknown auth code.
    let mut wrong = pa.original();
    wrong.auth_code = "000000";
    let stan = t.next_stan();
    assert_eq!(
        t.exchange(&t.completion(stan, pan, EXPIRY, 100, &wrong).unwrap())
            .await
            .unwrap()
            .rc(),
        "25"
    );
    let completion_stan = t.next_stan();
    let done = t
        .exchange(
            &t.completion(completion_stan, pan, EXPIRY, 11_500, &pa.original())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(done.rc(), "00");
    assert_eq!(w.journal_state(pa.rrn()).await, "completed");
    // A pre-auth completes once, and a completed one cannot be cancelled.
    let stan = t.next_stan();
    assert_eq!(
        t.exchange(
            &t.completion(stan, pan, EXPIRY, 100, &pa.original())
                .unwrap()
        )
        .await
        .unwrap()
        .rc(),
        "12"
    );
    let stan = t.next_stan();
    assert_eq!(
        t.exchange(
            &t.preauth_cancel(stan, pan, EXPIRY, 10_000, &pa.original())
                .unwrap()
        )
        .await
        .unwrap()
        .rc(),
        "12"
    );
    assert_eq!(w.balance(pan).await, before - 11_500);
    // Completion void gives the completion back.
    let completion = Kept {
        batch: t.batch,
        stan: completion_stan,
        reply: done,
    };
    let stan = t.next_stan();
    let cv = t
        .exchange(
            &t.completion_void(stan, pan, EXPIRY, 11_500, &completion.original())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(cv.rc(), "00");
    assert_eq!(w.balance(pan).await, before);
}

#[tokio::test]
async fn preauth_cancel_needs_the_full_amount_and_a_valid_preauth() {
    let w = world().await;
    let mut t = w.signed_on("T0000013").await;
    let pan = "6222020000000000034";
    let stan = t.next_stan();
    let pa = t
        .exchange(&t.preauth(stan, pan, EXPIRY, 5_000).unwrap())
        .await
        .unwrap();
    let pa = Kept {
        batch: t.batch,
        stan,
        reply: pa,
    };
    let stan = t.next_stan();
    assert_eq!(
        t.exchange(
            &t.preauth_cancel(stan, pan, EXPIRY, 4_000, &pa.original())
                .unwrap()
        )
        .await
        .unwrap()
        .rc(),
        "64"
    );
    // P2: past preauth_valid_days.
    sqlx::query("UPDATE journal SET business_date = business_date - 31 WHERE rrn = $1")
        .bind(pa.rrn())
        .execute(&w.pool)
        .await
        .unwrap();
    let shifted: String =
        sqlx::query_scalar("SELECT to_char(business_date, 'MMDD') FROM journal WHERE rrn = $1")
            .bind(pa.rrn())
            .fetch_one(&w.pool)
            .await
            .unwrap();
    let stan = t.next_stan();
    let mut old = pa.original();
    old.date = &shifted;
    assert_eq!(
        t.exchange(&t.preauth_cancel(stan, pan, EXPIRY, 5_000, &old).unwrap())
            .await
            .unwrap()
            .rc(),
        "12"
    );
}

#[tokio::test]
async fn a_completion_advice_is_answered_at_once_and_forwarded() {
    let w = world().await;
    let mut t = w.signed_on("T0000014").await;
    let pan = "6222020000000000035";
    let before = w.balance(pan).await;
    let stan = t.next_stan();
    let pa = t
        .exchange(&t.preauth(stan, pan, EXPIRY, 8_000).unwrap())
        .await
        .unwrap();
    let pa = Kept {
        batch: t.batch,
        stan,
        reply: pa,
    };
    let stan = t.next_stan();
    let r = t
        .exchange(
            &t.completion_advice(stan, pan, EXPIRY, 7_000, &pa.original())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.mti.to_string(), "0230");
    assert_eq!(r.rc(), "00");
    advices_drained(&w).await;
    assert_eq!(w.balance(pan).await, before - 7_000);
}

#[tokio::test]
async fn settlement_balances_or_not_closes_the_batch_and_upload_is_recorded() {
    let w = world().await;
    let mut t = w.signed_on("T0000015").await;
    let pan = "6222020000000000036";
    let a = purchase(&mut t, pan, 1_000).await;
    let _b = purchase(&mut t, pan, 2_000).await;
    assert_eq!(void(&mut t, pan, 1_000, &a).await.rc(), "00");
    assert_eq!(refund(&mut t, pan, 500, &_b).await.rc(), "00");
    let batch = t.batch;
    // Debits: both purchases (3,000, 2); credits: the void and the refund (1,500, 2).
    let ours = format!(
        "{:012}{:03}{:012}{:03}0{}",
        3_000,
        2,
        1_500,
        2,
        "0".repeat(31)
    );
    let stan = t.next_stan();
    let s = t
        .exchange(&t.settlement(stan, &ours).unwrap())
        .await
        .unwrap();
    assert_eq!(s.rc(), "00");
    assert_eq!(
        s.field(48).unwrap(),
        format!(
            "{:012}{:03}{:012}{:03}1{}1",
            3_000,
            2,
            1_500,
            2,
            "0".repeat(30)
        )
    );
    let next: i32 = sqlx::query_scalar("SELECT batch FROM terminals WHERE id = 'T0000015'")
        .fetch_one(&w.pool)
        .await
        .unwrap();
    assert_eq!(
        next as u32,
        batch + 1,
        "the batch is closed and the next one open"
    );
    let stan = t.next_stan();
    let up = t
        .exchange(
            &t.batch_upload(stan, batch, &[(a.stan, pan, 1_000)])
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(up.rc(), "00");
    let stan = t.next_stan();
    assert_eq!(
        t.exchange(&t.batch_upload(stan, batch, &[]).unwrap())
            .await
            .unwrap()
            .rc(),
        "00"
    );
    let stored: String =
        sqlx::query_scalar("SELECT pan_masked FROM batch_uploads WHERE terminal_id = 'T0000015'")
            .fetch_one(&w.pool)
            .await
            .unwrap();
    assert_eq!(stored, "622202*********0036");
    // The next batch, settled with figures the switch does not share.
    t.sign_on().await.unwrap();
    purchase(&mut t, pan, 700).await;
    let wrong = format!("{:012}{:03}{:012}{:03}0{}", 999, 1, 0, 0, "0".repeat(31));
    let stan = t.next_stan();
    let s = t
        .exchange(&t.settlement(stan, &wrong).unwrap())
        .await
        .unwrap();
    assert_eq!(s.rc(), "00");
    assert_eq!(
        s.field(48).unwrap(),
        format!("{:012}{:03}{:012}{:03}2{}1", 700, 1, 0, 0, "0".repeat(30)),
        "the domestic part the journal's figures and 2; the foreign, which match, 1"
    );
    let balanced: Vec<bool> = sqlx::query_scalar(
        "SELECT balanced FROM settlements WHERE terminal_id = 'T0000015' ORDER BY batch",
    )
    .fetch_all(&w.pool)
    .await
    .unwrap();
    assert_eq!(balanced, [true, false]);
    // The report shows the switch's figures with the codes it answered.
    let report = switch::audit::settlement_report(&w.pool, "T0000015", t.batch as i32)
        .await
        .unwrap()
        .to_text();
    assert!(
        report.contains(
            "switch   domestic debits 700 fen (1), credits 0 fen (0), code 2; foreign debits 0 fen (0), credits 0 fen (0), code 1"
        ),
        "{report}"
    );
}

#[tokio::test]
async fn after_a_mixed_day_the_issuer_and_the_journal_agree_to_the_fen() {
    let w = world().await;
    let mut t = w.signed_on("T0000016").await;
    let pan = "6222020000000000037";
    let a = purchase(&mut t, pan, 10_000).await;
    let b = purchase(&mut t, pan, 20_000).await;
    let c = purchase(&mut t, pan, 30_000).await;
    void(&mut t, pan, 10_000, &a).await;
    refund(&mut t, pan, 5_000, &b).await;
    let f60 = t.f60("22");
    t.exchange(&t.reversal(&reversed(&c, pan, 30_000, &f60), "98").unwrap())
        .await
        .unwrap();
    advices_drained(&w).await;
    // Opening balances minus approved debits plus approved credits.
    let net: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(CASE WHEN kind IN ('purchase', 'completion', 'completion_advice') THEN -amount ELSE amount END), 0)::bigint
         FROM journal
         WHERE (kind IN ('purchase', 'completion', 'completion_advice') AND state IN ('approved', 'voided', 'partially_refunded', 'refunded'))
            OR (kind IN ('void', 'completion_void', 'refund') AND state = 'approved')",
    )
    .fetch_one(&w.pool)
    .await
    .unwrap();
    let totals = issuer_sim::balances(&w.issuer_pool).await.unwrap();
    assert_eq!(totals.balance - totals.opening, net, "the money invariant");
    assert_eq!(net, -15_000);
    // And entry by entry: the journal against the issuer's clearing file.
    let mut clearing = Vec::new();
    issuer_sim::clearing(
        &w.issuer_pool,
        Some(chrono::Utc::now().date_naive()),
        &mut clearing,
    )
    .await
    .unwrap();
    let issuer =
        switch::reconcile::read_clearing(&String::from_utf8(clearing).unwrap(), "clearing.csv")
            .unwrap();
    let journal = switch::reconcile::journal_effects(&w.pool, None)
        .await
        .unwrap();
    let r = switch::reconcile::compare(&journal, &issuer);
    assert!(r.balanced(), "{r:?}");
    assert_eq!(r.journal_total, -15_000);
}

#[tokio::test]
async fn the_history_of_a_sale_shows_every_related_attempt_with_its_rule() {
    let w = world().await;
    let mut t = w.signed_on("T0000017").await;
    let pan = "6222020000000000038";
    let sale = purchase(&mut t, pan, 8_800).await;
    assert_eq!(
        void(&mut t, pan, 8_000, &sale).await.rc(),
        "64",
        "a rejected attempt"
    );
    let v = void(&mut t, pan, 8_800, &sale).await;
    assert_eq!(v.rc(), "00");
    let history = switch::audit::history(
        &w.pool,
        &switch::audit::Selector::Rrn(sale.rrn().to_string()),
    )
    .await
    .unwrap()
    .expect("the sale");
    let kinds: Vec<(&str, &str, Option<&str>)> = history
        .entries
        .iter()
        .map(|e| (e.kind.as_str(), e.state.as_str(), e.rule.as_deref()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("purchase", "voided", None),
            ("void", "declined", Some("V3")),
            ("void", "approved", Some("V1-V6"))
        ]
    );
    assert!(
        history
            .entries
            .iter()
            .all(|e| e.terminal_id == "T0000017" && e.merchant_id == MERCHANT)
    );
    let text = history.to_text();
    assert!(text.contains(" UTC purchase "), "{text}");
    assert!(text.contains(" business day 20"), "{text}");
    assert!(
        text.contains("rule V3") && text.contains("refers to #"),
        "{text}"
    );
    assert!(!text.contains(pan), "{text}");
    // The same history from the void's side.
    let from_void = switch::audit::history(
        &w.pool,
        &switch::audit::Selector::Rrn(v.field(37).unwrap().to_string()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(from_void.entries.len(), 3);
    assert_eq!(from_void.to_json()["history"][2]["rule"], "V1-V6");
}

#[tokio::test]
async fn two_switch_processes_racing_voids_and_refunds_give_one_winner() {
    let w = world().await;
    let (_other, other_addr, other_shutdown) = w.another_switch().await;
    let pan = "6222020000000000039";
    let mut t = w.signed_on("T0000018").await;
    let sale = purchase(&mut t, pan, 2_000).await;
    let refunded = purchase(&mut t, pan, 1_000).await;
    let mut a = w.signed_on("T0000018").await;
    let mut b = Terminal::connect(&other_addr, "T0000018", MERCHANT, w.dialect.clone())
        .await
        .unwrap();
    b.batch = a.batch;
    let (va, vb) = (
        a.void(300, pan, EXPIRY, 2_000, &sale.original()).unwrap(),
        b.void(301, pan, EXPIRY, 2_000, &sale.original()).unwrap(),
    );
    let (ra, rb) = tokio::join!(a.exchange(&va), b.exchange(&vb));
    let mut codes = [ra.unwrap().rc().to_string(), rb.unwrap().rc().to_string()];
    codes.sort();
    assert_eq!(codes, ["00", "12"], "one void wins");
    let (fa, fb) = (
        a.refund(302, pan, EXPIRY, 700, &refunded.original())
            .unwrap(),
        b.refund(303, pan, EXPIRY, 700, &refunded.original())
            .unwrap(),
    );
    let (ra, rb) = tokio::join!(a.exchange(&fa), b.exchange(&fb));
    let mut codes = [ra.unwrap().rc().to_string(), rb.unwrap().rc().to_string()];
    codes.sort();
    assert_eq!(codes, ["00", "61"], "700 + 700 do not fit in 1,000");
    other_shutdown.cancel();
}

#[tokio::test]
async fn a_batch_another_switch_settled_takes_nothing_more_from_this_one() {
    let w = world().await;
    let (_other, other_addr, other_shutdown) = w.another_switch().await;
    let pan = "6222020000000000041";
    let before = w.balance(pan).await;
    // This switch reads the terminal and its open batch (and keeps them).
    let mut a = w.signed_on("T0000020").await;
    let sale = purchase(&mut a, pan, 1_200).await;
    // The other switch settles that batch.
    let mut b = Terminal::connect(&other_addr, "T0000020", MERCHANT, w.dialect.clone())
        .await
        .unwrap();
    b.batch = a.batch;
    let totals = format!("{:012}{:03}{:012}{:03}0{}", 1_200, 1, 0, 0, "0".repeat(31));
    let stan = b.next_stan();
    let s = b
        .exchange(&b.settlement(stan, &totals).unwrap())
        .await
        .unwrap();
    assert_eq!(s.rc(), "00");
    // This switch still remembers the batch as open; the journal does not
    // take a purchase or a void into it, and the issuer never hears of them.
    let stan = a.next_stan();
    let late = a
        .exchange(&a.purchase(stan, pan, EXPIRY, 500).unwrap())
        .await
        .unwrap();
    assert_eq!(late.rc(), "77", "a purchase into a settled batch");
    assert_eq!(void(&mut a, pan, 1_200, &sale).await.rc(), "77");
    assert_eq!(w.balance(pan).await, before - 1_200);
    let in_closed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM journal WHERE terminal_id = 'T0000020' AND batch = $1",
    )
    .bind(sale.batch as i32)
    .fetch_one(&w.pool)
    .await
    .unwrap();
    assert_eq!(in_closed, 2, "the sale and its settlement only");
    // Signed on again, the terminal works in its new batch.
    let mut a = w.signed_on("T0000020").await;
    assert_ne!(a.batch, sale.batch);
    purchase(&mut a, pan, 300).await;
    assert_eq!(w.balance(pan).await, before - 1_500);
    other_shutdown.cancel();
}

#[tokio::test]
async fn a_refund_past_the_refund_window_is_refused() {
    let w = world_with(|c| c.rules.refund_window_days = 7).await;
    let mut t = w.signed_on("T0000019").await;
    let pan = "6222020000000000040";
    let old = purchase(&mut t, pan, 900).await;
    let recent = purchase(&mut t, pan, 800).await;
    // The first sale was eight days ago, the second six.
    for (rrn, days) in [(old.rrn(), 8), (recent.rrn(), 6)] {
        sqlx::query("UPDATE journal SET business_date = business_date - $2::int, received_at = received_at - make_interval(days => $2::int) WHERE rrn = $1")
            .bind(rrn)
            .bind(days)
            .execute(&w.pool)
            .await
            .unwrap();
    }
    let dated = |k: &Kept, date: String| Kept {
        batch: k.batch,
        stan: k.stan,
        reply: {
            let mut r = k.reply.clone();
            r.fields.insert(13, date);
            r
        },
    };
    let date_of = |days: i64| {
        (chrono::Utc::now() - chrono::Duration::days(days))
            .with_timezone(&chrono_tz::Asia::Shanghai)
            .format("%m%d")
            .to_string()
    };
    let r = refund(&mut t, pan, 100, &dated(&old, date_of(8))).await;
    assert_eq!(r.rc(), "12");
    assert_eq!(
        rule_of(&w, r.field(37).unwrap()).await.1.as_deref(),
        Some("F4")
    );
    assert_eq!(
        refund(&mut t, pan, 100, &dated(&recent, date_of(6)))
            .await
            .rc(),
        "00"
    );
}

/// A sale on `terminal`, its journal id, and a transaction of its own that
/// holds the sale's row as a claim would (`FOR NO KEY UPDATE`).
async fn a_sale_held_locked(
    w: &World,
    terminal: &str,
    pan: &str,
    amount: u64,
) -> (Terminal, Kept, i64, sqlx::PgConnection) {
    let mut t = w.signed_on(terminal).await;
    let sale = purchase(&mut t, pan, amount).await;
    let id = switch::journal::rrn_id(sale.rrn()).unwrap();
    let lock = w
        .holding(format!(
            "SELECT 1 FROM journal WHERE id = {id} FOR NO KEY UPDATE"
        ))
        .await;
    (t, sale, id, lock)
}

#[tokio::test]
async fn a_refund_that_loses_its_original_to_a_void_is_answered_12() {
    let w = world().await;
    let pan = "6222020000000000040";
    // A void that has the sale locked: its claim is decided, not committed.
    let (mut t, sale, id, mut void) = a_sale_held_locked(&w, "T0000019", pan, 2_000).await;
    // The refund passes every check against the sale as it reads it, then
    // waits for the lock to claim it.
    let stan = t.next_stan();
    let request = t.refund(stan, pan, EXPIRY, 500, &sale.original()).unwrap();
    let refund = tokio::spawn(async move { t.exchange(&request).await.unwrap() });
    w.until_a_lock_is_awaited("the refund waiting for the sale's lock")
        .await;
    sqlx::query("UPDATE journal SET state = 'voided' WHERE id = $1")
        .bind(id)
        .execute(&mut void)
        .await
        .unwrap();
    sqlx::query("COMMIT").execute(&mut void).await.unwrap();
    // F2, not F3: nothing of the sale was refunded; it is gone.
    let reply = refund.await.unwrap();
    assert_eq!(reply.rc(), "12", "{reply:?}");
    let (state, rule, _) = rule_of(&w, reply.field(37).unwrap()).await;
    assert_eq!((state.as_str(), rule.as_deref()), ("declined", Some("F2")));
    let refunded: i64 = sqlx::query_scalar("SELECT refunded_amount FROM journal WHERE id = $1")
        .bind(id)
        .fetch_one(&w.pool)
        .await
        .unwrap();
    assert_eq!(refunded, 0);
}

/// A terminal's settlement of one purchase, sent with the terminal's row
/// locked, so that its first copy stops as it closes the batch (waiting
/// for that row); then the same message again from a redialled connection. Returns
/// the lock and the two answers to come.
async fn a_settlement_held_and_repeated(
    w: &World,
    terminal: &str,
    pan: &str,
    amount: u64,
) -> (
    sqlx::PgConnection,
    tokio::task::JoinHandle<Reply>,
    tokio::task::JoinHandle<Reply>,
) {
    let mut first = w.signed_on(terminal).await;
    purchase(&mut first, pan, amount).await;
    let totals = format!("{:012}{:03}{:012}{:03}0{}", amount, 1, 0, 0, "0".repeat(31));
    let stan = first.next_stan();
    let settlement = first.settlement(stan, &totals).unwrap();
    let lock = w
        .holding(format!(
            "SELECT 1 FROM terminals WHERE id = '{terminal}' FOR UPDATE"
        ))
        .await;
    let again = settlement.clone();
    let one = tokio::spawn(async move { first.exchange(&settlement).await.unwrap() });
    w.until_a_lock_is_awaited("the first copy closing the batch")
        .await;
    let mut repeat = w.terminal(terminal).await;
    let two = tokio::spawn(async move { repeat.exchange(&again).await.unwrap() });
    (lock, one, two)
}

#[tokio::test]
async fn a_settlement_repeated_while_its_batch_closes_gets_the_same_reply() {
    let w = world().await;
    let (mut lock, one, two) =
        a_settlement_held_and_repeated(&w, "T0000017", "6222020000000000042", 800).await;
    // The repeat finds the first copy's row and waits for its reply.
    w.until(
        Duration::from_secs(10),
        "the repeat waiting for the first copy",
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'UPDATE journal SET received_at%')",
    )
    .await;
    sqlx::query("COMMIT").execute(&mut lock).await.unwrap();
    let (one, two) = (one.await.unwrap(), two.await.unwrap());
    assert_eq!(one.rc(), "00", "{one:?}");
    assert_eq!(two.rc(), "00", "{two:?}");
    assert_eq!(two.field(37), one.field(37), "the same settlement");
    assert_eq!(two.field(48), one.field(48));
    let settled: i64 =
        sqlx::query_scalar("SELECT count(*) FROM settlements WHERE terminal_id = 'T0000017'")
            .fetch_one(&w.pool)
            .await
            .unwrap();
    assert_eq!(settled, 1);
}

#[tokio::test]
async fn a_settlement_whose_repeat_took_it_over_answers_what_was_stored() {
    let w = world().await;
    let (mut lock, one, two) =
        a_settlement_held_and_repeated(&w, "T0000016", "6222020000000000043", 900).await;
    // The first copy looks dead for longer than a live switch could take:
    // the repeat takes its row over and reaches the closing statement too.
    w.until(
        Duration::from_secs(10),
        "the repeat closing the batch as well",
        "SELECT count(*) >= 2 FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .await;
    sqlx::query("COMMIT").execute(&mut lock).await.unwrap();
    // The first copy closes the batch and stores its reply; the repeat
    // finds the batch closed and its row decided, and answers that reply
    // rather than 77.
    let (one, two) = (one.await.unwrap(), two.await.unwrap());
    assert_eq!(one.rc(), "00", "{one:?}");
    assert_eq!(two.rc(), "00", "{two:?}");
    assert_eq!(two.field(37), one.field(37));
    assert_eq!(two.field(48), one.field(48));
}

#[tokio::test]
async fn a_void_of_a_sale_someone_holds_locked_does_not_hold_up_the_journal() {
    let w = world().await;
    let pan = "6222020000000000044";
    // An operator's open transaction, say, holds the sale's row.
    let (mut t, sale, _, mut lock) = a_sale_held_locked(&w, "T0000015", pan, 700).await;
    // The void's claim does not wait for it: lost, answered at once (V5),
    // and the journal goes on writing everyone else's rows.
    let patience = Duration::from_secs(5);
    let v = tokio::time::timeout(patience, void(&mut t, pan, 700, &sale))
        .await
        .expect("the void is answered while the sale is locked");
    assert_eq!(v.rc(), "12", "{v:?}");
    let mut other = w.signed_on("T0000014").await;
    let p = tokio::time::timeout(patience, purchase(&mut other, pan, 100))
        .await
        .expect("other requests are journalled meanwhile");
    assert_eq!(p.reply.rc(), "00");
    sqlx::query("COMMIT").execute(&mut lock).await.unwrap();
    assert_eq!(w.journal_state(sale.rrn()).await, "approved");
    assert_eq!(void(&mut t, pan, 700, &sale).await.rc(), "00");
}

#[tokio::test]
async fn the_issuer_reads_cards_and_originals_by_key_however_many_postings() {
    let w = world_on(|_| {}, &AUTO_EXPLAIN).await;
    let mut t = w.signed_on("T0000001").await;
    // The issuer planned its batch statements at start, with no postings,
    // and keeps those plans...
    purchase(&mut t, CARD, 500).await;
    // ...while postings pile up.
    sqlx::query(
        "INSERT INTO issuer.postings (acquirer, stan, transmitted, mti_class, mti, kind, state, amount)
         SELECT '00048560000', lpad(g::text, 6, '0'), '0101000000', 2, '0200', 'purchase', 'approved', 100
         FROM generate_series(1, 3000) g",
    )
    .execute(&w.issuer_pool)
    .await
    .unwrap();
    let seen = LOGS.lock().unwrap().len();
    let sale = purchase(&mut t, CARD, 700).await;
    assert_eq!(void(&mut t, CARD, 700, &sale).await.rc(), "00");
    // An authorisation finds its card, a void its original, by key: not
    // by a pass over the cards or the 3,000 postings.
    let (probes, read) = rows_read(seen, |l| {
        l.contains("Scan") && (l.contains(" on postings") || l.contains(" on cards"))
    });
    assert!(
        probes >= 2,
        "the issuer's plans were sent back ({probes} scans)"
    );
    assert!(
        read <= 10,
        "{read} cards and postings read for a purchase and its void"
    );
}

#[tokio::test]
async fn follow_ons_after_the_institution_id_changed_name_the_sale_as_it_was_sent() {
    let mut w = world().await;
    let pan = "6222020000000000042";
    let before = w.balance(pan).await;
    let mut t = w.signed_on("T0000019").await;
    let refunded = purchase(&mut t, pan, 3_000).await;
    let voided = purchase(&mut t, pan, 2_000).await;
    w.shutdown.cancel();
    w.run.take().expect("running").await.unwrap();
    // The operator gives the acquirer a new institution id: the issuer
    // keeps the sales under the one they were sent with.
    let (_s, addr, restart) = w
        .another_switch_with(|c| {
            c.institution_id = "48569999".into();
            c.forwarding_id = "48569998".into();
        })
        .await;
    let mut t = Terminal::connect(&addr, "T0000019", MERCHANT, w.dialect.clone())
        .await
        .unwrap();
    t.batch = refunded.batch;
    // The terminal's STANs go on from where they were.
    for _ in 0..voided.stan {
        t.next_stan();
    }
    assert_eq!(void(&mut t, pan, 2_000, &voided).await.rc(), "00");
    assert_eq!(refund(&mut t, pan, 3_000, &refunded).await.rc(), "00");
    advices_drained(&w).await;
    let answered: Vec<String> =
        sqlx::query_scalar("SELECT response_code FROM advices WHERE kind = 'refund'")
            .fetch_all(&w.pool)
            .await
            .unwrap();
    assert_eq!(answered, ["00"], "the issuer applied the refund advice");
    assert_eq!(
        w.balance(pan).await,
        before,
        "voided and refunded at the issuer"
    );
    restart.cancel();
}

#[tokio::test]
async fn a_sale_journalled_before_f32_was_kept_takes_the_ids_of_the_first_start_that_keeps_them() {
    let mut w = world().await;
    let pan = "6222020000000000043";
    let before = w.balance(pan).await;
    let mut t = w.signed_on("T0000020").await;
    let old = purchase(&mut t, pan, 100).await;
    let sale = purchase(&mut t, pan, 4_000).await;
    w.shutdown.cancel();
    w.run.take().expect("running").await.unwrap();
    // As a switch from before migration 0010 left it; one sale long past
    // every window (no message can name it any more).
    sqlx::query("UPDATE journal SET institution_id = NULL, forwarding_id = NULL")
        .execute(&w.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE journal SET received_at = now() - interval '400 days' WHERE rrn = $1")
        .bind(old.rrn())
        .execute(&w.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE meta SET acquirer_kept = false")
        .execute(&w.pool)
        .await
        .unwrap();
    // The upgrade's first start, with the ids the sale was sent with.
    let (_s, _addr, upgraded) = w.another_switch().await;
    upgraded.cancel();
    let kept: (Option<String>, Option<String>) =
        sqlx::query_as("SELECT institution_id, forwarding_id FROM journal WHERE rrn = $1")
            .bind(sale.rrn())
            .fetch_one(&w.pool)
            .await
            .unwrap();
    let untouched: Option<String> =
        sqlx::query_scalar("SELECT institution_id FROM journal WHERE rrn = $1")
            .bind(old.rrn())
            .fetch_one(&w.pool)
            .await
            .unwrap();
    assert_eq!(untouched, None, "past every window: left as it was");
    let defaults = switch::Config::default();
    assert_eq!(
        kept,
        (Some(defaults.institution_id), Some(defaults.forwarding_id))
    );
    assert_eq!(
        switch::keep_acquirer_of_older_rows(&w.pool, &switch::Config::default())
            .await
            .unwrap(),
        0,
        "once"
    );
    // Later the institution id changes; the refund still names the sale.
    let (_s, addr, changed) = w
        .another_switch_with(|c| c.institution_id = "48569999".into())
        .await;
    let mut t = Terminal::connect(&addr, "T0000020", MERCHANT, w.dialect.clone())
        .await
        .unwrap();
    t.batch = sale.batch;
    for _ in 0..sale.stan {
        t.next_stan();
    }
    assert_eq!(refund(&mut t, pan, 4_000, &sale).await.rc(), "00");
    advices_drained(&w).await;
    assert_eq!(w.balance(pan).await, before - 100, "refunded at the issuer");
    changed.cancel();
}

#[tokio::test]
async fn a_terminal_unsigned_since_an_upgrade_still_reverses_and_settles() {
    let w = world().await;
    let mut t = w.signed_on("T0000011").await;
    let pan = "6222020000000000044";
    let before = w.balance(pan).await;
    let sale = purchase(&mut t, pan, 2_500).await;
    // As a terminal that transacted before the switch asked for sign-ons.
    sqlx::query("UPDATE terminals SET signed_on_at = NULL WHERE id = 'T0000011'")
        .execute(&w.pool)
        .await
        .unwrap();
    let f60 = t.f60("22");
    let frame = t
        .reversal(&reversed(&sale, pan, 2_500, &f60), "98")
        .unwrap();
    assert_eq!(t.exchange(&frame).await.unwrap().rc(), "00", "R2");
    advices_drained(&w).await;
    assert_eq!(w.balance(pan).await, before, "reversed at the issuer");
    let totals = format!("{:012}{:03}{:012}{:03}0{}", 0, 0, 0, 0, "0".repeat(31));
    let stan = t.next_stan();
    let settled = t
        .exchange(&t.settlement(stan, &totals).unwrap())
        .await
        .unwrap();
    assert_eq!(settled.rc(), "00", "S1");
    // A purchase is told to sign on first.
    let stan = t.next_stan();
    let reply = t
        .exchange(&t.purchase(stan, pan, EXPIRY, 100).unwrap())
        .await
        .unwrap();
    assert_eq!(reply.rc(), "77");
}

#[tokio::test]
async fn a_void_whose_f2_and_track_name_two_cards_is_refused_14_and_journalled() {
    let w = world().await;
    let mut t = w.signed_on("T0000009").await;
    let pan = "6222020000000000045";
    let sale = purchase(&mut t, pan, 1_500).await;
    let stan = t.next_stan();
    let track = format!("6222020000000000046D{EXPIRY}1011234");
    let (f60, f61) = (t.f60("23"), format!("{:06}{:06}", sale.batch, sale.stan));
    let frame = t
        .request(
            Mti::FINANCIAL,
            &[
                (2, loadgen::Field::Digits(pan)),
                (3, loadgen::Field::Digits("200000")),
                (4, loadgen::Field::Number(1_500)),
                (11, loadgen::Field::Number(stan.into())),
                (14, loadgen::Field::Digits(EXPIRY)),
                (22, loadgen::Field::Digits("021")),
                (25, loadgen::Field::Digits("00")),
                (35, loadgen::Field::Digits(&track)),
                (37, loadgen::Field::Text(sale.rrn())),
                (49, loadgen::Field::Text("156")),
                (60, loadgen::Field::Digits(&f60)),
                (61, loadgen::Field::Digits(&f61)),
            ],
        )
        .unwrap();
    let r = t.exchange(&frame).await.unwrap();
    assert_eq!(r.rc(), "14", "{r:?}");
    let (state, rule, _) = rule_of(&w, r.field(37).expect("journalled: an RRN")).await;
    assert_eq!(
        (state.as_str(), rule.as_deref()),
        ("declined", Some("F2-F35"))
    );
    assert_eq!(
        w.journal_state(sale.rrn()).await,
        "approved",
        "the sale stands"
    );
}

#[tokio::test]
async fn a_settlement_waits_for_a_sale_of_its_batch_still_at_the_issuer() {
    let w = world().await;
    let mut a = w.signed_on("T0000008").await;
    let pan = "6222020000000000047";
    purchase(&mut a, pan, 1_000).await;
    // Another connection of the terminal sells while the issuer is slow.
    w.issuer
        .faults()
        .update(|f| f.latency = issuer_sim::Latency::Fixed(Duration::from_millis(300)));
    let mut b = Terminal::connect(&w.switch_addr, "T0000008", MERCHANT, w.dialect.clone())
        .await
        .unwrap();
    b.batch = a.batch;
    for _ in 0..50 {
        b.next_stan();
    }
    let stan = b.next_stan();
    b.send_raw(&b.purchase(stan, pan, EXPIRY, 999).unwrap())
        .await
        .unwrap();
    w.until(
        Duration::from_secs(5),
        "the sale at the issuer",
        "SELECT EXISTS (SELECT 1 FROM journal WHERE amount = 999 AND state = 'sent')",
    )
    .await;
    // The terminal settles what it saw on its own connection.
    let totals = format!("{:012}{:03}{:012}{:03}0{}", 1_000, 1, 0, 0, "0".repeat(31));
    let stan = a.next_stan();
    let settled = a
        .exchange(&a.settlement(stan, &totals).unwrap())
        .await
        .unwrap();
    assert_eq!(b.recv().await.unwrap().rc(), "00", "the sale approved");
    assert_eq!(
        settled.field(48).map(|f| &f[..31]),
        Some(format!("{:012}{:03}{:012}{:03}2", 1_999, 2, 0, 0).as_str()),
        "the journal's totals count the sale that was at the issuer"
    );
}

#[tokio::test]
async fn a_batch_closes_only_on_the_totals_its_settlement_read() {
    let w = world().await;
    let mut t = w.signed_on("T0000009").await;
    let pan = "6222020000000000049";
    purchase(&mut t, pan, 1_000).await;
    let batch = t.batch as i32;
    let read = switch::journal::batch_totals(&w.pool, "T0000009", batch)
        .await
        .unwrap();
    // A sale of the batch decided after the totals were read (another
    // connection's, say): nothing of it is at the issuer any more.
    purchase(&mut t, pan, 2_000).await;
    let settlement = |totals_read| switch::journal::Settlement {
        row_id: 0,
        terminal_id: "T0000009",
        merchant_id: MERCHANT,
        batch,
        terminal_totals: totals_read,
        switch_totals: totals_read,
        totals_read,
        balanced: true,
        operator: None,
        reply: b"",
    };
    let in_flight = Duration::from_secs(5);
    let forced = switch::journal::Force {
        in_flight: true,
        stale: false,
    };
    for force in [switch::journal::Force::default(), forced] {
        assert_eq!(
            switch::journal::settle(&w.pool, &settlement(&read), force, in_flight)
                .await
                .unwrap(),
            switch::journal::Settled::Stale,
            "stale totals do not close the batch, even past the wait for requests in flight"
        );
    }
    let open: i32 = sqlx::query_scalar("SELECT batch FROM terminals WHERE id = 'T0000009'")
        .fetch_one(&w.pool)
        .await
        .unwrap();
    assert_eq!(open, batch);
    let now = switch::journal::batch_totals(&w.pool, "T0000009", batch)
        .await
        .unwrap();
    assert_ne!(now, read);
    // On the totals as they are, it closes (no settlement row of its own
    // here to answer: "elsewhere").
    assert_eq!(
        switch::journal::settle(&w.pool, &settlement(&now), forced, in_flight)
            .await
            .unwrap(),
        switch::journal::Settled::Elsewhere
    );
    let open: i32 = sqlx::query_scalar("SELECT batch FROM terminals WHERE id = 'T0000009'")
        .fetch_one(&w.pool)
        .await
        .unwrap();
    assert_eq!(open, batch + 1);
}

#[tokio::test]
async fn a_reversal_that_came_before_its_sale_is_in_the_sales_history_and_back() {
    let w = world().await;
    let pan = "6222020000000000048";
    let mut t = w.signed_on("T0000013").await;
    let stan = t.next_stan();
    let f60 = t.f60("22");
    let unsent = Kept {
        batch: t.batch,
        stan,
        reply: Reply {
            mti: iso8583::Mti::FINANCIAL,
            prefix: vec![],
            fields: Default::default(),
            body: Default::default(),
            mac_valid: None,
        },
    };
    // R3: the 0400 first (nothing to reverse yet), then the sale it names.
    let marker = t
        .exchange(
            &t.reversal(&reversed(&unsent, pan, 600, &f60), "98")
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(marker.rc(), "00");
    let sale = t
        .exchange(&t.purchase(stan, pan, EXPIRY, 600).unwrap())
        .await
        .unwrap();
    let sale_rrn = sale.field(37).unwrap();
    assert_eq!(w.journal_state(sale_rrn).await, "reversed");
    let marker_rrn = marker.field(37).unwrap();
    for rrn in [sale_rrn, marker_rrn] {
        let history = switch::audit::history(&w.pool, &switch::audit::Selector::Rrn(rrn.into()))
            .await
            .unwrap()
            .unwrap();
        let rrns: Vec<&str> = history.entries.iter().map(|e| e.rrn.as_str()).collect();
        assert_eq!(rrns, [marker_rrn, sale_rrn], "by {rrn}: the whole history");
    }
}

/// Opening balances minus the journal's approved debits plus its approved
/// credits is what the issuer's cards hold, to the fen (once the advices
/// have drained); returns the journal's net.
async fn money_invariant_holds(w: &World) -> i64 {
    let net: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(CASE WHEN kind IN ('purchase', 'completion', 'completion_advice') THEN -amount ELSE amount END), 0)::bigint
         FROM journal
         WHERE (kind IN ('purchase', 'completion', 'completion_advice') AND state IN ('approved', 'voided', 'partially_refunded', 'refunded'))
            OR (kind IN ('void', 'completion_void', 'refund') AND state = 'approved')",
    )
    .fetch_one(&w.pool)
    .await
    .unwrap();
    let totals = issuer_sim::balances(&w.issuer_pool).await.unwrap();
    assert_eq!(totals.balance - totals.opening, net, "the money invariant");
    net
}

/// A request of `terminal` held in the middle of its journal insert: a
/// transaction of the test's own has written, and not committed, a row
/// with the key the request is journalled under (`batch`, `stan`,
/// `mti_class`), so the writer's statement waits on it, past the moment it
/// read the batch open. `send` sends the request; returns the transaction,
/// to be rolled back to let the request through.
async fn an_insert_held_on_its_key(
    w: &World,
    terminal: &str,
    batch: u32,
    stan: u32,
    mti_class: i16,
    send: impl std::future::Future<Output = ()>,
) -> sqlx::PgConnection {
    let key = w
        .holding(format!(
            "INSERT INTO journal (id, rrn, terminal_id, merchant_id, batch, stan, mti, mti_class,
                 processing_code, kind, request_digest, state, business_date)
             SELECT n, lpad(n::text, 12, '0'), '{terminal}', '{MERCHANT}', {batch}, {stan},
                 {mti_class} * 100, {mti_class}, '000000', 'purchase', '\\x00', 'received',
                 current_date
             FROM nextval('journal_id_seq') n"
        ))
        .await;
    send.await;
    w.until_a_lock_is_awaited("the request's insert waiting on its key")
        .await;
    key
}

/// A settlement of `terminal`'s `batch` with `totals`, sent through
/// another switch process at `other` (it has a journal writer of its own)
/// and left to be answered.
async fn settling(
    w: &World,
    other: &str,
    terminal: &str,
    batch: u32,
    totals: &str,
) -> tokio::task::JoinHandle<Reply> {
    let mut b = Terminal::connect(other, terminal, MERCHANT, w.dialect.clone())
        .await
        .unwrap();
    b.batch = batch;
    for _ in 0..50 {
        b.next_stan();
    }
    let stan = b.next_stan();
    let settlement = b.settlement(stan, totals).unwrap();
    tokio::spawn(async move { b.exchange(&settlement).await.unwrap() })
}

/// Waits until `done` (a condition in SQL) holds, or a second session of
/// the database waits for a lock: the request the test holds up, and one
/// that waits for it in turn.
async fn until_done_or_waiting(w: &World, what: &str, done: &str) {
    w.until(
        Duration::from_secs(10),
        what,
        &format!(
            "SELECT ({done})
                OR (SELECT count(*) FROM pg_stat_activity
                    WHERE datname = current_database() AND wait_event_type = 'Lock') >= 2"
        ),
    )
    .await;
}

/// What the merchant is paid on is what the journal holds: the figures a
/// batch was settled with are the batch's totals in the journal now.
async fn settled_as_journalled(w: &World, terminal: &str, batch: u32) -> String {
    let settled: String = sqlx::query_scalar(
        "SELECT switch_totals FROM settlements WHERE terminal_id = $1 AND batch = $2",
    )
    .bind(terminal)
    .bind(batch as i32)
    .fetch_one(&w.pool)
    .await
    .unwrap();
    let now = switch::journal::batch_totals(&w.pool, terminal, batch as i32)
        .await
        .unwrap();
    for part in [0..30, 31..61] {
        assert_eq!(
            settled[part.clone()],
            now[part],
            "the batch as settled ({settled}) and as journalled ({now})"
        );
    }
    settled
}

#[tokio::test]
async fn a_sale_journalled_while_its_batch_closes_is_settled_or_refused() {
    let w = world().await;
    let (_other, other_addr, other) = w.another_switch().await;
    let terminal = "T0000012";
    let pan = "6222020000000000050";
    let before = w.balance(pan).await;
    let mut a = w.signed_on(terminal).await;
    let batch = a.batch;
    // The sale has read the batch open and is inserting its row...
    let stan = a.next_stan();
    let sale = a.purchase(stan, pan, EXPIRY, 1_500).unwrap();
    let mut key = an_insert_held_on_its_key(&w, terminal, batch, stan, 2, async {
        a.send_raw(&sale).await.unwrap();
    })
    .await;
    // ...when the terminal's other connection settles the batch, empty as
    // far as anything committed shows.
    let nothing = "0".repeat(62);
    let settling = settling(&w, &other_addr, terminal, batch, &nothing).await;
    until_done_or_waiting(
        &w,
        "the batch closed, or the settlement waiting for the request",
        "EXISTS (SELECT 1 FROM settlements)",
    )
    .await;
    sqlx::query("ROLLBACK").execute(&mut key).await.unwrap();
    let sold = a.recv().await.unwrap();
    let settled = settling.await.unwrap();
    assert_eq!(settled.rc(), "00", "{settled:?}");
    // Either the sale is in the batch as settled, or it was refused and
    // nothing charged; never approved and charged outside the totals.
    let totals = settled_as_journalled(&w, terminal, batch).await;
    if sold.rc() == "00" {
        assert_eq!(
            &totals[..30],
            format!("{:012}{:03}{:012}{:03}", 1_500, 1, 0, 0)
        );
        assert_eq!(w.balance(pan).await, before - 1_500);
    } else {
        assert_eq!(sold.rc(), "77", "{sold:?}");
        assert_eq!(w.balance(pan).await, before, "nothing charged");
    }
    advices_drained(&w).await;
    money_invariant_holds(&w).await;
    other.cancel();
}

#[tokio::test]
async fn a_reversal_journalled_while_its_batch_closes_is_settled_or_refused() {
    let w = world().await;
    let (_other, other_addr, other) = w.another_switch().await;
    let terminal = "T0000012";
    let pan = "6222020000000000051";
    let before = w.balance(pan).await;
    let mut a = w.signed_on(terminal).await;
    let batch = a.batch;
    let sale = purchase(&mut a, pan, 1_500).await;
    // The reversal of the sale is inserting its row...
    let f60 = a.f60("22");
    let reversal = a
        .reversal(&reversed(&sale, pan, 1_500, &f60), "98")
        .unwrap();
    let mut key = an_insert_held_on_its_key(&w, terminal, batch, sale.stan, 4, async {
        a.send_raw(&reversal).await.unwrap();
    })
    .await;
    // ...when the terminal's other connection settles the batch with the sale.
    let one = format!("{:012}{:03}{:012}{:03}0{}", 1_500, 1, 0, 0, "0".repeat(31));
    let settling = settling(&w, &other_addr, terminal, batch, &one).await;
    until_done_or_waiting(
        &w,
        "the batch closed, or the settlement waiting for the request",
        "EXISTS (SELECT 1 FROM settlements)",
    )
    .await;
    sqlx::query("ROLLBACK").execute(&mut key).await.unwrap();
    let reversed = a.recv().await.unwrap();
    let settled = settling.await.unwrap();
    assert_eq!(settled.rc(), "00", "{settled:?}");
    // Either the sale is reversed and out of the batch as settled, or the
    // reversal was refused (S1) and the sale stands, settled.
    let totals = settled_as_journalled(&w, terminal, batch).await;
    advices_drained(&w).await;
    if reversed.rc() == "00" {
        assert_eq!(w.journal_state(sale.rrn()).await, "reversed");
        assert_eq!(&totals[..30], "0".repeat(30));
        assert_eq!(w.balance(pan).await, before);
    } else {
        assert_eq!(reversed.rc(), "12", "{reversed:?}");
        assert_eq!(w.journal_state(sale.rrn()).await, "approved");
        assert_eq!(w.balance(pan).await, before - 1_500);
    }
    money_invariant_holds(&w).await;
    other.cancel();
}

#[tokio::test]
async fn a_reversal_whose_batch_closes_as_it_is_journalled_is_refused_under_it() {
    let w = world().await;
    let (_other, other_addr, other) = w.another_switch().await;
    let terminal = "T0000012";
    let pan = "6222020000000000052";
    let before = w.balance(pan).await;
    let mut a = w.signed_on(terminal).await;
    let batch = a.batch;
    let sale = purchase(&mut a, pan, 1_500).await;
    // The terminal's other connection settles the batch with the sale; its
    // close waits for the terminal's row, which the test holds...
    let mut lock = w
        .holding(format!(
            "SELECT 1 FROM terminals WHERE id = '{terminal}' FOR UPDATE"
        ))
        .await;
    let one = format!("{:012}{:03}{:012}{:03}0{}", 1_500, 1, 0, 0, "0".repeat(31));
    let settling = settling(&w, &other_addr, terminal, batch, &one).await;
    w.until_a_lock_is_awaited("the settlement closing the batch")
        .await;
    // ...while the sale's reversal reads the batch open and is journalled.
    let f60 = a.f60("22");
    let reversal = a
        .reversal(&reversed(&sale, pan, 1_500, &f60), "98")
        .unwrap();
    a.send_raw(&reversal).await.unwrap();
    until_done_or_waiting(
        &w,
        "the reversal decided, or waiting for the close",
        "EXISTS (SELECT 1 FROM journal WHERE mti_class = 4 AND state <> 'received')",
    )
    .await;
    sqlx::query("COMMIT").execute(&mut lock).await.unwrap();
    let settled = settling.await.unwrap();
    let reversed = a.recv().await.unwrap();
    assert_eq!(settled.rc(), "00", "{settled:?}");
    settled_as_journalled(&w, terminal, batch).await;
    // The batch closed first: the reversal names a settled batch (S1), and
    // is journalled refused under it.
    assert_eq!(reversed.rc(), "12", "{reversed:?}");
    let rrn = reversed.field(37).unwrap();
    assert_eq!(
        rule_of(&w, rrn).await,
        ("declined".to_string(), Some("S1".to_string()), None)
    );
    let named: i32 = sqlx::query_scalar("SELECT batch FROM journal WHERE rrn = $1")
        .bind(rrn)
        .fetch_one(&w.pool)
        .await
        .unwrap();
    assert_eq!(named, batch as i32);
    assert_eq!(w.journal_state(sale.rrn()).await, "approved");
    advices_drained(&w).await;
    assert_eq!(w.balance(pan).await, before - 1_500);
    money_invariant_holds(&w).await;
    other.cancel();
}
