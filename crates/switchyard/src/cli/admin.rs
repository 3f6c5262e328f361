//! `switchyard config check` and `switchyard terminals import`.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use clap::{Args, ValueEnum};
use switch::terminals::Fleet;

use super::Failure;
use super::serve::{config_or_default, migrated_pool};

/// What kind of file a config is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// The switch's config (`config/switchyard.toml`).
    Switch,
    /// The simulated issuer's config (`config/issuer-sim.toml`).
    Issuer,
    /// Terminals and merchants (`config/terminals.toml`).
    Terminals,
    /// A dialect table (`config/dialects/*.toml`).
    Dialect,
    /// A load scenario (`config/load/*.toml`).
    Scenario,
}

impl Kind {
    /// What a file of this kind is, for people.
    fn noun(self) -> &'static str {
        match self {
            Kind::Switch => "a switch config",
            Kind::Issuer => "an issuer config",
            Kind::Terminals => "a terminals file",
            Kind::Dialect => "a dialect table",
            Kind::Scenario => "a load scenario",
        }
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The file to check.
    pub file: PathBuf,
    /// What the file is; told from its keys (or its name) when not given.
    #[arg(long, value_enum)]
    pub kind: Option<Kind>,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// CSV with a header row: terminal_id,merchant_id[,merchant_name,mcc,enabled].
    /// A column left out (or an empty cell) keeps what is stored. A merchant
    /// the switch does not know is added only when its merchant_name is given.
    pub file: PathBuf,
    /// The switch's config file (for the database); default
    /// config/switchyard.toml when it exists.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// `switchyard terminals forget-keys`.
#[derive(clap::Args)]
pub struct ForgetKeysArgs {
    /// The switch's config file (for the database); default
    /// config/switchyard.toml when it exists.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Gives up K3 on purpose: every terminal's working keys and the recorded
/// derivation key are forgotten. Stop the switches first: each terminal
/// then signs on again, and gets keys only from a switch with a key.
pub async fn forget_keys(args: &ForgetKeysArgs) -> Result<(), Failure> {
    let (pool, _db) = migrated_pool(&config_or_default(args.config.as_deref())?).await?;
    let forgotten = match switch::k3::forget_keys(&pool)
        .await
        .context("forgetting the terminals' working keys")?
    {
        switch::k3::Forgot::Keys(n) => n,
        switch::k3::Forgot::Serving => {
            return Err(Failure::Input(anyhow!(
                "a switch is serving on this database: stop every `switchyard serve` on it \
                 first (a running switch goes on checking MACs under the keys it has read, \
                 and its terminals would hear 77 and unsealed replies as their keys go)"
            )));
        }
    };
    println!(
        "forgot the working keys of {forgotten} terminal(s) and the terminal master derivation \
         key's check value: a switch now starts without that key (terminals sign on again and \
         get none) or with another (they sign on again under it)"
    );
    Ok(())
}

/// `switchyard terminals master-key`.
#[derive(clap::Args)]
pub struct MasterKeyArgs {
    /// Terminal ids (F41).
    #[arg(required = true)]
    pub terminals: Vec<String>,
    /// The switch's config file (for keys.terminal_master_derivation_key_file);
    /// default config/switchyard.toml when it exists; else
    /// SWITCHYARD_TERMINAL_MASTER_DERIVATION_KEY.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Prints each terminal's master key (TMK) and its check value, for the
/// key-loading device (K3). The TMK is derived from the switch's terminal
/// master derivation key and the terminal id, as the switch derives it.
pub async fn master_key(args: &MasterKeyArgs) -> Result<(), Failure> {
    let default = PathBuf::from("config/switchyard.toml");
    let path = args
        .config
        .clone()
        .or_else(|| default.exists().then_some(default));
    let config = super::serve::config_or_default(path.as_deref())?;
    let file = config.keys.terminal_master_derivation_key_file.as_deref();
    let key = switch::keys::terminal_derivation_key(file)
        .map_err(|e| {
            let shown = path.as_deref().unwrap_or(Path::new("(no config)"));
            Failure::Input(anyhow!(
                "{}",
                key_problem(
                    shown,
                    "terminal_master_derivation_key_file",
                    file.is_some(),
                    e
                )
            ))
        })?
        .ok_or_else(|| {
            Failure::Input(anyhow!(
                "no terminal master derivation key: set keys.terminal_master_derivation_key_file \
                 in the config or {} (32 hex characters; `openssl rand -hex 16` makes one)",
                switch::keys::TERMINAL_ENV
            ))
        })?;
    for id in &args.terminals {
        if id.len() != 8 || !id.bytes().all(|b| (0x21..=0x7E).contains(&b)) {
            return Err(Failure::Input(anyhow!(
                "{id:?} is not a terminal id (8 printable characters)"
            )));
        }
    }
    // The check value `serve` logs and the journal keeps: a key file that
    // is not the switch's shows here, before a TMK is loaded anywhere.
    let check = key.check_value();
    let has_database = config.database.url.is_some()
        || std::env::var_os("DATABASE_URL").is_some()
        || config.database.embedded_data_dir.is_some();
    if has_database {
        // Compared with the journal the config names: TMKs of another key,
        // or of terminals it does not know, would only fail in the field.
        let (pool, _db) = migrated_pool(&config).await?;
        let recorded: Option<Vec<u8>> = sqlx::query_scalar("SELECT terminal_key_check FROM meta")
            .fetch_optional(&pool)
            .await
            .context("reading the journal's derivation key check value")?
            .flatten();
        if let Some(recorded) = recorded.filter(|r| r.get(..3) != Some(&check[..3])) {
            return Err(Failure::Input(anyhow!(
                "this derivation key (check value {}) is not the one the journal's terminals got \
                 their working keys under (check value {}): TMKs from it would not take their keys",
                hex::encode_upper(&check[..3]),
                hex::encode_upper(&recorded[..3.min(recorded.len())])
            )));
        }
        let known: Vec<String> = sqlx::query_scalar("SELECT id FROM terminals WHERE id = ANY($1)")
            .bind(&args.terminals)
            .fetch_all(&pool)
            .await
            .context("reading the terminals")?;
        let unknown: Vec<&str> = args
            .terminals
            .iter()
            .filter(|id| !known.contains(id))
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            return Err(Failure::Input(anyhow!(
                "not terminals of the journal: {} (`terminals import` or the terminals file adds them)",
                unknown.join(", ")
            )));
        }
    } else {
        tracing::warn!(
            "not compared with a journal (the config names no database): check the value below \
             against the one `serve` logs at start"
        );
    }
    println!(
        "terminal master derivation key check value {}",
        hex::encode_upper(&check[..3])
    );
    for id in &args.terminals {
        let tmk = key.master_key(id).clear();
        let check = iso8583::keys::check_value(&tmk);
        println!(
            "{id} {} check value {}",
            hex::encode_upper(tmk),
            hex::encode_upper(&check[..3])
        );
    }
    Ok(())
}

/// The kind of config file at `path`: from the keys at its top (a dialect
/// has `[fields]`, a scenario `[mix]` or `steps`, the issuer's `[[cards]]`,
/// the terminals' `[[merchants]]`), else from its file name.
pub fn guess(path: &Path) -> Kind {
    let keys = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| settings::top_level_keys(&text))
        .unwrap_or_default();
    let has = |key: &str| keys.iter().any(|k| k == key);
    if has("fields") {
        return Kind::Dialect;
    }
    if has("mix") || has("steps") {
        return Kind::Scenario;
    }
    if has("cards") || has("faults") {
        return Kind::Issuer;
    }
    if has("merchants") {
        return Kind::Terminals;
    }
    if has("issuers") || has("rules") || has("advice") || has("dialects") {
        return Kind::Switch;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let parent = path
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    if parent == "dialects" {
        Kind::Dialect
    } else if parent == "load" {
        Kind::Scenario
    } else if name.contains("issuer") {
        Kind::Issuer
    } else if name.contains("terminals") {
        Kind::Terminals
    } else {
        Kind::Switch
    }
}

/// Every problem of one file, as lines; empty when it is fine.
pub fn problems(path: &Path, kind: Kind) -> Vec<String> {
    let lines = |text: String| text.lines().map(str::to_string).collect::<Vec<_>>();
    match kind {
        Kind::Switch => {
            // The files it names are checked even when the config itself
            // has problems, so that one check lists them all.
            let (mut found, dialects_read) = named_files_problems(path);
            match switch::Config::load(path) {
                Err(p) => {
                    let mut own = lines(p.to_string());
                    own.append(&mut found);
                    own
                }
                Ok(config) => {
                    // Dialects that read: do they carry what the switch needs?
                    if dialects_read {
                        if let Err(switch::StartError::DialectFit(misfits)) =
                            switch::load_dialects(&config)
                        {
                            found.extend(misfits);
                        }
                    }
                    found
                }
            }
        }
        Kind::Issuer => match issuer_sim::IssuerConfig::load(path) {
            Err(e) => {
                // Its key file too, as written, so that one check lists both.
                let mut found = lines(e.to_string());
                let key_file = std::fs::read_to_string(path)
                    .ok()
                    .and_then(|text| text.parse::<toml::Table>().ok())
                    .and_then(|root| {
                        let file = root.get("keys")?.get("pan_key_file")?.as_str()?.to_string();
                        Some(path.parent().unwrap_or(Path::new(".")).join(file))
                    });
                if let Some(file) = key_file.filter(|f| std::fs::metadata(f).is_err()) {
                    found.push(key_problem(
                        path,
                        "pan_key_file",
                        true,
                        format!("{}: cannot read", file.display()),
                    ));
                }
                found
            }
            Ok(config) => match &config.keys.pan_key_file {
                Some(_) => match issuer_sim::PanKey::load(&config.keys) {
                    Err(e) => vec![key_problem(path, "pan_key_file", true, e)],
                    Ok(_) => Vec::new(),
                },
                None => Vec::new(),
            },
        },
        Kind::Terminals => match Fleet::load(path) {
            Err(p) => lines(p.to_string()),
            Ok(_) => Vec::new(),
        },
        Kind::Scenario => match loadgen::scenario::Scenario::load(path) {
            Err(p) => lines(p.to_string()),
            Ok(_) => Vec::new(),
        },
        Kind::Dialect => match iso8583::Dialect::load(path) {
            Err(e) => lines(e.to_string()),
            Ok(_) => Vec::new(),
        },
    }
}

/// The problems of the files a switch config names (its terminals file,
/// dialects and key file), read from its TOML as written, relative to its
/// folder; a file that cannot be read is said at the key that names it.
/// Also whether every dialect it names read.
fn named_files_problems(path: &Path) -> (Vec<String>, bool) {
    let root = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .unwrap_or_default();
    let base = path.parent().unwrap_or(Path::new("."));
    let named = |table: &str, key: &str| root.get(table)?.get(key)?.as_str().map(|p| base.join(p));
    let unreadable = |table: &str, key: &str, file: &Path| {
        std::fs::metadata(file).err().map(|e| {
            format!(
                "{}:{}: {table}.{key}: {}: cannot read: {e}",
                path.display(),
                line_of_key(path, key),
                file.display()
            )
        })
    };
    let mut found = Vec::new();
    let mut dialects_read = true;
    for (table, key, kind) in [
        ("seed", "terminals", Kind::Terminals),
        ("dialects", "terminal", Kind::Dialect),
        ("dialects", "network", Kind::Dialect),
    ] {
        let Some(file) = named(table, key) else {
            continue;
        };
        let of_file = match unreadable(table, key, &file) {
            Some(problem) => vec![problem],
            None => problems(&file, kind),
        };
        dialects_read &= kind != Kind::Dialect || of_file.is_empty();
        found.extend(of_file);
    }
    if let Some(file) = named("keys", "pan_hash_key_file") {
        if let Err(e) = switch::PanHashKey::load(Some(&file)) {
            found.push(key_problem(path, "pan_hash_key_file", true, e));
        }
    }
    if let Some(file) = named("keys", "terminal_master_derivation_key_file") {
        if let Err(e) = switch::keys::terminal_derivation_key(Some(&file)) {
            found.push(key_problem(
                path,
                "terminal_master_derivation_key_file",
                true,
                e,
            ));
        }
    }
    (found, dialects_read)
}

/// A key file's problem as a config problem: `file:line: keys.KEY: error`
/// when the config names the file, else the error alone (it names the
/// environment variable).
pub fn key_problem(config: &Path, key: &str, named: bool, error: impl std::fmt::Display) -> String {
    if named {
        format!(
            "{}:{}: keys.{key}: {error}",
            config.display(),
            line_of_key(config, key)
        )
    } else {
        error.to_string()
    }
}

/// The line of `key = ...` in the file at `path` (1 when it cannot be found).
fn line_of_key(path: &Path, key: &str) -> usize {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines().position(|l| {
                l.trim_start()
                    .strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            })
        })
        .map_or(1, |i| i + 1)
}

/// `switchyard config check`.
pub fn check(args: &CheckArgs) -> Result<(), Failure> {
    let kind = args.kind.unwrap_or_else(|| guess(&args.file));
    let found = problems(&args.file, kind);
    let parses = std::fs::read_to_string(&args.file)
        .ok()
        .and_then(|text| settings::top_level_keys(&text))
        .is_some();
    let read_as = match args.kind {
        Some(_) => format!("read as {}", kind.noun()),
        // Its keys unknown, its kind was only guessed from its name.
        None if !parses => "not TOML that parses, so of no kind yet".to_string(),
        None => format!("read as {}; --kind to say otherwise", kind.noun()),
    };
    if found.is_empty() {
        println!("{}: ok ({read_as})", args.file.display());
        Ok(())
    } else {
        for p in &found {
            println!("{p}");
        }
        Err(Failure::Input(anyhow!(
            "{} problem(s) in {} ({read_as})",
            found.len(),
            args.file.display()
        )))
    }
}

/// `switchyard terminals import`.
pub async fn import(args: &ImportArgs) -> Result<(), Failure> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let fleet = Fleet::from_csv(&text, &args.file.display().to_string())
        .map_err(|p| Failure::Input(anyhow!("{p}")))?;
    let (pool, _db) = migrated_pool(&config_or_default(args.config.as_deref())?).await?;
    let unknown = fleet
        .unknown_merchants(&pool, &args.file.display().to_string())
        .await
        .context("looking up the merchants")?;
    if !unknown.is_empty() {
        return Err(Failure::Input(anyhow!("{}", settings::Problems(unknown))));
    }
    fleet.store(&pool).await.context("storing the terminals")?;
    println!(
        "imported {} terminals of {} merchants",
        fleet.terminals.len(),
        fleet.merchants.len()
    );
    Ok(())
}
