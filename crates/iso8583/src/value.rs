//! Typed views of field values: digits, text and bytes, borrowed from the
//! frame. A view of card data prints itself masked; the clear value takes an
//! explicit call.

use std::fmt::{self, Write as _};

use crate::card::{Pan, Track, write_masked_pan, write_masked_track};
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
    pub fn to_u64(&self) -> Option<u64> {
        if self.count > 19 {
            return None;
        }
        let mut n: u64 = 0;
        for c in self.iter() {
            if !c.is_ascii_digit() {
                return None;
            }
            n = n * 10 + u64::from(c - b'0');
        }
        Some(n)
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
        if self.sensitive == Sensitivity::None {
            for b in self.bytes {
                write!(f, "{b:02X}")?;
            }
            Ok(())
        } else {
            (0..self.bytes.len() * 2).try_for_each(|_| f.write_char('*'))
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
        Sensitivity::Secret => chars.iter().try_for_each(|_| f.write_char('*')),
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
