//! Where the database is: `DATABASE_URL`, else the config's URL, else a
//! private PostgreSQL started from the local binaries for as long as the
//! command runs.

use std::path::Path;

use anyhow::Context;
use embedded_pg::{EmbeddedPg, Options};

/// A database URL, and the private server behind it when there is one.
#[derive(Debug)]
pub struct Database {
    /// The URL to connect to.
    pub url: String,
    /// The private server, held so that it stops when this is dropped.
    _server: Option<EmbeddedPg>,
}

/// Resolves the database; `name` is the database created on a private server.
pub async fn open(
    configured: Option<&str>,
    data_dir: Option<&Path>,
    name: &str,
) -> anyhow::Result<Database> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return Ok(Database { url, _server: None });
    }
    if let Some(url) = configured {
        return Ok(Database {
            url: url.to_string(),
            _server: None,
        });
    }
    let pg = EmbeddedPg::start(Options {
        data_dir: data_dir.map(Path::to_path_buf),
        ..Options::default()
    })
    .await
    .context(
        "no database.url in the config and no DATABASE_URL, so a private PostgreSQL is needed",
    )?;
    tracing::info!(port = pg.port(), dir = %pg.data_dir().display(), "private PostgreSQL started");
    let url = pg.create_database(name).await?;
    Ok(Database {
        url,
        _server: Some(pg),
    })
}

/// The context of a failed connection: where to, the user and password left out.
pub fn connecting(url: &str) -> String {
    format!("connecting to the database at {}", switch::database_at(url))
}
