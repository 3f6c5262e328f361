//! Where the database is: `DATABASE_URL`, else the config's URL, else a
//! private PostgreSQL started from the local binaries in the config's
//! `embedded_data_dir`, for as long as the command runs. Never a private
//! server thrown away on exit: the switch's journal and the issuer's books
//! must outlive the process (`switchyard demo` has a throw-away stack of
//! its own).

use std::path::Path;

use anyhow::{Context, bail};
use embedded_pg::{EmbeddedPg, Options};

/// A database URL, and the private server behind it when there is one.
#[derive(Debug)]
pub struct Database {
    /// The URL to connect to.
    pub url: String,
    /// Where the URL came from, for the log line that says which database
    /// a serving command uses.
    pub from: &'static str,
    /// The private server, held so that it stops when this is dropped.
    _server: Option<EmbeddedPg>,
}

/// Resolves the database; `name` is the database created on a private
/// server, and `keeps` what the database holds, for the refusal when
/// there is none. A command that serves until stopped (`lasting`: `serve`,
/// `issuer`) runs its own private server: one another command started
/// stops when that command ends.
pub async fn open(
    configured: Option<&str>,
    data_dir: Option<&Path>,
    name: &str,
    keeps: &str,
    lasting: bool,
) -> anyhow::Result<Database> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        let from = if configured.is_some() || data_dir.is_some() {
            "DATABASE_URL, over the config's database"
        } else {
            "DATABASE_URL"
        };
        return Ok(Database {
            url,
            from,
            _server: None,
        });
    }
    if let Some(url) = configured {
        return Ok(Database {
            url: url.to_string(),
            from: "database.url",
            _server: None,
        });
    }
    let Some(data_dir) = data_dir else {
        bail!(
            "no database: set database.url in the config, DATABASE_URL, or \
             database.embedded_data_dir (a private PostgreSQL that keeps its data in that \
             folder); a database thrown away on exit would lose {keeps}"
        );
    };
    // Another command's server (`serve`'s, while `txn show` reads the
    // journal): used, not started twice.
    if let Some(port) = EmbeddedPg::running_on(data_dir) {
        if lasting {
            let by = EmbeddedPg::started_by(data_dir)
                .map_or(String::new(), |(pid, line)| format!(" (pid {pid}: {line})"));
            bail!(
                "the private PostgreSQL in {} (database.embedded_data_dir) is already running, on \
                 port {port}, started by another command{by} that stops it when it ends: let that \
                 command end first (a serving command starts its own)",
                data_dir.display()
            );
        }
        let url = embedded_pg::create_database(&EmbeddedPg::url_on(port, "postgres"), name)
            .await
            .with_context(|| {
                format!(
                    "using the private PostgreSQL already running in {} (database.embedded_data_dir)",
                    data_dir.display()
                )
            })?;
        return Ok(Database {
            url,
            from: "database.embedded_data_dir, the server another command started",
            _server: None,
        });
    }
    let pg = EmbeddedPg::start(Options {
        data_dir: Some(data_dir.to_path_buf()),
        ..Options::default()
    })
    .await
    .with_context(|| {
        format!(
            "starting the private PostgreSQL in {} (database.embedded_data_dir)",
            data_dir.display()
        )
    })?;
    tracing::info!(port = pg.port(), dir = %pg.data_dir().display(), "private PostgreSQL started");
    let url = pg.create_database(name).await?;
    Ok(Database {
        url,
        from: "database.embedded_data_dir",
        _server: Some(pg),
    })
}

impl Database {
    /// Logs which database a serving command uses and why (a stray
    /// `DATABASE_URL` in the shell means another journal).
    pub fn say(&self, keeps: &str) {
        tracing::info!(
            "{keeps} at {} (from {})",
            switch::database_at(&self.url),
            self.from
        );
    }
}

/// The context of a failed connection: where to, the user and password left out.
pub fn connecting(url: &str) -> String {
    format!("connecting to the database at {}", switch::database_at(url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_serving_command_never_leans_on_a_server_another_command_runs() {
        if std::env::var("DATABASE_URL").is_ok() {
            // It wins over any data dir: nothing here to try.
            return;
        }
        let dir = std::env::temp_dir().join(format!("sy-db-lean-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let other = EmbeddedPg::start(Options {
            data_dir: Some(dir.clone()),
            ..Options::default()
        })
        .await
        .unwrap();
        let refused = open(None, Some(&dir), "lean", "the journal", true)
            .await
            .unwrap_err()
            .to_string();
        assert!(refused.contains("is already running"), "{refused}");
        // Named: here the test binary itself started it.
        let me = format!("(pid {}: ", std::process::id());
        assert!(refused.contains(&me), "{refused}");
        let brief = open(None, Some(&dir), "lean", "the journal", false)
            .await
            .unwrap();
        assert_eq!(brief.url, EmbeddedPg::url_on(other.port(), "lean"));
        drop(brief);
        drop(other);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
