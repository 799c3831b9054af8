//! `agentbus-bench soak`: a steady publish load for a long time, with the service's memory
//! sampled every few seconds: the series, then a summary of everything after the first
//! minute (min, max, least-squares slope), which is what "flat" is judged on.

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
    /// Events a second, in batches of `--batch` (issue 13: 5 000).
    #[arg(long, env = "AGENTBUS_BENCH_SOAK_RATE", default_value_t = 5000)]
    rate: u64,
    /// Events per request.
    #[arg(long, env = "AGENTBUS_BENCH_SOAK_BATCH", default_value_t = 10)]
    batch: usize,
    /// How long (issue 13: 10 minutes; `--duration 2m` for a short run).
    #[arg(long, env = "AGENTBUS_BENCH_SOAK_DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Time between two samples of the service's memory.
    #[arg(long, env = "AGENTBUS_BENCH_SOAK_SAMPLE", default_value = "5s", value_parser = humantime::parse_duration)]
    sample: Duration,
    /// Samples before this are left out of the summary (start-up, caches filling).
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// The target for the service's RSS after `--settle`, MiB.
    #[arg(long, default_value_t = 64.0)]
    target_mib: f64,
}

/// One sample: seconds since the start, RSS MiB, idempotency keys held, store size on disk.
#[derive(Clone, Copy)]
struct Sample {
    at: f64,
    rss: f64,
    keys: f64,
    disk_mib: f64,
}

/// Bytes of the files under `dir`.
pub fn disk_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The least-squares slope of `y` over `x`.
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let num: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let den: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if den == 0.0 { 0.0 } else { num / den }
}

/// The value of an unlabelled gauge in a Prometheus scrape.
fn gauge(scrape: &str, name: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

pub async fn soak(args: SoakArgs) -> anyhow::Result<()> {
    let service = super::Process::serve(&args.agentbus, &args.kafka, None, true).await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(30))
        .build()?;
    let endpoint = Arc::new(format!("{}/v1/events", service.url));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let requests_per_second = (args.rate as f64 / args.batch as f64).max(1.0);
    let period = Duration::from_secs_f64(1.0 / requests_per_second);
    let start = tokio::time::Instant::now();
    let end = start + args.duration;
    println!(
        "soak: {} events/s in batches of {} for {:?}; the service's RSS, idempotency keys and store size every {:?}",
        args.rate, args.batch, args.duration, args.sample
    );
    println!(
        "{:>8} {:>10} {:>8} {:>9} {:>10} {:>10}",
        "seconds", "acked/s", "failed", "RSS MiB", "keys", "disk MiB"
    );
    // The sampler runs on its own task, so the load's timing does not move it.
    let sampler = {
        let (ok, failed, client) = (ok.clone(), failed.clone(), client.clone());
        let (pid, metrics, data) = (
            service.pid(),
            format!("{}/metrics", service.url),
            service.data_dir(),
        );
        let every = args.sample;
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut next = start + every;
            let mut last_ok = 0;
            while next <= end + Duration::from_millis(1) {
                tokio::time::sleep_until(next).await;
                let rss = super::status_mib(pid, "VmRSS:");
                let scrape = match client.get(&metrics).send().await {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                let keys = gauge(&scrape, agentbus::telemetry::IDEMPOTENCY_KEYS).unwrap_or(0.0);
                let disk_mib = disk_bytes(&data.join("idempotency")) as f64 / 1048576.0;
                let now_ok = ok.load(Ordering::Relaxed);
                let at = start.elapsed().as_secs_f64();
                println!(
                    "{at:>8.0} {:>10.0} {:>8} {rss:>9.1} {keys:>10.0} {disk_mib:>10.1}",
                    (now_ok - last_ok) as f64 / every.as_secs_f64(),
                    failed.load(Ordering::Relaxed),
                );
                last_ok = now_ok;
                samples.push(Sample {
                    at,
                    rss,
                    keys,
                    disk_mib,
                });
                next += every;
            }
            samples
        })
    };
    let reasons = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    let mut i: u64 = 0;
    while tokio::time::Instant::now() < end {
        let at = start + period.mul_f64(i as f64);
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
        let (client, endpoint, acked, refused, reasons) = (
            client.clone(),
            endpoint.clone(),
            ok.clone(),
            failed.clone(),
            reasons.clone(),
        );
        let n = args.batch as u64;
        tokio::spawn(async move {
            let reason = match client.post(endpoint.as_str()).json(&batch).send().await {
                Ok(r) if r.status().is_success() => {
                    acked.fetch_add(n, Ordering::Relaxed);
                    return;
                }
                Ok(r) => super::refusal(r).await,
                Err(e) => format!("{e}"),
            };
            refused.fetch_add(n, Ordering::Relaxed);
            *reasons.lock().unwrap().entry(reason).or_insert(0u64) += 1;
        });
        i += 1;
    }
    let samples = sampler.await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "sent {} events ({:.0}/s) for {:?}: {ok} acknowledged, {failed} failed",
        i * args.batch as u64,
        (i * args.batch as u64) as f64 / args.duration.as_secs_f64(),
        args.duration
    );
    for (reason, n) in reasons.lock().unwrap().iter() {
        println!("  failed {n} requests: {reason}");
    }
    let settled: Vec<Sample> = samples
        .iter()
        .copied()
        .filter(|s| s.at >= args.settle.as_secs_f64())
        .collect();
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        println!(
            "RSS: first sample {:.1} MiB, last {:.1} MiB; idempotency keys {:.0} at the end, store on disk {:.1} MiB",
            first.rss, last.rss, last.keys, last.disk_mib
        );
    }
    if settled.len() >= 2 {
        let min = settled.iter().map(|s| s.rss).fold(f64::MAX, f64::min);
        let max = settled.iter().map(|s| s.rss).fold(0.0, f64::max);
        let per_minute = slope(
            &settled
                .iter()
                .map(|s| (s.at / 60.0, s.rss))
                .collect::<Vec<_>>(),
        );
        println!(
            "after the first {:?}: RSS min {min:.1} MiB, max {max:.1} MiB, slope {per_minute:+.2} MiB per minute ({} samples; target max <= {:.0} MiB and flat)",
            args.settle,
            settled.len(),
            args.target_mib
        );
    } else {
        println!(
            "fewer than 2 samples after the first {:?}: run longer for the summary",
            args.settle
        );
    }
    println!(
        "agentbus peak memory (VmHWM): {:.1} MiB",
        service.peak_mib()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_slope_of_a_line_and_of_a_flat_series() {
        let line: Vec<(f64, f64)> = (0..10).map(|x| (x as f64, 3.0 * x as f64 + 1.0)).collect();
        assert!((super::slope(&line) - 3.0).abs() < 1e-9);
        assert_eq!(super::slope(&[(0.0, 5.0), (1.0, 5.0), (2.0, 5.0)]), 0.0);
        assert_eq!(super::slope(&[(1.0, 2.0)]), 0.0);
    }
}
