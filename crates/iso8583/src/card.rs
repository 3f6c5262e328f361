//! Cardholder data that cannot leak by accident.
//!
//! A [`Pan`] or [`Track`] prints itself masked, in `Debug` and `Display`
//! alike: the first six and last four digits of the PAN, asterisks between;
//! for track data the masked PAN, the separator, and asterisks for the rest.
//! The clear value takes an explicit call ([`Pan::expose`]). Both live on the
//! stack: reading one from a message allocates nothing.

use std::fmt;

use crate::error::BuildError;

/// Writes `digits` masked: first 6 and last 4 kept when there are at least 13
/// digits (the shortest PAN); otherwise only the last 4 (or nothing).
pub(crate) fn write_masked_pan(digits: &[u8], f: &mut impl fmt::Write) -> fmt::Result {
    let n = digits.len();
    let (head, tail) = if n >= 13 {
        (6, 4)
    } else if n > 4 {
        (0, 4)
    } else {
        (0, 0)
    };
    for (i, &d) in digits.iter().enumerate() {
        let shown = i < head || i >= n - tail;
        f.write_char(if shown { d as char } else { '*' })?;
    }
    Ok(())
}

/// Writes track data masked: the PAN before the separator as [`write_masked_pan`],
/// the separator, then an asterisk for every character after it.
pub(crate) fn write_masked_track(chars: &[u8], f: &mut impl fmt::Write) -> fmt::Result {
    let sep = chars
        .iter()
        .position(|&c| c == b'=' || c == b'D')
        .unwrap_or(chars.len());
    write_masked_pan(&chars[..sep], f)?;
    for &c in &chars[sep..] {
        f.write_char(if c == b'=' || c == b'D' {
            c as char
        } else {
            '*'
        })?;
    }
    Ok(())
}

/// A primary account number: 12 to 19 digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pan {
    digits: [u8; 19],
    len: u8,
}

impl Pan {
    /// A PAN from its digits. Refuses anything but 12 to 19 ASCII digits.
    pub fn new(digits: &str) -> Result<Pan, BuildError> {
        let bytes = digits.as_bytes();
        if !(12..=19).contains(&bytes.len()) {
            return Err(BuildError::Length {
                field: 2,
                len: bytes.len(),
                format: "n12..19".into(),
            });
        }
        if let Some(ch) = digits.chars().find(|c| !c.is_ascii_digit()) {
            return Err(BuildError::Char {
                field: 2,
                ch,
                format: "n..19".into(),
            });
        }
        let mut pan = Pan {
            digits: [0; 19],
            len: bytes.len() as u8,
        };
        pan.digits[..bytes.len()].copy_from_slice(bytes);
        Ok(pan)
    }

    /// The clear PAN. Never log it, never store it.
    pub fn expose(&self) -> &str {
        std::str::from_utf8(&self.digits[..self.len as usize]).expect("ASCII digits")
    }

    /// The first six digits (the BIN, which picks the issuer).
    pub fn bin(&self) -> &str {
        &self.expose()[..6]
    }

    /// The last four digits.
    pub fn last4(&self) -> &str {
        let s = self.expose();
        &s[s.len() - 4..]
    }

    /// The masked form, as `Display` writes it.
    pub fn masked(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_masked_pan(&self.digits[..self.len as usize], f)
    }
}

impl fmt::Debug for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pan({self})")
    }
}

/// Track 2 (or 3) data: digits with a field separator (`=` on the network
/// side, the `D` nibble on the terminal side).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Track {
    chars: [u8; 104],
    len: u8,
}

impl Track {
    /// Track data from its characters: digits and `=` or `D`, at most 104.
    pub fn new(chars: &str) -> Result<Track, BuildError> {
        let bytes = chars.as_bytes();
        if bytes.len() > 104 {
            return Err(BuildError::Length {
                field: 35,
                len: bytes.len(),
                format: "z..104".into(),
            });
        }
        if let Some(ch) = chars
            .chars()
            .find(|c| !(c.is_ascii_digit() || *c == '=' || *c == 'D'))
        {
            return Err(BuildError::Char {
                field: 35,
                ch,
                format: "z".into(),
            });
        }
        let mut track = Track {
            chars: [0; 104],
            len: bytes.len() as u8,
        };
        track.chars[..bytes.len()].copy_from_slice(bytes);
        Ok(track)
    }

    /// The clear track data. Never log it, never store it.
    pub fn expose(&self) -> &str {
        std::str::from_utf8(&self.chars[..self.len as usize]).expect("ASCII")
    }

    /// The PAN in front of the separator, when it is a valid PAN.
    pub fn pan(&self) -> Option<Pan> {
        let s = self.expose();
        let end = s.find(['=', 'D']).unwrap_or(s.len());
        Pan::new(&s[..end]).ok()
    }

    /// The expiry (YYMM) after the separator, when there is one.
    pub fn expiry(&self) -> Option<&str> {
        let s = self.expose();
        let sep = s.find(['=', 'D'])?;
        s.get(sep + 1..sep + 5)
    }

    /// The same track with the separator written as on the network side (`=`).
    pub fn with_separator(&self, sep: u8) -> Track {
        let mut t = *self;
        for c in &mut t.chars[..t.len as usize] {
            if *c == b'=' || *c == b'D' {
                *c = sep;
            }
        }
        t
    }
}

impl fmt::Display for Track {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_masked_track(&self.chars[..self.len as usize], f)
    }
}

impl fmt::Debug for Track {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Track({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pan_masks_itself_in_debug_and_display() {
        let pan = Pan::new("6222020000000000123").unwrap();
        assert_eq!(pan.to_string(), "622202*********0123");
        assert_eq!(format!("{pan:?}"), "Pan(622202*********0123)");
        assert_eq!(format!("{:?}", Some(pan)), "Some(Pan(622202*********0123))");
        assert!(!format!("{pan} {pan:?} {pan:#?}").contains("6222020000000000123"));
        assert_eq!(pan.expose(), "6222020000000000123");
        assert_eq!(pan.bin(), "622202");
        assert_eq!(pan.last4(), "0123");
    }

    #[test]
    fn pan_refuses_bad_input() {
        assert!(Pan::new("12345678901").is_err());
        assert!(Pan::new("12345678901234567890").is_err());
        assert!(Pan::new("62220200000000001x3").is_err());
    }

    #[test]
    fn track_masks_pan_and_everything_after_the_separator() {
        let track = Track::new("6222020000000000123D30121011234").unwrap();
        assert_eq!(track.to_string(), "622202*********0123D***********");
        assert_eq!(
            format!("{track:?}"),
            "Track(622202*********0123D***********)"
        );
        assert!(!format!("{track:?}").contains("3012"));
        assert_eq!(track.pan().unwrap().expose(), "6222020000000000123");
        assert_eq!(track.expiry(), Some("3012"));
        assert_eq!(
            track.with_separator(b'=').expose(),
            "6222020000000000123=30121011234"
        );
    }

    #[test]
    fn short_values_mask_all_but_the_last_four() {
        let mut s = String::new();
        write_masked_pan(b"12345678", &mut s).unwrap();
        assert_eq!(s, "****5678");
        s.clear();
        write_masked_pan(b"1234", &mut s).unwrap();
        assert_eq!(s, "****");
    }
}
