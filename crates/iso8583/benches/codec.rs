//! The codec's hot paths, and the same work through two other Rust ISO 8583
//! crates.
//!
//! `cargo bench -p iso8583` (add `-- --warm-up-time 1 --measurement-time 3`
//! for a quicker run, or a filter such as `iso87/parse`).
//!
//! - `cup-pos/{parse,build,request-reply}`: the terminal side's standard
//!   purchase (fields 2, 3, 4, 11, 14, 22, 25, 35, 41, 42, 49, 52, 53, 60, 64,
//!   the message of `standard_purchase` in tests/wire.rs).
//! - `iso87/{parse,build,request-reply}/{switchyard,iso8583_rs,iso_8583_rs}`:
//!   the same purchase on the network side (fields 2, 3, 4, 7, 11, 14, 22,
//!   25, 35, 37, 41, 42, 49, 52; iso87 defines no 53, 60 or 64), with this
//!   crate and with the peers iso8583_rs 0.1 and iso_8583_rs 0.2.
//!
//! What each benchmark does:
//! - parse: parse the frame and read F4 as a number and F41 as text.
//! - build: write the whole message into a reused buffer (cleared each time).
//! - request-reply: parse the 0200 and build the 0210 as a switch or issuer
//!   would: echo F3, F4, (F7,) F11, F41, F42 (and F60 on cup-pos), add F37
//!   (echoed on iso87, where the request carries it), F38 and F39. The reply
//!   does not carry the PAN.
//!
//! Before anything is timed, `check_peers` asserts that each peer builds the
//! same bytes as we do (iso_8583_rs: the same but for its hex bitmap, see
//! there) and reads the same values back. Everything a peer needs that is not
//! per-message work (its spec, its message definition) is made once, outside
//! the timed loops.

use std::collections::HashMap;
use std::hint::black_box;
use std::path::PathBuf;
use std::process::Command;

use bytes::BytesMut;
use criterion::{Criterion, criterion_group};
use iso8583::dialect::LengthKind;
use iso8583::{Dialect, FieldType, Message, MessageWriter, Mti};

use iso_8583_rs::specfile::{FieldDescription, Spec as YamlSpec};
use iso_8583_rs::{Builder, CompiledSpec};
use iso8583_rs::iso8583::iso_spec::{IsoMsg, MessageSegment, Spec as PeerSpec, new_msg};

/// The environment variable naming iso8583_rs's spec file.
const SPEC_FILE: &str = "SPEC_FILE";

/// The iso8583_rs spec shipped beside this file: the iso87 dialect.
fn iso8583_rs_spec_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/iso8583_rs-iso87.yaml")
}

// ---------------------------------------------------------------------------
// The purchase: every library is given the same values.
// ---------------------------------------------------------------------------

const TPDU: [u8; 5] = [0x60, 0x00, 0x03, 0x00, 0x00];
const HEADER: [u8; 6] = [0x60, 0x31, 0x00, 0x00, 0x00, 0x00];

/// The field values of the purchase, passed through `black_box` so that no
/// check or conversion is folded away at compile time.
#[derive(Debug, Clone, Copy)]
struct Purchase {
    pan: &'static str,
    processing_code: &'static str,
    amount: u64,
    amount_n12: &'static str,
    transmission: &'static str,
    stan: u64,
    stan_n6: &'static str,
    expiry: &'static str,
    entry_mode: &'static str,
    condition: &'static str,
    /// Track 2 as a terminal sends it (BCD, separator nibble D).
    track2_bcd: &'static str,
    /// Track 2 as the network carries it (ASCII, separator `=`).
    track2_ascii: &'static str,
    rrn: &'static str,
    terminal: &'static str,
    merchant: &'static str,
    currency: &'static str,
    pin_block: [u8; 8],
    /// The PIN block as iso8583_rs takes binary fields: hex.
    pin_block_hex: &'static str,
    security: &'static str,
    f60: &'static str,
    mac: [u8; 8],
}

const PURCHASE: Purchase = Purchase {
    pan: "6222020000000000001",
    processing_code: "000000",
    amount: 1000,
    amount_n12: "000000001000",
    transmission: "1123011530",
    stan: 17,
    stan_n6: "000017",
    expiry: "3012",
    entry_mode: "051",
    condition: "00",
    track2_bcd: "6222020000000000001D30121011234",
    track2_ascii: "6222020000000000001=30121011234",
    rrn: "251123000004",
    terminal: "T0000001",
    merchant: "898310048160001",
    currency: "156",
    pin_block: [0x11; 8],
    pin_block_hex: "1111111111111111",
    security: "2600000000000000",
    f60: "22000001000",
    mac: *b"ABCD1234",
};

/// The values the reply adds.
const RRN: &str = "000000000001";
const AUTH_CODE: &str = "123456";
const APPROVED: &str = "00";

// ---------------------------------------------------------------------------
// Switchyard (this crate)
// ---------------------------------------------------------------------------

/// Writes the cup-pos purchase (as `standard_purchase` in tests/wire.rs).
fn build_cup(cup: &Dialect, buf: &mut BytesMut, p: &Purchase) {
    let mut w = MessageWriter::new(cup, buf, Mti::FINANCIAL, &TPDU, &HEADER).unwrap();
    w.digits(2, p.pan).unwrap();
    w.digits(3, p.processing_code).unwrap();
    w.number(4, p.amount).unwrap();
    w.number(11, p.stan).unwrap();
    w.digits(14, p.expiry).unwrap();
    w.digits(22, p.entry_mode).unwrap();
    w.digits(25, p.condition).unwrap();
    w.digits(35, p.track2_bcd).unwrap();
    w.text(41, p.terminal).unwrap();
    w.text(42, p.merchant).unwrap();
    w.text(49, p.currency).unwrap();
    w.binary(52, &p.pin_block).unwrap();
    w.digits(53, p.security).unwrap();
    w.digits(60, p.f60).unwrap();
    w.binary(64, &p.mac).unwrap();
    w.finish().unwrap();
}

/// Writes the iso87 purchase. The peers take every value as text, so this
/// side is given the same text (`digits`, not `number`, for F4 and F11).
fn build_iso(iso: &Dialect, buf: &mut BytesMut, p: &Purchase) {
    let mut w = MessageWriter::new(iso, buf, Mti::FINANCIAL, &[], &[]).unwrap();
    w.digits(2, p.pan).unwrap();
    w.digits(3, p.processing_code).unwrap();
    w.digits(4, p.amount_n12).unwrap();
    w.digits(7, p.transmission).unwrap();
    w.digits(11, p.stan_n6).unwrap();
    w.digits(14, p.expiry).unwrap();
    w.digits(22, p.entry_mode).unwrap();
    w.digits(25, p.condition).unwrap();
    w.digits(35, p.track2_ascii).unwrap();
    w.text(37, p.rrn).unwrap();
    w.text(41, p.terminal).unwrap();
    w.text(42, p.merchant).unwrap();
    w.digits(49, p.currency).unwrap();
    w.binary(52, &p.pin_block).unwrap();
    w.finish().unwrap();
}

/// What the parse benchmarks read: F4 as a number and F41 as text.
fn read_ours<'a>(msg: &Message<'a>) -> (u64, &'a str) {
    (
        msg.digits(4).unwrap().to_u64().unwrap(),
        msg.text(41).unwrap(),
    )
}

/// The 0210 to a cup-pos 0200, into `out` (not cleared here).
fn reply_cup(cup: &Dialect, frame: &[u8], out: &mut BytesMut) {
    let req = Message::parse(cup, frame).unwrap();
    let mut w = MessageWriter::reply(cup, out, &req);
    for n in [3, 4, 11] {
        w.copy(n, &req).unwrap();
    }
    w.text(37, RRN).unwrap();
    w.text(38, AUTH_CODE).unwrap();
    w.text(39, APPROVED).unwrap();
    for n in [41, 42, 60] {
        w.copy(n, &req).unwrap();
    }
    w.finish().unwrap();
}

/// The 0210 to an iso87 0200, into `out` (not cleared here).
fn reply_iso(iso: &Dialect, frame: &[u8], out: &mut BytesMut) {
    let req = Message::parse(iso, frame).unwrap();
    let mut w = MessageWriter::reply(iso, out, &req);
    for n in [3, 4, 7, 11, 37] {
        w.copy(n, &req).unwrap();
    }
    w.text(38, AUTH_CODE).unwrap();
    w.text(39, APPROVED).unwrap();
    for n in [41, 42] {
        w.copy(n, &req).unwrap();
    }
    w.finish().unwrap();
}

// ---------------------------------------------------------------------------
// iso8583_rs 0.1: a YAML spec named by SPEC_FILE, a HashMap of String name to
// Vec<u8> per message, values in and out as Strings.
// ---------------------------------------------------------------------------

/// iso8583_rs's spec and its one message definition (0200 and 0210 alike),
/// looked up once.
struct Peer1 {
    spec: &'static PeerSpec,
    segment: &'static MessageSegment,
}

impl Peer1 {
    fn new() -> Peer1 {
        // The first call reads the file named by SPEC_FILE (set by `main`).
        let spec = iso8583_rs::iso8583::iso_spec::spec("switchyard-iso87");
        assert_eq!(spec.name(), "switchyard-iso87");
        let segment = spec.get_message_from_header("0200").unwrap();
        Peer1 { spec, segment }
    }

    fn build(&self, p: &Purchase) -> Vec<u8> {
        let mut m = new_msg(self.spec, self.segment);
        m.set("message_type", "0200").unwrap();
        m.set_on(2, p.pan).unwrap();
        m.set_on(3, p.processing_code).unwrap();
        m.set_on(4, p.amount_n12).unwrap();
        m.set_on(7, p.transmission).unwrap();
        m.set_on(11, p.stan_n6).unwrap();
        m.set_on(14, p.expiry).unwrap();
        m.set_on(22, p.entry_mode).unwrap();
        m.set_on(25, p.condition).unwrap();
        m.set_on(35, p.track2_ascii).unwrap();
        m.set_on(37, p.rrn).unwrap();
        m.set_on(41, p.terminal).unwrap();
        m.set_on(42, p.merchant).unwrap();
        m.set_on(49, p.currency).unwrap();
        m.set_on(52, p.pin_block_hex).unwrap();
        m.assemble().unwrap()
    }

    /// `parse` takes `&mut Vec<u8>` (it does not change it).
    fn parse(&self, frame: &mut Vec<u8>) -> IsoMsg {
        self.spec.parse(frame).unwrap()
    }

    fn read(msg: &IsoMsg) -> (u64, String) {
        (
            msg.bmp_child_value(4).unwrap().parse().unwrap(),
            msg.bmp_child_value(41).unwrap(),
        )
    }

    fn reply(&self, frame: &mut Vec<u8>) -> Vec<u8> {
        let req = self.parse(frame);
        let mut m = new_msg(self.spec, self.segment);
        m.set("message_type", "0210").unwrap();
        m.echo_from(&req, &[3, 4, 7, 11, 37]).unwrap();
        m.set_on(38, AUTH_CODE).unwrap();
        m.set_on(39, APPROVED).unwrap();
        m.echo_from(&req, &[41, 42]).unwrap();
        m.assemble().unwrap()
    }
}

// ---------------------------------------------------------------------------
// iso_8583_rs 0.2: a compiled field table, a zero-copy parser and a builder
// that borrows its values. ASCII only: its bitmap is 16 hex characters, where
// iso87 (like ISO 8583:1987 generally) sends 8 binary bytes, so it cannot
// produce or read our frames byte for byte; see `check_peers`.
// ---------------------------------------------------------------------------

/// The iso87 dialect as an iso_8583_rs field table, made from the same TOML
/// as ours. iso_8583_rs checks the characters of n, an and ans fields and
/// leaves z and b unchecked (it has no such content types).
fn peer2_spec(iso: &Dialect) -> CompiledSpec {
    let fields = iso
        .fields()
        .map(|f| {
            let content = match f.ty {
                FieldType::Numeric => "n",
                FieldType::Track => "z",
                FieldType::Alphanumeric => "an",
                FieldType::Text => "ans",
                FieldType::Binary => "b",
            };
            let len_type = match f.length {
                LengthKind::Fixed => "fixed",
                LengthKind::LlVar => "llvar",
                LengthKind::LllVar => "lllvar",
            };
            let description = FieldDescription {
                content_type: content.into(),
                max_len: usize::from(f.max),
                min_len: 0,
                len_type: len_type.into(),
                label: f.name.clone(),
            };
            (i64::from(f.number), description)
        })
        .collect::<HashMap<_, _>>();
    CompiledSpec::compile(&YamlSpec { fields }).unwrap()
}

fn peer2_build<'a>(spec: &'a CompiledSpec, p: &'a Purchase) -> Builder<'a> {
    let mut b = Builder::new(spec, b"0200").unwrap();
    b.set(2, p.pan.as_bytes()).unwrap();
    b.set(3, p.processing_code.as_bytes()).unwrap();
    b.set(4, p.amount_n12.as_bytes()).unwrap();
    b.set(7, p.transmission.as_bytes()).unwrap();
    b.set(11, p.stan_n6.as_bytes()).unwrap();
    b.set(14, p.expiry.as_bytes()).unwrap();
    b.set(22, p.entry_mode.as_bytes()).unwrap();
    b.set(25, p.condition.as_bytes()).unwrap();
    b.set(35, p.track2_ascii.as_bytes()).unwrap();
    b.set(37, p.rrn.as_bytes()).unwrap();
    b.set(41, p.terminal.as_bytes()).unwrap();
    b.set(42, p.merchant.as_bytes()).unwrap();
    b.set(49, p.currency.as_bytes()).unwrap();
    b.set(52, &p.pin_block).unwrap();
    b
}

fn peer2_read<'a>(msg: &iso_8583_rs::Message<'a>) -> (u64, &'a str) {
    (msg.get_u64(4).unwrap(), msg.get_str(41).unwrap())
}

/// The 0210, into `out` (replaced, as its `pack_into` does).
fn peer2_reply(spec: &CompiledSpec, frame: &[u8], out: &mut Vec<u8>) {
    let req = iso_8583_rs::Message::parse(spec, frame).unwrap();
    let mut mti = req.mti;
    mti[2] += 1;
    let mut b = Builder::new(spec, &mti).unwrap();
    for n in [3, 4, 7, 11, 37] {
        b.set(n, req.get(n).unwrap()).unwrap();
    }
    b.set(38, AUTH_CODE.as_bytes()).unwrap();
    b.set(39, APPROVED.as_bytes()).unwrap();
    for n in [41, 42] {
        b.set(n, req.get(n).unwrap()).unwrap();
    }
    b.pack_into(out);
}

/// Our iso87 frame as iso_8583_rs writes it: the same bytes, but the primary
/// bitmap (bytes 4..12, after the ASCII MTI) as 16 uppercase hex characters.
fn with_hex_bitmap(frame: &[u8]) -> Vec<u8> {
    assert_eq!(frame[4] & 0x80, 0, "no secondary bitmap in these messages");
    let mut out = frame[..4].to_vec();
    out.extend(hex::encode_upper(&frame[4..12]).bytes());
    out.extend(&frame[12..]);
    out
}

// ---------------------------------------------------------------------------
// Equivalence, once, before timing.
// ---------------------------------------------------------------------------

fn check_peers(cup: &Dialect, iso: &Dialect, peer1: &Peer1, peer2: &CompiledSpec) {
    let p = PURCHASE;

    // cup-pos: what we build is the purchase, and the reply what it should be.
    let mut cup_req = BytesMut::new();
    build_cup(cup, &mut cup_req, &p);
    let req = Message::parse(cup, &cup_req[2..]).unwrap();
    assert_eq!(read_ours(&req), (p.amount, p.terminal));
    assert_eq!(
        req.bitmap().fields().collect::<Vec<_>>(),
        [2, 3, 4, 11, 14, 22, 25, 35, 41, 42, 49, 52, 53, 60, 64]
    );
    let mut cup_rep = BytesMut::new();
    reply_cup(cup, &cup_req[2..], &mut cup_rep);
    let rep = Message::parse(cup, &cup_rep[2..]).unwrap();
    assert_eq!(rep.mti(), Mti::FINANCIAL.reply());
    assert_eq!(
        rep.bitmap().fields().collect::<Vec<_>>(),
        [3, 4, 11, 37, 38, 39, 41, 42, 60]
    );
    assert_eq!(rep.text(38), Some(AUTH_CODE));
    assert_eq!(rep.wire(60), req.wire(60));

    // iso87, ours.
    let mut ours = BytesMut::new();
    build_iso(iso, &mut ours, &p);
    let ours = &ours[2..];
    let req = Message::parse(iso, ours).unwrap();
    assert_eq!(read_ours(&req), (p.amount, p.terminal));
    assert_eq!(
        req.bitmap().fields().collect::<Vec<_>>(),
        [2, 3, 4, 7, 11, 14, 22, 25, 35, 37, 41, 42, 49, 52]
    );
    let mut our_reply = BytesMut::new();
    reply_iso(iso, ours, &mut our_reply);
    let our_reply = &our_reply[2..];
    let rep = Message::parse(iso, our_reply).unwrap();
    assert_eq!(
        rep.bitmap().fields().collect::<Vec<_>>(),
        [3, 4, 7, 11, 37, 38, 39, 41, 42]
    );

    // iso8583_rs: byte for byte.
    let built = peer1.build(&p);
    assert_eq!(
        hex::encode_upper(&built),
        hex::encode_upper(ours),
        "iso8583_rs build"
    );
    let mut frame = ours.to_vec();
    let parsed = peer1.parse(&mut frame);
    assert_eq!(Peer1::read(&parsed), (p.amount, p.terminal.to_string()));
    assert_eq!(parsed.bmp_child_value(52).unwrap(), p.pin_block_hex);
    assert_eq!(parsed.bmp_child_value(35).unwrap(), p.track2_ascii);
    let reply = peer1.reply(&mut frame);
    assert_eq!(
        hex::encode_upper(&reply),
        hex::encode_upper(our_reply),
        "iso8583_rs reply"
    );

    // iso_8583_rs: byte for byte but for the bitmap, which it writes (and
    // reads) as hex text.
    let peer_frame = with_hex_bitmap(ours);
    let mut built = Vec::new();
    peer2_build(peer2, &p).pack_into(&mut built);
    assert_eq!(
        String::from_utf8_lossy(&built[..20]),
        String::from_utf8_lossy(&peer_frame[..20])
    );
    assert_eq!(built, peer_frame, "iso_8583_rs build");
    let parsed = iso_8583_rs::Message::parse(peer2, &peer_frame).unwrap();
    assert_eq!(peer2_read(&parsed), (p.amount, p.terminal));
    for (n, value) in parsed.fields() {
        assert_eq!(
            Some(value),
            req.wire(n).map(|w| {
                // Our wire form includes the length prefix; its value does not.
                let prefix = w.len() - value.len();
                &w[prefix..]
            }),
            "iso_8583_rs F{n}"
        );
    }
    let mut reply = Vec::new();
    peer2_reply(peer2, &peer_frame, &mut reply);
    assert_eq!(reply, with_hex_bitmap(our_reply), "iso_8583_rs reply");
}

// ---------------------------------------------------------------------------
// Benchmarks
// ---------------------------------------------------------------------------

fn cup_pos(c: &mut Criterion) {
    let cup = Dialect::cup_pos();
    let mut request = BytesMut::new();
    build_cup(&cup, &mut request, &PURCHASE);
    let frame = &request[2..];
    let mut out = BytesMut::with_capacity(512);

    let mut g = c.benchmark_group("cup-pos");
    g.bench_function("parse", |b| {
        b.iter(|| {
            let msg = Message::parse(&cup, black_box(frame)).unwrap();
            black_box(read_ours(&msg));
        })
    });
    g.bench_function("build", |b| {
        b.iter(|| {
            out.clear();
            build_cup(&cup, &mut out, black_box(&PURCHASE));
            black_box(&out[..]);
        })
    });
    g.bench_function("request-reply", |b| {
        b.iter(|| {
            out.clear();
            reply_cup(&cup, black_box(frame), &mut out);
            black_box(&out[..]);
        })
    });
    g.finish();
}

fn iso87(c: &mut Criterion) {
    let cup = Dialect::cup_pos();
    let iso = Dialect::iso87();
    let peer1 = Peer1::new();
    let peer2 = peer2_spec(&iso);
    check_peers(&cup, &iso, &peer1, &peer2);

    let mut request = BytesMut::new();
    build_iso(&iso, &mut request, &PURCHASE);
    let frame = &request[2..];
    let mut frame_vec = frame.to_vec();
    let hex_frame = with_hex_bitmap(frame);
    let mut out = BytesMut::with_capacity(512);
    let mut out_vec = Vec::with_capacity(512);

    let mut g = c.benchmark_group("iso87/parse");
    g.bench_function("switchyard", |b| {
        b.iter(|| {
            let msg = Message::parse(&iso, black_box(frame)).unwrap();
            black_box(read_ours(&msg));
        })
    });
    g.bench_function("iso8583_rs", |b| {
        b.iter(|| {
            let msg = peer1.parse(black_box(&mut frame_vec));
            black_box(Peer1::read(&msg));
        })
    });
    g.bench_function("iso_8583_rs", |b| {
        b.iter(|| {
            let msg = iso_8583_rs::Message::parse(&peer2, black_box(&hex_frame)).unwrap();
            black_box(peer2_read(&msg));
        })
    });
    g.finish();

    let mut g = c.benchmark_group("iso87/build");
    g.bench_function("switchyard", |b| {
        b.iter(|| {
            out.clear();
            build_iso(&iso, &mut out, black_box(&PURCHASE));
            black_box(&out[..]);
        })
    });
    g.bench_function("iso8583_rs", |b| {
        b.iter(|| black_box(peer1.build(black_box(&PURCHASE))))
    });
    g.bench_function("iso_8583_rs", |b| {
        b.iter(|| {
            peer2_build(&peer2, black_box(&PURCHASE)).pack_into(&mut out_vec);
            black_box(&out_vec[..]);
        })
    });
    g.finish();

    let mut g = c.benchmark_group("iso87/request-reply");
    g.bench_function("switchyard", |b| {
        b.iter(|| {
            out.clear();
            reply_iso(&iso, black_box(frame), &mut out);
            black_box(&out[..]);
        })
    });
    g.bench_function("iso8583_rs", |b| {
        b.iter(|| black_box(peer1.reply(black_box(&mut frame_vec))))
    });
    g.bench_function("iso_8583_rs", |b| {
        b.iter(|| {
            peer2_reply(&peer2, black_box(&hex_frame), &mut out_vec);
            black_box(&out_vec[..]);
        })
    });
    g.finish();
}

criterion_group!(benches, cup_pos, iso87);

fn main() {
    // iso8583_rs reads the path of its spec from SPEC_FILE on first use. Setting
    // a variable of our own process is `unsafe` in edition 2024 (and unsafe
    // code is forbidden in this workspace), so unless it already names our
    // spec, the benchmark runs itself again with it set.
    let spec = iso8583_rs_spec_path();
    if std::env::var_os(SPEC_FILE).as_deref() != Some(spec.as_os_str()) {
        let status = Command::new(std::env::current_exe().expect("own path"))
            .args(std::env::args_os().skip(1))
            .env(SPEC_FILE, &spec)
            .status()
            .expect("benchmark runs");
        std::process::exit(status.code().unwrap_or(1));
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
