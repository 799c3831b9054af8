//! The command line: `agentbus serve | publish | schemas check | topics ensure`.

mod publish;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::{
    app::{self, App, Mode},
    config::{KafkaArgs, ServeArgs, TopicArgs},
    schema::Registry,
    topics,
};
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
