//! The link to one issuer: persistent connections in the network dialect
//! (iso87) that sign on (0800 / 001), send an echo test (301) when idle, and
//! reconnect with back-off. Requests are multiplexed on a connection and
//! their replies matched by MTI class + F11 + F7.
//!
//! An exchange ends in one of three ways, and the caller must tell them
//! apart: a reply; [`LinkError::NotSent`] (the request never left, so nothing
//! needs reversing); or [`LinkError::Lost`] / a timeout (it may have reached
//! the issuer: the outcome is unknown and must be reversed).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use iso8583::{Dialect, Frame, FrameCodec, Message, MessageWriter, Mti};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config;

/// What identifies a reply: MTI class (`02` of `0210`), F11, F7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MatchKey {
    class: u16,
    stan: u32,
    f7: [u8; 10],
}

impl MatchKey {
    /// The key of a request or reply in the network dialect.
    pub fn of(message: &Message<'_>) -> Option<MatchKey> {
        let stan = message.digits(11)?.to_u64()? as u32;
        let f7d = message.digits(7)?;
        let mut f7 = [0u8; 10];
        if f7d.len() != 10 {
            return None;
        }
        for (slot, c) in f7.iter_mut().zip(f7d.iter()) {
            *slot = c;
        }
        Some(MatchKey {
            class: message.mti().class(),
            stan,
            f7,
        })
    }
}

/// How an exchange failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The link is down: the request was never sent.
    #[error("issuer link down; not sent")]
    NotSent,
    /// Sent, and the connection died before the reply: outcome unknown.
    #[error("connection lost after sending; outcome unknown")]
    Lost,
    /// Sent, and no reply in time: outcome unknown.
    #[error("no reply in time; outcome unknown")]
    Timeout,
}

struct Outgoing {
    frame: Bytes,
    key: MatchKey,
    reply: oneshot::Sender<Result<Bytes, LinkError>>,
}

struct Connection {
    tx: mpsc::Sender<Outgoing>,
    up: Arc<AtomicBool>,
}

/// The link to one issuer, with its connections.
pub struct Link {
    name: String,
    connections: Vec<Connection>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Link({}, up: {})", self.name, self.is_up())
    }
}

/// What a link connection needs to know about the switch.
#[derive(Debug, Clone)]
pub struct Identity {
    /// F32.
    pub institution_id: String,
    /// F33.
    pub forwarding_id: String,
}

/// `MMDDhhmmss` of now, in UTC (F7).
pub fn transmission_time() -> [u8; 10] {
    let now = chrono::Utc::now().format("%m%d%H%M%S").to_string();
    let mut out = [b'0'; 10];
    out.copy_from_slice(now.as_bytes());
    out
}

impl Link {
    /// Starts the connection tasks of an issuer link; `signed_on` is
    /// notified each time a connection signs on (the advice queue waiting
    /// for the issuer to come back).
    pub fn start(
        issuer: &config::Issuer,
        dialect: Arc<Dialect>,
        identity: Identity,
        signed_on: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> Arc<Link> {
        // One STAN counter for the link's own messages (sign-on, echo): no
        // two connections sign on with the same F11.
        let stan = Arc::new(AtomicU32::new(0));
        let connections = (0..issuer.connections)
            .map(|i| {
                let (tx, rx) = mpsc::channel(4096);
                let up = Arc::new(AtomicBool::new(false));
                let task = ConnectionTask {
                    name: format!("{}#{i}", issuer.name),
                    address: issuer.address.clone(),
                    echo_interval: issuer.echo_interval,
                    connect_timeout: issuer.connect_timeout,
                    reconnect_max: issuer.reconnect_max,
                    dialect: dialect.clone(),
                    identity: identity.clone(),
                    up: up.clone(),
                    signed_on: signed_on.clone(),
                    stan: stan.clone(),
                };
                tokio::spawn(task.run(rx, shutdown.clone()));
                Connection { tx, up }
            })
            .collect();
        Arc::new(Link {
            name: issuer.name.clone(),
            connections,
            next: AtomicUsize::new(0),
        })
    }

    /// The issuer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when at least one connection is signed on.
    pub fn is_up(&self) -> bool {
        self.connections
            .iter()
            .any(|c| c.up.load(Ordering::Acquire))
    }

    /// Waits until the link is up, or `timeout` passes; returns whether it is.
    pub async fn wait_up(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.is_up() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Sends a request frame (length prefix included) whose F11/F7 make `key`,
    /// and waits up to `timeout` for its reply.
    pub async fn exchange(
        &self,
        frame: Bytes,
        key: MatchKey,
        timeout: Duration,
    ) -> Result<Bytes, LinkError> {
        let n = self.connections.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let Some(conn) = (0..n)
            .map(|i| &self.connections[(start + i) % n])
            .find(|c| c.up.load(Ordering::Acquire))
        else {
            return Err(LinkError::NotSent);
        };
        let (reply, rx) = oneshot::channel();
        if conn.tx.send(Outgoing { frame, key, reply }).await.is_err() {
            return Err(LinkError::NotSent);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(LinkError::Lost),
            Err(_) => Err(LinkError::Timeout),
        }
    }
}

struct ConnectionTask {
    name: String,
    address: String,
    echo_interval: Duration,
    connect_timeout: Duration,
    reconnect_max: Duration,
    dialect: Arc<Dialect>,
    identity: Identity,
    up: Arc<AtomicBool>,
    /// Notified at each sign-on.
    signed_on: Arc<Notify>,
    /// STANs for network management messages (financial ones come from the
    /// database sequence; the MTI class keeps the two apart).
    stan: Arc<AtomicU32>,
}

type Pending = HashMap<MatchKey, oneshot::Sender<Result<Bytes, LinkError>>>;

/// The wait after a failed connect, doubled at each further one up to the
/// issuer's `reconnect_max`; a connection that signs on starts it again
/// (so a short-lived one waits this long).
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// How long a connection must have served to be dialled again at once when
/// it is lost.
const SERVED_A_WHILE: Duration = Duration::from_secs(1);

/// Whether a connection lost after serving for `served` is dialled again at
/// once. One that served a while was cut by the network or by the issuer's
/// end of one session: every request meanwhile would be declined 91, and
/// the issuer is most likely there to answer. One lost young (an issuer
/// that accepts and drops) waits the first back-off, as before.
fn dial_at_once(served: Duration) -> bool {
    served >= SERVED_A_WHILE
}

impl ConnectionTask {
    async fn run(self, mut rx: mpsc::Receiver<Outgoing>, shutdown: CancellationToken) {
        let mut backoff = FIRST_BACKOFF;
        // The last failure warned of: the same one again is told at debug
        // level only, so a long outage is one line, not one per try.
        let mut told: Option<String> = None;
        loop {
            // Nothing goes out before the connection is signed on: what is
            // queued meanwhile is declined, not sent late.
            let connecting = self.connect();
            tokio::pin!(connecting);
            let connected = loop {
                tokio::select! {
                    c = &mut connecting => break c,
                    Some(out) = rx.recv() => { let _ = out.reply.send(Err(LinkError::NotSent)); }
                    () = shutdown.cancelled() => return,
                }
            };
            match connected {
                Ok(stream) => {
                    backoff = FIRST_BACKOFF;
                    told = None;
                    info!(link = %self.name, "signed on");
                    self.up.store(true, Ordering::Release);
                    self.signed_on.notify_one();
                    let since = tokio::time::Instant::now();
                    self.serve(stream, &mut rx, &shutdown).await;
                    self.up.store(false, Ordering::Release);
                    if shutdown.is_cancelled() {
                        return;
                    }
                    warn!(link = %self.name, "connection lost");
                    if dial_at_once(since.elapsed()) {
                        continue;
                    }
                }
                Err(e) if told.as_ref() == Some(&e) => {
                    debug!(link = %self.name, error = %e, "connect failed");
                }
                Err(e) => {
                    warn!(
                        link = %self.name,
                        address = %self.address,
                        error = %e,
                        "cannot connect and sign on; requests for this issuer are declined 91 until it can"
                    );
                    told = Some(e);
                }
            }
            // Down: whatever is queued was never sent.
            let wait = tokio::time::sleep(backoff);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    () = &mut wait => break,
                    Some(out) = rx.recv() => { let _ = out.reply.send(Err(LinkError::NotSent)); }
                    () = shutdown.cancelled() => return,
                }
            }
            backoff = (backoff * 2).min(self.reconnect_max);
        }
    }

    /// A network management request (0800, F70 `code`); an error when the
    /// network dialect cannot carry it (which `load_dialects` refuses
    /// before a link starts).
    fn network_message(&self, code: u16) -> Result<(Bytes, MatchKey), String> {
        let stan = self.stan.fetch_add(1, Ordering::Relaxed) % 999_999 + 1;
        let f7 = transmission_time();
        let mut buf = BytesMut::with_capacity(64);
        let f7s = std::str::from_utf8(&f7).expect("digits");
        let built = MessageWriter::new(&self.dialect, &mut buf, Mti::NETWORK, &[], &[]).and_then(
            |mut w| {
                w.digits(7, f7s)?;
                w.number(11, u64::from(stan))?;
                w.digits(32, &self.identity.institution_id)?;
                w.digits(33, &self.identity.forwarding_id)?;
                w.number(70, u64::from(code))?;
                w.finish()
            },
        );
        built.map_err(|e| format!("the network dialect cannot carry an 0800: {e}"))?;
        let key = MatchKey {
            class: Mti::NETWORK.class(),
            stan,
            f7,
        };
        Ok((buf.freeze(), key))
    }

    /// Connects and signs on.
    async fn connect(&self) -> Result<TcpStream, String> {
        let attempt = async {
            let mut stream = TcpStream::connect(&self.address)
                .await
                .map_err(|e| e.to_string())?;
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            self.sign_on(&mut stream).await?;
            Ok::<_, String>(stream)
        };
        tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .map_err(|_| "sign-on timed out".to_string())?
    }

    async fn sign_on(&self, stream: &mut TcpStream) -> Result<(), String> {
        let (frame, key) = self.network_message(1)?;
        stream.write_all(&frame).await.map_err(|e| e.to_string())?;
        // Nothing is read past the sign-on reply: the issuer sends nothing unasked.
        let mut reader = FramedRead::new(stream, FrameCodec::new(&self.dialect, 65_535));
        loop {
            match reader.next().await {
                Some(Ok(Frame::Message(bytes))) => {
                    let msg = Message::parse(&self.dialect, &bytes).map_err(|e| e.to_string())?;
                    if MatchKey::of(&msg) == Some(key) {
                        return match msg.text(39) {
                            Some("00") => Ok(()),
                            other => Err(format!("sign-on refused: {other:?}")),
                        };
                    }
                }
                Some(Ok(Frame::KeepAlive)) => {}
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("closed during sign-on".into()),
            }
        }
    }

    async fn serve(
        &self,
        stream: TcpStream,
        rx: &mut mpsc::Receiver<Outgoing>,
        shutdown: &CancellationToken,
    ) {
        let (read, mut write) = stream.into_split();
        let mut reader = FramedRead::new(read, FrameCodec::new(&self.dialect, 65_535));
        let mut pending: Pending = HashMap::new();
        let mut out = BytesMut::with_capacity(16 * 1024);
        let mut batch = Vec::with_capacity(64);
        let mut last_heard = tokio::time::Instant::now();
        let mut echo: Option<(MatchKey, tokio::time::Instant)> = None;
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        // One timer for the echo test, moved on only when it fires: a new one
        // per reply would be registered and cancelled with the runtime's
        // timer wheel for every frame read.
        let echo_timer = tokio::time::sleep(self.echo_interval);
        tokio::pin!(echo_timer);
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, 64) => {
                    if n == 0 {
                        return;
                    }
                    out.clear();
                    for o in batch.drain(..) {
                        // Its caller gave up waiting: not sent at all
                        // rather than late.
                        if o.reply.is_closed() {
                            continue;
                        }
                        out.extend_from_slice(&o.frame);
                        pending.insert(o.key, o.reply);
                    }
                    if write.write_all(&out).await.is_err() {
                        return;
                    }
                }
                frame = reader.next() => {
                    match frame {
                        Some(Ok(Frame::Message(bytes))) => {
                            last_heard = tokio::time::Instant::now();
                            let key = match Message::parse(&self.dialect, &bytes) {
                                Ok(msg) => MatchKey::of(&msg),
                                Err(e) => {
                                    warn!(link = %self.name, error = %e, "unreadable reply");
                                    None
                                }
                            };
                            match key {
                                Some(k) if echo.is_some_and(|(ek, _)| ek == k) => echo = None,
                                Some(k) => match pending.remove(&k) {
                                    Some(tx) => { let _ = tx.send(Ok(bytes)); }
                                    None => debug!(link = %self.name, "reply with no waiting request"),
                                },
                                None => {}
                            }
                        }
                        Some(Ok(Frame::KeepAlive)) => last_heard = tokio::time::Instant::now(),
                        Some(Err(_)) | None => return,
                    }
                }
                () = &mut echo_timer, if echo.is_none() => {
                    let echo_due = last_heard + self.echo_interval;
                    if tokio::time::Instant::now() < echo_due {
                        // Heard from the issuer since it was set.
                        echo_timer.as_mut().reset(echo_due);
                        continue;
                    }
                    let Ok((frame, key)) = self.network_message(301) else {
                        // Sign-on built the same message: not reached.
                        return;
                    };
                    if write.write_all(&frame).await.is_err() {
                        return;
                    }
                    echo = Some((key, tokio::time::Instant::now() + self.connect_timeout));
                }
                _ = sweep.tick() => {
                    pending.retain(|_, tx| !tx.is_closed());
                    if echo.is_some_and(|(_, deadline)| tokio::time::Instant::now() > deadline) {
                        warn!(link = %self.name, "echo test unanswered");
                        return;
                    }
                }
                () = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio_util::codec::Decoder;

    /// An issuer that answers every message it reads with its MTI's reply
    /// (F7, F11, F39 `00`), the replies of one read in reverse order, and
    /// reports what it read.
    async fn issuer(listener: TcpListener, seen: mpsc::UnboundedSender<(Mti, u32, u16)>) {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer(stream, seen.clone()));
        }
    }

    async fn answer(mut stream: TcpStream, seen: mpsc::UnboundedSender<(Mti, u32, u16)>) {
        let dialect = Dialect::iso87();
        let mut codec = FrameCodec::new(&dialect, 65_535);
        let mut buf = BytesMut::new();
        loop {
            if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
            let mut replies = Vec::new();
            while let Some(frame) = codec.decode(&mut buf).expect("whole frames") {
                let Frame::Message(body) = frame else {
                    continue;
                };
                let msg = Message::parse(&dialect, &body).expect("an intact frame");
                let stan = msg.digits(11).unwrap().to_u64().unwrap() as u32;
                let code = msg.digits(70).and_then(|d| d.to_u64()).unwrap_or(0) as u16;
                seen.send((msg.mti(), stan, code)).unwrap();
                let mut out = BytesMut::new();
                let mut w = MessageWriter::reply(&dialect, &mut out, &msg);
                w.copy(7, &msg).unwrap();
                w.copy(11, &msg).unwrap();
                w.text(39, "00").unwrap();
                w.finish().unwrap();
                replies.push(out);
            }
            for out in replies.iter().rev() {
                stream.write_all(out).await.unwrap();
            }
        }
    }

    fn financial(dialect: &Dialect, stan: u32) -> (Bytes, MatchKey) {
        let mut buf = BytesMut::new();
        let mut w = MessageWriter::new(dialect, &mut buf, Mti::FINANCIAL, &[], &[]).unwrap();
        w.digits(7, "1203120000").unwrap();
        w.number(11, u64::from(stan)).unwrap();
        w.finish().unwrap();
        let frame = buf.freeze();
        let key = MatchKey::of(&Message::parse(dialect, &frame[2..]).unwrap()).unwrap();
        (frame, key)
    }

    async fn start(
        echo_interval: Duration,
    ) -> (Arc<Link>, mpsc::UnboundedReceiver<(Mti, u32, u16)>) {
        start_with(echo_interval, 1).await
    }

    async fn start_with(
        echo_interval: Duration,
        connections: usize,
    ) -> (Arc<Link>, mpsc::UnboundedReceiver<(Mti, u32, u16)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(issuer(listener, tx));
        let config = config::Issuer {
            name: "test".into(),
            bins: vec!["622202".into()],
            address,
            connections,
            echo_interval,
            connect_timeout: Duration::from_secs(5),
            reconnect_max: Duration::from_secs(1),
        };
        let identity = Identity {
            institution_id: "48560000".into(),
            forwarding_id: "48561000".into(),
        };
        let link = Link::start(
            &config,
            Arc::new(Dialect::iso87()),
            identity,
            Arc::new(Notify::new()),
            CancellationToken::new(),
        );
        assert!(link.wait_up(Duration::from_secs(5)).await);
        (link, rx)
    }

    #[tokio::test]
    async fn the_connections_of_a_link_sign_on_with_stans_of_their_own() {
        let (_link, mut seen) = start_with(Duration::from_secs(60), 3).await;
        let mut stans = Vec::new();
        while stans.len() < 3 {
            let (mti, stan, code) = seen.recv().await.unwrap();
            assert_eq!((mti, code), (Mti::NETWORK, 1), "a sign-on");
            stans.push(stan);
        }
        stans.sort_unstable();
        stans.dedup();
        assert_eq!(stans.len(), 3, "two sign-ons with one F11: {stans:?}");
    }

    #[test]
    fn a_connection_that_served_a_while_is_dialled_again_at_once() {
        assert!(dial_at_once(Duration::from_secs(30)));
        assert!(dial_at_once(SERVED_A_WHILE));
        // Accepted and dropped at once: back off, as a failed connect.
        assert!(!dial_at_once(Duration::from_millis(5)));
        assert!(!dial_at_once(SERVED_A_WHILE - Duration::from_millis(1)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_queued_together_arrive_whole_and_each_reply_finds_its_request() {
        let (link, mut seen) = start(Duration::from_secs(60)).await;
        assert_eq!(seen.recv().await.unwrap().2, 1, "signed on");
        let dialect = Dialect::iso87();
        // Queued faster than one write each: they leave in batches.
        let exchanges: Vec<_> = (1..=500u32)
            .map(|stan| {
                let (frame, key) = financial(&dialect, stan);
                let link = link.clone();
                tokio::spawn(
                    async move { link.exchange(frame, key, Duration::from_secs(10)).await },
                )
            })
            .collect();
        for (stan, exchange) in (1..=500u32).zip(exchanges) {
            let reply = exchange.await.unwrap().expect("a reply");
            let msg = Message::parse(&dialect, &reply).unwrap();
            assert_eq!(msg.digits(11).unwrap().to_u64(), Some(u64::from(stan)));
        }
        let mut stans = Vec::new();
        while let Ok((mti, stan, _)) = seen.try_recv() {
            assert_eq!(mti, Mti::FINANCIAL);
            stans.push(stan);
        }
        stans.sort_unstable();
        assert_eq!(stans, (1..=500).collect::<Vec<_>>(), "each exactly once");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_echo_test_goes_out_when_idle_and_not_while_replies_come() {
        let (link, mut seen) = start(Duration::from_millis(300)).await;
        assert_eq!(seen.recv().await.unwrap().2, 1, "signed on");
        let dialect = Dialect::iso87();
        // Busy for twice the interval: a reply at least every 50 ms.
        let busy_until = tokio::time::Instant::now() + Duration::from_millis(600);
        let mut stan = 0;
        while tokio::time::Instant::now() < busy_until {
            stan += 1;
            let (frame, key) = financial(&dialect, stan);
            link.exchange(frame, key, Duration::from_secs(5))
                .await
                .expect("a reply");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        while let Ok((mti, _, _)) = seen.try_recv() {
            assert_eq!(mti, Mti::FINANCIAL, "no echo test while busy");
        }
        // Then idle: the echo test comes about an interval after the last reply.
        let (mti, _, code) = tokio::time::timeout(Duration::from_secs(5), seen.recv())
            .await
            .expect("an echo test in time")
            .unwrap();
        assert_eq!((mti, code), (Mti::NETWORK, 301));
        assert!(link.is_up());
    }
}
