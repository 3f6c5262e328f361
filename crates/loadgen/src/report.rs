//! What a load run reports: per transaction kind, the count, the response
//! codes, and latency percentiles (p50, p90, p99, p99.9, max) from HDR
//! histograms (microseconds, three significant digits); and the latency of
//! each second of the run, for the chart of latency over time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

/// The code a request is recorded with when its reply's MAC (F64) was
/// missing or wrong: the terminal did not take it as the switch's answer.
/// (`--` is no answer at all.)
pub const BAD_MAC: &str = "MAC";

/// The longest latency a histogram records (longer ones are clamped).
const MAX_MICROS: u64 = 600_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid bounds")
}

/// A latency as the histograms record it: microseconds, within their bounds.
fn micros(latency: Duration) -> u64 {
    u64::try_from(latency.as_micros())
        .unwrap_or(MAX_MICROS)
        .clamp(1, MAX_MICROS)
}

/// One kind's figures.
#[derive(Debug, Clone)]
pub struct KindStats {
    /// Answers by response code (`--` for no answer).
    pub codes: BTreeMap<String, u64>,
    /// Latency in microseconds.
    pub latency: Histogram<u64>,
}

impl KindStats {
    fn new() -> KindStats {
        KindStats {
            codes: BTreeMap::new(),
            latency: histogram(),
        }
    }

    /// Requests recorded.
    pub fn count(&self) -> u64 {
        self.codes.values().sum()
    }

    /// p50, p90, p99, p99.9 and max.
    pub fn percentiles(&self) -> [Duration; 5] {
        let at = |q: f64| Duration::from_micros(self.latency.value_at_quantile(q));
        [
            at(0.5),
            at(0.9),
            at(0.99),
            at(0.999),
            Duration::from_micros(self.latency.max()),
        ]
    }

    /// Latency by percentile from p0 to p99.99 on a scale of nines: `x` is
    /// `-log10(1 - q)`, so 0 is p0, 1 p90, 2 p99, 3 p99.9 and 4 p99.99;
    /// `per_nine` points for each nine.
    pub fn by_nines(&self, per_nine: u32) -> Vec<(f64, Duration)> {
        (0..=4 * per_nine)
            .map(|i| {
                let x = f64::from(i) / f64::from(per_nine);
                let q = 1.0 - 10f64.powf(-x);
                (x, Duration::from_micros(self.latency.value_at_quantile(q)))
            })
            .collect()
    }
}

/// One second of a run: the requests due in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Second {
    /// Seconds since the run started.
    pub at: u64,
    /// Requests due in it.
    pub count: u64,
    /// Their median latency.
    pub p50: Duration,
    /// Their p99.
    pub p99: Duration,
    /// The slowest.
    pub max: Duration,
}

/// Latency second by second: a histogram per second of the run, a request
/// counting in the second it was due (open loop: a stall shows where it
/// happened, in the requests that waited behind it).
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    seconds: Vec<Histogram<u64>>,
}

impl Timeline {
    /// Records a request due `scheduled` after the start.
    pub fn record(&mut self, scheduled: Duration, latency: Duration) {
        let i = usize::try_from(scheduled.as_secs()).unwrap_or(usize::MAX);
        if i >= self.seconds.len() {
            self.seconds.resize_with(i + 1, histogram);
        }
        self.seconds[i]
            .record(micros(latency))
            .expect("within bounds");
    }

    /// Every second in which requests were due.
    pub fn seconds(&self) -> Vec<Second> {
        self.seconds
            .iter()
            .enumerate()
            .filter(|(_, h)| !h.is_empty())
            .map(|(at, h)| Second {
                at: at as u64,
                count: h.len(),
                p50: Duration::from_micros(h.value_at_quantile(0.5)),
                p99: Duration::from_micros(h.value_at_quantile(0.99)),
                max: Duration::from_micros(h.max()),
            })
            .collect()
    }

    /// The seconds as a JSON array, for machines: each second's count and
    /// its p50, p99 and max in milliseconds.
    pub fn to_json(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let seconds: Vec<String> = self
            .seconds()
            .iter()
            .map(|s| {
                format!(
                    "{{\"at\": {}, \"count\": {}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"max_ms\": {:.3}}}",
                    s.at,
                    s.count,
                    ms(s.p50),
                    ms(s.p99),
                    ms(s.max)
                )
            })
            .collect();
        format!("[{}]", seconds.join(", "))
    }
}

/// A run's figures, by transaction kind.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// By kind (`purchase`, `void`, ...).
    pub kinds: BTreeMap<String, KindStats>,
}

impl Report {
    /// Records one answered (or unanswered: `rc` `--`) request.
    pub fn record(&mut self, kind: &str, rc: &str, latency: Duration) {
        // Looked up before inserting: the keys are copied once per kind and
        // code, not once per request.
        if !self.kinds.contains_key(kind) {
            self.kinds.insert(kind.to_string(), KindStats::new());
        }
        let stats = self.kinds.get_mut(kind).expect("inserted above");
        match stats.codes.get_mut(rc) {
            Some(n) => *n += 1,
            None => {
                stats.codes.insert(rc.to_string(), 1);
            }
        }
        stats
            .latency
            .record(micros(latency))
            .expect("within bounds");
    }

    /// Adds another report's figures to this one.
    pub fn merge(&mut self, other: &Report) {
        for (kind, s) in &other.kinds {
            let mine = self
                .kinds
                .entry(kind.clone())
                .or_insert_with(KindStats::new);
            for (rc, n) in &s.codes {
                *mine.codes.entry(rc.clone()).or_default() += n;
            }
            mine.latency.add(&s.latency).expect("same bounds");
        }
    }

    /// All kinds together.
    pub fn total(&self) -> KindStats {
        let mut all = KindStats::new();
        for s in self.kinds.values() {
            for (rc, n) in &s.codes {
                *all.codes.entry(rc.clone()).or_default() += n;
            }
            all.latency.add(&s.latency).expect("same bounds");
        }
        all
    }

    /// The figures as JSON: per kind (and `all`) the count, the codes, and
    /// the percentiles in milliseconds.
    pub fn to_json(&self) -> String {
        let total = self.total();
        let kinds: Vec<String> = self
            .kinds
            .iter()
            .map(|(k, s)| (k.as_str(), s))
            .chain([("all", &total)])
            .map(|(kind, s)| {
                let [p50, p90, p99, p999, max] = s.percentiles().map(|d| d.as_secs_f64() * 1000.0);
                let codes: Vec<String> = s.codes.iter().map(|(rc, n)| format!("{rc:?}: {n}")).collect();
                format!(
                    "{kind:?}: {{\"count\": {}, \"codes\": {{{}}}, \"p50_ms\": {p50:.3}, \"p90_ms\": {p90:.3}, \"p99_ms\": {p99:.3}, \"p999_ms\": {p999:.3}, \"max_ms\": {max:.3}}}",
                    s.count(),
                    codes.join(", ")
                )
            })
            .collect();
        format!("{{\"kinds\": {{{}}}}}", kinds.join(", "))
    }

    /// The final table: one line per kind and a total.
    pub fn table(&self) -> String {
        let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1000.0);
        let mut out = format!(
            "{:<18} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  codes\n",
            "kind", "count", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        );
        let total = self.total();
        let rows = self
            .kinds
            .iter()
            .map(|(k, s)| (k.as_str(), s))
            .chain([("all", &total)]);
        for (kind, s) in rows {
            let [p50, p90, p99, p999, max] = s.percentiles();
            let codes: Vec<String> = s.codes.iter().map(|(rc, n)| format!("{rc}:{n}")).collect();
            let _ = writeln!(
                out,
                "{kind:<18} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {}",
                s.count(),
                ms(p50),
                ms(p90),
                ms(p99),
                ms(p999),
                ms(max),
                codes.join(" ")
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_inputs() {
        let mut r = Report::default();
        // 1 ms to 1000 ms, one each: p50 is 500 ms, p99 990 ms, max 1000 ms.
        for ms in 1..=1000u64 {
            r.record(
                "purchase",
                if ms % 10 == 0 { "51" } else { "00" },
                Duration::from_millis(ms),
            );
        }
        let s = &r.kinds["purchase"];
        assert_eq!(s.count(), 1000);
        assert_eq!(s.codes["00"], 900);
        assert_eq!(s.codes["51"], 100);
        let [p50, p90, p99, p999, max] = s.percentiles();
        // HDR keeps three significant digits: within 0.1%.
        let near =
            |d: Duration, ms: f64| (d.as_secs_f64() * 1000.0 - ms).abs() <= ms * 0.001 + 0.001;
        assert!(near(p50, 500.0), "{p50:?}");
        assert!(near(p90, 900.0), "{p90:?}");
        assert!(near(p99, 990.0), "{p99:?}");
        assert!(near(p999, 999.0), "{p999:?}");
        assert!(near(max, 1000.0), "{max:?}");
    }

    #[test]
    fn merged_reports_add_up_and_the_table_has_a_total() {
        let mut a = Report::default();
        let mut b = Report::default();
        a.record("purchase", "00", Duration::from_millis(2));
        b.record("purchase", "00", Duration::from_millis(4));
        b.record("void", "--", Duration::from_secs(10));
        a.merge(&b);
        assert_eq!(a.kinds["purchase"].count(), 2);
        assert_eq!(a.total().count(), 3);
        let table = a.table();
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("all") && l.contains(" 3 ")),
            "{table}"
        );
        assert!(table.contains("--:1"), "{table}");
        let json = a.to_json();
        assert!(
            json.starts_with(
                "{\"kinds\": {\"purchase\": {\"count\": 2, \"codes\": {\"00\": 2}, \"p50_ms\": 2.0"
            ),
            "{json}"
        );
        assert!(json.contains("\"all\": {\"count\": 3"), "{json}");
    }

    #[test]
    fn the_timeline_buckets_requests_by_the_second_they_were_due() {
        let mut t = Timeline::default();
        // Second 0: 1..=100 ms; second 2: one slow request; second 1: none.
        for ms in 1..=100u64 {
            t.record(Duration::from_millis(ms * 9), Duration::from_millis(ms));
        }
        t.record(Duration::from_millis(2_500), Duration::from_secs(3));
        let seconds = t.seconds();
        assert_eq!(seconds.len(), 2, "{seconds:?}");
        let first = seconds[0];
        assert_eq!((first.at, first.count), (0, 100));
        let near = |d: Duration, ms: f64| (d.as_secs_f64() * 1000.0 - ms).abs() <= ms * 0.001;
        assert!(near(first.p50, 50.0), "{first:?}");
        assert!(near(first.p99, 99.0), "{first:?}");
        assert!(near(first.max, 100.0), "{first:?}");
        assert_eq!((seconds[1].at, seconds[1].count), (2, 1));
        assert!(near(seconds[1].max, 3000.0));
        let json = t.to_json();
        assert!(
            json.starts_with("[{\"at\": 0, \"count\": 100, \"p50_ms\": 50.0"),
            "{json}"
        );
        assert!(json.contains("}, {\"at\": 2, \"count\": 1, "), "{json}");
        assert!(json.ends_with("}]"), "{json}");
    }

    #[test]
    fn latency_by_nines_runs_from_the_fastest_to_p99_99() {
        let mut r = Report::default();
        for ms in 1..=10_000u64 {
            r.record("purchase", "00", Duration::from_micros(ms * 100));
        }
        let curve = r.kinds["purchase"].by_nines(2);
        let xs: Vec<f64> = curve.iter().map(|(x, _)| *x).collect();
        assert_eq!(xs, [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]);
        let ms = |i: usize| curve[i].1.as_secs_f64() * 1000.0;
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        // 0.1 ms to 1000 ms: p0 0.1, p90 900, p99 990, p99.9 999, p99.99 999.9.
        assert!(near(ms(0), 0.1), "{}", ms(0));
        assert!(near(ms(2), 900.0), "{}", ms(2));
        assert!(near(ms(4), 990.0), "{}", ms(4));
        assert!(near(ms(6), 999.0), "{}", ms(6));
        assert!(near(ms(8), 999.9), "{}", ms(8));
        assert!(curve.windows(2).all(|w| w[0].1 <= w[1].1));
    }
}
