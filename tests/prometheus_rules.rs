//! The Prometheus files in ops/prometheus: the alert rules and the config are valid, the
//! promtool unit tests of the alerts pass, and every alert has a runbook and tests.
//!
//! Needs `promtool`, from Debian's `prometheus` package (`apt-get install -y prometheus`).
//! Without it these tests fail rather than pass unchecked.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn prometheus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/prometheus")
}

fn read(name: &str) -> String {
    let path = prometheus_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Runs `promtool <args> <ops/prometheus/file>` and asserts it succeeds, showing its output.
fn promtool(args: &[&str], file: &str) -> String {
    let path = prometheus_dir().join(file);
    let out = match Command::new("promtool").args(args).arg(&path).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not on PATH: install Debian's `prometheus` package \
             (`apt-get install -y prometheus`) to check {}",
            path.display()
        ),
        Err(e) => panic!("running promtool: {e}"),
    };
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "`promtool {} {}` failed ({}):\n{text}",
        args.join(" "),
        path.display(),
        out.status
    );
    text
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let text = promtool(&["check", "rules"], "alerts.yml");
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn promtool_accepts_the_config_and_it_loads_the_alert_rules() {
    let text = promtool(&["check", "config"], "prometheus.yml");
    assert!(
        text.contains("alerts.yml"),
        "the config loads no alerts.yml:\n{text}"
    );
}

#[test]
fn the_alert_unit_tests_pass() {
    let text = promtool(&["test", "rules"], "alerts_test.yml");
    assert!(text.contains("SUCCESS"), "{text}");
}

/// One `- alert:` rule of alerts.yml: its name and its lines, up to the next rule.
struct Alert {
    name: String,
    lines: Vec<String>,
}

impl Alert {
    /// The value of `key:` in this rule (a quoted or plain scalar, or an indented block
    /// after `|` / `>`), or None when the key is absent.
    fn value(&self, key: &str) -> Option<String> {
        let prefix = format!("{key}:");
        let i = self
            .lines
            .iter()
            .position(|l| l.trim_start().starts_with(&prefix))?;
        let line = &self.lines[i];
        let indent = line.len() - line.trim_start().len();
        let v = line.trim_start()[prefix.len()..].trim();
        if v.starts_with('|') || v.starts_with('>') {
            let block: Vec<&str> = self.lines[i + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            return Some(block.join(" ").trim().to_string());
        }
        Some(scalar(v))
    }
}

/// A one-line YAML scalar without its quotes or a trailing comment.
fn scalar(v: &str) -> String {
    let mut chars = v.chars();
    match chars.next() {
        Some('"') => {
            let mut out = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => out.extend(chars.next()),
                    '"' => break,
                    c => out.push(c),
                }
            }
            out
        }
        Some('\'') => v[1..].split('\'').next().unwrap_or_default().to_string(),
        _ => v.split(" #").next().unwrap_or_default().trim().to_string(),
    }
}

fn alerts() -> Vec<Alert> {
    let mut alerts: Vec<Alert> = Vec::new();
    for line in read("alerts.yml").lines() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("- alert:") {
            alerts.push(Alert {
                name: name.trim().to_string(),
                lines: Vec::new(),
            });
        } else if t.starts_with("- record:") || t.starts_with("- name:") {
            // A recording rule or another group ends the alert before it.
            alerts.push(Alert {
                name: String::new(),
                lines: Vec::new(),
            });
        } else if let Some(alert) = alerts.last_mut() {
            alert.lines.push(line.to_string());
        }
    }
    alerts.retain(|a| !a.name.is_empty());
    assert!(!alerts.is_empty(), "alerts.yml has no `- alert:` rules");
    alerts
}

#[test]
fn every_alert_has_a_severity_summary_description_and_runbook() {
    for alert in alerts() {
        let severity = alert.value("severity");
        assert!(
            matches!(severity.as_deref(), Some("warning" | "critical")),
            "{}: severity must be warning or critical, is {severity:?}",
            alert.name
        );
        for key in ["summary", "description", "runbook"] {
            let v = alert.value(key);
            assert!(
                v.as_deref().is_some_and(|v| !v.is_empty()),
                "{}: the `{key}` annotation is missing or empty",
                alert.name
            );
        }
    }
}

#[test]
fn every_alert_has_a_firing_and_a_not_firing_unit_test() {
    let tests = read("alerts_test.yml");
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    for alert in alerts() {
        let mut firing = false;
        let mut not_firing = false;
        for (i, line) in lines.iter().enumerate() {
            if line.strip_prefix("alertname:").map(str::trim) != Some(alert.name.as_str()) {
                continue;
            }
            let next = lines[i + 1..]
                .iter()
                .find(|l| !l.is_empty() && !l.starts_with('#'));
            match next {
                Some(&"exp_alerts: []") => not_firing = true,
                Some(&"exp_alerts:") => firing = true,
                _ => {}
            }
        }
        assert!(
            firing,
            "alerts_test.yml has no case where {} fires (`alertname: {0}` then `exp_alerts:` \
             with the expected alerts)",
            alert.name
        );
        assert!(
            not_firing,
            "alerts_test.yml has no case where {} does not fire (`alertname: {0}` then \
             `exp_alerts: []`)",
            alert.name
        );
    }
}

/// The end-to-end test lowers this alert's threshold and `for` by rewriting these strings.
#[test]
fn the_consumer_lag_alert_keeps_its_threshold_and_for_where_the_end_to_end_test_finds_them() {
    let alerts = alerts();
    let lag = alerts
        .iter()
        .find(|a| a.name == "AgentbusConsumerLagHigh")
        .expect("alerts.yml has no AgentbusConsumerLagHigh");
    let expr = lag.value("expr").unwrap_or_default();
    assert!(
        expr.contains("kafka_consumergroup_group_max_lag_seconds > 300"),
        "expr: {expr}"
    );
    assert_eq!(lag.value("for").as_deref(), Some("5m"));
}
