//! `agentbus replay`, `agentbus lag` and `agentbus lag-exporter`.

use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering, time::Duration};

use axum::{Json, Router, extract::State, routing::get};
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use super::parse_time;
use crate::{
    config::KafkaArgs,
    http::params,
    lag::{LagMonitor, LagSettings, Snapshot},
    replay::{self, Progress, Request, Target},
};

/// `agentbus replay`: copy history from a time into an agent's replay topic (or any topic),
/// or move a group's committed offsets back to that time.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Records at or after this time: RFC 3339 or a duration back from now (`2h`, `30m`).
    #[arg(long, value_parser = parse_time)]
    pub from: DateTime<Utc>,
    /// Records before this time (default: up to the end offsets fixed when the replay starts).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<DateTime<Utc>>,
    /// A topic to replay (repeatable).
    #[arg(long = "topic")]
    pub topics: Vec<String>,
    /// Event types or patterns (`agent.task.*`) to replay; their domains' topics are read.
    #[arg(long = "event-type", num_args = 1..)]
    pub event_types: Vec<String>,
    /// The agent (consumer group) that handles the records again, through `<agent>.replay`;
    /// with `--reset-offsets`, the group whose offsets move.
    #[arg(
        long,
        required_unless_present = "into_topic",
        conflicts_with = "into_topic"
    )]
    pub to_agent: Option<String>,
    /// Copy into this topic instead.
    #[arg(long)]
    pub into_topic: Option<String>,
    /// The replay id written on every copy (default: a new one). Running a replay again with
    /// the same id makes the agent skip what it already handled.
    #[arg(long)]
    pub replay_id: Option<String>,
    /// Print per partition the offsets and how many records would be copied; copy nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Instead of copying, move the group's committed offsets to `--from` (the group must
    /// have no active members). Prints the plan; acts only with `--execute`.
    #[arg(long, requires = "to_agent", conflicts_with = "dry_run")]
    pub reset_offsets: bool,
    /// Carry out the offset reset.
    #[arg(long, requires = "reset_offsets")]
    pub execute: bool,
    /// Reset even when the broker cannot tell whether the group has active members; you vouch
    /// that its consumers are stopped. Only needed with `--broker-quirks tansu` (tansu 0.6
    /// cannot describe groups); Apache Kafka describes the group and agentbus refuses an
    /// active one by itself, so there this flag changes nothing.
    #[arg(long, requires = "execute")]
    pub assume_inactive: bool,
    #[command(flatten)]
    pub settings: replay::ReplaySettings,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

/// Runs `agentbus replay`.
pub async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    // Names reach librdkafka as C strings (a NUL panics there): refused before.
    let problems = args
        .topics
        .iter()
        .map(|t| (format!("--topic {t:?}"), params::topic_problem(t)))
        .chain(
            args.to_agent
                .iter()
                .map(|a| (format!("--to-agent {a:?}"), params::agent_problem(a))),
        )
        .chain(
            args.into_topic
                .iter()
                .map(|t| (format!("--into-topic {t:?}"), params::topic_problem(t))),
        )
        .chain(
            args.replay_id
                .iter()
                .map(|r| (format!("--replay-id {r:?}"), params::replay_id_problem(r))),
        );
    for (what, problem) in problems {
        if let Some(why) = problem {
            anyhow::bail!("{what}: {why}");
        }
    }
    let target = match (&args.to_agent, &args.into_topic) {
        (Some(agent), _) => Target::Agent(agent.clone()),
        (None, Some(topic)) => Target::Topic(topic.clone()),
        (None, None) => anyhow::bail!("give --to-agent or --into-topic"),
    };
    let request = Request {
        from: args.from,
        until: args.until,
        topics: args.topics.clone(),
        event_types: args.event_types.clone(),
        target,
        replay_id: args.replay_id.clone(),
    };
    let kafka = args.kafka.clone();
    if args.reset_offsets {
        let group = args.to_agent.clone().expect("clap requires --to-agent");
        let (k, g, r) = (kafka.clone(), group.clone(), request.clone());
        let lines = tokio::task::spawn_blocking(move || replay::plan_reset(&k, &g, &r)).await??;
        println!(
            "{:<40} {:>9} {:>12} {:>12}",
            "TOPIC", "PARTITION", "CURRENT", "NEW"
        );
        for l in &lines {
            let current = l.current.map_or("-".to_string(), |c| c.to_string());
            println!(
                "{:<40} {:>9} {:>12} {:>12}",
                l.topic, l.partition, current, l.new
            );
        }
        if !args.execute {
            println!("plan only: pass --execute to move the offsets of group {group}");
            return Ok(());
        }
        let assume = args.assume_inactive;
        let g = group.clone();
        tokio::task::spawn_blocking(move || replay::execute_reset(&kafka, &g, &lines, assume))
            .await??;
        println!("moved the committed offsets of group {group}");
        return Ok(());
    }
    let (k, r) = (kafka.clone(), request.clone());
    let plan = tokio::task::spawn_blocking(move || replay::plan(&k, &r)).await??;
    let progress = Arc::new(Progress::default());
    let bar = ProgressBar::new(plan.records());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} read, {msg} ({per_sec})",
        )
        .expect("a valid template"),
    );
    let dry_run = args.dry_run;
    let running = {
        let (plan, progress, settings) = (plan.clone(), progress.clone(), args.settings.clone());
        tokio::task::spawn_blocking(move || {
            replay::execute_with(&kafka, &request, &plan, progress, dry_run, &settings)
        })
    };
    tokio::pin!(running);
    let summary = loop {
        tokio::select! {
            done = &mut running => break done??,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                bar.set_position(progress.scanned.load(Ordering::Relaxed));
                let verb = if dry_run { "matching" } else { "copied" };
                let n = if dry_run { &progress.matched } else { &progress.copied };
                bar.set_message(format!("{} {verb}", n.load(Ordering::Relaxed)));
            }
        }
    };
    bar.finish_and_clear();
    println!(
        "{:<40} {:>9} {:>12} {:>12} {:>10}",
        "TOPIC",
        "PARTITION",
        "START",
        "END",
        if dry_run { "WOULD COPY" } else { "COPIED" }
    );
    for p in &summary.partitions {
        println!(
            "{:<40} {:>9} {:>12} {:>12} {:>10}",
            p.topic, p.partition, p.start_offset, p.end_offset, p.matched
        );
    }
    if dry_run {
        println!(
            "dry run: {} of {} records in range would be copied to {} (replay id {}); nothing written",
            summary.matched, summary.scanned, summary.target_topic, summary.replay_id
        );
    } else {
        let rate = summary.copied as f64 / summary.seconds.max(1e-3);
        println!(
            "copied {} of {} records read into {} in {:.1}s ({rate:.0}/s), replay id {}",
            summary.copied,
            summary.scanned,
            summary.target_topic,
            summary.seconds,
            summary.replay_id
        );
    }
    Ok(())
}

/// `agentbus lag`: a table per group and partition.
#[derive(Debug, clap::Args)]
pub struct LagArgs {
    /// Only this group (repeatable); default: every group of the cluster.
    #[arg(long = "group")]
    pub groups: Vec<String>,
    /// Print again every `--interval` until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// How often `--watch` prints.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

/// Runs `agentbus lag`.
pub async fn lag(args: LagArgs) -> anyhow::Result<()> {
    let monitor = LagMonitor::new(
        args.kafka.clone(),
        LagSettings {
            groups: args.groups.clone(),
            ..LagSettings::default()
        },
        Vec::new(),
    );
    loop {
        let snapshot = monitor.collect(None).await?;
        if args.watch {
            print!("\x1b[2J\x1b[H");
        }
        print_lag(&snapshot);
        if !args.watch {
            return Ok(());
        }
        tokio::select! {
            _ = crate::app::shutdown_signal() => return Ok(()),
            _ = tokio::time::sleep(args.interval) => {}
        }
    }
}

fn print_lag(snapshot: &Snapshot) {
    println!(
        "{:<32} {:<36} {:>9} {:>12} {:>12} {:>10} {:>12}",
        "GROUP", "TOPIC", "PARTITION", "COMMITTED", "END", "LAG", "LAG SECONDS"
    );
    for g in &snapshot.groups {
        for p in &g.partitions {
            // A lower bound reads ">=": the record at the committed offset was not read.
            let seconds = if p.lag_seconds_unknown() {
                format!(">={:.1}", p.lag_seconds)
            } else {
                format!("{:.1}", p.lag_seconds)
            };
            println!(
                "{:<32} {:<36} {:>9} {:>12} {:>12} {:>10} {:>12}",
                g.group, p.topic, p.partition, p.committed_offset, p.end_offset, p.lag, seconds
            );
            if let Some(note) = &p.lag_seconds_note {
                println!("    {}/{}: {note}", p.topic, p.partition);
            }
        }
        let members = match &g.members {
            Some(m) if m.is_empty() => "0 members".to_string(),
            Some(m) => format!(
                "{} members ({})",
                m.len(),
                m.iter()
                    .map(|m| format!("{}@{}", m.client_id, m.client_host.trim_start_matches('/')))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => "members unknown".to_string(),
        };
        println!(
            "{:<32} total lag {} (max {}, {:.1}s behind), {}{}",
            g.group,
            g.sum_lag,
            g.max_lag,
            g.max_lag_seconds,
            members,
            g.state
                .as_deref()
                .map(|s| format!(", {s}"))
                .unwrap_or_default()
        );
    }
    if snapshot.groups.is_empty() {
        println!("no consumer groups with committed offsets");
    }
    println!(
        "collected at {} in {:.2}s",
        snapshot.collected_at.to_rfc3339(),
        snapshot.duration_seconds
    );
}

/// `agentbus lag-exporter`: the lag monitor alone, for clusters where agentbus does not
/// publish; serves `/metrics`, `/v1/consumers`, `/healthz`.
#[derive(Debug, clap::Args)]
pub struct LagExporterArgs {
    /// Where `/metrics` is served.
    #[arg(long, env = "AGENTBUS_HTTP_ADDR", default_value = "127.0.0.1:8000")]
    pub http_addr: SocketAddr,
    #[command(flatten)]
    pub lag: LagSettings,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

/// Runs `agentbus lag-exporter` until SIGTERM.
pub async fn lag_exporter(args: LagExporterArgs) -> anyhow::Result<()> {
    let _ = crate::telemetry::prometheus();
    let mut settings = args.lag;
    if settings.interval.is_zero() {
        settings.interval = Duration::from_secs(15);
    }
    let monitor = LagMonitor::new(args.kafka, settings, Vec::new());
    let cancel = CancellationToken::new();
    let collecting = tokio::spawn(monitor.clone().run(cancel.clone()));
    let app =
        Router::new()
            .route(
                "/metrics",
                get(|State(m): State<Arc<LagMonitor>>| async move {
                    crate::http::metrics_text(&m).await
                }),
            )
            .route(
                "/v1/consumers",
                get(|State(m): State<Arc<LagMonitor>>| async move {
                    match m.latest().await {
                        Some(s) => Json(serde_json::to_value(&*s).unwrap_or_default()),
                        None => Json(serde_json::json!({"status": "no collection yet"})),
                    }
                }),
            )
            .route(
                "/healthz",
                get(|| async { Json(serde_json::json!({"status": "ok"})) }),
            )
            .with_state(monitor);
    let listener = tokio::net::TcpListener::bind(args.http_addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "lag exporter listening");
    let stop = cancel.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            crate::app::shutdown_signal().await;
            stop.cancel();
        })
        .await?;
    cancel.cancel();
    collecting.await?;
    Ok(())
}
