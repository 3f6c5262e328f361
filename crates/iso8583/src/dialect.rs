//! A dialect is the field table of one side of the switch, compiled from its
//! TOML description into the plan the parser and the writer follow.
//!
//! Everything that differs between the terminal side (UnionPay-style POS,
//! BCD) and the network side (ISO 8583:1987 ASCII) is here as data: how the
//! MTI and the digits are written, how long the prefixes are and what they
//! count, where an odd digit count puts its padding nibble, and which fields
//! carry card data. The code that reads and writes bytes has no field numbers
//! in it.

use std::fmt;
use std::path::Path;

use crate::error::DialectError;
use crate::spec;

/// The terminal-side dialect shipped with Switchyard (`config/dialects/cup-pos.toml`).
pub const CUP_POS_TOML: &str = include_str!("../../../config/dialects/cup-pos.toml");
/// The network-side dialect shipped with Switchyard (`config/dialects/iso87.toml`).
pub const ISO87_TOML: &str = include_str!("../../../config/dialects/iso87.toml");

/// The highest field number a message can carry (secondary bitmap included).
pub const MAX_FIELD: usize = 128;

/// What a field holds, after ISO 8583's attribute letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// `n`: decimal digits.
    Numeric,
    /// `z`: track data: digits and the field separator.
    Track,
    /// `an`: letters, digits and spaces.
    Alphanumeric,
    /// `ans`: any printable ASCII character.
    Text,
    /// `b`: raw bytes.
    Binary,
}

impl FieldType {
    /// True for the types written as digits (`n`, `z`).
    pub fn is_digits(self) -> bool {
        matches!(self, FieldType::Numeric | FieldType::Track)
    }

    pub(crate) fn letters(self) -> &'static str {
        match self {
            FieldType::Numeric => "n",
            FieldType::Track => "z",
            FieldType::Alphanumeric => "an",
            FieldType::Text => "ans",
            FieldType::Binary => "b",
        }
    }
}

/// Fixed length, or a variable length announced by a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LengthKind {
    /// Always `max` units.
    Fixed,
    /// LLVAR: a two-digit length prefix.
    LlVar,
    /// LLLVAR: a three-digit length prefix.
    LllVar,
}

/// How digits (of `n` and `z` values, and of length prefixes) are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigitEncoding {
    /// Packed BCD, two digits a byte.
    Bcd,
    /// One ASCII character a digit.
    Ascii,
}

/// What a variable field's length prefix counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counts {
    /// Digits (or characters) of the value: UnionPay counts a 19-digit PAN as 19.
    Units,
    /// Bytes on the wire: some dialects count a 19-digit BCD PAN as 10.
    Bytes,
}

/// Where an odd number of BCD digits puts its padding nibble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Digits first, the `0` nibble after (`051` → `05 10`).
    Left,
    /// The `0` nibble first (`123` → `01 23`).
    Right,
}

/// Which fields hold cardholder data, so that nothing prints them by accident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sensitivity {
    /// Ordinary data.
    #[default]
    None,
    /// A primary account number: shown as the first 6 and last 4 digits.
    Pan,
    /// Track data: shown as the masked PAN, the separator and asterisks.
    Track,
    /// PIN block or other secret: never shown.
    Secret,
    /// Batch upload records (n2 count, then card type n2, STAN n6, PAN n20,
    /// amount n12 each): each record's PAN shown as for [`Sensitivity::Pan`].
    Records,
    /// EMV data (BER-TLV): the values of the tags that carry card data
    /// (PAN, track equivalents, name, expiry) never shown.
    Emv,
}

impl Sensitivity {
    /// How a field is shown when its dialect does not say: the fields that
    /// carry card data in every ISO 8583 dialect are masked all the same, so
    /// that a dialect file cannot leak them by leaving a key out. F48 is
    /// read as UnionPay's batch upload records (their PANs masked): where
    /// it holds other data, the middle of each 40 characters is masked too,
    /// which hides more than needed and never a PAN less.
    pub fn of_field(number: usize) -> Sensitivity {
        match number {
            2 => Sensitivity::Pan,
            35 | 36 => Sensitivity::Track,
            45 | 52 => Sensitivity::Secret,
            55 => Sensitivity::Emv,
            48 => Sensitivity::Records,
            _ => Sensitivity::None,
        }
    }
}

/// How the reply's TPDU is made from the request's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TpduReply {
    /// The same bytes.
    Echo,
    /// `60` + destination + source becomes `60` + source + destination.
    SwapAddresses,
}

/// How the reply's header is made from the request's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderReply {
    /// The same bytes.
    Echo,
    /// The UnionPay header with the processing-requirement nibble (low nibble of byte 3) set to 0.
    ClearProcessingRequirement,
}

/// One field of a dialect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldSpec {
    /// Field number, 2 to 128.
    pub number: u8,
    /// What the field is, for people.
    pub name: String,
    /// Attribute letters.
    pub ty: FieldType,
    /// Fixed or variable.
    pub length: LengthKind,
    /// Exact (fixed) or largest (variable) length, in digits for `n`/`z`,
    /// characters for `an`/`ans`, bytes for `b`.
    pub max: u16,
    /// How the digits of an `n`/`z` value are written.
    pub digits: DigitEncoding,
    /// How the length prefix is written.
    pub prefix: DigitEncoding,
    /// What the length prefix counts.
    pub counts: Counts,
    /// Where an odd digit count puts its padding nibble (BCD only).
    pub align: Align,
    /// Card data handling.
    pub sensitive: Sensitivity,
}

impl FieldSpec {
    /// Bytes taken on the wire by a value of `count` units (prefix excluded).
    pub(crate) fn data_bytes(&self, count: usize) -> usize {
        if self.ty.is_digits() && self.digits == DigitEncoding::Bcd {
            count.div_ceil(2)
        } else {
            count
        }
    }

    /// Number of digits in the length prefix: 2 or 3 (0 for fixed).
    pub(crate) fn prefix_digits(&self) -> usize {
        match self.length {
            LengthKind::Fixed => 0,
            LengthKind::LlVar => 2,
            LengthKind::LllVar => 3,
        }
    }

    /// Bytes taken by the length prefix.
    pub(crate) fn prefix_bytes(&self) -> usize {
        match self.prefix {
            DigitEncoding::Bcd => self.prefix_digits().div_ceil(2),
            DigitEncoding::Ascii => self.prefix_digits(),
        }
    }
}

impl fmt::Display for FieldSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dots = match self.length {
            LengthKind::Fixed => "",
            LengthKind::LlVar => "..",
            LengthKind::LllVar => "...",
        };
        write!(f, "{}{}{}", self.ty.letters(), dots, self.max)
    }
}

/// How the message type indicator is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtiEncoding {
    /// Two bytes of BCD.
    Bcd,
    /// Four ASCII digits.
    Ascii,
}

/// What the parser checks a field's data for: its type and encoding in one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Check {
    /// The dialect does not define the field.
    #[default]
    Undefined,
    /// `n`, packed BCD.
    BcdDigits,
    /// `z`, packed BCD (nibble D is the separator).
    BcdTrack,
    /// `n`, ASCII.
    AsciiDigits,
    /// `z`, ASCII (`=` or `D` is the separator).
    AsciiTrack,
    /// `an`.
    Alphanumeric,
    /// `ans`.
    Text,
    /// `b`: any byte.
    Binary,
}

/// A field's spec reduced to what parsing it takes, worked out once when the
/// dialect is compiled: ten bytes instead of a dozen questions a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Plan {
    /// What the data may hold.
    pub(crate) check: Check,
    /// Bytes of the length prefix; 0 for a fixed field.
    pub(crate) prefix_bytes: u8,
    /// The length prefix is BCD (else ASCII).
    pub(crate) prefix_bcd: bool,
    /// The prefix counts bytes of BCD digits: twice as many digits. As the
    /// parser has always done, this doubles a fixed field's length too, so
    /// that a fixed BCD field with `prefix_counts = "bytes"` is refused as
    /// too long (while the writer writes it); neither shipped dialect has one.
    pub(crate) doubled: bool,
    /// An odd number of BCD digits has its padding nibble first.
    pub(crate) pad_first: bool,
    /// 1 when digits are packed two a byte (BCD), else 0: data bytes are
    /// `(units + packed) >> packed`.
    pub(crate) packed: u8,
    /// The (largest) length in units: digits, characters or bytes.
    pub(crate) max: u16,
    /// How views of the field show it.
    pub(crate) sensitive: Sensitivity,
}

impl Plan {
    fn new(spec: &FieldSpec) -> Plan {
        let bcd = spec.digits == DigitEncoding::Bcd;
        Plan {
            check: match (spec.ty, bcd) {
                (FieldType::Numeric, true) => Check::BcdDigits,
                (FieldType::Track, true) => Check::BcdTrack,
                (FieldType::Numeric, false) => Check::AsciiDigits,
                (FieldType::Track, false) => Check::AsciiTrack,
                (FieldType::Alphanumeric, _) => Check::Alphanumeric,
                (FieldType::Text, _) => Check::Text,
                (FieldType::Binary, _) => Check::Binary,
            },
            prefix_bytes: spec.prefix_bytes() as u8,
            prefix_bcd: spec.prefix == DigitEncoding::Bcd,
            doubled: spec.ty.is_digits()
                && bcd
                && spec.counts == Counts::Bytes
                && spec.length != LengthKind::Fixed,
            pad_first: spec.align == Align::Right,
            packed: u8::from(spec.ty.is_digits() && bcd),
            max: spec.max,
            sensitive: spec.sensitive,
        }
    }

    /// Bytes taken on the wire by `count` units (prefix excluded).
    #[inline]
    pub(crate) fn data_bytes(self, count: usize) -> usize {
        (count + usize::from(self.packed)) >> self.packed
    }

    /// The plans of a field table, by field number.
    pub(crate) fn table(fields: &[Option<FieldSpec>]) -> Box<[Plan; MAX_FIELD + 1]> {
        let mut plans = Box::new([Plan::default(); MAX_FIELD + 1]);
        for (plan, spec) in plans.iter_mut().zip(fields) {
            if let Some(spec) = spec {
                *plan = Plan::new(spec);
            }
        }
        plans
    }
}

/// A compiled dialect: the field table and the frame layout of one side.
#[derive(Clone, PartialEq, Eq)]
pub struct Dialect {
    pub(crate) name: String,
    pub(crate) tpdu_len: usize,
    pub(crate) header_len: usize,
    pub(crate) tpdu_reply: TpduReply,
    pub(crate) header_reply: HeaderReply,
    pub(crate) mti: MtiEncoding,
    pub(crate) secondary_bitmap: bool,
    pub(crate) fields: Vec<Option<FieldSpec>>,
    /// What parsing each field takes, by field number (from `fields`).
    pub(crate) plans: Box<[Plan; MAX_FIELD + 1]>,
}

impl fmt::Debug for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dialect")
            .field("name", &self.name)
            .field("tpdu_len", &self.tpdu_len)
            .field("header_len", &self.header_len)
            .field("mti", &self.mti)
            .field("fields", &self.fields.iter().flatten().count())
            .finish()
    }
}

impl Dialect {
    /// The terminal-side dialect embedded in the binary.
    pub fn cup_pos() -> Dialect {
        Dialect::from_toml(CUP_POS_TOML, "config/dialects/cup-pos.toml")
            .expect("the embedded cup-pos dialect is valid")
    }

    /// The network-side dialect embedded in the binary.
    pub fn iso87() -> Dialect {
        Dialect::from_toml(ISO87_TOML, "config/dialects/iso87.toml")
            .expect("the embedded iso87 dialect is valid")
    }

    /// Compiles a dialect from TOML text; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Dialect, DialectError> {
        spec::compile(text, origin)
    }

    /// Reads and compiles a dialect file.
    pub fn load(path: &Path) -> Result<Dialect, DialectError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| DialectError::Read {
            path: origin.clone(),
            source,
        })?;
        Dialect::from_toml(&text, &origin)
    }

    /// The dialect's name (`cup-pos`, `iso87`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Length of the TPDU in front of the message (0 when there is none).
    pub fn tpdu_len(&self) -> usize {
        self.tpdu_len
    }

    /// Length of the header between TPDU and MTI (0 when there is none).
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// The smallest frame that can hold a message: TPDU, header, MTI and primary bitmap.
    pub fn min_frame_len(&self) -> usize {
        self.tpdu_len + self.header_len + self.mti_len() + 8
    }

    /// Bytes of the MTI: 2 in BCD, 4 in ASCII.
    pub fn mti_len(&self) -> usize {
        match self.mti {
            MtiEncoding::Bcd => 2,
            MtiEncoding::Ascii => 4,
        }
    }

    /// What parsing field `number` (at most [`MAX_FIELD`]) takes.
    #[inline]
    pub(crate) fn plan(&self, number: usize) -> Plan {
        self.plans[number]
    }

    /// The spec of field `number`, if the dialect defines it.
    pub fn field(&self, number: usize) -> Option<&FieldSpec> {
        self.fields.get(number).and_then(Option::as_ref)
    }

    /// Every field the dialect defines, in number order.
    pub fn fields(&self) -> impl Iterator<Item = &FieldSpec> {
        self.fields.iter().flatten()
    }

    /// Whether field numbers above 64 (a secondary bitmap) are allowed.
    pub fn has_secondary_bitmap(&self) -> bool {
        self.secondary_bitmap
    }

    /// The reply TPDU for a request TPDU, written into `out` (same length).
    pub fn reply_tpdu(&self, request: &[u8], out: &mut [u8]) {
        out.copy_from_slice(request);
        if self.tpdu_reply == TpduReply::SwapAddresses && out.len() == 5 {
            out[1..5].copy_from_slice(&[request[3], request[4], request[1], request[2]]);
        }
    }

    /// The reply header for a request header, written into `out` (same length).
    pub fn reply_header(&self, request: &[u8], out: &mut [u8]) {
        out.copy_from_slice(request);
        if self.header_reply == HeaderReply::ClearProcessingRequirement && out.len() >= 3 {
            out[2] &= 0xF0;
        }
    }
}
