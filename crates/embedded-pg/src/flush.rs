//! Continuous write-back of the server's data files.
//!
//! PostgreSQL 15 grows a table or an index by writing a page of zeros into
//! the OS page cache (`mdextend`), and asks for nothing to be written out
//! until a checkpoint: a loaded switch grows its journal, postings and their
//! indexes by 10 MB a second. Left to the kernel's defaults, those pages
//! sit dirty until they are 30 s old and are then written out in one burst
//! (100 to 400 MB here); every commit's WAL flush waits behind that burst,
//! and one second of the run has a p99 of 100 ms or more. Measured with
//! purchases at 8,000/s for 40 s: p99 41 ms with bursts, 18 ms with the
//! data written back as it is made.
//!
//! So while the server runs, a thread of ours writes back, a few times a
//! second, the data files of the databases made on it that changed since
//! its last pass (`fdatasync`). It changes nothing PostgreSQL relies on:
//! PostgreSQL still syncs every file itself at each checkpoint, and a
//! write-back error is also reported to PostgreSQL's own descriptors.
//! A database server of one's own would get the same from the kernel's
//! settings (`vm.dirty_background_bytes`), as the README says.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

/// How often the data files are looked at.
const EVERY: Duration = Duration::from_millis(250);

/// The first object id of a database made after initdb: the template
/// databases and `postgres` are below it and never change under load.
const FIRST_USER_OID: u32 = 16384;

/// The write-back thread of one server; stops when dropped.
#[derive(Debug)]
pub(crate) struct Flusher {
    stop: Arc<AtomicBool>,
    synced: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    /// Starts writing back the data files of the databases under `data_dir`.
    pub(crate) fn start(data_dir: &Path) -> std::io::Result<Flusher> {
        let stop = Arc::new(AtomicBool::new(false));
        let synced = Arc::new(AtomicU64::new(0));
        let (s, n, base) = (stop.clone(), synced.clone(), data_dir.join("base"));
        let thread = std::thread::Builder::new()
            .name(crate::FLUSH_THREAD.into())
            .spawn(move || run(&base, &s, &n))?;
        Ok(Flusher {
            stop,
            synced,
            thread: Some(thread),
        })
    }

    /// Files written back so far.
    pub(crate) fn synced(&self) -> u64 {
        self.synced.load(Ordering::Relaxed)
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(base: &Path, stop: &AtomicBool, synced: &AtomicU64) {
    let mut since = SystemTime::now();
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(EVERY);
        // A file written during this pass is looked at again by the next.
        let pass = SystemTime::now();
        for file in changed_since(base, since) {
            match std::fs::File::open(&file).and_then(|f| f.sync_data()) {
                Ok(()) => {
                    synced.fetch_add(1, Ordering::Relaxed);
                }
                // Dropped meanwhile (a table or database removed): nothing to write.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "writing back a data file failed");
                }
            }
        }
        since = pass;
    }
}

/// The files of the user databases under `base` modified at or after `since`.
fn changed_since(base: &Path, since: SystemTime) -> Vec<PathBuf> {
    let mut changed = Vec::new();
    let Ok(databases) = std::fs::read_dir(base) else {
        return changed;
    };
    for db in databases.flatten() {
        let user = db
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|oid| oid >= FIRST_USER_OID);
        if !user {
            continue;
        }
        let Ok(files) = std::fs::read_dir(db.path()) else {
            continue;
        };
        for f in files.flatten() {
            let modified = f.metadata().and_then(|m| m.modified());
            if modified.is_ok_and(|m| m >= since) {
                changed.push(f.path());
            }
        }
    }
    changed
}
