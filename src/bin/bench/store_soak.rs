//! `agentbus-bench store-soak`: the idempotency store alone (no HTTP, no Kafka) written at
//! the soak's rate, this process's RSS sampled: whether sled's memory stays bounded as keys
//! pile up, and what sled's cache setting changes. `--store window` is the store the publish
//! idempotency keys are in (`src/window.rs`: redb, group commit); `--store sled` is sled with
//! the same two trees and a flush per write group, with `--cache-mib` as the cache. Keys are
//! random (UUID v4), as clients' idempotency keys are.

use std::time::{Duration, Instant};

#[derive(Clone, clap::Args)]
pub struct StoreSoakArgs {
    /// `window` (src/window.rs as it is) or `sled` (raw sled, `--cache-mib`).
    #[arg(long, default_value = "window")]
    store: String,
    /// sled's cache_capacity with `--store sled`, MiB.
    #[arg(long, default_value_t = 16)]
    cache_mib: u64,
    /// Keys a second.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Keys per write (a publish request's batch).
    #[arg(long, default_value_t = 10)]
    batch: usize,
    /// How long.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// The store's directory, kept at the end (default: a new one, removed at the end). A
    /// store left by a killed run is opened again, and the open timed: after a crash redb
    /// checks the whole file before it opens.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Time between samples.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    sample: Duration,
}

/// A value as large as an idempotency record: request hash and the first result's JSON.
fn value(i: u64) -> Vec<u8> {
    let mut v = vec![0u8; 32];
    v.extend_from_slice(
        format!(
            "{{\"event_id\":\"{}\",\"event_type\":\"knowledge.shared\",\"event_version\":1,\"topic\":\"knowledge.events\",\"partition\":{},\"offset\":{i},\"duplicate\":false}}",
            uuid::Uuid::now_v7(),
            i % 3
        )
        .as_bytes(),
    );
    v
}

pub async fn store_soak(args: StoreSoakArgs) -> anyhow::Result<()> {
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => super::service::temp_dir("store-soak")?,
    };
    let opening = Instant::now();
    let ttl = Duration::from_secs(24 * 3600);
    let agentbus = match args.store.as_str() {
        "window" => Some(std::sync::Arc::new(agentbus::window::WindowStore::open(
            &dir,
        )?)),
        "sled" => None,
        other => anyhow::bail!("--store {other:?}: window or sled"),
    };
    println!(
        "opened {} in {:.3} s",
        dir.display(),
        opening.elapsed().as_secs_f64()
    );
    let raw = if agentbus.is_none() {
        let db = sled::Config::new()
            .path(&dir)
            .cache_capacity(args.cache_mib * 1024 * 1024)
            .flush_every_ms(None)
            .open()?;
        let entries = db.open_tree("entries")?;
        let by_expiry = db.open_tree("entries_by_expiry")?;
        Some((db, entries, by_expiry))
    } else {
        None
    };
    println!(
        "store-soak: {} ({}), {} keys/s in writes of {} for {:?}",
        args.store,
        if raw.is_some() {
            format!("cache {} MiB", args.cache_mib)
        } else {
            "src/window.rs".into()
        },
        args.rate,
        args.batch,
        args.duration
    );
    println!(
        "{:>8} {:>10} {:>9} {:>10}",
        "seconds", "keys", "RSS MiB", "disk MiB"
    );
    let period = Duration::from_secs_f64(args.batch as f64 / args.rate as f64);
    let start = tokio::time::Instant::now();
    let mut next_sample = Instant::now() + args.sample;
    let mut written = 0u64;
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut tick = 0u64;
    let mut samples = Vec::new();
    while start.elapsed() < args.duration {
        tokio::time::sleep_until(start + period.mul_f64(tick as f64)).await;
        tick += 1;
        let records: Vec<(String, Vec<u8>)> = (0..args.batch as u64)
            .map(|j| {
                let i = written + j;
                (uuid::Uuid::new_v4().to_string(), value(i))
            })
            .collect();
        written += records.len() as u64;
        match (&agentbus, &raw) {
            (Some(store), _) => {
                // As concurrent publishes do: many writes share the writer's commits.
                let store = store.clone();
                in_flight.push(async move { store.put(records, ttl).await });
                while in_flight.len() > 64 {
                    use futures::StreamExt;
                    in_flight.next().await.transpose()?;
                }
            }
            (None, Some((db, entries, by_expiry))) => {
                let expires = agentbus::store::now_ms() + ttl.as_millis() as u64;
                for (key, value) in records {
                    let mut stored = expires.to_be_bytes().to_vec();
                    stored.extend_from_slice(&value);
                    entries.insert(key.as_bytes(), stored)?;
                    let mut index = expires.to_be_bytes().to_vec();
                    index.extend_from_slice(key.as_bytes());
                    by_expiry.insert(index, &[])?;
                }
                db.flush()?;
            }
            _ => unreachable!("one of the two is set"),
        }
        if Instant::now() >= next_sample {
            let rss = super::status_mib(std::process::id(), "VmRSS:");
            let disk = super::soak::disk_bytes(&dir) as f64 / 1048576.0;
            let at = start.elapsed().as_secs_f64();
            println!("{at:>8.0} {written:>10} {rss:>9.1} {disk:>10.1}");
            samples.push((at / 60.0, rss));
            next_sample += args.sample;
        }
    }
    {
        use futures::StreamExt;
        while let Some(r) = in_flight.next().await {
            r?;
        }
    }
    let settled: Vec<(f64, f64)> = samples.iter().copied().filter(|s| s.0 >= 1.0).collect();
    if settled.len() >= 2 {
        println!(
            "after the first minute: RSS min {:.1} MiB, max {:.1} MiB, slope {:+.2} MiB per minute",
            settled.iter().map(|s| s.1).fold(f64::MAX, f64::min),
            settled.iter().map(|s| s.1).fold(0.0, f64::max),
            super::soak::slope(&settled)
        );
    }
    println!(
        "{written} keys written, peak RSS (VmHWM) {:.1} MiB",
        super::status_mib(std::process::id(), "VmHWM:")
    );
    drop(agentbus);
    drop(raw);
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
