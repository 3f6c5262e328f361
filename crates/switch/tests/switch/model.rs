//! A model of rules.md played against the real switch (issue 4, item 6).
//!
//! A property test draws random sequences of purchases, voids, refunds
//! (partial and repeated), pre-authorisations with their cancels,
//! completions, completion advices and completion voids, reversals (of
//! voids too, of unknown originals, with the wrong amount), repeated
//! requests (the same STAN resent: D1, or resent with another amount: D2),
//! settlements (balanced or not) and sign-ons. Each request goes to a real
//! switch over TCP, with a real issuer and PostgreSQL behind it, and to an
//! in-memory model of the rules; the response codes (and the settlement
//! totals, and a replay's bytes) must agree. At the end, once the stored
//! advices have drained, the money must agree three ways: the issuer's
//! books, the journal, and the model, to the fen and per card.
//!
//! The model follows rules.md; where rules.md leaves a choice open it
//! follows the switch (a reversal of a voided, refunded, completed or
//! cancelled original answers `12`; a completion advice cannot be
//! completion-voided; a refund needs no particular card and credits the
//! original's; a request naming a closed batch answers `77`, a reversal
//! naming one `12`). Each case also draws the configurable rules: V6
//! `void_last_only`, F5 `same_day_refund = "deny"`, `duplicates = "reject"`.
//!
//! Bugs this test found, each fixed since, with a deterministic test in
//! `regressions`:
//!
//! - B1: a reversal changes the original before its duplicate check, so a
//!   repeated reversal (D1, D2) reverses a sale while answering 12 or 94.
//! - B2: refunds and completion advices are reversed although they are not
//!   reversible; the issuer never hears of it and the books disagree.
//! - B3: a refund of a completion advice names an original the issuer does
//!   not know; it is declined there (25) and never credited.
//! - B4: an original arriving after its R3 reversal is not reversed.
//! - B5: after the cut-over hour the original's F13 date no longer finds it
//!   (refunds, pre-authorisation follow-ups answer 25).
//! - B6: a follow-on overtakes the stored reversal advice it depends on;
//!   the issuer declines it (a void: 12; a refund advice: never credited).
//!
//! The property plays the requests that hit B1-B4; `MODEL_KNOWN_BUGS=none`
//! (or a list such as `B1,B4` of those still to play) makes it skip them
//! (see [`Model::known_bug`]). It still pins the cut-over at midnight and
//! lets the advice queue drain after every applied reversal.
//!
//! `PROPTEST_CASES` sets the number of cases (12 by default), `MODEL_OPS`
//! the most operations per case (30), `MODEL_LOG=1` prints every case.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use loadgen::{Original, Reply, Reversed};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestError, TestRunner};

use super::*;

const TERMINAL: &str = "T0000001";

/// Few cards, so that operations collide (first range of `CARDS`: a balance
/// of 1,000,000 fen and a limit of 500,000, so the issuer never declines).
const PANS: [&str; 3] = [
    "6222020000000000041",
    "6222020000000000042",
    "6222020000000000043",
];

/// The 31 digits of the foreign-card half of settlement totals: all zero.
const NO_FOREIGN: &str = "0000000000000000000000000000000";

// ---------------------------------------------------------------------------
// Operations, as drawn. Targets are indices into what was sent so far,
// resolved when the operation is played.

#[derive(Debug, Clone, Copy)]
enum CardPick {
    /// The original's card.
    Same,
    /// Another of the cards.
    Other(usize),
}

#[derive(Debug, Clone, Copy)]
enum AmountPick {
    /// The original's amount.
    Full,
    /// Per mille of the original's amount (at least 1 fen).
    Part(u16),
    /// What is left to refund; for a completion, the tolerance's edge.
    Remainder,
    /// Per mille above the original's amount (or above what is left).
    Over(u16),
}

#[derive(Debug, Clone, Copy)]
struct Target {
    /// Prefer originals of the kind the operation expects.
    natural: bool,
    index: Index,
}

#[derive(Debug, Clone)]
enum Op {
    Purchase {
        card: usize,
        amount: u64,
    },
    PreAuth {
        card: usize,
        amount: u64,
    },
    Void {
        of: Target,
        card: CardPick,
        amount: AmountPick,
        /// F37 of another transaction (V1's cross-check).
        wrong_rrn: Option<Index>,
    },
    CompletionVoid {
        of: Target,
        card: CardPick,
        amount: AmountPick,
    },
    Refund {
        of: Target,
        card: CardPick,
        amount: AmountPick,
    },
    Cancel {
        of: Target,
        card: CardPick,
        amount: AmountPick,
    },
    Completion {
        of: Target,
        card: CardPick,
        amount: AmountPick,
    },
    CompletionAdvice {
        of: Target,
        card: CardPick,
        amount: AmountPick,
    },
    /// The 0400 of an earlier request (its STAN, F3, F25, F60).
    Reversal {
        of: Target,
        wrong_amount: bool,
    },
    /// A 0400 for a STAN the switch never saw (R3).
    ReversalOfUnknown {
        card: usize,
        amount: u64,
        preauth: bool,
    },
    /// The original of an earlier R3 reversal turns up after it.
    LateOriginal {
        of: Index,
    },
    /// An earlier request again, byte for byte (D1), or with another amount (D2).
    Resend {
        of: Index,
        altered: bool,
    },
    Settlement {
        balanced: bool,
        sign_on: bool,
    },
    SignOn,
}

fn amount() -> impl Strategy<Value = u64> {
    prop_oneof![Just(1_000u64), Just(2_500), 1u64..=20_000]
}

fn card_pick() -> impl Strategy<Value = CardPick> {
    prop_oneof![8 => Just(CardPick::Same), 1 => (0..2usize).prop_map(CardPick::Other)]
}

fn amount_pick() -> impl Strategy<Value = AmountPick> {
    prop_oneof![
        8 => Just(AmountPick::Full),
        3 => (1u16..1000).prop_map(AmountPick::Part),
        2 => Just(AmountPick::Remainder),
        2 => (1u16..500).prop_map(AmountPick::Over),
    ]
}

fn target() -> impl Strategy<Value = Target> {
    (prop::bool::weighted(0.8), any::<Index>())
        .prop_map(|(natural, index)| Target { natural, index })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..PANS.len(), amount()).prop_map(|(card, amount)| Op::Purchase { card, amount }),
        3 => (0..PANS.len(), amount()).prop_map(|(card, amount)| Op::PreAuth { card, amount }),
        4 => (target(), card_pick(), amount_pick(), prop::option::weighted(0.1, any::<Index>()))
            .prop_map(|(of, card, amount, wrong_rrn)| Op::Void { of, card, amount, wrong_rrn }),
        2 => (target(), card_pick(), amount_pick())
            .prop_map(|(of, card, amount)| Op::CompletionVoid { of, card, amount }),
        4 => (target(), card_pick(), amount_pick())
            .prop_map(|(of, card, amount)| Op::Refund { of, card, amount }),
        2 => (target(), card_pick(), amount_pick())
            .prop_map(|(of, card, amount)| Op::Cancel { of, card, amount }),
        3 => (target(), card_pick(), amount_pick())
            .prop_map(|(of, card, amount)| Op::Completion { of, card, amount }),
        2 => (target(), card_pick(), amount_pick())
            .prop_map(|(of, card, amount)| Op::CompletionAdvice { of, card, amount }),
        4 => (target(), prop::bool::weighted(0.2))
            .prop_map(|(of, wrong_amount)| Op::Reversal { of, wrong_amount }),
        1 => (0..PANS.len(), amount(), any::<bool>())
            .prop_map(|(card, amount, preauth)| Op::ReversalOfUnknown { card, amount, preauth }),
        1 => any::<Index>().prop_map(|of| Op::LateOriginal { of }),
        3 => (any::<Index>(), prop::bool::weighted(0.3))
            .prop_map(|(of, altered)| Op::Resend { of, altered }),
        1 => (prop::bool::weighted(0.7), prop::bool::weighted(0.85))
            .prop_map(|(balanced, sign_on)| Op::Settlement { balanced, sign_on }),
        1 => Just(Op::SignOn),
    ]
}

// ---------------------------------------------------------------------------
// Requests: what the terminal sends, rebuilt from a recipe.

/// How a request names its original: what the terminal kept of it.
#[derive(Debug, Clone)]
struct Named {
    batch: u32,
    stan: u32,
    rrn: String,
    auth: String,
    date: String,
}

impl Named {
    fn original(&self) -> Original<'_> {
        Original {
            batch: self.batch,
            stan: self.stan,
            rrn: &self.rrn,
            auth_code: &self.auth,
            date: &self.date,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum K {
    Purchase,
    Void,
    Refund,
    PreAuth,
    Cancel,
    Completion,
    CompletionAdvice,
    CompletionVoid,
    Reversal,
    Settlement,
}

impl K {
    fn as_str(self) -> &'static str {
        match self {
            K::Purchase => "purchase",
            K::Void => "void",
            K::Refund => "refund",
            K::PreAuth => "preauth",
            K::Cancel => "preauth_cancel",
            K::Completion => "completion",
            K::CompletionAdvice => "completion_advice",
            K::CompletionVoid => "completion_void",
            K::Reversal => "reversal",
            K::Settlement => "settlement",
        }
    }

    /// MTI, F3, F25, F60.1 of the terminal request (terminal-cup.md).
    fn head(self) -> (u16, &'static str, &'static str, &'static str) {
        match self {
            K::Purchase => (200, "000000", "00", "22"),
            K::Void => (200, "200000", "00", "23"),
            K::Refund => (220, "200000", "00", "25"),
            K::PreAuth => (100, "030000", "06", "10"),
            K::Cancel => (100, "200000", "06", "11"),
            K::Completion => (200, "000000", "06", "20"),
            K::CompletionAdvice => (220, "000000", "06", "24"),
            K::CompletionVoid => (200, "200000", "06", "21"),
            K::Reversal => (400, "", "", ""),
            K::Settlement => (500, "", "00", "00"),
        }
    }

    /// The protocol's reversible transactions: a terminal sends a 0400 only for these.
    fn reversible(self) -> bool {
        matches!(
            self,
            K::Purchase | K::Void | K::PreAuth | K::Cancel | K::Completion | K::CompletionVoid
        )
    }
}

#[derive(Debug, Clone)]
enum Recipe {
    /// Purchase or pre-authorisation.
    New {
        kind: K,
        card: usize,
        amount: u64,
    },
    /// Void, completion void, refund, cancel, completion, completion advice.
    Related {
        kind: K,
        card: usize,
        amount: u64,
        of: Named,
    },
    Reversal {
        card: usize,
        processing_code: &'static str,
        condition: &'static str,
        type_code: &'static str,
        batch: u32,
        stan: u32,
        amount: u64,
        f61: Option<String>,
    },
    Settlement {
        totals: String,
    },
}

/// The fields of a request that the switch keys and digests.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    kind: K,
    mti: u16,
    processing_code: &'static str,
    condition: &'static str,
    type_code: &'static str,
    amount: u64,
    card: Option<usize>,
}

impl Recipe {
    fn head(&self) -> Head {
        match *self {
            Recipe::New { kind, card, amount }
            | Recipe::Related {
                kind, card, amount, ..
            } => {
                let (mti, processing_code, condition, type_code) = kind.head();
                Head {
                    kind,
                    mti,
                    processing_code,
                    condition,
                    type_code,
                    amount,
                    card: Some(card),
                }
            }
            Recipe::Reversal {
                card,
                processing_code,
                condition,
                type_code,
                amount,
                ..
            } => Head {
                kind: K::Reversal,
                mti: 400,
                processing_code,
                condition,
                type_code,
                amount,
                card: Some(card),
            },
            Recipe::Settlement { .. } => Head {
                kind: K::Settlement,
                mti: 500,
                processing_code: "",
                condition: "00",
                type_code: "00",
                amount: 0,
                card: None,
            },
        }
    }

    fn with_amount(&self, amount: u64) -> Recipe {
        let mut r = self.clone();
        match &mut r {
            Recipe::New { amount: a, .. }
            | Recipe::Related { amount: a, .. }
            | Recipe::Reversal { amount: a, .. } => *a = amount,
            Recipe::Settlement { .. } => {}
        }
        r
    }

    /// The request frame, with F60.2 = `t.batch` (a reversal: its original's batch).
    fn frame(&self, t: &Terminal, stan: u32) -> BytesMut {
        let built = match self {
            Recipe::New { kind, card, amount } => match kind {
                K::Purchase => t.purchase(stan, PANS[*card], EXPIRY, *amount),
                _ => t.preauth(stan, PANS[*card], EXPIRY, *amount),
            },
            Recipe::Related {
                kind,
                card,
                amount,
                of,
            } => {
                let (pan, o) = (PANS[*card], of.original());
                match kind {
                    K::Void => t.void(stan, pan, EXPIRY, *amount, &o),
                    K::CompletionVoid => t.completion_void(stan, pan, EXPIRY, *amount, &o),
                    K::Refund => t.refund(stan, pan, EXPIRY, *amount, &o),
                    K::Cancel => t.preauth_cancel(stan, pan, EXPIRY, *amount, &o),
                    K::Completion => t.completion(stan, pan, EXPIRY, *amount, &o),
                    _ => t.completion_advice(stan, pan, EXPIRY, *amount, &o),
                }
            }
            Recipe::Reversal {
                card,
                processing_code,
                condition,
                type_code,
                batch,
                stan,
                amount,
                f61,
            } => {
                let f60 = format!("{type_code}{batch:06}000");
                t.reversal(
                    &Reversed {
                        pan: PANS[*card],
                        processing_code,
                        amount: *amount,
                        stan: *stan,
                        condition,
                        f60: &f60,
                        f61: f61.as_deref(),
                    },
                    "98",
                )
            }
            Recipe::Settlement { totals } => t.settlement(stan, totals),
        };
        built.expect("the request fits the dialect")
    }
}

/// A request as sent: enough to resend it, reverse it, or name it later.
#[derive(Debug, Clone)]
struct Sent {
    recipe: Recipe,
    stan: u32,
    /// F60.2 as sent.
    batch: u32,
    frame: BytesMut,
    reply: Reply,
    /// The model's journal row it made, if any.
    row: Option<usize>,
    /// An R3 reversal of an original the switch never saw.
    ghost: bool,
}

impl Sent {
    fn kind(&self) -> K {
        self.recipe.head().kind
    }

    fn amount(&self) -> u64 {
        self.recipe.head().amount
    }

    fn card(&self) -> usize {
        self.recipe.head().card.unwrap_or(0)
    }

    fn rrn(&self) -> Option<&str> {
        self.reply.field(37)
    }

    fn named(&self) -> Named {
        Named {
            batch: self.batch,
            stan: self.stan,
            rrn: self.rrn().unwrap_or("").to_string(),
            auth: self.reply.field(38).unwrap_or("000000").to_string(),
            date: self.reply.field(13).unwrap_or("0101").to_string(),
        }
    }
}

/// One request about to be played.
#[derive(Debug)]
struct Plan {
    recipe: Recipe,
    stan: u32,
    /// F60.2.
    batch: u32,
    frame: BytesMut,
    /// A resend of an earlier request (not a new original to name later).
    resend: bool,
    ghost: bool,
}

// ---------------------------------------------------------------------------
// The model.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Approved,
    Declined,
    Voided,
    Reversed,
    PartiallyRefunded,
    Refunded,
    Completed,
    Cancelled,
}

impl St {
    fn as_str(self) -> &'static str {
        match self {
            St::Approved => "approved",
            St::Declined => "declined",
            St::Voided => "voided",
            St::Reversed => "reversed",
            St::PartiallyRefunded => "partially_refunded",
            St::Refunded => "refunded",
            St::Completed => "completed",
            St::Cancelled => "cancelled",
        }
    }
}

/// Merchant and terminal are fixed: batch, STAN, MTI class (D1, D2).
type Key = (u32, u32, u16);

/// What a repeat must match to be the same request (D1) rather than another (D2).
type Digest = (u16, &'static str, &'static str, u64, Option<usize>);

fn digest(h: &Head) -> Digest {
    (h.mti, h.processing_code, h.condition, h.amount, h.card)
}

/// A journal row as the model sees it.
#[derive(Debug, Clone)]
struct Row {
    key: Key,
    digest: Digest,
    kind: K,
    processing_code: &'static str,
    state: St,
    amount: u64,
    card: Option<usize>,
    refunded: u64,
    original: Option<usize>,
    rc: &'static str,
    /// From the switch's reply, once it came.
    rrn: String,
    auth: Option<String>,
    reply: Bytes,
}

/// What the model expects the switch to answer.
#[derive(Debug, Default)]
struct Expected {
    rc: &'static str,
    /// A new journal row, to be completed from the reply.
    row: Option<usize>,
    /// D1: the reply of this earlier row, byte for byte.
    replay: Option<usize>,
    /// S1: the settlement reply's F48.
    totals: Option<String>,
    /// An R2 reversal queued an advice that later requests may depend on.
    drain: bool,
    rule: &'static str,
}

/// The configurable rules a case runs with (the switch's config).
#[derive(Debug, Clone, Copy, Default)]
struct Rules {
    /// V6 `void_last_only`.
    void_last_only: bool,
    /// F5 `same_day_refund = "deny"`.
    deny_same_batch_refunds: bool,
    /// D1 `duplicates = "reject"`.
    reject_duplicates: bool,
}

impl Rules {
    fn apply(self, c: &mut Config) {
        no_cutover(c);
        c.rules.void_last_only = self.void_last_only;
        if self.deny_same_batch_refunds {
            c.rules.same_day_refund = switch::config::SameDayRefund::Deny;
        }
        if self.reject_duplicates {
            c.rules.duplicates = switch::config::DuplicatePolicy::Reject;
        }
    }
}

fn rules() -> impl Strategy<Value = Rules> {
    (
        prop::bool::weighted(0.25),
        prop::bool::weighted(0.25),
        prop::bool::weighted(0.15),
    )
        .prop_map(
            |(void_last_only, deny_same_batch_refunds, reject_duplicates)| Rules {
                void_last_only,
                deny_same_batch_refunds,
                reject_duplicates,
            },
        )
}

#[derive(Debug, Clone)]
struct Model {
    rules: Rules,
    rows: Vec<Row>,
    keys: HashMap<Key, usize>,
    /// The terminal's open batch at the switch.
    batch: u32,
    /// R3: reversals of originals never seen, by the original's key and F3.
    markers: Vec<(Key, &'static str)>,
}

impl Model {
    fn new(rules: Rules, batch: u32) -> Model {
        Model {
            rules,
            rows: Vec::new(),
            keys: HashMap::new(),
            batch,
            markers: Vec::new(),
        }
    }

    fn row(
        &mut self,
        key: Key,
        h: &Head,
        state: St,
        rc: &'static str,
        original: Option<usize>,
    ) -> usize {
        let id = self.rows.len();
        self.rows.push(Row {
            key,
            digest: digest(h),
            kind: h.kind,
            processing_code: h.processing_code,
            state,
            amount: h.amount,
            card: h.card,
            refunded: 0,
            original,
            rc,
            rrn: String::new(),
            auth: None,
            reply: Bytes::new(),
        });
        self.keys.insert(key, id);
        id
    }

    /// A journalled answer.
    fn answer(
        &mut self,
        key: Key,
        h: &Head,
        state: St,
        rc: &'static str,
        original: Option<usize>,
        rule: &'static str,
    ) -> Expected {
        Expected {
            rc,
            row: Some(self.row(key, h, state, rc, original)),
            rule,
            ..Expected::default()
        }
    }

    /// D1 / D2: the key is taken.
    fn duplicate(&self, key: Key, h: &Head) -> Option<Expected> {
        let &earlier = self.keys.get(&key)?;
        Some(
            if self.rows[earlier].digest == digest(h) && !self.rules.reject_duplicates {
                Expected {
                    rc: self.rows[earlier].rc,
                    replay: Some(earlier),
                    rule: "D1",
                    ..Expected::default()
                }
            } else {
                Expected {
                    rc: "94",
                    rule: "D2",
                    ..Expected::default()
                }
            },
        )
    }

    fn key(&self, h: &Head, stan: u32) -> Key {
        (self.batch, stan, h.mti / 100)
    }

    /// The original of a reversal (R1): this batch, its STAN, the MTI class
    /// its F60.1 implies, and its F3.
    fn reversal_original(&self, h: &Head, stan: u32) -> Option<usize> {
        let class = if matches!(h.type_code, "10" | "11") {
            1
        } else {
            2
        };
        self.keys
            .get(&(self.batch, stan, class))
            .copied()
            .filter(|&o| self.rows[o].processing_code == h.processing_code)
    }

    /// F1-F3: the refund's original, or the code refusing it.
    fn refund_original(
        &self,
        h: &Head,
        of: &Named,
    ) -> Result<usize, (&'static str, &'static str, Option<usize>)> {
        let Some(o) = self
            .rows
            .iter()
            .position(|r| r.rrn == of.rrn)
            .filter(|&o| self.rows[o].key.0 == of.batch && self.rows[o].key.1 == of.stan)
        else {
            return Err(("25", "F1", None));
        };
        let r = &self.rows[o];
        let refundable = matches!(r.kind, K::Purchase | K::Completion | K::CompletionAdvice)
            && matches!(r.state, St::Approved | St::PartiallyRefunded);
        if !refundable {
            return Err(("12", "F2", Some(o)));
        }
        if self.rules.deny_same_batch_refunds && r.key.0 == self.batch {
            return Err(("12", "F5", Some(o)));
        }
        if r.amount - r.refunded < h.amount {
            return Err(("61", "F3", Some(o)));
        }
        Ok(o)
    }

    /// A request that would hit a known switch bug (see the module `regressions`).
    fn known_bug(&self, p: &Plan) -> Option<&'static str> {
        let h = p.recipe.head();
        match (h.kind, &p.recipe) {
            (K::Reversal, _) => {
                if p.batch != self.batch {
                    return None;
                }
                let o = self.reversal_original(&h, p.stan)?;
                let r = &self.rows[o];
                if r.amount != h.amount || r.state != St::Approved {
                    return None;
                }
                if self.keys.contains_key(&(self.batch, p.stan, 4)) {
                    return Some("B1: a repeated reversal reverses before the duplicate check");
                }
                (!r.kind.reversible()).then_some("B2: a refund or completion advice is reversed")
            }
            (K::Refund, Recipe::Related { of, .. }) => {
                if p.batch != self.batch || self.keys.contains_key(&self.key(&h, p.stan)) {
                    return None;
                }
                let o = self.refund_original(&h, of).ok()?;
                (self.rows[o].kind == K::CompletionAdvice)
                    .then_some("B3: a refund of a completion advice never reaches the issuer")
            }
            (K::Purchase | K::PreAuth, _) => {
                let key = self.key(&h, p.stan);
                (p.batch == self.batch
                    && !self.keys.contains_key(&key)
                    && self.markers.contains(&(key, h.processing_code)))
                .then_some("B4: an original after its R3 reversal is not reversed")
            }
            _ => None,
        }
    }

    /// Decides a request as rules.md does, and records its effects.
    fn decide(&mut self, p: &Plan) -> Expected {
        let h = p.recipe.head();
        match h.kind {
            K::Settlement => self.settlement(p, &h),
            K::Reversal => self.reversal(p, &h),
            _ => {
                if p.batch != self.batch {
                    return Expected {
                        rc: "77",
                        rule: "batch",
                        ..Expected::default()
                    };
                }
                let key = self.key(&h, p.stan);
                if let Some(dup) = self.duplicate(key, &h) {
                    return dup;
                }
                match &p.recipe {
                    Recipe::New { .. } => {
                        // The issuer approves (amounts are within every card's
                        // limit and balance); an earlier R3 reversal of this
                        // original reverses it on arrival.
                        let reversed = self.markers.contains(&(key, h.processing_code));
                        let state = if reversed { St::Reversed } else { St::Approved };
                        self.answer(key, &h, state, "00", None, "issuer")
                    }
                    Recipe::Related { of, .. } => match h.kind {
                        K::Void | K::CompletionVoid => self.void(key, &h, of),
                        K::Refund => self.refund(key, &h, of),
                        _ => self.preauth_followup(key, &h, of),
                    },
                    _ => unreachable!("reversals and settlements are decided above"),
                }
            }
        }
    }

    /// V1-V5 (V6 is off).
    fn void(&mut self, key: Key, h: &Head, of: &Named) -> Expected {
        // By batch and STAN whatever the class: a pre-authorisation (0100)
        // found there is the wrong kind (V5), not missing.
        let found = [2, 1].into_iter().find_map(|class| {
            self.keys
                .get(&(of.batch, of.stan, class))
                .copied()
                .filter(|&o| self.rows[o].rrn == of.rrn)
        });
        let Some(o) = found else {
            return self.answer(key, h, St::Declined, "25", None, "V1");
        };
        let r = &self.rows[o];
        let expected = if h.kind == K::Void {
            K::Purchase
        } else {
            K::Completion
        };
        let refused = if r.key.0 != self.batch {
            Some(("12", "V2"))
        } else if r.amount != h.amount {
            Some(("64", "V3"))
        } else if r.card != h.card {
            Some(("14", "V4"))
        } else if r.kind != expected || r.state != St::Approved {
            Some(("12", "V5"))
        } else if self.rules.void_last_only && !self.last_approved(o) {
            Some(("12", "V6"))
        } else {
            None
        };
        if let Some((rc, rule)) = refused {
            return self.answer(key, h, St::Declined, rc, Some(o), rule);
        }
        self.rows[o].state = St::Voided;
        self.answer(key, h, St::Approved, "00", Some(o), "V1-V6")
    }

    /// V6: no later approved transaction in the original's batch.
    fn last_approved(&self, o: usize) -> bool {
        !self.rows[o + 1..].iter().any(|r| {
            r.key.0 == self.rows[o].key.0
                && r.state == St::Approved
                && matches!(
                    r.kind,
                    K::Purchase
                        | K::Completion
                        | K::CompletionAdvice
                        | K::PreAuth
                        | K::Cancel
                        | K::Void
                        | K::CompletionVoid
                        | K::Refund
                )
        })
    }

    /// F1-F6.
    fn refund(&mut self, key: Key, h: &Head, of: &Named) -> Expected {
        match self.refund_original(h, of) {
            Err((rc, rule, o)) => self.answer(key, h, St::Declined, rc, o, rule),
            Ok(o) => {
                let r = &mut self.rows[o];
                r.refunded += h.amount;
                r.state = if r.refunded == r.amount {
                    St::Refunded
                } else {
                    St::PartiallyRefunded
                };
                self.answer(key, h, St::Approved, "00", Some(o), "F1-F6")
            }
        }
    }

    /// P1-P3.
    fn preauth_followup(&mut self, key: Key, h: &Head, of: &Named) -> Expected {
        let found = self.rows.iter().rposition(|r| {
            r.kind == K::PreAuth && r.auth.as_deref() == Some(&of.auth) && r.card == h.card
        });
        let Some(o) = found else {
            return self.answer(key, h, St::Declined, "25", None, "P1");
        };
        let r = &self.rows[o];
        let amount_ok = match h.kind {
            K::Cancel => h.amount == r.amount,
            // At most 15% above the pre-authorisation.
            _ => h.amount * 100 <= r.amount * 115,
        };
        if !amount_ok {
            return self.answer(key, h, St::Declined, "64", Some(o), "P3");
        }
        if r.state != St::Approved {
            return self.answer(key, h, St::Declined, "12", Some(o), "P3");
        }
        self.rows[o].state = if h.kind == K::Cancel {
            St::Cancelled
        } else {
            St::Completed
        };
        self.answer(key, h, St::Approved, "00", Some(o), "P1-P3")
    }

    /// R1-R5.
    fn reversal(&mut self, p: &Plan, h: &Head) -> Expected {
        // Keyed by the batch it names, settled or not (D1).
        let key = (p.batch, p.stan, 4);
        if let Some(dup) = self.duplicate(key, h) {
            return dup;
        }
        if p.batch != self.batch {
            // S1: a settled batch takes no reversal.
            return self.answer(key, h, St::Declined, "12", None, "S1");
        }
        let class = if matches!(h.type_code, "10" | "11") {
            1
        } else {
            2
        };
        let Some(o) = self.reversal_original(h, p.stan) else {
            // R3: nothing to reverse; should the original turn up, it is reversed.
            self.markers
                .push(((self.batch, p.stan, class), h.processing_code));
            return self.answer(key, h, St::Approved, "00", None, "R3");
        };
        let r = &self.rows[o];
        if !r.kind.reversible() {
            // Refunds and advices are not reversible: for a reversal there is
            // no original, so nothing to reverse and no amount to compare.
            return self.answer(key, h, St::Approved, "00", None, "R3");
        }
        if r.amount != h.amount {
            return self.answer(key, h, St::Declined, "64", Some(o), "R4");
        }
        match r.state {
            St::Approved => {
                self.rows[o].state = St::Reversed;
                // What it had claimed stands again.
                if let Some(parent) = self.rows[o].original {
                    let claimed = match self.rows[o].kind {
                        K::Void | K::CompletionVoid => St::Voided,
                        K::Cancel => St::Cancelled,
                        K::Completion => St::Completed,
                        _ => St::Approved,
                    };
                    if self.rows[parent].state == claimed {
                        self.rows[parent].state = St::Approved;
                    }
                }
                Expected {
                    drain: true,
                    ..self.answer(key, h, St::Approved, "00", Some(o), "R2")
                }
            }
            St::Declined | St::Reversed => self.answer(key, h, St::Approved, "00", Some(o), "R3"),
            // Voided, refunded, completed or cancelled since (rules.md is
            // silent; the switch refuses).
            _ => self.answer(key, h, St::Declined, "12", Some(o), "R2"),
        }
    }

    /// S1.
    fn settlement(&mut self, p: &Plan, h: &Head) -> Expected {
        let key = (p.batch, p.stan, 5);
        if let Some(dup) = self.duplicate(key, h) {
            return dup;
        }
        if p.batch != self.batch {
            return self.answer(key, h, St::Declined, "77", None, "S1");
        }
        let Recipe::Settlement { totals: given } = &p.recipe else {
            unreachable!("a settlement")
        };
        let ours = self.totals(self.batch);
        // Each part its own code: 1 with the terminal's figures, 2 with ours.
        let part = |r: std::ops::Range<usize>| {
            if given[r.clone()] == ours[r.clone()] {
                format!("{}1", &given[r])
            } else {
                format!("{}2", &ours[r])
            }
        };
        let totals = format!("{}{}", part(0..30), part(31..61));
        self.batch += 1;
        Expected {
            totals: Some(totals),
            ..self.answer(key, h, St::Approved, "00", None, "S1")
        }
    }

    /// The batch's F48 totals: debits are approved purchases and
    /// completions (voided or refunded since or not), credits approved
    /// voids, completion voids and refunds; reversed entries in neither.
    fn totals(&self, batch: u32) -> String {
        let (mut debit, mut debits, mut credit, mut credits) = (0, 0, 0, 0);
        for r in self.rows.iter().filter(|r| r.key.0 == batch) {
            let is_debit = matches!(r.kind, K::Purchase | K::Completion | K::CompletionAdvice)
                && matches!(
                    r.state,
                    St::Approved | St::Voided | St::PartiallyRefunded | St::Refunded
                );
            let is_credit = matches!(r.kind, K::Void | K::CompletionVoid | K::Refund)
                && r.state == St::Approved;
            if is_debit {
                debit += r.amount;
                debits += 1;
            }
            if is_credit {
                credit += r.amount;
                credits += 1;
            }
        }
        format!("{debit:012}{debits:03}{credit:012}{credits:03}0{NO_FOREIGN}")
    }

    /// Per card: the balance's change and the open holds.
    fn money(&self) -> [(i64, i64); PANS.len()] {
        let mut money = [(0i64, 0i64); PANS.len()];
        for r in &self.rows {
            let amount = r.amount as i64;
            // A credit goes to the card of what it undoes.
            let card = match r.kind {
                K::Void | K::CompletionVoid | K::Refund => {
                    r.original.and_then(|o| self.rows[o].card)
                }
                _ => r.card,
            };
            let Some(card) = card else { continue };
            match (r.kind, r.state) {
                (
                    K::Purchase | K::Completion | K::CompletionAdvice,
                    St::Approved | St::Voided | St::PartiallyRefunded | St::Refunded,
                ) => money[card].0 -= amount,
                (K::Void | K::CompletionVoid | K::Refund, St::Approved) => money[card].0 += amount,
                (K::PreAuth, St::Approved) => money[card].1 += amount,
                _ => {}
            }
        }
        money
    }
}

// ---------------------------------------------------------------------------
// Playing a sequence.

/// Picks an earlier request: of the kinds `natural`, or when not asked, of `any`.
fn pick(
    sent: &[Sent],
    t: Target,
    natural: impl Fn(&Sent) -> bool,
    any: impl Fn(&Sent) -> bool,
) -> Option<&Sent> {
    let pool: Vec<&Sent> = if t.natural {
        sent.iter().filter(|s| natural(s)).collect()
    } else {
        sent.iter().filter(|s| any(s)).collect()
    };
    (!pool.is_empty()).then(|| pool[t.index.index(pool.len())])
}

fn other_card(card: usize, pick: CardPick) -> usize {
    match pick {
        CardPick::Same => card,
        CardPick::Other(k) => (card + 1 + k % (PANS.len() - 1)) % PANS.len(),
    }
}

/// The amount of a related request, relative to its original's.
fn relative(kind: K, pick: AmountPick, original: u64, refunded: u64) -> u64 {
    let left = original.saturating_sub(refunded).max(1);
    match (kind, pick) {
        (_, AmountPick::Full) => original,
        (_, AmountPick::Part(p)) => (original * u64::from(p) / 1000).max(1),
        (K::Refund, AmountPick::Remainder) => left,
        (_, AmountPick::Remainder) => original * 115 / 100,
        (K::Refund, AmountPick::Over(p)) => left + 1 + original * u64::from(p) / 1000,
        (_, AmountPick::Over(p)) => original + 1 + original * u64::from(p) / 1000,
    }
}

fn fresh(recipe: Recipe, t: &mut Terminal) -> Plan {
    let stan = t.next_stan();
    Plan {
        frame: recipe.frame(t, stan),
        recipe,
        stan,
        batch: t.batch,
        resend: false,
        ghost: false,
    }
}

/// Turns a drawn operation into a request, or `None` when there is nothing
/// it can refer to yet.
fn plan(op: &Op, t: &mut Terminal, sent: &[Sent], m: &Model) -> Option<Plan> {
    let has_rrn = |s: &Sent| s.rrn().is_some() && !s.ghost;
    let financial = |s: &Sent| matches!(s.recipe, Recipe::New { .. } | Recipe::Related { .. });
    let related = |kind: K,
                   of: Target,
                   card: CardPick,
                   amount: AmountPick,
                   natural: &dyn Fn(&Sent) -> bool| {
        let o = if matches!(kind, K::Void | K::CompletionVoid | K::Refund) {
            pick(sent, of, |s| has_rrn(s) && natural(s), has_rrn)?
        } else {
            pick(sent, of, |s| natural(s), |_| true)?
        };
        let refunded = o.row.map_or(0, |r| m.rows[r].refunded);
        Some((
            o.named(),
            other_card(o.card(), card),
            relative(kind, amount, o.amount().max(1), refunded),
        ))
    };
    let recipe = match *op {
        Op::Purchase { card, amount } => Recipe::New {
            kind: K::Purchase,
            card,
            amount,
        },
        Op::PreAuth { card, amount } => Recipe::New {
            kind: K::PreAuth,
            card,
            amount,
        },
        Op::Void {
            of,
            card,
            amount,
            wrong_rrn,
        } => {
            let (mut named, card, amount) =
                related(K::Void, of, card, amount, &|s| s.kind() == K::Purchase)?;
            if let Some(i) = wrong_rrn {
                let others: Vec<&Sent> = sent.iter().filter(|s| has_rrn(s)).collect();
                named.rrn = others[i.index(others.len())].rrn()?.to_string();
            }
            Recipe::Related {
                kind: K::Void,
                card,
                amount,
                of: named,
            }
        }
        Op::CompletionVoid { of, card, amount }
        | Op::Refund { of, card, amount }
        | Op::Cancel { of, card, amount }
        | Op::Completion { of, card, amount }
        | Op::CompletionAdvice { of, card, amount } => {
            let (kind, natural): (K, &dyn Fn(&Sent) -> bool) = match op {
                Op::CompletionVoid { .. } => (K::CompletionVoid, &|s| s.kind() == K::Completion),
                Op::Refund { .. } => (K::Refund, &|s| {
                    matches!(s.kind(), K::Purchase | K::Completion | K::CompletionAdvice)
                }),
                Op::Cancel { .. } => (K::Cancel, &|s| s.kind() == K::PreAuth),
                Op::Completion { .. } => (K::Completion, &|s| s.kind() == K::PreAuth),
                _ => (K::CompletionAdvice, &|s| s.kind() == K::PreAuth),
            };
            let (named, card, amount) = related(kind, of, card, amount, natural)?;
            Recipe::Related {
                kind,
                card,
                amount,
                of: named,
            }
        }
        Op::Reversal { of, wrong_amount } => {
            let o = pick(sent, of, |s| s.kind().reversible(), financial)?;
            let h = o.recipe.head();
            let f61 = match &o.recipe {
                Recipe::Related {
                    kind: K::Void | K::CompletionVoid,
                    of,
                    ..
                } => Some(format!("{:06}{:06}", of.batch, of.stan)),
                _ => None,
            };
            let recipe = Recipe::Reversal {
                card: o.card(),
                processing_code: h.processing_code,
                condition: h.condition,
                type_code: h.type_code,
                batch: o.batch,
                stan: o.stan,
                amount: h.amount + u64::from(wrong_amount),
                f61,
            };
            return Some(Plan {
                frame: recipe.frame(t, o.stan),
                recipe,
                stan: o.stan,
                batch: o.batch,
                resend: false,
                ghost: false,
            });
        }
        Op::ReversalOfUnknown {
            card,
            amount,
            preauth,
        } => {
            let stan = t.next_stan();
            let kind = if preauth { K::PreAuth } else { K::Purchase };
            let (_, processing_code, condition, type_code) = kind.head();
            let recipe = Recipe::Reversal {
                card,
                processing_code,
                condition,
                type_code,
                batch: t.batch,
                stan,
                amount,
                f61: None,
            };
            return Some(Plan {
                frame: recipe.frame(t, stan),
                recipe,
                stan,
                batch: t.batch,
                resend: false,
                ghost: true,
            });
        }
        Op::LateOriginal { of } => {
            let ghosts: Vec<&Sent> = sent.iter().filter(|s| s.ghost).collect();
            let g = *ghosts.get(of.index(ghosts.len().max(1)))?;
            let Recipe::Reversal {
                card,
                processing_code,
                amount,
                ..
            } = g.recipe
            else {
                return None;
            };
            let kind = if processing_code == "030000" {
                K::PreAuth
            } else {
                K::Purchase
            };
            let recipe = Recipe::New { kind, card, amount };
            return Some(Plan {
                frame: recipe.frame(t, g.stan),
                recipe,
                stan: g.stan,
                batch: t.batch,
                resend: false,
                ghost: false,
            });
        }
        Op::Resend { of, altered } => {
            let o = sent.get(of.index(sent.len().max(1)))?;
            let (recipe, frame) = match (&o.recipe, altered) {
                (Recipe::Settlement { .. }, _) | (_, false) => (o.recipe.clone(), o.frame.clone()),
                (r, true) => {
                    let recipe = r.with_amount(o.amount() + 1);
                    let open = std::mem::replace(&mut t.batch, o.batch);
                    let frame = recipe.frame(t, o.stan);
                    t.batch = open;
                    (recipe, frame)
                }
            };
            return Some(Plan {
                recipe,
                stan: o.stan,
                batch: o.batch,
                frame,
                resend: true,
                ghost: false,
            });
        }
        Op::Settlement { balanced, .. } => {
            let mut totals = m.totals(t.batch);
            if !balanced {
                // One fen more in the debits.
                let debit: u64 = totals[..12].parse().expect("digits");
                totals.replace_range(..12, &format!("{:012}", debit + 1));
            }
            Recipe::Settlement { totals }
        }
        Op::SignOn => return None,
    };
    Some(fresh(recipe, t))
}

/// Waits (with a deadline, no fixed sleep) until every stored advice is answered.
async fn drained(pool: &PgPool) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let done: bool =
            sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM advices WHERE state = 'pending')")
                .fetch_one(pool)
                .await
                .map_err(|e| e.to_string())?;
        if done {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err("the advice queue did not drain in 15 s".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Opening balances minus the journal's approved debits plus its approved credits.
const JOURNAL_NET: &str = "SELECT coalesce(sum(CASE WHEN kind IN ('purchase', 'completion', 'completion_advice') THEN -amount ELSE amount END), 0)::bigint
     FROM journal
     WHERE (kind IN ('purchase', 'completion', 'completion_advice') AND state IN ('approved', 'voided', 'partially_refunded', 'refunded'))
        OR (kind IN ('void', 'completion_void', 'refund') AND state = 'approved')";

/// Business day = calendar day, whatever the hour the test runs at: the
/// default cut-over (23:00) would put F13 (the local date the terminal names
/// its originals by) a day behind the business day for an hour (bug B5).
fn no_cutover(c: &mut Config) {
    c.rules.cutover =
        chrono::NaiveTime::from_hms_nano_opt(23, 59, 59, 999_999_999).expect("a time");
}

/// The money of a finished run: issuer, journal and model agree.
async fn check_money(w: &World, m: &Model) -> Result<(), String> {
    let fail = |what: &str, e: sqlx::Error| format!("{what}: {e}");
    let net: i64 = sqlx::query_scalar(JOURNAL_NET)
        .fetch_one(&w.pool)
        .await
        .map_err(|e| fail("journal net", e))?;
    let totals = issuer_sim::balances(&w.issuer_pool)
        .await
        .map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    if !totals.consistent() {
        problems.push(format!("the issuer's books are inconsistent: {totals:?}"));
    }
    if totals.balance - totals.opening != net {
        problems.push(format!(
            "money invariant: issuer moved {} fen, the journal {net}",
            totals.balance - totals.opening
        ));
    }
    let money = m.money();
    let model_net: i64 = money.iter().map(|(b, _)| b).sum();
    if model_net != net {
        problems.push(format!(
            "the model moved {model_net} fen, the journal {net}"
        ));
    }
    for (card, (delta, held)) in money.iter().enumerate() {
        let pan = iso8583::Pan::new(PANS[card]).expect("a PAN");
        let b = issuer_sim::balance(&w.issuer_pool, &w.issuer_key, &pan)
            .await
            .map_err(|e| e.to_string())?
            .expect("a seeded card");
        if (b.balance - b.opening, b.held) != (*delta, *held) {
            problems.push(format!(
                "card {card}: issuer balance change {} held {}, model {delta} held {held}",
                b.balance - b.opening,
                b.held
            ));
        }
    }
    // Every journal row, in the state the model has it in.
    let journal: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT rrn, kind, state, refunded_amount FROM journal WHERE terminal_id = $1 ORDER BY id",
    )
    .bind(TERMINAL)
    .fetch_all(&w.pool)
    .await
    .map_err(|e| fail("journal", e))?;
    let model: Vec<(String, String, String, i64)> = m
        .rows
        .iter()
        .map(|r| {
            (
                r.rrn.clone(),
                r.kind.as_str().to_string(),
                r.state.as_str().to_string(),
                r.refunded as i64,
            )
        })
        .collect();
    if journal != model {
        let diff: Vec<String> = journal
            .iter()
            .zip(&model)
            .filter(|(j, m)| j != m)
            .map(|(j, m)| format!("journal {j:?} model {m:?}"))
            .collect();
        problems.push(format!(
            "journal rows differ from the model's ({} vs {} rows): {diff:?}",
            journal.len(),
            model.len()
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

/// Plays `ops` against a fresh world and the model; the first disagreement is the error.
async fn play(rules: Rules, ops: &[Op], play_bugs: &KnownBugs) -> Result<(), String> {
    let mut w = world_with(|c| rules.apply(c)).await;
    let mut t = w.signed_on(TERMINAL).await;
    let mut m = Model::new(rules, t.batch);
    let mut sent: Vec<Sent> = Vec::new();
    let mut log: Vec<String> = Vec::new();
    let failed = |log: &[String], what: String| format!("{}\n=> {what}", log.join("\n"));
    for (i, op) in ops.iter().enumerate() {
        if let Op::SignOn = op {
            let reply = t.sign_on().await.map_err(|e| e.to_string())?;
            log.push(format!("{i:2} sign-on -> {} batch {}", reply.rc(), t.batch));
            if t.batch != m.batch {
                return Err(failed(
                    &log,
                    format!("signed on to batch {}, the model's is {}", t.batch, m.batch),
                ));
            }
            continue;
        }
        let Some(p) = plan(op, &mut t, &sent, &m) else {
            log.push(format!("{i:2} {op:?}: nothing to refer to"));
            continue;
        };
        if let Some(bug) = m.known_bug(&p).filter(|bug| !play_bugs.plays(bug)) {
            log.push(format!("{i:2} {op:?}: skipped, {bug}"));
            tally(&format!("skipped {}", &bug[..2]));
            continue;
        }
        let expected = m.decide(&p);
        tally(&format!(
            "{:?} {} {}",
            p.recipe.head().kind,
            expected.rule,
            expected.rc
        ));
        let reply = t
            .exchange(&p.frame)
            .await
            .map_err(|e| failed(&log, e.to_string()))?;
        log.push(format!(
            "{i:2} {:?} stan {} batch {} -> {} (model {} by {})",
            p.recipe,
            p.stan,
            p.batch,
            reply.rc(),
            expected.rc,
            expected.rule
        ));
        if reply.rc() != expected.rc {
            return Err(failed(
                &log,
                format!(
                    "response code {}, the model says {} ({})",
                    reply.rc(),
                    expected.rc,
                    expected.rule
                ),
            ));
        }
        if let Some(totals) = &expected.totals {
            if reply.field(48) != Some(totals.as_str()) {
                return Err(failed(
                    &log,
                    format!(
                        "settlement F48 {:?}, the model says {totals}",
                        reply.field(48)
                    ),
                ));
            }
        }
        if let Some(earlier) = expected.replay {
            if reply.body != m.rows[earlier].reply {
                return Err(failed(
                    &log,
                    "a repeat's reply is not the stored one byte for byte".into(),
                ));
            }
        }
        let row = expected.row;
        if let Some(r) = row {
            let row = &mut m.rows[r];
            row.rrn = reply.field(37).unwrap_or("").to_string();
            row.auth = reply.field(38).map(str::to_string);
            row.reply = reply.body.clone();
        }
        if expected.drain {
            // Later requests about the same original must not overtake the
            // reversal's advice (bug B6): let it reach the issuer first.
            drained(&w.pool).await.map_err(|e| failed(&log, e))?;
        }
        if !p.resend {
            sent.push(Sent {
                recipe: p.recipe,
                stan: p.stan,
                batch: p.batch,
                frame: p.frame,
                reply,
                row,
                ghost: p.ghost,
            });
        }
        if let Op::Settlement { sign_on: true, .. } = op {
            t.sign_on().await.map_err(|e| e.to_string())?;
            if t.batch != m.batch {
                return Err(failed(
                    &log,
                    format!("signed on to batch {}, the model's is {}", t.batch, m.batch),
                ));
            }
        }
    }
    drained(&w.pool).await.map_err(|e| failed(&log, e))?;
    check_money(&w, &m).await.map_err(|e| failed(&log, e))?;
    if std::env::var("MODEL_LOG").is_ok() {
        eprintln!("{rules:?}\n{}\n", log.join("\n"));
    }
    w.shutdown.cancel();
    if let Some(run) = w.run.take() {
        let _ = run.await;
    }
    Ok(())
}

/// Which known bugs a run plays rather than skips: `MODEL_KNOWN_BUGS` unset
/// or `all` plays them all (they are fixed), `none` skips them, `B2,B4`
/// plays those.
#[derive(Debug)]
struct KnownBugs(Vec<String>);

impl KnownBugs {
    fn from_env() -> KnownBugs {
        KnownBugs(
            std::env::var("MODEL_KNOWN_BUGS")
                .unwrap_or_else(|_| "all".into())
                .split(',')
                .map(|b| b.trim().to_uppercase())
                .filter(|b| !b.is_empty())
                .collect(),
        )
    }

    fn plays(&self, bug: &str) -> bool {
        self.0
            .iter()
            .any(|b| b == "ALL" || bug.starts_with(b.as_str()))
    }
}

/// How often each rule decided, over every case (printed with `--nocapture`).
static TALLY: std::sync::Mutex<std::collections::BTreeMap<String, usize>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn tally(what: &str) {
    *TALLY.lock().unwrap().entry(what.to_string()).or_default() += 1;
}

fn env(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn the_switch_answers_as_the_rules_do_and_the_money_agrees() {
    let config = ProptestConfig {
        cases: env("PROPTEST_CASES", 12),
        max_shrink_iters: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let play_bugs = KnownBugs::from_env();
    let most = env("MODEL_OPS", 30).max(1) as usize;
    let cases = (
        rules(),
        prop::collection::vec(op(), (most / 4).max(1)..=most),
    );
    let mut runner = TestRunner::new(config);
    let result = runner.run(&cases, |(rules, ops)| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(play(rules, &ops, &play_bugs))
            .map_err(TestCaseError::fail)
    });
    eprintln!("{:#?}", TALLY.lock().unwrap());
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, (rules, ops))) => {
            panic!("minimal failing sequence, with {rules:?}: {ops:#?}\n{why}")
        }
        Err(e) => panic!("{e}"),
    }
}

/// One deterministic test per bug the model found; each fails until the
/// switch is fixed.
mod regressions {
    use super::*;

    async fn purchase(t: &mut Terminal, card: usize, amount: u64) -> Sent {
        send(
            t,
            Recipe::New {
                kind: K::Purchase,
                card,
                amount,
            },
        )
        .await
    }

    async fn send(t: &mut Terminal, recipe: Recipe) -> Sent {
        let p = fresh(recipe, t);
        let reply = t.exchange(&p.frame).await.unwrap();
        Sent {
            recipe: p.recipe,
            stan: p.stan,
            batch: p.batch,
            frame: p.frame,
            reply,
            row: None,
            ghost: false,
        }
    }

    fn related(kind: K, of: &Sent, amount: u64) -> Recipe {
        Recipe::Related {
            kind,
            card: of.card(),
            amount,
            of: of.named(),
        }
    }

    /// The 0400 of `of`, as the terminal sends it.
    fn reversal_of(t: &Terminal, of: &Sent, amount: u64) -> BytesMut {
        let h = of.recipe.head();
        let f61 = match &of.recipe {
            Recipe::Related { of, .. } => Some(format!("{:06}{:06}", of.batch, of.stan)),
            _ => None,
        };
        Recipe::Reversal {
            card: of.card(),
            processing_code: h.processing_code,
            condition: h.condition,
            type_code: h.type_code,
            batch: of.batch,
            stan: of.stan,
            amount,
            f61,
        }
        .frame(t, of.stan)
    }

    async fn state(w: &World, s: &Sent) -> String {
        w.journal_state(s.rrn().unwrap()).await
    }

    async fn journal_net(w: &World) -> i64 {
        sqlx::query_scalar(JOURNAL_NET)
            .fetch_one(&w.pool)
            .await
            .unwrap()
    }

    async fn issuer_net(w: &World) -> i64 {
        let totals = issuer_sim::balances(&w.issuer_pool).await.unwrap();
        totals.balance - totals.opening
    }

    /// B1 (D2): a reversal resent with another amount must be answered 94
    /// and change nothing; the switch reverses the sale first, then answers 94.
    #[tokio::test]
    async fn b1_a_second_reversal_with_another_amount_reverses_nothing() {
        let w = world_with(no_cutover).await;
        let mut t = w.signed_on(TERMINAL).await;
        let sale = purchase(&mut t, 0, 1_000).await;
        assert_eq!(sale.reply.rc(), "00");
        let wrong = t.exchange(&reversal_of(&t, &sale, 999)).await.unwrap();
        assert_eq!(wrong.rc(), "64", "R4");
        let again = t.exchange(&reversal_of(&t, &sale, 1_000)).await.unwrap();
        assert_eq!(again.rc(), "94", "D2: same key, other content");
        assert_eq!(
            state(&w, &sale).await,
            "approved",
            "a request answered 94 must not have reversed the sale"
        );
    }

    /// B1 (D1): a reversal resent byte for byte must get its stored reply
    /// and change nothing; the switch replays the stored 12 but reverses the
    /// sale, which a reversal of its void had made approved again.
    #[tokio::test]
    async fn b1_a_repeated_reversal_replays_its_reply_and_reverses_nothing() {
        let w = world_with(no_cutover).await;
        let mut t = w.signed_on(TERMINAL).await;
        let sale = purchase(&mut t, 0, 1_000).await;
        let void = send(&mut t, related(K::Void, &sale, 1_000)).await;
        assert_eq!(void.reply.rc(), "00");
        let of_sale = reversal_of(&t, &sale, 1_000);
        let first = t.exchange(&of_sale).await.unwrap();
        assert_eq!(first.rc(), "12", "the sale is voided: not reversed");
        let of_void = t.exchange(&reversal_of(&t, &void, 1_000)).await.unwrap();
        assert_eq!(of_void.rc(), "00");
        assert_eq!(
            state(&w, &sale).await,
            "approved",
            "R2: the sale stands again"
        );
        let repeat = t.exchange(&of_sale).await.unwrap();
        assert_eq!(repeat.body, first.body, "D1: the stored reply");
        assert_eq!(
            state(&w, &sale).await,
            "approved",
            "the terminal heard 12 (not reversed), so the sale must stand"
        );
    }

    /// B2: refunds and completion advices are not reversible
    /// (terminal-cup.md); the switch reverses a refund in its journal, but
    /// its reversal advice names no posting the issuer knows, so the
    /// issuer keeps the refund and the books disagree.
    #[tokio::test]
    async fn b2_a_refund_is_not_reversible() {
        let w = world_with(no_cutover).await;
        let mut t = w.signed_on(TERMINAL).await;
        let sale = purchase(&mut t, 0, 1_000).await;
        let refund = send(&mut t, related(K::Refund, &sale, 300)).await;
        assert_eq!(refund.reply.rc(), "00");
        t.exchange(&reversal_of(&t, &refund, 300)).await.unwrap();
        drained(&w.pool).await.unwrap();
        assert_eq!(state(&w, &refund).await, "approved", "the refund stands");
        assert_eq!(
            issuer_net(&w).await,
            journal_net(&w).await,
            "the money invariant"
        );
    }

    /// B2, the completion advice: the switch marks it reversed (the
    /// pre-authorisation stays completed); the issuer keeps it posted.
    #[tokio::test]
    async fn b2_a_completion_advice_is_not_reversible() {
        let w = world_with(no_cutover).await;
        let mut t = w.signed_on(TERMINAL).await;
        let pa = send(
            &mut t,
            Recipe::New {
                kind: K::PreAuth,
                card: 0,
                amount: 5_000,
            },
        )
        .await;
        assert_eq!(pa.reply.rc(), "00");
        let advice = send(&mut t, related(K::CompletionAdvice, &pa, 4_000)).await;
        assert_eq!(advice.reply.rc(), "00");
        t.exchange(&reversal_of(&t, &advice, 4_000)).await.unwrap();
        drained(&w.pool).await.unwrap();
        assert_eq!(state(&w, &advice).await, "approved", "the advice stands");
        assert_eq!(
            issuer_net(&w).await,
            journal_net(&w).await,
            "the money invariant"
        );
    }

    /// B3: a refund of a completion advice is approved and journalled, but
    /// its 0220 names the advice by a link STAN and F7 it never had (the
    /// advice went to the issuer under its own queue key), so the issuer
    /// answers 25 and never credits the card.
    #[tokio::test]
    async fn b3_a_refund_of_a_completion_advice_reaches_the_issuer() {
        let w = world_with(no_cutover).await;
        let mut t = w.signed_on(TERMINAL).await;
        let pa = send(
            &mut t,
            Recipe::New {
                kind: K::PreAuth,
                card: 0,
                amount: 8_000,
            },
        )
        .await;
        let advice = send(&mut t, related(K::CompletionAdvice, &pa, 7_000)).await;
        assert_eq!(advice.reply.rc(), "00");
        let refund = send(&mut t, related(K::Refund, &advice, 1_000)).await;
        assert_eq!(refund.reply.rc(), "00", "F1-F6");
        drained(&w.pool).await.unwrap();
        let rc: String = sqlx::query_scalar(
            "SELECT a.response_code FROM advices a JOIN journal j ON j.id = a.journal_id WHERE j.rrn = $1",
        )
        .bind(refund.rrn().unwrap())
        .fetch_one(&w.pool)
        .await
        .unwrap();
        assert_eq!(rc, "00", "the issuer accepts the refund advice");
        assert_eq!(
            issuer_net(&w).await,
            journal_net(&w).await,
            "the money invariant"
        );
    }

    /// B4 (R3): a reversal of an original the switch has not seen records a
    /// marker "so an original that turns up later is reversed as soon as
    /// its approval arrives"; the switch approves and keeps the late original.
    #[tokio::test]
    async fn b4_an_original_arriving_after_its_reversal_is_reversed() {
        let w = world_with(no_cutover).await;
        let mut t = w.signed_on(TERMINAL).await;
        let pan = PANS[0];
        let before = w.balance(pan).await;
        let stan = t.next_stan();
        let ghost = Recipe::Reversal {
            card: 0,
            processing_code: "000000",
            condition: "00",
            type_code: "22",
            batch: t.batch,
            stan,
            amount: 1_500,
            f61: None,
        };
        let r = t.exchange(&ghost.frame(&t, stan)).await.unwrap();
        assert_eq!(r.rc(), "00", "R3");
        // The purchase it reversed arrives only now (it was delayed on the way).
        let late = t
            .exchange(&t.purchase(stan, pan, EXPIRY, 1_500).unwrap())
            .await
            .unwrap();
        drained(&w.pool).await.unwrap();
        // Reversed on arrival (or, as good, never approved).
        let state = w.journal_state(late.field(37).unwrap()).await;
        assert!(
            state == "reversed" || state == "declined",
            "R3: the late original must not stand, it is {state} ({})",
            late.rc()
        );
        assert_eq!(w.balance(pan).await, before, "the card is not debited");
    }

    /// B5: after the cut-over hour the business day is tomorrow, but a
    /// reply's F13 (which the terminal sends back as F61.3, the original's
    /// date) is today's local date: refunds and pre-authorisation
    /// follow-ups no longer find their original (25). With the default
    /// 23:00 this happens every day from 23:00 to midnight.
    #[tokio::test]
    async fn b5_originals_are_found_by_the_date_in_their_reply_after_the_cutover() {
        // A zone and cut-over that put "now" after the cut-over, whatever the hour.
        let zone = if chrono::Timelike::hour(&chrono::Utc::now()) >= 1 {
            chrono_tz::UTC
        } else {
            chrono_tz::Etc::GMTMinus2
        };
        let w = world_with(|c| {
            c.rules.time_zone = zone;
            c.rules.cutover = chrono::NaiveTime::from_hms_opt(0, 30, 0).unwrap();
        })
        .await;
        let mut t = w.signed_on(TERMINAL).await;
        let sale = purchase(&mut t, 0, 1_000).await;
        assert_eq!(sale.reply.rc(), "00");
        let pa = send(
            &mut t,
            Recipe::New {
                kind: K::PreAuth,
                card: 1,
                amount: 2_000,
            },
        )
        .await;
        assert_eq!(pa.reply.rc(), "00");
        let refund = send(&mut t, related(K::Refund, &sale, 100)).await;
        let cancel = send(&mut t, related(K::Cancel, &pa, 2_000)).await;
        assert_eq!(
            (refund.reply.rc(), cancel.reply.rc()),
            ("00", "00"),
            "F61.3 = the original's F13 (local date {}), business day {:?}",
            sale.reply.field(13).unwrap(),
            sale.reply.field(15)
        );
    }

    /// An issuer that can be stopped and started again on the same address.
    struct Restartable {
        w: World,
        addr: String,
        issuer: Arc<issuer_sim::Issuer>,
        stop: CancellationToken,
        served: tokio::task::JoinHandle<()>,
    }

    impl Restartable {
        async fn start() -> Restartable {
            Restartable::start_with(|_| {}).await
        }

        async fn start_with(tweak: impl FnOnce(&mut Config)) -> Restartable {
            let url = embedded_pg::test_database().await;
            let config = issuer_sim::IssuerConfig::from_toml(CARDS, "test-issuer.toml").unwrap();
            let issuer_pool = PgPool::connect(&url).await.unwrap();
            issuer_sim::migrate(&issuer_pool).await.unwrap();
            let issuer_key = issuer_sim::PanKey::random();
            issuer_sim::seed_cards(&issuer_pool, &issuer_key, &config.cards)
                .await
                .unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let issuer = Arc::new(issuer_sim::Issuer::new(
                config,
                issuer_key.clone(),
                issuer_pool.clone(),
            ));
            let stop = CancellationToken::new();
            let served = tokio::spawn(serve(listener, issuer.clone(), stop.clone()));
            let shutdown = CancellationToken::new();
            // A failed advice is retried only after 3 s.
            let config = switch_config(&addr, |c| {
                no_cutover(c);
                c.advice.retry_initial = Duration::from_secs(3);
                c.advice.retry_max = Duration::from_secs(3);
                tweak(c);
            });
            let (switch, switch_addr, run) =
                start_switch(&url, config, PanHashKey::generate(), &shutdown).await;
            let w = World {
                pool: switch.pool.clone(),
                url,
                issuer_pool,
                issuer: issuer.clone(),
                issuer_key,
                issuer_addr: addr.clone(),
                switch_addr,
                switch,
                dialect: Arc::new(Dialect::cup_pos()),
                shutdown,
                run: Some(run),
            };
            Restartable {
                w,
                addr,
                issuer,
                stop,
                served,
            }
        }

        async fn stop(&mut self) {
            self.stop.cancel();
            (&mut self.served).await.unwrap();
            let link = &self.w.switch.links[0];
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while link.is_up() {
                assert!(tokio::time::Instant::now() < deadline, "the link went down");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        async fn restart(&mut self) {
            let listener = TcpListener::bind(&self.addr).await.unwrap();
            self.stop = CancellationToken::new();
            self.served = tokio::spawn(serve(listener, self.issuer.clone(), self.stop.clone()));
            assert!(self.w.switch.links[0].wait_up(Duration::from_secs(5)).await);
        }
    }

    async fn serve(
        listener: TcpListener,
        issuer: Arc<issuer_sim::Issuer>,
        stop: CancellationToken,
    ) {
        issuer_sim::run(listener, issuer, stop).await.unwrap();
    }

    /// A sale voided, and the void reversed while the issuer is unreachable:
    /// the switch has the sale approved again, the issuer still has it
    /// voided until the stored reversal advice reaches it.
    async fn void_reversed_while_the_issuer_is_away() -> (Restartable, Terminal, Sent) {
        let (mut r, t, sale) = void_reversed_while_the_switch_is_stopped().await;
        // Its next attempt is due in 3 s; the issuer is back at once.
        sqlx::query("UPDATE advices SET next_attempt_at = now() + interval '3 seconds' WHERE state = 'pending'")
            .execute(&r.w.pool)
            .await
            .unwrap();
        r.restart().await;
        (r, t, sale)
    }

    /// As [`void_reversed_while_the_issuer_is_away`], the switch not yet
    /// restarted.
    async fn void_reversed_while_the_switch_is_stopped() -> (Restartable, Terminal, Sent) {
        let mut r = Restartable::start().await;
        let mut t = r.w.signed_on(TERMINAL).await;
        let sale = purchase(&mut t, 0, 1_000).await;
        assert_eq!(sale.reply.rc(), "00");
        let void = send(&mut t, related(K::Void, &sale, 1_000)).await;
        assert_eq!(void.reply.rc(), "00");
        r.stop().await;
        let of_void = t.exchange(&reversal_of(&t, &void, 1_000)).await.unwrap();
        assert_eq!(of_void.rc(), "00", "R2, decided by the switch alone");
        assert_eq!(state(&r.w, &sale).await, "approved");
        // The reversal advice waits, queued, while the link is down.
        r.w.until(
            Duration::from_secs(5),
            "the reversal advice queued",
            "SELECT EXISTS (SELECT 1 FROM advices WHERE kind = 'reversal' AND state = 'pending')",
        )
        .await;
        assert!(!r.w.switch.links[0].is_up(), "the link is down");
        (r, t, sale)
    }

    /// Advices queued while the issuer is away go as soon as its link signs
    /// on again, all of them though they are more than a batch, each a
    /// first send: no attempt is spent on a link that is down, so no
    /// back-off (30 s here, and the poll as long) outlasts the outage.
    #[tokio::test]
    async fn advices_queued_while_the_issuer_is_away_go_as_soon_as_it_is_back() {
        let mut r = Restartable::start_with(|c| {
            c.advice.batch = 2;
            c.advice.retry_initial = Duration::from_secs(30);
            c.advice.retry_max = Duration::from_secs(30);
            c.advice.poll_interval = Duration::from_secs(30);
        })
        .await;
        let mut sold = Vec::new();
        for i in 1..=5 {
            let mut t = r.w.signed_on(&format!("T{i:07}")).await;
            let sale = purchase(&mut t, 0, 1_000).await;
            assert_eq!(sale.reply.rc(), "00");
            sold.push((t, sale));
        }
        r.stop().await;
        for (t, sale) in &mut sold {
            let reversed = t.exchange(&reversal_of(t, sale, 1_000)).await.unwrap();
            assert_eq!(reversed.rc(), "00", "R2, decided by the switch alone");
        }
        r.w.until(
            Duration::from_secs(5),
            "five reversal advices queued",
            "SELECT count(*) = 5 FROM advices WHERE kind = 'reversal' AND state = 'pending'",
        )
        .await;
        r.restart().await;
        drained(&r.w.pool).await.unwrap();
        let attempts: Vec<i32> = sqlx::query_scalar("SELECT attempts FROM advices ORDER BY id")
            .fetch_all(&r.w.pool)
            .await
            .unwrap();
        assert_eq!(attempts, [1; 5], "each sent once, when the issuer was back");
        assert_eq!(journal_net(&r.w).await, issuer_net(&r.w).await);
    }

    /// A void while the issuer link is down is answered 91 and claims
    /// nothing: its sale stays approved, and is voided once the issuer is
    /// back. (It used to be left `voided` for good, the card still charged.)
    #[tokio::test]
    async fn a_void_the_issuer_never_hears_of_leaves_its_sale_approved() {
        let mut r = Restartable::start().await;
        let mut t = r.w.signed_on(TERMINAL).await;
        let sale = purchase(&mut t, 0, 1_000).await;
        assert_eq!(sale.reply.rc(), "00");
        r.stop().await;
        let void = send(&mut t, related(K::Void, &sale, 1_000)).await;
        assert_eq!(void.reply.rc(), "91", "{:?}", void.reply);
        assert_eq!(state(&r.w, &sale).await, "approved");
        r.restart().await;
        let again = send(&mut t, related(K::Void, &sale, 1_000)).await;
        assert_eq!(again.reply.rc(), "00", "{:?}", again.reply);
        assert_eq!(state(&r.w, &sale).await, "voided");
        assert_eq!(journal_net(&r.w).await, issuer_net(&r.w).await);
    }

    /// B6: a refund of the sale (approved again at the switch) is answered
    /// 00 and its advice sent at once, ahead of the reversal advice; the
    /// issuer still has the sale voided and declines the refund (12); the
    /// advice is marked done anyway, and the refund is never credited.
    #[tokio::test]
    async fn b6_a_refund_does_not_overtake_the_reversal_it_depends_on() {
        let (r, mut t, sale) = void_reversed_while_the_issuer_is_away().await;
        let refund = send(&mut t, related(K::Refund, &sale, 400)).await;
        assert_eq!(refund.reply.rc(), "00", "F1-F6");
        drained(&r.w.pool).await.unwrap();
        assert_eq!(
            issuer_net(&r.w).await,
            journal_net(&r.w).await,
            "the money invariant"
        );
    }

    /// B6, with the reversal advice in flight: the worker has taken it
    /// (leased) when a void of the sale comes. The void does not send it a second
    /// time; it is declined 91 until the worker's try is recorded, and then
    /// it sends what is still pending first, as always. (A void: a refund
    /// is answered by the switch and queued behind the reversal instead.)
    #[tokio::test]
    async fn b6_a_reversal_the_worker_is_sending_is_not_sent_twice() {
        let (mut r, mut t, sale) = void_reversed_while_the_switch_is_stopped().await;
        // Leased before the switch is back, so its worker cannot take it.
        sqlx::query(
            "UPDATE advices SET leased_until = now() + interval '1 hour',
                 next_attempt_at = now() + interval '1 hour' WHERE state = 'pending'",
        )
        .execute(&r.w.pool)
        .await
        .unwrap();
        r.restart().await;
        let void = send(&mut t, related(K::Void, &sale, 1_000)).await;
        assert_eq!(void.reply.rc(), "91", "{:?}", void.reply);
        let (state, attempts): (String, i32) =
            sqlx::query_as("SELECT state, attempts FROM advices WHERE kind = 'reversal'")
                .fetch_one(&r.w.pool)
                .await
                .unwrap();
        assert_eq!((state.as_str(), attempts), ("pending", 0), "not sent");
        // The worker's try is recorded (no answer): the lease ends, the
        // advice waits out its back-off, and the void sends it first.
        sqlx::query("UPDATE advices SET leased_until = NULL WHERE state = 'pending'")
            .execute(&r.w.pool)
            .await
            .unwrap();
        let void = send(&mut t, related(K::Void, &sale, 1_000)).await;
        assert_eq!(void.reply.rc(), "00", "{:?}", void.reply);
        drained(&r.w.pool).await.unwrap();
        assert_eq!(issuer_net(&r.w).await, journal_net(&r.w).await);
    }

    /// B6, the same race answered to the terminal: a void of the sale goes
    /// to an issuer that has not heard of the reversal yet and says 12.
    #[tokio::test]
    async fn b6_a_void_does_not_overtake_the_reversal_it_depends_on() {
        let (r, mut t, sale) = void_reversed_while_the_issuer_is_away().await;
        let void = send(&mut t, related(K::Void, &sale, 1_000)).await;
        assert_eq!(void.reply.rc(), "00", "V1-V6: the sale is approved");
        drained(&r.w.pool).await.unwrap();
        assert_eq!(issuer_net(&r.w).await, journal_net(&r.w).await);
    }
}
