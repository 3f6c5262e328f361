//! The issuer's PAN hash key. The issuer keeps no clear PAN either: a card
//! is found by the HMAC-SHA-256 of its PAN under this key, and shown to
//! people masked (first 6 / last 4). The key comes from a key file or the
//! environment, never from the TOML; it is the issuer's own, not the
//! switch's.

use std::fmt;

use hmac::{KeyInit, Mac};
use iso8583::Pan;

use crate::config::KeysConfig;

/// Environment variable holding the key as 64 hex characters.
pub const PAN_KEY_ENV: &str = "SWITCHYARD_ISSUER_PAN_KEY";

/// Why no key could be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Neither a key file nor the environment variable.
    #[error(
        "no issuer PAN key: set keys.pan_key_file in the config or {PAN_KEY_ENV} (64 hex characters; `openssl rand -hex 32` makes one)"
    )]
    Missing,
    /// The key file cannot be read.
    #[error("{path}: cannot read the issuer PAN key: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not 64 hex characters.
    #[error("{origin}: the issuer PAN key must be 64 hex characters (32 bytes)")]
    Malformed {
        /// Where it came from.
        origin: String,
    },
}

/// The 32-byte key of the keyed PAN hash. Prints as `PanKey(****)`.
#[derive(Clone, PartialEq, Eq)]
pub struct PanKey([u8; 32]);

impl fmt::Debug for PanKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PanKey(****)")
    }
}

impl PanKey {
    /// A key from 64 hex characters (surrounding whitespace ignored);
    /// `origin` names where they came from in the error.
    pub fn from_hex(text: &str, origin: &str) -> Result<PanKey, KeyError> {
        let malformed = || KeyError::Malformed {
            origin: origin.into(),
        };
        let bytes = hex::decode(text.trim()).map_err(|_| malformed())?;
        Ok(PanKey(bytes.try_into().map_err(|_| malformed())?))
    }

    /// The key file when the config names one, else `SWITCHYARD_ISSUER_PAN_KEY`.
    pub fn load(keys: &KeysConfig) -> Result<PanKey, KeyError> {
        if let Some(path) = &keys.pan_key_file {
            let origin = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
                path: origin.clone(),
                source,
            })?;
            return PanKey::from_hex(&text, &origin);
        }
        match std::env::var(PAN_KEY_ENV) {
            Ok(text) => PanKey::from_hex(&text, PAN_KEY_ENV),
            Err(_) => Err(KeyError::Missing),
        }
    }

    /// A fresh random key: for a throwaway database (the demo, the tests),
    /// where no card outlives the process.
    pub fn random() -> PanKey {
        PanKey(rand::random())
    }

    /// The key as hex, to write a key file.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// HMAC-SHA-256 of the PAN's digits: how the issuer finds a card.
    pub fn hash(&self, pan: &Pan) -> [u8; 32] {
        self.mac(pan.expose().as_bytes())
    }

    /// What the database remembers of the key, to refuse another one: the
    /// HMAC of a fixed label, which says nothing about the key or any PAN.
    pub(crate) fn check_value(&self) -> [u8; 32] {
        self.mac(b"switchyard issuer-sim key check")
    }

    fn mac(&self, data: &[u8]) -> [u8; 32] {
        let mut mac =
            hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(data);
        mac.finalize().into_bytes().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_keyed_and_stable_and_the_key_never_prints() {
        let pan = Pan::new("6222020000000000001").unwrap();
        let a = PanKey::from_hex(&"11".repeat(32), "t").unwrap();
        let b = PanKey::from_hex(&format!(" {}\n", "22".repeat(32)), "t").unwrap();
        assert_eq!(a.hash(&pan), a.hash(&pan));
        assert_ne!(a.hash(&pan), b.hash(&pan));
        assert_ne!(a.check_value(), b.check_value());
        assert_eq!(format!("{a:?}"), "PanKey(****)");
        assert!(matches!(
            PanKey::from_hex("abc", "t"),
            Err(KeyError::Malformed { .. })
        ));
        let r = PanKey::random();
        assert_eq!(PanKey::from_hex(&r.to_hex(), "t").unwrap(), r);
    }

    #[test]
    fn a_key_file_wins_over_the_environment() {
        let path = std::env::temp_dir().join(format!("issuer-key-{}", std::process::id()));
        std::fs::write(&path, "33".repeat(32)).unwrap();
        let keys = KeysConfig {
            pan_key_file: Some(path.clone()),
        };
        assert_eq!(
            PanKey::load(&keys).unwrap(),
            PanKey::from_hex(&"33".repeat(32), "t").unwrap()
        );
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(PanKey::load(&keys), Err(KeyError::Read { .. })));
    }
}
