//! JSON → Avro, guided by the schema, with errors that name the field path.
//!
//! Accepts what a JSON producer naturally sends: plain values for unions (the first branch
//! that takes the value wins; Avro's `{"type": value}` wrapping works too), absent nullable
//! fields as null, field defaults, RFC 3339 strings for timestamps, `YYYY-MM-DD` for dates,
//! `HH:MM:SS[.fff]` for times, UUID strings, decimal numbers or strings for decimals, and
//! strings of code points 0–255 for bytes and fixed (Avro's own JSON encoding).

use std::{collections::HashMap, fmt};

use apache_avro::{
    Days, Decimal, Duration, Millis, Months, Schema,
    schema::{DecimalSchema, InnerDecimalSchema, RecordSchema, UnionSchema},
    types::Value,
};
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Timelike};
use serde_json::Value as Json;

use super::SchemaVersion;

/// One reason a value does not match its schema.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    /// Where: `data.steps[2].agent_id`.
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

/// At most this many violations are reported for one value.
const MAX_VIOLATIONS: usize = 20;

/// Converts `json` into an Avro value of `version`'s schema. On failure, every violation
/// found (up to 20), each with its path below `root` (e.g. `data`).
pub fn json_to_avro(
    version: &SchemaVersion,
    json: &Json,
    root: &str,
) -> Result<Value, Vec<Violation>> {
    let mut converter = Converter {
        names: &version.names,
        errors: Vec::new(),
    };
    let path = Path::Root(root);
    match converter.convert(&version.schema, json, &path) {
        Some(value) if converter.errors.is_empty() => Ok(value),
        _ => Err(converter.errors),
    }
}

/// A path into the JSON value, built on the stack and formatted only for an error.
enum Path<'a> {
    Root(&'a str),
    Field(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root(root) => f.write_str(root),
            Path::Field(parent, name) => {
                write!(f, "{parent}")?;
                let plain =
                    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if plain {
                    write!(f, ".{name}")
                } else {
                    write!(f, "[{}]", Json::String((*name).to_string()))
                }
            }
            Path::Index(parent, index) => write!(f, "{parent}[{index}]"),
        }
    }
}

struct Converter<'s> {
    names: &'s HashMap<String, Schema>,
    errors: Vec<Violation>,
}

fn kind(json: &Json) -> &'static str {
    match json {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

impl<'s> Converter<'s> {
    fn fail(&mut self, path: &Path<'_>, message: impl Into<String>) -> Option<Value> {
        if self.errors.len() < MAX_VIOLATIONS {
            self.errors.push(Violation {
                path: path.to_string(),
                message: message.into(),
            });
        }
        None
    }

    fn expected(&mut self, path: &Path<'_>, what: &str, json: &Json) -> Option<Value> {
        self.fail(path, format!("expected {what}, got {}", kind(json)))
    }

    fn convert(&mut self, schema: &'s Schema, json: &Json, path: &Path<'_>) -> Option<Value> {
        match schema {
            Schema::Null => match json {
                Json::Null => Some(Value::Null),
                _ => self.expected(path, "null", json),
            },
            Schema::Boolean => match json {
                Json::Bool(b) => Some(Value::Boolean(*b)),
                _ => self.expected(path, "a boolean", json),
            },
            Schema::Int => self.int(json, path).map(Value::Int),
            Schema::Long => self.long(json, path).map(Value::Long),
            Schema::Float => match self.double(json, path) {
                Some(f) if f.abs() <= f64::from(f32::MAX) => Some(Value::Float(f as f32)),
                Some(_) => self.fail(path, "beyond the range of a float (32 bits)"),
                None => None,
            },
            Schema::Double => self.double(json, path).map(Value::Double),
            Schema::Bytes => self.bytes(json, path).map(Value::Bytes),
            Schema::String => match json {
                Json::String(s) => Some(Value::String(s.clone())),
                _ => self.expected(path, "a string", json),
            },
            Schema::Array(array) => match json {
                Json::Array(items) => {
                    let mut out = Vec::with_capacity(items.len());
                    for (i, item) in items.iter().enumerate() {
                        if let Some(v) = self.convert(&array.items, item, &Path::Index(path, i)) {
                            out.push(v);
                        }
                    }
                    (out.len() == items.len()).then_some(Value::Array(out))
                }
                _ => self.expected(path, "an array", json),
            },
            Schema::Map(map) => match json {
                Json::Object(entries) => {
                    let mut out = HashMap::with_capacity(entries.len());
                    for (key, item) in entries {
                        if let Some(v) = self.convert(&map.types, item, &Path::Field(path, key)) {
                            out.insert(key.clone(), v);
                        }
                    }
                    (out.len() == entries.len()).then_some(Value::Map(out))
                }
                _ => self.expected(path, "an object (a map)", json),
            },
            Schema::Union(union) => self.union(union, json, path),
            Schema::Record(record) => self.record(record, json, path),
            Schema::Enum(e) => match json {
                Json::String(s) => match e.symbols.iter().position(|sym| sym == s) {
                    Some(i) => Some(Value::Enum(i as u32, s.clone())),
                    None => self.fail(
                        path,
                        format!("{s:?} is not one of {}", e.symbols.join(", ")),
                    ),
                },
                _ => self.expected(path, "a string (enum symbol)", json),
            },
            Schema::Fixed(fixed) => {
                let bytes = self.bytes(json, path)?;
                if bytes.len() != fixed.size {
                    return self.fail(
                        path,
                        format!("expected {} bytes, got {}", fixed.size, bytes.len()),
                    );
                }
                Some(Value::Fixed(fixed.size, bytes))
            }
            Schema::Decimal(decimal) => self.decimal(decimal, json, path),
            Schema::BigDecimal => self.fail(path, "big-decimal is not supported"),
            Schema::Uuid(_) => match json {
                Json::String(s) => match uuid::Uuid::parse_str(s) {
                    Ok(u) => Some(Value::Uuid(u)),
                    Err(e) => self.fail(path, format!("not a UUID: {e}")),
                },
                _ => self.expected(path, "a UUID string", json),
            },
            Schema::Date => match json {
                Json::String(s) => match NaiveDate::parse_from_str(s, "%Y-%m-%d") {
                    Ok(d) => {
                        let days = (d - NaiveDate::default()).num_days();
                        Some(Value::Date(i32::try_from(days).ok()?))
                    }
                    Err(e) => self.fail(path, format!("not a date (YYYY-MM-DD): {e}")),
                },
                _ => self.int(json, path).map(Value::Date),
            },
            Schema::TimeMillis => match json {
                Json::String(s) => self
                    .time(s, path)
                    .map(|t| Value::TimeMillis((t / 1_000_000) as i32)),
                _ => match self.int(json, path) {
                    Some(ms) if (0..86_400_000).contains(&ms) => Some(Value::TimeMillis(ms)),
                    Some(_) => self.fail(path, "a time of day is 0 to 86399999 milliseconds"),
                    None => None,
                },
            },
            Schema::TimeMicros => match json {
                Json::String(s) => self
                    .time(s, path)
                    .map(|t| Value::TimeMicros((t / 1000) as i64)),
                _ => match self.long(json, path) {
                    Some(us) if (0..86_400_000_000).contains(&us) => Some(Value::TimeMicros(us)),
                    Some(_) => self.fail(path, "a time of day is 0 to 86399999999 microseconds"),
                    None => None,
                },
            },
            Schema::TimestampMillis => self
                .timestamp(json, path, false, 1_000)
                .map(Value::TimestampMillis),
            Schema::TimestampMicros => self
                .timestamp(json, path, false, 1_000_000)
                .map(Value::TimestampMicros),
            Schema::TimestampNanos => self
                .timestamp(json, path, false, 1_000_000_000)
                .map(Value::TimestampNanos),
            Schema::LocalTimestampMillis => self
                .timestamp(json, path, true, 1_000)
                .map(Value::LocalTimestampMillis),
            Schema::LocalTimestampMicros => self
                .timestamp(json, path, true, 1_000_000)
                .map(Value::LocalTimestampMicros),
            Schema::LocalTimestampNanos => self
                .timestamp(json, path, true, 1_000_000_000)
                .map(Value::LocalTimestampNanos),
            Schema::Duration(_) => self.duration(json, path),
            Schema::Ref { name } => match self.names.get(&name.fullname(None)) {
                Some(named) => self.convert(named, json, path),
                None => self.fail(path, format!("schema refers to unknown type {name}")),
            },
        }
    }

    fn int(&mut self, json: &Json, path: &Path<'_>) -> Option<i32> {
        let n = self.long(json, path)?;
        match i32::try_from(n) {
            Ok(n) => Some(n),
            Err(_) => {
                self.fail(path, format!("{n} does not fit in an int (32 bits)"));
                None
            }
        }
    }

    fn long(&mut self, json: &Json, path: &Path<'_>) -> Option<i64> {
        if let Some(n) = json.as_i64() {
            return Some(n);
        }
        // 3.0 is an integer too; 3.5 and 1e300 are not.
        if let Some(f) = json.as_f64()
            && f.fract() == 0.0
            && f.abs() < 9.0e15
        {
            return Some(f as i64);
        }
        match json {
            Json::Number(n) => {
                self.fail(path, format!("{n} is not an integer that fits in 64 bits"));
                None
            }
            _ => {
                self.expected(path, "an integer", json);
                None
            }
        }
    }

    fn double(&mut self, json: &Json, path: &Path<'_>) -> Option<f64> {
        match json.as_f64() {
            Some(f) => Some(f),
            None => {
                self.expected(path, "a number", json);
                None
            }
        }
    }

    fn bytes(&mut self, json: &Json, path: &Path<'_>) -> Option<Vec<u8>> {
        let Json::String(s) = json else {
            self.expected(path, "a string of bytes (code points 0-255)", json);
            return None;
        };
        let bytes: Option<Vec<u8>> = s.chars().map(|c| u8::try_from(c).ok()).collect();
        if bytes.is_none() {
            self.fail(path, "bytes are written as a string of code points 0-255");
        }
        bytes
    }

    fn union(&mut self, union: &'s UnionSchema, json: &Json, path: &Path<'_>) -> Option<Value> {
        let branches = union.variants();
        if json.is_null()
            && let Some(i) = branches.iter().position(|b| matches!(b, Schema::Null))
        {
            return Some(Value::Union(i as u32, Box::new(Value::Null)));
        }
        // Plain JSON first: the first branch that accepts the value.
        let mut first_errors = None;
        for (i, branch) in branches.iter().enumerate() {
            if matches!(branch, Schema::Null) {
                continue;
            }
            let mut probe = Converter {
                names: self.names,
                errors: Vec::new(),
            };
            match probe.convert(branch, json, path) {
                Some(v) if probe.errors.is_empty() => {
                    return Some(Value::Union(i as u32, Box::new(v)));
                }
                _ => {
                    first_errors.get_or_insert(probe.errors);
                }
            }
        }
        // Avro's JSON encoding: {"<branch type name>": value}.
        if let Json::Object(map) = json
            && map.len() == 1
        {
            let (tag, inner) = map.iter().next().expect("one entry");
            if let Some(i) = branches.iter().position(|b| branch_name(b) == *tag) {
                let value = self.convert(&branches[i], inner, &Path::Field(path, tag))?;
                return Some(Value::Union(i as u32, Box::new(value)));
            }
        }
        let non_null = branches
            .iter()
            .filter(|b| !matches!(b, Schema::Null))
            .count();
        match first_errors {
            // A nullable field: the one real branch's complaint is the useful one.
            Some(errors) if non_null == 1 => {
                for e in errors {
                    if self.errors.len() < MAX_VIOLATIONS {
                        self.errors.push(e);
                    }
                }
                None
            }
            _ => {
                let names: Vec<String> = branches.iter().map(branch_name).collect();
                self.fail(
                    path,
                    format!(
                        "{} matches no branch of the union [{}]",
                        kind(json),
                        names.join(", ")
                    ),
                )
            }
        }
    }

    fn record(&mut self, record: &'s RecordSchema, json: &Json, path: &Path<'_>) -> Option<Value> {
        let Json::Object(object) = json else {
            return self.expected(path, "an object", json);
        };
        let mut ok = true;
        for key in object.keys() {
            if !record.lookup.contains_key(key) {
                self.fail(&Path::Field(path, key), "unknown field");
                ok = false;
            }
        }
        let mut fields = Vec::with_capacity(record.fields.len());
        for field in &record.fields {
            let field_path = Path::Field(path, &field.name);
            let value = match object.get(&field.name) {
                Some(v) => self.convert(&field.schema, v, &field_path),
                None => match &field.default {
                    Some(default) => self.default(&field.schema, default, &field_path),
                    None => match nullable_branch(&field.schema) {
                        Some(i) => Some(Value::Union(i, Box::new(Value::Null))),
                        None => self.fail(&field_path, "missing required field"),
                    },
                },
            };
            match value {
                Some(v) => fields.push((field.name.clone(), v)),
                None => ok = false,
            }
        }
        ok.then_some(Value::Record(fields))
    }

    /// A field default is written in Avro's JSON encoding; for a union it is a value of
    /// the first branch.
    fn default(&mut self, schema: &'s Schema, default: &Json, path: &Path<'_>) -> Option<Value> {
        match schema {
            Schema::Union(union) => {
                let first = union.variants().first()?;
                let value = self.convert(first, default, path)?;
                Some(Value::Union(0, Box::new(value)))
            }
            _ => self.convert(schema, default, path),
        }
    }

    fn decimal(&mut self, decimal: &DecimalSchema, json: &Json, path: &Path<'_>) -> Option<Value> {
        let text = match json {
            Json::String(s) => s.clone(),
            Json::Number(n) => n.to_string(),
            _ => return self.expected(path, "a decimal number or string", json),
        };
        let unscaled = match parse_decimal(&text, decimal.scale, decimal.precision) {
            Ok(n) => n,
            Err(reason) => return self.fail(path, reason),
        };
        let bytes = unscaled.to_be_bytes();
        let bytes = match &decimal.inner {
            InnerDecimalSchema::Fixed(fixed) => {
                if fixed.size > 16 {
                    let fill = if unscaled < 0 { 0xff } else { 0 };
                    let mut out = vec![fill; fixed.size - 16];
                    out.extend_from_slice(&bytes);
                    out
                } else {
                    let (head, tail) = bytes.split_at(16 - fixed.size);
                    let fill = if unscaled < 0 { 0xff } else { 0 };
                    let sign_ok = tail
                        .first()
                        .is_none_or(|b| (b & 0x80 != 0) == (unscaled < 0));
                    if head.iter().any(|b| *b != fill) || !sign_ok {
                        return self
                            .fail(path, format!("{text} does not fit in {} bytes", fixed.size));
                    }
                    tail.to_vec()
                }
            }
            _ => minimal_twos_complement(&bytes),
        };
        Some(Value::Decimal(Decimal::from(bytes)))
    }

    /// Parses `HH:MM:SS[.fraction]` into nanoseconds after midnight.
    fn time(&mut self, s: &str, path: &Path<'_>) -> Option<u64> {
        match NaiveTime::parse_from_str(s, "%H:%M:%S%.f") {
            Ok(t) => Some(
                u64::from(t.num_seconds_from_midnight()) * 1_000_000_000
                    + u64::from(t.nanosecond()),
            ),
            Err(e) => {
                self.fail(path, format!("not a time of day (HH:MM:SS[.fff]): {e}"));
                None
            }
        }
    }

    /// Timestamps: an integer in the schema's unit (`per_second` of them make a second), or
    /// an RFC 3339 string (local timestamps: without an offset).
    fn timestamp(
        &mut self,
        json: &Json,
        path: &Path<'_>,
        local: bool,
        per_second: i64,
    ) -> Option<i64> {
        let unit = |nanos: i64| nanos / (1_000_000_000 / per_second);
        let Json::String(s) = json else {
            // Years 0000 to 9999, as RFC 3339 can write them (and as they are read back).
            const FIRST: i64 = -62_167_219_200;
            const PAST_LAST: i64 = 253_402_300_800;
            return match self.long(json, path) {
                Some(n) if (FIRST..PAST_LAST).contains(&n.div_euclid(per_second)) => Some(n),
                Some(_) => {
                    self.fail(path, "a timestamp from year 0000 to 9999");
                    None
                }
                None => None,
            };
        };
        let parsed = if local {
            NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                .map(|t| t.and_utc())
                .map_err(|e| format!("not a local date-time (YYYY-MM-DDTHH:MM:SS[.fff]): {e}"))
        } else {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.to_utc())
                .map_err(|e| format!("not an RFC 3339 timestamp: {e}"))
        };
        match parsed {
            Ok(t) => match t.timestamp_nanos_opt() {
                Some(n) => Some(unit(n)),
                // Outside 1677–2262: fall back to microseconds, enough for millis and micros.
                None => Some(unit(t.timestamp_micros().saturating_mul(1000))),
            },
            Err(reason) => {
                self.fail(path, reason);
                None
            }
        }
    }

    fn duration(&mut self, json: &Json, path: &Path<'_>) -> Option<Value> {
        let Json::Object(map) = json else {
            return self.expected(path, "an object {months, days, millis}", json);
        };
        let mut part = |name: &str| -> Option<u32> {
            let v = map.get(name).and_then(Json::as_u64).unwrap_or(0);
            match u32::try_from(v) {
                Ok(v) => Some(v),
                Err(_) => {
                    self.fail(&Path::Field(path, name), "must fit in 32 bits");
                    None
                }
            }
        };
        let (months, days, millis) = (part("months")?, part("days")?, part("millis")?);
        if let Some(key) = map
            .keys()
            .find(|k| !matches!(k.as_str(), "months" | "days" | "millis"))
        {
            return self.fail(&Path::Field(path, key), "unknown field");
        }
        Some(Value::Duration(Duration::new(
            Months::new(months),
            Days::new(days),
            Millis::new(millis),
        )))
    }
}

/// The name a union branch goes by in Avro's JSON encoding.
fn branch_name(schema: &Schema) -> String {
    match schema {
        Schema::Record(r) => r.name.fullname(None),
        Schema::Enum(e) => e.name.fullname(None),
        Schema::Fixed(f) => f.name.fullname(None),
        Schema::Ref { name } => name.fullname(None),
        Schema::Null => "null".into(),
        Schema::Boolean => "boolean".into(),
        Schema::Int | Schema::Date | Schema::TimeMillis => "int".into(),
        Schema::Long
        | Schema::TimeMicros
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::TimestampNanos
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos => "long".into(),
        Schema::Float => "float".into(),
        Schema::Double => "double".into(),
        Schema::Bytes | Schema::Decimal(_) | Schema::BigDecimal => "bytes".into(),
        Schema::String | Schema::Uuid(_) => "string".into(),
        Schema::Array(_) => "array".into(),
        Schema::Map(_) => "map".into(),
        Schema::Union(_) => "union".into(),
        Schema::Duration(_) => "fixed".into(),
    }
}

/// The index of `null` in a union field, so an absent optional field reads as null.
fn nullable_branch(schema: &Schema) -> Option<u32> {
    match schema {
        Schema::Union(u) => u
            .variants()
            .iter()
            .position(|b| matches!(b, Schema::Null))
            .map(|i| i as u32),
        _ => None,
    }
}

/// Parses a decimal such as `-12.30` into its unscaled integer at `scale`.
fn parse_decimal(text: &str, scale: usize, precision: usize) -> Result<i128, String> {
    let bad = || format!("{text:?} is not a decimal number");
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    if int_part.is_empty() && frac_part.is_empty()
        || !int_part.chars().all(|c| c.is_ascii_digit())
        || !frac_part.chars().all(|c| c.is_ascii_digit())
    {
        return Err(bad());
    }
    let frac_trimmed = frac_part.trim_end_matches('0');
    if frac_trimmed.len() > scale {
        return Err(format!(
            "{text} has more than {scale} digits after the point"
        ));
    }
    let int_trimmed = int_part.trim_start_matches('0');
    if int_trimmed.len() + scale > precision || precision > 38 {
        return Err(format!(
            "{text} does not fit precision {precision} with scale {scale}"
        ));
    }
    let mut unscaled: i128 = 0;
    for c in int_trimmed
        .chars()
        .chain(frac_trimmed.chars())
        .chain(std::iter::repeat_n('0', scale - frac_trimmed.len()))
    {
        unscaled = unscaled
            .checked_mul(10)
            .and_then(|n| n.checked_add(i128::from(c as u8 - b'0')))
            .ok_or_else(bad)?;
    }
    Ok(if negative { -unscaled } else { unscaled })
}

/// The shortest big-endian two's complement form of a 16-byte integer.
fn minimal_twos_complement(bytes: &[u8; 16]) -> Vec<u8> {
    let negative = bytes[0] & 0x80 != 0;
    let fill = if negative { 0xff } else { 0x00 };
    let mut start = 0;
    while start < 15 && bytes[start] == fill && (bytes[start + 1] & 0x80 != 0) == negative {
        start += 1;
    }
    bytes[start..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{decode_avro, decode_avro_with, encode_wire, split_wire};
    use proptest::prelude::*;
    use serde_json::json;

    const RICH: &str = r#"{
      "type": "record", "name": "Rich", "namespace": "t",
      "fields": [
        {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "n", "type": "int"},
        {"name": "big", "type": "long", "default": 5},
        {"name": "ratio", "type": "double"},
        {"name": "f", "type": "float", "default": 1.5},
        {"name": "ok", "type": "boolean"},
        {"name": "raw", "type": "bytes", "default": ""},
        {"name": "tags", "type": {"type": "array", "items": "string"}, "default": []},
        {"name": "attrs", "type": {"type": "map", "values": "long"}, "default": {}},
        {"name": "color", "type": {"type": "enum", "name": "Color", "symbols": ["red", "green"]}},
        {"name": "maybe", "type": ["null", "string"]},
        {"name": "either", "type": ["null", "int", "string"], "default": null},
        {"name": "inner", "type": {"type": "record", "name": "Inner", "fields": [
            {"name": "x", "type": "int"},
            {"name": "next", "type": ["null", "Inner"], "default": null}
        ]}},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "at_us", "type": {"type": "long", "logicalType": "timestamp-micros"}, "default": 0},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}, "default": 0},
        {"name": "tod", "type": {"type": "int", "logicalType": "time-millis"}, "default": 0},
        {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}, "default": "\u0000"},
        {"name": "mac", "type": {"type": "fixed", "name": "Mac", "size": 2}, "default": "\u0000\u0000"},
        {"name": "same", "type": "Color", "default": "green"}
      ]
    }"#;

    /// `avro` as apache-avro's own writer encodes it (validating it first).
    fn apache_encoded(v: &SchemaVersion, avro: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        apache_avro::writer::datum::GenericDatumWriter::builder(&v.schema)
            .build()
            .unwrap()
            .write_value_ref(&mut out, avro)
            .unwrap();
        out
    }

    fn rich() -> SchemaVersion {
        SchemaVersion::parse("t.rich", 1, RICH).unwrap()
    }

    fn valid() -> Json {
        json!({
            "id": "0192f6a2-7c3e-7a1b-9c2d-3e4f5a6b7c8d",
            "n": 3, "ratio": 0.25, "ok": true, "color": "red", "maybe": "here",
            "either": 42,
            "inner": {"x": 1, "next": {"x": 2}},
            "at": "2026-11-21T10:30:00.5Z",
            "day": "1970-01-11", "tod": "00:00:01.250", "price": "12.3",
            "tags": ["a"], "attrs": {"k": 9}
        })
    }

    #[test]
    fn every_kind_of_field_converts_and_round_trips_through_the_wire_format() {
        let v = rich();
        let avro = json_to_avro(&v, &valid(), "data").unwrap();
        let wire = encode_wire(&v, &avro).unwrap();
        let (id, body) = split_wire(&wire).unwrap();
        assert_eq!(id, v.id);
        assert_eq!(
            body,
            apache_encoded(&v, &avro),
            "not what apache-avro writes"
        );
        let back = decode_avro(&v.schema, body).unwrap();
        let Value::Record(fields) = back else {
            panic!()
        };
        let get = |name: &str| fields.iter().find(|(n, _)| n == name).unwrap().1.clone();
        assert_eq!(get("big"), Value::Long(5), "default");
        assert_eq!(
            get("maybe"),
            Value::Union(1, Box::new(Value::String("here".into())))
        );
        assert_eq!(get("either"), Value::Union(1, Box::new(Value::Int(42))));
        assert_eq!(get("at"), Value::TimestampMillis(1_795_257_000_500));
        assert_eq!(get("day"), Value::Date(10));
        assert_eq!(get("tod"), Value::TimeMillis(1250));
        assert_eq!(
            get("price"),
            Value::Decimal(Decimal::from(vec![0x04, 0xce])),
            "1230 unscaled"
        );
        assert_eq!(get("same"), Value::Enum(1, "green".into()));
        let Value::Record(inner) = get("inner") else {
            panic!()
        };
        assert!(
            matches!(&inner[1].1, Value::Union(1, _)),
            "recursive named type"
        );
    }

    #[test]
    fn absent_nullable_fields_are_null_and_avro_json_union_wrapping_is_understood() {
        let v = rich();
        let mut data = valid();
        data.as_object_mut().unwrap().remove("maybe");
        data["either"] = json!({"string": "wrapped"});
        let Value::Record(fields) = json_to_avro(&v, &data, "data").unwrap() else {
            panic!()
        };
        let get = |name: &str| fields.iter().find(|(n, _)| n == name).unwrap().1.clone();
        assert_eq!(get("maybe"), Value::Union(0, Box::new(Value::Null)));
        assert_eq!(
            get("either"),
            Value::Union(2, Box::new(Value::String("wrapped".into())))
        );
    }

    #[test]
    fn violations_name_the_field_path_and_are_all_reported() {
        let v = rich();
        let mut data = valid();
        data["n"] = json!(1u64 << 40);
        data["color"] = json!("blue");
        data["inner"]["next"] = json!({"x": "two"});
        data["tags"] = json!(["a", 1]);
        data["attrs"] = json!({"weird key": "x"});
        data["at"] = json!("yesterday");
        data["price"] = json!("1.234");
        data["unknown"] = json!(true);
        data.as_object_mut().unwrap().remove("ok");
        let errors = json_to_avro(&v, &data, "data").unwrap_err();
        let mut paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "data.at",
                "data.attrs[\"weird key\"]",
                "data.color",
                "data.inner.next.x",
                "data.n",
                "data.ok",
                "data.price",
                "data.tags[1]",
                "data.unknown"
            ]
        );
        let msg = |p: &str| errors.iter().find(|e| e.path == p).unwrap().message.clone();
        assert_eq!(msg("data.ok"), "missing required field");
        assert!(msg("data.color").contains("red, green"));
    }

    #[test]
    fn decimals_check_scale_precision_and_sign() {
        assert_eq!(parse_decimal("-1.5", 2, 9), Ok(-150));
        assert_eq!(parse_decimal("0.10", 1, 9), Ok(1));
        assert!(parse_decimal("1.234", 2, 9).is_err());
        assert!(parse_decimal("1234567890", 2, 9).is_err());
        assert!(parse_decimal("1e5", 2, 9).is_err());
        assert!(parse_decimal("-", 2, 9).is_err());
        assert_eq!(minimal_twos_complement(&(-1i128).to_be_bytes()), vec![0xff]);
        assert_eq!(
            minimal_twos_complement(&128i128.to_be_bytes()),
            vec![0x00, 0x80]
        );
    }

    fn arb_json() -> impl Strategy<Value = Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            "[a-z0-9 :.\\-]{0,12}".prop_map(Json::String),
            Just(json!("0192f6a2-7c3e-7a1b-9c2d-3e4f5a6b7c8d")),
            Just(json!("2026-11-21T10:30:00Z")),
            Just(json!("red")),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            let keys = prop_oneof![
                Just("id".to_string()),
                Just("n".to_string()),
                Just("inner".to_string()),
                Just("x".to_string()),
                Just("next".to_string()),
                Just("either".to_string()),
                Just("price".to_string()),
                Just("mac".to_string()),
                "[a-z]{1,4}",
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
                prop::collection::btree_map(keys, inner, 0..6)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Random JSON never panics the converter; whatever it accepts encodes and decodes.
        #[test]
        fn random_json_never_panics_and_accepted_values_round_trip(data in arb_json(), patch in arb_json()) {
            let v = rich();
            let _ = json_to_avro(&v, &data, "data");
            let mut near_valid = valid();
            if let (Json::Object(target), Json::Object(fields)) = (&mut near_valid, patch) {
                for (k, val) in fields { target.insert(k, val); }
            }
            if let Ok(avro) = json_to_avro(&v, &near_valid, "data") {
                let wire = encode_wire(&v, &avro).unwrap();
                let (_, body) = split_wire(&wire).unwrap();
                let apache = apache_encoded(&v, &avro);
                prop_assert_eq!(body, apache.as_slice());
                let back = decode_avro(&v.schema, body).unwrap();
                prop_assert_eq!(decode_avro_with(&v, body).unwrap(), back);
            }
        }

        /// Arbitrary bytes never panic the decoder, and both decoders agree on them.
        #[test]
        fn random_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let v = rich();
            if let Ok((_, body)) = split_wire(&bytes) {
                let _ = decode_avro(&v.schema, body);
            }
            let by_schema = decode_avro(&v.schema, &bytes).ok();
            prop_assert_eq!(decode_avro_with(&v, &bytes).ok(), by_schema);
        }
    }
}
