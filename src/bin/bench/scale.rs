//! `agentbus-bench scale`: throughput of 1, 2, 3 `agentbus agent run` processes of one agent
//! (competing consumers) on a 3-partition topic, with a webhook that takes a fixed time per
//! event and one event in flight per process, so that the scaling shows on a 2-core machine.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use agentbus::config::KafkaArgs;
use anyhow::{Context, bail};
use futures::{StreamExt, stream};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::Value;

use super::service::{self, Process};

#[derive(Clone, clap::Args)]
pub struct ScaleArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// The agentbus binary.
    #[arg(long, default_value = "target/release/agentbus")]
    agentbus: PathBuf,
    /// Process counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 3])]
    processes: Vec<usize>,
    /// Rounds; each measures every process count once, on topics and a group of its own.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// What the webhook takes per event.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    handler_time: Duration,
    /// How long the throughput is measured once the group is stable.
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Events published before the processes start (a backlog the window must not exhaust).
    #[arg(long, default_value_t = 4000)]
    events: usize,
    /// The agent's name, to which `-n<processes>-r<round>` is added (a group of its own per
    /// measurement). Its topics (`<name>.retry`, `<name>.replay`) sort before the events topic
    /// `knowledge.events` with the default, as for 4 of the 6 sample agents.
    #[arg(long, default_value = "bench-scale")]
    agent: String,
}

/// Decodes the consumer protocol's assignment (version, [topic, [partition]], user data) of
/// a group member: topic → partitions.
fn assignment(bytes: &[u8]) -> Option<BTreeMap<String, Vec<i32>>> {
    let mut at = 0;
    let take = |at: &mut usize, n: usize| -> Option<&[u8]> {
        let s = bytes.get(*at..*at + n)?;
        *at += n;
        Some(s)
    };
    let i32_at =
        |at: &mut usize| -> Option<i32> { Some(i32::from_be_bytes(take(at, 4)?.try_into().ok()?)) };
    take(&mut at, 2)?; // version
    let mut topics = BTreeMap::new();
    for _ in 0..i32_at(&mut at)?.max(0) {
        let len = i16::from_be_bytes(take(&mut at, 2)?.try_into().ok()?).max(0) as usize;
        let name = String::from_utf8_lossy(take(&mut at, len)?).into_owned();
        let mut partitions = Vec::new();
        for _ in 0..i32_at(&mut at)?.max(0) {
            partitions.push(i32_at(&mut at)?);
        }
        partitions.sort_unstable();
        topics.insert(name, partitions);
    }
    Some(topics)
}

/// Client id → topic → partitions.
type Members = BTreeMap<String, BTreeMap<String, Vec<i32>>>;

/// The group's members once it is Stable with `n` members and every one of the `partitions`
/// of its topics assigned (a cooperative rebalance is Stable in between, with the partitions
/// taken from one member not yet given to another).
fn stable_members(
    client: &BaseConsumer,
    group: &str,
    n: usize,
    partitions: usize,
) -> Option<Members> {
    let list = client
        .fetch_group_list(Some(group), Duration::from_secs(5))
        .ok()?;
    let info = list.groups().first()?;
    if info.state() != "Stable" || info.members().len() != n {
        return None;
    }
    let members: Members = info
        .members()
        .iter()
        .map(|m| Some((m.client_id().to_string(), assignment(m.assignment()?)?)))
        .collect::<Option<_>>()?;
    let assigned: BTreeSet<(&String, &i32)> = members
        .values()
        .flat_map(|topics| {
            topics
                .iter()
                .flat_map(|(t, ps)| ps.iter().map(move |p| (t, p)))
        })
        .collect();
    (assigned.len() == partitions).then_some(members)
}

/// Partitions of the agent's topics (events, retry, replay) under `prefix`.
fn topic_partitions(client: &BaseConsumer, prefix: &str, agent: &str) -> anyhow::Result<usize> {
    let metadata = client.fetch_metadata(None, Duration::from_secs(10))?;
    let ours = [
        format!("{prefix}knowledge.events"),
        format!("{prefix}{agent}.retry"),
        format!("{prefix}{agent}.replay"),
    ];
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| ours.contains(&t.name().to_string()))
        .map(|t| t.partitions().len())
        .sum())
}

/// Waits until the group of `n` processes is stable (the same complete assignment twice in a
/// row, a second apart); its members.
async fn wait_stable(
    admin: &BaseConsumer,
    kafka: &KafkaArgs,
    agent: &str,
    n: usize,
) -> anyhow::Result<Members> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = None;
    loop {
        let now = tokio::task::block_in_place(|| -> anyhow::Result<Option<Members>> {
            let partitions = topic_partitions(admin, &kafka.topic_prefix, agent)?;
            Ok(stable_members(admin, agent, n, partitions))
        })?;
        if let Some(members) = &now
            && now == last
        {
            return Ok(members.clone());
        }
        if Instant::now() > deadline {
            bail!(
                "the group of {n} processes was not stable with every partition assigned within 90 s"
            );
        }
        last = now;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// "p1: knowledge.events [0, 1, 2], bench-scale.retry [0]; p2: ..." without the prefix.
fn describe(members: &BTreeMap<String, BTreeMap<String, Vec<i32>>>, prefix: &str) -> String {
    members
        .iter()
        .map(|(client, topics)| {
            let owned: Vec<String> = topics
                .iter()
                .filter(|(_, p)| !p.is_empty())
                .map(|(t, p)| format!("{} {p:?}", t.strip_prefix(prefix).unwrap_or(t)))
                .collect();
            let owned = if owned.is_empty() {
                "nothing".to_string()
            } else {
                owned.join(", ")
            };
            format!(
                "{}: {owned}",
                client.strip_prefix("bench-scale-").unwrap_or(client)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// One measurement: `n` processes; events/s of each.
async fn measure(
    args: &ScaleArgs,
    n: usize,
    round: usize,
    counts: &[Arc<AtomicU64>],
    hook: &str,
) -> anyhow::Result<Vec<f64>> {
    let kafka = KafkaArgs {
        topic_prefix: format!("{}s{n}r{round}.", args.kafka.topic_prefix),
        ..args.kafka.clone()
    };
    // The backlog, published through agentbus (so the records are what agents really read),
    // keys spread over the topic's 3 partitions.
    {
        let serve = Process::serve(&args.agentbus, &kafka, None, true).await?;
        let client = reqwest::Client::new();
        let endpoint = format!("{}/v1/events", serve.url);
        let bodies: Vec<Value> = (0..args.events)
            .collect::<Vec<_>>()
            .chunks(100)
            .map(|chunk| Value::Array(chunk.iter().map(|i| super::event(*i)).collect()))
            .collect();
        let mut posts = stream::iter(bodies)
            .map(|body| {
                let (client, endpoint) = (&client, &endpoint);
                async move {
                    client
                        .post(endpoint)
                        .json(&body)
                        .send()
                        .await?
                        .error_for_status()
                        .map(|_| ())
                }
            })
            .buffer_unordered(8);
        while let Some(r) = posts.next().await {
            r.context("publishing the backlog")?;
        }
    }
    // The processes start one after the other, each once the group of those before it is
    // stable (as when a running agent is scaled out), so that the join order is the same in
    // every round.
    let dir = service::temp_dir("scale")?;
    // A group of its own for every measurement (no members left over from the last one).
    let agent = format!("{}-n{n}-r{round}", args.agent);
    let admin: BaseConsumer = kafka.client_config().create()?;
    let mut processes = Vec::new();
    let mut members = Members::new();
    for i in 0..n {
        let consumers = dir.join(format!("consumers-{i}"));
        std::fs::create_dir_all(&consumers)?;
        // The same agent in every process; only the webhook's path differs, so that the
        // bench can tell which process handled an event.
        std::fs::write(
            consumers.join("agent.toml"),
            format!(
                "name = \"{}\"\nsubscribe = [\"knowledge.shared\"]\nconcurrency = 1\n[handler]\nkind = \"webhook\"\nurl = \"{hook}/{i}\"\ntimeout = \"10s\"\n",
                agent
            ),
        )?;
        processes.push(Process::agent_run(
            &args.agentbus,
            &kafka,
            &agent,
            &consumers,
            &[(
                "AGENTBUS_KAFKA_CLIENT_ID",
                format!("bench-scale-p{}", i + 1),
            )],
        )?);
        members = wait_stable(&admin, &kafka, &agent, i + 1).await?;
    }
    let before: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let started = Instant::now();
    tokio::time::sleep(args.window).await;
    let seconds = started.elapsed().as_secs_f64();
    let rates: Vec<f64> = counts
        .iter()
        .zip(&before)
        .take(n)
        .map(|(c, b)| (c.load(Ordering::Relaxed) - b) as f64 / seconds)
        .collect();
    let handled: u64 = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    drop(processes);
    let _ = std::fs::remove_dir_all(&dir);
    for c in counts {
        c.store(0, Ordering::Relaxed);
    }
    let total: f64 = rates.iter().sum();
    let each: Vec<String> = rates.iter().map(|r| format!("{r:.1}")).collect();
    println!(
        "  round {round}, {n} process{}: {total:>6.1} events/s (each: {})",
        if n == 1 { "" } else { "es" },
        each.join(", ")
    );
    println!(
        "      assignment: {}",
        describe(&members, &kafka.topic_prefix)
    );
    if handled as usize >= args.events {
        println!(
            "      the backlog of {} events ran out: raise --events",
            args.events
        );
    }
    Ok(rates)
}

pub async fn scale(args: ScaleArgs) -> anyhow::Result<()> {
    let most = args.processes.iter().copied().max().unwrap_or(1);
    let counts: Vec<Arc<AtomicU64>> = (0..most).map(|_| Arc::new(AtomicU64::new(0))).collect();
    // The webhook: /hook/{process} takes --handler-time, then answers 200.
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook = format!("http://{}/hook", receiver.local_addr()?);
    {
        let (counts, pause) = (counts.clone(), args.handler_time);
        let app = axum::Router::new().route(
            "/hook/{process}",
            axum::routing::post(
                move |axum::extract::Path(process): axum::extract::Path<usize>| {
                    let counts = counts.clone();
                    async move {
                        tokio::time::sleep(pause).await;
                        if let Some(c) = counts.get(process) {
                            c.fetch_add(1, Ordering::Relaxed);
                        }
                        "ok"
                    }
                },
            ),
        );
        tokio::spawn(async move { axum::serve(receiver, app).await });
    }
    println!(
        "agent scaling: `agentbus agent run {}` x N on a 3-partition topic, webhook taking {:?} per event, concurrency 1 per process (ideal: {:.0} events/s per process), {:?} windows once the group is stable, {} cores",
        args.agent,
        args.handler_time,
        1.0 / args.handler_time.as_secs_f64(),
        args.window,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut totals: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut idle: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for round in 0..args.rounds {
        for &n in &args.processes {
            let rates = measure(&args, n, round, &counts, &hook).await?;
            for (i, r) in rates.iter().enumerate() {
                if *r == 0.0 {
                    idle.entry(n).or_default().insert(i + 1);
                }
            }
            totals.entry(n).or_default().push(rates.iter().sum());
        }
    }
    println!("agent scaling, median of {} rounds:", args.rounds);
    let base = totals
        .get(&1)
        .map(|v| super::median(v))
        .filter(|b| *b > 0.0);
    for (n, v) in &totals {
        let m = super::median(v);
        let ratio = base.map_or("n/a".to_string(), |b| format!("{:.2}", m / b));
        let idle = idle
            .get(n)
            .map(|p| format!(" (processes that handled nothing in some round: {p:?})"))
            .unwrap_or_default();
        println!(
            "  {n} process{}: {m:>6.1} events/s, ratio to 1: {ratio} (ideal {n}.00){idle}",
            if *n == 1 { " " } else { "es" }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_an_assignment() {
        let mut b = vec![0, 3]; // version 3
        b.extend(2i32.to_be_bytes());
        for (topic, parts) in [("t.events", vec![2i32, 0]), ("a.retry", vec![])] {
            b.extend((topic.len() as i16).to_be_bytes());
            b.extend(topic.as_bytes());
            b.extend((parts.len() as i32).to_be_bytes());
            for p in parts {
                b.extend(p.to_be_bytes());
            }
        }
        b.extend((-1i32).to_be_bytes()); // no user data
        let got = assignment(&b).unwrap();
        assert_eq!(got["t.events"], vec![0, 2]);
        assert!(got["a.retry"].is_empty());
        assert!(assignment(&b[..9]).is_none());
    }
}
