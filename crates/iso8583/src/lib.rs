//! The ISO 8583 wire format, and nothing else.
pub mod mac;
