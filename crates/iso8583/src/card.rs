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

/// Writes batch upload records (the terminal dialect's F48 in a 0320: a
/// count n2, then per record card type n2, STAN n6, PAN n20 zero-padded on
/// the left, amount n12) with each record's PAN masked as
/// [`write_masked_pan`], its padding kept. Fails closed: every 40-digit slot
/// after the count is taken for a record, whatever the count says, and a
/// record cut short has all it holds of its PAN masked. Only what cannot
/// hold a PAN is shown as it is: the upload's end (n4, a record count) and
/// settlement totals (62 digits: never a count and whole records).
pub(crate) fn write_masked_records(chars: &[u8], f: &mut impl fmt::Write) -> fmt::Result {
    const TOTALS: usize = 62;
    const RECORD: usize = 40;
    const PAN: std::ops::Range<usize> = 8..28;
    let write = |f: &mut dyn fmt::Write, part: &[u8]| -> fmt::Result {
        part.iter().try_for_each(|&c| f.write_char(c as char))
    };
    if chars.len() <= 4 || chars.len() == TOTALS {
        return write(f, chars);
    }
    let (count, records) = chars.split_at(2);
    write(f, count)?;
    for record in records.chunks(RECORD) {
        write(f, &record[..record.len().min(PAN.start)])?;
        if record.len() < PAN.end {
            for _ in PAN.start..record.len().max(PAN.start) {
                f.write_char('*')?;
            }
            continue;
        }
        let pan = &record[PAN];
        let padding = pan.iter().take_while(|&&c| c == b'0').count();
        write(f, &pan[..padding])?;
        write_masked_pan(&pan[padding..], f)?;
        write(f, &record[PAN.end..])?;
    }
    Ok(())
}

/// EMV tags whose values are cardholder data: the PAN (5A), track 1 and 2
/// equivalents (56, 57, 9F6B), their discretionary data (9F1F, 9F20), the
/// cardholder's name (5F20), the expiry (5F24) and the service code (5F30).
const EMV_CARD_TAGS: [&[u8]; 9] = [
    &[0x5A],
    &[0x56],
    &[0x57],
    &[0x9F, 0x6B],
    &[0x9F, 0x1F],
    &[0x9F, 0x20],
    &[0x5F, 0x20],
    &[0x5F, 0x24],
    &[0x5F, 0x30],
];

/// Writes EMV data (BER-TLV, the IC card data of F55) as uppercase hex with
/// the values of [`EMV_CARD_TAGS`] masked, inside constructed tags too. What
/// cannot be read as TLV is masked to its end.
pub(crate) fn write_masked_emv(bytes: &[u8], f: &mut impl fmt::Write) -> fmt::Result {
    let mut at = 0;
    while at < bytes.len() {
        let Some((tag, value)) = tlv(bytes, at) else {
            break;
        };
        for b in &bytes[at..value.start] {
            write!(f, "{b:02X}")?;
        }
        let constructed = bytes[at] & 0x20 != 0;
        if constructed {
            write_masked_emv(&bytes[value.clone()], f)?;
        } else if EMV_CARD_TAGS.contains(&&bytes[tag]) {
            for _ in value.clone() {
                f.write_str("**")?;
            }
        } else {
            for b in &bytes[value.clone()] {
                write!(f, "{b:02X}")?;
            }
        }
        at = value.end;
    }
    for _ in at..bytes.len() {
        f.write_str("**")?;
    }
    Ok(())
}

/// The tag and value of the TLV at `at`, as ranges of `bytes`; `None` when
/// it does not fit (padding bytes `00` and `FF` are one-byte tags of no value).
fn tlv(bytes: &[u8], at: usize) -> Option<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let first = *bytes.get(at)?;
    if first == 0x00 || first == 0xFF {
        return Some((at..at + 1, at + 1..at + 1));
    }
    let mut end = at + 1;
    if first & 0x1F == 0x1F {
        while bytes.get(end)? & 0x80 != 0 {
            end += 1;
        }
        end += 1;
    }
    let tag = at..end;
    let (len, start) = match *bytes.get(end)? {
        n if n < 0x80 => (usize::from(n), end + 1),
        0x81 => (usize::from(*bytes.get(end + 1)?), end + 2),
        0x82 => (
            usize::from(*bytes.get(end + 1)?) << 8 | usize::from(*bytes.get(end + 2)?),
            end + 3,
        ),
        _ => return None,
    };
    (start + len <= bytes.len()).then_some((tag, start..start + len))
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

    fn records(chars: &str) -> String {
        let mut s = String::new();
        write_masked_records(chars.as_bytes(), &mut s).unwrap();
        s
    }

    #[test]
    fn batch_upload_records_show_each_pan_masked() {
        // Card type, STAN, PAN (zero-padded to 20), amount.
        let one = format!("00{:06}{:0>20}{:012}", 4, "6222020000000000001", 10_000);
        let two = format!("00{:06}{:0>20}{:012}", 5, "6217000010000000", 2_550);
        let (one_masked, two_masked) = (
            format!("00{:06}0622202*********0001{:012}", 4, 10_000),
            format!("00{:06}0000621700******0000{:012}", 5, 2_550),
        );
        assert_eq!(
            records(&format!("02{one}{two}")),
            format!("02{one_masked}{two_masked}")
        );
        // A record cut short: what it holds of its PAN is masked.
        assert_eq!(
            records(&format!("01{}", &one[..20])),
            "0100000004************"
        );
        // A count that understates the records masks them all the same.
        assert_eq!(
            records(&format!("01{one}{two}")),
            format!("01{one_masked}{two_masked}")
        );
        // A count of 00 hides nothing.
        assert_eq!(
            records(&format!("00{one}{two}")),
            format!("00{one_masked}{two_masked}")
        );
        // Settlement totals and the upload's end are shown as they are.
        let totals = "00000016332100700000003376000500000000000000000000000000000000";
        assert_eq!(records(totals), totals);
        assert_eq!(records("0000"), "0000");
        assert_eq!(records("0"), "0");
    }

    fn emv(hex_text: &str) -> String {
        let mut s = String::new();
        write_masked_emv(&hex::decode(hex_text).unwrap(), &mut s).unwrap();
        s
    }

    #[test]
    fn emv_data_shows_its_tags_with_card_data_masked() {
        // 9F26 (the cryptogram) stays; 5A (the PAN), 57 (track 2) and 5F24
        // (the expiry) are masked; inside a constructed tag (70) too.
        let data = "9F2608A1B2C3D4E5F60718\
                    5A086222020000000001\
                    570B6222020000000001D3012F\
                    5F2403301231\
                    70045A021234\
                    9F100100";
        let masked = format!(
            "9F2608A1B2C3D4E5F60718\
             5A08{}570B{}5F2403{}\
             70045A02{}\
             9F100100",
            "*".repeat(16),
            "*".repeat(22),
            "*".repeat(6),
            "*".repeat(4)
        );
        assert_eq!(emv(data), masked);
        // Unreadable from some point on: masked from there.
        assert_eq!(emv("9F020100"), "9F020100");
        assert_eq!(emv("9F0201005A"), "9F020100**");
        assert_eq!(emv("5A0962220200"), "*".repeat(12));
        assert_eq!(emv("9F0283000000"), "*".repeat(12));
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
