//! Who may do what: API keys and scopes, safe defaults, rate and header limits.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::{Value, json};

/// `agentbus keys new`: the key (stdout, first line) and the entry (the rest).
fn new_key(args: &[&str]) -> (String, String) {
    let out = Command::new(agentbus_bin())
        .args(["keys", "new"])
        .args(args)
        .output()
        .unwrap();
    let text = succeeded(&out);
    let (key, entry) = text.split_once('\n').unwrap();
    assert!(
        !entry.contains(key.rsplit('_').next().unwrap()),
        "the entry holds no secret"
    );
    (key.to_string(), entry.to_string())
}

struct Keys {
    publisher: String,
    other: String,
    reader: String,
    admin: String,
    slow: String,
    _file: tempfile::NamedTempFile,
    app: TestApp,
}

async fn app_with_keys() -> Keys {
    let (publisher, p) = new_key(&[
        "--name",
        "planner",
        "--scope",
        "publish",
        "--event-type",
        "agent.task.*",
        "--source",
        "planner",
    ]);
    let (reader, r) = new_key(&["--name", "dashboard", "--scope", "read"]);
    let (other, o) = new_key(&["--name", "other", "--scope", "publish"]);
    let (admin, a) = new_key(&["--name", "operator", "--scope", "admin"]);
    let (slow, s) = new_key(&["--name", "slow", "--scope", "read"]);
    let s = format!("{s}rate_per_second = 0.5\nburst = 2\n");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), format!("{p}\n{r}\n{a}\n{s}\n{o}")).unwrap();
    let app = spawn(Options {
        extra: vec!["--api-keys".into(), file.path().display().to_string()],
        ..Options::default()
    })
    .await;
    Keys {
        publisher,
        other,
        reader,
        admin,
        slow,
        _file: file,
        app,
    }
}

fn task(source: &str, event_type: &str) -> Value {
    json!({"event_type": event_type, "source": source,
           "data": {"task_id": uuid::Uuid::new_v4(), "agent_id": "a1", "description": "x"}})
}

async fn call(
    app: &TestApp,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> reqwest::Response {
    let url = format!("{}{path}", app.url);
    let mut request = match method {
        "POST" => app.client.post(url).json(&body.unwrap_or(json!({}))),
        _ => app.client.get(url),
    };
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap()
}

async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn keys_and_scopes_decide_who_may_do_what() {
    let k = app_with_keys().await;
    let app = &k.app;
    // Without a key, or with a wrong one: 401 with a Bearer challenge.
    let none = call(
        app,
        "POST",
        "/v1/events",
        None,
        Some(task("planner", "agent.task.requested")),
    )
    .await;
    assert_eq!(
        none.headers()["www-authenticate"],
        "Bearer realm=\"agentbus\""
    );
    let (status, body) = error_of(none).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    // The real key with its last hex digit changed.
    let last = if k.publisher.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &k.publisher[..k.publisher.len() - 1]);
    let (status, _) = error_of(call(app, "GET", "/v1/schemas", Some(&forged), None).await).await;
    assert_eq!(status, 401);
    let (status, _) =
        error_of(call(app, "GET", "/v1/schemas", Some("ab_nope_nope"), None).await).await;
    assert_eq!(status, 401);

    // Health, readiness, metrics and the API description stay open.
    for open in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(
            call(app, "GET", open, None, None).await.status(),
            200,
            "{open}"
        );
    }

    // publish: only its event types, only as its source.
    let ok = call(
        app,
        "POST",
        "/v1/events",
        Some(&k.publisher),
        Some(task("planner", "agent.task.requested")),
    )
    .await;
    assert_eq!(ok.status(), 200);
    let (status, body) = error_of(
        call(
            app,
            "POST",
            "/v1/events",
            Some(&k.publisher),
            Some(task("budget-manager", "agent.task.requested")),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    assert_eq!(body["error"]["details"][0]["path"], "source");
    let batch = json!([task("planner", "agent.task.requested"),
                       {"event_type": "agent.created", "source": "planner",
                        "data": {"agent_id": "a", "type": "t", "cognitive_pattern": "c", "created_by": "u"}}]);
    let (status, body) =
        error_of(call(app, "POST", "/v1/events", Some(&k.publisher), Some(batch)).await).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["details"][0]["path"], "[1].event_type");
    // ... and nothing else.
    let (status, _) =
        error_of(call(app, "GET", "/v1/schemas", Some(&k.publisher), None).await).await;
    assert_eq!(status, 403);

    // Idempotency keys are per API key: the same one under two keys is two events.
    let mut idempotent = Vec::new();
    for (key, source) in [
        (&k.publisher, "planner"),
        (&k.other, "other"),
        (&k.publisher, "planner"),
    ] {
        let answer = app
            .client
            .post(format!("{}/v1/events", app.url))
            .bearer_auth(key)
            .header("idempotency-key", "shared-key")
            .json(&task(source, "agent.task.requested"))
            .send()
            .await
            .unwrap();
        let status = answer.status().as_u16();
        let body: Value = answer.json().await.unwrap();
        idempotent.push((
            status,
            body["duplicate"].as_bool(),
            body["event_id"].clone(),
        ));
    }
    assert_eq!(idempotent[0].0, 200);
    assert_eq!(
        (idempotent[1].0, idempotent[1].1),
        (200, Some(false)),
        "{idempotent:?}"
    );
    assert_ne!(idempotent[0].2, idempotent[1].2);
    // The first key's repeat: a different body under its key is a conflict, not the other's.
    assert_eq!(idempotent[2].0, 409, "{idempotent:?}");

    // read: reads, no publish, no admin.
    assert_eq!(
        call(app, "GET", "/v1/schemas", Some(&k.reader), None)
            .await
            .status(),
        200
    );
    assert_eq!(
        call(app, "GET", "/registry/subjects", Some(&k.reader), None)
            .await
            .status(),
        200
    );
    let (status, _) = error_of(
        call(
            app,
            "POST",
            "/v1/events",
            Some(&k.reader),
            Some(task("planner", "agent.task.requested")),
        )
        .await,
    )
    .await;
    assert_eq!(status, 403);
    let replay =
        json!({"from": "1h", "topic": app.topic("agent"), "into_topic": app.topic("agent")});
    let (status, body) = error_of(
        call(
            app,
            "POST",
            "/v1/replays",
            Some(&k.reader),
            Some(replay.clone()),
        )
        .await,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("admin"));
    let (status, _) = error_of(
        call(
            app,
            "POST",
            "/v1/dlq/some-agent/redrive",
            Some(&k.reader),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(status, 403);

    // admin: replays (here refused for its input, past the access check) and reads.
    let (status, body) =
        error_of(call(app, "POST", "/v1/replays", Some(&k.admin), Some(replay)).await).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        call(app, "GET", "/v1/schemas", Some(&k.admin), None)
            .await
            .status(),
        200
    );

    // Each key has its own rate: 2 at once, then 429 with Retry-After.
    for _ in 0..2 {
        assert_eq!(
            call(app, "GET", "/v1/schemas", Some(&k.slow), None)
                .await
                .status(),
            200
        );
    }
    let limited = call(app, "GET", "/v1/schemas", Some(&k.slow), None).await;
    let retry_after = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(retry_after == "1" || retry_after == "2", "{retry_after}");
    let (status, body) = error_of(limited).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("rate_limited"))
    );
    assert_eq!(
        call(app, "GET", "/v1/schemas", Some(&k.reader), None)
            .await
            .status(),
        200,
        "others unaffected"
    );

    // Headers past the limit: 431, before any key check.
    let big = "x".repeat(20_000);
    let response = app
        .client
        .get(format!("{}/v1/schemas", app.url))
        .header("x-padding", big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 431);
}

/// Runs `agentbus serve` on `addr` without keys; returns whether it started and its log.
fn serve_on(addr: &str, extra: &[&str]) -> (bool, String) {
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(agentbus_bin())
        .args([
            "serve",
            "--http-addr",
            addr,
            "--brokers",
            "127.0.0.1:1",
            "--data-dir",
            data.path().to_str().unwrap(),
            "--consumers-dir",
            data.path().join("none").to_str().unwrap(),
            "--schemas-dir",
            root().join("schemas").to_str().unwrap(),
        ])
        .args(extra)
        .env("AGENTBUS_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut log = String::new();
    let started = loop {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            log.push_str(&line);
            log.push('\n');
            if line.contains("agentbus listening") {
                break true;
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                log.push_str(&line);
                log.push('\n');
            }
            assert!(!status.success());
            break false;
        }
        assert!(
            Instant::now() < deadline,
            "neither started nor refused: {log}"
        );
    };
    let _ = child.kill();
    let _ = child.wait();
    (started, log)
}

#[test]
fn a_non_loopback_address_needs_keys_or_a_loud_opt_out() {
    let (started, log) = serve_on("0.0.0.0:0", &[]);
    assert!(!started, "{log}");
    assert!(
        log.contains("without API keys") && log.contains("--insecure-no-auth"),
        "{log}"
    );
    let (started, log) = serve_on("0.0.0.0:0", &["--insecure-no-auth"]);
    assert!(started, "{log}");
    assert!(log.contains("INSECURE"), "{log}");
    let (started, log) = serve_on("127.0.0.1:0", &[]);
    assert!(started && !log.contains("INSECURE"), "{log}");
}
