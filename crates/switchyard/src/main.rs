//! `switchyard`: the one binary of the Switchyard acquirer switch.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

/// mimalloc, not glibc's malloc: under load glibc's allocator (with the
/// consolidation of its free lists) took about a tenth of the switch's CPU,
/// for the rows sqlx decodes, the frames and the batches.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "switchyard", version, about = "Switchyard acquirer switch")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the switch: terminals in, issuers out, everything journalled.
    Serve(cli::serve::ServeArgs),
    /// The simulated issuer (iso87), a server of its own.
    Issuer(cli::issuer::IssuerArgs),
    /// The whole product on a private PostgreSQL: a scripted day and the money check, or --serve.
    Demo(cli::demo::DemoArgs),
    /// Drive a running switch with simulated terminals and report rate and latency.
    Load(cli::load::LoadArgs),
    /// Transactions in the journal.
    Txn {
        #[command(subcommand)]
        command: TxnCommand,
    },
    /// Settlements of terminal batches.
    Settlement {
        #[command(subcommand)]
        command: SettlementCommand,
    },
    /// The money check: the journal against the issuer's clearing file.
    Reconcile(cli::reconcile::ReconcileArgs),
    /// Apply the switch's database migrations.
    Migrate(cli::serve::MigrateArgs),
    /// Check config files: every problem with file, line and key.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Terminal fleet administration.
    Terminals {
        #[command(subcommand)]
        command: TerminalsCommand,
    },
    /// Decode one ISO 8583 frame and print it as JSON.
    Decode(cli::wire::DecodeArgs),
    /// Read a message as JSON on stdin and print its wire frame as hex.
    Encode(cli::wire::EncodeArgs),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// List every problem in a config file and exit non-zero when there is one.
    Check(cli::admin::CheckArgs),
}

#[derive(Subcommand)]
enum TxnCommand {
    /// A transaction with its whole history (masked PAN): by --rrn, or --terminal --batch --stan.
    Show(cli::ops::ShowArgs),
}

#[derive(Subcommand)]
enum SettlementCommand {
    /// What matched between a batch's upload and the journal, and what only one side had.
    Report(cli::ops::ReportArgs),
}

#[derive(Subcommand)]
enum TerminalsCommand {
    /// Load terminals and merchants from a CSV file.
    Import(cli::admin::ImportArgs),
    /// Print terminals' master keys (TMK) with check values, for the key-loading device.
    MasterKey(cli::admin::MasterKeyArgs),
    /// Forget every terminal's working keys, to run without a terminal master derivation key (or with another).
    ForgetKeys(cli::admin::ForgetKeysArgs),
}

/// Of a `SWITCHYARD_LOG` value, a directive that is neither a level nor
/// `target=level`: `EnvFilter` reads a bare word as a target to show (at
/// every level) and shows nothing else, so `verbose` shows nothing at all.
fn bare_log_target(value: &str) -> Option<&str> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    value.split(',').map(str::trim).find(|d| {
        !d.is_empty() && !d.contains('=') && !LEVELS.contains(&d.to_ascii_lowercase().as_str())
    })
}

/// A line on stderr, lost when stderr's reader is gone (where `eprintln!`
/// would panic).
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn init_logging() {
    const DEFAULT: &str = "info,sqlx=warn";
    let set = std::env::var("SWITCHYARD_LOG").ok();
    if let Some(target) = set.as_deref().and_then(bare_log_target) {
        // Said on stderr itself: the filter asked for may hide any log line.
        say(format_args!(
            "SWITCHYARD_LOG: {target:?} is no level (trace, debug, info, warn, error, off): it is read as a module whose lines alone are shown, at every level"
        ));
    }
    let filter = set
        .as_deref()
        .and_then(|value| tracing_subscriber::EnvFilter::try_new(value).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(DEFAULT));
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let writer = if terminal {
        tracing_subscriber::fmt::writer::BoxMakeWriter::new(|| ClearingLine {
            cleared: false,
            stderr: std::io::stderr(),
        })
    } else {
        tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr)
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false)
        .with_ansi(terminal)
        // A log line that cannot be written (stderr's reader gone) is lost,
        // nothing more. Said, it would be said on that same stderr, and
        // `eprintln!` panics there: in whichever task logged, the signal
        // handler or an issuer link, so that SIGTERM no longer stopped the
        // switch and a link never came back.
        .log_internal_errors(false)
        .init();
}

/// Stderr on a terminal, where a log line first clears the line it lands
/// on: a scenario's progress line may be there (it is redrawn within the
/// second), and the log line would otherwise continue it.
struct ClearingLine {
    cleared: bool,
    stderr: std::io::Stderr,
}

impl std::io::Write for ClearingLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.cleared {
            self.stderr.write_all(b"\r\x1b[K")?;
            self.cleared = true;
        }
        self.stderr.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stderr.flush()
    }
}

/// The runtime a command runs on. On one thread a message is handed from
/// task to task without waking another thread (no futex, no context switch
/// on the way): the switch and the issuer run so unless their config's
/// `limits.threads` says otherwise; the load generator, which shares the
/// machine with the switch it measures, always (it never takes more than
/// one core from it); the demo gives its issuer and switch a thread each
/// (`cli::demo`); the operator commands need no more than one.
fn runtime(command: &Command) -> tokio::runtime::Runtime {
    let threads = match command {
        Command::Serve(a) => cli::serve::threads(a),
        Command::Issuer(a) => cli::issuer::threads(a),
        _ => 1,
    };
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    builder.enable_all().build().expect("a tokio runtime")
}

/// Whether a panic is `println!`'s on a standard output its reader closed
/// (`switchyard load smoke.toml | head -1`): std panics "failed printing to
/// stdout: Broken pipe (os error 32)".
fn stdout_closed(payload: &(dyn std::any::Any + Send)) -> bool {
    let text = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("");
    text.strip_prefix("failed printing to stdout: ")
        .is_some_and(|cause| cause.starts_with("Broken pipe"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Every command prints with `println!`, which panics when its reader
    // has gone: here, in one place, that panic says nothing, unwinds (a
    // private PostgreSQL is stopped on the way) and ends the command as a
    // closed standard output does.
    let said = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !stdout_closed(info.payload()) {
            said(info);
        }
    }));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| command(args)))
        .unwrap_or_else(|panic| {
            if stdout_closed(panic.as_ref()) {
                Err(cli::Failure::StdoutClosed)
            } else {
                std::panic::resume_unwind(panic)
            }
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(cli::Failure::StdoutClosed) => ExitCode::from(cli::STDOUT_CLOSED),
        Err(e) => {
            say(format_args!("error: {e:#}"));
            ExitCode::from(e.exit_code())
        }
    }
}

/// Runs one command.
fn command(args: Args) -> Result<(), cli::Failure> {
    match args.command {
        Command::Decode(a) => cli::wire::decode(&a),
        Command::Encode(a) => cli::wire::encode(&a),
        Command::Config {
            command: ConfigCommand::Check(a),
        } => cli::admin::check(&a),
        command => {
            init_logging();
            runtime(&command).block_on(async move {
                match command {
                    Command::Serve(a) => cli::serve::serve(&a).await,
                    Command::Issuer(a) => cli::issuer::run(&a).await,
                    Command::Demo(a) => cli::demo::run(&a).await,
                    Command::Load(a) => cli::load::run(&a).await,
                    Command::Reconcile(a) => cli::reconcile::run(&a).await,
                    Command::Txn {
                        command: TxnCommand::Show(a),
                    } => cli::ops::show(&a).await,
                    Command::Settlement {
                        command: SettlementCommand::Report(a),
                    } => cli::ops::report(&a).await,
                    Command::Migrate(a) => cli::serve::migrate(&a).await,
                    Command::Terminals {
                        command: TerminalsCommand::Import(a),
                    } => cli::admin::import(&a).await,
                    Command::Terminals {
                        command: TerminalsCommand::MasterKey(a),
                    } => cli::admin::master_key(&a).await,
                    Command::Terminals {
                        command: TerminalsCommand::ForgetKeys(a),
                    } => cli::admin::forget_keys(&a).await,
                    Command::Decode(_) | Command::Encode(_) | Command::Config { .. } => {
                        unreachable!("handled above")
                    }
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bare_log_target;

    #[test]
    fn a_log_directive_that_is_no_level_is_found() {
        assert_eq!(bare_log_target("verbose"), Some("verbose"));
        assert_eq!(bare_log_target("debug,chatty"), Some("chatty"));
        assert_eq!(bare_log_target("DEBUG,sqlx=warn"), None);
        assert_eq!(bare_log_target("switch::link=trace"), None);
    }
}
