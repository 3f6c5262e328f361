//! The simulated issuer's config file (`config/issuer-sim.toml`): where it
//! listens, the cards to seed, and the faults to inject. Every key has a
//! default, unknown keys are refused, and every problem is reported at once
//! with file, line and key. The PAN hash key is never in it: it comes from a
//! key file or the environment ([`crate::PanKey`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use iso8583::Pan;
use settings::{Problems, Section};

/// The whole config.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// Where the issuer listens for the switch.
    pub listen: SocketAddr,
    /// This issuer's own institution id (1 to 11 digits), for logs.
    pub institution_id: String,
    /// `[database]`.
    pub database: DatabaseConfig,
    /// `[keys]`.
    pub keys: KeysConfig,
    /// `[limits]`.
    pub limits: Limits,
    /// `[[cards]]`: the card ranges to seed.
    pub cards: Vec<CardRange>,
    /// `[faults]`: what goes wrong on purpose.
    pub faults: FaultConfig,
}

/// `[database]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseConfig {
    /// The PostgreSQL URL. Absent: `DATABASE_URL`, else a private server
    /// kept in `embedded_data_dir`.
    pub url: Option<String>,
    /// Connections in the pool.
    pub max_connections: u32,
    /// Data directory of a private PostgreSQL started by the binary when no
    /// URL is given (relative to the file's directory).
    pub embedded_data_dir: Option<std::path::PathBuf>,
}

/// `[keys]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeysConfig {
    /// File holding the PAN hash key as 64 hex characters; absent: the
    /// environment variable `SWITCHYARD_ISSUER_PAN_KEY`.
    pub pan_key_file: Option<PathBuf>,
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Switch connections open at once; more are closed on accept.
    pub max_connections: usize,
    /// Messages of one connection being processed at once; the connection
    /// is not read further while this many are in flight.
    pub max_in_flight: usize,
    /// Group commit: most new authorisations, or follow-ons, decided in
    /// one statement.
    pub max_batch: usize,
    /// Group commit: batches of each (new authorisations, follow-ons) at
    /// the database at once.
    pub batches_in_flight: usize,
    /// Group commit: how long a batch waits after its first message for more.
    pub batch_delay: std::time::Duration,
    /// Threads the process runs on: 1, one thread (the least CPU per
    /// message, at most one core); 0, one per core.
    pub threads: usize,
    /// How often the batches of new authorisations are logged (zero: never).
    pub stats_interval: std::time::Duration,
}

/// Whether a card may be used, and the decline when it may not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CardStatus {
    /// In use.
    #[default]
    Active,
    /// Blocked by the issuer: `62` restricted card.
    Blocked,
    /// Reported lost: `41`.
    Lost,
    /// Reported stolen: `43`.
    Stolen,
}

impl CardStatus {
    const WORDS: [(&'static str, CardStatus); 4] = [
        ("active", CardStatus::Active),
        ("blocked", CardStatus::Blocked),
        ("lost", CardStatus::Lost),
        ("stolen", CardStatus::Stolen),
    ];

    /// The word used in the config and the database.
    pub fn as_str(self) -> &'static str {
        Self::WORDS
            .iter()
            .find(|(_, s)| *s == self)
            .map(|(w, _)| *w)
            .expect("every status has a word")
    }

    /// The status of a word.
    pub fn from_word(word: &str) -> Option<CardStatus> {
        Self::WORDS
            .iter()
            .find(|(w, _)| *w == word)
            .map(|(_, s)| *s)
    }
}

/// `[[cards]]`: consecutive PANs `first..=last` (same length), all with the
/// same expiry, opening balance and per-transaction limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardRange {
    /// The first PAN (masked when printed).
    pub first: Pan,
    /// The last PAN, included.
    pub last: Pan,
    /// YYMM.
    pub expiry: String,
    /// Opening balance, in fen.
    pub balance: i64,
    /// Largest amount of one purchase or pre-authorisation, in fen.
    pub limit: i64,
    /// Whether the cards may be used.
    pub status: CardStatus,
}

impl CardRange {
    /// Largest number of cards in one range: the seed builds them in memory.
    pub const MAX_CARDS: u64 = 1_000_000;

    /// How many cards the range holds.
    pub fn len(&self) -> u64 {
        pan_number(&self.last) - pan_number(&self.first) + 1
    }

    /// True when the range holds no card (never, once validated).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every PAN of the range, in order.
    pub fn pans(&self) -> impl Iterator<Item = Pan> + '_ {
        let width = self.first.expose().len();
        (pan_number(&self.first)..=pan_number(&self.last))
            .map(move |n| Pan::new(&format!("{n:0width$}")).expect("digits of the range's length"))
    }
}

fn pan_number(pan: &Pan) -> u64 {
    // At most 19 digits: below u64::MAX.
    pan.expose().parse().expect("a PAN is digits")
}

/// How long a reply waits before it is written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Latency {
    /// Always this long (`distribution = "fixed"`, `ms`).
    Fixed(Duration),
    /// Uniform between the two, inclusive (`"uniform"`, `min_ms`, `max_ms`).
    Uniform {
        /// Shortest.
        min: Duration,
        /// Longest.
        max: Duration,
    },
    /// Log-normal around `median` with shape `sigma`, capped at `max`
    /// (`"lognormal"`, `median_ms`, `sigma`, `max_ms`): mostly quick, with a
    /// long tail, as a real issuer answers.
    LogNormal {
        /// Half the replies are quicker.
        median: Duration,
        /// Spread of the logarithm (0: always the median).
        sigma: f64,
        /// No reply waits longer.
        max: Duration,
    },
}

impl Default for Latency {
    fn default() -> Latency {
        Latency::Fixed(Duration::ZERO)
    }
}

/// `[faults]`: each reply is, in this order of draws, cut mid-frame with the
/// connection closed (`close_connection`), dropped (`drop_reply`), answered
/// `late_by` after it was due (`late_reply`), or answered after `latency`.
/// The three probabilities are shares of the replies, so their sum is at
/// most 1. Faults apply after the posting is committed: the switch loses
/// the answer, never the issuer the posting.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultConfig {
    /// Seed of the fault draws; absent: a random one, logged when faults
    /// that draw come into force.
    pub seed: Option<u64>,
    /// Delay of every reply.
    pub latency: Latency,
    /// Share of replies never written.
    pub drop_reply: f64,
    /// Share of replies written `late_by` after their latency.
    pub late_reply: f64,
    /// How late a late reply is: above the switch's issuer timeout.
    pub late_by: Duration,
    /// Share of replies of which half the frame is written before the
    /// connection is closed.
    pub close_connection: f64,
}

impl FaultConfig {
    /// Whether any reply's fate or delay is drawn at random.
    pub fn draws(&self) -> bool {
        let random_latency = match self.latency {
            Latency::Fixed(_) => false,
            Latency::Uniform { min, max } => min != max,
            Latency::LogNormal { sigma, .. } => sigma > 0.0,
        };
        random_latency
            || self.drop_reply > 0.0
            || self.late_reply > 0.0
            || self.close_connection > 0.0
    }
}

impl Default for FaultConfig {
    fn default() -> FaultConfig {
        FaultConfig {
            seed: None,
            latency: Latency::default(),
            drop_reply: 0.0,
            late_reply: 0.0,
            late_by: Duration::from_millis(DEFAULT_LATE_BY_MS as u64),
            close_connection: 0.0,
        }
    }
}

/// The default lateness of a late reply: after the switch's default issuer
/// timeout of 10 s.
const DEFAULT_LATE_BY_MS: i64 = 15_000;
/// The longest delay any key may ask for: one hour.
const MAX_MS: i64 = 3_600_000;

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file was read but is wrong; every problem found is listed, one
    /// a line, in the order of the file.
    #[error("{problems}")]
    Invalid {
        /// Each problem, with file, line and key.
        problems: Problems,
    },
}

impl IssuerConfig {
    /// Reads the config file at `path`. A relative key file path is
    /// relative to the file's directory, as in the switch's config.
    pub fn load(path: impl AsRef<Path>) -> Result<IssuerConfig, ConfigError> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: origin.clone(),
            source,
        })?;
        let mut config = IssuerConfig::from_toml(&text, &origin)?;
        for p in [
            &mut config.keys.pan_key_file,
            &mut config.database.embedded_data_dir,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = path.parent().unwrap_or(Path::new(".")).join(&*p);
            }
        }
        Ok(config)
    }

    /// Reads config text; `origin` names it in every problem.
    pub fn from_toml(text: &str, origin: &str) -> Result<IssuerConfig, ConfigError> {
        settings::parse(text, origin, read).map_err(|mut problems| {
            // In the order of the file, not of reading (unknown keys come
            // last, when their table is dropped).
            problems.0.sort_by_key(|p| p.line);
            ConfigError::Invalid { problems }
        })
    }
}

impl Default for IssuerConfig {
    fn default() -> IssuerConfig {
        IssuerConfig::from_toml("", "(defaults)").expect("the defaults are valid")
    }
}

fn read(root: &Section<'_, '_>) -> IssuerConfig {
    let listen_text = root.string("listen", "127.0.0.1:9583");
    let listen = listen_text.parse().unwrap_or_else(|_| {
        root.problem(
            "listen",
            format!("{listen_text:?} is not an address like \"127.0.0.1:9583\""),
        );
        SocketAddr::from(([127, 0, 0, 1], 9583))
    });
    let institution_id = root.string("institution_id", "62220200");
    if institution_id.is_empty()
        || institution_id.len() > 11
        || !institution_id.bytes().all(|b| b.is_ascii_digit())
    {
        root.problem("institution_id", "must be 1 to 11 digits");
    }

    let db = root.section("database");
    let database = DatabaseConfig {
        url: db.str("url"),
        max_connections: db.int("max_connections", 16, 1..=1000) as u32,
        embedded_data_dir: db.path("embedded_data_dir"),
    };
    drop(db);

    let k = root.section("keys");
    let keys = KeysConfig {
        pan_key_file: k.path("pan_key_file"),
    };
    drop(k);

    let l = root.section("limits");
    let limits = Limits {
        max_connections: l.int("max_connections", 64, 1..=100_000) as usize,
        max_in_flight: l.int("max_in_flight", 256, 1..=100_000) as usize,
        max_batch: l.int("max_batch", 256, 1..=10_000) as usize,
        batches_in_flight: l.int("batches_in_flight", 1, 1..=64) as usize,
        batch_delay: l.duration("batch_delay", std::time::Duration::ZERO),
        threads: l.int("threads", 1, 0..=1024) as usize,
        stats_interval: l.duration("stats_interval", std::time::Duration::from_secs(60)),
    };
    drop(l);

    let cards = read_cards(root);
    let faults = read_faults(&root.section("faults"));
    IssuerConfig {
        listen,
        institution_id,
        database,
        keys,
        limits,
        cards,
        faults,
    }
}

fn read_cards(root: &Section<'_, '_>) -> Vec<CardRange> {
    let mut ranges: Vec<CardRange> = Vec::new();
    for c in root.sections("cards") {
        let pan = |name: &str| -> Option<Pan> {
            match c.str(name) {
                None => {
                    c.problem(name, "is required: a PAN of 12 to 19 digits");
                    None
                }
                Some(text) => Pan::new(&text)
                    .map_err(|_| c.problem(name, "must be a PAN of 12 to 19 digits"))
                    .ok(),
            }
        };
        let (first, last) = (pan("first"), pan("last"));
        let expiry = c.string("expiry", "3012");
        let month = expiry.get(2..).and_then(|m| m.parse::<u8>().ok());
        if expiry.len() != 4
            || !expiry.bytes().all(|b| b.is_ascii_digit())
            || !matches!(month, Some(1..=12))
        {
            c.problem("expiry", format!("{expiry:?} is not YYMM, like \"3012\""));
        }
        let balance = c.int("balance", 1_000_000, 0..=i64::MAX / 4);
        let limit = c.int("limit", 5_000_000, 1..=i64::MAX / 4);
        let status = c.choice("status", CardStatus::Active, &CardStatus::WORDS);
        let (Some(first), Some(last)) = (first, last) else {
            continue;
        };
        if first.expose().len() != last.expose().len() {
            c.problem("last", "must have as many digits as `first`");
            continue;
        }
        if pan_number(&last) < pan_number(&first) {
            c.problem("last", "must not be below `first`");
            continue;
        }
        let range = CardRange {
            first,
            last,
            expiry,
            balance,
            limit,
            status,
        };
        if range.len() > CardRange::MAX_CARDS {
            c.problem(
                "last",
                format!(
                    "the range holds {} cards; at most {} a range",
                    range.len(),
                    CardRange::MAX_CARDS
                ),
            );
            continue;
        }
        if let Some(i) = ranges.iter().position(|r| overlap(r, &range)) {
            c.problem(
                "first",
                // The PANs masked would hide where the ranges meet: by count.
                format!(
                    "the range shares cards with cards[{i}] ({} cards from {})",
                    ranges[i].len(),
                    ranges[i].first
                ),
            );
            continue;
        }
        ranges.push(range);
    }
    ranges
}

fn overlap(a: &CardRange, b: &CardRange) -> bool {
    a.first.expose().len() == b.first.expose().len()
        && pan_number(&a.first) <= pan_number(&b.last)
        && pan_number(&b.first) <= pan_number(&a.last)
}

fn ms(section: &Section<'_, '_>, name: &str, default: i64) -> Duration {
    Duration::from_millis(section.int(name, default, 0..=MAX_MS) as u64)
}

fn read_faults(f: &Section<'_, '_>) -> FaultConfig {
    let seed = f.has("seed").then(|| f.int("seed", 0, 0..=i64::MAX) as u64);
    let latency = read_latency(&f.section("latency"));
    let probability = |name: &str| f.float(name, 0.0, 0.0..=1.0);
    let drop_reply = probability("drop_reply");
    let late_reply = probability("late_reply");
    let close_connection = probability("close_connection");
    let late_by = ms(f, "late_by_ms", DEFAULT_LATE_BY_MS);
    if late_by.is_zero() {
        f.problem("late_by_ms", "must be above 0");
    }
    if drop_reply + late_reply + close_connection > 1.0 + 1e-9 {
        f.problem(
            "close_connection",
            "drop_reply + late_reply + close_connection are shares of the replies: their sum must be at most 1",
        );
    }
    FaultConfig {
        seed,
        latency,
        drop_reply,
        late_reply,
        late_by,
        close_connection,
    }
}

fn read_latency(l: &Section<'_, '_>) -> Latency {
    let distribution = l.string("distribution", "fixed");
    match distribution.as_str() {
        "fixed" => Latency::Fixed(ms(l, "ms", 0)),
        "uniform" => {
            let (min, max) = (ms(l, "min_ms", 0), ms(l, "max_ms", 0));
            if !l.has("max_ms") {
                l.problem("max_ms", "is required for the uniform distribution");
            } else if max < min {
                l.problem("max_ms", "must not be below min_ms");
            }
            Latency::Uniform { min, max }
        }
        "lognormal" => {
            let median = ms(l, "median_ms", 0);
            if median.is_zero() {
                l.problem(
                    "median_ms",
                    "must be above 0 for the lognormal distribution",
                );
            }
            let sigma = l.float("sigma", 0.5, 0.0..=5.0);
            let max = ms(l, "max_ms", 60_000);
            if max < median {
                l.problem("max_ms", "must not be below median_ms");
            }
            Latency::LogNormal { median, sigma, max }
        }
        other => {
            l.problem(
                "distribution",
                format!("{other:?} is not one of \"fixed\", \"uniform\", \"lognormal\""),
            );
            Latency::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match IssuerConfig::from_toml(text, "i.toml") {
            Err(ConfigError::Invalid { problems }) => {
                problems.0.iter().map(ToString::to_string).collect()
            }
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let c = IssuerConfig::default();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9583");
        assert!(c.cards.is_empty());
        assert_eq!(c.faults, FaultConfig::default());
        assert_eq!(c.faults.late_by, Duration::from_secs(15));
        assert_eq!(c.database.url, None);
        assert_eq!(c.limits.max_in_flight, 256);
        assert_eq!(c.limits.stats_interval, Duration::from_secs(60));
    }

    #[test]
    fn the_shipped_config_is_valid_and_seeds_ten_thousand_cards() {
        let text = include_str!("../../../config/issuer-sim.toml");
        let c = IssuerConfig::from_toml(text, "config/issuer-sim.toml").unwrap();
        assert_eq!(c.cards.iter().map(CardRange::len).sum::<u64>(), 10_000 + 4);
        assert_eq!(c.faults, FaultConfig::default());
        assert_eq!(c.limits.stats_interval, Duration::from_secs(60));
        let quiet = IssuerConfig::from_toml("[limits]\nstats_interval = \"0s\"\n", "t").unwrap();
        assert!(quiet.limits.stats_interval.is_zero());
        let bad = IssuerConfig::from_toml("[limits]\nstats_interval = \"often\"\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(bad.contains("t.toml:2: limits.stats_interval"), "{bad}");
    }

    #[test]
    fn ranges_enumerate_their_pans() {
        let c = IssuerConfig::from_toml(
            "[[cards]]\nfirst = \"6222020000000000009\"\nlast = \"6222020000000000011\"\n",
            "t",
        )
        .unwrap();
        let pans: Vec<String> = c.cards[0].pans().map(|p| p.expose().to_string()).collect();
        assert_eq!(
            pans,
            [
                "6222020000000000009",
                "6222020000000000010",
                "6222020000000000011"
            ]
        );
        assert!(!format!("{:?}", c.cards[0]).contains("6222020000000000009"));
    }

    #[test]
    fn latency_distributions() {
        let c = IssuerConfig::from_toml(
            "[faults]\nlatency = { distribution = \"uniform\", min_ms = 5, max_ms = 50 }\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            c.faults.latency,
            Latency::Uniform {
                min: Duration::from_millis(5),
                max: Duration::from_millis(50)
            }
        );
        let c = IssuerConfig::from_toml(
            "[faults.latency]\ndistribution = \"lognormal\"\nmedian_ms = 20\nsigma = 1\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            c.faults.latency,
            Latency::LogNormal {
                median: Duration::from_millis(20),
                sigma: 1.0,
                max: Duration::from_secs(60)
            }
        );
    }

    #[test]
    fn every_problem_is_listed_with_file_line_and_key() {
        let text = r#"listen = "nowhere"
colour = "red"
[faults]
drop_reply = 1.5
late_by_ms = -1
latency = { distribution = "gaussian" }
[[cards]]
first = "6222020000000000001"
last = "622202000000000000x"
expiry = "3013"
[[cards]]
first = "6222020000000000001"
last = "6222020000000000005"
limit = "lots"
bogus = 1
"#;
        let found = problems(text);
        for expected in [
            "i.toml:1: listen: \"nowhere\" is not an address like \"127.0.0.1:9583\"",
            "i.toml:2: colour: unknown key",
            "i.toml:4: faults.drop_reply: out of range: 0 to 1",
            "i.toml:5: faults.late_by_ms: -1 is out of range: 0 to 3600000",
            "i.toml:6: faults.latency.distribution: \"gaussian\" is not one of",
            "i.toml:9: cards[0].last: must be a PAN of 12 to 19 digits",
            "i.toml:10: cards[0].expiry: \"3013\" is not YYMM",
            "i.toml:14: cards[1].limit: expected an integer, found string",
            "i.toml:15: cards[1].bogus: unknown key",
        ] {
            assert!(
                found.iter().any(|p| p.starts_with(expected)),
                "{expected:?} missing from {found:#?}"
            );
        }
        assert_eq!(found.len(), 9, "{found:#?}");
        assert!(!found.join("\n").contains("6222020000000000001"));
    }

    #[test]
    fn overlapping_ranges_and_fault_shares_are_refused() {
        let found = problems(
            "[faults]\ndrop_reply = 0.6\nclose_connection = 0.6\n\
             [[cards]]\nfirst = \"6222020000000000001\"\nlast = \"6222020000000000100\"\n\
             [[cards]]\nfirst = \"6222020000000000050\"\nlast = \"6222020000000000200\"\n",
        );
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(found[0].starts_with("i.toml:3: faults.close_connection: drop_reply + late_reply"));
        assert_eq!(
            found[1],
            "i.toml:8: cards[1].first: the range shares cards with cards[0] (100 cards from 622202*********0001)"
        );
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let found = problems("listen = \"x\"\n[faults\n");
        assert!(found[0].starts_with("i.toml:2: (syntax): "), "{found:?}");
    }
}
