//! A running agentbus service: schemas, idempotency store, producer, HTTP API and the
//! background tasks, under one cancellation token.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::{KafkaArgs, ServeArgs, TopicArgs},
    consume::{
        RuntimeSettings,
        definition::{self, AgentDefinition},
        run_agent,
    },
    handlers::integration::Integrations,
    http::{self, AppState, Limits, Readiness},
    lag::LagMonitor,
    publish::{self, IdempotencyStore, Publisher},
    replay::Jobs,
    schema::Registry,
    telemetry,
    topics::{self, TopicSpec},
};

/// Errors of building the service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The schema directory is not valid.
    #[error("schemas: {0}")]
    Schema(#[from] crate::schema::Error),
    /// The idempotency store could not be opened.
    #[error(transparent)]
    Store(#[from] publish::idempotency::Error),
    /// The Kafka producer could not be created (a bad setting).
    #[error("kafka producer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// An agent definition is not valid.
    #[error("agents: {0}")]
    Agents(#[from] crate::consume::definition::Error),
    /// An integration agent's services are not valid.
    #[error("agents: {0}")]
    Integrations(String),
    /// `agent run` named an agent that is not defined.
    #[error("no agent named {0:?} in the consumers directory")]
    UnknownAgent(String),
    /// The keys file is not valid.
    #[error("API keys: {0}")]
    Keys(#[from] crate::auth::Error),
    /// A non-loopback address without API keys.
    #[error(
        "refusing to serve {0} without API keys: give --api-keys FILE (agentbus keys new makes \
         them), listen on 127.0.0.1, or pass --insecure-no-auth"
    )]
    Insecure(SocketAddr),
    /// The HTTP address could not be bound.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why not.
        source: std::io::Error,
    },
}

/// What a process runs.
#[derive(Debug, Clone)]
pub enum Mode {
    /// `agentbus serve`: the HTTP API and every agent of the consumers directory.
    Serve,
    /// `agentbus agent run NAME`: that agent alone, no HTTP API; several such processes
    /// share the agent's partitions.
    Agent(String),
}

/// The service, built and bound, not yet running.
pub struct App {
    listener: Option<TcpListener>,
    agents: Vec<AgentDefinition>,
    state: AppState,
    settings: ServeArgs,
    store: Arc<IdempotencyStore>,
}

impl App {
    /// Loads and checks the schemas, opens the store, creates the producer and binds the
    /// HTTP address. Fails on anything that would make the service wrong; an absent broker
    /// is not such a thing (the service waits for it, not ready meanwhile).
    pub async fn build(settings: ServeArgs) -> Result<App, Error> {
        Self::build_for(settings, Mode::Serve).await
    }

    /// Like [`App::build`], for `mode`.
    pub async fn build_for(settings: ServeArgs, mode: Mode) -> Result<App, Error> {
        let _ = telemetry::prometheus();
        let registry = Arc::new(Registry::load(&settings.schemas_dir)?);
        let mut agents = definition::load_dir(&settings.consumers_dir)?;
        if let Mode::Agent(name) = &mode {
            agents.retain(|a| &a.name == name);
            if agents.is_empty() {
                return Err(Error::UnknownAgent(name.clone()));
            }
        }
        let mut integrations = Integrations::default();
        for agent in &agents {
            if let definition::HandlerConfig::Integration { services } = &agent.handler {
                let built = Integrations::new(services)
                    .map_err(|e| Error::Integrations(format!("{}: {e}", agent.file.display())))?;
                integrations.extend(built);
            }
        }
        let integrations = Arc::new(integrations);
        for t in registry.event_types() {
            metrics::gauge!(telemetry::SCHEMAS_LOADED, "event_type" => t.name.clone())
                .set(t.versions.len() as f64);
        }
        let keys = match &settings.api_keys {
            Some(file) => crate::auth::Keys::load(file, settings.key_rate)?,
            None => crate::auth::Keys::default(),
        };
        if matches!(mode, Mode::Serve) {
            if !keys.is_empty() {
                tracing::info!(keys = ?keys.names(), "API keys required");
            } else if !settings.http_addr.ip().is_loopback() {
                if !settings.insecure_no_auth {
                    return Err(Error::Insecure(settings.http_addr));
                }
                tracing::warn!(
                    addr = %settings.http_addr,
                    "INSECURE: serving without API keys on a non-loopback address (--insecure-no-auth): \
                     anyone who reaches it may publish, replay and redrive"
                );
            }
        }
        let store = IdempotencyStore::open(
            &settings.data_dir.join("idempotency"),
            settings.idempotency_ttl,
        )?;
        let producers = publish::Producers::create(&settings.kafka, settings.publish_timeout)?;
        let readiness = Arc::new(Readiness::default());
        let publisher = Arc::new(Publisher::new(
            producers,
            registry.clone(),
            store.clone(),
            settings.kafka.clone(),
            settings.publish_timeout,
            readiness.broker.clone(),
            settings.topics.retention,
        ));
        let listener =
            match mode {
                Mode::Serve => Some(TcpListener::bind(settings.http_addr).await.map_err(
                    |source| Error::Bind {
                        addr: settings.http_addr,
                        source,
                    },
                )?),
                Mode::Agent(_) => None,
            };
        let state = AppState {
            publisher,
            registry,
            kafka: Arc::new(settings.kafka.clone()),
            readiness,
            limits: Limits {
                max_body_bytes: settings.max_body_bytes,
                max_batch: settings.max_batch,
                request_timeout: settings.request_timeout,
                max_publishes_in_flight: settings.max_publishes_in_flight,
            },
            keys: Arc::new(keys),
            lag: LagMonitor::new(
                settings.kafka.clone(),
                settings.lag.clone(),
                agents.iter().map(|a| a.name.clone()).collect(),
            ),
            replays: Arc::new(Jobs::new(settings.replay.clone())),
            agents: Arc::new(agents.clone()),
            integrations,
        };
        Ok(App {
            listener,
            agents,
            state,
            settings,
            store,
        })
    }

    /// Where the HTTP API listens (useful with port 0); `None` for an agent process.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener
            .as_ref()
            .map(|l| l.local_addr().expect("a bound listener has an address"))
    }

    /// Serves until `cancel`, then drains: in-flight requests get the shutdown grace period,
    /// the producer is flushed, the store written to disk.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let App {
            listener,
            agents,
            state,
            settings,
            store,
        } = self;
        let publisher = state.publisher.clone();
        let replays = state.replays.clone();
        let state_readiness = state.readiness.clone();
        let tasks = TaskTracker::new();
        tasks.spawn(publish::watch_broker(
            state.publisher.clone(),
            state.readiness.broker.clone(),
            Duration::from_secs(1),
            cancel.clone(),
        ));
        // A topic setting the cluster can never satisfy stops the service at start, naming
        // it, instead of retrying (not ready) for ever.
        let topics_refused = Arc::new(std::sync::OnceLock::new());
        tasks.spawn(ensure_topics_until_done(
            settings.clone(),
            state.clone(),
            cancel.clone(),
            topics_refused.clone(),
        ));
        tasks.spawn(sweep_idempotency(store.clone(), cancel.clone()));
        tasks.spawn(metrics_upkeep(cancel.clone()));
        if listener.is_some() && state.lag.runs_in_background() {
            tasks.spawn(state.lag.clone().run(cancel.clone()));
        }
        let runtime = RuntimeSettings {
            kafka: settings.kafka.clone(),
            data_dir: settings.data_dir.clone(),
            dedup_ttl: settings.dedup_ttl,
            partitions: settings.topics.partitions,
            replication: settings.topics.replication,
            grace: settings.shutdown_grace,
            session_timeout: settings.agent_session_timeout,
        };
        // An agent that stops by itself (an error, a panic, a lane that ended) is a failure
        // someone must see: logged once with its cause, counted, and `/readyz` answers 503
        // naming it. `agent run` has nothing else to do and exits non-zero; `serve` keeps
        // the API up (publishing still works, the events wait in Kafka for the agent).
        let agent_failed = CancellationToken::new();
        let agent_only = listener.is_none();
        for agent in agents {
            let (runtime, registry, publisher, integrations) = (
                runtime.clone(),
                state.registry.clone(),
                state.publisher.clone(),
                state.integrations.clone(),
            );
            let (cancel, agent_failed) = (cancel.clone(), agent_failed.clone());
            let readiness = state.readiness.clone();
            tasks.spawn(async move {
                let name = agent.name.clone();
                // Subscribing before the event topics exist would leave the agent waiting for
                // a metadata refresh (minutes) on brokers that do not create topics.
                while !readiness.topics.load(Ordering::Relaxed) {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
                // A task of its own, so that a panic in the agent's loop is seen here.
                let running = tokio::spawn(run_agent(
                    agent,
                    runtime,
                    registry,
                    publisher,
                    integrations,
                    cancel.clone(),
                ));
                let why = match running.await {
                    Ok(Ok(())) if cancel.is_cancelled() => return,
                    Ok(Ok(())) => "the agent stopped by itself".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) if e.is_panic() => format!(
                        "the agent panicked: {}",
                        crate::consume::panic_message(e.into_panic())
                    ),
                    Err(e) => format!("the agent's task ended: {e}"),
                };
                tracing::error!(agent = %name, error = %why, "agent failed; it takes no events until the process restarts");
                metrics::counter!(telemetry::AGENT_FAILURES, "group" => name.clone()).increment(1);
                readiness.agent_failed(&name, &why);
                agent_failed.cancel();
                if agent_only {
                    cancel.cancel();
                }
            });
        }
        tasks.close();

        let grace = settings.shutdown_grace;
        match listener {
            Some(listener) => {
                tracing::info!(addr = %listener.local_addr()?, "agentbus listening");
                let listener =
                    http::connections::LimitedListener::new(listener, settings.max_connections);
                let server = axum::serve(listener, http::router(state))
                    .with_graceful_shutdown(cancel.clone().cancelled_owned());
                tokio::select! {
                    result = server => result?,
                    _ = async { cancel.cancelled().await; tokio::time::sleep(grace).await } => {
                        tracing::warn!(?grace, "requests still running after the grace period; stopping anyway");
                    }
                }
            }
            None => cancel.cancelled().await,
        }
        replays.cancel_all();
        tasks.wait().await;
        let flushing = publisher.clone();
        let flushed = tokio::task::spawn_blocking(move || flushing.flush_blocking(grace)).await?;
        if let Err(e) = flushed {
            tracing::warn!(error = %e, "producer flush incomplete at shutdown");
        }
        store.flush().await?;
        if let Some(why) = topics_refused.get() {
            anyhow::bail!("{why}");
        }
        if agent_failed.is_cancelled() {
            let failed = state_readiness.failed_agents();
            anyhow::bail!("an agent failed: {failed:?}");
        }
        tracing::info!("agentbus stopped");
        Ok(())
    }
}

/// The topic of every domain in the schema directory.
pub fn topic_specs(kafka: &KafkaArgs, topics: &TopicArgs, registry: &Registry) -> Vec<TopicSpec> {
    registry
        .domains()
        .iter()
        .map(|domain| TopicSpec {
            name: kafka.events_topic(domain),
            partitions: topics.partitions,
            replication: topics.replication,
            retention: topics.retention,
            configs: Vec::new(),
        })
        .collect()
}

/// Creates the event topics, retrying while the broker is away; a replication factor above
/// the cluster's brokers is not retried: it goes into `refused` and the service stops.
async fn ensure_topics_until_done(
    settings: ServeArgs,
    state: AppState,
    cancel: CancellationToken,
    refused: Arc<std::sync::OnceLock<String>>,
) {
    let specs = topic_specs(&settings.kafka, &settings.topics, &state.registry);
    let mut wait = Duration::from_millis(500);
    loop {
        match topics::ensure(&settings.kafka, &specs).await {
            Ok(created) => {
                if !created.is_empty() {
                    tracing::info!(?created, "created topics");
                }
                state.readiness.topics.store(true, Ordering::Relaxed);
                return;
            }
            Err(e @ topics::Error::ReplicationAboveBrokers { .. }) => {
                tracing::error!(error = %e, "cannot create the event topics; stopping");
                let _ = refused.set(e.to_string());
                cancel.cancel();
                return;
            }
            Err(e) => tracing::warn!(error = %e, "could not ensure topics yet; retrying"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}

async fn sweep_idempotency(store: Arc<IdempotencyStore>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        match store.sweep().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "swept expired idempotency keys"),
            Err(e) => tracing::error!(error = %e, "idempotency sweep failed"),
        }
    }
}

async fn metrics_upkeep(cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        telemetry::prometheus().run_upkeep();
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
