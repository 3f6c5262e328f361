//! The wire format against the outside world: golden vectors made by
//! pyiso8583 (an independent implementation) read and written byte for byte,
//! properties over random messages and random corruption, and the promise
//! that parsing allocates nothing.

use std::fs;
use std::path::{Path, PathBuf};

use bytes::BytesMut;
use iso8583::json::{from_json, to_json};
use iso8583::mac::{MacKey, cup_pos_mac};
use iso8583::{Dialect, FieldSpec, FieldType, Message, MessageWriter, Mti};
use proptest::prelude::*;

fn fixtures(dialect: &str) -> Vec<(String, Vec<u8>, serde_json::Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(dialect);
    let mut names: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "hex"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|hex_path| {
            let name = hex_path.file_stem().unwrap().to_string_lossy().to_string();
            let hex = fs::read_to_string(&hex_path).unwrap();
            let bytes = hex::decode(hex.trim()).unwrap();
            let json_text = fs::read_to_string(hex_path.with_extension("json")).unwrap();
            (name, bytes, serde_json::from_str(&json_text).unwrap())
        })
        .collect()
}

fn golden_both_ways(dialect: &Dialect, dir: &str, expected: usize) {
    let cases = fixtures(dir);
    assert!(
        cases.len() >= expected,
        "{dir}: only {} fixtures",
        cases.len()
    );
    for (name, wire, json) in cases {
        let declared = usize::from(u16::from_be_bytes([wire[0], wire[1]]));
        assert_eq!(declared, wire.len() - 2, "{name}: length prefix");
        let msg = Message::parse(dialect, &wire[2..])
            .unwrap_or_else(|e| panic!("{dir}/{name}: parse: {e}"));
        assert_eq!(to_json(&msg, true), json, "{dir}/{name}: parsed");
        let mut buf = BytesMut::new();
        from_json(dialect, &json, &mut buf).unwrap_or_else(|e| panic!("{dir}/{name}: build: {e}"));
        assert_eq!(
            hex::encode_upper(&buf),
            hex::encode_upper(&wire),
            "{dir}/{name}: built"
        );
    }
}

#[test]
fn every_terminal_message_matches_pyiso8583_both_ways() {
    golden_both_ways(&Dialect::cup_pos(), "cup-pos", 34);
}

#[test]
fn every_network_message_matches_pyiso8583_both_ways() {
    golden_both_ways(&Dialect::iso87(), "iso87", 26);
}

#[test]
fn terminal_macs_in_the_fixtures_cover_mti_to_field_63() {
    // generate.py MACs with the MAK A1B2C3D4E5F60718 (single DES).
    let key = MacKey::new(&hex::decode("A1B2C3D4E5F60718").unwrap()).unwrap();
    let cup = Dialect::cup_pos();
    let mut checked = 0;
    for (name, wire, _) in fixtures("cup-pos") {
        let msg = Message::parse(&cup, &wire[2..]).unwrap();
        if let Some(mac) = msg.binary(64) {
            assert_eq!(cup_pos_mac(&key, msg.mac_block()), mac, "{name}");
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} messages carry a MAC");
}

#[test]
fn masked_json_never_shows_card_data() {
    let cup = Dialect::cup_pos();
    for (name, wire, clear) in fixtures("cup-pos") {
        let msg = Message::parse(&cup, &wire[2..]).unwrap();
        let masked = to_json(&msg, false).to_string();
        for secret in ["2", "35", "36", "52"] {
            if let Some(v) = clear["fields"][secret].as_str() {
                assert!(!masked.contains(v), "{name}: field {secret} in clear");
            }
        }
        if clear["fields"]["2"].is_string() {
            assert!(masked.contains("******"), "{name}");
        }
    }
}

/// The standard purchase of the benchmarks (fields 2,3,4,11,14,22,25,35,41,
/// 42,49,52,53,60,64 on cup-pos).
fn standard_purchase(buf: &mut BytesMut, cup: &Dialect) {
    let mut w = MessageWriter::new(
        cup,
        buf,
        Mti::FINANCIAL,
        &[0x60, 0x00, 0x03, 0x00, 0x00],
        &[0x60, 0x31, 0x00, 0x00, 0x00, 0x00],
    )
    .unwrap();
    w.digits(2, "6222020000000000001").unwrap();
    w.digits(3, "000000").unwrap();
    w.number(4, 1000).unwrap();
    w.number(11, 17).unwrap();
    w.digits(14, "3012").unwrap();
    w.digits(22, "051").unwrap();
    w.digits(25, "00").unwrap();
    w.digits(35, "6222020000000000001D30121011234").unwrap();
    w.text(41, "T0000001").unwrap();
    w.text(42, "898310048160001").unwrap();
    w.text(49, "156").unwrap();
    w.binary(52, &[0x11; 8]).unwrap();
    w.digits(53, "2600000000000000").unwrap();
    w.digits(60, "22000001000").unwrap();
    w.binary(64, b"ABCD1234").unwrap();
    w.finish().unwrap();
}

#[test]
fn parsing_allocates_nothing_and_a_reply_into_a_reused_buffer_neither() {
    let cup = Dialect::cup_pos();
    let mut request = BytesMut::new();
    standard_purchase(&mut request, &cup);
    let frame = &request[2..];
    let mut out = BytesMut::with_capacity(512);
    let parse = allocation_counter::measure(|| {
        let msg = Message::parse(&cup, frame).unwrap();
        assert_eq!(msg.digits(4).unwrap().to_u64(), Some(1000));
        assert_eq!(msg.text(41), Some("T0000001"));
        std::hint::black_box(msg.digits(2).unwrap().to_pan());
    });
    assert_eq!(parse.count_total, 0, "parse allocated");
    let reply = allocation_counter::measure(|| {
        out.clear();
        let msg = Message::parse(&cup, frame).unwrap();
        let mut w = MessageWriter::reply(&cup, &mut out, &msg);
        for n in [3, 4, 11] {
            w.copy(n, &msg).unwrap();
        }
        w.text(37, "000000000001").unwrap();
        w.text(38, "123456").unwrap();
        w.text(39, "00").unwrap();
        for n in [41, 42, 60] {
            w.copy(n, &msg).unwrap();
        }
        w.finish().unwrap();
    });
    assert_eq!(reply.count_total, 0, "request to reply allocated");
    let parsed = Message::parse(&cup, &out[2..]).unwrap();
    assert_eq!(parsed.mti(), Mti::FINANCIAL.reply());
    assert_eq!(parsed.text(38), Some("123456"));
}

/// A random valid value for a field, as the JSON form has it.
fn value_for(spec: &FieldSpec) -> BoxedStrategy<String> {
    let max = spec.max as usize;
    let fixed = spec.length == iso8583::dialect::LengthKind::Fixed;
    let bytes_counted_bcd = spec.counts == iso8583::dialect::Counts::Bytes
        && spec.digits == iso8583::dialect::DigitEncoding::Bcd;
    let len = if fixed { max..=max } else { 0..=max };
    let chars: &'static [u8] = match spec.ty {
        FieldType::Numeric => b"0123456789",
        FieldType::Track => b"0123456789D",
        FieldType::Alphanumeric => b"ABCXYZabcxyz0189 ",
        FieldType::Text => b" !#-./09:=?@AZaz~",
        FieldType::Binary => b"",
    };
    let track_sep = if spec.digits == iso8583::dialect::DigitEncoding::Ascii {
        b'='
    } else {
        b'D'
    };
    if spec.ty == FieldType::Binary {
        return proptest::collection::vec(any::<u8>(), len)
            .prop_map(hex::encode_upper)
            .boxed();
    }
    proptest::collection::vec(proptest::sample::select(chars), len)
        .prop_map(move |mut v| {
            if bytes_counted_bcd && v.len() % 2 == 1 {
                v.pop();
            }
            for c in &mut v {
                if *c == b'D' {
                    *c = track_sep;
                }
            }
            String::from_utf8(v).unwrap()
        })
        .boxed()
}

/// A random valid message of `dialect` as JSON.
fn message(dialect: &'static Dialect) -> impl Strategy<Value = serde_json::Value> {
    let specs: Vec<&FieldSpec> = dialect.fields().collect();
    let fields = specs
        .into_iter()
        .map(|spec| {
            let n = spec.number;
            proptest::option::of(value_for(spec)).prop_map(move |v| (n, v))
        })
        .collect::<Vec<_>>();
    let tpdu = proptest::collection::vec(any::<u8>(), dialect.tpdu_len());
    let header = proptest::collection::vec(any::<u8>(), dialect.header_len());
    (fields, tpdu, header, 0u16..=9999).prop_map(move |(fields, tpdu, header, mti)| {
        let mut top = serde_json::Map::new();
        if dialect.tpdu_len() > 0 {
            top.insert("tpdu".into(), hex::encode_upper(tpdu).into());
            top.insert("header".into(), hex::encode_upper(header).into());
        }
        top.insert("mti".into(), format!("{mti:04}").into());
        let mut map = serde_json::Map::new();
        for (n, v) in fields {
            if let Some(v) = v {
                map.insert(n.to_string(), v.into());
            }
        }
        top.insert("fields".into(), map.into());
        serde_json::Value::Object(top)
    })
}

fn dialects() -> &'static [Dialect; 2] {
    static D: std::sync::OnceLock<[Dialect; 2]> = std::sync::OnceLock::new();
    D.get_or_init(|| [Dialect::cup_pos(), Dialect::iso87()])
}

/// Builds, parses and compares; returns the wire frame.
fn round_trip(dialect: &Dialect, json: &serde_json::Value) -> Vec<u8> {
    let mut buf = BytesMut::new();
    from_json(dialect, json, &mut buf).expect("a valid message builds");
    let msg = Message::parse(dialect, &buf[2..]).expect("what we build parses");
    assert_eq!(&to_json(&msg, true), json);
    buf.to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn cup_pos_build_then_parse_is_identity(json in message(&dialects()[0])) {
        round_trip(&dialects()[0], &json);
    }

    #[test]
    fn iso87_build_then_parse_is_identity(json in message(&dialects()[1])) {
        round_trip(&dialects()[1], &json);
    }

    #[test]
    fn corruption_gives_an_error_or_another_valid_message(
        which in 0usize..2,
        json in prop_oneof![message(&dialects()[0]), message(&dialects()[1])],
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
    ) {
        let dialect = &dialects()[which];
        let mut buf = BytesMut::new();
        // A message of the other dialect is itself a corruption.
        if from_json(dialect, &json, &mut buf).is_err() {
            buf.clear();
            from_json(&dialects()[1 - which], &json, &mut buf).unwrap();
        }
        let mut frame = buf[2..].to_vec();
        for (at, byte, op) in edits {
            if frame.is_empty() { break; }
            let i = at.index(frame.len());
            match op {
                0 => frame[i] = byte,
                1 => frame[i] ^= 1 << (byte % 8),
                2 => frame.truncate(i),
                _ => frame.insert(i, byte),
            }
        }
        if let Ok(msg) = Message::parse(dialect, &frame) {
            // Whatever parses is a valid message: it survives a round trip.
            let json = to_json(&msg, true);
            round_trip(dialect, &json);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        for d in dialects() {
            let _ = Message::parse(d, &bytes);
        }
    }
}
