//! Reading Switchyard's config files: commented TOML, every key with a
//! default, unknown keys refused, and every problem reported with its file,
//! line and dotted key, all at once (`switchyard config check` lists them;
//! start-up refuses to run with any).
//!
//! A [`Section`] hands out typed values (`str`, `int`, `duration`, ...) and
//! remembers which keys were read; whatever was not read is an unknown key,
//! reported when the section is dropped.

use std::cell::RefCell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file.
    pub origin: String,
    /// 1-based line.
    pub line: usize,
    /// Dotted key, e.g. `rules.issuer_timeout`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.origin, self.line, self.key, self.message
        )
    }
}

/// Every problem of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

struct Context<'t> {
    origin: &'t str,
    text: &'t str,
    problems: RefCell<Vec<Problem>>,
}

impl Context<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn report(&self, offset: usize, key: &str, message: impl Into<String>) {
        self.problems.borrow_mut().push(Problem {
            origin: self.origin.to_string(),
            line: self.line(offset),
            key: key.to_string(),
            message: message.into(),
        });
    }
}

/// Reads a file and hands its root section to `read`.
pub fn load<T>(path: &Path, read: impl FnOnce(&Section<'_, '_>) -> T) -> Result<T, Problems> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        Problems(vec![Problem {
            origin: origin.clone(),
            line: 0,
            key: "(file)".into(),
            message: format!("cannot read: {e}"),
        }])
    })?;
    parse(&text, &origin, read)
}

/// Parses `text` (from `origin`) and hands its root section to `read`.
/// Returns what `read` built only when no problem was found.
pub fn parse<T>(
    text: &str,
    origin: &str,
    read: impl FnOnce(&Section<'_, '_>) -> T,
) -> Result<T, Problems> {
    let ctx = Context {
        origin,
        text,
        problems: RefCell::new(Vec::new()),
    };
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => {
            let at = e.span().map_or(0, |s| s.start);
            let mut message = e.message().replace('\n', " ");
            // "duplicate key" alone does not say which.
            if let Some(key) = e
                .span()
                .filter(|_| message.starts_with("duplicate key"))
                .and_then(|s| text.get(s))
            {
                message = format!("{message} {:?}", key.trim());
            }
            ctx.report(at, "(syntax)", message);
            return Err(Problems(ctx.problems.into_inner()));
        }
    };
    let value = {
        let section = Section {
            ctx: &ctx,
            path: String::new(),
            table: Some(root.get_ref()),
            at: 0,
            used: RefCell::new(Vec::new()),
        };
        read(&section)
    };
    let problems = ctx.problems.into_inner();
    if problems.is_empty() {
        Ok(value)
    } else {
        Err(Problems(problems))
    }
}

/// A table of a config file. Unknown keys are reported when it is dropped.
pub struct Section<'c, 't> {
    ctx: &'c Context<'t>,
    path: String,
    table: Option<&'c DeTable<'t>>,
    at: usize,
    used: RefCell<Vec<String>>,
}

impl fmt::Debug for Section<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Section({:?})", self.path)
    }
}

impl<'c, 't> Section<'c, 't> {
    fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn get(&self, key: &str) -> Option<&'c Spanned<DeValue<'t>>> {
        self.used.borrow_mut().push(key.to_string());
        let table = self.table?;
        table
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == key)
            .map(|(_, v)| v)
    }

    /// The 1-based line where this section starts, to name it in a
    /// problem found elsewhere (an id given twice).
    pub fn line(&self) -> usize {
        self.ctx.line(self.at)
    }

    /// True when the key is present.
    pub fn has(&self, key: &str) -> bool {
        self.table
            .is_some_and(|t| t.iter().any(|(k, _)| k.get_ref().as_ref() == key))
    }

    /// Records a problem at `key` (at the section when the key is absent).
    pub fn problem(&self, key: &str, message: impl Into<String>) {
        let at = self
            .table
            .and_then(|t| t.iter().find(|(k, _)| k.get_ref().as_ref() == key))
            .map_or(self.at, |(_, v)| v.span().start);
        self.ctx.report(at, &self.key_path(key), message);
    }

    fn wrong_type(&self, key: &str, value: &Spanned<DeValue<'_>>, expected: &str) {
        self.ctx.report(
            value.span().start,
            &self.key_path(key),
            format!("expected {expected}, found {}", value.get_ref().type_str()),
        );
    }

    /// A string, when present.
    pub fn str(&self, key: &str) -> Option<String> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::String(s) => Some(s.to_string()),
            _ => {
                self.wrong_type(key, v, "a string");
                None
            }
        }
    }

    /// A string, or `default`.
    pub fn string(&self, key: &str, default: &str) -> String {
        self.str(key).unwrap_or_else(|| default.to_string())
    }

    /// A path, when present. Relative paths stay relative (to the working directory).
    pub fn path(&self, key: &str) -> Option<PathBuf> {
        self.str(key).map(PathBuf::from)
    }

    /// An integer within `range`, or `default`.
    pub fn int(&self, key: &str, default: i64, range: std::ops::RangeInclusive<i64>) -> i64 {
        let Some(v) = self.get(key) else {
            return default;
        };
        let DeValue::Integer(i) = v.get_ref() else {
            self.wrong_type(key, v, "an integer");
            return default;
        };
        let digits = i.as_str().replace('_', "");
        let parsed = match i.radix() {
            10 => digits.parse::<i64>().ok(),
            r => i64::from_str_radix(&digits[2..], r).ok(),
        };
        match parsed {
            Some(n) if range.contains(&n) => n,
            _ => {
                self.ctx.report(
                    v.span().start,
                    &self.key_path(key),
                    format!(
                        "{} is out of range: {} to {}",
                        i.as_str(),
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
        }
    }

    /// A number (integer or float) within `range`, or `default`.
    pub fn float(&self, key: &str, default: f64, range: std::ops::RangeInclusive<f64>) -> f64 {
        let Some(v) = self.get(key) else {
            return default;
        };
        let parsed = match v.get_ref() {
            DeValue::Float(f) => f.as_str().replace('_', "").parse::<f64>().ok(),
            DeValue::Integer(i) if i.radix() == 10 => i.as_str().replace('_', "").parse().ok(),
            _ => {
                self.wrong_type(key, v, "a number");
                return default;
            }
        };
        match parsed {
            Some(n) if range.contains(&n) => n,
            _ => {
                self.ctx.report(
                    v.span().start,
                    &self.key_path(key),
                    format!("out of range: {} to {}", range.start(), range.end()),
                );
                default
            }
        }
    }

    /// A boolean, or `default`.
    pub fn bool(&self, key: &str, default: bool) -> bool {
        let Some(v) = self.get(key) else {
            return default;
        };
        match v.get_ref() {
            DeValue::Boolean(b) => *b,
            _ => {
                self.wrong_type(key, v, "true or false");
                default
            }
        }
    }

    /// As [`Section::duration`], for a duration that cannot be zero (a
    /// timeout, or the period of something repeated).
    pub fn duration_above_zero(&self, key: &str, default: Duration) -> Duration {
        let d = self.duration(key, default);
        if d.is_zero() {
            self.problem(key, "must be above zero");
            return default;
        }
        d
    }

    /// A duration written as `250ms`, `10s`, `5m`, `1h`, or `default`; at
    /// most [`LONGEST`], so that no deadline computed from it overflows.
    pub fn duration(&self, key: &str, default: Duration) -> Duration {
        let Some(text) = self.str(key) else {
            return default;
        };
        match parse_duration(&text) {
            Some(d) if d <= LONGEST => d,
            Some(_) => {
                self.problem(key, format!("{text:?} is longer than a year (8760h)"));
                default
            }
            None => {
                self.problem(
                    key,
                    format!("{text:?} is not a duration like \"250ms\", \"10s\", \"5m\" or \"1h\""),
                );
                default
            }
        }
    }

    /// One of `choices` by name, or `default`.
    pub fn choice<T: Copy>(&self, key: &str, default: T, choices: &[(&str, T)]) -> T {
        let Some(text) = self.str(key) else {
            return default;
        };
        match choices.iter().find(|(name, _)| *name == text) {
            Some((_, v)) => *v,
            None => {
                let names: Vec<String> = choices.iter().map(|(n, _)| format!("{n:?}")).collect();
                self.problem(key, format!("{text:?} is not one of {}", names.join(", ")));
                default
            }
        }
    }

    /// An array whose items `item` reads (`None`: a wrong item, reported as
    /// not `what`); empty when absent.
    fn array<T>(&self, key: &str, what: &str, item: impl Fn(&DeValue<'_>) -> Option<T>) -> Vec<T> {
        let Some(v) = self.get(key) else {
            return Vec::new();
        };
        let DeValue::Array(items) = v.get_ref() else {
            self.wrong_type(key, v, &format!("an array of {what}s"));
            return Vec::new();
        };
        items
            .iter()
            .filter_map(|i| {
                let read = item(i.get_ref());
                if read.is_none() {
                    self.wrong_type(key, i, &format!("a {what}"));
                }
                read
            })
            .collect()
    }

    /// An array of strings (empty when absent).
    pub fn strings(&self, key: &str) -> Vec<String> {
        self.array(key, "string", |v| match v {
            DeValue::String(s) => Some(s.to_string()),
            _ => None,
        })
    }

    /// An array of numbers (empty when absent).
    pub fn numbers(&self, key: &str) -> Vec<f64> {
        self.array(key, "number", |v| match v {
            DeValue::Integer(i) if i.radix() == 10 => i.as_str().replace('_', "").parse().ok(),
            DeValue::Float(f) => f.as_str().replace('_', "").parse().ok(),
            _ => None,
        })
    }

    /// A sub-table (an empty section when absent: every key takes its default).
    pub fn section(&self, key: &str) -> Section<'c, 't> {
        let path = self.key_path(key);
        let Some(v) = self.get(key) else {
            return Section {
                ctx: self.ctx,
                path,
                table: None,
                at: self.at,
                used: RefCell::new(Vec::new()),
            };
        };
        let table = match v.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => {
                self.wrong_type(key, v, "a table");
                None
            }
        };
        Section {
            ctx: self.ctx,
            path,
            table,
            at: v.span().start,
            used: RefCell::new(Vec::new()),
        }
    }

    /// An array of tables (`[[key]]`), each as a section.
    pub fn sections(&self, key: &str) -> Vec<Section<'c, 't>> {
        let Some(v) = self.get(key) else {
            return Vec::new();
        };
        let DeValue::Array(items) = v.get_ref() else {
            self.wrong_type(key, v, "an array of tables ([[...]])");
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| match item.get_ref() {
                DeValue::Table(t) => Some(Section {
                    ctx: self.ctx,
                    path: format!("{}[{i}]", self.key_path(key)),
                    table: Some(t),
                    at: item.span().start,
                    used: RefCell::new(Vec::new()),
                }),
                _ => {
                    self.wrong_type(key, item, "a table");
                    None
                }
            })
            .collect()
    }

    /// The keys of this table that are themselves tables, with their sections
    /// (for maps keyed by name, such as `[fields.22]`).
    pub fn entries(&self) -> Vec<(String, Section<'c, 't>)> {
        let Some(table) = self.table else {
            return Vec::new();
        };
        let keys: Vec<String> = table.iter().map(|(k, _)| k.get_ref().to_string()).collect();
        keys.into_iter()
            .map(|k| {
                let s = self.section(&k);
                (k, s)
            })
            .collect()
    }
}

impl Drop for Section<'_, '_> {
    fn drop(&mut self) {
        let Some(table) = self.table else {
            return;
        };
        let used = self.used.borrow();
        for (k, v) in table.iter() {
            let name: &str = k.get_ref().as_ref();
            if !used.iter().any(|u| u == name) {
                self.ctx.report(
                    k.span().start.min(v.span().start),
                    &self.key_path(name),
                    "unknown key",
                );
            }
        }
    }
}

/// The longest duration a config may give: a year.
pub const LONGEST: Duration = Duration::from_secs(365 * 24 * 3600);

/// The keys at the top of a TOML text (tables included), sorted, or `None`
/// when it is not TOML: what tells one kind of config file from another.
pub fn top_level_keys(text: &str) -> Option<Vec<String>> {
    let root = DeTable::parse(text).ok()?;
    let mut keys: Vec<String> = root
        .get_ref()
        .keys()
        .map(|k| k.get_ref().to_string())
        .collect();
    keys.sort();
    Some(keys)
}

/// `250ms`, `10s`, `5m`, `1h` (a whole number and a unit); `None` past
/// what a duration holds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" | "min" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Demo {
        listen: String,
        timeout: Duration,
        limit: i64,
        mode: u8,
        names: Vec<String>,
        items: Vec<String>,
    }

    fn read(text: &str) -> Result<Demo, Problems> {
        parse(text, "demo.toml", |root| {
            let rules = root.section("rules");
            Demo {
                listen: root.string("listen", "127.0.0.1:1"),
                timeout: rules.duration("timeout", Duration::from_secs(10)),
                limit: rules.int("limit", 5, 1..=10),
                mode: rules.choice("mode", 0, &[("replay", 0), ("reject", 1)]),
                names: root.strings("names"),
                items: root
                    .sections("item")
                    .iter()
                    .map(|s| s.string("name", "?"))
                    .collect(),
            }
        })
    }

    #[test]
    fn defaults_fill_what_is_absent() {
        let d = read("").unwrap();
        assert_eq!(d.listen, "127.0.0.1:1");
        assert_eq!(d.timeout, Duration::from_secs(10));
        assert_eq!(d.limit, 5);
    }

    #[test]
    fn values_are_read() {
        let d = read(
            "listen = \"0.0.0.0:9\"\nnames = [\"a\", \"b\"]\n[rules]\ntimeout = \"250ms\"\nlimit = 7\nmode = \"reject\"\n[[item]]\nname = \"x\"\n[[item]]\nname = \"y\"\n",
        )
        .unwrap();
        assert_eq!(
            d,
            Demo {
                listen: "0.0.0.0:9".into(),
                timeout: Duration::from_millis(250),
                limit: 7,
                mode: 1,
                names: vec!["a".into(), "b".into()],
                items: vec!["x".into(), "y".into()],
            }
        );
    }

    #[test]
    fn every_problem_is_listed_with_line_and_key() {
        let text = "listen = 5\ncolour = \"red\"\n[rules]\ntimeout = \"soon\"\nlimit = 11\nmode = \"maybe\"\nextra = 1\n[[item]]\nnom = \"x\"\n";
        let problems = read(text).unwrap_err().to_string();
        let expected = [
            "demo.toml:1: listen: expected a string, found integer",
            "demo.toml:4: rules.timeout: \"soon\" is not a duration like \"250ms\", \"10s\", \"5m\" or \"1h\"",
            "demo.toml:5: rules.limit: 11 is out of range: 1 to 10",
            "demo.toml:6: rules.mode: \"maybe\" is not one of \"replay\", \"reject\"",
            "demo.toml:7: rules.extra: unknown key",
            "demo.toml:9: item[0].nom: unknown key",
            "demo.toml:2: colour: unknown key",
        ];
        for e in expected {
            assert!(problems.contains(e), "missing {e:?} in:\n{problems}");
        }
        assert_eq!(problems.lines().count(), expected.len(), "{problems}");
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let problems = read("listen = \"x\"\n[rules\n").unwrap_err();
        assert_eq!(problems.0[0].line, 2, "{problems}");
        let problems = read("[fields]\n3 = 1\n03 = 2\n3 = 4\n").unwrap_err();
        assert!(
            problems.0[0].message.ends_with("duplicate key \"3\""),
            "{problems}"
        );
        assert_eq!(problems.0[0].line, 4, "{problems}");
    }

    #[test]
    fn a_duration_is_at_most_a_year() {
        let got = parse("a = \"8760h\"\nb = \"8761h\"\n", "d.toml", |r| {
            (
                r.duration("a", Duration::ZERO),
                r.duration("b", Duration::ZERO),
            )
        });
        assert_eq!(
            got.unwrap_err().to_string(),
            "d.toml:2: b: \"8761h\" is longer than a year (8760h)"
        );
        assert_eq!(
            parse("a = \"8760h\"\n", "d.toml", |r| r
                .duration("a", Duration::ZERO))
            .unwrap(),
            LONGEST
        );
    }

    #[test]
    fn top_level_keys_name_tables_too() {
        assert_eq!(
            top_level_keys("name = \"x\"\n[mix]\na = 1\n[[cards]]\nb = 2\n"),
            Some(vec!["cards".into(), "mix".into(), "name".into()])
        );
        assert_eq!(top_level_keys("[broken\n"), None);
    }

    #[test]
    fn number_arrays() {
        let got = parse(
            "steps = [50, 100.5, 1_000]\nbad = [1, \"x\"]\n",
            "n.toml",
            |r| (r.numbers("steps"), r.numbers("bad")),
        );
        let problems = got.unwrap_err().to_string();
        assert_eq!(problems, "n.toml:2: bad: expected a number, found string");
        let ok = parse("steps = [50, 100.5, 1_000]\n", "n.toml", |r| {
            r.numbers("steps")
        })
        .unwrap();
        assert_eq!(ok, [50.0, 100.5, 1000.0]);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("1.5s"), None);
        // Past u64 seconds: not a duration, rather than a wrapped one.
        assert_eq!(parse_duration("307445734561825861m"), None);
        assert_eq!(parse_duration("5124095576030432h"), None);
    }
}
