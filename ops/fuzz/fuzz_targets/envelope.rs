//! Envelope parsing (`agentbus::envelope::Envelope::parse`) of arbitrary bytes that are JSON.
//! The property is `agentbus_fuzz::check_envelope_bytes` (ops/fuzz/src/lib.rs), which tests/fuzz.rs also runs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    agentbus_fuzz::check_envelope_bytes(data);
});
