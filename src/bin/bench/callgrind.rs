//! `agentbus-bench callgrind publish|agent`: the work `ops/bench.sh callgrind` runs under
//! `valgrind --tool=callgrind`, in this process (agentbus as a library), between calls of a
//! marker function: valgrind is started with `--dump-before=*callgrind_dump_here*`, so that
//! every call ends one part of the profile (a dump also zeroes the counters), and each part
//! holds one window, over every thread (the HTTP server, the store's writer, librdkafka's
//! threads).
//!
//! Parts, in dump order: (1) start-up and the warm-up (schema loading, connections, group
//! joins: not counted), (2) the work, (3) as long doing nothing (the idle cost of the threads
//! that wake on timers, to judge how much of (2) is not the work).
//! (`--zero-before` would do for the start of a window, but it leaves the part's summary and
//! the inclusive cost of calls already running at the time uncleared; a dump clears both.)
//!
//! `agentbus-bench callgrind-count FILE` reads a dump: instructions, and calls to the C
//! allocator (malloc, calloc, realloc, the aligned ones; Rust's allocations all go there).
//! Both are deterministic counts, unlike time.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use agentbus::{app::App, config::ServeArgs};
use anyhow::{Context, bail};
use clap::Parser;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

#[derive(Clone, clap::Args)]
pub struct CallgrindArgs {
    /// `publish`: batches of `--batch` events through the real HTTP handler; `agent`: a
    /// no-op agent (dedup store on) handling `--events` events.
    what: String,
    #[command(flatten)]
    kafka: agentbus::config::KafkaArgs,
    /// The agentbus binary: with `agent`, an `agentbus serve` of its own (not under
    /// valgrind) publishes the events the agent in this process handles.
    #[arg(long, default_value = "target/release/agentbus")]
    agentbus: PathBuf,
    /// Events per publish request.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Publish requests measured (one after the other).
    #[arg(long, default_value_t = 10)]
    batches: usize,
    /// Events the agent handles in the measured window.
    #[arg(long, default_value_t = 1000)]
    events: usize,
    /// Warm-up: publish requests (`publish`) or events (`agent`) before the window.
    #[arg(long, default_value_t = 5)]
    warm_up: usize,
    /// `agent`: publish every event before the agent starts, so that it works through a
    /// backlog (what a throughput run is) instead of taking each batch of 100 as it comes.
    /// The window opens once the warm-up's events are handled and closes once every event's
    /// dedup record is written; the events counted are those handled after it opened. The
    /// consumer has copied records ahead of the lanes before it opens (up to their queues,
    /// 9 × 256), so use `--events 10000` or more to count mostly the steady state.
    #[arg(long)]
    backlog: bool,
}

/// Entering it ends a part of the profile (`--dump-before`). Never inlined, so it exists.
#[inline(never)]
fn callgrind_dump_here(window: &str) {
    std::hint::black_box(window);
    std::hint::black_box(0xd0d0_u32);
}

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    serve: ServeArgs,
}

/// An in-process agentbus on 127.0.0.1:0 with its own data directory; its URL.
async fn start(
    args: &CallgrindArgs,
    dir: &std::path::Path,
    consumers: &std::path::Path,
    cancel: &CancellationToken,
) -> anyhow::Result<String> {
    let data = dir.join("data");
    let argv: Vec<String> = [
        "callgrind",
        "--brokers",
        &args.kafka.brokers,
        "--topic-prefix",
        &args.kafka.topic_prefix,
        "--http-addr",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().context("a UTF-8 path")?,
        "--schemas-dir",
        "schemas",
        "--consumers-dir",
        consumers.to_str().context("a UTF-8 path")?,
        "--lag-interval",
        "0s",
        // valgrind slows this process some 50 times: long timeouts, so that no heartbeat,
        // acknowledgement or request is given up on only because of it.
        "--agent-session-timeout",
        "45s",
        "--publish-timeout",
        "120s",
        "--request-timeout",
        "300s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let settings = Wrapper::try_parse_from(argv)?.serve;
    let app = App::build(settings).await?;
    let url = format!("http://{}", app.local_addr().context("an address")?);
    tokio::spawn(app.run(cancel.clone()));
    Ok(url)
}

async fn wait_ready(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if let Ok(r) = client.get(format!("{url}/readyz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{url} was not ready within 300 s")
}

/// Batches of events, serialised beforehand so that the window holds no client-side JSON.
fn bodies(count: usize, batch: usize, from: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|b| {
            let items: Vec<Value> = (0..batch)
                .map(|i| super::event(from + b * batch + i))
                .collect();
            serde_json::to_vec(&Value::Array(items)).expect("JSON")
        })
        .collect()
}

async fn post_all(client: &reqwest::Client, url: &str, bodies: Vec<Vec<u8>>) -> anyhow::Result<()> {
    for body in bodies {
        let r = client
            .post(format!("{url}/v1/events"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("HTTP {}: {}", r.status(), r.text().await?);
        }
    }
    Ok(())
}

/// The idle window: as long as the work took, doing nothing.
async fn idle_window(took: Duration) {
    tokio::time::sleep(took).await;
    callgrind_dump_here("idle");
}

/// Keys in the no-op agent's dedup store (the gauge is set once a second): every handled
/// event's record has been written once it reaches their count.
fn recorded() -> f64 {
    agentbus::telemetry::prometheus()
        .render()
        .lines()
        .filter(|l| l.starts_with("agentbus_dedup_keys{") && l.contains("group=\"callgrind-noop\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Events the no-op agent handled so far (this process's metrics).
fn handled() -> f64 {
    super::consumed(
        &agentbus::telemetry::prometheus().render(),
        "callgrind-noop",
    )
}

pub async fn callgrind(args: CallgrindArgs) -> anyhow::Result<()> {
    let dir = super::service::temp_dir("callgrind")?;
    let cancel = CancellationToken::new();
    let client = reqwest::Client::new();
    let result = match args.what.as_str() {
        "publish" => publish(&args, &dir, &cancel, &client).await,
        "agent" => agent(&args, &dir, &cancel, &client).await,
        other => Err(anyhow::anyhow!("callgrind {other:?}: publish or agent")),
    };
    cancel.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn publish(
    args: &CallgrindArgs,
    dir: &std::path::Path,
    cancel: &CancellationToken,
    client: &reqwest::Client,
) -> anyhow::Result<()> {
    let none = dir.join("no-agents");
    std::fs::create_dir_all(&none)?;
    let url = start(args, dir, &none, cancel).await?;
    wait_ready(client, &url).await?;
    post_all(client, &url, bodies(args.warm_up, args.batch, 0)).await?;
    let measured = bodies(args.batches, args.batch, 1_000_000);
    let started = Instant::now();
    callgrind_dump_here("warm-up");
    post_all(client, &url, measured).await?;
    callgrind_dump_here("publish");
    let took = started.elapsed();
    idle_window(took).await;
    println!(
        "callgrind publish: {} requests of {} events measured ({} events), {:.1} s under valgrind; idle window as long",
        args.batches,
        args.batch,
        args.batches * args.batch,
        took.as_secs_f64()
    );
    Ok(())
}

async fn agent(
    args: &CallgrindArgs,
    dir: &std::path::Path,
    cancel: &CancellationToken,
    client: &reqwest::Client,
) -> anyhow::Result<()> {
    let consumers = dir.join("agents");
    std::fs::create_dir_all(&consumers)?;
    std::fs::write(
        consumers.join("noop.toml"),
        "name = \"callgrind-noop\"\nsubscribe = [\"knowledge.shared\"]\nconcurrency = 8\n[handler]\nkind = \"noop\"\n",
    )?;
    // The publisher runs outside valgrind (a child is not traced): only the agent is counted.
    let publisher = super::Process::serve(&args.agentbus, &args.kafka, None, true).await?;
    let warm = args.warm_up.max(1) * 100;
    let measured = bodies(args.events.div_ceil(100), 100, 1_000_000);
    let events = args.events.div_ceil(100) * 100;
    let wait_for = |n: f64, what: &'static str, every: Duration| async move {
        let deadline = Instant::now() + Duration::from_secs(600);
        while handled() < n {
            if Instant::now() > deadline {
                bail!(
                    "the agent handled {} of {n} {what} events in 600 s",
                    handled()
                );
            }
            tokio::time::sleep(every).await;
        }
        Ok(())
    };
    let (started, in_window) = if args.backlog {
        post_all(client, &publisher.url, bodies(warm / 100, 100, 0)).await?;
        post_all(client, &publisher.url, measured).await?;
        let url = start(args, dir, &consumers, cancel).await?;
        wait_ready(client, &url).await?;
        // Polled often here (outside the window), so that it opens soon after the warm-up.
        wait_for(warm as f64, "warm-up", Duration::from_millis(10)).await?;
        let started = Instant::now();
        callgrind_dump_here("warm-up");
        let opened_at = handled();
        wait_for(
            (warm + events) as f64,
            "measured",
            Duration::from_millis(200),
        )
        .await?;
        // The window holds their recording too (store writes, changelog records): it closes
        // once the store holds every key (the idle window after it is as long).
        let deadline = Instant::now() + Duration::from_secs(600);
        while recorded() < (warm + events) as f64 {
            if Instant::now() > deadline {
                bail!(
                    "the agent recorded {} of {} events in 600 s",
                    recorded(),
                    warm + events
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        (started, (warm + events) as f64 - opened_at)
    } else {
        let url = start(args, dir, &consumers, cancel).await?;
        wait_ready(client, &url).await?;
        post_all(client, &publisher.url, bodies(warm / 100, 100, 0)).await?;
        wait_for(warm as f64, "warm-up", Duration::from_millis(200)).await?;
        let started = Instant::now();
        callgrind_dump_here("warm-up");
        post_all(client, &publisher.url, measured).await?;
        wait_for(
            (warm + events) as f64,
            "measured",
            Duration::from_millis(200),
        )
        .await?;
        (started, events as f64)
    };
    callgrind_dump_here("agent");
    let took = started.elapsed();
    idle_window(took).await;
    println!(
        "callgrind agent: {in_window:.0} events handled in the window, {:.1} s under valgrind; idle window as long{}",
        took.as_secs_f64(),
        if args.backlog { " (backlog)" } else { "" }
    );
    Ok(())
}

/// What a callgrind dump counted.
pub struct Counts {
    /// Instructions (`Ir`) of the part.
    pub instructions: u64,
    /// Calls to the C allocator (Rust's allocations all go there).
    pub allocations: u64,
    /// Self cost by function, largest first.
    pub by_function: Vec<(String, u64)>,
}

/// Reads a callgrind dump (the format of `--dump-instr=no`, the default: `positions: line`).
/// Self cost is every cost line of a function but those that follow a `calls=` line (they
/// are the inclusive cost of that call). callgrind_annotate 3.19 is not used for it: on these
/// dumps its self view shows inclusive figures.
pub fn count(file: &std::path::Path) -> anyhow::Result<Counts> {
    // glibc's names for them too: callgrind shows one name of an address's aliases.
    const ALLOCATORS: &[&str] = &[
        "malloc",
        "calloc",
        "realloc",
        "posix_memalign",
        "aligned_alloc",
        "memalign",
        "__libc_malloc",
        "__libc_calloc",
        "__libc_realloc",
        "__libc_memalign",
    ];
    let text = std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
    let mut names: std::collections::HashMap<String, String> = Default::default();
    let mut by_function: std::collections::HashMap<String, u64> = Default::default();
    let mut total = None;
    let mut allocations = 0u64;
    let mut current = String::new();
    let mut callee_is_allocator = false;
    let mut after_calls = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("totals:") {
            total = rest.split_whitespace().next().and_then(|n| n.parse().ok());
            continue;
        }
        // Names are compressed: `fn=(12) name` the first time, `fn=(12)` after.
        let named = ["fn=", "cfn="]
            .iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (*p, rest)));
        if let Some((prefix, rest)) = named {
            let name = match rest.strip_prefix('(').and_then(|r| r.split_once(')')) {
                Some((id, name)) if name.trim().is_empty() => {
                    names.get(id).cloned().unwrap_or_default()
                }
                Some((id, name)) => {
                    names.insert(id.to_string(), name.trim().to_string());
                    name.trim().to_string()
                }
                None => rest.trim().to_string(),
            };
            if prefix == "fn=" {
                current = name;
            } else {
                callee_is_allocator = ALLOCATORS.contains(&name.as_str());
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("calls=") {
            if callee_is_allocator {
                allocations += rest
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            after_calls = true;
            continue;
        }
        let is_cost = line
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit() || matches!(c, '+' | '-' | '*'));
        if is_cost {
            if after_calls {
                after_calls = false;
            } else if let Some(cost) = line
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
            {
                *by_function.entry(current.clone()).or_insert(0) += cost;
            }
        }
    }
    let mut by_function: Vec<(String, u64)> = by_function.into_iter().collect();
    by_function.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(Counts {
        instructions: total.context("no totals: line")?,
        allocations,
        by_function,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn instructions_and_allocator_calls_of_a_dump() {
        let dump = "events: Ir\nfn=(1) main\n0 5\ncfn=(2) malloc\ncalls=3 0\n0 30\ncfn=(3) free\ncalls=2 0\n0 4\nfn=(4) other\n+1 2\ncfn=(2)\ncalls=4 0\n0 40\nfn=(2)\n0 70\nfn=(3)\n0 4\ntotals: 81\n";
        let file = std::env::temp_dir().join(format!("callgrind-{}.out", uuid::Uuid::new_v4()));
        std::fs::write(&file, dump).unwrap();
        let counts = super::count(&file).unwrap();
        assert_eq!((counts.instructions, counts.allocations), (81, 7));
        let f = |name: &str| {
            counts
                .by_function
                .iter()
                .find(|(n, _)| n == name)
                .map(|f| f.1)
        };
        assert_eq!(
            (f("main"), f("other"), f("malloc"), f("free")),
            (Some(5), Some(2), Some(70), Some(4))
        );
        assert_eq!(counts.by_function[0].0, "malloc");
        std::fs::remove_file(file).unwrap();
    }
}
