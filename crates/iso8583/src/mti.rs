//! The message type indicator.

use std::fmt;
use std::str::FromStr;

use crate::error::BuildError;

/// A message type indicator: four decimal digits, `0200` and the like.
///
/// The digits are version, class, function and origin. A reply's function
/// digit is the request's plus one (`0200` → `0210`); an advice repeated
/// because no answer came has origin digit 1 (`0420` → `0421`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mti(u16);

impl Mti {
    /// `0100` authorisation request (pre-authorisation).
    pub const AUTHORIZATION: Mti = Mti(100);
    /// `0200` financial request.
    pub const FINANCIAL: Mti = Mti(200);
    /// `0220` financial advice.
    pub const FINANCIAL_ADVICE: Mti = Mti(220);
    /// `0320` file update (batch upload).
    pub const BATCH_UPLOAD: Mti = Mti(320);
    /// `0400` reversal request.
    pub const REVERSAL: Mti = Mti(400);
    /// `0420` reversal advice.
    pub const REVERSAL_ADVICE: Mti = Mti(420);
    /// `0500` reconciliation (settlement).
    pub const SETTLEMENT: Mti = Mti(500);
    /// `0800` network management request.
    pub const NETWORK: Mti = Mti(800);
    /// `0820` network management advice.
    pub const NETWORK_ADVICE: Mti = Mti(820);

    /// The MTI of the four digits of `value` (0 to 9999).
    pub const fn new(value: u16) -> Option<Mti> {
        if value <= 9999 {
            Some(Mti(value))
        } else {
            None
        }
    }

    /// The MTI as a number (`0200` is 200).
    pub const fn value(self) -> u16 {
        self.0
    }

    /// The four digits as ASCII.
    pub const fn digits(self) -> [u8; 4] {
        let v = self.0;
        [
            b'0' + (v / 1000) as u8,
            b'0' + (v / 100 % 10) as u8,
            b'0' + (v / 10 % 10) as u8,
            b'0' + (v % 10) as u8,
        ]
    }

    /// Version and class, the part a reply shares with its request (`02` of `0210`).
    pub const fn class(self) -> u16 {
        self.0 / 100
    }

    /// The function digit: 0 request, 1 request response, 2 advice, 3 advice response.
    pub const fn function(self) -> u16 {
        self.0 / 10 % 10
    }

    /// True for requests and advices (even function digit).
    pub const fn is_request(self) -> bool {
        self.function() % 2 == 0
    }

    /// True for a repeat (origin digit 1, `0221`, `0421`).
    pub const fn is_repeat(self) -> bool {
        self.0 % 10 == 1
    }

    /// The reply's MTI: function + 1, origin 0 (`0200` → `0210`, `0421` → `0430`).
    /// Only requests have replies; `999x` wraps to `0000` rather than leave
    /// four digits.
    pub const fn reply(self) -> Mti {
        Mti((self.0 / 10 * 10 + 10) % 10_000)
    }

    /// The repeat of an advice (`0420` → `0421`).
    pub const fn repeat(self) -> Mti {
        Mti(self.0 / 10 * 10 + 1)
    }

    /// The original of a repeat (`0421` → `0420`).
    pub const fn first(self) -> Mti {
        Mti(self.0 / 10 * 10)
    }
}

impl fmt::Display for Mti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}", self.0)
    }
}

impl fmt::Debug for Mti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mti({:04})", self.0)
    }
}

impl FromStr for Mti {
    type Err = BuildError;

    fn from_str(s: &str) -> Result<Mti, BuildError> {
        if s.len() == 4 && s.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Mti(s.parse().expect("four digits")))
        } else {
            Err(BuildError::Mti(s.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_and_repeats() {
        assert_eq!(Mti::FINANCIAL.reply().to_string(), "0210");
        assert_eq!(Mti::REVERSAL_ADVICE.repeat().to_string(), "0421");
        assert_eq!(Mti::REVERSAL_ADVICE.repeat().reply().to_string(), "0430");
        assert_eq!("0421".parse::<Mti>().unwrap().first(), Mti::REVERSAL_ADVICE);
        assert!(Mti::FINANCIAL.is_request());
        assert!(!Mti::FINANCIAL.reply().is_request());
        assert_eq!(Mti::FINANCIAL.reply().class(), Mti::FINANCIAL.class());
        assert_eq!(&Mti::NETWORK.digits(), b"0800");
        assert!("200".parse::<Mti>().is_err());
        assert!("02a0".parse::<Mti>().is_err());
        assert_eq!(Mti::new(10000), None);
        assert_eq!(Mti::new(9990).unwrap().reply(), Mti::new(0).unwrap());
    }
}
