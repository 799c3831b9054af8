//! Avro decoding (`split_wire` + `decode_avro`): the first byte picks a schema, the rest is a record value.
//! The property is `agentbus_fuzz::check_decode_bytes` (ops/fuzz/src/lib.rs), which tests/fuzz.rs also runs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    agentbus_fuzz::check_decode_bytes(data);
});
