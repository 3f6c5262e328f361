//! Rule K3: working keys at sign-on (F62) and the MAC (F64) of every message
//! after it, over the wire, on switches that hand keys out.

use iso8583::Mti;
use iso8583::keys::{DerivationKey, WorkingKeys};
use loadgen::{Field, Terminal};
use switch::Switch;
use tokio_util::sync::CancellationToken;

use super::*;

fn derivation_key(byte: u8) -> DerivationKey {
    DerivationKey::new(&[byte; 16])
}

/// A switch on the world's database and issuer handing out working keys
/// derived from `kdk`.
async fn keyed_switch(w: &World, kdk: &DerivationKey) -> (Arc<Switch>, String, CancellationToken) {
    let shutdown = CancellationToken::new();
    let (switch, addr, _run) = start_switch_keyed(
        &w.url,
        switch_config(&w.issuer_addr, |_| {}),
        w.switch.key.clone(),
        Some(kdk.clone()),
        &shutdown,
    )
    .await;
    (switch, addr, shutdown)
}

/// A terminal on `addr` loaded with its master key from `kdk`, signed on.
async fn keyed_terminal(w: &World, addr: &str, id: &str, kdk: &DerivationKey) -> Terminal {
    let mut t = Terminal::connect(addr, id, MERCHANT, w.dialect.clone())
        .await
        .unwrap();
    t.set_master_key(Some(kdk.master_key(id)));
    let reply = t.sign_on().await.unwrap();
    assert_eq!(reply.rc(), "00");
    assert!(t.holds_mac_key());
    t
}

/// A purchase of `amount` fen with `card` under the terminal's next STAN.
async fn buy(t: &mut Terminal, card: &str, amount: u64) -> (u32, loadgen::Reply) {
    let stan = t.next_stan();
    let reply = t
        .exchange(&t.purchase(stan, card, EXPIRY, amount).unwrap())
        .await
        .unwrap();
    (stan, reply)
}

/// The reversal record of a purchase.
fn purchase_of<'a>(card: &'a str, amount: u64, stan: u32, f60: &'a str) -> loadgen::Reversed<'a> {
    loadgen::Reversed {
        pan: card,
        processing_code: "000000",
        amount,
        stan,
        condition: "00",
        f60,
        f61: None,
    }
}

async fn rows_of(w: &World, terminal: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM journal WHERE terminal_id = $1")
        .bind(terminal)
        .fetch_one(&w.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_sign_on_hands_out_working_keys_under_the_terminals_master_key() {
    let kdk = derivation_key(0x21);
    let w = keyed_world(&kdk).await;
    let (_switch, addr, stop) = keyed_switch(&w, &kdk).await;
    let mut t = Terminal::connect(&addr, "T0000011", MERCHANT, w.dialect.clone())
        .await
        .unwrap();
    let reply = t.sign_on().await.unwrap();
    assert_eq!(reply.rc(), "00");
    // 60.3 001: single-DES PIN and MAC keys, each with its check value.
    let f62 = hex::decode(reply.field(62).expect("F62")).unwrap();
    assert_eq!(f62.len(), 24);
    let keys = WorkingKeys::from_f62(&kdk.master_key("T0000011"), &f62).unwrap();
    assert_eq!(keys.set(), iso8583::keys::KeySet::Single);
    // Under another terminal's master key they do not check.
    assert!(WorkingKeys::from_f62(&kdk.master_key("T0000012"), &f62).is_err());
    // The journal keeps what was sent, not a clear key.
    let stored: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT working_keys FROM terminals WHERE id = 'T0000011'")
            .fetch_one(&w.pool)
            .await
            .unwrap();
    assert_eq!(stored, Some(f62.clone()));
    // Every sign-on gets fresh keys.
    let again = t.sign_on().await.unwrap();
    assert_ne!(again.field(62), reply.field(62));
    // A terminal loaded with another master key cannot take them.
    let mut wrong = Terminal::connect(&addr, "T0000012", MERCHANT, w.dialect.clone())
        .await
        .unwrap();
    wrong.set_master_key(Some(kdk.master_key("T0000011")));
    let refused = wrong.sign_on().await.unwrap_err();
    assert!(refused.to_string().contains("check value"), "{refused}");
    stop.cancel();
}

#[tokio::test]
async fn a_request_with_a_missing_or_wrong_mac_is_answered_a0_and_never_reaches_the_issuer() {
    let kdk = derivation_key(0x22);
    let w = keyed_world(&kdk).await;
    let (_switch, addr, stop) = keyed_switch(&w, &kdk).await;
    let mut t = keyed_terminal(&w, &addr, "T0000013", &kdk).await;
    let card = "6222020000000000041";
    let before = w.balance(card).await;

    // MACed both ways.
    let (_, reply) = buy(&mut t, card, 1_000).await;
    assert_eq!(reply.rc(), "00");
    assert_eq!(reply.mac_valid, Some(true), "{reply:?}");
    assert_eq!(w.balance(card).await, before - 1_000);

    // One byte of the amount changed on the way: the MAC no longer fits.
    let stan = t.next_stan();
    let mut frame = t.purchase(stan, card, EXPIRY, 2_000).unwrap();
    let tampered = frame
        .windows(6)
        .position(|x| x == [0x00, 0x00, 0x00, 0x00, 0x20, 0x00])
        .expect("F4 in the frame");
    frame[tampered + 4] = 0x90;
    let reply = t.exchange(&frame).await.unwrap();
    assert_eq!(reply.rc(), "A0");
    // Not sealed: a MAC of a message an outsider chose would forge others.
    assert_eq!(reply.field(64), None, "{reply:?}");

    // No MAC at all, from a terminal that holds a key.
    let mut bare = Terminal::connect(&addr, "T0000013", MERCHANT, w.dialect.clone())
        .await
        .unwrap();
    bare.batch = t.batch;
    bare.set_stan(500);
    let (_, reply) = buy(&mut bare, card, 3_000).await;
    assert_eq!(reply.rc(), "A0");
    assert_eq!(reply.field(64), None);

    // Neither was journalled nor charged; network management needs no MAC.
    assert_eq!(rows_of(&w, "T0000013").await, 1);
    assert_eq!(w.balance(card).await, before - 1_000);
    let stan = bare.next_stan();
    let echo = bare
        .request(
            Mti::NETWORK_ADVICE,
            &[
                (11, Field::Number(stan.into())),
                (60, Field::Digits("00000000301")),
            ],
        )
        .unwrap();
    let reply = bare.exchange(&echo).await.unwrap();
    assert_eq!(reply.rc(), "00");
    assert_eq!(reply.field(64), None);
    stop.cancel();
}

#[tokio::test]
async fn a_repeat_after_a_new_sign_on_hears_the_stored_reply_under_the_new_key() {
    let kdk = derivation_key(0x23);
    let w = keyed_world(&kdk).await;
    let (_switch, addr, stop) = keyed_switch(&w, &kdk).await;
    let mut t = keyed_terminal(&w, &addr, "T0000014", &kdk).await;
    let card = "6222020000000000042";
    let (stan, first) = buy(&mut t, card, 700).await;
    assert_eq!(first.rc(), "00");
    // New keys; the same purchase again (D1), MACed under them.
    assert_eq!(t.sign_on().await.unwrap().rc(), "00");
    let again = t
        .exchange(&t.purchase(stan, card, EXPIRY, 700).unwrap())
        .await
        .unwrap();
    assert_eq!(again.mac_valid, Some(true), "{again:?}");
    assert_eq!(again.field(37), first.field(37));
    assert_eq!(again.field(38), first.field(38));
    assert_eq!(rows_of(&w, "T0000014").await, 1);
    stop.cancel();
}

#[tokio::test]
async fn keys_handed_out_by_another_switch_process_are_taken_at_once() {
    let kdk = derivation_key(0x24);
    let w = keyed_world(&kdk).await;
    let (_a, a_addr, a_stop) = keyed_switch(&w, &kdk).await;
    let (_b, b_addr, b_stop) = keyed_switch(&w, &kdk).await;
    let card = "6222020000000000043";
    let mut at_a = keyed_terminal(&w, &a_addr, "T0000015", &kdk).await;
    // B learns the terminal and its first keys.
    let mut at_b = Terminal::connect(&b_addr, "T0000015", MERCHANT, w.dialect.clone())
        .await
        .unwrap();
    at_b.set_master_key(Some(kdk.master_key("T0000015")));
    assert_eq!(at_b.sign_on().await.unwrap().rc(), "00");
    let (stan, reply) = buy(&mut at_b, card, 100).await;
    assert_eq!(reply.rc(), "00");
    // The terminal signs on again through A: B's cache has the old keys.
    assert_eq!(at_a.sign_on().await.unwrap().rc(), "00");
    at_a.set_stan(stan);
    let stan = at_a.next_stan();
    let frame = at_a.purchase(stan, card, EXPIRY, 200).unwrap();
    let reply = at_b.exchange(&frame).await.unwrap();
    assert_eq!(reply.rc(), "00", "{reply:?}");
    // Sealed under the keys A handed out, which B read again.
    assert_eq!(
        at_a.mac_valid(reply.mti, reply.field(64).is_some(), &reply.body),
        Some(true)
    );
    assert_eq!(reply.mac_valid, Some(false), "not under B's first keys");
    a_stop.cancel();
    b_stop.cancel();
}

#[tokio::test]
async fn a_terminal_without_keys_signs_on_for_them_and_one_cached_without_them_is_read_again() {
    let kdk = derivation_key(0x27);
    let mut w = world().await;
    let card = "6222020000000000044";
    // Signed on before the switch had a key: no keys.
    let mut old = w.signed_on("T0000016").await;
    let (stan, sale) = buy(&mut old, card, 500).await;
    assert_eq!(sale.rc(), "00");
    // The switches are started again with the key (none may run without).
    w.shutdown.cancel();
    let _ = w.run.take().expect("running").await;
    let (_a, a_addr, a_stop) = keyed_switch(&w, &kdk).await;
    let (_b, b_addr, b_stop) = keyed_switch(&w, &kdk).await;
    let mut at_b = Terminal::connect(&b_addr, "T0000016", MERCHANT, w.dialect.clone())
        .await
        .unwrap();
    at_b.batch = old.batch;
    at_b.set_stan(stan);
    // A new transaction without keys: sign on again (77), unsent.
    let next = at_b.next_stan();
    let refused = at_b
        .exchange(&at_b.purchase(next, card, EXPIRY, 600).unwrap())
        .await
        .unwrap();
    assert_eq!(refused.rc(), "77", "{refused:?}");
    assert_eq!(refused.field(64), None, "no keys to seal it with");
    // What it did before it still reverses.
    let f60 = old.f60("22");
    let of = purchase_of(card, 500, stan, &f60);
    let reversed = at_b
        .exchange(&at_b.reversal(&of, "98").unwrap())
        .await
        .unwrap();
    assert_eq!(reversed.rc(), "00", "{reversed:?}");
    // B has it cached without keys; it signs on through A and gets some.
    let _at_a = keyed_terminal(&w, &a_addr, "T0000016", &kdk).await;
    // A purchase without a MAC at B is not taken for a keyless terminal's.
    let next = at_b.next_stan();
    let reply = at_b
        .exchange(&at_b.purchase(next, card, EXPIRY, 700).unwrap())
        .await
        .unwrap();
    assert_eq!(reply.rc(), "A0", "{reply:?}");
    assert_eq!(
        rows_of(&w, "T0000016").await,
        2,
        "the sale and its reversal"
    );
    a_stop.cancel();
    b_stop.cancel();
}

#[tokio::test]
async fn a_reversal_settlement_or_malformed_request_with_a_bad_mac_is_answered_unsealed() {
    let kdk = derivation_key(0x28);
    let w = keyed_world(&kdk).await;
    let (_switch, addr, stop) = keyed_switch(&w, &kdk).await;
    let mut t = keyed_terminal(&w, &addr, "T0000017", &kdk).await;
    let card = "6222020000000000045";
    let before = w.balance(card).await;
    let (stan, sale) = buy(&mut t, card, 900).await;
    assert_eq!(sale.rc(), "00");
    // The reversal with its MAC broken: A0, and the sale stands.
    let f60 = t.f60("22");
    let of = purchase_of(card, 900, stan, &f60);
    let mut frame = t.reversal(&of, "98").unwrap();
    let last = frame.len() - 1;
    frame[last] ^= 0x01;
    let reply = t.exchange(&frame).await.unwrap();
    assert_eq!(reply.rc(), "A0");
    assert_eq!(reply.field(64), None, "an A0 is not sealed");
    assert_eq!(w.balance(card).await, before - 900);
    // Sent right, it reverses.
    let reply = t.exchange(&t.reversal(&of, "A0").unwrap()).await.unwrap();
    assert_eq!(reply.rc(), "00");
    assert_eq!(reply.mac_valid, Some(true));
    until(
        &w.pool,
        Duration::from_secs(15),
        "the reversal advice to be answered",
        "SELECT count(*) = 1 FROM advices WHERE state = 'done'",
    )
    .await;
    assert_eq!(w.balance(card).await, before);
    // A settlement with a broken MAC: A0, the batch still open.
    let stan = t.next_stan();
    let mut frame = t.settlement(stan, &"0".repeat(62)).unwrap();
    let last = frame.len() - 1;
    frame[last] ^= 0x01;
    let reply = t.exchange(&frame).await.unwrap();
    assert_eq!(reply.rc(), "A0");
    let batch: i32 = sqlx::query_scalar("SELECT batch FROM terminals WHERE id = 'T0000017'")
        .fetch_one(&w.pool)
        .await
        .unwrap();
    assert_eq!(batch as u32, t.batch, "not settled");
    // Answered before K3 (K2: F60 cut short): 30, not sealed either (its
    // MAC was never checked).
    let stan = t.next_stan();
    let short = t
        .request(
            Mti::FINANCIAL,
            &[
                (3, Field::Digits("000000")),
                (4, Field::Number(100)),
                (11, Field::Number(stan.into())),
                (60, Field::Digits("22")),
            ],
        )
        .unwrap();
    let reply = t.exchange(&short).await.unwrap();
    assert_eq!(reply.rc(), "30");
    assert_eq!(reply.field(64), None, "{reply:?}");
    stop.cancel();
}

#[tokio::test]
async fn a_switch_without_the_key_is_refused_until_the_keys_are_forgotten() {
    let World {
        url,
        issuer_addr,
        pool,
        switch: own,
        run,
        shutdown: own_stop,
        dialect,
        ..
    } = world().await;
    let key = own.key.clone();
    let kdk = derivation_key(0x29);
    // The keyless one stops before a keyed one starts (none may run beside).
    own_stop.cancel();
    let _ = run.expect("running").await;
    let stop = CancellationToken::new();
    let config = || switch_config(&issuer_addr, |_| {});
    let (keyed, addr, keyed_run) =
        start_switch_keyed(&url, config(), key.clone(), Some(kdk.clone()), &stop).await;
    let mut t = Terminal::connect(&addr, "T0000018", MERCHANT, dialect.clone())
        .await
        .unwrap();
    t.set_master_key(Some(kdk.master_key("T0000018")));
    assert_eq!(t.sign_on().await.unwrap().rc(), "00");
    let start = || async {
        switch::start(
            Arc::new(config()),
            switch::connect(&url, 2).await.unwrap(),
            key.clone(),
            None,
            &CancellationToken::new(),
        )
        .await
    };
    // Not while a switch serves: it would go on under the keys it read.
    assert_eq!(
        switch::k3::forget_keys(&pool).await.unwrap(),
        switch::k3::Forgot::Serving
    );
    stop.cancel();
    // A run lets its locks go as it ends.
    let _ = keyed_run.await;
    let _still_held = (keyed, own);
    let Err(refused) = start().await else {
        panic!("a switch without the derivation key started on keyed terminals");
    };
    assert!(
        matches!(
            refused,
            switch::StartError::TerminalKeyMissing { terminals: 1, .. }
        ),
        "{refused}"
    );
    let check = hex::encode_upper(&kdk.check_value()[..3]);
    assert!(
        refused
            .to_string()
            .contains(&format!("check value {check}")),
        "{refused}"
    );
    assert!(refused.to_string().contains("forget-keys"), "{refused}");
    // The refused start let its locks go at once.
    assert_eq!(
        switch::k3::forget_keys(&pool).await.unwrap(),
        switch::k3::Forgot::Keys(1)
    );
    let started = start().await.unwrap_or_else(|e| panic!("{e}"));
    switch::k3::stop_serving(&started).await;
    // And another key may start now: the terminals sign on again under it.
    let other = derivation_key(0x2A);
    let stop = CancellationToken::new();
    let (_switch, addr, _run) =
        start_switch_keyed(&url, config(), key, Some(other.clone()), &stop).await;
    let mut t = Terminal::connect(&addr, "T0000018", MERCHANT, dialect)
        .await
        .unwrap();
    t.set_master_key(Some(other.master_key("T0000018")));
    assert_eq!(t.sign_on().await.unwrap().rc(), "00");
    stop.cancel();
}

#[tokio::test]
async fn a_switch_with_another_derivation_key_is_refused_at_start() {
    let w = keyed_world(&derivation_key(0x25)).await;
    let (_switch, _addr, stop) = keyed_switch(&w, &derivation_key(0x25)).await;
    let pool = switch::connect(&w.url, 2).await.unwrap();
    let Err(refused) = switch::start(
        Arc::new(switch_config(&w.issuer_addr, |_| {})),
        pool,
        w.switch.key.clone(),
        Some(derivation_key(0x26)),
        &CancellationToken::new(),
    )
    .await
    else {
        panic!("a switch with another derivation key started");
    };
    assert!(
        matches!(refused, switch::StartError::TerminalKeyMismatch { .. }),
        "{refused}"
    );
    // Both keys named by their check values (the DES of zeros under each).
    let check = |k: &DerivationKey| hex::encode_upper(&k.check_value()[..3]);
    let said = refused.to_string();
    assert!(
        said.contains(&format!("check value {}", check(&derivation_key(0x26)))),
        "{said}"
    );
    assert!(
        said.contains(&format!("check value {})", check(&derivation_key(0x25)))),
        "{said}"
    );
    assert!(refused.to_string().contains("A0"), "{refused}");
    stop.cancel();
}

#[tokio::test]
async fn switches_with_and_without_the_key_never_serve_one_journal_together() {
    let kdk = derivation_key(0x2C);
    let w = keyed_world(&kdk).await;
    let start = |keys: Option<DerivationKey>| {
        let (url, issuer, key) = (w.url.clone(), w.issuer_addr.clone(), w.switch.key.clone());
        async move {
            switch::start(
                Arc::new(switch_config(&issuer, |_| {})),
                switch::connect(&url, 2).await.unwrap(),
                key,
                keys,
                &CancellationToken::new(),
            )
            .await
        }
    };
    // Beside a keyed one, one without: refused, whatever the journal holds.
    let Err(refused) = start(None).await else {
        panic!("a switch without the key started beside one with it");
    };
    assert!(
        matches!(refused, switch::StartError::OtherKind { keyed: false }),
        "{refused}"
    );
    assert!(
        refused
            .to_string()
            .contains("with a terminal master derivation key serves")
    );
    // Another with the key is welcome.
    assert!(start(Some(kdk.clone())).await.is_ok());
    // And the other way round: beside one without, one with is refused.
    let plain = world().await;
    let Err(refused) = switch::start(
        Arc::new(switch_config(&plain.issuer_addr, |_| {})),
        switch::connect(&plain.url, 2).await.unwrap(),
        plain.switch.key.clone(),
        Some(kdk),
        &CancellationToken::new(),
    )
    .await
    else {
        panic!("a switch with the key started beside one without it");
    };
    assert!(
        matches!(refused, switch::StartError::OtherKind { keyed: true }),
        "{refused}"
    );
}

#[tokio::test]
async fn switches_of_one_kind_starting_together_all_start() {
    let kdk = derivation_key(0x2D);
    let w = keyed_world(&kdk).await;
    let starts = (0..6).map(|_| {
        let (url, issuer, key, kdk) = (
            w.url.clone(),
            w.issuer_addr.clone(),
            w.switch.key.clone(),
            kdk.clone(),
        );
        tokio::spawn(async move {
            let started = switch::start(
                Arc::new(switch_config(&issuer, |_| {})),
                switch::connect(&url, 2).await.unwrap(),
                key,
                Some(kdk),
                &CancellationToken::new(),
            )
            .await;
            match started {
                Ok(s) => {
                    switch::k3::stop_serving(&s).await;
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            }
        })
    });
    for started in starts.collect::<Vec<_>>() {
        assert_eq!(started.await.unwrap(), Ok(()));
    }
}

#[tokio::test]
async fn a_switch_that_lost_its_locks_takes_them_again() {
    let kdk = derivation_key(0x2E);
    let w = keyed_world(&kdk).await;
    keyed_terminal(&w, &w.switch_addr, "T0000020", &kdk).await;
    let holder = || async {
        sqlx::query_scalar::<_, i32>(
            "SELECT pid FROM pg_stat_activity
             WHERE application_name = 'switchyard serve (K3 lock)' AND datname = current_database()",
        )
        .fetch_all(&w.pool)
        .await
        .unwrap()
    };
    let before = holder().await;
    assert_eq!(before.len(), 1, "{before:?}");
    // The backend holding them ends (as at a database restart).
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(before[0])
        .execute(&w.pool)
        .await
        .unwrap();
    until(
        &w.pool,
        Duration::from_secs(10),
        "the locks to be taken again",
        // SERVING (0x53574B33) granted to the new holder.
        &format!(
            "SELECT count(*) = 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'switchyard serve (K3 lock)' AND a.pid <> {}
               AND a.datname = current_database()
               AND l.locktype = 'advisory' AND l.objid = {} AND l.granted",
            before[0], 0x5357_4B33
        ),
    )
    .await;
    // Held again: keys are not forgotten under a serving switch.
    assert_eq!(
        switch::k3::forget_keys(&w.pool).await.unwrap(),
        switch::k3::Forgot::Serving
    );
}

#[tokio::test]
async fn a_switch_without_the_key_takes_nothing_unchecked_from_a_terminal_holding_keys() {
    let w = world().await;
    let card = "6222020000000000047";
    // Signed on through another switch: this one reads it afresh.
    let (_other, other_addr, other_stop) = w.another_switch().await;
    let mut t = Terminal::connect(&other_addr, "T0000019", MERCHANT, w.dialect.clone())
        .await
        .unwrap();
    assert_eq!(t.sign_on().await.unwrap().rc(), "00");
    other_stop.cancel();
    t.reconnect(&w.switch_addr).await.unwrap();
    // Keys handed out behind its back (a keyed switch while this one's
    // locks were lost).
    let kdk = derivation_key(0x2F);
    let f62 = WorkingKeys::new(iso8583::keys::KeySet::Single, &[7; 16])
        .to_f62(&kdk.master_key("T0000019"));
    sqlx::query("UPDATE terminals SET working_keys = $1 WHERE id = 'T0000019'")
        .bind(&f62)
        .execute(&w.pool)
        .await
        .unwrap();
    let before = w.balance(card).await;
    let (_, reply) = buy(&mut t, card, 300).await;
    assert_eq!(reply.rc(), "A0", "{reply:?}");
    assert_eq!(w.balance(card).await, before);
    // Nor does its sign-on take the keys away.
    let reply = t.sign_on().await.unwrap();
    assert_eq!(reply.rc(), "A0");
    let kept: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT working_keys FROM terminals WHERE id = 'T0000019'")
            .fetch_one(&w.pool)
            .await
            .unwrap();
    assert_eq!(kept, Some(f62));
}

#[tokio::test]
async fn a_switch_whose_keys_were_forgotten_while_its_locks_were_away_stops() {
    let kdk = derivation_key(0x30);
    let mut w = keyed_world(&kdk).await;
    keyed_terminal(&w, &w.switch_addr, "T0000020", &kdk).await;
    let holder: i32 = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity
         WHERE application_name = 'switchyard serve (K3 lock)' AND datname = current_database()",
    )
    .fetch_one(&w.pool)
    .await
    .unwrap();
    // Its locks taken again only once this lets go of the start lock.
    let mut starts = w.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(0x5357_4B36_i64)
        .execute(&mut *starts)
        .await
        .unwrap();
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(holder)
        .execute(&w.pool)
        .await
        .unwrap();
    until(
        &w.pool,
        Duration::from_secs(10),
        "the lock holder to be gone",
        &format!("SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = {holder})"),
    )
    .await;
    // In the gap the keys are forgotten.
    assert_eq!(
        switch::k3::forget_keys(&w.pool).await.unwrap(),
        switch::k3::Forgot::Keys(1)
    );
    starts.commit().await.unwrap();
    // The switch does not go on as if it handed them out: it stops.
    let run = w.run.take().expect("running");
    let stopped = tokio::time::timeout(Duration::from_secs(30), run).await;
    assert!(stopped.is_ok(), "the switch went on serving");
    // And says why, for `serve` to exit with it.
    let why = w.switch.stopped_because.lock().unwrap().clone();
    assert!(why.is_some_and(|w| w.contains("were forgotten")));
}
