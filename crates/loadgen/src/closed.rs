//! The simple load: N terminals, each signing on and then sending purchases
//! one after another (the next as soon as the previous is answered), for a
//! fixed time. Closed loop, so it measures what the switch sustains with N
//! terminals in flight; the open-loop scenario runner measures latency
//! against a schedule.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use iso8583::Dialect;

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
    /// Purchases answered.
    pub answered: u64,
    /// Answered `00`.
    pub approved: u64,
    /// Connection or protocol failures.
    pub errors: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Latency of every answered purchase, in microseconds.
    pub latency: Histogram<u64>,
}

impl Outcome {
    /// Answered requests per second.
    pub fn rate(&self) -> f64 {
        self.answered as f64 / self.elapsed.as_secs_f64()
    }
}

async fn one_terminal(
    plan: Arc<Plan>,
    index: usize,
    dialect: Arc<Dialect>,
    until: Instant,
) -> Result<(u64, u64, Histogram<u64>), TerminalError> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let id = format!("T{:07}", index + 1);
    let mut t = Terminal::connect(&plan.target, &id, &plan.merchant, dialect).await?;
    // Successive runs in one batch must not reuse STANs: start from the clock.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.set_stan((now.as_millis() % 999_999) as u32);
    let signed = t.sign_on().await?;
    if signed.rc() != "00" {
        return Err(TerminalError::Bad(format!(
            "{id}: sign-on answered {}",
            signed.rc()
        )));
    }
    let (mut answered, mut approved) = (0u64, 0u64);
    let mut card = index as u64;
    let mut last: Option<(u32, String, Reply)> = None;
    let mut step = 0u64;
    while Instant::now() < until {
        let frame = match (plan.mix, step % 4, &last) {
            (Mix::VoidHeavy, 1, Some((stan, pan, reply))) => {
                let original = Original {
                    batch: t.batch,
                    stan: *stan,
                    rrn: reply.field(37).unwrap_or(""),
                    auth_code: "",
                    date: "",
                };
                let s = t.next_stan();
                t.void(s, pan, "3012", plan.amount, &original)?
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
                t.reversal(&reversed, "98")?
            }
            _ => {
                card = card % plan.cards.max(1) + 1;
                let pan = format!("622202{card:013}");
                let stan = t.next_stan();
                let frame = t.purchase(stan, &pan, "3012", plan.amount)?;
                last = Some((stan, pan, Reply::empty()));
                frame
            }
        };
        let start = Instant::now();
        let reply = t.exchange(&frame).await?;
        let _ = hist.record(start.elapsed().as_micros() as u64);
        answered += 1;
        if reply.rc() == "00" {
            approved += 1;
        }
        if let Some((_, _, kept)) = last.as_mut().filter(|_| step % 2 == 0) {
            *kept = reply;
        }
        step += 1;
    }
    Ok((answered, approved, hist))
}

/// Runs the plan.
pub async fn run(plan: Plan) -> Outcome {
    let dialect = Arc::new(Dialect::cup_pos());
    let plan = Arc::new(plan);
    let start = Instant::now();
    let until = start + plan.duration;
    let tasks: Vec<_> = (0..plan.terminals)
        .map(|i| tokio::spawn(one_terminal(plan.clone(), i, dialect.clone(), until)))
        .collect();
    let mut outcome = Outcome {
        answered: 0,
        approved: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
    };
    for t in tasks {
        match t.await {
            Ok(Ok((answered, approved, hist))) => {
                outcome.answered += answered;
                outcome.approved += approved;
                let _ = outcome.latency.add(&hist);
            }
            _ => outcome.errors += 1,
        }
    }
    outcome.elapsed = start.elapsed();
    outcome
}
