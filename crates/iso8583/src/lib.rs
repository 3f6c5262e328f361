//! The ISO 8583 wire format of Switchyard, and nothing else: no sockets, no
//! database.
//!
//! Both sides of the switch are dialects described as data
//! ([`Dialect`], compiled from `config/dialects/*.toml`): the UnionPay-style
//! POS dialect the terminals speak (BCD, TPDU and header) and the ISO
//! 8583:1987 ASCII dialect of the issuer link. A [`Message`] borrows from its
//! frame and hands out typed views ([`Digits`], [`Text`], [`Binary`]); a
//! [`MessageWriter`] builds into a reused buffer; [`FrameCodec`] frames for
//! tokio-util; [`mac`] has the UnionPay POS MAC and the X9.19 retail MAC;
//! [`Pan`] and [`Track`] mask themselves. Every error is typed and names the
//! field and byte offset, and no input, however malformed, panics.

pub mod card;
mod chars;
pub mod dialect;
pub mod error;
pub mod framing;
pub mod json;
pub mod keys;
pub mod mac;
pub mod message;
pub mod mti;
mod spec;
pub mod value;
pub mod writer;

pub use card::{Pan, Track};
pub use dialect::{Dialect, FieldSpec, FieldType, Sensitivity};
pub use error::{BuildError, DialectError, ParseError, ParseErrorKind, Part};
pub use framing::{Frame, FrameCodec, FrameError};
pub use message::{Bitmap, Message};
pub use mti::Mti;
pub use value::{Binary, Digits, Text, Value};
pub use writer::MessageWriter;
