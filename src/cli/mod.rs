//! The command line: `agentbus serve | publish | schemas check | topics ensure | agent run |
//! dlq | replay | lag | lag-exporter`.

mod history;
mod publish;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

pub use crate::config::parse_time;
use crate::{
    app::{self, App, Mode},
    config::{KafkaArgs, ServeArgs, TopicArgs},
    consume::dlq,
    schema::Registry,
    topics,
};
pub use history::{LagArgs, LagExporterArgs, ReplayArgs};
pub use publish::PublishArgs;

/// agentbus: schema-validated events on Kafka for multi-agent systems.
#[derive(Debug, Parser)]
#[command(name = "agentbus", version, about)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info,agentbus=debug`.
    #[arg(long, global = true, env = "AGENTBUS_LOG", default_value = "info")]
    pub log: String,

    /// Log one JSON object per line instead of text.
    #[arg(long, global = true, env = "AGENTBUS_LOG_JSON")]
    pub log_json: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: HTTP API, publishing, schema registry, metrics.
    Serve(ServeArgs),
    /// Publish events through the HTTP API: one from flags, or JSON Lines from a file or stdin.
    Publish(PublishArgs),
    /// Schema directory commands.
    #[command(subcommand)]
    Schemas(SchemasCommand),
    /// Topic commands.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// Agent commands.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Dead letters of an agent.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Replay history from a time into an agent (or a topic), or move a group's offsets back.
    Replay(Box<ReplayArgs>),
    /// Consumer lag per group and partition, with the age of the oldest unconsumed record.
    Lag(LagArgs),
    /// Export consumer lag to Prometheus (kafka-lag-exporter's metric names), alone.
    LagExporter(LagExporterArgs),
    /// API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
}

/// `agentbus keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a new API key: prints the key once, and the entry for the keys file (which holds
    /// only a salted hash of it).
    New {
        /// Who holds it (shown in logs).
        #[arg(long)]
        name: String,
        /// Its scopes: publish, read, admin (repeatable).
        #[arg(long = "scope", required = true, ignore_case = true)]
        scopes: Vec<crate::auth::Scope>,
        /// Event types or patterns it may publish (repeatable; default all).
        #[arg(long = "event-type")]
        event_types: Vec<String>,
        /// `source` names it may publish as (repeatable; default any).
        #[arg(long = "source")]
        sources: Vec<String>,
    },
}

/// `agentbus dlq ...`
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// A table of the agent's dead letters: when, type, id, attempts, error. One page at a
    /// time (partition by partition, oldest first in each); the cursor of the next page is
    /// printed last, for `--after`.
    List {
        /// The agent (consumer group).
        group: String,
        /// Dead letters per page (1 to 1000).
        #[arg(long, default_value_t = crate::consume::dlq::DEFAULT_PAGE,
              value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=crate::consume::dlq::MAX_PAGE as u64))]
        limit: usize,
        /// Start where an earlier page ended: the cursor it printed after `next:`.
        #[arg(long, conflicts_with = "since")]
        after: Option<dlq::Cursor>,
        /// Start at the first dead letter whose record time (the original event's) is at or
        /// after this: RFC 3339 or a duration back from now (`2h`).
        #[arg(long, value_parser = parse_time)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Follow the cursor to the end: every page, one after the other.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        kafka: KafkaArgs,
    },
    /// Send dead letters back to the agent, through its replay topic.
    Redrive {
        /// The agent (consumer group).
        group: String,
        /// Only dead letters of this event type.
        #[arg(long)]
        event_type: Option<String>,
        /// Only those that failed since: RFC 3339 or a duration back from now (`2h`).
        #[arg(long, value_parser = parse_time)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        #[command(flatten)]
        kafka: KafkaArgs,
    },
}

/// `agentbus agent ...`
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Run one agent of the consumers directory, without the HTTP API. Several processes of
    /// the same agent share its partitions (competing consumers); give each its own data
    /// directory.
    Run {
        /// The agent's name (its consumer group).
        name: String,
        #[command(flatten)]
        settings: ServeArgs,
    },
}

/// `agentbus schemas ...`
#[derive(Debug, Subcommand)]
pub enum SchemasCommand {
    /// Load the schema directory and check every version against the one before (BACKWARD);
    /// exits non-zero naming the file and the reason when one fails. Made for CI.
    Check {
        /// The schema directory.
        #[arg(long, env = "AGENTBUS_SCHEMAS_DIR", default_value = "./schemas")]
        schemas_dir: PathBuf,
    },
}

/// `agentbus topics ...`
#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create the event topic of every domain in the schema directory, if absent.
    Ensure {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        topics: TopicArgs,
        /// The schema directory.
        #[arg(long, env = "AGENTBUS_SCHEMAS_DIR", default_value = "./schemas")]
        schemas_dir: PathBuf,
    },
}

async fn run_until_signal(app: App) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        app::shutdown_signal().await;
        tracing::info!("shutting down");
        on_signal.cancel();
    });
    app.run(cancel).await
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(settings) => run_until_signal(App::build(settings).await?).await,
        Command::Agent(AgentCommand::Run { name, settings }) => {
            let app = App::build_for(settings, Mode::Agent(name)).await?;
            run_until_signal(app).await
        }
        Command::Publish(args) => publish::run(args).await,
        Command::Replay(args) => history::replay(*args).await,
        Command::Lag(args) => history::lag(args).await,
        Command::LagExporter(args) => history::lag_exporter(args).await,
        Command::Keys(KeysCommand::New {
            name,
            scopes,
            event_types,
            sources,
        }) => {
            let (key, entry) = crate::auth::new_key(&name, &scopes, &event_types, &sources);
            eprintln!("the key, shown this once (give it to {name}; it is not stored anywhere):");
            println!("{key}");
            eprintln!("\nadd this to the keys file (AGENTBUS_API_KEYS_FILE):\n");
            print!("{entry}");
            Ok(())
        }
        Command::Dlq(DlqCommand::List {
            group,
            limit,
            after,
            since,
            all,
            kafka,
        }) => {
            let topic = format!("{}{group}.dlq", kafka.topic_prefix);
            let mut start = match (after, since) {
                (Some(cursor), _) => dlq::Start::After(cursor),
                (None, Some(t)) => dlq::Start::Since(t),
                (None, None) => dlq::Start::Beginning,
            };
            println!(
                "{:<24}  {:<28}  {:<36}  {:>8}  ERROR",
                "FAILED AT", "TYPE", "ID", "ATTEMPTS"
            );
            let dash = || "-".to_string();
            let mut listed = 0;
            loop {
                let page = dlq::page(&kafka, &topic, start, limit).await?;
                listed += page.dead_letters.len();
                for d in &page.dead_letters {
                    println!(
                        "{:<24}  {:<28}  {:<36}  {:>8}  {}: {}",
                        d.failed_at.clone().unwrap_or_else(dash),
                        d.event_type.clone().unwrap_or_else(dash),
                        d.event_id.clone().unwrap_or_else(dash),
                        d.attempts.map_or_else(dash, |a| a.to_string()),
                        d.error_kind.clone().unwrap_or_else(dash),
                        d.error_message
                            .clone()
                            .unwrap_or_default()
                            .replace('\n', " "),
                    );
                }
                for s in &page.skipped {
                    println!(
                        "skipped partition {} offsets {}..={}: the client cannot read them ({})",
                        s.partition, s.from_offset, s.to_offset, s.reason
                    );
                }
                match page.next {
                    Some(next) if all => start = dlq::Start::After(next),
                    Some(next) => {
                        println!("{listed} dead letters from {topic}; more after this page");
                        println!("next: {next}");
                        return Ok(());
                    }
                    None => break,
                }
            }
            println!("{listed} dead letters from {topic}; the end");
            Ok(())
        }
        Command::Dlq(DlqCommand::Redrive {
            group,
            event_type,
            since,
            kafka,
        }) => {
            let prefix = &kafka.topic_prefix;
            let (from, to) = (
                format!("{prefix}{group}.dlq"),
                format!("{prefix}{group}.replay"),
            );
            let redriven =
                dlq::redrive(&kafka, &from, &to, &dlq::Filter { event_type, since }).await?;
            println!(
                "sent {} dead letters from {from} back to {group} (through {to})",
                redriven.sent
            );
            for s in &redriven.skipped {
                println!(
                    "skipped partition {} offsets {}..={}: the client cannot read them ({})",
                    s.partition, s.from_offset, s.to_offset, s.reason
                );
            }
            Ok(())
        }
        Command::Schemas(SchemasCommand::Check { schemas_dir }) => {
            let registry = Registry::load(&schemas_dir)?;
            for t in registry.event_types() {
                let versions: Vec<String> = t
                    .versions
                    .values()
                    .map(|v| format!("v{} (id {})", v.version, v.id))
                    .collect();
                println!(
                    "ok  {:<32} {}  [{}]",
                    t.name,
                    versions.join(", "),
                    serde_json::to_value(t.compatibility)?
                        .as_str()
                        .unwrap_or("")
                );
            }
            println!(
                "{} event types, {} schema versions: all compatible",
                registry.event_types().count(),
                registry.version_count()
            );
            Ok(())
        }
        Command::Topics(TopicsCommand::Ensure {
            kafka,
            topics: topic_args,
            schemas_dir,
        }) => {
            let registry = Registry::load(&schemas_dir)?;
            let specs = app::topic_specs(&kafka, &topic_args, &registry);
            let created = topics::ensure(&kafka, &specs).await?;
            for spec in &specs {
                let state = if created.contains(&spec.name) {
                    "created"
                } else {
                    "exists"
                };
                println!("{state:<8} {}", spec.name);
            }
            Ok(())
        }
    }
}
