//! The simple load: N terminals, each signing on and then sending purchases
//! one after another (the next as soon as the previous is answered), for a
//! fixed time. Closed loop, so it measures what the switch sustains with N
//! terminals in flight; the open-loop scenario runner measures latency
//! against a schedule.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use iso8583::Dialect;
use iso8583::keys::DerivationKey;

use crate::terminal::{Original, Reply, Reversed, Terminal, TerminalError};

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The switch's terminal address.
    pub target: String,
    /// Terminals, `T0000001` upwards.
    pub terminals: usize,
    /// Their merchant.
    pub merchant: String,
    /// How long.
    pub duration: Duration,
    /// Cards used, `6222020000000000001` upwards, round robin.
    pub cards: u64,
    /// Fen per purchase.
    pub amount: u64,
    /// What each terminal sends.
    pub mix: Mix,
    /// How long a terminal waits for the connection and its sign-on, and
    /// for each reply, before it stops and says so (as a scenario's
    /// `reply_timeout`: above the switch's issuer timeout).
    pub reply_timeout: Duration,
    /// The key each terminal's master key is derived from, as the
    /// switch's: the terminals take working keys at sign-on, MAC their
    /// requests and check their replies' MACs. `None`, no keys.
    pub derivation_key: Option<DerivationKey>,
}

/// What each terminal sends, over and over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// Purchases only.
    Purchases,
    /// A purchase and its void, then a purchase and its reversal: three of
    /// every four requests match an original in the journal.
    VoidHeavy,
}

/// What happened.
#[derive(Debug)]
pub struct Outcome {
    /// Requests answered (every terminal's, those that failed later included).
    pub answered: u64,
    /// Answered `00`.
    pub approved: u64,
    /// Answers by response code (F39; `none` for an answer without one).
    pub codes: BTreeMap<String, u64>,
    /// Replies whose MAC (F64) was missing or wrong; each stopped its
    /// terminal (and is among the failures).
    pub mac_failures: u64,
    /// Terminals that stopped before the end, each with why:
    /// `("T0000002", "cannot connect to 127.0.0.1:9: connection refused")`.
    pub failures: Vec<(String, String)>,
    /// Wall time.
    pub elapsed: Duration,
    /// Latency of every answered request, in microseconds.
    pub latency: Histogram<u64>,
}

impl Outcome {
    /// Answered requests per second.
    pub fn rate(&self) -> f64 {
        self.answered as f64 / self.elapsed.as_secs_f64()
    }

    /// The answers by code, `00: 120, 97: 35512`.
    pub fn codes_line(&self) -> String {
        let codes: Vec<String> = self
            .codes
            .iter()
            .map(|(rc, n)| format!("{rc}: {n}"))
            .collect();
        codes.join(", ")
    }

    /// Why the run measured nothing, when requests were answered and not
    /// one approved: every answer was a refusal (97 terminal disabled, 03
    /// merchant unknown, 77 batch, 51 no funds ...), the terminals' or the
    /// cards' setup to fix, not load the switch served.
    pub fn nothing_approved(&self) -> Option<String> {
        (self.answered > 0 && self.approved == 0).then(|| {
            format!(
                "none of {} answered requests was approved ({})",
                self.answered,
                self.codes_line()
            )
        })
    }

    /// The failures by cause, each cause once with its terminals, in the
    /// order of the terminals.
    pub fn causes(&self) -> Vec<(String, Vec<&str>)> {
        let mut causes: Vec<(String, Vec<&str>)> = Vec::new();
        for (id, cause) in &self.failures {
            match causes.iter_mut().find(|(c, _)| c == cause) {
                Some((_, ids)) => ids.push(id),
                None => causes.push((cause.clone(), vec![id])),
            }
        }
        causes
    }
}

/// What one terminal got done, kept when it fails later.
#[derive(Debug)]
struct Tally {
    answered: u64,
    mac_failures: u64,
    approved: u64,
    codes: BTreeMap<String, u64>,
    latency: Histogram<u64>,
}

/// An I/O error as an operator reads it: `connection refused`, not
/// `Connection refused (os error 111)`.
fn said(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = text
        .rsplit_once(" (os error ")
        .map_or(text.as_str(), |(message, _)| message);
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_lowercase().chain(chars).collect()
    })
}

/// Why an exchange failed, in the words of the failure list.
fn failed(e: TerminalError) -> String {
    match e {
        TerminalError::Io(e) => said(&e),
        other => other.to_string(),
    }
}

/// One terminal: connects and signs on (both within the reply timeout), then
/// sends until the plan's end; each request waits at most the reply timeout,
/// so a terminal ends at most that long after `until`. `Err` is why it
/// stopped early; what it got done before is in `tally`.
async fn one_terminal(
    plan: &Plan,
    id: &str,
    index: usize,
    dialect: Arc<Dialect>,
    until: Instant,
    tally: &mut Tally,
) -> Result<(), String> {
    let wait = plan.reply_timeout;
    let signed_on_by = tokio::time::Instant::now() + wait;
    let mut t = tokio::time::timeout_at(
        signed_on_by,
        Terminal::connect(&plan.target, id, &plan.merchant, dialect),
    )
    .await
    .map_err(|_| format!("cannot connect to {} within {wait:?}", plan.target))?
    .map_err(|e| format!("cannot connect to {}: {}", plan.target, failed(e)))?;
    t.set_master_key(plan.derivation_key.as_ref().map(|k| k.master_key(id)));
    // Successive runs in one batch must not reuse STANs: start from the clock.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.set_stan((now.as_millis() % 999_999) as u32);
    let signed = tokio::time::timeout_at(signed_on_by, t.sign_on())
        .await
        .map_err(|_| format!("no sign-on reply within {wait:?}"))?
        .map_err(|e| match e {
            // Answered, but without keys the terminal can take.
            TerminalError::Keys(_) => e.to_string(),
            e => format!("sign-on not answered: {}", failed(e)),
        })?;
    if signed.rc() != "00" {
        return Err(format!("sign-on answered {}", signed.rc()));
    }
    let mut card = index as u64;
    let mut last: Option<(u32, String, Reply)> = None;
    let mut step = 0u64;
    let built = |e: TerminalError| e.to_string();
    while Instant::now() < until {
        let (what, frame) = match (plan.mix, step % 4, &last) {
            (Mix::VoidHeavy, 1, Some((stan, pan, reply))) => {
                let original = Original {
                    batch: t.batch,
                    stan: *stan,
                    rrn: reply.field(37).unwrap_or(""),
                    auth_code: "",
                    date: "",
                };
                let s = t.next_stan();
                (
                    "void",
                    t.void(s, pan, "3012", plan.amount, &original)
                        .map_err(built)?,
                )
            }
            (Mix::VoidHeavy, 3, Some((stan, pan, _))) => {
                let f60 = t.f60("22");
                let reversed = Reversed {
                    pan,
                    processing_code: "000000",
                    amount: plan.amount,
                    stan: *stan,
                    condition: "00",
                    f60: &f60,
                    f61: None,
                };
                ("reversal", t.reversal(&reversed, "98").map_err(built)?)
            }
            _ => {
                card = card % plan.cards.max(1) + 1;
                let pan = format!("622202{card:013}");
                let stan = t.next_stan();
                let frame = t.purchase(stan, &pan, "3012", plan.amount).map_err(built)?;
                last = Some((stan, pan, Reply::empty()));
                ("purchase", frame)
            }
        };
        let start = Instant::now();
        let reply = tokio::time::timeout(wait, t.exchange(&frame))
            .await
            .map_err(|_| format!("no reply to a {what} within {wait:?}"))?
            .map_err(|e| format!("no reply to a {what}: {}", failed(e)))?;
        if reply.mac_valid == Some(false) {
            // Not the switch's word: the terminal cannot go on as if it
            // were (and this loop keeps no reversal record to send A0).
            tally.mac_failures += 1;
            return Err(format!(
                "the reply to a {what} has a missing or wrong MAC (F64)"
            ));
        }
        let _ = tally.latency.record(start.elapsed().as_micros() as u64);
        tally.answered += 1;
        if reply.rc() == "00" {
            tally.approved += 1;
        }
        let rc = match reply.rc() {
            "" => "none",
            rc => rc,
        };
        *tally.codes.entry(rc.to_string()).or_default() += 1;
        if let Some((_, _, kept)) = last.as_mut().filter(|_| step % 2 == 0) {
            *kept = reply;
        }
        step += 1;
    }
    Ok(())
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Runs the plan: it ends at its duration, or at most the reply timeout
/// later when a request is still waiting then.
pub async fn run(plan: Plan) -> Outcome {
    let dialect = Arc::new(Dialect::cup_pos());
    let plan = Arc::new(plan);
    let start = Instant::now();
    let until = start + plan.duration;
    let tasks: Vec<_> = (0..plan.terminals)
        .map(|i| {
            let (plan, dialect) = (plan.clone(), dialect.clone());
            tokio::spawn(async move {
                let id = format!("T{:07}", i + 1);
                let mut tally = Tally {
                    answered: 0,
                    mac_failures: 0,
                    approved: 0,
                    codes: BTreeMap::new(),
                    latency: histogram(),
                };
                let ended = one_terminal(&plan, &id, i, dialect, until, &mut tally).await;
                (id, tally, ended)
            })
        })
        .collect();
    let mut outcome = Outcome {
        answered: 0,
        mac_failures: 0,
        approved: 0,
        codes: BTreeMap::new(),
        failures: Vec::new(),
        elapsed: Duration::ZERO,
        latency: histogram(),
    };
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await {
            Ok((id, tally, ended)) => {
                outcome.answered += tally.answered;
                outcome.mac_failures += tally.mac_failures;
                outcome.approved += tally.approved;
                for (rc, n) in tally.codes {
                    *outcome.codes.entry(rc).or_default() += n;
                }
                let _ = outcome.latency.add(&tally.latency);
                if let Err(cause) = ended {
                    outcome.failures.push((id, cause));
                }
            }
            Err(e) => outcome
                .failures
                .push((format!("T{:07}", i + 1), format!("its task failed: {e}"))),
        }
    }
    outcome.elapsed = start.elapsed();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stand_in::{Answer, keyed_switch, stand_in_switch, test_derivation_key};

    /// `terminals` sending purchases to `target` for 10 s at most (each
    /// test's terminals stop well before), waiting 200 ms for a reply.
    fn plan(target: &str, terminals: usize) -> Plan {
        Plan {
            target: target.to_string(),
            terminals,
            merchant: "898310048160001".into(),
            duration: Duration::from_secs(10),
            cards: 10,
            amount: 100,
            mix: Mix::Purchases,
            reply_timeout: Duration::from_millis(200),
            derivation_key: None,
        }
    }

    /// Runs the plan; a run that does not end is the test's failure.
    async fn run_to_end(plan: Plan) -> Outcome {
        tokio::time::timeout(Duration::from_secs(30), run(plan))
            .await
            .expect("the run ends")
    }

    fn failures(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(id, cause)| (id.to_string(), cause.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn a_switch_that_never_answers_the_sign_on_ends_the_run_with_the_reply_timeout() {
        let (addr, _seen) = stand_in_switch(|_, _| Answer::Silence).await;
        let outcome = run_to_end(plan(&addr, 2)).await;
        assert_eq!(
            outcome.failures,
            failures(&[
                ("T0000001", "no sign-on reply within 200ms"),
                ("T0000002", "no sign-on reply within 200ms"),
            ])
        );
        assert_eq!(outcome.answered, 0);
    }

    #[tokio::test]
    async fn a_purchase_never_answered_stops_its_terminal_and_what_was_answered_counts() {
        let (addr, _seen) = stand_in_switch(|mti, before| match (mti, before) {
            ("0200", 2..) => Answer::Silence,
            _ => Answer::With("00"),
        })
        .await;
        let outcome = run_to_end(plan(&addr, 1)).await;
        assert_eq!(
            outcome.failures,
            failures(&[("T0000001", "no reply to a purchase within 200ms")])
        );
        assert_eq!((outcome.answered, outcome.approved), (2, 2));
        assert_eq!(outcome.latency.len(), 2);
    }

    #[tokio::test]
    async fn a_switch_stopped_mid_run_keeps_what_was_answered_and_says_why_each_terminal_stopped() {
        // The fourth purchase and every later one, on whichever terminal:
        // the connection is closed instead of answered.
        let (addr, _seen) = stand_in_switch(|mti, before| match (mti, before) {
            ("0200", 3..) => Answer::Hangup,
            _ => Answer::With("00"),
        })
        .await;
        let outcome = run_to_end(plan(&addr, 2)).await;
        assert_eq!((outcome.answered, outcome.approved), (3, 3));
        let closed = "no reply to a purchase: connection closed by the switch";
        assert_eq!(
            outcome.failures,
            failures(&[("T0000001", closed), ("T0000002", closed)])
        );
        assert_eq!(
            outcome.causes(),
            vec![(closed.to_string(), vec!["T0000001", "T0000002"])]
        );
    }

    #[tokio::test]
    async fn answers_are_counted_by_code_and_a_run_that_approved_nothing_says_so() {
        // Every purchase declined 97 (terminal disabled), until the switch
        // stops after the third.
        let (addr, _seen) = stand_in_switch(|mti, before| match (mti, before) {
            ("0200", 3..) => Answer::Hangup,
            ("0200", _) => Answer::With("97"),
            _ => Answer::With("00"),
        })
        .await;
        let outcome = run_to_end(plan(&addr, 1)).await;
        assert_eq!((outcome.answered, outcome.approved), (3, 0));
        assert_eq!(outcome.codes_line(), "97: 3");
        assert_eq!(
            outcome.nothing_approved().as_deref(),
            Some("none of 3 answered requests was approved (97: 3)")
        );
    }

    #[tokio::test]
    async fn a_run_that_approved_some_is_not_said_to_have_approved_nothing() {
        let (addr, _seen) = stand_in_switch(|mti, before| match (mti, before) {
            ("0200", 3..) => Answer::Hangup,
            ("0200", 1) => Answer::With("51"),
            _ => Answer::With("00"),
        })
        .await;
        let outcome = run_to_end(plan(&addr, 1)).await;
        assert_eq!(outcome.codes_line(), "00: 2, 51: 1");
        assert_eq!(outcome.nothing_approved(), None);
    }

    #[tokio::test]
    async fn a_sign_on_declined_is_said_with_its_response_code() {
        let (addr, _seen) = stand_in_switch(|mti, _| match mti {
            "0800" => Answer::With("03"),
            _ => Answer::With("00"),
        })
        .await;
        let outcome = run_to_end(plan(&addr, 2)).await;
        assert_eq!(
            outcome.causes(),
            vec![(
                "sign-on answered 03".to_string(),
                vec!["T0000001", "T0000002"]
            )]
        );
    }

    #[tokio::test]
    async fn a_target_that_refuses_connections_is_named_with_the_refusal() {
        // A port nothing listens on any more.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let outcome = run_to_end(plan(&addr, 1)).await;
        assert_eq!(
            outcome.failures,
            failures(&[(
                "T0000001",
                &format!("cannot connect to {addr}: connection refused")
            )])
        );
    }

    /// `plan`, its terminals holding keys derived from the test key.
    fn keyed(plan: Plan) -> Plan {
        Plan {
            derivation_key: Some(test_derivation_key()),
            ..plan
        }
    }

    #[tokio::test]
    async fn a_reply_whose_mac_fails_stops_its_terminal_and_is_counted() {
        let (addr, seen) = keyed_switch(test_derivation_key(), |mti, before| match (mti, before) {
            ("0200", 2) => Answer::WrongMac("00"),
            _ => Answer::With("00"),
        })
        .await;
        let outcome = run_to_end(keyed(plan(&addr, 1))).await;
        assert_eq!(
            outcome.causes(),
            vec![(
                "the reply to a purchase has a missing or wrong MAC (F64)".to_string(),
                vec!["T0000001"]
            )]
        );
        assert_eq!((outcome.answered, outcome.mac_failures), (2, 1));
        // Its requests carried their MACs.
        let macs = seen.lock().unwrap().macs.clone();
        assert_eq!(macs, [None, Some(true), Some(true), Some(true)]);
    }

    #[tokio::test]
    async fn a_sign_on_without_keys_the_terminals_can_take_is_each_terminals_failure() {
        let (addr, _seen) = stand_in_switch(|_, _| Answer::With("00")).await;
        let outcome = run_to_end(keyed(plan(&addr, 2))).await;
        assert_eq!(
            outcome.causes(),
            vec![(
                "sign-on: approved without working keys (F62): the switch holds no terminal \
                 master derivation key"
                    .to_string(),
                vec!["T0000001", "T0000002"]
            )]
        );
        assert_eq!(outcome.answered, 0);
    }
}
