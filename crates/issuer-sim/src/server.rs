//! The issuer's server: one task per switch connection, and on each
//! connection one task per message, so that the requests the switch
//! multiplexes on a link are decided concurrently and answered as they
//! complete (the switch matches replies by MTI class + F11 + F7).
//!
//! Three kinds of bad input: "need more bytes" is waited for; a stream that
//! cannot be framed, or a frame whose MTI, F11 and F7 cannot be read, closes
//! the connection; a message with a bad field is answered `30`.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use group_commit::postgres::Said;
use iso8583::framing::DEFAULT_MAX_FRAME;
use iso8583::{BuildError, Dialect, Frame, FrameCodec, Message, MessageWriter};
use sqlx::PgPool;

use crate::batches::Batches;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::books::{Outcome, code};
use crate::config::IssuerConfig;
use crate::faults::{Fate, FaultControl};
use crate::key::PanKey;
use crate::request::{self, Inbound, Refusal, Salvaged};

/// The simulated issuer: its config, key, database and faults.
pub struct Issuer {
    config: IssuerConfig,
    key: PanKey,
    pool: PgPool,
    dialect: Dialect,
    faults: FaultControl,
    batches: Batches,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("institution_id", &self.config.institution_id)
            .field("faults", &self.faults)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// An issuer over `pool` (migrated, and seeded with [`crate::seed_cards`]),
    /// with the faults of `config` in force.
    pub fn new(config: IssuerConfig, key: PanKey, pool: PgPool) -> Issuer {
        Issuer {
            faults: FaultControl::new(config.faults.clone()),
            config,
            key,
            pool,
            dialect: Dialect::iso87(),
            batches: Batches::default(),
        }
    }

    /// The handle that changes faults while the issuer runs.
    pub fn faults(&self) -> FaultControl {
        self.faults.clone()
    }

    /// The config it was made with.
    pub fn config(&self) -> &IssuerConfig {
        &self.config
    }

    /// Its database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Its batches of new authorisations so far (none before the first).
    pub fn authorisation_stats(&self) -> group_commit::Stats {
        self.batches.authorisation_stats()
    }

    /// How its decisions are batched.
    fn limits(&self) -> group_commit::Limits {
        group_commit::Limits {
            max_batch: self.config.limits.max_batch,
            in_flight: self.config.limits.batches_in_flight,
            delay: self.config.limits.batch_delay,
        }
    }
}

/// Serves switch connections on `listener` until `shutdown` is cancelled;
/// then stops accepting, lets every connection finish the messages it has
/// (writing their replies; late replies are abandoned), and returns.
pub async fn run(
    listener: TcpListener,
    issuer: Arc<Issuer>,
    shutdown: CancellationToken,
) -> Result<(), crate::Error> {
    let connections = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(issuer.config.limits.max_connections));
    let planning = std::time::Instant::now();
    match issuer.batches.plan(issuer.limits(), &issuer.pool).await {
        Ok(n) => info!(
            connections = n,
            ms = planning.elapsed().as_millis() as u64,
            "batch statements planned"
        ),
        Err(e) => {
            warn!(error = %Said(&e), "could not plan the batch statements ahead; they are planned at first use")
        }
    }
    info!(
        addr = %listener.local_addr()?,
        institution = %issuer.config.institution_id,
        "issuer listening"
    );
    // Every `limits.stats_interval` with traffic, one line on how its new
    // authorisations were batched, as the switch logs its journal's.
    let stats = {
        let (issuer, stop) = (issuer.clone(), shutdown.clone());
        let every = issuer.config.limits.stats_interval;
        tokio::spawn(async move {
            group_commit::report_every(
                every,
                || issuer.authorisation_stats(),
                |batches, over| {
                    info!(
                        "authorisation batches, last {every:?}: {}",
                        batches.summary("authorisations", over)
                    );
                },
                stop.cancelled(),
            )
            .await;
        })
    };
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(%peer, "connection limit reached; closing");
            continue;
        };
        let (issuer, shutdown) = (issuer.clone(), shutdown.clone());
        connections.spawn(
            async move {
                debug!("switch connected");
                connection(issuer, socket, shutdown).await;
                debug!("connection closed");
                drop(slot);
            }
            .instrument(info_span!("connection", %peer)),
        );
    }
    connections.close();
    connections.wait().await;
    stats.abort();
    info!("issuer stopped");
    Ok(())
}

/// What the writer of a connection is asked to do.
#[derive(Debug)]
enum Out {
    /// Write a reply.
    Reply(Bytes),
    /// Write the first half of a reply, then close the connection.
    Cut(Bytes),
}

async fn connection(issuer: Arc<Issuer>, socket: TcpStream, shutdown: CancellationToken) {
    let _ = socket.set_nodelay(true);
    let (read, write) = socket.into_split();
    let mut frames = FramedRead::new(read, FrameCodec::new(&issuer.dialect, DEFAULT_MAX_FRAME));
    let max_in_flight = issuer.config.limits.max_in_flight;
    // Cancelled when the connection is to be dropped at once (a cut reply,
    // a failed write, a frame that cannot be read).
    let abort = CancellationToken::new();
    let (tx, rx) = mpsc::channel(max_in_flight);
    let writer = tokio::spawn(write_replies(write, rx, abort.clone()));
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    let messages = TaskTracker::new();
    loop {
        let frame = tokio::select! {
            biased;
            () = abort.cancelled() => break,
            () = shutdown.cancelled() => break,
            frame = frames.next() => frame,
        };
        let body = match frame {
            None => break,
            Some(Err(e)) => {
                warn!(error = %e, "cannot frame; closing the connection");
                abort.cancel();
                break;
            }
            Some(Ok(Frame::KeepAlive)) => continue,
            Some(Ok(Frame::Message(body))) => body,
        };
        let permit = tokio::select! {
            () = abort.cancelled() => break,
            permit = in_flight.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let salvaged = match Message::parse(&issuer.dialect, &body) {
            Ok(_) => None,
            Err(e) => match request::salvage(&issuer.dialect, &body) {
                Some(head) => {
                    warn!(error = %e, mti = %head.mti, stan = %head.stan, "malformed message; answering 30");
                    Some(head)
                }
                None => {
                    warn!(error = %e, "unreadable message; closing the connection");
                    abort.cancel();
                    break;
                }
            },
        };
        let task = Task {
            issuer: issuer.clone(),
            tx: tx.clone(),
            shutdown: shutdown.clone(),
            abort: abort.clone(),
        };
        messages.spawn(async move {
            task.handle(body, salvaged).await;
            drop(permit);
        });
    }
    messages.close();
    messages.wait().await;
    drop(tx);
    let _ = writer.await;
}

/// The most a writer gathers into one write: replies queued together go out
/// in one system call (and wake the switch once), up to this many bytes.
const WRITE_BATCH: usize = 64 * 1024;

async fn write_replies(
    mut write: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Out>,
    abort: CancellationToken,
) {
    let mut buf = BytesMut::with_capacity(WRITE_BATCH);
    loop {
        let first = tokio::select! {
            () = abort.cancelled() => break,
            out = rx.recv() => match out {
                Some(out) => out,
                None => break,
            },
        };
        // Gather what else is queued already, in order, up to a cut (whose
        // half ends the connection: nothing queued after it is written).
        buf.clear();
        let mut cut = false;
        let mut next = Some(first);
        while let Some(out) = next.take() {
            match out {
                Out::Reply(frame) => buf.extend_from_slice(&frame),
                Out::Cut(frame) => {
                    buf.extend_from_slice(&frame[..frame.len() / 2]);
                    cut = true;
                    break;
                }
            }
            if buf.len() < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if cut {
            let _ = write.write_all(&buf).await;
            let _ = write.flush().await;
            info!("fault: reply cut, closing the connection");
            abort.cancel();
            break;
        }
        if let Err(e) = write.write_all(&buf).await {
            debug!(error = %e, "write failed; closing the connection");
            abort.cancel();
            break;
        }
    }
    let _ = write.shutdown().await;
}

/// What one message's task needs.
struct Task {
    issuer: Arc<Issuer>,
    tx: mpsc::Sender<Out>,
    shutdown: CancellationToken,
    abort: CancellationToken,
}

impl Task {
    async fn handle(self, body: Bytes, salvaged: Option<Salvaged>) {
        let reply = match &salvaged {
            Some(head) => (format_error_reply(&self.issuer.dialect, head), false),
            None => {
                let msg =
                    Message::parse(&self.issuer.dialect, &body).expect("parsed by the reader");
                let span = info_span!(
                    "message",
                    mti = %msg.mti(),
                    stan = msg.digits(11).map(|d| d.to_string()).unwrap_or_default(),
                    rrn = msg.text(37).unwrap_or_default(),
                    pan = tracing::field::Empty,
                    rc = tracing::field::Empty,
                );
                let financial = msg.mti().class() != 8;
                (answer(&self.issuer, &msg).instrument(span).await, financial)
            }
        };
        let (reply, financial) = reply;
        match reply {
            Ok(Some(frame)) => self.deliver(frame.freeze(), financial).await,
            Ok(None) => {}
            Err(e) => error!(error = %e, "cannot build the reply"),
        }
    }

    /// Writes the reply, or not, as the faults say; a financial one waits
    /// while replies are held.
    async fn deliver(&self, frame: Bytes, financial: bool) {
        if financial && self.issuer.faults.held() {
            tokio::select! {
                () = self.issuer.faults.while_held() => {}
                () = self.shutdown.cancelled() => {}
                () = self.abort.cancelled() => return,
            }
        }
        let out = match self.issuer.faults.draw() {
            Fate::Answer(after) => {
                if !after.is_zero() {
                    // Shutting down: answer now rather than later.
                    tokio::select! {
                        () = tokio::time::sleep(after) => {}
                        () = self.shutdown.cancelled() => {}
                        () = self.abort.cancelled() => return,
                    }
                }
                Out::Reply(frame)
            }
            Fate::Drop => {
                info!("fault: reply dropped");
                return;
            }
            Fate::Late(after) => {
                info!(after_ms = after.as_millis() as u64, "fault: reply late");
                tokio::select! {
                    () = tokio::time::sleep(after) => Out::Reply(frame),
                    () = self.shutdown.cancelled() => return,
                    () = self.abort.cancelled() => return,
                }
            }
            Fate::Close => Out::Cut(frame),
        };
        let _ = self.tx.send(out).await;
    }
}

/// Decides a message and builds its reply; `None`: nothing to answer.
async fn answer(issuer: &Issuer, msg: &Message<'_>) -> Result<Option<BytesMut>, BuildError> {
    let mti = msg.mti();
    if !mti.is_request() {
        warn!("not a request or advice; ignored");
        return Ok(None);
    }
    let outcome = match request::read(msg) {
        Err(Refusal::Format(why)) => {
            warn!(why, "format error");
            Outcome::code_only(code::FORMAT_ERROR)
        }
        Err(Refusal::Unsupported(why)) => {
            warn!(why, "unsupported transaction");
            Outcome::code_only(code::INVALID_TRANSACTION)
        }
        Err(Refusal::Amount) => Outcome::code_only(code::INVALID_AMOUNT),
        Ok(Inbound::Network(code)) => {
            let known = match code {
                1 => Some("sign-on"),
                2 => Some("sign-off"),
                301 => Some("echo"),
                _ => None,
            };
            match known {
                Some(what) => {
                    debug!(what, "network management");
                    Outcome::code_only(code::APPROVED)
                }
                None => Outcome::code_only(code::INVALID_TRANSACTION),
            }
        }
        Ok(Inbound::Posting(req)) => {
            if let Some(pan) = &req.pan {
                tracing::Span::current().record("pan", tracing::field::display(pan));
            }
            match issuer
                .batches
                .decide(issuer.limits(), &issuer.pool, &issuer.key, &req)
                .await
            {
                Ok(outcome) => outcome,
                Err(e) if req.is_advice() => {
                    // Not recorded: stay silent, so the switch sends it again.
                    error!(error = %Said(&e), "cannot record the advice; not answered");
                    return Ok(None);
                }
                Err(e) => {
                    error!(error = %Said(&e), "cannot decide the request; answering 96");
                    Outcome::code_only(code::SYSTEM_ERROR)
                }
            }
        }
    };
    tracing::Span::current().record("rc", outcome.code.as_str());
    debug!(code = %outcome.code, "answered");
    reply(&issuer.dialect, msg, &outcome).map(Some)
}

/// The reply: F3, F4, F7, F11, F32, F33, F37 echoed when present, F38 when
/// approved with an auth code, F39, F41 and F42 echoed, F54 for a balance,
/// F70 echoed in an 0810. Never F2, F35 or F52.
fn reply(dialect: &Dialect, msg: &Message<'_>, outcome: &Outcome) -> Result<BytesMut, BuildError> {
    let mut buf = BytesMut::with_capacity(160);
    let mut w = MessageWriter::reply(dialect, &mut buf, msg);
    for n in [3, 4, 7, 11, 32, 33, 37] {
        w.copy(n, msg)?;
    }
    if let Some(auth) = &outcome.auth_code {
        w.text(38, auth)?;
    }
    w.text(39, &outcome.code)?;
    for n in [41, 42] {
        w.copy(n, msg)?;
    }
    if let Some(available) = outcome.available {
        w.text(54, &additional_amount(available))?;
    }
    w.copy(70, msg)?;
    w.finish()?;
    Ok(buf)
}

/// F54 of a balance inquiry: account type `10`, amount type `02`
/// (available), currency `156`, `C` or `D`, 12 digits of fen.
fn additional_amount(available: i64) -> String {
    let sign = if available < 0 { 'D' } else { 'C' };
    format!("1002156{sign}{:012}", available.unsigned_abs())
}

/// The `30` reply to a message that does not parse: its F7 and F11 only.
fn format_error_reply(dialect: &Dialect, head: &Salvaged) -> Result<Option<BytesMut>, BuildError> {
    if !head.mti.is_request() {
        return Ok(None);
    }
    let mut buf = BytesMut::with_capacity(64);
    let mut w = MessageWriter::new(dialect, &mut buf, head.mti.reply(), &[], &[])?;
    w.digits(7, &head.transmitted)?;
    w.digits(11, &head.stan)?;
    w.text(39, code::FORMAT_ERROR)?;
    w.finish()?;
    Ok(Some(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair on the loopback: the writer's half and the reader.
    async fn pair() -> (OwnedWriteHalf, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap());
        let (ours, (theirs, _)) = tokio::join!(ours, async { listener.accept().await.unwrap() });
        let (_, write) = theirs.into_split();
        (write, ours.unwrap())
    }

    fn frame(n: u8, len: usize) -> Bytes {
        let mut f = vec![n; len + 2];
        f[..2].copy_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
        Bytes::from(f)
    }

    #[tokio::test]
    async fn replies_queued_together_go_out_whole_and_in_order() {
        use tokio::io::AsyncReadExt;
        let (write, mut read) = pair().await;
        let (tx, rx) = mpsc::channel(256);
        // More than one write's worth, queued before the writer runs.
        let sent: Vec<Bytes> = (0..200u8)
            .map(|n| frame(n, 100 + usize::from(n) * 3))
            .collect();
        for f in &sent {
            tx.send(Out::Reply(f.clone())).await.unwrap();
        }
        drop(tx);
        tokio::spawn(write_replies(write, rx, CancellationToken::new()));
        let mut got = Vec::new();
        read.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, sent.concat());
    }

    #[tokio::test]
    async fn a_cut_queued_behind_replies_ends_the_connection_after_them() {
        use tokio::io::AsyncReadExt;
        let (write, mut read) = pair().await;
        let (tx, rx) = mpsc::channel(8);
        let (a, b, cut, after) = (frame(1, 40), frame(2, 50), frame(3, 60), frame(4, 70));
        tx.send(Out::Reply(a.clone())).await.unwrap();
        tx.send(Out::Reply(b.clone())).await.unwrap();
        tx.send(Out::Cut(cut.clone())).await.unwrap();
        tx.send(Out::Reply(after)).await.unwrap();
        let abort = CancellationToken::new();
        let writer = tokio::spawn(write_replies(write, rx, abort.clone()));
        let mut got = Vec::new();
        read.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert!(abort.is_cancelled(), "the connection is dropped");
        assert_eq!(got, [&a[..], &b[..], &cut[..cut.len() / 2]].concat());
    }

    #[test]
    fn f54_carries_the_available_balance() {
        assert_eq!(additional_amount(1_000_000), "1002156C000001000000");
        assert_eq!(additional_amount(-5), "1002156D000000000005");
    }
}
