//! `agentbus-bench soak`: a steady publish load for a long time, with the service's memory
//! sampled as it goes.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::json;

#[derive(Clone, clap::Args)]
pub struct SoakArgs {
    #[command(flatten)]
    kafka: agentbus::config::KafkaArgs,
    /// The agentbus binary (started as `agentbus serve` with a topic prefix of its own).
    #[arg(long, default_value = "target/release/agentbus")]
    agentbus: std::path::PathBuf,
    /// Events a second, in batches of `--batch`.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Events per request.
    #[arg(long, default_value_t = 10)]
    batch: usize,
    /// How long (2 minutes by default to keep a run short; the README's long run is `10m`).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Time per report line.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    every: Duration,
}

pub async fn soak(args: SoakArgs) -> anyhow::Result<()> {
    let service = super::Process::serve(&args.agentbus, &args.kafka, None, true).await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let endpoint = Arc::new(format!("{}/v1/events", service.url));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let requests_per_second = (args.rate as f64 / args.batch as f64).max(1.0);
    let period = Duration::from_secs_f64(1.0 / requests_per_second);
    let start = tokio::time::Instant::now();
    let end = start + args.duration;
    let mut next_report = start + args.every;
    let mut last_ok = 0;
    let mut samples = Vec::new();
    println!(
        "soak: {} events/s in batches of {} for {:?}; memory is the service's RSS",
        args.rate, args.batch, args.duration
    );
    println!(
        "{:>8} {:>12} {:>10} {:>10}",
        "minutes", "events/s", "failed", "RSS MiB"
    );
    let mut i: u64 = 0;
    while tokio::time::Instant::now() < end {
        let at = start + period * i as u32;
        tokio::time::sleep_until(at).await;
        let batch: Vec<_> = (0..args.batch)
            .map(|j| {
                json!({"event_type": "knowledge.shared", "source": "soak",
                    "partition_key": format!("agent-{}", j % 64),
                    "data": {"knowledge_id": uuid::Uuid::new_v4().to_string(),
                             "from_agent": "soak", "domain": "soak",
                             "content": "x".repeat(200), "confidence": 0.5}})
            })
            .collect();
        let (client, endpoint, acked, refused) =
            (client.clone(), endpoint.clone(), ok.clone(), failed.clone());
        let n = args.batch as u64;
        tokio::spawn(async move {
            match client.post(endpoint.as_str()).json(&batch).send().await {
                Ok(r) if r.status().is_success() => acked.fetch_add(n, Ordering::Relaxed),
                _ => refused.fetch_add(n, Ordering::Relaxed),
            };
        });
        i += 1;
        if tokio::time::Instant::now() >= next_report {
            let now_ok = ok.load(Ordering::Relaxed);
            let rss = super::status_mib(service.pid(), "VmRSS:");
            samples.push(rss);
            println!(
                "{:>8.1} {:>12.0} {:>10} {:>10.1}",
                start.elapsed().as_secs_f64() / 60.0,
                (now_ok - last_ok) as f64 / args.every.as_secs_f64(),
                failed.load(Ordering::Relaxed),
                rss
            );
            last_ok = now_ok;
            next_report += args.every;
        }
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let first = samples.first().copied().unwrap_or(0.0);
    let last = samples.last().copied().unwrap_or(0.0);
    let max = samples.iter().copied().fold(0.0, f64::max);
    println!(
        "sustained {:.0} events/s for {:?}: {ok} acknowledged, {failed} failed; RSS first {first:.1} MiB, last {last:.1} MiB, max {max:.1} MiB",
        ok as f64 / args.duration.as_secs_f64(),
        args.duration
    );
    println!(
        "agentbus peak memory (VmHWM): {:.1} MiB",
        service.peak_mib()
    );
    Ok(())
}
