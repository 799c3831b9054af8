//! A webhook receiver that plays an agent's endpoint in tests, and agent definitions for it.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::State, http::HeaderMap, response::IntoResponse, routing::post};
use rdkafka::Message;
use serde_json::{Value, json};

use super::{Options, TestApp, header, read_records, spawn, unique_prefix};

/// What the receiver got: the CloudEvent and its headers.
#[derive(Clone, Debug)]
pub struct Received {
    pub event: Value,
    pub headers: HashMap<String, String>,
}

#[derive(Clone, Default)]
pub struct Receiver {
    pub got: Arc<Mutex<Vec<Received>>>,
    pub attempts: Arc<Mutex<HashMap<String, u32>>>,
    /// Once set, `poison` is accepted too.
    pub cured: Arc<std::sync::atomic::AtomicBool>,
    /// Until set, `held` events get no answer (then 400, like `poison`).
    pub released: Arc<std::sync::atomic::AtomicBool>,
}

/// Behaviour by the task's description: `fail-N` fails N times with 503, `poison` answers
/// 400, `held` answers 400 once `released` is set, `follow` answers with a follow-up event,
/// `follow-varying-keyed` with that and one more under a key of its own (same body each time),
/// `follow-varying` with one whose body differs each time the same event comes (its
/// `duration_ms` counts the deliveries), `slow` takes 100 ms, `sleep-N` takes N ms (a
/// handler with a fixed time per event, for benchmarks), `retry-after-N` answers 503 with
/// `Retry-After: N`, `retry-after-max` with `Retry-After: 18446744073709551615` (u64::MAX
/// seconds), `retry-after-1-then-max` with 1 the first time and u64::MAX after; anything
/// else 200.
async fn receive(
    State(r): State<Receiver>,
    headers: HeaderMap,
    Json(event): Json<Value>,
) -> axum::response::Response {
    let description = event["data"]["description"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let id = event["id"].as_str().unwrap_or("").to_string();
    let attempt = {
        let mut attempts = r.attempts.lock().unwrap();
        let a = attempts.entry(id.clone()).or_insert(0);
        *a += 1;
        *a
    };
    if description == "slow" {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(ms) = description.strip_prefix("sleep-")
        && let Ok(ms) = ms.parse()
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let retry_after = match description.as_str() {
        "retry-after-max" => Some(u64::MAX.to_string()),
        "retry-after-1-then-max" if attempt == 1 => Some("1".into()),
        "retry-after-1-then-max" => Some(u64::MAX.to_string()),
        d => d.strip_prefix("retry-after-").map(str::to_string),
    };
    if let Some(retry_after) = retry_after {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", retry_after)],
            "come back later",
        )
            .into_response();
    }
    if let Some(n) = description.strip_prefix("fail-")
        && attempt <= n.parse().unwrap()
    {
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not yet").into_response();
    }
    if description == "held" {
        while !r.released.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        return (axum::http::StatusCode::BAD_REQUEST, "released").into_response();
    }
    if description == "poison" && !r.cured.load(std::sync::atomic::Ordering::SeqCst) {
        return (axum::http::StatusCode::BAD_REQUEST, "never").into_response();
    }
    let headers = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    r.got.lock().unwrap().push(Received {
        event: event.clone(),
        headers,
    });
    if description == "follow" {
        let completed = json!({"events": [{
            "event_type": "agent.task.completed",
            "data": {"task_id": event["data"]["task_id"], "agent_id": event["data"]["agent_id"],
                     "status": "succeeded", "result": "done", "duration_ms": 5}
        }]});
        return Json(completed).into_response();
    }
    if description == "follow-varying-keyed" {
        // One follow-up whose body varies (its key derived by agentbus) and one with a key
        // of the handler's own and the same body each time.
        let completed = json!({"events": [{
            "event_type": "agent.task.completed",
            "data": {"task_id": event["data"]["task_id"], "agent_id": event["data"]["agent_id"],
                     "status": "succeeded", "result": format!("delivery {attempt}"),
                     "duration_ms": attempt}
        }, {
            "event_type": "agent.task.completed",
            "idempotency_key": format!("own-{}", event["data"]["task_id"].as_str().unwrap_or("")),
            "data": {"task_id": event["data"]["task_id"], "agent_id": event["data"]["agent_id"],
                     "status": "succeeded", "result": "same", "duration_ms": 1}
        }]});
        return Json(completed).into_response();
    }
    if description == "follow-varying" {
        let completed = json!({"events": [{
            "event_type": "agent.task.completed",
            "data": {"task_id": event["data"]["task_id"], "agent_id": event["data"]["agent_id"],
                     "status": "succeeded", "result": format!("delivery {attempt}"),
                     "duration_ms": attempt}
        }]});
        return Json(completed).into_response();
    }
    Json(json!({})).into_response()
}

impl Receiver {
    pub async fn start() -> (Receiver, String) {
        let r = Receiver::default();
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(r.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (r, url)
    }

    pub fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    pub fn descriptions(&self) -> Vec<String> {
        self.got()
            .iter()
            .map(|r| r.event["data"]["description"].as_str().unwrap().to_string())
            .collect()
    }

    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.got();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} events arrived: {:?}",
                got.len(),
                self.descriptions()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn agent_file(dir: &Path, name: &str, url: &str, extra: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join(format!("{name}.toml")),
        format!(
            "name = \"{name}\"\nsubscribe = [\"agent.task.*\"]\nconcurrency = 4\n{extra}\n\
             [handler]\nkind = \"webhook\"\nurl = \"{url}\"\ntimeout = \"5s\"\n\
             [retry]\nattempts = 4\ninitial_backoff = \"50ms\"\nmax_backoff = \"200ms\"\nmax_hold = \"2s\"\n"
        ),
    )
    .unwrap();
}

pub fn task(agent_id: &str, description: &str) -> Value {
    json!({
        "event_type": "agent.task.requested", "source": "planner", "partition_key": agent_id,
        "data": {"task_id": uuid::Uuid::new_v4(), "agent_id": agent_id, "description": description},
        "metadata": {"correlation_id": format!("corr-{description}")}
    })
}

pub async fn app_with_agent(url: &str, name: &str) -> (TestApp, tempfile::TempDir) {
    app_with_agent_on(url, name, unique_prefix()).await
}

/// As [`app_with_agent`], on topics of `prefix` (created or written to beforehand).
pub async fn app_with_agent_on(
    url: &str,
    name: &str,
    prefix: String,
) -> (TestApp, tempfile::TempDir) {
    let consumers = tempfile::tempdir().unwrap();
    agent_file(consumers.path(), name, url, "");
    let app = spawn(Options {
        prefix,
        consumers_dir: Some(consumers.path().to_path_buf()),
        ..Options::default()
    })
    .await;
    (app, consumers)
}

/// `read_records` off the runtime's thread: the agent under test may run on it.
pub async fn records(app: &TestApp, topic: &str, n: usize) -> Vec<rdkafka::message::OwnedMessage> {
    let (brokers, topic) = (app.brokers.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || read_records(&brokers, &topic, n))
        .await
        .unwrap()
}

/// The `ce_type` and decoded `data` of `n` records of `topic` (as `read_records` reads
/// them), each decoded with the schema the registry serves for its id.
pub async fn decoded(app: &TestApp, topic: &str, n: usize) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for r in records(app, topic, n).await {
        let (id, body) = agentbus::schema::split_wire(r.payload().unwrap()).unwrap();
        let served: Value = app.get_json(&format!("/registry/schemas/ids/{id}")).await;
        let ce_type = header(&r, "ce_type").unwrap();
        let version =
            agentbus::schema::SchemaVersion::parse(&ce_type, 1, served["schema"].as_str().unwrap())
                .unwrap();
        let value = agentbus::schema::decode_avro(&version.schema, body).unwrap();
        out.push((ce_type, agentbus::schema::avro_to_json(&version, &value)));
    }
    out
}

/// Creates `topic` with `partitions` partitions (before the service would, with its own
/// count).
pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let answers = admin
        .create_topics([&new], &AdminOptions::new())
        .await
        .unwrap();
    answers[0].as_ref().unwrap();
}

/// Waits until consumer group `group` is stable with `members` members. On tansu, which has
/// no DescribeGroups, the group cannot be seen: it waits out a rebalance instead (the
/// members' 6 s session timeout and a heartbeat or two), and the tests' own assertions,
/// each with its deadline, judge the outcome.
pub async fn wait_for_stable_group(brokers: &str, group: &str, members: usize, timeout: Duration) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    if super::broker_quirks().quirks().no_describe_groups {
        tokio::time::sleep(Duration::from_secs(10).min(timeout)).await;
        return;
    }
    let (brokers, group) = (brokers.to_string(), group.to_string());
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            if let Ok(list) = client.fetch_group_list(Some(&group), Duration::from_secs(5))
                && let Some(g) = list.groups().first()
            {
                if g.state() == "Stable" && g.members().len() == members {
                    return;
                }
                last = format!("{} with {} members", g.state(), g.members().len());
            }
            assert!(
                Instant::now() < deadline,
                "group {group} not stable with {members} members: {last}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await
    .unwrap();
}
