//! The live progress line of a scenario run: once a second, on stderr, one
//! line overwritten in place: time since the start, the rate achieved and
//! p50/p99 over the last second, and the requests so far that got no answer
//! (`--`) or an answer other than 00. Only when stderr is a terminal; a run
//! into a file or a pipe prints nothing of it.
//!
//! The open loop feeds it from the task that already collects the samples,
//! so the terminals never wait on it.

use std::io::Write as _;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// The figures behind the progress line.
#[derive(Debug)]
pub struct Live {
    started: Instant,
    interval_started: Instant,
    /// Latency, microseconds, of the answers of the current interval.
    interval: Histogram<u64>,
    no_answer: u64,
    not_approved: u64,
}

impl Live {
    /// A run starting `started`.
    pub fn new(started: Instant) -> Live {
        Live {
            started,
            interval_started: started,
            interval: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds"),
            no_answer: 0,
            not_approved: 0,
        }
    }

    /// One request's fate.
    pub fn record(&mut self, latency: Duration, rc: &str) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.interval.saturating_record(micros.max(1));
        match rc {
            "00" => {}
            "--" => self.no_answer += 1,
            _ => self.not_approved += 1,
        }
    }

    /// The line for the interval ending `now`; the next interval starts.
    pub fn tick(&mut self, now: Instant) -> String {
        let seconds = now
            .saturating_duration_since(self.interval_started)
            .as_secs_f64();
        let rate = if seconds > 0.0 {
            self.interval.len() as f64 / seconds
        } else {
            0.0
        };
        let ms = |q: f64| {
            if self.interval.is_empty() {
                "-".to_string()
            } else {
                format!("{:.2}", self.interval.value_at_quantile(q) as f64 / 1000.0)
            }
        };
        let line = format!(
            "{:>5.0} s  {rate:>7.0}/s  p50 {:>7} ms  p99 {:>7} ms  no answer {}  not 00 {}",
            now.saturating_duration_since(self.started).as_secs_f64(),
            ms(0.5),
            ms(0.99),
            self.no_answer,
            self.not_approved,
        );
        self.interval.reset();
        self.interval_started = now;
        line
    }

    /// Writes the line for the interval ending now over the previous one.
    pub fn show(&mut self) {
        let line = self.tick(Instant::now());
        let mut err = std::io::stderr().lock();
        // Carriage return, the line, clear to the end of the line.
        let _ = write!(err, "\r{line}\x1b[K");
        let _ = err.flush();
    }

    /// Clears the line, leaving the cursor at its start for what follows.
    pub fn finish(&self) {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K");
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The number after `label` in a line.
    fn figure(line: &str, label: &str) -> f64 {
        let rest = &line[line.find(label).unwrap() + label.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    }

    #[test]
    fn a_line_shows_the_last_second_and_the_failures_so_far() {
        let start = Instant::now();
        let mut live = Live::new(start);
        for ms in 1..=100u64 {
            live.record(Duration::from_millis(ms), if ms == 7 { "51" } else { "00" });
        }
        live.record(Duration::from_secs(2), "--");
        let line = live.tick(start + Duration::from_secs(1));
        assert!(line.starts_with("    1 s      101/s  p50 "), "{line}");
        assert!(line.ends_with("  no answer 1  not 00 1"), "{line}");
        // Three significant digits.
        assert!((figure(&line, "p50") - 51.0).abs() < 0.06, "{line}");
        assert!((figure(&line, "p99") - 100.0).abs() < 0.11, "{line}");
        // The next second starts afresh; the counts so far stay.
        live.record(Duration::from_millis(4), "05");
        live.record(Duration::from_millis(4), "00");
        let line = live.tick(start + Duration::from_secs(3));
        assert!(
            line.starts_with("    3 s        1/s  p50    4.00 ms"),
            "{line}"
        );
        assert!(line.ends_with("  no answer 1  not 00 2"), "{line}");
        let line = live.tick(start + Duration::from_secs(4));
        assert!(
            line.contains("      0/s  p50       - ms  p99       - ms"),
            "{line}"
        );
    }
}
