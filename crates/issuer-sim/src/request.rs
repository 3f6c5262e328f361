//! What the switch asks, read from one iso87 message into owned values: the
//! posting key, the kind of transaction, the card, the original it names.
//! Card data stays in [`Pan`], which prints masked; track data is read for
//! its PAN and expiry and kept no further.

use iso8583::dialect::{DigitEncoding, LengthKind};
use iso8583::{Dialect, Message, Mti, Pan, Value};
use sha2::Digest;

/// What makes a posting unique, as the switch keys its messages: acquirer
/// (F32, zero-padded to 11 digits as in F90), link STAN (F11), F7, MTI class.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PostingKey {
    pub acquirer: String,
    pub stan: String,
    pub transmitted: String,
    pub class: i16,
}

/// F90: the original a follow-on message names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OriginalRef {
    /// The 42 digits as sent.
    pub raw: String,
    /// The original's MTI.
    pub mti: Mti,
    /// The original's posting key.
    pub key: PostingKey,
}

impl OriginalRef {
    /// Original MTI n4 + F11 n6 + F7 n10 + F32 n11 + F33 n11.
    pub fn parse(digits: &str) -> Option<OriginalRef> {
        if digits.len() != 42 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mti: Mti = digits[..4].parse().ok()?;
        if mti.class() == 0 || !mti.is_request() {
            return None;
        }
        Some(OriginalRef {
            raw: digits.to_string(),
            mti,
            key: PostingKey {
                acquirer: digits[20..31].to_string(),
                stan: digits[4..10].to_string(),
                transmitted: digits[10..20].to_string(),
                class: mti.class() as i16,
            },
        })
    }
}

/// The kinds of posting (the `kind` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    BalanceInquiry,
    Purchase,
    Void,
    Refund,
    PreAuth,
    PreAuthCancel,
    /// A completion, as a request (0200) or an advice (0220/0221).
    Completion,
    CompletionVoid,
    Reversal,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::BalanceInquiry => "balance_inquiry",
            Kind::Purchase => "purchase",
            Kind::Void => "void",
            Kind::Refund => "refund",
            Kind::PreAuth => "preauth",
            Kind::PreAuthCancel => "preauth_cancel",
            Kind::Completion => "completion",
            Kind::CompletionVoid => "completion_void",
            Kind::Reversal => "reversal",
        }
    }

    /// A new authorisation: needs the card, checks status, expiry, limit.
    pub fn is_new(self) -> bool {
        matches!(self, Kind::BalanceInquiry | Kind::Purchase | Kind::PreAuth)
    }
}

/// One posting request (or advice) of the switch.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub mti: Mti,
    pub key: PostingKey,
    pub kind: Kind,
    pub forwarding: Option<String>,
    pub processing: String,
    pub condition: Option<String>,
    /// F4 in fen; 0 for a balance inquiry.
    pub amount: i64,
    pub pan: Option<Pan>,
    /// YYMM from F14, else from the track.
    pub expiry: Option<String>,
    pub rrn: Option<String>,
    pub terminal: Option<String>,
    pub merchant: Option<String>,
    pub original: Option<OriginalRef>,
    /// F39 of a reversal advice: why.
    pub reason: Option<String>,
}

impl Request {
    /// An advice (0220, 0420 and their repeats) must be answered once recorded.
    pub fn is_advice(&self) -> bool {
        self.mti.function() == 2
    }

    /// What a repeat must match to be the same message: MTI (repeat digit
    /// aside), F3, F25, F4, F90 and the card.
    pub fn fingerprint(&self, pan_hash: Option<&[u8; 32]>) -> [u8; 32] {
        let mut h = sha2::Sha256::new();
        for part in [
            self.mti.first().to_string().as_str(),
            &self.processing,
            self.condition.as_deref().unwrap_or(""),
            &self.amount.to_string(),
            self.original.as_ref().map_or("", |o| o.raw.as_str()),
        ] {
            h.update(part.as_bytes());
            h.update(b"|");
        }
        if let Some(hash) = pan_hash {
            h.update(hash);
        }
        h.finalize().into()
    }
}

/// A message read.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// 0800 with its F70 code.
    Network(u64),
    /// Anything that posts (or declines) at the issuer.
    Posting(Box<Request>),
}

/// Why a message gets no posting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A field is missing or wrong: `30`.
    Format(String),
    /// Not a transaction this issuer knows: `12`.
    Unsupported(String),
    /// Zero amount: `13`.
    Amount,
}

fn digits(msg: &Message<'_>, n: usize) -> Option<String> {
    msg.digits(n).map(|d| {
        let mut s = String::with_capacity(d.len());
        d.write_clear(&mut s);
        s
    })
}

fn required(msg: &Message<'_>, n: usize) -> Result<String, Refusal> {
    digits(msg, n).ok_or_else(|| Refusal::Format(format!("field {n} is missing")))
}

/// Reads a parsed message.
pub(crate) fn read(msg: &Message<'_>) -> Result<Inbound, Refusal> {
    let mti = msg.mti();
    if mti.class() == 8 && mti.function() == 0 {
        let code = msg
            .digits(70)
            .and_then(|d| d.to_u64())
            .ok_or_else(|| Refusal::Format("field 70 is missing".into()))?;
        return Ok(Inbound::Network(code));
    }
    let stan = required(msg, 11)?;
    let transmitted = required(msg, 7)?;
    let acquirer = required(msg, 32)?;
    let processing = required(msg, 3)?;
    let condition = digits(msg, 25);
    let kind = match (
        mti.first().value(),
        processing.as_str(),
        condition.as_deref(),
    ) {
        (420, _, _) => Kind::Reversal,
        (200, "310000", _) => Kind::BalanceInquiry,
        (200 | 220 | 100, "000000" | "200000" | "030000", None) => {
            return Err(Refusal::Format("field 25 is missing".into()));
        }
        (200, "000000", Some("00")) => Kind::Purchase,
        (200, "200000", Some("00")) => Kind::Void,
        (220, "200000", Some("00")) => Kind::Refund,
        (100, "030000", Some("06")) => Kind::PreAuth,
        (100, "200000", Some("06")) => Kind::PreAuthCancel,
        (200 | 220, "000000", Some("06")) => Kind::Completion,
        (200, "200000", Some("06")) => Kind::CompletionVoid,
        (m, p, c) => {
            return Err(Refusal::Unsupported(format!(
                "mti {m:04} with processing code {p} and condition {}",
                c.unwrap_or("(none)")
            )));
        }
    };
    let amount = match (kind, msg.digits(4).and_then(|d| d.to_u64())) {
        (Kind::BalanceInquiry, _) => 0,
        (_, None) => return Err(Refusal::Format("field 4 is missing".into())),
        (Kind::Reversal, Some(a)) => a as i64,
        (_, Some(0)) => return Err(Refusal::Amount),
        (_, Some(a)) => a as i64,
    };

    let (pan, track_expiry) = if let Some(d) = msg.digits(2) {
        let pan = d
            .to_pan()
            .ok_or_else(|| Refusal::Format("field 2 is not a PAN of 12 to 19 digits".into()))?;
        (Some(pan), None)
    } else if let Some(Value::Digits(d)) = msg.field(35) {
        let track = d
            .to_track()
            .ok_or_else(|| Refusal::Format("field 35 is not track 2 data".into()))?;
        let pan = track
            .pan()
            .ok_or_else(|| Refusal::Format("field 35 holds no PAN of 12 to 19 digits".into()))?;
        (Some(pan), track.expiry().map(str::to_string))
    } else {
        (None, None)
    };
    if kind.is_new() && pan.is_none() {
        return Err(Refusal::Format("no card: field 2 or 35 is needed".into()));
    }

    let original =
        if kind.is_new() {
            None
        } else {
            let raw = required(msg, 90)?;
            Some(OriginalRef::parse(&raw).ok_or_else(|| {
                Refusal::Format("field 90 does not name an original request".into())
            })?)
        };
    let text = |n| msg.text(n).map(str::to_string);
    Ok(Inbound::Posting(Box::new(Request {
        mti,
        key: PostingKey {
            acquirer: format!("{acquirer:0>11}"),
            stan,
            transmitted,
            class: mti.class() as i16,
        },
        kind,
        forwarding: digits(msg, 33),
        processing,
        condition,
        amount,
        pan,
        expiry: digits(msg, 14).or(track_expiry),
        rrn: text(37),
        terminal: text(41),
        merchant: text(42),
        original,
        reason: (kind == Kind::Reversal).then(|| text(39)).flatten(),
    })))
}

/// What can be read of a message that does not parse: its MTI, F11 and F7,
/// so that it can be answered `30`. `None` when even these cannot be read
/// (the connection is then closed). Needs an ASCII dialect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Salvaged {
    pub mti: Mti,
    pub stan: String,
    pub transmitted: String,
}

pub(crate) fn salvage(dialect: &Dialect, frame: &[u8]) -> Option<Salvaged> {
    let mut at = dialect.tpdu_len() + dialect.header_len();
    let mti: Mti = std::str::from_utf8(frame.get(at..at + 4)?)
        .ok()?
        .parse()
        .ok()?;
    at += 4;
    let primary = u64::from_be_bytes(frame.get(at..at + 8)?.try_into().ok()?);
    at += if primary >> 63 == 1 { 16 } else { 8 };
    let (mut stan, mut transmitted) = (None, None);
    for n in 2..=11 {
        if primary & (1 << (64 - n)) == 0 {
            continue;
        }
        let spec = dialect.field(n)?;
        if spec.digits != DigitEncoding::Ascii || spec.prefix != DigitEncoding::Ascii {
            return None;
        }
        let prefix = match spec.length {
            LengthKind::Fixed => 0,
            LengthKind::LlVar => 2,
            LengthKind::LllVar => 3,
        };
        let len = if prefix == 0 {
            usize::from(spec.max)
        } else {
            std::str::from_utf8(frame.get(at..at + prefix)?)
                .ok()?
                .parse()
                .ok()?
        };
        at += prefix;
        let data = std::str::from_utf8(frame.get(at..at + len)?).ok()?;
        at += len;
        let numeric = data.bytes().all(|b| b.is_ascii_digit());
        match n {
            7 if numeric && len == 10 => transmitted = Some(data.to_string()),
            11 if numeric && len == 6 => stan = Some(data.to_string()),
            _ => {}
        }
    }
    Some(Salvaged {
        mti,
        stan: stan?,
        transmitted: transmitted?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use iso8583::MessageWriter;

    #[test]
    fn f90_names_the_original() {
        let o = OriginalRef::parse("020000012306151230450004856000000048561000").unwrap();
        assert_eq!(o.mti.to_string(), "0200");
        assert_eq!(
            o.key,
            PostingKey {
                acquirer: "00048560000".into(),
                stan: "000123".into(),
                transmitted: "0615123045".into(),
                class: 2,
            }
        );
        assert!(OriginalRef::parse("0210000123061512304500048560000000485610000").is_none());
        assert!(OriginalRef::parse("021000012306151230450004856000000048561000").is_none());
        assert!(OriginalRef::parse("0200").is_none());
    }

    #[test]
    fn a_bad_field_after_f11_still_gives_mti_stan_and_f7() {
        let iso = Dialect::iso87();
        let mut buf = BytesMut::new();
        let mut w = MessageWriter::new(&iso, &mut buf, Mti::FINANCIAL, &[], &[]).unwrap();
        w.digits(2, "6222020000000000001").unwrap();
        w.digits(3, "000000").unwrap();
        w.digits(7, "0615123045").unwrap();
        w.digits(11, "000042").unwrap();
        w.text(41, "TERM0001").unwrap();
        w.finish().unwrap();
        let mut frame = buf[2..].to_vec();
        let end = frame.len();
        frame[end - 1] = 0x01; // not printable: F41 does not parse
        assert!(Message::parse(&iso, &frame).is_err());
        assert_eq!(
            salvage(&iso, &frame),
            Some(Salvaged {
                mti: Mti::FINANCIAL,
                stan: "000042".into(),
                transmitted: "0615123045".into()
            })
        );
        assert_eq!(salvage(&iso, &frame[..20]), None);
        assert_eq!(salvage(&iso, b"02x0"), None);
    }
}
