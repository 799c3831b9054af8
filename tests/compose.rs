//! compose.yml: the same Kafka as the tests, and a file Docker Compose accepts.

mod common;

use std::process::Command;

use common::*;

/// The Kafka version pinned for ops/broker.sh and the tests.
fn pinned_kafka() -> String {
    let pom = std::fs::read_to_string(root().join("ops/kafka/pom.xml")).unwrap();
    let start = pom.find("<kafka.version>").unwrap() + "<kafka.version>".len();
    let end = pom[start..].find('<').unwrap();
    pom[start..start + end].trim().to_string()
}

#[test]
fn compose_runs_the_kafka_version_the_tests_run() {
    let compose = std::fs::read_to_string(root().join("compose.yml")).unwrap();
    let images: Vec<&str> = compose
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image: apache/kafka:"))
        .collect();
    assert_eq!(
        images,
        [pinned_kafka().as_str()],
        "compose.yml's apache/kafka image and ops/kafka/pom.xml disagree"
    );
}

/// `docker compose` (the plugin) or `docker-compose` (Debian's package), whichever works.
fn compose_command() -> Option<Vec<&'static str>> {
    [vec!["docker", "compose"], vec!["docker-compose"]]
        .into_iter()
        .find(|c| {
            Command::new(c[0])
                .args(&c[1..])
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

fn check(compose: &[&str], file: &std::path::Path) -> std::process::Output {
    Command::new(compose[0])
        .args(&compose[1..])
        .arg("-f")
        .arg(file)
        .args(["config", "-q"])
        .current_dir(root())
        .output()
        .unwrap()
}

#[test]
fn docker_compose_accepts_compose_yml_where_docker_is_installed() {
    let docker = Command::new("docker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !docker {
        eprintln!("skipped: no docker client on this machine");
        return;
    }
    let compose = compose_command().expect(
        "docker is installed but neither `docker compose` nor `docker-compose` runs \
         (ops/test.sh installs Debian's docker-compose)",
    );
    let out = check(&compose, &root().join("compose.yml"));
    assert!(
        out.status.success(),
        "{} config -q refused compose.yml: {}",
        compose.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    // The check can fail: a misspelt key is refused.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("compose.yml");
    let text = std::fs::read_to_string(root().join("compose.yml")).unwrap();
    std::fs::write(
        &broken,
        text.replacen("    healthcheck:", "    healthchek:", 1),
    )
    .unwrap();
    assert!(
        !check(&compose, &broken).status.success(),
        "a misspelt key passed the check"
    );
}
