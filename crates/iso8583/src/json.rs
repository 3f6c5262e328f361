//! The JSON shape of a message, as `switchyard decode` prints it and
//! `switchyard encode` reads it:
//!
//! ```json
//! {"tpdu": "6000030000", "header": "603100000000", "mti": "0200",
//!  "fields": {"2": "622202*********0001", "3": "000000"}}
//! ```
//!
//! Field keys are decimal strings in ascending numeric order; `n`, `z`, `an`
//! and `ans` values are text as on the wire (the track separator `D` on the
//! terminal side, `=` on the network side); `b` values are uppercase hex.
//! `tpdu` and `header` appear only in dialects that have them. Card data is
//! masked unless revealed.

use bytes::BytesMut;
use serde_json::{Map, Value as Json};

use crate::dialect::{Dialect, FieldType};
use crate::error::BuildError;
use crate::message::Message;
use crate::mti::Mti;
use crate::writer::MessageWriter;

/// Why a JSON message cannot be encoded.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    /// The JSON is not of the message shape.
    #[error("{0}")]
    Shape(String),
    /// A value does not fit its field.
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// The message as JSON; card data masked unless `reveal`.
pub fn to_json(message: &Message<'_>, reveal: bool) -> Json {
    let mut top = Map::new();
    if message.dialect().tpdu_len() > 0 {
        top.insert("tpdu".into(), hex::encode_upper(message.tpdu()).into());
    }
    if message.dialect().header_len() > 0 {
        top.insert("header".into(), hex::encode_upper(message.header()).into());
    }
    top.insert("mti".into(), message.mti().to_string().into());
    let mut fields = Map::new();
    for (n, value) in message.fields() {
        let text = if reveal {
            value.to_clear_string()
        } else {
            value.to_string()
        };
        fields.insert(n.to_string(), text.into());
    }
    top.insert("fields".into(), Json::Object(fields));
    Json::Object(top)
}

fn shape(message: impl Into<String>) -> JsonError {
    JsonError::Shape(message.into())
}

fn hex_bytes(what: &str, text: &str) -> Result<Vec<u8>, JsonError> {
    hex::decode(text).map_err(|e| shape(format!("{what}: {text:?} is not hex: {e}")))
}

/// Builds the message `json` describes (clear values) into `buf` as a wire
/// frame, length prefix included; returns the frame's length.
pub fn from_json(dialect: &Dialect, json: &Json, buf: &mut BytesMut) -> Result<usize, JsonError> {
    let top = json
        .as_object()
        .ok_or_else(|| shape("the message must be a JSON object"))?;
    for key in top.keys() {
        let allowed = match key.as_str() {
            "mti" | "fields" => true,
            "tpdu" => dialect.tpdu_len() > 0,
            "header" => dialect.header_len() > 0,
            _ => false,
        };
        if !allowed {
            return Err(shape(format!(
                "unknown key {key:?} for the {} dialect",
                dialect.name()
            )));
        }
    }
    let text_of = |key: &str| -> Result<Option<&str>, JsonError> {
        match top.get(key) {
            None => Ok(None),
            Some(Json::String(s)) => Ok(Some(s)),
            Some(_) => Err(shape(format!("{key} must be a string"))),
        }
    };
    let prefix = |key: &str, len: usize| -> Result<Vec<u8>, JsonError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let text = text_of(key)?.ok_or_else(|| {
            shape(format!(
                "{key} is required in the {} dialect",
                dialect.name()
            ))
        })?;
        hex_bytes(key, text)
    };
    let tpdu = prefix("tpdu", dialect.tpdu_len())?;
    let header = prefix("header", dialect.header_len())?;
    let mti: Mti = text_of("mti")?
        .ok_or_else(|| shape("mti is required"))?
        .parse()?;
    let fields = match top.get("fields") {
        Some(Json::Object(map)) => map,
        None => return Err(shape("fields is required")),
        Some(_) => return Err(shape("fields must be an object")),
    };
    let mut numbered = Vec::with_capacity(fields.len());
    for (key, value) in fields {
        let n: usize = key
            .parse()
            .ok()
            .filter(|n| (2..=128).contains(n) && !key.starts_with('0'))
            .ok_or_else(|| shape(format!("field key {key:?} is not a field number 2 to 128")))?;
        let text = value
            .as_str()
            .ok_or_else(|| shape(format!("field {n} must be a string")))?;
        numbered.push((n, text));
    }
    numbered.sort_by_key(|&(n, _)| n);

    let mut writer = MessageWriter::new(dialect, buf, mti, &tpdu, &header)?;
    for (n, text) in numbered {
        let spec = dialect.field(n).ok_or(BuildError::Undefined { field: n })?;
        match spec.ty {
            FieldType::Numeric | FieldType::Track => writer.digits(n, text)?,
            FieldType::Alphanumeric | FieldType::Text => writer.text(n, text)?,
            FieldType::Binary => writer.binary(n, &hex_bytes(&format!("field {n}"), text)?)?,
        }
    }
    Ok(writer.finish()?)
}
