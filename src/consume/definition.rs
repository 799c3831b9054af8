//! Agent definitions: one TOML file per agent in `consumers/`, parsed strictly.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// Errors of loading agent definitions: always naming the file (and the field, as serde's
/// TOML errors do).
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct Error {
    /// The file or directory.
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

fn error(path: &Path, reason: impl Into<String>) -> Error {
    Error {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// One agent: a Kafka consumer group that handles the events it subscribes to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentDefinition {
    /// The agent's name, which is its consumer group id and the prefix of its own topics
    /// (`<name>.retry`, `<name>.dlq`, `<name>.replay`).
    pub name: String,
    /// Event types it receives: exact (`agent.task.requested`), a prefix pattern
    /// (`agent.task.*`, any depth below) or `*` for all.
    pub subscribe: Vec<String>,
    /// Events handled at once; events with the same key are always handled in order.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Whether events that fail for good go to `<name>.dlq` (otherwise they are logged and
    /// dropped).
    #[serde(default = "default_true")]
    pub dead_letter: bool,
    /// What handles the events.
    pub handler: HandlerConfig,
    /// How failures are retried.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// The file it came from.
    #[serde(skip)]
    pub file: PathBuf,
}

fn default_concurrency() -> usize {
    4
}

fn default_true() -> bool {
    true
}

/// The handler of an agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum HandlerConfig {
    /// POST each event as CloudEvents structured JSON to `url`.
    Webhook {
        /// Where to POST.
        url: String,
        /// Name of an environment variable holding the HMAC-SHA256 secret; when set, the
        /// body is signed in `X-Agentbus-Signature: sha256=<hex>`.
        #[serde(default)]
        secret_env: Option<String>,
        /// Longest wait for an answer (a timeout is retried).
        #[serde(default = "default_timeout", with = "humantime_serde")]
        timeout: Duration,
        /// A PEM file of CA certificates trusted for `url`'s HTTPS, in addition to the
        /// machine's trust store (for a webhook behind a private CA). Read at start-up; a
        /// relative path is relative to the definition's directory.
        #[serde(default)]
        ca_file: Option<PathBuf>,
    },
    /// Execute `integration.call.requested` events against the configured services and
    /// publish `integration.call.succeeded` or `integration.call.failed`.
    Integration {
        /// The services, by the name calls use.
        services: std::collections::BTreeMap<String, crate::handlers::integration::ServiceConfig>,
    },
    /// Acknowledge every event without doing anything: for benchmarks and dry runs.
    Noop,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Retries with exponential backoff and jitter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Wait before the second attempt; it doubles each time.
    #[serde(default = "default_initial", with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Longest wait between two attempts.
    #[serde(default = "default_max", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Each wait is randomised by ± this fraction (0 to 1), so that failing agents do not
    /// retry in lockstep.
    #[serde(default = "default_jitter")]
    pub jitter: f64,
    /// Longest an event may hold its key's lane (and so the events behind it) with waits;
    /// a wait that would pass it moves the event to `<name>.retry` instead, to be tried
    /// again after its not-before time.
    #[serde(default = "default_hold", with = "humantime_serde")]
    pub max_hold: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: default_attempts(),
            initial_backoff: default_initial(),
            max_backoff: default_max(),
            jitter: default_jitter(),
            max_hold: default_hold(),
        }
    }
}

fn default_attempts() -> u32 {
    5
}
fn default_initial() -> Duration {
    Duration::from_millis(200)
}
fn default_max() -> Duration {
    Duration::from_secs(30)
}
fn default_jitter() -> f64 {
    0.2
}
fn default_hold() -> Duration {
    Duration::from_secs(5)
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1` (1-based `attempt`), jittered by `unit` in
    /// [-1, 1].
    pub fn backoff(&self, attempt: u32, unit: f64) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)));
        let base = exp.min(self.max_backoff).min(LONGEST_BACKOFF).as_secs_f64();
        let jittered = (base * (1.0 + self.jitter * unit.clamp(-1.0, 1.0))).max(0.0);
        Duration::try_from_secs_f64(jittered)
            .unwrap_or(LONGEST_BACKOFF)
            .min(LONGEST_BACKOFF)
    }
}

/// No wait between attempts is longer than this, whatever the file says (a wait past it
/// would overflow clocks and means "never" anyway).
const LONGEST_BACKOFF: Duration = Duration::from_secs(30 * 24 * 3600);

impl AgentDefinition {
    /// Whether the agent receives `event_type`.
    pub fn subscribes_to(&self, event_type: &str) -> bool {
        self.subscribe
            .iter()
            .any(|p| pattern_matches(p, event_type))
    }

    /// `<name>.retry`, with the topic prefix.
    pub fn retry_topic(&self, prefix: &str) -> String {
        format!("{prefix}{}.retry", self.name)
    }

    /// `<name>.dlq`, with the topic prefix.
    pub fn dlq_topic(&self, prefix: &str) -> String {
        format!("{prefix}{}.dlq", self.name)
    }

    /// `<name>.replay`, with the topic prefix.
    pub fn replay_topic(&self, prefix: &str) -> String {
        format!("{prefix}{}.replay", self.name)
    }

    fn check(&self, path: &Path) -> Result<(), Error> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 200
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !name_ok {
            return Err(error(
                path,
                "name: must be 1 to 200 characters of a-z, 0-9, - and _",
            ));
        }
        if self.subscribe.is_empty() {
            return Err(error(path, "subscribe: at least one event type or pattern"));
        }
        for p in &self.subscribe {
            let body = p.strip_suffix(".*").unwrap_or(p);
            if p != "*"
                && !body.split('.').all(|s| {
                    !s.is_empty()
                        && s.chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                })
            {
                return Err(error(
                    path,
                    format!("subscribe: {p:?} is not an event type, a prefix.* pattern or *"),
                ));
            }
        }
        if self.concurrency == 0 || self.concurrency > 1024 {
            return Err(error(path, "concurrency: must be 1 to 1024"));
        }
        let r = &self.retry;
        if r.attempts == 0 {
            return Err(error(path, "retry.attempts: must be at least 1"));
        }
        if !(0.0..=1.0).contains(&r.jitter) {
            return Err(error(path, "retry.jitter: must be between 0 and 1"));
        }
        if r.max_backoff < r.initial_backoff {
            return Err(error(
                path,
                "retry.max_backoff: must not be shorter than initial_backoff",
            ));
        }
        if let HandlerConfig::Webhook { url, .. } = &self.handler
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(error(
                path,
                "handler.url: must be an http:// or https:// URL",
            ));
        }
        // A CA file that cannot be read or holds no certificate is a start-up error naming
        // this file and the field, not a handshake failure on the first event.
        match &self.handler {
            HandlerConfig::Webhook {
                ca_file: Some(ca), ..
            } => {
                crate::handlers::http_client(None, Some(ca))
                    .map_err(|e| error(path, format!("handler.ca_file: {e}")))?;
            }
            HandlerConfig::Integration { services } => {
                for (name, service) in services {
                    if let Some(ca) = &service.ca_file {
                        crate::handlers::http_client(None, Some(ca)).map_err(|e| {
                            error(path, format!("handler.services.{name}.ca_file: {e}"))
                        })?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// `agent.task.*` matches `agent.task.requested` (and deeper); `*` matches everything.
pub fn pattern_matches(pattern: &str, event_type: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_suffix(".*") {
        Some(prefix) => event_type
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.')),
        None => pattern == event_type,
    }
}

/// Loads every `*.toml` of `dir`. A missing directory means no agents.
pub fn load_dir(dir: &Path) -> Result<Vec<AgentDefinition>, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(error(dir, e.to_string())),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut agents: Vec<AgentDefinition> = Vec::new();
    for file in files {
        let agent = load_file(&file)?;
        if let Some(other) = agents.iter().find(|a| a.name == agent.name) {
            return Err(error(
                &file,
                format!(
                    "name: {:?} is also defined in {}",
                    agent.name,
                    other.file.display()
                ),
            ));
        }
        agents.push(agent);
    }
    Ok(agents)
}

/// Loads one definition file.
pub fn load_file(file: &Path) -> Result<AgentDefinition, Error> {
    let text = std::fs::read_to_string(file).map_err(|e| error(file, e.to_string()))?;
    parse(&text, file)
}

/// Parses a definition's text; `file` names it in errors.
pub fn parse(text: &str, file: &Path) -> Result<AgentDefinition, Error> {
    let mut agent: AgentDefinition =
        toml::from_str(text).map_err(|e| error(file, e.to_string().trim().replace('\n', " ")))?;
    agent.file = file.to_path_buf();
    // A relative CA file is next to the definition, wherever the process runs.
    let dir = file.parent().unwrap_or(Path::new(""));
    let resolve = |ca: &mut Option<PathBuf>| {
        if let Some(path) = ca.as_mut()
            && path.is_relative()
        {
            *path = dir.join(&*path);
        }
    };
    match &mut agent.handler {
        HandlerConfig::Webhook { ca_file, .. } => resolve(ca_file),
        HandlerConfig::Integration { services } => {
            services.values_mut().for_each(|s| resolve(&mut s.ca_file))
        }
        HandlerConfig::Noop => {}
    }
    agent.check(file)?;
    Ok(agent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_exact_types_prefixes_and_everything() {
        assert!(pattern_matches("agent.task.*", "agent.task.requested"));
        assert!(pattern_matches("agent.*", "agent.task.requested"));
        assert!(!pattern_matches("agent.task.*", "agent.taskforce.created"));
        assert!(!pattern_matches("agent.task.*", "agent.task"));
        assert!(pattern_matches("agent.created", "agent.created"));
        assert!(pattern_matches("*", "x.y"));
    }

    #[test]
    fn a_bad_definition_names_the_file_and_the_field() {
        let file = Path::new("consumers/x.toml");
        let cases = [
            (
                "name = \"x\"\nsubscribe = [\"a.b\"]\nbogus = 1\n[handler]\nkind = \"noop\"",
                "bogus",
            ),
            (
                "name = \"x\"\nsubscribe = [\"a.b\"]\n[handler]\nkind = \"carrier-pigeon\"",
                "carrier-pigeon",
            ),
            (
                "name = \"X!\"\nsubscribe = [\"a.b\"]\n[handler]\nkind = \"noop\"",
                "name",
            ),
            (
                "name = \"x\"\nsubscribe = [\"A\"]\n[handler]\nkind = \"noop\"",
                "subscribe",
            ),
            (
                "name = \"x\"\nsubscribe = [\"a.b\"]\n[handler]\nkind = \"noop\"\n[retry]\njitter = 3.0",
                "retry.jitter",
            ),
            (
                "name = \"x\"\nsubscribe = [\"a.b\"]\n[handler]\nkind = \"webhook\"\nurl = \"ftp://x\"",
                "handler.url",
            ),
            (
                "name = \"x\"\nsubscribe = [\"a.b\"]\n[handler]\nkind = \"noop\"\n[retry]\nmax_hold = \"soon\"",
                "max_hold",
            ),
            (
                "name = \"x\"\nsubscribe = [\"a.b\"]\n[handler]\nkind = \"webhook\"\nurl = \"https://x\"\nca_file = \"/nonexistent/ca.pem\"",
                "handler.ca_file: /nonexistent/ca.pem",
            ),
            (
                "name = \"x\"\nsubscribe = [\"a.b\"]\n[handler]\nkind = \"integration\"\n[handler.services.s]\nbase_url = \"https://x\"\nca_file = \"missing.pem\"",
                "handler.services.s.ca_file: consumers/missing.pem",
            ),
        ];
        for (text, expected) in cases {
            let e = parse(text, file).unwrap_err().to_string();
            assert!(e.starts_with("consumers/x.toml: "), "{e}");
            assert!(e.contains(expected), "{expected} not in {e}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_with_jitter() {
        let r = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            jitter: 0.5,
            ..RetryPolicy::default()
        };
        assert_eq!(r.backoff(1, 0.0), Duration::from_millis(100));
        assert_eq!(r.backoff(2, 0.0), Duration::from_millis(200));
        assert_eq!(r.backoff(3, 0.0), Duration::from_millis(350));
        assert_eq!(r.backoff(2, 1.0), Duration::from_millis(300));
        assert_eq!(r.backoff(2, -1.0), Duration::from_millis(100));
    }
}
