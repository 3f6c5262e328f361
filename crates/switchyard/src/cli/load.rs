//! `switchyard load`: drive a running switch with simulated terminals.

use std::time::Duration;

use clap::Args;
use iso8583::keys::DerivationKey;
use loadgen::closed::{Mix, Plan, run as run_plan};

use super::Failure;

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// A scenario file (`config/load/*.toml`): open loop, the mix, settlement
    /// at the end. Without one, terminals send back to back (closed loop).
    pub scenario: Option<std::path::PathBuf>,
    /// Also write a scenario's report as JSON to this file.
    #[arg(long, value_name = "FILE", requires = "scenario")]
    pub json: Option<std::path::PathBuf>,
    /// Also write a scenario's report as one self-contained HTML page (the
    /// scenario, the machine, the table, latency charts) to this file.
    #[arg(long, value_name = "FILE", requires = "scenario")]
    pub html: Option<std::path::PathBuf>,
    /// Also report the CPU time per transaction of a process on this
    /// machine, with its children (a PostgreSQL postmaster and its
    /// backends): `NAME=PID`, e.g. `--cpu postgres=4242 --cpu switch=4300`.
    /// Repeatable. Without it, only the load generator's own time is named.
    #[arg(long, value_name = "NAME=PID", requires = "scenario", value_parser = parse_part)]
    pub cpu: Vec<(String, u32)>,
    /// The switch's terminal address.
    #[arg(long, default_value = "127.0.0.1:8583")]
    pub target: String,
    /// The closed loop's terminals (T0000001 upwards), each with one
    /// request in flight [default: 16].
    #[arg(long)]
    pub terminals: Option<usize>,
    /// Their merchant [default: 898310048160001].
    #[arg(long)]
    pub merchant: Option<String>,
    /// How long the closed loop sends, e.g. 10s [default: 10s].
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Cards used round robin, 6222020000000000001 upwards [default: 10000].
    #[arg(long)]
    pub cards: Option<u64>,
    /// Fen per purchase [default: 100].
    #[arg(long)]
    pub amount: Option<u64>,
    /// What each terminal sends: purchases, or void-heavy (a purchase and
    /// its void, a purchase and its reversal) [default: purchases].
    #[arg(long, value_enum)]
    pub mix: Option<MixArg>,
    /// How long a terminal waits for its connection and sign-on, and for
    /// each reply, before it stops and says so; the run ends at most this
    /// long after its duration [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub reply_timeout: Option<Duration>,
    /// The switch's terminal master derivation key: 32 hex characters (16
    /// bytes) in FILE. Each terminal derives its master key from it and its
    /// terminal id, takes working keys at sign-on (F62), MACs its requests
    /// (F64) and checks its replies' MACs: a reply whose MAC is missing or
    /// wrong is counted as a MAC failure, and fails the run (a reversible
    /// request's is reversed with reason A0). Without the flag, the key comes
    /// from the environment variable SWITCHYARD_TERMINAL_MASTER_DERIVATION_KEY
    /// (the 32 hex characters themselves); without either, terminals hold no
    /// keys and send no MACs.
    #[arg(long, value_name = "FILE")]
    pub terminal_master_derivation_key_file: Option<std::path::PathBuf>,
}

/// The environment variable that holds the terminal master derivation key
/// when no key file is given: the switch's.
pub const DERIVATION_KEY_VAR: &str = switch::keys::TERMINAL_ENV;

/// The terminal master derivation key from `file` (its text), else from the
/// environment variable's value `var`; `None` when neither is given. A
/// malformed key is refused with where it came from and what is expected,
/// never with its text (a secret), as the switch refuses it.
fn derivation_key(
    file: Option<(&std::path::Path, std::io::Result<String>)>,
    var: Option<std::ffi::OsString>,
) -> Result<Option<DerivationKey>, Failure> {
    let (source, text) = match (file, var) {
        (Some((path, text)), _) => {
            let source = format!("--terminal-master-derivation-key-file {}", path.display());
            let text = text.map_err(|e| Failure::Input(anyhow::anyhow!("{source}: {e}")))?;
            (source, text)
        }
        // Empty is unset, as for the switch: docker compose passes
        // `${VAR:-}` for a key not wanted.
        (None, Some(value)) if value.to_string_lossy().trim().is_empty() => return Ok(None),
        (None, Some(value)) => {
            let text = value.into_string().map_err(|_| {
                Failure::Input(anyhow::anyhow!(
                    "{DERIVATION_KEY_VAR}: not text; the terminal master derivation key is 32 hex \
                     characters"
                ))
            })?;
            (DERIVATION_KEY_VAR.to_string(), text)
        }
        (None, None) => return Ok(None),
    };
    switch::keys::derivation_key_from_hex(&text, &source)
        .map(Some)
        .map_err(|e| Failure::Input(anyhow::anyhow!("{e}")))
}

impl LoadArgs {
    /// The terminals' derivation key, from the key file or the environment.
    fn derivation_key(&self) -> Result<Option<DerivationKey>, Failure> {
        let file = self
            .terminal_master_derivation_key_file
            .as_deref()
            .map(|path| (path, std::fs::read_to_string(path)));
        derivation_key(file, std::env::var_os(DERIVATION_KEY_VAR))
    }
}

impl LoadArgs {
    /// The closed loop's flags that were given: a scenario file sets its
    /// terminals, duration, mix and the rest itself.
    fn closed_loop_flags(&self) -> Vec<&'static str> {
        [
            ("--terminals", self.terminals.is_some()),
            ("--merchant", self.merchant.is_some()),
            ("--duration", self.duration.is_some()),
            ("--cards", self.cards.is_some()),
            ("--amount", self.amount.is_some()),
            ("--mix", self.mix.is_some()),
            ("--reply-timeout", self.reply_timeout.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect()
    }
}

/// `--mix`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum MixArg {
    /// Purchases only.
    Purchases,
    /// Purchase + void, purchase + reversal.
    VoidHeavy,
}

/// `--cpu NAME=PID`.
fn parse_part(text: &str) -> Result<(String, u32), String> {
    let (name, pid) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected NAME=PID, e.g. postgres=4242"))?;
    let pid = pid
        .trim()
        .parse::<u32>()
        .map_err(|_| format!("{text:?}: {pid:?} is not a process id"))?;
    let name = name.trim();
    // Names go into the JSON report as they are.
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " _.-".contains(c))
    {
        return Err(format!(
            "{text:?}: a part's name is letters, digits, spaces, '_', '.' or '-'"
        ));
    }
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return Err(format!("{text:?}: no process {pid} on this machine"));
    }
    Ok((name.to_string(), pid))
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    settings::parse_duration(text).ok_or_else(|| format!("{text:?} is not a duration like 10s"))
}

/// Where a scenario's report goes besides stdout.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outputs<'a> {
    /// `--json FILE`.
    pub json: Option<&'a std::path::Path>,
    /// `--html FILE`.
    pub html: Option<&'a std::path::Path>,
}

impl Outputs<'_> {
    /// Refuses, before a run, a report file that could not be written after
    /// it (a folder that is not there, a file not ours to write).
    pub fn writable(&self) -> Result<(), Failure> {
        for (flag, path) in [("--json", self.json), ("--html", self.html)] {
            let Some(path) = path else { continue };
            let there = path.exists();
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .map_err(|e| Failure::Input(anyhow::anyhow!("{flag} {}: {e}", path.display())))?;
            if !there {
                // Tried, not kept: a run that fails leaves no empty report.
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(())
    }
}

/// Plays a scenario and prints its report; returns the batches whose
/// settlement did not balance or was not answered with totals (see
/// [`all_balanced`]). (Failed connections are counted in the report: a fault
/// scenario makes them on purpose.)
///
/// `meter` names the parts of the system under test whose CPU time the
/// report gives per transaction (see [`loadgen::cpu`]).
pub async fn play(
    target: &str,
    scenario: loadgen::scenario::Scenario,
    outputs: Outputs<'_>,
    meter: &loadgen::cpu::Meter,
) -> Result<Vec<(String, u32)>, Failure> {
    let name = scenario.name.clone();
    let count = scenario.count();
    let keyed = scenario.derivation_key.is_some();
    let p99_target = scenario.p99_target;
    let machine = loadgen::machine::Machine::here();
    let before = meter.read();
    let run = loadgen::scenario::run(target, scenario.clone(), meter)
        .await
        .map_err(|e| Failure::Other(anyhow::anyhow!(e)))?;
    let cpu = meter.usage(&before, &meter.read(), run.report.total().count());
    // MAC failures are said when the terminals held keys (none to fail
    // otherwise).
    let macs = if keyed || run.mac_failures > 0 {
        format!(" {} MAC failures;", run.mac_failures)
    } else {
        String::new()
    };
    println!(
        "scenario {name}: {count} requests scheduled in {:.1} s; {} connection failures;{macs} settlements balanced {}/{}",
        run.elapsed.as_secs_f64(),
        run.errors,
        run.balanced.0,
        run.balanced.1
    );
    if run.resets > 0 || run.reconnects > 0 {
        // Resets are the terminals' own doing: reported here, not as failures.
        println!(
            "terminals: {} connection resets injected; {} reconnections",
            run.resets, run.reconnects
        );
    }
    if run.steps.len() > 1 {
        println!(
            "{:>10} {:>10} {:>9} {:>9} {:>12} {:>12}",
            "scheduled", "achieved", "p50 ms", "p99 ms", "CPU µs/txn", "cores busy"
        );
        for step in &run.steps {
            let (cpu, busy) = step.cpu_cells();
            println!(
                "{:>8.0}/s {:>8.0}/s {:>9.2} {:>9.2} {cpu:>12} {busy:>12}",
                step.rate,
                step.achieved,
                step.p50.as_secs_f64() * 1000.0,
                step.p99.as_secs_f64() * 1000.0
            );
        }
        match run.saturation(p99_target) {
            Some(rate) => println!(
                "saturation: {rate:.0}/s sustained (p99 under {} ms)",
                p99_target.as_millis()
            ),
            None => println!(
                "saturation: no step sustained (p99 under {} ms)",
                p99_target.as_millis()
            ),
        }
    }
    print!("{}", run.report.table());
    if let Some(cpu) = &cpu {
        println!("{}", cpu.line());
    }
    if let Some(path) = outputs.json {
        let text = format!(
            "{{\"scenario\": {name:?}, \"scheduled\": {count}, \"elapsed_s\": {:.3}, \"connection_failures\": {}, \"mac_failures\": {}, \"resets_injected\": {}, \"reconnections\": {}, \"settlements\": {{\"balanced\": {}, \"settled\": {}, \"unbalanced\": [{}]}}, \"report\": {}, \"seconds\": {}, \"steps\": [{}], \"cpu\": {}}}\n",
            run.elapsed.as_secs_f64(),
            run.errors,
            run.mac_failures,
            run.resets,
            run.reconnects,
            run.balanced.0,
            run.balanced.1,
            run.unbalanced
                .iter()
                .map(|(t, b)| format!("{{\"terminal\": {t:?}, \"batch\": {b}}}"))
                .collect::<Vec<_>>()
                .join(", "),
            run.report.to_json(),
            run.timeline.to_json(),
            run.steps
                .iter()
                .map(|s| format!(
                    "{{\"rate\": {:.0}, \"achieved\": {:.1}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"cpu\": {}}}",
                    s.rate,
                    s.achieved,
                    s.p50.as_secs_f64() * 1e3,
                    s.p99.as_secs_f64() * 1e3,
                    s.cpu.as_ref().map_or("null".to_string(), |c| c.to_json())
                ))
                .collect::<Vec<_>>()
                .join(", "),
            cpu.as_ref().map_or("null".to_string(), |c| c.to_json())
        );
        std::fs::write(path, text)
            .map_err(|e| Failure::Other(anyhow::anyhow!("{}: {e}", path.display())))?;
    }
    if let Some(path) = outputs.html {
        let page = loadgen::html::render(&loadgen::html::Page {
            scenario: &scenario,
            run: &run,
            machine: &machine,
            cpu: cpu.as_ref(),
            version: env!("CARGO_PKG_VERSION"),
            generated: &chrono::Local::now()
                .format("%Y-%m-%d %H:%M:%S %:z")
                .to_string(),
        });
        std::fs::write(path, page)
            .map_err(|e| Failure::Other(anyhow::anyhow!("{}: {e}", path.display())))?;
    }
    macs_verified(run.mac_failures, &run.unbalanced)?;
    Ok(run.unbalanced)
}

/// An error for replies whose MAC failed (reported and written out by
/// then): no fault a scenario injects makes them, so a run with any is not
/// clean. The settlements that did not balance are said with them.
fn macs_verified(mac_failures: u64, unbalanced: &[(String, u32)]) -> Result<(), Failure> {
    if mac_failures == 0 {
        return Ok(());
    }
    let mut said = format!(
        "{mac_failures} replies with a missing or wrong MAC (F64): the terminals took none of \
         them as the switch's answer (a reversible request was reversed with reason A0); the \
         report's MAC codes say which kinds"
    );
    if let Err(settlements) = all_balanced(unbalanced) {
        said.push_str(&format!("\n{settlements}"));
    }
    Err(Failure::Other(anyhow::anyhow!("{said}")))
}

/// An error for settlements that did not balance: which batches, and the
/// command that shows what the terminal and the switch differ on.
pub fn all_balanced(batches: &[(String, u32)]) -> Result<(), Failure> {
    let Some((terminal, batch)) = batches.first() else {
        return Ok(());
    };
    let shown: Vec<String> = batches
        .iter()
        .take(5)
        .map(|(terminal, batch)| format!("{terminal} batch {batch:06}"))
        .collect();
    let more = match batches.len().saturating_sub(shown.len()) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    Err(Failure::Other(anyhow::anyhow!(
        "{} settlement(s) did not balance, or were not answered with totals: {}{more}; \
         `switchyard settlement report --terminal {terminal} --batch {batch}` lists what the terminal uploaded and the journal counted",
        batches.len(),
        shown.join(", ")
    )))
}

/// `switchyard load`.
pub async fn run(args: &LoadArgs) -> Result<(), Failure> {
    // Refused before any connection, as every malformed input is.
    let derivation_key = args.derivation_key()?;
    if let Some(path) = &args.scenario {
        let given = args.closed_loop_flags();
        if !given.is_empty() {
            return Err(Failure::Input(anyhow::anyhow!(
                "{} belong to the closed loop (no scenario file); {} sets its terminals, \
                 duration, mix, merchant, cards, amounts and reply_timeout itself: change them there",
                given.join(", "),
                path.display()
            )));
        }
        let mut scenario = loadgen::scenario::Scenario::load(path)
            .map_err(|p| Failure::Input(anyhow::anyhow!("{p}")))?;
        scenario.derivation_key = derivation_key;
        let outputs = Outputs {
            json: args.json.as_deref(),
            html: args.html.as_deref(),
        };
        outputs.writable()?;
        // The switch is another process, here or elsewhere: what is not
        // named (this process, and the processes given) is "elsewhere".
        let mut parts: Vec<(String, loadgen::cpu::Source)> = args
            .cpu
            .iter()
            .map(|(name, pid)| (name.clone(), loadgen::cpu::Source::Tree(*pid)))
            .collect();
        parts.push(("load generator".into(), loadgen::cpu::Source::Rest));
        let unbalanced = play(
            &args.target,
            scenario,
            outputs,
            &loadgen::cpu::Meter::new(parts),
        )
        .await?;
        return all_balanced(&unbalanced);
    }
    let terminals = args.terminals.unwrap_or(16);
    let keyed = derivation_key.is_some();
    let outcome = run_plan(Plan {
        target: args.target.clone(),
        terminals,
        merchant: args
            .merchant
            .clone()
            .unwrap_or_else(|| "898310048160001".into()),
        duration: args.duration.unwrap_or(Duration::from_secs(10)),
        cards: args.cards.unwrap_or(10_000),
        amount: args.amount.unwrap_or(100),
        mix: match args.mix.unwrap_or(MixArg::Purchases) {
            MixArg::Purchases => Mix::Purchases,
            MixArg::VoidHeavy => Mix::VoidHeavy,
        },
        reply_timeout: args
            .reply_timeout
            .unwrap_or(loadgen::scenario::DEFAULT_REPLY_TIMEOUT),
        derivation_key,
    })
    .await;
    let ms = |q: f64| outcome.latency.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "terminals {:>3}  requests {:>8}  approved {:>8}  failed {}  rate {:>8.0}/s  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        terminals,
        outcome.answered,
        outcome.approved,
        outcome.failures.len(),
        outcome.rate(),
        ms(0.5),
        ms(0.99),
        outcome.latency.max() as f64 / 1000.0
    );
    if !outcome.codes.is_empty() {
        println!("response codes  {}", outcome.codes_line());
    }
    if keyed || outcome.mac_failures > 0 {
        // Each stopped its terminal: the failures below name them.
        println!("MAC failures    {}", outcome.mac_failures);
    }
    verdict(&outcome, terminals, keyed)
}

/// The run fails when a terminal stopped early (each cause said once, with
/// its terminals), or when requests were answered and none approved.
fn verdict(
    outcome: &loadgen::closed::Outcome,
    terminals: usize,
    keyed: bool,
) -> Result<(), Failure> {
    let mut problems = Vec::new();
    if !outcome.failures.is_empty() {
        let mut said = format!(
            "{} of {terminals} terminals stopped early:",
            outcome.failures.len()
        );
        for (cause, ids) in outcome.causes() {
            let more = match ids.len().saturating_sub(4) {
                0 => String::new(),
                n => format!(" and {n} more"),
            };
            let shown: Vec<&str> = ids.iter().take(4).copied().collect();
            said.push_str(&format!("\n  {}{more}: {cause}", shown.join(", ")));
        }
        problems.push(said);
    }
    if let Some(nothing) = outcome.nothing_approved() {
        problems.push(format!(
            "{nothing}: every request was refused (97 terminal disabled, 03 merchant unknown, \
             91 issuer unavailable, 14 or 54 the cards, A0 the MAC, ...; the codes above say \
             which); the rate above is of refusals"
        ));
    }
    if !keyed && outcome.codes.contains_key("A0") {
        problems.push(format!(
            "A0 is the switch's MAC check (K3): it hands out working keys at sign-on and takes \
             only MACed requests; give load the derivation key the terminals' master keys come \
             from (--terminal-master-derivation-key-file FILE or {DERIVATION_KEY_VAR})"
        ));
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(Failure::Other(anyhow::anyhow!("{}", problems.join("\n"))))
}

#[cfg(test)]
mod tests {
    use super::{DERIVATION_KEY_VAR, all_balanced, derivation_key, macs_verified, parse_part};
    use std::path::Path;

    const KEY: &str = "0123456789ABCDEFFEDCBA9876543210";

    fn refused(file: Option<(&Path, std::io::Result<String>)>, var: Option<&str>) -> String {
        match derivation_key(file, var.map(Into::into)) {
            Err(e) => {
                assert_eq!(e.exit_code(), 2, "{e}");
                e.to_string()
            }
            Ok(_) => panic!("a malformed key was taken"),
        }
    }

    #[test]
    fn the_derivation_key_comes_from_the_file_else_the_environment_else_none() {
        let file = Path::new("/keys/tmdk.hex");
        // The check value of the test key, published: 08D7B4.
        let kcv = |k: Option<iso8583::keys::DerivationKey>| k.unwrap().check_value()[..3].to_vec();
        let from_file = derivation_key(Some((file, Ok(format!("{KEY}\n")))), None).unwrap();
        assert_eq!(kcv(from_file), [0x08, 0xD7, 0xB4]);
        let lower = KEY.to_lowercase();
        let from_var = derivation_key(None, Some(lower.into())).unwrap();
        assert_eq!(kcv(from_var), [0x08, 0xD7, 0xB4]);
        // The file wins over the variable, even a malformed variable.
        assert!(
            derivation_key(Some((file, Ok(KEY.into()))), Some("nonsense".into()))
                .unwrap()
                .is_some()
        );
        assert!(derivation_key(None, None).unwrap().is_none());
    }

    #[test]
    fn a_malformed_derivation_key_is_refused_with_where_it_came_from_and_not_said() {
        let file = Path::new("/keys/tmdk.hex");
        let short = &KEY[..31];
        let said = refused(Some((file, Ok(short.into()))), None);
        assert_eq!(
            said,
            "--terminal-master-derivation-key-file /keys/tmdk.hex: 31 characters; the terminal \
             master derivation key is 32 hex characters (16 bytes, a double-length DES key)"
        );
        let not_hex = format!("{}XY", &KEY[..30]);
        let said = refused(None, Some(&not_hex));
        assert!(
            said.starts_with(&format!(
                "{DERIVATION_KEY_VAR}: a character that is not a hex digit; the terminal master"
            )),
            "{said}"
        );
        assert!(!said.contains(&KEY[..30]), "the key said: {said}");
        assert!(matches!(
            derivation_key(None, Some(std::ffi::OsString::from(" "))),
            Ok(None)
        ));
        assert!(
            refused(None, Some("0123"))
                .starts_with(&format!("{DERIVATION_KEY_VAR}: 4 characters;"))
        );
        // Two equal halves are single DES, refused as the switch refuses it.
        let weak = format!("{}{}", &KEY[..16], &KEY[..16]);
        assert!(refused(None, Some(&weak)).contains("two halves are the same"));
        let unreadable = std::io::Error::new(std::io::ErrorKind::NotFound, "not there");
        assert_eq!(
            refused(Some((file, Err(unreadable))), None),
            "--terminal-master-derivation-key-file /keys/tmdk.hex: not there"
        );
    }

    #[test]
    fn a0s_to_a_keyless_load_say_which_key_to_give() {
        let outcome = |codes: &[(&str, u64)]| loadgen::closed::Outcome {
            answered: codes.iter().map(|(_, n)| n).sum(),
            approved: codes
                .iter()
                .filter(|(c, _)| *c == "00")
                .map(|(_, n)| n)
                .sum(),
            codes: codes.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
            mac_failures: 0,
            failures: Vec::new(),
            elapsed: std::time::Duration::from_secs(1),
            latency: hdrhistogram::Histogram::new(3).unwrap(),
        };
        let said = super::verdict(&outcome(&[("A0", 12)]), 2, false)
            .unwrap_err()
            .to_string();
        assert!(said.contains("A0 the MAC"), "{said}");
        assert!(
            said.contains("--terminal-master-derivation-key-file"),
            "{said}"
        );
        // Given the key, an A0 is the switch's word on a MAC, not a hint.
        let said = super::verdict(&outcome(&[("00", 5), ("A0", 1)]), 2, true);
        assert!(said.is_ok());
        assert!(super::verdict(&outcome(&[("00", 5)]), 2, false).is_ok());
    }

    #[test]
    fn a_run_with_mac_failures_fails_and_says_its_unbalanced_settlements_too() {
        assert!(macs_verified(0, &[]).is_ok());
        let said = macs_verified(3, &[]).unwrap_err().to_string();
        assert!(
            said.starts_with("3 replies with a missing or wrong MAC (F64)"),
            "{said}"
        );
        let said = macs_verified(1, &[("T0000001".into(), 2)])
            .unwrap_err()
            .to_string();
        assert!(
            said.contains("\n1 settlement(s) did not balance, or were not answered with totals: T0000001 batch 000002"),
            "{said}"
        );
    }

    #[test]
    fn unbalanced_settlements_are_named_with_the_command_that_shows_them() {
        assert!(all_balanced(&[]).is_ok());
        let batches: Vec<(String, u32)> = (1..=7).map(|i| (format!("T000000{i}"), 3)).collect();
        let message = all_balanced(&batches).unwrap_err().to_string();
        assert!(
            message.starts_with("7 settlement(s) did not balance"),
            "{message}"
        );
        assert!(
            message.contains("T0000001 batch 000003, T0000002 batch 000003"),
            "{message}"
        );
        assert!(
            message.contains("T0000005 batch 000003 and 2 more"),
            "{message}"
        );
        assert!(!message.contains("T0000006"), "{message}");
        assert!(
            message.contains("`switchyard settlement report --terminal T0000001 --batch 3`"),
            "{message}"
        );
    }

    #[test]
    fn a_cpu_part_is_a_plain_name_and_a_running_process() {
        let me = std::process::id();
        assert_eq!(
            parse_part(&format!("postgres={me}")),
            Ok(("postgres".to_string(), me))
        );
        assert_eq!(
            parse_part(&format!(" the switch = {me}")),
            Ok(("the switch".to_string(), me))
        );
        for bad in [
            "postgres".to_string(),
            "postgres=abc".to_string(),
            format!("={me}"),
            format!("a\"b={me}"),
            "postgres=4294967295".to_string(),
        ] {
            assert!(parse_part(&bad).is_err(), "{bad} accepted");
        }
        assert!(
            parse_part("postgres=4294967295")
                .unwrap_err()
                .contains("no process 4294967295")
        );
    }
}
