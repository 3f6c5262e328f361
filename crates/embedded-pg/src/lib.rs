//! A private PostgreSQL server, started from the local PostgreSQL binaries in
//! a data directory of its own, for `switchyard demo`, the embedded default of
//! `serve` and `issuer` when no database URL is configured, and the tests.
//!
//! PostgreSQL refuses to run as root, so when started as root the server (and
//! `initdb`) run as the `postgres` user, through `setpriv`. The server is
//! started with a parent-death signal, so it shuts down (fast) when the process
//! that started it ends, however it ends; [`EmbeddedPg::stop`] stops it
//! explicitly and removes a temporary data directory.
//!
//! Why not the `pgtemp` crate: it switches to the postgres user with `sudo`,
//! which a minimal machine does not have, panics instead of returning errors,
//! and leaves the server running when the test process is killed.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

mod flush;

/// Why the server cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No `initdb` / `postgres` binaries on this machine.
    #[error(
        "PostgreSQL server binaries (initdb, postgres) not found in PATH or /usr/lib/postgresql/*/bin: \
         install them (Debian/Ubuntu: `apt-get install postgresql`), or point the config's \
         database.url or DATABASE_URL at a running server (`docker compose up -d postgres`)"
    )]
    NoBinaries,
    /// Running as root, but there is no `postgres` user to run the server as.
    #[error(
        "running as root and there is no `postgres` user to run PostgreSQL as: create one (`useradd postgres`) or run as another user"
    )]
    NoPostgresUser,
    /// A step failed; its output says why.
    #[error("{step} failed: {detail}")]
    Step {
        /// What was being done.
        step: String,
        /// Its output, or the error.
        detail: String,
    },
    /// The server stopped as it started, or did not accept connections in time.
    #[error("PostgreSQL {why}; its log {log}:\n{tail}")]
    NotReady {
        /// What happened.
        why: &'static str,
        /// Where the server log is.
        log: String,
        /// The end of the log.
        tail: String,
    },
    /// A database statement failed.
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

fn step(step: impl Into<String>, detail: impl ToString) -> Error {
    Error::Step {
        step: step.into(),
        detail: detail.to_string(),
    }
}

/// How to start the server.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Keep the data here (created and initialised when empty). `None`: a
    /// temporary directory, removed when the server stops.
    pub data_dir: Option<PathBuf>,
    /// Port on 127.0.0.1; `None` picks a free one.
    pub port: Option<u16>,
    /// `false` turns fsync and synchronous commit off: for tests, never for
    /// anything whose durability is measured or relied on.
    pub fast_unsafe: bool,
    /// More `name=value` settings for the server (`EMBEDDED_PG_SETTINGS`,
    /// `;`-separated, adds to them).
    pub settings: Vec<String>,
}

/// The name of the thread that writes a durable server's data files back
/// ([`flush`]): its CPU time is the server's.
pub const FLUSH_THREAD: &str = "postgres-flush";

/// A running private PostgreSQL server; stops when dropped.
#[derive(Debug)]
pub struct EmbeddedPg {
    data_dir: PathBuf,
    temporary: bool,
    port: u16,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    running: bool,
    /// Writes the data files back as they are made ([`flush`]), for a
    /// durable server.
    flusher: Option<flush::Flusher>,
}

/// The directory holding `initdb` and `postgres`: PATH first, then the
/// newest Debian-style `/usr/lib/postgresql/<version>/bin`.
pub fn find_binaries() -> Result<PathBuf, Error> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    for dir in on_path {
        if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
            // Resolve symlinks so pg_ctl finds its siblings.
            let real = std::fs::canonicalize(dir.join("postgres"))
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or(dir);
            return Ok(real);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("postgres").is_file()).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or(Error::NoBinaries)
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// uid and gid of the `postgres` user, from /etc/passwd.
fn postgres_user() -> Result<(u32, u32), Error> {
    let passwd =
        std::fs::read_to_string("/etc/passwd").map_err(|e| step("reading /etc/passwd", e))?;
    passwd
        .lines()
        .find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() > 3 && f[0] == "postgres")
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                .flatten()
        })
        .ok_or(Error::NoPostgresUser)
}

fn free_port() -> Result<u16, Error> {
    let sock =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| step("finding a free port", e))?;
    Ok(sock
        .local_addr()
        .map_err(|e| step("finding a free port", e))?
        .port())
}

/// Temporary data directories of processes that are gone (a test process
/// cannot remove its own shared server's directory: it is never dropped).
fn remove_stale_temporary_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("switchyard-pg-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl EmbeddedPg {
    /// Initialises (when needed) and starts a server; returns once it accepts
    /// connections.
    pub async fn start(options: Options) -> Result<EmbeddedPg, Error> {
        let bin = find_binaries()?;
        let owner = if running_as_root() {
            Some(postgres_user()?)
        } else {
            None
        };
        let (data_dir, temporary) = match &options.data_dir {
            // Absolute: the server runs in its data directory, and reads the
            // socket directory (the same) from there.
            Some(dir) => (
                std::path::absolute(dir)
                    .map_err(|e| step(format!("finding {}", dir.display()), e))?,
                false,
            ),
            None => {
                remove_stale_temporary_dirs();
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                let dir =
                    std::env::temp_dir().join(format!("switchyard-pg-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&dir);
                (dir, true)
            }
        };
        let mut pg = EmbeddedPg {
            data_dir,
            temporary,
            port: 0,
            bin,
            owner,
            running: false,
            flusher: None,
        };
        pg.init(options.fast_unsafe)?;
        // Another server may take the port between `free_port` and ours
        // binding it: then another port is tried. The first failure is the
        // one reported; it carries the server's log (a setting it refused,
        // say), where the later ones would only repeat it.
        let mut first = None;
        for _ in 0..3 {
            pg.port = match options.port {
                Some(p) => p,
                None => free_port()?,
            };
            match pg.launch(&options).await {
                Ok(()) => return Ok(pg),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
            if options.port.is_some() {
                break;
            }
        }
        Err(first.expect("tried at least once"))
    }

    /// A command run as the server's owner.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("setpriv");
        if let Some((uid, gid)) = self.owner {
            cmd.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups");
        }
        cmd.arg("--").arg(self.bin.join(program));
        cmd
    }

    fn init(&self, fast_unsafe: bool) -> Result<(), Error> {
        if self.data_dir.join("PG_VERSION").is_file() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.data_dir)
            .map_err(|e| step(format!("creating {}", self.data_dir.display()), e))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&self.data_dir, Some(uid), Some(gid))
                .map_err(|e| step(format!("giving {} to postgres", self.data_dir.display()), e))?;
        }
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(&self.data_dir).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-instructions",
        ]);
        if fast_unsafe {
            cmd.arg("--no-sync");
        }
        let out = cmd
            .output()
            .map_err(|e| step("running initdb (is setpriv installed?)", e))?;
        if !out.status.success() {
            return Err(step(
                "initdb",
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.join("postgres.log")
    }

    async fn launch(&mut self, options: &Options) -> Result<(), Error> {
        let log = std::fs::File::create(self.log_path())
            .map_err(|e| step("creating the server log", e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| step("creating the server log", e))?;
        let mut cmd = Command::new("setpriv");
        if let Some((uid, gid)) = self.owner {
            cmd.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups");
        }
        // A process group of its own: a Ctrl-C at the terminal reaches the
        // switch, which drains what is in flight (writing outcomes to this
        // server), not the server itself, which would stop at once.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        // Fast shutdown when whoever started it goes away.
        cmd.arg("--pdeathsig=INT")
            .arg("--")
            .arg(self.bin.join("postgres"));
        cmd.arg("-D").arg(&self.data_dir);
        let mut settings = vec![
            "listen_addresses=127.0.0.1".to_string(),
            format!("port={}", self.port),
            format!("unix_socket_directories={}", self.data_dir.display()),
            "max_connections=300".into(),
            "shared_buffers=256MB".into(),
            // A fresh cluster has no used WAL segment to recycle, so every
            // 16 MB of WAL it creates one and zero-fills it while every
            // commit waits: 60 to 120 ms stalls, every few seconds under
            // load, that set the p99. Without zero-filling the segment is
            // allocated as it is written; commits stay as durable.
            "wal_init_zero=off".into(),
            // A checkpoint writes every page it finds dirty, and each page
            // written to first after it goes into the WAL whole: by default
            // one starts every 0.5 GB of WAL, every minute or so under load,
            // and the burst of full pages that follows sets the p99 of
            // those seconds. A server of one's own sizes these the same way
            // for a write-heavy load.
            "max_wal_size=8GB".into(),
            "checkpoint_timeout=15min".into(),
        ];
        if options.fast_unsafe {
            settings.extend(
                [
                    "fsync=off",
                    "synchronous_commit=off",
                    "full_page_writes=off",
                ]
                .map(String::from),
            );
        }
        settings.extend(options.settings.iter().cloned());
        // Extra settings for a profiling session, e.g.
        // EMBEDDED_PG_SETTINGS="shared_preload_libraries=pg_stat_statements".
        if let Ok(extra) = std::env::var("EMBEDDED_PG_SETTINGS") {
            settings.extend(
                extra
                    .split(';')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| s.trim().to_string()),
            );
        }
        for s in &settings {
            cmd.arg("-c").arg(s);
        }
        cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
        // The parent-death signal fires when the *thread* that forked exits:
        // fork from a thread that lives exactly as long as the server.
        let (tx, rx) = std::sync::mpsc::channel();
        let exited = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let exited_flag = exited.clone();
        std::thread::Builder::new()
            .name(format!("postgres-{}", self.port))
            .spawn(move || match cmd.spawn() {
                Ok(mut child) => {
                    let _ = tx.send(Ok(()));
                    let _ = child.wait();
                    exited_flag.store(true, Ordering::Release);
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            })
            .map_err(|e| step("starting the postgres thread", e))?;
        rx.recv()
            .map_err(|e| step("starting postgres", e))?
            .map_err(|e| step("starting postgres (is setpriv installed?)", e))?;
        self.running = true;

        let deadline = Instant::now() + Duration::from_secs(30);
        let url = self.url("postgres");
        // Another server may have taken the port between `free_port` and
        // ours binding it (ours then exits, and we try another port): a
        // server that answers is ours only if it serves our data directory.
        let ours = std::fs::canonicalize(&self.data_dir).unwrap_or_else(|_| self.data_dir.clone());
        loop {
            if let Ok(mut conn) = PgConnection::connect(&url).await {
                let serves: Option<String> = sqlx::query_scalar("SHOW data_directory")
                    .fetch_one(&mut conn)
                    .await
                    .ok();
                let _ = conn.close().await;
                if serves.is_some_and(|dir| std::fs::canonicalize(dir).is_ok_and(|dir| dir == ours))
                {
                    if !options.fast_unsafe {
                        self.flusher = Some(
                            flush::Flusher::start(&self.data_dir)
                                .map_err(|e| step("starting the write-back thread", e))?,
                        );
                    }
                    return Ok(());
                }
            }
            if Instant::now() > deadline || exited.load(Ordering::Acquire) {
                // The data directory stays for another attempt (and the log
                // for whoever reads the error); dropping removes it.
                self.halt();
                return Err(Error::NotReady {
                    why: if exited.load(Ordering::Acquire) {
                        "stopped as it started"
                    } else {
                        "did not accept connections within 30 s"
                    },
                    log: self.log_path().display().to_string(),
                    tail: self.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.log_path()) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id (the postmaster's, the parent of every
    /// backend), from its `postmaster.pid`; `None` when it is not running.
    pub fn pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// The port of a server already running on `data_dir` (another
    /// command's, say `switchyard serve`'s), from its `postmaster.pid`:
    /// when the process it names is a `postgres` and the file says it is
    /// ready. A file a crash left (its process id since reused, or gone)
    /// names none, and starting a server there lets PostgreSQL clear it.
    pub fn running_on(data_dir: &Path) -> Option<u16> {
        let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let pid: u32 = lines.first()?.parse().ok()?;
        let port = lines.get(3)?.parse().ok()?;
        let ready = lines.get(7) == Some(&"ready");
        let postgres = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|name| name.trim() == "postgres");
        (ready && postgres).then_some(port)
    }

    /// The process that started the server running on `data_dir` (the
    /// postmaster's parent), as its id and command line.
    pub fn started_by(data_dir: &Path) -> Option<(u32, String)> {
        let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
        let pid: u32 = text.lines().next()?.trim().parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the command name in parentheses: state, then the parent's id.
        let parent: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let line = std::fs::read(format!("/proc/{parent}/cmdline")).ok()?;
        let line = String::from_utf8_lossy(&line).replace('\0', " ");
        Some((parent, line.trim().to_string()))
    }

    /// The URL of database `db` on a server of this kind on `port`.
    pub fn url_on(port: u16, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/{db}")
    }

    /// Where the data lives.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The connection URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        EmbeddedPg::url_on(self.port, db)
    }

    /// Creates database `name` (when it does not exist) and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String, Error> {
        create_database(&self.url("postgres"), name).await
    }

    /// Stops the server (fast shutdown) and removes a temporary data directory.
    pub fn stop(&mut self) {
        self.halt();
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }

    /// Data files written back so far by [`flush`] (none for a
    /// `fast_unsafe` server).
    pub fn files_written_back(&self) -> u64 {
        self.flusher.as_ref().map_or(0, flush::Flusher::synced)
    }

    /// Stops the server (fast shutdown), keeping its data directory.
    fn halt(&mut self) {
        self.flusher = None;
        if self.running {
            let _ = self
                .command("pg_ctl")
                .arg("stop")
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-m", "fast", "-w", "-t", "30"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            self.running = false;
        }
    }
}

impl Drop for EmbeddedPg {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates database `name` on the server of `admin_url` (when it does not
/// exist) and returns the URL of the new database.
pub async fn create_database(admin_url: &str, name: &str) -> Result<String, Error> {
    let mut conn = PgConnection::connect(admin_url).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        // Identifiers cannot be bound; the name is ours, quoted anyway.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE \"{}\"",
            name.replace('"', "")
        )))
        .execute(&mut conn)
        .await?;
    }
    let _ = conn.close().await;
    Ok(with_database(admin_url, name))
}

/// `url` with its database name replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{db}{query}", &base[..host_end])
}

static TEST_SERVER: tokio::sync::OnceCell<Result<EmbeddedPg, String>> =
    tokio::sync::OnceCell::const_new();

/// A fresh, empty database for one test, and its URL.
///
/// On the server of `DATABASE_URL` when it is set; otherwise on one private
/// server per test process, started on first use (fsync off) and shut down
/// when the process ends.
pub async fn test_database() -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("test_{}_{n}", std::process::id());
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return create_database(&url, &name)
            .await
            .unwrap_or_else(|e| panic!("creating test database on DATABASE_URL: {e}"));
    }
    let server = TEST_SERVER
        .get_or_init(|| async {
            EmbeddedPg::start(Options {
                fast_unsafe: true,
                ..Options::default()
            })
            .await
            .map_err(|e| e.to_string())
        })
        .await;
    match server {
        Ok(pg) => pg
            .create_database(&name)
            .await
            .unwrap_or_else(|e| panic!("creating test database: {e}")),
        Err(e) => panic!("starting the private PostgreSQL for tests: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_their_database_replaced() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres", "t1"),
            "postgres://u:p@h:5432/t1"
        );
        assert_eq!(
            with_database("postgres://h:1/x?sslmode=disable", "t2"),
            "postgres://h:1/t2?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:1", "t3"), "postgres://h:1/t3");
    }

    #[tokio::test]
    async fn a_test_database_accepts_statements_and_is_fresh() {
        let a = test_database().await;
        let b = test_database().await;
        assert_ne!(a, b);
        let mut conn = PgConnection::connect(&a).await.unwrap();
        sqlx::query("CREATE TABLE t (x int)")
            .execute(&mut conn)
            .await
            .unwrap();
        let mut other = PgConnection::connect(&b).await.unwrap();
        let tables: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 't'",
        )
        .fetch_one(&mut other)
        .await
        .unwrap();
        assert_eq!(tables, 0);
    }

    #[tokio::test]
    async fn a_relative_data_dir_is_found_by_another_command_while_it_runs() {
        // Relative to the working directory, as `--config` paths often are.
        let dir = PathBuf::from(format!(
            "../../target/switchyard-pg-rel-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let pg = EmbeddedPg::start(Options {
            data_dir: Some(dir.clone()),
            ..Options::default()
        })
        .await
        .unwrap();
        assert!(pg.data_dir().is_absolute());
        assert_eq!(EmbeddedPg::running_on(&dir), Some(pg.port()));
        let url = pg.create_database("found").await.unwrap();
        assert_eq!(url, EmbeddedPg::url_on(pg.port(), "found"));
        drop(pg);
        assert_eq!(EmbeddedPg::running_on(&dir), None, "stopped");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_server_with_a_data_dir_keeps_its_data_across_restarts() {
        let dir = std::env::temp_dir().join(format!("switchyard-pg-keep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let options = Options {
            data_dir: Some(dir.clone()),
            ..Options::default()
        };
        let mut pg = EmbeddedPg::start(options.clone()).await.unwrap();
        let url = pg.create_database("keep").await.unwrap();
        let mut conn = PgConnection::connect(&url).await.unwrap();
        sqlx::raw_sql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        pg.stop();
        assert!(PgConnection::connect(&url).await.is_err(), "stopped");
        let pg = EmbeddedPg::start(options).await.unwrap();
        let mut conn = PgConnection::connect(&pg.url("keep")).await.unwrap();
        let x: i32 = sqlx::query_scalar("SELECT x FROM kept")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(x, 42);
        drop(conn);
        drop(pg);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn the_data_files_of_a_durable_server_are_written_back_as_they_change() {
        let pg = EmbeddedPg::start(Options::default()).await.unwrap();
        let url = pg.create_database("flushed").await.unwrap();
        let before = pg.files_written_back();
        let mut conn = PgConnection::connect(&url).await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE grows (x int); INSERT INTO grows SELECT generate_series(1, 10000)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        // Not a timing assertion: within the test's patience the thread has
        // written back the new table's file at least.
        let deadline = Instant::now() + Duration::from_secs(20);
        while pg.files_written_back() == before {
            assert!(Instant::now() < deadline, "no data file written back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let unsafe_pg = EmbeddedPg::start(Options {
            fast_unsafe: true,
            ..Options::default()
        })
        .await
        .unwrap();
        assert_eq!(
            unsafe_pg.files_written_back(),
            0,
            "nothing to write back without fsync"
        );
    }

    #[tokio::test]
    async fn a_setting_the_server_refuses_is_named_in_the_error() {
        let refused = Options {
            settings: vec!["checkpoint_timeout=1s".into()],
            ..Options::default()
        };
        let err = EmbeddedPg::start(refused).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::NotReady { .. }), "{text}");
        assert!(text.contains("checkpoint_timeout"), "{text}");
    }

    #[tokio::test]
    async fn a_port_another_server_holds_is_not_mistaken_for_ours() {
        let other = EmbeddedPg::start(Options::default()).await.unwrap();
        let taken = Options {
            port: Some(other.port()),
            ..Options::default()
        };
        let err = EmbeddedPg::start(taken).await.unwrap_err();
        assert!(matches!(err, Error::NotReady { .. }), "{err}");
    }
}
