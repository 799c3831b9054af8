//! `agentbus publish`: a client of `POST /v1/events`.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use futures::{StreamExt, stream};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value, json};

/// Flags of `agentbus publish`.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    /// Base URL of the agentbus HTTP API.
    #[arg(long, env = "AGENTBUS_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// JSON Lines of envelopes to publish (`-` for stdin) instead of one event from flags.
    #[arg(long, short = 'f', conflicts_with_all = ["event_type", "data"])]
    pub file: Option<PathBuf>,

    /// Envelopes per request when publishing a file.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,

    /// Requests in flight at once when publishing a file.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,

    /// Event type of the one event, e.g. `agent.created`.
    #[arg(long = "type", short = 't', required_unless_present = "file")]
    pub event_type: Option<String>,

    /// Its data, a JSON object.
    #[arg(long, short = 'd', required_unless_present = "file")]
    pub data: Option<String>,

    /// Who emits it.
    #[arg(long, short = 's', default_value = "agentbus-cli")]
    pub source: String,

    /// Schema major version (default: the latest).
    #[arg(long = "event-version")]
    pub event_version: Option<u32>,

    /// Partition key (default: the event id).
    #[arg(long)]
    pub key: Option<String>,

    /// Idempotency key (default: the event id).
    #[arg(long)]
    pub idempotency_key: Option<String>,

    /// Metadata entries, `name=value`, repeatable (`correlation_id=...`).
    #[arg(long = "meta", value_parser = parse_meta)]
    pub metadata: Vec<(String, String)>,
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not name=value"))
}

/// Runs `agentbus publish`.
pub async fn run(args: PublishArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let endpoint = format!("{}/v1/events", args.url.trim_end_matches('/'));
    match &args.file {
        None => publish_one(&client, &endpoint, &args).await,
        Some(path) => publish_file(&client, &endpoint, &args, path).await,
    }
}

async fn publish_one(
    client: &reqwest::Client,
    endpoint: &str,
    args: &PublishArgs,
) -> anyhow::Result<()> {
    let data: Value =
        serde_json::from_str(args.data.as_deref().unwrap_or("{}")).context("--data is not JSON")?;
    let mut envelope = json!({
        "event_type": args.event_type,
        "source": args.source,
        "data": data,
        // Chosen here, so that a retry of this command's request is recognised as a repeat.
        "event_id": uuid::Uuid::now_v7().to_string(),
    });
    let fields = envelope.as_object_mut().expect("an object");
    if let Some(v) = args.event_version {
        fields.insert("event_version".into(), json!(v));
    }
    if let Some(k) = &args.key {
        fields.insert("partition_key".into(), json!(k));
    }
    if let Some(k) = &args.idempotency_key {
        fields.insert("idempotency_key".into(), json!(k));
    }
    if !args.metadata.is_empty() {
        let meta: Map<String, Value> = args
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        fields.insert("metadata".into(), Value::Object(meta));
    }
    let (status, body) = send(client, endpoint, &envelope).await?;
    println!("{}", serde_json::to_string_pretty(&body)?);
    if !status.is_success() {
        bail!("publish failed with HTTP {status}");
    }
    Ok(())
}

/// Sends with retries on 503 and connection failures, honouring `Retry-After`. Safe to
/// repeat: every envelope carries its event id, hence its idempotency key.
async fn send(
    client: &reqwest::Client,
    endpoint: &str,
    body: &Value,
) -> anyhow::Result<(reqwest::StatusCode, Value)> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = client.post(endpoint).json(body).send().await;
        let retry_in = match result {
            Ok(response) if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                let secs = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1u64);
                if attempt >= 5 {
                    let status = response.status();
                    return Ok((status, response.json().await.unwrap_or(Value::Null)));
                }
                Duration::from_secs(secs)
            }
            Ok(response) => {
                let status = response.status();
                let body = response.json().await.unwrap_or(Value::Null);
                return Ok((status, body));
            }
            Err(e) if attempt < 5 && (e.is_connect() || e.is_timeout()) => Duration::from_secs(1),
            Err(e) => return Err(e).with_context(|| format!("POST {endpoint}")),
        };
        tokio::time::sleep(retry_in).await;
    }
}

#[derive(Default)]
struct Summary {
    written: u64,
    duplicates: u64,
    failed: u64,
    errors: Vec<String>,
}

async fn publish_file(
    client: &reqwest::Client,
    endpoint: &str,
    args: &PublishArgs,
    path: &PathBuf,
) -> anyhow::Result<()> {
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        Box::new(BufReader::new(
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        ))
    };
    let mut summary = Summary::default();
    // (line number, envelope)
    let mut events: Vec<(usize, Value)> = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.context("reading input")?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(Value::Object(mut fields)) => {
                if !fields.contains_key("event_id") && !fields.contains_key("idempotency_key") {
                    // A fixed id makes retries of this line repeats, not second copies.
                    fields.insert("event_id".into(), json!(uuid::Uuid::now_v7().to_string()));
                }
                events.push((n + 1, Value::Object(fields)));
            }
            Ok(_) => {
                summary.failed += 1;
                summary
                    .errors
                    .push(format!("line {}: not a JSON object", n + 1));
            }
            Err(e) => {
                summary.failed += 1;
                summary.errors.push(format!("line {}: {e}", n + 1));
            }
        }
    }

    let progress = ProgressBar::new(events.len() as u64);
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} events ({per_sec}, eta {eta})",
        )
        .expect("a valid template"),
    );
    let started = Instant::now();
    let batches: Vec<&[(usize, Value)]> = events.chunks(args.batch_size.max(1)).collect();
    let mut results = stream::iter(batches)
        .map(|batch| {
            let body = Value::Array(batch.iter().map(|(_, e)| e.clone()).collect());
            async move { (batch, send(client, endpoint, &body).await) }
        })
        .buffer_unordered(args.concurrency.max(1));
    while let Some((batch, result)) = results.next().await {
        let first_line = batch[0].0;
        match result {
            Ok((status, body)) if status.is_success() => {
                for r in body["results"].as_array().into_iter().flatten() {
                    if r["duplicate"].as_bool() == Some(true) {
                        summary.duplicates += 1;
                    } else {
                        summary.written += 1;
                    }
                }
            }
            Ok((status, body)) => {
                summary.failed += batch.len() as u64;
                let error = &body["error"];
                let mut line = format!(
                    "lines {first_line}-{}: HTTP {status} {}: {}",
                    batch[batch.len() - 1].0,
                    error["code"].as_str().unwrap_or("?"),
                    error["message"].as_str().unwrap_or("")
                );
                for d in error["details"].as_array().into_iter().flatten().take(5) {
                    line.push_str(&format!(
                        "\n    {}: {}",
                        map_path(d["path"].as_str().unwrap_or(""), batch),
                        d["message"].as_str().unwrap_or("")
                    ));
                }
                summary.errors.push(line);
            }
            Err(e) => {
                summary.failed += batch.len() as u64;
                summary
                    .errors
                    .push(format!("lines from {first_line}: {e:#}"));
            }
        }
        progress.inc(batch.len() as u64);
    }
    progress.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    for e in &summary.errors {
        eprintln!("{e}");
    }
    println!(
        "written {}, duplicates {}, failed {} in {:.1}s ({:.0} events/s)",
        summary.written,
        summary.duplicates,
        summary.failed,
        secs,
        (summary.written + summary.duplicates) as f64 / secs.max(1e-9)
    );
    if summary.failed > 0 {
        bail!("{} events were not published", summary.failed);
    }
    Ok(())
}

/// Turns a batch path `[3].data.x` into `line 17: data.x`.
fn map_path(path: &str, batch: &[(usize, Value)]) -> String {
    if let Some(rest) = path.strip_prefix('[')
        && let Some((index, tail)) = rest.split_once(']')
        && let Ok(i) = index.parse::<usize>()
        && let Some((line, _)) = batch.get(i)
    {
        return format!("line {line}: {}", tail.trim_start_matches('.'));
    }
    path.to_string()
}
