//! Avro body → JSON in one pass: what a consuming agent's handler receives as an event's
//! `data`.
//!
//! The consumer used to take two steps: [`super::decode_avro_with`] (an apache-avro
//! `GenericDatumReader` built per call, its `Value` tree, then `validate_with_names`, a second
//! walk) and [`super::avro_to_json`] (a third walk, building the JSON). Under callgrind that
//! was ~15 000 instructions per event, 21 % of an agent's work, most of it the reader's
//! construction, the `Value` allocations and the two extra walks. [`decode_to_json`] reads the
//! body once, guided by the version's schema (references resolved through the named types
//! the version built at load), and builds the JSON directly.
//!
//! It answers exactly what the two-step path answers: the same JSON for every body that path
//! accepts (each logical type rendered as `to_json` renders it), an error for every body it
//! refuses, including apache-avro 0.22's quirks (see [`Decoder::value`]). The property test at
//! the end of this file holds it to that, on valid bodies of every sample schema and of a
//! schema with every kind of type, edited byte by byte, and on random bytes.

use apache_avro::{
    Schema,
    schema::{InnerDecimalSchema, Name, RecordSchema, UnionSchema, UuidSchema},
    types::Value,
};
use chrono::DateTime;
use serde_json::{Map, Number, Value as Json, json};

use super::{
    Error, MAX_DECODE_ALLOCATION, SchemaVersion,
    to_json::{LOCAL, date, decimal_string, time_of_day},
};

/// Decodes an Avro body written with `version`'s schema straight into the JSON a handler
/// receives: `Ok(avro_to_json(version, &v))` when `decode_avro_with(version, body)` is
/// `Ok(v)`, and [`Error::Decode`] when it is an error.
pub fn decode_to_json(version: &SchemaVersion, body: &[u8]) -> Result<Json, Error> {
    let mut decoder = Decoder {
        input: Input { rest: body },
        version,
        key: String::new(),
        depth: 0,
    };
    let data = decoder.value(&version.schema)?;
    if !decoder.input.rest.is_empty() {
        return Err(Error::Decode(format!(
            "{} bytes left after the Avro body",
            decoder.input.rest.len()
        )));
    }
    Ok(data)
}

/// Why a varint could not be read: the two cases apache-avro tells apart (a union's index
/// at the end of the body is a null, an over-long varint is an error everywhere).
enum Short {
    /// The body ended inside the varint.
    End,
    /// Ten bytes and still a continuation bit.
    TooLong,
}

/// The error of a body that ends before its value does.
fn cut_short() -> Error {
    Error::Decode("the Avro body is cut short".into())
}

impl From<Short> for Error {
    fn from(short: Short) -> Self {
        match short {
            Short::End => cut_short(),
            Short::TooLong => Error::Decode("a varint is longer than 10 bytes".into()),
        }
    }
}

/// The unread rest of a body, and the primitive reads of Avro's binary encoding.
struct Input<'a> {
    /// What is left to read.
    rest: &'a [u8],
}

impl<'a> Input<'a> {
    /// A base-128 varint, low groups first, read as apache-avro's `decode_variable` reads
    /// it: at most 10 bytes, and bits beyond 64 in the tenth byte are dropped, not refused.
    fn varint(&mut self) -> Result<u64, Short> {
        let mut value = 0u64;
        for i in 0..10 {
            let Some(&byte) = self.rest.get(i) else {
                self.rest = &[];
                return Err(Short::End);
            };
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.rest = &self.rest[i + 1..];
                return Ok(value);
            }
        }
        Err(Short::TooLong)
    }

    /// A `long`: a zig-zag varint.
    fn long(&mut self) -> Result<i64, Error> {
        Ok(zigzag(self.varint()?))
    }

    /// An `int`: a `long` that must fit in 32 bits.
    fn int(&mut self) -> Result<i32, Error> {
        let n = self.long()?;
        i32::try_from(n).map_err(|_| Error::Decode(format!("{n} does not fit in an int")))
    }

    /// The length prefix of `bytes` or `string`: never negative, never above the cap (a
    /// corrupt prefix must not make anyone reserve gigabytes).
    fn length(&mut self) -> Result<usize, Error> {
        let n = self.long()?;
        let len = usize::try_from(n).map_err(|_| Error::Decode(format!("negative length {n}")))?;
        within_cap(len)
    }

    /// The next `n` bytes, borrowed from the body.
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if n > self.rest.len() {
            return Err(cut_short());
        }
        let (taken, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(taken)
    }

    /// `bytes`: a length, then that many bytes.
    fn bytes(&mut self) -> Result<&'a [u8], Error> {
        let len = self.length()?;
        self.take(len)
    }

    /// `string`: `bytes` that must be UTF-8.
    fn str(&mut self) -> Result<&'a str, Error> {
        std::str::from_utf8(self.bytes()?)
            .map_err(|e| Error::Decode(format!("a string is not UTF-8: {e}")))
    }

    /// The branch a union's index picks; `None` for the null that apache-avro reads when
    /// the body ends before the index and branch 0 is `null` (any other branch 0 fails its
    /// check of the decoded value).
    fn branch<'s>(&mut self, union: &'s UnionSchema) -> Result<Option<&'s Schema>, Error> {
        let variants = union.variants();
        let index = match self.varint() {
            Ok(z) => zigzag(z),
            Err(Short::End) if matches!(variants.first(), Some(Schema::Null)) => return Ok(None),
            Err(short) => return Err(short.into()),
        };
        usize::try_from(index)
            .ok()
            .and_then(|i| variants.get(i))
            .map(Some)
            .ok_or_else(|| {
                Error::Decode(format!(
                    "union index {index} out of range ({} branches)",
                    variants.len()
                ))
            })
    }

    /// The item count of an array or map block; `None` for the terminating empty block.
    ///
    /// `held` items of `item_size` bytes each are already there: apache-avro refuses a
    /// block that would take the collection's `Value`s past the cap, and so must we (the
    /// items of some types take no input at all, so the input's length bounds nothing).
    fn block(&mut self, held: usize, item_size: usize) -> Result<Option<usize>, Error> {
        let raw = self.long()?;
        let count = match raw {
            0 => return Ok(None),
            // A negative count is followed by the block's size in bytes, which only a
            // reader skipping the block needs.
            ..0 => {
                self.long()?;
                raw.checked_neg()
                    .ok_or_else(|| Error::Decode(format!("block count {raw}")))?
            }
            _ => raw,
        };
        let count = within_cap(usize::try_from(count).unwrap_or(usize::MAX))?;
        held.checked_add(count)
            .and_then(|total| total.checked_mul(item_size))
            .filter(|bytes| *bytes <= MAX_DECODE_ALLOCATION)
            .ok_or_else(|| {
                Error::Decode(format!(
                    "a collection of {held} + {count} items is larger than the cap"
                ))
            })?;
        Ok(Some(count))
    }
}

/// Zig-zag decoding: 0, 1, 2, 3… are 0, -1, 1, -2…
fn zigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

/// `len`, if it is within the allocation cap (apache-avro's `safe_len`).
fn within_cap(len: usize) -> Result<usize, Error> {
    if len > MAX_DECODE_ALLOCATION {
        return Err(Error::Decode(format!(
            "length {len} is above the cap of {MAX_DECODE_ALLOCATION} bytes"
        )));
    }
    Ok(len)
}

/// One body's decoding: the input, and the version whose named types resolve references.
struct Decoder<'a> {
    /// The body.
    input: Input<'a>,
    /// The version it was written with.
    version: &'a SchemaVersion,
    /// Scratch space for a reference's full name, so that resolving one allocates nothing.
    key: String,
    /// Records, arrays and maps being read, one inside the other.
    depth: usize,
}

/// Records, arrays and maps nested deeper than this are refused. A schema that refers to
/// itself lets a crafted body nest without end, and each level is a few stack frames here:
/// without a bound such a record would overflow the consuming thread's stack and abort the
/// agent, again at every delivery. JSON data published through agentbus cannot be nested
/// deeper than serde_json's own limit, the same 128, so no event agentbus wrote is refused.
/// (This is the one place where the decoder refuses what apache-avro's path read, where that
/// path had not overflowed first.)
pub const MAX_NESTING: usize = 128;

impl<'a> Decoder<'a> {
    /// Reads one value of `schema` and renders it as `to_json` renders apache-avro's value.
    ///
    /// apache-avro 0.22's decoder and the check after it decide what is accepted; their
    /// corners are kept here:
    /// - a union's index cut off by the end of the body reads as branch 0 with a null, which
    ///   passes the check when branch 0 is `null` (so a body cut right before trailing
    ///   nullable unions decodes, with nulls);
    /// - a boolean or a string cut off by the end reads as a null, which never passes;
    /// - an enum's index is an `int`, a union's a `long`; neither may be negative;
    /// - decimals are not checked against their precision; `fixed` decimals, durations and
    ///   uuids read their schema's size, and a uuid's text may be any form `Uuid::parse_str`
    ///   takes.
    fn value(&mut self, schema: &'a Schema) -> Result<Json, Error> {
        // One small function per kind: this frame is on the stack once per level of
        // nesting, the others only while their kind is read.
        match schema {
            Schema::Union(union) => match self.input.branch(union)? {
                Some(branch) => self.value(branch),
                None => Ok(Json::Null),
            },
            Schema::Array(array) => self.nested(|d| d.array(&array.items)),
            Schema::Map(map) => self.nested(|d| d.map(&map.types)),
            Schema::Record(record) => self.nested(|d| d.record(record)),
            Schema::Ref { name } => {
                let (named, renderable) = self.resolve(name)?;
                let value = self.value(named)?;
                Ok(if renderable { value } else { Json::Null })
            }
            leaf => self.input.leaf(leaf),
        }
    }

    /// Reads a record, array or map one level deeper, within [`MAX_NESTING`].
    fn nested(
        &mut self,
        read: impl FnOnce(&mut Self) -> Result<Json, Error>,
    ) -> Result<Json, Error> {
        if self.depth == MAX_NESTING {
            return Err(Error::Decode(format!(
                "records, arrays and maps nested deeper than {MAX_NESTING} levels"
            )));
        }
        self.depth += 1;
        let read = read(self);
        self.depth -= 1;
        read
    }

    /// An array: blocks of items, up to an empty block.
    fn array(&mut self, items_schema: &'a Schema) -> Result<Json, Error> {
        let mut items = Vec::new();
        while let Some(count) = self.input.block(items.len(), size_of::<Value>())? {
            // Items that take input are at most as many as the bytes left; others (nulls)
            // grow the vector as they come.
            items.reserve(count.min(self.input.rest.len()));
            for _ in 0..count {
                items.push(self.value(items_schema)?);
            }
        }
        Ok(Json::Array(items))
    }

    /// A map: blocks of string keys and values, up to an empty block. A repeated key keeps
    /// its last value, as apache-avro's `HashMap` does.
    fn map(&mut self, values_schema: &'a Schema) -> Result<Json, Error> {
        let mut entries = Map::new();
        // The count apache-avro checks is of distinct keys (its `HashMap`'s), as here.
        while let Some(count) = self
            .input
            .block(entries.len(), size_of::<(String, Value)>())?
        {
            for _ in 0..count {
                let key = self.input.str()?.to_owned();
                let value = self.value(values_schema)?;
                entries.insert(key, value);
            }
        }
        Ok(Json::Object(entries))
    }

    /// A record: its fields in schema order.
    fn record(&mut self, record: &'a RecordSchema) -> Result<Json, Error> {
        let mut fields = Map::new();
        for field in &record.fields {
            let value = self.value(&field.schema)?;
            fields.insert(field.name.clone(), value);
        }
        Ok(Json::Object(fields))
    }

    /// The schema a reference names, and whether `to_json` renders its values (it looks
    /// references up among the version's names only).
    fn resolve(&mut self, name: &Name) -> Result<(&'a Schema, bool), Error> {
        // The key `Name::fullname(None)` would allocate.
        self.key.clear();
        if let Some(namespace) = name.namespace() {
            self.key.push_str(namespace);
            self.key.push('.');
        }
        self.key.push_str(name.name());
        let version = self.version;
        if let Some(named) = version.names.get(self.key.as_str()) {
            return Ok((named, true));
        }
        // Named decimals, durations and uuids are not among the version's names (records,
        // enums, fixed): apache-avro still reads them, and `to_json`, which cannot resolve
        // them, renders such a decimal (or record) as null.
        let named = version
            .resolved_names
            .get(name)
            .ok_or_else(|| Error::Decode(format!("schema refers to unknown type {name}")))?;
        Ok((
            named,
            !matches!(named, Schema::Record(_) | Schema::Decimal(_)),
        ))
    }
}

impl<'a> Input<'a> {
    /// Reads one value of a `schema` that holds no other schema, rendered as `to_json`
    /// renders it.
    fn leaf(&mut self, schema: &Schema) -> Result<Json, Error> {
        Ok(match schema {
            Schema::Null => Json::Null,
            Schema::Boolean => match self.take(1)? {
                [0] => Json::Bool(false),
                [1] => Json::Bool(true),
                other => return Err(Error::Decode(format!("boolean byte {other:02x?}"))),
            },
            Schema::Int => Json::from(self.int()?),
            Schema::Long => Json::from(self.long()?),
            Schema::Float => {
                let bytes = self.take(4)?;
                let x = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                Number::from_f64(f64::from(x)).map_or(Json::Null, Json::Number)
            }
            Schema::Double => {
                let mut le = [0u8; 8];
                le.copy_from_slice(self.take(8)?);
                Number::from_f64(f64::from_le_bytes(le)).map_or(Json::Null, Json::Number)
            }
            Schema::Bytes => latin1(self.bytes()?),
            Schema::String => Json::String(self.str()?.to_owned()),
            Schema::Fixed(fixed) => latin1(self.take(fixed.size)?),
            Schema::Enum(e) => {
                let index = self.int()?;
                let symbol = usize::try_from(index)
                    .ok()
                    .and_then(|i| e.symbols.get(i))
                    .ok_or_else(|| {
                        Error::Decode(format!(
                            "enum index {index} out of range ({} symbols)",
                            e.symbols.len()
                        ))
                    })?;
                Json::String(symbol.clone())
            }
            Schema::Date => date(self.int()?),
            Schema::TimeMillis => time_of_day(i64::from(self.int()?) * 1_000_000, "%H:%M:%S%.3f"),
            Schema::TimeMicros => time_of_day(self.long()?.saturating_mul(1000), "%H:%M:%S%.6f"),
            Schema::TimestampMillis => {
                let ms = self.long()?;
                DateTime::from_timestamp_millis(ms)
                    .map_or(json!(ms), |t| json!(crate::envelope::format_time(&t)))
            }
            Schema::TimestampMicros => {
                let us = self.long()?;
                DateTime::from_timestamp_micros(us).map_or(json!(us), |t| json!(t.to_rfc3339()))
            }
            Schema::TimestampNanos => {
                json!(DateTime::from_timestamp_nanos(self.long()?).to_rfc3339())
            }
            Schema::LocalTimestampMillis => {
                let ms = self.long()?;
                DateTime::from_timestamp_millis(ms).map_or(json!(ms), |t| {
                    json!(t.naive_utc().format(LOCAL).to_string())
                })
            }
            Schema::LocalTimestampMicros => {
                let us = self.long()?;
                DateTime::from_timestamp_micros(us).map_or(json!(us), |t| {
                    json!(t.naive_utc().format(LOCAL).to_string())
                })
            }
            Schema::LocalTimestampNanos => json!(
                DateTime::from_timestamp_nanos(self.long()?)
                    .naive_utc()
                    .format(LOCAL)
                    .to_string()
            ),
            Schema::Decimal(decimal) => {
                let bytes = match &decimal.inner {
                    InnerDecimalSchema::Fixed(fixed) => self.take(fixed.size)?,
                    InnerDecimalSchema::Bytes => self.bytes()?,
                };
                decimal_string(decimal.scale, bytes)
            }
            Schema::BigDecimal => {
                // Never in a loaded schema (the registry refuses it), but read as apache-avro
                // reads it: bytes holding a length-prefixed integer and a scale. `to_json`
                // renders it as null.
                let mut inner = Input {
                    rest: self.bytes()?,
                };
                let len = inner.length()?;
                inner.take(len)?;
                inner.long()?;
                Json::Null
            }
            Schema::Duration(fixed) => {
                if fixed.size != 12 {
                    return Err(Error::Decode(format!(
                        "a duration is 12 bytes, its schema says {}",
                        fixed.size
                    )));
                }
                let b = self.take(12)?;
                let part = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
                json!({"months": part(0), "days": part(4), "millis": part(8)})
            }
            Schema::Uuid(representation) => {
                let uuid = match representation {
                    UuidSchema::String => uuid::Uuid::parse_str(self.str()?)
                        .map_err(|e| Error::Decode(format!("not a UUID: {e}")))?,
                    UuidSchema::Bytes => uuid::Uuid::from_slice(self.bytes()?)
                        .map_err(|e| Error::Decode(format!("not a UUID: {e}")))?,
                    UuidSchema::Fixed(fixed) => {
                        let bytes = self.take(fixed.size)?;
                        uuid::Uuid::from_slice(bytes)
                            .map_err(|e| Error::Decode(format!("not a UUID: {e}")))?
                    }
                };
                Json::String(uuid.to_string())
            }
            Schema::Union(_)
            | Schema::Array(_)
            | Schema::Map(_)
            | Schema::Record(_)
            | Schema::Ref { .. } => {
                return Err(Error::Decode(format!("{schema:?} is not a leaf")));
            }
        })
    }
}

/// `bytes` and `fixed` as `to_json` renders them: one char per byte (code points 0–255).
fn latin1(bytes: &[u8]) -> Json {
    Json::String(bytes.iter().map(|&b| char::from(b)).collect())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, OnceLock};

    use apache_avro::{Days, Decimal, Duration, Millis, Months};
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngSeed};

    use super::*;
    use crate::schema::{
        Registry, avro_to_json, decode_avro_with, encode_wire, json_to_avro, split_wire,
    };

    /// Every kind of Avro type and every logical type, beside the sample schemas (which use
    /// only records, arrays, maps, unions, enums, uuid and timestamp-millis): references to
    /// every named kind, a recursive record, collections of items that take no input, and
    /// nullable unions at the end (where apache-avro reads a missing index as null).
    const EVERY_KIND: &str = r#"{
      "type": "record", "name": "Every", "namespace": "t.every",
      "fields": [
        {"name": "nothing", "type": "null"},
        {"name": "ok", "type": "boolean"},
        {"name": "n", "type": "int"},
        {"name": "big", "type": "long"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "raw", "type": "bytes"},
        {"name": "s", "type": "string"},
        {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "id_bytes", "type": {"type": "bytes", "logicalType": "uuid"}},
        {"name": "id_fixed", "type": {"type": "fixed", "name": "Id16", "size": 16, "logicalType": "uuid"}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "tod", "type": {"type": "int", "logicalType": "time-millis"}},
        {"name": "tod_us", "type": {"type": "long", "logicalType": "time-micros"}},
        {"name": "at_ms", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "at_us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "at_ns", "type": {"type": "long", "logicalType": "timestamp-nanos"}},
        {"name": "local_ms", "type": {"type": "long", "logicalType": "local-timestamp-millis"}},
        {"name": "local_us", "type": {"type": "long", "logicalType": "local-timestamp-micros"}},
        {"name": "local_ns", "type": {"type": "long", "logicalType": "local-timestamp-nanos"}},
        {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
        {"name": "whole", "type": {"type": "bytes", "logicalType": "decimal", "precision": 4, "scale": 0}},
        {"name": "amount", "type": {"type": "fixed", "name": "Amount", "size": 4, "logicalType": "decimal", "precision": 8, "scale": 3}},
        {"name": "wide", "type": {"type": "fixed", "name": "Wide", "size": 20, "logicalType": "decimal", "precision": 38, "scale": 5}},
        {"name": "span", "type": {"type": "fixed", "name": "Span", "size": 12, "logicalType": "duration"}},
        {"name": "mac", "type": {"type": "fixed", "name": "Mac", "size": 2}},
        {"name": "hollow", "type": {"type": "fixed", "name": "Hollow", "size": 0}},
        {"name": "color", "type": {"type": "enum", "name": "Color", "symbols": ["red", "green", "blue"]}},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "grid", "type": {"type": "array", "items": {"type": "array", "items": ["null", "double"]}}},
        {"name": "nulls", "type": {"type": "array", "items": "null"}},
        {"name": "attrs", "type": {"type": "map", "values": ["null", "long", "string"]}},
        {"name": "palettes", "type": {"type": "map", "values": {"type": "array", "items": "Color"}}},
        {"name": "either", "type": ["null", "int", "string", "Color", "Mac"]},
        {"name": "inner", "type": {"type": "record", "name": "Inner", "fields": [
            {"name": "x", "type": "int"},
            {"name": "next", "type": ["null", "Inner"]},
            {"name": "kids", "type": {"type": "array", "items": "Inner"}}
        ]}},
        {"name": "again", "type": ["null", "Inner"]},
        {"name": "none", "type": {"type": "record", "name": "Nothing", "fields": []}},
        {"name": "nones", "type": {"type": "map", "values": "Nothing"}},
        {"name": "same", "type": "Color"},
        {"name": "mac2", "type": "Mac"},
        {"name": "id2", "type": ["null", "Id16"]},
        {"name": "amount2", "type": ["null", "Amount"]},
        {"name": "span2", "type": ["null", "Span"]},
        {"name": "last", "type": ["null", "string"]},
        {"name": "really_last", "type": ["null", "boolean"]}
      ]
    }"#;

    /// The schemas and valid bodies every test starts from.
    struct Fixture {
        /// Every version of `schemas/`, then [`EVERY_KIND`] (the last).
        versions: Vec<Arc<SchemaVersion>>,
        /// Valid bodies: the index of their version, the Avro body.
        bodies: Vec<(usize, Vec<u8>)>,
    }

    /// How many examples each schema gets (each from its own seed).
    const EXAMPLES: u64 = 40;

    /// The fixture, built once per test process.
    fn fixture() -> &'static Fixture {
        static FIXTURE: OnceLock<Fixture> = OnceLock::new();
        FIXTURE.get_or_init(|| {
            // The old path caps allocations through apache-avro's process-wide setting, which
            // only its first caller sets: the equivalence holds for the cap this crate sets.
            assert_eq!(
                apache_avro::util::max_allocation_bytes(MAX_DECODE_ALLOCATION),
                MAX_DECODE_ALLOCATION
            );
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
            let registry = Registry::load(&dir).expect("the sample schemas load");
            let mut versions: Vec<Arc<SchemaVersion>> = registry
                .event_types()
                .flat_map(|t| t.versions.values().cloned())
                .collect();
            versions.push(Arc::new(every_kind()));
            let mut bodies = Vec::new();
            for (i, version) in versions.iter().enumerate() {
                let before = bodies.len();
                for seed in 0..EXAMPLES {
                    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
                    let data = example(version, &version.schema, &mut rng, 0);
                    // An example the converter refuses (a reference it cannot follow, say)
                    // is skipped; enough others are not.
                    if let Ok(avro) = json_to_avro(version, &data, "data") {
                        let wire = encode_wire(version, &avro).expect("a converted value encodes");
                        let (id, body) = split_wire(&wire).expect("our wire format splits");
                        assert_eq!(id, version.id);
                        bodies.push((i, body.to_vec()));
                    }
                }
                assert!(
                    bodies.len() - before >= EXAMPLES as usize / 2,
                    "{} v{}: only {} of {EXAMPLES} examples convert",
                    version.event_type,
                    version.version,
                    bodies.len() - before
                );
            }
            let every = versions.len() - 1;
            for body in apache_written(&versions[every]) {
                bodies.push((every, body));
            }
            Fixture { versions, bodies }
        })
    }

    /// [`EVERY_KIND`], loaded.
    fn every_kind() -> SchemaVersion {
        SchemaVersion::parse("t.every", 1, EVERY_KIND).expect("the every-kind schema parses")
    }

    /// Values of [`EVERY_KIND`] that the converter cannot make (NaN and infinities, the
    /// named decimal, duration and uuid behind references), written by apache-avro's writer.
    fn apache_written(version: &SchemaVersion) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for seed in 0..8u64 {
            let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
            let data = example(version, &version.schema, &mut rng, 0);
            let Ok(Value::Record(mut fields)) = json_to_avro(version, &data, "data") else {
                continue;
            };
            let odd_floats = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0];
            let odd_doubles = [
                f64::NAN,
                f64::NEG_INFINITY,
                f64::INFINITY,
                f64::MIN_POSITIVE,
            ];
            let uuid =
                uuid::Uuid::from_u128(0x0192_f6a2_7c3e_7a1b_9c2d_3e4f_5a6b_7c8d ^ u128::from(seed));
            let decimal = [
                vec![],
                vec![0x80],
                vec![0xff, 0xff, 0xfe, 0x0c],
                vec![0, 0, 0, 7],
            ];
            for (name, value) in &mut fields {
                *value = match name.as_str() {
                    "f" => Value::Float(odd_floats[seed as usize % 4]),
                    "d" => Value::Double(odd_doubles[seed as usize % 4]),
                    "id2" => Value::Union(1, Box::new(Value::Uuid(uuid))),
                    "amount2" => Value::Union(
                        1,
                        Box::new(Value::Decimal(Decimal::from(
                            decimal[seed as usize % 4].clone(),
                        ))),
                    ),
                    "span2" => Value::Union(
                        1,
                        Box::new(Value::Duration(Duration::new(
                            Months::new(u32::MAX),
                            Days::new(seed as u32),
                            Millis::new(86_400_000),
                        ))),
                    ),
                    _ => continue,
                };
            }
            let mut body = Vec::new();
            apache_avro::writer::datum::GenericDatumWriter::builder(&version.schema)
                .build()
                .expect("a writer for the every-kind schema")
                .write_value_ref(&mut body, &Value::Record(fields))
                .expect("apache-avro writes the value");
            out.push(body);
        }
        assert!(!out.is_empty());
        out
    }

    /// A small deterministic generator (xorshift), so that the examples are the same on
    /// every run.
    struct Rng(u64);

    impl Rng {
        /// The next 64 bits.
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// A number below `n` (near enough uniform for examples).
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        /// One of `choices`.
        fn pick<T: Clone>(&mut self, choices: &[T]) -> T {
            choices[self.below(choices.len())].clone()
        }
    }

    /// A JSON value of `schema` as a producer might send it, with values on the edges of
    /// each type (extreme numbers, dates chrono cannot render, empty and non-ASCII text).
    fn example(v: &SchemaVersion, schema: &Schema, rng: &mut Rng, depth: u32) -> Json {
        let deep = depth > 4;
        match schema {
            Schema::Null => Json::Null,
            Schema::Boolean => json!(rng.below(2) == 1),
            Schema::Int => {
                let any = rng.next() as i32;
                json!(rng.pick(&[0, 1, -1, 63, -64, 64, i32::MAX, i32::MIN, any]))
            }
            Schema::Long => {
                let any = rng.next() as i64;
                json!(rng.pick(&[0, -1, 1 << 40, i64::MAX, i64::MIN, any]))
            }
            Schema::Float => json!(rng.pick(&[0.0, 1.5, -3.25, 0.1, 3.4e38, 1e-40])),
            Schema::Double => json!(rng.pick(&[0.25, -1e300, 5e-324, 0.1, 1e16])),
            Schema::Bytes => json!(rng.pick(&["", "ab", "\u{0}\u{7f}\u{80}\u{ff}"])),
            Schema::String => match rng.below(5) {
                0 => Json::String(
                    (0..rng.below(12))
                        .filter_map(|_| char::from_u32((rng.next() % 0x11_0000) as u32))
                        .collect(),
                ),
                _ => json!(rng.pick(&["", "text", "é✓😀", "\u{0}line\nbreak"])),
            },
            Schema::Array(array) => {
                let len = if deep { 0 } else { rng.below(4) };
                Json::Array(
                    (0..len)
                        .map(|_| example(v, &array.items, rng, depth + 1))
                        .collect(),
                )
            }
            Schema::Map(map) => {
                let len = if deep { 0 } else { rng.below(4) };
                Json::Object(
                    (0..len)
                        .map(|_| {
                            let key = rng.pick(&["k", "é", "", "key 2"]).to_string();
                            (key, example(v, &map.types, rng, depth + 1))
                        })
                        .collect(),
                )
            }
            Schema::Union(union) => {
                let variants = union.variants();
                match variants.iter().position(|b| matches!(b, Schema::Null)) {
                    Some(null) if deep || rng.below(3) == 0 => {
                        example(v, &variants[null], rng, depth + 1)
                    }
                    _ => {
                        let branch = &variants[rng.below(variants.len())];
                        // The converter cannot follow a reference to a named decimal,
                        // duration or uuid ([`apache_written`] writes those).
                        let unknown = matches!(branch, Schema::Ref { name }
                            if !v.names.contains_key(&name.fullname(None)));
                        if unknown {
                            Json::Null
                        } else {
                            example(v, branch, rng, depth + 1)
                        }
                    }
                }
            }
            Schema::Record(record) => Json::Object(
                record
                    .fields
                    .iter()
                    .map(|f| (f.name.clone(), example(v, &f.schema, rng, depth + 1)))
                    .collect(),
            ),
            Schema::Enum(e) => json!(rng.pick(&e.symbols)),
            Schema::Fixed(fixed) => Json::String(
                (0..fixed.size)
                    .map(|_| char::from(rng.next() as u8))
                    .collect(),
            ),
            Schema::Decimal(decimal) => {
                let digits = 1 + rng.below(decimal.precision.min(38));
                let mut text: String = (0..digits)
                    .map(|_| char::from(b'0' + rng.below(10) as u8))
                    .collect();
                if decimal.scale > 0 {
                    let padded = format!("{text:0>width$}", width = decimal.scale + 1);
                    let (int, frac) = padded.split_at(padded.len() - decimal.scale);
                    text = format!("{int}.{frac}");
                }
                if rng.below(2) == 1 {
                    text.insert(0, '-');
                }
                json!(text)
            }
            Schema::BigDecimal => Json::Null,
            Schema::Uuid(_) => {
                let uuid =
                    uuid::Uuid::from_u128(u128::from(rng.next()) << 64 | u128::from(rng.next()));
                json!(match rng.below(4) {
                    0 => uuid.hyphenated().to_string(),
                    1 => uuid.simple().to_string(),
                    2 => uuid.hyphenated().to_string().to_uppercase(),
                    _ => uuid.braced().to_string(),
                })
            }
            Schema::Date => rng.pick(&[
                json!("2026-11-21"),
                json!("1969-12-31"),
                json!(0),
                json!(i32::MAX),
                json!(i32::MIN),
            ]),
            Schema::TimeMillis => rng.pick(&[json!("10:30:00.250"), json!(0), json!(86_399_999)]),
            Schema::TimeMicros => {
                rng.pick(&[json!("23:59:59.999999"), json!(1), json!(86_399_999_999i64)])
            }
            Schema::TimestampMillis | Schema::TimestampMicros | Schema::TimestampNanos => {
                rng.pick(&[
                    json!("2026-11-21T10:30:00.5Z"),
                    json!("1969-12-31T23:59:59.999999999+14:00"),
                    json!("0000-01-01T00:00:00Z"),
                    json!(-1),
                    json!(0),
                ])
            }
            Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => rng.pick(&[
                json!("2026-11-21T10:30:00.5"),
                json!("9999-12-31T23:59:59.999999999"),
                json!(-1),
            ]),
            Schema::Duration(_) => json!({
                "months": rng.next() as u32, "days": rng.pick(&[0, 1, u32::MAX]), "millis": 3
            }),
            Schema::Ref { name } => match v.names.get(&name.fullname(None)) {
                Some(named) => example(v, named, rng, depth + 1),
                None => Json::Null,
            },
        }
    }

    /// The contract on one body: the old path's JSON, or both refuse it. Returns the JSON.
    fn agree(v: &SchemaVersion, body: &[u8]) -> Result<Option<Json>, TestCaseError> {
        let old = decode_avro_with(v, body).map(|value| avro_to_json(v, &value));
        let new = decode_to_json(v, body);
        match (old, new) {
            (Ok(old), Ok(new)) => {
                prop_assert_eq!(
                    &new,
                    &old,
                    "{} v{}, body {:02x?}",
                    v.event_type,
                    v.version,
                    body
                );
                Ok(Some(new))
            }
            (Err(_), Err(Error::Decode(_))) => Ok(None),
            (old, new) => Err(TestCaseError::fail(format!(
                "{} v{}, body {body:02x?}: the two-step path says {old:?}, decode_to_json {new:?}",
                v.event_type, v.version
            ))),
        }
    }

    /// [`agree`] outside proptest.
    fn both(v: &SchemaVersion, body: &[u8]) -> Option<Json> {
        agree(v, body).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A record whose one field `v` is of `field_type` (JSON text).
    fn one_field(field_type: &str) -> SchemaVersion {
        let text = format!(
            r#"{{"type": "record", "name": "One", "fields": [{{"name": "v", "type": {field_type}}}]}}"#
        );
        SchemaVersion::parse("t.one", 1, &text).expect("the one-field schema parses")
    }

    /// The zig-zag varint of `n`, as Avro writes a `long`.
    fn long(n: i64) -> Vec<u8> {
        let mut z = ((n << 1) ^ (n >> 63)) as u64;
        let mut out = Vec::new();
        while z >= 0x80 {
            out.push((z as u8) | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
        out
    }

    #[test]
    fn valid_bodies_of_every_schema_decode_to_what_the_two_step_path_renders() {
        let f = fixture();
        for (i, body) in &f.bodies {
            let v = &f.versions[*i];
            let old = avro_to_json(v, &decode_avro_with(v, body).expect("a valid body decodes"));
            let new = decode_to_json(v, body).expect("a valid body decodes in one pass");
            assert_eq!(
                new, old,
                "{} v{}, body {body:02x?}",
                v.event_type, v.version
            );
        }
        // Every schema is there, the every-kind one with the apache-written bodies too.
        let every = f.versions.len() - 1;
        for i in 0..f.versions.len() {
            assert!(f.bodies.iter().any(|(j, _)| *j == i));
        }
        assert!(f.bodies.iter().filter(|(j, _)| *j == every).count() > EXAMPLES as usize / 2 + 4);
    }

    #[test]
    fn the_renderings_of_the_odd_values_are_those_of_to_json() {
        let f = fixture();
        let every = f.versions.len() - 1;
        let v = &f.versions[every];
        let rendered: Vec<Json> = f
            .bodies
            .iter()
            .filter(|(i, _)| *i == every)
            .map(|(_, body)| decode_to_json(v, body).unwrap())
            .collect();
        // NaN and infinities are null, a decimal behind a reference too (to_json cannot
        // resolve it), a duration behind one is still an object.
        assert!(
            rendered
                .iter()
                .any(|d| d["f"].is_null() && d["d"].is_null())
        );
        assert!(rendered.iter().any(|d| d["id2"].is_string()));
        assert!(
            rendered
                .iter()
                .any(|d| d["span2"]["months"] == json!(u32::MAX))
        );
        assert!(rendered.iter().all(|d| d["amount2"].is_null()));
        assert!(
            rendered.iter().any(|d| d["day"] == json!(i32::MAX)),
            "beyond chrono: a number"
        );
    }

    #[test]
    fn a_body_cut_short_is_refused() {
        let f = fixture();
        let v = f.versions.last().unwrap();
        let (_, body) = f
            .bodies
            .iter()
            .rev()
            .find(|(i, _)| *i == f.versions.len() - 1)
            .unwrap();
        // A quarter of the way in: well before the nullable unions at the end.
        let cut = body.len() / 4;
        assert!(both(v, &body[..cut]).is_none());
        assert!(both(v, &[]).is_none(), "nothing at all");
        assert!(
            both(&one_field(r#""string""#), &[0x08, b'a']).is_none(),
            "4 bytes promised"
        );
        assert!(
            both(&one_field(r#""boolean""#), &[]).is_none(),
            "no boolean byte"
        );
        assert!(both(&one_field(r#""double""#), &[0; 7]).is_none());
        assert!(
            both(&one_field(r#"["string", "null"]"#), &[]).is_none(),
            "branch 0 is not null"
        );
        // Every other cut of that body: whatever the old path says.
        for cut in 0..body.len() {
            both(v, &body[..cut]);
        }
    }

    #[test]
    fn a_body_cut_before_trailing_nullable_unions_reads_them_as_null_as_apache_avro_does() {
        let v = one_field(r#"["null", "string"]"#);
        assert_eq!(both(&v, &[]), Some(json!({"v": null})));
        // An index cut inside its varint too.
        assert_eq!(both(&v, &[0x80]), Some(json!({"v": null})));
        assert_eq!(both(&v, &[0x02, 0x02, b'x']), Some(json!({"v": "x"})));
    }

    #[test]
    fn a_byte_after_the_body_is_refused() {
        let f = fixture();
        for (i, body) in f.bodies.iter().step_by(7) {
            let mut longer = body.clone();
            longer.push(0);
            assert!(both(&f.versions[*i], &longer).is_none());
        }
    }

    #[test]
    fn strings_that_are_not_utf8_are_refused() {
        assert!(both(&one_field(r#""string""#), &[0x04, 0xff, 0xfe]).is_none());
        assert!(
            both(&one_field(r#""string""#), &[0x02, 0x80]).is_none(),
            "a lone continuation byte"
        );
        let map = one_field(r#"{"type": "map", "values": "int"}"#);
        assert!(
            both(&map, &[0x02, 0x02, 0xc3, 0x02, 0x00]).is_none(),
            "a map key"
        );
        let uuid = one_field(r#"{"type": "string", "logicalType": "uuid"}"#);
        assert!(both(&uuid, &[0x02, 0xff]).is_none());
        // But bytes may be anything.
        assert_eq!(
            both(&one_field(r#""bytes""#), &[0x04, 0xff, 0xfe]),
            Some(json!({"v": "\u{ff}\u{fe}"}))
        );
    }

    #[test]
    fn huge_and_negative_length_prefixes_and_block_counts_are_refused() {
        let cap = MAX_DECODE_ALLOCATION as i64;
        for field_type in [
            r#""string""#,
            r#""bytes""#,
            r#"{"type": "bytes", "logicalType": "decimal", "precision": 4}"#,
        ] {
            let v = one_field(field_type);
            for len in [cap + 1, i64::MAX, -1, i64::MIN] {
                assert!(both(&v, &long(len)).is_none(), "{field_type} {len}");
            }
            // At the cap itself the prefix is fine, the bytes are missing.
            assert!(both(&v, &long(cap)).is_none());
        }
        // Block counts: above the cap, and (for items that take no input) a collection whose
        // values apache-avro would hold in more than the cap.
        let nulls = one_field(r#"{"type": "array", "items": "null"}"#);
        let item = std::mem::size_of::<Value>();
        let most = MAX_DECODE_ALLOCATION / item;
        assert!(both(&nulls, &[long(cap + 1), vec![0]].concat()).is_none());
        assert!(both(&nulls, &[long(most as i64 + 1), vec![0]].concat()).is_none());
        assert!(
            both(
                &nulls,
                &[
                    long(most as i64 / 2 + 1),
                    long(most as i64 / 2 + 1),
                    vec![0]
                ]
                .concat()
            )
            .is_none()
        );
        let data = both(&nulls, &[long(1000), long(-24), long(0), vec![0]].concat()).unwrap();
        assert_eq!(data["v"].as_array().unwrap().len(), 1024);
    }

    #[test]
    fn a_map_counts_its_distinct_keys_against_the_cap_and_keeps_a_key_s_last_value() {
        let ints = one_field(r#"{"type": "map", "values": "int"}"#);
        let twice = [
            long(2),
            long(1),
            b"a".to_vec(),
            long(1),
            long(1),
            b"a".to_vec(),
            long(2),
        ];
        assert_eq!(
            both(&ints, &[twice.concat(), vec![0]].concat()),
            Some(json!({"v": {"a": 2}}))
        );
        // Values that take no input: only the cap bounds how many there are.
        let nones = one_field(
            r#"{"type": "map", "values": {"type": "record", "name": "N", "fields": []}}"#,
        );
        let half = MAX_DECODE_ALLOCATION / size_of::<(String, Value)>() / 2 + 1;
        let block = |distinct: bool, from: usize| {
            let mut out = long(half as i64);
            for i in from..from + half {
                let key = if distinct {
                    i.to_string()
                } else {
                    String::new()
                };
                out.extend(long(key.len() as i64));
                out.extend(key.as_bytes());
            }
            out
        };
        // Twice half the cap's keys: too many; the same key twice half as many times: one.
        let distinct = [block(true, 0), block(true, half), vec![0]].concat();
        assert!(both(&nones, &distinct).is_none());
        let same = [block(false, 0), block(false, 0), vec![0]].concat();
        assert_eq!(both(&nones, &same), Some(json!({"v": {"": {}}})));
    }

    #[test]
    fn union_and_enum_indexes_out_of_range_are_refused() {
        let union = one_field(r#"["null", "int"]"#);
        assert!(both(&union, &long(2)).is_none());
        assert!(both(&union, &long(-1)).is_none());
        assert!(both(&union, &long(i64::MIN)).is_none());
        assert_eq!(
            both(&union, &[long(1), long(-7)].concat()),
            Some(json!({"v": -7}))
        );
        let color = one_field(r#"{"type": "enum", "name": "C", "symbols": ["red", "green"]}"#);
        assert!(both(&color, &long(2)).is_none());
        assert!(both(&color, &long(-1)).is_none());
        assert!(
            both(&color, &long(i64::from(i32::MAX) + 1)).is_none(),
            "an enum index is an int"
        );
        assert_eq!(both(&color, &long(1)), Some(json!({"v": "green"})));
        assert!(both(&one_field(r#""int""#), &long(i64::from(i32::MIN) - 1)).is_none());
        assert!(both(&one_field(r#""boolean""#), &[2]).is_none());
    }

    #[test]
    fn a_block_count_of_i64_min_is_refused_and_negative_counts_carry_a_size() {
        let ints = one_field(r#"{"type": "array", "items": "int"}"#);
        assert!(both(&ints, &[long(i64::MIN), long(0), vec![0]].concat()).is_none());
        let map = one_field(r#"{"type": "map", "values": "int"}"#);
        assert!(both(&map, &[long(i64::MIN), long(0), vec![0]].concat()).is_none());
        assert_eq!(
            both(
                &ints,
                &[
                    long(-2),
                    long(2),
                    long(5),
                    long(-5),
                    long(1),
                    long(7),
                    vec![0]
                ]
                .concat()
            ),
            Some(json!({"v": [5, -5, 7]}))
        );
        // A negative count whose size is missing.
        assert!(both(&ints, &long(-2)).is_none());
    }

    #[test]
    fn varints_longer_than_ten_bytes_are_refused_and_the_tenth_byte_keeps_its_low_bit() {
        let v = one_field(r#""long""#);
        assert!(both(&v, &[[0x80; 10].as_slice(), &[0x00]].concat()).is_none());
        assert!(both(&v, &[0x80; 10]).is_none());
        assert!(both(&v, &[0x80; 9]).is_none());
        // apache-avro drops the bits beyond 64 rather than refusing them.
        let high = [[0xff; 9].as_slice(), &[0x7f]].concat();
        assert_eq!(both(&v, &high), Some(json!({"v": i64::MIN})));
        assert_eq!(both(&v, &long(i64::MAX)), Some(json!({"v": i64::MAX})));
        // An over-long union index is an error, not the null of an index cut short.
        let union = one_field(r#"["null", "int"]"#);
        assert!(both(&union, &[0x80; 10]).is_none());
        assert_eq!(both(&union, &[0x80; 9]), Some(json!({"v": null})));
    }

    #[test]
    fn uuids_and_decimals_are_read_as_apache_avro_reads_them() {
        let text = one_field(r#"{"type": "string", "logicalType": "uuid"}"#);
        let simple = b"0192F6A27C3E7A1B9C2D3E4F5A6B7C8D";
        assert_eq!(
            both(&text, &[long(32), simple.to_vec()].concat()),
            Some(json!({"v": "0192f6a2-7c3e-7a1b-9c2d-3e4f5a6b7c8d"}))
        );
        assert!(both(&text, &[long(3), b"abc".to_vec()].concat()).is_none());
        let bytes = one_field(r#"{"type": "bytes", "logicalType": "uuid"}"#);
        assert!(both(&bytes, &[long(15), vec![1; 15]].concat()).is_none());
        assert!(both(&bytes, &[long(16), vec![1; 16]].concat()).is_some());
        // A uuid on a fixed of another size is a plain fixed.
        let fixed =
            one_field(r#"{"type": "fixed", "name": "F", "size": 4, "logicalType": "uuid"}"#);
        assert_eq!(both(&fixed, b"abcd"), Some(json!({"v": "abcd"})));
        let decimal =
            one_field(r#"{"type": "bytes", "logicalType": "decimal", "precision": 3, "scale": 2}"#);
        assert_eq!(
            both(&decimal, &[long(0)].concat()),
            Some(json!({"v": null}))
        );
        assert_eq!(
            both(&decimal, &[long(1), vec![0xff]].concat()),
            Some(json!({"v": "-0.01"}))
        );
        // Precision is not checked when reading.
        assert_eq!(
            both(&decimal, &[long(3), vec![0x01, 0x00, 0x00]].concat()),
            Some(json!({"v": "655.36"}))
        );
    }

    #[test]
    fn a_value_nested_past_the_bound_is_refused_without_exhausting_the_stack() {
        let v = Arc::new(one_field(
            r#"{"type": "record", "name": "L", "fields": [{"name": "next", "type": ["null", "L"]}]}"#,
        ));
        // One level past the bound, and far past it on a thread with little stack: a
        // refusal, not an overflow (the old path is not asked: it would overflow).
        // (The one-field record and the `L` in it are two levels.)
        for depth in [MAX_NESTING - 1, 100_000] {
            let mut body = vec![0x02; depth];
            body.push(0x00);
            let v = v.clone();
            let refused = std::thread::Builder::new()
                .stack_size(512 << 10)
                .spawn(move || decode_to_json(&v, &body))
                .unwrap()
                .join()
                .unwrap();
            let Err(Error::Decode(why)) = refused else {
                panic!("depth {depth}: {refused:?}");
            };
            assert!(why.contains("nested deeper"), "{why}");
        }
    }

    #[test]
    fn deep_recursive_values_decode_and_crafted_blocks_end() {
        let v = one_field(
            r#"{"type": "record", "name": "L", "fields": [{"name": "next", "type": ["null", "L"]}]}"#,
        );
        // The one-field record, the `L` in it and `depth` more: all of MAX_NESTING.
        let depth = MAX_NESTING - 2;
        let mut body = vec![0x02; depth];
        body.push(0x00);
        // The old path takes ~100 KiB of stack per level in a debug build (this one well
        // under a tenth of that): a thread with room for it.
        let data = std::thread::Builder::new()
            .stack_size(256 << 20)
            .spawn(move || both(&v, &body))
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        let mut node = &data["v"];
        for _ in 0..depth {
            node = &node["next"];
        }
        assert_eq!(node, &json!({"next": null}));
        // Empty records in a map: blocks of them take only their count and keys.
        let nones = one_field(
            r#"{"type": "map", "values": {"type": "record", "name": "N", "fields": []}}"#,
        );
        assert_eq!(
            both(
                &nones,
                &[
                    long(2),
                    long(1),
                    b"a".to_vec(),
                    long(1),
                    b"a".to_vec(),
                    vec![0]
                ]
                .concat()
            ),
            Some(json!({"v": {"a": {}}}))
        );
    }

    /// 2000 cases and a fixed seed, so that the test command runs the same cases every time
    /// (as `tests/fuzz.rs` does; `convert.rs`'s proptests draw a new seed per run);
    /// `PROPTEST_CASES` and `PROPTEST_RNG_SEED=<n>` explore more. No failure file is written
    /// beside this one: a failure is pasted into the hand-written cases above.
    fn config() -> Config {
        let defaults = Config::default();
        Config {
            cases: std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|c| c.parse().ok())
                .unwrap_or(2000),
            rng_seed: if std::env::var_os("PROPTEST_RNG_SEED").is_some() {
                defaults.rng_seed
            } else {
                RngSeed::Fixed(0x00de_c0de_2026)
            },
            failure_persistence: None,
            ..defaults
        }
    }

    /// One edit of a body: `(where, byte, how)`.
    type Edit = (usize, u8, u8);

    /// Longs on the edges of what the decoder checks: lengths and counts around the cap,
    /// `int` limits, `i64::MIN` (whose negation overflows), and raw over-long varints.
    fn interesting(i: u8) -> Vec<u8> {
        let cap = MAX_DECODE_ALLOCATION as i64;
        let longs = [
            0,
            -1,
            1,
            2,
            -2,
            63,
            -65,
            127,
            128,
            i64::from(i32::MAX),
            i64::from(i32::MAX) + 1,
            i64::from(i32::MIN),
            i64::MAX,
            i64::MIN,
            cap,
            cap + 1,
            (MAX_DECODE_ALLOCATION / std::mem::size_of::<Value>()) as i64 + 1,
            1 << 40,
        ];
        match usize::from(i) % (longs.len() + 3) {
            n if n < longs.len() => long(longs[n]),
            n if n == longs.len() => vec![0x80; 10],
            n if n == longs.len() + 1 => vec![0xff; 9],
            _ => [[0xff; 9].as_slice(), &[0x7f]].concat(),
        }
    }

    /// `bytes` with `edits` applied in order: a byte changed (to any value, or by its bit
    /// 0x02), inserted or removed, the rest cut off, or an [`interesting`] varint inserted.
    fn edit(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
        for &(at, byte, how) in edits {
            let at = if bytes.is_empty() {
                0
            } else {
                at % bytes.len()
            };
            match how % 8 {
                0 | 1 if !bytes.is_empty() => bytes[at] = byte,
                2 => bytes.insert(at, byte),
                3 if !bytes.is_empty() => {
                    bytes.remove(at);
                }
                4 => bytes.truncate(at),
                // A null union ↔ its branch 1, an int ± 1, a boolean made invalid.
                5 if !bytes.is_empty() => bytes[at] ^= 0x02,
                _ => {
                    let varint = interesting(byte);
                    bytes.splice(at..at, varint);
                }
            }
        }
        bytes
    }

    proptest! {
        #![proptest_config(config())]

        /// Valid bodies of every schema with bytes changed, inserted, removed, cut off or
        /// replaced by edge-case varints: the one pass answers what the two steps answer.
        #[test]
        fn edited_bodies_decode_as_the_two_step_path_decodes_them(
            pick in any::<usize>(),
            edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4),
        ) {
            let f = fixture();
            let (i, body) = &f.bodies[pick % f.bodies.len()];
            agree(&f.versions[*i], &edit(body.clone(), &edits))?;
        }

        /// Valid bodies from examples of any seed (more values than the fixture's): the
        /// same JSON on both paths.
        #[test]
        fn examples_of_any_seed_decode_as_the_two_step_path_decodes_them(
            selector in any::<usize>(),
            seed in any::<u64>(),
        ) {
            let f = fixture();
            let v = &f.versions[selector % f.versions.len()];
            let data = example(v, &v.schema, &mut Rng(seed | 1), 0);
            if let Ok(avro) = json_to_avro(v, &data, "data") {
                let wire = encode_wire(v, &avro).expect("a converted value encodes");
                let (_, body) = split_wire(&wire).expect("our wire format splits");
                prop_assert!(agree(v, body)?.is_some(), "a valid body is refused");
            }
        }

        /// Random bytes, and valid bodies of one schema read with another.
        #[test]
        fn random_bytes_decode_as_the_two_step_path_decodes_them(
            selector in any::<usize>(),
            pick in any::<usize>(),
            random in prop::collection::vec(any::<u8>(), 0..96),
        ) {
            let f = fixture();
            let v = &f.versions[selector % f.versions.len()];
            agree(v, &random)?;
            agree(v, &f.bodies[pick % f.bodies.len()].1)?;
        }
    }
}
