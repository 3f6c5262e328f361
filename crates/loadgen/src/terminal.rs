//! One simulated terminal: a TCP connection to the switch, its identity
//! (terminal id, merchant id, batch) and its STAN counter.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
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
        })
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
        })
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
        w.finish()?;
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
        loop {
            match self.framed.next().await {
                Some(Ok(Frame::Message(bytes))) => return Reply::parse(&self.dialect, &bytes),
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
        Ok(reply)
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
        let track = format!("{pan}D{expiry}1011234");
        let f60 = self.f60("22");
        self.request(
            Mti::FINANCIAL,
            &[
                (2, Field::Digits(pan)),
                (3, Field::Digits("000000")),
                (4, Field::Number(amount)),
                (11, Field::Number(stan.into())),
                (14, Field::Digits(expiry)),
                (22, Field::Digits("021")),
                (25, Field::Digits("00")),
                (26, Field::Digits("12")),
                (35, Field::Digits(&track)),
                (49, Field::Text("156")),
                (52, Field::Binary(&[0x11; 8])),
                (53, Field::Digits("2600000000000000")),
                (60, Field::Digits(&f60)),
            ],
        )
    }

    /// A balance inquiry (0200, F3 310000).
    pub fn balance_inquiry(
        &self,
        stan: u32,
        pan: &str,
        expiry: &str,
    ) -> Result<BytesMut, TerminalError> {
        let f60 = self.f60("01");
        self.request(
            Mti::FINANCIAL,
            &[
                (2, Field::Digits(pan)),
                (3, Field::Digits("310000")),
                (11, Field::Number(stan.into())),
                (14, Field::Digits(expiry)),
                (22, Field::Digits("021")),
                (25, Field::Digits("00")),
                (49, Field::Text("156")),
                (60, Field::Digits(&f60)),
            ],
        )
    }
}
