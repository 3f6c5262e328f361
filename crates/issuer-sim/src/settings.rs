//! Reading a TOML file key by key, so that one pass finds every problem:
//! serde stops at the first, and an operator fixing a config file wants the
//! whole list, each with its file, line and dotted key.
//!
//! A [`Section`] hands out the keys it knows (with a default when absent) and,
//! when it is dropped, reports every key of its table that nobody asked for:
//! unknown keys are refused by construction, not by a list kept in step.

use std::cell::RefCell;
use std::ops::RangeInclusive;

use iso8583::error::Problem;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// Where problems are collected while a file is read.
#[derive(Debug)]
pub(crate) struct Checker<'t> {
    text: &'t str,
    origin: &'t str,
    problems: RefCell<Vec<Problem>>,
}

impl<'t> Checker<'t> {
    pub(crate) fn new(text: &'t str, origin: &'t str) -> Checker<'t> {
        Checker {
            text,
            origin,
            problems: RefCell::new(Vec::new()),
        }
    }

    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// Records a problem at byte `offset` of the file.
    pub(crate) fn problem(&self, offset: usize, key: &str, message: impl Into<String>) {
        self.problems.borrow_mut().push(Problem {
            origin: self.origin.to_string(),
            line: self.line_of(offset),
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// Every problem, in the order of the file.
    pub(crate) fn into_problems(self) -> Vec<Problem> {
        let mut problems = self.problems.into_inner();
        problems.sort_by_key(|p| p.line);
        problems
    }
}

/// One table of the file (the root, `[faults]`, an inline table, one of
/// `[[cards]]`); absent tables read as empty.
pub(crate) struct Section<'a> {
    checker: &'a Checker<'a>,
    /// Dotted path of the table: empty for the root.
    path: String,
    /// Where the table starts, for problems about keys it lacks.
    at: usize,
    table: Option<&'a DeTable<'a>>,
    used: RefCell<Vec<String>>,
}

impl<'a> Section<'a> {
    pub(crate) fn root(checker: &'a Checker<'a>, table: &'a Spanned<DeTable<'a>>) -> Section<'a> {
        Section {
            checker,
            path: String::new(),
            at: table.span().start,
            table: Some(table.get_ref()),
            used: RefCell::new(Vec::new()),
        }
    }

    /// The dotted key of `name` in this table.
    pub(crate) fn key(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    /// The value of `name`, marked as known.
    fn value(&self, name: &str) -> Option<&'a Spanned<DeValue<'a>>> {
        self.used.borrow_mut().push(name.to_string());
        self.table?
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == name)
            .map(|(_, v)| v)
    }

    /// Where `name` is (its value), or where the table starts.
    fn at(&self, name: &str) -> usize {
        self.table
            .and_then(|t| t.iter().find(|(k, _)| k.get_ref().as_ref() == name))
            .map_or(self.at, |(_, v)| v.span().start)
    }

    /// Records a problem about key `name`.
    pub(crate) fn problem(&self, name: &str, message: impl Into<String>) {
        self.checker
            .problem(self.at(name), &self.key(name), message);
    }

    fn wrong_type(&self, name: &str, value: &Spanned<DeValue<'_>>, expected: &str) {
        self.checker.problem(
            value.span().start,
            &self.key(name),
            format!("must be {expected}, not {}", value.get_ref().type_str()),
        );
    }

    /// True when the table has key `name`.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.table
            .is_some_and(|t| t.iter().any(|(k, _)| k.get_ref().as_ref() == name))
    }

    /// A string, when present.
    pub(crate) fn str(&self, name: &str) -> Option<String> {
        let value = self.value(name)?;
        match value.get_ref() {
            DeValue::String(s) => Some(s.to_string()),
            _ => {
                self.wrong_type(name, value, "a string");
                None
            }
        }
    }

    /// A string, or `default` when absent.
    pub(crate) fn string(&self, name: &str, default: &str) -> String {
        self.str(name).unwrap_or_else(|| default.to_string())
    }

    /// An integer in `range`, when present.
    pub(crate) fn opt_int(&self, name: &str, range: RangeInclusive<i64>) -> Option<i64> {
        let value = self.value(name)?;
        let DeValue::Integer(i) = value.get_ref() else {
            self.wrong_type(name, value, "an integer");
            return None;
        };
        match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) if range.contains(&n) => Some(n),
            _ => {
                self.problem(
                    name,
                    format!("must be {} to {}", range.start(), range.end()),
                );
                None
            }
        }
    }

    /// An integer in `range`, or `default` when absent (or wrong).
    pub(crate) fn int(&self, name: &str, default: i64, range: RangeInclusive<i64>) -> i64 {
        self.opt_int(name, range).unwrap_or(default)
    }

    /// A number (integer or float) in `range`, or `default`.
    pub(crate) fn float(&self, name: &str, default: f64, range: RangeInclusive<f64>) -> f64 {
        let Some(value) = self.value(name) else {
            return default;
        };
        let n = match value.get_ref() {
            DeValue::Float(f) => f.as_str().parse::<f64>().ok(),
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                .ok()
                .map(|n| n as f64),
            _ => {
                self.wrong_type(name, value, "a number");
                return default;
            }
        };
        match n {
            Some(n) if n.is_finite() && range.contains(&n) => n,
            _ => {
                self.problem(
                    name,
                    format!("must be a number from {} to {}", range.start(), range.end()),
                );
                default
            }
        }
    }

    /// A probability: a number from 0 to 1.
    pub(crate) fn probability(&self, name: &str) -> f64 {
        self.float(name, 0.0, 0.0..=1.0)
    }

    /// The table `name` (a `[name]` section or an inline table); empty when absent.
    pub(crate) fn section(&self, name: &str) -> Section<'a> {
        let value = self.value(name);
        let table = match value.map(Spanned::get_ref) {
            Some(DeValue::Table(t)) => Some(t),
            Some(_) => {
                self.wrong_type(name, value.expect("present"), "a table");
                None
            }
            None => None,
        };
        Section {
            checker: self.checker,
            path: self.key(name),
            at: value.map_or(self.at, |v| v.span().start),
            table,
            used: RefCell::new(Vec::new()),
        }
    }

    /// The tables of `[[name]]`, each named `name[i]` in problems.
    pub(crate) fn sections(&self, name: &str) -> Vec<Section<'a>> {
        let Some(value) = self.value(name) else {
            return Vec::new();
        };
        let DeValue::Array(items) = value.get_ref() else {
            self.wrong_type(name, value, "an array of tables");
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| match item.get_ref() {
                DeValue::Table(t) => Some(Section {
                    checker: self.checker,
                    path: format!("{}[{i}]", self.key(name)),
                    at: item.span().start,
                    table: Some(t),
                    used: RefCell::new(Vec::new()),
                }),
                _ => {
                    self.wrong_type(&format!("{name}[{i}]"), item, "a table");
                    None
                }
            })
            .collect()
    }
}

impl Drop for Section<'_> {
    /// Every key nobody asked for is unknown.
    fn drop(&mut self) {
        let Some(table) = self.table else { return };
        let used = self.used.borrow();
        for (k, _) in table.iter() {
            let name = k.get_ref().as_ref();
            if !used.iter().any(|u| u == name) {
                self.checker
                    .problem(k.span().start, &self.key(name), "unknown key");
            }
        }
    }
}

impl std::fmt::Debug for Section<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Section({})", self.path)
    }
}
