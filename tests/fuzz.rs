//! Hostile input, in the test command: the four properties of the `cargo fuzz` targets
//! (envelope parsing, JSON → Avro, Avro decoding, agent definitions; they live in
//! `ops/fuzz/src/lib.rs`, included here) run as proptest tests, with structured generators
//! (valid examples of every schema, then mutated) besides arbitrary bytes, so that a few
//! thousand cases reach deep. The long coverage-guided run is `ops/fuzz.sh` (libFuzzer,
//! 5 minutes a target by default); what it finds comes back here as a regression test with
//! the input inlined (see the end of this file).
//!
//! No broker, no network: the whole file runs in seconds.

#[path = "../ops/fuzz/src/lib.rs"]
mod props;

use agentbus::schema::SchemaVersion;
use props::{
    Mutation, check_convert, check_convert_bytes, check_decode, check_decode_bytes,
    check_definition, check_definition_bytes, check_envelope, check_envelope_bytes, example,
    example_envelope, example_wire, fixture, mutate, pick,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use serde_json::{Value as Json, json};

/// Cases per property; `PROPTEST_CASES` overrides (e.g. 100000 for a long local run). The
/// seed is fixed, so that the test command runs the same cases every time (no flaky CI);
/// `PROPTEST_RNG_SEED=<n>` explores others.
fn config(cases: u32) -> Config {
    let defaults = Config::default();
    Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(cases),
        rng_seed: if std::env::var_os("PROPTEST_RNG_SEED").is_some() {
            defaults.rng_seed
        } else {
            RngSeed::Fixed(0x00a9_e7b0_5f12)
        },
        // Failures are inlined below as regression tests, not persisted beside this file.
        failure_persistence: None,
        ..defaults
    }
}

// ---------------------------------------------------------------------------------------
// Generators

/// Strings that sit on the edges of what the envelope and the schemas accept.
fn edge_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(" ".to_string()),
        Just("agent.created".to_string()),
        Just("agent.task.requested".to_string()),
        Just("Agent.Created".to_string()),
        Just("a.".to_string()),
        Just("0192f6a2-7c3e-7a1b-9c2d-3e4f5a6b7c8d".to_string()),
        Just("0192F6A27C3E7A1B9C2D3E4F5A6B7C8D".to_string()),
        Just("2026-11-21T10:30:00Z".to_string()),
        Just("2026-11-21T10:30:00.123456789+14:00".to_string()),
        Just("1969-12-31T23:59:59.999Z".to_string()),
        Just("9999-12-31T23:59:59.999999999Z".to_string()),
        Just("0000-01-01T00:00:00Z".to_string()),
        Just("2026-11-21T10:30:00".to_string()),
        Just("2026-02-30".to_string()),
        Just("1970-01-01".to_string()),
        Just("-0001-01-01".to_string()),
        Just("262143-12-31".to_string()),
        Just("23:59:60.999".to_string()),
        Just("10:30:00.250".to_string()),
        Just("-12.30".to_string()),
        Just("0.000000000000000000000000000000000000001".to_string()),
        Just("99999999999999999999999999999999999999999".to_string()),
        Just("1e5".to_string()),
        Just("-".to_string()),
        Just(".".to_string()),
        Just("\u{ff}\u{100}".to_string()),
        Just("\u{0}\u{7f}\u{1b}[31m".to_string()),
        Just("red".to_string()),
        Just("green".to_string()),
        Just("null".to_string()),
        Just("x".repeat(257)),
        Just("é".repeat(256)),
        "\\PC{0,16}",
        "[a-z0-9 :.\\-]{0,12}",
    ]
}

/// Numbers on the edges of int, long, float, u32 and u64.
fn edge_number() -> impl Strategy<Value = Json> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(1)),
        Just(json!(i32::MAX)),
        Just(json!(i64::from(i32::MAX) + 1)),
        Just(json!(i32::MIN)),
        Just(json!(u32::MAX)),
        Just(json!(u64::from(u32::MAX) + 1)),
        Just(json!(i64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(u64::MAX)),
        Just(json!(3.0)),
        Just(json!(-0.0)),
        Just(json!(0.5)),
        Just(json!(1e300)),
        Just(json!(-1e300)),
        Just(json!(9.0e15)),
        Just(json!(8.999_999_999_999_998e15)),
        Just(json!(f64::from(f32::MAX) * 2.0)),
        Just(json!(1e-320)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
    ]
}

fn leaf() -> impl Strategy<Value = Json> {
    prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        edge_number(),
        edge_string().prop_map(Json::String),
    ]
}

/// Keys that the envelope and the schemas know, and others.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "event_type", "event_version", "source", "data", "event_id", "timestamp",
            "partition_key", "idempotency_key", "ttl_ms", "metadata", "correlation_id",
            "agent_id", "type", "changes", "steps", "name", "next", "inner", "either", "string",
            "int", "long", "null", "fuzz.Color", "months", "days", "millis", "x",
        ])
        .prop_map(str::to_string),
        1 => edge_string(),
    ]
}

fn arb_json() -> impl Strategy<Value = Json> {
    leaf().prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Json::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Json::Object(m.into_iter().collect())),
        ]
    })
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), arb_json()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        2 => any::<usize>().prop_map(Mutation::Remove),
        1 => (any::<usize>(), key(), arb_json()).prop_map(|(i, k, v)| Mutation::Add(i, k, v)),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 0..4)
}

/// Arbitrary bytes, and JSON text with bytes changed in it.
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..96)
}

fn edit_bytes(mut bytes: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(at, byte, how) in edits {
        if bytes.is_empty() {
            bytes.push(byte);
            continue;
        }
        let at = at % bytes.len();
        match how % 4 {
            0 => bytes[at] = byte,
            1 => bytes.insert(at, byte),
            2 => {
                bytes.remove(at);
            }
            _ => bytes.truncate(at),
        }
    }
    bytes
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..4)
}

// ---------------------------------------------------------------------------------------
// The four properties

proptest! {
    #![proptest_config(config(3000))]

    /// Envelope parsing: mutated valid envelopes of every type (their data then goes through
    /// JSON → Avro), random objects of envelope fields, arbitrary bytes and edited JSON text.
    #[test]
    fn envelope_parsing_never_panics_and_answers_every_refusal(
        selector in any::<u8>(),
        muts in mutations(),
        fields in prop::collection::btree_map(key(), arb_json(), 0..8),
        raw in bytes(),
        text_edits in edits(),
    ) {
        let version = pick(selector);
        let envelope = mutate(example_envelope(version), &muts);
        check_envelope(&envelope);
        check_envelope(&Json::Object(fields.into_iter().collect()));
        check_envelope_bytes(&raw);
        let text = serde_json::to_vec(&envelope).unwrap();
        check_envelope_bytes(&edit_bytes(text, &text_edits));
    }

    /// JSON → Avro: mutated valid data of every schema (the sample ones and a schema with
    /// every logical type), arbitrary JSON, and arbitrary bytes as the fuzz target gets them.
    #[test]
    fn json_to_avro_never_panics_and_what_it_accepts_round_trips(
        selector in any::<u8>(),
        muts in mutations(),
        data in arb_json(),
        raw in bytes(),
    ) {
        let version = pick(selector);
        check_convert(version, &mutate(example(version), &muts));
        check_convert(version, &data);
        let mut input = vec![selector];
        input.extend_from_slice(&raw);
        check_convert_bytes(&input);
    }

    /// Avro decoding: valid record values of every schema with bytes changed, inserted,
    /// removed or cut off, and arbitrary bytes.
    #[test]
    fn avro_decoding_never_panics_and_what_it_decodes_is_of_the_schema(
        selector in any::<u8>(),
        byte_edits in edits(),
        raw in bytes(),
    ) {
        let version = pick(selector);
        let wire = edit_bytes(example_wire(version), &byte_edits);
        let mut input = vec![selector];
        input.extend_from_slice(&wire);
        check_decode_bytes(&input);
        input.truncate(1);
        input.extend_from_slice(&wire[wire.len().min(5)..]);
        check_decode_bytes(&input);
        input.truncate(1);
        input.extend_from_slice(&raw);
        check_decode_bytes(&input);
    }

    /// Agent definitions: generated TOML with values on the edges of every field, the sample
    /// files with bytes changed, and arbitrary bytes.
    #[test]
    fn agent_definitions_never_panic_and_what_they_accept_is_usable(
        text in definition_text(),
        sample in prop::sample::select(sample_definitions()),
        text_edits in edits(),
        raw in bytes(),
    ) {
        check_definition(&text);
        check_definition_bytes(&edit_bytes(sample.into_bytes(), &text_edits));
        check_definition_bytes(&raw);
    }
}

// ---------------------------------------------------------------------------------------
// Agent definition text

fn sample_definitions() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("consumers");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("consumers/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}

/// A TOML string.
fn quoted(s: &str) -> String {
    // JSON's escapes (\", \\, \n, \uXXXX) are TOML's basic-string escapes too.
    Json::String(s.to_string()).to_string()
}

fn duration_text() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "0s",
        "1ns",
        "200ms",
        "30s",
        "1h 30m",
        "10years",
        "1000years",
        "500000000000years",
        "584942417355years",
        "18446744073709551615s",
        "18446744073709551616s",
        "-1s",
        "abc",
        "",
    ])
    .prop_map(quoted)
}

fn float_text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => prop::sample::select(vec![
            "0.0",
            "0.2",
            "1.0",
            "1",
            "1.0000001",
            "-0.1",
            "nan",
            "inf",
            "-inf",
            "1e-300",
            "1e300",
            "\"0.5\"",
        ])
        .prop_map(str::to_string),
        1 => (0.0f64..=1.0).prop_map(|f| format!("{f:?}")),
    ]
}

fn int_text() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => prop::sample::select(vec![
            "0",
            "1",
            "4",
            "1024",
            "1025",
            "-1",
            "4294967295",
            "4294967296",
            "9223372036854775807",
            "1.5",
            "\"3\"",
        ])
        .prop_map(str::to_string),
        3 => (1u32..100).prop_map(|n| n.to_string()),
    ]
}

/// `key = value`, present with probability `p`.
fn line_p(
    p: f64,
    key: &'static str,
    value: impl Strategy<Value = String>,
) -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(p, value.prop_map(move |v| format!("{key} = {v}\n")))
}

/// An optional `key = value`, present half the time.
fn line(
    key: &'static str,
    value: impl Strategy<Value = String>,
) -> impl Strategy<Value = Option<String>> {
    line_p(0.5, key, value)
}

/// A quoted string: mostly one of `choices` (valid ones first), sometimes an edge string.
fn string_text(choices: Vec<&'static str>) -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(choices[..2].to_vec()).prop_map(quoted),
        3 => prop::sample::select(choices).prop_map(quoted),
        1 => edge_string().prop_map(|s| quoted(&s)),
    ]
}

/// A definition file: required fields mostly present and valid, so that most cases are
/// accepted and reach the runtime checks, with edge values in every field.
fn definition_text() -> impl Strategy<Value = String> {
    let top = (
        line_p(
            0.95,
            "name",
            string_text(vec!["nutrition-planner", "x_1-2", "", "Planner", "a b"]),
        ),
        prop::option::weighted(
            0.95,
            prop::collection::vec(
                string_text(vec![
                    "agent.task.*",
                    "*",
                    "agent.created",
                    "agent..x",
                    ".*",
                    "*.*",
                    "",
                ]),
                0..3,
            )
            .prop_map(|v| format!("subscribe = [{}]\n", v.join(", "))),
        ),
        line("concurrency", int_text()),
        line(
            "dead_letter",
            prop::sample::select(vec!["true", "false", "\"yes\""]).prop_map(str::to_string),
        ),
        line_p(0.05, "unknown_field", Just("1".to_string())),
    );
    let handler = (
        prop::sample::select(vec!["noop", "webhook", "integration", "other"]),
        line_p(
            0.9,
            "url",
            string_text(vec![
                "http://127.0.0.1:9/x",
                "https://a",
                "ftp://x",
                "http://",
            ]),
        ),
        line("secret_env", string_text(vec!["SECRET", ""])),
        line("timeout", duration_text()),
    );
    let service = (
        line_p(
            0.9,
            "base_url",
            string_text(vec!["http://127.0.0.1:9", "https://x", "file:///etc"]),
        ),
        line("auth_env", string_text(vec!["PATH", "AGENTBUS_FUZZ_UNSET"])),
        line(
            "auth_header",
            string_text(vec!["Authorization", "", "bad header\n"]),
        ),
        line("timeout", duration_text()),
        line("rate_per_second", float_text()),
        line("burst", int_text()),
        line("failure_threshold", int_text()),
        line("cooldown", duration_text()),
    );
    let retry = (
        line("attempts", int_text()),
        line("initial_backoff", duration_text()),
        line("max_backoff", duration_text()),
        line("jitter", float_text()),
        line("max_hold", duration_text()),
    );
    (top, handler, service, retry, any::<bool>()).prop_map(
        |(top, handler, service, retry, with_retry)| {
            let mut text = String::new();
            let (a, b, c, d, e) = top;
            for l in [a, b, c, d, e].into_iter().flatten() {
                text.push_str(&l);
            }
            let (kind, url, secret, timeout) = handler;
            text.push_str(&format!("[handler]\nkind = {}\n", quoted(kind)));
            if kind == "webhook" {
                for l in [url, secret, timeout].into_iter().flatten() {
                    text.push_str(&l);
                }
            }
            if kind == "integration" {
                text.push_str("[handler.services.svc]\n");
                let (a, b, c, d, e, f, g, h) = service;
                for l in [a, b, c, d, e, f, g, h].into_iter().flatten() {
                    text.push_str(&l);
                }
            }
            if with_retry {
                text.push_str("[retry]\n");
                let (a, b, c, d, e) = retry;
                for l in [a, b, c, d, e].into_iter().flatten() {
                    text.push_str(&l);
                }
            }
            text
        },
    )
}

// ---------------------------------------------------------------------------------------
// Fixed cases

#[test]
fn every_example_is_valid_so_the_generators_start_from_accepted_values() {
    for version in &fixture().versions {
        let data = example(version);
        if let Err(v) = agentbus::schema::json_to_avro(version, &data, "data") {
            panic!(
                "example of {} v{}: {v:?}",
                version.event_type, version.version
            );
        }
        agentbus::envelope::Envelope::parse(example_envelope(version), "").unwrap();
        check_convert(version, &data);
        check_decode_bytes(&[&[0u8][..], &example_wire(version)].concat());
    }
    for text in sample_definitions() {
        check_definition(&text);
    }
}

/// Writes the seed corpus of the fuzz targets (`ops/fuzz/seeds/<target>/`) from the current
/// schemas and sample agents: `cargo test --test fuzz -- --ignored write_fuzz_seeds`.
#[test]
#[ignore = "writes files; run by hand when the schemas change"]
fn write_fuzz_seeds() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/fuzz/seeds");
    let write = |target: &str, name: String, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    for (i, version) in fixture().versions.iter().enumerate() {
        let selector = u8::try_from(i).unwrap();
        let name = format!("{}-v{}", version.event_type, version.version);
        write(
            "envelope",
            format!("{name}.json"),
            &serde_json::to_vec_pretty(&example_envelope(version)).unwrap(),
        );
        let mut data = vec![selector];
        data.extend(serde_json::to_vec(&example(version)).unwrap());
        write("json_to_avro", format!("{name}.bin"), &data);
        let wire = example_wire(version);
        write(
            "decode_avro",
            format!("{name}-wire.bin"),
            &[&[selector][..], &wire].concat(),
        );
        write(
            "decode_avro",
            format!("{name}-body.bin"),
            &[&[selector][..], &wire[5..]].concat(),
        );
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("consumers");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        write("definition", name, &std::fs::read(&path).unwrap());
    }
}

// ---------------------------------------------------------------------------------------
// Regressions: inputs the fuzzers or the properties above found, inlined. The ones below
// were found when these tests were written and fixed in src/ right after (16d27ab).

/// The sample registry's `event_type` v`n`.
fn version(event_type: &str, n: u32) -> &'static SchemaVersion {
    &fixture()
        .registry
        .event_type(event_type)
        .unwrap_or_else(|| panic!("schemas/{event_type}"))
        .versions[&n]
}

/// A schema of one field `x` of the given type.
fn one_field(field_type: Json) -> SchemaVersion {
    let schema = json!({"type": "record", "name": "One", "namespace": "fuzz",
        "fields": [{"name": "x", "type": field_type}]});
    SchemaVersion::parse("fuzz.one", 1, &schema.to_string()).unwrap()
}

/// apache-avro's decoder answers Null, not an error, when the input ends inside a string or
/// before a boolean, and `decode_avro` passes that on: a Kafka record value cut inside its
/// last string field, or without its last boolean, decodes "fine" with null in a non-null
/// field, and reaches the handler instead of the dead-letter topic.
#[test]
fn regression_decode_avro_refuses_a_value_cut_short() {
    // agent.updated v1: agent_id "", changes {}, updated_by: a length of 1, then nothing.
    check_decode(version("agent.updated", 1), &[0x00, 0x00, 0x02]);
    // The same record value through the decode_avro fuzz target's input shape.
    let index = fixture()
        .versions
        .iter()
        .position(|v| v.event_type == "agent.updated")
        .unwrap();
    let id = version("agent.updated", 1).id.to_be_bytes();
    check_decode_bytes(&[
        u8::try_from(index).unwrap(),
        0x00,
        id[0],
        id[1],
        id[2],
        id[3],
        0x00,
        0x00,
        0x02,
    ]);
    // A record whose first field is a boolean: an empty body decodes.
    check_decode(&one_field(json!("boolean")), &[]);
}

/// `RetryPolicy::backoff` builds its wait with `Duration::from_secs_f64`, which panics above
/// u64::MAX seconds: a definition whose backoffs are near humantime's limit (accepted by
/// `definition::parse`) panics the delivery loop at the first retry.
#[test]
fn regression_definition_backoffs_near_the_duration_limit_do_not_panic() {
    check_definition(
        "name = \"nutrition-planner\"\nsubscribe = [\"agent.task.*\"]\n[handler]\nkind = \"noop\"\n\
         [retry]\ninitial_backoff = \"500000000000years\"\nmax_backoff = \"500000000000years\"\n",
    );
    // No jitter needed: u64::MAX seconds as f64 rounds up to 2^64.
    check_definition(
        "name = \"a\"\nsubscribe = [\"*\"]\n[handler]\nkind = \"noop\"\n[retry]\njitter = 0.0\n\
         initial_backoff = \"18446744073709551615s\"\nmax_backoff = \"18446744073709551615s\"\n",
    );
    // What the proptest above found first: ordinary attempts, a long initial backoff.
    check_definition(
        "name = \"nutrition-planner\"\nsubscribe = [\"agent.task.*\"]\n[handler]\nkind = \"noop\"\n\
         [retry]\nattempts = 31\ninitial_backoff = \"1000years\"\nmax_backoff = \"500000000000years\"\n",
    );
}

/// `avro_to_json` renders local timestamps as `2026-11-21 10:30:00.500` (a space), which
/// `json_to_avro` refuses (it wants `2026-11-21T10:30:00.500`): a handler that sends the
/// data it received back is refused.
#[test]
fn regression_local_timestamps_rendered_by_avro_to_json_convert_back() {
    for logical in ["local-timestamp-millis", "local-timestamp-micros"] {
        let v = one_field(json!({"type": "long", "logicalType": logical}));
        check_convert(&v, &json!({"x": "2026-11-21T10:30:00.5"}));
    }
}

/// `avro_to_json` renders a decimal of a fixed wider than 16 bytes as null.
#[test]
fn regression_wide_fixed_decimals_render_as_their_value() {
    let v = one_field(json!({"type": "fixed", "name": "Wide", "size": 20,
        "logicalType": "decimal", "precision": 38, "scale": 0}));
    check_convert(&v, &json!({"x": "1"}));
}

/// `json_to_avro` accepts any int for time-millis and any long for time-micros, but
/// `avro_to_json` renders values outside [0, 24 h) as nanoseconds: -1 ms comes back as
/// -1000000 ms, 86400000 ms as a number that does not fit an int. And it renders time-micros
/// with milliseconds only: 10:30:00.024900 comes back as 10:30:00.024.
#[test]
fn regression_times_of_day_out_of_range_are_refused_or_round_trip() {
    let millis = one_field(json!({"type": "int", "logicalType": "time-millis"}));
    let micros = one_field(json!({"type": "long", "logicalType": "time-micros"}));
    for x in [json!(-1), json!(86_400_000)] {
        check_convert(&millis, &json!({ "x": x }));
    }
    for x in [
        json!(-1),
        json!(86_400_000_000i64),
        json!("10:30:00.024900"),
    ] {
        check_convert(&micros, &json!({ "x": x }));
    }
}

/// A timestamp given as a number outside years 0000-9999 is accepted, and `avro_to_json`
/// renders it as `+10000-01-01T00:00:00.000Z`, which is not RFC 3339 and which
/// `json_to_avro` refuses. The sample agent.task.requested's `deadline` is such a field.
#[test]
fn regression_timestamps_beyond_year_9999_round_trip() {
    let v = version("agent.task.requested", 1);
    let mut data = example(v);
    data["deadline"] = json!(253_402_300_800_000i64); // 10000-01-01T00:00:00Z
    check_convert(v, &data);
    let v = one_field(json!({"type": "long", "logicalType": "timestamp-millis"}));
    check_convert(&v, &json!({"x": -62_167_219_200_001i64})); // 1 ms before year 0
}

/// A float field accepts a number beyond f32's range and stores +Infinity, which
/// `avro_to_json` renders as null: `1e300` must be refused (or kept), not turned into null.
#[test]
fn regression_float_fields_refuse_numbers_beyond_f32() {
    let v = one_field(json!("float"));
    check_convert(&v, &json!({"x": 1e300}));
}
