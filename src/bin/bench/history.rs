//! `agentbus-bench replay` and `agentbus-bench lag`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use agentbus::{
    config::KafkaArgs,
    lag::{LagMonitor, LagSettings},
    replay::{self, Progress, Request, Target},
    topics::{self, TopicSpec},
};
use anyhow::bail;
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer},
    producer::{BaseProducer, BaseRecord, FutureProducer, FutureRecord, Producer},
};

#[derive(Clone, clap::Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Records to copy.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Partitions of the source topic.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// Rounds of each copy, each into a topic of its own, in the order raw, replay, replay,
    /// raw, ... so that drifts of the machine weigh on both alike; medians are compared.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

#[derive(Clone, clap::Args)]
pub struct LagArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Consumer groups.
    #[arg(long, default_value_t = 50)]
    groups: usize,
    /// Partitions of the topic they all lag on.
    #[arg(long, default_value_t = 16)]
    partitions: i32,
    /// Rounds, each with a topic and groups of its own; medians are compared.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

async fn topic(kafka: &KafkaArgs, name: &str, partitions: i32) -> anyhow::Result<()> {
    topics::ensure(
        kafka,
        &[TopicSpec {
            name: name.to_string(),
            partitions,
            replication: 1,
            retention: Duration::from_secs(24 * 3600),
            configs: Vec::new(),
        }],
    )
    .await?;
    Ok(())
}

/// Fills `topic` with `n` records of ~300 bytes carrying agentbus's CloudEvents headers,
/// timestamps spread over the last hour.
async fn fill(kafka: &KafkaArgs, topic: &str, n: usize) -> anyhow::Result<()> {
    let producer: FutureProducer = kafka
        .client_config()
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create()?;
    let now = chrono::Utc::now().timestamp_millis();
    let value = vec![b'v'; 300];
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("agent-{}", i % 64);
        let headers = super::cloudevents_headers(i);
        let ts = now - 3_600_000 + (i as i64 * 3_600_000 / n as i64);
        let record = FutureRecord::to(topic)
            .key(&key)
            .payload(&value)
            .headers(headers)
            .timestamp(ts);
        pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
    }
    for p in pending {
        p.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// The baseline: a raw rdkafka consume-and-produce copy of every record of `from`.
fn raw_copy(kafka: &KafkaArgs, from: &str, to: &str, n: usize) -> anyhow::Result<f64> {
    let consumer: BaseConsumer = kafka
        .client_config()
        .set("group.id", format!("bench-copy-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()?;
    let producer: BaseProducer = kafka
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "20")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(from), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition_offset(from, p.id(), Offset::Beginning)?;
    }
    let started = Instant::now();
    consumer.assign(&tpl)?;
    let mut copied = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while copied < n {
        if Instant::now() > deadline {
            bail!("raw copy stalled at {copied} of {n}");
        }
        producer.poll(Duration::ZERO);
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m?;
        let mut record = BaseRecord::<[u8], [u8]>::to(to);
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(v) = m.payload() {
            record = record.payload(v);
        }
        if let Some(h) = m.headers() {
            record = record.headers(h.detach());
        }
        if let Some(ts) = m.timestamp().to_millis() {
            record = record.timestamp(ts);
        }
        let mut record = record;
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(20));
                }
            }
        }
        copied += 1;
    }
    producer.flush(Duration::from_secs(120))?;
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// agentbus's replay (plan + copy, as `agentbus replay --into-topic` runs it).
fn replay_copy(kafka: &KafkaArgs, from: &str, to: &str, n: usize) -> anyhow::Result<f64> {
    let request = Request {
        from: chrono::Utc::now() - chrono::Duration::hours(2),
        until: None,
        topics: vec![from.to_string()],
        event_types: vec![],
        target: Target::Topic(to.to_string()),
        replay_id: None,
    };
    let started = Instant::now();
    let plan = replay::plan(kafka, &request)?;
    let planned = started.elapsed().as_secs_f64();
    let summary = replay::execute(kafka, &request, &plan, Arc::new(Progress::default()), false)?;
    if summary.copied as usize != n {
        bail!("replay copied {} of {n}", summary.copied);
    }
    println!(
        "    replay: planned in {planned:.2} s, copied in {:.2} s",
        summary.seconds
    );
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

pub async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let kafka = &args.kafka;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let source = format!("{}bench-source-{run}", kafka.topic_prefix);
    topic(kafka, &source, args.partitions).await?;
    fill(kafka, &source, args.events).await?;
    let (mut raw, mut ours) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let order = if round % 2 == 0 {
            ["raw", "replay"]
        } else {
            ["replay", "raw"]
        };
        for which in order {
            let target = format!("{}bench-{which}-{round}-{run}", kafka.topic_prefix);
            topic(kafka, &target, args.partitions).await?;
            let (k, s, n) = (kafka.clone(), source.clone(), args.events);
            let rate = tokio::task::spawn_blocking(move || {
                if which == "raw" {
                    raw_copy(&k, &s, &target, n)
                } else {
                    replay_copy(&k, &s, &target, n)
                }
            })
            .await??;
            println!("  round {round}: {which:<6} {rate:>9.0} records/s");
            if which == "raw" {
                raw.push(rate);
            } else {
                ours.push(rate);
            }
        }
        if let (Some(a), Some(b)) = (raw.last(), ours.last()) {
            println!("  round {round}: ratio b/a {:.2}", b / a);
        }
    }
    let (raw, ours) = (super::median(&raw), super::median(&ours));
    println!(
        "replay of {} records with agentbus's headers, {} partitions, median of {} rounds:",
        args.events, args.partitions, args.rounds
    );
    println!("  (a) raw rdkafka consume-and-produce copy: {raw:>9.0} records/s");
    println!("  (b) agentbus replay (plan + copy):        {ours:>9.0} records/s");
    println!("  ratio b/a: {:.2} (target >= 0.7)", ours / raw);
    Ok(())
}

pub async fn lag(args: LagArgs) -> anyhow::Result<()> {
    println!(
        "lag collection, {} groups x {} partitions, every partition lagging at its own record, {} rounds:",
        args.groups, args.partitions, args.rounds
    );
    let (mut cold, mut warm, mut moved) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        println!("  round {round}:");
        let (c, w, m) = lag_round(&args).await?;
        cold.push(c);
        warm.push(w);
        moved.push(m);
    }
    let (cold, warm, moved) = (
        super::median(&cold),
        super::median(&warm),
        super::median(&moved),
    );
    println!("lag collection, median of {} rounds:", args.rounds);
    println!("  first (new clients, every timestamp fetched):       {cold:>6.3} s");
    println!("  next (nothing moved: cached timestamps):            {warm:>6.3} s");
    println!("  after every group committed further (all fetched):  {moved:>6.3} s");
    println!(
        "  slowest: {:.3} s (target < 2 s)",
        cold.max(warm).max(moved)
    );
    Ok(())
}

/// One lag round on a topic and groups of its own: the three collections' seconds.
async fn lag_round(args: &LagArgs) -> anyhow::Result<(f64, f64, f64)> {
    let kafka = &args.kafka;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("{}bench-lag-{run}", kafka.topic_prefix);
    topic(kafka, &name, args.partitions).await?;
    // Every partition gets more records than there are groups, so that each group can sit
    // at its own offset: every (group, partition) lags at a different record.
    let per_partition = args.groups as i64 + 10;
    let producer: FutureProducer = kafka.client_config().set("linger.ms", "5").create()?;
    let now = chrono::Utc::now().timestamp_millis();
    let mut pending = Vec::new();
    for p in 0..args.partitions {
        for i in 0..per_partition {
            let record = FutureRecord::<str, str>::to(&name)
                .partition(p)
                .key("k")
                .payload("v")
                .timestamp(now - (per_partition - i) * 1000);
            pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
        }
    }
    for p in pending {
        p.await?.map_err(|(e, _)| e)?;
    }
    let groups: Vec<String> = (0..args.groups)
        .map(|g| format!("bench-lag-{run}-{g}"))
        .collect();
    let commit_all = |shift: i64| -> anyhow::Result<()> {
        for (g, group) in groups.iter().enumerate() {
            let client: BaseConsumer = kafka.client_config().set("group.id", group).create()?;
            let mut tpl = TopicPartitionList::new();
            for p in 0..args.partitions {
                tpl.add_partition_offset(&name, p, Offset::Offset(g as i64 + shift))?;
            }
            client.commit(&tpl, CommitMode::Sync)?;
        }
        Ok(())
    };
    commit_all(0)?;
    let monitor = LagMonitor::new(
        kafka.clone(),
        LagSettings {
            groups: groups.clone(),
            ..LagSettings::default()
        },
        Vec::new(),
    );
    let time = |label: &str, s: &agentbus::lag::Snapshot| {
        let lagging: usize = s
            .groups
            .iter()
            .map(|g| g.partitions.iter().filter(|p| p.lag > 0).count())
            .sum();
        println!(
            "    {label:<52} {:>6.3} s  ({} groups, {lagging} lagging partitions)",
            s.duration_seconds,
            s.groups.len()
        );
        s.duration_seconds
    };
    let cold = time(
        "first (new clients, every timestamp fetched):",
        &monitor.collect(None).await?,
    );
    let warm = time(
        "next (nothing moved: cached timestamps):",
        &monitor.collect(None).await?,
    );
    commit_all(5)?;
    let moved = time(
        "after every group committed further (all fetched):",
        &monitor.collect(None).await?,
    );
    Ok((cold, warm, moved))
}
