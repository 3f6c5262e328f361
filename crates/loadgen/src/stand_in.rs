//! A stand-in switch for the tests: a real listener on port 0 that answers
//! terminals as each test says, and records what it was sent. Given a
//! terminal master derivation key, it hands out working keys at sign-on
//! (F62), checks the requests' MACs and MACs its replies, as the switch does.

use std::sync::Arc;

use iso8583::Dialect;
use iso8583::keys::{DerivationKey, KeySet, WorkingKeys};
use iso8583::mac::{MAC_LEN, MacKey, cup_pos_mac};

/// What a stand-in switch saw: per request, its connection, MTI, F11 and
/// F39; per connection, whether it ended with a reset.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    pub requests: Vec<(usize, String, u32, String)>,
    pub reset: Vec<usize>,
    /// Per request, its MTI, F60.1 (the transaction type), F38 and F61.
    pub originals: Vec<(String, String, Option<String>, Option<String>)>,
    /// Per request, its F4, F48 and F60.3 (the network code).
    pub amounts: Vec<(Option<u64>, Option<String>, String)>,
    /// Per request, whether its F64 is its MAC under the working keys the
    /// stand-in handed out: `None` when it handed out none to the connection
    /// or the request is an 08xx.
    pub macs: Vec<Option<bool>>,
}

/// How a stand-in switch answers a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Answer {
    /// As a switch does: the reply MTI, F11 and F41 echoed.
    With(&'static str),
    /// With another STAN in F11.
    OtherStan,
    /// Never.
    Silence,
    /// Never, and the connection is closed: a switch stopped mid-run.
    Hangup,
    /// A settlement's reply: approved, the terminal's totals echoed
    /// with this reconciliation code for domestic cards (and `1`, they
    /// match, for foreign cards, of which terminals here have none).
    Totals(char),
    /// As `With`, but F64 is not the reply's MAC (a switch with other keys,
    /// or a reply altered on the way).
    WrongMac(&'static str),
    /// As `With`, without F64.
    NoMac(&'static str),
}

/// A stand-in switch that approves everything it is sent.
pub(crate) async fn approving_switch() -> (String, Arc<std::sync::Mutex<Seen>>) {
    stand_in_switch(|_, _| Answer::With("00")).await
}

/// A stand-in switch that answers each request as `answer` says, given
/// its MTI and how many of that MTI came before it.
pub(crate) async fn stand_in_switch(
    answer: fn(&str, usize) -> Answer,
) -> (String, Arc<std::sync::Mutex<Seen>>) {
    stand_in(answer, None).await
}

/// A test terminal master derivation key (the double-length DES test key).
pub(crate) fn test_derivation_key() -> DerivationKey {
    DerivationKey::new(&[
        0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF, 0xFE, 0xDC, 0xBA, 0x98, 0x76, 0x54, 0x32,
        0x10,
    ])
}

/// A stand-in switch holding terminal keys derived from `keys`: each
/// approved sign-on hands out working keys (F62) under the terminal's
/// master key, and every reply but an 08xx carries F64 (unless `answer`
/// says otherwise).
pub(crate) async fn keyed_switch(
    keys: DerivationKey,
    answer: fn(&str, usize) -> Answer,
) -> (String, Arc<std::sync::Mutex<Seen>>) {
    stand_in(answer, Some(keys)).await
}

async fn stand_in(
    answer: fn(&str, usize) -> Answer,
    keys: Option<DerivationKey>,
) -> (String, Arc<std::sync::Mutex<Seen>>) {
    use futures::StreamExt;
    use iso8583::{Frame, FrameCodec, Message, MessageWriter};
    use tokio::io::AsyncWriteExt;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let log = seen.clone();
    tokio::spawn(async move {
        for connection in 0.. {
            let (stream, _) = listener.accept().await.unwrap();
            let (log, keys) = (log.clone(), keys.clone());
            tokio::spawn(async move {
                // The MAC key handed out at this connection's last sign-on.
                let mut mac_key: Option<MacKey> = None;
                let dialect = Dialect::cup_pos();
                let mut framed =
                    tokio_util::codec::Framed::new(stream, FrameCodec::new(&dialect, 4096));
                loop {
                    let body = match framed.next().await {
                        Some(Ok(Frame::Message(body))) => body,
                        Some(Ok(Frame::KeepAlive)) => continue,
                        Some(Err(_)) => {
                            log.lock().unwrap().reset.push(connection);
                            return;
                        }
                        None => return,
                    };
                    let msg = Message::parse(&dialect, &body).unwrap();
                    let mti = msg.mti().to_string();
                    let prefix = dialect.tpdu_len() + dialect.header_len();
                    let mac_ok = mac_key
                        .as_ref()
                        .filter(|_| !mti.starts_with("08"))
                        .map(|key| {
                            msg.binary(64).is_some() && {
                                let (block, mac) =
                                    body[prefix..].split_at(body.len() - prefix - MAC_LEN);
                                cup_pos_mac(key, block) == mac
                            }
                        });
                    let stan = msg.digits(11).and_then(|d| d.to_u64()).unwrap_or(0);
                    let before = {
                        let mut log = log.lock().unwrap();
                        let before = log.requests.iter().filter(|r| r.1 == mti).count();
                        log.requests.push((
                            connection,
                            mti.clone(),
                            stan as u32,
                            msg.text(39).unwrap_or("").to_string(),
                        ));
                        let digits = |n| {
                            msg.digits(n)
                                .map(|d| d.iter().map(char::from).collect::<String>())
                        };
                        log.originals.push((
                            mti.clone(),
                            digits(60).map(|f| f[..2].to_string()).unwrap_or_default(),
                            msg.text(38).map(str::to_string),
                            digits(61),
                        ));
                        log.amounts.push((
                            msg.digits(4).and_then(|d| d.to_u64()),
                            digits(48),
                            digits(60).map(|f| f[8..].to_string()).unwrap_or_default(),
                        ));
                        log.macs.push(mac_ok);
                        before
                    };
                    let mut totals = None;
                    // The reply's F64: right, wrong or absent.
                    let mut mac = Some(true);
                    let (rc, stan) = match answer(&mti, before) {
                        Answer::Silence => continue,
                        Answer::Hangup => return,
                        Answer::With(rc) => (rc, stan),
                        Answer::WrongMac(rc) => {
                            mac = Some(false);
                            (rc, stan)
                        }
                        Answer::NoMac(rc) => {
                            mac = None;
                            (rc, stan)
                        }
                        Answer::OtherStan => ("00", stan % 999_999 + 1),
                        Answer::Totals(code) => {
                            let mut f48: String = msg
                                .digits(48)
                                .map(|d| d.iter().map(char::from).collect())
                                .unwrap_or_default();
                            f48.replace_range(30..31, &code.to_string());
                            f48.replace_range(61..62, "1");
                            totals = Some(f48);
                            ("00", stan)
                        }
                    };
                    let mut out = bytes::BytesMut::new();
                    let mut w = MessageWriter::reply(&dialect, &mut out, &msg);
                    for n in [3, 4] {
                        w.copy(n, &msg).unwrap();
                    }
                    w.number(11, stan).unwrap();
                    w.digits(13, "0101").unwrap();
                    w.text(37, "000000000001").unwrap();
                    w.text(38, "123456").unwrap();
                    w.text(39, rc).unwrap();
                    for n in [41, 42] {
                        w.copy(n, &msg).unwrap();
                    }
                    if let Some(f48) = &totals {
                        w.digits(48, f48).unwrap();
                    }
                    w.copy(60, &msg).unwrap();
                    let signed_on = mti == "0800" && rc == "00";
                    if let (Some(keys), true) = (&keys, signed_on) {
                        // Other keys at each sign-on, as a switch hands out.
                        let sign_ons = log
                            .lock()
                            .unwrap()
                            .requests
                            .iter()
                            .filter(|r| r.1 == "0800")
                            .count();
                        let random: Vec<u8> = (0u8..16)
                            .map(|i| i.wrapping_mul(73) ^ 0x5A ^ sign_ons as u8)
                            .collect();
                        let working = WorkingKeys::new(KeySet::Single, &random);
                        let tmk = keys.master_key(msg.text(41).unwrap_or(""));
                        w.binary(62, &working.to_f62(&tmk)).unwrap();
                        mac_key = Some(working.mac_key());
                    }
                    let macked = mac_key.as_ref().filter(|_| !mti.starts_with("08"));
                    let mac = macked.and(mac);
                    if mac.is_some() {
                        w.binary(64, &[0; MAC_LEN]).unwrap();
                    }
                    w.finish().unwrap();
                    if let (Some(key), Some(right)) = (macked, mac) {
                        // Over the MTI to the end of F63, the length prefix,
                        // TPDU and header excluded.
                        let end = out.len() - MAC_LEN;
                        let mut value = cup_pos_mac(key, &out[2 + prefix..end]);
                        if !right {
                            value[0] ^= 0x01;
                        }
                        out[end..].copy_from_slice(&value);
                    }
                    if framed.get_mut().write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}
