//! JSON → Avro (`agentbus::schema::json_to_avro`): the first byte picks a schema, the rest is the data.
//! The property is `agentbus_fuzz::check_convert_bytes` (ops/fuzz/src/lib.rs), which tests/fuzz.rs also runs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    agentbus_fuzz::check_convert_bytes(data);
});
