//! `agentbus publish`: a client of `POST /v1/events`.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use futures::{StreamExt, stream};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

/// Flags of `agentbus publish`.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    /// Base URL of the agentbus HTTP API.
    #[arg(long, env = "AGENTBUS_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// JSON Lines of envelopes to publish (`-` for stdin) instead of one event from flags.
    ///
    /// Every valid line is written; each bad one is reported on stderr with its line number
    /// and the field path (`line 17: data.agent_id: ...`), and the command exits non-zero
    /// when any failed. A batch the API refuses for some of its items is sent again without
    /// them.
    ///
    /// Running the same file again is safe: a line without its own `idempotency_key` or
    /// `event_id` gets the idempotency key `<key prefix>:<hash>:<n>`, where the hash is the
    /// SHA-256 (16 hex digits) of the line's JSON as parsed (spacing does not count) and n
    /// counts identical lines (1 for the first). An unchanged line is then a duplicate of its
    /// first run, while a line fixed after a failure is a new event; lines may be added,
    /// removed or moved without changing the others' keys. The service remembers keys for its
    /// idempotency window (24 h by default). Lines from stdin get such keys only with
    /// --key-prefix; without it each run's lines are new events.
    #[arg(long, short = 'f', conflicts_with_all = ["event_type", "data"])]
    pub file: Option<PathBuf>,

    /// Envelopes per request when publishing a file.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,

    /// All or nothing for the file: it is refused before anything is sent if a line is not a
    /// JSON object, and is sent as one request, which the API writes only when every line is
    /// valid (so the file must fit the service's batch and body limits, 500 events and 1 MiB
    /// by default). Should the broker fail in the middle of the write, rerun the file: the
    /// lines written are duplicates.
    #[arg(long, requires = "file")]
    pub atomic: bool,

    /// The first part of each line's idempotency key (see --file); default: the file's name.
    /// Give the same prefix to publish a renamed copy of a file as a rerun, or another one to
    /// publish the same lines again as new events.
    #[arg(long, requires = "file", value_parser = parse_key_prefix)]
    pub key_prefix: Option<String>,

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

fn parse_key_prefix(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > MAX_KEY_PREFIX {
        return Err(format!("must be 1 to {MAX_KEY_PREFIX} bytes"));
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be visible ASCII".into());
    }
    Ok(s.to_string())
}

/// Longest key prefix: the key (at most 256 characters) keeps room for the hash and count.
const MAX_KEY_PREFIX: usize = 200;

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

/// Sends with retries on 503, 429 and connection failures, honouring `Retry-After`. Safe to
/// repeat: every envelope carries its idempotency key (or its event id).
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
            Ok(response)
                if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE
                    || response.status() == reqwest::StatusCode::TOO_MANY_REQUESTS =>
            {
                // The server's wait, but never longer than half a minute for a CLI.
                let wait = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| {
                        crate::handlers::parse_retry_after(v.as_bytes(), chrono::Utc::now())
                    })
                    .unwrap_or(Duration::from_secs(1))
                    .min(Duration::from_secs(30));
                if attempt >= 5 {
                    let status = response.status();
                    return Ok((status, response.json().await.unwrap_or(Value::Null)));
                }
                wait
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

/// One line to publish.
#[derive(Debug, Clone)]
struct Item {
    line: usize,
    envelope: Value,
}

/// What became of one line.
#[derive(Debug)]
enum Outcome {
    Written,
    Duplicate,
    /// Why, one entry per problem: `data.x: expected string`.
    Failed(Vec<String>),
    /// Valid, but not written because another line of an `--atomic` file failed.
    Held,
}

/// The idempotency key of a line that has none of its own (see `--file`).
fn line_key(prefix: &str, canonical: &str, seen: &mut HashMap<String, u32>) -> String {
    let hash = hex::encode(&Sha256::digest(canonical.as_bytes())[..8]);
    let n = seen.entry(hash.clone()).or_insert(0);
    *n += 1;
    format!("{prefix}:{hash}:{n}")
}

/// The default key prefix: the file's name, cut to fit a key; none for stdin (a stream
/// run twice is two streams).
fn default_prefix(path: &Path) -> Option<String> {
    if path.as_os_str() == "-" {
        return None;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let name: String = name
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect();
    Some(name.chars().take(MAX_KEY_PREFIX).collect())
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
    let prefix = args.key_prefix.clone().or_else(|| default_prefix(path));
    let mut outcomes: BTreeMap<usize, Outcome> = BTreeMap::new();
    let mut items: Vec<Item> = Vec::new();
    let mut seen = HashMap::new();
    for (n, line) in reader.lines().enumerate() {
        let line_no = n + 1;
        let line = line.with_context(|| format!("reading line {line_no}"))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(Value::Object(mut fields)) => {
                if !fields.contains_key("event_id") && !fields.contains_key("idempotency_key") {
                    match &prefix {
                        Some(prefix) => {
                            // Hashed as parsed, so that spacing does not make a line new.
                            let canonical = Value::Object(fields.clone()).to_string();
                            fields.insert(
                                "idempotency_key".into(),
                                json!(line_key(prefix, &canonical, &mut seen)),
                            );
                        }
                        None => {
                            // A fixed id makes retries within this run repeats.
                            fields
                                .insert("event_id".into(), json!(uuid::Uuid::now_v7().to_string()));
                        }
                    }
                }
                items.push(Item {
                    line: line_no,
                    envelope: Value::Object(fields),
                });
            }
            Ok(_) => {
                outcomes.insert(line_no, Outcome::Failed(vec!["not a JSON object".into()]));
            }
            Err(e) => {
                outcomes.insert(line_no, Outcome::Failed(vec![format!("not JSON: {e}")]));
            }
        }
    }

    let started = Instant::now();
    if args.atomic {
        if !outcomes.is_empty() {
            report(&outcomes);
            bail!(
                "{} lines are not JSON objects; nothing was sent (--atomic)",
                outcomes.len()
            );
        }
        let results = publish_atomic(client, endpoint, items).await;
        outcomes.extend(results);
    } else {
        let progress = ProgressBar::new(items.len() as u64);
        progress.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} events ({per_sec}, eta {eta})",
            )
            .expect("a valid template"),
        );
        let batches: Vec<Vec<Item>> = items
            .chunks(args.batch_size.max(1))
            .map(<[Item]>::to_vec)
            .collect();
        let mut results = stream::iter(batches)
            .map(|batch| publish_batch(client, endpoint, batch))
            .buffer_unordered(args.concurrency.max(1));
        while let Some(done) = results.next().await {
            progress.inc(done.len() as u64);
            outcomes.extend(done);
        }
        progress.finish_and_clear();
    }
    let secs = started.elapsed().as_secs_f64();
    report(&outcomes);
    let count = |f: fn(&Outcome) -> bool| outcomes.values().filter(|o| f(o)).count();
    let written = count(|o| matches!(o, Outcome::Written));
    let duplicates = count(|o| matches!(o, Outcome::Duplicate));
    let failed = count(|o| matches!(o, Outcome::Failed(_) | Outcome::Held));
    println!(
        "written {written}, duplicates {duplicates}, failed {failed} in {secs:.1}s ({:.0} events/s)",
        (written + duplicates) as f64 / secs.max(1e-9)
    );
    if failed > 0 {
        if args.atomic {
            bail!("{failed} lines failed; nothing was written (--atomic)");
        }
        bail!("{failed} lines were not published");
    }
    Ok(())
}

/// Every failed line's problems on stderr, in line order.
fn report(outcomes: &BTreeMap<usize, Outcome>) {
    for (line, outcome) in outcomes {
        if let Outcome::Failed(problems) = outcome {
            for p in problems {
                eprintln!("line {line}: {p}");
            }
        }
    }
}

/// The API's per-item problems of a refused batch, by item index: `[3].data.x` is item 3's
/// `data.x`.
fn item_problems(body: &Value, items: usize) -> BTreeMap<usize, Vec<String>> {
    let mut out: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for d in body["error"]["details"].as_array().into_iter().flatten() {
        let path = d["path"].as_str().unwrap_or("");
        let message = d["message"].as_str().unwrap_or("invalid");
        if let Some(rest) = path.strip_prefix('[')
            && let Some((index, field)) = rest.split_once(']')
            && let Ok(i) = index.parse::<usize>()
            && i < items
        {
            let field = field.trim_start_matches('.');
            out.entry(i).or_default().push(if field.is_empty() {
                message.to_string()
            } else {
                format!("{field}: {message}")
            });
        }
    }
    out
}

/// `HTTP 409 idempotency_conflict: ...` of an error answer.
fn describe_error(status: reqwest::StatusCode, body: &Value) -> String {
    let error = &body["error"];
    format!(
        "HTTP {} {}: {}",
        status.as_u16(),
        error["code"].as_str().unwrap_or("?"),
        error["message"].as_str().unwrap_or("")
    )
}

/// The results of a 2xx batch answer, in input order.
fn take_results(items: &[Item], body: &Value, out: &mut Vec<(usize, Outcome)>) {
    let results = body["results"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    for (i, item) in items.iter().enumerate() {
        let outcome = match results.get(i) {
            Some(r) if r["duplicate"].as_bool() == Some(true) => Outcome::Duplicate,
            Some(_) => Outcome::Written,
            None => Outcome::Failed(vec!["the answer has no result for it".into()]),
        };
        out.push((item.line, outcome));
    }
}

/// Publishes one batch, line by line as far as the API lets it: a batch refused for some of
/// its items (each named by its path) is sent again without them; one refused as a whole
/// for an idempotency conflict or its size is sent again one item per request, so that only
/// the guilty line fails.
async fn publish_batch(
    client: &reqwest::Client,
    endpoint: &str,
    batch: Vec<Item>,
) -> Vec<(usize, Outcome)> {
    let mut out = Vec::with_capacity(batch.len());
    let mut queue = VecDeque::from([batch]);
    while let Some(items) = queue.pop_front() {
        if items.is_empty() {
            continue;
        }
        let body = Value::Array(items.iter().map(|i| i.envelope.clone()).collect());
        match send(client, endpoint, &body).await {
            Ok((status, answer)) if status.is_success() => take_results(&items, &answer, &mut out),
            Ok((status, answer)) if status.is_client_error() => {
                let problems = item_problems(&answer, items.len());
                if !problems.is_empty() {
                    let mut rest = Vec::new();
                    for (i, item) in items.into_iter().enumerate() {
                        match problems.get(&i) {
                            Some(p) => out.push((item.line, Outcome::Failed(p.clone()))),
                            None => rest.push(item),
                        }
                    }
                    queue.push_front(rest);
                } else if items.len() > 1
                    && (status == reqwest::StatusCode::CONFLICT
                        || status == reqwest::StatusCode::PAYLOAD_TOO_LARGE)
                {
                    // One line's key conflicts, or the batch is too large: alone, each line
                    // gets its own answer.
                    queue.extend(items.into_iter().map(|item| vec![item]));
                } else {
                    // Refused whatever it holds (say 401): every line fails for that reason.
                    let why = describe_error(status, &answer);
                    for item in items {
                        out.push((item.line, Outcome::Failed(vec![why.clone()])));
                    }
                }
            }
            Ok((status, answer)) => {
                let why = describe_error(status, &answer);
                for item in items {
                    out.push((item.line, Outcome::Failed(vec![why.clone()])));
                }
            }
            Err(e) => {
                let why = format!("{e:#}");
                for item in items {
                    out.push((item.line, Outcome::Failed(vec![why.clone()])));
                }
            }
        }
    }
    out
}

/// The whole file as one request: written only when every line is valid.
async fn publish_atomic(
    client: &reqwest::Client,
    endpoint: &str,
    items: Vec<Item>,
) -> Vec<(usize, Outcome)> {
    let mut out = Vec::with_capacity(items.len());
    if items.is_empty() {
        return out;
    }
    let body = Value::Array(items.iter().map(|i| i.envelope.clone()).collect());
    let (why_all, problems) = match send(client, endpoint, &body).await {
        Ok((status, answer)) if status.is_success() => {
            take_results(&items, &answer, &mut out);
            return out;
        }
        Ok((status, answer)) if status == reqwest::StatusCode::PAYLOAD_TOO_LARGE => (
            format!(
                "{}; the file is too large for one request: split it, or publish without --atomic",
                describe_error(status, &answer)
            ),
            BTreeMap::new(),
        ),
        Ok((status, answer)) => (
            describe_error(status, &answer),
            item_problems(&answer, items.len()),
        ),
        Err(e) => (format!("{e:#}"), BTreeMap::new()),
    };
    // Nothing was written: the guilty lines say why; the reason for the file is said once.
    eprintln!("the file was refused as a whole: {why_all}");
    for (i, item) in items.iter().enumerate() {
        let outcome = match problems.get(&i) {
            Some(p) => Outcome::Failed(p.clone()),
            None => Outcome::Held,
        };
        out.push((item.line, outcome));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lines_key_depends_on_its_content_and_its_count_not_its_position() {
        let canonical = |line: &str| serde_json::from_str::<Value>(line).unwrap().to_string();
        let mut seen = HashMap::new();
        let a1 = line_key("f", &canonical(r#"{"a":1,"b":2}"#), &mut seen);
        let b = line_key("f", &canonical(r#"{"a":2}"#), &mut seen);
        // The same event spelled differently is the same line; a second copy is another.
        let a2 = line_key("f", &canonical(r#"{ "b": 2, "a": 1 }"#), &mut seen);
        assert!(a1.starts_with("f:") && a1.ends_with(":1"), "{a1}");
        assert_eq!(a2, format!("{}:2", a1.strip_suffix(":1").unwrap()));
        assert_ne!(a1, b);
        let mut again = HashMap::new();
        assert_eq!(line_key("f", &canonical(r#"{"a":2}"#), &mut again), b);
        assert_ne!(
            line_key("g", &canonical(r#"{"a":2}"#), &mut HashMap::new()),
            b
        );
    }

    #[test]
    fn item_problems_map_batch_paths_to_items() {
        let body = json!({"error": {"details": [
            {"path": "[3].data.x", "message": "expected string"},
            {"path": "[0]", "message": "not an object"},
            {"path": "[9].data", "message": "out of range"},
            {"path": "header:Idempotency-Key", "message": "bad"},
        ]}});
        let p = item_problems(&body, 5);
        assert_eq!(p.len(), 2);
        assert_eq!(p[&3], ["data.x: expected string"]);
        assert_eq!(p[&0], ["not an object"]);
    }
}
