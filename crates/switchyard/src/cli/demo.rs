//! `switchyard demo`: the whole product on one machine, on a private
//! PostgreSQL: the simulated issuer with 10,000 cards, the switch with 100
//! terminals of one merchant.
//!
//! `--serve` keeps it running for real terminals (or `switchyard load`) until
//! SIGTERM; without it, a short scripted day runs through it and the money
//! is checked: the issuer's balances against the switch's journal.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Args;
use embedded_pg::{EmbeddedPg, Options};
use iso8583::Dialect;
use issuer_sim::{Issuer, IssuerConfig, PanKey};
use loadgen::Terminal;
use loadgen::scenario::Faults;
use switch::terminals::Fleet;
use switch::{Config, PanHashKey};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Failure;
use super::serve::shutdown_on_signals;

/// The terminal of the scripted day: the last of the fleet, so that the
/// scenario's terminals settle batches of their own alone.
const SCRIPTED: &str = "T0002000";

/// Terminals a scenario may use in the demo (all but the scripted day's).
const SCENARIO_TERMINALS_MAX: usize = 1999;

/// The demo's merchant.
pub const MERCHANT: &str = "898310048160001";

/// The demo's cards: 10,000 of them, 10,000,000 fen each (enough for a
/// minute of `mixed.toml` at full speed), expiring 2030-12.
const ISSUER: &str = r#"
[[cards]]
first = "6222020000000000001"
last = "6222020000000010000"
expiry = "3012"
balance = 10000000
limit = 50000000
"#;

/// The demo's fleet: 2,000 terminals of one merchant. The scripted day uses
/// the last ([`SCRIPTED`]); a scenario may use up to 1,999 from the first.
const FLEET: &str = r#"
[[merchants]]
id = "898310048160001"
name = "Switchyard Demo Store"
mcc = "5411"

[[terminals]]
first = "T0000001"
last = "T0002000"
merchant = "898310048160001"
"#;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep running for terminals until SIGTERM instead of running the scripted day.
    #[arg(long)]
    pub serve: bool,
    /// Where terminals connect (with --serve; the scripted day listens on
    /// a port of its own).
    #[arg(long, default_value = "127.0.0.1:8583", requires = "serve")]
    pub listen: String,
    /// The scenario to play after the scripted day (default: the embedded
    /// config/load/smoke.toml); its [faults] are applied to the demo's issuer.
    #[arg(long, conflicts_with = "serve")]
    pub scenario: Option<std::path::PathBuf>,
    /// Also write the scenario's report as JSON to this file.
    #[arg(long, value_name = "FILE", conflicts_with = "serve")]
    pub json: Option<std::path::PathBuf>,
    /// Also write the scenario's report as one self-contained HTML page.
    #[arg(long, value_name = "FILE", conflicts_with = "serve")]
    pub html: Option<std::path::PathBuf>,
}

/// The running demo: private PostgreSQL, issuer, switch.
pub struct Stack {
    /// The switch's terminal address.
    pub switch_addr: String,
    /// The issuer's address.
    pub issuer_addr: String,
    /// The database.
    pub url: String,
    /// The issuer (its faults can be changed while it runs).
    pub issuer: Arc<Issuer>,
    /// The issuer's database.
    pub issuer_pool: sqlx::PgPool,
    /// The switch's database (its journal).
    pub pool: sqlx::PgPool,
    /// Stops everything.
    pub shutdown: CancellationToken,
    /// The switch as a child process (`switch_kill_at`); `None`: it runs
    /// in this process.
    child: Option<ChildSwitch>,
    /// The switch when it runs in this process.
    switch: Option<Arc<switch::Switch>>,
    issuer_server: Server,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The issuer's thread, and the switch's when it runs in this process.
    issuer_lane: Lane,
    switch_lane: Option<Lane>,
    pg: EmbeddedPg,
    /// The terminal master derivation key the switch hands out working
    /// keys under (K3), when it does: the demo's terminals are loaded with
    /// their master keys from it.
    pub terminal_keys: Option<switch::DerivationKey>,
}

/// The threads the issuer and the switch run on, by name (CPU time is
/// read by thread name: see [`Stack::meter`]).
const ISSUER_THREAD: &str = "issuer";
const SWITCH_THREAD: &str = "switch";

/// A part of the demo on a thread of its own, with a single-threaded
/// runtime: the issuer and the switch each run as they would in a process
/// of their own (`limits.threads = 1`), so that a message handed from one
/// of their tasks to another wakes no other thread, and the two do not
/// steal each other's tasks. What runs on it is spawned through it, and its
/// connections (database pools included) are made there.
struct Lane {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Lane {
    fn start(name: &str) -> anyhow::Result<Lane> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("a runtime")?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .with_context(|| format!("starting the {name} thread"))?;
        Ok(Lane {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs `task` on this lane; its handle can be awaited from anywhere.
    fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(task)
    }
}

impl Drop for Lane {
    /// Stops the lane's runtime (what still runs on it is dropped) and
    /// waits for its thread.
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A listener for a lane: bound here, registered with the lane's runtime
/// when it starts serving.
fn bind(addr: &str) -> anyhow::Result<std::net::TcpListener> {
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The issuer's server task, with its own stop token (it can be restarted).
struct Server {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Serves until [`Server::stop`]: not on the demo's shutdown, which
    /// the switch drains on, its issuer links still up, first.
    fn start(lane: &Lane, listener: std::net::TcpListener, issuer: Arc<Issuer>) -> Server {
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = lane.spawn(async move {
            let served = match TcpListener::from_std(listener) {
                Ok(listener) => issuer_sim::run(listener, issuer, s).await,
                Err(e) => Err(e.into()),
            };
            if let Err(e) = served {
                tracing::warn!(error = %e, "issuer stopped");
            }
        });
        Server { stop, task }
    }

    /// Stops it: no new connections, the open ones closed once their
    /// messages are answered.
    async fn stop(&mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

/// The demo switch's config: the demo's database and issuer, a 2 s issuer
/// timeout so that faults resolve within a short scenario.
fn switch_toml(listen: &str, issuer_addr: &str, database_url: Option<&str>) -> String {
    let database = database_url.map_or(String::new(), |url| {
        format!("[database]\nurl = \"{url}\"\nmax_connections = 16\n")
    });
    format!(
        "listen = \"{listen}\"\n{database}[rules]\nissuer_timeout = \"2s\"\n[[issuers]]\nname = \"sim\"\nbins = [\"622202\"]\naddress = \"{issuer_addr}\"\n"
    )
}

/// `switchyard serve` as a child process on a fixed address, with the
/// demo's database, issuer and PAN hash key.
struct ChildSwitch {
    dir: std::path::PathBuf,
    config: std::path::PathBuf,
    key: PanHashKey,
    /// The terminal master derivation key, as hex (K3).
    terminal_keys: Option<String>,
    process: Option<tokio::process::Child>,
}

impl ChildSwitch {
    /// Writes its config (listening on `listen`) and starts it.
    async fn start(
        listen: &str,
        issuer_addr: &str,
        url: &str,
        key: PanHashKey,
        terminal_keys: Option<String>,
    ) -> anyhow::Result<ChildSwitch> {
        let dir = std::env::temp_dir().join(format!("switchyard-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = dir.join("switchyard.toml");
        std::fs::write(&config, switch_toml(listen, issuer_addr, Some(url)))
            .with_context(|| format!("writing {}", config.display()))?;
        let mut child = ChildSwitch {
            dir,
            config,
            key,
            terminal_keys,
            process: None,
        };
        child.spawn().await?;
        Ok(child)
    }

    /// Starts `switchyard serve` and waits until it listens (its issuer
    /// link up, or its connect timeout over).
    async fn spawn(&mut self) -> anyhow::Result<()> {
        use tokio::io::AsyncBufReadExt;
        let exe = std::env::current_exe().context("finding the switchyard binary")?;
        let mut command = tokio::process::Command::new(exe);
        match &self.terminal_keys {
            Some(hex) => command.env(switch::keys::TERMINAL_ENV, hex),
            None => command.env_remove(switch::keys::TERMINAL_ENV),
        };
        let mut process = command
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            // The keys in the environment, never in the file; the database
            // is the config's, whatever the demo's environment says.
            .env(switch::keys::ENV, self.key.to_hex())
            .env_remove("DATABASE_URL")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting switchyard serve")?;
        let stdout = process.stdout.take().context("the switch's stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if line.starts_with("switchyard listening on") {
                    return Ok(true);
                }
            }
            Ok::<_, std::io::Error>(false)
        })
        .await;
        if !matches!(ready, Ok(Ok(true))) {
            let _ = process.start_kill();
            let status = process.wait().await?;
            bail!("switchyard serve did not start listening ({status})");
        }
        // Nothing else is expected on its stdout; it is read so that it never blocks.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.process = Some(process);
        Ok(())
    }

    /// SIGKILL: no shutdown, no draining, nothing written on the way out.
    async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut process) = self.process.take() {
            process.start_kill()?;
            process.wait().await?;
        }
        Ok(())
    }
}

impl Drop for ChildSwitch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the scenario's timed faults did.
#[derive(Debug, Default)]
struct Broken {
    /// The issuer was stopped and started again at this database time.
    issuer_back: Option<chrono::DateTime<chrono::Utc>>,
    /// The switch was killed with these journal rows `sent`.
    left_at_issuer: Option<Vec<i64>>,
}

/// The group-commit batches of the journal (when the switch runs in this
/// process) and of the issuer's authorisations.
#[derive(Debug, Clone, Copy)]
struct Batches {
    journal: Option<group_commit::Stats>,
    issuer: group_commit::Stats,
}

impl std::ops::Sub for Batches {
    type Output = Batches;

    fn sub(self, earlier: Batches) -> Batches {
        Batches {
            journal: self.journal.zip(earlier.journal).map(|(a, b)| a - b),
            issuer: self.issuer - earlier.issuer,
        }
    }
}

/// How the run's writes were grouped: per stage, its batches, their size,
/// how long one took, and the share of the run its database spent on them.
fn batches_line(b: Batches, run: Duration) -> String {
    let journal = match b.journal {
        Some(s) => s.summary("writes", run),
        None => "not counted (a child process)".to_string(),
    };
    format!(
        "group commit: journal {journal}; issuer {}",
        b.issuer.summary("authorisations", run)
    )
}

impl Stack {
    /// The batches so far.
    fn batches(&self) -> Batches {
        Batches {
            journal: self.switch.as_ref().map(|s| s.writer.stats()),
            issuer: self.issuer.authorisation_stats(),
        }
    }

    /// The parts whose CPU time a run reports: the private PostgreSQL, the
    /// switch (its thread, or its child processes), the issuer's thread,
    /// and the rest of this process, the load generator.
    pub fn meter(&self) -> loadgen::cpu::Meter {
        use loadgen::cpu::Source;
        let mut parts = Vec::with_capacity(5);
        let pg = self.pg.pid();
        if let Some(pid) = pg {
            parts.push(("PostgreSQL".to_string(), Source::Tree(pid)));
            // The thread that writes its data files back works for it too.
            parts.push((
                "PostgreSQL".to_string(),
                Source::Threads(embedded_pg::FLUSH_THREAD.into()),
            ));
        }
        let switch = match (&self.child, pg) {
            (Some(_), Some(pg)) => Source::Children { except: vec![pg] },
            (Some(_), None) => Source::Children { except: vec![] },
            (None, _) => Source::Threads(SWITCH_THREAD.into()),
        };
        parts.push(("switch".to_string(), switch));
        parts.push(("issuer".to_string(), Source::Threads(ISSUER_THREAD.into())));
        parts.push(("load generator".to_string(), Source::Rest));
        loadgen::cpu::Meter::new(parts)
    }

    /// Starts PostgreSQL, the issuer and the switch (listening on `listen`):
    /// in this process, or as a child process that can be killed when
    /// `killable`.
    pub async fn start(
        listen: &str,
        shutdown: CancellationToken,
        killable: bool,
        keyed: bool,
    ) -> anyhow::Result<Stack> {
        // A fresh derivation key, as the PAN hash keys: nothing the demo
        // writes outlives it.
        let terminal_key_hex = keyed.then(switch::keys::random_derivation_key_hex);
        let terminal_keys = terminal_key_hex
            .as_deref()
            .map(|h| switch::keys::derivation_key_from_hex(h, "(demo)"))
            .transpose()?;
        let pg = EmbeddedPg::start(Options::default()).await?;
        let url = pg.create_database("switchyard_demo").await?;

        let issuer_config =
            IssuerConfig::from_toml(ISSUER, "(demo issuer)").map_err(|e| anyhow!("{e}"))?;
        let issuer_pool = issuer_sim::connect(&url).await?;
        issuer_sim::migrate(&issuer_pool)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let issuer_key = PanKey::random();
        issuer_sim::seed_cards(&issuer_pool, &issuer_key, &issuer_config.cards)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let issuer_listener = bind("127.0.0.1:0")?;
        let issuer_addr = issuer_listener.local_addr()?.to_string();
        let issuer_lane = Lane::start(ISSUER_THREAD)?;
        let issuer = {
            let (url, key) = (url.clone(), issuer_key.clone());
            issuer_lane
                .spawn(async move {
                    let pool = issuer_sim::connect(&url).await?;
                    Ok::<_, anyhow::Error>(Arc::new(Issuer::new(issuer_config, key, pool)))
                })
                .await??
        };
        let issuer_server = Server::start(&issuer_lane, issuer_listener, issuer.clone());

        let mut tasks = Vec::new();
        let pool = switch::connect(&url, 16).await?;
        switch::migrate(&pool).await?;
        Fleet::parse(FLEET, "(demo fleet)")
            .map_err(|e| anyhow!("{e}"))?
            .store(&pool)
            .await?;
        let mut switch_lane = None;
        let mut in_process = None;
        let (child, switch_addr) = if killable {
            // A fixed address: the restarted switch listens where terminals redial.
            let listen = match listen.rsplit_once(':') {
                Some((host, "0")) => {
                    let free = std::net::TcpListener::bind(format!("{host}:0"))?.local_addr()?;
                    free.to_string()
                }
                _ => listen.to_string(),
            };
            let child = ChildSwitch::start(
                &listen,
                &issuer_addr,
                &url,
                PanHashKey::generate(),
                terminal_key_hex.clone(),
            )
            .await?;
            (Some(child), listen)
        } else {
            let mut config =
                Config::parse(&switch_toml(listen, &issuer_addr, None), "(demo switch)")
                    .map_err(|e| anyhow!("{e}"))?;
            config.seed.terminals = None;
            let listener = bind(listen)?;
            let switch_addr = listener.local_addr()?.to_string();
            let lane = Lane::start(SWITCH_THREAD)?;
            let (url, shutdown, issuer) = (url.clone(), shutdown.clone(), issuer_addr.clone());
            let keys = terminal_keys.clone();
            let run = lane
                .spawn(async move {
                    let pool = switch::connect(&url, 16).await?;
                    let switch = switch::start(
                        Arc::new(config),
                        pool,
                        PanHashKey::generate(),
                        keys,
                        &shutdown,
                    )
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
                    let listener = TcpListener::from_std(listener)?;
                    let serving = switch.clone();
                    let run = tokio::spawn(async move {
                        switch::run(listener, serving, shutdown).await;
                    });
                    if !switch.links[0].wait_up(Duration::from_secs(10)).await {
                        bail!("the switch could not sign on to the issuer at {issuer}");
                    }
                    Ok::<_, anyhow::Error>((run, switch))
                })
                .await??;
            let (run, switch) = run;
            tasks.push(run);
            in_process = Some(switch);
            switch_lane = Some(lane);
            (None, switch_addr)
        };
        Ok(Stack {
            switch_addr,
            issuer_addr,
            url,
            issuer,
            issuer_pool,
            pool,
            shutdown,
            child,
            switch: in_process,
            issuer_server,
            tasks,
            issuer_lane,
            switch_lane,
            pg,
            terminal_keys,
        })
    }

    /// Stops the issuer (its listener and every connection), waits
    /// `down_for`, and starts it again on the same address.
    async fn restart_issuer(&mut self, down_for: Duration) -> anyhow::Result<()> {
        self.issuer_server.stop().await;
        tokio::time::sleep(down_for).await;
        let listener = bind(&self.issuer_addr).context("listening again")?;
        self.issuer_server = Server::start(&self.issuer_lane, listener, self.issuer.clone());
        Ok(())
    }

    /// Kills the switch with SIGKILL while a transaction is at the issuer
    /// (when one is sent within `patience`), and starts it again on the same
    /// port; returns when it was killed and the journal rows it left `sent`.
    ///
    /// An issuer answers in milliseconds, so a `sent` row seen by polling is
    /// often answered before the signal lands. So the issuer holds back its
    /// financial replies (it still decides and posts; sign-on and echo are
    /// answered) until the switch is dead, and the switch is killed once a
    /// row journalled after the hold began is `sent`: its reply cannot have
    /// come.
    async fn kill_switch(
        &mut self,
        patience: Duration,
    ) -> anyhow::Result<(tokio::time::Instant, Vec<i64>)> {
        let Some(child) = &mut self.child else {
            bail!("the switch runs in this process and cannot be killed");
        };
        let faults = self.issuer.faults();
        faults.hold();
        let pool = &self.pool;
        let one_in_flight = async {
            let held_from: chrono::DateTime<chrono::Utc> =
                sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
            let deadline = tokio::time::Instant::now() + patience;
            while !sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM journal WHERE state = 'sent' AND sent_at > $1)",
            )
            .bind(held_from)
            .fetch_one(pool)
            .await?
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<_, sqlx::Error>(())
        }
        .await;
        let killed = tokio::time::Instant::now();
        let dead = match one_in_flight {
            Ok(()) => child.kill().await,
            Err(e) => Err(e.into()),
        };
        // The killed switch's connections are closed: what was held for it
        // is never written.
        faults.release();
        dead?;
        let left = switch::reconcile::in_flight(&self.pool).await?;
        child.spawn().await?;
        Ok((killed, left))
    }

    /// Stops the switch and the issuer, then PostgreSQL.
    pub async fn stop(mut self) {
        if let Some(child) = &mut self.child {
            // The demo is over: nothing is in flight that matters.
            let _ = child.kill().await;
        }
        self.shutdown.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        self.issuer_server.stop().await;
        self.pool.close().await;
        self.issuer_pool.close().await;
        // Their runtimes, and the connections made on them, before the
        // server they connect to.
        drop(self.switch_lane.take());
        drop(self.issuer_lane);
        self.pg.stop();
    }
}

/// Breaks the issuer and the switch at the times the scenario's `[faults]`
/// say, from `started`.
async fn break_on_time(
    stack: &mut Stack,
    faults: Faults,
    started: tokio::time::Instant,
) -> anyhow::Result<Broken> {
    #[derive(Debug, Clone, Copy)]
    enum Event {
        IssuerRestart,
        SwitchKill,
    }
    let mut broken = Broken::default();
    let mut events: Vec<(Duration, Event)> = [
        faults
            .issuer_restart_at
            .map(|at| (at, Event::IssuerRestart)),
        faults.switch_kill_at.map(|at| (at, Event::SwitchKill)),
    ]
    .into_iter()
    .flatten()
    .collect();
    events.sort_by_key(|(at, _)| *at);
    let secs = |t: tokio::time::Instant| (t - started).as_secs_f64();
    for (at, event) in events {
        tokio::time::sleep_until(started + at).await;
        if let Event::IssuerRestart = event {
            println!(
                "fault: issuer stopped at {:.1} s (listener and connections closed)",
                secs(tokio::time::Instant::now())
            );
            stack.restart_issuer(faults.issuer_down_for).await?;
            broken.issuer_back = Some(
                sqlx::query_scalar("SELECT now()")
                    .fetch_one(&stack.pool)
                    .await?,
            );
            println!(
                "fault: issuer listening again on {} at {:.1} s",
                stack.issuer_addr,
                secs(tokio::time::Instant::now())
            );
        } else {
            // Killed while a transaction is at the issuer, when one is sent
            // within a few seconds: that is the case the recovery is for.
            let (killed, left) = stack.kill_switch(Duration::from_secs(5)).await?;
            println!(
                "fault: switch killed (SIGKILL) at {:.1} s with {} transaction(s) at the issuer; listening again on {} after {:.1} s",
                secs(killed),
                left.len(),
                stack.switch_addr,
                killed.elapsed().as_secs_f64()
            );
            broken.left_at_issuer = Some(left);
        }
    }
    Ok(broken)
}

/// `switchyard demo`.
pub async fn run(args: &DemoArgs) -> Result<(), Failure> {
    if args.serve {
        let shutdown = shutdown_on_signals();
        let stack = Stack::start(&args.listen, shutdown.clone(), false, false).await?;
        println!(
            "switchyard demo: terminals connect to {} (cup-pos)",
            stack.switch_addr
        );
        println!(
            "  issuer (iso87) at {}; PostgreSQL at {}",
            stack.issuer_addr, stack.url
        );
        println!("  terminals T0000001-T0002000 of merchant {MERCHANT} (Switchyard Demo Store)");
        println!(
            "  cards 6222020000000000001-6222020000000010000, expiry 3012, 10,000,000 fen each"
        );
        println!("  stop with Ctrl-C or SIGTERM");
        shutdown.cancelled().await;
        stack.stop().await;
        return Ok(());
    }
    let scenario = match &args.scenario {
        Some(path) => loadgen::scenario::Scenario::load(path),
        None => {
            loadgen::scenario::Scenario::parse(loadgen::scenario::SMOKE, "config/load/smoke.toml")
        }
    }
    .map_err(|p| Failure::Input(anyhow!("{p}")))?;
    if scenario.terminals > SCENARIO_TERMINALS_MAX {
        return Err(Failure::Input(anyhow!(
            "scenario {}: {} terminals; the demo's fleet leaves {SCENARIO_TERMINALS_MAX} to scenarios (T0000001-T0001999)",
            scenario.name,
            scenario.terminals
        )));
    }
    let outputs = super::load::Outputs {
        json: args.json.as_deref(),
        html: args.html.as_deref(),
    };
    outputs.writable()?;
    let killable = scenario.faults.switch_kill_at.is_some();
    let mut stack = Stack::start("127.0.0.1:0", CancellationToken::new(), killable, true).await?;
    // The scenario's terminals are loaded with their master keys (K3).
    let mut scenario = scenario;
    scenario.derivation_key = stack.terminal_keys.clone();
    let result = scripted_day(&mut stack, scenario, outputs).await;
    stack.stop().await;
    result.map_err(Failure::Other)
}

/// A short day at the demo store, then the money check.
async fn scripted_day(
    stack: &mut Stack,
    scenario: loadgen::scenario::Scenario,
    outputs: super::load::Outputs<'_>,
) -> anyhow::Result<()> {
    let dialect = Arc::new(Dialect::cup_pos());
    // The last terminal: the smoke scenario's terminals settle their own batches.
    let mut t = Terminal::connect(&stack.switch_addr, SCRIPTED, MERCHANT, dialect).await?;
    t.set_master_key(stack.terminal_keys.as_ref().map(|k| k.master_key(SCRIPTED)));
    let line = |what: &str, rc: &str, extra: &str| println!("{what:<34} -> {rc} {extra}");
    let r = t.sign_on().await?;
    let keys = if t.holds_mac_key() {
        ", working keys taken: every message MACed"
    } else {
        ""
    };
    line(
        &format!("sign-on {SCRIPTED}"),
        r.rc(),
        &format!("batch {:06}{keys}", t.batch),
    );
    let mut approved: i64 = 0;
    let mut sales = Vec::new();
    for (pan, amount) in [
        ("6222020000000000001", 12_345u64),
        ("6222020000000000002", 880),
        ("6222020000000000003", 99_900),
    ] {
        let stan = t.next_stan();
        let r = t.exchange(&t.purchase(stan, pan, "3012", amount)?).await?;
        sales.push((pan, amount, stan, r.clone()));
        line(
            &format!("purchase {amount} fen"),
            r.rc(),
            &format!(
                "rrn {} auth {}",
                r.field(37).unwrap_or("-"),
                r.field(38).unwrap_or("-")
            ),
        );
        if r.rc() == "00" {
            approved += amount as i64;
        }
    }
    let stan = t.next_stan();
    let frame = t.purchase(stan, "6222020000000000004", "3012", 500)?;
    let first = t.exchange(&frame).await?;
    let again = t.exchange(&frame).await?;
    line(
        "purchase 500 fen, sent twice",
        again.rc(),
        if again.body == first.body {
            "(same stored reply; charged once)"
        } else {
            "(REPLIES DIFFER)"
        },
    );
    if first.rc() == "00" {
        approved += 500;
    }
    // The 880 fen sale was a mistake: void it. The 99,900 one is half returned.
    fn original<'a>(
        batch: u32,
        sale: &'a (&str, u64, u32, loadgen::Reply),
    ) -> loadgen::Original<'a> {
        let (_, _, stan, reply) = sale;
        loadgen::Original {
            batch,
            stan: *stan,
            rrn: reply.field(37).unwrap_or(""),
            auth_code: reply.field(38).unwrap_or(""),
            date: reply.field(13).unwrap_or(""),
        }
    }
    let stan = t.next_stan();
    let r = t
        .exchange(&t.void(stan, sales[1].0, "3012", 880, &original(t.batch, &sales[1]))?)
        .await?;
    line(
        "void of the 880 fen purchase",
        r.rc(),
        "(the money goes back)",
    );
    if r.rc() == "00" {
        approved -= 880;
    }
    let stan = t.next_stan();
    let r = t
        .exchange(&t.refund(
            stan,
            sales[2].0,
            "3012",
            49_950,
            &original(t.batch, &sales[2]),
        )?)
        .await?;
    line(
        "refund 49950 of 99900 fen",
        r.rc(),
        "(an advice: forwarded to the issuer)",
    );
    if r.rc() == "00" {
        approved -= 49_950;
    }
    let stan = t.next_stan();
    let r = t
        .exchange(&t.balance_inquiry(stan, "6222020000000000001", "3012")?)
        .await?;
    line("balance inquiry", r.rc(), r.field(54).unwrap_or(""));
    let stan = t.next_stan();
    let r = t
        .exchange(&t.purchase(stan, "6222020000000000005", "3012", 20_000_000)?)
        .await?;
    line("purchase 20,000,000 fen", r.rc(), "(insufficient funds)");
    if t.holds_mac_key() {
        // K3: one byte of the MAC changed on the way.
        let stan = t.next_stan();
        let mut frame = t.purchase(stan, "6222020000000000005", "3012", 1_000)?;
        let last = frame.len() - 1;
        frame[last] ^= 0x01;
        let r = t.exchange(&frame).await?;
        line(
            "purchase 1000 fen, MAC broken",
            r.rc(),
            "(MAC check failed: not journalled, nothing charged)",
        );
    }

    // Then the scenario (smoke by default): its terminals, every kind of
    // request, open loop, each settling its batch with its own totals; the
    // issuer misbehaves as its [faults] say, and recovers afterwards; the
    // issuer and the switch are restarted when they say so.
    println!();
    let f = scenario.faults;
    if f.issuer_replies() {
        let seed = scenario.seed;
        stack.issuer.faults().update(|c| {
            c.seed = Some(seed);
            c.latency = issuer_sim::Latency::Fixed(f.latency);
            c.drop_reply = f.drop_reply;
            c.late_reply = f.late_reply;
            c.late_by = Duration::from_millis(2_500);
            c.close_connection = f.close_connection;
        });
    }
    let target = stack.switch_addr.clone();
    let meter = stack.meter();
    let batches = stack.batches();
    let started = tokio::time::Instant::now();
    let (played, broken) = tokio::join!(
        super::load::play(&target, scenario, outputs, &meter),
        break_on_time(stack, f, started)
    );
    stack.issuer.faults().clear();
    // A batch that did not balance fails the demo after the money check,
    // which tells more about it.
    let unbalanced = played.map_err(|e| anyhow!("{e}"))?;
    println!(
        "{}",
        batches_line(stack.batches() - batches, started.elapsed())
    );
    let broken = broken?;
    // The money check is only meaningful once nothing is at the issuer (a
    // killed switch's `sent` rows are reversed by the restarted one's
    // recovery sweep, issuer_timeout + 2 s after they were sent) and the
    // advices have drained. The sweep turns rows into advices, so rows first.
    // An advice the issuer left unanswered may next go as late as the
    // switch's longest back-off after its last try.
    let switch = Config::parse(
        // Read for its advice timing only: the addresses are placeholders.
        &switch_toml("127.0.0.1:0", "127.0.0.1:9583", None),
        "(demo switch)",
    )
    .map_err(|e| anyhow!("{e}"))?;
    let patience =
        (switch.advice.retry_max + switch.rules.issuer_timeout * 2).max(Duration::from_secs(30));
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let in_flight = switch::reconcile::in_flight(&stack.pool).await?;
        let pending = switch::reconcile::pending_advices(&stack.pool).await?;
        if in_flight.is_empty() && pending == 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            if !in_flight.is_empty() {
                bail!(
                    "{} journal row(s) still `sent` {} s after the run (ids {in_flight:?}): nothing recovered them",
                    in_flight.len(),
                    patience.as_secs()
                );
            }
            bail!(
                "{pending} advice(s) still pending {} s after the run: they did not drain",
                patience.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(back) = broken.issuer_back {
        // Purchases the issuer decided after it came back: they went over
        // the connection the switch's link made and signed on by itself.
        let answered: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM journal WHERE kind = 'purchase' AND sent_at >= $1
               AND response_code IS NOT NULL AND response_code NOT IN ('91', '96', '98')",
        )
        .bind(back)
        .fetch_one(&stack.pool)
        .await?;
        println!(
            "faults: issuer restarted; {answered} purchases answered through the link the switch signed on again"
        );
    }
    if let Some(left) = &broken.left_at_issuer {
        // None is `sent` any more (waited for above); what became of them.
        let states: Vec<(String, i64)> = sqlx::query_as(
            "SELECT state, count(*) FROM journal WHERE id = ANY($1) GROUP BY state ORDER BY state",
        )
        .bind(left)
        .fetch_all(&stack.pool)
        .await?;
        let states: Vec<String> = states.iter().map(|(s, n)| format!("{s} {n}")).collect();
        println!(
            "faults: switch killed and restarted; {} transaction(s) it left at the issuer recovered by the restarted switch ({})",
            left.len(),
            if states.is_empty() {
                "none".to_string()
            } else {
                states.join(", ")
            }
        );
    }
    let mut clearing = Vec::new();
    // Every day's: a demo may run across midnight (UTC).
    issuer_sim::clearing(&stack.issuer_pool, None, &mut clearing)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let issuer =
        switch::reconcile::read_clearing(&String::from_utf8_lossy(&clearing), "(clearing)")
            .map_err(|e| anyhow!(e))?;
    let journal = switch::reconcile::journal_effects(&stack.pool, None).await?;
    let result = switch::reconcile::compare(&journal, &issuer);
    let totals = issuer_sim::balances(&stack.issuer_pool)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    println!();
    println!(
        "reconcile: {} rrns matched, {} break(s); journal net {} fen, issuer net {} fen",
        result.matched,
        result.breaks.len(),
        result.journal_total,
        result.issuer_total
    );
    let spent = totals.opening - totals.balance;
    println!(
        "cards:     opening {} fen, now {} fen, spent {spent} fen ({approved} by the scripted day above, {} by the scenario)",
        totals.opening,
        totals.balance,
        spent - approved
    );
    for b in &result.breaks {
        println!("  {b}");
    }
    // What the terminals' uploads and the journal differ on, for the first
    // few batches that did not balance.
    for (terminal, batch) in unbalanced.iter().take(3) {
        let report = switch::audit::settlement_report(&stack.pool, terminal, *batch as i32).await?;
        println!();
        print!("{}", report.differences());
    }
    if !result.balanced() || totals.balance - totals.opening != result.journal_total {
        bail!("money check FAILED: the issuer's balances and the journal disagree");
    }
    println!("money check: balanced to the fen");
    super::load::all_balanced(&unbalanced).map_err(|e| anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(batches: u64, jobs: u64, busy_ms: u64) -> group_commit::Stats {
        group_commit::Stats {
            batches,
            jobs,
            busy: Duration::from_millis(busy_ms),
            expired: 0,
        }
    }

    #[test]
    fn the_batches_line_names_each_stage() {
        let before = Batches {
            journal: Some(stats(10, 10, 5)),
            issuer: stats(4, 4, 2),
        };
        let after = Batches {
            journal: Some(stats(110, 410, 505)),
            issuer: stats(54, 204, 252),
        };
        assert_eq!(
            batches_line(after - before, Duration::from_secs(2)),
            "group commit: journal 100 batches of 4.0 writes, 5.00 ms each, busy 25 % of the time; \
             issuer 50 batches of 4.0 authorisations, 5.00 ms each, busy 12 % of the time"
        );
    }

    #[test]
    fn a_switch_in_another_process_or_an_idle_stage_says_so() {
        let none = Batches {
            journal: None,
            issuer: stats(0, 0, 0),
        };
        assert_eq!(
            batches_line(none - none, Duration::from_secs(1)),
            "group commit: journal not counted (a child process); issuer no authorisations"
        );
    }
}
