//! `agentbus-bench overload`: single-event publishes at twice the rate the service sustains,
//! sent open-loop (at fixed times, whatever the answers), first with the service's publish
//! limit (`AGENTBUS_MAX_PUBLISHES_IN_FLIGHT`) and then, for comparison, with the limit lifted:
//! accepted and refused rates, the accepted requests' latency, how fast refusals come, and
//! the service's memory.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use agentbus::config::KafkaArgs;
use futures::{StreamExt, stream};

use super::{Process, percentile};

#[derive(Clone, clap::Args)]
pub struct OverloadArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// The agentbus binary.
    #[arg(long, default_value = "target/release/agentbus")]
    agentbus: std::path::PathBuf,
    /// The rate the service sustains, single events a second; measured first (closed loop,
    /// `--probe-concurrency` requests in flight for `--probe-duration`) when not given.
    #[arg(long, env = "AGENTBUS_BENCH_SUSTAINABLE_RATE")]
    sustainable: Option<f64>,
    /// Requests in flight of the closed-loop run that finds the sustainable rate (enough that
    /// the service's capacity, not the latency, bounds it).
    #[arg(long, default_value_t = 128)]
    probe_concurrency: usize,
    /// Duration of that run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    probe_duration: Duration,
    /// The overload, as a multiple of the sustainable rate.
    #[arg(long, default_value_t = 2.0)]
    factor: f64,
    /// Duration of each overload run.
    #[arg(long, env = "AGENTBUS_BENCH_OVERLOAD_DURATION", default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// The service's publish limit (`AGENTBUS_MAX_PUBLISHES_IN_FLIGHT`); its default when
    /// not given.
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// Also run once with the limit lifted, to show what the service does without it.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    unlimited_too: bool,
    /// Most requests the load generator keeps unanswered, as a client's connection pool
    /// would; beyond, a scheduled request is counted as not sent. Below the service's
    /// connection limit (`AGENTBUS_MAX_CONNECTIONS`, 2048): past it every further request
    /// opens a connection the service refuses at the socket, which costs both sides a
    /// connect and a reset and tells the client nothing (no `Retry-After`). With 8 000 (the
    /// default until 2026-12-08) a run at 2x had 63 406 such failures, refusals answered
    /// p50 622 ms and accepted requests p50 745 ms; with 2 000, none of those failures,
    /// refusals p50 39 ms and accepted p50 259 ms, p99 450 ms.
    #[arg(long, default_value_t = 2000)]
    generator_cap: usize,
}

/// What one request came to.
enum Outcome {
    Accepted(f64),
    Refused(f64, bool),
    Failed(String),
}

/// One open-loop run's results.
struct Run {
    accepted: Vec<f64>,
    refused: Vec<f64>,
    refused_with_retry_after: usize,
    failed: std::collections::BTreeMap<String, usize>,
    not_sent: usize,
    rss_before: f64,
    rss_max: f64,
    rss_after: f64,
    cpu: String,
}

fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(60))
        .build()?)
}

/// Publishes event `i` ([`super::event_json`]).
async fn post_event(
    client: &reqwest::Client,
    endpoint: &str,
    i: usize,
) -> reqwest::Result<reqwest::Response> {
    client
        .post(endpoint)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(super::event_json(i))
        .send()
        .await
}

/// Single-event publishes, `concurrency` in flight, for `duration`: events/s answered 200.
async fn sustainable(
    client: &reqwest::Client,
    endpoint: &str,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let end = Instant::now() + duration;
    let started = Instant::now();
    let ok = AtomicUsize::new(0);
    stream::iter(0..concurrency)
        .for_each_concurrent(concurrency, |worker| {
            let ok = &ok;
            async move {
                let mut i = worker;
                while Instant::now() < end {
                    if let Ok(r) = post_event(client, endpoint, i).await
                        && r.status().is_success()
                    {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    i += concurrency;
                }
            }
        })
        .await;
    Ok(ok.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Open-loop single events at `rate` for `duration`; latency from each request's scheduled
/// time, so that a generator falling behind cannot hide the service's queueing.
async fn open_loop(
    args: &OverloadArgs,
    service: &Process,
    rate: f64,
    client: &reqwest::Client,
) -> anyhow::Result<Run> {
    let endpoint = Arc::new(format!("{}/v1/events", service.url));
    let total = (rate * args.duration.as_secs_f64()) as usize;
    let period = Duration::from_secs_f64(1.0 / rate);
    let outstanding = Arc::new(AtomicUsize::new(0));
    let rss_before = service.rss_mib();
    let done = Arc::new(AtomicBool::new(false));
    let rss_watch = {
        let (pid, done) = (service.pid(), done.clone());
        tokio::spawn(async move {
            let mut max = 0.0f64;
            while !done.load(Ordering::Relaxed) {
                max = max.max(super::status_mib(pid, "VmRSS:"));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            max
        })
    };
    let processes = [
        ("agentbus serve", Some(service.pid())),
        ("load generator (this)", Some(std::process::id())),
    ];
    let cpu = super::CpuMeter::start(&processes);
    let start = tokio::time::Instant::now();
    let mut handles = Vec::with_capacity(total);
    let mut not_sent = 0;
    for i in 0..total {
        let at = start + period.mul_f64(i as f64);
        tokio::time::sleep_until(at).await;
        if outstanding.load(Ordering::Relaxed) >= args.generator_cap {
            not_sent += 1;
            continue;
        }
        outstanding.fetch_add(1, Ordering::Relaxed);
        let (client, endpoint, outstanding) =
            (client.clone(), endpoint.clone(), outstanding.clone());
        handles.push(tokio::spawn(async move {
            let outcome = match post_event(&client, &endpoint, i).await {
                Ok(r) if r.status().is_success() => {
                    Outcome::Accepted(at.elapsed().as_secs_f64() * 1000.0)
                }
                Ok(r) if r.status() == 503 => {
                    let retry_after = r.headers().contains_key("retry-after");
                    let ms = at.elapsed().as_secs_f64() * 1000.0;
                    let why = super::refusal(r).await;
                    // Shed (src/http/shed.rs), or a 503 of the publish itself (the broker's
                    // acknowledgement did not come in time): only the first is a refusal.
                    if why.contains("at its limit of") {
                        Outcome::Refused(ms, retry_after)
                    } else {
                        Outcome::Failed(why)
                    }
                }
                Ok(r) => Outcome::Failed(super::refusal(r).await),
                Err(e) if e.is_timeout() => Outcome::Failed("no answer within 60 s".into()),
                Err(e) => Outcome::Failed(format!("{e}")),
            };
            outstanding.fetch_sub(1, Ordering::Relaxed);
            outcome
        }));
    }
    let mut run = Run {
        accepted: Vec::new(),
        refused: Vec::new(),
        refused_with_retry_after: 0,
        failed: Default::default(),
        not_sent,
        rss_before,
        rss_max: 0.0,
        rss_after: 0.0,
        cpu: String::new(),
    };
    for h in handles {
        match h.await? {
            Outcome::Accepted(ms) => run.accepted.push(ms),
            Outcome::Refused(ms, retry_after) => {
                run.refused.push(ms);
                run.refused_with_retry_after += usize::from(retry_after);
            }
            Outcome::Failed(why) => *run.failed.entry(why).or_insert(0) += 1,
        }
    }
    run.cpu = cpu.stop();
    done.store(true, Ordering::Relaxed);
    run.rss_max = rss_watch.await?;
    run.rss_after = service.rss_mib();
    run.accepted.sort_by(f64::total_cmp);
    run.refused.sort_by(f64::total_cmp);
    Ok(run)
}

fn report(what: &str, run: &Run, duration: Duration, rate: f64) {
    let secs = duration.as_secs_f64();
    let line = |v: &[f64]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            format!(
                "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                percentile(v, 0.5),
                percentile(v, 0.99),
                v[v.len() - 1]
            )
        }
    };
    println!("{what}: offered {rate:.0}/s for {duration:?}");
    println!(
        "  accepted {:>7} ({:.0}/s), latency {}",
        run.accepted.len(),
        run.accepted.len() as f64 / secs,
        line(&run.accepted)
    );
    println!(
        "  refused  {:>7} ({:.0}/s, {} with Retry-After), latency {}",
        run.refused.len(),
        run.refused.len() as f64 / secs,
        run.refused_with_retry_after,
        line(&run.refused)
    );
    for (why, n) in &run.failed {
        println!("  failed   {n:>7}: {why}");
    }
    if run.not_sent > 0 {
        println!(
            "  not sent {:>7} (the generator's cap of unanswered requests)",
            run.not_sent
        );
    }
    println!(
        "  service RSS before {:.1} MiB, max during {:.1} MiB, after {:.1} MiB; CPU, % of one core: {}",
        run.rss_before, run.rss_max, run.rss_after, run.cpu
    );
}

pub async fn overload(args: OverloadArgs) -> anyhow::Result<()> {
    let client = client()?;
    let mut env = Vec::new();
    if let Some(n) = args.max_in_flight {
        env.push(("AGENTBUS_MAX_PUBLISHES_IN_FLIGHT", n.to_string()));
    }
    let kafka = |part: &str| KafkaArgs {
        topic_prefix: format!("{}{part}.", args.kafka.topic_prefix),
        ..args.kafka.clone()
    };
    let limited = Process::serve_with(&args.agentbus, &kafka("limited"), None, true, &env).await?;
    let endpoint = format!("{}/v1/events", limited.url);
    // Warm-up: connections, metadata, the first schema lookups.
    sustainable(&client, &endpoint, 4, Duration::from_secs(2)).await?;
    let rate = match args.sustainable {
        Some(r) => {
            println!("sustainable rate (given): {r:.0} single events/s");
            r
        }
        None => {
            let r = sustainable(
                &client,
                &endpoint,
                args.probe_concurrency,
                args.probe_duration,
            )
            .await?;
            println!(
                "sustainable rate: {r:.0} single events/s ({} in flight, closed loop, {:?})",
                args.probe_concurrency, args.probe_duration
            );
            r
        }
    };
    let offered = rate * args.factor;
    let limit = args
        .max_in_flight
        .map_or("the default".to_string(), |n| n.to_string());
    let run = open_loop(&args, &limited, offered, &client).await?;
    report(
        &format!(
            "with the publish limit ({limit} in flight), {}x the sustainable rate, open loop",
            args.factor
        ),
        &run,
        args.duration,
        offered,
    );
    drop(limited);
    if args.unlimited_too {
        let env = [("AGENTBUS_MAX_PUBLISHES_IN_FLIGHT", "1000000".to_string())];
        let unlimited =
            Process::serve_with(&args.agentbus, &kafka("unlimited"), None, true, &env).await?;
        let endpoint = format!("{}/v1/events", unlimited.url);
        sustainable(&client, &endpoint, 4, Duration::from_secs(2)).await?;
        let run = open_loop(&args, &unlimited, offered, &client).await?;
        report(
            "without it (limit 1000000), the same load",
            &run,
            args.duration,
            offered,
        );
    }
    Ok(())
}
