//! The switch's config file (`config/switchyard.toml`): every key has a
//! default, unknown keys are refused, and every problem is reported with
//! file, line and key. Secrets are never in it: the PAN hash key comes from a
//! key file or the environment.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::NaiveTime;
use chrono_tz::Tz;
use settings::{Problems, Section};

/// What to do with a repeated request (D1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DuplicatePolicy {
    /// Answer with the stored reply of the earlier request.
    Replay,
    /// Answer `94`.
    Reject,
}

/// `same_day_refund` (F5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameDayRefund {
    /// Refunds in the original's batch are allowed.
    Allow,
    /// Answer them `12`: a void is the way.
    Deny,
}

/// The whole config.
#[derive(Debug, Clone)]
pub struct Config {
    /// Terminal listener address.
    pub listen: String,
    /// Our acquiring institution id (F32), digits.
    pub institution_id: String,
    /// Our forwarding institution id (F33), digits.
    pub forwarding_id: String,
    /// `[database]`.
    pub database: Database,
    /// `[limits]`.
    pub limits: Limits,
    /// `[dialects]`.
    pub dialects: Dialects,
    /// `[keys]`.
    pub keys: Keys,
    /// `[rules]`.
    pub rules: Rules,
    /// `[advice]`.
    pub advice: Advice,
    /// `[seed]`.
    pub seed: Seed,
    /// `[[issuers]]`.
    pub issuers: Vec<Issuer>,
    /// `[admin]`.
    pub admin: Admin,
}

/// `[admin]`: the admin listener ([`crate::admin`]).
#[derive(Debug, Clone)]
pub struct Admin {
    /// Where `/health` and `/metrics` are served; none: nowhere.
    pub listen: Option<String>,
}

/// `[database]`.
#[derive(Debug, Clone)]
pub struct Database {
    /// The PostgreSQL URL; `DATABASE_URL` wins; neither: a private embedded server.
    pub url: Option<String>,
    /// Connections in the pool.
    pub max_connections: u32,
    /// Data directory of the embedded server (temporary when absent).
    pub embedded_data_dir: Option<PathBuf>,
    /// Group commit: most journal writes in one statement.
    pub max_batch: usize,
    /// Group commit: batches of one kind at the database at once.
    pub batches_in_flight: usize,
    /// Group commit: how long a batch waits after its first write for more.
    pub batch_delay: Duration,
    /// How long a terminal read from the database answers requests before
    /// it is read again (zero: every request reads it).
    pub terminal_cache: Duration,
    /// Open the batch connections and plan the journal's statements on each
    /// before serving.
    pub plan_ahead: bool,
    /// How often the journal's batches are logged (zero: never).
    pub stats_interval: Duration,
}

/// `[limits]`: what one connection and the whole listener may take.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Terminal connections open at once.
    pub max_connections: usize,
    /// Requests of one connection being processed at once.
    pub max_in_flight: usize,
    /// A connection with no frame for this long is closed.
    pub idle_timeout: Duration,
    /// A frame must arrive whole within this long of its first byte.
    pub frame_timeout: Duration,
    /// Largest frame accepted (bytes after the length prefix).
    pub max_frame: usize,
    /// How long shutdown waits for in-flight transactions.
    pub shutdown_grace: Duration,
    /// Threads the process runs on: 1, one thread, where a message is
    /// handed between tasks without waking another thread (the least CPU
    /// per transaction, at most one core); 0, one per core.
    pub threads: usize,
}

/// `[dialects]`: field tables replacing the embedded ones.
#[derive(Debug, Clone, Default)]
pub struct Dialects {
    /// Terminal side.
    pub terminal: Option<PathBuf>,
    /// Network side.
    pub network: Option<PathBuf>,
}

/// `[keys]`.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    /// File holding the PAN hash key (64 hex characters); otherwise
    /// `SWITCHYARD_PAN_HASH_KEY`.
    pub pan_hash_key_file: Option<PathBuf>,
    /// File holding the terminal master derivation key (32 hex
    /// characters); otherwise `SWITCHYARD_TERMINAL_MASTER_DERIVATION_KEY`.
    /// With neither, no terminal gets working keys and no MAC is checked.
    pub terminal_master_derivation_key_file: Option<PathBuf>,
}

/// `[rules]`: the windows and policies of rules.md.
#[derive(Debug, Clone)]
pub struct Rules {
    /// D1.
    pub duplicates: DuplicatePolicy,
    /// T1: how long the issuer has to answer.
    pub issuer_timeout: Duration,
    /// The business day's time zone.
    pub time_zone: Tz,
    /// The business day's cut-over time.
    pub cutover: NaiveTime,
    /// V6.
    pub void_last_only: bool,
    /// F4.
    pub refund_window_days: u32,
    /// F5.
    pub same_day_refund: SameDayRefund,
    /// P2.
    pub preauth_valid_days: u32,
    /// P3.
    pub completion_tolerance_percent: u32,
}

/// `[advice]`: the store-and-forward queue.
#[derive(Debug, Clone)]
pub struct Advice {
    /// First retry after this long; doubles up to `retry_max`.
    pub retry_initial: Duration,
    /// Longest wait between retries.
    pub retry_max: Duration,
    /// Advices taken from the queue at once.
    pub batch: u32,
    /// How often the queue and forgotten `sent` entries are looked at when
    /// nothing wakes the worker sooner.
    pub poll_interval: Duration,
}

/// `[seed]`.
#[derive(Debug, Clone, Default)]
pub struct Seed {
    /// Terminals and merchants to load at start (`config/terminals.toml`).
    pub terminals: Option<PathBuf>,
}

/// `[[issuers]]`: who owns which cards, and how to reach them.
#[derive(Debug, Clone)]
pub struct Issuer {
    /// A name for logs and the journal.
    pub name: String,
    /// PAN prefixes (BIN ranges) this issuer owns; the longest match wins.
    pub bins: Vec<String>,
    /// host:port.
    pub address: String,
    /// Persistent connections.
    pub connections: usize,
    /// Echo test after this long without traffic.
    pub echo_interval: Duration,
    /// Connect and sign-on must succeed within this.
    pub connect_timeout: Duration,
    /// Longest wait between reconnection attempts.
    pub reconnect_max: Duration,
}

fn digits(section: &Section<'_, '_>, key: &str, default: &str, max: usize) -> String {
    let value = section.string(key, default);
    if value.is_empty() || value.len() > max || !value.bytes().all(|b| b.is_ascii_digit()) {
        section.problem(key, format!("must be 1 to {max} digits"));
    }
    value
}

impl Config {
    /// Reads the config file at `path`. Relative paths in it (terminals,
    /// dialects, key file) are relative to the file's directory.
    pub fn load(path: &Path) -> Result<Config, Problems> {
        let mut config = settings::load(path, Config::read)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.seed.terminals,
            &mut config.dialects.terminal,
            &mut config.dialects.network,
            &mut config.keys.pan_hash_key_file,
            &mut config.keys.terminal_master_derivation_key_file,
            &mut config.database.embedded_data_dir,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }

    /// Reads config text; `origin` names it in problems.
    pub fn parse(text: &str, origin: &str) -> Result<Config, Problems> {
        settings::parse(text, origin, Config::read)
    }

    fn read(root: &Section<'_, '_>) -> Config {
        let listen = root.string("listen", "127.0.0.1:8583");
        if listen.parse::<std::net::SocketAddr>().is_err() {
            root.problem(
                "listen",
                format!("{listen:?} is not an address like \"127.0.0.1:8583\""),
            );
        }
        let institution_id = digits(root, "institution_id", "48560000", 11);
        let forwarding_id = digits(root, "forwarding_id", "48561000", 11);

        let db = root.section("database");
        let database = Database {
            url: db.str("url"),
            max_connections: db.int("max_connections", 16, 1..=1000) as u32,
            embedded_data_dir: db.path("embedded_data_dir"),
            max_batch: db.int("max_batch", 256, 1..=10_000) as usize,
            batches_in_flight: db.int("batches_in_flight", 1, 1..=64) as usize,
            batch_delay: db.duration("batch_delay", Duration::ZERO),
            terminal_cache: db.duration("terminal_cache", Duration::from_secs(10)),
            plan_ahead: db.bool("plan_ahead", true),
            stats_interval: db.duration("stats_interval", Duration::from_secs(60)),
        };

        let l = root.section("limits");
        let limits = Limits {
            max_connections: l.int("max_connections", 10_000, 1..=1_000_000) as usize,
            max_in_flight: l.int("max_in_flight_per_connection", 8, 1..=1024) as usize,
            idle_timeout: l.duration_above_zero("idle_timeout", Duration::from_secs(300)),
            frame_timeout: l.duration_above_zero("frame_timeout", Duration::from_secs(10)),
            max_frame: l.int("max_frame", 2048, 64..=65535) as usize,
            shutdown_grace: l.duration("shutdown_grace", Duration::from_secs(15)),
            threads: l.int("threads", 1, 0..=1024) as usize,
        };

        let d = root.section("dialects");
        let dialects = Dialects {
            terminal: d.path("terminal"),
            network: d.path("network"),
        };

        let k = root.section("keys");
        let keys = Keys {
            pan_hash_key_file: k.path("pan_hash_key_file"),
            terminal_master_derivation_key_file: k.path("terminal_master_derivation_key_file"),
        };

        let r = root.section("rules");
        let zone = r.string("time_zone", "Asia/Shanghai");
        let time_zone = zone.parse::<Tz>().unwrap_or_else(|_| {
            r.problem(
                "time_zone",
                format!("{zone:?} is not an IANA time zone like \"Asia/Shanghai\""),
            );
            chrono_tz::Asia::Shanghai
        });
        let cut = r.string("cutover", "23:00");
        let cutover = NaiveTime::parse_from_str(&cut, "%H:%M").unwrap_or_else(|_| {
            r.problem("cutover", format!("{cut:?} is not a time like \"23:00\""));
            NaiveTime::from_hms_opt(23, 0, 0).expect("valid")
        });
        let rules = Rules {
            duplicates: r.choice(
                "duplicates",
                DuplicatePolicy::Replay,
                &[
                    ("replay", DuplicatePolicy::Replay),
                    ("reject", DuplicatePolicy::Reject),
                ],
            ),
            issuer_timeout: r.duration_above_zero("issuer_timeout", Duration::from_secs(10)),
            time_zone,
            cutover,
            void_last_only: r.bool("void_last_only", false),
            refund_window_days: r.int("refund_window_days", 30, 0..=3650) as u32,
            same_day_refund: r.choice(
                "same_day_refund",
                SameDayRefund::Allow,
                &[
                    ("allow", SameDayRefund::Allow),
                    ("deny", SameDayRefund::Deny),
                ],
            ),
            preauth_valid_days: r.int("preauth_valid_days", 30, 1..=365) as u32,
            completion_tolerance_percent: r.int("completion_tolerance_percent", 15, 0..=100) as u32,
        };

        let a = root.section("advice");
        let advice = Advice {
            // An advice that fails at once would be tried again at once,
            // for ever.
            retry_initial: a.duration_above_zero("retry_initial", Duration::from_secs(1)),
            retry_max: a.duration("retry_max", Duration::from_secs(60)),
            batch: a.int("batch", 50, 1..=10_000) as u32,
            poll_interval: a.duration_above_zero("poll_interval", Duration::from_secs(1)),
        };
        if advice.retry_max < advice.retry_initial {
            a.problem("retry_max", "must not be below retry_initial");
        }

        let s = root.section("seed");
        let seed = Seed {
            terminals: s.path("terminals"),
        };

        // Each issuer's name and BINs, to refuse a second issuer of either.
        let mut named: Vec<(String, Vec<String>)> = Vec::new();
        let issuers: Vec<Issuer> = root
            .sections("issuers")
            .iter()
            .map(|i| {
                let bins = i.strings("bins");
                if bins.is_empty() {
                    i.problem("bins", "name at least one PAN prefix, e.g. [\"622202\"]");
                }
                for b in &bins {
                    if b.is_empty() || b.len() > 11 || !b.bytes().all(|c| c.is_ascii_digit()) {
                        i.problem(
                            "bins",
                            format!("{b:?} is not a PAN prefix of 1 to 11 digits"),
                        );
                    }
                }
                let address = i.string("address", "127.0.0.1:9583");
                let port = address
                    .rsplit_once(':')
                    .filter(|(host, _)| !host.is_empty())
                    .and_then(|(_, port)| port.parse::<u16>().ok());
                if port.is_none_or(|p| p == 0) {
                    i.problem(
                        "address",
                        format!("{address:?} is not host:port, like \"127.0.0.1:9583\" (port 1 to 65535)"),
                    );
                }
                let name = i.string("name", "issuer");
                if named.iter().any(|(n, _)| *n == name) {
                    i.problem("name", format!("{name:?} names an issuer above already"));
                }
                for b in &bins {
                    if let Some((other, _)) = named.iter().find(|(_, bs)| bs.contains(b)) {
                        i.problem(
                            "bins",
                            format!("{b:?} is issuer {other:?}'s already: a card must have one issuer"),
                        );
                    }
                }
                named.push((name.clone(), bins.clone()));
                Issuer {
                    name,
                    bins,
                    address,
                    connections: i.int("connections", 1, 1..=64) as usize,
                    echo_interval: i.duration_above_zero("echo_interval", Duration::from_secs(30)),
                    connect_timeout: i.duration_above_zero(
                        "connect_timeout",
                        Duration::from_secs(3),
                    ),
                    reconnect_max: i.duration_above_zero("reconnect_max", Duration::from_secs(10)),
                }
            })
            .collect();

        let a = root.section("admin");
        let admin_listen = a.str("listen").filter(|l| !l.is_empty());
        if let Some(l) = &admin_listen {
            let addr = l.parse::<std::net::SocketAddr>();
            if addr.is_err() {
                a.problem(
                    "listen",
                    format!("{l:?} is not an address like \"127.0.0.1:9580\" (\"\" for none)"),
                );
            } else if let (Ok(ours), Ok(theirs)) = (addr, listen.parse::<std::net::SocketAddr>())
                && ours.port() != 0
                && ours.port() == theirs.port()
                && (ours.ip() == theirs.ip()
                    || ours.ip().is_unspecified()
                    || theirs.ip().is_unspecified())
            {
                a.problem(
                    "listen",
                    format!("{l:?} takes the terminal listener's port ({listen:?})"),
                );
            }
        }
        let admin = Admin {
            listen: admin_listen,
        };

        Config {
            admin,
            listen,
            institution_id,
            forwarding_id,
            database,
            limits,
            dialects,
            keys,
            rules,
            advice,
            seed,
            issuers,
        }
    }

    /// The issuer owning `pan`: the longest matching BIN prefix.
    pub fn issuer_for(&self, pan: &str) -> Option<usize> {
        self.issuers
            .iter()
            .enumerate()
            .flat_map(|(i, iss)| iss.bins.iter().map(move |b| (i, b)))
            .filter(|(_, b)| pan.starts_with(b.as_str()))
            .max_by_key(|(_, b)| b.len())
            .map(|(i, _)| i)
    }
}

impl Default for Config {
    fn default() -> Config {
        Config::parse("", "(defaults)").expect("the defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_rules_md_defaults() {
        let c = Config::default();
        assert_eq!(c.listen, "127.0.0.1:8583");
        assert_eq!(c.rules.issuer_timeout, Duration::from_secs(10));
        assert_eq!(c.rules.refund_window_days, 30);
        assert_eq!(c.rules.completion_tolerance_percent, 15);
        assert_eq!(c.rules.time_zone, chrono_tz::Asia::Shanghai);
        assert_eq!(c.rules.duplicates, DuplicatePolicy::Replay);
        assert!(!c.rules.void_last_only);
        assert_eq!(c.limits.max_frame, 2048);
    }

    #[test]
    fn the_longest_bin_wins() {
        let c = Config::parse(
            "[[issuers]]\nname = \"a\"\nbins = [\"62\"]\n[[issuers]]\nname = \"b\"\nbins = [\"622202\"]\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.issuer_for("6222020000000000001"), Some(1));
        assert_eq!(c.issuer_for("6200000000000000001"), Some(0));
        assert_eq!(c.issuer_for("4000000000000000001"), None);
    }

    #[test]
    fn problems_name_file_line_and_key() {
        let text = "listen = \"nowhere\"\n[rules]\nissuer_timeout = \"ten\"\ntime_zone = \"Mars/Olympus\"\n[advice]\nretry_initial = \"0s\"\n[[issuers]]\nbins = [\"62x\"]\nport = 1\n";
        let problems = Config::parse(text, "s.toml").unwrap_err().to_string();
        for expected in [
            "s.toml:1: listen: \"nowhere\" is not an address",
            "s.toml:3: rules.issuer_timeout: \"ten\" is not a duration",
            "s.toml:4: rules.time_zone: \"Mars/Olympus\" is not an IANA time zone",
            "s.toml:6: advice.retry_initial: must be above zero",
            "s.toml:8: issuers[0].bins: \"62x\" is not a PAN prefix",
            "s.toml:9: issuers[0].port: unknown key",
        ] {
            assert!(
                problems.contains(expected),
                "{expected:?} missing from\n{problems}"
            );
        }
    }

    #[test]
    fn the_admin_listener_is_optional_and_needs_an_address_of_its_own() {
        assert_eq!(Config::default().admin.listen, None);
        let c = Config::parse("[admin]\nlisten = \"\"\n", "s.toml").unwrap();
        assert_eq!(c.admin.listen, None, "empty: not served");
        let c = Config::parse("[admin]\nlisten = \"127.0.0.1:9580\"\n", "s.toml").unwrap();
        assert_eq!(c.admin.listen.as_deref(), Some("127.0.0.1:9580"));
        let c = Config::parse(
            "listen = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            "s.toml",
        );
        assert!(c.is_ok(), "two ports of the system's choosing: {c:?}");
        for (text, expected) in [
            (
                "[admin]\nlisten = \"admin\"\n",
                "s.toml:2: admin.listen: \"admin\" is not an address",
            ),
            (
                "[admin]\nlisten = \"127.0.0.1:8583\"\n",
                "s.toml:2: admin.listen: \"127.0.0.1:8583\" takes the terminal listener's port",
            ),
            (
                "[admin]\nlisten = \"0.0.0.0:8583\"\n",
                "s.toml:2: admin.listen: \"0.0.0.0:8583\" takes the terminal listener's port",
            ),
        ] {
            let problems = Config::parse(text, "s.toml").unwrap_err().to_string();
            assert!(problems.contains(expected), "{problems}");
        }
    }

    #[test]
    fn issuers_have_their_own_names_bins_and_a_usable_address() {
        let text = "[limits]\nidle_timeout = \"0s\"\n[[issuers]]\nname = \"a\"\nbins = [\"622202\"]\naddress = \"127.0.0.1:70000\"\n[[issuers]]\nname = \"a\"\nbins = [\"621700\", \"622202\"]\naddress = \":9583\"\necho_interval = \"0s\"\n";
        let problems = Config::parse(text, "s.toml").unwrap_err().to_string();
        for expected in [
            "s.toml:2: limits.idle_timeout: must be above zero",
            "s.toml:6: issuers[0].address: \"127.0.0.1:70000\" is not host:port",
            "s.toml:8: issuers[1].name: \"a\" names an issuer above already",
            "s.toml:9: issuers[1].bins: \"622202\" is issuer \"a\"'s already",
            "s.toml:10: issuers[1].address: \":9583\" is not host:port",
            "s.toml:11: issuers[1].echo_interval: must be above zero",
        ] {
            assert!(
                problems.contains(expected),
                "{expected:?} missing from\n{problems}"
            );
        }
    }
}
