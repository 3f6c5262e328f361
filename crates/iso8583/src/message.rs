//! A parsed message: the frame it borrows from, and where each field is.
//!
//! Parsing checks every byte (lengths, digits, characters) and records each
//! present field's position; it copies nothing and allocates nothing. The
//! views handed out afterwards are therefore infallible.
//!
//! A lean pass does the checking and only says whether everything passed;
//! when it did not, a second pass over the same frame names the field, the
//! byte offset and the reason. Field types are checked eight bytes at a time
//! where they can be (see `chars`), and each field's spec is read from the
//! dialect's compiled [plan](crate::dialect::Dialect): a few bytes a field.

use std::fmt;

use crate::chars::{
    BCD_DIGITS, BCD_TRACK, CLASSES, all_in, alphanumeric_only, ascii_digits_only, ascii_track_only,
    bcd_digits_only, printable_only,
};
use crate::dialect::{
    Align, Check, Dialect, DigitEncoding, FieldSpec, FieldType, MAX_FIELD, MtiEncoding, Plan,
};
use crate::error::{ParseError, ParseErrorKind, Part};
use crate::mti::Mti;
use crate::value::{Binary, DigitForm, Digits, Text, Value};

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

    /// How many fields from 2 up to `n - 1` are present; `n` is 2 to 128.
    #[inline]
    fn present_before(&self, n: usize) -> usize {
        // Fields 1 to n - 1 are the top n - 1 bits; field 1 is not data. One
        // word at a time: without a popcount instruction in the baseline
        // target, counting a u128 costs twice a u64.
        let primary = self.0[0] & !(1 << 63);
        if n <= 64 {
            (primary >> (65 - n)).count_ones() as usize
        } else {
            let secondary = self.0[1].checked_shr((129 - n) as u32).unwrap_or(0);
            (primary.count_ones() + secondary.count_ones()) as usize
        }
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
    /// Where each present field starts in the frame (at its length prefix),
    /// in field order, followed by where the last one ends: field `n` is the
    /// `k`-th present one, and spans `offsets[k]..offsets[k + 1]`, with `k`
    /// the number of present fields before it. Everything else about a field
    /// follows from its plan and its (already checked) length prefix. Only
    /// the first [`KEPT`] are kept, which covers the messages of both
    /// shipped dialects and keeps a message small (it is moved about by
    /// value); the rare fields past them are found by walking on from the
    /// last one kept.
    offsets: [u16; KEPT],
}

/// How many field offsets a [`Message`] keeps.
const KEPT: usize = 32;

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
    #[inline]
    pub fn parse(dialect: &'a Dialect, frame: &'a [u8]) -> Result<Message<'a>, ParseError> {
        // Made here and filled in place (inlined, so in the caller's frame):
        // cheaper than a parser that builds and returns one.
        let mut msg = Message {
            frame,
            dialect,
            body: 0,
            mti: Mti::FINANCIAL,
            bitmap: Bitmap::default(),
            offsets: [0; KEPT],
        };
        if !msg.fill_fast() {
            // Only to find the error (or, should the fast pass have been
            // stricter than this one, to parse after all).
            msg.fill()?;
        }
        Ok(msg)
    }

    /// Parses `self.frame` into the rest of `self` the common way: all the
    /// same checks as [`Message::fill`], but it only says whether they all
    /// pass, which keeps the loop lean. On `false`, `fill` says why.
    fn fill_fast(&mut self) -> bool {
        let (dialect, frame) = (self.dialect, self.frame);
        let end = frame.len();
        let mut pos = dialect.tpdu_len + dialect.header_len;
        let mti_len = dialect.mti_len();
        if end > usize::from(u16::MAX) || pos + mti_len + 8 > end {
            return false;
        }
        self.body = pos as u16;
        let mut mti = 0;
        let mti_ok = match dialect.mti {
            MtiEncoding::Bcd => frame[pos..pos + 2].iter().all(|&b| {
                let (hi, lo) = (b >> 4, b & 0x0F);
                mti = mti * 100 + u16::from(hi) * 10 + u16::from(lo);
                hi <= 9 && lo <= 9
            }),
            MtiEncoding::Ascii => frame[pos..pos + 4].iter().all(|&b| {
                mti = mti * 10 + u16::from(b.wrapping_sub(b'0'));
                b.is_ascii_digit()
            }),
        };
        let Some(mti) = Mti::new(mti).filter(|_| mti_ok) else {
            return false;
        };
        self.mti = mti;
        pos += mti_len;
        let word = |at: usize| u64::from_be_bytes(frame[at..at + 8].try_into().expect("8 bytes"));
        let mut words = [word(pos), 0];
        pos += 8;
        if words[0] >> 63 == 1 {
            if !dialect.secondary_bitmap || pos + 8 > end {
                return false;
            }
            words[1] = word(pos);
            pos += 8;
        }
        self.bitmap = Bitmap(words);

        let offsets = &mut self.offsets;
        let mut k = 0;
        for (word, bits) in [words[0] & !(1 << 63), words[1]].into_iter().enumerate() {
            let mut rest = bits;
            while rest != 0 {
                let zeros = rest.leading_zeros() as usize;
                rest ^= (1 << 63) >> zeros;
                let plan = dialect.plan(word * 64 + zeros + 1);
                if let Some(slot) = offsets.get_mut(k) {
                    *slot = pos as u16;
                }
                k += 1;
                let prefix = usize::from(plan.prefix_bytes);
                let declared = if prefix == 0 {
                    usize::from(plan.max)
                } else {
                    match frame.get(pos..pos + prefix) {
                        Some(bytes) => match read_prefix(plan.prefix_bcd, bytes) {
                            Some(declared) => declared,
                            None => return false,
                        },
                        None => return false,
                    }
                };
                let count = declared << u8::from(plan.doubled);
                let start = pos + prefix;
                let Some(data) = frame.get(start..start + plan.data_bytes(count)) else {
                    return false;
                };
                // Undefined fields fail here too.
                if count > usize::from(plan.max) || !content_ok(plan, data, count) {
                    return false;
                }
                pos = start + data.len();
            }
        }
        if let Some(slot) = offsets.get_mut(k) {
            *slot = pos as u16;
        }
        pos == end
    }

    /// Parses `self.frame` into the rest of `self`, or says exactly what is
    /// wrong with it.
    #[cold]
    #[inline(never)]
    fn fill(&mut self) -> Result<(), ParseError> {
        let (dialect, frame) = (self.dialect, self.frame);
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
        self.body = cur.pos as u16;
        self.mti = parse_mti(dialect.mti, &mut cur)?;

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
        self.bitmap = Bitmap(words);

        let offsets = &mut self.offsets;
        let mut k = 0;
        for (word, bits) in [words[0] & !(1 << 63), words[1]].into_iter().enumerate() {
            let mut rest = bits;
            while rest != 0 {
                let zeros = rest.leading_zeros() as usize;
                rest ^= (1 << 63) >> zeros;
                let n = word * 64 + zeros + 1;
                let plan = dialect.plan(n);
                if plan.check == Check::Undefined {
                    return Err(ParseError {
                        part: Part::Field(n as u8),
                        offset: cur.pos,
                        kind: ParseErrorKind::Undefined,
                    });
                }
                // The frame is at most u16::MAX bytes long (checked above).
                if let Some(slot) = offsets.get_mut(k) {
                    *slot = cur.pos as u16;
                }
                k += 1;
                parse_field(dialect, n, plan, &mut cur)?;
            }
        }
        if let Some(slot) = offsets.get_mut(k) {
            *slot = cur.pos as u16;
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
        Ok(())
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
    #[inline]
    pub fn has(&self, n: usize) -> bool {
        n >= 2 && self.bitmap.has(n)
    }

    /// The value of field `n`, typed by the dialect.
    pub fn field(&self, n: usize) -> Option<Value<'a>> {
        let (plan, bytes, count) = self.data(n)?;
        Some(match plan.check {
            Check::Alphanumeric | Check::Text => Value::Text(text_view(plan, bytes)),
            Check::Binary => Value::Binary(Binary::new(bytes, plan.sensitive)),
            _ => Value::Digits(digits_view(plan, bytes, count)),
        })
    }

    /// The digits of field `n`, when it is present and an `n` or `z` field.
    #[inline]
    pub fn digits(&self, n: usize) -> Option<Digits<'a>> {
        let (plan, bytes, count) = self.data(n)?;
        match plan.check {
            Check::Alphanumeric | Check::Text | Check::Binary => None,
            _ => Some(digits_view(plan, bytes, count)),
        }
    }

    /// The text of field `n`, when it is present and an `an` or `ans` field.
    #[inline]
    pub fn text(&self, n: usize) -> Option<&'a str> {
        let (plan, bytes, _) = self.data(n)?;
        match plan.check {
            Check::Alphanumeric | Check::Text => Some(text_view(plan, bytes).as_str()),
            _ => None,
        }
    }

    /// The bytes of field `n`, when it is present and a `b` field.
    #[inline]
    pub fn binary(&self, n: usize) -> Option<&'a [u8]> {
        let (plan, bytes, _) = self.data(n)?;
        (plan.check == Check::Binary).then_some(bytes)
    }

    /// Present field `n`'s plan, data bytes (prefix excluded) and length in
    /// units.
    #[inline(always)]
    fn data(&self, n: usize) -> Option<(Plan, &'a [u8], usize)> {
        if !self.has(n) {
            return None;
        }
        let plan = self.dialect.plan(n);
        if plan.check == Check::Undefined {
            return None;
        }
        let (wire, end) = self.span(n);
        let prefix = usize::from(plan.prefix_bytes);
        let count = if prefix == 0 {
            usize::from(plan.max)
        } else {
            // Checked at parse time: it cannot fail here.
            read_prefix(plan.prefix_bcd, &self.frame[wire..wire + prefix])?
                << u8::from(plan.doubled)
        };
        Some((plan, &self.frame[wire + prefix..end], count))
    }

    /// Field `n` as it is on the wire, length prefix included.
    pub fn wire(&self, n: usize) -> Option<&'a [u8]> {
        if !self.has(n) {
            return None;
        }
        let (wire, end) = self.span(n);
        Some(&self.frame[wire..end])
    }

    /// Where present field `n` (2 to 128) starts and ends on the wire.
    #[inline]
    fn span(&self, n: usize) -> (usize, usize) {
        let k = self.bitmap.present_before(n);
        match (self.offsets.get(k), self.offsets.get(k + 1)) {
            (Some(&wire), Some(&end)) => (usize::from(wire), usize::from(end)),
            _ => self.walk(k),
        }
    }

    /// Where the `k`-th present field starts and ends, `k` past the offsets
    /// kept: walking on from the last one kept, over fields already checked.
    #[cold]
    #[inline(never)]
    fn walk(&self, k: usize) -> (usize, usize) {
        let mut at = usize::from(self.offsets[KEPT - 1]);
        for (i, m) in self.bitmap.fields().enumerate().skip(KEPT - 1) {
            let plan = self.dialect.plan(m);
            let prefix = usize::from(plan.prefix_bytes);
            let count = if prefix == 0 {
                usize::from(plan.max)
            } else {
                read_prefix(plan.prefix_bcd, &self.frame[at..at + prefix])
                    .expect("checked when parsed")
                    << u8::from(plan.doubled)
            };
            let data = plan.data_bytes(count);
            if i == k {
                return (at, at + prefix + data);
            }
            at += prefix + data;
        }
        unreachable!("field {k} is not present")
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
            self.span(64).0
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

/// The view of an `n` or `z` field's data.
#[inline]
fn digits_view(plan: Plan, bytes: &[u8], count: usize) -> Digits<'_> {
    let form = if plan.packed == 1 {
        DigitForm::Bcd {
            skip: u8::from(plan.pad_first && count % 2 == 1),
        }
    } else {
        DigitForm::Ascii
    };
    Digits::new(bytes, count, form, plan.sensitive)
}

/// The view of an `an` or `ans` field's data.
#[inline]
fn text_view(plan: Plan, bytes: &[u8]) -> Text<'_> {
    // Checked to be printable ASCII at parse time.
    Text::new(
        std::str::from_utf8(bytes).unwrap_or_default(),
        plan.sensitive,
    )
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
fn parse_field(
    dialect: &Dialect,
    n: usize,
    plan: Plan,
    cur: &mut Cursor<'_>,
) -> Result<(), ParseError> {
    let part = Part::Field(n as u8);
    let wire = cur.pos;
    let declared = if plan.prefix_bytes == 0 {
        usize::from(plan.max)
    } else {
        let bytes = cur.take(usize::from(plan.prefix_bytes), part)?;
        read_prefix(plan.prefix_bcd, bytes).ok_or(ParseError {
            part,
            offset: wire,
            kind: ParseErrorKind::BadPrefix,
        })?
    };
    // Doubled for BCD digits counted in bytes, fixed fields included: so
    // such a fixed field never parses (see `Plan::doubled`).
    let count = declared << u8::from(plan.doubled);
    if count > usize::from(plan.max) {
        return Err(ParseError {
            part,
            offset: wire,
            kind: ParseErrorKind::TooLong {
                len: count,
                max: usize::from(plan.max),
            },
        });
    }
    let start = cur.pos;
    let bytes = cur.take(plan.data_bytes(count), part)?;
    if content_ok(plan, bytes, count) {
        return Ok(());
    }
    let spec = dialect.field(n).expect("planned fields are defined");
    find_bad_content(spec, bytes, count).map_err(|(i, kind)| ParseError {
        part,
        offset: start + i,
        kind,
    })
}

/// The value of a length prefix, BCD or ASCII; `None` when a digit is not one.
#[inline]
fn read_prefix(bcd: bool, bytes: &[u8]) -> Option<usize> {
    let mut n = 0usize;
    match bcd {
        true => {
            for &b in bytes {
                let (hi, lo) = (b >> 4, b & 0x0F);
                if hi > 9 || lo > 9 {
                    return None;
                }
                n = n * 100 + usize::from(hi) * 10 + usize::from(lo);
            }
        }
        false => {
            for &b in bytes {
                if !b.is_ascii_digit() {
                    return None;
                }
                n = n * 10 + usize::from(b - b'0');
            }
        }
    }
    Some(n)
}

/// The common case of [`find_bad_content`], fast: true when the field is valid.
#[inline(always)]
fn content_ok(plan: Plan, bytes: &[u8], count: usize) -> bool {
    let (mask, mut inner) = match plan.check {
        Check::BcdDigits => (BCD_DIGITS, bytes),
        Check::BcdTrack => (BCD_TRACK, bytes),
        Check::AsciiDigits => return ascii_digits_only(bytes),
        Check::AsciiTrack => return ascii_track_only(bytes),
        Check::Alphanumeric => return alphanumeric_only(bytes),
        Check::Text => return printable_only(bytes),
        Check::Binary => return true,
        Check::Undefined => return false,
    };
    if count % 2 == 1 {
        // The byte holding the padding nibble (0, or F from older terminals)
        // and one digit.
        let pad_ok = |pad: u8, digit: u8| {
            (pad == 0 || pad == 0x0F) && CLASSES[usize::from(digit)] & mask != 0
        };
        if plan.pad_first {
            let Some((&first, rest)) = inner.split_first() else {
                return false;
            };
            if !pad_ok(first >> 4, first & 0x0F) {
                return false;
            }
            inner = rest;
        } else {
            let Some((&last, rest)) = inner.split_last() else {
                return false;
            };
            if !pad_ok(last & 0x0F, last & 0xF0) {
                return false;
            }
            inner = rest;
        }
    }
    if mask == BCD_TRACK {
        all_in(inner, mask)
    } else {
        bcd_digits_only(inner)
    }
}

/// Finds the first bad byte of a field's data, with the reason.
#[cold]
#[inline(never)]
fn find_bad_content(
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

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::writer::MessageWriter;

    /// A message with every field from 2 to 128 present: far more than the
    /// offsets a message keeps, so most are found by walking.
    #[test]
    fn fields_past_the_offsets_kept_are_found_all_the_same() {
        let mut toml = String::from(
            r#"
name = "all"
[frame]
tpdu = 0
header = 0
tpdu_reply = "echo"
header_reply = "echo"
[mti]
encoding = "bcd"
[bitmap]
secondary = true
[defaults]
digits = "bcd"
prefix = "bcd"
prefix_counts = "units"
fixed_align = "right"
variable_align = "left"
[fields]
"#,
        );
        let formats = ["n..19", "an5", "b...10", "n3", "ans..20", "z..37"];
        for n in 2..=128 {
            toml.push_str(&format!(
                "{n} = {{ format = \"{}\", name = \"f{n}\" }}\n",
                formats[n % formats.len()]
            ));
        }
        let dialect = Dialect::from_toml(&toml, "all.toml").unwrap();
        let value = |n: usize| match n % formats.len() {
            0 => "1".repeat(n % 20),
            1 => "A b 1".to_string(),
            2 => "ab".repeat(n % 6),
            3 => format!("{:03}", n),
            4 => "x-".repeat(n % 11),
            _ => format!("{}D{}", n, n % 7),
        };
        let mut buf = BytesMut::new();
        let mut w = MessageWriter::new(&dialect, &mut buf, Mti::FINANCIAL, &[], &[]).unwrap();
        for n in 2..=128 {
            match n % formats.len() {
                1 | 4 => w.text(n, &value(n)).unwrap(),
                2 => w.binary(n, value(n).as_bytes()).unwrap(),
                _ => w.digits(n, &value(n)).unwrap(),
            }
        }
        w.finish().unwrap();
        let msg = Message::parse(&dialect, &buf[2..]).unwrap();
        let mut end = 2 + 2 + 16;
        for n in 2..=128 {
            let shown = msg.field(n).unwrap().to_clear_string();
            let expected = match n % formats.len() {
                2 => hex::encode_upper(value(n)),
                _ => value(n),
            };
            assert_eq!(shown, expected, "field {n}");
            let wire = msg.wire(n).unwrap();
            assert_eq!(
                wire.as_ptr() as usize - buf.as_ptr() as usize,
                end,
                "field {n}"
            );
            end += wire.len();
        }
        assert_eq!(end, buf.len());
        assert_eq!(
            msg.mac_block().len(),
            msg.wire(64).unwrap().as_ptr() as usize - buf.as_ptr() as usize - 2
        );
    }
}
