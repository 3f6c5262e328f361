//! What every fuzz target checks, for one dialect and one input.
//!
//! The input is taken two ways: as a byte stream for the frame decoder (the
//! 2-byte length prefix in front of each frame, as a terminal or the issuer
//! link sends it), and as one bare frame for [`Message::parse`]. Every frame
//! the decoder yields is parsed too. Nothing may panic; beyond that, each
//! message that parses must hold the invariants in [`check_message`].

use std::sync::LazyLock;

use bytes::BytesMut;
use iso8583::json::{from_json, to_json};
use iso8583::mac::{MacKey, cup_pos_mac, retail_mac};
use iso8583::{Dialect, Frame, FrameCodec, Message, MessageWriter, Sensitivity, Value};
use tokio_util::codec::Decoder;

/// The largest frame the decoder accepts, as the switch configures it.
pub const MAX_FRAME: usize = 2048;

/// Runs one fuzz input against `dialect`.
pub fn check(dialect: &Dialect, data: &[u8]) {
    // The bare frame.
    parse_and_check(dialect, data);

    // The stream: whole, then fed a byte at a time; both must agree.
    let whole = decode_stream(dialect, data, data.len().max(1));
    let trickled = decode_stream(dialect, data, 1);
    assert_eq!(
        whole, trickled,
        "the decoder yields other frames when the bytes come one at a time"
    );
    for frame in whole.frames.iter().flatten() {
        parse_and_check(dialect, frame);
    }
}

/// What the frame decoder made of a stream.
#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    /// Each item: `None` for a keep-alive, the frame otherwise.
    frames: Vec<Option<bytes::Bytes>>,
    /// Whether decoding stopped at an error.
    failed: bool,
}

/// Feeds `data` to a fresh [`FrameCodec`] `chunk` bytes at a time, decoding
/// after each chunk until it needs more bytes or fails.
fn decode_stream(dialect: &Dialect, data: &[u8], chunk: usize) -> Decoded {
    let mut codec = FrameCodec::new(dialect, MAX_FRAME);
    let mut buf = BytesMut::new();
    let mut out = Decoded {
        frames: Vec::new(),
        failed: false,
    };
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match codec.decode(&mut buf) {
                Ok(None) => {
                    assert_eq!(
                        buf.len(),
                        before,
                        "the decoder consumed bytes but gave nothing"
                    );
                    break;
                }
                Ok(Some(Frame::KeepAlive)) => {
                    assert_eq!(before - buf.len(), 2, "a keep-alive is two bytes");
                    out.frames.push(None);
                }
                Ok(Some(Frame::Message(frame))) => {
                    assert_eq!(
                        before - buf.len(),
                        2 + frame.len(),
                        "frame and prefix consumed"
                    );
                    assert!(
                        (dialect.min_frame_len()..=MAX_FRAME).contains(&frame.len()),
                        "frame of {} bytes let through",
                        frame.len()
                    );
                    out.frames.push(Some(frame));
                }
                Err(e) => {
                    let _ = e.to_string();
                    out.failed = true;
                    return out;
                }
            }
        }
    }
    out
}

fn parse_and_check(dialect: &Dialect, frame: &[u8]) {
    match Message::parse(dialect, frame) {
        Ok(msg) => check_message(dialect, frame, &msg),
        Err(e) => {
            // The error names a place inside the frame (or just past its end).
            assert!(e.offset <= frame.len(), "error offset past the end: {e:?}");
            let _ = e.to_string();
        }
    }
}

/// The invariants of a message that parsed from `frame`.
fn check_message(dialect: &Dialect, frame: &[u8], msg: &Message<'_>) {
    // Every view reads without panicking, and masks consistently.
    let _ = format!("{msg:?}");
    let _ = msg.mti().to_string();
    assert_eq!(msg.frame(), frame);
    assert_eq!(msg.tpdu().len(), dialect.tpdu_len());
    assert_eq!(msg.header().len(), dialect.header_len());
    for (n, value) in msg.fields() {
        assert!(msg.has(n));
        let wire = msg.wire(n).expect("a present field has wire bytes");
        assert!(!wire.is_empty() || dialect.field(n).is_some_and(|s| s.max == 0));
        check_value(n, &value);
    }
    let masked = to_json(msg, false);
    let _ = masked.to_string();

    // The MAC block is the frame from the MTI on, F64 and after excluded.
    let block = msg.mac_block();
    let body = dialect.tpdu_len() + dialect.header_len();
    assert!(
        frame[body..].starts_with(block),
        "mac_block is not a slice from the MTI on"
    );
    static KEY: LazyLock<MacKey> = LazyLock::new(|| MacKey::new(&[0x11; 8]).expect("8 bytes"));
    std::hint::black_box(cup_pos_mac(&KEY, block));
    std::hint::black_box(retail_mac(&[0x22; 16], block));

    // A valid message round-trips through its JSON form.
    let json = to_json(msg, true);
    let mut built = BytesMut::new();
    let len = from_json(dialect, &json, &mut built)
        .unwrap_or_else(|e| panic!("a parsed message does not build from its JSON {json}: {e}"));
    assert_eq!(len, built.len(), "from_json's length");
    assert_eq!(
        usize::from(u16::from_be_bytes([built[0], built[1]])),
        built.len() - 2,
        "the built length prefix"
    );
    // Same length, but for a secondary bitmap that announces no field: the
    // parser accepts it, the writer leaves it out (the JSON cannot tell).
    let empty_secondary = msg.bitmap().has(1) && !msg.bitmap().fields().any(|n| n > 64);
    assert_eq!(
        built.len() - 2 + if empty_secondary { 8 } else { 0 },
        frame.len(),
        "the rebuilt frame has another length than the parsed one"
    );
    let again = Message::parse(dialect, &built[2..])
        .unwrap_or_else(|e| panic!("the rebuilt frame does not parse: {e}; JSON {json}"));
    assert_eq!(
        to_json(&again, true),
        json,
        "the rebuilt frame gives other JSON"
    );

    // A reply that copies every field of the request parses, with the same fields.
    // (An MTI of 999x has no four-digit reply MTI; see the README.)
    if msg.mti().value() < 9990 {
        let mut out = BytesMut::new();
        let mut w = MessageWriter::reply(dialect, &mut out, msg);
        for n in msg.bitmap().fields() {
            let copied = w
                .copy(n, msg)
                .unwrap_or_else(|e| panic!("copying field {n} into the reply: {e}"));
            assert!(copied, "field {n} present but not copied");
        }
        w.finish().expect("a reply of copied fields finishes");
        let reply = Message::parse(dialect, &out[2..])
            .unwrap_or_else(|e| panic!("the reply of copied fields does not parse: {e}"));
        assert_eq!(reply.mti(), msg.mti().reply());
        for n in msg.bitmap().fields() {
            assert_eq!(
                reply.wire(n),
                msg.wire(n),
                "field {n} copied into the reply"
            );
        }
    }
}

fn check_value(n: usize, value: &Value<'_>) {
    let shown = value.to_string();
    let clear = value.to_clear_string();
    // Masking keeps the length; ordinary data shows as it is, secrets not at all.
    assert_eq!(
        shown.len(),
        clear.len(),
        "field {n}: masked and clear lengths"
    );
    match value.sensitivity() {
        Sensitivity::None => assert_eq!(shown, clear, "field {n}"),
        Sensitivity::Secret => assert!(shown.bytes().all(|c| c == b'*'), "field {n}: secret shown"),
        Sensitivity::Pan | Sensitivity::Track => {}
    }
    let _ = format!("{value:?}");
    match value {
        Value::Digits(d) => {
            assert_eq!(d.len(), clear.len(), "field {n}: digit count");
            assert!(d.eq_str(&clear));
            assert_eq!(d.iter().count(), d.len());
            assert!(d.get(d.len()).is_none());
            let whole = d.slice(0, d.len()).expect("the whole range");
            assert!(whole.eq_str(&clear), "field {n}: slice of everything");
            let mid = d.len() / 2;
            let (a, b) = (
                d.slice(0, mid).expect("first half"),
                d.slice(mid, d.len()).expect("second half"),
            );
            let mut halves = String::new();
            a.write_clear(&mut halves);
            b.write_clear(&mut halves);
            assert_eq!(halves, clear, "field {n}: two halves");
            assert!(d.slice(0, d.len() + 1).is_none());
            let _ = d.to_u64();
            let _ = d.to_pan().map(|p| p.to_string());
            let _ = d.to_track().map(|t| t.to_string());
        }
        Value::Text(t) => assert_eq!(t.as_str(), clear),
        Value::Binary(b) => assert_eq!(b.as_bytes().len() * 2, clear.len()),
    }
}
