//! Schemathesis against the running service, in the test command: `ops/schemathesis.sh`
//! with a small example budget (the script's default, 50 per operation, is the longer run).
//! It starts its own broker (port 19292) and `agentbus serve` (the debug binary `cargo test`
//! built, passed as AGENTBUS_BIN so nothing is rebuilt), calls every operation of
//! `/openapi.json` with generated valid and invalid requests, and fails on any 5xx,
//! undocumented status or content type, or answer that does not match its schema.
//!
//! The seed is fixed ([`SEED`]): the same cases run every time, so the test command cannot
//! fail by chance. `ops/schemathesis.sh` run by hand draws a new seed each run to explore;
//! what such a run finds becomes a plain regression test (tests/http_edges.rs) and is fixed.
//!
//! It fails, not skips, when schemathesis cannot be installed.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

fn agentbus_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_agentbus"))
}

/// The schemathesis seed of the test command; `AGENTBUS_SCHEMATHESIS_SEED` overrides.
const SEED: &str = "20261201";

fn seed() -> String {
    std::env::var("AGENTBUS_SCHEMATHESIS_SEED").unwrap_or_else(|_| SEED.into())
}

/// Examples per operation; `AGENTBUS_SCHEMATHESIS_EXAMPLES` overrides.
fn examples() -> String {
    std::env::var("AGENTBUS_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "20".into())
}

#[test]
fn schemathesis_finds_no_server_error_and_no_answer_outside_the_openapi_description() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let started = Instant::now();
    let out = Command::new(root.join("ops/schemathesis.sh"))
        .arg(examples())
        .env("AGENTBUS_BIN", agentbus_bin())
        .env("SCHEMATHESIS_SEED", seed())
        .current_dir(&root)
        .output()
        .expect("running ops/schemathesis.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Shown with --nocapture, and by the harness when the test fails.
    println!("{stdout}");
    eprintln!("{stderr}");
    eprintln!(
        "ops/schemathesis.sh took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if stderr.contains("schemathesis 4 is not installed") || stderr.contains("python3 is required")
    {
        panic!(
            "schemathesis could not be installed (ops/schemathesis.sh runs \
             python3 -m pip install 'schemathesis>=4,<5'; see its output above); this test \
             needs it: install python3 and schemathesis 4 and run again"
        );
    }
    assert!(
        stderr.contains(&format!("seed {}", seed())),
        "ops/schemathesis.sh did not run with the fixed seed {}",
        seed()
    );
    assert!(
        out.status.success(),
        "schemathesis found answers that break the contract (no 5xx, documented statuses, \
         content types and schemas), or could not run: exit {:?}; its report is above",
        out.status.code()
    );
    assert!(
        stdout.contains(" generated, ") && stdout.contains("Tested: "),
        "schemathesis's report does not show any test case run"
    );
    // Keep the test command lean: the budget above is meant to take well under 90 s.
    if started.elapsed() > Duration::from_secs(90) {
        eprintln!("warning: ops/schemathesis.sh took longer than 90 s; lower the example budget");
    }
}
