//! Avro binary encoding of a converted value, without resolving the schema per call.
//!
//! apache-avro's encoders resolve every named type of the schema into a fresh map on each
//! call, and look each record's fields up through a map built per record: on the publish
//! path that cost more than the encoding itself. Here named types come from the version's
//! own map, built once at load ([`SchemaVersion::names`]), and a record's fields are taken in
//! schema order, as [`super::json_to_avro`] produces them. Leaf kinds this module does not
//! write itself (decimals, durations) go to apache-avro's writer, for which such a
//! leaf has nothing to resolve; the output is byte for byte what apache-avro writes (a
//! property test checks it).

use std::collections::HashMap;

use apache_avro::{
    Schema,
    schema::{FixedSchema, UuidSchema},
    types::Value,
};

use super::Error;

/// Appends the Avro binary encoding of `value`, of `schema`, to `out`. `names` resolves the
/// schema's references (`Schema::Ref`) by full name.
pub(crate) fn encode(
    value: &Value,
    schema: &Schema,
    names: &HashMap<String, Schema>,
    out: &mut Vec<u8>,
) -> Result<(), Error> {
    let schema = match schema {
        Schema::Ref { name } => names
            .get(&name.fullname(None))
            .ok_or_else(|| Error::Encode(format!("schema refers to unknown type {name}")))?,
        other => other,
    };
    match (value, schema) {
        (Value::Null, Schema::Null) => {}
        (Value::Boolean(b), Schema::Boolean) => out.push(u8::from(*b)),
        (Value::Int(n), Schema::Int) => long(i64::from(*n), out),
        (Value::Long(n), Schema::Long) => long(*n, out),
        (Value::Float(x), Schema::Float) => out.extend_from_slice(&x.to_le_bytes()),
        (Value::Double(x), Schema::Double) => out.extend_from_slice(&x.to_le_bytes()),
        (Value::String(s), Schema::String) => bytes(s.as_bytes(), out),
        (Value::Bytes(b), Schema::Bytes) => bytes(b, out),
        (Value::Fixed(_, b), Schema::Fixed(_)) => out.extend_from_slice(b),
        (Value::Enum(i, _), Schema::Enum(_)) => long(i64::from(*i), out),
        (
            Value::Date(n) | Value::TimeMillis(n),
            Schema::Date | Schema::TimeMillis | Schema::Int,
        ) => long(i64::from(*n), out),
        (
            Value::TimestampMillis(n)
            | Value::TimestampMicros(n)
            | Value::TimestampNanos(n)
            | Value::LocalTimestampMillis(n)
            | Value::LocalTimestampMicros(n)
            | Value::LocalTimestampNanos(n)
            | Value::TimeMicros(n),
            Schema::Long
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos
            | Schema::TimeMicros,
        ) => long(*n, out),
        (Value::Uuid(u), Schema::Uuid(UuidSchema::String) | Schema::String) => bytes(
            u.hyphenated()
                .encode_lower(&mut uuid::Uuid::encode_buffer())
                .as_bytes(),
            out,
        ),
        (Value::Uuid(u), Schema::Uuid(UuidSchema::Bytes) | Schema::Bytes) => {
            bytes(u.as_bytes(), out)
        }
        (
            Value::Uuid(u),
            Schema::Uuid(UuidSchema::Fixed(FixedSchema { size: 16, .. }))
            | Schema::Fixed(FixedSchema { size: 16, .. }),
        ) => out.extend_from_slice(u.as_bytes()),
        (Value::Union(i, inner), Schema::Union(union)) => {
            let branch = union
                .variants()
                .get(*i as usize)
                .ok_or_else(|| Error::Encode(format!("union has no branch {i}")))?;
            long(i64::from(*i), out);
            encode(inner, branch, names, out)?;
        }
        (Value::Array(items), Schema::Array(array)) => {
            if !items.is_empty() {
                long(items.len() as i64, out);
                for item in items {
                    encode(item, &array.items, names, out)?;
                }
            }
            out.push(0);
        }
        (Value::Map(entries), Schema::Map(map)) => {
            if !entries.is_empty() {
                long(entries.len() as i64, out);
                for (key, item) in entries {
                    bytes(key.as_bytes(), out);
                    encode(item, &map.types, names, out)?;
                }
            }
            out.push(0);
        }
        (Value::Record(fields), Schema::Record(record)) => {
            for (i, field) in record.fields.iter().enumerate() {
                // In schema order, as the converter builds records; by name otherwise.
                let value = match fields.get(i) {
                    Some((name, value)) if *name == field.name => value,
                    _ => fields
                        .iter()
                        .find(|(name, _)| *name == field.name)
                        .map(|(_, value)| value)
                        .ok_or_else(|| {
                            Error::Encode(format!("record has no field {:?}", field.name))
                        })?,
                };
                encode(value, &field.schema, names, out)?;
            }
        }
        // Decimals, durations and whatever else: leaves without references.
        (value, leaf) if is_leaf(leaf) => {
            apache_avro::writer::datum::GenericDatumWriter::builder(leaf)
                .validate(false)
                .build()
                .and_then(|writer| writer.write_value_ref(out, value))
                .map_err(|e| Error::Encode(e.to_string()))?;
        }
        (value, _) => {
            return Err(Error::Encode(format!(
                "a {:?} value does not fit its schema",
                apache_avro::schema::SchemaKind::from(value)
            )));
        }
    }
    Ok(())
}

/// Whether `schema` holds no other schema (so nothing a reference could point into).
fn is_leaf(schema: &Schema) -> bool {
    !matches!(
        schema,
        Schema::Union(_)
            | Schema::Array(_)
            | Schema::Map(_)
            | Schema::Record(_)
            | Schema::Ref { .. }
    )
}

/// A `long` (or `int`): zig-zag, then base-128 varint, low groups first.
fn long(n: i64, out: &mut Vec<u8>) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// `bytes` or `string`: the length as a long, then the bytes.
fn bytes(b: &[u8], out: &mut Vec<u8>) {
    long(b.len() as i64, out);
    out.extend_from_slice(b);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apache(value: &Value, schema: &Schema) -> Vec<u8> {
        apache_avro::writer::datum::GenericDatumWriter::builder(schema)
            .build()
            .unwrap()
            .write_value_to_vec(value.clone())
            .unwrap()
    }

    #[test]
    fn uuids_are_written_as_apache_avro_writes_them_in_every_representation() {
        let value =
            Value::Uuid(uuid::Uuid::parse_str("0192f6a2-7c3e-7a1b-9c2d-3e4f5a6b7c8d").unwrap());
        for text in [
            r#"{"type": "string", "logicalType": "uuid"}"#,
            r#"{"type": "fixed", "name": "U", "size": 16, "logicalType": "uuid"}"#,
            r#"{"type": "bytes", "logicalType": "uuid"}"#,
        ] {
            let schema = Schema::parse_str(text).unwrap();
            let mut out = Vec::new();
            encode(&value, &schema, &HashMap::new(), &mut out).unwrap();
            assert_eq!(out, apache(&value, &schema), "{text}");
        }
    }

    #[test]
    fn longs_are_zigzag_varints() {
        for (n, expected) in [
            (0i64, vec![0u8]),
            (-1, vec![1]),
            (1, vec![2]),
            (-64, vec![0x7f]),
            (64, vec![0x80, 0x01]),
            (
                i64::MAX,
                vec![0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
            (
                i64::MIN,
                vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ] {
            let mut out = Vec::new();
            long(n, &mut out);
            assert_eq!(out, expected, "{n}");
            let apache = apache_avro::writer::datum::GenericDatumWriter::builder(&Schema::Long)
                .build()
                .unwrap()
                .write_value_to_vec(Value::Long(n))
                .unwrap();
            assert_eq!(out, apache, "{n}");
        }
    }
}
