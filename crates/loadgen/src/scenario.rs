//! Load scenarios as files (`config/load/*.toml`), and the simulated
//! terminals that play them.
//!
//! Each terminal behaves as the spec says a real one does: it signs on,
//! keeps a reversal record before every reversible request and, when no
//! valid reply came, sends the 0400 before its next transaction (reason 98
//! when none came, A0 when the reply's MAC was missing or wrong; retrying
//! it until answered), voids and refunds its own earlier sales,
//! cancels or completes its own open pre-authorisations and voids its
//! completions, and settles its batch at the end with its own totals
//! (uploading the batch when the switch's figures differ). Requests are
//! scheduled open loop (`crate::open`), latency from the scheduled time.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use iso8583::keys::DerivationKey;
use iso8583::{Dialect, Message};
use settings::{Problems, Section};

use crate::cpu::{Meter, Usage};
use crate::live::Live;
use crate::open::{self, Lane};
use crate::report::{BAD_MAC, Report, Timeline};
use crate::terminal::{Original, Reversed, Terminal};

/// What a terminal may send, with its weight in the mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A purchase.
    Purchase,
    /// A balance inquiry.
    BalanceInquiry,
    /// A void of one of the terminal's approved sales.
    Void,
    /// A refund of part of one of its sales.
    Refund,
    /// A purchase whose reply the terminal pretends not to get: it reverses it.
    Reversal,
    /// A request sent twice (D1: the same reply, charged once).
    Duplicate,
    /// A pre-authorisation: a hold on the card, no debit yet.
    PreAuth,
    /// A cancel of one of the terminal's open pre-authorisations.
    PreAuthCancel,
    /// A completion request (0200) of one of its open pre-authorisations,
    /// for at most the amount held: the debit.
    Completion,
    /// A void of one of its approved completions.
    CompletionVoid,
}

impl Op {
    /// Its key in a scenario's `[mix]`.
    pub fn name(self) -> &'static str {
        OPS.iter()
            .find(|(_, op)| *op == self)
            .map_or("purchase", |(name, _)| name)
    }
}

/// `config/load/smoke.toml`, embedded: what `switchyard demo` plays.
pub const SMOKE: &str = include_str!("../../../config/load/smoke.toml");

const OPS: [(&str, Op); 10] = [
    ("purchase", Op::Purchase),
    ("balance_inquiry", Op::BalanceInquiry),
    ("void", Op::Void),
    ("refund", Op::Refund),
    ("reversal", Op::Reversal),
    ("duplicate", Op::Duplicate),
    ("preauth", Op::PreAuth),
    ("preauth_cancel", Op::PreAuthCancel),
    ("completion", Op::Completion),
    ("completion_void", Op::CompletionVoid),
];

/// A scenario file.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Its name.
    pub name: String,
    /// Terminals `T0000001` upwards.
    pub terminals: usize,
    /// Their merchant.
    pub merchant: String,
    /// Requests per second, scheduled by the clock.
    pub rate: f64,
    /// How long.
    pub duration: Duration,
    /// Cards `6222020000000000001` upwards.
    pub cards: u64,
    /// Smallest and largest amount, fen.
    pub amount: (u64, u64),
    /// The mix: (op, weight).
    pub mix: Vec<(Op, u32)>,
    /// Settle every batch at the end.
    pub settle: bool,
    /// Seed of every random choice.
    pub seed: u64,
    /// Rates to step through, each for `duration` (peak.toml): empty means
    /// the one `rate`.
    pub steps: Vec<f64>,
    /// A step is sustained when its p99 stays below this (and nearly every
    /// request got its answer within the step).
    pub p99_target: Duration,
    /// Faults the issuer is told to inject while the scenario runs (only
    /// where the runner controls the issuer: `switchyard demo --scenario`).
    pub faults: Faults,
    /// How long a terminal waits for a reply before it takes it as never
    /// coming (above the switch's `issuer_timeout`, as a real terminal's).
    pub reply_timeout: Duration,
    /// The key each terminal's master key is derived from (its terminal id
    /// the other input), as the switch's: the terminals then take working
    /// keys at sign-on and MAC their requests. Never read from the file (a
    /// secret: the runner gives it, from a key file or the environment);
    /// `None`, terminals hold no keys.
    pub derivation_key: Option<DerivationKey>,
}

/// `[faults]`: what breaks while the scenario runs. The issuer's shares
/// and the restarts need a runner that owns the issuer and the switch
/// (`switchyard demo --scenario`); connection resets are the terminals'
/// own doing and happen wherever the scenario plays.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Extra delay of every issuer reply.
    pub latency: Duration,
    /// Issuer replies never written.
    pub drop_reply: f64,
    /// Issuer replies written after the switch gave up on them.
    pub late_reply: f64,
    /// Issuer replies cut in half and the connection closed.
    pub close_connection: f64,
    /// Share of a terminal's reversible requests (and refunds) after which
    /// it resets its connection (RST) without reading the reply; it
    /// reconnects, signs on, and reverses (a refund: sends it again).
    pub reset_connection: f64,
    /// When, from the start of the run, the issuer is stopped (listener and
    /// connections closed) and started again on the same address.
    pub issuer_restart_at: Option<Duration>,
    /// How long it stays down.
    pub issuer_down_for: Duration,
    /// When, from the start of the run, the switch is killed with SIGKILL
    /// and started again on the same port.
    pub switch_kill_at: Option<Duration>,
}

/// How long an issuer restart keeps it down unless the scenario says.
pub const DEFAULT_ISSUER_DOWN_FOR: Duration = Duration::from_millis(500);

impl Faults {
    /// True when nothing is to break.
    pub fn none(&self) -> bool {
        *self == Faults::default()
    }

    /// True when the issuer's replies are to misbehave.
    pub fn issuer_replies(&self) -> bool {
        !self.latency.is_zero()
            || self.drop_reply > 0.0
            || self.late_reply > 0.0
            || self.close_connection > 0.0
    }
}

impl Scenario {
    /// Reads a scenario file; every problem with file, line and key.
    pub fn load(path: &Path) -> Result<Scenario, Problems> {
        settings::load(path, Scenario::read)
    }

    /// Reads scenario text.
    pub fn parse(text: &str, origin: &str) -> Result<Scenario, Problems> {
        settings::parse(text, origin, Scenario::read)
    }

    fn read(root: &Section<'_, '_>) -> Scenario {
        let amount = root.section("amount");
        let min = amount.int("min", 100, 1..=999_999_999_999) as u64;
        let max = amount.int("max", 50_000, 1..=999_999_999_999) as u64;
        if max < min {
            amount.problem("max", "must not be below min");
        }
        let mix_section = root.section("mix");
        let mix: Vec<(Op, u32)> = OPS
            .iter()
            .map(|(name, op)| {
                (
                    *op,
                    mix_section.int(name, i64::from(*op == Op::Purchase), 0..=1_000_000) as u32,
                )
            })
            .filter(|(_, w)| *w > 0)
            .collect();
        if mix.is_empty() {
            mix_section.problem("purchase", "the mix needs at least one weight above 0");
        }
        let rate = root.float("rate", 50.0, 0.001..=1_000_000.0);
        let f = root.section("faults");
        let share = |key: &str| f.float(key, 0.0, 0.0..=1.0);
        let at = |key: &str| f.has(key).then(|| f.duration(key, Duration::ZERO));
        let faults = Faults {
            latency: f.duration("latency", Duration::ZERO),
            drop_reply: share("drop_reply"),
            late_reply: share("late_reply"),
            close_connection: share("close_connection"),
            reset_connection: share("reset_connection"),
            issuer_restart_at: at("issuer_restart_at"),
            issuer_down_for: f.duration("issuer_down_for", DEFAULT_ISSUER_DOWN_FOR),
            switch_kill_at: at("switch_kill_at"),
        };
        if faults.drop_reply + faults.late_reply + faults.close_connection > 1.0 {
            f.problem(
                "close_connection",
                "drop_reply + late_reply + close_connection must not exceed 1",
            );
        }
        if f.has("issuer_down_for") && faults.issuer_restart_at.is_none() {
            f.problem("issuer_down_for", "needs issuer_restart_at");
        }
        if faults.issuer_down_for.is_zero() || faults.issuer_down_for > Duration::from_secs(60) {
            f.problem("issuer_down_for", "must be above 0 and at most 60s");
        }
        let duration = root.duration_above_zero("duration", Duration::from_secs(5));
        let steps = root.numbers("steps");
        // A fault timed after the last request would break nothing.
        let run_length = duration * steps.len().max(1) as u32;
        for (key, time) in [
            ("issuer_restart_at", faults.issuer_restart_at),
            ("switch_kill_at", faults.switch_kill_at),
        ] {
            if time.is_some_and(|t| t >= run_length) {
                f.problem(key, "must fall within the run (before duration ends)");
            }
        }
        Scenario {
            name: root.string("name", "scenario"),
            terminals: root.int("terminals", 10, 1..=9_999_999) as usize,
            merchant: {
                let merchant = root.string("merchant", "898310048160001");
                // F42, ans15.
                if merchant.len() != 15 || !merchant.bytes().all(|b| (b' '..=b'~').contains(&b)) {
                    root.problem(
                        "merchant",
                        format!("{merchant:?} is not a merchant id of 15 characters (F42)"),
                    );
                }
                merchant
            },
            rate,
            duration,
            cards: root.int("cards", 100, 1..=10_000_000) as u64,
            amount: (min, max),
            mix,
            settle: root.bool("settle", true),
            seed: root.int("seed", 1, 0..=i64::MAX) as u64,
            steps: {
                if steps.iter().any(|r| *r <= 0.0) {
                    root.problem("steps", "rates must be above 0");
                }
                steps
            },
            p99_target: root.duration("p99_target", Duration::from_millis(20)),
            faults,
            reply_timeout: {
                let t = root.duration("reply_timeout", DEFAULT_REPLY_TIMEOUT);
                if t.is_zero() {
                    root.problem("reply_timeout", "must be above 0");
                }
                t
            },
            derivation_key: None,
        }
    }

    /// Requests in the run.
    pub fn count(&self) -> u64 {
        if self.steps.is_empty() {
            (self.rate * self.duration.as_secs_f64()).round() as u64
        } else {
            self.steps
                .iter()
                .map(|r| (r * self.duration.as_secs_f64()).round() as u64)
                .sum()
        }
    }
}

/// A small, seedable generator (SplitMix64): runs repeat with their seed.
#[derive(Debug, Clone)]
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    /// True with probability `share` (no draw when it is 0, so a scenario
    /// without the fault plays as it did before the fault existed).
    fn chance(&mut self, share: f64) -> bool {
        share > 0.0 && ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < share
    }
}

/// A terminal's reply timeout unless the scenario says otherwise: above the
/// switch's default issuer timeout (10 s), as rules.md T1 assumes.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a terminal keeps trying to reach the switch again (a switch
/// restarting) before it gives the request up.
const RECONNECT_FOR: Duration = Duration::from_secs(10);

/// How often a request that is not reversed (a refund, a settlement, a
/// reversal itself) is sent before the terminal gives up on it.
const ATTEMPTS: usize = 3;

/// How long a terminal that resets its connection waits after sending:
/// long enough for the request to leave, usually too short for the reply.
const RESET_AFTER: Duration = Duration::from_millis(1);

/// A reply as a terminal keeps it: the frame and its response code; any
/// other field is read from the frame when asked. (Most replies are asked
/// nothing else: a [`crate::Reply`], every field parsed into a map of
/// strings, costs a dozen allocations a reply.)
#[derive(Debug, Clone)]
struct Reply {
    frame: Bytes,
    rc: String,
    dialect: Arc<Dialect>,
    /// Its MTI and whether it carries F64, to check its MAC.
    mti: iso8583::Mti,
    has_mac: bool,
}

/// Why an exchange gave the terminal no valid reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unanswered {
    /// None came within the reply timeout, or the connection failed.
    NoReply,
    /// One came, but its MAC (F64) was missing or wrong: it is not the
    /// switch's word, and the terminal acts on it no more than on silence.
    BadMac,
}

impl Unanswered {
    /// Its code in the report: `--` no answer, [`BAD_MAC`] a reply whose
    /// MAC failed.
    fn code(self) -> &'static str {
        match self {
            Unanswered::NoReply => "--",
            Unanswered::BadMac => BAD_MAC,
        }
    }
}

/// A reply's response code, or the code of why none counts.
fn code(reply: &Result<Reply, Unanswered>) -> String {
    match reply {
        Ok(r) => r.rc().to_string(),
        Err(e) => e.code().to_string(),
    }
}

impl Reply {
    /// `None` when the frame does not parse, or does not answer `request`
    /// (length prefix included): a valid reply has the request's MTI + 10
    /// and echoes its STAN (F11) and terminal (F41).
    fn read(dialect: &Arc<Dialect>, frame: Bytes, request: &[u8]) -> Option<Reply> {
        let msg = Message::parse(dialect, &frame).ok()?;
        let req = Message::parse(dialect, request.get(2..)?).ok()?;
        let answers = msg.mti() == req.mti().reply()
            && msg.wire(11) == req.wire(11)
            && msg.wire(41) == req.wire(41);
        if !answers {
            return None;
        }
        let rc = msg
            .field(39)
            .map(|v| v.to_clear_string())
            .unwrap_or_default();
        Some(Reply {
            mti: msg.mti(),
            has_mac: msg.field(64).is_some(),
            frame,
            rc,
            dialect: dialect.clone(),
        })
    }

    /// F39, or `""` when absent.
    fn rc(&self) -> &str {
        &self.rc
    }

    /// A field's value in clear, or `""` when absent.
    fn field(&self, n: usize) -> String {
        Message::parse(&self.dialect, &self.frame)
            .ok()
            .and_then(|m| m.field(n))
            .map(|v| v.to_clear_string())
            .unwrap_or_default()
    }

    /// The frame from the MTI on (TPDU and header excluded).
    fn body(&self) -> &[u8] {
        &self.frame[self.dialect.tpdu_len() + self.dialect.header_len()..]
    }

    /// A copy to keep: the frame as read shares the connection's buffer.
    fn kept(self) -> Reply {
        Reply {
            frame: Bytes::copy_from_slice(&self.frame),
            ..self
        }
    }
}

/// A sale the terminal keeps, to void or refund it later.
#[derive(Debug, Clone)]
struct Sale {
    stan: u32,
    pan: String,
    amount: u64,
    reply: Reply,
    refunded: u64,
}

/// An approved pre-authorisation the terminal keeps, to cancel or complete
/// it later (both name it by its auth code and date).
#[derive(Debug, Clone)]
struct Hold {
    stan: u32,
    pan: String,
    amount: u64,
    reply: Reply,
}

/// A request the terminal must reverse before its next one (its reversal record).
#[derive(Debug, Clone)]
struct Pending {
    pan: String,
    processing_code: &'static str,
    amount: u64,
    stan: u32,
    /// F25: `06` for the pre-authorisation family, `00` otherwise.
    condition: &'static str,
    f60: String,
    f61: Option<String>,
    /// F39 of its 0400: `98` no reply came, `A0` one came with its MAC
    /// missing or wrong.
    reason: &'static str,
}

/// A transaction the terminal counts in its batch: what its settlement
/// totals and, when the settlement does not balance, what it uploads.
#[derive(Debug, Clone)]
struct Counted {
    stan: u32,
    pan: String,
    amount: u64,
    /// A void or refund; otherwise a purchase or completion.
    credit: bool,
}

/// One simulated terminal playing the scenario.
pub struct Player {
    terminal: Terminal,
    target: String,
    scenario: Arc<Scenario>,
    dice: Dice,
    /// The draws of the faults the terminal injects itself: a stream of
    /// their own, so the mix plays the same with and without them.
    fault_dice: Dice,
    /// The connection failed (or was reset): connect again before the next request.
    broken: bool,
    sales: Vec<Sale>,
    holds: Vec<Hold>,
    /// Approved completions, to void one later.
    completions: Vec<Hold>,
    pending: Option<Pending>,
    /// The batch: every approved purchase, completion, void and refund.
    counted: Vec<Counted>,
    /// What it timed itself (its 0400s and its settlement): kind, response
    /// code, latency. Kept as a list and recorded into the run's report at
    /// the end: a report of its own per terminal would be a histogram of
    /// 160 KiB per kind per terminal.
    timed: Vec<(&'static str, String, Duration)>,
    /// Connection failures: requests that got no reply because the
    /// connection failed, or could not be sent (resets on purpose excluded).
    pub errors: u64,
    /// Connections reset on purpose (`reset_connection`).
    pub resets: u64,
    /// Connections made again, after a reset or a failure.
    pub reconnects: u64,
    /// Replies whose MAC (F64) was missing or wrong.
    pub mac_failures: u64,
}

impl std::fmt::Debug for Player {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Player({})", self.terminal.id)
    }
}

impl Player {
    /// Connects and signs on terminal number `index` (from 0).
    pub async fn start(
        target: &str,
        scenario: Arc<Scenario>,
        index: usize,
        dialect: Arc<Dialect>,
    ) -> Result<Player, String> {
        let id = format!("T{:07}", index + 1);
        let mut terminal = Terminal::connect(target, &id, &scenario.merchant, dialect)
            .await
            .map_err(|e| format!("{id}: {e}"))?;
        terminal.set_master_key(scenario.derivation_key.as_ref().map(|k| k.master_key(&id)));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        terminal.set_stan((now.as_millis() % 999_999) as u32 + index as u32 * 7);
        let signed = tokio::time::timeout(scenario.reply_timeout, terminal.sign_on())
            .await
            .map_err(|_| format!("{id}: no sign-on reply within {:?}", scenario.reply_timeout))?
            .map_err(|e| format!("{id}: {e}"))?;
        if signed.rc() != "00" {
            return Err(format!("{id}: sign-on answered {}", signed.rc()));
        }
        let seed = scenario.seed ^ (index as u64).wrapping_mul(0x1000_0001);
        Ok(Player {
            terminal,
            target: target.to_string(),
            dice: Dice(seed),
            fault_dice: Dice(seed ^ 0x5EED_FA17),
            broken: false,
            scenario,
            sales: Vec::new(),
            holds: Vec::new(),
            pending: None,
            completions: Vec::new(),
            counted: Vec::new(),
            timed: Vec::new(),
            errors: 0,
            resets: 0,
            reconnects: 0,
            mac_failures: 0,
        })
    }

    fn amount(&mut self) -> u64 {
        let (min, max) = self.scenario.amount;
        min + self.dice.below(max - min + 1)
    }

    fn card(&mut self) -> String {
        format!("622202{:013}", self.dice.below(self.scenario.cards) + 1)
    }

    fn pick(&mut self) -> Op {
        let total: u64 = self.scenario.mix.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut roll = self.dice.below(total);
        for (op, w) in &self.scenario.mix {
            if roll < u64::from(*w) {
                return *op;
            }
            roll -= u64::from(*w);
        }
        Op::Purchase
    }

    /// Connects again and signs on, as a terminal redials: with a short
    /// back-off while the switch is away (restarting), for at most
    /// [`RECONNECT_FOR`]. False when it could not.
    async fn reconnect(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + RECONNECT_FOR;
        let mut backoff = Duration::from_millis(50);
        loop {
            if self.terminal.reconnect(&self.target).await.is_ok()
                && tokio::time::timeout(self.scenario.reply_timeout, self.terminal.sign_on())
                    .await
                    .is_ok_and(|signed| signed.is_ok_and(|r| r.rc() == "00"))
            {
                self.broken = false;
                self.reconnects += 1;
                return true;
            }
            if tokio::time::Instant::now() + backoff > deadline {
                return false;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Sends a frame; `Err` when no valid reply came within the reply
    /// timeout (the caller reverses or sends it again). When none came, the
    /// connection is made again, as a terminal that gave up on a reply
    /// does; a reply with a wrong MAC leaves the connection as it is (the
    /// frame was read whole). A failed connection is made again first.
    async fn exchange(&mut self, frame: &[u8]) -> Result<Reply, Unanswered> {
        if self.broken && !self.reconnect().await {
            self.errors += 1;
            return Err(Unanswered::NoReply);
        }
        // MACed as it goes: the terminal may have signed on again (new
        // keys) since the frame was built.
        let frame = &*self.terminal.as_sent(frame).into_owned();
        let exchanged = tokio::time::timeout(
            self.scenario.reply_timeout,
            self.terminal.exchange_frame(frame),
        )
        .await;
        let read = match exchanged {
            Ok(Ok(reply)) => Reply::read(self.terminal.dialect(), reply, frame),
            Ok(Err(_)) | Err(_) => None,
        };
        let Some(reply) = read else {
            self.errors += 1;
            self.broken = true;
            return Err(Unanswered::NoReply);
        };
        match self
            .terminal
            .mac_valid(reply.mti, reply.has_mac, reply.body())
        {
            Some(false) => {
                self.mac_failures += 1;
                Err(Unanswered::BadMac)
            }
            Some(true) | None => Ok(reply),
        }
    }

    /// Sends a request that is never reversed (a refund, a settlement, a
    /// reversal) until it is answered, at most [`ATTEMPTS`] times: the
    /// same frame, so a switch that already has it replays its answer (D1).
    /// A reply with a wrong MAC is no answer, and the frame goes again.
    async fn exchange_retrying(&mut self, frame: &[u8]) -> Result<Reply, Unanswered> {
        let mut last = Err(Unanswered::NoReply);
        for _ in 0..ATTEMPTS {
            last = self.exchange(frame).await;
            if last.is_ok() {
                break;
            }
        }
        last
    }

    /// The `reset_connection` fault, drawn for this request.
    fn draw_reset(&mut self) -> bool {
        self.fault_dice
            .chance(self.scenario.faults.reset_connection)
    }

    /// Sends a frame and resets the connection without reading the reply,
    /// as a terminal whose line drops mid-request; then connects and signs
    /// on again. The reply, when the switch writes it, goes nowhere.
    async fn send_and_reset(&mut self, frame: &[u8]) {
        if self.broken && !self.reconnect().await {
            self.errors += 1;
            return;
        }
        let frame = self.terminal.as_sent(frame).into_owned();
        if self.terminal.send_raw(&frame).await.is_err() {
            self.errors += 1;
            self.broken = true;
            return;
        }
        let _ = tokio::time::timeout(RESET_AFTER, self.terminal.readable()).await;
        self.terminal.reset_on_close();
        self.resets += 1;
        // Reconnecting drops the old connection: the reset goes out now.
        self.broken = true;
        if !self.reconnect().await {
            self.errors += 1;
        }
    }

    /// A reversible request: sent (or sent and reset, when the fault is
    /// drawn); `Err` when no valid reply came and the record stands.
    async fn exchange_reversible(&mut self, frame: &[u8]) -> Result<Reply, Unanswered> {
        if self.draw_reset() {
            self.send_and_reset(frame).await;
            return Err(Unanswered::NoReply);
        }
        let reply = self.exchange(frame).await;
        self.mac_failed_reason(&reply);
        reply
    }

    /// A reply to the recorded request came with its MAC missing or wrong:
    /// the 0400 says so (A0) rather than that no reply came (98).
    fn mac_failed_reason(&mut self, reply: &Result<Reply, Unanswered>) {
        if let (Err(Unanswered::BadMac), Some(p)) = (reply, self.pending.as_mut()) {
            p.reason = "A0";
        }
    }

    /// Sends the reversal the record asks for, until it is answered.
    async fn reverse_pending(&mut self) {
        let Some(p) = self.pending.take() else {
            return;
        };
        let of = Reversed {
            pan: &p.pan,
            processing_code: p.processing_code,
            amount: p.amount,
            stan: p.stan,
            condition: p.condition,
            f60: &p.f60,
            f61: p.f61.as_deref(),
        };
        let Ok(frame) = self.terminal.reversal(&of, p.reason) else {
            return;
        };
        let started = std::time::Instant::now();
        let reply = self.exchange_retrying(&frame).await;
        let rc = code(&reply);
        // The switch could not decide it (96: its journal, 91): the record
        // stands and the reversal goes again. Any other answer is the
        // switch's decision, which the same frame would only repeat.
        let done = reply.is_ok() && !matches!(rc.as_str(), "96" | "91");
        self.timed.push(("reversal", rc, started.elapsed()));
        if !done {
            self.pending = Some(p);
        }
    }

    async fn play(&mut self) -> (&'static str, String) {
        self.reverse_pending().await;
        if self.pending.is_some() {
            // A terminal starts nothing new while its reversal is unanswered.
            return ("skipped", "--".into());
        }
        let op = self.pick();
        let expiry = "3012";
        match op {
            Op::Void | Op::Refund if !self.sales.is_empty() => {
                let i = self.dice.below(self.sales.len() as u64) as usize;
                let sale = self.sales[i].clone();
                let (rrn, auth_code, date) = (
                    sale.reply.field(37),
                    sale.reply.field(38),
                    sale.reply.field(13),
                );
                let original = Original {
                    batch: self.terminal.batch,
                    stan: sale.stan,
                    rrn: &rrn,
                    auth_code: &auth_code,
                    date: &date,
                };
                let stan = self.terminal.next_stan();
                if op == Op::Void && sale.refunded == 0 {
                    let Ok(frame) =
                        self.terminal
                            .void(stan, &sale.pan, expiry, sale.amount, &original)
                    else {
                        return ("void", "--".into());
                    };
                    let f61 = format!("{:06}{:06}", original.batch, original.stan);
                    self.pending = Some(Pending {
                        pan: sale.pan.clone(),
                        processing_code: "200000",
                        amount: sale.amount,
                        stan,
                        condition: "00",
                        f60: self.terminal.f60("23"),
                        f61: Some(f61),
                        reason: "98",
                    });
                    let reply = self.exchange_reversible(&frame).await;
                    let rc = code(&reply);
                    if reply.is_ok() {
                        self.pending = None;
                    }
                    if rc == "00" {
                        self.sales.remove(i);
                        self.count(stan, &sale.pan, sale.amount, true);
                    }
                    ("void", rc)
                } else {
                    let part = (sale.amount - sale.refunded).div_ceil(2).max(1);
                    let Ok(frame) = self
                        .terminal
                        .refund(stan, &sale.pan, expiry, part, &original)
                    else {
                        return ("refund", "--".into());
                    };
                    // Refunds are advices: retried, never reversed.
                    if self.draw_reset() {
                        self.send_and_reset(&frame).await;
                    }
                    let rc = code(&self.exchange_retrying(&frame).await);
                    if rc == "00" {
                        self.sales[i].refunded += part;
                        if self.sales[i].refunded >= self.sales[i].amount {
                            self.sales.remove(i);
                        }
                        self.count(stan, &sale.pan, part, true);
                    }
                    ("refund", rc)
                }
            }
            Op::PreAuthCancel | Op::Completion if !self.holds.is_empty() => {
                let i = self.dice.below(self.holds.len() as u64) as usize;
                let hold = self.holds[i].clone();
                let (rrn, auth_code, date) = (
                    hold.reply.field(37),
                    hold.reply.field(38),
                    hold.reply.field(13),
                );
                let original = Original {
                    batch: self.terminal.batch,
                    stan: hold.stan,
                    rrn: &rrn,
                    auth_code: &auth_code,
                    date: &date,
                };
                let stan = self.terminal.next_stan();
                // A cancel names the whole hold; a completion the final bill,
                // between half the hold and all of it.
                let (kind, processing_code, type_code, amount, built) = if op == Op::Completion {
                    let amount = hold.amount - self.dice.below(hold.amount / 2 + 1);
                    let built = self
                        .terminal
                        .completion(stan, &hold.pan, expiry, amount, &original);
                    ("completion", "000000", "20", amount, built)
                } else {
                    let built = self.terminal.preauth_cancel(
                        stan,
                        &hold.pan,
                        expiry,
                        hold.amount,
                        &original,
                    );
                    ("preauth_cancel", "200000", "11", hold.amount, built)
                };
                let Ok(frame) = built else {
                    return (kind, "--".into());
                };
                // A cancel is void-type: its reversal carries its F61.
                let f61 = (op == Op::PreAuthCancel).then(|| format!("000000000000{date}"));
                self.pending = Some(Pending {
                    pan: hold.pan.clone(),
                    processing_code,
                    amount,
                    stan,
                    condition: "06",
                    f60: self.terminal.f60(type_code),
                    f61,
                    reason: "98",
                });
                let reply = self.exchange_reversible(&frame).await;
                if reply.is_ok() {
                    self.pending = None;
                }
                let rc = code(&reply);
                // Declined or reversed, the hold stays open (the switch gives
                // its claim back); approved, it is used up.
                if rc == "00" {
                    self.holds.remove(i);
                    if op == Op::Completion {
                        self.count(stan, &hold.pan, amount, false);
                        if let Ok(reply) = reply {
                            self.completions.push(Hold {
                                stan,
                                pan: hold.pan,
                                amount,
                                reply: reply.kept(),
                            });
                        }
                    }
                }
                (kind, rc)
            }
            Op::CompletionVoid if !self.completions.is_empty() => {
                let i = self.dice.below(self.completions.len() as u64) as usize;
                let done = self.completions[i].clone();
                let (rrn, auth_code, date) = (
                    done.reply.field(37),
                    done.reply.field(38),
                    done.reply.field(13),
                );
                let original = Original {
                    batch: self.terminal.batch,
                    stan: done.stan,
                    rrn: &rrn,
                    auth_code: &auth_code,
                    date: &date,
                };
                let stan = self.terminal.next_stan();
                let Ok(frame) =
                    self.terminal
                        .completion_void(stan, &done.pan, expiry, done.amount, &original)
                else {
                    return ("completion_void", "--".into());
                };
                self.pending = Some(Pending {
                    pan: done.pan.clone(),
                    processing_code: "200000",
                    amount: done.amount,
                    stan,
                    condition: "06",
                    f60: self.terminal.f60("21"),
                    f61: Some(format!("{:06}{:06}", original.batch, original.stan)),
                    reason: "98",
                });
                let reply = self.exchange_reversible(&frame).await;
                if reply.is_ok() {
                    self.pending = None;
                }
                let rc = code(&reply);
                if rc == "00" {
                    self.completions.remove(i);
                    self.count(stan, &done.pan, done.amount, true);
                }
                ("completion_void", rc)
            }
            Op::PreAuth => {
                let (pan, amount, stan) = (self.card(), self.amount(), self.terminal.next_stan());
                let Ok(frame) = self.terminal.preauth(stan, &pan, expiry, amount) else {
                    return ("preauth", "--".into());
                };
                self.pending = Some(Pending {
                    pan: pan.clone(),
                    processing_code: "030000",
                    amount,
                    stan,
                    condition: "06",
                    f60: self.terminal.f60("10"),
                    f61: None,
                    reason: "98",
                });
                let reply = match self.exchange_reversible(&frame).await {
                    Ok(reply) => reply,
                    Err(e) => return ("preauth", e.code().into()),
                };
                self.pending = None;
                let rc = reply.rc().to_string();
                // A hold is neither debit nor credit: settlement counts only
                // its completion.
                if rc == "00" {
                    self.holds.push(Hold {
                        stan,
                        pan,
                        amount,
                        reply: reply.kept(),
                    });
                }
                ("preauth", rc)
            }
            Op::BalanceInquiry => {
                let pan = self.card();
                let stan = self.terminal.next_stan();
                let Ok(frame) = self.terminal.balance_inquiry(stan, &pan, expiry) else {
                    return ("balance_inquiry", "--".into());
                };
                let rc = code(&self.exchange(&frame).await);
                ("balance_inquiry", rc)
            }
            Op::Duplicate => {
                let (pan, amount, stan) = (self.card(), self.amount(), self.terminal.next_stan());
                let Ok(frame) = self.terminal.purchase(stan, &pan, expiry, amount) else {
                    return ("duplicate", "--".into());
                };
                // A purchase like any other: reversed when neither copy is answered.
                self.pending = Some(Pending {
                    pan: pan.clone(),
                    processing_code: "000000",
                    condition: "00",
                    amount,
                    stan,
                    f60: self.terminal.f60("22"),
                    f61: None,
                    reason: "98",
                });
                let (first, again) = (self.exchange(&frame).await, self.exchange(&frame).await);
                let mac_failed = [&first, &again]
                    .iter()
                    .any(|r| matches!(r, Err(Unanswered::BadMac)));
                let (first, again) = (first.ok(), again.ok());
                // Settled by an approval, or by both copies' answers; one
                // decline with the other copy unanswered settles nothing
                // (the unanswered copy may have sold), so the record stands.
                let settled = match (&first, &again) {
                    (Some(a), Some(_)) | (Some(a), None) | (None, Some(a)) if a.rc() == "00" => {
                        true
                    }
                    (Some(_), Some(_)) => true,
                    _ => false,
                };
                if settled {
                    self.pending = None;
                } else if mac_failed {
                    self.mac_failed_reason(&Err(Unanswered::BadMac));
                }
                match (first, again) {
                    (Some(a), Some(b)) if a.body() == b.body() => {
                        if a.rc() == "00" {
                            self.keep(stan, pan, amount, a);
                        }
                        ("duplicate", b.rc().to_string())
                    }
                    // Declined both times, in other words (the switch's own
                    // 96 carries no RRN, the issuer's stored one does).
                    (Some(a), Some(b)) if a.rc() == b.rc() && a.rc() != "00" => {
                        ("duplicate", b.rc().to_string())
                    }
                    // Two answers that disagree (or two approvals that are
                    // not one reply): the terminal cannot tell whether it
                    // sold, so it reverses, as for no answer.
                    (Some(_), Some(_)) => {
                        self.pending = Some(Pending {
                            pan,
                            processing_code: "000000",
                            condition: "00",
                            amount,
                            stan,
                            f60: self.terminal.f60("22"),
                            f61: None,
                            reason: "98",
                        });
                        ("duplicate", "XX".into())
                    }
                    // One copy answered (the connection failed for the
                    // other): that answer is the terminal's.
                    (Some(r), None) | (None, Some(r)) => {
                        let rc = r.rc().to_string();
                        if rc == "00" {
                            self.keep(stan, pan, amount, r);
                        }
                        ("duplicate", rc)
                    }
                    (None, None) if mac_failed => ("duplicate", BAD_MAC.into()),
                    (None, None) => ("duplicate", "--".into()),
                }
            }
            // A purchase (also when there is nothing to void, refund, cancel
            // or complete yet); `Reversal` sends one and pretends its reply
            // never came.
            _ => {
                let (pan, amount, stan) = (self.card(), self.amount(), self.terminal.next_stan());
                let Ok(frame) = self.terminal.purchase(stan, &pan, expiry, amount) else {
                    return ("purchase", "--".into());
                };
                self.pending = Some(Pending {
                    pan: pan.clone(),
                    processing_code: "000000",
                    amount,
                    stan,
                    condition: "00",
                    f60: self.terminal.f60("22"),
                    f61: None,
                    reason: "98",
                });
                let reply = self.exchange_reversible(&frame).await;
                if op == Op::Reversal {
                    // Keep the record: the next request is preceded by the 0400.
                    return ("purchase", code(&reply));
                }
                let reply = match reply {
                    Ok(reply) => reply,
                    Err(e) => return ("purchase", e.code().into()),
                };
                self.pending = None;
                let rc = reply.rc().to_string();
                if rc == "00" {
                    self.keep(stan, pan, amount, reply);
                }
                ("purchase", rc)
            }
        }
    }

    fn keep(&mut self, stan: u32, pan: String, amount: u64, reply: Reply) {
        self.count(stan, &pan, amount, false);
        self.sales.push(Sale {
            stan,
            pan,
            amount,
            reply: reply.kept(),
            refunded: 0,
        });
    }

    fn count(&mut self, stan: u32, pan: &str, amount: u64, credit: bool) {
        self.counted.push(Counted {
            stan,
            pan: pan.to_string(),
            amount,
            credit,
        });
    }

    /// The terminal's id.
    pub fn id(&self) -> &str {
        &self.terminal.id
    }

    /// The open batch.
    pub fn batch(&self) -> u32 {
        self.terminal.batch
    }

    /// Reverses what is left to reverse and settles the batch with the
    /// terminal's own totals; returns the reconciliation code (1 balanced).
    /// When the switch's figures differ (2), the terminal uploads its batch,
    /// as rule S1 says, so the switch can tell which transactions differ.
    pub async fn settle(&mut self) -> Option<String> {
        self.reverse_pending().await;
        let (mut debit, mut debits, mut credit, mut credits) = (0, 0, 0, 0);
        for c in &self.counted {
            if c.credit {
                (credit, credits) = (credit + c.amount, credits + 1);
            } else {
                (debit, debits) = (debit + c.amount, debits + 1);
            }
        }
        let totals = format!(
            "{debit:012}{:03}{credit:012}{:03}0{}",
            debits % 1000,
            credits % 1000,
            "0".repeat(31)
        );
        let stan = self.terminal.next_stan();
        let frame = self.terminal.settlement(stan, &totals).ok()?;
        let started = std::time::Instant::now();
        let reply = self.exchange_retrying(&frame).await.ok()?;
        self.timed
            .push(("settlement", reply.rc().to_string(), started.elapsed()));
        // A code each for domestic and foreign cards (digits 30 and 61):
        // balanced (1) only when both are.
        let f48 = reply.field(48);
        let codes = [f48.get(30..31), f48.get(61..62)];
        if codes.contains(&Some("2")) {
            self.upload().await;
        }
        codes
            .into_iter()
            .find(|c| *c != Some("1"))
            .unwrap_or(Some("1"))
            .map(str::to_string)
    }

    /// The batch upload (0320): every counted transaction, eight a message,
    /// then the upload's end. Stops at the first message not approved.
    async fn upload(&mut self) {
        let batch = self.terminal.batch;
        let counted = std::mem::take(&mut self.counted);
        let chunks = counted.chunks(8).map(Some).chain([None]);
        for chunk in chunks {
            let records: Vec<(u32, &str, u64)> = chunk
                .unwrap_or_default()
                .iter()
                .map(|c| (c.stan, c.pan.as_str(), c.amount))
                .collect();
            let stan = self.terminal.next_stan();
            let Ok(frame) = self.terminal.batch_upload(stan, batch, &records) else {
                break;
            };
            let started = std::time::Instant::now();
            let rc = code(&self.exchange_retrying(&frame).await);
            let approved = rc == "00";
            self.timed.push(("batch_upload", rc, started.elapsed()));
            if !approved {
                break;
            }
        }
        self.counted = counted;
    }
}

impl Lane for Player {
    async fn send(&mut self, _index: u64) -> (&'static str, String) {
        self.play().await
    }
}

/// What a run did.
#[derive(Debug)]
pub struct Run {
    /// Latency by kind, from each request's scheduled time (open loop), and
    /// the settlements.
    pub report: Report,
    /// Terminals whose settlement balanced, and all that settled.
    pub balanced: (usize, usize),
    /// The terminals whose settlement did not balance or was not answered
    /// with totals, with their batch (`switchyard settlement report`).
    pub unbalanced: Vec<(String, u32)>,
    /// Connection failures (the resets the terminals made on purpose excluded).
    pub errors: u64,
    /// Connections the terminals reset on purpose (`reset_connection`).
    pub resets: u64,
    /// Connections the terminals made again (after a reset or a failure).
    pub reconnects: u64,
    /// Replies whose MAC (F64) was missing or wrong (each attempt of a
    /// request sent again counted): none in a run whose keys and switch are
    /// right.
    pub mac_failures: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Per rate step, in order.
    pub steps: Vec<Step>,
    /// Latency by the second each request was due, from the start of the
    /// first step (the 0400s and settlements are not in it).
    pub timeline: Timeline,
}

/// One rate step of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The scheduled rate, per second.
    pub rate: f64,
    /// The rate achieved: requests answered per second of the step.
    pub achieved: f64,
    pub p50: Duration,
    pub p99: Duration,
    /// Where the CPU went during the step, when it could be read.
    pub cpu: Option<Usage>,
}

impl Step {
    /// The step's CPU per transaction in µs (all parts and the rest of the
    /// machine) and its cores busy (`1.38 of 2`), as the step tables show
    /// them; both empty when it was not measured.
    pub fn cpu_cells(&self) -> (String, String) {
        self.cpu
            .as_ref()
            .map_or((String::new(), String::new()), |c| {
                (
                    format!("{:.0}", c.total().as_secs_f64() * 1e6),
                    format!("{:.2} of {}", c.cores_busy, c.cores),
                )
            })
    }
}

impl Run {
    /// The highest scheduled rate that was sustained: achieved within 5% of
    /// it, p99 under the target.
    pub fn saturation(&self, p99_target: Duration) -> Option<f64> {
        self.steps
            .iter()
            .filter(|s| s.achieved >= s.rate * 0.95 && s.p99 <= p99_target)
            .map(|s| s.rate)
            .fold(None, |best, r| Some(best.map_or(r, |b: f64| b.max(r))))
    }
}

/// Plays a scenario against the switch at `target`; `meter` reads where
/// the CPU went during each rate step.
pub async fn run(target: &str, scenario: Scenario, meter: &Meter) -> Result<Run, String> {
    let scenario = Arc::new(scenario);
    let dialect = Arc::new(Dialect::cup_pos());
    let mut players = Vec::with_capacity(scenario.terminals);
    for i in 0..scenario.terminals {
        players.push(Player::start(target, scenario.clone(), i, dialect.clone()).await?);
    }
    let started = std::time::Instant::now();
    // The progress line, for a person watching; nothing in a log file.
    let mut live = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| Live::new(started));
    let mut timeline = Timeline::default();
    let rates = if scenario.steps.is_empty() {
        vec![scenario.rate]
    } else {
        scenario.steps.clone()
    };
    let mut report = Report::default();
    let mut steps = Vec::with_capacity(rates.len());
    for rate in rates {
        let count = (rate * scenario.duration.as_secs_f64()).round() as u64;
        let step_started = std::time::Instant::now();
        let before = meter.read();
        let (back, samples) = open::run(rate, count, players, live.as_mut()).await;
        let cpu = meter.usage(&before, &meter.read(), count);
        players = back;
        let offset = step_started - started;
        // Every request's latency runs from its scheduled time (a reversal
        // the terminal owed delays the request it precedes).
        let mut step = Report::default();
        for s in &samples {
            step.record(s.kind, &s.rc, s.latency);
            timeline.record(offset + s.scheduled, s.latency);
        }
        let all = step.total();
        let [p50, _, p99, _, _] = all.percentiles();
        steps.push(Step {
            rate,
            // Only what was answered: a request with no reply (`--`), with
            // a reply whose MAC failed, or skipped behind an unanswered
            // reversal was not served.
            achieved: samples
                .iter()
                .filter(|s| s.rc != "--" && s.rc != BAD_MAC)
                .count() as f64
                / step_started.elapsed().as_secs_f64(),
            p50,
            p99,
            cpu,
        });
        report.merge(&step);
    }
    let elapsed = started.elapsed();
    if let Some(live) = &live {
        live.finish();
    }
    // The 0400s themselves and the settlements are added as the terminals timed them.
    let mut balanced = (0, 0);
    let mut unbalanced = Vec::new();
    if scenario.settle {
        for p in &mut players {
            // Unanswered, or answered without totals (96, 77, 30): not
            // balanced either.
            match p.settle().await.as_deref() {
                Some("1") => balanced = (balanced.0 + 1, balanced.1 + 1),
                Some(_) | None => {
                    balanced.1 += 1;
                    unbalanced.push((p.id().to_string(), p.batch()));
                }
            }
        }
    }
    for p in &players {
        for (kind, rc, latency) in &p.timed {
            report.record(kind, rc, *latency);
        }
    }
    let errors = players.iter().map(|p| p.errors).sum();
    Ok(Run {
        report,
        balanced,
        unbalanced,
        errors,
        resets: players.iter().map(|p| p.resets).sum(),
        reconnects: players.iter().map(|p| p.reconnects).sum(),
        mac_failures: players.iter().map(|p| p.mac_failures).sum(),
        elapsed,
        steps,
        timeline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stand_in::{
        Answer, Seen, approving_switch, keyed_switch, stand_in_switch, test_derivation_key,
    };

    #[test]
    fn shipped_scenarios_read() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/load");
        let smoke = Scenario::load(&dir.join("smoke.toml")).unwrap();
        assert!(smoke.count() > 0);
        assert!(smoke.mix.iter().any(|(op, _)| *op == Op::Void));
        let mixed = Scenario::load(&dir.join("mixed.toml")).unwrap();
        // A realistic day has pre-authorisations, and the smoke test plays
        // every kind.
        for op in [Op::PreAuth, Op::Completion, Op::PreAuthCancel] {
            assert!(mixed.mix.iter().any(|(o, _)| *o == op), "{op:?}");
        }
        for (_, op) in OPS {
            assert!(smoke.mix.iter().any(|(o, _)| *o == op), "{op:?}");
        }
        let peak = Scenario::load(&dir.join("peak.toml")).unwrap();
        assert!(peak.steps.len() >= 3);
        let faults = Scenario::load(&dir.join("faults.toml")).unwrap();
        assert!(!faults.faults.none());
    }

    #[test]
    fn scenario_problems_name_line_and_key() {
        let problems = Scenario::parse(
            "rate = -1\nreply_timeout = \"0s\"\nduration = \"0s\"\nmerchant = \"nope\"\n[amount]\nmin = 10\nmax = 5\n[mix]\npurchase = 0\nrefunds = 3\n",
            "s.toml",
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "s.toml:1: rate: out of range",
            "s.toml:2: reply_timeout: must be above 0",
            "s.toml:3: duration: must be above zero",
            "s.toml:4: merchant: \"nope\" is not a merchant id of 15 characters (F42)",
            "s.toml:7: amount.max: must not be below min",
            "s.toml:10: mix.refunds: unknown key",
        ] {
            assert!(
                problems.contains(expected),
                "{expected:?} missing from:\n{problems}"
            );
        }
    }

    #[test]
    fn every_op_is_named_by_its_mix_key() {
        let text: String = OPS
            .iter()
            .map(|(name, _)| format!("{name} = 1\n"))
            .collect();
        let s = Scenario::parse(&format!("[mix]\n{text}"), "all.toml").unwrap();
        assert_eq!(s.mix.len(), OPS.len());
        for (name, op) in OPS {
            assert_eq!(op.name(), name);
        }
    }

    #[test]
    fn fault_keys_are_checked() {
        let problems = Scenario::parse(
            "duration = \"2s\"\n[faults]\nreset_connection = 1.5\nissuer_down_for = \"1s\"\nswitch_kill_at = \"2s\"\nissuer_restart = \"1s\"\n",
            "f.toml",
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "f.toml:3: faults.reset_connection: out of range: 0 to 1",
            "f.toml:4: faults.issuer_down_for: needs issuer_restart_at",
            "f.toml:5: faults.switch_kill_at: must fall within the run",
            "f.toml:6: faults.issuer_restart: unknown key",
        ] {
            assert!(
                problems.contains(expected),
                "{expected:?} missing from:\n{problems}"
            );
        }
        let fine = Scenario::parse(
            "duration = \"4s\"\n[faults]\nreset_connection = 0.1\nissuer_restart_at = \"1500ms\"\nswitch_kill_at = \"3s\"\n",
            "f.toml",
        )
        .unwrap();
        assert_eq!(
            fine.faults.issuer_restart_at,
            Some(Duration::from_millis(1500))
        );
        assert_eq!(fine.faults.issuer_down_for, DEFAULT_ISSUER_DOWN_FOR);
        assert_eq!(fine.faults.switch_kill_at, Some(Duration::from_secs(3)));
        assert!(!fine.faults.issuer_replies());
    }

    /// The STANs of the requests of `mti` a stand-in switch saw, in order.
    fn stans_of(seen: &Seen, mti: &str) -> Vec<u32> {
        seen.requests
            .iter()
            .filter(|r| r.1 == mti)
            .map(|r| r.2)
            .collect()
    }

    /// Plays `scenario` (TOML) against the switch at `addr`.
    async fn play(addr: &str, scenario: &str) -> Run {
        let scenario = Scenario::parse(scenario, "s.toml").unwrap();
        run(addr, scenario, &Meter::load_generator()).await.unwrap()
    }

    #[tokio::test]
    async fn a_terminal_that_resets_its_connection_signs_on_again_and_reverses_first() {
        let (addr, seen) = approving_switch().await;
        let run = play(&addr, "terminals = 1\nrate = 100\nduration = \"30ms\"\nsettle = false\n[mix]\npurchase = 1\n[faults]\nreset_connection = 1.0\n").await;
        assert_eq!((run.resets, run.reconnects, run.errors), (3, 3, 0));
        // The switch sees the resets, not orderly closes (each as its
        // connection's task reads on).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while seen.lock().unwrap().reset.len() < 3 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut seen = seen.lock().unwrap();
        seen.reset.sort_unstable();
        assert_eq!(seen.reset, [0, 1, 2]);
        let requests: Vec<(usize, &str, &str)> = seen
            .requests
            .iter()
            .map(|(c, mti, _, rc)| (*c, mti.as_str(), rc.as_str()))
            .collect();
        // Each connection: sign-on, the reversal the record asks for (reason
        // 98), then the next purchase, after which the line drops.
        assert_eq!(
            requests,
            [
                (0, "0800", ""),
                (0, "0200", ""),
                (1, "0800", ""),
                (1, "0400", "98"),
                (1, "0200", ""),
                (2, "0800", ""),
                (2, "0400", "98"),
                (2, "0200", ""),
                (3, "0800", ""),
            ]
        );
        // Each 0400 reverses the purchase just before it: the same STAN.
        let stans: Vec<u32> = seen.requests.iter().map(|r| r.2).collect();
        assert_eq!(stans[3], stans[1]);
        assert_eq!(stans[6], stans[4]);
    }

    /// The requests a stand-in switch saw: (connection, MTI, F39).
    fn requests(seen: &std::sync::Mutex<Seen>) -> Vec<(usize, String, String)> {
        let seen = seen.lock().unwrap();
        seen.requests
            .iter()
            .map(|(c, mti, _, rc)| (*c, mti.clone(), rc.clone()))
            .collect()
    }

    fn owned(expected: &[(usize, &str, &str)]) -> Vec<(usize, String, String)> {
        expected
            .iter()
            .map(|&(c, mti, rc)| (c, mti.to_string(), rc.to_string()))
            .collect()
    }

    /// Two purchases from one terminal, no settlement.
    const TWO_PURCHASES: &str =
        "terminals = 1\nrate = 100\nduration = \"20ms\"\nsettle = false\n[mix]\npurchase = 1\n";

    /// Two purchases of one terminal, answered as `answer` says (the first
    /// not validly), with a reply timeout of 300 ms: the terminal takes the
    /// first as unanswered, connects again and reverses it (98) before the
    /// second.
    async fn first_purchase_unanswered(answer: fn(&str, usize) -> Answer) {
        let (addr, seen) = stand_in_switch(answer).await;
        let scenario = Scenario::parse(
            &format!("reply_timeout = \"300ms\"\n{TWO_PURCHASES}"),
            "s.toml",
        )
        .unwrap();
        assert_eq!(scenario.reply_timeout, Duration::from_millis(300));
        // A terminal that waited for ever would never end the run.
        let run = tokio::time::timeout(
            Duration::from_secs(20),
            run(&addr, scenario, &Meter::load_generator()),
        )
        .await
        .expect("the run ends")
        .unwrap();
        assert_eq!(run.report.kinds["purchase"].codes["--"], 1);
        assert_eq!(
            requests(&seen),
            owned(&[
                (0, "0800", ""),
                (0, "0200", ""),
                (1, "0800", ""),
                (1, "0400", "98"),
                (1, "0200", ""),
            ])
        );
    }

    #[tokio::test]
    async fn a_reply_that_does_not_answer_the_request_is_no_reply() {
        // The first purchase is answered with another STAN.
        first_purchase_unanswered(|mti, before| match (mti, before) {
            ("0200", 0) => Answer::OtherStan,
            _ => Answer::With("00"),
        })
        .await;
    }

    #[tokio::test]
    async fn a_terminal_gives_up_on_a_reply_after_its_timeout() {
        first_purchase_unanswered(|mti, before| match (mti, before) {
            ("0200", 0) => Answer::Silence,
            _ => Answer::With("00"),
        })
        .await;
    }

    #[tokio::test]
    async fn a_terminal_gives_up_on_a_sign_on_after_its_timeout() {
        let (addr, _seen) = stand_in_switch(|mti, _| match mti {
            "0800" => Answer::Silence,
            _ => Answer::With("00"),
        })
        .await;
        let scenario = Scenario::parse(
            &format!("reply_timeout = \"200ms\"\n{TWO_PURCHASES}"),
            "s.toml",
        )
        .unwrap();
        let run = tokio::time::timeout(
            Duration::from_secs(20),
            run(&addr, scenario, &Meter::load_generator()),
        )
        .await
        .expect("the run ends");
        let Err(e) = run else {
            panic!("no terminal signed on, yet the run went on");
        };
        assert!(e.contains("no sign-on reply"), "{e}");
    }

    #[tokio::test]
    async fn a_reversal_the_switch_could_not_decide_is_sent_again_and_reported_as_answered() {
        // The purchase's reply "never comes" (the reversal op); its first
        // 0400 is answered 96, the second 00.
        let (addr, seen) = stand_in_switch(|mti, before| match (mti, before) {
            ("0400", 0) => Answer::With("96"),
            _ => Answer::With("00"),
        })
        .await;
        let run = play(
            &addr,
            "terminals = 1\nrate = 100\nduration = \"30ms\"\nsettle = false\n[mix]\nreversal = 1\n",
        )
        .await;
        let reversals = &run.report.kinds["reversal"].codes;
        assert_eq!(reversals.get("96"), Some(&1), "{reversals:?}");
        assert!(!reversals.contains_key("--"), "{reversals:?}");
        let sent: Vec<(String, String)> = requests(&seen)
            .into_iter()
            .filter(|r| r.1 == "0400")
            .map(|r| (r.1, r.2))
            .collect();
        assert!(
            sent.len() >= 2,
            "the 96 was not followed by another 0400: {sent:?}"
        );
        let stans = stans_of(&seen.lock().unwrap(), "0400");
        assert_eq!(stans[0], stans[1], "the same reversal, sent again");
    }

    #[tokio::test]
    async fn a_duplicate_answered_two_ways_is_reversed() {
        // The first copy approved, the repeat 96: the terminal cannot tell
        // whether it sold, and reverses before its next request.
        let (addr, seen) = stand_in_switch(|mti, before| match (mti, before) {
            ("0200", 1) => Answer::With("96"),
            _ => Answer::With("00"),
        })
        .await;
        let run = play(
            &addr,
            "terminals = 1\nrate = 100\nduration = \"30ms\"\nsettle = false\n[mix]\nduplicate = 1\n",
        )
        .await;
        assert_eq!(run.report.kinds["duplicate"].codes.get("XX"), Some(&1));
        let seen = seen.lock().unwrap();
        let (sales, reversals) = (stans_of(&seen, "0200"), stans_of(&seen, "0400"));
        assert_eq!(reversals, [sales[0]], "{sales:?} {reversals:?}");
    }

    #[tokio::test]
    async fn a_duplicate_declined_once_and_unanswered_once_is_reversed() {
        // The first copy never answered (it may have sold), the repeat 96.
        let (addr, seen) = stand_in_switch(|mti, before| match (mti, before) {
            ("0200", 0) => Answer::Silence,
            ("0200", 1) => Answer::With("96"),
            _ => Answer::With("00"),
        })
        .await;
        play(
            &addr,
            "terminals = 1\nrate = 100\nduration = \"30ms\"\nsettle = false\nreply_timeout = \"100ms\"\n[mix]\nduplicate = 1\n",
        )
        .await;
        let seen = seen.lock().unwrap();
        let (sales, reversals) = (stans_of(&seen, "0200"), stans_of(&seen, "0400"));
        assert_eq!(
            reversals.first(),
            Some(&sales[0]),
            "{sales:?} {reversals:?}"
        );
    }

    #[tokio::test]
    async fn a_settlement_answered_without_totals_does_not_balance() {
        let (addr, _seen) = stand_in_switch(|mti, _| match mti {
            "0500" => Answer::With("96"),
            _ => Answer::With("00"),
        })
        .await;
        let run = play(
            &addr,
            "terminals = 2\nrate = 100\nduration = \"20ms\"\n[mix]\npurchase = 1\n",
        )
        .await;
        assert_eq!(run.balanced, (0, 2));
    }

    /// What a terminal uploaded after its settlement: (STAN, amount) of
    /// every record, and whether the upload's end came last.
    fn uploaded(seen: &Seen) -> (Vec<(u32, u64)>, bool) {
        let uploads: Vec<_> = seen
            .amounts
            .iter()
            .zip(&seen.requests)
            .filter(|(_, r)| r.1 == "0320")
            .map(|(a, _)| a)
            .collect();
        let mut records = Vec::new();
        for (_, f48, _) in uploads.iter().filter(|u| u.2 == "201") {
            let f48 = f48.as_deref().unwrap();
            let count: usize = f48[..2].parse().unwrap();
            assert!((1..=8).contains(&count), "{f48}");
            assert_eq!(f48.len(), 2 + count * 40);
            for r in f48.as_bytes()[2..].chunks(40) {
                let r = std::str::from_utf8(r).unwrap();
                records.push((r[2..8].parse().unwrap(), r[28..40].parse().unwrap()));
            }
        }
        let ended = uploads.last().is_some_and(|u| u.2 == "202");
        (records, ended)
    }

    #[tokio::test]
    async fn a_terminal_whose_settlement_does_not_balance_uploads_its_batch() {
        let (addr, seen) = stand_in_switch(|mti, _| match mti {
            "0500" => Answer::Totals('2'),
            _ => Answer::With("00"),
        })
        .await;
        let run = play(
            &addr,
            "terminals = 1\nrate = 100\nduration = \"100ms\"\n[mix]\npurchase = 1\n",
        )
        .await;
        assert_eq!(run.balanced, (0, 1));
        // The stand-in echoes the sign-on's F60, batch 000000.
        assert_eq!(run.unbalanced, vec![("T0000001".to_string(), 0)]);
        let seen = seen.lock().unwrap();
        // Every approved purchase, by its STAN and amount, in uploads of at
        // most eight records, then the end.
        let sold: Vec<(u32, u64)> = seen
            .requests
            .iter()
            .zip(&seen.amounts)
            .filter(|(r, _)| r.1 == "0200")
            .map(|(r, a)| (r.2, a.0.unwrap()))
            .collect();
        assert_eq!(sold.len(), 10);
        let (records, ended) = uploaded(&seen);
        assert_eq!(records, sold);
        assert!(ended, "the upload's end (F60.3 202) comes last");
        assert_eq!(
            seen.requests.iter().filter(|r| r.1 == "0320").count(),
            3,
            "10 records: 8 and 2, then the end"
        );
        assert_eq!(run.report.kinds["batch_upload"].count(), 3);
    }

    #[tokio::test]
    async fn a_terminal_whose_settlement_balances_uploads_nothing() {
        let (addr, seen) = stand_in_switch(|mti, _| match mti {
            "0500" => Answer::Totals('1'),
            _ => Answer::With("00"),
        })
        .await;
        let run = play(
            &addr,
            "terminals = 1\nrate = 100\nduration = \"50ms\"\n[mix]\npurchase = 1\n",
        )
        .await;
        assert_eq!(run.balanced, (1, 1));
        assert!(run.unbalanced.is_empty());
        assert_eq!(uploaded(&seen.lock().unwrap()), (vec![], false));
    }

    #[tokio::test]
    async fn voids_name_the_auth_code_and_a_cancels_reversal_its_f61() {
        // Every cancel's reply "never comes": each is reversed before the
        // next request.
        let (addr, seen) = approving_switch().await;
        play(&addr, "terminals = 1\nrate = 200\nduration = \"100ms\"\nsettle = false\nseed = 3\n[mix]\npurchase = 1\nvoid = 1\npreauth = 1\npreauth_cancel = 1\n[faults]\nreset_connection = 0.5\n").await;
        let seen = seen.lock().unwrap();
        let of = |mti: &str,
                  type_code: &str|
         -> Vec<&(String, String, Option<String>, Option<String>)> {
            seen.originals
                .iter()
                .filter(|o| o.0 == mti && o.1 == type_code)
                .collect()
        };
        let voids = of("0200", "23");
        assert!(!voids.is_empty(), "no void in the run");
        for v in &voids {
            assert_eq!(v.2.as_deref(), Some("123456"), "a void without F38: {v:?}");
        }
        let cancels = of("0100", "11");
        let cancel_reversals = of("0400", "11");
        assert!(
            !cancel_reversals.is_empty(),
            "no cancel was reversed: {cancels:?}"
        );
        for r in &cancel_reversals {
            let f61 = r.3.as_deref().expect("a cancel's reversal carries F61");
            assert!(cancels.iter().any(|c| c.3.as_deref() == Some(f61)), "{r:?}");
        }
    }

    #[tokio::test]
    async fn a_completion_void_names_its_completion_and_counts_as_a_credit() {
        let (addr, seen) = stand_in_switch(|mti, _| match mti {
            "0500" => Answer::Totals('2'),
            _ => Answer::With("00"),
        })
        .await;
        play(&addr, "terminals = 1\nrate = 200\nduration = \"200ms\"\nseed = 5\n[mix]\npreauth = 2\ncompletion = 2\ncompletion_void = 1\n").await;
        let seen = seen.lock().unwrap();
        // Per 0200: its STAN, F60.1, F38, F61 and F4.
        let financial: Vec<_> = seen
            .requests
            .iter()
            .zip(&seen.originals)
            .zip(&seen.amounts)
            .filter(|((r, _), _)| r.1 == "0200")
            .map(|((r, o), a)| (r.2, o.1.as_str(), o.2.clone(), o.3.clone(), a.0.unwrap()))
            .collect();
        let completions: Vec<_> = financial.iter().filter(|f| f.1 == "20").collect();
        let voids: Vec<_> = financial.iter().filter(|f| f.1 == "21").collect();
        assert!(
            !voids.is_empty(),
            "no completion void in the run: {financial:?}"
        );
        let mut voided = Vec::new();
        for v in &voids {
            assert_eq!(v.2, None, "a completion void names no auth code: {v:?}");
            let f61 = v.3.as_deref().expect("F61 names the completion");
            let c = completions
                .iter()
                .find(|c| f61 == format!("000000{:06}", c.0))
                .unwrap_or_else(|| panic!("{v:?} names no completion of {completions:?}"));
            assert_eq!(v.4, c.4, "a void is for the completion's amount");
            assert!(!voided.contains(&c.0), "completion {} voided twice", c.0);
            voided.push(c.0);
        }
        // The settlement: completions debit (with the purchases sent while
        // nothing was open to complete or void), their voids credit; the
        // upload lists them all.
        let debits: Vec<_> = financial
            .iter()
            .filter(|f| f.1 == "20" || f.1 == "22")
            .collect();
        assert!(debits.len() > completions.len());
        let settlement = seen
            .requests
            .iter()
            .zip(&seen.amounts)
            .find(|(r, _)| r.1 == "0500")
            .and_then(|(_, a)| a.1.clone())
            .unwrap();
        let debit: u64 = debits.iter().map(|c| c.4).sum();
        let credit: u64 = voids.iter().map(|v| v.4).sum();
        assert_eq!(
            &settlement[..30],
            format!(
                "{debit:012}{:03}{credit:012}{:03}",
                debits.len(),
                voids.len()
            )
        );
        let (records, ended) = uploaded(&seen);
        let mut expected: Vec<(u32, u64)> =
            debits.iter().chain(&voids).map(|f| (f.0, f.4)).collect();
        expected.sort();
        let mut records = records;
        records.sort();
        assert_eq!(records, expected);
        assert!(ended);
    }

    #[tokio::test]
    async fn a_step_whose_requests_go_unanswered_achieved_nothing() {
        let (addr, _seen) = stand_in_switch(|mti, _| match mti {
            "0200" => Answer::Silence,
            _ => Answer::With("00"),
        })
        .await;
        let run = play(&addr, "terminals = 2\nsteps = [100]\nduration = \"40ms\"\nsettle = false\nreply_timeout = \"50ms\"\n[mix]\npurchase = 1\n").await;
        assert_eq!(run.steps.len(), 1);
        assert_eq!(run.steps[0].achieved, 0.0, "{:?}", run.steps[0]);
        assert_eq!(run.saturation(Duration::from_secs(60)), None);
    }

    /// Plays `scenario` (TOML) against the switch at `addr` with terminal
    /// keys derived from the test key; the run must end.
    async fn play_keyed(addr: &str, scenario: &str) -> Result<Run, String> {
        let mut scenario = Scenario::parse(scenario, "s.toml").unwrap();
        scenario.derivation_key = Some(test_derivation_key());
        tokio::time::timeout(
            Duration::from_secs(20),
            run(addr, scenario, &Meter::load_generator()),
        )
        .await
        .expect("the run ends")
    }

    #[tokio::test]
    async fn a_purchase_whose_reply_mac_fails_is_reversed_with_reason_a0() {
        // The first purchase's reply comes without F64, the first reversal's
        // with a wrong one: neither is the switch's word.
        let (addr, seen) = keyed_switch(test_derivation_key(), |mti, before| match (mti, before) {
            ("0200", 0) => Answer::NoMac("00"),
            ("0400", 0) => Answer::WrongMac("00"),
            _ => Answer::With("00"),
        })
        .await;
        let run = play_keyed(&addr, TWO_PURCHASES).await.unwrap();
        // The record stands, its 0400 says A0 and goes again when its own
        // reply's MAC fails; the connection stays up throughout.
        assert_eq!(
            requests(&seen),
            owned(&[
                (0, "0800", ""),
                (0, "0200", ""),
                (0, "0400", "A0"),
                (0, "0400", "A0"),
                (0, "0200", ""),
            ])
        );
        let seen = seen.lock().unwrap();
        let sales = stans_of(&seen, "0200");
        assert_eq!(stans_of(&seen, "0400"), [sales[0], sales[0]]);
        // Every request but the sign-on carried its MAC.
        assert_eq!(
            seen.macs,
            [None, Some(true), Some(true), Some(true), Some(true)]
        );
        assert_eq!((run.mac_failures, run.errors, run.reconnects), (2, 0, 0));
        let purchases = &run.report.kinds["purchase"].codes;
        assert_eq!(purchases.get(BAD_MAC), Some(&1), "{purchases:?}");
        assert_eq!(purchases.get("00"), Some(&1), "{purchases:?}");
        assert_eq!(run.report.kinds["reversal"].codes.get("00"), Some(&1));
        assert!(
            run.report.table().contains("MAC:1"),
            "{}",
            run.report.table()
        );
        assert!(run.report.to_json().contains("\"MAC\": 1"));
    }

    #[tokio::test]
    async fn a_frame_built_before_a_new_sign_on_goes_under_the_new_mac_key() {
        let (addr, seen) = keyed_switch(test_derivation_key(), |_, _| Answer::With("00")).await;
        let dialect = Arc::new(Dialect::cup_pos());
        let mut t = Terminal::connect(&addr, "T0000001", "898310048160001", dialect)
            .await
            .unwrap();
        t.set_master_key(Some(test_derivation_key().master_key("T0000001")));
        t.sign_on().await.unwrap();
        let stan = t.next_stan();
        let built = t
            .purchase(stan, "6222020000000000001", "3012", 100)
            .unwrap();
        // Nothing changed: it goes as built.
        assert_eq!(*t.as_sent(&built), built[..]);
        t.sign_on().await.unwrap();
        let sent = t.as_sent(&built).into_owned();
        assert_ne!(sent, built[..], "MACed again under the new key");
        assert_eq!(sent[..sent.len() - 8], built[..built.len() - 8]);
        t.exchange(&sent).await.unwrap();
        t.exchange(&built).await.unwrap();
        // The stand-in checks each under the keys of the last sign-on.
        let macs = seen.lock().unwrap().macs.clone();
        assert_eq!(macs[macs.len() - 2..], [Some(true), Some(false)]);
        // A frame without F64 (a sign-on) goes as it is.
        let plain = t
            .request(
                iso8583::Mti::NETWORK,
                &[
                    (11, crate::Field::Number(9)),
                    (60, crate::Field::Digits("00000000001")),
                ],
            )
            .unwrap();
        assert!(matches!(t.as_sent(&plain), std::borrow::Cow::Borrowed(_)));
    }

    #[tokio::test]
    async fn a_balance_inquiry_whose_reply_mac_fails_is_an_error_not_a_reversal() {
        let (addr, seen) = keyed_switch(test_derivation_key(), |mti, before| match (mti, before) {
            ("0200", 0) => Answer::WrongMac("00"),
            _ => Answer::With("00"),
        })
        .await;
        let run = play_keyed(
            &addr,
            "terminals = 1\nrate = 100\nduration = \"20ms\"\nsettle = false\n[mix]\npurchase = 0\nbalance_inquiry = 1\n",
        )
        .await
        .unwrap();
        let codes = &run.report.kinds["balance_inquiry"].codes;
        assert_eq!(codes.get(BAD_MAC), Some(&1), "{codes:?}");
        assert_eq!(codes.get("00"), Some(&1), "{codes:?}");
        assert_eq!(run.mac_failures, 1);
        assert_eq!(
            requests(&seen),
            owned(&[(0, "0800", ""), (0, "0200", ""), (0, "0200", "")])
        );
    }

    #[tokio::test]
    async fn a_settlement_whose_reply_mac_fails_is_sent_again() {
        let (addr, seen) = keyed_switch(test_derivation_key(), |mti, before| match (mti, before) {
            ("0500", 0) => Answer::WrongMac("00"),
            ("0500", _) => Answer::Totals('1'),
            _ => Answer::With("00"),
        })
        .await;
        let run = play_keyed(
            &addr,
            "terminals = 1\nrate = 100\nduration = \"10ms\"\n[mix]\npurchase = 1\n",
        )
        .await
        .unwrap();
        assert_eq!(run.balanced, (1, 1));
        assert_eq!(run.mac_failures, 1);
        let seen = seen.lock().unwrap();
        let settlements = stans_of(&seen, "0500");
        assert_eq!(settlements.len(), 2, "{settlements:?}");
        assert_eq!(
            settlements[0], settlements[1],
            "the same settlement, sent again"
        );
    }

    #[tokio::test]
    async fn a_terminal_whose_sign_on_brings_no_keys_it_can_open_stops_the_run_and_says_why() {
        // A switch without terminal keys approves the sign-on without F62.
        let (addr, _seen) = approving_switch().await;
        let e = play_keyed(&addr, TWO_PURCHASES).await.unwrap_err();
        assert!(
            e.starts_with("T0000001: sign-on: approved without working keys (F62)"),
            "{e}"
        );
        // A switch with another derivation key: the keys do not check.
        let other = iso8583::keys::DerivationKey::new(&[0x11; 16]);
        let (addr, _seen) = keyed_switch(other, |_, _| Answer::With("00")).await;
        let e = play_keyed(&addr, TWO_PURCHASES).await.unwrap_err();
        assert!(
            e.contains("check value does not match")
                && e.contains("derivation key is not the terminal's"),
            "{e}"
        );
    }

    #[test]
    fn the_dice_repeat_with_their_seed() {
        let (mut a, mut b) = (Dice(7), Dice(7));
        let xs: Vec<u64> = (0..5).map(|_| a.below(100)).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.below(100)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().any(|&x| x != xs[0]));
    }
}
