//! Typed views of field values: digits, text and bytes, borrowed from the
//! frame. A view of card data prints itself masked; the clear value takes an
//! explicit call.

use std::fmt::{self, Write as _};

use crate::card::{
    Pan, Track, write_masked_emv, write_masked_pan, write_masked_records, write_masked_track,
};
use crate::chars::ascii_digits_only;
use crate::dialect::Sensitivity;

/// How the digits of a view sit in its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DigitForm {
    /// One ASCII character a digit.
    Ascii,
    /// Packed BCD, starting `skip` nibbles (0 or 1) into the first byte.
    Bcd {
        /// Leading nibbles that are not digits of this view.
        skip: u8,
    },
}

/// The digits of an `n` or `z` field. Iterates as ASCII characters: `0`-`9`,
/// and the track separator as it is on the wire (`D` in BCD, `=` in ASCII).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Digits<'a> {
    bytes: &'a [u8],
    count: u16,
    form: DigitForm,
    sensitive: Sensitivity,
}

impl<'a> Digits<'a> {
    pub(crate) fn new(
        bytes: &'a [u8],
        count: usize,
        form: DigitForm,
        sensitive: Sensitivity,
    ) -> Self {
        Digits {
            bytes,
            count: count as u16,
            form,
            sensitive,
        }
    }

    /// Number of digits.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// True when there are no digits.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The digit at `index` as an ASCII character.
    #[inline]
    pub fn get(&self, index: usize) -> Option<u8> {
        if index >= self.count as usize {
            return None;
        }
        Some(match self.form {
            DigitForm::Ascii => self.bytes[index],
            DigitForm::Bcd { skip } => nibble_char(self.bytes, index + skip as usize),
        })
    }

    /// The digits, in order, as ASCII characters.
    pub fn iter(&self) -> impl Iterator<Item = u8> + '_ {
        (0..self.count as usize).map(|i| self.get(i).expect("in range"))
    }

    /// The digits as a number; `None` past 19 digits or for track data.
    #[inline]
    pub fn to_u64(&self) -> Option<u64> {
        if self.count > 19 {
            return None;
        }
        // Straight from the bytes rather than through `get`, and more than
        // one digit a step.
        let count = usize::from(self.count);
        match self.form {
            DigitForm::Ascii => ascii_to_u64(&self.bytes[..count]),
            DigitForm::Bcd { skip } => bcd_to_u64(self.bytes, usize::from(skip), count),
        }
    }

    /// True when the digits are exactly `s`.
    pub fn eq_str(&self, s: &str) -> bool {
        s.len() == self.len() && self.iter().zip(s.bytes()).all(|(a, b)| a == b)
    }

    /// The digits `start..end` as another view, for sub-fields such as F60.2.
    /// `None` when the range is out of bounds.
    pub fn slice(&self, start: usize, end: usize) -> Option<Digits<'a>> {
        if start > end || end > self.len() {
            return None;
        }
        let count = end - start;
        Some(match self.form {
            DigitForm::Ascii => Digits::new(
                &self.bytes[start..end],
                count,
                DigitForm::Ascii,
                self.sensitive,
            ),
            DigitForm::Bcd { skip } => {
                let first = start + skip as usize;
                let bytes = &self.bytes[first / 2..(first + count).div_ceil(2)];
                let form = DigitForm::Bcd {
                    skip: (first % 2) as u8,
                };
                Digits::new(bytes, count, form, self.sensitive)
            }
        })
    }

    /// How card data in this view is shown.
    pub fn sensitivity(&self) -> Sensitivity {
        self.sensitive
    }

    /// Appends the clear digits to `out`. Never log what it writes for card data.
    pub fn write_clear(&self, out: &mut String) {
        out.extend(self.iter().map(char::from));
    }

    /// The view as a [`Pan`], when it holds 12 to 19 digits.
    pub fn to_pan(&self) -> Option<Pan> {
        let mut buf = [0u8; 19];
        if !(12..=19).contains(&self.len()) {
            return None;
        }
        for (slot, c) in buf.iter_mut().zip(self.iter()) {
            *slot = c;
        }
        Pan::new(std::str::from_utf8(&buf[..self.len()]).ok()?).ok()
    }

    /// The view as [`Track`] data.
    pub fn to_track(&self) -> Option<Track> {
        let mut buf = [0u8; 104];
        if self.len() > buf.len() {
            return None;
        }
        for (slot, c) in buf.iter_mut().zip(self.iter()) {
            *slot = c;
        }
        Track::new(std::str::from_utf8(&buf[..self.len()]).ok()?).ok()
    }
}

/// At most 19 ASCII digits as a number; `None` if one is not a digit.
#[inline]
fn ascii_to_u64(digits: &[u8]) -> Option<u64> {
    if !ascii_digits_only(digits) {
        return None;
    }
    // The first len % 8 digits as a word of their own, led by '0's; then
    // eight at a time.
    let head = digits.len() % 8;
    let mut n = 0;
    if head > 0 {
        let zeros = u64::from_le_bytes([b'0'; 8]) >> (8 * head);
        n = eight_digits((load_short(&digits[..head]) << (8 * (8 - head))) | zeros);
    }
    for eight in digits[head..].chunks_exact(8) {
        n = n * 100_000_000 + eight_digits(u64::from_le_bytes(eight.try_into().expect("8")));
    }
    Some(n)
}

/// One to seven bytes as the low bytes of a little-endian word, the rest 0:
/// from two overlapping halves, or bytes first, middle and last.
#[inline]
fn load_short(bytes: &[u8]) -> u64 {
    let n = bytes.len();
    if n >= 4 {
        let half = |at: usize| {
            u64::from(u32::from_le_bytes(
                bytes[at..at + 4].try_into().expect("4 bytes"),
            ))
        };
        half(0) | (half(n - 4) << (8 * (n - 4)))
    } else {
        let byte = |at: usize| u64::from(bytes[at]) << (8 * at);
        byte(0) | byte(n / 2) | byte(n - 1)
    }
}

/// The number of eight ASCII digits read as one little-endian word (first
/// digit lowest): neighbouring digits, then pairs, then fours are combined in
/// place.
#[inline]
fn eight_digits(word: u64) -> u64 {
    let digits = word & 0x0F0F_0F0F_0F0F_0F0F;
    let twos = ((digits & 0x000F_000F_000F_000F) * 10) + ((digits >> 8) & 0x000F_000F_000F_000F);
    let fours = ((twos & 0x0000_00FF_0000_00FF) * 100) + ((twos >> 16) & 0x0000_00FF_0000_00FF);
    ((fours & 0xFFFF) * 10_000) + ((fours >> 32) & 0xFFFF)
}

/// `count` (at most 19) packed BCD digits from nibble `skip` as a number;
/// `None` if one is not a digit. Two digits a byte.
#[inline]
fn bcd_to_u64(bytes: &[u8], skip: usize, count: usize) -> Option<u64> {
    let (mut at, end) = (skip, skip + count);
    let mut n = 0;
    if at % 2 == 1 && at < end {
        let digit = bytes[at / 2] & 0x0F;
        if digit > 9 {
            return None;
        }
        n = u64::from(digit);
        at += 1;
    }
    while at + 2 <= end {
        let b = bytes[at / 2];
        let (hi, lo) = (b >> 4, b & 0x0F);
        if hi > 9 || lo > 9 {
            return None;
        }
        n = n * 100 + u64::from(hi * 10 + lo);
        at += 2;
    }
    if at < end {
        let digit = bytes[at / 2] >> 4;
        if digit > 9 {
            return None;
        }
        n = n * 10 + u64::from(digit);
    }
    Some(n)
}

#[inline]
fn nibble_char(bytes: &[u8], nibble: usize) -> u8 {
    let b = bytes[nibble / 2];
    let n = if nibble % 2 == 0 { b >> 4 } else { b & 0x0F };
    if n < 10 { b'0' + n } else { b'A' + n - 10 }
}

impl fmt::Display for Digits<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 1024];
        let n = self.len().min(buf.len());
        for (slot, c) in buf.iter_mut().zip(self.iter()) {
            *slot = c;
        }
        write_shown(&buf[..n], self.sensitive, f)
    }
}

impl fmt::Debug for Digits<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digits({self})")
    }
}

/// The text of an `an` or `ans` field.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Text<'a> {
    text: &'a str,
    sensitive: Sensitivity,
}

impl<'a> Text<'a> {
    pub(crate) fn new(text: &'a str, sensitive: Sensitivity) -> Self {
        Text { text, sensitive }
    }

    /// The clear text.
    pub fn as_str(&self) -> &'a str {
        self.text
    }
}

impl fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_shown(self.text.as_bytes(), self.sensitive, f)
    }
}

impl fmt::Debug for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Text({self:?})", self = self.to_string())
    }
}

/// The bytes of a `b` field.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Binary<'a> {
    bytes: &'a [u8],
    sensitive: Sensitivity,
}

impl<'a> Binary<'a> {
    pub(crate) fn new(bytes: &'a [u8], sensitive: Sensitivity) -> Self {
        Binary { bytes, sensitive }
    }

    /// The clear bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

impl fmt::Display for Binary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.sensitive {
            Sensitivity::None => {
                for b in self.bytes {
                    write!(f, "{b:02X}")?;
                }
                Ok(())
            }
            Sensitivity::Emv => write_masked_emv(self.bytes, f),
            _ => (0..self.bytes.len() * 2).try_for_each(|_| f.write_char('*')),
        }
    }
}

impl fmt::Debug for Binary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Binary({self})")
    }
}

fn write_shown(chars: &[u8], sensitive: Sensitivity, f: &mut impl fmt::Write) -> fmt::Result {
    match sensitive {
        Sensitivity::None => chars.iter().try_for_each(|&c| f.write_char(c as char)),
        Sensitivity::Pan => write_masked_pan(chars, f),
        Sensitivity::Track => write_masked_track(chars, f),
        Sensitivity::Records => write_masked_records(chars, f),
        // EMV data written as characters (hex, say) is not read as TLV.
        Sensitivity::Secret | Sensitivity::Emv => chars.iter().try_for_each(|_| f.write_char('*')),
    }
}

/// A field value, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    /// `n` and `z` fields.
    Digits(Digits<'a>),
    /// `an` and `ans` fields.
    Text(Text<'a>),
    /// `b` fields.
    Binary(Binary<'a>),
}

impl Value<'_> {
    /// The clear value as text: digits and characters as they are, bytes as
    /// uppercase hex. Never log it for card data.
    pub fn to_clear_string(&self) -> String {
        match self {
            Value::Digits(d) => {
                let mut s = String::with_capacity(d.len());
                d.write_clear(&mut s);
                s
            }
            Value::Text(t) => t.as_str().to_string(),
            Value::Binary(b) => hex::encode_upper(b.as_bytes()),
        }
    }

    /// How card data in this value is shown.
    pub fn sensitivity(&self) -> Sensitivity {
        match self {
            Value::Digits(d) => d.sensitive,
            Value::Text(t) => t.sensitive,
            Value::Binary(b) => b.sensitive,
        }
    }
}

impl fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Digits(d) => d.fmt(f),
            Value::Text(t) => t.fmt(f),
            Value::Binary(b) => b.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The number the digits stand for, one digit at a time.
    fn slow(digits: &Digits<'_>) -> Option<u64> {
        if digits.len() > 19 {
            return None;
        }
        digits.iter().try_fold(0u64, |n, c| {
            c.is_ascii_digit().then(|| n * 10 + u64::from(c - b'0'))
        })
    }

    #[test]
    fn numbers_are_read_as_one_digit_at_a_time_would() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for round in 0..4000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let count = (x % 22) as usize;
            let mut ascii: Vec<u8> = (0..count)
                .map(|i| b'0' + ((x >> (i % 60)) % 10) as u8)
                .collect();
            if round % 5 == 0 && count > 0 {
                ascii[(x as usize >> 3) % count] = b'=';
            }
            let view = Digits::new(&ascii, count, DigitForm::Ascii, Sensitivity::None);
            assert_eq!(view.to_u64(), slow(&view), "{view:?}");

            // The same digits packed, after a padding nibble or not.
            for skip in [0u8, 1] {
                let mut nibbles = vec![0u8; usize::from(skip)];
                nibbles.extend(
                    ascii
                        .iter()
                        .map(|&c| if c == b'=' { 0x0D } else { c - b'0' }),
                );
                nibbles.resize(nibbles.len().div_ceil(2) * 2, 0);
                let packed: Vec<u8> = nibbles.chunks(2).map(|p| p[0] << 4 | p[1]).collect();
                let form = DigitForm::Bcd { skip };
                let view = Digits::new(&packed, count, form, Sensitivity::None);
                assert_eq!(view.to_u64(), slow(&view), "{view:?}");
            }
        }
        let max = Digits::new(
            b"9999999999999999999",
            19,
            DigitForm::Ascii,
            Sensitivity::None,
        );
        assert_eq!(max.to_u64(), Some(9_999_999_999_999_999_999));
    }
}
