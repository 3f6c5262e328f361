//! Fuzzes the network-side (`iso87`) dialect: the input as a bare frame and as
//! a length-prefixed stream through the frame decoder; see `src/lib.rs`.
#![no_main]

use std::sync::LazyLock;

use iso8583::Dialect;
use libfuzzer_sys::fuzz_target;

static DIALECT: LazyLock<Dialect> = LazyLock::new(Dialect::iso87);

fuzz_target!(|data: &[u8]| {
    iso8583_fuzz::check(&DIALECT, data);
});
