//! `switchyard decode` and `switchyard encode`: one frame to JSON and back.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, anyhow};
use bytes::BytesMut;
use clap::{Args, ValueEnum};
use iso8583::framing::DEFAULT_MAX_FRAME;
use iso8583::json::{from_json, to_json};
use iso8583::{Dialect, Message};
use serde::Serialize;

use super::Failure;

/// Which side's wire format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Side {
    /// The terminal side: UnionPay-style POS 8583.
    CupPos,
    /// The network (issuer) side: ISO 8583:1987 ASCII.
    Iso87,
}

#[derive(Debug, Args)]
pub struct DialectArgs {
    /// The dialect of the frame.
    #[arg(long, value_enum)]
    dialect: Side,
    /// A dialect file to use instead of the one embedded in the binary.
    #[arg(long, value_name = "FILE")]
    dialect_file: Option<PathBuf>,
}

impl DialectArgs {
    fn load(&self) -> Result<Dialect, Failure> {
        match (&self.dialect_file, self.dialect) {
            (Some(path), _) => Dialect::load(path).map_err(|e| Failure::Other(e.into())),
            (None, Side::CupPos) => Ok(Dialect::cup_pos()),
            (None, Side::Iso87) => Ok(Dialect::iso87()),
        }
    }
}

#[derive(Debug, Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    dialect: DialectArgs,
    /// The frame as hex, with or without its 2-byte length.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    hex: Option<String>,
    /// A file holding the frame, raw or as hex text, with or without its 2-byte length.
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Show PAN, track data and PIN block in clear (they are masked otherwise).
    #[arg(long)]
    reveal: bool,
    /// Indent the JSON over several lines.
    #[arg(long)]
    pretty: bool,
}

#[derive(Debug, Args)]
pub struct EncodeArgs {
    #[command(flatten)]
    dialect: DialectArgs,
}

fn input_error(e: impl Into<anyhow::Error>) -> Failure {
    Failure::Input(e.into())
}

/// Hex text (whitespace ignored) or, failing that, raw bytes.
fn frame_bytes(args: &DecodeArgs) -> Result<Vec<u8>, Failure> {
    if let Some(hex) = &args.hex {
        let compact: String = hex.split_whitespace().collect();
        return hex::decode(&compact).map_err(|e| input_error(anyhow!("--hex is not hex: {e}")));
    }
    let path = args.file.as_ref().expect("clap requires --hex or --file");
    let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text: Vec<u8> = raw
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if !text.is_empty() && text.iter().all(u8::is_ascii_hexdigit) {
        return hex::decode(&text).map_err(|e| input_error(anyhow!("{}: {e}", path.display())));
    }
    Ok(raw)
}

/// Splits off the 2-byte length when it announces exactly the rest. A
/// prefix that announces a plausible frame length other than the rest means
/// the frame was cut (or padded): say so rather than parse garbage.
fn without_length<'b>(bytes: &'b [u8], dialect: &Dialect) -> Result<(&'b [u8], usize), Failure> {
    let [hi, lo, rest @ ..] = bytes else {
        return Ok((bytes, 0));
    };
    let declared = usize::from(u16::from_be_bytes([*hi, *lo]));
    if declared == rest.len() {
        return Ok((rest, 2));
    }
    let plausible = (dialect.min_frame_len()..=DEFAULT_MAX_FRAME).contains(&declared);
    if plausible && Message::parse(dialect, bytes).is_err() {
        return Err(input_error(anyhow!(
            "length prefix at byte 0: announces {declared} bytes but {} follow",
            rest.len()
        )));
    }
    Ok((bytes, 0))
}

/// JSON with `", "` and `": "` between items, on one line, as the issue's
/// examples and Python's `json.dumps` print it.
struct OneLine;

impl serde_json::ser::Formatter for OneLine {
    fn begin_array_value<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// `switchyard decode`.
pub fn decode(args: &DecodeArgs) -> Result<(), Failure> {
    let dialect = args.dialect.load()?;
    let bytes = frame_bytes(args)?;
    let (frame, shift) = without_length(&bytes, &dialect)?;
    let message = Message::parse(&dialect, frame).map_err(|e| input_error(e.shifted(shift)))?;
    let json = to_json(&message, args.reveal);
    let mut out = Vec::new();
    if args.pretty {
        serde_json::to_writer_pretty(&mut out, &json).map_err(anyhow::Error::from)?;
    } else {
        json.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out, OneLine,
        ))
        .map_err(anyhow::Error::from)?;
    }
    out.push(b'\n');
    std::io::stdout()
        .write_all(&out)
        .map_err(super::writing_stdout)
}

/// `switchyard encode`.
pub fn encode(args: &EncodeArgs) -> Result<(), Failure> {
    let dialect = args.dialect.load()?;
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("cannot read stdin")?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| input_error(anyhow!("stdin is not JSON: {e}")))?;
    let mut buf = BytesMut::new();
    from_json(&dialect, &json, &mut buf).map_err(input_error)?;
    println!("{}", hex::encode_upper(&buf));
    Ok(())
}
