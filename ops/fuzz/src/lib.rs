//! The hostile-input properties of agentbus, shared by the `cargo fuzz` targets of this crate
//! (`ops/fuzz/fuzz_targets/`) and the proptest tests of `tests/fuzz.rs` (which includes this
//! file as a module). Each `check_*` function panics when a property does not hold, which both
//! libFuzzer and proptest report with the input.
//!
//! The properties:
//! - envelope: `Envelope::parse` never panics; what it accepts satisfies the contract's
//!   checks, what it refuses comes with at least one violation under the given root; an
//!   accepted envelope of a known type goes on through the JSON → Avro property below.
//! - JSON → Avro: `json_to_avro` never panics; a value it accepts encodes (an encode error would
//!   be a 500), decodes back to the same value, and its JSON rendering (`avro_to_json`, what
//!   handlers receive) converts back to the same value; refusals name a path under `data`.
//! - Avro decoding: `split_wire` and `decode_avro` never panic on arbitrary bytes; a value
//!   they decode is a value of the schema and renders as JSON.
//! - agent definitions: `definition::parse` never panics; an accepted definition satisfies its
//!   documented limits, and computing its retry backoffs and building its integration
//!   services does not panic.
//!
//! Depends only on agentbus and crates agentbus itself depends on (serde_json, apache-avro,
//! chrono), so that it compiles both inside the fuzz crate and as a module of the main
//! package's integration tests.

#![allow(dead_code)]

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use agentbus::{
    consume::definition::{self, HandlerConfig},
    envelope::{Envelope, check_idempotency_key, format_time, valid_event_type},
    schema::{
        Registry, SchemaVersion, Violation, avro_to_json, decode_avro, encode_wire, json_to_avro,
        split_wire,
    },
};
use apache_avro::types::Value;
use serde_json::{Value as Json, json};

/// A schema beside the sample ones that uses the kinds of Avro type `json_to_avro` claims to
/// handle (the sample schemas only use records, arrays, maps, unions, uuid and
/// timestamp-millis), so that the fuzzers also reach the logical types.
pub const RICH_SCHEMA: &str = r#"{
  "type": "record", "name": "Rich", "namespace": "fuzz",
  "fields": [
    {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
    {"name": "n", "type": "int"},
    {"name": "big", "type": "long", "default": 5},
    {"name": "ratio", "type": "double"},
    {"name": "f", "type": "float", "default": 1.5},
    {"name": "ok", "type": "boolean"},
    {"name": "raw", "type": "bytes", "default": ""},
    {"name": "tags", "type": {"type": "array", "items": "string"}, "default": []},
    {"name": "attrs", "type": {"type": "map", "values": ["null", "long", "string"]}, "default": {}},
    {"name": "color", "type": {"type": "enum", "name": "Color", "symbols": ["red", "green"]}},
    {"name": "maybe", "type": ["null", "string"]},
    {"name": "either", "type": ["null", "int", "string", "Color"], "default": null},
    {"name": "inner", "type": {"type": "record", "name": "Inner", "fields": [
        {"name": "x", "type": "int"},
        {"name": "next", "type": ["null", "Inner"], "default": null}
    ]}},
    {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "at_us", "type": {"type": "long", "logicalType": "timestamp-micros"}, "default": 0},
    {"name": "at_ns", "type": {"type": "long", "logicalType": "timestamp-nanos"}, "default": 0},
    {"name": "local_ms", "type": {"type": "long", "logicalType": "local-timestamp-millis"}, "default": 0},
    {"name": "local_us", "type": {"type": "long", "logicalType": "local-timestamp-micros"}, "default": 0},
    {"name": "local_ns", "type": {"type": "long", "logicalType": "local-timestamp-nanos"}, "default": 0},
    {"name": "day", "type": {"type": "int", "logicalType": "date"}, "default": 0},
    {"name": "tod", "type": {"type": "int", "logicalType": "time-millis"}, "default": 0},
    {"name": "tod_us", "type": {"type": "long", "logicalType": "time-micros"}, "default": 0},
    {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}, "default": "\u0000"},
    {"name": "amount", "type": {"type": "fixed", "name": "Amount", "size": 4, "logicalType": "decimal", "precision": 8, "scale": 3}, "default": "\u0000\u0000\u0000\u0000"},
    {"name": "wide", "type": {"type": "fixed", "name": "Wide", "size": 20, "logicalType": "decimal", "precision": 38, "scale": 0}, "default": "\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000"},
    {"name": "mac", "type": {"type": "fixed", "name": "Mac", "size": 2}, "default": "\u0000\u0000"},
    {"name": "span", "type": {"type": "fixed", "name": "Span", "size": 12, "logicalType": "duration"}},
    {"name": "grid", "type": {"type": "array", "items": {"type": "array", "items": ["null", "double"]}}, "default": []},
    {"name": "same", "type": "Color", "default": "green"}
  ]
}"#;

/// The schemas every property runs against: every version in `schemas/`, then the rich one.
pub struct Fixture {
    /// The sample registry.
    pub registry: Registry,
    /// Every version of every type, in name and version order, then [`RICH_SCHEMA`].
    pub versions: Vec<Arc<SchemaVersion>>,
}

/// The repository's `schemas/` directory, from the fuzz crate (`ops/fuzz`) or the main
/// package (the repository root); `AGENTBUS_SCHEMAS_DIR` wins.
fn schemas_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("AGENTBUS_SCHEMAS_DIR") {
        return PathBuf::from(dir);
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    [here.join("schemas"), here.join("../../schemas")]
        .into_iter()
        .find(|d| d.is_dir())
        .expect("the repository's schemas/ directory")
}

/// Loads the registry once per process.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let registry = Registry::load(&schemas_dir()).expect("the sample schemas load");
        let mut versions: Vec<Arc<SchemaVersion>> = registry
            .event_types()
            .flat_map(|t| t.versions.values().cloned())
            .collect();
        versions.push(Arc::new(
            SchemaVersion::parse("fuzz.rich", 1, RICH_SCHEMA).expect("the rich schema parses"),
        ));
        Fixture { registry, versions }
    })
}

/// The version a selector byte picks.
pub fn pick(selector: u8) -> &'static Arc<SchemaVersion> {
    let versions = &fixture().versions;
    &versions[usize::from(selector) % versions.len()]
}

// ---------------------------------------------------------------------------------------
// Envelope

/// Arbitrary bytes: when they are JSON, the envelope property.
pub fn check_envelope_bytes(data: &[u8]) {
    if let Ok(json) = serde_json::from_slice::<Json>(data) {
        check_envelope(&json);
    }
}

/// `Envelope::parse` on one JSON value, at the top level and as item 7 of a batch.
pub fn check_envelope(json: &Json) {
    for root in ["", "[7]"] {
        match Envelope::parse(json.clone(), root) {
            Ok(envelope) => {
                check_accepted_envelope(&envelope);
                // What the publish handler does next: validate `data` against the schema.
                let registry = &fixture().registry;
                if let Some(t) = registry.event_type(&envelope.event_type) {
                    let version = match envelope.event_version {
                        Some(n) => t.versions.get(&n),
                        None => Some(t.latest()),
                    };
                    if let Some(version) = version {
                        check_convert(version, &envelope.data);
                    }
                }
            }
            Err(violations) => {
                assert!(
                    !violations.is_empty(),
                    "an envelope was refused without a reason: {json}"
                );
                check_violation_paths(&violations, root, json);
            }
        }
    }
}

fn check_accepted_envelope(e: &Envelope) {
    assert!(
        valid_event_type(&e.event_type),
        "accepted event type {:?}",
        e.event_type
    );
    assert!(
        !e.source.trim().is_empty() && e.source.chars().count() <= 256,
        "accepted source {:?}",
        e.source
    );
    assert!(e.event_version.is_none_or(|v| v >= 1), "accepted version 0");
    if let Some(k) = &e.partition_key {
        assert!(!k.is_empty(), "accepted an empty partition key");
    }
    assert!(
        !e.key(&e.event_id.to_string()).is_empty(),
        "empty record key"
    );
    if let Some(k) = &e.idempotency_key {
        assert!(
            check_idempotency_key(k).is_ok(),
            "accepted idempotency key {k:?}"
        );
    }
    assert!(e.ttl_ms.is_none_or(|t| t >= 1), "accepted ttl_ms 0");
    assert!(
        e.timestamp.timestamp_millis() >= 0,
        "accepted a pre-1970 timestamp"
    );
    // What the producer writes as headers: ce_time and ce_expiresat.
    let ce_time = format_time(&e.timestamp);
    assert!(
        chrono::DateTime::parse_from_rfc3339(&ce_time).is_ok(),
        "ce_time {ce_time:?} is not RFC 3339"
    );
    if let Some(at) = e.expires_at() {
        let _ = format_time(&at);
    }
    for k in e.metadata.keys() {
        assert!(!k.is_empty(), "accepted an empty metadata key");
    }
}

fn check_violation_paths(violations: &[Violation], root: &str, input: &Json) {
    for v in violations {
        assert!(
            !v.message.is_empty(),
            "violation without a message at {:?} for {input}",
            v.path
        );
        if !root.is_empty() {
            assert!(
                v.path.starts_with(root),
                "violation path {:?} is not under {root:?} for {input}",
                v.path
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// JSON → Avro

/// Arbitrary bytes: the first picks a schema, the rest, when it is JSON, is the event's data.
pub fn check_convert_bytes(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if let Ok(json) = serde_json::from_slice::<Json>(rest) {
        check_convert(pick(selector), &json);
    }
}

/// `json_to_avro` on one value, and what follows in publishing and consuming it.
pub fn check_convert(version: &SchemaVersion, json: &Json) {
    let what = || format!("{} v{}, data {json}", version.event_type, version.version);
    match json_to_avro(version, json, "data") {
        Ok(avro) => {
            // encode_wire does not validate again: json_to_avro's output must be of the schema.
            assert!(
                avro.validate(&version.schema),
                "json_to_avro returned a value that is not of the schema: {avro:?}; {}",
                what()
            );
            let wire = encode_wire(version, &avro).unwrap_or_else(|e| {
                panic!("accepted data fails to encode (a 500): {e}; {}", what())
            });
            let (id, body) = split_wire(&wire).expect("our own wire format splits");
            assert_eq!(id, version.id, "schema id in the wire format; {}", what());
            let decoded = decode_avro(&version.schema, body)
                .unwrap_or_else(|e| panic!("accepted data does not decode: {e}; {}", what()));
            if let Some(d) = difference(&avro, &decoded, "data") {
                panic!("decoding changed the value: {d}; {}", what());
            }
            // A handler receives `avro_to_json`; sending that back must mean the same event.
            let rendered = avro_to_json(version, &decoded);
            match json_to_avro(version, &rendered, "data") {
                Ok(again) => {
                    if let Some(d) = difference(&avro, &again, "data") {
                        panic!(
                            "avro_to_json's rendering converts back to another value: {d}; {}",
                            what()
                        );
                    }
                }
                Err(v) => {
                    let at: Vec<String> = v
                        .iter()
                        .map(|v| {
                            let shown = json_at(&rendered, &v.path).unwrap_or(Json::Null);
                            format!("{} rendered as {shown}: {}", v.path, v.message)
                        })
                        .collect();
                    panic!(
                        "json_to_avro refuses avro_to_json's rendering: {}; {}",
                        at.join("; "),
                        what()
                    );
                }
            }
        }
        Err(violations) => {
            assert!(
                !violations.is_empty(),
                "data refused without a reason; {}",
                what()
            );
            assert!(
                violations.len() <= 20,
                "more than 20 violations; {}",
                what()
            );
            check_violation_paths(&violations, "data", json);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Avro decoding

/// Arbitrary bytes: the first picks a schema, the rest is a Kafka record value (Confluent
/// wire format) and, separately, a bare Avro body.
pub fn check_decode_bytes(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let version = pick(selector);
    if let Ok((_id, body)) = split_wire(rest) {
        check_decode(version, body);
    }
    check_decode(version, rest);
}

/// `decode_avro` on one body: what it decodes must be a value of the schema, and render as
/// JSON (what the consumer hands to handlers).
pub fn check_decode(version: &SchemaVersion, body: &[u8]) {
    let Ok(value) = decode_avro(&version.schema, body) else {
        return;
    };
    // The consumer trusts a decoded value from here on.
    assert!(
        value.validate(&version.schema),
        "decode_avro returned a value that is not of the schema; {} v{}, body {body:02x?}, \
         decoded {value:?}",
        version.event_type,
        version.version
    );
    let rendered = avro_to_json(version, &value);
    serde_json::to_string(&rendered).expect("rendered JSON serializes");
}

/// Where two Avro values first differ, as `path: left != right`.
pub fn difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Record(x), Value::Record(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .find_map(|((n, x), (_, y))| difference(x, y, &format!("{path}.{n}"))),
        (Value::Union(i, x), Value::Union(j, y)) if i == j => difference(x, y, path),
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (x, y))| difference(x, y, &format!("{path}[{i}]"))),
        (Value::Map(x), Value::Map(y)) if x.len() == y.len() => {
            x.iter().find_map(|(k, x)| match y.get(k) {
                Some(y) => difference(x, y, &format!("{path}[{k:?}]")),
                None => Some(format!("{path}[{k:?}] missing")),
            })
        }
        (Value::Float(x), Value::Float(y)) if x.to_bits() == y.to_bits() => None,
        (Value::Double(x), Value::Double(y)) if x.to_bits() == y.to_bits() => None,
        _ if a == b => None,
        _ => Some(format!("{path}: {a:?} != {b:?}")),
    }
}

/// The value at a violation path such as `data.inner.next.x` or `data.tags[1]` (plain
/// field names and indexes only).
fn json_at(json: &Json, path: &str) -> Option<Json> {
    let mut node = json;
    let rest = path.strip_prefix("data")?;
    for part in rest.split('.').filter(|p| !p.is_empty()) {
        let (name, indexes) = part.split_once('[').unwrap_or((part, ""));
        if !name.is_empty() {
            node = node.get(name)?;
        }
        for index in indexes.split('[').filter(|i| !i.is_empty()) {
            node = node.get(index.trim_end_matches(']').parse::<usize>().ok()?)?;
        }
    }
    Some(node.clone())
}

// ---------------------------------------------------------------------------------------
// Agent definitions

/// Arbitrary bytes: when they are UTF-8, a definition file's text.
pub fn check_definition_bytes(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        check_definition(text);
    }
}

/// `definition::parse` on one text, and what the runtime computes from an accepted one.
pub fn check_definition(text: &str) {
    let file = Path::new("consumers/fuzz.toml");
    match definition::parse(text, file) {
        Ok(agent) => {
            assert!(
                !agent.name.is_empty()
                    && agent.name.len() <= 200
                    && agent.name.chars().all(|c| c.is_ascii_lowercase()
                        || c.is_ascii_digit()
                        || c == '-'
                        || c == '_'),
                "accepted name {:?}",
                agent.name
            );
            assert!(!agent.subscribe.is_empty(), "accepted no subscription");
            assert!(
                (1..=1024).contains(&agent.concurrency),
                "accepted concurrency"
            );
            let r = &agent.retry;
            assert!(r.attempts >= 1, "accepted 0 attempts");
            assert!(
                (0.0..=1.0).contains(&r.jitter),
                "accepted jitter {}",
                r.jitter
            );
            assert!(r.max_backoff >= r.initial_backoff, "accepted max < initial");
            // The delivery loop's waits: every attempt, with jitter units in [-1, 1].
            // The loop waits after attempts 1 to attempts - 1 (the last one fails for good).
            let waits = r.attempts - 1;
            for attempt in (1..=waits.min(70)).chain((waits > 70).then_some(waits)) {
                for unit in [-1.0, -0.5, 0.0, 0.5, 1.0] {
                    let wait = r.backoff(attempt, unit);
                    let cap = r.max_backoff.as_secs_f64() * (1.0 + r.jitter) * (1.0 + 1e-9);
                    assert!(
                        wait.as_secs_f64() <= cap + 1e-6,
                        "backoff({attempt}, {unit}) = {wait:?} above max_backoff {:?} with jitter {}",
                        r.max_backoff,
                        r.jitter
                    );
                }
            }
            for event_type in ["agent.created", "agent.task.requested", "x.y"] {
                let _ = agent.subscribes_to(event_type);
            }
            let _ = (
                agent.retry_topic("p."),
                agent.dlq_topic(""),
                agent.replay_topic(""),
            );
            if let HandlerConfig::Integration { services } = &agent.handler {
                // What `agentbus serve` builds at start-up (an unset auth_env is an error).
                let _ = agentbus::handlers::integration::Integrations::new(services);
            }
        }
        Err(e) => {
            assert_eq!(e.path, file.display().to_string(), "error names the file");
            assert!(!e.reason.is_empty(), "error without a reason");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Valid examples: the starting points of the structured generators and of the fuzz seeds.

/// A valid JSON value of `version`'s schema, as a producer would send it.
pub fn example(version: &SchemaVersion) -> Json {
    // Built from the schema's JSON text, which needs no access to apache-avro's types.
    let schema: Json = serde_json::from_str(&version.text).expect("schema text is JSON");
    let mut names = HashMap::new();
    collect_json_names(&schema, None, &mut names);
    example_of(&schema, None, &names, 0)
}

fn fullname(name: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) if !name.contains('.') && !ns.is_empty() => format!("{ns}.{name}"),
        _ => name.to_string(),
    }
}

fn collect_json_names(schema: &Json, namespace: Option<&str>, names: &mut HashMap<String, Json>) {
    match schema {
        Json::Array(branches) => {
            for b in branches {
                collect_json_names(b, namespace, names);
            }
        }
        Json::Object(o) => {
            let ns = o.get("namespace").and_then(Json::as_str).or(namespace);
            if let Some(name) = o.get("name").and_then(Json::as_str)
                && matches!(
                    o.get("type").and_then(Json::as_str),
                    Some("record" | "enum" | "fixed")
                )
            {
                let full = fullname(name, ns);
                let inner_ns = full.rsplit_once('.').map(|(ns, _)| ns.to_string());
                names.insert(full.clone(), schema.clone());
                names.insert(name.to_string(), schema.clone());
                if let Some(Json::Array(fields)) = o.get("fields") {
                    for f in fields {
                        if let Some(t) = f.get("type") {
                            collect_json_names(t, inner_ns.as_deref(), names);
                        }
                    }
                }
                return;
            }
            for key in ["items", "values", "type"] {
                if let Some(inner) = o.get(key)
                    && !inner.is_string()
                {
                    collect_json_names(inner, ns, names);
                }
            }
        }
        _ => {}
    }
}

fn example_of(schema: &Json, ns: Option<&str>, names: &HashMap<String, Json>, depth: u32) -> Json {
    match schema {
        Json::String(t) => match t.as_str() {
            "null" => Json::Null,
            "boolean" => json!(true),
            "int" | "long" => json!(7),
            "float" | "double" => json!(1.5),
            "bytes" => json!("ab"),
            "string" => json!("text"),
            name => match names.get(&fullname(name, ns)).or_else(|| names.get(name)) {
                Some(named) => example_of(named, ns, names, depth + 1),
                None => Json::Null,
            },
        },
        Json::Array(branches) => {
            // A union: its first non-null branch, or null once deep in a recursive type.
            let non_null = branches.iter().find(|b| b.as_str() != Some("null"));
            match non_null {
                Some(b) if depth < 4 || !branches.iter().any(|b| b.as_str() == Some("null")) => {
                    example_of(b, ns, names, depth + 1)
                }
                _ => Json::Null,
            }
        }
        Json::Object(o) => {
            let t = o.get("type").and_then(Json::as_str).unwrap_or("");
            match (t, o.get("logicalType").and_then(Json::as_str)) {
                ("string", Some("uuid")) => json!("0192f6a2-7c3e-7a1b-9c2d-3e4f5a6b7c8d"),
                ("long", Some("timestamp-millis" | "timestamp-micros" | "timestamp-nanos")) => {
                    json!("2026-11-21T10:30:00.5Z")
                }
                (
                    "long",
                    Some(
                        "local-timestamp-millis"
                        | "local-timestamp-micros"
                        | "local-timestamp-nanos",
                    ),
                ) => json!("2026-11-21T10:30:00.5"),
                ("int", Some("date")) => json!("2026-11-21"),
                ("int" | "long", Some("time-millis" | "time-micros")) => json!("10:30:00.250"),
                ("bytes" | "fixed", Some("decimal")) => json!("1"),
                ("fixed", Some("duration")) => json!({"months": 1, "days": 2, "millis": 3}),
                ("record" | "error", _) => {
                    let inner_ns = o
                        .get("namespace")
                        .and_then(Json::as_str)
                        .or(ns)
                        .map(str::to_string);
                    let mut out = serde_json::Map::new();
                    for f in o
                        .get("fields")
                        .and_then(Json::as_array)
                        .into_iter()
                        .flatten()
                    {
                        let (Some(name), Some(t)) =
                            (f.get("name").and_then(Json::as_str), f.get("type"))
                        else {
                            continue;
                        };
                        out.insert(
                            name.to_string(),
                            example_of(t, inner_ns.as_deref(), names, depth + 1),
                        );
                    }
                    Json::Object(out)
                }
                ("enum", _) => o
                    .get("symbols")
                    .and_then(|s| s.get(0))
                    .cloned()
                    .unwrap_or(Json::Null),
                ("fixed", _) => {
                    let size = o.get("size").and_then(Json::as_u64).unwrap_or(0) as usize;
                    Json::String("\u{1}".repeat(size))
                }
                ("array", _) => match o.get("items") {
                    Some(items) if depth < 6 => json!([example_of(items, ns, names, depth + 1)]),
                    _ => json!([]),
                },
                ("map", _) => match o.get("values") {
                    Some(values) if depth < 6 => {
                        json!({"key": example_of(values, ns, names, depth + 1)})
                    }
                    _ => json!({}),
                },
                (_, _) => match o.get("type") {
                    Some(inner) => example_of(inner, ns, names, depth),
                    None => Json::Null,
                },
            }
        }
        _ => Json::Null,
    }
}

/// An envelope a producer would send for `version`, with its example data.
pub fn example_envelope(version: &SchemaVersion) -> Json {
    json!({
        "event_type": version.event_type,
        "event_version": version.version,
        "source": "fuzz",
        "partition_key": "k1",
        "idempotency_key": "idem-1",
        "event_id": "0192f6a2-7c3e-7a1b-9c2d-3e4f5a6b7c8d",
        "timestamp": "2026-11-21T10:30:00Z",
        "ttl_ms": 60000,
        "metadata": {"correlation_id": "req_1", "causation_id": "ev_0"},
        "data": example(version),
    })
}

/// The wire-format value of `version`'s example, as agentbus writes it to Kafka.
pub fn example_wire(version: &SchemaVersion) -> Vec<u8> {
    let avro = json_to_avro(version, &example(version), "data")
        .unwrap_or_else(|v| panic!("the example of {} is valid: {v:?}", version.event_type));
    encode_wire(version, &avro).expect("the example encodes")
}

// ---------------------------------------------------------------------------------------
// Mutations: replace, remove or add one node of a JSON value, by a preorder index.

/// One change to a JSON value.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Replace the node at this preorder index with a value.
    Replace(usize, Json),
    /// Remove the node at this index from its object or array.
    Remove(usize),
    /// Add a member (to an object: under this key; to an array: at the end).
    Add(usize, String, Json),
}

/// Applies `mutations` in order.
pub fn mutate(mut json: Json, mutations: &[Mutation]) -> Json {
    for m in mutations {
        let count = count_nodes(&json);
        match m {
            Mutation::Replace(i, v) => {
                let mut n = i % count;
                with_node(&mut json, &mut n, &mut |node| *node = v.clone());
            }
            Mutation::Remove(i) => {
                // Index 0 is the value itself, which cannot be removed.
                if let Some(mut n) = (i % count).checked_sub(1) {
                    remove_nth(&mut json, &mut n);
                }
            }
            Mutation::Add(i, key, v) => {
                let mut n = i % count;
                with_node(&mut json, &mut n, &mut |node| match node {
                    Json::Object(o) => {
                        o.insert(key.clone(), v.clone());
                    }
                    Json::Array(a) => a.push(v.clone()),
                    _ => {}
                });
            }
        }
    }
    json
}

fn count_nodes(json: &Json) -> usize {
    1 + match json {
        Json::Array(a) => a.iter().map(count_nodes).sum(),
        Json::Object(o) => o.values().map(count_nodes).sum(),
        _ => 0,
    }
}

/// Calls `f` on the `n`-th node in preorder; returns whether it was found.
fn with_node(json: &mut Json, n: &mut usize, f: &mut dyn FnMut(&mut Json)) -> bool {
    if *n == 0 {
        f(json);
        return true;
    }
    *n -= 1;
    match json {
        Json::Array(a) => a.iter_mut().any(|c| with_node(c, n, f)),
        Json::Object(o) => o.values_mut().any(|c| with_node(c, n, f)),
        _ => false,
    }
}

/// Removes the `n`-th descendant of `json` in preorder (0 = its first child).
fn remove_nth(json: &mut Json, n: &mut usize) -> bool {
    match json {
        Json::Array(a) => {
            for i in 0..a.len() {
                if *n == 0 {
                    a.remove(i);
                    return true;
                }
                *n -= 1;
                if remove_nth(&mut a[i], n) {
                    return true;
                }
            }
            false
        }
        Json::Object(o) => {
            let keys: Vec<String> = o.keys().cloned().collect();
            for k in keys {
                if *n == 0 {
                    o.remove(&k);
                    return true;
                }
                *n -= 1;
                if remove_nth(o.get_mut(&k).expect("key"), n) {
                    return true;
                }
            }
            false
        }
        _ => false,
    }
}
