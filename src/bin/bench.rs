//! `agentbus-bench`: the load generator behind `ops/bench.sh`. Every figure is measured
//! against a baseline in the same run, on the same broker: raw librdkafka.

use std::{
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

#[derive(Parser)]
#[command(about = "agentbus benchmarks (run through ops/bench.sh)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish throughput (raw producer vs agentbus over HTTP) and single-event latency.
    Publish(PublishArgs),
}

#[derive(Clone, clap::Args)]
struct PublishArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Base URL of the agentbus under test.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Events per throughput run.
    #[arg(long, default_value_t = 50_000)]
    events: usize,
    /// Events per HTTP batch.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// HTTP requests in flight during the throughput run.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Requests per second of the single-event latency run.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Duration of the latency run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    latency_duration: Duration,
    /// Pid of the agentbus under test, to report its CPU time per event.
    #[arg(long)]
    service_pid: Option<u32>,
    /// Deliveries the raw producer keeps outstanding.
    #[arg(long, default_value_t = 10_000)]
    raw_in_flight: usize,
    /// Partitions of the baseline topic (match the service's).
    #[arg(long, default_value_t = 3)]
    partitions: i32,
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
            "content": "x".repeat(220),
            "confidence": 0.9
        }
    })
}

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

async fn raw_producer(args: &PublishArgs, with_headers: bool) -> anyhow::Result<f64> {
    let topic = format!("bench-raw-{}", uuid::Uuid::new_v4().simple());
    topics::ensure(
        &args.kafka,
        &[TopicSpec {
            name: topic.clone(),
            partitions: args.partitions,
            replication: 1,
            retention: Duration::from_secs(3600),
        }],
    )
    .await?;
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

async fn agentbus_batches(args: &PublishArgs, client: &reqwest::Client) -> anyhow::Result<f64> {
    let endpoint = format!("{}/v1/events", args.url);
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

/// Open-loop single-event publishes at a fixed rate: latency measured from the scheduled
/// send time, so a slow answer cannot hide the queueing it causes.
async fn latency(
    args: &PublishArgs,
    client: &reqwest::Client,
) -> anyhow::Result<(f64, f64, f64, usize)> {
    let endpoint = Arc::new(format!("{}/v1/events", args.url));
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
                Ok(r) => Some(format!("HTTP {}", r.status().as_u16())),
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
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    Ok((pct(0.50), pct(0.99), pct(0.999), failures))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Publish(args) => {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1024)
                .build()?;
            // Warm up both paths (connections, metadata) outside the measurement.
            let warm = PublishArgs {
                events: 2_000,
                ..args.clone()
            };
            raw_producer(&warm, true).await?;
            agentbus_batches(&warm, &client).await?;

            let own_before = cpu_seconds(std::process::id());
            let raw = raw_producer(&args, false).await?;
            let raw_cpu = own_before
                .zip(cpu_seconds(std::process::id()))
                .map(|(before, after)| (after - before) / args.events as f64 * 1e6);
            let raw_headers = raw_producer(&args, true).await?;
            let cpu_before = args.service_pid.and_then(cpu_seconds);
            let ours = agentbus_batches(&args, &client).await?;
            let cpu = cpu_before
                .zip(args.service_pid.and_then(cpu_seconds))
                .map(|(before, after)| (after - before) / args.events as f64 * 1e6);
            println!("publish throughput, {} events of ~300 bytes:", args.events);
            println!(
                "  (a)  raw rdkafka producer (idempotent, acks=all):        {raw:>9.0} events/s"
            );
            println!(
                "  (a') the same with agentbus's 8 CloudEvents headers:       {raw_headers:>9.0} events/s"
            );
            println!(
                "  (b)  agentbus HTTP, JSON batches of {} x{} in flight:     {ours:>9.0} events/s",
                args.batch, args.concurrency
            );
            println!("  ratio b/a:  {:.2} (target >= 0.5)", ours / raw);
            println!(
                "  ratio b/a': {:.2} (same records on the wire)",
                ours / raw_headers
            );
            if let (Some(raw_us), Some(us)) = (raw_cpu, cpu) {
                println!("  CPU per event: raw producer {raw_us:.0} µs, agentbus {us:.0} µs");
            }
            let (p50, p99, p999, failures) = latency(&args, &client).await?;
            println!(
                "single-event publish at {}/s for {:?}: p50 {p50:.1} ms, p99 {p99:.1} ms, p99.9 {p999:.1} ms, {failures} failed (target p99 <= 20 ms)",
                args.rate, args.latency_duration
            );
        }
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
