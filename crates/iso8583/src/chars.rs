//! Checking the characters of field values, many bytes at a time.
//!
//! The parser checks every byte it accepts and the writer every character it
//! is given; both ask here first whether a whole value is valid, and only when
//! it is not look for the first bad byte to report. ASCII is checked eight
//! bytes at a time in one `u64` ("SWAR"); BCD digits too, and BCD track data
//! (nibble D allowed) through a table.

/// Byte classes, as bits of [`CLASSES`]: both nibbles BCD digits.
pub(crate) const BCD_DIGITS: u8 = 1;
/// Both nibbles BCD digits or the separator nibble D.
pub(crate) const BCD_TRACK: u8 = 2;

/// The classes of every byte value.
pub(crate) static CLASSES: [u8; 256] = classes();

const fn classes() -> [u8; 256] {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let (hi, lo) = ((i >> 4) as u8, (i & 0x0F) as u8);
        let mut class = 0;
        if hi <= 9 && lo <= 9 {
            class |= BCD_DIGITS | BCD_TRACK;
        } else if (hi <= 9 || hi == 0x0D) && (lo <= 9 || lo == 0x0D) {
            class |= BCD_TRACK;
        }
        table[i] = class;
        i += 1;
    }
    table
}

/// True when every byte of `bytes` is in one of the classes of `mask`.
#[inline]
pub(crate) fn all_in(bytes: &[u8], mask: u8) -> bool {
    // No early exit: fields are short, and a branch a byte costs more.
    bytes
        .iter()
        .fold(true, |ok, &b| ok & (CLASSES[usize::from(b)] & mask != 0))
}

/// True when `test` passes on every byte of `bytes`, given 8 bytes at a time
/// as one little-endian word. `test` must judge each byte on its own, and pass
/// `fill`: words overlap at the end, and short fields are filled up with it.
#[inline]
fn all_words(bytes: &[u8], fill: u8, test: impl Fn(u64) -> bool) -> bool {
    let n = bytes.len();
    let fill = u64::from_le_bytes([fill; 8]);
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let half = |at: usize| {
        u64::from(u32::from_le_bytes(
            bytes[at..at + 4].try_into().expect("4 bytes"),
        ))
    };
    if n >= 8 {
        let mut ok = true;
        let mut at = 0;
        while at + 8 <= n {
            ok &= test(word(at));
            at += 8;
        }
        if at < n {
            ok &= test(word(n - 8));
        }
        ok
    } else if n >= 4 {
        // Two overlapping halves, then the filling.
        test(half(0) | (half(n - 4) << (8 * (n - 4))) | (fill << (8 * n)))
    } else if n > 0 {
        // Bytes 0, n / 2 and n - 1 are all of them.
        let byte = |at: usize| u64::from(bytes[at]) << (8 * at);
        test(byte(0) | byte(n / 2) | byte(n - 1) | (fill << (8 * n)))
    } else {
        true
    }
}

const LOW_BITS: u64 = 0x0101_0101_0101_0101;
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;

/// Eight bytes of packed BCD digits: no nibble above 9. A nibble plus 6
/// reaches 16 exactly when it is above 9, and no sum carries into the next
/// byte.
#[inline]
fn bcd_digits(word: u64) -> bool {
    let lo = word & (0x0F * LOW_BITS);
    let hi = (word >> 4) & (0x0F * LOW_BITS);
    ((lo + 6 * LOW_BITS) | (hi + 6 * LOW_BITS)) & (0x10 * LOW_BITS) == 0
}

/// Eight ASCII digits, `0x30..=0x39`. On the low 7 bits of each byte, adding
/// 0x50 sets bit 7 when the byte is at least 0x30, adding 0x46 when it is
/// above 0x39, and neither carries into the next byte.
#[inline]
fn ascii_digits(word: u64) -> bool {
    let low7 = word & !HIGH_BITS;
    (word | (low7 + 0x46 * LOW_BITS) | !(low7 + 0x50 * LOW_BITS)) & HIGH_BITS == 0
}

/// Eight printable ASCII characters, `0x20..=0x7E` (same method).
#[inline]
fn printable(word: u64) -> bool {
    let low7 = word & !HIGH_BITS;
    (word | (low7 + LOW_BITS) | !(low7 + 0x60 * LOW_BITS)) & HIGH_BITS == 0
}

/// Bit 7 of each byte set where the byte (its low 7 bits, `low7`) is in
/// `lo..=hi` (same method: adding `0x80 - lo` reaches bit 7 from `lo` up,
/// adding `0x7F - hi` from `hi + 1` up).
#[inline]
fn in_range(low7: u64, lo: u8, hi: u8) -> u64 {
    let from_lo = low7 + u64::from(0x80 - lo) * LOW_BITS;
    let past_hi = low7 + u64::from(0x7F - hi) * LOW_BITS;
    from_lo & !past_hi & HIGH_BITS
}

/// Eight track characters: ASCII digits, `=` and `D`.
#[inline]
fn ascii_track(word: u64) -> bool {
    let low7 = word & !HIGH_BITS;
    let ok = in_range(low7, b'0', b'9') | in_range(low7, b'=', b'=') | in_range(low7, b'D', b'D');
    (!ok | word) & HIGH_BITS == 0
}

/// Eight `an` characters: letters, digits and space. A letter is one whose
/// lower case (bit 5 set) is in `a..=z`.
#[inline]
fn alphanumeric(word: u64) -> bool {
    let low7 = word & !HIGH_BITS;
    let ok = in_range(low7, b'0', b'9')
        | in_range(low7 | (0x20 * LOW_BITS), b'a', b'z')
        | in_range(low7, b' ', b' ');
    (!ok | word) & HIGH_BITS == 0
}

/// True when every byte is an ASCII digit, `=` or `D`.
#[inline]
pub(crate) fn ascii_track_only(bytes: &[u8]) -> bool {
    all_words(bytes, b'0', ascii_track)
}

/// True when every byte is a letter, a digit or a space.
#[inline]
pub(crate) fn alphanumeric_only(bytes: &[u8]) -> bool {
    all_words(bytes, b'0', alphanumeric)
}

/// True when every byte is an ASCII digit.
#[inline]
pub(crate) fn ascii_digits_only(bytes: &[u8]) -> bool {
    all_words(bytes, b'0', ascii_digits)
}

/// True when every byte holds two BCD digits.
#[inline]
pub(crate) fn bcd_digits_only(bytes: &[u8]) -> bool {
    all_words(bytes, 0x00, bcd_digits)
}

/// True when every byte is printable ASCII (`0x20..=0x7E`).
#[inline]
pub(crate) fn printable_only(bytes: &[u8]) -> bool {
    all_words(bytes, b' ', printable)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte value at every position of every length up to 20, against
    /// the byte-at-a-time definitions.
    #[test]
    fn word_checks_agree_with_byte_checks() {
        /// The word-at-a-time check, its byte-at-a-time definition, and a
        /// byte that passes.
        type Case = (fn(&[u8]) -> bool, fn(u8) -> bool, u8);
        let checks: [Case; 5] = [
            (ascii_digits_only, |b| b.is_ascii_digit(), b'7'),
            (bcd_digits_only, |b| b >> 4 <= 9 && b & 0x0F <= 9, 0x59),
            (printable_only, |b| (0x20..=0x7E).contains(&b), b'~'),
            (
                ascii_track_only,
                |b| b.is_ascii_digit() || b == b'=' || b == b'D',
                b'=',
            ),
            (
                alphanumeric_only,
                |b| b.is_ascii_alphanumeric() || b == b' ',
                b'z',
            ),
        ];
        for (fast, slow, good) in checks {
            for len in 0..=20 {
                assert!(fast(&vec![good; len]), "{len}");
                for at in 0..len {
                    for b in 0..=255u8 {
                        let mut bytes = vec![good; len];
                        bytes[at] = b;
                        assert_eq!(fast(&bytes), slow(b), "{len} {at} {b:#04x}");
                    }
                }
            }
        }
    }

    #[test]
    fn classes_follow_the_nibbles() {
        for b in 0..=255u8 {
            let class = CLASSES[usize::from(b)];
            let digit = |n: u8| n <= 9;
            assert_eq!(class & BCD_DIGITS != 0, digit(b >> 4) && digit(b & 0x0F));
            let track = |n: u8| n <= 9 || n == 0x0D;
            assert_eq!(class & BCD_TRACK != 0, track(b >> 4) && track(b & 0x0F));
        }
    }
}
