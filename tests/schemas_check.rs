//! `agentbus schemas check` and start-up refuse a schema directory that breaks its rules.

mod common;

use std::{fs, path::Path, process::Command, time::Duration};

use common::*;

const V1: &str =
    r#"{"type":"record","name":"Thing","namespace":"t","fields":[{"name":"id","type":"string"}]}"#;
const V2_COMPATIBLE: &str = r#"{"type":"record","name":"Thing","namespace":"t","fields":[{"name":"id","type":"string"},{"name":"size","type":"int","default":0}]}"#;
const V2_INCOMPATIBLE: &str = r#"{"type":"record","name":"Thing","namespace":"t","fields":[{"name":"id","type":"string"},{"name":"size","type":"int"}]}"#;

fn schema_dir(v2: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("thing.made");
    fs::create_dir(&t).unwrap();
    fs::write(t.join("v1.avsc"), V1).unwrap();
    fs::write(t.join("v2.avsc"), v2).unwrap();
    dir
}

fn check(dir: &Path) -> (bool, String) {
    let out = Command::new(agentbus_bin())
        .args(["schemas", "check", "--schemas-dir"])
        .arg(dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn the_shipped_schemas_pass_the_check() {
    let (ok, text) = check(&root().join("schemas"));
    assert!(ok, "{text}");
    assert!(text.contains("14 event types"), "{text}");
}

#[test]
fn a_compatible_v2_passes_and_an_incompatible_one_fails_naming_the_file_and_reason() {
    let good = schema_dir(V2_COMPATIBLE);
    let (ok, text) = check(good.path());
    assert!(ok, "{text}");

    let bad = schema_dir(V2_INCOMPATIBLE);
    let (ok, text) = check(bad.path());
    assert!(!ok, "{text}");
    assert!(text.contains("thing.made/v2.avsc"), "{text}");
    assert!(text.contains("not BACKWARD compatible with v1"), "{text}");
    assert!(text.contains("size"), "the reason names the field: {text}");
}

#[test]
fn a_type_may_opt_out_of_the_compatibility_check() {
    let dir = schema_dir(V2_INCOMPATIBLE);
    fs::write(
        dir.path().join("thing.made/type.toml"),
        "compatibility = \"none\"\n",
    )
    .unwrap();
    let (ok, text) = check(dir.path());
    assert!(ok, "{text}");
}

#[test]
fn misnamed_files_gaps_and_bad_settings_are_named() {
    let cases: [(&str, &str, &str); 4] = [
        ("thing.made/version1.avsc", V1, "version1.avsc"),
        ("thing.made/v4.avsc", V1, "v3 is missing"),
        (
            "thing.made/type.toml",
            "compatibility = \"sideways\"",
            "type.toml",
        ),
        ("thing.made/v3.avsc", "{not json", "v3.avsc"),
    ];
    for (file, content, expected) in cases {
        let dir = schema_dir(V2_COMPATIBLE);
        fs::write(dir.path().join(file), content).unwrap();
        let (ok, text) = check(dir.path());
        assert!(!ok, "{file}: {text}");
        assert!(text.contains(expected), "{file}: {text}");
    }
}

#[test]
fn the_service_refuses_to_start_with_an_incompatible_schema() {
    let bad = schema_dir(V2_INCOMPATIBLE);
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(agentbus_bin())
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--brokers",
            "127.0.0.1:1",
            "--schemas-dir",
        ])
        .arg(bad.path())
        .arg("--data-dir")
        .arg(data.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "serve kept running");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("v2.avsc") && stderr.contains("BACKWARD"),
        "{stderr}"
    );
}
