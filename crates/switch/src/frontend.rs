//! The terminal listener: one task per connection, bounded.
//!
//! A connection limit, a per-connection in-flight limit, an idle timeout and
//! a frame timeout (a frame must arrive whole within it once its first byte
//! is in). Three kinds of bad input, three answers: "need more bytes" is not
//! an error; a frame that cannot be framed closes the connection; a message
//! that frames but is bad gets a reply with a response code.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use iso8583::{Frame, FrameCodec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::router::{Outcome, Switch};

/// Accepts terminal connections until `shutdown`, then waits for the
/// connections' in-flight requests to finish, for at most
/// `limits.shutdown_grace`; false when the grace ran out first.
pub async fn serve(
    listener: TcpListener,
    switch: Arc<Switch>,
    shutdown: CancellationToken,
) -> bool {
    let limits = switch.config.limits.clone();
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            warn!(%peer, limit = limits.max_connections, "connection limit reached: refusing");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let s = switch.clone();
        let stop = shutdown.clone();
        tracker.spawn(
            async move {
                session(stream, peer, s, stop).await;
                drop(permit);
            }
            .instrument(info_span!("connection", %peer)),
        );
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(limits.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        warn!("shutdown grace over with requests still in flight");
        return false;
    }
    true
}

async fn session(
    stream: TcpStream,
    peer: SocketAddr,
    switch: Arc<Switch>,
    shutdown: CancellationToken,
) {
    let limits = &switch.config.limits;
    let _counted = switch.metrics.connection();
    let (mut read, mut write) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<BytesMut>(limits.max_in_flight.max(1) * 2);
    let writer = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(16);
        let mut out = BytesMut::with_capacity(4096);
        while rx.recv_many(&mut batch, 16).await > 0 {
            out.clear();
            for frame in batch.drain(..) {
                out.extend_from_slice(&frame);
            }
            if write.write_all(&out).await.is_err() {
                break;
            }
        }
        let _ = write.shutdown().await;
    });

    let in_flight = Arc::new(Semaphore::new(limits.max_in_flight));
    // Cancelled when a message cannot be attributed to a terminal.
    let close = CancellationToken::new();
    let tasks = TaskTracker::new();
    let mut codec = FrameCodec::new(&switch.terminal_dialect, limits.max_frame);
    let mut buf = BytesMut::with_capacity(4096);
    let mut last_frame = Instant::now();
    let mut partial_since: Option<Instant> = None;
    // One timer for the idle and frame timeouts: set earlier when a deadline
    // comes nearer, and moved on only when it fires early. A new sleep per
    // read would be registered and cancelled with the timer wheel every time.
    let mut timer_at = last_frame + limits.idle_timeout;
    let timer = tokio::time::sleep_until(timer_at);
    tokio::pin!(timer);
    'read: loop {
        // Hand out every whole frame in the buffer.
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(Frame::KeepAlive)) => last_frame = Instant::now(),
                Ok(Some(Frame::Message(frame))) => {
                    last_frame = Instant::now();
                    let Ok(permit) = in_flight.clone().acquire_owned().await else {
                        break 'read;
                    };
                    let s = switch.clone();
                    let tx = tx.clone();
                    let close = close.clone();
                    tasks.spawn(async move {
                        let mut out = BytesMut::with_capacity(256);
                        match s.handle(&frame, &mut out).await {
                            Outcome::Reply => {
                                let _ = tx.send(out).await;
                            }
                            Outcome::Ignore => {}
                            Outcome::Close => close.cancel(),
                        }
                        drop(permit);
                    });
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(%peer, error = %e, "cannot frame: closing the connection");
                    break 'read;
                }
            }
        }
        partial_since = match (buf.is_empty(), partial_since) {
            (true, _) => None,
            (false, None) => Some(Instant::now()),
            (false, since) => since,
        };
        let deadline = match partial_since {
            Some(since) => since + limits.frame_timeout,
            None => last_frame + limits.idle_timeout,
        };
        if deadline < timer_at {
            timer_at = deadline;
            timer.as_mut().reset(deadline);
        }
        buf.reserve(1024);
        tokio::select! {
            n = read.read_buf(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            () = &mut timer => {
                if Instant::now() < deadline {
                    // Set for an earlier deadline that has moved on.
                    timer_at = deadline;
                    timer.as_mut().reset(deadline);
                    continue;
                }
                if partial_since.is_some() {
                    warn!(%peer, "frame timeout: closing the connection");
                } else {
                    debug!(%peer, "idle timeout: closing the connection");
                }
                break;
            }
            () = shutdown.cancelled() => break,
            () = close.cancelled() => {
                warn!(%peer, "unidentifiable message: closing the connection");
                break;
            }
        }
    }
    // Whatever was accepted gets its answer before the connection closes.
    tasks.close();
    tasks.wait().await;
    drop(tx);
    let _ = writer.await;
    info!(%peer, "connection closed");
}
