//! The router: one terminal request in, one reply out.
//!
//! It identifies the terminal and merchant (K1), checks the batch, catches
//! duplicates (D1, D2) through the journal's unique key, journals the
//! request `sent` before the issuer hears of it, and the outcome before the
//! terminal does (T1, T2).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use iso8583::{Dialect, Message, MessageWriter, Mti, Pan, ParseError, ParseErrorKind, Part};
use sha2::Digest;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, warn};

use crate::config::{Config, DuplicatePolicy};
use crate::journal::{self, Disposition, Earlier, Insert, NewEntry};
use crate::keys::PanHashKey;
use crate::link::{Link, LinkError, MatchKey, transmission_time};
use crate::model::{Kind, ResponseCode, State};
use crate::repeated::warn_repeated;
use crate::terminals::{self, Terminal};
use group_commit::postgres::Said;

/// Everything a request needs, shared by all connections.
#[derive(Debug)]
pub struct Switch {
    /// The config.
    pub config: Arc<Config>,
    /// Terminal dialect.
    pub terminal_dialect: Arc<Dialect>,
    /// Network dialect.
    pub network_dialect: Arc<Dialect>,
    /// The database.
    pub pool: PgPool,
    /// The journal's group-commit writer (on `pool`).
    pub writer: crate::writer::Writer,
    /// The PAN hash key.
    pub key: PanHashKey,
    /// K3: the terminals' working keys, when the switch hands them out.
    pub terminal_keys: Option<crate::k3::TerminalKeys>,
    /// One link per `[[issuers]]` entry, in config order.
    pub links: Vec<Arc<Link>>,
    /// Woken when an advice is queued.
    pub advice_wake: Arc<Notify>,
    /// Closes the issuer links: cancelled by [`crate::run`] once what was
    /// in flight at shutdown is answered, so that a stop does not cut off
    /// requests at the issuer.
    pub links_stop: CancellationToken,
    /// Rows this process held for deciding and gave up on (the journal
    /// failed under them): still `received` without a reply, and no live
    /// switch deciding them, so a repeat takes them over at once.
    pub(crate) abandoned: std::sync::Mutex<std::collections::HashSet<i64>>,
    /// Holds the lock that says a switch serves on this database
    /// (`k3::hold_serving`) until [`crate::run`] ends (or the process).
    pub(crate) serving: tokio::sync::Mutex<Option<sqlx::PgConnection>>,
    /// Why the switch stopped itself, when it did: its K3 locks, taken
    /// again, were refused ([`crate::k3::keep_serving`]).
    pub stopped_because: std::sync::Mutex<Option<String>>,
    /// Cancelled when the switch starts to stop (the `shutdown` it was
    /// started with): `/health` says so.
    pub(crate) stopping: CancellationToken,
    /// What `/metrics` shows ([`crate::admin`]).
    pub metrics: crate::admin::Metrics,
}

/// What the connection does after a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send what was written to the output buffer.
    Reply,
    /// Nothing to send, nothing wrong with the connection (a stray reply).
    Ignore,
    /// The message cannot even be attributed to a terminal: close the connection.
    Close,
}

/// The fields of a terminal reply that vary; the rest is echoed.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ReplyFields<'a> {
    pub(crate) rc: Option<ResponseCode>,
    pub(crate) rrn: Option<&'a str>,
    pub(crate) auth_code: Option<&'a str>,
    pub(crate) balance: Option<&'a str>,
    /// F60.2 replaced (the sign-on reply carries the open batch).
    pub(crate) batch: Option<i32>,
    /// F48 of a settlement reply.
    pub(crate) totals: Option<&'a str>,
    /// F62 of a sign-on reply: the working keys.
    pub(crate) keys: Option<&'a [u8]>,
}

/// What K3 makes of a request.
enum Mac {
    /// Network management (08xx), or a switch that hands out no keys.
    NotCarried,
    /// A switch that hands out keys, a terminal that holds none.
    Keyless,
    /// F64 is the request's MAC: the reply is sealed with this key.
    Valid(Arc<iso8583::mac::MacKey>),
    /// F64 missing or wrong.
    Failed,
}

/// The request's identity, once MTI, STAN and terminal decode.
pub(crate) struct Request<'a> {
    pub(crate) msg: Message<'a>,
    pub(crate) stan: u32,
    pub(crate) terminal_id: &'a str,
    pub(crate) merchant_id: &'a str,
    pub(crate) f60: String,
    /// What it is, once classified (for `/metrics`).
    pub(crate) kind: Noted<Kind>,
    /// F39 of the reply last built for it (for `/metrics`).
    pub(crate) answered: Noted<ResponseCode>,
}

/// A value noted on a request as it is handled: a `Cell` that a request
/// held across an await (and so shared between threads) may carry.
#[derive(Debug)]
pub(crate) struct Noted<T>(std::sync::Mutex<Option<T>>);

impl<T> Default for Noted<T> {
    fn default() -> Self {
        Noted(std::sync::Mutex::new(None))
    }
}

impl<T: Copy> Noted<T> {
    pub(crate) fn set(&self, value: Option<T>) {
        if let Ok(mut v) = self.0.lock() {
            *v = value;
        }
    }

    pub(crate) fn get(&self) -> Option<T> {
        self.0.lock().ok().and_then(|v| *v)
    }
}

impl Request<'_> {
    pub(crate) fn f60_part(&self, from: usize, to: usize) -> &str {
        self.f60.get(from..to).unwrap_or("")
    }

    pub(crate) fn batch(&self) -> Option<i32> {
        self.f60.get(2..8)?.parse().ok()
    }

    /// The digits of field `n` as text (empty when absent).
    pub(crate) fn digits(&self, n: usize) -> String {
        self.msg
            .digits(n)
            .map(|d| d.iter().map(char::from).collect())
            .unwrap_or_default()
    }

    /// F63.1, the operator, when the terminal sends one.
    pub(crate) fn operator(&self) -> Option<String> {
        self.msg.text(63).map(|t| t.chars().take(3).collect())
    }
}

/// What a forwarded request refers to: the original it matched, the rule
/// that admitted it, and the state it moves the original to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Related<'o> {
    pub(crate) original: &'o journal::Original,
    pub(crate) rule: &'static str,
    pub(crate) claim: Option<&'static str>,
    /// The first of `claim`'s rules, answered `12` when the claim is lost.
    pub(crate) lost_rule: &'static str,
}

/// Business day: the local date in the configured zone, the next one after the cut-over.
pub fn business_date(config: &Config, now: DateTime<Utc>) -> NaiveDate {
    let local = now.with_timezone(&config.rules.time_zone);
    let date = local.date_naive();
    if local.time() >= config.rules.cutover {
        date.succ_opt().unwrap_or(date)
    } else {
        date
    }
}

impl Switch {
    /// Handles one frame (TPDU and header included, length prefix excluded),
    /// writing the reply frame into `out`.
    pub async fn handle(&self, frame: &Bytes, out: &mut BytesMut) -> Outcome {
        let dialect = &*self.terminal_dialect;
        let salvaged;
        let (msg, format_error) = match Message::parse(dialect, frame) {
            Ok(m) => (m, None),
            Err(e) => {
                warn!(error = %e, "malformed terminal message");
                // K2: when MTI, STAN and terminal decode, the answer is 30.
                salvaged = salvage(dialect, frame, &e);
                match salvaged.as_deref().map(|f| Message::parse(dialect, f)) {
                    Some(Ok(m)) => (m, Some(e)),
                    _ => return Outcome::Close,
                }
            }
        };
        let (Some(stan), Some(terminal_id)) =
            (msg.digits(11).and_then(|d| d.to_u64()), msg.text(41))
        else {
            warn!(mti = %msg.mti(), "request without STAN or terminal id");
            return Outcome::Close;
        };
        let req = Request {
            stan: stan as u32,
            terminal_id,
            merchant_id: msg.text(42).unwrap_or(""),
            f60: msg
                .digits(60)
                .map(|d| d.iter().map(char::from).collect())
                .unwrap_or_default(),
            msg,
            kind: Default::default(),
            answered: Default::default(),
        };
        let span = tracing::debug_span!("request", mti = %req.msg.mti(), stan = req.stan, terminal = req.terminal_id);
        let started = std::time::Instant::now();
        // An entered span must not be held across an await: instrument instead.
        let outcome = self
            .answer_request(&req, format_error, out)
            .instrument(span)
            .await;
        if outcome == Outcome::Reply {
            self.count(&req, out, started.elapsed());
        }
        outcome
    }

    /// Counts a reply for `/metrics`: the request's kind, and the F39 the
    /// reply carries as sent (a stored reply replayed included), both noted
    /// on the request as they were found.
    fn count(&self, req: &Request<'_>, out: &BytesMut, took: Duration) {
        let kind = req.kind.get().or_else(|| {
            // Answered before it was classified (a 30, say).
            let text = |n| req.digits(n);
            Kind::classify(
                req.msg.mti().value(),
                &text(3),
                &text(25),
                req.f60_part(8, 11),
            )
        });
        let rc = if out.is_empty() {
            None
        } else {
            req.answered.get()
        };
        self.metrics.answered(kind, rc, took);
    }

    async fn answer_request(
        &self,
        req: &Request<'_>,
        format_error: Option<ParseError>,
        out: &mut BytesMut,
    ) -> Outcome {
        if !req.msg.mti().is_request() {
            // A terminal has no business sending replies; there is nothing to answer.
            warn!(mti = %req.msg.mti(), "not a request: ignored");
            return Outcome::Ignore;
        }
        let mut seal = None;
        if let Some(e) = format_error {
            debug!(error = %e, "answering 30");
            self.reply_code(req, out, ResponseCode::FORMAT_ERROR, None);
        } else if let Some(rc) = self.dispatch(req, &mut seal, out).await {
            debug!(rc = %rc, "answered by the switch");
            self.reply_code(req, out, rc, None);
        }
        // Only a request whose MAC was verified gets a sealed reply. The
        // UnionPay POS MAC depends on nothing but the XOR of the message's
        // 8-byte blocks: a reply sealed for anyone (an A0, a 30) would be a
        // MAC under the terminal's key of a block XOR an outsider chose, and
        // with it any request of the same XOR passes.
        if let Some(key) = seal {
            crate::k3::seal(&self.terminal_dialect, out, &key);
        }
        Outcome::Reply
    }

    /// K3: what the request's MAC says, for a terminal as read.
    fn mac(&self, req: &Request<'_>, terminal: &Terminal) -> Mac {
        if !crate::k3::mac_carried(req.msg.mti()) {
            return Mac::NotCarried;
        }
        let Some(keys) = &self.terminal_keys else {
            // A switch without a derivation key starts only on a journal
            // whose terminals hold no keys, and never beside one that
            // hands them out. Should it meet a terminal that holds keys
            // all the same (its locks lost with a database restart), it
            // takes nothing from it that it cannot check.
            return if terminal.working_keys.is_some() {
                Mac::Failed
            } else {
                Mac::NotCarried
            };
        };
        if terminal.working_keys.is_none() {
            return Mac::Keyless;
        }
        match keys.mac_key(terminal) {
            Some(key) if crate::k3::mac_valid(&req.msg, &key) => Mac::Valid(key),
            _ => Mac::Failed,
        }
    }

    /// Returns a response code when the switch answers without more ado;
    /// otherwise it has written the reply itself.
    async fn dispatch(
        &self,
        req: &Request<'_>,
        seal: &mut Option<Arc<iso8583::mac::MacKey>>,
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        let mti = req.msg.mti().value();
        let text = |n| {
            req.msg
                .digits(n)
                .map(|d| d.iter().map(char::from).collect::<String>())
                .unwrap_or_default()
        };
        // Every message of the terminal dialect carries F60: its type, the
        // batch (F60.2) and, for the network messages after it, what they
        // are (F60.3). One without it, or whose F60 stops short of the
        // batch, is malformed (K2: 30), not of another batch (77) nor of no
        // known kind (12), whatever else it says.
        if req.batch().is_none() {
            return Some(ResponseCode::FORMAT_ERROR);
        }
        let kind = Kind::classify(mti, &text(3), &text(25), req.f60_part(8, 11));
        req.kind.set(kind);
        // These decide by the open batch themselves (S1): the terminal as the
        // database has it now, not as read a moment ago.
        let fresh = matches!(
            kind,
            Some(Kind::Settlement | Kind::BatchUpload | Kind::BatchUploadEnd | Kind::Reversal)
        );
        // K1 before the message's own sense (12).
        let mut terminal = match self.terminal(req, fresh).await {
            Ok(t) => t,
            Err(rc) => return Some(rc),
        };
        let mut read_now = fresh;
        // K3, before the message is taken at its word in anything.
        let mut mac = self.mac(req, &terminal);
        if !read_now && matches!(mac, Mac::Keyless | Mac::Failed) {
            // Read a moment ago: it may have signed on since, with new keys
            // (on another switch process, whose reply this one never saw).
            terminal = match self.terminal(req, true).await {
                Ok(t) => t,
                Err(rc) => return Some(rc),
            };
            read_now = true;
            mac = self.mac(req, &terminal);
        }
        let keyless = matches!(mac, Mac::Keyless);
        match mac {
            Mac::Valid(key) => *seal = Some(key),
            Mac::Failed => {
                if kind == Some(Kind::Reversal) {
                    // A reversal the terminal cannot get heard leaves a sale
                    // it believes failed charged: said apart (a place of its
                    // own, so other A0s never leave it out).
                    warn_repeated!(
                        terminal = req.terminal_id,
                        stan = req.stan,
                        f64 = if req.msg.has(64) { "wrong" } else { "missing" },
                        "MAC check failed on a reversal: answered A0 (the terminal must sign on again to reverse)"
                    );
                } else {
                    warn_repeated!(
                        terminal = req.terminal_id,
                        mti = %req.msg.mti(),
                        stan = req.stan,
                        f64 = if req.msg.has(64) { "wrong" } else { "missing" },
                        "MAC check failed: answered A0"
                    );
                }
                return Some(ResponseCode::MAC_FAILURE);
            }
            Mac::NotCarried | Mac::Keyless => {}
        }
        let Some(kind) = kind else {
            return Some(ResponseCode::INVALID_TRANSACTION);
        };
        // Sign-on, sign-off and echo need no batch; reversals, settlements
        // and uploads check the batch they name themselves, and a reversal
        // is always heard (R2, R3): a terminal that transacted before the
        // switch asked for a sign-on (an upgrade) still reverses and settles.
        let unbatched = matches!(kind, Kind::SignOn | Kind::SignOff | Kind::Echo) || fresh;
        if !terminal.signed_on && !unbatched && !read_now {
            // Read a moment ago: it may have signed on since (on another
            // switch process, whose reply this one's cache never saw).
            terminal = match self.terminal(req, true).await {
                Ok(t) => t,
                Err(rc) => return Some(rc),
            };
        }
        if !terminal.signed_on && !unbatched {
            // The switch assigns the batch at sign-on: a terminal that never
            // signed on names none it was given (sign on again).
            return Some(ResponseCode::BATCH_MISMATCH);
        }
        if keyless && !unbatched {
            // K3: a switch that hands out keys takes new transactions only
            // MACed, from a terminal holding keys from a sign-on: one that
            // signed on before the switch had a derivation key signs on
            // again (77) and gets them. What it did before, it still
            // reverses, settles and uploads.
            return Some(ResponseCode::BATCH_MISMATCH);
        }
        if cards_differ(&req.msg) {
            // F2 and the card the track was read from are one card, or the
            // message is not to be trusted with either. A request about an
            // original is journalled refused, for its audit trail.
            return match kind {
                Kind::Void
                | Kind::CompletionVoid
                | Kind::Refund
                | Kind::PreAuthCancel
                | Kind::Completion
                | Kind::CompletionAdvice => self.refuse_two_cards(req, kind, &terminal, out).await,
                _ => Some(ResponseCode::INVALID_CARD),
            };
        }
        match kind {
            Kind::SignOn if self.terminal_keys.is_none() && terminal.working_keys.is_some() => {
                // Its keys came from a switch with the derivation key: one
                // without does not take them away (`forget-keys` does).
                warn!(
                    terminal = req.terminal_id,
                    "sign-on of a terminal holding working keys, on a switch without the \
                     derivation key: answered A0"
                );
                Some(ResponseCode::MAC_FAILURE)
            }
            Kind::SignOn => {
                // K3: fresh working keys at every sign-on, when the switch
                // hands them out; none, and the old ones void, when not.
                let keys = self
                    .terminal_keys
                    .as_ref()
                    .and_then(|k| k.issue(req.terminal_id, req.f60_part(8, 11)));
                match terminals::sign_on(&self.pool, req.terminal_id, keys.as_deref()).await {
                    Ok(signed) => {
                        // Read by the sign-on itself: the terminal's first
                        // request needs no lookup of its own.
                        let batch = signed.batch;
                        self.writer.keep_terminal(signed);
                        self.reply(
                            req,
                            out,
                            ReplyFields {
                                rc: Some(ResponseCode::APPROVED),
                                batch: Some(batch),
                                keys: keys.as_deref(),
                                ..Default::default()
                            },
                        );
                        None
                    }
                    Err(e) => {
                        warn!(error = %e, "sign-on failed");
                        Some(ResponseCode::SYSTEM_ERROR)
                    }
                }
            }
            Kind::SignOff | Kind::Echo => Some(ResponseCode::APPROVED),
            // These name a batch that may just have closed: they check it themselves.
            Kind::Settlement | Kind::BatchUpload | Kind::BatchUploadEnd | Kind::Reversal => {
                self.related(req, kind, &terminal, out).await
            }
            _ if req.batch() != Some(terminal.batch) => Some(ResponseCode::BATCH_MISMATCH),
            Kind::Purchase | Kind::BalanceInquiry | Kind::PreAuth => {
                self.forward(req, kind, &terminal, None, out).await
            }
            _ => self.related(req, kind, &terminal, out).await,
        }
    }

    /// K1: the request's terminal, enabled, of the merchant it names and
    /// enabled too; `fresh` reads it from the database even when the
    /// writer's cache has it.
    async fn terminal(
        &self,
        req: &Request<'_>,
        fresh: bool,
    ) -> Result<Arc<Terminal>, ResponseCode> {
        let terminal = match self.writer.terminal(req.terminal_id, fresh).await {
            Ok(Some(t)) if t.enabled => t,
            Ok(_) => return Err(ResponseCode::UNKNOWN_TERMINAL),
            Err(e) => {
                warn_repeated!(error = %Said(&e), "terminal lookup failed");
                return Err(ResponseCode::SYSTEM_ERROR);
            }
        };
        if terminal.merchant_id != req.merchant_id || !terminal.merchant_enabled {
            return Err(ResponseCode::INVALID_MERCHANT);
        }
        Ok(terminal)
    }

    /// Journals and forwards a transaction to its issuer.
    pub(crate) async fn forward(
        &self,
        req: &Request<'_>,
        kind: Kind,
        terminal: &Terminal,
        related: Option<Related<'_>>,
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        let msg = &req.msg;
        let track = msg.digits(35).and_then(|d| d.to_track());
        let Some(pan) = msg
            .digits(2)
            .and_then(|d| d.to_pan())
            .or_else(|| track.and_then(|t| t.pan()))
        else {
            return Some(ResponseCode::FORMAT_ERROR);
        };
        let amount = match (kind, msg.digits(4).and_then(|d| d.to_u64())) {
            (Kind::BalanceInquiry, a) => a.unwrap_or(0),
            (_, Some(a)) if a > 0 => a,
            _ => return Some(ResponseCode::FORMAT_ERROR),
        };
        let processing_code: String = msg
            .digits(3)
            .map(|d| d.iter().map(char::from).collect())
            .unwrap_or_default();
        let condition: String = msg
            .digits(25)
            .map(|d| d.iter().map(char::from).collect())
            .unwrap_or_else(|| "00".into());
        let pan_hash = self.key.hash(&pan);
        let digest = request_digest(msg.mti(), &processing_code, &condition, amount, &pan_hash);
        let now = Utc::now();
        let mut entry = NewEntry {
            terminal_id: req.terminal_id,
            merchant_id: req.merchant_id,
            batch: terminal.batch,
            stan: req.stan as i32,
            mti: msg.mti().value(),
            kind,
            processing_code: &processing_code,
            pos_condition: &condition,
            amount: amount as i64,
            pan_hash: Some(pan_hash),
            pan_masked: Some(pan.masked()),
            digest,
            business_date: business_date(&self.config, now),
            original_id: related.map(|r| r.original.id),
            rule: related.map(|r| r.rule),
            operator: req.operator(),
            reversal_reason: None,
            original_ref: original_ref(req),
            claim: related.and_then(|r| r.claim),
            open_batch: true,
            institution_id: &self.config.institution_id,
            forwarding_id: &self.config.forwarding_id,
        };

        let link = self.config.issuer_for(pan.expose()).map(|i| &self.links[i]);
        let f7 = transmission_time();
        let f7s = std::str::from_utf8(&f7).expect("digits");
        let disposition = match link {
            None => Disposition::Answer(State::Declined, ResponseCode::NO_SUCH_ISSUER),
            Some(l) if !l.is_up() => {
                Disposition::Answer(State::Declined, ResponseCode::ISSUER_UNAVAILABLE)
            }
            Some(l) => Disposition::Forward {
                issuer: l.name(),
                f7: f7s,
            },
        };
        // Only a request that goes to the issuer claims its original: one
        // answered here (no issuer, link down) leaves it as it was, and
        // nothing but a `sent` row's outcome ever gives a claim back.
        let forward = matches!(disposition, Disposition::Forward { .. });
        if !forward {
            entry.claim = None;
        }
        let written = match self.journal(req, &entry, disposition, out).await {
            Ok(w) => w,
            Err(answered) => return answered,
        };
        if let Some(r) = related.filter(|r| forward && r.claim.is_some() && !written.claimed) {
            // Another request claimed the original first: exactly one wins.
            return self
                .decided(
                    req,
                    written.id,
                    &written.rrn,
                    r.lost_rule,
                    ResponseCode::INVALID_TRANSACTION,
                    out,
                )
                .await;
        }
        let (Disposition::Forward { .. }, Some(link), Some(link_stan)) =
            (disposition, link, written.link_stan)
        else {
            let Disposition::Answer(_, rc) = disposition else {
                unreachable!("forward rows have a link STAN")
            };
            self.reply_code(req, out, rc, Some(&written.rrn));
            self.store_reply(written.id, out).await;
            return None;
        };

        let built = self.network_request(
            req,
            terminal,
            &pan,
            track,
            &written.rrn,
            link_stan,
            f7s,
            amount,
            related.map(|r| r.original),
        );
        let keyed = built.and_then(|network| {
            let parsed =
                Message::parse(&self.network_dialect, &network[2..]).map_err(|e| e.to_string())?;
            let key = MatchKey::of(&parsed).ok_or("no F11 or F7")?;
            Ok((network, key))
        });
        let (network, key) = match keyed {
            Ok(k) => k,
            Err(e) => {
                // Only a dialect file that changed a field's format gets here:
                // the request cannot be sent, so it is declined, not reversed.
                warn!(error = %e, "network request does not fit the network dialect");
                return self
                    .not_sent(req, &written, ResponseCode::SYSTEM_ERROR, out)
                    .await;
            }
        };
        let exchanged = link
            .exchange(network, key, self.config.rules.issuer_timeout)
            .await;
        match exchanged {
            Ok(reply) => self.issuer_answered(req, &written, &reply, out).await,
            // Never reached the issuer: a plain decline, nothing to reverse.
            Err(LinkError::NotSent) => {
                self.not_sent(req, &written, ResponseCode::ISSUER_UNAVAILABLE, out)
                    .await
            }
            // T1: the outcome is unknown; the issuer is told to reverse it.
            Err(e @ (LinkError::Lost | LinkError::Timeout)) => {
                warn!(rrn = %written.rrn, error = %e, "issuer did not answer");
                self.unanswered(req, &written, out).await
            }
        }
    }

    /// A journalled request that never reached the issuer: declined with `rc`.
    async fn not_sent(
        &self,
        req: &Request<'_>,
        written: &journal::Written,
        rc: ResponseCode,
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        self.reply_code(req, out, rc, Some(&written.rrn));
        let body = self.body(out).to_vec();
        let outcome = written.outcome(State::Declined, rc, None, body);
        if let Err(e) = self.writer.complete(outcome).await {
            warn_repeated!(error = %Said(&e), "journal write failed");
        }
        None
    }

    async fn issuer_answered(
        &self,
        req: &Request<'_>,
        written: &journal::Written,
        reply: &Bytes,
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        let Ok(answer) = Message::parse(&self.network_dialect, reply) else {
            warn!(rrn = %written.rrn, "unreadable issuer reply: treating as no answer");
            return self.unanswered(req, written, out).await;
        };
        let Some(rc) = answer.text(39).and_then(ResponseCode::new) else {
            // Without a response code the outcome is unknown: it may have
            // posted, so it is reversed rather than taken as a decline.
            warn!(rrn = %written.rrn, "issuer reply without a response code: treating as no answer");
            return self.unanswered(req, written, out).await;
        };
        let auth_code = answer.text(38).filter(|_| rc.is_approved());
        let balance = answer
            .text(54)
            .filter(|_| rc.is_approved())
            .map(terminal_balance);
        self.reply(
            req,
            out,
            ReplyFields {
                rc: Some(rc),
                rrn: Some(&written.rrn),
                auth_code,
                balance,
                ..Default::default()
            },
        );
        let state = if rc.is_approved() {
            State::Approved
        } else {
            State::Declined
        };
        let body = self.body(out).to_vec();
        match self
            .writer
            .complete(written.outcome(state, rc, auth_code, body))
            .await
        {
            Ok(Some(_)) => None,
            // Too late: the row was given up on and its reversal is queued.
            Ok(None) => {
                self.reply_code(req, out, ResponseCode::ISSUER_TIMEOUT, Some(&written.rrn));
                None
            }
            Err(e) => {
                // The outcome is not durable, so the terminal must not hear
                // "approved"; the row stays `sent` and recovery reverses it.
                warn!(
                    error = %Said(&e),
                    rrn = %written.rrn,
                    "journal write of the outcome failed: the terminal hears 96 and the transaction is reversed at the issuer"
                );
                Some(ResponseCode::SYSTEM_ERROR)
            }
        }
    }

    async fn unanswered(
        &self,
        req: &Request<'_>,
        written: &journal::Written,
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        self.reply_code(req, out, ResponseCode::ISSUER_TIMEOUT, Some(&written.rrn));
        let body = self.body(out).to_vec();
        match journal::give_up(&self.pool, written.id, &body).await {
            Ok(_) => self.advice_wake.notify_one(),
            Err(e) => {
                warn!(rrn = %written.rrn, error = %Said(&e), "journal write failed; recovery will reverse it")
            }
        }
        None
    }

    /// D1 / D2: the earlier request with the same key.
    pub(crate) async fn duplicate(
        &self,
        req: &Request<'_>,
        entry: &NewEntry<'_>,
        earlier: Earlier,
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        if earlier.digest != entry.digest || self.config.rules.duplicates == DuplicatePolicy::Reject
        {
            return Some(ResponseCode::DUPLICATE);
        }
        let mut earlier_reply = earlier.reply;
        let mut state = earlier.state;
        let mut rc = earlier.response_code;
        // Still at the issuer: wait for its outcome, as long as it can take;
        // unless it was decided long since and will never get a reply.
        let deadline =
            tokio::time::Instant::now() + self.config.rules.issuer_timeout + Duration::from_secs(2);
        let mut replyless = false;
        while earlier_reply.is_none() && !replyless && tokio::time::Instant::now() < deadline {
            match journal::outcome(&self.pool, earlier.id).await {
                Ok(o) => {
                    state = o.state;
                    rc = o.response_code;
                    earlier_reply = o.reply;
                    replyless = o.replyless;
                }
                Err(e) => {
                    warn!(error = %Said(&e), "reading the earlier request failed");
                    return Some(ResponseCode::SYSTEM_ERROR);
                }
            }
            if earlier_reply.is_none() && !replyless {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        match earlier_reply {
            Some(body) => {
                self.replay(req, &body, out);
                None
            }
            None => self.answer_from_state(req, &earlier.rrn, &state, rc, out),
        }
    }

    /// A repeat of a request that got no reply (its switch died before
    /// replying, or the recovery sweep decided it): its state says what
    /// the terminal may hear.
    fn answer_from_state(
        &self,
        req: &Request<'_>,
        rrn: &str,
        state: &str,
        rc: Option<String>,
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        let rc = match state {
            "sent" | "unknown" => ResponseCode::ISSUER_TIMEOUT,
            _ => rc
                .as_deref()
                .and_then(ResponseCode::new)
                .unwrap_or(ResponseCode::SYSTEM_ERROR),
        };
        self.reply_code(req, out, rc, Some(rrn));
        None
    }

    /// The stored reply of an earlier request, behind this request's TPDU and header.
    fn replay(&self, req: &Request<'_>, body: &[u8], out: &mut BytesMut) {
        let d = &*self.terminal_dialect;
        out.clear();
        if body.is_empty() {
            // The earlier request got no reply ([`Switch::reply`]): nor does this.
            return;
        }
        let mut prefix = vec![0u8; d.tpdu_len() + d.header_len()];
        let (tpdu, header) = prefix.split_at_mut(d.tpdu_len());
        d.reply_tpdu(req.msg.tpdu(), tpdu);
        d.reply_header(req.msg.header(), header);
        let len = (prefix.len() + body.len()) as u16;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&prefix);
        out.extend_from_slice(body);
        // Counted with the code it carries.
        let stored = Message::parse(d, &out[2..]).ok();
        req.answered
            .set(stored.and_then(|m| m.text(39).and_then(ResponseCode::new)));
    }

    /// The reply from its MTI on (what is stored for duplicates); empty
    /// when there is none.
    pub(crate) fn body<'b>(&self, out: &'b BytesMut) -> &'b [u8] {
        let d = &*self.terminal_dialect;
        out.get(2 + d.tpdu_len() + d.header_len()..)
            .unwrap_or_default()
    }

    pub(crate) async fn store_reply(&self, id: i64, out: &BytesMut) {
        if let Err(e) = journal::store_reply(&self.pool, id, self.body(out)).await {
            warn!(error = %Said(&e), "storing a reply failed");
        }
    }

    /// Writes a request to the journal. A repeat is answered here (D1/D2)
    /// and so is a journal that cannot be written (T2: `96`, nothing
    /// forwarded); both come back as `Err` with what to answer. A request
    /// whose batch closed since its terminal was read is answered `77`.
    pub(crate) async fn journal(
        &self,
        req: &Request<'_>,
        entry: &NewEntry<'_>,
        disposition: Disposition<'_>,
        out: &mut BytesMut,
    ) -> Result<journal::Written, Option<ResponseCode>> {
        self.journal_in_batch(req, entry, disposition, out)
            .await?
            .ok_or(Some(ResponseCode::BATCH_MISMATCH))
    }

    /// [`Switch::journal`], with `None` for a request whose batch closed
    /// since its terminal was read ([`NewEntry::open_batch`]), for a
    /// request that answers that itself.
    pub(crate) async fn journal_in_batch(
        &self,
        req: &Request<'_>,
        entry: &NewEntry<'_>,
        disposition: Disposition<'_>,
        out: &mut BytesMut,
    ) -> Result<Option<journal::Written>, Option<ResponseCode>> {
        match self.writer.insert(entry, disposition).await {
            Ok(Insert::New(w)) => Ok(Some(w)),
            Ok(Insert::Duplicate(earlier))
                if matches!(disposition, Disposition::Hold)
                    && earlier.state == "received"
                    && earlier.reply.is_none()
                    && earlier.digest == entry.digest =>
            {
                match self.adopt(&earlier).await {
                    Some(w) => Ok(Some(w)),
                    None => Err(self.duplicate(req, entry, earlier, out).await),
                }
            }
            Ok(Insert::Duplicate(earlier)) => Err(self.duplicate(req, entry, earlier, out).await),
            Ok(Insert::BatchClosed) => {
                // Settled since this switch read the terminal (by another
                // switch process, or just now).
                self.writer.forget_terminal(req.terminal_id);
                Ok(None)
            }
            Err(e) => {
                warn_repeated!(error = %Said(&e), "journal write failed");
                Err(Some(ResponseCode::SYSTEM_ERROR))
            }
        }
    }

    /// A repeat of a reversal or refund whose row is still `received`
    /// without a reply: its first copy is being decided, or the switch
    /// deciding it died (a kill between the insert and the decision). Waits
    /// as long as a live switch could take; once the row is older than that
    /// it is taken over (one conditional UPDATE, so one repeat wins) and
    /// decided anew, as if just written. `None`: it got its reply meanwhile,
    /// or another repeat took it over; answer as a duplicate.
    async fn adopt(&self, earlier: &Earlier) -> Option<journal::Written> {
        let given_up = self
            .abandoned
            .lock()
            .map(|ids| ids.contains(&earlier.id))
            .unwrap_or(false);
        // A row this switch gave up: no one decides it, unless another
        // repeat (here, or on another switch after the usual wait) took it
        // over meanwhile, which moved its time on; two seconds give that
        // one time to decide.
        let stale = if given_up {
            Duration::from_secs(2)
        } else {
            self.config.rules.issuer_timeout + Duration::from_secs(2)
        };
        let deadline = tokio::time::Instant::now() + stale + Duration::from_secs(1);
        while tokio::time::Instant::now() < deadline {
            match journal::adopt(&self.pool, earlier.id, stale).await {
                // The batch it names is the deciding's to check (a
                // reversal reads its terminal again first).
                Ok(Some(_)) => {
                    if let Ok(mut ids) = self.abandoned.lock() {
                        ids.remove(&earlier.id);
                    }
                    warn!(rrn = %earlier.rrn, "taking over a request its switch left undecided");
                    return Some(journal::Written {
                        id: earlier.id,
                        rrn: earlier.rrn.clone(),
                        link_stan: None,
                        claimed: false,
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %Said(&e), "reading the earlier request failed");
                    return None;
                }
            }
            match journal::outcome(&self.pool, earlier.id).await {
                Ok(o) if o.reply.is_some() || o.state != "received" => return None,
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %Said(&e), "reading the earlier request failed");
                    return None;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Notes a row held for deciding that this process gave up on (see
    /// `abandoned`). The set is bounded: past 10,000 it starts again, and
    /// a row forgotten is taken over after the usual wait.
    pub(crate) fn abandoned(&self, id: i64) {
        if let Ok(mut ids) = self.abandoned.lock() {
            if ids.len() >= 10_000 {
                ids.clear();
            }
            ids.insert(id);
        }
    }

    /// Ends a journalled row the switch decided itself (a rule broken, a
    /// claim lost) and answers with `rc`.
    pub(crate) async fn decided(
        &self,
        req: &Request<'_>,
        id: i64,
        rrn: &str,
        rule: &str,
        rc: ResponseCode,
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        debug!(rule, rc = %rc, "declined by rule");
        self.reply_code(req, out, rc, Some(rrn));
        match journal::decide(&self.pool, id, rule, rc, Some(self.body(out))).await {
            Ok(true) => {}
            // Decided meanwhile by a repeat or the recovery sweep that took
            // the row over (its switch looked dead).
            Ok(false) => return self.decided_elsewhere(req, id, rrn, out).await,
            Err(e) => warn_repeated!(error = %Said(&e), "journal write failed"),
        }
        None
    }

    /// Answers a request whose row was decided by another (a repeat or the
    /// recovery sweep took it over while this switch was slow): the
    /// terminal hears what was stored, or, when the sweep stored no reply,
    /// what the row's state says.
    pub(crate) async fn decided_elsewhere(
        &self,
        req: &Request<'_>,
        id: i64,
        rrn: &str,
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        match journal::outcome(&self.pool, id).await {
            Ok(journal::Outcome {
                reply: Some(stored),
                ..
            }) => {
                self.replay(req, &stored, out);
                None
            }
            Ok(o) => self.answer_from_state(req, rrn, &o.state, o.response_code, out),
            Err(e) => {
                warn!(error = %Said(&e), "reading the decided request failed");
                Some(ResponseCode::SYSTEM_ERROR)
            }
        }
    }

    /// Builds the network request of a transaction.
    #[allow(clippy::too_many_arguments)]
    fn network_request(
        &self,
        req: &Request<'_>,
        terminal: &Terminal,
        pan: &Pan,
        track: Option<iso8583::Track>,
        rrn: &str,
        link_stan: i32,
        f7: &str,
        amount: u64,
        original: Option<&journal::Original>,
    ) -> Result<Bytes, String> {
        let msg = &req.msg;
        let now = Utc::now().with_timezone(&self.config.rules.time_zone);
        let mut buf = BytesMut::with_capacity(256);
        let mut w = MessageWriter::new(&self.network_dialect, &mut buf, msg.mti(), &[], &[])
            .expect("iso87 has no prefix");
        let built = (|| {
            w.digits(2, pan.expose())?;
            w.copy(3, msg)?;
            w.number(4, amount)?;
            w.digits(7, f7)?;
            w.number(11, link_stan as u64)?;
            w.digits(12, &now.format("%H%M%S").to_string())?;
            w.digits(13, &now.format("%m%d").to_string())?;
            let expiry = msg
                .digits(14)
                .map(|d| d.iter().map(char::from).collect::<String>());
            if let Some(exp) = expiry.or_else(|| track.and_then(|t| t.expiry().map(str::to_string)))
            {
                w.digits(14, &exp)?;
            }
            w.digits(18, &terminal.mcc)?;
            w.copy(22, msg)?;
            w.copy(25, msg)?;
            w.digits(32, &self.config.institution_id)?;
            w.digits(33, &self.config.forwarding_id)?;
            if let Some(t) = track {
                w.digits(35, t.with_separator(b'=').expose())?;
            }
            w.text(37, rrn)?;
            w.text(41, req.terminal_id)?;
            w.text(42, req.merchant_id)?;
            w.text(43, &merchant_location(&terminal.merchant_name))?;
            w.digits(49, "156")?;
            if let Some(pin) = msg.binary(52) {
                w.binary(52, pin)?;
            }
            w.copy(55, msg)?;
            if let Some(o) = original {
                w.digits(90, &original_data(o, &self.config))?;
            }
            w.finish().map(|_| ())
        })();
        built.map_err(|e| e.to_string())?;
        Ok(buf.freeze())
    }

    /// A reply that carries only a response code (and the RRN, when the
    /// request has one); everything else is echoed or filled as usual.
    pub(crate) fn reply_code(
        &self,
        req: &Request<'_>,
        out: &mut BytesMut,
        rc: ResponseCode,
        rrn: Option<&str>,
    ) {
        self.reply(
            req,
            out,
            ReplyFields {
                rc: Some(rc),
                rrn,
                ..Default::default()
            },
        );
    }

    /// Writes a terminal reply: echoes F3, F4, F11, F25, F41, F42, F49, F60;
    /// fills F12, F13, F15, F32, F37, F38, F39, F48, F54. What the issuer
    /// sent (F38, F54) and the terminal dialect cannot carry is left out,
    /// rather than a reply sent half built.
    pub(crate) fn reply(&self, req: &Request<'_>, out: &mut BytesMut, f: ReplyFields<'_>) {
        let Err(e) = self.write_reply(req, out, &f) else {
            return;
        };
        // The issuer's F54 left out, then its F38 too.
        let without_balance = ReplyFields { balance: None, ..f };
        let ours = ReplyFields {
            auth_code: None,
            ..without_balance
        };
        for (fields, left_out) in [(without_balance, "F54"), (ours, "F38 and F54")] {
            if self.write_reply(req, out, &fields).is_ok() {
                warn!(error = %e, left_out, "reply does not fit the terminal dialect: sent without the issuer's fields it cannot carry");
                return;
            }
        }
        // Only the switch's own fields and the request's are left: a dialect
        // `config check` accepts carries them. Should it not, nothing is sent
        // rather than a broken frame: the terminal, unanswered, reverses.
        error!(error = %e, "reply does not fit the terminal dialect: nothing sent");
        out.clear();
    }

    fn write_reply(
        &self,
        req: &Request<'_>,
        out: &mut BytesMut,
        f: &ReplyFields<'_>,
    ) -> Result<(), iso8583::BuildError> {
        out.clear();
        let msg = &req.msg;
        let now = Utc::now();
        let local = now.with_timezone(&self.config.rules.time_zone);
        let settle = business_date(&self.config, now);
        let mut w = MessageWriter::reply(&self.terminal_dialect, out, msg);
        for n in [3, 4, 11] {
            w.copy(n, msg)?;
        }
        w.digits(12, &local.format("%H%M%S").to_string())?;
        w.digits(13, &local.format("%m%d").to_string())?;
        w.digits(15, &format!("{:02}{:02}", settle.month(), settle.day()))?;
        w.copy(25, msg)?;
        w.digits(32, &self.config.institution_id)?;
        if let Some(rrn) = f.rrn {
            w.text(37, rrn)?;
        }
        if let Some(auth) = f.auth_code {
            w.text(38, auth)?;
        }
        req.answered.set(f.rc);
        if let Some(rc) = f.rc {
            w.text(39, rc.as_str())?;
        }
        w.copy(41, msg)?;
        w.copy(42, msg)?;
        if let Some(totals) = f.totals {
            w.digits(48, totals)?;
        }
        w.copy(49, msg)?;
        if let Some(balance) = f.balance {
            w.text(54, balance)?;
        }
        match (f.batch, req.f60.len() >= 8) {
            (Some(batch), true) => {
                w.digits(60, &format!("{}{batch:06}{}", &req.f60[..2], &req.f60[8..]))?
            }
            _ => {
                w.copy(60, msg)?;
            }
        }
        if let Some(keys) = f.keys {
            w.binary(62, keys)?;
        }
        w.finish().map(|_| ())
    }
}

/// Whether F2 and the PAN of track 2 (F35) are both there and differ.
fn cards_differ(msg: &Message<'_>) -> bool {
    let f2 = msg.digits(2).and_then(|d| d.to_pan());
    let track = msg
        .digits(35)
        .and_then(|d| d.to_track())
        .and_then(|t| t.pan());
    matches!((f2, track), (Some(a), Some(b)) if a != b)
}

/// The issuer's F54 as the terminal dialect carries it (one amount, `an...20`):
/// of several amounts (20 characters each: account type, amount type,
/// currency, sign, amount), the available balance (amount type `02`), else
/// the first.
fn terminal_balance(f54: &str) -> &str {
    const AMOUNT: usize = 20;
    if f54.len() <= AMOUNT || !f54.is_ascii() {
        return f54;
    }
    (0..f54.len() / AMOUNT)
        .map(|i| &f54[i * AMOUNT..(i + 1) * AMOUNT])
        .find(|amount| &amount[2..4] == "02")
        .unwrap_or(&f54[..AMOUNT])
}

/// What of a malformed frame can be read, as a frame of its own. A field
/// whose length can be told but whose content is bad (a nibble that is no
/// digit in F3, say) is cut out, and the fields after it are kept; at any
/// other error in a field, the bad one and everything after it dropped
/// from the bitmap and the bytes. Bytes after the last field are dropped;
/// bit 1 set in a dialect without a secondary bitmap is read as clear.
/// `None` when the error is elsewhere (the MTI, a bitmap cut short), or a
/// secondary bitmap is involved.
fn salvage(dialect: &Dialect, frame: &[u8], error: &ParseError) -> Option<Vec<u8>> {
    let at = dialect.min_frame_len() - 8;
    if frame.len() < at + 8 {
        return None;
    }
    let bad = match (error.part, error.kind) {
        (Part::Field(bad), _) => bad,
        (Part::End, _) => {
            let cut = frame.get(..error.offset)?.to_vec();
            return Message::parse(dialect, &cut).is_ok().then_some(cut);
        }
        (Part::Bitmap, ParseErrorKind::SecondaryBitmap) => {
            let mut copy = frame.to_vec();
            copy[at] &= 0x7F;
            return match Message::parse(dialect, &copy) {
                Ok(_) => Some(copy),
                Err(e) => salvage(dialect, &copy, &e),
            };
        }
        _ => return None,
    };
    let primary = u64::from_be_bytes(frame[at..at + 8].try_into().ok()?);
    if primary >> 63 == 1 || bad > 64 {
        return None;
    }
    let bit = 1u64 << (64 - u32::from(bad));
    if let Some((start, end)) = content_only(dialect, frame, error) {
        let mut cut = Vec::with_capacity(frame.len());
        cut.extend_from_slice(&frame[..start]);
        cut.extend_from_slice(&frame[end..]);
        cut[at..at + 8].copy_from_slice(&(primary & !bit).to_be_bytes());
        if Message::parse(dialect, &cut).is_ok() {
            return Some(cut);
        }
    }
    // Keep fields 1..bad: the bits above the bad one's.
    let kept = primary & !(bit | (bit - 1));
    let mut copy = frame.to_vec();
    copy[at..at + 8].copy_from_slice(&kept.to_be_bytes());
    match Message::parse(dialect, &copy) {
        Ok(_) => Some(copy),
        Err(ParseError {
            kind: ParseErrorKind::Trailing { .. },
            offset,
            ..
        }) => {
            copy.truncate(offset);
            Some(copy)
        }
        Err(_) => None,
    }
}

/// Where the bad field of `error` is on the wire, length prefix included,
/// when only its content is bad: its bytes mended one by one until the
/// frame parses, then read from the mended frame.
fn content_only(dialect: &Dialect, frame: &[u8], error: &ParseError) -> Option<(usize, usize)> {
    let content = |kind: ParseErrorKind| {
        matches!(
            kind,
            ParseErrorKind::BadNibble { .. }
                | ParseErrorKind::BadPadding { .. }
                | ParseErrorKind::BadChar { .. }
        )
    };
    let field = error.part;
    let mut mended = frame.to_vec();
    let mut e = *error;
    // Each round mends one byte: 0x00 is two BCD zeros, then '0' is a
    // digit in any character field; a field's bytes are at most 999.
    for _ in 0..2 * 999 {
        if e.part != field || !content(e.kind) {
            return None;
        }
        let byte = mended.get_mut(e.offset)?;
        *byte = match *byte {
            0x00 => b'0',
            b'0' => return None,
            _ => 0x00,
        };
        match Message::parse(dialect, &mended) {
            Ok(msg) => {
                let Part::Field(n) = field else { return None };
                let wire = msg.wire(usize::from(n))?;
                let start = wire.as_ptr() as usize - mended.as_ptr() as usize;
                return Some((start, start + wire.len()));
            }
            Err(next) => e = next,
        }
    }
    None
}

/// F90: the original's MTI, link STAN, F7, F32 and F33 as they went on the
/// wire (F32 and F33 of a row journalled before they were kept: the
/// config's), zero-padded.
pub(crate) fn original_data(o: &journal::Original, config: &Config) -> String {
    format!(
        "{:04}{:06}{:0>10}{:0>11}{:0>11}",
        o.mti,
        o.link_stan.unwrap_or(0),
        o.link_f7.as_deref().unwrap_or(""),
        o.institution_id
            .as_deref()
            .unwrap_or(&config.institution_id),
        o.forwarding_id.as_deref().unwrap_or(&config.forwarding_id),
    )
}

/// How the terminal named the original: F61 (batch, STAN, date), F37, F38.
fn original_ref(req: &Request<'_>) -> Option<String> {
    let f61 = req.digits(61);
    let f37 = req.msg.text(37).unwrap_or("");
    let f38 = req.msg.text(38).unwrap_or("");
    (!(f61.is_empty() && f37.is_empty() && f38.is_empty()))
        .then(|| format!("61={f61} 37={f37} 38={f38}"))
}

/// F43: name (25), city (13), country (2), padded; printable ASCII only.
fn merchant_location(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(25)
        .collect();
    format!("{clean:<25}{:<13}{}", "SHANGHAI", "CN")
}

/// What makes two requests with the same key the same request (D1) or not (D2).
pub(crate) fn request_digest(
    mti: Mti,
    processing_code: &str,
    condition: &str,
    amount: u64,
    pan_hash: &[u8; 32],
) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update(mti.digits());
    h.update(processing_code.as_bytes());
    h.update(condition.as_bytes());
    h.update(amount.to_be_bytes());
    h.update(pan_hash);
    h.finalize().into()
}
