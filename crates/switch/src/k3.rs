//! Rule K3: the working keys a terminal gets at sign-on (F62) and the MAC
//! (F64) of every message after it but the network management ones (08xx),
//! both ways. A request from a terminal holding a MAC key whose F64 is
//! missing or wrong is answered `A0`; every reply to such a terminal carries
//! F64 under its key.
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
use iso8583::mac::{MacKey, cup_pos_mac, verify};
use iso8583::{Dialect, Message, Mti};
use sqlx::PgPool;

use crate::terminals::Terminal;

/// Past this many terminals the cache of MAC keys starts again.
const CACHED: usize = 100_000;

/// Whether messages of `mti` carry a MAC: all but network management (08xx).
pub fn mac_carried(mti: Mti) -> bool {
    mti.value() / 100 != 8
}

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

    /// The check value of the derivation key, kept in the journal's `meta`.
    pub fn check_value(&self) -> [u8; 8] {
        self.derivation.check_value()
    }

    /// The master key of `terminal_id`, for its key-loading device.
    pub fn master_key(&self, terminal_id: &str) -> iso8583::keys::MasterKey {
        self.derivation.master_key(terminal_id)
    }
}

/// Whether the request's F64 is the MAC of the rest under `key`.
pub fn mac_valid(msg: &Message<'_>, key: &MacKey) -> bool {
    msg.binary(64)
        .is_some_and(|mac| verify(&cup_pos_mac(key, msg.mac_block()), mac))
}

/// Puts F64 on a reply frame written into `out` (length prefix, TPDU and
/// header included, F64 absent): sets bit 64 of the bitmap and appends the
/// MAC of the message from its MTI on. A frame that cannot take it (empty,
/// or already carrying F64) is left as it is.
pub fn seal(dialect: &Dialect, out: &mut BytesMut, key: &MacKey) {
    let body = 2 + dialect.tpdu_len() + dialect.header_len();
    // MTI (2 bytes BCD) then the primary bitmap: bit 64 is the last bit of
    // its eighth byte.
    let last_bitmap_byte = body + 2 + 7;
    if out.len() <= last_bitmap_byte || out[last_bitmap_byte] & 0x01 != 0 {
        return;
    }
    out[last_bitmap_byte] |= 0x01;
    let mac = cup_pos_mac(key, &out[body..]);
    out.extend_from_slice(&mac);
    let len = u16::try_from(out.len() - 2).unwrap_or(u16::MAX);
    out[..2].copy_from_slice(&len.to_be_bytes());
}

/// The derivation key's check value in `meta`: recorded when there is none,
/// compared when there is. `false`: the terminals' keys are under another
/// derivation key.
pub async fn check_derivation_key(pool: &PgPool, keys: &TerminalKeys) -> Result<bool, sqlx::Error> {
    let check = keys.check_value().to_vec();
    let stored: Option<Vec<u8>> = sqlx::query_scalar(
        "UPDATE meta SET terminal_key_check = coalesce(terminal_key_check, $1)
         RETURNING terminal_key_check",
    )
    .bind(&check)
    .fetch_one(pool)
    .await?;
    Ok(stored.as_deref() == Some(check.as_slice()))
}

/// How many terminals hold working keys (a switch started without a
/// derivation key says so: their MACs go unchecked).
pub async fn keyed_terminals(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM terminals WHERE working_keys IS NOT NULL")
        .fetch_one(pool)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_reply_parses_and_its_mac_verifies() {
        let dialect = Dialect::cup_pos();
        let key = MacKey::new(&[0x13; 16]).unwrap();
        let mut out = BytesMut::new();
        let mut w = iso8583::MessageWriter::new(
            &dialect,
            &mut out,
            Mti::new(210).unwrap(),
            &[0x60, 0, 3, 0, 0],
            &[0x60, 0x31, 0, 0, 0, 0],
        )
        .unwrap();
        w.digits(3, "000000").unwrap();
        w.text(39, "00").unwrap();
        w.text(41, "T0000001").unwrap();
        w.finish().unwrap();
        seal(&dialect, &mut out, &key);
        let len = u16::from_be_bytes([out[0], out[1]]) as usize;
        assert_eq!(len, out.len() - 2);
        let msg = Message::parse(&dialect, &out[2..]).unwrap();
        assert!(mac_valid(&msg, &key));
        assert!(!mac_valid(&msg, &MacKey::new(&[0x31; 16]).unwrap()));
        // Sealed once only.
        let before = out.clone();
        seal(&dialect, &mut out, &key);
        assert_eq!(out, before);
    }
}
