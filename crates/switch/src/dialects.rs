//! What the switch needs of its two dialects: the fields it reads and
//! writes on each side, each as the kind of value it puts there. A dialect
//! file that leaves one out, or gives it a type or length that cannot hold
//! it, is refused when the switch starts and by `config check`, instead of
//! failing one message at a time (or the issuer link for good) once running.

use bytes::BytesMut;
use iso8583::{Dialect, MessageWriter, Mti};

/// A value of the kind the switch reads or writes in a field.
#[derive(Debug, Clone, Copy)]
enum Sample {
    Digits(&'static str),
    Number(u64),
    Text(&'static str),
    Bytes(&'static [u8]),
}

/// Reads or writes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Use {
    Reads,
    Writes,
    Both,
}

/// The largest amount (fen) a terminal's F4 carries, n12: a field that
/// holds only a smaller one would fail the large sales alone.
const AMOUNT: u64 = 999_999_999_999;

/// The largest STAN (n6), a terminal's and the issuer link's.
const STAN: u64 = 999_999;

/// A batch upload's F48 at its longest: 8 records of 40 digits.
const UPLOAD: &str = concat!(
    "08",
    "0000000106222020000000000001000000010000",
    "0000000206222020000000000002000000010000",
    "0000000306222020000000000003000000010000",
    "0000000406222020000000000004000000010000",
    "0000000506222020000000000005000000010000",
    "0000000606222020000000000006000000010000",
    "0000000706222020000000000007000000010000",
    "0000000806222020000000000008000000010000",
);

/// IC card data as long as a terminal's F55 may be (`b...255`): what the
/// switch copies into the network request.
const CHIP: &[u8] = &[0x9F; 255];

/// The terminal side: what requests carry and replies get.
const TERMINAL: &[(usize, Use, &str, Sample)] = &[
    (
        2,
        Use::Reads,
        "the PAN",
        Sample::Digits("6222020000000000001"),
    ),
    (
        3,
        Use::Both,
        "the processing code",
        Sample::Digits("000000"),
    ),
    (4, Use::Both, "the amount in fen", Sample::Number(AMOUNT)),
    (11, Use::Both, "the STAN", Sample::Number(STAN)),
    (
        12,
        Use::Writes,
        "the local time hhmmss",
        Sample::Digits("235959"),
    ),
    (
        13,
        Use::Writes,
        "the local date MMDD",
        Sample::Digits("1231"),
    ),
    (14, Use::Reads, "the expiry YYMM", Sample::Digits("3012")),
    (
        15,
        Use::Writes,
        "the settlement date MMDD",
        Sample::Digits("1231"),
    ),
    (
        25,
        Use::Both,
        "the POS condition code",
        Sample::Digits("00"),
    ),
    (
        32,
        Use::Writes,
        "the acquirer's institution id",
        Sample::Digits("48020000"),
    ),
    (
        35,
        Use::Reads,
        "track 2",
        Sample::Digits("6222020000000000001D30121011234"),
    ),
    (37, Use::Both, "the RRN", Sample::Text("000000000001")),
    (38, Use::Both, "the auth code", Sample::Text("123456")),
    (39, Use::Both, "the response code", Sample::Text("00")),
    (41, Use::Both, "the terminal id", Sample::Text("T0000001")),
    (
        42,
        Use::Both,
        "the merchant id",
        Sample::Text("898310048160001"),
    ),
    (
        48,
        Use::Both,
        "settlement totals and batch upload records (up to 322 digits)",
        Sample::Digits(UPLOAD),
    ),
    (52, Use::Reads, "the PIN block", Sample::Bytes(&[0; 8])),
    // F54, the issuer's balance, is left out of a reply whose dialect
    // cannot carry it (`Switch::reply`): not required.
    (55, Use::Reads, "the IC card data", Sample::Bytes(CHIP)),
    (
        60,
        Use::Both,
        "type, batch and network code",
        Sample::Digits("22000001000"),
    ),
    (
        61,
        Use::Reads,
        "the original's batch, STAN and date",
        Sample::Digits("0000010000011231"),
    ),
    (
        62,
        Use::Writes,
        "a sign-on's working keys (K3)",
        Sample::Bytes(&[0; 60]),
    ),
    (64, Use::Both, "the MAC (K3)", Sample::Bytes(&[0; 8])),
];

/// The network side: what the switch sends the issuer and reads back.
const NETWORK: &[(usize, Use, &str, Sample)] = &[
    (
        2,
        Use::Writes,
        "the PAN",
        Sample::Digits("6222020000000000001"),
    ),
    (
        3,
        Use::Writes,
        "the processing code",
        Sample::Digits("000000"),
    ),
    (4, Use::Writes, "the amount in fen", Sample::Number(AMOUNT)),
    (
        7,
        Use::Both,
        "the transmission time MMDDhhmmss",
        Sample::Digits("1231235959"),
    ),
    (11, Use::Both, "the STAN", Sample::Number(STAN)),
    (
        12,
        Use::Writes,
        "the local time hhmmss",
        Sample::Digits("235959"),
    ),
    (
        13,
        Use::Writes,
        "the local date MMDD",
        Sample::Digits("1231"),
    ),
    (14, Use::Writes, "the expiry YYMM", Sample::Digits("3012")),
    (
        18,
        Use::Writes,
        "the merchant's MCC",
        Sample::Digits("5411"),
    ),
    (22, Use::Writes, "the POS entry mode", Sample::Digits("051")),
    (
        25,
        Use::Writes,
        "the POS condition code",
        Sample::Digits("00"),
    ),
    (
        32,
        Use::Writes,
        "the acquirer's institution id",
        Sample::Digits("48020000"),
    ),
    (
        33,
        Use::Writes,
        "the forwarding institution id",
        Sample::Digits("48020000"),
    ),
    (
        35,
        Use::Writes,
        "track 2",
        Sample::Digits("6222020000000000001=30121011234"),
    ),
    (37, Use::Writes, "the RRN", Sample::Text("000000000001")),
    (38, Use::Reads, "the auth code", Sample::Text("123456")),
    (39, Use::Both, "the response code", Sample::Text("00")),
    (41, Use::Writes, "the terminal id", Sample::Text("T0000001")),
    (
        42,
        Use::Writes,
        "the merchant id",
        Sample::Text("898310048160001"),
    ),
    (
        43,
        Use::Writes,
        "the merchant's name and location (40 characters)",
        Sample::Text("Switchyard Demo Store                 CN"),
    ),
    (49, Use::Writes, "the currency code", Sample::Digits("156")),
    (52, Use::Writes, "the PIN block", Sample::Bytes(&[0; 8])),
    (55, Use::Writes, "the IC card data", Sample::Bytes(CHIP)),
    (
        54,
        Use::Reads,
        "the balance (20 characters)",
        Sample::Text("1002156C000000010000"),
    ),
    (
        70,
        Use::Both,
        "the network management code",
        Sample::Number(1),
    ),
    (
        90,
        Use::Writes,
        "the original data elements (42 digits)",
        Sample::Digits("020000000112312359590000000480200000000000"),
    ),
];

/// What the switch cannot do with `dialect` on one side (`terminal` or
/// `network`): per field, `(number, message)`.
fn problems_of(dialect: &Dialect, terminal: bool) -> Vec<(usize, String)> {
    let (needs, side) = if terminal {
        (TERMINAL, "terminal")
    } else {
        (NETWORK, "network")
    };
    let tpdu = vec![0; dialect.tpdu_len()];
    let header = vec![0; dialect.header_len()];
    let mut found = Vec::new();
    for &(n, used, what, sample) in needs {
        let mut buf = BytesMut::new();
        let tried = MessageWriter::new(dialect, &mut buf, Mti::FINANCIAL, &tpdu, &header).and_then(
            |mut w| match sample {
                Sample::Digits(d) => w.digits(n, d),
                Sample::Number(v) => w.number(n, v),
                Sample::Text(t) => w.text(n, t),
                Sample::Bytes(b) => w.binary(n, b),
            },
        );
        if let (Ok(()), 64) = (&tried, n) {
            // The switch seals a reply by setting bit 64 and appending the
            // MAC's 8 bytes: F64 must be exactly those, with no length.
            let mut bare = BytesMut::new();
            let bare_len = MessageWriter::new(dialect, &mut bare, Mti::FINANCIAL, &tpdu, &header)
                .and_then(|w| w.finish())
                .map(|_| bare.len());
            let mut with = BytesMut::new();
            let with_len = MessageWriter::new(dialect, &mut with, Mti::FINANCIAL, &tpdu, &header)
                .and_then(|mut w| {
                    w.binary(64, &[0; 8])?;
                    w.finish()
                })
                .map(|_| with.len());
            if !matches!((bare_len, with_len), (Ok(a), Ok(b)) if b == a + 8) {
                found.push((
                    64,
                    format!("the switch reads and writes the MAC (K3) here on the {side} side: it must be b8, fixed"),
                ));
            }
        }
        if let Err(e) = tried {
            let verb = match used {
                Use::Reads => "reads",
                Use::Writes => "writes",
                Use::Both => "reads and writes",
            };
            let shown = match sample {
                Sample::Digits(d) if n == 2 || n == 35 => format!("{} digits", d.len()),
                Sample::Digits(d) => format!("digits like {d:?}"),
                Sample::Number(_) => "a number".into(),
                Sample::Text(t) => format!("text like {t:?}"),
                Sample::Bytes(b) => format!("{} bytes", b.len()),
            };
            found.push((
                n,
                format!("the switch {verb} {what} here on the {side} side ({shown}): {e}"),
            ));
        }
    }
    found
}

/// The problems of a terminal dialect and a network dialect for the
/// switch, as `origin:line: fields.N: message` lines (the line of the
/// field's entry in `text`, the dialect file, when it has one).
pub fn problems(
    terminal: (&Dialect, &str, Option<&str>),
    network: (&Dialect, &str, Option<&str>),
) -> Vec<String> {
    let mut lines = Vec::new();
    for ((dialect, origin, text), is_terminal) in [(terminal, true), (network, false)] {
        for (n, message) in problems_of(dialect, is_terminal) {
            let at = text.map_or(String::new(), |t| format!(":{}", line_of_field(t, n)));
            lines.push(format!("{origin}{at}: fields.{n}: {message}"));
        }
    }
    lines
}

/// The line of field `n`'s entry in a dialect file, else of its `[fields]`
/// table, else 1.
fn line_of_field(text: &str, n: usize) -> usize {
    let entry = |line: &str| {
        let line = line.trim_start();
        line.strip_prefix(&n.to_string())
            .is_some_and(|rest| rest.trim_start().starts_with('='))
    };
    let table = |line: &str| line.trim() == "[fields]";
    let at = |f: &dyn Fn(&str) -> bool| text.lines().position(f).map(|i| i + 1);
    at(&entry).or_else(|| at(&table)).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_dialects_carry_what_the_switch_needs() {
        assert_eq!(problems_of(&Dialect::cup_pos(), true), []);
        assert_eq!(problems_of(&Dialect::iso87(), false), []);
    }

    #[test]
    fn a_mac_field_with_a_length_prefix_is_refused() {
        let text = iso8583::dialect::CUP_POS_TOML
            .replace("64 = { format = \"b8\",", "64 = { format = \"b..8\",");
        assert_ne!(text, iso8583::dialect::CUP_POS_TOML);
        let terminal = Dialect::from_toml(&text, "t.toml").unwrap();
        let line = text.lines().position(|l| l.starts_with("64 ")).unwrap() + 1;
        let found = problems(
            (&terminal, "t.toml", Some(&text)),
            (&Dialect::iso87(), "(iso87)", None),
        );
        assert_eq!(
            found,
            [format!(
                "t.toml:{line}: fields.64: the switch reads and writes the MAC (K3) here on the terminal side: it must be b8, fixed"
            )]
        );
    }

    #[test]
    fn a_field_left_out_or_too_small_is_named_with_its_line() {
        let text = iso8583::dialect::ISO87_TOML
            .lines()
            .filter(|l| !l.starts_with("70 "))
            .map(|l| {
                if l.starts_with("43 ") {
                    l.replace("ans40", "ans20")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let network = Dialect::from_toml(&text, "n.toml").unwrap();
        let line_43 = text.lines().position(|l| l.starts_with("43 ")).unwrap() + 1;
        let fields = text.lines().position(|l| l == "[fields]").unwrap() + 1;
        let found = problems(
            (&Dialect::cup_pos(), "(cup-pos)", None),
            (&network, "n.toml", Some(&text)),
        );
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(
            found[0].starts_with(&format!(
                "n.toml:{line_43}: fields.43: the switch writes the merchant's name and location (40 characters) here on the network side (text like"
            )),
            "{found:#?}"
        );
        assert!(
            found[1].starts_with(&format!(
                "n.toml:{fields}: fields.70: the switch reads and writes the network management code here on the network side (a number): "
            )),
            "{found:#?}"
        );
    }

    #[test]
    fn a_network_f55_smaller_than_the_terminals_is_refused() {
        let text = iso8583::dialect::ISO87_TOML.replace(
            r#"55 = { format = "b...255""#,
            r#"55 = { format = "b...64""#,
        );
        assert!(text.contains(r#""b...64""#));
        let network = Dialect::from_toml(&text, "n.toml").unwrap();
        let found = problems_of(&network, false);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].0, 55);
        assert!(found[0].1.contains("(255 bytes)"), "{found:#?}");
    }

    #[test]
    fn a_stan_or_amount_field_too_short_for_the_largest_is_refused() {
        let text = iso8583::dialect::CUP_POS_TOML
            .replace(r#"11 = { format = "n6""#, r#"11 = { format = "n4""#)
            .replace(r#"4  = { format = "n12""#, r#"4  = { format = "n10""#);
        let terminal = Dialect::from_toml(&text, "t.toml").unwrap();
        let found: Vec<usize> = problems_of(&terminal, true)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            found,
            [4, 11],
            "STAN 999999 and 12-digit amounts do not fit"
        );
    }

    #[test]
    fn a_field_of_another_kind_is_named() {
        let text = iso8583::dialect::CUP_POS_TOML
            .replace(r#"4  = { format = "n12""#, r#"4  = { format = "an12""#);
        let terminal = Dialect::from_toml(&text, "t.toml").unwrap();
        let found = problems(
            (&terminal, "t.toml", Some(&text)),
            (&Dialect::iso87(), "(iso87)", None),
        );
        let line = text.lines().position(|l| l.starts_with("4 ")).unwrap() + 1;
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].starts_with(&format!(
                "t.toml:{line}: fields.4: the switch reads and writes the amount in fen here on the terminal side (a number): "
            )),
            "{found:#?}"
        );
    }
}
