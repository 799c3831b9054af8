//! The event envelope of CONTRACT.md §1: what a producer sends for one event.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value as Json};
use uuid::Uuid;

use crate::schema::Violation;

/// Longest accepted idempotency key, in characters.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Longest accepted event type, source and metadata entry, in characters.
const MAX_NAME: usize = 256;

/// A checked envelope; `data` is not yet validated against its schema.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Dotted lowercase event type; its first segment is the domain.
    pub event_type: String,
    /// Requested schema major version; `None` means the latest.
    pub event_version: Option<u32>,
    /// Who emits it.
    pub source: String,
    /// The payload, validated against `schemas/<event_type>/v<N>.avsc` later.
    pub data: Json,
    /// The event's id (UUIDv7 when the producer gave none).
    pub event_id: Uuid,
    /// When it happened; becomes the Kafka record's CreateTime.
    pub timestamp: DateTime<Utc>,
    /// Events with the same key keep their order; `None` means the event id.
    pub partition_key: Option<String>,
    /// The producer's idempotency key, if given in the body.
    pub idempotency_key: Option<String>,
    /// Consumers drop the event once `timestamp + ttl_ms` has passed.
    pub ttl_ms: Option<u64>,
    /// Free string map; `correlation_id` and `causation_id` have a meaning.
    pub metadata: BTreeMap<String, String>,
}

impl Envelope {
    /// Checks one envelope. `root` prefixes error paths (`""` or `[3]` in a batch).
    pub fn parse(json: Json, root: &str) -> Result<Envelope, Vec<Violation>> {
        let mut errors = Vec::new();
        let path = |field: &str| {
            if root.is_empty() {
                field.to_string()
            } else {
                format!("{root}.{field}")
            }
        };
        let mut fail = |field: &str, message: String| {
            errors.push(Violation {
                path: path(field),
                message,
            })
        };
        let Json::Object(mut object) = json else {
            let root = if root.is_empty() { "$" } else { root };
            return Err(vec![Violation {
                path: root.to_string(),
                message: "an envelope must be a JSON object".into(),
            }]);
        };

        let event_type = match take_string(&mut object, "event_type") {
            Ok(Some(t)) if valid_event_type(&t) => Some(t),
            Ok(Some(t)) => {
                fail(
                    "event_type",
                    format!(
                        "{t:?} is not a dotted lowercase name like agent.created (at most {MAX_NAME} characters)"
                    ),
                );
                None
            }
            Ok(None) => {
                fail("event_type", "required".into());
                None
            }
            Err(m) => {
                fail("event_type", m);
                None
            }
        };
        let event_version = match object.remove("event_version") {
            None | Some(Json::Null) => None,
            Some(v) => match parse_version(&v) {
                Some(n) => Some(n),
                None => {
                    fail(
                        "event_version",
                        format!("{v} is not a major version: an integer ≥ 1, \"1\" or \"1.0\""),
                    );
                    None
                }
            },
        };
        let source = match take_string(&mut object, "source") {
            Ok(Some(s)) if !s.trim().is_empty() && s.chars().count() <= MAX_NAME => Some(s),
            Ok(Some(_)) => {
                fail(
                    "source",
                    format!("must be 1 to {MAX_NAME} characters, not blank"),
                );
                None
            }
            Ok(None) => {
                fail("source", "required".into());
                None
            }
            Err(m) => {
                fail("source", m);
                None
            }
        };
        let data = object.remove("data");
        if data.is_none() {
            fail("data", "required".into());
        }
        let event_id = match take_string(&mut object, "event_id") {
            Ok(None) => Some(Uuid::now_v7()),
            Ok(Some(s)) => match Uuid::parse_str(&s) {
                Ok(id) => Some(id),
                Err(e) => {
                    fail("event_id", format!("not a UUID: {e}"));
                    None
                }
            },
            Err(m) => {
                fail("event_id", m);
                None
            }
        };
        let timestamp = match take_string(&mut object, "timestamp") {
            Ok(None) => Some(Utc::now()),
            Ok(Some(s)) => match DateTime::parse_from_rfc3339(&s) {
                Ok(t) if t.timestamp_millis() >= 0 => Some(t.to_utc()),
                Ok(_) => {
                    fail(
                        "timestamp",
                        "must not be before 1970-01-01 (Kafka timestamps)".into(),
                    );
                    None
                }
                Err(e) => {
                    fail("timestamp", format!("not an RFC 3339 timestamp: {e}"));
                    None
                }
            },
            Err(m) => {
                fail("timestamp", m);
                None
            }
        };
        let partition_key = match take_string(&mut object, "partition_key") {
            Ok(Some(k)) if k.is_empty() => {
                fail("partition_key", "must not be empty".into());
                None
            }
            Ok(k) => k,
            Err(m) => {
                fail("partition_key", m);
                None
            }
        };
        let idempotency_key = match take_string(&mut object, "idempotency_key") {
            Ok(Some(k)) => match check_idempotency_key(&k) {
                Ok(()) => Some(k),
                Err(m) => {
                    fail("idempotency_key", m);
                    None
                }
            },
            Ok(None) => None,
            Err(m) => {
                fail("idempotency_key", m);
                None
            }
        };
        let ttl_ms = match object.remove("ttl_ms") {
            None | Some(Json::Null) => None,
            Some(v) => match v.as_u64().filter(|n| *n >= 1) {
                Some(n) => Some(n),
                None => {
                    fail(
                        "ttl_ms",
                        format!("{v} is not a positive integer of milliseconds"),
                    );
                    None
                }
            },
        };
        let mut metadata = BTreeMap::new();
        match object.remove("metadata") {
            None | Some(Json::Null) => {}
            Some(Json::Object(map)) => {
                for (key, value) in map {
                    match value {
                        Json::String(s) if !key.is_empty() && key.chars().count() <= MAX_NAME => {
                            metadata.insert(key, s);
                        }
                        Json::String(_) => fail(
                            &format!("metadata.{key}"),
                            format!("keys must be 1 to {MAX_NAME} characters"),
                        ),
                        other => fail(
                            &format!("metadata.{key}"),
                            format!("metadata values are strings, got {other}"),
                        ),
                    }
                }
            }
            Some(other) => fail(
                "metadata",
                format!("must be an object of strings, got {other}"),
            ),
        }
        for key in object.keys() {
            fail(key, "unknown envelope field".into());
        }

        match (event_type, source, data, event_id, timestamp) {
            (Some(event_type), Some(source), Some(data), Some(event_id), Some(timestamp))
                if errors.is_empty() =>
            {
                Ok(Envelope {
                    event_type,
                    event_version,
                    source,
                    data,
                    event_id,
                    timestamp,
                    partition_key,
                    idempotency_key,
                    ttl_ms,
                    metadata,
                })
            }
            _ => Err(errors),
        }
    }

    /// The Kafka record key: `partition_key`, or else `idempotency_key` (the request's own
    /// key, which itself defaults to the event id). A client that retries a publish with the
    /// same idempotency key through another instance gets a new generated event id there,
    /// but the same record key: both copies land on one partition, where the consumers'
    /// dedup, keyed by `ce_idempotencykey`, handles the event once.
    pub fn key(&self, idempotency_key: &str) -> String {
        self.partition_key
            .clone()
            .unwrap_or_else(|| idempotency_key.to_string())
    }

    /// When consumers must drop it, if it expires.
    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        let ttl = chrono::Duration::milliseconds(i64::try_from(self.ttl_ms?).ok()?);
        self.timestamp.checked_add_signed(ttl)
    }
}

/// RFC 3339 with milliseconds, in UTC: the form of `ce_time` and `ce_expiresat`.
pub fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$`, at most 256 characters.
pub fn valid_event_type(name: &str) -> bool {
    let mut segments = 0;
    for segment in name.split('.') {
        let mut chars = segment.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
        if !first_ok || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            return false;
        }
        segments += 1;
    }
    segments >= 2 && name.len() <= MAX_NAME
}

/// An idempotency key is 1 to 256 characters without control characters.
pub fn check_idempotency_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.chars().count() > MAX_IDEMPOTENCY_KEY {
        return Err(format!("must be 1 to {MAX_IDEMPOTENCY_KEY} characters"));
    }
    if key.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

fn take_string(object: &mut Map<String, Json>, field: &str) -> Result<Option<String>, String> {
    match object.remove(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("must be a string, got {other}")),
    }
}

/// `1`, `"1"`, `"1.0"` and `1.0` are all major version 1.
fn parse_version(v: &Json) -> Option<u32> {
    let n = match v {
        Json::Number(n) => match n.as_u64() {
            Some(n) => n,
            None => {
                let f = n.as_f64()?;
                if f.fract() != 0.0 || !(1.0..=u32::MAX as f64).contains(&f) {
                    return None;
                }
                f as u64
            }
        },
        Json::String(s) => {
            let (major, minor) = s.split_once('.').unwrap_or((s, "0"));
            if minor.is_empty() || !minor.chars().all(|c| c == '0') {
                return None;
            }
            if major.is_empty() || !major.chars().all(|c| c.is_ascii_digit()) {
                return None;
            }
            major.parse().ok()?
        }
        _ => return None,
    };
    u32::try_from(n).ok().filter(|n| *n >= 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn event_type_names_follow_the_contract_pattern() {
        for ok in ["agent.created", "agent.task.requested", "a1.b_2"] {
            assert!(valid_event_type(ok), "{ok}");
        }
        for bad in [
            "agent",
            "Agent.created",
            "agent..created",
            "agent.",
            ".a",
            "1a.b",
            "a.B",
            "a-b.c",
            "",
        ] {
            assert!(!valid_event_type(bad), "{bad}");
        }
    }

    #[test]
    fn versions_are_accepted_as_numbers_and_strings() {
        assert_eq!(parse_version(&json!(1)), Some(1));
        assert_eq!(parse_version(&json!("2")), Some(2));
        assert_eq!(parse_version(&json!("1.0")), Some(1));
        assert_eq!(parse_version(&json!(3.0)), Some(3));
        for bad in [
            json!(0),
            json!(-1),
            json!("1.5"),
            json!(1.5),
            json!("x"),
            json!(""),
            json!("1."),
            json!(true),
        ] {
            assert_eq!(parse_version(&bad), None, "{bad}");
        }
    }

    #[test]
    fn a_minimal_envelope_gets_an_id_a_timestamp_and_defaults() {
        let e = Envelope::parse(
            json!({"event_type":"agent.created","source":"s","data":{}}),
            "",
        )
        .unwrap();
        assert_eq!(e.event_id.get_version_num(), 7);
        let id = e.event_id.to_string();
        assert_eq!(e.key(&id), id);
        assert_eq!(e.key("req-1"), "req-1");
        assert!(e.event_version.is_none());
    }

    #[test]
    fn every_bad_field_is_reported_with_its_path() {
        let errors = Envelope::parse(
            json!({"event_type":"Bad","data":{},"event_id":"x","timestamp":"yesterday","ttl_ms":-5,"extra":1,"metadata":{"a":1}}),
            "[2]",
        )
        .unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        for p in [
            "[2].event_type",
            "[2].source",
            "[2].event_id",
            "[2].timestamp",
            "[2].ttl_ms",
            "[2].extra",
            "[2].metadata.a",
        ] {
            assert!(paths.contains(&p), "{p} missing from {paths:?}");
        }
    }

    #[test]
    fn idempotency_keys_are_bounded() {
        assert!(check_idempotency_key("req_abc").is_ok());
        assert!(check_idempotency_key("").is_err());
        assert!(check_idempotency_key(&"k".repeat(257)).is_err());
        assert!(check_idempotency_key("a\nb").is_err());
    }
}
