//! Where a run's CPU went: the time each part of the system under test
//! (PostgreSQL, the switch, the issuer, the load generator itself) spent
//! on the processor, per transaction, and how busy the machine was.
//!
//! On a machine shared by all the parts, latency moves with everything else
//! that runs (a p99 can differ by half between two runs of one build), while
//! the CPU a transaction costs each part moves by a few per cent: it is the
//! figure to compare when changing the code, and it says which part bounds
//! the rate. Read from Linux's `/proc`; elsewhere nothing is measured.

use std::time::Duration;

/// `/proc` counts CPU time in clock ticks of 1/100 s (`USER_HZ`, fixed by
/// the kernel's user-space ABI on every common architecture).
const TICKS_PER_SECOND: u64 = 100;

/// Where a part's CPU time is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A process and its children, running or ended: a PostgreSQL server
    /// (the postmaster, its backends and the backends that ended).
    Tree(u32),
    /// The children of this process, running or ended, except those named:
    /// a switch run as a child process, including the ones killed and
    /// started again. Every child this process waits for counts, so the
    /// excepted ones must outlive the measurement (a server stopped within
    /// it would count here whole).
    Children { except: Vec<u32> },
    /// The threads of this process with this name.
    Threads(String),
    /// This process, less what its parts named by [`Source::Threads`] took.
    Rest,
}

/// The parts of a run and where each one's CPU time is read. Parts of one
/// name are one part, its time summed over their sources (a server's
/// processes and a thread of this process that works for it).
///
/// A reading is not atomic: a process that ends and is waited for between
/// the reading of its parent and of the processes may be missed by that
/// reading, and counted whole in the next. Backends that come and go are
/// few in a run; the error is theirs alone.
#[derive(Debug, Clone, Default)]
pub struct Meter {
    parts: Vec<(String, Source)>,
}

/// CPU time so far, in clock ticks: each part's (`None`: unreadable), and
/// the machine's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    parts: Vec<Option<u64>>,
    machine: Option<Machine>,
}

/// The machine's CPU time so far, summed over its CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Machine {
    busy: u64,
    total: u64,
    cpus: usize,
}

/// What a run cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    /// Each part's CPU time per transaction, in the meter's order.
    pub per_transaction: Vec<(String, Duration)>,
    /// CPU time per transaction of everything else busy on the machine
    /// (other processes, the kernel's own threads, interrupts).
    pub elsewhere: Duration,
    /// Cores busy on average over the run.
    pub cores_busy: f64,
    /// Cores the machine has.
    pub cores: usize,
}

/// One `/proc/<pid>/stat` (or `/proc/<pid>/task/<tid>/stat`) line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stat {
    pid: u32,
    /// The command or thread name (at most 15 bytes).
    name: String,
    ppid: u32,
    /// User and system time of the process (of the thread, for a task).
    own: u64,
    /// User and system time of its children that ended and were waited for.
    children: u64,
}

impl Stat {
    /// Parses a stat line. The name is in parentheses and may itself hold
    /// spaces and parentheses: it ends at the last `)`.
    fn parse(line: &str) -> Option<Stat> {
        let open = line.find('(')?;
        let close = line.rfind(')')?;
        let pid = line[..open].trim().parse().ok()?;
        let name = line.get(open + 1..close)?.to_string();
        // After the name: state (field 3), ppid (4), ..., utime (14),
        // stime (15), cutime (16), cstime (17).
        let rest: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
        let field = |n: usize| -> Option<u64> { rest.get(n - 3)?.parse().ok() };
        Some(Stat {
            pid,
            name,
            ppid: u32::try_from(field(4)?).ok()?,
            own: field(14)? + field(15)?,
            children: field(16)? + field(17)?,
        })
    }
}

/// Busy and total ticks of the first (all-CPU) line of `/proc/stat`, and
/// the CPUs it sums (a `cpuN` line each). Idle and I/O wait are not busy,
/// and neither is steal: time a virtual machine's hypervisor gave to
/// others, which nothing here used.
fn machine(proc_stat: &str) -> Option<Machine> {
    let line = proc_stat.lines().next()?;
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields.map_while(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal; guest time is already
    // in user.
    let total: u64 = ticks.iter().take(8).sum();
    let idle =
        ticks.get(3)? + ticks.get(4).copied().unwrap_or(0) + ticks.get(7).copied().unwrap_or(0);
    let cpus = proc_stat
        .lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count();
    Some(Machine {
        busy: total - idle,
        total,
        cpus,
    })
}

/// Every process's stat line.
fn processes() -> Vec<Stat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        e.file_name().to_str()?.parse::<u32>().ok()?;
        Stat::parse(&std::fs::read_to_string(e.path().join("stat")).ok()?)
    })
    .collect()
}

/// This process's threads' stat lines.
fn threads() -> Vec<Stat> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.filter_map(|e| Stat::parse(&std::fs::read_to_string(e.ok()?.path().join("stat")).ok()?))
        .collect()
}

/// What the meter reads, gathered once per reading.
struct Snapshot {
    me: Option<Stat>,
    processes: Vec<Stat>,
    threads: Vec<Stat>,
}

impl Snapshot {
    /// A part's ticks so far.
    fn ticks(&self, source: &Source, parts: &[(String, Source)]) -> Option<u64> {
        match source {
            Source::Tree(pid) => {
                let root = self.processes.iter().find(|p| p.pid == *pid)?;
                let running: u64 = self
                    .processes
                    .iter()
                    .filter(|p| p.ppid == *pid)
                    .map(|p| p.own + p.children)
                    .sum();
                Some(root.own + root.children + running)
            }
            Source::Children { except } => {
                let me = self.me.as_ref()?;
                let running: u64 = self
                    .processes
                    .iter()
                    .filter(|p| p.ppid == me.pid && !except.contains(&p.pid))
                    .map(|p| p.own + p.children)
                    .sum();
                // Ended children count once waited for; the excepted ones
                // never end during a run.
                Some(me.children + running)
            }
            Source::Threads(name) => Some(self.thread_ticks(name)),
            Source::Rest => {
                let named: u64 = parts
                    .iter()
                    .filter_map(|(_, s)| match s {
                        Source::Threads(name) => Some(self.thread_ticks(name)),
                        _ => None,
                    })
                    .sum();
                Some(self.me.as_ref()?.own.saturating_sub(named))
            }
        }
    }

    fn thread_ticks(&self, name: &str) -> u64 {
        self.threads
            .iter()
            .filter(|t| t.name == name)
            .map(|t| t.own)
            .sum()
    }
}

impl Meter {
    /// A meter of these parts, named for the report.
    pub fn new(parts: Vec<(String, Source)>) -> Meter {
        Meter { parts }
    }

    /// This process alone, as the load generator.
    pub fn load_generator() -> Meter {
        Meter::new(vec![("load generator".into(), Source::Rest)])
    }

    /// The CPU time so far.
    pub fn read(&self) -> Reading {
        let me = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|l| Stat::parse(&l));
        let needs = |f: fn(&Source) -> bool| self.parts.iter().any(|(_, s)| f(s));
        let snapshot = Snapshot {
            me,
            processes: if needs(|s| matches!(s, Source::Tree(_) | Source::Children { .. })) {
                processes()
            } else {
                Vec::new()
            },
            // The rest of this process needs the threads only to leave
            // out named ones.
            threads: if needs(|s| matches!(s, Source::Threads(_))) {
                threads()
            } else {
                Vec::new()
            },
        };
        Reading {
            parts: self
                .parts
                .iter()
                .map(|(_, s)| snapshot.ticks(s, &self.parts))
                .collect(),
            machine: std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|t| machine(&t)),
        }
    }

    /// What happened between two readings, for `transactions`; `None` when
    /// the machine's times cannot be read (not Linux) or nothing was done.
    pub fn usage(&self, from: &Reading, to: &Reading, transactions: u64) -> Option<Usage> {
        let (a, b) = (from.machine?, to.machine?);
        if transactions == 0 || b.total <= a.total || b.cpus == 0 {
            return None;
        }
        let per = |ticks: u64| {
            Duration::from_secs_f64(ticks as f64 / TICKS_PER_SECOND as f64 / transactions as f64)
        };
        // Each part's ticks, parts of one name summed, in the order named;
        // a source unreadable in either reading adds nothing.
        let mut ticks: Vec<(String, Option<u64>)> = Vec::new();
        for ((name, _), (a, b)) in self.parts.iter().zip(from.parts.iter().zip(&to.parts)) {
            let delta = a.zip(*b).map(|(a, b)| b.saturating_sub(a));
            match ticks.iter_mut().find(|(n, _)| n == name) {
                Some((_, sum)) => {
                    if let Some(d) = delta {
                        *sum = Some(sum.unwrap_or(0) + d);
                    }
                }
                None => ticks.push((name.clone(), delta)),
            }
        }
        let accounted: u64 = ticks.iter().filter_map(|(_, t)| *t).sum();
        let per_transaction = ticks
            .into_iter()
            .filter_map(|(name, t)| Some((name, per(t?))))
            .collect();
        let busy = b.busy.saturating_sub(a.busy);
        Some(Usage {
            per_transaction,
            elsewhere: per(busy.saturating_sub(accounted)),
            // The machine's ticks are summed over its CPUs.
            cores_busy: busy as f64 / (b.total - a.total) as f64 * b.cpus as f64,
            cores: b.cpus,
        })
    }
}

impl Usage {
    /// All of it per transaction: the parts and the rest of the machine.
    pub fn total(&self) -> Duration {
        self.per_transaction
            .iter()
            .map(|(_, d)| *d)
            .sum::<Duration>()
            + self.elsewhere
    }

    /// One line for the report: `CPU per transaction: PostgreSQL 196 µs,
    /// ...; 1.48 of 2 cores busy`.
    pub fn line(&self) -> String {
        let us = |d: &Duration| d.as_secs_f64() * 1e6;
        let parts: Vec<String> = self
            .per_transaction
            .iter()
            .map(|(name, d)| format!("{name} {:.0} µs", us(d)))
            .chain(std::iter::once(format!(
                "elsewhere {:.0} µs",
                us(&self.elsewhere)
            )))
            .collect();
        format!(
            "CPU per transaction: {}; total {:.0} µs; {:.2} of {} cores busy",
            parts.join(", "),
            us(&self.total()),
            self.cores_busy,
            self.cores
        )
    }

    /// As JSON: `{"per_transaction_us": {...}, "elsewhere_us": ..., ...}`.
    pub fn to_json(&self) -> String {
        let us = |d: &Duration| d.as_secs_f64() * 1e6;
        let parts: Vec<String> = self
            .per_transaction
            .iter()
            .map(|(name, d)| format!("{name:?}: {:.1}", us(d)))
            .collect();
        format!(
            "{{\"per_transaction_us\": {{{}}}, \"elsewhere_us\": {:.1}, \"total_us\": {:.1}, \"cores_busy\": {:.3}, \"cores\": {}}}",
            parts.join(", "),
            us(&self.elsewhere),
            us(&self.total()),
            self.cores_busy,
            self.cores
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_is_read_past_a_name_with_spaces_and_parentheses() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime cutime cstime ...
        let line =
            "4242 (postgres: a (b) c) S 17 4242 4242 0 -1 4194560 10 0 0 0 1500 250 40 2 20 0 1 0";
        let s = Stat::parse(line).expect("a stat line");
        assert_eq!(s.pid, 4242);
        assert_eq!(s.name, "postgres: a (b) c");
        assert_eq!(s.ppid, 17);
        assert_eq!(s.own, 1750);
        assert_eq!(s.children, 42);
        assert_eq!(Stat::parse("4242 no name 1 2 3"), None);
    }

    #[test]
    fn the_machine_is_busy_when_not_idle_or_waiting_for_io() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let stat = "cpu  100 5 50 800 30 2 3 10 7 0\ncpu0 1 2 3 4 5 6 7 8 9 0\n\
                    cpu1 1 2 3 4 5 6 7 8 9 0\nintr 5 6\n";
        assert_eq!(
            machine(stat),
            Some(Machine {
                busy: 160,
                total: 1000,
                cpus: 2
            })
        );
        assert_eq!(machine("intr 1 2 3"), None);
    }

    fn stat(pid: u32, name: &str, ppid: u32, own: u64, children: u64) -> Stat {
        Stat {
            pid,
            name: name.into(),
            ppid,
            own,
            children,
        }
    }

    #[test]
    fn a_tree_counts_its_running_and_ended_children_and_the_rest_leaves_out_named_threads() {
        let parts = vec![
            ("db".to_string(), Source::Tree(10)),
            ("switch".to_string(), Source::Threads("switch".into())),
            ("child".to_string(), Source::Children { except: vec![10] }),
            ("load".to_string(), Source::Rest),
        ];
        let snapshot = Snapshot {
            me: Some(stat(1, "switchyard", 0, 500, 30)),
            processes: vec![
                stat(1, "switchyard", 0, 500, 30),
                // The server: 100 of its own, 20 of backends that ended,
                // two running backends; another process's child is not its.
                stat(10, "postgres", 1, 100, 20),
                stat(11, "postgres", 10, 7, 0),
                stat(12, "postgres", 10, 5, 1),
                stat(13, "postgres", 99, 1000, 0),
                // A switch run as a child.
                stat(14, "switchyard", 1, 60, 0),
            ],
            threads: vec![
                stat(1, "switchyard", 1, 200, 0),
                stat(2, "switch", 1, 150, 0),
                stat(3, "switch", 1, 50, 0),
                stat(4, "issuer", 1, 40, 0),
            ],
        };
        let ticks: Vec<Option<u64>> = parts
            .iter()
            .map(|(_, s)| snapshot.ticks(s, &parts))
            .collect();
        assert_eq!(ticks, vec![Some(133), Some(200), Some(90), Some(300)]);
        // A tree whose root is gone is unreadable, not zero.
        assert_eq!(snapshot.ticks(&Source::Tree(77), &parts), None);
    }

    #[test]
    fn usage_divides_each_part_by_the_transactions_and_leaves_the_rest_elsewhere() {
        let meter = Meter::new(vec![
            ("PostgreSQL".into(), Source::Tree(10)),
            ("gone".into(), Source::Tree(11)),
            ("load generator".into(), Source::Rest),
            // A thread of this process that works for the server.
            (
                "PostgreSQL".into(),
                Source::Threads("postgres-flush".into()),
            ),
        ]);
        let from = Reading {
            parts: vec![Some(990), None, Some(50), Some(0)],
            machine: Some(Machine {
                busy: 2_000,
                total: 10_000,
                cpus: 2,
            }),
        };
        // 10 s on 2 cores (2,000 ticks), 1,500 of them busy: 1,000 the
        // database, 200 the load generator, 300 elsewhere; 10,000 transactions.
        let to = Reading {
            parts: vec![Some(1_980), Some(5), Some(250), Some(10)],
            machine: Some(Machine {
                busy: 3_500,
                total: 12_000,
                cpus: 2,
            }),
        };
        let u = meter.usage(&from, &to, 10_000).expect("a usage");
        assert_eq!(
            u.per_transaction,
            vec![
                ("PostgreSQL".to_string(), Duration::from_micros(1_000)),
                ("load generator".to_string(), Duration::from_micros(200)),
            ]
        );
        assert_eq!(u.elsewhere, Duration::from_micros(300));
        assert_eq!(u.total(), Duration::from_micros(1_500));
        assert!((u.cores_busy - 1.5).abs() < 1e-9);
        assert_eq!(
            u.line(),
            "CPU per transaction: PostgreSQL 1000 µs, load generator 200 µs, elsewhere 300 µs; total 1500 µs; 1.50 of 2 cores busy"
        );
        assert!(
            u.to_json()
                .starts_with("{\"per_transaction_us\": {\"PostgreSQL\": 1000.0, \"load generator\": 200.0}, \"elsewhere_us\": 300.0")
        );
        // Nothing done, or no machine times: nothing to say.
        assert_eq!(meter.usage(&from, &to, 0), None);
        let blind = Reading {
            machine: None,
            ..to.clone()
        };
        assert_eq!(meter.usage(&from, &blind, 10), None);
    }

    #[test]
    fn this_process_is_read_on_linux() {
        if !std::path::Path::new("/proc/self/stat").exists() {
            return;
        }
        let meter = Meter::load_generator();
        let from = meter.read();
        assert!(from.parts[0].is_some(), "this process's times");
        // Work until the process's time moves by a tick (10 ms of CPU), and
        // the machine's (each CPU's counters move at its own tick), for as
        // long as that takes on a busy machine.
        let give_up = std::time::Instant::now() + Duration::from_secs(30);
        let mut x = 0u64;
        let to = loop {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            }
            let now = meter.read();
            let machine_moved = match (&from.machine, &now.machine) {
                (Some(a), Some(b)) => b.total > a.total,
                _ => true,
            };
            if (now.parts[0] > from.parts[0] && machine_moved)
                || std::time::Instant::now() > give_up
            {
                break now;
            }
        };
        std::hint::black_box(x);
        assert!(to.parts[0] > from.parts[0], "the work shows in the reading");
        let (a, b) = (
            from.machine.unwrap(),
            to.machine.expect("the machine's times"),
        );
        assert!(b.total > a.total && b.cpus >= 1);
    }
}
