//! One simulated terminal: a TCP connection to the switch, its identity
//! (terminal id, merchant id, batch) and its STAN counter.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use iso8583::keys::{KeyError, MasterKey, WorkingKeys, mac_carried};
use iso8583::mac::{MAC_LEN, MacKey, cup_pos_mac};
use iso8583::{Dialect, Frame, FrameCodec, Message, MessageWriter, Mti, Value};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// A field value for [`Terminal::request`].
#[derive(Debug, Clone, Copy)]
pub enum Field<'a> {
    /// Digits of an `n` or `z` field.
    Digits(&'a str),
    /// A number, zero-padded to a fixed field's length.
    Number(u64),
    /// Characters of an `an` or `ans` field.
    Text(&'a str),
    /// Bytes of a `b` field.
    Binary(&'a [u8]),
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    /// The connection.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The switch closed the connection.
    #[error("connection closed by the switch")]
    Closed,
    /// The reply cannot be framed or parsed.
    #[error("bad reply: {0}")]
    Bad(String),
    /// A field value does not fit.
    #[error("cannot build the request: {0}")]
    Build(#[from] iso8583::BuildError),
    /// The sign-on reply's working keys cannot be taken.
    #[error("sign-on: {0}")]
    Keys(String),
}

/// A reply as the terminal reads it: MTI and field values as text (digits,
/// characters, or uppercase hex for binary fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The reply's MTI.
    pub mti: Mti,
    /// TPDU and header.
    pub prefix: Vec<u8>,
    /// Every field present.
    pub fields: BTreeMap<usize, String>,
    /// The frame from the MTI on.
    pub body: Bytes,
    /// Whether its F64 is the MAC of the rest under the terminal's MAC key:
    /// `None` when the terminal holds none or the reply is of a network
    /// management message (08xx), which carries none.
    pub mac_valid: Option<bool>,
}

impl Reply {
    /// Parses a reply frame (length prefix excluded).
    pub fn parse(dialect: &Dialect, frame: &[u8]) -> Result<Reply, TerminalError> {
        let msg = Message::parse(dialect, frame).map_err(|e| TerminalError::Bad(e.to_string()))?;
        let fields = msg
            .fields()
            .map(|(n, v): (usize, Value<'_>)| (n, v.to_clear_string()))
            .collect();
        let body_at = dialect.tpdu_len() + dialect.header_len();
        Ok(Reply {
            mti: msg.mti(),
            prefix: frame[..body_at].to_vec(),
            fields,
            body: Bytes::copy_from_slice(&frame[body_at..]),
            mac_valid: None,
        })
    }

    /// A reply with nothing in it (a placeholder until the real one comes).
    pub fn empty() -> Reply {
        Reply {
            mti: Mti::FINANCIAL,
            prefix: Vec::new(),
            fields: BTreeMap::new(),
            body: Bytes::new(),
            mac_valid: None,
        }
    }

    /// F39, or `""` when absent.
    pub fn rc(&self) -> &str {
        self.field(39).unwrap_or("")
    }

    /// A field's value.
    pub fn field(&self, n: usize) -> Option<&str> {
        self.fields.get(&n).map(String::as_str)
    }
}

/// A simulated terminal.
#[derive(Debug)]
pub struct Terminal {
    framed: Framed<TcpStream, FrameCodec>,
    dialect: Arc<Dialect>,
    /// F41.
    pub id: String,
    /// F42.
    pub merchant: String,
    /// The open batch, from the last sign-on.
    pub batch: u32,
    stan: u32,
    /// TPDU of every request.
    pub tpdu: [u8; 5],
    /// Header of every request.
    pub header: [u8; 6],
    /// Its master key (TMK), when it was loaded with one.
    master_key: Option<MasterKey>,
    /// The MAC key of its last sign-on.
    mac_key: Option<MacKey>,
}

impl Terminal {
    /// Connects to the switch at `addr`.
    pub async fn connect(
        addr: &str,
        id: &str,
        merchant: &str,
        dialect: Arc<Dialect>,
    ) -> Result<Terminal, TerminalError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let codec = FrameCodec::new(&dialect, 65_535);
        Ok(Terminal {
            framed: Framed::new(stream, codec),
            dialect,
            id: id.to_string(),
            merchant: merchant.to_string(),
            batch: 1,
            stan: 0,
            tpdu: [0x60, 0x00, 0x03, 0x00, 0x00],
            header: [0x60, 0x31, 0x00, 0x00, 0x00, 0x00],
            master_key: None,
            mac_key: None,
        })
    }

    /// Loads a master key (TMK): each sign-on then takes its working keys
    /// from F62, and every request but 08xx carries a MAC (F64). `None`
    /// makes it a terminal without keys.
    pub fn set_master_key(&mut self, key: Option<MasterKey>) {
        self.master_key = key;
        self.mac_key = None;
    }

    /// The frame (length prefix included) as it goes now: one that
    /// carries a MAC (F64) gets it again under the MAC key the terminal
    /// holds now. A terminal MACs a message as it sends it, so a repeat, a
    /// retry or a reversal built before a sign-on goes under the new keys.
    pub fn as_sent<'f>(&self, frame: &'f [u8]) -> std::borrow::Cow<'f, [u8]> {
        use std::borrow::Cow;
        let body = 2 + self.dialect.tpdu_len() + self.dialect.header_len();
        // The MTI, then the bitmap: bit 64 is the last of its 8 bytes.
        let last = body + self.dialect.mti_len() + 7;
        let carries_mac =
            frame.get(last).is_some_and(|b| b & 0x01 != 0) && frame.len() > last + MAC_LEN;
        match &self.mac_key {
            Some(key) if carries_mac => {
                let mut again = frame.to_vec();
                let end = again.len() - MAC_LEN;
                let mac = cup_pos_mac(key, &again[body..end]);
                again[end..].copy_from_slice(&mac);
                Cow::Owned(again)
            }
            _ => Cow::Borrowed(frame),
        }
    }

    /// Whether it holds a MAC key from a sign-on.
    pub fn holds_mac_key(&self) -> bool {
        self.mac_key.is_some()
    }

    /// Replaces the connection with a new one to `addr` (the terminal keeps
    /// its identity, batch and STAN counter); the old one is closed, with a
    /// reset when [`Terminal::reset_on_close`] was called.
    pub async fn reconnect(&mut self, addr: &str) -> Result<(), TerminalError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        self.framed = Framed::new(stream, FrameCodec::new(&self.dialect, 65_535));
        Ok(())
    }

    /// Makes the connection close with a reset (RST, `SO_LINGER` 0) instead
    /// of an orderly FIN: what the switch sees when a terminal's line drops.
    pub fn reset_on_close(&self) {
        let _ = self.framed.get_ref().set_zero_linger();
    }

    /// Waits until the connection has something to read (a reply), without reading it.
    pub async fn readable(&self) {
        let _ = self.framed.get_ref().readable().await;
    }

    /// Continues the STAN counter from `stan` (a terminal keeps its counter
    /// across power cycles; a fresh simulated one must not reuse STANs of its
    /// open batch).
    pub fn set_stan(&mut self, stan: u32) {
        self.stan = stan % 999_999;
    }

    /// The next STAN (1 to 999999, wrapping).
    pub fn next_stan(&mut self) -> u32 {
        self.stan = self.stan % 999_999 + 1;
        self.stan
    }

    /// F60 for a transaction: type code + open batch + network code 000.
    pub fn f60(&self, type_code: &str) -> String {
        format!("{type_code}{:06}000", self.batch)
    }

    /// Builds a request frame (length prefix included) with `fields` in
    /// ascending order; F41 and F42 are added.
    pub fn request(
        &self,
        mti: Mti,
        fields: &[(usize, Field<'_>)],
    ) -> Result<BytesMut, TerminalError> {
        let mut buf = BytesMut::with_capacity(256);
        let mut w = MessageWriter::new(&self.dialect, &mut buf, mti, &self.tpdu, &self.header)?;
        let mut identity_written = false;
        let write_identity = |w: &mut MessageWriter<'_>| -> Result<(), iso8583::BuildError> {
            w.text(41, &self.id)?;
            w.text(42, &self.merchant)
        };
        for &(n, value) in fields {
            if n > 42 && !identity_written {
                write_identity(&mut w)?;
                identity_written = true;
            }
            match value {
                Field::Digits(d) => w.digits(n, d)?,
                Field::Number(v) => w.number(n, v)?,
                Field::Text(t) => w.text(n, t)?,
                Field::Binary(b) => w.binary(n, b)?,
            }
        }
        if !identity_written {
            write_identity(&mut w)?;
        }
        let mac_key = self.mac_key.as_ref().filter(|_| mac_carried(mti));
        if mac_key.is_some() {
            w.binary(64, &[0; MAC_LEN])?;
        }
        w.finish()?;
        if let Some(key) = mac_key {
            // The MAC covers the MTI to the end of F63, the bitmap as sent
            // (bit 64 set): the placeholder written above is replaced.
            let body = 2 + self.dialect.tpdu_len() + self.dialect.header_len();
            let end = buf.len() - MAC_LEN;
            let mac = cup_pos_mac(key, &buf[body..end]);
            buf[end..].copy_from_slice(&mac);
        }
        Ok(buf)
    }

    /// Sends a frame as it is (length prefix included).
    pub async fn send_raw(&mut self, frame: &[u8]) -> Result<(), TerminalError> {
        use tokio::io::AsyncWriteExt;
        self.framed.get_mut().write_all(frame).await?;
        Ok(())
    }

    /// Reads the next reply.
    pub async fn recv(&mut self) -> Result<Reply, TerminalError> {
        let frame = self.recv_frame().await?;
        let mut reply = Reply::parse(&self.dialect, &frame)?;
        reply.mac_valid = self.mac_valid(reply.mti, reply.fields.contains_key(&64), &reply.body);
        Ok(reply)
    }

    /// Whether a reply's F64 is the MAC of the rest of `body` (the frame
    /// from the MTI on) under the terminal's MAC key, `has_f64` saying
    /// whether its bitmap has F64: `None` when the terminal holds no MAC
    /// key or `mti` carries none (08xx). For readers of raw frames
    /// ([`Terminal::recv_frame`]); [`Terminal::recv`] sets
    /// [`Reply::mac_valid`] with it.
    pub fn mac_valid(&self, mti: Mti, has_f64: bool, body: &[u8]) -> Option<bool> {
        let key = self.mac_key.as_ref().filter(|_| mac_carried(mti))?;
        Some(
            has_f64 && body.len() >= MAC_LEN && {
                let (block, mac) = body.split_at(body.len() - MAC_LEN);
                iso8583::mac::verify(&cup_pos_mac(key, block), mac)
            },
        )
    }

    /// Reads the next reply frame (length prefix excluded) as it came,
    /// keep-alives skipped; nothing is parsed.
    pub async fn recv_frame(&mut self) -> Result<Bytes, TerminalError> {
        loop {
            match self.framed.next().await {
                Some(Ok(Frame::Message(bytes))) => return Ok(bytes),
                Some(Ok(Frame::KeepAlive)) => {}
                Some(Err(e)) => return Err(TerminalError::Bad(e.to_string())),
                None => return Err(TerminalError::Closed),
            }
        }
    }

    /// Sends a frame and reads the reply.
    pub async fn exchange(&mut self, frame: &[u8]) -> Result<Reply, TerminalError> {
        self.send_raw(frame).await?;
        self.recv().await
    }

    /// Sends a frame and reads the reply frame, unparsed.
    pub async fn exchange_frame(&mut self, frame: &[u8]) -> Result<Bytes, TerminalError> {
        self.send_raw(frame).await?;
        self.recv_frame().await
    }

    /// Its dialect.
    pub fn dialect(&self) -> &Arc<Dialect> {
        &self.dialect
    }

    /// Sends a keep-alive (a zero length).
    pub async fn keep_alive(&mut self) -> Result<(), TerminalError> {
        self.framed
            .send(&[][..])
            .await
            .map_err(|e| TerminalError::Bad(e.to_string()))
    }

    /// Signs on (0800, F60.3 001) and takes the open batch from the reply.
    pub async fn sign_on(&mut self) -> Result<Reply, TerminalError> {
        let stan = self.next_stan();
        let frame = self.request(
            Mti::NETWORK,
            &[
                (11, Field::Number(stan.into())),
                (60, Field::Digits("00000000001")),
                (63, Field::Text("001")),
            ],
        )?;
        let reply = self.exchange(&frame).await?;
        if let Some(batch) = reply
            .field(60)
            .and_then(|f| f.get(2..8))
            .and_then(|b| b.parse().ok())
        {
            self.batch = batch;
        }
        if let (Some(tmk), "00") = (&self.master_key, reply.rc()) {
            // A terminal loaded with a master key takes its working keys
            // from every sign-on, and cannot transact without them.
            let f62 = reply
                .field(62)
                .and_then(|text| hex::decode(text).ok())
                .ok_or_else(|| {
                    TerminalError::Keys(
                        "approved without working keys (F62): the switch holds no terminal master \
                     derivation key"
                            .into(),
                    )
                })?;
            let keys = WorkingKeys::from_f62(tmk, &f62).map_err(|e| {
                TerminalError::Keys(match e {
                    KeyError::Check(_) => format!(
                        "{e}: the switch's terminal master derivation key is not the terminal's"
                    ),
                    other => other.to_string(),
                })
            })?;
            self.mac_key = Some(keys.mac_key());
        }
        Ok(reply)
    }

    /// A financial request: the card (PAN, expiry, track 2) when given, and
    /// the fields every transaction carries; `extra` in any order.
    #[allow(clippy::too_many_arguments)]
    fn financial(
        &self,
        mti: Mti,
        processing_code: &str,
        condition: &str,
        type_code: &str,
        stan: u32,
        card: Option<(&str, &str)>,
        amount: Option<u64>,
        extra: &[(usize, Field<'_>)],
    ) -> Result<BytesMut, TerminalError> {
        let track = card.map(|(pan, expiry)| format!("{pan}D{expiry}1011234"));
        let f60 = self.f60(type_code);
        // Room for every field a request may carry: one allocation.
        let mut fields: Vec<(usize, Field<'_>)> = Vec::with_capacity(16 + extra.len());
        fields.extend([
            (3, Field::Digits(processing_code)),
            (11, Field::Number(stan.into())),
            (
                22,
                Field::Digits(if card.is_some() { "021" } else { "012" }),
            ),
            (25, Field::Digits(condition)),
            (49, Field::Text("156")),
            (60, Field::Digits(&f60)),
        ]);
        if let (Some((pan, expiry)), Some(track)) = (card, track.as_deref()) {
            fields.extend([
                (2, Field::Digits(pan)),
                (14, Field::Digits(expiry)),
                (35, Field::Digits(track)),
            ]);
            fields.extend([
                (26, Field::Digits("12")),
                (52, Field::Binary(&[0x11; 8])),
                (53, Field::Digits("2600000000000000")),
            ]);
        }
        if let Some(a) = amount {
            fields.push((4, Field::Number(a)));
        }
        fields.extend_from_slice(extra);
        fields.sort_by_key(|(n, _)| *n);
        self.request(mti, &fields)
    }

    /// A purchase request (0200, F3 000000, F25 00) for `amount` fen,
    /// swiped: F2, F14 and F35 from the card.
    pub fn purchase(
        &self,
        stan: u32,
        pan: &str,
        expiry: &str,
        amount: u64,
    ) -> Result<BytesMut, TerminalError> {
        self.financial(
            Mti::FINANCIAL,
            "000000",
            "00",
            "22",
            stan,
            Some((pan, expiry)),
            Some(amount),
            &[],
        )
    }

    /// A balance inquiry (0200, F3 310000).
    pub fn balance_inquiry(
        &self,
        stan: u32,
        pan: &str,
        expiry: &str,
    ) -> Result<BytesMut, TerminalError> {
        self.financial(
            Mti::FINANCIAL,
            "310000",
            "00",
            "01",
            stan,
            Some((pan, expiry)),
            None,
            &[],
        )
    }

    /// A purchase void (0200, F3 200000): the original by F61 (batch, STAN),
    /// F37 and F38.
    pub fn void(
        &self,
        stan: u32,
        pan: &str,
        expiry: &str,
        amount: u64,
        original: &Original<'_>,
    ) -> Result<BytesMut, TerminalError> {
        self.void_of(("00", "23"), stan, pan, expiry, amount, original)
    }

    /// A void of either kind: `(F25, F60.1)` tells a purchase void from a
    /// completion void; the original by F61 (batch, STAN) and F37.
    fn void_of(
        &self,
        (condition, type_code): (&str, &str),
        stan: u32,
        pan: &str,
        expiry: &str,
        amount: u64,
        original: &Original<'_>,
    ) -> Result<BytesMut, TerminalError> {
        let f61 = format!("{:06}{:06}", original.batch, original.stan);
        // A purchase void names the sale's auth code too (F38); a
        // completion void only its F61 and F37.
        let auth_code = (type_code == "23" && !original.auth_code.is_empty())
            .then_some((38, Field::Text(original.auth_code)));
        let fields: Vec<(usize, Field<'_>)> = [Some((37, Field::Text(original.rrn)))]
            .into_iter()
            .chain([auth_code, Some((61, Field::Digits(&f61)))])
            .flatten()
            .collect();
        self.financial(
            Mti::FINANCIAL,
            "200000",
            condition,
            type_code,
            stan,
            Some((pan, expiry)),
            Some(amount),
            &fields,
        )
    }

    /// A refund (0220, F3 200000): the original by F37 and F61.3 (its date, MMDD).
    pub fn refund(
        &self,
        stan: u32,
        pan: &str,
        expiry: &str,
        amount: u64,
        original: &Original<'_>,
    ) -> Result<BytesMut, TerminalError> {
        let f61 = format!("{:06}{:06}{}", original.batch, original.stan, original.date);
        self.financial(
            Mti::FINANCIAL_ADVICE,
            "200000",
            "00",
            "25",
            stan,
            Some((pan, expiry)),
            Some(amount),
            &[
                (37, Field::Text(original.rrn)),
                (61, Field::Digits(&f61)),
                (63, Field::Text("CUP")),
            ],
        )
    }

    /// A pre-authorisation (0100, F3 030000, F25 06).
    pub fn preauth(
        &self,
        stan: u32,
        pan: &str,
        expiry: &str,
        amount: u64,
    ) -> Result<BytesMut, TerminalError> {
        self.financial(
            Mti::AUTHORIZATION,
            "030000",
            "06",
            "10",
            stan,
            Some((pan, expiry)),
            Some(amount),
            &[],
        )
    }

    /// A pre-authorisation cancel (0100, F3 200000, F25 06): the pre-auth by F38 and F61.3.
    pub fn preauth_cancel(
        &self,
        stan: u32,
        pan: &str,
        expiry: &str,
        amount: u64,
        original: &Original<'_>,
    ) -> Result<BytesMut, TerminalError> {
        self.preauth_followup(
            Mti::AUTHORIZATION,
            "200000",
            "11",
            stan,
            pan,
            expiry,
            amount,
            original,
        )
    }

    /// A completion request (0200, F3 000000, F25 06).
    pub fn completion(
        &self,
        stan: u32,
        pan: &str,
        expiry: &str,
        amount: u64,
        original: &Original<'_>,
    ) -> Result<BytesMut, TerminalError> {
        self.preauth_followup(
            Mti::FINANCIAL,
            "000000",
            "20",
            stan,
            pan,
            expiry,
            amount,
            original,
        )
    }

    /// A completion advice (0220, F3 000000, F25 06).
    pub fn completion_advice(
        &self,
        stan: u32,
        pan: &str,
        expiry: &str,
        amount: u64,
        original: &Original<'_>,
    ) -> Result<BytesMut, TerminalError> {
        self.preauth_followup(
            Mti::FINANCIAL_ADVICE,
            "000000",
            "24",
            stan,
            pan,
            expiry,
            amount,
            original,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn preauth_followup(
        &self,
        mti: Mti,
        processing_code: &str,
        type_code: &str,
        stan: u32,
        pan: &str,
        expiry: &str,
        amount: u64,
        original: &Original<'_>,
    ) -> Result<BytesMut, TerminalError> {
        let f61 = format!("000000000000{}", original.date);
        self.financial(
            mti,
            processing_code,
            "06",
            type_code,
            stan,
            Some((pan, expiry)),
            Some(amount),
            &[
                (38, Field::Text(original.auth_code)),
                (61, Field::Digits(&f61)),
            ],
        )
    }

    /// A completion void (0200, F3 200000, F25 06): the completion by F61 and F37.
    pub fn completion_void(
        &self,
        stan: u32,
        pan: &str,
        expiry: &str,
        amount: u64,
        original: &Original<'_>,
    ) -> Result<BytesMut, TerminalError> {
        self.void_of(("06", "21"), stan, pan, expiry, amount, original)
    }

    /// The reversal (0400) of a request this terminal sent: the same F3, F4,
    /// F11, F25 and F60, no card data beyond the PAN, F39 the reason (`98`
    /// no answer, `A0` MAC failure, `06` other), F61 for void-type originals.
    pub fn reversal(&self, of: &Reversed<'_>, reason: &str) -> Result<BytesMut, TerminalError> {
        let mut fields = vec![
            (2, Field::Digits(of.pan)),
            (3, Field::Digits(of.processing_code)),
            (4, Field::Number(of.amount)),
            (11, Field::Number(of.stan.into())),
            (22, Field::Digits("021")),
            (25, Field::Digits(of.condition)),
            (39, Field::Text(reason)),
            (49, Field::Text("156")),
            (60, Field::Digits(of.f60)),
        ];
        if let Some(f61) = of.f61 {
            fields.push((61, Field::Digits(f61)));
        }
        fields.sort_by_key(|(n, _)| *n);
        self.request(Mti::REVERSAL, &fields)
    }

    /// Settlement (0500): F48 the terminal's totals (62 digits), F63 the operator.
    pub fn settlement(&self, stan: u32, totals: &str) -> Result<BytesMut, TerminalError> {
        let f60 = format!("00{:06}201", self.batch);
        self.request(
            Mti::SETTLEMENT,
            &[
                (11, Field::Number(stan.into())),
                (48, Field::Digits(totals)),
                (49, Field::Text("156")),
                (60, Field::Digits(&f60)),
                (63, Field::Text("001")),
            ],
        )
    }

    /// Batch upload (0320, F60.3 201) of up to 8 records `(STAN, PAN, amount)`
    /// for `batch`; with no records, the upload's end (F60.3 202).
    pub fn batch_upload(
        &self,
        stan: u32,
        batch: u32,
        records: &[(u32, &str, u64)],
    ) -> Result<BytesMut, TerminalError> {
        let (f48, code) = if records.is_empty() {
            (String::from("0000"), "202")
        } else {
            let mut f48 = format!("{:02}", records.len());
            for (stan, pan, amount) in records {
                f48.push_str(&format!("00{stan:06}{pan:0>20}{amount:012}"));
            }
            (f48, "201")
        };
        let f60 = format!("00{batch:06}{code}");
        self.request(
            Mti::BATCH_UPLOAD,
            &[
                (11, Field::Number(stan.into())),
                (48, Field::Digits(&f48)),
                (60, Field::Digits(&f60)),
            ],
        )
    }
}

/// How a related request names its original: what the terminal kept of it.
#[derive(Debug, Clone, Copy)]
pub struct Original<'a> {
    /// Its batch.
    pub batch: u32,
    /// Its STAN.
    pub stan: u32,
    /// Its RRN (F37 of its reply).
    pub rrn: &'a str,
    /// Its auth code (F38 of its reply).
    pub auth_code: &'a str,
    /// Its date, MMDD (F13 of its reply).
    pub date: &'a str,
}

/// What a terminal keeps of a reversible request, to reverse it.
#[derive(Debug, Clone, Copy)]
pub struct Reversed<'a> {
    /// Its PAN.
    pub pan: &'a str,
    /// Its F3.
    pub processing_code: &'a str,
    /// Its F4.
    pub amount: u64,
    /// Its F11.
    pub stan: u32,
    /// Its F25.
    pub condition: &'a str,
    /// Its F60.
    pub f60: &'a str,
    /// Its F61, for void-type originals.
    pub f61: Option<&'a str>,
}
