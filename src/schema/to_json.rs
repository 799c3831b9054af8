//! Avro → JSON, the inverse of [`super::json_to_avro`]: what a handler receives as an
//! event's decoded `data`. Unions become their plain value, logical types their readable form
//! (RFC 3339 timestamps, `YYYY-MM-DD` dates, UUID strings, decimals as strings).

use apache_avro::{Schema, schema::DecimalSchema, types::Value};
use chrono::{DateTime, NaiveDate, NaiveTime};
use serde_json::{Map, Value as Json, json};

use super::SchemaVersion;

/// Converts a value decoded with `version`'s schema into JSON.
pub fn avro_to_json(version: &SchemaVersion, value: &Value) -> Json {
    convert(version, &version.schema, value)
}

fn convert(version: &SchemaVersion, schema: &Schema, value: &Value) -> Json {
    let schema = match schema {
        Schema::Ref { name } => version.names.get(&name.fullname(None)).unwrap_or(schema),
        other => other,
    };
    match (schema, value) {
        (_, Value::Null) => Json::Null,
        (_, Value::Boolean(b)) => json!(b),
        (_, Value::Int(n)) => json!(n),
        (_, Value::Long(n)) => json!(n),
        (_, Value::Float(f)) => {
            serde_json::Number::from_f64(f64::from(*f)).map_or(Json::Null, Json::Number)
        }
        (_, Value::Double(f)) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        (_, Value::Bytes(b)) | (_, Value::Fixed(_, b)) => {
            Json::String(b.iter().map(|&c| c as char).collect())
        }
        (_, Value::String(s)) => Json::String(s.clone()),
        (_, Value::Enum(_, symbol)) => Json::String(symbol.clone()),
        (Schema::Union(union), Value::Union(i, inner)) => match union.variants().get(*i as usize) {
            Some(branch) => convert(version, branch, inner),
            None => Json::Null,
        },
        (_, Value::Union(_, inner)) => convert(version, schema, inner),
        (Schema::Array(array), Value::Array(items)) => Json::Array(
            items
                .iter()
                .map(|v| convert(version, &array.items, v))
                .collect(),
        ),
        (Schema::Map(map), Value::Map(entries)) => Json::Object(
            entries
                .iter()
                .map(|(k, v)| (k.clone(), convert(version, &map.types, v)))
                .collect::<Map<_, _>>(),
        ),
        (Schema::Record(record), Value::Record(fields)) => Json::Object(
            fields
                .iter()
                .map(|(name, v)| {
                    let field_schema = record
                        .lookup
                        .get(name)
                        .map(|&i| &record.fields[i].schema)
                        .unwrap_or(&Schema::Null);
                    (name.clone(), convert(version, field_schema, v))
                })
                .collect::<Map<_, _>>(),
        ),
        (_, Value::Date(days)) => date(*days),
        (_, Value::TimeMillis(ms)) => time_of_day(i64::from(*ms) * 1_000_000, "%H:%M:%S%.3f"),
        (_, Value::TimeMicros(us)) => time_of_day(us.saturating_mul(1000), "%H:%M:%S%.6f"),
        (_, Value::TimestampMillis(ms)) => DateTime::from_timestamp_millis(*ms)
            .map_or(json!(ms), |t| json!(crate::envelope::format_time(&t))),
        (_, Value::TimestampMicros(us)) => {
            DateTime::from_timestamp_micros(*us).map_or(json!(us), |t| json!(t.to_rfc3339()))
        }
        (_, Value::TimestampNanos(ns)) => json!(DateTime::from_timestamp_nanos(*ns).to_rfc3339()),
        (_, Value::LocalTimestampMillis(ms)) => DateTime::from_timestamp_millis(*ms)
            .map_or(json!(ms), |t| {
                json!(t.naive_utc().format(LOCAL).to_string())
            }),
        (_, Value::LocalTimestampMicros(us)) => DateTime::from_timestamp_micros(*us)
            .map_or(json!(us), |t| {
                json!(t.naive_utc().format(LOCAL).to_string())
            }),
        (_, Value::LocalTimestampNanos(ns)) => {
            json!(
                DateTime::from_timestamp_nanos(*ns)
                    .naive_utc()
                    .format(LOCAL)
                    .to_string()
            )
        }
        (_, Value::Uuid(u)) => json!(u.to_string()),
        (Schema::Decimal(d), Value::Decimal(value)) => decimal(d, value),
        (_, Value::Decimal(_)) | (_, Value::BigDecimal(_)) => Json::Null,
        (_, Value::Duration(d)) => json!({
            "months": u32::from(d.months()), "days": u32::from(d.days()), "millis": u32::from(d.millis())
        }),
        (_, Value::Array(items)) => Json::Array(
            items
                .iter()
                .map(|v| convert(version, &Schema::Null, v))
                .collect(),
        ),
        (_, Value::Map(_)) | (_, Value::Record(_)) => Json::Null,
    }
}

/// A local date-time as the converter reads it back (`T` between date and time).
pub(super) const LOCAL: &str = "%Y-%m-%dT%H:%M:%S%.f";

/// A `date` (days since 1970-01-01) as `YYYY-MM-DD`, or the number beyond chrono's range.
pub(super) fn date(days: i32) -> Json {
    NaiveDate::default()
        .checked_add_signed(chrono::Duration::days(i64::from(days)))
        .map_or(json!(days), |d| json!(d.format("%Y-%m-%d").to_string()))
}

/// A time of day, or the number of nanoseconds when it is not one.
pub(super) fn time_of_day(nanos: i64, format: &str) -> Json {
    let secs = u32::try_from(nanos.div_euclid(1_000_000_000)).ok();
    let sub = nanos.rem_euclid(1_000_000_000) as u32;
    secs.and_then(|secs| NaiveTime::from_num_seconds_from_midnight_opt(secs, sub))
        .map_or(json!(nanos), |t| json!(t.format(format).to_string()))
}

fn decimal(schema: &DecimalSchema, decimal: &apache_avro::Decimal) -> Json {
    match <Vec<u8>>::try_from(decimal) {
        Ok(bytes) => decimal_string(schema.scale, &bytes),
        Err(_) => Json::Null,
    }
}

/// A decimal's two's complement bytes as a decimal string with `scale` digits after the
/// point. No bytes is null: an empty decimal cannot be turned into bytes again.
pub(super) fn decimal_string(scale: usize, bytes: &[u8]) -> Json {
    if bytes.is_empty() {
        return Json::Null;
    }
    let unscaled = num_bigint::BigInt::from_signed_bytes_be(bytes);
    let negative = unscaled.sign() == num_bigint::Sign::Minus;
    let digits = unscaled.magnitude().to_string();
    let text = if scale == 0 {
        digits
    } else {
        let padded = format!("{digits:0>width$}", width = scale + 1);
        let (int, frac) = padded.split_at(padded.len() - scale);
        format!("{int}.{frac}")
    };
    json!(if negative { format!("-{text}") } else { text })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::json_to_avro;

    #[test]
    fn json_survives_the_round_trip_through_avro() {
        let schema = r#"{"type":"record","name":"R","fields":[
            {"name":"id","type":{"type":"string","logicalType":"uuid"}},
            {"name":"at","type":{"type":"long","logicalType":"timestamp-millis"}},
            {"name":"day","type":{"type":"int","logicalType":"date"}},
            {"name":"price","type":{"type":"bytes","logicalType":"decimal","precision":9,"scale":2}},
            {"name":"maybe","type":["null","string"]},
            {"name":"tags","type":{"type":"array","items":"string"}},
            {"name":"attrs","type":{"type":"map","values":"int"}},
            {"name":"inner","type":{"type":"record","name":"I","fields":[{"name":"x","type":"int"}]}},
            {"name":"again","type":["null","I"]}
        ]}"#;
        let version = SchemaVersion::parse("t.r", 1, schema).unwrap();
        let data = json!({
            "id": "0192f6a2-7c3e-7a1b-9c2d-3e4f5a6b7c8d", "at": "2026-11-21T10:30:00.000Z",
            "day": "2026-11-21", "price": "-12.30", "maybe": "x", "tags": ["a"],
            "attrs": {"k": 1}, "inner": {"x": 2}, "again": {"x": 3}
        });
        let avro = json_to_avro(&version, &data, "data").unwrap();
        assert_eq!(avro_to_json(&version, &avro), data);
    }
}
