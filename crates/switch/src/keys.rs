//! The PAN hash key: the journal keeps an HMAC-SHA-256 of each PAN under it
//! (to match voids, refunds and duplicates to the card) and never the PAN.
//! The key comes from a key file or the environment, never from the TOML.

use std::fmt;
use std::path::Path;

use hmac::{KeyInit, Mac};
use iso8583::Pan;
use iso8583::keys::DerivationKey;

/// Environment variable holding the key as 64 hex characters.
pub const ENV: &str = "SWITCHYARD_PAN_HASH_KEY";

/// Why no key could be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Neither a key file nor the environment variable.
    #[error(
        "no PAN hash key: set keys.pan_hash_key_file in the config or {ENV} (64 hex characters; `openssl rand -hex 32` makes one)"
    )]
    Missing,
    /// The key file cannot be read.
    #[error("{path}: cannot read the PAN hash key: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not 64 hex characters.
    #[error("{origin}: the PAN hash key must be 64 hex characters (32 bytes)")]
    Malformed {
        /// Where it came from.
        origin: String,
    },
}

/// The 32-byte key of the keyed PAN hash.
#[derive(Clone)]
pub struct PanHashKey([u8; 32]);

impl fmt::Debug for PanHashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PanHashKey(****)")
    }
}

impl PanHashKey {
    /// A key from 64 hex characters.
    pub fn from_hex(text: &str, origin: &str) -> Result<PanHashKey, KeyError> {
        let bytes = hex::decode(text.trim()).map_err(|_| KeyError::Malformed {
            origin: origin.into(),
        })?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Malformed {
            origin: origin.into(),
        })?;
        Ok(PanHashKey(key))
    }

    /// The key file when one is configured, else the environment.
    pub fn load(file: Option<&Path>) -> Result<PanHashKey, KeyError> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
                path: path.display().to_string(),
                source,
            })?;
            return PanHashKey::from_hex(&text, &path.display().to_string());
        }
        match std::env::var(ENV) {
            Ok(text) => PanHashKey::from_hex(&text, ENV),
            Err(_) => Err(KeyError::Missing),
        }
    }

    /// A fresh random key (the demo's, and the tests').
    pub fn generate() -> PanHashKey {
        use rand::Rng;
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        PanHashKey(key)
    }

    /// The key as hex, to write a key file.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A value that tells this key from another without giving it away
    /// (an HMAC of a fixed text), kept in the journal's database.
    pub fn check_value(&self) -> [u8; 32] {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0).expect("any key length");
        mac.update(b"switchyard pan hash key check");
        mac.finalize().into_bytes().into()
    }

    /// HMAC-SHA-256 of the PAN's digits.
    pub fn hash(&self, pan: &Pan) -> [u8; 32] {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0).expect("any key length");
        mac.update(pan.expose().as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// Environment variable holding the terminal master derivation key as 32
/// hex characters.
pub const TERMINAL_ENV: &str = "SWITCHYARD_TERMINAL_MASTER_DERIVATION_KEY";

/// Why the terminal master derivation key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TerminalKeyError {
    /// The key file cannot be read.
    #[error("{path}: cannot read the terminal master derivation key: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not 32 hex characters.
    #[error(
        "{origin}: {found}; the terminal master derivation key is 32 hex characters (16 bytes, a double-length DES key)"
    )]
    Malformed {
        /// Where it came from.
        origin: String,
        /// What it holds instead (never the key's text).
        found: String,
    },
    /// Its two halves are one key: single DES (an all-zero key is one).
    #[error(
        "{origin}: the terminal master derivation key's two halves are the same (single DES, or a test key of zeros): make one with `openssl rand -hex 16`"
    )]
    Weak {
        /// Where it came from.
        origin: String,
    },
}

/// The terminal master derivation key from its key file when one is
/// configured, else from [`TERMINAL_ENV`]; `None` when neither is given:
/// the switch then hands out no working keys and checks no MAC.
pub fn terminal_derivation_key(
    file: Option<&Path>,
) -> Result<Option<DerivationKey>, TerminalKeyError> {
    let (text, origin) = match file {
        Some(path) => (
            std::fs::read_to_string(path).map_err(|source| TerminalKeyError::Read {
                path: path.display().to_string(),
                source,
            })?,
            path.display().to_string(),
        ),
        // Empty is unset: docker compose passes `${VAR:-}` for a key not
        // wanted.
        None => match std::env::var(TERMINAL_ENV) {
            Ok(text) if !text.trim().is_empty() => (text, TERMINAL_ENV.to_string()),
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(TerminalKeyError::Malformed {
                    origin: TERMINAL_ENV.into(),
                    found: "not text".into(),
                });
            }
            _ => return Ok(None),
        },
    };
    derivation_key_from_hex(&text, &origin).map(Some)
}

/// A fresh random terminal master derivation key, as hex (the demo's, and
/// the tests').
pub fn random_derivation_key_hex() -> String {
    use rand::Rng;
    let mut key = [0u8; 16];
    rand::rng().fill_bytes(&mut key);
    hex::encode_upper(key)
}

/// A terminal master derivation key from 32 hex characters.
pub fn derivation_key_from_hex(
    text: &str,
    origin: &str,
) -> Result<DerivationKey, TerminalKeyError> {
    // A key file ends with a newline as often as not.
    let text = text.trim();
    let malformed = |found: String| TerminalKeyError::Malformed {
        origin: origin.into(),
        found,
    };
    if text.len() != 32 {
        return Err(malformed(format!("{} characters", text.chars().count())));
    }
    let mut key = [0u8; 16];
    hex::decode_to_slice(text, &mut key)
        .map_err(|_| malformed("a character that is not a hex digit".into()))?;
    // Parity bits aside, as DES reads them.
    if key[..8].iter().zip(&key[8..]).all(|(a, b)| a | 1 == b | 1) {
        return Err(TerminalKeyError::Weak {
            origin: origin.into(),
        });
    }
    Ok(DerivationKey::new(&key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_derivation_key_is_32_hex_characters_of_two_different_halves() {
        assert!(derivation_key_from_hex("0123456789ABCDEFFEDCBA9876543210\n", "f").is_ok());
        for (text, says) in [
            (
                "0123",
                "4 characters; the terminal master derivation key is 32 hex characters",
            ),
            (
                "0123456789ABCDEFFEDCBA987654321G",
                "a character that is not a hex digit",
            ),
            (&"00".repeat(16), "halves are the same"),
            ("0123456789ABCDEF0022446688AACCEE", "halves are the same"),
        ] {
            let said = derivation_key_from_hex(text, "key.hex")
                .unwrap_err()
                .to_string();
            assert!(said.starts_with("key.hex: "), "{said}");
            assert!(said.contains(says), "{text}: {said}");
            assert!(!said.contains(text), "the key said: {said}");
        }
    }

    #[test]
    fn the_hash_is_keyed_and_stable() {
        let pan = Pan::new("6222020000000000001").unwrap();
        let a = PanHashKey::from_hex(&"11".repeat(32), "t").unwrap();
        let b = PanHashKey::from_hex(&"22".repeat(32), "t").unwrap();
        assert_eq!(a.hash(&pan), a.hash(&pan));
        assert_ne!(a.hash(&pan), b.hash(&pan));
        assert_eq!(format!("{a:?}"), "PanHashKey(****)");
        assert!(PanHashKey::from_hex("abc", "t").is_err());
        let g = PanHashKey::generate();
        assert_eq!(
            PanHashKey::from_hex(&g.to_hex(), "t").unwrap().hash(&pan),
            g.hash(&pan)
        );
    }
}
