//! The admin listener (`[admin] listen`): `GET /health` for a load balancer
//! or an orchestrator, `GET /metrics` for Prometheus. Plain HTTP/1.1, meant
//! for the operators' network only: it shows no card data, and takes no
//! command.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::model::{Kind, ResponseCode};
use crate::router::Switch;
use group_commit::postgres::Said;

/// What the terminals were answered, and what the switch holds, for
/// `/metrics`. The request path only counts (a map lookup for the kind and
/// code, and the latency histogram's lock, uncontended on the switch's one
/// thread); the rest is read when Prometheus asks.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Answered, Counter>,
    latency: Histogram,
    connections: Gauge,
    links_up: Family<IssuerLabel, Gauge>,
    advices: Family<AdviceLabel, Gauge>,
    journal_batches: Counter,
    journal_writes: Counter,
    journal_dropped: Counter,
    journal_busy: Counter<f64, AtomicU64>,
    database_up: Gauge,
    /// Set once the terminal listener takes connections: `/health` says
    /// `starting` until then (the issuer links are waited for first).
    pub(crate) serving: std::sync::atomic::AtomicBool,
    /// One scrape at a time: the counters read from the journal's writer
    /// are moved on by what changed since the last.
    scraping: tokio::sync::Mutex<()>,
    /// The last look at the database for `/health`, and when: probes that
    /// come often share one statement a second, and take no more of the
    /// pool the terminals' requests need.
    database_seen: tokio::sync::Mutex<Option<(tokio::time::Instant, String)>>,
}

/// The labels of a request answered.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Answered {
    /// The transaction kind (`purchase`, `reversal`, ...; `unknown` when
    /// the message is of no kind the switch knows).
    kind: &'static str,
    /// F39 of the reply as sent (`none` when it carries none).
    rc: Code,
}

/// F39 as a label value, without a string of its own per request.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
struct Code(Option<ResponseCode>);

impl EncodeLabelValue for Code {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        std::fmt::Write::write_str(
            encoder,
            self.0.as_ref().map_or("none", ResponseCode::as_str),
        )
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuerLabel {
    issuer: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdviceLabel {
    /// `pending` (still to be answered by the issuer) or `failed` (given
    /// up, for an operator).
    state: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered under the `switchyard` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("switchyard");
        let requests = Family::<Answered, Counter>::default();
        registry.register(
            "requests",
            "Terminal requests answered, by transaction kind and response code (F39)",
            requests.clone(),
        );
        // 1 ms to 20 s, 1-2-5: a p99 goal of 20 ms and an issuer timeout of
        // 10 s fall on bucket bounds.
        let latency = Histogram::new([
            0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0,
        ]);
        registry.register_with_unit(
            "request_duration",
            "Time from a terminal request decoded to its reply built",
            Unit::Seconds,
            latency.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "terminal_connections",
            "Terminal connections open",
            connections.clone(),
        );
        let links_up = Family::<IssuerLabel, Gauge>::default();
        registry.register(
            "issuer_link_up",
            "1 when the issuer link is signed on, 0 when it is down",
            links_up.clone(),
        );
        let advices = Family::<AdviceLabel, Gauge>::default();
        registry.register(
            "advices",
            "Stored advices (reversals 0420, refunds and completions 0220) by state",
            advices.clone(),
        );
        let journal_batches = Counter::default();
        registry.register(
            "journal_batches",
            "Statements the journal's group commit sent",
            journal_batches.clone(),
        );
        let journal_writes = Counter::default();
        registry.register(
            "journal_writes",
            "Journal writes (rows, outcomes, reads of originals) in those statements",
            journal_writes.clone(),
        );
        let journal_dropped = Counter::default();
        registry.register(
            "journal_writes_dropped",
            "Journal writes dropped unsent after waiting too long for their batch (answered 96)",
            journal_dropped.clone(),
        );
        let journal_busy = Counter::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "journal_busy",
            "Time the journal's statements took, summed",
            Unit::Seconds,
            journal_busy.clone(),
        );
        let database_up = Gauge::default();
        registry.register(
            "database_up",
            "1 when the journal's database answered the last look (within 2 s), 0 when not",
            database_up.clone(),
        );
        registry.register(
            "build",
            "The switch's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Metrics {
            registry,
            database_up,
            serving: std::sync::atomic::AtomicBool::new(false),
            requests,
            latency,
            connections,
            links_up,
            advices,
            journal_batches,
            journal_writes,
            journal_dropped,
            journal_busy,
            scraping: tokio::sync::Mutex::new(()),
            database_seen: tokio::sync::Mutex::new(None),
        }
    }

    /// Counts a request of `kind` (none: of no kind the switch knows)
    /// answered with `rc` (none: the reply carries no F39, or nothing was
    /// sent).
    pub(crate) fn answered(&self, kind: Option<Kind>, rc: Option<ResponseCode>, took: Duration) {
        self.requests
            .get_or_create(&Answered {
                kind: kind.map_or("unknown", Kind::as_str),
                rc: Code(rc),
            })
            .inc();
        self.latency.observe(took.as_secs_f64());
    }

    /// Counts a terminal connection open until the guard is dropped,
    /// however its session ends.
    pub(crate) fn connection(&self) -> impl Drop + use<> {
        struct Open(Gauge);
        impl Drop for Open {
            fn drop(&mut self) {
                self.0.dec();
            }
        }
        self.connections.inc();
        Open(self.connections.clone())
    }
}

/// What `/health` found.
#[derive(Debug)]
struct Health {
    /// 200 or 503.
    status: StatusCode,
    body: serde_json::Value,
}

/// Serves `/health` and `/metrics` on `listener` until `shutdown` and a
/// little after: while the switch drains, `/health` says it is stopping,
/// so that a load balancer sends no new terminal there.
pub async fn serve(listener: TcpListener, switch: Arc<Switch>, stopped: CancellationToken) {
    // The admin port is for a scraper and a probe or two, not a crowd: past
    // 32 at once, a new connection waits in the listen queue for a slot
    // rather than be refused, and none stays open after its answer.
    let room = Arc::new(Semaphore::new(32));
    loop {
        let permit = tokio::select! {
            p = room.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = stopped.cancelled() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stopped.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, say: try again in a moment.
                warn!(error = %e, "admin listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let switch = switch.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let switch = switch.clone();
                async move { Ok::<_, Infallible>(respond(&switch, &req).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                debug!(%peer, error = %e, "admin connection ended");
            }
            drop(permit);
        });
    }
}

async fn respond(switch: &Switch, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(path, "/health" | "/metrics") {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: the admin listener serves GET /health and GET /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if path == "/health" {
        let h = health(switch).await;
        let mut r = Response::new(Full::new(Bytes::from(format!("{:#}\n", h.body))));
        *r.status_mut() = h.status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        return r;
    }
    match metrics(switch).await {
        Ok(text) => {
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Whether the switch can serve: its database answers (within 2 s) and it
/// takes terminals. 503 `starting` until its listener does (the issuer
/// links are waited for first), `failing` when the database does not
/// answer, `stopping` from a stop until it has drained. Issuer links down
/// make it `degraded`, still 200: their cards hear `91`, but reversals,
/// refunds, settlements and sign-ons are still served, and every switch
/// shares the issuers, so another would do no better.
async fn health(switch: &Switch) -> Health {
    let database = database(switch).await;
    let issuers: serde_json::Map<String, serde_json::Value> = switch
        .links
        .iter()
        .map(|l| {
            let up = if l.is_up() { "up" } else { "down" };
            (l.name().to_string(), up.into())
        })
        .collect();
    let up = switch.links.iter().filter(|l| l.is_up()).count();
    let stopped_because = switch.stopped_because.lock().ok().and_then(|w| w.clone());
    // The stop's token, cancelled before anything else of a stop.
    let stopping = switch.stopping.is_cancelled();
    let serving = switch
        .metrics
        .serving
        .load(std::sync::atomic::Ordering::Relaxed);
    let (status, word) = if stopping || stopped_because.is_some() {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping")
    } else if database != "ok" {
        (StatusCode::SERVICE_UNAVAILABLE, "failing")
    } else if !serving {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    } else if up < switch.links.len() {
        (StatusCode::OK, "degraded")
    } else {
        (StatusCode::OK, "ok")
    };
    let mut body = serde_json::json!({
        "status": word,
        "database": database,
        "issuers": issuers,
    });
    if let Some(why) = stopped_because {
        body["stopped_because"] = why.into();
    }
    Health { status, body }
}

/// Whether the database answers through the switch's pool within 2 s:
/// `ok` or why not, looked at once a second at most.
async fn database(switch: &Switch) -> String {
    let mut seen = switch.metrics.database_seen.lock().await;
    if let Some((at, said)) = &*seen
        && at.elapsed() < Duration::from_secs(1)
    {
        return said.clone();
    }
    let said = match tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&switch.pool),
    )
    .await
    {
        Ok(Ok(_)) => "ok".to_string(),
        Ok(Err(e)) => format!("failing: {}", Said(&e)),
        Err(_) => "failing: no answer within 2 s".to_string(),
    };
    switch.metrics.database_up.set(i64::from(said == "ok"));
    *seen = Some((tokio::time::Instant::now(), said.clone()));
    said
}

/// The metrics as OpenMetrics text, the gauges read now.
async fn metrics(switch: &Switch) -> Result<String, String> {
    let m = &switch.metrics;
    let _one = m.scraping.lock().await;
    for link in &switch.links {
        m.links_up
            .get_or_create(&IssuerLabel {
                issuer: link.name().to_string(),
            })
            .set(i64::from(link.is_up()));
    }
    // A scrape answers within Prometheus's timeout (10 s by default) even
    // with the database away: the queue is read only when the database
    // answered its last look, for a second at most; otherwise its series
    // are left out rather than shown stale, and `database_up` says why.
    let counted = if database(switch).await == "ok" {
        tokio::time::timeout(
            Duration::from_secs(1),
            sqlx::query_as::<_, (i64, i64)>(
                "SELECT (SELECT count(*) FROM advices WHERE state = 'pending'),
                        (SELECT count(*) FROM advices WHERE state = 'failed')",
            )
            .fetch_one(&switch.pool),
        )
        .await
        .map_err(|_| "no answer within 1 s".to_string())
        .and_then(|r| r.map_err(|e| Said(&e).to_string()))
    } else {
        Err("the database is failing".to_string())
    };
    match counted {
        Ok((pending, failed)) => {
            m.advices
                .get_or_create(&AdviceLabel { state: "pending" })
                .set(pending);
            m.advices
                .get_or_create(&AdviceLabel { state: "failed" })
                .set(failed);
        }
        Err(e) => {
            m.advices.clear();
            debug!(error = %e, "metrics: the advice queue not read");
        }
    }
    let stats = switch.writer.stats();
    let moved = |c: &Counter, now: u64| {
        c.inc_by(now.saturating_sub(c.get()));
    };
    moved(&m.journal_batches, stats.batches);
    moved(&m.journal_writes, stats.jobs);
    moved(&m.journal_dropped, stats.expired);
    let busy = stats.busy.as_secs_f64() - m.journal_busy.get();
    if busy > 0.0 {
        m.journal_busy.inc_by(busy);
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &m.registry)
        .map_err(|e| format!("encoding the metrics failed: {e}"))?;
    Ok(text)
}
