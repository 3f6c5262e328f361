//! Rule K3: the working keys a terminal gets at sign-on (F62) and the MAC
//! (F64) of every message after it but the network management ones (08xx),
//! both ways. A request from a terminal holding a MAC key whose F64 is
//! missing or wrong is answered `A0`; the reply to a request whose MAC was
//! verified carries F64 under the terminal's key (and no other does: see
//! the router). Switches with and without a derivation key never serve one
//! journal together (the advisory locks below).
//!
//! The switch keeps no clear key: a terminal's row holds the F62 it was
//! sent (keys under its master key), and the master key is derived from the
//! terminal master derivation key (`iso8583::keys`). The MAC keys in use
//! are kept here in memory, by terminal, for as long as their F62 is the
//! terminal's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use iso8583::keys::{DerivationKey, KeySet, WorkingKeys};
use iso8583::mac::{MAC_LEN, MacKey, cup_pos_mac, verify};
use iso8583::{Dialect, Message};
use sqlx::PgPool;

use crate::terminals::Terminal;

/// Past this many terminals the cache of MAC keys starts again.
const CACHED: usize = 100_000;

pub use iso8583::keys::mac_carried;

/// A terminal's MAC key, with the F62 it came from.
type Cached = (Vec<u8>, Arc<MacKey>);

/// The switch's side of K3.
pub struct TerminalKeys {
    derivation: DerivationKey,
    /// Terminal id → the F62 its MAC key came from, and the key.
    mac_keys: Mutex<HashMap<String, Cached>>,
}

impl std::fmt::Debug for TerminalKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TerminalKeys(****)")
    }
}

impl TerminalKeys {
    /// Keys derived from `derivation`.
    pub fn new(derivation: DerivationKey) -> TerminalKeys {
        TerminalKeys {
            derivation,
            mac_keys: Mutex::default(),
        }
    }

    /// Fresh working keys for a sign-on whose F60.3 is `code`, as F62
    /// carries them; `None` for a code that asks for none.
    pub fn issue(&self, terminal_id: &str, code: &str) -> Option<Vec<u8>> {
        use rand::Rng;
        let set = KeySet::from_code(code).ok()?;
        let mut random = vec![0u8; set.clear_len()];
        rand::rng().fill_bytes(&mut random);
        let keys = WorkingKeys::new(set, &random);
        Some(keys.to_f62(&self.derivation.master_key(terminal_id)))
    }

    /// The MAC key of a terminal, from the F62 of its last sign-on; `None`
    /// when it holds none, or when its F62 is not under this derivation key
    /// (it cannot be checked: every MAC is then wrong).
    pub fn mac_key(&self, terminal: &Terminal) -> Option<Arc<MacKey>> {
        let f62 = terminal.working_keys.as_deref()?;
        if let Ok(cache) = self.mac_keys.lock() {
            if let Some((from, key)) = cache.get(&terminal.id) {
                if from.as_slice() == f62 {
                    return Some(key.clone());
                }
            }
        }
        let tmk = self.derivation.master_key(&terminal.id);
        let key = Arc::new(WorkingKeys::from_f62(&tmk, f62).ok()?.mac_key());
        if let Ok(mut cache) = self.mac_keys.lock() {
            if cache.len() >= CACHED {
                cache.clear();
            }
            cache.insert(terminal.id.clone(), (f62.to_vec(), key.clone()));
        }
        Some(key)
    }

    /// The check value of the derivation key, kept in the journal's
    /// `meta`: its first 3 bytes only, as key ceremonies show it (the whole
    /// block would be a known plaintext and ciphertext of the root key).
    pub fn check_value(&self) -> [u8; 3] {
        let block = self.derivation.check_value();
        [block[0], block[1], block[2]]
    }
}

/// Whether the request's F64 is the MAC of the rest under `key`.
pub fn mac_valid(msg: &Message<'_>, key: &MacKey) -> bool {
    msg.binary(64)
        .is_some_and(|mac| verify(&cup_pos_mac(key, msg.mac_block()), mac))
}

/// Puts F64 on a reply frame written into `out` (length prefix, TPDU and
/// header included, F64 absent): sets bit 64 of the primary bitmap and
/// appends the MAC of the message from its MTI on (F64 is `b8`, fixed, and
/// the last field: the dialect check makes sure). An empty frame (nothing
/// to send) is left as it is; one that already carries F64 or more than
/// the primary bitmap cannot be sealed and is not sent (the terminal,
/// unanswered, reverses), which no reply the switch builds is.
pub fn seal(dialect: &Dialect, out: &mut BytesMut, key: &MacKey) {
    if out.is_empty() {
        return;
    }
    let body = 2 + dialect.tpdu_len() + dialect.header_len();
    let bitmap = body + dialect.mti_len();
    let sealable = out.len() >= bitmap + 8
        && out[bitmap] & 0x80 == 0
        && out[bitmap + 7] & 0x01 == 0
        && out.len() + MAC_LEN - 2 <= usize::from(u16::MAX);
    if !sealable {
        tracing::error!("a reply that cannot take a MAC: nothing sent");
        out.clear();
        return;
    }
    out[bitmap + 7] |= 0x01;
    let mac = cup_pos_mac(key, &out[body..]);
    out.extend_from_slice(&mac);
    let len = (out.len() - 2) as u16;
    out[..2].copy_from_slice(&len.to_be_bytes());
}

/// The derivation key's check value in `meta`: recorded when there is none,
/// compared when there is. `Err(recorded)`: the terminals' keys are under
/// another derivation key, whose check value is that.
pub async fn check_derivation_key(
    pool: &PgPool,
    keys: &TerminalKeys,
) -> Result<Result<(), Vec<u8>>, sqlx::Error> {
    let check = keys.check_value().to_vec();
    let stored: Option<Vec<u8>> = sqlx::query_scalar(
        "UPDATE meta SET terminal_key_check = coalesce(terminal_key_check, $1)
         RETURNING terminal_key_check",
    )
    .bind(&check)
    .fetch_one(pool)
    .await?;
    // Compared by its first 3 bytes: a journal of a build that kept the
    // whole block keeps it.
    Ok(match stored {
        Some(s) if s.get(..3) != Some(&check[..]) => Err(s),
        _ => Ok(()),
    })
}

/// For a switch started without a derivation key: `Some((terminals
/// holding keys, the check value kept))` when the journal's terminals got
/// keys under one, `None` when it never handed any out or they were given
/// up ([`forget_keys`]).
pub async fn keys_without_a_key(
    pool: &PgPool,
) -> Result<Option<(i64, Option<Vec<u8>>)>, sqlx::Error> {
    let (recorded, keyed): (Option<Vec<u8>>, i64) = sqlx::query_as(
        "SELECT (SELECT terminal_key_check FROM meta),
                (SELECT count(*) FROM terminals WHERE working_keys IS NOT NULL)",
    )
    .fetch_one(pool)
    .await?;
    Ok((recorded.is_some() || keyed > 0)
        .then(|| (keyed, recorded.map(|r| r[..3.min(r.len())].to_vec()))))
}

/// The advisory lock every serving switch holds shared for as long as it
/// runs, so that [`forget_keys`] can tell none is.
const SERVING: i64 = 0x5357_4B33;
/// Held shared as well by a switch with a derivation key...
const KEYED: i64 = 0x5357_4B34;
/// ...and by one without.
const KEYLESS: i64 = 0x5357_4B35;
/// Held for the moment a starting switch takes its locks.
const STARTING: i64 = 0x5357_4B36;

/// A connection holding [`SERVING`] shared, and [`KEYED`] or [`KEYLESS`]:
/// a switch serves on this database until it is dropped (the locks go
/// with the connection, a killed process's too). `Ok(Err(()))`: a switch
/// of the other kind serves on it. A switch without the key beside one
/// with it would approve every unMACed request of a terminal that got keys
/// from the other, and its sign-ons would take keys away.
pub async fn hold_serving(
    pool: &PgPool,
    keyed: bool,
) -> Result<Result<sqlx::PgConnection, ()>, sqlx::Error> {
    use sqlx::Connection;
    let (own, other) = if keyed {
        (KEYED, KEYLESS)
    } else {
        (KEYLESS, KEYED)
    };
    // Named, so that an operator finds it in pg_stat_activity, and never
    // timed out for being idle (its locks would go with it).
    let options = pool
        .connect_options()
        .as_ref()
        .clone()
        .application_name("switchyard serve (K3 lock)")
        .options([("idle_session_timeout", "0")]);
    let mut conn = sqlx::PgConnection::connect_with(&options).await?;
    // One start at a time takes its locks and looks for the other kind's:
    // two starts at one moment never see each other's look as a switch.
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(STARTING)
        .execute(&mut *tx)
        .await?;
    // Session locks: they outlive the transaction, until let go.
    sqlx::query("SELECT pg_advisory_lock_shared($1), pg_advisory_lock_shared($2)")
        .bind(SERVING)
        .bind(own)
        .execute(&mut *tx)
        .await?;
    let alone: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(other)
        .fetch_one(&mut *tx)
        .await?;
    if alone {
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(other)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    if !alone {
        release(conn).await;
        return Ok(Err(()));
    }
    Ok(Ok(conn))
}

/// At a switch's start: its locks taken ([`hold_serving`]), then its
/// derivation key checked against the journal's, or, without one, that
/// the journal's terminals got no keys under one. On a refusal the locks
/// go at once, so that what the operator does next (`forget-keys`, another
/// start) does not meet them.
pub async fn serve(
    pool: &PgPool,
    derivation: Option<DerivationKey>,
) -> Result<(sqlx::PgConnection, Option<TerminalKeys>), crate::StartError> {
    let keys = derivation.map(TerminalKeys::new);
    let conn = lock_and_check(pool, keys.as_ref(), false).await?;
    Ok((conn, keys))
}

/// [`serve`]'s locks and checks, for `keys` already made. `again`: taken
/// again by a running switch, which records no check value: the journal
/// must still keep its own (none kept means the keys were forgotten while
/// its locks were away, and it must not go on as if it handed them out).
async fn lock_and_check(
    pool: &PgPool,
    keys: Option<&TerminalKeys>,
    again: bool,
) -> Result<sqlx::PgConnection, crate::StartError> {
    use crate::StartError;
    // Taken before the keys are checked: a `terminals forget-keys` from
    // now on sees this switch and waits for it to stop.
    let keyed = keys.is_some();
    let Ok(conn) = hold_serving(pool, keyed).await? else {
        return Err(StartError::OtherKind { keyed });
    };
    let refused = match keys {
        Some(keys) if again => {
            let kept: Option<Vec<u8>> = sqlx::query_scalar("SELECT terminal_key_check FROM meta")
                .fetch_optional(pool)
                .await?
                .flatten();
            match kept {
                Some(k) if k.get(..3) == Some(&keys.check_value()[..]) => None,
                Some(k) => Some(StartError::TerminalKeyMismatch {
                    given: hex::encode_upper(keys.check_value()),
                    recorded: hex::encode_upper(&k[..3.min(k.len())]),
                }),
                None => Some(StartError::TerminalKeysForgotten),
            }
        }
        Some(keys) => check_derivation_key(pool, keys)
            .await?
            .err()
            .map(|recorded| StartError::TerminalKeyMismatch {
                given: hex::encode_upper(keys.check_value()),
                recorded: hex::encode_upper(&recorded[..3.min(recorded.len())]),
            }),
        // Without the key no MAC can be checked: a fleet whose terminals
        // hold keys would be served unauthenticated (and would reverse
        // every reply, unsealed). Keys are given up on purpose, with
        // `switchyard terminals forget-keys`.
        None => keys_without_a_key(pool)
            .await?
            .map(|(terminals, recorded)| StartError::TerminalKeyMissing {
                terminals,
                recorded: recorded.map_or("none kept".into(), hex::encode_upper),
            }),
    };
    match refused {
        Some(e) => {
            release(conn).await;
            Err(e)
        }
        None => Ok(conn),
    }
}

/// While the switch runs: the connection holding its locks is looked at
/// every second. Lost (the database restarted, a backend was ended), its
/// locks went with it, and with them what keeps `forget-keys` and a switch
/// of the other kind away: they are taken again, with the start's checks.
/// Should those now refuse (a switch of the other kind came meanwhile, the
/// keys were forgotten under it), the switch stops.
pub async fn keep_serving(
    switch: std::sync::Arc<crate::Switch>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lost = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut held = switch.serving.lock().await;
        if !lost {
            // None: let go at the end of the run.
            let Some(conn) = held.as_mut() else {
                return;
            };
            let ping = sqlx::query("SELECT 1").execute(&mut *conn);
            if let Ok(Ok(_)) = tokio::time::timeout(std::time::Duration::from_secs(5), ping).await {
                continue;
            }
            tracing::warn!(
                "the connection holding this switch's K3 locks is gone (the database \
                 restarted?): taking them again"
            );
            *held = None;
            lost = true;
        }
        // A database still away may take its time to say so: a stop does not
        // wait for it.
        let taken = tokio::select! {
            taken = lock_and_check(&switch.pool, switch.terminal_keys.as_ref(), true) => taken,
            () = shutdown.cancelled() => return,
        };
        match taken {
            Ok(conn) => {
                *held = Some(conn);
                lost = false;
                tracing::info!("K3 locks taken again");
            }
            // The database still away: tried again in a second.
            Err(crate::StartError::Database(e)) => {
                tracing::debug!(error = %e, "K3 locks not taken yet");
            }
            Err(refused) => {
                tracing::error!("{refused}: this switch stops");
                if let Ok(mut why) = switch.stopped_because.lock() {
                    *why = Some(refused.to_string());
                }
                shutdown.cancel();
                return;
            }
        }
    }
}

/// Lets every lock of a connection go and closes it.
async fn release(mut conn: sqlx::PgConnection) {
    use sqlx::Connection;
    let _ = sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
}

/// Lets the lock of [`hold_serving`] go, at the end of a run: a
/// `forget-keys` right after a switch stopped sees it stopped.
pub async fn stop_serving(switch: &crate::Switch) {
    if let Some(conn) = switch.serving.lock().await.take() {
        release(conn).await;
    }
}

/// What [`forget_keys`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Forgot {
    /// The keys of this many terminals were forgotten.
    Keys(u64),
    /// Nothing: a switch is serving on the database. It would go on
    /// checking MACs under keys its cache still has, answer 77 to terminals
    /// as their keys go, and seal nothing for them.
    Serving,
}

/// Gives up K3 on purpose: every terminal's working keys and the
/// derivation key's check value are forgotten, so a switch starts without
/// the key (terminals sign on again, and get none) or with another (they
/// sign on again under it). Refused while a switch serves.
pub async fn forget_keys(pool: &PgPool) -> Result<Forgot, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let alone: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(SERVING)
        .fetch_one(&mut *tx)
        .await?;
    if !alone {
        return Ok(Forgot::Serving);
    }
    let forgotten =
        sqlx::query("UPDATE terminals SET working_keys = NULL WHERE working_keys IS NOT NULL")
            .execute(&mut *tx)
            .await?
            .rows_affected();
    sqlx::query("UPDATE meta SET terminal_key_check = NULL")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Forgot::Keys(forgotten))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_reply_parses_and_its_mac_verifies() {
        let ascii_mti = iso8583::dialect::CUP_POS_TOML.replacen(
            "encoding = \"bcd\"",
            "encoding = \"ascii\"",
            1,
        );
        assert_ne!(ascii_mti, iso8583::dialect::CUP_POS_TOML);
        let ascii_mti = Dialect::from_toml(&ascii_mti, "ascii-mti.toml").unwrap();
        assert_eq!(ascii_mti.mti_len(), 4);
        for dialect in [Dialect::cup_pos(), ascii_mti] {
            let key = MacKey::new(&[0x13; 16]).unwrap();
            let mut out = BytesMut::new();
            let mut w = iso8583::MessageWriter::new(
                &dialect,
                &mut out,
                iso8583::Mti::new(510).unwrap(),
                &[0x60, 0, 3, 0, 0],
                &[0x60, 0x31, 0, 0, 0, 0],
            )
            .unwrap();
            w.digits(3, "000000").unwrap();
            w.text(39, "00").unwrap();
            w.text(41, "T0000001").unwrap();
            w.digits(48, &"0".repeat(62)).unwrap();
            w.finish().unwrap();
            seal(&dialect, &mut out, &key);
            let len = u16::from_be_bytes([out[0], out[1]]) as usize;
            assert_eq!(len, out.len() - 2);
            let msg = Message::parse(&dialect, &out[2..]).unwrap();
            assert!(msg.has(48), "{msg:?}");
            assert!(mac_valid(&msg, &key));
            assert!(!mac_valid(&msg, &MacKey::new(&[0x31; 16]).unwrap()));
            // A frame that carries F64 already is not sealed again: not sent.
            seal(&dialect, &mut out, &key);
            assert!(out.is_empty());
            // Nothing to send stays nothing.
            seal(&dialect, &mut out, &key);
            assert!(out.is_empty());
        }
    }
}
