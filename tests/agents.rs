//! Agents against the real broker: a webhook receiver in the test plays the agent's
//! endpoint and records what it gets.

mod common;

use std::{
    collections::HashMap,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{Router, response::IntoResponse};
use common::{agents::*, *};
use rdkafka::Message;
use serde_json::{Value, json};

#[tokio::test]
async fn a_failing_event_is_retried_and_a_poison_one_is_dead_lettered_while_the_rest_flow() {
    let (receiver, url) = Receiver::start().await;
    let name = format!("planner-{}", uuid::Uuid::new_v4().simple());
    let (app, _c) = app_with_agent(&url, &name).await;
    // Same key: the poison event sits in front of the others.
    for d in ["poison", "fail-2", "ok-1", "ok-2"] {
        assert_eq!(app.post(&task("same", d)).await.status(), 200);
    }
    receiver.wait_for(3, Duration::from_secs(60)).await;
    let got = receiver.descriptions();
    assert_eq!(got, ["fail-2", "ok-1", "ok-2"], "in order, poison skipped");
    let retried = receiver
        .got()
        .into_iter()
        .find(|r| r.event["data"]["description"] == "fail-2")
        .unwrap();
    assert_eq!(retried.headers["x-agentbus-attempt"], "3");

    let dlq = format!("{}{name}.dlq", app.prefix);
    let dead = records(&app, &dlq, 1).await;
    let d = &dead[0];
    assert_eq!(d.key(), Some(&b"same"[..]));
    assert_eq!(
        header(d, "ce_type").as_deref(),
        Some("agent.task.requested")
    );
    assert_eq!(
        header(d, "agentbus-original-topic"),
        Some(app.topic("agent"))
    );
    for h in [
        "agentbus-original-partition",
        "agentbus-original-offset",
        "agentbus-original-timestamp",
        "agentbus-failed-at",
    ] {
        assert!(header(d, h).is_some(), "{h}");
    }
    assert_eq!(header(d, "agentbus-consumer-group"), Some(name.clone()));
    assert_eq!(
        header(d, "agentbus-attempts").as_deref(),
        Some("1"),
        "not retryable: one attempt"
    );
    assert_eq!(
        header(d, "agentbus-error-kind").as_deref(),
        Some("http_status")
    );
    assert!(header(d, "agentbus-error-message").unwrap().contains("400"));
    let original = records(&app, &app.topic("agent"), 4).await;
    assert_eq!(d.payload(), original[0].payload(), "value kept");

    let listed: Value = app.get_json(&format!("/v1/dlq/{name}")).await;
    let letters = listed["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["error_kind"], "http_status");
    assert_eq!(letters[0]["event_type"], "agent.task.requested");

    // Fixed: redrive brings it back, and the agent handles it.
    receiver
        .cured
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let redriven: Value = app
        .client
        .post(format!("{}/v1/dlq/{name}/redrive", app.url))
        .json(&json!({"event_type": "agent.task.requested"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(redriven["redriven"], 1);
    receiver.wait_for(4, Duration::from_secs(60)).await;
    assert_eq!(receiver.descriptions()[3], "poison");
}

#[tokio::test]
async fn the_same_idempotency_key_under_two_event_ids_is_handled_once() {
    let (receiver, url) = Receiver::start().await;
    let name = format!("dedup-{}", uuid::Uuid::new_v4().simple());
    let (app, _c) = app_with_agent(&url, &name).await;
    // A second service instance with its own publish store, so both copies get written.
    let other = spawn(Options {
        prefix: app.prefix.clone(),
        ..Options::default()
    })
    .await;
    let mut first = task("a", "once");
    first["idempotency_key"] = json!("same-action");
    let mut second = first.clone();
    second["event_id"] = json!(uuid::Uuid::now_v7().to_string());
    assert_eq!(app.post(&first).await.status(), 200);
    assert_eq!(other.post(&second).await.status(), 200);
    assert_eq!(app.post(&task("a", "after")).await.status(), 200);
    receiver.wait_for(2, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.descriptions(), ["once", "after"]);
}

#[tokio::test]
async fn events_of_one_key_keep_their_order_with_concurrency_above_one() {
    let (receiver, url) = Receiver::start().await;
    let name = format!("order-{}", uuid::Uuid::new_v4().simple());
    let (app, _c) = app_with_agent(&url, &name).await;
    let batch: Vec<Value> = (0..40)
        .map(|i| task(&format!("k{}", i % 4), &format!("{}-{}", i % 4, i)))
        .collect();
    assert_eq!(app.post(&Value::Array(batch)).await.status(), 200);
    receiver.wait_for(40, Duration::from_secs(60)).await;
    let mut last: HashMap<String, i32> = HashMap::new();
    for d in receiver.descriptions() {
        let (key, seq) = d.split_once('-').unwrap();
        let seq: i32 = seq.parse().unwrap();
        let previous = last.insert(key.to_string(), seq).unwrap_or(-1);
        assert!(seq > previous, "key {key}: {seq} after {previous}");
    }
}

#[tokio::test]
async fn follow_up_events_carry_the_causation_and_correlation_ids() {
    let (receiver, url) = Receiver::start().await;
    let name = format!("follow-{}", uuid::Uuid::new_v4().simple());
    let (app, _c) = app_with_agent(&url, &name).await;
    let answer: Value = app.post(&task("f", "follow")).await.json().await.unwrap();
    receiver.wait_for(1, Duration::from_secs(60)).await;
    // The follow-up (agent.task.completed) is an agent.task.* event too: the agent gets it.
    let records = records(&app, &app.topic("agent"), 2).await;
    let completed = records
        .iter()
        .find(|r| header(r, "ce_type").as_deref() == Some("agent.task.completed"))
        .unwrap();
    assert_eq!(
        header(completed, "ce_causationid").as_deref(),
        answer["event_id"].as_str()
    );
    assert_eq!(
        header(completed, "ce_correlationid").as_deref(),
        Some("corr-follow")
    );
    assert_eq!(header(completed, "ce_source"), Some(name.clone()));
}

#[tokio::test]
async fn an_expired_event_is_not_delivered() {
    let (receiver, url) = Receiver::start().await;
    let name = format!("ttl-{}", uuid::Uuid::new_v4().simple());
    let (app, _c) = app_with_agent(&url, &name).await;
    let mut stale = task("t", "stale");
    // A minute old: past its TTL, but well inside the topic's retention. An older fixed date
    // would be CreateTime-expired by Kafka's retention check and could vanish before the agent
    // reads it, which is not what this test is about.
    let minute_ago = chrono::Utc::now() - chrono::TimeDelta::seconds(60);
    stale["timestamp"] = json!(minute_ago.to_rfc3339());
    stale["ttl_ms"] = json!(1000);
    assert_eq!(app.post(&stale).await.status(), 200);
    assert_eq!(app.post(&task("t", "fresh")).await.status(), 200);
    receiver.wait_for(1, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.descriptions(), ["fresh"]);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("agentbus_events_consumed_total")
                && l.contains(&name)
                && l.contains("outcome=\"expired\"")),
        "{metrics}"
    );
}

/// An `agentbus agent run` process.
fn agent_process(app: &TestApp, consumers: &Path, name: &str, data: &Path) -> std::process::Child {
    std::process::Command::new(agentbus_bin())
        .args(["agent", "run", name])
        .env("AGENTBUS_BROKERS", &app.brokers)
        .env("AGENTBUS_TOPIC_PREFIX", &app.prefix)
        .env("AGENTBUS_DATA_DIR", data)
        .env("AGENTBUS_CONSUMERS_DIR", consumers)
        .env("AGENTBUS_SCHEMAS_DIR", root().join("schemas"))
        .env("AGENTBUS_TOPIC_PARTITIONS", "2")
        .env("AGENTBUS_AGENT_SESSION_TIMEOUT", "6s")
        .env("AGENTBUS_LOG", "warn")
        .env("HOOK_SECRET", "s3cret")
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn a_webhook_signature_verifies() {
    let (receiver, url) = Receiver::start().await;
    let app = spawn_app().await;
    let consumers = tempfile::tempdir().unwrap();
    let name = format!("signed-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(
        consumers.path().join("signed.toml"),
        format!("name = \"{name}\"\nsubscribe = [\"agent.task.requested\"]\n[handler]\nkind = \"webhook\"\nurl = \"{url}\"\nsecret_env = \"HOOK_SECRET\"\n"),
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut child = agent_process(&app, consumers.path(), &name, data.path());
    assert_eq!(app.post(&task("s", "sign me")).await.status(), 200);
    let got = receiver.wait_for(1, Duration::from_secs(60)).await;
    let _ = child.kill();
    let _ = child.wait();
    let r = &got[0];
    assert_eq!(r.headers["content-type"], "application/cloudevents+json");
    let body = serde_json::to_vec(&r.event).unwrap();
    // The receiver re-serialised the JSON; serde_json keeps key order, so the bytes match.
    assert_eq!(
        r.headers["x-agentbus-signature"],
        agentbus::handlers::signature("s3cret", &body)
    );
    assert_eq!(r.event["specversion"], "1.0");
    assert_eq!(r.event["type"], "agent.task.requested");
}

#[tokio::test]
async fn a_sigkilled_agent_handles_every_event_after_restart_and_repeats_at_most_what_was_in_flight()
 {
    let (receiver, url) = Receiver::start().await;
    let app = spawn_app().await;
    let consumers = tempfile::tempdir().unwrap();
    let name = format!("crash-{}", uuid::Uuid::new_v4().simple());
    agent_file(consumers.path(), &name, &url, "");
    let data = tempfile::tempdir().unwrap();
    let batch: Vec<Value> = (0..60)
        .map(|i| task(&format!("k{}", i % 8), "slow"))
        .collect();
    let ids: Vec<String> = app
        .post(&Value::Array(batch))
        .await
        .json::<Value>()
        .await
        .unwrap()["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["event_id"].as_str().unwrap().to_string())
        .collect();

    let mut first = agent_process(&app, consumers.path(), &name, data.path());
    receiver.wait_for(15, Duration::from_secs(60)).await;
    first.kill().unwrap();
    first.wait().unwrap();
    let before_restart = receiver.got().len();
    let mut second = agent_process(&app, consumers.path(), &name, data.path());
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let seen: std::collections::HashSet<String> = receiver
            .got()
            .iter()
            .map(|r| r.event["id"].as_str().unwrap().to_string())
            .collect();
        if ids.iter().all(|id| seen.contains(id)) {
            break;
        }
        assert!(Instant::now() < deadline, "{} of 60 handled", seen.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = second.kill();
    let _ = second.wait();
    let all = receiver.got();
    let repeats = all.len() - ids.len();
    assert!(
        repeats <= 4,
        "{repeats} events handled twice (before restart {before_restart}); at most the 4 in flight may be"
    );
}

#[tokio::test]
async fn two_processes_of_one_agent_together_handle_every_event_exactly_once() {
    let (receiver, url) = Receiver::start().await;
    let app = spawn_app().await;
    let consumers = tempfile::tempdir().unwrap();
    let name = format!("pair-{}", uuid::Uuid::new_v4().simple());
    agent_file(consumers.path(), &name, &url, "");
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = agent_process(&app, consumers.path(), &name, d1.path());
    let mut b = agent_process(&app, consumers.path(), &name, d2.path());
    let batch: Vec<Value> = (0..80)
        .map(|i| task(&format!("k{i}"), &format!("e{i}")))
        .collect();
    assert_eq!(app.post(&Value::Array(batch)).await.status(), 200);
    receiver.wait_for(80, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for child in [&mut a, &mut b] {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut seen = receiver.descriptions();
    seen.sort();
    let before = seen.len();
    seen.dedup();
    assert_eq!((before, seen.len()), (80, 80), "every event exactly once");
}

#[test]
fn the_shipped_agent_definitions_load() {
    let agents = agentbus::consume::definition::load_dir(&root().join("consumers")).unwrap();
    let names: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
    for expected in [
        "nutrition-planner",
        "workout-planner",
        "budget-manager",
        "report-planner",
        "emergency-manager",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
}

#[tokio::test]
async fn the_circuit_breaker_opens_fails_fast_and_closes_again() {
    // The external service: 500 while down, 200 after; counts the calls that reach it.
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let hits = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let service = {
        let (down, hits) = (down.clone(), hits.clone());
        Router::new().route(
            "/{*path}",
            axum::routing::any(move || {
                let (down, hits) = (down.clone(), hits.clone());
                async move {
                    hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if down.load(std::sync::atomic::Ordering::SeqCst) {
                        (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "down").into_response()
                    } else {
                        "pong".into_response()
                    }
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, service).await.unwrap() });

    let consumers = tempfile::tempdir().unwrap();
    let name = format!("integrations-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(
        consumers.path().join("integration.toml"),
        format!(
            "name = \"{name}\"\nsubscribe = [\"integration.call.requested\"]\nconcurrency = 1\n\
             [handler]\nkind = \"integration\"\n\
             [handler.services.fake]\nbase_url = \"{base}\"\ntimeout = \"2s\"\nfailure_threshold = 2\ncooldown = \"1500ms\"\n\
             [retry]\nattempts = 1\n"
        ),
    )
    .unwrap();
    let app = spawn(Options {
        consumers_dir: Some(consumers.path().to_path_buf()),
        ..Options::default()
    })
    .await;
    let call = |n: u32| {
        json!({
            "event_type": "integration.call.requested", "source": "t", "partition_key": "fake",
            "data": {"call_id": uuid::Uuid::new_v4(), "service": "fake", "method": "GET", "path": format!("/ping/{n}")}
        })
    };
    let topic = app.topic("integration");
    for n in 0..3 {
        assert_eq!(app.post(&call(n)).await.status(), 200);
    }
    let results = decoded(&app, &topic, 6).await;
    let outcomes: Vec<(String, Value)> = results
        .iter()
        .filter(|(t, _)| t != "integration.call.requested")
        .map(|(t, d)| (t.clone(), d["error_kind"].clone()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("integration.call.failed".to_string(), json!("http_status")),
            ("integration.call.failed".to_string(), json!("http_status")),
            ("integration.call.failed".to_string(), json!("circuit_open")),
        ]
    );
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the open breaker failed fast"
    );
    let status: Value = app.get_json("/v1/integrations").await;
    assert_eq!(status["integrations"][0]["state"], "open");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("agentbus_circuit_breaker_state{service=\"fake\"} 2"),
        "{metrics}"
    );

    down.store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(app.post(&call(3)).await.status(), 200);
    let results = decoded(&app, &topic, 8).await;
    let (last_type, last) = results.last().unwrap();
    assert_eq!(last_type, "integration.call.succeeded");
    assert_eq!(last["status"], 200);
    assert_eq!(last["response_body"], "pong");
    let status: Value = app.get_json("/v1/integrations").await;
    assert_eq!(status["integrations"][0]["state"], "closed");
}

/// `n` processes of one agent on a 3-partition events topic, each with a webhook of its
/// own: once the group settled, every process handles events (each holds partitions of
/// the events topic, not only of the agent's retry and replay topics).
async fn every_process_of_an_agent_handles_events(n: usize) {
    let prefix = unique_prefix();
    create_topic(&brokers(), &format!("{prefix}agent.events"), 3).await;
    let app = spawn(Options {
        prefix,
        ..Options::default()
    })
    .await;
    // The name sorts after the events topic, as most sample agents' names do: with the
    // assignment balanced over all topics together, the first process kept the events
    // topic and the others got the retry and replay topics.
    let name = format!("zz-share-{}", uuid::Uuid::new_v4().simple());
    let (mut receivers, mut children, mut dirs) = (Vec::new(), Killed(Vec::new()), Vec::new());
    for i in 0..n {
        let (receiver, url) = Receiver::start().await;
        let (consumers, data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        agent_file(consumers.path(), &name, &url, "");
        children
            .0
            .push(agent_process(&app, consumers.path(), &name, data.path()));
        if i == 0 {
            // The first process owns every partition before the others join.
            assert_eq!(app.post(&task("first", "first")).await.status(), 200);
            receiver.wait_for(1, Duration::from_secs(60)).await;
        }
        receivers.push(receiver);
        dirs.push((consumers, data));
    }
    wait_for_stable_group(&app.brokers, &name, n, Duration::from_secs(60)).await;
    let before: Vec<usize> = receivers.iter().map(|r| r.got().len()).collect();
    let deadline = Instant::now() + Duration::from_secs(45);
    for round in 0.. {
        let batch: Vec<Value> = (0..30)
            .map(|i| task(&format!("k{round}-{i}"), &format!("r{round}-{i}")))
            .collect();
        assert_eq!(app.post(&Value::Array(batch)).await.status(), 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let handled: Vec<usize> = receivers
            .iter()
            .zip(&before)
            .map(|(r, b)| r.got().len() - b)
            .collect();
        if handled.iter().all(|&h| h > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "events handled per process after the group settled: {handled:?}; a process \
             without events holds no partition of the events topic"
        );
    }
}

/// Child processes, killed when dropped (a failed assertion included).
struct Killed(Vec<std::process::Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn each_of_two_processes_of_one_agent_handles_a_share_of_a_three_partition_topic() {
    every_process_of_an_agent_handles_events(2).await;
}

#[tokio::test]
async fn each_of_three_processes_of_one_agent_handles_a_share_of_a_three_partition_topic() {
    every_process_of_an_agent_handles_events(3).await;
}

#[tokio::test]
async fn a_webhook_asking_to_retry_after_u64_max_seconds_does_not_kill_the_agent() {
    let (receiver, url) = Receiver::start().await;
    let name = format!("patient-{}", uuid::Uuid::new_v4().simple());
    let (app, _c) = app_with_agent(&url, &name).await;
    // Each once killed the lane: 10^13 s overflowed the due time's date arithmetic, and
    // u64::MAX s after a first wait of a second overflowed the Duration addition.
    let asking = [
        ("retry-after-10000000000000", "1"),
        ("retry-after-1-then-max", "2"),
        ("retry-after-max", "1"),
    ];
    for (description, _) in asking {
        assert_eq!(app.post(&task("k", description)).await.status(), 200);
    }
    // Same key: the same lane, behind them.
    assert_eq!(app.post(&task("k", "after")).await.status(), 200);
    receiver.wait_for(1, Duration::from_secs(60)).await;
    assert_eq!(receiver.descriptions(), ["after"]);
    // The events wait in the retry topic, due after the longest wait agentbus grants.
    let retry = records(&app, &format!("{}{name}.retry", app.prefix), asking.len()).await;
    let clamp = chrono::Duration::from_std(agentbus::consume::MAX_RETRY_AFTER).unwrap();
    let now = chrono::Utc::now();
    let mut attempts = Vec::new();
    for r in &retry {
        let due = header(r, "agentbus-not-before").unwrap();
        let due = chrono::DateTime::parse_from_rfc3339(&due).unwrap().to_utc();
        assert!(
            due <= now + clamp && due > now + clamp - chrono::Duration::minutes(5),
            "due {due}, now {now}"
        );
        attempts.push(header(r, "agentbus-attempts").unwrap());
    }
    let expected: Vec<&str> = asking.iter().map(|(_, a)| *a).collect();
    assert_eq!(attempts, expected);
    assert_eq!(app.get("/readyz").await.status(), 200);
    // And the agent goes on.
    assert_eq!(app.post(&task("k", "later")).await.status(), 200);
    receiver.wait_for(2, Duration::from_secs(60)).await;
}

#[tokio::test]
async fn an_agent_whose_lane_fails_makes_readyz_answer_503_naming_it() {
    let (receiver, url) = Receiver::start().await;
    let name = format!("fragile-{}", uuid::Uuid::new_v4().simple());
    let (app, _c) = app_with_agent(&url, &name).await;
    assert_eq!(app.post(&task("k", "before")).await.status(), 200);
    receiver.wait_for(1, Duration::from_secs(60)).await;
    assert_eq!(app.get("/readyz").await.status(), 200);

    agentbus::consume::fault::panic_next_event_of(&name);
    assert_eq!(app.post(&task("k", "boom")).await.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    let body: Value = loop {
        let answer = app.get("/readyz").await;
        if answer.status() == 503 {
            break answer.json().await.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still 200 after the agent's lane panicked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body["checks"]["agents"], false, "{body}");
    let why = body["failed_agents"][&name].as_str().unwrap_or_default();
    assert!(why.contains("injected fault"), "{body}");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("agentbus_agent_failures_total")
                && l.contains(&name)
                && l.ends_with(" 1")),
        "{metrics}"
    );
    // The API stays up: publishing still works, the events wait for the agent.
    assert_eq!(app.post(&task("k", "later")).await.status(), 200);
}

#[tokio::test]
async fn an_event_handled_twice_keeps_its_first_follow_up_and_a_replayed_one_makes_a_new_one() {
    let (receiver, url) = Receiver::start().await;
    let name = format!("repeat-{}", uuid::Uuid::new_v4().simple());
    let consumers = tempfile::tempdir().unwrap();
    std::fs::write(
        consumers.path().join("repeat.toml"),
        format!(
            "name = \"{name}\"\nsubscribe = [\"agent.task.requested\"]\n\
             [handler]\nkind = \"webhook\"\nurl = \"{url}\"\n"
        ),
    )
    .unwrap();
    // The agent forgets what it handled after a second: a copy of a record then comes to
    // it as a redelivery after a crash would (handled, but its dedup record lost).
    let app = spawn(Options {
        consumers_dir: Some(consumers.path().to_path_buf()),
        extra: vec!["--dedup-ttl".into(), "1s".into()],
        ..Options::default()
    })
    .await;
    let topic = app.topic("agent");
    let dlq = format!("{}{name}.dlq", app.prefix);
    assert_eq!(app.post(&task("k", "follow-varying")).await.status(), 200);
    receiver.wait_for(1, Duration::from_secs(60)).await;
    let first = records(&app, &topic, 2).await;
    let original = first
        .iter()
        .find(|r| header(r, "ce_type").as_deref() == Some("agent.task.requested"))
        .unwrap()
        .clone();
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &app.brokers)
        .create()
        .unwrap();
    let copy = |replay: Option<&str>| {
        let extra: Vec<(&str, String)> = replay
            .map(|r| vec![("agentbus-replay-id", r.to_string())])
            .unwrap_or_default();
        let headers = agentbus::consume::copied_headers(&original, &[], &extra);
        let (producer, original, topic) = (producer.clone(), original.clone(), topic.clone());
        async move {
            let record = agentbus::consume::copy_of(&original, &topic, headers)
                .partition(original.partition());
            producer
                .send(record, Duration::from_secs(10))
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    };
    let completed = |records: &[rdkafka::message::OwnedMessage]| -> Vec<String> {
        records
            .iter()
            .filter(|r| header(r, "ce_type").as_deref() == Some("agent.task.completed"))
            .map(|r| header(r, "ce_idempotencykey").unwrap())
            .collect()
    };
    // A time-to-live is a matter of time: past it, the key is forgotten.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The same event again, then a marker behind it in its partition and lane.
    copy(None).await;
    assert_eq!(app.post(&task("k", "marker")).await.status(), 200);
    receiver.wait_for(3, Duration::from_secs(60)).await;
    let (brokers, t) = (app.brokers.clone(), topic.clone());
    let count = tokio::task::spawn_blocking(move || record_count(&brokers, &t))
        .await
        .unwrap();
    // The request, its first follow-up, the copy and the marker: no second follow-up.
    assert_eq!(count, 4, "a follow-up was written for the repeat");
    let (brokers, d) = (app.brokers.clone(), dlq.clone());
    let dead = tokio::task::spawn_blocking(move || record_count(&brokers, &d))
        .await
        .unwrap();
    assert_eq!(dead, 0, "the repeat was dead-lettered");

    // A replay of it is handled anew: a new follow-up.
    copy(Some("replay-1")).await;
    assert_eq!(app.post(&task("k", "marker-2")).await.status(), 200);
    receiver.wait_for(5, Duration::from_secs(60)).await;
    let all = records(&app, &topic, 7).await;
    let keys = completed(&all);
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(
        keys.iter().any(|k| k.contains("replay-1")),
        "the replay's follow-up is a new event: {keys:?}"
    );
    let (brokers, d) = (app.brokers.clone(), dlq.clone());
    let dead = tokio::task::spawn_blocking(move || record_count(&brokers, &d))
        .await
        .unwrap();
    assert_eq!(dead, 0, "the replay was dead-lettered");
}

#[tokio::test]
async fn a_retry_record_claiming_u32_max_attempts_gets_its_last_attempt_and_is_dead_lettered() {
    let (receiver, url) = Receiver::start().await;
    let name = format!("counted-{}", uuid::Uuid::new_v4().simple());
    let (app, _c) = app_with_agent(&url, &name).await;
    let dlq = format!("{}{name}.dlq", app.prefix);
    assert_eq!(app.post(&task("k", "poison")).await.status(), 200);
    // Handled after the poison one: by then the dead-letter topic exists and holds it.
    assert_eq!(app.post(&task("k", "marker")).await.status(), 200);
    receiver.wait_for(1, Duration::from_secs(60)).await;
    let first = records(&app, &dlq, 1).await;
    // The same event as a retry record (under another key, so not a duplicate) whose
    // attempts header says u32::MAX: counting on from it once overflowed.
    let extra = vec![
        ("agentbus-attempts", u32::MAX.to_string()),
        ("ce_idempotencykey", "counted-again".to_string()),
        (
            "agentbus-not-before",
            agentbus::envelope::format_time(&chrono::Utc::now()),
        ),
    ];
    let headers = agentbus::consume::copied_headers(&first[0], &[], &extra);
    let retry = format!("{}{name}.retry", app.prefix);
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &app.brokers)
        .create()
        .unwrap();
    producer
        .send(
            agentbus::consume::copy_of(&first[0], &retry, headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let dead = records(&app, &dlq, 2).await;
    let attempts: Vec<Option<String>> = dead
        .iter()
        .map(|d| header(d, "agentbus-attempts"))
        .collect();
    // The policy allows 4: the claimed count is clamped so that one attempt is left.
    assert!(attempts.contains(&Some("4".into())), "{attempts:?}");
    assert_eq!(app.get("/readyz").await.status(), 200);
}

/// A handler that sets a key of its own on one follow-up: handled again, the conflict on the
/// other (derived) key still means "handled before", not a dead letter.
#[tokio::test]
async fn an_event_handled_twice_with_a_handler_keyed_follow_up_is_not_dead_lettered() {
    let (receiver, url) = Receiver::start().await;
    let name = format!("keyed-{}", uuid::Uuid::new_v4().simple());
    let consumers = tempfile::tempdir().unwrap();
    std::fs::write(
        consumers.path().join("keyed.toml"),
        format!(
            "name = \"{name}\"\nsubscribe = [\"agent.task.requested\"]\n\
             [handler]\nkind = \"webhook\"\nurl = \"{url}\"\n"
        ),
    )
    .unwrap();
    let app = spawn(Options {
        consumers_dir: Some(consumers.path().to_path_buf()),
        extra: vec!["--dedup-ttl".into(), "1s".into()],
        ..Options::default()
    })
    .await;
    let topic = app.topic("agent");
    let dlq = format!("{}{name}.dlq", app.prefix);
    assert_eq!(
        app.post(&task("k", "follow-varying-keyed")).await.status(),
        200
    );
    receiver.wait_for(1, Duration::from_secs(60)).await;
    // The request and its two follow-ups.
    let first = records(&app, &topic, 3).await;
    let original = first
        .iter()
        .find(|r| header(r, "ce_type").as_deref() == Some("agent.task.requested"))
        .unwrap()
        .clone();
    // Past the dedup time-to-live the copy below is handled again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &app.brokers)
        .create()
        .unwrap();
    let headers = agentbus::consume::copied_headers(&original, &[], &[]);
    let record =
        agentbus::consume::copy_of(&original, &topic, headers).partition(original.partition());
    producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    assert_eq!(app.post(&task("k", "marker")).await.status(), 200);
    receiver.wait_for(3, Duration::from_secs(60)).await;
    let (brokers, t) = (app.brokers.clone(), topic.clone());
    let count = tokio::task::spawn_blocking(move || record_count(&brokers, &t))
        .await
        .unwrap();
    // The request, its two follow-ups, the copy and the marker.
    assert_eq!(count, 5, "a follow-up was written again");
    let (brokers, d) = (app.brokers.clone(), dlq.clone());
    let dead = tokio::task::spawn_blocking(move || record_count(&brokers, &d))
        .await
        .unwrap();
    assert_eq!(dead, 0, "the repeat was dead-lettered");
}
