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
                let plain = !name.is_empty()
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
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
            Schema::Float => self.double(json, path).map(|f| Value::Float(f as f32)),
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
                _ => self.int(json, path).map(Value::TimeMillis),
            },
            Schema::TimeMicros => match json {
                Json::String(s) => self
                    .time(s, path)
                    .map(|t| Value::TimeMicros((t / 1000) as i64)),
                _ => self.long(json, path).map(Value::TimeMicros),
            },
            Schema::TimestampMillis => self
                .timestamp(json, path, false, |n| n / 1_000_000)
                .map(Value::TimestampMillis),
            Schema::TimestampMicros => self
                .timestamp(json, path, false, |n| n / 1000)
                .map(Value::TimestampMicros),
            Schema::TimestampNanos => self
                .timestamp(json, path, false, |n| n)
                .map(Value::TimestampNanos),
            Schema::LocalTimestampMillis => self
                .timestamp(json, path, true, |n| n / 1_000_000)
                .map(Value::LocalTimestampMillis),
            Schema::LocalTimestampMicros => self
                .timestamp(json, path, true, |n| n / 1000)
                .map(Value::LocalTimestampMicros),
            Schema::LocalTimestampNanos => self
                .timestamp(json, path, true, |n| n)
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
                    let sign_ok = tail.first().is_none_or(|b| (b & 0x80 != 0) == (unscaled < 0));
                    if head.iter().any(|b| *b != fill) || !sign_ok {
                        return self.fail(
                            path,
                            format!("{text} does not fit in {} bytes", fixed.size),
                        );
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
            Ok(t) => Some(u64::from(t.num_seconds_from_midnight()) * 1_000_000_000 + u64::from(t.nanosecond())),
            Err(e) => {
                self.fail(path, format!("not a time of day (HH:MM:SS[.fff]): {e}"));
                None
            }
        }
    }

    /// Timestamps: an integer in the schema's unit, or an RFC 3339 string (local
    /// timestamps: without an offset). `unit` turns nanoseconds into the schema's unit.
    fn timestamp(
        &mut self,
        json: &Json,
        path: &Path<'_>,
        local: bool,
        unit: fn(i64) -> i64,
    ) -> Option<i64> {
        let Json::String(s) = json else {
            return self.long(json, path);
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
        return Err(format!("{text} has more than {scale} digits after the point"));
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
