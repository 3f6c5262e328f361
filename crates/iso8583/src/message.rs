//! A parsed message: the frame it borrows from, and where each field is.
//!
//! Parsing checks every byte once (lengths, digits, characters) and records
//! each present field's position; it copies nothing and allocates nothing.
//! The views handed out afterwards are therefore infallible.

use std::fmt;

use crate::dialect::{
    Align, Counts, Dialect, DigitEncoding, FieldSpec, FieldType, LengthKind, MAX_FIELD, MtiEncoding,
};
use crate::error::{ParseError, ParseErrorKind, Part};
use crate::mti::Mti;
use crate::value::{Binary, DigitForm, Digits, Text, Value};

/// Where one present field sits in the frame.
#[derive(Debug, Clone, Copy, Default)]
struct Span {
    /// First byte of the length prefix (or of the data, for fixed fields).
    wire: u16,
    /// First byte of the data.
    start: u16,
    /// Bytes of data.
    len: u16,
    /// Units of data: digits, characters or bytes.
    count: u16,
}

/// A set of field numbers, as carried by the bitmaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bitmap([u64; 2]);

impl Bitmap {
    /// True when field `n` (1 to 128) is present.
    #[inline]
    pub fn has(&self, n: usize) -> bool {
        (1..=MAX_FIELD).contains(&n) && self.0[(n - 1) / 64] & (1 << (63 - (n - 1) % 64)) != 0
    }

    #[inline]
    pub(crate) fn set(&mut self, n: usize) {
        self.0[(n - 1) / 64] |= 1 << (63 - (n - 1) % 64);
    }

    /// The present field numbers above 1, ascending.
    pub fn fields(&self) -> impl Iterator<Item = usize> + '_ {
        (0..2)
            .flat_map(move |word| {
                let mut bits = self.0[word];
                std::iter::from_fn(move || {
                    if bits == 0 {
                        return None;
                    }
                    let lz = bits.leading_zeros() as usize;
                    bits &= !(1 << (63 - lz));
                    Some(word * 64 + lz + 1)
                })
            })
            .filter(|&n| n != 1)
    }

    pub(crate) fn words(&self) -> [u64; 2] {
        self.0
    }
}

/// A parsed ISO 8583 message, borrowing from its frame (the bytes after the
/// 2-byte length prefix).
#[derive(Clone)]
pub struct Message<'a> {
    frame: &'a [u8],
    dialect: &'a Dialect,
    body: u16,
    mti: Mti,
    bitmap: Bitmap,
    spans: [Span; MAX_FIELD + 1],
}

struct Cursor<'a> {
    frame: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    #[inline]
    fn take(&mut self, n: usize, part: Part) -> Result<&'a [u8], ParseError> {
        let end = self.pos + n;
        if end > self.frame.len() {
            return Err(ParseError {
                part,
                offset: self.pos,
                kind: ParseErrorKind::Truncated {
                    needed: end - self.frame.len(),
                },
            });
        }
        let bytes = &self.frame[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }
}

impl<'a> Message<'a> {
    /// Parses one frame (without its 2-byte length prefix) in `dialect`.
    pub fn parse(dialect: &'a Dialect, frame: &'a [u8]) -> Result<Message<'a>, ParseError> {
        if frame.len() > u16::MAX as usize {
            return Err(ParseError {
                part: Part::Tpdu,
                offset: 0,
                kind: ParseErrorKind::TooLong {
                    len: frame.len(),
                    max: u16::MAX as usize,
                },
            });
        }
        let mut cur = Cursor { frame, pos: 0 };
        cur.take(dialect.tpdu_len, Part::Tpdu)?;
        cur.take(dialect.header_len, Part::Header)?;
        let body = cur.pos as u16;
        let mti = parse_mti(dialect.mti, &mut cur)?;

        let bitmap_at = cur.pos;
        let primary = cur.take(8, Part::Bitmap)?;
        let mut words = [u64::from_be_bytes(primary.try_into().expect("8 bytes")), 0];
        if words[0] >> 63 == 1 {
            if !dialect.secondary_bitmap {
                return Err(ParseError {
                    part: Part::Bitmap,
                    offset: bitmap_at,
                    kind: ParseErrorKind::SecondaryBitmap,
                });
            }
            let secondary = cur.take(8, Part::Bitmap)?;
            words[1] = u64::from_be_bytes(secondary.try_into().expect("8 bytes"));
        }
        let bitmap = Bitmap(words);

        let mut spans = [Span::default(); MAX_FIELD + 1];
        for n in bitmap.fields() {
            let part = Part::Field(n as u8);
            let Some(spec) = dialect.field(n) else {
                return Err(ParseError {
                    part,
                    offset: cur.pos,
                    kind: ParseErrorKind::Undefined,
                });
            };
            spans[n] = parse_field(spec, &mut cur, part)?;
        }
        if cur.pos != frame.len() {
            return Err(ParseError {
                part: Part::End,
                offset: cur.pos,
                kind: ParseErrorKind::Trailing {
                    extra: frame.len() - cur.pos,
                },
            });
        }
        Ok(Message {
            frame,
            dialect,
            body,
            mti,
            bitmap,
            spans,
        })
    }

    /// The dialect the message was parsed in.
    pub fn dialect(&self) -> &'a Dialect {
        self.dialect
    }

    /// The whole frame (TPDU and header included, length prefix excluded).
    pub fn frame(&self) -> &'a [u8] {
        self.frame
    }

    /// The TPDU (empty when the dialect has none).
    pub fn tpdu(&self) -> &'a [u8] {
        &self.frame[..self.dialect.tpdu_len]
    }

    /// The header (empty when the dialect has none).
    pub fn header(&self) -> &'a [u8] {
        &self.frame[self.dialect.tpdu_len..self.body as usize]
    }

    /// The message type indicator.
    pub fn mti(&self) -> Mti {
        self.mti
    }

    /// The fields present.
    pub fn bitmap(&self) -> &Bitmap {
        &self.bitmap
    }

    /// True when field `n` is present.
    pub fn has(&self, n: usize) -> bool {
        n >= 2 && self.bitmap.has(n)
    }

    /// The value of field `n`, typed by the dialect.
    pub fn field(&self, n: usize) -> Option<Value<'a>> {
        if !self.has(n) {
            return None;
        }
        let spec = self.dialect.field(n)?;
        let span = self.spans[n];
        let bytes = &self.frame[span.start as usize..(span.start + span.len) as usize];
        let count = span.count as usize;
        Some(match spec.ty {
            FieldType::Numeric | FieldType::Track => {
                let form = match spec.digits {
                    DigitEncoding::Ascii => DigitForm::Ascii,
                    DigitEncoding::Bcd => DigitForm::Bcd {
                        skip: u8::from(spec.align == Align::Right && count % 2 == 1),
                    },
                };
                Value::Digits(Digits::new(bytes, count, form, spec.sensitive))
            }
            FieldType::Alphanumeric | FieldType::Text => {
                // Checked to be printable ASCII at parse time.
                let text = std::str::from_utf8(bytes).unwrap_or_default();
                Value::Text(Text::new(text, spec.sensitive))
            }
            FieldType::Binary => Value::Binary(Binary::new(bytes, spec.sensitive)),
        })
    }

    /// The digits of field `n`, when it is present and an `n` or `z` field.
    pub fn digits(&self, n: usize) -> Option<Digits<'a>> {
        match self.field(n)? {
            Value::Digits(d) => Some(d),
            _ => None,
        }
    }

    /// The text of field `n`, when it is present and an `an` or `ans` field.
    pub fn text(&self, n: usize) -> Option<&'a str> {
        match self.field(n)? {
            Value::Text(t) => Some(t.as_str()),
            _ => None,
        }
    }

    /// The bytes of field `n`, when it is present and a `b` field.
    pub fn binary(&self, n: usize) -> Option<&'a [u8]> {
        match self.field(n)? {
            Value::Binary(b) => Some(b.as_bytes()),
            _ => None,
        }
    }

    /// Field `n` as it is on the wire, length prefix included.
    pub fn wire(&self, n: usize) -> Option<&'a [u8]> {
        if !self.has(n) {
            return None;
        }
        let span = self.spans[n];
        Some(&self.frame[span.wire as usize..(span.start + span.len) as usize])
    }

    /// Every present field with its value, ascending.
    pub fn fields(&self) -> impl Iterator<Item = (usize, Value<'a>)> + '_ {
        self.bitmap
            .fields()
            .filter_map(move |n| Some((n, self.field(n)?)))
    }

    /// The bytes a MAC covers: from the MTI to the end of the last field
    /// before F64 (TPDU and header excluded, F64 itself excluded).
    pub fn mac_block(&self) -> &'a [u8] {
        let end = if self.has(64) {
            self.spans[64].wire as usize
        } else {
            self.frame.len()
        };
        &self.frame[self.body as usize..end]
    }
}

impl fmt::Debug for Message<'_> {
    /// Card data shows masked, as every view does.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        map.entry(&"mti", &self.mti);
        for (n, v) in self.fields() {
            map.entry(&n, &v);
        }
        map.finish()
    }
}

fn parse_mti(encoding: MtiEncoding, cur: &mut Cursor<'_>) -> Result<Mti, ParseError> {
    let at = cur.pos;
    let bad = |nibble| ParseError {
        part: Part::Mti,
        offset: at,
        kind: ParseErrorKind::BadNibble { nibble },
    };
    let mut value: u16 = 0;
    match encoding {
        MtiEncoding::Bcd => {
            for &b in cur.take(2, Part::Mti)? {
                for nib in [b >> 4, b & 0x0F] {
                    if nib > 9 {
                        return Err(bad(nib));
                    }
                    value = value * 10 + u16::from(nib);
                }
            }
        }
        MtiEncoding::Ascii => {
            for &b in cur.take(4, Part::Mti)? {
                if !b.is_ascii_digit() {
                    return Err(ParseError {
                        part: Part::Mti,
                        offset: at,
                        kind: ParseErrorKind::BadChar { byte: b, ty: "n" },
                    });
                }
                value = value * 10 + u16::from(b - b'0');
            }
        }
    }
    Ok(Mti::new(value).expect("four digits"))
}

#[inline]
fn parse_field(spec: &FieldSpec, cur: &mut Cursor<'_>, part: Part) -> Result<Span, ParseError> {
    let wire = cur.pos;
    let declared = match spec.length {
        LengthKind::Fixed => spec.max as usize,
        _ => parse_prefix(spec, cur, part)?,
    };
    // A BCD field whose prefix counts bytes holds two digits a byte.
    let bcd_digits = spec.ty.is_digits() && spec.digits == DigitEncoding::Bcd;
    let count = if bcd_digits && spec.counts == Counts::Bytes {
        declared * 2
    } else {
        declared
    };
    if count > spec.max as usize {
        return Err(ParseError {
            part,
            offset: wire,
            kind: ParseErrorKind::TooLong {
                len: count,
                max: spec.max as usize,
            },
        });
    }
    let start = cur.pos;
    let bytes = cur.take(spec.data_bytes(count), part)?;
    check_content(spec, bytes, count).map_err(|(i, kind)| ParseError {
        part,
        offset: start + i,
        kind,
    })?;
    Ok(Span {
        wire: wire as u16,
        start: start as u16,
        len: bytes.len() as u16,
        count: count as u16,
    })
}

fn parse_prefix(spec: &FieldSpec, cur: &mut Cursor<'_>, part: Part) -> Result<usize, ParseError> {
    let at = cur.pos;
    let bytes = cur.take(spec.prefix_bytes(), part)?;
    let bad = ParseError {
        part,
        offset: at,
        kind: ParseErrorKind::BadPrefix,
    };
    let mut n = 0usize;
    match spec.prefix {
        DigitEncoding::Bcd => {
            for &b in bytes {
                let (hi, lo) = (b >> 4, b & 0x0F);
                if hi > 9 || lo > 9 {
                    return Err(bad);
                }
                n = n * 100 + usize::from(hi) * 10 + usize::from(lo);
            }
        }
        DigitEncoding::Ascii => {
            for &b in bytes {
                if !b.is_ascii_digit() {
                    return Err(bad);
                }
                n = n * 10 + usize::from(b - b'0');
            }
        }
    }
    Ok(n)
}

/// Checks every byte of a field's data; on error, the offset within the data.
#[inline]
fn check_content(
    spec: &FieldSpec,
    bytes: &[u8],
    count: usize,
) -> Result<(), (usize, ParseErrorKind)> {
    let track = spec.ty == FieldType::Track;
    match (spec.ty, spec.digits) {
        (FieldType::Numeric | FieldType::Track, DigitEncoding::Bcd) => {
            let odd = count % 2 == 1;
            let pad_first = odd && spec.align == Align::Right;
            let last = bytes.len().saturating_sub(1);
            for (i, &b) in bytes.iter().enumerate() {
                let (hi, lo) = (b >> 4, b & 0x0F);
                let hi_is_pad = pad_first && i == 0;
                let lo_is_pad = odd && !pad_first && i == last;
                for (nib, is_pad) in [(hi, hi_is_pad), (lo, lo_is_pad)] {
                    if is_pad {
                        // Terminals pad with 0; some older ones with F.
                        if nib != 0 && nib != 0x0F {
                            return Err((i, ParseErrorKind::BadPadding { nibble: nib }));
                        }
                    } else if nib > 9 && !(track && nib == 0x0D) {
                        return Err((i, ParseErrorKind::BadNibble { nibble: nib }));
                    }
                }
            }
        }
        (FieldType::Numeric | FieldType::Track, DigitEncoding::Ascii) => {
            if let Some(i) = bytes
                .iter()
                .position(|&b| !(b.is_ascii_digit() || (track && (b == b'=' || b == b'D'))))
            {
                return Err((
                    i,
                    ParseErrorKind::BadChar {
                        byte: bytes[i],
                        ty: spec.ty.letters(),
                    },
                ));
            }
        }
        (FieldType::Alphanumeric, _) => {
            if let Some(i) = bytes
                .iter()
                .position(|&b| !(b.is_ascii_alphanumeric() || b == b' '))
            {
                return Err((
                    i,
                    ParseErrorKind::BadChar {
                        byte: bytes[i],
                        ty: "an",
                    },
                ));
            }
        }
        (FieldType::Text, _) => {
            if let Some(i) = bytes.iter().position(|&b| !(0x20..=0x7E).contains(&b)) {
                return Err((
                    i,
                    ParseErrorKind::BadChar {
                        byte: bytes[i],
                        ty: "ans",
                    },
                ));
            }
        }
        (FieldType::Binary, _) => {}
    }
    Ok(())
}
