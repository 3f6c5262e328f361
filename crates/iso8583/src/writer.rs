//! Building a message straight into a (reused) output buffer.
//!
//! A [`MessageWriter`] writes the 2-byte length, TPDU, header, MTI and a
//! bitmap placeholder, then each field as it is given (in ascending order);
//! [`MessageWriter::finish`] fills in the bitmap and the length. The result is
//! a complete wire frame; nothing is allocated when the buffer has room.

use bytes::{BufMut, BytesMut};

use crate::chars::{alphanumeric_only, ascii_digits_only, ascii_track_only, printable_only};
use crate::dialect::{Align, Counts, Dialect, DigitEncoding, FieldSpec, FieldType, LengthKind};
use crate::error::BuildError;
use crate::message::{Bitmap, Message};
use crate::mti::Mti;
use crate::value::Value;

/// Writes one message into a buffer; see the module documentation.
#[derive(Debug)]
pub struct MessageWriter<'a> {
    dialect: &'a Dialect,
    buf: &'a mut BytesMut,
    /// Where the length prefix of this message starts in `buf`.
    start: usize,
    /// Where the primary bitmap starts in `buf`.
    bitmap_at: usize,
    bitmap: Bitmap,
    secondary: bool,
    last: usize,
}

impl<'a> MessageWriter<'a> {
    /// Starts a message: TPDU and header must have the dialect's lengths.
    pub fn new(
        dialect: &'a Dialect,
        buf: &'a mut BytesMut,
        mti: Mti,
        tpdu: &[u8],
        header: &[u8],
    ) -> Result<MessageWriter<'a>, BuildError> {
        for (part, bytes, expected) in [
            ("tpdu", tpdu, dialect.tpdu_len),
            ("header", header, dialect.header_len),
        ] {
            if bytes.len() != expected {
                return Err(BuildError::Prefix {
                    part,
                    expected,
                    len: bytes.len(),
                });
            }
        }
        let start = buf.len();
        buf.reserve(256);
        buf.put_u16(0);
        buf.put_slice(tpdu);
        buf.put_slice(header);
        Ok(Self::begin(dialect, buf, start, mti))
    }

    /// Starts the reply to `request`: reply TPDU and header as the dialect
    /// says (addresses swapped, processing requirement cleared), MTI + 10.
    pub fn reply(
        dialect: &'a Dialect,
        buf: &'a mut BytesMut,
        request: &Message<'_>,
    ) -> MessageWriter<'a> {
        let start = buf.len();
        buf.reserve(256);
        buf.put_u16(0);
        let mut prefix = [0u8; 128];
        let (tpdu, header) = (request.tpdu(), request.header());
        let tpdu_out = &mut prefix[..tpdu.len()];
        dialect.reply_tpdu(tpdu, tpdu_out);
        buf.put_slice(tpdu_out);
        let header_out = &mut prefix[..header.len()];
        dialect.reply_header(header, header_out);
        buf.put_slice(header_out);
        Self::begin(dialect, buf, start, request.mti().reply())
    }

    fn begin(
        dialect: &'a Dialect,
        buf: &'a mut BytesMut,
        start: usize,
        mti: Mti,
    ) -> MessageWriter<'a> {
        match dialect.mti {
            crate::dialect::MtiEncoding::Ascii => buf.put_slice(&mti.digits()),
            crate::dialect::MtiEncoding::Bcd => {
                let d = mti.digits().map(|c| c - b'0');
                buf.put_slice(&[d[0] << 4 | d[1], d[2] << 4 | d[3]]);
            }
        }
        let bitmap_at = buf.len();
        buf.put_u64(0);
        MessageWriter {
            dialect,
            buf,
            start,
            bitmap_at,
            bitmap: Bitmap::default(),
            secondary: false,
            last: 1,
        }
    }

    /// Checks the order and the dialect, makes room for a secondary bitmap
    /// when the first field above 64 comes, and marks the field present.
    #[inline]
    fn open(&mut self, n: usize) -> Result<&'a FieldSpec, BuildError> {
        if n <= self.last {
            return Err(BuildError::OutOfOrder {
                field: n,
                after: self.last,
            });
        }
        let spec = self
            .dialect
            .field(n)
            .ok_or(BuildError::Undefined { field: n })?;
        if n > 64 && !self.secondary {
            if !self.dialect.secondary_bitmap {
                return Err(BuildError::NoSecondaryBitmap { field: n });
            }
            // Rare (network management, F90): move the fields written so far
            // to make room for the secondary bitmap.
            let at = self.bitmap_at + 8;
            let tail = self.buf.len() - at;
            self.buf.put_u64(0);
            self.buf.copy_within(at..at + tail, at + 8);
            self.buf[at..at + 8].fill(0);
            self.secondary = true;
            self.bitmap.set(1);
        }
        self.last = n;
        self.bitmap.set(n);
        Ok(spec)
    }

    /// Writes the digits of an `n` or `z` field (`D` or `=` as the track separator).
    pub fn digits(&mut self, n: usize, digits: &str) -> Result<(), BuildError> {
        let spec = self.open(n)?;
        if !spec.ty.is_digits() {
            return Err(kind_error(spec, "text or hex bytes, not digits"));
        }
        let track = spec.ty == FieldType::Track;
        let valid = if track {
            ascii_track_only(digits.as_bytes())
        } else {
            ascii_digits_only(digits.as_bytes())
        };
        if !valid {
            if let Some(ch) = digits
                .chars()
                .find(|&c| !(c.is_ascii_digit() || (track && (c == '=' || c == 'D'))))
            {
                return Err(BuildError::Char {
                    field: n,
                    ch,
                    format: spec.to_string(),
                });
            }
        }
        self.put_digits(spec, digits.as_bytes())
    }

    /// Writes a number into an `n` field: zero-padded on the left to a fixed
    /// field's length, or as few digits as it takes in a variable one.
    pub fn number(&mut self, n: usize, value: u64) -> Result<(), BuildError> {
        let spec = self.open(n)?;
        if spec.ty != FieldType::Numeric {
            return Err(kind_error(spec, "no number"));
        }
        let mut buf = [b'0'; 20];
        let mut i = buf.len();
        let mut v = value;
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        let used = buf.len() - i;
        let digits = match spec.length {
            LengthKind::Fixed if used <= spec.max as usize => &buf[buf.len() - spec.max as usize..],
            _ => &buf[i..],
        };
        self.put_digits(spec, digits)
    }

    /// Writes the characters of an `an` or `ans` field.
    pub fn text(&mut self, n: usize, text: &str) -> Result<(), BuildError> {
        let spec = self.open(n)?;
        let valid = match spec.ty {
            FieldType::Alphanumeric => alphanumeric_only(text.as_bytes()),
            FieldType::Text => printable_only(text.as_bytes()),
            _ => return Err(kind_error(spec, "digits or hex bytes, not text")),
        };
        if !valid {
            let allowed = |b: u8| match spec.ty {
                FieldType::Alphanumeric => b.is_ascii_alphanumeric() || b == b' ',
                _ => (0x20..=0x7E).contains(&b),
            };
            if let Some(ch) = text.chars().find(|&c| !c.is_ascii() || !allowed(c as u8)) {
                return Err(BuildError::Char {
                    field: n,
                    ch,
                    format: spec.to_string(),
                });
            }
        }
        self.put_prefix(spec, text.len(), text.len())?;
        self.buf.put_slice(text.as_bytes());
        Ok(())
    }

    /// Writes the bytes of a `b` field.
    pub fn binary(&mut self, n: usize, bytes: &[u8]) -> Result<(), BuildError> {
        let spec = self.open(n)?;
        if spec.ty != FieldType::Binary {
            return Err(kind_error(spec, "digits or text, not bytes"));
        }
        self.put_prefix(spec, bytes.len(), bytes.len())?;
        self.buf.put_slice(bytes);
        Ok(())
    }

    /// Writes a value read from another message, converting between
    /// encodings as the two dialects' specs require.
    pub fn value(&mut self, n: usize, value: &Value<'_>) -> Result<(), BuildError> {
        match value {
            Value::Digits(d) => {
                let mut buf = [0u8; 999];
                let len = d.len().min(buf.len());
                for (slot, c) in buf.iter_mut().zip(d.iter()) {
                    *slot = c;
                }
                let spec = self.open(n)?;
                if !spec.ty.is_digits() {
                    return Err(kind_error(spec, "text or hex bytes, not digits"));
                }
                self.put_digits(spec, &buf[..len])
            }
            Value::Text(t) => self.text(n, t.as_str()),
            Value::Binary(b) => self.binary(n, b.as_bytes()),
        }
    }

    /// Copies field `n` from `from` when it is present there: byte for byte
    /// when both are in this dialect, converted otherwise. Returns whether
    /// the field was present.
    pub fn copy(&mut self, n: usize, from: &Message<'_>) -> Result<bool, BuildError> {
        if std::ptr::eq(from.dialect(), self.dialect) {
            if let Some(wire) = from.wire(n) {
                self.open(n)?;
                self.buf.put_slice(wire);
                return Ok(true);
            }
            return Ok(false);
        }
        match from.field(n) {
            Some(v) => self.value(n, &v).map(|()| true),
            None => Ok(false),
        }
    }

    fn put_prefix(
        &mut self,
        spec: &FieldSpec,
        count: usize,
        bytes: usize,
    ) -> Result<(), BuildError> {
        let fits = match spec.length {
            LengthKind::Fixed => count == spec.max as usize,
            _ => count <= spec.max as usize,
        };
        if !fits {
            return Err(BuildError::Length {
                field: spec.number as usize,
                len: count,
                format: spec.to_string(),
            });
        }
        if spec.length == LengthKind::Fixed {
            return Ok(());
        }
        let declared = match spec.counts {
            Counts::Units => count,
            Counts::Bytes => bytes,
        };
        let digits = spec.prefix_digits();
        match spec.prefix {
            DigitEncoding::Ascii => {
                let all = [
                    b'0' + (declared / 100) as u8,
                    b'0' + (declared / 10 % 10) as u8,
                    b'0' + (declared % 10) as u8,
                ];
                self.buf.put_slice(&all[3 - digits..]);
            }
            DigitEncoding::Bcd => {
                let tens = (((declared / 10 % 10) << 4) | (declared % 10)) as u8;
                if digits == 3 {
                    self.buf.put_u8((declared / 100) as u8);
                }
                self.buf.put_u8(tens);
            }
        }
        Ok(())
    }

    fn put_digits(&mut self, spec: &FieldSpec, digits: &[u8]) -> Result<(), BuildError> {
        let count = digits.len();
        let bcd = spec.digits == DigitEncoding::Bcd;
        if bcd && spec.counts == Counts::Bytes && spec.length != LengthKind::Fixed && count % 2 == 1
        {
            return Err(BuildError::Length {
                field: spec.number as usize,
                len: count,
                format: format!("{spec} (an even number of digits)"),
            });
        }
        self.put_prefix(spec, count, spec.data_bytes(count))?;
        if !bcd {
            self.buf.put_slice(digits);
            return Ok(());
        }
        // Digits are checked: '0'-'9', and '=' or 'D' in track data. The low
        // nibble of '=' is already D; 'D' (0x44) gets it by setting bits 0 and 3.
        let nibble = |c: u8| (c & 0x0F) | (u8::from(c == b'D') * 0x09);
        let mut rest = digits;
        if count % 2 == 1 && spec.align == Align::Right {
            self.buf.put_u8(nibble(rest[0]));
            rest = &rest[1..];
        }
        // Packed into a block on the stack, then copied: cheaper than a
        // capacity check per byte.
        let mut block = [0u8; 32];
        for chunk in rest.chunks(2 * block.len()) {
            let mut eights = chunk.chunks_exact(8);
            for (slots, eight) in block.chunks_exact_mut(4).zip(&mut eights) {
                slots.copy_from_slice(&pack_eight(eight.try_into().expect("8 digits")));
            }
            let done = chunk.len() / 8 * 4;
            let mut pairs = eights.remainder().chunks_exact(2);
            for (slot, pair) in block[done..].iter_mut().zip(&mut pairs) {
                *slot = nibble(pair[0]) << 4 | nibble(pair[1]);
            }
            let mut used = chunk.len() / 2;
            if let [last] = pairs.remainder() {
                block[used] = nibble(*last) << 4;
                used += 1;
            }
            self.buf.put_slice(&block[..used]);
        }
        Ok(())
    }

    /// Fills in bitmap and length; returns the frame's length, prefix included.
    pub fn finish(self) -> Result<usize, BuildError> {
        let words = self.bitmap.words();
        self.buf[self.bitmap_at..self.bitmap_at + 8].copy_from_slice(&words[0].to_be_bytes());
        if self.secondary {
            self.buf[self.bitmap_at + 8..self.bitmap_at + 16]
                .copy_from_slice(&words[1].to_be_bytes());
        }
        let total = self.buf.len() - self.start;
        let len = u16::try_from(total - 2).map_err(|_| BuildError::TooLarge { len: total - 2 })?;
        self.buf[self.start..self.start + 2].copy_from_slice(&len.to_be_bytes());
        Ok(total)
    }
}

/// Packs eight checked digit characters ('0'-'9', '=', 'D') into four BCD
/// bytes, all at once in one word: the low nibbles are the digits ('=' is
/// already D), 'D' alone has bit 6 set and gets 9 added; then each digit is
/// shifted up against the next, and every other byte gathered.
#[inline]
fn pack_eight(digits: [u8; 8]) -> [u8; 4] {
    const LOW_BITS: u64 = 0x0101_0101_0101_0101;
    let chars = u64::from_le_bytes(digits);
    let nibbles = (chars & (0x0F * LOW_BITS)) | (((chars >> 6) & LOW_BITS) * 9);
    let pairs = ((nibbles << 4) | (nibbles >> 8)) & 0x00FF_00FF_00FF_00FF;
    let pairs = (pairs | (pairs >> 8)) & 0x0000_FFFF_0000_FFFF;
    let pairs = (pairs | (pairs >> 16)) & 0xFFFF_FFFF;
    (pairs as u32).to_le_bytes()
}

fn kind_error(spec: &FieldSpec, expected: &'static str) -> BuildError {
    BuildError::Kind {
        field: spec.number as usize,
        format: spec.to_string(),
        expected,
    }
}

#[cfg(test)]
mod tests {
    //! One test per field kind: the exact bytes written, and the same value
    //! read back through the parser.

    use super::*;
    use crate::error::{ParseErrorKind, Part};
    use crate::value::Value;

    /// A dialect with one field of every kind, BCD numbers, no TPDU/header.
    fn kinds(digits: &str, prefix: &str) -> Dialect {
        let text = format!(
            r#"
name = "kinds"
[frame]
tpdu = 0
header = 0
tpdu_reply = "echo"
header_reply = "echo"
[mti]
encoding = "{digits}"
[bitmap]
secondary = true
[defaults]
digits = "{digits}"
prefix = "{prefix}"
prefix_counts = "units"
fixed_align = "right"
variable_align = "left"
[fields]
2  = {{ format = "n..19", name = "LLVAR n", sensitive = "pan" }}
3  = {{ format = "n6", name = "fixed even n" }}
4  = {{ format = "n3", name = "fixed odd n, right-aligned" }}
5  = {{ format = "n3", name = "fixed odd n, left-aligned", align = "left" }}
6  = {{ format = "n...999", name = "LLLVAR n" }}
7  = {{ format = "n..20", name = "LLVAR n counting bytes", prefix_counts = "bytes" }}
8  = {{ format = "z..37", name = "track", sensitive = "track" }}
9  = {{ format = "an4", name = "fixed an" }}
10 = {{ format = "ans..20", name = "LLVAR ans" }}
11 = {{ format = "ans...999", name = "LLLVAR ans" }}
12 = {{ format = "b4", name = "fixed b", sensitive = "secret" }}
13 = {{ format = "b...999", name = "LLLVAR b" }}
70 = {{ format = "n3", name = "secondary bitmap field" }}
"#
        );
        Dialect::from_toml(&text, "kinds.toml").unwrap()
    }

    /// Writes one field into a 0200 and returns the bytes after the bitmap(s).
    fn written(
        dialect: &Dialect,
        f: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), BuildError>,
    ) -> Result<Vec<u8>, BuildError> {
        let mut buf = BytesMut::new();
        let mut w = MessageWriter::new(dialect, &mut buf, Mti::FINANCIAL, &[], &[])?;
        f(&mut w)?;
        let total = w.finish()?;
        assert_eq!(total, buf.len());
        assert_eq!(usize::from(u16::from_be_bytes([buf[0], buf[1]])), total - 2);
        let msg = Message::parse(dialect, &buf[2..]).expect("what we write parses");
        let body = 2
            + dialect.mti_len()
            + if msg.has(1) || msg.bitmap().has(1) {
                16
            } else {
                8
            };
        Ok(buf[body..].to_vec())
    }

    fn read_back(dialect: &Dialect, n: usize, f: impl FnOnce(&mut MessageWriter<'_>)) -> String {
        let mut buf = BytesMut::new();
        let mut w = MessageWriter::new(dialect, &mut buf, Mti::FINANCIAL, &[], &[]).unwrap();
        f(&mut w);
        w.finish().unwrap();
        let msg = Message::parse(dialect, &buf[2..]).unwrap();
        msg.field(n).unwrap().to_clear_string()
    }

    #[test]
    fn eight_digits_pack_as_the_byte_at_a_time_way() {
        let slow = |d: &[u8; 8]| {
            let nibble = |c: u8| {
                if c == b'=' || c == b'D' {
                    0x0D
                } else {
                    c - b'0'
                }
            };
            [0, 2, 4, 6].map(|i| nibble(d[i]) << 4 | nibble(d[i + 1]))
        };
        let chars = b"0123456789=D";
        for seed in 0..20_000u32 {
            let mut d = [0u8; 8];
            let mut x = seed.wrapping_mul(2_654_435_761);
            for c in &mut d {
                *c = chars[(x % 12) as usize];
                x = x.rotate_left(5) ^ seed;
            }
            assert_eq!(pack_eight(d), slow(&d), "{}", String::from_utf8_lossy(&d));
        }
        assert_eq!(pack_eight(*b"62220200"), [0x62, 0x22, 0x02, 0x00]);
        assert_eq!(pack_eight(*b"01D3=456"), [0x01, 0xD3, 0xD4, 0x56]);
    }

    #[test]
    fn bcd_llvar_counts_digits_and_pads_odd_counts_at_the_end() {
        let d = kinds("bcd", "bcd");
        let out = written(&d, |w| w.digits(2, "6222020000000000001")).unwrap();
        assert_eq!(out, [0x19, 0x62, 0x22, 0x02, 0, 0, 0, 0, 0, 0x00, 0x10]);
        assert_eq!(
            read_back(&d, 2, |w| w.digits(2, "6222020000000000001").unwrap()),
            "6222020000000000001"
        );
        let even = written(&d, |w| w.digits(2, "6222020000000001")).unwrap();
        assert_eq!(even, [0x16, 0x62, 0x22, 0x02, 0, 0, 0, 0, 0x01]);
    }

    #[test]
    fn bcd_fixed_odd_is_right_aligned_unless_the_field_says_left() {
        let d = kinds("bcd", "bcd");
        assert_eq!(written(&d, |w| w.digits(4, "123")).unwrap(), [0x01, 0x23]);
        assert_eq!(written(&d, |w| w.digits(5, "051")).unwrap(), [0x05, 0x10]);
        assert_eq!(read_back(&d, 4, |w| w.digits(4, "123").unwrap()), "123");
        assert_eq!(read_back(&d, 5, |w| w.digits(5, "051").unwrap()), "051");
        assert_eq!(
            written(&d, |w| w.number(3, 42)).unwrap(),
            [0x00, 0x00, 0x42]
        );
    }

    #[test]
    fn bcd_lllvar_has_a_two_byte_prefix() {
        let d = kinds("bcd", "bcd");
        let digits = "1".repeat(123);
        let out = written(&d, |w| w.digits(6, &digits)).unwrap();
        assert_eq!(&out[..3], &[0x01, 0x23, 0x11]);
        assert_eq!(out.len(), 2 + 62);
        assert_eq!(*out.last().unwrap(), 0x10);
        assert_eq!(read_back(&d, 6, |w| w.digits(6, &digits).unwrap()), digits);
    }

    #[test]
    fn a_fixed_bcd_field_is_not_doubled_when_prefixes_count_bytes() {
        // Only a prefix counts bytes; a fixed field has none to double.
        let d = Dialect::from_toml(
            &crate::dialect::CUP_POS_TOML
                .replace(r#"prefix_counts = "units""#, r#"prefix_counts = "bytes""#)
                .replace(r#"2  = { format = "n..19","#, r#"2  = { format = "n..20","#)
                .replace(
                    r#"60 = { format = "n...17","#,
                    r#"60 = { format = "n...18","#,
                )
                .replace(
                    r#"61 = { format = "n...29","#,
                    r#"61 = { format = "n...30","#,
                )
                .replace(r#"32 = { format = "n..11","#, r#"32 = { format = "n..12","#)
                .replace(r#"35 = { format = "z..37","#, r#"35 = { format = "z..38","#),
            "bytes.toml",
        )
        .unwrap();
        let mut buf = BytesMut::new();
        let mut w = MessageWriter::new(
            &d,
            &mut buf,
            Mti::FINANCIAL,
            &[0x60, 0, 3, 0, 0],
            &[0x60, 0x31, 0, 0, 0, 0],
        )
        .unwrap();
        w.digits(3, "000000").unwrap();
        w.number(4, 100).unwrap();
        w.digits(22, "051").unwrap();
        w.finish().unwrap();
        let msg = Message::parse(&d, &buf[2..]).expect("fixed fields keep their length");
        assert!(msg.digits(22).unwrap().eq_str("051"));
        assert_eq!(msg.digits(4).unwrap().to_u64(), Some(100));
    }

    #[test]
    fn a_prefix_counting_bytes_needs_even_digits() {
        let d = kinds("bcd", "bcd");
        assert_eq!(
            written(&d, |w| w.digits(7, "1234")).unwrap(),
            [0x02, 0x12, 0x34]
        );
        assert!(matches!(
            written(&d, |w| w.digits(7, "123")),
            Err(BuildError::Length { field: 7, .. })
        ));
        assert_eq!(read_back(&d, 7, |w| w.digits(7, "1234").unwrap()), "1234");
    }

    #[test]
    fn bcd_track_writes_the_separator_as_nibble_d() {
        let d = kinds("bcd", "bcd");
        let out = written(&d, |w| w.digits(8, "6222020000000000001=3012101")).unwrap();
        assert_eq!(out[0], 0x27);
        assert_eq!(&out[10..], &[0x1D, 0x30, 0x12, 0x10, 0x10]);
        assert_eq!(
            read_back(&d, 8, |w| w
                .digits(8, "6222020000000000001D3012101")
                .unwrap()),
            "6222020000000000001D3012101"
        );
    }

    #[test]
    fn ascii_digits_and_prefixes() {
        let d = kinds("ascii", "ascii");
        assert_eq!(
            written(&d, |w| w.digits(2, "6222020000000000001")).unwrap(),
            b"196222020000000000001"
        );
        assert_eq!(written(&d, |w| w.digits(4, "123")).unwrap(), b"123");
        assert_eq!(written(&d, |w| w.digits(6, "12")).unwrap(), b"00212");
        assert_eq!(
            written(&d, |w| w.digits(8, "622202=30")).unwrap(),
            b"09622202=30"
        );
        assert_eq!(written(&d, |w| w.number(3, 1000)).unwrap(), b"001000");
        assert_eq!(
            read_back(&d, 8, |w| w.digits(8, "622202=30").unwrap()),
            "622202=30"
        );
    }

    #[test]
    fn text_fields() {
        let d = kinds("bcd", "bcd");
        assert_eq!(written(&d, |w| w.text(9, "AB 1")).unwrap(), b"AB 1");
        assert_eq!(
            written(&d, |w| w.text(10, "Demo Store #1")).unwrap(),
            b"\x13Demo Store #1"
        );
        assert_eq!(&written(&d, |w| w.text(11, "x")).unwrap(), b"\x00\x01x");
        let ascii = kinds("ascii", "ascii");
        assert_eq!(written(&ascii, |w| w.text(10, "abc")).unwrap(), b"03abc");
        assert_eq!(
            read_back(&d, 10, |w| w.text(10, "Demo Store #1").unwrap()),
            "Demo Store #1"
        );
    }

    #[test]
    fn binary_fields() {
        let d = kinds("bcd", "bcd");
        assert_eq!(
            written(&d, |w| w.binary(12, &[1, 2, 3, 4])).unwrap(),
            [1, 2, 3, 4]
        );
        assert_eq!(
            written(&d, |w| w.binary(13, &[0xAB; 3])).unwrap(),
            [0x00, 0x03, 0xAB, 0xAB, 0xAB]
        );
        let ascii = kinds("ascii", "ascii");
        assert_eq!(
            written(&ascii, |w| w.binary(13, &[0xAB])).unwrap(),
            b"001\xAB"
        );
        assert_eq!(
            read_back(&d, 13, |w| w.binary(13, &[0xAB; 3]).unwrap()),
            "ABABAB"
        );
    }

    #[test]
    fn secondary_bitmap_appears_when_a_field_above_64_is_written() {
        let d = kinds("ascii", "ascii");
        let mut buf = BytesMut::new();
        let mut w = MessageWriter::new(&d, &mut buf, Mti::NETWORK, &[], &[]).unwrap();
        w.digits(3, "990000").unwrap();
        w.number(70, 301).unwrap();
        w.finish().unwrap();
        assert_eq!(&buf[2..6], b"0800");
        assert_eq!(buf[6], 0x80 | 0x20, "bit 1 (secondary) and bit 3");
        assert_eq!(&buf[14..22], &[0x04, 0, 0, 0, 0, 0, 0, 0], "bit 70");
        assert_eq!(&buf[22..], b"990000301");
        let msg = Message::parse(&d, &buf[2..]).unwrap();
        assert_eq!(msg.digits(70).unwrap().to_u64(), Some(301));
        assert_eq!(msg.bitmap().fields().collect::<Vec<_>>(), [3, 70]);
    }

    #[test]
    fn values_that_do_not_fit_are_refused_by_field() {
        let d = kinds("bcd", "bcd");
        let err = |f: fn(&mut MessageWriter<'_>) -> Result<(), BuildError>| {
            written(&d, f).unwrap_err().to_string()
        };
        assert_eq!(
            err(|w| w.digits(3, "12345")),
            "field 3: length 5 does not fit n6"
        );
        assert_eq!(
            err(|w| w.digits(2, &"1".repeat(20))),
            "field 2: length 20 does not fit n..19"
        );
        assert_eq!(
            err(|w| w.digits(3, "12345a")),
            "field 3: character 'a' is not allowed in n6"
        );
        assert_eq!(
            err(|w| w.digits(3, "12=456")),
            "field 3: character '=' is not allowed in n6"
        );
        assert_eq!(
            err(|w| w.text(9, "ab-c")),
            "field 9: character '-' is not allowed in an4"
        );
        assert_eq!(
            err(|w| w.text(10, "caf\u{e9}")),
            "field 10: character '\u{e9}' is not allowed in ans..20"
        );
        assert_eq!(
            err(|w| w.text(3, "123456")),
            "field 3: n6 takes digits or hex bytes, not text"
        );
        assert_eq!(
            err(|w| w.number(3, 1_000_000)),
            "field 3: length 7 does not fit n6"
        );
        assert_eq!(
            err(|w| w.digits(14, "1")),
            "field 14 is not defined in the dialect"
        );
        assert_eq!(
            err(|w| {
                w.digits(4, "123")?;
                w.digits(3, "123456")
            }),
            "field 3 written after field 4"
        );
        let cup = Dialect::cup_pos();
        let mut buf = BytesMut::new();
        assert!(MessageWriter::new(&cup, &mut buf, Mti::FINANCIAL, &[0x60], &[0; 6]).is_err());
    }

    #[test]
    fn reply_swaps_tpdu_addresses_and_clears_the_processing_requirement() {
        let cup = Dialect::cup_pos();
        let mut buf = BytesMut::new();
        let tpdu = [0x60, 0x00, 0x03, 0x00, 0x00];
        let header = [0x60, 0x31, 0x13, 0x00, 0x00, 0x00];
        let mut w = MessageWriter::new(&cup, &mut buf, Mti::FINANCIAL, &tpdu, &header).unwrap();
        w.digits(3, "000000").unwrap();
        w.finish().unwrap();
        let req = Message::parse(&cup, &buf[2..]).unwrap();
        let mut out = BytesMut::new();
        let mut w = MessageWriter::reply(&cup, &mut out, &req);
        w.copy(3, &req).unwrap();
        w.text(39, "00").unwrap();
        w.finish().unwrap();
        let reply = Message::parse(&cup, &out[2..]).unwrap();
        assert_eq!(reply.tpdu(), [0x60, 0x00, 0x00, 0x00, 0x03]);
        assert_eq!(reply.header(), [0x60, 0x31, 0x10, 0x00, 0x00, 0x00]);
        assert_eq!(reply.mti().to_string(), "0210");
        assert_eq!(reply.text(39), Some("00"));
        assert!(reply.digits(3).unwrap().eq_str("000000"));
    }

    #[test]
    fn copy_between_dialects_converts_encodings() {
        let cup = Dialect::cup_pos();
        let iso = Dialect::iso87();
        let mut buf = BytesMut::new();
        let mut w = MessageWriter::new(
            &cup,
            &mut buf,
            Mti::FINANCIAL,
            &[0x60, 0, 3, 0, 0],
            &[0x60, 0x31, 0, 0, 0, 0],
        )
        .unwrap();
        w.digits(2, "6222020000000000001").unwrap();
        w.digits(22, "051").unwrap();
        w.finish().unwrap();
        let cup_msg = Message::parse(&cup, &buf[2..]).unwrap();
        let mut out = BytesMut::new();
        let mut w = MessageWriter::new(&iso, &mut out, Mti::FINANCIAL, &[], &[]).unwrap();
        assert!(w.copy(2, &cup_msg).unwrap());
        assert!(!w.copy(3, &cup_msg).unwrap());
        w.copy(22, &cup_msg).unwrap();
        w.finish().unwrap();
        assert_eq!(&out[14..], b"196222020000000000001051");
    }

    #[test]
    fn card_data_views_print_masked() {
        let d = kinds("bcd", "bcd");
        let mut buf = BytesMut::new();
        let mut w = MessageWriter::new(&d, &mut buf, Mti::FINANCIAL, &[], &[]).unwrap();
        w.digits(2, "6222020000000000001").unwrap();
        w.digits(8, "6222020000000000001D30121011234").unwrap();
        w.binary(12, &[0x12, 0x34, 0x56, 0x78]).unwrap();
        w.finish().unwrap();
        let msg = Message::parse(&d, &buf[2..]).unwrap();
        let shown = format!(
            "{msg:?} {} {} {}",
            msg.field(2).unwrap(),
            msg.field(8).unwrap(),
            msg.field(12).unwrap()
        );
        assert!(!shown.contains("6222020000000000001"), "{shown}");
        assert!(!shown.contains("12345678"), "{shown}");
        assert!(shown.contains("622202*********0001"), "{shown}");
        assert!(shown.contains("622202*********0001D***********"), "{shown}");
        assert!(shown.contains("********"), "{shown}");
        assert_eq!(
            msg.digits(2).unwrap().to_pan().unwrap().expose(),
            "6222020000000000001"
        );
        let Some(Value::Digits(track)) = msg.field(8) else {
            panic!()
        };
        assert_eq!(track.to_track().unwrap().expiry(), Some("3012"));
    }

    #[test]
    fn sub_field_slices_follow_the_nibbles() {
        let d = kinds("bcd", "bcd");
        let mut buf = BytesMut::new();
        let mut w = MessageWriter::new(&d, &mut buf, Mti::FINANCIAL, &[], &[]).unwrap();
        w.digits(4, "123").unwrap();
        w.digits(6, "22000001000").unwrap();
        w.finish().unwrap();
        let msg = Message::parse(&d, &buf[2..]).unwrap();
        let f60 = msg.digits(6).unwrap();
        assert_eq!(f60.slice(0, 2).unwrap().to_u64(), Some(22));
        assert_eq!(f60.slice(2, 8).unwrap().to_u64(), Some(1));
        assert!(f60.slice(8, 11).unwrap().eq_str("000"));
        assert!(f60.slice(3, 8).unwrap().eq_str("00001"));
        assert!(f60.slice(8, 12).is_none());
        let f4 = msg.digits(4).unwrap();
        assert!(f4.slice(1, 3).unwrap().eq_str("23"));
        assert!(f4.slice(0, 1).unwrap().eq_str("1"));
    }

    #[test]
    fn malformed_fields_name_field_and_offset() {
        let d = kinds("bcd", "bcd");
        // MTI 0200, bitmap with field 2, then a prefix of 0x20 (20 > 19).
        let mut frame = vec![0x02, 0x00, 0x40, 0, 0, 0, 0, 0, 0, 0, 0x20];
        frame.extend([0x11; 10]);
        let e = Message::parse(&d, &frame).unwrap_err();
        assert_eq!((e.part, e.offset), (Part::Field(2), 10));
        assert_eq!(
            e.to_string(),
            "field 2 at byte 10: length 20 exceeds the maximum 19"
        );
        frame[10] = 0x1A;
        assert_eq!(
            Message::parse(&d, &frame).unwrap_err().kind,
            ParseErrorKind::BadPrefix
        );
        frame[10] = 0x04;
        frame[12] = 0x1B;
        let e = Message::parse(&d, &frame[..13]).unwrap_err();
        assert_eq!(e.to_string(), "field 2 at byte 12: nibble B is not a digit");
        frame[12] = 0x11;
        let e = Message::parse(&d, &frame[..12]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "field 2 at byte 11: frame ends 1 bytes short"
        );
        let e = Message::parse(&d, &frame[..14]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "end of message at byte 13: 1 bytes after the last field"
        );
        // Field 14 is not in the dialect.
        let e = Message::parse(&d, &[0x02, 0x00, 0x00, 0x04, 0, 0, 0, 0, 0, 0]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "field 14 at byte 10: field is not defined in the dialect"
        );
        let cup = Dialect::cup_pos();
        let mut secondary = vec![0x60, 0, 3, 0, 0, 0x60, 0x31, 0, 0, 0, 0, 0x02, 0x00, 0x80];
        secondary.extend([0; 15]);
        let e = Message::parse(&cup, &secondary).unwrap_err();
        assert_eq!(
            e.to_string(),
            "bitmap at byte 13: secondary bitmap is not allowed in this dialect"
        );
        let e = Message::parse(&cup, &secondary[..12]).unwrap_err();
        assert_eq!(e.to_string(), "mti at byte 11: frame ends 1 bytes short");
    }
}
