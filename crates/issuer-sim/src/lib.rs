//! The simulated issuer: a real server of its own, on the issuer side of the
//! switch's network link (ISO 8583:1987 ASCII, `../shared/protocol/network-iso87.md`).
//!
//! It keeps card accounts and postings in PostgreSQL (schema `issuer`),
//! decides with an issuer's rules (unknown card, expired, over limit,
//! insufficient funds), applies every request or advice exactly once however
//! often the switch repeats it, undoes an original exactly once when told to
//! reverse it (even when the reversal overtakes the original), and writes
//! the day's clearing file. It stores no clear PAN: cards are keyed by an
//! HMAC of the PAN under the issuer's own key. Faults (latency, dropped,
//! late and cut replies) are injected on purpose, and changed at run time
//! through a [`FaultControl`], so that the switch's money invariant can be
//! tested against an issuer that misbehaves.
//!
//! The binary wires it: [`IssuerConfig::load`], [`PanKey::load`], a pool ([`connect`]),
//! [`migrate`], [`seed_cards`], [`Issuer::new`], then [`run`] on a listener.

mod batches;
mod books;
mod clearing;
mod config;
mod faults;
mod key;
mod request;
mod server;

pub use books::{CardBalance, Totals, balance, balances, check_key, migrate, seed_cards};
pub use clearing::{CLEARING_HEADER, clearing};
pub use config::{
    CardRange, CardStatus, ConfigError, DatabaseConfig, FaultConfig, IssuerConfig, KeysConfig,
    Latency, Limits,
};
pub use faults::{FaultControl, FaultCounts};
pub use key::{KeyError, PAN_KEY_ENV, PanKey};
pub use server::{Issuer, run};

/// A pool on `url` for the issuer: its connections are not pinged before
/// every use (see [`group_commit::postgres::pool_options`]).
///
/// A first connection is made directly, so that a server or database that
/// is not there is said at once with its cause (a pool would wait out its
/// acquire timeout and say only that).
pub async fn connect(url: &str) -> Result<sqlx::PgPool, sqlx::Error> {
    use sqlx::Connection;
    sqlx::PgConnection::connect(url).await?.close().await?;
    group_commit::postgres::pool_options()
        .max_connections(10)
        .connect(url)
        .await
}

/// What can go wrong outside a single message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A database statement failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The issuer schema cannot be migrated.
    #[error("migrating the issuer schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database was seeded under another PAN key.
    #[error(
        "the issuer PAN key is not the one this database was seeded with: use that key, or a fresh database"
    )]
    KeyMismatch,
    /// The clearing file cannot be written.
    #[error("writing the clearing file: {0}")]
    Csv(#[from] csv::Error),
    /// The listener failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The I/O error underneath, when there is one: a clearing file whose
    /// reader went away (`| head`) is told from one that could not be made.
    pub fn io(&self) -> Option<&std::io::Error> {
        match self {
            Error::Io(e) => Some(e),
            Error::Csv(e) => match e.kind() {
                csv::ErrorKind::Io(e) => Some(e),
                _ => None,
            },
            _ => None,
        }
    }
}
