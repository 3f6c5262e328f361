//! `--html FILE`: a scenario run as one self-contained page that opens
//! anywhere, offline: no scripts, no fonts, no links. It names what was
//! played (the scenario's values) and where (the machine, the switchyard
//! version, the date), gives the per-kind table of the text report, and
//! draws two inline SVG charts: latency over time (p50, p99 and max of each
//! second, by when the requests were due) and latency by percentile (one
//! line per kind, on a scale of nines).
//!
//! Every piece of text that comes from outside (the scenario's name, the
//! machine's, the kinds and codes) is escaped.

use std::fmt::Write as _;
use std::time::Duration;

use crate::cpu::Usage;
use crate::machine::Machine;
use crate::report::KindStats;
use crate::scenario::{Run, Scenario};

/// What the page shows.
#[derive(Debug, Clone, Copy)]
pub struct Page<'a> {
    /// What was played.
    pub scenario: &'a Scenario,
    /// What it did.
    pub run: &'a Run,
    /// Where.
    pub machine: &'a Machine,
    /// Where the CPU went, when it was measured.
    pub cpu: Option<&'a Usage>,
    /// The switchyard version that played it.
    pub version: &'a str,
    /// When, as people read it.
    pub generated: &'a str,
}

/// Text made safe for HTML, in element content and in quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "
body { font-family: sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; }
th, td { padding: 0.2em 0.8em; border-bottom: 1px solid #ddd; text-align: left; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
svg { display: block; margin: 0.5em 0; }
svg text { font-family: sans-serif; font-size: 12px; fill: #222; }
.note { color: #666; font-size: 0.9em; }
.failed { color: #b00; }
";

/// Series colours, in order; `all` is black.
const COLOURS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#bcbd22", "#7f7f7f",
];

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A duration as a scenario file writes it.
fn written(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The MAC failures, for the summary line when the terminals held keys or
/// there were any (` 3 MAC failures;`, marked as a failure), else nothing.
fn mac_failures(s: &Scenario, run: &Run) -> String {
    match run.mac_failures {
        0 if s.derivation_key.is_none() => String::new(),
        0 => " 0 MAC failures;".to_string(),
        n => format!(" <strong class=\"failed\">{n} MAC failures</strong>;"),
    }
}

/// The whole page.
pub fn render(page: &Page<'_>) -> String {
    let (s, run, m) = (page.scenario, page.run, page.machine);
    let mut out = String::with_capacity(64 * 1024);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>switchyard load: {name}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1>switchyard load: scenario {name}</h1>\n",
        name = escape(&s.name)
    );
    let _ = writeln!(
        out,
        "<p>{} requests scheduled in {:.1} s; {} connection failures;{} settlements balanced {}/{}.</p>",
        s.count(),
        run.elapsed.as_secs_f64(),
        run.errors,
        mac_failures(s, run),
        run.balanced.0,
        run.balanced.1
    );

    out.push_str("<h2>Results</h2>\n");
    out.push_str(&results_table(run));
    out.push_str(
        "<p class=\"note\">Latency in milliseconds, from the time each request was due \
         (open loop), HDR histograms with three significant digits; codes are response \
         codes, <code>--</code> no answer, <code>MAC</code> a reply whose MAC was missing \
         or wrong.</p>\n",
    );
    if run.steps.len() > 1 {
        out.push_str(&steps_table(run, s.p99_target));
    }

    out.push_str("<h2>Latency over time</h2>\n");
    out.push_str(&latency_over_time(run));
    out.push_str("<h2>Latency by percentile</h2>\n");
    out.push_str(&latency_by_percentile(run));

    out.push_str("<h2>Scenario</h2>\n");
    out.push_str(&rows(&scenario_rows(s)));
    out.push_str("<h2>Machine</h2>\n");
    out.push_str(&rows(&[
        ("host", m.hostname.clone()),
        ("CPU", m.cpu.clone()),
        ("CPUs", m.cpus.to_string()),
        ("memory", m.memory()),
        ("operating system", m.os.clone()),
        ("kernel", m.kernel.clone()),
        ("switchyard", page.version.to_string()),
        ("run at", page.generated.to_string()),
    ]));
    if let Some(cpu) = page.cpu {
        out.push_str("<h2>CPU per transaction</h2>\n");
        let us = |d: &std::time::Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
        let mut table: Vec<(&str, String)> = cpu
            .per_transaction
            .iter()
            .map(|(part, d)| (part.as_str(), us(d)))
            .collect();
        table.push(("elsewhere on the machine", us(&cpu.elsewhere)));
        table.push(("total", us(&cpu.total())));
        table.push((
            "cores busy",
            format!("{:.2} of {}", cpu.cores_busy, cpu.cores),
        ));
        out.push_str(&rows(&table));
    }
    out.push_str("</body>\n</html>\n");
    out
}

/// A two-column table of labels and (escaped) values.
fn rows(rows: &[(&str, String)]) -> String {
    let mut out = String::from("<table>\n");
    for (label, value) in rows {
        let _ = writeln!(
            out,
            "<tr><th>{}</th><td>{}</td></tr>",
            escape(label),
            escape(value)
        );
    }
    out.push_str("</table>\n");
    out
}

fn scenario_rows(s: &Scenario) -> Vec<(&'static str, String)> {
    let mut rows = vec![
        ("name", s.name.clone()),
        ("terminals", s.terminals.to_string()),
        ("merchant", s.merchant.clone()),
    ];
    if s.steps.is_empty() {
        rows.push(("rate", format!("{}/s", s.rate)));
        rows.push(("duration", written(s.duration)));
    } else {
        let steps: Vec<String> = s.steps.iter().map(f64::to_string).collect();
        rows.push(("steps", format!("{} /s", steps.join(", "))));
        rows.push(("duration", format!("{} per step", written(s.duration))));
        rows.push(("p99 target", written(s.p99_target)));
    }
    let mix: Vec<String> = s
        .mix
        .iter()
        .map(|(op, w)| format!("{} {w}", op.name()))
        .collect();
    let f = &s.faults;
    let faults = if f.none() {
        "none".to_string()
    } else {
        format!(
            "latency {}, drop_reply {}, late_reply {}, close_connection {}",
            written(f.latency),
            f.drop_reply,
            f.late_reply,
            f.close_connection
        )
    };
    rows.extend([
        ("cards", s.cards.to_string()),
        ("amount", format!("{} to {} fen", s.amount.0, s.amount.1)),
        ("mix", mix.join(", ")),
        ("settle", if s.settle { "yes" } else { "no" }.to_string()),
        ("seed", s.seed.to_string()),
        ("faults", faults),
        (
            "terminal keys",
            s.derivation_key
                .as_ref()
                .map_or("none: no MACs".to_string(), |k| {
                    // The check value names the key without giving it away.
                    let kcv: String = k.check_value()[..3]
                        .iter()
                        .map(|b| format!("{b:02X}"))
                        .collect();
                    format!("master keys derived from the key with check value {kcv}; MACs on")
                }),
        ),
    ]);
    rows
}

/// The text report's table, one row per kind and `all`.
fn results_table(run: &Run) -> String {
    let mut out = String::from(
        "<table>\n<tr><th>kind</th><th class=\"n\">count</th><th class=\"n\">p50 ms</th>\
         <th class=\"n\">p90 ms</th><th class=\"n\">p99 ms</th><th class=\"n\">p99.9 ms</th>\
         <th class=\"n\">max ms</th><th>codes</th></tr>\n",
    );
    let total = run.report.total();
    let kinds = run
        .report
        .kinds
        .iter()
        .map(|(k, s)| (k.as_str(), s))
        .chain([("all", &total)]);
    for (kind, stats) in kinds {
        let [p50, p90, p99, p999, max] = stats.percentiles().map(ms);
        let codes: Vec<String> = stats
            .codes
            .iter()
            .map(|(rc, n)| format!("{rc}:{n}"))
            .collect();
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{p50:.2}</td>\
             <td class=\"n\">{p90:.2}</td><td class=\"n\">{p99:.2}</td><td class=\"n\">{p999:.2}</td>\
             <td class=\"n\">{max:.2}</td><td>{}</td></tr>",
            escape(kind),
            stats.count(),
            escape(&codes.join(" "))
        );
    }
    out.push_str("</table>\n");
    out
}

fn steps_table(run: &Run, p99_target: Duration) -> String {
    let mut out = String::from(
        "<h2>Rate steps</h2>\n<table>\n<tr><th class=\"n\">scheduled /s</th>\
         <th class=\"n\">achieved /s</th><th class=\"n\">p50 ms</th><th class=\"n\">p99 ms</th>\
         <th class=\"n\">CPU µs per transaction</th><th class=\"n\">cores busy</th></tr>\n",
    );
    for step in &run.steps {
        let (cpu, busy) = step.cpu_cells();
        let _ = writeln!(
            out,
            "<tr><td class=\"n\">{:.0}</td><td class=\"n\">{:.0}</td>\
             <td class=\"n\">{:.2}</td><td class=\"n\">{:.2}</td>\
             <td class=\"n\">{cpu}</td><td class=\"n\">{busy}</td></tr>",
            step.rate,
            step.achieved,
            ms(step.p50),
            ms(step.p99)
        );
    }
    out.push_str("</table>\n");
    let _ = writeln!(
        out,
        "<p>saturation: {} (p99 under {} ms)</p>",
        run.saturation(p99_target)
            .map_or("no step sustained".to_string(), |r| format!(
                "{r:.0}/s sustained"
            )),
        p99_target.as_millis()
    );
    out
}

fn latency_over_time(run: &Run) -> String {
    let seconds = run.timeline.seconds();
    let Some(last) = seconds.last() else {
        return "<p>No requests.</p>\n".to_string();
    };
    // Each second's figures sit in the middle of it.
    let line =
        |name: &str, colour: &'static str, pick: fn(&crate::report::Second) -> Duration| Series {
            name: name.to_string(),
            colour,
            width: 1.5,
            points: seconds
                .iter()
                .map(|s| (s.at as f64 + 0.5, ms(pick(s))))
                .collect(),
        };
    let series = [
        line("p50", COLOURS[0], |s| s.p50),
        line("p99", COLOURS[3], |s| s.p99),
        line("max", COLOURS[1], |s| s.max),
    ];
    Chart {
        label: "latency over time",
        x: XAxis::Seconds((last.at + 1) as f64),
    }
    .svg(&series)
}

fn latency_by_percentile(run: &Run) -> String {
    let total = run.report.total();
    if total.count() == 0 {
        return "<p>No requests.</p>\n".to_string();
    }
    let curve = |stats: &KindStats| {
        stats
            .by_nines(20)
            .into_iter()
            .map(|(x, d)| (x, ms(d)))
            .collect()
    };
    let all = Series {
        name: "all".into(),
        colour: "#000000",
        width: 2.5,
        points: curve(&total),
    };
    let kinds = run
        .report
        .kinds
        .iter()
        .enumerate()
        .map(|(i, (kind, stats))| Series {
            name: kind.clone(),
            colour: COLOURS[i % COLOURS.len()],
            width: 1.2,
            points: curve(stats),
        });
    let series: Vec<Series> = std::iter::once(all).chain(kinds).collect();
    Chart {
        label: "latency by percentile",
        x: XAxis::Nines,
    }
    .svg(&series)
}

/// One line of a chart: points (x, milliseconds).
#[derive(Debug, Clone)]
struct Series {
    name: String,
    colour: &'static str,
    width: f64,
    points: Vec<(f64, f64)>,
}

/// What the x axis counts.
#[derive(Debug, Clone, Copy)]
enum XAxis {
    /// Seconds since the start, from 0 to this.
    Seconds(f64),
    /// Percentiles on a scale of nines, 0 (p0) to 4 (p99.99).
    Nines,
}

/// A line chart with a logarithmic latency axis.
#[derive(Debug, Clone, Copy)]
struct Chart {
    label: &'static str,
    x: XAxis,
}

const WIDTH: f64 = 760.0;
const PLOT_HEIGHT: f64 = 280.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 36.0;
const BOTTOM: f64 = 50.0;

/// Where each legend entry starts (x, text baseline): in rows above the
/// plot, as many to a row as fit.
fn legend<'a>(names: impl Iterator<Item = &'a str>) -> Vec<(f64, f64)> {
    let (mut x, mut row) = (LEFT, 0.0);
    names
        .map(|name| {
            let width = 30.0 + 7.0 * name.chars().count() as f64;
            if x > LEFT && x + width > WIDTH - RIGHT {
                x = LEFT;
                row += 1.0;
            }
            let at = (x, 18.0 + 16.0 * row);
            x += width;
            at
        })
        .collect()
}

impl Chart {
    fn svg(&self, series: &[Series]) -> String {
        let entries = legend(series.iter().map(|s| s.name.as_str()));
        let top = entries.last().map_or(0.0, |e| e.1) + 22.0;
        let height = top + PLOT_HEIGHT + BOTTOM;
        let (w, h) = (WIDTH - LEFT - RIGHT, PLOT_HEIGHT);
        let values = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
        let (lo, hi) = decades(values);
        let (x_end, x_ticks): (f64, Vec<(f64, String)>) = match self.x {
            XAxis::Seconds(end) => {
                let step = nice_step(end);
                let ticks = (0..)
                    .map(|i| f64::from(i) * step)
                    .take_while(|t| *t <= end + 1e-9)
                    .map(|t| (t, format!("{t}")))
                    .collect();
                (end.max(1.0), ticks)
            }
            XAxis::Nines => (
                4.0,
                ["0%", "90%", "99%", "99.9%", "99.99%"]
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (i as f64, l.to_string()))
                    .collect(),
            ),
        };
        let x = |v: f64| LEFT + v / x_end * w;
        let y = |v: f64| {
            let v = v.max(lo);
            top + h - (v.log10() - lo.log10()) / (hi.log10() - lo.log10()) * h
        };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "<svg width=\"{WIDTH}\" height=\"{height}\" viewBox=\"0 0 {WIDTH} {height}\" role=\"img\" aria-label=\"{}\">",
            escape(self.label)
        );
        let _ = writeln!(
            out,
            "<rect x=\"{LEFT}\" y=\"{top}\" width=\"{w}\" height=\"{h}\" fill=\"none\" stroke=\"#999\"/>"
        );
        // The latency axis: a labelled line at each power of ten, lighter
        // lines at 2 and 5 (labelled too when the axis spans few decades).
        let few = hi / lo <= 100.0;
        for (v, major) in y_ticks(lo, hi) {
            let yv = y(v);
            let _ = writeln!(
                out,
                "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{yv:.1}\" y2=\"{yv:.1}\" stroke=\"{}\"/>",
                LEFT + w,
                if major { "#ccc" } else { "#eee" }
            );
            if major || few {
                let _ = writeln!(
                    out,
                    "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                    LEFT - 6.0,
                    yv + 4.0,
                    tick_label(v)
                );
            }
        }
        for (v, label) in &x_ticks {
            let xv = x(*v);
            let _ = writeln!(
                out,
                "<line x1=\"{xv:.1}\" x2=\"{xv:.1}\" y1=\"{top}\" y2=\"{:.1}\" stroke=\"#eee\"/>\
                 <text x=\"{xv:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                top + h + 5.0,
                top + h + 18.0,
                escape(label)
            );
        }
        let x_title = match self.x {
            XAxis::Seconds(_) => "seconds since the start (when requests were due)",
            XAxis::Nines => "percentile",
        };
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{x_title}</text>",
            LEFT + w / 2.0,
            height - 12.0
        );
        let _ = writeln!(
            out,
            "<text transform=\"translate(16 {:.1}) rotate(-90)\" text-anchor=\"middle\">latency, ms (log scale)</text>",
            top + h / 2.0
        );
        for (s, (lx, ly)) in series.iter().zip(&entries) {
            let _ = writeln!(
                out,
                "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"14\" height=\"4\" fill=\"{}\"/>\
                 <text x=\"{:.1}\" y=\"{ly:.1}\">{}</text>",
                ly - 6.0,
                s.colour,
                lx + 18.0,
                escape(&s.name)
            );
        }
        // Drawn last to first: the first (p50, or the first kind) on top.
        for s in series.iter().rev() {
            let points: Vec<String> = s
                .points
                .iter()
                .map(|&(px, py)| format!("{:.1},{:.1}", x(px), y(py)))
                .collect();
            let _ = writeln!(
                out,
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"{}\" points=\"{}\"><title>{}</title></polyline>",
                s.colour,
                s.width,
                points.join(" "),
                escape(&s.name)
            );
            // A lone point draws no line: mark it.
            if s.points.len() == 1 {
                let _ = writeln!(
                    out,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"/>",
                    x(s.points[0].0),
                    y(s.points[0].1),
                    s.colour
                );
            }
        }
        out.push_str("</svg>\n");
        out
    }
}

/// The powers of ten around `values` (milliseconds): the axis runs from the
/// one at or below the smallest to the one at or above the largest (a
/// microsecond at least, one decade at least).
fn decades(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (min, max) = values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if max == 0.0 {
        return (0.1, 1.0);
    }
    let lo = 10f64.powf(min.max(0.001).log10().floor());
    let mut hi = 10f64.powf(max.log10().ceil());
    if hi <= lo {
        hi = lo * 10.0;
    }
    (lo, hi)
}

/// Lines of the latency axis from `lo` to `hi` (powers of ten): each power
/// of ten (major) and 2 and 5 times it.
fn y_ticks(lo: f64, hi: f64) -> Vec<(f64, bool)> {
    let mut ticks = Vec::new();
    let mut decade = lo;
    while decade <= hi * 1.000_001 {
        ticks.push((decade, true));
        if decade * 2.0 < hi {
            ticks.push((decade * 2.0, false));
            ticks.push((decade * 5.0, false));
        }
        decade *= 10.0;
    }
    ticks
}

/// A tick's number without float noise: `0.001`, `0.5`, `20`, `1000`.
fn tick_label(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        let digits = (-v.log10()).ceil() as usize;
        format!("{v:.digits$}")
    }
}

/// A step of 1, 2 or 5 times a power of ten that cuts `0..end` into at
/// most ten pieces.
fn nice_step(end: f64) -> f64 {
    let rough = (end / 10.0).max(1.0);
    let power = 10f64.powf(rough.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= rough)
        .unwrap_or(10.0 * power)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Report, Timeline};
    use crate::scenario::Step;

    fn run_of_known_samples() -> Run {
        let mut report = Report::default();
        let mut timeline = Timeline::default();
        // Ten seconds at 100 requests a second: purchases of 1 to 10 ms;
        // second 6 stalls (every request due in it took 200 ms).
        for second in 0..10u64 {
            for i in 0..100u64 {
                let latency = if second == 6 {
                    Duration::from_millis(200)
                } else {
                    Duration::from_millis(1 + i % 10)
                };
                let rc = if i == 0 { "51" } else { "00" };
                report.record("purchase", rc, latency);
                timeline.record(Duration::from_millis(second * 1000 + i * 10), latency);
            }
        }
        report.record("settlement", "00", Duration::from_millis(3));
        Run {
            report,
            balanced: (1, 1),
            unbalanced: Vec::new(),
            errors: 0,
            resets: 0,
            reconnects: 0,
            mac_failures: 0,
            elapsed: Duration::from_secs(10),
            steps: vec![Step {
                rate: 100.0,
                achieved: 100.0,
                p50: Duration::from_millis(5),
                p99: Duration::from_millis(200),
                cpu: None,
            }],
            timeline,
        }
    }

    fn page_of(scenario: &Scenario, run: &Run) -> String {
        let machine = Machine::from_files(
            "bench<1>",
            "processor : 0\nmodel name : Test CPU & Co\n",
            "MemTotal: 2097152 kB\n",
            "PRETTY_NAME=\"Test OS 1\"\n",
            "6.1.0",
        );
        render(&Page {
            scenario,
            run,
            machine: &machine,
            cpu: Some(&Usage {
                per_transaction: vec![("PostgreSQL".into(), Duration::from_micros(196))],
                elsewhere: Duration::from_micros(4),
                cores_busy: 1.5,
                cores: 2,
            }),
            version: "0.1.0",
            generated: "2026-11-23 09:00:00 +00:00",
        })
    }

    #[test]
    fn the_page_is_self_contained_and_has_the_table_the_charts_and_the_setting() {
        let scenario = Scenario::parse(
            "name = \"<b>smoke & mirrors</b>\"\nterminals = 3\nrate = 100\nduration = \"10s\"\n\
             [mix]\npurchase = 8\npreauth = 2\n[faults]\ndrop_reply = 0.05\n",
            "s.toml",
        )
        .unwrap();
        let run = run_of_known_samples();
        let page = page_of(&scenario, &run);
        // Nothing fetched, nothing run.
        assert!(!page.contains("http"), "a link or a namespace URL");
        assert!(!page.contains("<script"));
        assert!(!page.contains("src="));
        // Two charts, each a complete SVG.
        assert_eq!(page.matches("<svg ").count(), 2);
        assert_eq!(page.matches("</svg>").count(), 2);
        assert!(page.contains("aria-label=\"latency over time\""));
        assert!(page.contains("aria-label=\"latency by percentile\""));
        assert!(page.contains(">99.99%</text>"));
        // The table: 1001 purchases, their codes, the max of the stall.
        assert!(
            page.contains("<tr><td>purchase</td><td class=\"n\">1000</td>"),
            "{page}"
        );
        assert!(page.contains("00:990 51:10"));
        assert!(page.contains("<td class=\"n\">200.06</td>"), "{page}");
        assert!(page.contains("<tr><td>all</td><td class=\"n\">1001</td>"));
        // The scenario and the machine, escaped.
        assert!(page.contains("scenario &lt;b&gt;smoke &amp; mirrors&lt;/b&gt;"));
        assert!(!page.contains("<b>smoke"));
        assert!(page.contains("<td>purchase 8, preauth 2</td>"));
        assert!(page.contains("<td>100/s</td>") && page.contains("<td>10s</td>"));
        assert!(
            page.contains("<td>latency 0s, drop_reply 0.05, late_reply 0, close_connection 0</td>")
        );
        assert!(page.contains("<td>bench&lt;1&gt;</td>"));
        assert!(page.contains("<td>Test CPU &amp; Co</td>"));
        assert!(page.contains("<td>2.0 GiB</td>") && page.contains("<td>Test OS 1</td>"));
        assert!(page.contains("<td>0.1.0</td>") && page.contains("2026-11-23 09:00:00"));
        // Where the CPU went.
        assert!(
            page.contains("<tr><th>PostgreSQL</th><td>196 µs</td></tr>"),
            "{page}"
        );
        assert!(page.contains("<tr><th>total</th><td>200 µs</td></tr>"));
        assert!(page.contains("<tr><th>cores busy</th><td>1.50 of 2</td></tr>"));
    }

    #[test]
    fn mac_failures_are_said_by_name_when_the_terminals_held_keys() {
        let mut scenario = Scenario::parse("terminals = 1\n", "s.toml").unwrap();
        let mut run = run_of_known_samples();
        let summary = |page: &str| {
            let at = page.find("requests scheduled").unwrap();
            page[at..at + page[at..].find("</p>").unwrap()].to_string()
        };
        // Without keys there are no MACs to fail: nothing said.
        let page = page_of(&scenario, &run);
        assert!(!summary(&page).contains("MAC"), "{}", summary(&page));
        assert!(page.contains("<td>none: no MACs</td>"), "{page}");
        scenario.derivation_key = Some(iso8583::keys::DerivationKey::new(&[
            0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF, 0xFE, 0xDC, 0xBA, 0x98, 0x76, 0x54,
            0x32, 0x10,
        ]));
        let page = page_of(&scenario, &run);
        assert!(
            summary(&page).contains("connection failures; 0 MAC failures;"),
            "{}",
            summary(&page)
        );
        // The key by its check value (published for this test key), never in clear.
        assert!(page.contains("check value 08D7B4; MACs on"), "{page}");
        assert!(!page.contains("0123456789ABCDEF"));
        run.mac_failures = 2;
        let page = page_of(&scenario, &run);
        assert!(
            summary(&page).contains("<strong class=\"failed\">2 MAC failures</strong>;"),
            "{}",
            summary(&page)
        );
    }

    #[test]
    fn the_rate_steps_show_where_each_one_saturated_and_what_it_cost() {
        let mut run = run_of_known_samples();
        let step = |rate: f64, achieved: f64, p99_ms: u64, cpu: Option<Usage>| Step {
            rate,
            achieved,
            p50: Duration::from_millis(2),
            p99: Duration::from_millis(p99_ms),
            cpu,
        };
        let cost = Usage {
            per_transaction: vec![("PostgreSQL".into(), Duration::from_micros(150))],
            elsewhere: Duration::from_micros(80),
            cores_busy: 1.38,
            cores: 2,
        };
        run.steps = vec![
            step(1000.0, 999.0, 5, Some(cost)),
            // Fast enough, but the rate was not reached.
            step(2000.0, 1800.0, 6, None),
            step(3000.0, 2990.0, 25, None),
        ];
        assert_eq!(run.saturation(Duration::from_millis(20)), Some(1000.0));
        let table = steps_table(&run, Duration::from_millis(20));
        assert!(
            table.contains(
                "<td class=\"n\">1000</td><td class=\"n\">999</td><td class=\"n\">2.00</td>\
                 <td class=\"n\">5.00</td><td class=\"n\">230</td><td class=\"n\">1.38 of 2</td></tr>"
            ),
            "{table}"
        );
        // A step whose CPU could not be read has empty cells, not zeros.
        assert!(
            table.contains("<td class=\"n\"></td><td class=\"n\"></td></tr>"),
            "{table}"
        );
        assert!(table.contains("saturation: 1000/s sustained (p99 under 20 ms)"));
    }

    #[test]
    fn the_chart_of_time_has_a_point_per_second_and_the_stall_on_top() {
        let run = run_of_known_samples();
        let svg = latency_over_time(&run);
        let polylines: Vec<&str> = svg.lines().filter(|l| l.starts_with("<polyline")).collect();
        assert_eq!(polylines.len(), 3, "p50, p99, max");
        // Drawn max first, p50 last (on top).
        assert!(polylines[2].ends_with("<title>p50</title></polyline>"));
        let points = |line: &str| -> Vec<(f64, f64)> {
            let list = line
                .split("points=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            list.split(' ')
                .map(|p| {
                    let (x, y) = p.split_once(',').unwrap();
                    (x.parse().unwrap(), y.parse().unwrap())
                })
                .collect()
        };
        let p50 = points(polylines[2]);
        assert_eq!(p50.len(), 10);
        // The stalled second is the highest point (smallest y) of every line.
        let top = p50
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.1.total_cmp(&b.1.1))
            .unwrap()
            .0;
        assert_eq!(top, 6);
        // x runs left to right with the seconds.
        assert!(p50.windows(2).all(|w| w[0].0 < w[1].0));
        // 1 ms to 200 ms: the axis runs from 1 to 1000 ms.
        assert!(svg.contains(">1</text>") && svg.contains(">1000</text>"));
        assert!(!svg.contains(">0.1</text>") && !svg.contains(">10000</text>"));
    }

    #[test]
    fn axes_come_in_powers_of_ten_and_round_steps() {
        assert_eq!(decades([0.35, 120.0].into_iter()), (0.1, 1000.0));
        assert_eq!(decades([2.0, 3.0].into_iter()), (1.0, 10.0));
        assert_eq!(decades([10.0].into_iter()), (10.0, 100.0));
        assert_eq!(decades(std::iter::empty()), (0.1, 1.0));
        let ticks = y_ticks(0.1, 10.0);
        let values: Vec<String> = ticks.iter().map(|(v, _)| tick_label(*v)).collect();
        assert_eq!(values, ["0.1", "0.2", "0.5", "1", "2", "5", "10"]);
        assert_eq!(tick_label(0.001), "0.001");
        assert_eq!(nice_step(5.0), 1.0);
        assert_eq!(nice_step(45.0), 5.0);
        assert_eq!(nice_step(60.0), 10.0);
        assert_eq!(nice_step(600.0), 100.0);
        assert_eq!(nice_step(150.0), 20.0);
    }

    #[test]
    fn escape_leaves_no_markup() {
        assert_eq!(
            escape("<a href='x'>\"&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&quot;&amp;&quot;&lt;/a&gt;"
        );
    }
}
