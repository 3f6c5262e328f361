//! Typed errors of the wire format: every one names where it happened.

use std::fmt;

/// Where in a frame a parse error was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The transport PDU in front of a terminal message.
    Tpdu,
    /// The application header after the TPDU.
    Header,
    /// The message type indicator.
    Mti,
    /// The primary or secondary bitmap.
    Bitmap,
    /// A data field, by number.
    Field(u8),
    /// Bytes after the last field.
    End,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Part::Tpdu => f.write_str("tpdu"),
            Part::Header => f.write_str("header"),
            Part::Mti => f.write_str("mti"),
            Part::Bitmap => f.write_str("bitmap"),
            Part::Field(n) => write!(f, "field {n}"),
            Part::End => f.write_str("end of message"),
        }
    }
}

/// What was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    /// The frame ends before the part does.
    #[error("frame ends {needed} bytes short")]
    Truncated {
        /// Bytes missing.
        needed: usize,
    },
    /// A length prefix that is not a decimal number.
    #[error("length prefix is not decimal")]
    BadPrefix,
    /// A variable length above the field's maximum.
    #[error("length {len} exceeds the maximum {max}")]
    TooLong {
        /// Declared length.
        len: usize,
        /// The dialect's maximum.
        max: usize,
    },
    /// A BCD nibble that is not a digit (or the track separator, in `z`).
    #[error("nibble {nibble:X} is not a digit")]
    BadNibble {
        /// The offending nibble.
        nibble: u8,
    },
    /// The padding nibble of an odd digit count is not 0 (or F).
    #[error("padding nibble {nibble:X} is not 0")]
    BadPadding {
        /// The offending nibble.
        nibble: u8,
    },
    /// A character the field's type does not allow.
    #[error("byte 0x{byte:02X} is not allowed in an {ty} field")]
    BadChar {
        /// The offending byte.
        byte: u8,
        /// The field's attribute letters.
        ty: &'static str,
    },
    /// The bitmap names a field the dialect does not define.
    #[error("field is not defined in the dialect")]
    Undefined,
    /// Bit 1 is set but the dialect has no secondary bitmap.
    #[error("secondary bitmap is not allowed in this dialect")]
    SecondaryBitmap,
    /// Bytes left after the last field the bitmap announces.
    #[error("{extra} bytes after the last field")]
    Trailing {
        /// Bytes left over.
        extra: usize,
    },
}

/// A message that frames but cannot be parsed. Names the part and the byte
/// offset (from the start of the frame, after the 2-byte length) where
/// parsing stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{part} at byte {offset}: {kind}")]
pub struct ParseError {
    /// Where.
    pub part: Part,
    /// Byte offset in the frame.
    pub offset: usize,
    /// What.
    pub kind: ParseErrorKind,
}

impl ParseError {
    /// The field number, when the error is in a field.
    pub fn field(&self) -> Option<u8> {
        match self.part {
            Part::Field(n) => Some(n),
            _ => None,
        }
    }

    /// The same error with the offset moved by `by` bytes (for input that had
    /// the length prefix in front).
    pub fn shifted(mut self, by: usize) -> ParseError {
        self.offset += by;
        self
    }
}

/// A value that cannot be written into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The dialect does not define the field.
    #[error("field {field} is not defined in the dialect")]
    Undefined {
        /// Field number.
        field: usize,
    },
    /// Fields must be written in ascending order.
    #[error("field {field} written after field {after}")]
    OutOfOrder {
        /// Field number.
        field: usize,
        /// The field written before it.
        after: usize,
    },
    /// The value's length does not fit the field.
    #[error("field {field}: length {len} does not fit {format}")]
    Length {
        /// Field number.
        field: usize,
        /// The value's length in the field's units.
        len: usize,
        /// The field's format, e.g. `n..19`.
        format: String,
    },
    /// A character the field's type does not allow.
    #[error("field {field}: character {ch:?} is not allowed in {format}")]
    Char {
        /// Field number.
        field: usize,
        /// The offending character.
        ch: char,
        /// The field's format.
        format: String,
    },
    /// The value's kind does not match the field (text given for a `b` field, say).
    #[error("field {field}: {format} takes {expected}")]
    Kind {
        /// Field number.
        field: usize,
        /// The field's format.
        format: String,
        /// What the field takes.
        expected: &'static str,
    },
    /// A field above 64 in a dialect without a secondary bitmap.
    #[error("field {field} needs a secondary bitmap, which the dialect does not allow")]
    NoSecondaryBitmap {
        /// Field number.
        field: usize,
    },
    /// TPDU or header of the wrong length.
    #[error("{part} must be {expected} bytes, got {len}")]
    Prefix {
        /// `tpdu` or `header`.
        part: &'static str,
        /// Bytes the dialect wants.
        expected: usize,
        /// Bytes given.
        len: usize,
    },
    /// An MTI that is not four decimal digits.
    #[error("mti {0:?} is not four digits")]
    Mti(String),
    /// The message is longer than a 2-byte length prefix can announce.
    #[error("message of {len} bytes is longer than 65535")]
    TooLarge {
        /// Bytes after the length prefix.
        len: usize,
    },
}

/// One problem in a dialect file, with its place: file, line, dotted key
/// (e.g. `fields.22.align`) and what is wrong. Dialect files are read with the
/// workspace's `settings` crate, whose problem this is.
pub use settings::Problem;

/// A dialect file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DialectError {
    /// The file cannot be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file was read but is wrong; every problem found is listed.
    #[error("{}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// Each problem, with file, line and key.
        problems: Vec<Problem>,
    },
}
