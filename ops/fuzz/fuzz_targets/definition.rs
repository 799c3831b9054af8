//! Agent definitions (`agentbus::consume::definition::parse`) of arbitrary text.
//! The property is `agentbus_fuzz::check_definition_bytes` (ops/fuzz/src/lib.rs), which tests/fuzz.rs also runs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    agentbus_fuzz::check_definition_bytes(data);
});
