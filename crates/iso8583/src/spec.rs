//! Reading a dialect file: TOML in, a compiled [`Dialect`] or every problem
//! with its file, line and key out. The reading (lines, keys, unknown keys,
//! types) is the workspace's `settings` crate; what a dialect may say is here.

use settings::Section;

use crate::dialect::{
    Align, Counts, Dialect, DigitEncoding, FieldSpec, FieldType, HeaderReply, LengthKind,
    MAX_FIELD, MtiEncoding, Plan, Sensitivity, TpduReply,
};
use crate::error::DialectError;

const ENCODINGS: &[(&str, DigitEncoding)] =
    &[("bcd", DigitEncoding::Bcd), ("ascii", DigitEncoding::Ascii)];
const COUNTS: &[(&str, Counts)] = &[("units", Counts::Units), ("bytes", Counts::Bytes)];
const ALIGNS: &[(&str, Align)] = &[("left", Align::Left), ("right", Align::Right)];
const SENSITIVITY: &[(&str, Sensitivity)] = &[
    ("pan", Sensitivity::Pan),
    ("track", Sensitivity::Track),
    ("secret", Sensitivity::Secret),
    ("records", Sensitivity::Records),
    ("emv", Sensitivity::Emv),
];
const TPDU_REPLIES: &[(&str, TpduReply)] = &[
    ("echo", TpduReply::Echo),
    ("swap-addresses", TpduReply::SwapAddresses),
];
const HEADER_REPLIES: &[(&str, HeaderReply)] = &[
    ("echo", HeaderReply::Echo),
    (
        "clear-processing-requirement",
        HeaderReply::ClearProcessingRequirement,
    ),
];
const MTI_ENCODINGS: &[(&str, MtiEncoding)] =
    &[("bcd", MtiEncoding::Bcd), ("ascii", MtiEncoding::Ascii)];

/// Compiles dialect TOML; `origin` names the file in every problem.
pub(crate) fn compile(text: &str, origin: &str) -> Result<Dialect, DialectError> {
    settings::parse(text, origin, read)
        .map_err(|settings::Problems(problems)| DialectError::Invalid { problems })
}

/// A dialect file has no defaults: every key but a field's own choices must
/// be there. Records a problem when `key` is absent.
fn require(section: &Section<'_, '_>, key: &str) {
    if !section.has(key) {
        section.problem(key, "is required");
    }
}

/// A key that must be one of `choices`. `placeholder` stands in when the key
/// is absent or wrong, which is then a problem: the dialect is not used.
fn required_choice<T: Copy>(
    section: &Section<'_, '_>,
    key: &str,
    placeholder: T,
    choices: &[(&str, T)],
) -> T {
    require(section, key);
    section.choice(key, placeholder, choices)
}

/// A TPDU or header length, 0 to `max` bytes (`None` when it is wrong or
/// missing, which is reported).
fn length(section: &Section<'_, '_>, key: &str, max: i64) -> Option<usize> {
    if !section.has(key) {
        require(section, key);
        return None;
    }
    // Not an integer: reported as such, and the sentinel comes back.
    let v = section.int(key, i64::MIN, i64::MIN..=i64::MAX);
    if v == i64::MIN {
        return None;
    }
    if !(0..=max).contains(&v) {
        section.problem(key, format!("must be 0 to {max}"));
        return None;
    }
    Some(v as usize)
}

/// The dialect-wide choices every field takes unless it makes its own.
#[derive(Clone, Copy)]
struct Defaults {
    digits: DigitEncoding,
    prefix: DigitEncoding,
    counts: Counts,
    fixed_align: Align,
    variable_align: Align,
}

/// Reads a whole dialect file. What it returns is used only when no problem
/// was recorded, so wrong values may stand in as placeholders.
fn read(root: &Section<'_, '_>) -> Dialect {
    require(root, "name");
    let name = root.string("name", "");

    let frame = root.section("frame");
    // A length that is wrong is reported once, not again by the replies.
    let tpdu = length(&frame, "tpdu", 64);
    let header = length(&frame, "header", 64);
    let (tpdu_len, header_len) = (tpdu.unwrap_or(0), header.unwrap_or(0));
    let tpdu_reply = required_choice(&frame, "tpdu_reply", TpduReply::Echo, TPDU_REPLIES);
    if tpdu_reply == TpduReply::SwapAddresses && tpdu.is_some_and(|n| n != 5) {
        frame.problem("tpdu_reply", "swap-addresses needs a 5-byte TPDU");
    }
    let header_reply = required_choice(&frame, "header_reply", HeaderReply::Echo, HEADER_REPLIES);
    if header_reply == HeaderReply::ClearProcessingRequirement && header.is_some_and(|n| n < 3) {
        frame.problem(
            "header_reply",
            "clear-processing-requirement needs a header of at least 3 bytes",
        );
    }

    let mti = required_choice(
        &root.section("mti"),
        "encoding",
        MtiEncoding::Bcd,
        MTI_ENCODINGS,
    );

    let bitmap = root.section("bitmap");
    require(&bitmap, "secondary");
    // Absent or wrong, `true` keeps fields above 64 from each adding a problem.
    let secondary_bitmap = bitmap.bool("secondary", true);

    let d = root.section("defaults");
    let defaults = Defaults {
        digits: required_choice(&d, "digits", DigitEncoding::Bcd, ENCODINGS),
        prefix: required_choice(&d, "prefix", DigitEncoding::Bcd, ENCODINGS),
        counts: required_choice(&d, "prefix_counts", Counts::Units, COUNTS),
        fixed_align: required_choice(&d, "fixed_align", Align::Right, ALIGNS),
        variable_align: required_choice(&d, "variable_align", Align::Left, ALIGNS),
    };

    require(root, "fields");
    let table = root.section("fields");
    let mut fields: Vec<Option<FieldSpec>> = vec![None; MAX_FIELD + 1];
    let mut keys: Vec<(usize, String)> = Vec::new();
    for (key, entry) in table.entries() {
        let number = match key.parse::<usize>() {
            Ok(n) if (2..=MAX_FIELD).contains(&n) => {
                // "3" and "03" are two TOML keys for one field.
                if let Some((_, other)) = keys.iter().find(|(k, _)| *k == n) {
                    table.problem(&key, format!("field {n} is defined already, as {other:?}"));
                }
                keys.push((n, key.to_string()));
                Some(n)
            }
            _ => {
                table.problem(
                    &key,
                    "field numbers run from 2 to 128 (1 is the secondary bitmap)",
                );
                None
            }
        };
        if number.is_some_and(|n| n > 64) && !secondary_bitmap {
            table.problem(&key, "fields above 64 need `bitmap.secondary = true`");
        }
        // A field with a wrong number is still read, for its own problems.
        let spec = field(&entry, defaults, number.unwrap_or(0));
        if let (Some(number), Some(spec)) = (number, spec) {
            fields[number] = Some(FieldSpec {
                number: number as u8,
                ..spec
            });
        }
    }

    Dialect {
        name,
        tpdu_len,
        header_len,
        tpdu_reply,
        header_reply,
        mti,
        secondary_bitmap,
        plans: Plan::table(&fields),
        fields,
    }
}

/// One `[fields]` entry, e.g. `22 = { format = "n3", name = "POS entry mode",
/// align = "left" }`; `None` when its format is wrong. The number is the
/// caller's to set; it decides how the field is shown when `sensitive` is
/// not given ([`Sensitivity::of_field`]).
fn field(f: &Section<'_, '_>, defaults: Defaults, number: usize) -> Option<FieldSpec> {
    require(f, "format");
    require(f, "name");
    let format = f.str("format");
    let name = f.string("name", "");
    let parsed = format.and_then(|text| {
        let parsed = parse_format(&text);
        if parsed.is_none() {
            f.problem(
                "format",
                format!(
                    "{text:?} is not a format like \"n6\", \"n..19\", \"ans...63\" or \"b8\" (types n, z, an, ans, b; max 999)"
                ),
            );
        }
        parsed
    });
    let digits = f.choice("digits", defaults.digits, ENCODINGS);
    let prefix = f.choice("prefix", defaults.prefix, ENCODINGS);
    let counts = f.choice("prefix_counts", defaults.counts, COUNTS);
    let default_align = match parsed {
        Some((_, LengthKind::Fixed, _)) => defaults.fixed_align,
        _ => defaults.variable_align,
    };
    let align = f.choice("align", default_align, ALIGNS);
    let sensitive = f.choice("sensitive", Sensitivity::of_field(number), SENSITIVITY);
    let (ty, length, max) = parsed?;
    if counts == Counts::Bytes
        && digits == DigitEncoding::Bcd
        && ty.is_digits()
        && length != LengthKind::Fixed
        && max % 2 == 1
    {
        f.problem(
            "prefix_counts",
            "a BCD field whose prefix counts bytes holds an even number of digits: make the maximum even",
        );
    }
    Some(FieldSpec {
        number: 0,
        name,
        ty,
        length,
        max,
        digits,
        prefix,
        counts,
        align,
        sensitive,
    })
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
        assert_eq!(cup.field(48).unwrap().sensitive, Sensitivity::Records);
        assert_eq!(cup.field(55).unwrap().sensitive, Sensitivity::Emv);
        assert_eq!(cup.field(62).unwrap().sensitive, Sensitivity::Secret);
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
        let middle = "\"middle\" is not one of \"left\", \"right\"";
        assert_eq!(
            found,
            [
                format!(
                    "d.toml:{}: mti.encoding: \"ebcdic\" is not one of \"bcd\", \"ascii\"",
                    line_of(&text, "encoding =")
                ),
                format!(
                    "d.toml:{}: defaults.variable_align: {middle}",
                    line_of(&text, "variable_align")
                ),
                format!(
                    "d.toml:{}: fields.1: field numbers run from 2 to 128 (1 is the secondary bitmap)",
                    line_of(&text, "1 = {")
                ),
                format!(
                    "d.toml:{}: fields.22.align: {middle}",
                    line_of(&text, "22 ")
                ),
            ]
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
        assert_eq!(
            found,
            [format!("d.toml:{line}: fields.2.colour: unknown key")]
        );
    }

    #[test]
    fn a_field_given_twice_and_a_wrong_tpdu_are_reported_once() {
        let text = crate::dialect::CUP_POS_TOML
            .replace(
                "3  = { format = \"n6\"",
                "03 = { format = \"an2\", name = \"x\" }\n3  = { format = \"n6\"",
            )
            .replace("tpdu = 5 ", "tpdu = \"5\" ");
        let found = problems(&text);
        assert_eq!(
            found,
            [
                format!(
                    "d.toml:{}: frame.tpdu: expected an integer, found string",
                    line_of(&text, "tpdu = ")
                ),
                format!(
                    "d.toml:{}: fields.3: field 3 is defined already, as \"03\"",
                    line_of(&text, "3  = ")
                ),
            ]
        );
    }

    #[test]
    fn card_data_fields_are_masked_when_a_dialect_leaves_sensitive_out() {
        let text = crate::dialect::CUP_POS_TOML
            .replace(r#", sensitive = "pan""#, "")
            .replace(r#", sensitive = "track""#, "")
            .replace(r#", sensitive = "secret""#, "")
            .replace(r#", sensitive = "emv""#, "")
            .replace(r#", sensitive = "records""#, "");
        assert!(!text.contains(r#""pan""#) && !text.contains(r#""emv""#));
        assert!(!text.contains(r#""records""#));
        let dialect = Dialect::from_toml(&text, "d.toml").unwrap();
        for (n, shown) in [
            (2, Sensitivity::Pan),
            (35, Sensitivity::Track),
            (36, Sensitivity::Track),
            (52, Sensitivity::Secret),
            (55, Sensitivity::Emv),
            (48, Sensitivity::Records),
            (3, Sensitivity::None),
        ] {
            assert_eq!(dialect.field(n).unwrap().sensitive, shown, "field {n}");
        }
    }

    /// The line of the first line of `text` that starts with `start`.
    fn line_of(text: &str, start: &str) -> usize {
        text.lines().position(|l| l.starts_with(start)).unwrap() + 1
    }

    #[test]
    fn every_key_but_a_fields_own_choices_is_required() {
        let text = crate::dialect::CUP_POS_TOML
            .replace("name = \"cup-pos\"\n", "")
            .replace("header = 6 ", "# header = 6 ")
            .replace("secondary = false", "# secondary = false")
            .replace("fixed_align = ", "# fixed_align = ")
            .replace(r#"format = "n12", "#, "");
        let found = problems(&text);
        let expected = [
            "d.toml:1: name: is required".to_string(),
            format!(
                "d.toml:{}: frame.header: is required",
                line_of(&text, "[frame]")
            ),
            format!(
                "d.toml:{}: bitmap.secondary: is required",
                line_of(&text, "[bitmap]")
            ),
            format!(
                "d.toml:{}: defaults.fixed_align: is required",
                line_of(&text, "[defaults]")
            ),
            format!(
                "d.toml:{}: fields.4.format: is required",
                line_of(&text, "4 ")
            ),
        ];
        for e in &expected {
            assert!(found.contains(e), "missing {e:?} in {found:?}");
        }
        // The missing header is reported once, not again by the reply that
        // needs one.
        assert_eq!(found.len(), expected.len(), "{found:?}");
    }

    #[test]
    fn frame_lengths_and_replies_are_checked() {
        let text = crate::dialect::CUP_POS_TOML
            .replace("tpdu = 5 ", "tpdu = 65")
            .replace("header = 6 ", "header = \"six\"");
        let found = problems(&text);
        let tpdu = line_of(&text, "tpdu =");
        let header = line_of(&text, "header =");
        assert_eq!(
            found,
            [
                format!("d.toml:{tpdu}: frame.tpdu: must be 0 to 64"),
                format!("d.toml:{header}: frame.header: expected an integer, found string"),
            ]
        );
        // Lengths that read but do not suit the replies.
        let text = crate::dialect::CUP_POS_TOML
            .replace("tpdu = 5 ", "tpdu = 4 ")
            .replace("header = 6 ", "header = 2 ");
        assert_eq!(
            problems(&text),
            [
                format!(
                    "d.toml:{}: frame.tpdu_reply: swap-addresses needs a 5-byte TPDU",
                    line_of(&text, "tpdu_reply")
                ),
                format!(
                    "d.toml:{}: frame.header_reply: clear-processing-requirement needs a header of at least 3 bytes",
                    line_of(&text, "header_reply")
                ),
            ]
        );
    }

    #[test]
    fn a_bcd_field_counting_bytes_needs_an_even_maximum() {
        let text = crate::dialect::CUP_POS_TOML.replace(
            r#"32 = { format = "n..11", "#,
            r#"32 = { format = "n..11", prefix_counts = "bytes", "#,
        );
        let found = problems(&text);
        assert_eq!(
            found,
            [format!(
                "d.toml:{}: fields.32.prefix_counts: a BCD field whose prefix counts bytes holds an even number of digits: make the maximum even",
                line_of(&text, "32 ")
            )]
        );
    }

    #[test]
    fn a_field_may_be_its_own_table() {
        let text = crate::dialect::CUP_POS_TOML.replace(
            "64 = { format = \"b8\",      name = \"message authentication code\" }",
            "\n[fields.64]\nformat = \"b8\"\nname = \"message authentication code\"\nalign = \"up\"",
        );
        let found = problems(&text);
        assert_eq!(
            found,
            [format!(
                "d.toml:{}: fields.64.align: \"up\" is not one of \"left\", \"right\"",
                line_of(&text, "align = \"up\"")
            )]
        );
        let text = text.replace("align = \"up\"", "");
        let dialect = Dialect::from_toml(&text, "d.toml").unwrap();
        assert_eq!(dialect.field(64).unwrap().to_string(), "b8");
        assert_eq!(
            dialect.field(64).unwrap().name,
            "message authentication code"
        );
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let found = problems("name = \"x\"\n[frame\n");
        assert!(found[0].starts_with("d.toml:2: (syntax): "), "{found:?}");
    }

    #[test]
    fn fields_above_64_need_the_secondary_bitmap() {
        let text = crate::dialect::CUP_POS_TOML
            .replace("64 = {", "70 = { format = \"n3\", name = \"x\" }\n64 = {");
        let found = problems(&text);
        assert_eq!(
            found,
            [format!(
                "d.toml:{}: fields.70: fields above 64 need `bitmap.secondary = true`",
                line_of(&text, "70 ")
            )]
        );
    }
}
