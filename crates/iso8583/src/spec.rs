//! Reading a dialect file: TOML in, a compiled [`Dialect`] or every problem
//! with its file, line and key out.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use crate::dialect::{
    Align, Counts, Dialect, DigitEncoding, FieldSpec, FieldType, HeaderReply, LengthKind,
    MAX_FIELD, MtiEncoding, Plan, Sensitivity, TpduReply,
};
use crate::error::{DialectError, Problem};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    name: Spanned<String>,
    frame: Spanned<Frame>,
    mti: Spanned<Mti>,
    bitmap: Spanned<Bitmap>,
    defaults: Spanned<Defaults>,
    fields: BTreeMap<String, Spanned<Field>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Frame {
    tpdu: Spanned<i64>,
    header: Spanned<i64>,
    tpdu_reply: Spanned<String>,
    header_reply: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Mti {
    encoding: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Bitmap {
    secondary: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    digits: Spanned<String>,
    prefix: Spanned<String>,
    prefix_counts: Spanned<String>,
    fixed_align: Spanned<String>,
    variable_align: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Field {
    format: Spanned<String>,
    name: String,
    digits: Option<Spanned<String>>,
    prefix: Option<Spanned<String>>,
    prefix_counts: Option<Spanned<String>>,
    align: Option<Spanned<String>>,
    sensitive: Option<Spanned<String>>,
}

/// Collects problems with their line numbers while the file is compiled.
struct Checker<'t> {
    text: &'t str,
    origin: &'t str,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn problem(&mut self, offset: usize, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            origin: self.origin.to_string(),
            line: self.line_of(offset),
            key: key.into(),
            message: message.into(),
        });
    }

    /// Maps a word of the file onto one of `choices`, or records a problem.
    fn choice<T: Copy>(
        &mut self,
        value: &Spanned<String>,
        key: &str,
        choices: &[(&str, T)],
    ) -> Option<T> {
        let found = choices
            .iter()
            .find(|(word, _)| *word == value.get_ref())
            .map(|(_, v)| *v);
        if found.is_none() {
            let words: Vec<String> = choices.iter().map(|(w, _)| format!("{w:?}")).collect();
            self.problem(
                value.span().start,
                key,
                format!("{:?} is not one of {}", value.get_ref(), words.join(", ")),
            );
        }
        found
    }

    /// A field's own choice when it makes one, else the dialect's default.
    fn pick<T: Copy>(
        &mut self,
        value: &Option<Spanned<String>>,
        field: &str,
        name: &str,
        choices: &[(&str, T)],
        default: Option<T>,
    ) -> Option<T> {
        match value {
            Some(v) => self.choice(v, &format!("fields.{field}.{name}"), choices),
            None => default,
        }
    }

    fn length(&mut self, value: &Spanned<i64>, key: &str, max: i64) -> usize {
        let v = *value.get_ref();
        if !(0..=max).contains(&v) {
            self.problem(value.span().start, key, format!("must be 0 to {max}"));
            return 0;
        }
        v as usize
    }
}

const ENCODINGS: &[(&str, DigitEncoding)] =
    &[("bcd", DigitEncoding::Bcd), ("ascii", DigitEncoding::Ascii)];
const COUNTS: &[(&str, Counts)] = &[("units", Counts::Units), ("bytes", Counts::Bytes)];
const ALIGNS: &[(&str, Align)] = &[("left", Align::Left), ("right", Align::Right)];
const SENSITIVITY: &[(&str, Sensitivity)] = &[
    ("pan", Sensitivity::Pan),
    ("track", Sensitivity::Track),
    ("secret", Sensitivity::Secret),
];

/// Compiles dialect TOML; `origin` names the file in every problem.
pub(crate) fn compile(text: &str, origin: &str) -> Result<Dialect, DialectError> {
    let mut check = Checker {
        text,
        origin,
        problems: Vec::new(),
    };
    let file: File = match toml::from_str(text) {
        Ok(file) => file,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            // The span of a serde error points at the offending key or value:
            // name it, so "unknown field" says which one.
            let at = text.get(span.clone()).unwrap_or("").trim();
            let key = if !at.is_empty() && at.len() < 40 && !at.contains('\n') {
                at.to_string()
            } else {
                "(file)".to_string()
            };
            check.problem(span.start, key, e.message().replace('\n', " "));
            return Err(DialectError::Invalid {
                problems: check.problems,
            });
        }
    };

    let frame = file.frame.get_ref();
    let tpdu_len = check.length(&frame.tpdu, "frame.tpdu", 64);
    let header_len = check.length(&frame.header, "frame.header", 64);
    let tpdu_reply = check.choice(
        &frame.tpdu_reply,
        "frame.tpdu_reply",
        &[
            ("echo", TpduReply::Echo),
            ("swap-addresses", TpduReply::SwapAddresses),
        ],
    );
    if tpdu_reply == Some(TpduReply::SwapAddresses) && tpdu_len != 5 {
        check.problem(
            frame.tpdu_reply.span().start,
            "frame.tpdu_reply",
            "swap-addresses needs a 5-byte TPDU",
        );
    }
    let header_reply = check.choice(
        &frame.header_reply,
        "frame.header_reply",
        &[
            ("echo", HeaderReply::Echo),
            (
                "clear-processing-requirement",
                HeaderReply::ClearProcessingRequirement,
            ),
        ],
    );
    if header_reply == Some(HeaderReply::ClearProcessingRequirement) && header_len < 3 {
        check.problem(
            frame.header_reply.span().start,
            "frame.header_reply",
            "clear-processing-requirement needs a header of at least 3 bytes",
        );
    }
    let mti = check.choice(
        &file.mti.get_ref().encoding,
        "mti.encoding",
        &[("bcd", MtiEncoding::Bcd), ("ascii", MtiEncoding::Ascii)],
    );
    let secondary_bitmap = file.bitmap.get_ref().secondary;

    let d = file.defaults.get_ref();
    let default_digits = check.choice(&d.digits, "defaults.digits", ENCODINGS);
    let default_prefix = check.choice(&d.prefix, "defaults.prefix", ENCODINGS);
    let default_counts = check.choice(&d.prefix_counts, "defaults.prefix_counts", COUNTS);
    let fixed_align = check.choice(&d.fixed_align, "defaults.fixed_align", ALIGNS);
    let variable_align = check.choice(&d.variable_align, "defaults.variable_align", ALIGNS);

    let mut fields: Vec<Option<FieldSpec>> = vec![None; MAX_FIELD + 1];
    for (key, entry) in &file.fields {
        let at = entry.span().start;
        let number = match key.parse::<usize>() {
            Ok(n) if (2..=MAX_FIELD).contains(&n) => n,
            _ => {
                check.problem(
                    at,
                    format!("fields.{key}"),
                    "field numbers run from 2 to 128 (1 is the secondary bitmap)",
                );
                continue;
            }
        };
        if number > 64 && !secondary_bitmap {
            check.problem(
                at,
                format!("fields.{key}"),
                "fields above 64 need `bitmap.secondary = true`",
            );
        }
        let f = entry.get_ref();
        let Some((ty, length, max)) = parse_format(f.format.get_ref()) else {
            check.problem(
                f.format.span().start,
                format!("fields.{key}.format"),
                format!(
                    "{:?} is not a format like \"n6\", \"n..19\", \"ans...63\" or \"b8\" (types n, z, an, ans, b; max 999)",
                    f.format.get_ref()
                ),
            );
            continue;
        };
        let digits = check.pick(&f.digits, key, "digits", ENCODINGS, default_digits);
        let prefix = check.pick(&f.prefix, key, "prefix", ENCODINGS, default_prefix);
        let counts = check.pick(
            &f.prefix_counts,
            key,
            "prefix_counts",
            COUNTS,
            default_counts,
        );
        let default_align = match length {
            LengthKind::Fixed => fixed_align,
            _ => variable_align,
        };
        let align = check.pick(&f.align, key, "align", ALIGNS, default_align);
        let sensitive = match &f.sensitive {
            Some(v) => check.choice(v, &format!("fields.{key}.sensitive"), SENSITIVITY),
            None => Some(Sensitivity::None),
        };
        if counts == Some(Counts::Bytes)
            && digits == Some(DigitEncoding::Bcd)
            && ty.is_digits()
            && length != LengthKind::Fixed
            && max % 2 == 1
        {
            check.problem(
                f.format.span().start,
                format!("fields.{key}.prefix_counts"),
                "a BCD field whose prefix counts bytes holds an even number of digits: make the maximum even",
            );
        }
        if let (Some(digits), Some(prefix), Some(counts), Some(align), Some(sensitive)) =
            (digits, prefix, counts, align, sensitive)
        {
            fields[number] = Some(FieldSpec {
                number: number as u8,
                name: f.name.clone(),
                ty,
                length,
                max,
                digits,
                prefix,
                counts,
                align,
                sensitive,
            });
        }
    }

    match (tpdu_reply, header_reply, mti) {
        (Some(tpdu_reply), Some(header_reply), Some(mti)) if check.problems.is_empty() => {
            Ok(Dialect {
                name: file.name.into_inner(),
                tpdu_len,
                header_len,
                tpdu_reply,
                header_reply,
                mti,
                secondary_bitmap,
                plans: Plan::table(&fields),
                fields,
            })
        }
        _ => Err(DialectError::Invalid {
            problems: check.problems,
        }),
    }
}

/// `n6` → (n, fixed, 6); `n..19` → LLVAR; `ans...63` → LLLVAR.
fn parse_format(format: &str) -> Option<(FieldType, LengthKind, u16)> {
    let letters_end = format
        .find(|c: char| !c.is_ascii_lowercase())
        .unwrap_or(format.len());
    let ty = match &format[..letters_end] {
        "n" => FieldType::Numeric,
        "z" => FieldType::Track,
        "an" => FieldType::Alphanumeric,
        "ans" => FieldType::Text,
        "b" => FieldType::Binary,
        _ => return None,
    };
    let rest = &format[letters_end..];
    let (length, digits) = if let Some(d) = rest.strip_prefix("...") {
        (LengthKind::LllVar, d)
    } else if let Some(d) = rest.strip_prefix("..") {
        (LengthKind::LlVar, d)
    } else {
        (LengthKind::Fixed, rest)
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 3 {
        return None;
    }
    let max: u16 = digits.parse().ok()?;
    let limit = match length {
        LengthKind::LlVar => 99,
        _ => 999,
    };
    (1..=limit).contains(&max).then_some((ty, length, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_dialects_compile() {
        let cup = Dialect::cup_pos();
        assert_eq!(cup.name(), "cup-pos");
        assert_eq!(cup.min_frame_len(), 5 + 6 + 2 + 8);
        let f22 = cup.field(22).unwrap();
        assert_eq!(f22.align, Align::Left);
        assert_eq!(cup.field(3).unwrap().align, Align::Right);
        assert_eq!(cup.field(2).unwrap().to_string(), "n..19");
        assert_eq!(cup.field(2).unwrap().sensitive, Sensitivity::Pan);
        let iso = Dialect::iso87();
        assert!(iso.has_secondary_bitmap());
        assert_eq!(iso.field(90).unwrap().to_string(), "n42");
        assert_eq!(iso.field(35).unwrap().digits, DigitEncoding::Ascii);
    }

    #[test]
    fn formats() {
        assert_eq!(
            parse_format("n..19"),
            Some((FieldType::Numeric, LengthKind::LlVar, 19))
        );
        assert_eq!(
            parse_format("ans...63"),
            Some((FieldType::Text, LengthKind::LllVar, 63))
        );
        assert_eq!(
            parse_format("b8"),
            Some((FieldType::Binary, LengthKind::Fixed, 8))
        );
        for bad in [
            "", "n", "x6", "n..100", "n0", "n.6", "n....6", "n6a", "N6", "n1000",
        ] {
            assert_eq!(parse_format(bad), None, "{bad}");
        }
    }

    fn problems(text: &str) -> Vec<String> {
        match Dialect::from_toml(text, "d.toml") {
            Err(DialectError::Invalid { problems }) => {
                problems.iter().map(ToString::to_string).collect()
            }
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn bad_values_are_named_with_file_line_and_key() {
        let text = crate::dialect::CUP_POS_TOML
            .replace(r#"22 = { format = "n3", "#, r#"22 = { format = "q3", "#)
            .replace(r#"align = "left""#, r#"align = "middle""#);
        let found = problems(&text);
        let line_22 = text.lines().position(|l| l.starts_with("22 ")).unwrap() + 1;
        assert!(
            found.contains(&format!(
                "d.toml:{line_22}: fields.22.format: \"q3\" is not a format like \"n6\", \"n..19\", \"ans...63\" or \"b8\" (types n, z, an, ans, b; max 999)"
            )),
            "{found:?}"
        );
    }

    #[test]
    fn every_problem_is_listed() {
        let text = crate::dialect::CUP_POS_TOML
            .replace(r#"align = "left""#, r#"align = "middle""#)
            .replace(r#"encoding = "bcd""#, r#"encoding = "ebcdic""#)
            .replace("2  = {", "1 = {");
        let found = problems(&text);
        // `align = "left"` is both a default and field 22's own choice.
        assert_eq!(found.len(), 4, "{found:?}");
        assert!(
            found
                .iter()
                .any(|p| p.contains(": defaults.variable_align: \"middle\""))
        );
        assert!(found.iter().any(|p| {
            p.contains(": fields.22.align: \"middle\" is not one of \"left\", \"right\"")
        }));
        assert!(
            found
                .iter()
                .any(|p| p.contains(": mti.encoding: \"ebcdic\""))
        );
        assert!(
            found
                .iter()
                .any(|p| p.contains(": fields.1: field numbers run from 2"))
        );
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let text = crate::dialect::CUP_POS_TOML.replace(
            r#"sensitive = "pan" }"#,
            r#"sensitive = "pan", colour = "red" }"#,
        );
        let found = problems(&text);
        let line = text.lines().position(|l| l.contains("colour")).unwrap() + 1;
        assert_eq!(found.len(), 1);
        assert!(
            found[0].starts_with(&format!("d.toml:{line}: colour: unknown field `colour`")),
            "{found:?}"
        );
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let found = problems("name = \"x\"\n[frame\n");
        assert!(found[0].starts_with("d.toml:2: "), "{found:?}");
    }

    #[test]
    fn fields_above_64_need_the_secondary_bitmap() {
        let text = crate::dialect::CUP_POS_TOML
            .replace("64 = {", "70 = { format = \"n3\", name = \"x\" }\n64 = {");
        let found = problems(&text);
        assert!(
            found[0].contains("fields.70: fields above 64 need"),
            "{found:?}"
        );
    }
}
