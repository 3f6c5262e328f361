//! Terminal keys: the master key each terminal holds, and the working keys
//! the switch hands out at sign-on in F62 (terminal-cup.md leaves F62's
//! layout to the deployment; this is the one UnionPay POS hosts use).
//!
//! * **Terminal master key (TMK)**, 16 bytes, two-key triple DES. It is
//!   derived from one terminal master derivation key and the terminal id
//!   (F41), as EMV derives a card's master key from the issuer master key and
//!   the PAN (EMV 4.3 Book 2, A1.4.1, option A): `Z` is the 8 bytes of the
//!   terminal id, the key is `TDES(Z) || TDES(Z xor FF..FF)` with odd
//!   parity. One key in the switch's key file gives every terminal its own
//!   TMK, and the key-loading device gets a terminal's from the same
//!   derivation.
//! * **Working keys**: a PIN key (PIK), a MAC key (MAK) and, for 60.3
//!   `004`, a track data key (TDK), each sent encrypted under the TMK (ECB)
//!   and followed by its check value, the first 4 bytes of 8 zero bytes
//!   encrypted under the clear key. F60.3 of the sign-on chooses the set:
//!
//! | F60.3 | keys | F62 |
//! |---|---|---|
//! | `001` | single DES | PIK 8 + 4, MAK 8 + 4: 24 bytes |
//! | `003` | double length | PIK 16 + 4, MAK 16 + 4: 40 bytes |
//! | `004` | double length, with TDK | PIK 16 + 4, MAK 16 + 4, TDK 16 + 4: 60 bytes |

use core::fmt;

use cipher::{BlockCipherDecrypt, BlockCipherEncrypt, Key, KeyInit};
use des::{Des, TdesEde2};

use crate::mac::MacKey;

/// Whether messages of `mti` carry a MAC (F64) once a terminal holds keys:
/// all but network management (08xx: sign-on, sign-off, echo).
pub fn mac_carried(mti: crate::Mti) -> bool {
    mti.value() / 100 != 8
}

/// Length of a check value in F62.
pub const CHECK_LEN: usize = 4;

/// Why F62 or a key could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// F62 of a length no key set has.
    #[error("working keys of {0} bytes: F62 is 24 (60.3 001), 40 (003) or 60 (004) bytes")]
    Length(usize),
    /// A key decrypted under the TMK does not give its check value.
    #[error("the {0}'s check value does not match: encrypted under another master key")]
    Check(&'static str),
    /// A network management code that hands out no keys.
    #[error("60.3 {0:?} asks for no working keys (001, 003 or 004 do)")]
    Code(String),
}

/// Which working keys a sign-on asks for (F60.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySet {
    /// `001`: single-DES PIK and MAK.
    Single,
    /// `003`: double-length PIK and MAK.
    Double,
    /// `004`: double-length PIK, MAK and TDK.
    DoubleWithTrack,
}

impl KeySet {
    /// The set a sign-on's F60.3 asks for.
    pub fn from_code(code: &str) -> Result<KeySet, KeyError> {
        match code {
            "001" => Ok(KeySet::Single),
            "003" => Ok(KeySet::Double),
            "004" => Ok(KeySet::DoubleWithTrack),
            other => Err(KeyError::Code(other.into())),
        }
    }

    /// The set F62 of this length carries.
    pub fn from_f62_len(len: usize) -> Result<KeySet, KeyError> {
        [KeySet::Single, KeySet::Double, KeySet::DoubleWithTrack]
            .into_iter()
            .find(|s| s.f62_len() == len)
            .ok_or(KeyError::Length(len))
    }

    /// Length of each key.
    pub fn key_len(self) -> usize {
        match self {
            KeySet::Single => 8,
            KeySet::Double | KeySet::DoubleWithTrack => 16,
        }
    }

    /// How many keys: PIK, MAK and perhaps TDK.
    pub fn keys(self) -> usize {
        match self {
            KeySet::DoubleWithTrack => 3,
            _ => 2,
        }
    }

    /// Length of its F62.
    pub fn f62_len(self) -> usize {
        self.keys() * (self.key_len() + CHECK_LEN)
    }

    /// Clear bytes it needs to generate its keys.
    pub fn clear_len(self) -> usize {
        self.keys() * self.key_len()
    }
}

/// Sets each byte's low bit so that it has an odd number of ones: DES
/// ignores the bit, key-loading devices and HSMs check it.
pub fn odd_parity(key: &mut [u8]) {
    for b in key {
        *b = (*b & 0xFE) | u8::from((*b >> 1).count_ones() % 2 == 0);
    }
}

fn tdes(key: &[u8; 16]) -> TdesEde2 {
    TdesEde2::new(&Key::<TdesEde2>::from(*key))
}

/// The 16-byte key from which every terminal's master key is derived.
#[derive(Clone)]
pub struct DerivationKey(TdesEde2);

impl fmt::Debug for DerivationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DerivationKey(****)")
    }
}

impl DerivationKey {
    /// The key from its 16 clear bytes.
    pub fn new(key: &[u8; 16]) -> DerivationKey {
        DerivationKey(tdes(key))
    }

    /// 8 zero bytes encrypted under it: its check value is the first 3
    /// bytes, as key ceremonies print it.
    pub fn check_value(&self) -> [u8; 8] {
        let mut block = [0u8; 8];
        self.0.encrypt_block((&mut block).into());
        block
    }

    /// The master key of terminal `terminal_id` (F41, 8 characters; a
    /// shorter id is padded with spaces, as F41 is).
    pub fn master_key(&self, terminal_id: &str) -> MasterKey {
        let mut z = [b' '; 8];
        for (d, s) in z.iter_mut().zip(terminal_id.bytes()) {
            *d = s;
        }
        let mut left = z;
        let mut right = z.map(|b| b ^ 0xFF);
        self.0.encrypt_block((&mut left).into());
        self.0.encrypt_block((&mut right).into());
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&left);
        key[8..].copy_from_slice(&right);
        odd_parity(&mut key);
        MasterKey { clear: key }
    }
}

/// A terminal master key (TMK).
#[derive(Clone)]
pub struct MasterKey {
    clear: [u8; 16],
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(****)")
    }
}

impl MasterKey {
    /// The key as a terminal holds it (16 bytes), for its key-loading
    /// device and for simulated terminals.
    pub fn clear(&self) -> [u8; 16] {
        self.clear
    }

    /// Encrypts a key (8 or 16 bytes) under this one, ECB.
    fn wrap(&self, key: &[u8]) -> Vec<u8> {
        let cipher = tdes(&self.clear);
        let mut out = key.to_vec();
        for block in out.chunks_exact_mut(8) {
            cipher.encrypt_block(block.try_into().expect("8 bytes"));
        }
        out
    }

    /// Decrypts a key encrypted under this one.
    fn unwrap(&self, wrapped: &[u8]) -> Vec<u8> {
        let cipher = tdes(&self.clear);
        let mut out = wrapped.to_vec();
        for block in out.chunks_exact_mut(8) {
            cipher.decrypt_block(block.try_into().expect("8 bytes"));
        }
        out
    }
}

/// The check value of a clear key of 8 or 16 bytes.
pub fn check_value(key: &[u8]) -> [u8; CHECK_LEN] {
    let mut block = [0u8; 8];
    match key.len() {
        8 => Des::new(&Key::<Des>::from(<[u8; 8]>::try_from(key).expect("8")))
            .encrypt_block((&mut block).into()),
        _ => tdes(&key.try_into().expect("a key of 8 or 16 bytes"))
            .encrypt_block((&mut block).into()),
    }
    let mut out = [0u8; CHECK_LEN];
    out.copy_from_slice(&block[..CHECK_LEN]);
    out
}

/// A terminal's working keys in clear.
#[derive(Clone)]
pub struct WorkingKeys {
    set: KeySet,
    /// PIK, MAK and perhaps TDK, each `set.key_len()` bytes.
    clear: Vec<u8>,
}

impl fmt::Debug for WorkingKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkingKeys({:?}, ****)", self.set)
    }
}

impl WorkingKeys {
    /// Keys of `set` from `random` bytes (at least `set.clear_len()`),
    /// parity set.
    pub fn new(set: KeySet, random: &[u8]) -> WorkingKeys {
        let mut clear = random[..set.clear_len()].to_vec();
        odd_parity(&mut clear);
        WorkingKeys { set, clear }
    }

    /// Which set these are.
    pub fn set(&self) -> KeySet {
        self.set
    }

    fn key(&self, i: usize) -> &[u8] {
        let n = self.set.key_len();
        &self.clear[i * n..(i + 1) * n]
    }

    /// The MAC key, for [`crate::mac::cup_pos_mac`].
    pub fn mac_key(&self) -> MacKey {
        MacKey::new(self.key(1)).expect("8 or 16 bytes")
    }

    /// F62 of the sign-on reply: each key under `tmk`, then its check value.
    pub fn to_f62(&self, tmk: &MasterKey) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.set.f62_len());
        for i in 0..self.set.keys() {
            out.extend_from_slice(&tmk.wrap(self.key(i)));
            out.extend_from_slice(&check_value(self.key(i)));
        }
        out
    }

    /// The keys of an F62 sent under `tmk`, each checked against its check
    /// value.
    pub fn from_f62(tmk: &MasterKey, f62: &[u8]) -> Result<WorkingKeys, KeyError> {
        let set = KeySet::from_f62_len(f62.len())?;
        let n = set.key_len();
        let mut clear = Vec::with_capacity(set.clear_len());
        for (i, part) in f62.chunks_exact(n + CHECK_LEN).enumerate() {
            let key = tmk.unwrap(&part[..n]);
            if check_value(&key) != part[n..] {
                return Err(KeyError::Check(["PIN key", "MAC key", "track key"][i]));
            }
            clear.extend_from_slice(&key);
        }
        Ok(WorkingKeys { set, clear })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kdk() -> DerivationKey {
        DerivationKey::new(&[
            0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF, 0xFE, 0xDC, 0xBA, 0x98, 0x76, 0x54,
            0x32, 0x10,
        ])
    }

    #[test]
    fn check_values_match_the_published_ones() {
        // The check value of the DES test key 0123456789ABCDEF is 0xD5D44F
        // (first 3 bytes), and of the double-length key
        // 0123456789ABCDEFFEDCBA9876543210 0x08D7B4: the figures key
        // ceremonies print for these keys.
        let single = [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF];
        assert_eq!(check_value(&single)[..3], [0xD5, 0xD4, 0x4F]);
        let double = [
            0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF, 0xFE, 0xDC, 0xBA, 0x98, 0x76, 0x54,
            0x32, 0x10,
        ];
        assert_eq!(check_value(&double)[..3], [0x08, 0xD7, 0xB4]);
        assert_eq!(kdk().check_value()[..3], [0x08, 0xD7, 0xB4]);
    }

    #[test]
    fn the_master_key_and_f62_match_an_outside_computation() {
        // Computed with pycryptodome, not with this code: TDES-ECB under
        // the test key of "T0000001" and of its complement, odd parity; F62
        // of PIK 0102020404070708 and MAK 080B0B0D0D0E0E10 (bytes 1 to 16,
        // odd parity) under that TMK, each with the first 4 bytes of
        // DES(key, 0^8).
        let tmk = kdk().master_key("T0000001");
        assert_eq!(
            tmk.clear(),
            [
                0xD9, 0x79, 0x38, 0x67, 0x02, 0xE3, 0x92, 0x04, 0xAD, 0xFE, 0xBF, 0x26, 0x9E, 0x7C,
                0x92, 0x37
            ]
        );
        let random: Vec<u8> = (1u8..=16).collect();
        let f62 = WorkingKeys::new(KeySet::Single, &random).to_f62(&tmk);
        let expected = "215E4C06A024A0FDB073DC3FFD34614FB8FCE093FC630273";
        let hex: String = f62.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(hex, expected);
    }

    #[test]
    fn each_terminal_has_its_own_master_key_with_odd_parity() {
        let a = kdk().master_key("T0000001").clear();
        let b = kdk().master_key("T0000002").clear();
        assert_ne!(a, b);
        assert_eq!(a, kdk().master_key("T0000001").clear());
        assert!(a.iter().chain(&b).all(|x| x.count_ones() % 2 == 1));
        assert_ne!(a[..8], a[8..]);
    }

    #[test]
    fn f62_round_trips_for_each_set_and_refuses_another_master_key() {
        let random: Vec<u8> = (0u8..48)
            .map(|i| i.wrapping_mul(37).wrapping_add(11))
            .collect();
        let tmk = kdk().master_key("T0000001");
        let other = kdk().master_key("T0000002");
        for (code, len) in [("001", 24), ("003", 40), ("004", 60)] {
            let set = KeySet::from_code(code).unwrap();
            let keys = WorkingKeys::new(set, &random);
            let f62 = keys.to_f62(&tmk);
            assert_eq!(f62.len(), len, "{code}");
            let back = WorkingKeys::from_f62(&tmk, &f62).unwrap();
            assert_eq!(back.clear, keys.clear);
            assert_eq!(back.set(), set);
            // The MAC key is the second one.
            assert_eq!(
                crate::mac::cup_pos_mac(&back.mac_key(), b"0200"),
                crate::mac::cup_pos_mac(&MacKey::new(keys.key(1)).unwrap(), b"0200")
            );
            assert_eq!(
                WorkingKeys::from_f62(&other, &f62).unwrap_err(),
                KeyError::Check("PIN key")
            );
        }
        assert_eq!(
            WorkingKeys::from_f62(&tmk, &[0; 23]).unwrap_err(),
            KeyError::Length(23)
        );
        assert!(KeySet::from_code("002").is_err());
        assert!(format!("{:?}", WorkingKeys::new(KeySet::Single, &random)).contains("****"));
    }
}
