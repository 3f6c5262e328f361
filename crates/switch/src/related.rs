//! Transactions that refer to an earlier one: voids, reversals, refunds,
//! pre-authorisation cancels and completions, and the batch's settlement and
//! upload. Each finds its original in the journal and is decided by the
//! rules of rules.md (V1-V6, R1-R5, F1-F6, P1-P3, S1); a rejected attempt is
//! journalled too, with the original it matched and the rule that decided.

use std::time::Duration;

use bytes::BytesMut;
use chrono::{Datelike, NaiveDate, Utc};
use iso8583::Pan;
use tracing::{debug, warn};

use crate::config::SameDayRefund;
use crate::journal::{self, Disposition, Find, NewEntry, Original, ReversalStep};
use crate::model::{Kind, ResponseCode, State};
use crate::repeated::warn_repeated;
use crate::router::{Related, ReplyFields, Request, Switch, business_date, request_digest};
use crate::terminals::Terminal;
use group_commit::postgres::Said;

/// What a request carries that the journal keeps.
struct Parts {
    processing_code: String,
    condition: String,
    amount: u64,
    pan: Option<Pan>,
    pan_hash: Option<[u8; 32]>,
    digest: [u8; 32],
    today: NaiveDate,
}

/// What a terminal may reverse (terminal-cup.md): refunds and the 0220
/// advices are retried instead.
const REVERSIBLE: [&str; 6] = [
    "purchase",
    "void",
    "preauth",
    "preauth_cancel",
    "completion",
    "completion_void",
];

/// `MMDD` of a date (F61.3).
fn mmdd(date: NaiveDate) -> String {
    format!("{:02}{:02}", date.month(), date.day())
}

/// A journalled reversal to decide (R1-R5): what its row or its request says.
struct Reversing<'a> {
    row: i64,
    merchant_id: &'a str,
    terminal_id: &'a str,
    batch: i32,
    stan: i32,
    /// The MTI classes its original may have, in the order to look.
    classes: &'static [i16],
    processing_code: &'a str,
    amount: i64,
    /// The business day it arrived on (R5).
    today: NaiveDate,
    /// F39 of the 0400.
    reason: &'a str,
}

/// What [`Switch::decide_reversal`] did.
enum ReversalDecided {
    /// Approved, its original reversed or marked as it says.
    Approved,
    /// Refused by this rule, with this code: for the caller to record.
    Refused(&'static str, ResponseCode),
    /// The journal failed: the row is still `received`.
    Failed,
    /// The row was decided by another meanwhile (a repeat or the recovery
    /// sweep took it over): this decision changed nothing.
    Elsewhere,
}

/// The MTI class of what a reversal reverses, by its F60.1: pre-auth and
/// its cancel are 0100, the rest 0200. Unknown (a row written before
/// reversals kept F60.1), both, 0200 first; a terminal's STAN names one
/// transaction of its batch.
fn reversed_classes(type_code: Option<&str>) -> &'static [i16] {
    match type_code {
        Some("10" | "11") => &[1],
        Some(_) => &[2],
        None => &[2, 1],
    }
}

impl Switch {
    /// Decides a row held for deciding; when that ends without a reply
    /// (`Some` code: the journal failed under it), the row is noted as
    /// given up, for a repeat to take over ([`Switch::abandoned`]).
    async fn holding(
        &self,
        id: i64,
        deciding: impl std::future::Future<Output = Option<ResponseCode>>,
    ) -> Option<ResponseCode> {
        let result = deciding.await;
        if result.is_some() {
            self.abandoned(id);
        }
        result
    }

    /// A request about `original` must not overtake a reversal still on its
    /// way to the issuer (the reversal of an earlier void of this sale):
    /// those are sent first. `Some(answer)` when they cannot be (`91`:
    /// the terminal tries again later) or the queue cannot be read.
    async fn family_clear(&self, original: &Original) -> Option<Option<ResponseCode>> {
        if !original.family_pending {
            return None;
        }
        match crate::advice::flush_family(self, original.id).await {
            Ok(true) => None,
            Ok(false) => Some(Some(ResponseCode::ISSUER_UNAVAILABLE)),
            Err(e) => {
                warn!(error = %Said(&e), "advice queue read failed");
                Some(Some(ResponseCode::SYSTEM_ERROR))
            }
        }
    }

    /// Whether `mmdd` (F61.3) names the original's date: the local date its
    /// reply carried in F13, which is what the terminal sends back, or its
    /// business day (they differ after the cut-over).
    fn dated(&self, o: &Original, given: &str) -> bool {
        let local = o
            .received_at
            .with_timezone(&self.config.rules.time_zone)
            .date_naive();
        given == mmdd(local) || given == mmdd(o.business_date)
    }
}

impl Switch {
    fn parts(&self, req: &Request<'_>) -> Parts {
        let msg = &req.msg;
        let track = msg.digits(35).and_then(|d| d.to_track());
        let pan = msg
            .digits(2)
            .and_then(|d| d.to_pan())
            .or_else(|| track.and_then(|t| t.pan()));
        let pan_hash = pan.as_ref().map(|p| self.key.hash(p));
        let processing_code = req.digits(3);
        let condition = Some(req.digits(25))
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| "00".into());
        let amount = msg.digits(4).and_then(|d| d.to_u64()).unwrap_or(0);
        let digest = request_digest(
            msg.mti(),
            &processing_code,
            &condition,
            amount,
            &pan_hash.unwrap_or([0; 32]),
        );
        Parts {
            processing_code,
            condition,
            amount,
            pan,
            pan_hash,
            digest,
            today: business_date(&self.config, Utc::now()),
        }
    }

    fn entry<'a>(
        &'a self,
        req: &'a Request<'_>,
        kind: Kind,
        batch: i32,
        p: &'a Parts,
    ) -> NewEntry<'a> {
        NewEntry {
            terminal_id: req.terminal_id,
            merchant_id: req.merchant_id,
            batch,
            stan: req.stan as i32,
            mti: req.msg.mti().value(),
            kind,
            processing_code: &p.processing_code,
            pos_condition: &p.condition,
            amount: p.amount as i64,
            pan_hash: p.pan_hash,
            pan_masked: p.pan.as_ref().map(Pan::masked),
            digest: p.digest,
            business_date: p.today,
            original_id: None,
            rule: None,
            operator: req.operator(),
            reversal_reason: None,
            original_ref: None,
            claim: None,
            // K1 and the batch were checked against a terminal read a
            // moment ago; a settlement or an upload names a batch that may
            // have closed, and checks it itself. A reversal checks it too,
            // but its batch may close between that check and its insert.
            open_batch: !matches!(
                kind,
                Kind::Settlement | Kind::BatchUpload | Kind::BatchUploadEnd
            ),
            institution_id: &self.config.institution_id,
            forwarding_id: &self.config.forwarding_id,
        }
    }

    /// Journals a request the switch answers itself (approved or declined by
    /// a rule) and writes its reply; a repeat gets the stored reply (D1).
    #[allow(clippy::too_many_arguments)]
    async fn answer(
        &self,
        req: &Request<'_>,
        mut entry: NewEntry<'_>,
        original: Option<&Original>,
        rule: &'static str,
        state: State,
        rc: ResponseCode,
        extra: ReplyFields<'_>,
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        entry.original_id = original.map(|o| o.id);
        entry.rule = Some(rule);
        debug!(rule, rc = %rc, "decided by the switch");
        let w = match self
            .journal(req, &entry, Disposition::Answer(state, rc), out)
            .await
        {
            Ok(w) => w,
            Err(answered) => return answered,
        };
        self.reply(
            req,
            out,
            ReplyFields {
                rc: Some(rc),
                rrn: Some(&w.rrn),
                ..extra
            },
        );
        self.store_reply(w.id, out).await;
        None
    }

    async fn reject(
        &self,
        req: &Request<'_>,
        entry: NewEntry<'_>,
        original: Option<&Original>,
        rule: &'static str,
        rc: ResponseCode,
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        self.answer(
            req,
            entry,
            original,
            rule,
            State::Declined,
            rc,
            ReplyFields::default(),
            out,
        )
        .await
    }

    /// A request about an original whose F2 and track 2 name two cards:
    /// journalled refused (14), under the batch it names, so that the
    /// audit trail has it and a repeat gets the same answer.
    pub(crate) async fn refuse_two_cards(
        &self,
        req: &Request<'_>,
        kind: Kind,
        terminal: &Terminal,
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        let p = self.parts(req);
        let batch = req.batch().unwrap_or(terminal.batch);
        let entry = self.entry(req, kind, batch, &p);
        self.reject(req, entry, None, "F2-F35", ResponseCode::INVALID_CARD, out)
            .await
    }

    /// Everything that refers to an earlier transaction, and settlement.
    pub(crate) async fn related(
        &self,
        req: &Request<'_>,
        kind: Kind,
        terminal: &Terminal,
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        match kind {
            Kind::Void | Kind::CompletionVoid => self.void(req, kind, terminal, out).await,
            Kind::Refund => self.refund(req, terminal, out).await,
            Kind::PreAuthCancel | Kind::Completion | Kind::CompletionAdvice => {
                self.preauth_followup(req, kind, terminal, out).await
            }
            Kind::Reversal => self.reversal(req, terminal, out).await,
            Kind::Settlement => self.settlement(req, terminal, out).await,
            Kind::BatchUpload | Kind::BatchUploadEnd => {
                self.batch_upload(req, kind, terminal, out).await
            }
            _ => Some(ResponseCode::INVALID_TRANSACTION),
        }
    }

    /// V1-V6: a purchase void (or a completion void).
    async fn void(
        &self,
        req: &Request<'_>,
        kind: Kind,
        terminal: &Terminal,
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        let p = self.parts(req);
        let entry = self.entry(req, kind, terminal.batch, &p);
        let f61 = req.digits(61);
        let (Some(batch), Some(stan)) = (
            f61.get(0..6).and_then(|b| b.parse::<i32>().ok()),
            f61.get(6..12).and_then(|s| s.parse::<i32>().ok()),
        ) else {
            return Some(ResponseCode::FORMAT_ERROR);
        };
        let named = |mti_class| Find::ByStan {
            merchant_id: req.merchant_id.to_string(),
            terminal_id: req.terminal_id.to_string(),
            batch,
            stan,
            mti_class,
        };
        // V1 names a transaction by batch and STAN, whatever its class: a
        // purchase or completion (0200), else a pre-authorisation or its
        // cancel (0100), which is there but of the wrong kind (V5, 12).
        let rrn_given = req.msg.text(37).filter(|r| !r.trim().is_empty());
        let mut original = None;
        for class in [2, 1] {
            match self.writer.find(named(class)).await {
                // F37, when given, cross-checks the one found.
                Ok(found) => {
                    original = found
                        .into_iter()
                        .next()
                        .filter(|o| rrn_given.is_none_or(|r| r == o.rrn));
                }
                Err(e) => {
                    warn_repeated!(error = %Said(&e), "journal read failed");
                    return Some(ResponseCode::SYSTEM_ERROR);
                }
            }
            if original.is_some() {
                break;
            }
        }
        let Some(o) = original else {
            return self
                .reject(req, entry, None, "V1", ResponseCode::NOT_FOUND, out)
                .await;
        };
        let expected = if kind == Kind::Void {
            "purchase"
        } else {
            "completion"
        };
        if o.batch != terminal.batch || o.business_date != p.today {
            return self
                .reject(
                    req,
                    entry,
                    Some(&o),
                    "V2",
                    ResponseCode::INVALID_TRANSACTION,
                    out,
                )
                .await;
        }
        if o.amount != p.amount as i64 {
            return self
                .reject(
                    req,
                    entry,
                    Some(&o),
                    "V3",
                    ResponseCode::AMOUNT_MISMATCH,
                    out,
                )
                .await;
        }
        if o.pan_hash.as_deref() != p.pan_hash.as_ref().map(|h| &h[..]) {
            return self
                .reject(req, entry, Some(&o), "V4", ResponseCode::INVALID_CARD, out)
                .await;
        }
        if o.kind != expected || o.state != "approved" {
            return self
                .reject(
                    req,
                    entry,
                    Some(&o),
                    "V5",
                    ResponseCode::INVALID_TRANSACTION,
                    out,
                )
                .await;
        }
        if self.config.rules.void_last_only {
            match journal::is_last_approved(&self.pool, &o).await {
                Ok(true) => {}
                Ok(false) => {
                    return self
                        .reject(
                            req,
                            entry,
                            Some(&o),
                            "V6",
                            ResponseCode::INVALID_TRANSACTION,
                            out,
                        )
                        .await;
                }
                Err(e) => {
                    warn_repeated!(error = %Said(&e), "journal read failed");
                    return Some(ResponseCode::SYSTEM_ERROR);
                }
            }
        }
        if let Some(answer) = self.family_clear(&o).await {
            return answer;
        }
        let related = Related {
            original: &o,
            rule: "V1-V6",
            claim: Some("voided"),
            lost_rule: "V5",
        };
        self.forward(req, kind, terminal, Some(related), out).await
    }

    /// F1-F6: a refund, an advice the switch answers once it is journalled.
    async fn refund(
        &self,
        req: &Request<'_>,
        terminal: &Terminal,
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        let p = self.parts(req);
        let mut entry = self.entry(req, Kind::Refund, terminal.batch, &p);
        if p.amount == 0 {
            return Some(ResponseCode::FORMAT_ERROR);
        }
        let f61 = req.digits(61);
        let rrn = req.msg.text(37).unwrap_or("");
        let named = Find::ByRrn {
            rrn: rrn.to_string(),
            merchant_id: req.merchant_id.to_string(),
        };
        let original = match self.writer.find(named).await {
            Ok(o) => o.into_iter().next(),
            Err(e) => {
                warn_repeated!(error = %Said(&e), "journal read failed");
                return Some(ResponseCode::SYSTEM_ERROR);
            }
        };
        // F61.3 names the original's day; F61.1/61.2, when given, its batch and STAN.
        let named = |o: &Original| {
            let date_ok = f61.get(12..16).is_none_or(|d| self.dated(o, d));
            let batch_ok = f61
                .get(0..6)
                .and_then(|b| b.parse::<i32>().ok())
                .is_none_or(|b| b == 0 || b == o.batch);
            let stan_ok = f61
                .get(6..12)
                .and_then(|s| s.parse::<i32>().ok())
                .is_none_or(|s| s == 0 || s == o.stan);
            date_ok && batch_ok && stan_ok
        };
        let Some(o) = original.filter(|o| named(o)) else {
            return self
                .reject(req, entry, None, "F1", ResponseCode::NOT_FOUND, out)
                .await;
        };
        let refundable = matches!(
            o.kind.as_str(),
            "purchase" | "completion" | "completion_advice"
        ) && matches!(o.state.as_str(), "approved" | "partially_refunded");
        if !refundable {
            return self
                .reject(
                    req,
                    entry,
                    Some(&o),
                    "F2",
                    ResponseCode::INVALID_TRANSACTION,
                    out,
                )
                .await;
        }
        if (p.today - o.business_date).num_days() > i64::from(self.config.rules.refund_window_days)
        {
            return self
                .reject(
                    req,
                    entry,
                    Some(&o),
                    "F4",
                    ResponseCode::INVALID_TRANSACTION,
                    out,
                )
                .await;
        }
        let same_batch = o.batch == terminal.batch;
        if self.config.rules.same_day_refund == SameDayRefund::Deny && same_batch {
            return self
                .reject(
                    req,
                    entry,
                    Some(&o),
                    "F5",
                    ResponseCode::INVALID_TRANSACTION,
                    out,
                )
                .await;
        }
        if o.amount - o.refunded_amount < p.amount as i64 {
            return self
                .reject(req, entry, Some(&o), "F3", ResponseCode::OVER_LIMIT, out)
                .await;
        }
        entry.original_id = Some(o.id);
        entry.rule = Some("F1-F6");
        // A concurrent refund may take what is left (F3, 61), or a void or
        // reversal the whole original (F2, 12).
        self.advise(
            req,
            &entry,
            &o,
            journal::AdviceKind::Refund,
            |now| match now {
                "approved" | "partially_refunded" | "refunded" => ("F3", ResponseCode::OVER_LIMIT),
                _ => ("F2", ResponseCode::INVALID_TRANSACTION),
            },
            out,
        )
        .await
    }

    /// F6 / P3: journals an advice the switch answers itself, applies it to
    /// its original and queues it for the issuer; `lost` gives the rule and
    /// code, from the original's state as it is now, when the original was
    /// claimed by someone else in the meantime.
    async fn advise(
        &self,
        req: &Request<'_>,
        entry: &NewEntry<'_>,
        original: &Original,
        kind: journal::AdviceKind,
        lost: fn(&str) -> (&'static str, ResponseCode),
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        let written = match self.journal(req, entry, Disposition::Hold, out).await {
            Ok(w) => w,
            Err(answered) => return answered,
        };
        // A row left `received` without a reply (the journal failed under
        // it) is one a repeat may take over soon (`Switch::adopt`).
        self.holding(written.id, async {
            // The approved reply is stored by the statement that approves it.
            self.reply_code(req, out, ResponseCode::APPROVED, Some(&written.rrn));
            let reply = self.body(out).to_vec();
            let apply = journal::Apply {
                row_id: written.id,
                original_id: original.id,
                amount: entry.amount,
                kind,
                reply,
            };
            match self.writer.apply(apply).await {
                Ok(true) => {
                    self.advice_wake.notify_one();
                    None
                }
                Ok(false) => {
                    // The claim is lost either way; a failed read only blurs why.
                    let now = journal::state_of(&self.pool, original.id)
                        .await
                        .unwrap_or_else(|e| {
                            warn_repeated!(error = %Said(&e), "journal read failed");
                            None
                        });
                    let (rule, code) = lost(now.as_deref().unwrap_or(""));
                    self.decided(req, written.id, &written.rrn, rule, code, out)
                        .await
                }
                Err(e) => {
                    warn_repeated!(error = %Said(&e), "journal write failed");
                    Some(ResponseCode::SYSTEM_ERROR)
                }
            }
        })
        .await
    }

    /// P1-P3: a pre-authorisation cancel, completion or completion advice.
    async fn preauth_followup(
        &self,
        req: &Request<'_>,
        kind: Kind,
        terminal: &Terminal,
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        let p = self.parts(req);
        let mut entry = self.entry(req, kind, terminal.batch, &p);
        if p.amount == 0 || p.pan_hash.is_none() {
            return Some(ResponseCode::FORMAT_ERROR);
        }
        let auth = req.msg.text(38).unwrap_or("");
        let date = req.digits(61).get(12..16).map(str::to_string);
        let named = Find::Preauths {
            auth_code: auth.to_string(),
            pan_hash: p.pan_hash.unwrap_or_default(),
        };
        let candidates = match self.writer.find(named).await {
            Ok(c) => c,
            Err(e) => {
                warn_repeated!(error = %Said(&e), "journal read failed");
                return Some(ResponseCode::SYSTEM_ERROR);
            }
        };
        let Some(o) = candidates
            .into_iter()
            .find(|o| date.as_deref().is_none_or(|d| self.dated(o, d)))
        else {
            return self
                .reject(req, entry, None, "P1", ResponseCode::NOT_FOUND, out)
                .await;
        };
        if (p.today - o.business_date).num_days() > i64::from(self.config.rules.preauth_valid_days)
        {
            return self
                .reject(
                    req,
                    entry,
                    Some(&o),
                    "P2",
                    ResponseCode::INVALID_TRANSACTION,
                    out,
                )
                .await;
        }
        let limit = match kind {
            Kind::PreAuthCancel => o.amount,
            _ => o.amount * (100 + i64::from(self.config.rules.completion_tolerance_percent)) / 100,
        };
        let amount_ok = match kind {
            Kind::PreAuthCancel => p.amount as i64 == o.amount,
            _ => p.amount as i64 <= limit,
        };
        if !amount_ok {
            return self
                .reject(
                    req,
                    entry,
                    Some(&o),
                    "P3",
                    ResponseCode::AMOUNT_MISMATCH,
                    out,
                )
                .await;
        }
        if o.state != "approved" {
            return self
                .reject(
                    req,
                    entry,
                    Some(&o),
                    "P3",
                    ResponseCode::INVALID_TRANSACTION,
                    out,
                )
                .await;
        }
        if let Some(answer) = self.family_clear(&o).await {
            return answer;
        }
        let claim = if kind == Kind::PreAuthCancel {
            "cancelled"
        } else {
            "completed"
        };
        if kind != Kind::CompletionAdvice {
            let related = Related {
                original: &o,
                rule: "P1-P3",
                claim: Some(claim),
                lost_rule: "P3",
            };
            return self.forward(req, kind, terminal, Some(related), out).await;
        }
        // A completion advice: journalled, answered, and forwarded as a stored advice.
        entry.original_id = Some(o.id);
        entry.rule = Some("P1-P3");
        self.advise(
            req,
            &entry,
            &o,
            journal::AdviceKind::Completion,
            |_| ("P3", ResponseCode::INVALID_TRANSACTION),
            out,
        )
        .await
    }

    /// R1-R5: a reversal (0400) of the terminal's own transaction, named by
    /// its STAN in the open batch. The reversal is journalled first, so a
    /// repeat is caught as a duplicate and replayed before anything else
    /// happens; then the original's state changes in the same statement that
    /// records the reversal's answer.
    async fn reversal(
        &self,
        req: &Request<'_>,
        terminal: &Terminal,
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        let p = self.parts(req);
        let batch = req.batch().unwrap_or(terminal.batch);
        // Journalled under the batch it names, as D1 keys it: a reversal
        // refused for naming a settled batch must not hold its STAN in the
        // terminal's new batch, where the same STAN names another sale.
        let mut entry = self.entry(req, Kind::Reversal, batch, &p);
        let reason = req.msg.text(39).unwrap_or("06").to_string();
        entry.reversal_reason = Some(reason.clone());
        // R1 names the original by F11 and F60.1; kept with the row, so
        // that a reversal nobody repeats can still be decided from it.
        let type_code = req.f60_part(0, 2);
        entry.original_ref = Some(format!("11={:06} 60.1={type_code}", req.stan));
        if batch != terminal.batch {
            return self.reversal_settled(req, entry, out).await;
        }
        // Journalled only while the batch is open, as a sale is: one that
        // closed since the terminal was read (its settlement committed
        // meanwhile) would have counted the sale this undoes.
        let written = match self
            .journal_in_batch(req, &entry, Disposition::Hold, out)
            .await
        {
            Ok(Some(w)) => w,
            Ok(None) => return self.reversal_settled(req, entry, out).await,
            Err(answered) => return answered,
        };
        let asked = Reversing {
            row: written.id,
            merchant_id: req.merchant_id,
            terminal_id: req.terminal_id,
            batch,
            stan: req.stan as i32,
            classes: reversed_classes(Some(type_code)),
            processing_code: &p.processing_code,
            amount: p.amount as i64,
            today: p.today,
            reason: &reason,
        };
        // A row left `received` without a reply (the journal failed under
        // it) is one a repeat may take over soon (`Switch::adopt`), and the
        // recovery sweep later (`Switch::decide_undecided_reversals`).
        self.holding(written.id, async {
            // The approved reply is stored by the statement that approves it.
            self.reply_code(req, out, ResponseCode::APPROVED, Some(&written.rrn));
            let reply = self.body(out).to_vec();
            match self.decide_reversal(&asked, Some(reply)).await {
                // `out` still holds the approved reply built above.
                ReversalDecided::Approved => None,
                ReversalDecided::Refused(rule, rc) => {
                    self.decided(req, written.id, &written.rrn, rule, rc, out)
                        .await
                }
                ReversalDecided::Failed => Some(ResponseCode::SYSTEM_ERROR),
                ReversalDecided::Elsewhere => {
                    self.decided_elsewhere(req, written.id, &written.rrn, out)
                        .await
                }
            }
        })
        .await
    }

    /// R1-R5: finds what a journalled (`received`) reversal reverses and
    /// reverses it, or marks it, or approves the reversal as a marker; its
    /// row is approved with `reply` by the same statement. A refusal (R4,
    /// R5, an original undone since) is the caller's to record.
    async fn decide_reversal(&self, r: &Reversing<'_>, reply: Option<Vec<u8>>) -> ReversalDecided {
        let network_reason = if r.reason == "98" { "68" } else { "06" };
        let decided = |rule, original: Option<&Original>, step| journal::Reversal {
            row: r.row,
            rule,
            original: original.map(|o| o.id),
            reply: reply.clone(),
            step,
        };
        for _ in 0..3 {
            // Read after the reversal's row is durable, never in its statement:
            // an original written in the same batch would not see this row,
            // nor this read the original.
            let mut original = None;
            for &class in r.classes {
                let named = Find::ByStan {
                    merchant_id: r.merchant_id.to_string(),
                    terminal_id: r.terminal_id.to_string(),
                    batch: r.batch,
                    stan: r.stan,
                    mti_class: class,
                };
                // Refunds and advices are not reversible (they are retried instead).
                match self.writer.find(named).await {
                    Ok(found) => {
                        original = found.into_iter().next().filter(|o| {
                            o.processing_code == r.processing_code
                                && REVERSIBLE.contains(&o.kind.as_str())
                        });
                    }
                    Err(e) => {
                        warn_repeated!(error = %Said(&e), "journal read failed");
                        return ReversalDecided::Failed;
                    }
                }
                if original.is_some() {
                    break;
                }
            }
            let reversal = match &original {
                // R3: nothing (yet) to reverse; this row is the marker an
                // original arriving later is checked against.
                None => decided("R3", None, ReversalStep::Approve),
                Some(o) if o.amount != r.amount => {
                    return ReversalDecided::Refused("R4", ResponseCode::AMOUNT_MISMATCH);
                }
                Some(o) if o.business_date != r.today => {
                    return ReversalDecided::Refused("R5", ResponseCode::INVALID_TRANSACTION);
                }
                Some(o) => match o.state.as_str() {
                    "sent" => decided("R3", Some(o), ReversalStep::Mark),
                    "approved" => decided("R2", Some(o), ReversalStep::Reverse(network_reason)),
                    "declined" | "reversed" | "unknown" => {
                        decided("R3", Some(o), ReversalStep::Approve)
                    }
                    // Voided, refunded, completed or cancelled since: the
                    // later transaction has to be undone first.
                    _ => return ReversalDecided::Refused("R2", ResponseCode::INVALID_TRANSACTION),
                },
            };
            match self.writer.reverse(reversal).await {
                Ok(true) => {
                    self.advice_wake.notify_one();
                    return ReversalDecided::Approved;
                }
                // The original's state changed under us: look again; unless
                // the row itself was decided by another meanwhile.
                Ok(false) => match journal::state_of(&self.pool, r.row).await {
                    Ok(Some(state)) if state != "received" => return ReversalDecided::Elsewhere,
                    Ok(_) => continue,
                    Err(e) => {
                        warn_repeated!(error = %Said(&e), "journal read failed");
                        return ReversalDecided::Failed;
                    }
                },
                Err(e) => {
                    warn_repeated!(error = %Said(&e), "journal write failed");
                    return ReversalDecided::Failed;
                }
            }
        }
        ReversalDecided::Failed
    }

    /// The recovery sweep's part for reversals: decides those left
    /// `received` without a reply (the journal failed under them, or their
    /// switch died deciding them) that no repeat took over. The terminal
    /// showed the cardholder a failure and may never send its 0400 again;
    /// left undecided, the sale would stay charged. Each is taken over as a
    /// repeat would take it ([`journal::adopt`]), so that of two
    /// switches, or a sweep and a repeat, one decides. Its row gets no
    /// stored reply: a repeat is answered from its state.
    pub(crate) async fn decide_undecided_reversals(
        &self,
        older_than: Duration,
    ) -> Result<(), sqlx::Error> {
        for row in journal::undecided_reversals(&self.pool, older_than, 20).await? {
            let Some(batch_open) = journal::adopt(&self.pool, row.id, older_than).await? else {
                continue;
            };
            let type_code = row
                .original_ref
                .as_deref()
                .and_then(|r| r.split_once("60.1="))
                .map(|(_, code)| code);
            let asked = Reversing {
                row: row.id,
                merchant_id: &row.merchant_id,
                terminal_id: &row.terminal_id,
                batch: row.batch,
                stan: row.stan,
                classes: reversed_classes(type_code),
                processing_code: &row.processing_code,
                amount: row.amount,
                today: row.business_date,
                reason: row.reversal_reason.as_deref().unwrap_or("06"),
            };
            let outcome = if batch_open {
                self.decide_reversal(&asked, None).await
            } else {
                // S1: settled meanwhile; the batch's totals counted the sale.
                ReversalDecided::Refused("S1", ResponseCode::INVALID_TRANSACTION)
            };
            match outcome {
                ReversalDecided::Approved => {}
                ReversalDecided::Refused(rule, rc) => {
                    if !journal::decide(&self.pool, row.id, rule, rc, None).await? {
                        continue;
                    }
                }
                ReversalDecided::Elsewhere => continue,
                // The journal is in trouble: the rest wait for the next
                // sweep rather than hold up the advice queue behind it.
                ReversalDecided::Failed => break,
            }
            let state = journal::state_of(&self.pool, row.id).await?;
            warn!(
                rrn = %row.rrn,
                terminal = %row.terminal_id,
                state = state.as_deref().unwrap_or(""),
                "decided a reversal left undecided (the journal failed under it, or its switch stopped) that its terminal did not repeat"
            );
        }
        Ok(())
    }

    /// S1: a settled batch takes no reversal: refused, under the batch it
    /// names (which is closed, so the row does not ask for it open).
    async fn reversal_settled(
        &self,
        req: &Request<'_>,
        mut entry: NewEntry<'_>,
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        entry.open_batch = false;
        self.reject(
            req,
            entry,
            None,
            "S1",
            ResponseCode::INVALID_TRANSACTION,
            out,
        )
        .await
    }

    /// S1: settlement. The terminal's F48 totals against the journal's; the
    /// batch closes either way.
    async fn settlement(
        &self,
        req: &Request<'_>,
        terminal: &Terminal,
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        let p = self.parts(req);
        let batch = req.batch().unwrap_or(terminal.batch);
        let entry = self.entry(req, Kind::Settlement, batch, &p);
        let given = req.digits(48);
        if given.len() != 62 {
            return Some(ResponseCode::FORMAT_ERROR);
        }
        if batch != terminal.batch {
            // A repeat of a settlement already made gets its stored reply.
            return self
                .reject(req, entry, None, "S1", ResponseCode::BATCH_MISMATCH, out)
                .await;
        }
        // The settlement is journalled before the batch closes, so that a
        // repeat racing it finds it and waits for its reply, rather than
        // finding the batch closed and answering 77.
        let mut entry = entry;
        entry.rule = Some("S1");
        let written = match self.journal(req, &entry, Disposition::Hold, out).await {
            Ok(w) => w,
            Err(answered) => return answered,
        };
        // A row left `received` without a reply (the journal failed under
        // it) is one a repeat may take over soon (`Switch::adopt`).
        self.holding(written.id, async {
            // The totals are the journal's once nothing of the batch is still
            // at the issuer or being decided (a request of another
            // connection of the terminal, say): its outcome would be left
            // out. That waits at most what an answer may take, and the
            // recovery sweep's margin; then the batch closes as it is.
            let in_flight = self.config.rules.issuer_timeout + Duration::from_secs(2);
            let until = tokio::time::Instant::now() + in_flight;
            let mut stale = 0;
            loop {
                let ours = match journal::batch_totals(&self.pool, req.terminal_id, batch).await {
                    Ok(t) => t,
                    Err(e) => {
                        warn_repeated!(error = %Said(&e), "journal read failed");
                        return Some(ResponseCode::SYSTEM_ERROR);
                    }
                };
                let (reply_totals, balanced) = reconciled(&given, &ours);
                self.reply(
                    req,
                    out,
                    ReplyFields {
                        rc: Some(ResponseCode::APPROVED),
                        rrn: Some(&written.rrn),
                        totals: Some(&reply_totals),
                        ..Default::default()
                    },
                );
                let settlement = journal::Settlement {
                    row_id: written.id,
                    terminal_id: req.terminal_id,
                    merchant_id: req.merchant_id,
                    batch,
                    terminal_totals: &given,
                    // The journal's figures with the codes the reply gave
                    // each part (a part that matches is the terminal's).
                    switch_totals: &reply_totals,
                    totals_read: &ours,
                    balanced,
                    operator: req.operator(),
                    reply: self.body(out),
                };
                let force = journal::Force {
                    in_flight: tokio::time::Instant::now() >= until,
                    // Totals that change between every reading and closing,
                    // a hundred times over: the batch closes as it is.
                    stale: stale >= 100,
                };
                let closed = journal::settle(&self.pool, &settlement, force, in_flight).await;
                match closed {
                    Ok(journal::Settled::Closed) => {
                        self.writer.forget_terminal(req.terminal_id);
                        return None;
                    }
                    Ok(journal::Settled::InFlight) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    // Read again at once: what changed them is decided.
                    Ok(journal::Settled::Stale) => stale += 1,
                    // Another switch process closed the batch since it was read.
                    Ok(journal::Settled::Elsewhere) => {
                        self.writer.forget_terminal(req.terminal_id);
                        return self
                            .decided(
                                req,
                                written.id,
                                &written.rrn,
                                "S1",
                                ResponseCode::BATCH_MISMATCH,
                                out,
                            )
                            .await;
                    }
                    Err(e) => {
                        warn!(error = %Said(&e), "closing the batch failed");
                        return Some(ResponseCode::SYSTEM_ERROR);
                    }
                }
            }
        })
        .await
    }

    /// Batch upload (0320 201) records and its end (202), for the settled batch.
    async fn batch_upload(
        &self,
        req: &Request<'_>,
        kind: Kind,
        terminal: &Terminal,
        out: &mut BytesMut,
    ) -> Option<ResponseCode> {
        let p = self.parts(req);
        let batch = req.batch().unwrap_or(terminal.batch);
        let entry = self.entry(req, kind, batch, &p);
        if kind == Kind::BatchUpload {
            let f48 = req.digits(48);
            let count: usize = f48
                .get(0..2)
                .and_then(|c| c.parse().ok())
                .unwrap_or(usize::MAX);
            if count > 8 || f48.len() != 2 + count * 40 {
                return Some(ResponseCode::FORMAT_ERROR);
            }
            let records: Vec<journal::Upload> = (0..count)
                .map(|i| {
                    let r = &f48[2 + i * 40..2 + (i + 1) * 40];
                    let pan_digits = r[8..28].trim_start_matches('0');
                    journal::Upload {
                        card_type: r[0..2].to_string(),
                        stan: r[2..8].parse().unwrap_or(0),
                        pan_masked: Pan::new(pan_digits).ok().map(|p| p.masked()),
                        amount: r[28..40].parse().unwrap_or(0),
                    }
                })
                .collect();
            if let Err(e) =
                journal::store_uploads(&self.pool, req.terminal_id, batch, &records).await
            {
                warn!(error = %Said(&e), "storing batch upload records failed");
                return Some(ResponseCode::SYSTEM_ERROR);
            }
        }
        self.answer(
            req,
            entry,
            None,
            "S1",
            State::Approved,
            ResponseCode::APPROVED,
            ReplyFields::default(),
            out,
        )
        .await
    }
}

/// S1's reply to a settlement's F48 totals `given`, against the journal's
/// `ours`, and whether the batch balanced. Each part (domestic cards, then
/// foreign, 31 digits each) has its own reconciliation code (digits 30 and
/// 61): the terminal's figures with `1` where they match the journal's,
/// else the journal's with `2`. The terminal's own codes are not compared.
pub(crate) fn reconciled(given: &str, ours: &str) -> (String, bool) {
    let part = |figures: std::ops::Range<usize>| {
        if given.get(figures.clone()) == ours.get(figures.clone()) {
            (given.get(figures).unwrap_or(""), '1')
        } else {
            (ours.get(figures).unwrap_or(""), '2')
        }
    };
    let (domestic, d) = part(0..30);
    let (foreign, f) = part(31..61);
    (format!("{domestic}{d}{foreign}{f}"), d == '1' && f == '1')
}
