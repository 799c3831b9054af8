//! `agentbus-bench`: the load generator behind `ops/bench.sh`. Every figure is measured
//! against baselines in the same run, on the same broker: raw librdkafka and, for publish and
//! consume, Kafka's own perf tools (kafka-producer-perf-test, kafka-consumer-perf-test).
//! Every round has topics of its own; the figures are medians over the rounds.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use agentbus::{
    config::KafkaArgs,
    topics::{self, TopicSpec},
};
use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures::{StreamExt, stream};
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use serde_json::{Value, json};

#[path = "bench/callgrind.rs"]
mod callgrind;
#[path = "bench/history.rs"]
mod history;
#[path = "bench/kafka_tools.rs"]
mod kafka_tools;
#[path = "bench/overload.rs"]
mod overload;
#[path = "bench/scale.rs"]
mod scale;
#[path = "bench/service.rs"]
mod service;
#[path = "bench/soak.rs"]
mod soak;
#[path = "bench/store_soak.rs"]
mod store_soak;

use kafka_tools::ToolArgs;
use service::Process;

#[derive(Parser)]
#[command(about = "agentbus benchmarks (run through ops/bench.sh)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish throughput (raw producer, kafka-producer-perf-test, agentbus over HTTP) and
    /// single-event latency.
    Publish(PublishArgs),
    /// Consume throughput (raw consumer, kafka-consumer-perf-test, an agent with a no-op
    /// handler and its dedup store) and publish-to-handler latency.
    Consume(ConsumeArgs),
    /// Replay throughput (agentbus replay vs a raw consume-and-produce copy).
    Replay(history::ReplayArgs),
    /// Time of one lag collection over many groups and partitions.
    Lag(history::LagArgs),
    /// A steady publish load for a long time, with the service's memory sampled.
    Soak(soak::SoakArgs),
    /// Throughput of 1, 2, 3 `agentbus agent run` processes of one agent.
    Scale(scale::ScaleArgs),
    /// Single-event publishes at twice the sustainable rate, open loop: what is accepted,
    /// what is refused, and how fast.
    Overload(overload::OverloadArgs),
    /// The idempotency store alone at the soak's rate, memory sampled (sled's cache).
    StoreSoak(store_soak::StoreSoakArgs),
    /// The work `ops/bench.sh callgrind` counts under valgrind: `publish` or `agent`.
    Callgrind(callgrind::CallgrindArgs),
    /// Instructions and allocator calls of a callgrind dump (for `ops/bench.sh callgrind`).
    CallgrindCount {
        /// The dump.
        file: PathBuf,
        /// Functions of the largest self cost listed after the first line.
        #[arg(long, default_value_t = 0)]
        top: usize,
    },
}

#[derive(Clone, clap::Args)]
struct ConsumeArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    tools: ToolArgs,
    /// The agentbus binary: the service that publishes and the agent process.
    #[arg(long, default_value = "target/release/agentbus")]
    agentbus: PathBuf,
    /// Events to consume per throughput round. 20 000 (the default until 2026-12-08) flatter
    /// the agent: a raw consumer reads them in about 0.15 s, most of it its first fetches,
    /// and measured 110k–170k events/s where it reads 500k–600k/s over 100 000 or more.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Throughput rounds, each on topics of its own.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Events per second of the latency runs (comma-separated; issue 13: 1 000).
    #[arg(long, env = "AGENTBUS_BENCH_CONSUME_RATE", value_delimiter = ',', default_values_t = [1000])]
    rate: Vec<u64>,
    /// Duration of each latency round.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    latency_duration: Duration,
    /// The latency rounds at each rate, in order: `a` the raw baseline, `b` agentbus (`abba`
    /// weighs drifts of the machine on both alike).
    #[arg(long, default_value = "ab", value_parser = parse_rounds)]
    latency_rounds: String,
    /// Also print each agentbus latency round's largest latency per 250 events, in the
    /// order they arrived: where in the round the slow ones were (one stall, or many).
    #[arg(long)]
    latency_series: bool,
    /// Which part to run: `throughput`, `latency` or `both`.
    #[arg(long, default_value = "both")]
    part: String,
    /// Pid of the broker, to report its CPU use during the latency runs.
    #[arg(long)]
    broker_pid: Option<u32>,
}

#[derive(Clone, clap::Args)]
struct PublishArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    tools: ToolArgs,
    /// The agentbus binary (a fresh `agentbus serve` with a topic prefix of its own per round).
    #[arg(long, default_value = "target/release/agentbus")]
    agentbus: PathBuf,
    /// Events per throughput run.
    #[arg(long, default_value_t = 50_000)]
    events: usize,
    /// Rounds; each runs every side once on topics of its own, in a rotating order.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Events per HTTP batch.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// HTTP requests in flight during the throughput run.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Requests per second of the single-event latency run (issue 13: 1 000).
    #[arg(long, env = "AGENTBUS_BENCH_PUBLISH_RATE", default_value_t = 1000)]
    rate: u64,
    /// Duration of the latency run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    latency_duration: Duration,
    /// Deliveries the raw producer keeps outstanding.
    #[arg(long, default_value_t = 10_000)]
    raw_in_flight: usize,
    /// Partitions of the baseline topics (match the service's).
    #[arg(long, default_value_t = 3)]
    partitions: i32,
}

/// "HTTP 503 broker_unavailable: the service is at its limit..." of an error answer: the
/// status, the contract's code and the message up to its first digit (so that answers that
/// differ only in figures count as one reason).
async fn refusal(response: reqwest::Response) -> String {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let message = body["error"]["message"].as_str().unwrap_or("");
    let message: String = message
        .chars()
        .take_while(|c| !c.is_ascii_digit())
        .collect();
    format!(
        "HTTP {status} {}: {}",
        body["error"]["code"].as_str().unwrap_or("?"),
        message.trim_end()
    )
}

/// The median of some values (0 for none).
fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

/// ~300 bytes of Avro: the content string dominates.
fn event(i: usize) -> Value {
    json!({
        "event_type": "knowledge.shared",
        "source": "bench",
        "event_id": uuid::Uuid::now_v7().to_string(),
        "partition_key": format!("agent-{}", i % 64),
        "data": {
            "knowledge_id": uuid::Uuid::new_v4().to_string(),
            "from_agent": format!("agent-{}", i % 64),
            "domain": "benchmarks",
            "content": CONTENT,
            "confidence": 0.9
        }
    })
}

/// [`event`] as its JSON text, written straight into a buffer: the load generators of the
/// overload bench send many thousands a second from the two cores the service runs on, and
/// building a `Value` and serialising it per request cost them more CPU than the rest of
/// sending it.
pub(crate) fn event_json(i: usize) -> Vec<u8> {
    let agent = i % 64;
    format!(
        concat!(
            r#"{{"event_type":"knowledge.shared","source":"bench","event_id":"{}","#,
            r#""partition_key":"agent-{}","data":{{"knowledge_id":"{}","from_agent":"agent-{}","#,
            r#""domain":"benchmarks","content":"{}","confidence":0.9}}}}"#
        ),
        uuid::Uuid::now_v7(),
        agent,
        uuid::Uuid::new_v4(),
        agent,
        CONTENT
    )
    .into_bytes()
}

/// The content string of [`event`]: 220 × "x".
const CONTENT: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

/// The CloudEvents headers agentbus puts on a record (CONTRACT.md §3), for the baseline
/// that writes the same records.
fn cloudevents_headers(i: usize) -> OwnedHeaders {
    let id = uuid::Uuid::now_v7().to_string();
    let header = |key, value| Header {
        key,
        value: Some(value),
    };
    OwnedHeaders::new_with_capacity(8)
        .insert(header("ce_specversion", "1.0"))
        .insert(header("ce_id", &id))
        .insert(header("ce_type", "knowledge.shared"))
        .insert(header("ce_source", "bench"))
        .insert(header("ce_time", "2026-11-21T10:30:00.000Z"))
        .insert(header("content-type", "application/avro"))
        .insert(header("ce_eventversion", "1"))
        .insert(header("ce_idempotencykey", &format!("bench-{i}")))
}

/// A fresh topic `<prefix><what>-<uuid>` for a raw baseline, with the service's partitions.
async fn raw_topic(args: &PublishArgs, what: &str) -> anyhow::Result<String> {
    let topic = format!(
        "{}{what}-{}",
        args.kafka.topic_prefix,
        uuid::Uuid::new_v4().simple()
    );
    topics::ensure(
        &args.kafka,
        &[TopicSpec {
            name: topic.clone(),
            partitions: args.partitions,
            replication: 1,
            retention: Duration::from_secs(3600),
            configs: Vec::new(),
        }],
    )
    .await?;
    Ok(topic)
}

async fn raw_producer(args: &PublishArgs, with_headers: bool) -> anyhow::Result<f64> {
    let topic = raw_topic(args, "bench-raw").await?;
    let producer: FutureProducer = args
        .kafka
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .create()?;
    let value = vec![b'v'; 300];
    let started = Instant::now();
    let mut sends = stream::iter(0..args.events)
        .map(|i| {
            let producer = &producer;
            let topic = &topic;
            let value = &value;
            async move {
                let key = format!("agent-{}", i % 64);
                let mut record = FutureRecord::to(topic).key(&key).payload(value);
                if with_headers {
                    record = record.headers(cloudevents_headers(i));
                }
                producer
                    .send(record, Duration::from_secs(30))
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| e)
            }
        })
        .buffer_unordered(args.raw_in_flight);
    while let Some(result) = sends.next().await {
        result.context("raw produce")?;
    }
    Ok(args.events as f64 / started.elapsed().as_secs_f64())
}

async fn agentbus_batches(
    args: &PublishArgs,
    client: &reqwest::Client,
    url: &str,
) -> anyhow::Result<f64> {
    let endpoint = format!("{url}/v1/events");
    let bodies: Vec<Value> = (0..args.events)
        .collect::<Vec<_>>()
        .chunks(args.batch)
        .map(|chunk| Value::Array(chunk.iter().map(|i| event(*i)).collect()))
        .collect();
    let started = Instant::now();
    let mut posts = stream::iter(bodies)
        .map(|body| {
            let endpoint = &endpoint;
            async move {
                let response = client.post(endpoint).json(&body).send().await?;
                if !response.status().is_success() {
                    bail!("HTTP {}: {}", response.status(), response.text().await?);
                }
                Ok(())
            }
        })
        .buffer_unordered(args.concurrency);
    while let Some(result) = posts.next().await {
        result?;
    }
    Ok(args.events as f64 / started.elapsed().as_secs_f64())
}

/// The baseline of the single-event run: a raw librdkafka producer with the settings of
/// agentbus's single-event producer ([`agentbus::publish::single_producer_config`]) writes one
/// record (agentbus's headers, ~300 bytes) at a time at `--rate`, open loop; latency from the
/// scheduled send to the acknowledgement. Sorted p50, p99, p99.9 and failures.
async fn raw_single_latency(args: &PublishArgs) -> anyhow::Result<(f64, f64, f64, usize)> {
    let topic = raw_topic(args, "bench-single-raw").await?;
    let producer: FutureProducer =
        agentbus::publish::single_producer_config(&args.kafka, Duration::from_secs(5)).create()?;
    let value = Arc::new(vec![b'v'; 300]);
    // Warm-up: connections and metadata, outside the measurement.
    for i in 0..20 {
        let record = FutureRecord::to(&topic)
            .key("warm-up")
            .payload(value.as_slice())
            .headers(cloudevents_headers(i));
        producer
            .send(record, Duration::from_secs(5))
            .await
            .map_err(|(e, _)| e)?;
    }
    let total = (args.rate as f64 * args.latency_duration.as_secs_f64()) as usize;
    let period = Duration::from_secs_f64(1.0 / args.rate as f64);
    let start = tokio::time::Instant::now();
    let mut handles = Vec::with_capacity(total);
    for i in 0..total {
        let at = start + period * i as u32;
        tokio::time::sleep_until(at).await;
        let (producer, topic, value) = (producer.clone(), topic.clone(), value.clone());
        handles.push(tokio::spawn(async move {
            let key = format!("agent-{}", i % 64);
            let record = FutureRecord::to(&topic)
                .key(&key)
                .payload(value.as_slice())
                .headers(cloudevents_headers(i));
            let sent = producer.send(record, Duration::from_secs(5)).await;
            (at.elapsed(), sent.is_err())
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    let mut failures = 0;
    for h in handles {
        let (elapsed, failed) = h.await?;
        failures += usize::from(failed);
        latencies.push(elapsed.as_secs_f64() * 1000.0);
    }
    let (p50, p99, p999) = tail(latencies);
    Ok((p50, p99, p999, failures))
}

/// Open-loop single-event publishes at a fixed rate: latency measured from the scheduled
/// send time, so a slow answer cannot hide the queueing it causes.
async fn latency(
    args: &PublishArgs,
    client: &reqwest::Client,
    url: &str,
) -> anyhow::Result<(f64, f64, f64, usize)> {
    let endpoint = Arc::new(format!("{url}/v1/events"));
    let total = (args.rate as f64 * args.latency_duration.as_secs_f64()) as usize;
    let period = Duration::from_secs_f64(1.0 / args.rate as f64);
    let start = tokio::time::Instant::now();
    let mut handles = Vec::with_capacity(total);
    for i in 0..total {
        let at = start + period * i as u32;
        tokio::time::sleep_until(at).await;
        let client = client.clone();
        let endpoint = endpoint.clone();
        handles.push(tokio::spawn(async move {
            let response = client.post(endpoint.as_str()).json(&event(i)).send().await;
            let outcome = match response {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => Some(refusal(r).await),
                Err(e) => Some(format!("{e}")),
            };
            (at.elapsed(), outcome)
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    let mut failures = 0;
    let mut reasons = std::collections::BTreeMap::new();
    for h in handles {
        let (elapsed, outcome) = h.await?;
        if let Some(reason) = outcome {
            failures += 1;
            *reasons.entry(reason).or_insert(0) += 1;
        }
        latencies.push(elapsed.as_secs_f64() * 1000.0);
    }
    for (reason, n) in &reasons {
        println!("  failed {n}x: {reason}");
    }
    let (p50, p99, p999) = tail(latencies);
    Ok((p50, p99, p999, failures))
}

/// The perf tool's topic (created like the raw producer's) and its rate.
async fn perf_producer(args: &PublishArgs) -> anyhow::Result<kafka_tools::ProducerPerf> {
    let topic = format!(
        "{}bench-perf-{}",
        args.kafka.topic_prefix,
        uuid::Uuid::new_v4().simple()
    );
    topics::ensure(
        &args.kafka,
        &[TopicSpec {
            name: topic.clone(),
            partitions: args.partitions,
            replication: 1,
            retention: Duration::from_secs(3600),
            configs: Vec::new(),
        }],
    )
    .await?;
    args.tools
        .producer_perf(&args.kafka.brokers, &topic, args.events, 300)
        .await
}

async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()?;
    // Medians over the rounds: raw, raw with headers, perf tool, agentbus; CPU µs per event.
    let (mut raw, mut raw_headers, mut perf, mut ours) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut raw_cpu, mut cpu) = (Vec::new(), Vec::new());
    let mut perf_mb = Vec::new();
    let mut last = None;
    println!(
        "publish throughput, {} events of ~300 bytes per side and round, {} rounds (each on topics of its own, rotating order), {} cores:",
        args.events,
        args.rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for round in 0..args.rounds {
        let kafka = KafkaArgs {
            topic_prefix: format!("{}r{round}.", args.kafka.topic_prefix),
            ..args.kafka.clone()
        };
        let round_args = PublishArgs {
            kafka,
            ..args.clone()
        };
        let service = Process::serve(&args.agentbus, &round_args.kafka, None, true).await?;
        // Warm up both paths (connections, metadata, the broker) outside the measurement.
        let warm = PublishArgs {
            events: 2_000,
            ..round_args.clone()
        };
        raw_producer(&warm, true).await?;
        agentbus_batches(&warm, &client, &service.url).await?;
        let mut sides = vec!["raw", "raw+headers", "perf-tool", "agentbus"];
        if !args.tools.enabled() {
            sides.retain(|s| *s != "perf-tool");
        }
        let turn = round % sides.len();
        sides.rotate_left(turn);
        let mut line = Vec::new();
        for side in sides {
            match side {
                "raw" => {
                    let before = cpu_seconds(std::process::id());
                    let r = raw_producer(&round_args, false).await?;
                    if let (Some(b), Some(a)) = (before, cpu_seconds(std::process::id())) {
                        raw_cpu.push((a - b) / args.events as f64 * 1e6);
                    }
                    raw.push(r);
                    line.push(format!("raw {r:.0}"));
                }
                "raw+headers" => {
                    let r = raw_producer(&round_args, true).await?;
                    raw_headers.push(r);
                    line.push(format!("raw+headers {r:.0}"));
                }
                "perf-tool" => {
                    let p = perf_producer(&round_args).await?;
                    perf.push(p.records_per_sec);
                    perf_mb.push(p.mb_per_sec);
                    line.push(format!(
                        "perf-tool {:.0} ({:.2} MB/s)",
                        p.records_per_sec, p.mb_per_sec
                    ));
                }
                _ => {
                    let before = cpu_seconds(service.pid());
                    let r = agentbus_batches(&round_args, &client, &service.url).await?;
                    if let (Some(b), Some(a)) = (before, cpu_seconds(service.pid())) {
                        cpu.push((a - b) / args.events as f64 * 1e6);
                    }
                    ours.push(r);
                    line.push(format!("agentbus {r:.0}"));
                }
            }
        }
        println!(
            "  round {round}: {} events/s; b/a {:.2}",
            line.join(", "),
            ours.last().copied().unwrap_or(0.0) / raw.last().copied().unwrap_or(f64::NAN)
        );
        last = Some(service);
    }
    let (raw, raw_headers, perf, ours) = (
        median(&raw),
        median(&raw_headers),
        median(&perf),
        median(&ours),
    );
    println!("publish throughput, median of {} rounds:", args.rounds);
    println!("  (a)  raw rdkafka producer (idempotent, acks=all):          {raw:>9.0} events/s");
    println!(
        "  (a') the same with agentbus's 8 CloudEvents headers:       {raw_headers:>9.0} events/s"
    );
    if args.tools.enabled() {
        println!(
            "  (k)  kafka-producer-perf-test (acks=all, idempotent):      {perf:>9.0} events/s ({:.2} MB/s)",
            median(&perf_mb)
        );
    }
    println!(
        "  (b)  agentbus HTTP, JSON batches of {} x{} in flight:     {ours:>9.0} events/s",
        args.batch, args.concurrency
    );
    println!("  ratio b/a:  {:.2} (target >= 0.5)", ours / raw);
    println!(
        "  ratio b/a': {:.2} (same records on the wire)",
        ours / raw_headers
    );
    if args.tools.enabled() {
        println!(
            "  ratio b/k:  {:.2} (Kafka's own producer tool)",
            ours / perf
        );
        println!(
            "  ratio a/k:  {:.2} (raw librdkafka against Kafka's tool)",
            raw / perf
        );
    }
    if !raw_cpu.is_empty() && !cpu.is_empty() {
        println!(
            "  CPU per event: raw producer {:.0} µs, agentbus {:.0} µs",
            median(&raw_cpu),
            median(&cpu)
        );
    }
    let service = last.context("no rounds")?;
    // The floor first: what librdkafka itself takes for one record at the same rate, with the
    // producer settings agentbus uses for single events.
    let (r50, r99, r999, raw_failures) = raw_single_latency(&args).await?;
    println!(
        "raw producer, single records at {}/s for {:?} (agentbus's single-event producer settings): p50 {r50:.1} ms, p99 {r99:.1} ms, p99.9 {r999:.1} ms, {raw_failures} failed",
        args.rate, args.latency_duration
    );
    let (p50, p99, p999, failures) = latency(&args, &client, &service.url).await?;
    println!(
        "single-event publish at {}/s for {:?}: p50 {p50:.1} ms, p99 {p99:.1} ms, p99.9 {p999:.1} ms, {failures} failed (target p50 <= 2 ms, p99 <= 5 ms, none failed)",
        args.rate, args.latency_duration
    );
    println!(
        "  above the raw producer: p50 +{:.1} ms, p99 +{:.1} ms",
        p50 - r50,
        p99 - r99
    );
    println!(
        "agentbus peak memory (VmHWM, last round's service): {:.1} MiB",
        service.peak_mib()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    agentbus::telemetry::init_logging(
        &std::env::var("AGENTBUS_LOG").unwrap_or_else(|_| "warn".into()),
        false,
    );
    match Cli::parse().command {
        Command::Consume(args) => consume(args).await?,
        Command::Replay(args) => history::replay(args).await?,
        Command::Lag(args) => history::lag(args).await?,
        Command::Soak(args) => soak::soak(args).await?,
        Command::Scale(args) => scale::scale(args).await?,
        Command::Overload(args) => overload::overload(args).await?,
        Command::Callgrind(args) => callgrind::callgrind(args).await?,
        Command::StoreSoak(args) => store_soak::store_soak(args).await?,
        Command::CallgrindCount { file, top } => {
            let counts = callgrind::count(&file)?;
            println!("{} {}", counts.instructions, counts.allocations);
            for (name, cost) in counts.by_function.iter().take(top) {
                println!(
                    "{cost:>14} ({:>4.1}%)  {name}",
                    *cost as f64 * 100.0 / counts.instructions.max(1) as f64
                );
            }
        }
        Command::Publish(args) => publish(args).await?,
    }
    Ok(())
}

/// User + system CPU seconds of a process, from /proc.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A plain consumer in a new group of its own (named `<prefix>-<uuid>`), from the oldest
/// record, with the short group timeouts the tests use (a killed member leaves quickly).
fn raw_group_consumer(
    kafka: &KafkaArgs,
    prefix: &str,
) -> anyhow::Result<rdkafka::consumer::BaseConsumer> {
    Ok(kafka
        .client_config()
        .set("group.id", format!("{prefix}-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .create()?)
}

/// Resident memory figures from `/proc/<pid>/status` (`field` such as `VmHWM:`), in MiB;
/// 0 when the process is gone.
pub(crate) fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Remembers when the consumer first got partitions assigned.
#[derive(Default)]
struct AssignedAt(std::sync::Mutex<Option<Instant>>);

impl rdkafka::ClientContext for AssignedAt {}

impl rdkafka::consumer::ConsumerContext for AssignedAt {
    fn post_rebalance(
        &self,
        _: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        if let rdkafka::consumer::Rebalance::Assign(_) = rebalance {
            self.0.lock().unwrap().get_or_insert_with(Instant::now);
        }
    }
}

/// A raw consumer's rates, events/s: from its partitions' assignment to the last record (what
/// kafka-consumer-perf-test's fetch rate measures), and over its whole run, from `subscribe`
/// on (group join included, as that tool's overall rate).
#[derive(Clone, Copy)]
struct RawRate {
    from_assignment: f64,
    whole: f64,
}

/// Reads `n` records of `topics` with a plain consumer in a new group.
fn raw_consume(kafka: &KafkaArgs, topics: &[&str], n: usize) -> anyhow::Result<RawRate> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer<AssignedAt> = kafka
        .client_config()
        .set("group.id", format!("bench-raw-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .create_with_context(AssignedAt::default())?;
    let subscribed = Instant::now();
    consumer.subscribe(topics)?;
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while seen < n {
        if Instant::now() > deadline {
            bail!("raw consumer read only {seen} of {n}");
        }
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            m?;
            seen += 1;
        }
    }
    let assigned = consumer
        .context()
        .0
        .lock()
        .unwrap()
        .context("records read before any assignment")?;
    Ok(RawRate {
        from_assignment: n as f64 / assigned.elapsed().as_secs_f64(),
        whole: n as f64 / subscribed.elapsed().as_secs_f64(),
    })
}

/// Latencies in ms, sorted, and how many were sent: the baseline of the publish-to-handler
/// run. A raw producer writes single records at `rate` (each with agentbus's headers, its
/// CreateTime the send time) while a raw consumer in a group of its own reads them.
async fn raw_latency(
    kafka: &KafkaArgs,
    rate: u64,
    duration: Duration,
    round: usize,
    processes: &[(&'static str, Option<u32>)],
) -> anyhow::Result<(Vec<f64>, usize, String)> {
    use rdkafka::consumer::Consumer;
    let topic = format!("{}bench-latency-raw-{rate}-{round}", kafka.topic_prefix);
    topics::ensure(
        kafka,
        &[TopicSpec {
            name: topic.clone(),
            partitions: 3,
            replication: 1,
            retention: Duration::from_secs(3600),
            configs: Vec::new(),
        }],
    )
    .await?;
    let total = (rate as f64 * duration.as_secs_f64()) as usize;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (joined_tx, joined_rx) = tokio::sync::oneshot::channel();
    let (warm_tx, warm_rx) = tokio::sync::oneshot::channel();
    let reader = {
        let (kafka, topic, stop) = (kafka.clone(), topic.clone(), stop.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<f64>> {
            let consumer = raw_group_consumer(&kafka, "bench-latency-raw")?;
            consumer.subscribe(&[&topic])?;
            let mut joined = Some(joined_tx);
            let mut warm = Some(warm_tx);
            let mut latencies = Vec::with_capacity(total);
            while latencies.len() < total && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let message = consumer.poll(Duration::from_millis(100));
                if joined.is_some() && consumer.assignment().is_ok_and(|a| a.count() > 0) {
                    let _ = joined.take().expect("checked").send(());
                }
                if let Some(m) = message {
                    use rdkafka::Message;
                    let m = m?;
                    // Warm-up records are not measured: the agent is warm too when measured.
                    if m.key() == Some(b"warm-up".as_slice()) {
                        if let Some(warm) = warm.take() {
                            let _ = warm.send(());
                        }
                        continue;
                    }
                    let sent = m.timestamp().to_millis().unwrap_or(0);
                    latencies.push((chrono::Utc::now().timestamp_millis() - sent) as f64);
                }
            }
            Ok(latencies)
        })
    };
    tokio::time::timeout(Duration::from_secs(60), joined_rx)
        .await
        .context("the raw latency consumer did not join its group within 60 s")?
        .context("the raw latency consumer stopped before it joined")?;
    let producer: FutureProducer =
        agentbus::publish::producer_config(kafka, Duration::from_secs(5)).create()?;
    let value = vec![b'v'; 300];
    for i in 0..10 {
        let record = FutureRecord::to(&topic)
            .key(b"warm-up".as_slice())
            .payload(&value)
            .headers(cloudevents_headers(i));
        producer
            .send(record, Duration::from_secs(5))
            .await
            .map_err(|(e, _)| e)?;
    }
    tokio::time::timeout(Duration::from_secs(60), warm_rx)
        .await
        .context("the raw latency consumer read no warm-up record within 60 s")?
        .context("the raw latency consumer stopped before the warm-up")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // CPU from the first measured send to the last record read, as for agentbus.
    let cpu = CpuMeter::start(processes);
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    let mut sends = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until(start + period * i as u32).await;
        let key = format!("p{}", i % 32);
        let record = FutureRecord::to(&topic)
            .key(&key)
            .payload(&value)
            .headers(cloudevents_headers(i))
            .timestamp(chrono::Utc::now().timestamp_millis());
        sends.push(producer.send_result(record).map_err(|(e, _)| e)?);
    }
    let mut sent = 0;
    for s in sends {
        if matches!(s.await, Ok(Ok(_))) {
            sent += 1;
        }
    }
    // The stragglers get 30 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reader.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu = cpu.stop();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut latencies = reader.await??;
    latencies.sort_by(|a, b| a.total_cmp(b));
    Ok((latencies, sent, cpu))
}

/// Single `pattern.learned` events POSTed to agentbus at `rate` for `duration`, each
/// stamped with its send time; how many were accepted.
async fn publish_steadily(
    client: &reqwest::Client,
    endpoint: &str,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<usize> {
    let total = (rate as f64 * duration.as_secs_f64()) as usize;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    let mut sends = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until(start + period * i as u32).await;
        let (client, endpoint) = (client.clone(), endpoint.to_string());
        sends.push(tokio::spawn(async move {
            let body = json!({
                "event_type": "pattern.learned", "source": "bench", "partition_key": format!("p{}", i % 32),
                "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "data": {"pattern_id": uuid::Uuid::new_v4(), "agent_id": "a", "pattern_type": "bench",
                         "description": "latency", "success_rate": 0.5, "sample_size": i as i32}
            });
            match client.post(endpoint).json(&body).send().await {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => Some(refusal(r).await),
                Err(e) => Some(e.to_string()),
            }
        }));
    }
    let mut published = 0;
    let mut reasons = std::collections::BTreeMap::new();
    for s in sends {
        match s.await? {
            None => published += 1,
            Some(why) => *reasons.entry(why).or_insert(0) += 1,
        }
    }
    for (why, n) in reasons {
        println!("      not published {n}x: {why}");
    }
    Ok(published)
}

/// CPU time of some processes over a stretch of wall time.
struct CpuMeter {
    started: Instant,
    before: Vec<(&'static str, u32, f64)>,
}

impl CpuMeter {
    fn start(processes: &[(&'static str, Option<u32>)]) -> Self {
        let before = processes
            .iter()
            .filter_map(|&(name, pid)| {
                let pid = pid?;
                Some((name, pid, cpu_seconds(pid)?))
            })
            .collect();
        CpuMeter {
            started: Instant::now(),
            before,
        }
    }

    /// "name N%, ..." as percent of one core.
    fn stop(self) -> String {
        let wall = self.started.elapsed().as_secs_f64();
        self.before
            .iter()
            .filter_map(|&(name, pid, before)| {
                let used = cpu_seconds(pid)? - before;
                Some(format!("{name} {:.0}%", used / wall * 100.0))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// "what p50 .. ms, p99 .. ms (n of sent delivered)" of sorted latencies.
fn latency_line(what: &str, sorted: &[f64], sent: usize) -> String {
    if sorted.is_empty() {
        return format!("{what} none of {sent} delivered");
    }
    format!(
        "{what} p50 {:>7.1} ms, p99 {:>7.1} ms ({} of {sent} delivered)",
        percentile(sorted, 0.5),
        percentile(sorted, 0.99),
        sorted.len()
    )
}

fn parse_rounds(rounds: &str) -> Result<String, String> {
    if !rounds.is_empty() && rounds.chars().all(|c| c == 'a' || c == 'b') {
        Ok(rounds.to_string())
    } else {
        Err("a string of a (raw baseline) and b (agentbus), such as abba".into())
    }
}

/// p50, p99 and p99.9 of `latencies`.
fn tail(mut latencies: Vec<f64>) -> (f64, f64, f64) {
    latencies.sort_by(|a, b| a.total_cmp(b));
    (
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
    )
}

/// The value at percentile `p` (0..1) of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// The value of `agentbus_events_consumed_total` for a group and outcome in a scrape.
fn consumed(metrics: &str, group: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("agentbus_events_consumed_total{")
                && l.contains(&format!("group=\"{group}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Fills `<prefix>knowledge.events`, the no-op agent's topic, through agentbus (so the
/// records are what agents really read).
async fn fill(client: &reqwest::Client, endpoint: &str, events: usize) -> anyhow::Result<()> {
    let bodies: Vec<Value> = (0..events)
        .collect::<Vec<_>>()
        .chunks(100)
        .map(|chunk| Value::Array(chunk.iter().map(|i| event(*i)).collect()))
        .collect();
    let mut posts = stream::iter(bodies)
        .map(|body| async move {
            client
                .post(endpoint)
                .json(&body)
                .send()
                .await?
                .error_for_status()
                .map(|_| ())
        })
        .buffer_unordered(8);
    while let Some(r) = posts.next().await {
        r?;
    }
    Ok(())
}

/// The no-op agent's rate from its first handled event to the last.
async fn agent_throughput(
    events: usize,
    client: &reqwest::Client,
    metrics_url: &str,
) -> anyhow::Result<f64> {
    let mut first: Option<(Instant, f64)> = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if Instant::now() > deadline {
            bail!("the agent did not consume {events} events in time");
        }
        let Ok(r) = client.get(metrics_url).send().await else {
            continue;
        };
        let count = consumed(&r.text().await?, "bench-noop");
        if count > 0.0 && first.is_none() {
            first = Some((Instant::now(), count));
        }
        if count >= events as f64 {
            let (t0, c0) = first.expect("set above");
            return Ok((count - c0) / t0.elapsed().as_secs_f64());
        }
    }
}

/// What one throughput round measured, events/s.
struct ThroughputRound {
    raw: RawRate,
    perf: Option<kafka_tools::ConsumerPerf>,
    agent: f64,
    agent_peak_mib: f64,
}

/// One throughput round on topics of its own: fill through agentbus, then (a) a raw consumer,
/// (k) kafka-consumer-perf-test and (b) the no-op agent read them (b first in odd rounds).
async fn throughput_round(
    args: &ConsumeArgs,
    round: usize,
    client: &reqwest::Client,
    consumers: &std::path::Path,
) -> anyhow::Result<ThroughputRound> {
    let kafka = KafkaArgs {
        topic_prefix: format!("{}t{round}.", args.kafka.topic_prefix),
        ..args.kafka.clone()
    };
    {
        let service = Process::serve(&args.agentbus, &kafka, None, true).await?;
        fill(client, &format!("{}/v1/events", service.url), args.events).await?;
    }
    let topic = kafka.events_topic("knowledge");
    let mut result = ThroughputRound {
        raw: RawRate {
            from_assignment: 0.0,
            whole: 0.0,
        },
        perf: None,
        agent: 0.0,
        agent_peak_mib: 0.0,
    };
    let mut sides = vec!["raw", "perf-tool", "agent"];
    if !args.tools.enabled() {
        sides.retain(|s| *s != "perf-tool");
    }
    if round % 2 == 1 {
        sides.reverse();
    }
    for side in sides {
        match side {
            "raw" => {
                let (k, t, n) = (kafka.clone(), topic.clone(), args.events);
                result.raw =
                    tokio::task::spawn_blocking(move || raw_consume(&k, &[&t], n)).await??;
            }
            "perf-tool" => {
                result.perf = Some(
                    args.tools
                        .consumer_perf(&kafka.brokers, &topic, args.events)
                        .await?,
                );
            }
            _ => {
                let agent = Process::serve(&args.agentbus, &kafka, Some(consumers), false).await?;
                let metrics = format!("{}/metrics", agent.url);
                result.agent = agent_throughput(args.events, client, &metrics).await?;
                result.agent_peak_mib = agent.peak_mib();
            }
        }
    }
    Ok(result)
}

/// Publish-to-handler latency at each rate, in the order of `--rounds`.
async fn latency_runs(
    args: &ConsumeArgs,
    client: &reqwest::Client,
    endpoint: &str,
    latencies: &Arc<std::sync::Mutex<Vec<f64>>>,
    kafka: &KafkaArgs,
    pids: (u32, u32),
) -> anyhow::Result<()> {
    let (service_pid, agent_pid) = pids;
    // Publish-to-handler latency at steady rates, single events: first the baseline, then
    // agentbus, with the agent process running in both; CPU of every process meanwhile.
    let processes = [
        ("broker", args.broker_pid),
        ("agentbus serve (publishes)", Some(service_pid)),
        ("agent process", Some(agent_pid)),
        ("load generator (this)", Some(std::process::id())),
    ];
    for &rate in &args.rate {
        println!(
            "publish-to-handler latency, single events at {rate}/s for {:?}, rounds {}:",
            args.latency_duration, args.latency_rounds
        );
        let (mut raw_all, mut ours_all) = ((Vec::new(), 0), (Vec::new(), 0));
        let order: Vec<bool> = args.latency_rounds.chars().map(|c| c == 'a').collect();
        for (round, raw) in order.into_iter().enumerate() {
            let (l, sent, cpu) = if raw {
                raw_latency(kafka, rate, args.latency_duration, round, &processes).await?
            } else {
                latencies.lock().unwrap().clear();
                let cpu = CpuMeter::start(&processes);
                let sent = publish_steadily(client, endpoint, rate, args.latency_duration).await?;
                let wait_until = Instant::now() + Duration::from_secs(30);
                while latencies.lock().unwrap().len() < sent && Instant::now() < wait_until {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let cpu = cpu.stop();
                let mut l = latencies.lock().unwrap().clone();
                if args.latency_series {
                    // In the order the handler saw them: a stall shows as a run of high maxima.
                    let maxes: Vec<String> = l
                        .chunks(250)
                        .map(|c| format!("{:.0}", c.iter().copied().fold(0.0, f64::max)))
                        .collect();
                    println!(
                        "      largest latency (ms) per 250 events, in order: {}",
                        maxes.join(" ")
                    );
                }
                l.sort_by(|a, b| a.total_cmp(b));
                (l, sent, cpu)
            };
            let what = if raw {
                "(a) raw producer -> raw consumer:     "
            } else {
                "(b) agentbus HTTP -> agent -> webhook:"
            };
            println!("  {}", latency_line(what, &l, sent));
            println!("      CPU, % of one core: {cpu}");
            let all = if raw { &mut raw_all } else { &mut ours_all };
            all.0.extend(l);
            all.1 += sent;
        }
        println!("  (target for (b): p50 <= 20 ms, p99 <= 100 ms)");
        if args.latency_rounds.len() > 2 {
            for all in [&mut raw_all, &mut ours_all] {
                all.0.sort_by(|a, b| a.total_cmp(b));
            }
            println!(
                "  all rounds {}",
                latency_line("(a):", &raw_all.0, raw_all.1)
            );
            println!(
                "  all rounds {}",
                latency_line("(b):", &ours_all.0, ours_all.1)
            );
        }
    }
    Ok(())
}

async fn consume(args: ConsumeArgs) -> anyhow::Result<()> {
    let (throughput, latency) = match args.part.as_str() {
        "throughput" => (true, false),
        "latency" => (false, true),
        "both" => (true, true),
        other => bail!("--part {other:?}: throughput, latency or both"),
    };
    let client = reqwest::Client::new();
    let dir = service::temp_dir("consume")?;
    let noop = dir.join("noop");
    std::fs::create_dir_all(&noop)?;
    std::fs::write(
        noop.join("noop.toml"),
        "name = \"bench-noop\"\nsubscribe = [\"knowledge.shared\"]\nconcurrency = 8\n[handler]\nkind = \"noop\"\n",
    )?;
    if throughput {
        println!(
            "consume throughput, {} events per round (filled through agentbus), {} rounds on topics of their own, {} cores:",
            args.events,
            args.rounds,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let (mut raw, mut raw_all, mut perf, mut perf_all, mut ours, mut peak) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            0.0f64,
        );
        for round in 0..args.rounds {
            let r = throughput_round(&args, round, &client, &noop).await?;
            let perf_text = r.perf.map_or(String::new(), |p| {
                format!(
                    ", perf-tool {:.0} ({:.0} with its group join)",
                    p.fetch_records_per_sec, p.records_per_sec
                )
            });
            println!(
                "  round {round}: raw {:.0} ({:.0} with its group join){perf_text}, agent {:.0} events/s; b/a {:.2}",
                r.raw.from_assignment,
                r.raw.whole,
                r.agent,
                r.agent / r.raw.from_assignment
            );
            raw.push(r.raw.from_assignment);
            raw_all.push(r.raw.whole);
            if let Some(p) = r.perf {
                perf.push(p.fetch_records_per_sec);
                perf_all.push(p.records_per_sec);
            }
            ours.push(r.agent);
            peak = peak.max(r.agent_peak_mib);
        }
        let (raw, raw_all, perf, perf_all, ours) = (
            median(&raw),
            median(&raw_all),
            median(&perf),
            median(&perf_all),
            median(&ours),
        );
        println!("consume throughput, median of {} rounds:", args.rounds);
        println!(
            "  (a) raw rdkafka consumer, from its assignment:     {raw:>9.0} events/s ({raw_all:.0} over its whole run, group join included)"
        );
        if args.tools.enabled() {
            println!(
                "  (k) kafka-consumer-perf-test, fetch time:          {perf:>9.0} events/s ({perf_all:.0} over its whole run, group join included)"
            );
        }
        println!(
            "  (b) agentbus agent, no-op handler, dedup store:    {ours:>9.0} events/s (first handled event to last)"
        );
        println!("  ratio b/a: {:.2} (target >= 0.5)", ours / raw);
        if args.tools.enabled() {
            println!(
                "  ratio b/k: {:.2} (Kafka's own consumer tool)",
                ours / perf
            );
            println!(
                "  ratio a/k: {:.2} (raw librdkafka against Kafka's tool)",
                raw / perf
            );
        }
        println!("  agent process peak memory (VmHWM): {peak:.1} MiB");
    }
    if latency {
        // A webhook agent whose endpoint (below) measures publish-to-handler latency.
        let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let hook = format!("http://{}/hook", receiver.local_addr()?);
        let latencies = Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
        {
            let latencies = latencies.clone();
            let app = axum::Router::new().route(
                "/hook",
                axum::routing::post(move |axum::Json(ce): axum::Json<Value>| {
                    let latencies = latencies.clone();
                    async move {
                        if let Some(t) = ce["time"]
                            .as_str()
                            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                        {
                            let ms = (chrono::Utc::now() - t.to_utc())
                                .num_microseconds()
                                .unwrap_or(0) as f64
                                / 1000.0;
                            latencies.lock().unwrap().push(ms);
                        }
                        "ok"
                    }
                }),
            );
            tokio::spawn(async move { axum::serve(receiver, app).await });
        }
        let consumers = dir.join("latency");
        std::fs::create_dir_all(&consumers)?;
        std::fs::write(
            consumers.join("latency.toml"),
            format!(
                "name = \"bench-latency\"\nsubscribe = [\"pattern.learned\"]\nconcurrency = 8\n[handler]\nkind = \"webhook\"\nurl = \"{hook}\"\n"
            ),
        )?;
        let kafka = KafkaArgs {
            topic_prefix: format!("{}l.", args.kafka.topic_prefix),
            ..args.kafka.clone()
        };
        let service = Process::serve(&args.agentbus, &kafka, None, true).await?;
        let agent = Process::serve(&args.agentbus, &kafka, Some(&consumers), false).await?;
        let endpoint = format!("{}/v1/events", service.url);
        // Once one event went through, the agent has joined its group.
        let deadline = Instant::now() + Duration::from_secs(120);
        while latencies.lock().unwrap().is_empty() {
            if Instant::now() > deadline {
                bail!("the latency agent handled nothing within 120 s");
            }
            publish_steadily(&client, &endpoint, 10, Duration::from_secs(1)).await?;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        latency_runs(
            &args,
            &client,
            &endpoint,
            &latencies,
            &kafka,
            (service.pid(), agent.pid()),
        )
        .await?;
        println!(
            "peak memory (VmHWM) of the latency runs: agent process {:.1} MiB, agentbus serve {:.1} MiB",
            agent.peak_mib(),
            service.peak_mib()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{CONTENT, Value, event, event_json};

    #[test]
    fn the_event_text_is_the_event_s_json() {
        let text: Value = serde_json::from_slice(&event_json(67)).unwrap();
        let value = event(67);
        for field in ["event_type", "source", "partition_key"] {
            assert_eq!(text[field], value[field], "{field}");
        }
        let (mut a, mut b) = (text["data"].clone(), value["data"].clone());
        assert!(uuid::Uuid::parse_str(text["event_id"].as_str().unwrap()).is_ok());
        assert!(uuid::Uuid::parse_str(a["knowledge_id"].as_str().unwrap()).is_ok());
        a["knowledge_id"] = Value::Null;
        b["knowledge_id"] = Value::Null;
        assert_eq!(a, b);
        assert_eq!(CONTENT.len(), 220);
        assert!(CONTENT.bytes().all(|c| c == b'x'));
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(super::median(&[]), 0.0);
    }
}
