//! The agent runtime: an agent is a Kafka consumer group. It receives the events it
//! subscribes to, skips what it has handled before (dedup store) or what has expired, hands
//! the rest to its handler — same key in order, different keys in parallel — retries
//! failures with backoff, moves long waits to `<agent>.retry` and final failures to
//! `<agent>.dlq`, and stores an offset only once the event's outcome is final.

pub mod changelog;
pub mod definition;
pub mod dlq;
pub mod fault;
mod record;
mod tracker;
mod unreadable;

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use rdkafka::{
    ClientConfig, ClientContext, Message, TopicPartitionList,
    consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    message::{Header, Headers, OwnedHeaders, OwnedMessage},
    producer::FutureRecord,
    types::RDKafkaErrorCode,
};
use serde_json::{Value as Json, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    config::KafkaArgs,
    envelope::format_time,
    handlers::{Event, Failure, Handler, integration::Integrations},
    publish::{self, Publisher},
    schema::{self, Registry},
    store::{Durable, ExpiringStore, now_ms},
    telemetry,
    topics::{self, TopicSpec},
};
use changelog::Changelog;
use definition::AgentDefinition;
use record::Record;
use tracker::Tracker;

/// Errors that stop an agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Kafka refused a setting, a subscription or a topic.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The agent's topics could not be created.
    #[error(transparent)]
    Topics(#[from] topics::Error),
    /// The dedup store could not be opened or written: the agent stops rather than handle
    /// events without it.
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    /// The dedup changelog could not be created or restored.
    #[error(transparent)]
    Changelog(#[from] changelog::Error),
    /// The handler could not be built.
    #[error("handler: {0}")]
    Handler(String),
    /// The agent stopped by itself: a lane panicked or ended, or its dedup store failed.
    /// Whatever the cause, the agent no longer takes events, and someone must see it.
    #[error("{0}")]
    Failed(String),
}

/// Settings of an agent process.
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    /// Kafka and topic naming.
    pub kafka: KafkaArgs,
    /// Where the agent's dedup store lives (`<dir>/<agent>`).
    pub data_dir: std::path::PathBuf,
    /// How long handled idempotency keys are remembered.
    pub dedup_ttl: Duration,
    /// Partitions of the agent's retry and replay topics.
    pub partitions: i32,
    /// Replication factor of the agent's topics, or [`crate::topics::AUTO_REPLICATION`]: from
    /// the cluster's size when each is created.
    pub replication: i32,
    /// Time for in-flight events at shutdown and at a rebalance.
    pub grace: Duration,
    /// The consumer group session timeout.
    pub session_timeout: Duration,
}

/// Header names of CONTRACT.md §3, one constant each.
pub mod header {
    pub const TYPE: &str = "ce_type";
    pub const ID: &str = "ce_id";
    pub const SOURCE: &str = "ce_source";
    pub const TIME: &str = "ce_time";
    pub const VERSION: &str = "ce_eventversion";
    pub const IDEMPOTENCY_KEY: &str = "ce_idempotencykey";
    pub const CORRELATION: &str = "ce_correlationid";
    pub const CAUSATION: &str = "ce_causationid";
    pub const EXPIRES: &str = "ce_expiresat";
    pub const REPLAY_ID: &str = "agentbus-replay-id";
    pub const ORIGINAL_TOPIC: &str = "agentbus-original-topic";
    pub const ORIGINAL_PARTITION: &str = "agentbus-original-partition";
    pub const ORIGINAL_OFFSET: &str = "agentbus-original-offset";
    pub const ORIGINAL_TIMESTAMP: &str = "agentbus-original-timestamp";
    pub const GROUP: &str = "agentbus-consumer-group";
    pub const ATTEMPTS: &str = "agentbus-attempts";
    pub const ERROR_KIND: &str = "agentbus-error-kind";
    pub const ERROR_MESSAGE: &str = "agentbus-error-message";
    pub const FAILED_AT: &str = "agentbus-failed-at";
    pub const NOT_BEFORE: &str = "agentbus-not-before";
}

/// Outcomes of `agentbus_events_consumed_total` (CONTRACT.md §5), plus `skipped` for
/// records of types the agent does not subscribe to and `dropped` for final failures of an
/// agent without a dead-letter topic.
pub mod outcome {
    /// Handled successfully.
    pub const PROCESSED: &str = "processed";
    /// Handled before: skipped.
    pub const DUPLICATE: &str = "duplicate";
    /// Moved to the retry topic.
    pub const RETRIED: &str = "retried";
    /// Moved to the dead-letter topic.
    pub const DEAD_LETTERED: &str = "dead_lettered";
    /// Past its `ce_expiresat`: skipped.
    pub const EXPIRED: &str = "expired";
    /// Failed for good, no dead-letter topic.
    pub const DROPPED: &str = "dropped";
}

/// How long the restore of newly assigned changelog partitions may take before the agent
/// fails (rather than handle their events without their dedup records). Below librdkafka's
/// `max.poll.interval.ms` (5 min), past which the group would drop the process anyway.
const RESTORE_DEADLINE: Duration = Duration::from_secs(120);
/// How often acknowledged changelog offsets move the local checkpoints.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Records a lane holds before the loop waits for it.
const LANE_CAPACITY: usize = 256;
/// How long the loop waits for a full lane before pausing the record's partition.
const PAUSE_AFTER: Duration = Duration::from_millis(500);

/// The longest wait a webhook's or service's `Retry-After` can ask for; longer answers are
/// clamped to it. What a peer sends is input: `Retry-After: 18446744073709551615` once
/// overflowed the retry arithmetic and killed the lane.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A record handed to a lane.
struct Work {
    message: Record,
    /// Attempts made before this delivery (from a retry record's header).
    attempts: u32,
    /// When it may be tried (retry records).
    not_before: Option<DateTime<Utc>>,
}

/// Everything the lanes share.
struct Shared {
    agent: AgentDefinition,
    kafka: KafkaArgs,
    registry: Arc<Registry>,
    publisher: Arc<Publisher>,
    dedup: ExpiringStore,
    dedup_ttl: Duration,
    changelog: Arc<Changelog>,
    /// Partitions assigned and restored, and the checkpoints to write.
    partitions: Arc<std::sync::Mutex<Assignment>>,
    handler: Handler,
    tracker: Arc<Tracker>,
    consumer: Arc<StreamConsumer<AgentContext>>,
    /// Stops this agent alone (a child of the process's token).
    stop: CancellationToken,
    /// Why the agent stopped by itself, the first cause only.
    failure: std::sync::Mutex<Option<String>>,
}

impl Shared {
    /// The agent cannot go on: keeps the first cause and stops the agent. The cause is
    /// logged once, by whoever runs the agent, from [`Error::Failed`].
    fn fail(&self, why: String) {
        let mut failure = self.failure.lock().expect("not poisoned");
        if failure.is_none() {
            *failure = Some(why);
        }
        self.stop.cancel();
    }
}

/// Rebalances: before partitions are taken away, the events in flight on them finish and
/// their offsets are committed, so the next owner neither loses nor repeats them. After an
/// assignment, the changelog partitions to restore and to drop are noted for the agent's
/// loop, which does both before it hands the next event on (librdkafka's callback is not
/// held up by a restore).
struct AgentContext {
    tracker: Arc<Tracker>,
    grace: Duration,
    changelog: Arc<Changelog>,
    partitions: Arc<std::sync::Mutex<Assignment>>,
    /// Wakes the loop when there is changelog work.
    changed: Arc<tokio::sync::Notify>,
}

/// The input partitions assigned and what follows for the changelog.
#[derive(Default)]
struct Assignment {
    /// The input partitions of the last assignment.
    assigned: HashSet<(String, i32)>,
    /// Their changelog partitions.
    held: HashSet<i32>,
    /// Changelog partitions this process alone writes (it holds every input partition that
    /// maps to them): its acknowledged records move their checkpoints.
    sole: HashSet<i32>,
    /// The highest acknowledged offset of each sole partition, not yet checkpointed.
    acked: std::collections::HashMap<i32, i64>,
    /// Changelog partitions no longer held, to drop locally.
    to_drop: HashSet<i32>,
    /// Changelog partitions to restore before the next event is handled.
    to_restore: HashSet<i32>,
}

impl Assignment {
    /// Whether the loop has changelog work to do.
    fn has_work(&self) -> bool {
        !self.to_drop.is_empty() || !self.to_restore.is_empty()
    }
}

impl ClientContext for AgentContext {}

impl ConsumerContext for AgentContext {
    fn pre_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        if let Rebalance::Revoke(partitions) = rebalance {
            let revoked: Vec<(String, i32)> = partitions
                .elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect();
            if !self.tracker.wait_idle(&revoked, self.grace) {
                tracing::warn!(
                    "events still in flight on revoked partitions after {:?}; their offsets stay uncommitted",
                    self.grace
                );
            }
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(error = %e, "commit at revoke");
            }
            self.tracker.forget(&revoked);
            // Nothing is checkpointed until the next assignment says what is still held.
            let mut partitions = self.partitions.lock().expect("not poisoned");
            partitions.sole.clear();
            partitions.acked.clear();
        }
    }

    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        let Rebalance::Assign(assigned) = rebalance else {
            return;
        };
        let new: HashSet<(String, i32)> = assigned
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let mut partitions = self.partitions.lock().expect("not poisoned");
        let held: HashSet<i32> = new
            .iter()
            .map(|(_, p)| self.changelog.partition_of(*p))
            .collect();
        // An input partition not held before brings records written elsewhere: its
        // changelog partition is restored (from the local checkpoint on).
        let restore: HashSet<i32> = new
            .difference(&partitions.assigned)
            .map(|(_, p)| self.changelog.partition_of(*p))
            .collect();
        let dropped: Vec<i32> = partitions.held.difference(&held).copied().collect();
        for p in &dropped {
            partitions.to_restore.remove(p);
            partitions.to_drop.insert(*p);
        }
        partitions.to_restore.extend(restore);
        partitions.sole = held
            .iter()
            .copied()
            .filter(|p| self.changelog.sole_writer(*p, &new))
            .collect();
        partitions.acked.clear();
        partitions.assigned = new;
        partitions.held = held;
        if partitions.has_work() {
            self.changed.notify_one();
        }
    }
}

/// Runs one agent until `cancel`, then drains: in-flight events get the grace period, the
/// stored offsets are committed.
pub async fn run_agent(
    agent: AgentDefinition,
    settings: RuntimeSettings,
    registry: Arc<Registry>,
    publisher: Arc<Publisher>,
    integrations: Arc<Integrations>,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let handler = Handler::new(&agent.handler, agent.retry.attempts, &integrations)
        .map_err(Error::Handler)?;
    let prefix = settings.kafka.topic_prefix.clone();
    let own_topics = [
        (
            agent.retry_topic(&prefix),
            Duration::from_secs(7 * 24 * 3600),
        ),
        (agent.dlq_topic(&prefix), Duration::from_secs(7 * 24 * 3600)),
        (
            agent.replay_topic(&prefix),
            Duration::from_secs(7 * 24 * 3600),
        ),
    ];
    let specs: Vec<TopicSpec> = own_topics
        .iter()
        .map(|(name, retention)| TopicSpec {
            name: name.clone(),
            partitions: settings.partitions,
            replication: settings.replication,
            retention: *retention,
            configs: Vec::new(),
        })
        .collect();
    topics::ensure(&settings.kafka, &specs).await?;

    let mut topics: Vec<String> = registry
        .event_types()
        .filter(|t| agent.subscribes_to(&t.name))
        .map(|t| settings.kafka.events_topic(t.domain()))
        .collect();
    topics.sort();
    topics.dedup();
    topics.push(agent.retry_topic(&prefix));
    topics.push(agent.replay_topic(&prefix));

    let dedup = ExpiringStore::open(&settings.data_dir.join("dedup").join(&agent.name))?;
    let changelog = Arc::new(
        Changelog::open(
            &settings.kafka,
            &agent.name,
            &topics,
            settings.partitions,
            settings.replication,
            settings.dedup_ttl,
        )
        .await?,
    );
    let partitions = Arc::new(std::sync::Mutex::new(Assignment::default()));
    let changed = Arc::new(tokio::sync::Notify::new());
    let tracker = Arc::new(Tracker::default());
    let consumer: StreamConsumer<AgentContext> = consumer_config(&settings, &agent)
        .create_with_context(AgentContext {
            tracker: tracker.clone(),
            grace: settings.grace,
            changelog: changelog.clone(),
            partitions: partitions.clone(),
            changed: changed.clone(),
        })?;
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topic_refs)?;
    let consumer = Arc::new(consumer);
    // The process's token stops every agent; this one stops this agent when it fails.
    let stop = cancel.child_token();

    let shared = Arc::new(Shared {
        kafka: settings.kafka.clone(),
        registry,
        publisher,
        dedup,
        dedup_ttl: settings.dedup_ttl,
        changelog,
        partitions,
        handler,
        tracker: tracker.clone(),
        consumer: consumer.clone(),
        stop: stop.clone(),
        failure: std::sync::Mutex::new(None),
        agent,
    });
    metrics::gauge!(telemetry::DEDUP_KEYS, "group" => shared.agent.name.clone())
        .set(shared.dedup.len() as f64);
    tracing::info!(agent = %shared.agent.name, ?topics, "agent started");

    // Lanes: one task each, events of one key always in the same lane, in order. Retry
    // records get a lane of their own, since they wait for their not-before time.
    let lane_count = shared.agent.concurrency;
    let mut lanes = Vec::with_capacity(lane_count + 1);
    let mut lane_tasks = tokio::task::JoinSet::new();
    for _ in 0..=lane_count {
        let (tx, rx) = mpsc::channel::<Work>(LANE_CAPACITY);
        lanes.push(tx);
        lane_tasks.spawn(run_lane(shared.clone(), rx, stop.clone()));
    }
    let retry_topic = shared.agent.retry_topic(&prefix);
    lane_tasks.spawn(sweep_dedup(shared.clone(), stop.clone()));
    lane_tasks.spawn(checkpoint_own_records(shared.clone(), stop.clone()));
    let mut unreadable = unreadable::Prober::new(&settings, &shared.agent.name);
    let mut topic_names = record::Topics::default();

    loop {
        let message = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            // A lane or the sweeper ends only when the agent stops; ending before is a
            // failure (a panic, most likely), never a quiet end of the agent.
            Some(ended) = lane_tasks.join_next() => {
                if !stop.is_cancelled() {
                    shared.fail(task_failure(ended));
                }
                break;
            }
            _ = changed.notified() => {
                if let Err(why) = follow_assignment(&shared).await {
                    shared.fail(why);
                    break;
                }
                continue;
            }
            m = consumer.recv() => m,
        };
        // The assignment that brought this record may have come with it (the rebalance
        // callback runs inside `recv`): its changelog partitions are restored first.
        if shared.partitions.lock().expect("not poisoned").has_work()
            && let Err(why) = follow_assignment(&shared).await
        {
            shared.fail(why);
            break;
        }
        let m = match message {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(agent = %shared.agent.name, error = %e, "consumer error");
                // A record librdkafka cannot hand over stops its partition: find it and
                // skip past it, counted and logged.
                if let Some(code) = e.rdkafka_error_code()
                    && unreadable::is_unreadable(code)
                {
                    // Bounded (one deadline for the round) and left at once on stop.
                    unreadable
                        .skip_stuck(&consumer, &tracker, code, &stop)
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        tracker.begin(m.topic(), m.partition(), m.offset());
        let from_retry = m.topic() == retry_topic;
        let work = Work {
            attempts: if from_retry {
                // A header is input: clamped to the policy (at most one attempt is left),
                // so that counting on from it cannot overflow.
                header_str(&m, header::ATTEMPTS)
                    .and_then(|a| a.trim().parse::<u32>().ok())
                    .unwrap_or(0)
                    .min(shared.agent.retry.attempts.saturating_sub(1))
            } else {
                0
            },
            not_before: if from_retry {
                header_str(&m, header::NOT_BEFORE)
                    .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                    .map(|t| t.to_utc())
            } else {
                None
            },
            message: Record::copy(&m, topic_names.intern(m.topic())),
        };
        // Librdkafka's message goes back at once (the copy is all the lane needs).
        drop(m);
        let lane = if from_retry {
            lane_count
        } else {
            lane_of(work.message.key(), lane_count)
        };
        let work = match lanes[lane].try_send(work) {
            Ok(()) => continue,
            Err(mpsc::error::TrySendError::Closed(_)) => break,
            Err(mpsc::error::TrySendError::Full(work)) => work,
        };
        // A burst from one fetch can fill a lane for a moment; wait a little before pausing,
        // since a pause makes librdkafka drop what it prefetched and fetch it again.
        let work = match tokio::time::timeout(PAUSE_AFTER, lanes[lane].reserve()).await {
            Ok(Ok(permit)) => {
                permit.send(work);
                continue;
            }
            Ok(Err(_)) => break,
            Err(_) => work,
        };
        // The lane stays full: stop fetching this partition rather than buffer.
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(work.message.topic(), work.message.partition());
        let paused = consumer.pause(&tpl).is_ok();
        let gauge =
            metrics::gauge!(telemetry::PAUSED_PARTITIONS, "group" => shared.agent.name.clone());
        gauge.increment(1.0);
        let sent = tokio::select! {
            _ = cancel.cancelled() => false,
            r = lanes[lane].send(work) => r.is_ok(),
        };
        gauge.decrement(1.0);
        if paused {
            let _ = consumer.resume(&tpl);
        }
        if !sent {
            break;
        }
    }

    // Shutdown: no new work; lanes finish what they hold within the grace period.
    drop(lanes);
    let drained = tokio::time::timeout(settings.grace, async {
        while let Some(ended) = lane_tasks.join_next().await {
            // A lane that panicked while the loop was handing it work (its channel closed).
            if let Err(e) = &ended
                && e.is_panic()
            {
                shared.fail(task_failure(ended));
            }
        }
    })
    .await
    .is_ok();
    if !drained {
        tracing::warn!(agent = %shared.agent.name, "in-flight events did not finish within the grace period; they will be delivered again");
        lane_tasks.abort_all();
    }
    // The loop ended without anyone stopping the agent: a lane's channel closed.
    if !cancel.is_cancelled() && !stop.is_cancelled() {
        shared.fail("a lane stopped taking events".into());
    }
    let failure = shared.failure.lock().expect("not poisoned").take();
    // Checkpoints of what was acknowledged, kept for a fast restart.
    write_checkpoints(&shared).await;
    // Every dedup record handed over is on disk after this flush; the completions waiting
    // for it then store their offsets, and the final commit takes them along.
    let flushed = shared.dedup.flush().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(error = %e, "final commit");
    }
    if let Some(why) = failure {
        return Err(Error::Failed(why));
    }
    flushed?;
    tracing::info!(agent = %shared.agent.name, "agent stopped");
    Ok(())
}

/// Why a lane task ended: its panic's message, or that it returned.
fn task_failure(ended: Result<(), tokio::task::JoinError>) -> String {
    match ended {
        Ok(()) => "a lane ended by itself".into(),
        Err(e) if e.is_panic() => format!("a lane panicked: {}", panic_message(e.into_panic())),
        Err(e) => format!("a lane was cancelled: {e}"),
    }
}

/// The text of a panic's payload (`panic!` gives a `&str` or a `String`).
pub fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => payload
            .downcast_ref::<&str>()
            .map(|text| text.to_string())
            .unwrap_or_else(|| "a panic without a message".into()),
    }
}

/// Drops the changelog partitions no longer held and restores the newly assigned ones;
/// the cause when the agent cannot go on.
async fn follow_assignment(shared: &Shared) -> Result<(), String> {
    let (to_drop, to_restore) = {
        let mut partitions = shared.partitions.lock().expect("not poisoned");
        (
            std::mem::take(&mut partitions.to_drop),
            std::mem::take(&mut partitions.to_restore),
        )
    };
    let group = &shared.agent.name;
    for p in to_drop {
        let dropped = shared
            .dedup
            .drop_partition(p)
            .await
            .map_err(|e| format!("dedup store failed dropping a revoked partition: {e}"))?;
        tracing::info!(agent = %group, partition = p, records = dropped, "dropped the dedup records of a revoked changelog partition");
    }
    let mut restore: Vec<i32> = to_restore.into_iter().collect();
    restore.sort();
    shared
        .changelog
        .restore(&shared.dedup, &restore, RESTORE_DEADLINE)
        .await
        .map_err(|e| {
            format!("the agent stops rather than handle events without their dedup records: {e}")
        })?;
    metrics::gauge!(telemetry::DEDUP_KEYS, "group" => group.clone()).set(shared.dedup.len() as f64);
    Ok(())
}

/// Moves the checkpoints of the changelog partitions this process alone writes up to its
/// acknowledged records, once a second, and sets `agentbus_dedup_keys` then (not per event:
/// a gauge a scrape reads every few seconds needs no more).
async fn checkpoint_own_records(shared: Arc<Shared>, cancel: CancellationToken) {
    let keys = metrics::gauge!(telemetry::DEDUP_KEYS, "group" => shared.agent.name.clone());
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(CHECKPOINT_EVERY) => {}
        }
        write_checkpoints(&shared).await;
        keys.set(shared.dedup.len() as f64);
    }
}

/// Hands the acknowledged offsets to the store as checkpoints. Safe because a record's
/// key is handed to the store before the record is sent, the producer keeps the order of a
/// partition's records, and the store applies writes in the order it got them: once a
/// checkpoint c is on disk, so is every record this process wrote up to c. Nothing waits
/// for it: a checkpoint lost in a crash only means a longer restore.
async fn write_checkpoints(shared: &Shared) {
    let acked = std::mem::take(&mut shared.partitions.lock().expect("not poisoned").acked);
    for (p, offset) in acked {
        if let Err(e) = shared
            .dedup
            .put_partitioned(p, Vec::new(), Some(offset))
            .await
        {
            tracing::warn!(agent = %shared.agent.name, error = %e, "dedup checkpoint");
        }
    }
}

/// Removes expired keys from the agent's dedup store, once a minute.
async fn sweep_dedup(shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        match shared.dedup.sweep().await {
            Ok(removed) => {
                metrics::gauge!(telemetry::DEDUP_KEYS, "group" => shared.agent.name.clone())
                    .set(shared.dedup.len() as f64);
                if removed > 0 {
                    tracing::debug!(agent = %shared.agent.name, removed, "swept expired dedup keys");
                }
            }
            Err(e) => tracing::error!(agent = %shared.agent.name, error = %e, "dedup sweep failed"),
        }
    }
}

fn consumer_config(settings: &RuntimeSettings, agent: &AgentDefinition) -> ClientConfig {
    let session = settings.session_timeout.as_millis().max(600);
    settings.kafka.client_config_with(&[
        ("group.id", agent.name.clone()),
        // A dead process's partitions move on after this; heartbeats well inside it.
        ("session.timeout.ms", session.to_string()),
        ("heartbeat.interval.ms", (session / 6).to_string()),
        // At-least-once the rdkafka way: offsets are stored by us once an event's outcome
        // is final, and committed in the background from what was stored.
        ("enable.auto.commit", "true".into()),
        ("enable.auto.offset.store", "false".into()),
        ("auto.commit.interval.ms", "1000".into()),
        // A new agent starts from the oldest event still kept.
        ("auto.offset.reset", "earliest".into()),
        // Bounds what librdkafka prefetches per partition ahead of the lanes.
        ("queued.max.messages.kbytes", "16384".into()),
        // Latency: the broker answers a fetch as soon as one record is there, so an event
        // waits for no batch to fill (the publish → handler latency target is 20 ms p50).
        ("fetch.min.bytes", "1".into()),
        // With nothing to fetch the broker holds the request this long: it only bounds how
        // often an idle agent asks (a record arriving ends the wait at once, see above), so
        // it stays at librdkafka's 500 ms rather than wake the broker more often for nothing.
        ("fetch.wait.max.ms", "500".into()),
        // Prefetch per partition. librdkafka's 100 000 would buffer up to the kbytes bound
        // above for every partition; 10 000 (about 0.1 s at the agent's rate) keeps the
        // lanes fed across a fetch round trip with far less memory held per partition.
        ("queued.min.messages", "10000".into()),
        // Once a partition's prefetch is over the bounds above, librdkafka waits this long
        // before it fetches that partition again (1 000 ms by default), however soon the
        // lanes drain it: an agent's first fetch of a backlog filled the prefetch, the lanes
        // handled it in a fraction of a second, then sat idle for the rest of the second
        // (seen as a 0.3-0.6 s stall after the first ~14 000 events of the consume bench).
        // 20 ms keeps the fetch close behind the lanes for a wake-up of the fetcher per
        // partition every 20 ms while the prefetch is full.
        ("fetch.queue.backoff.ms", "20".into()),
        // Several processes of one agent compete for its work, so each must hold a share of
        // every topic, the events topics above all. `range` assigns each topic on its own
        // (N processes: each about 1/N of that topic's partitions). `cooperative-sticky`
        // and `roundrobin` balance the count over all subscribed topics together:
        // cooperative-sticky gave one process the three events partitions and the other
        // the retry and replay topics (issue 10, item 2), and roundrobin's per-topic
        // spread holds only while every process subscribes to exactly the same topics
        // (not so while a new definition rolls out). The price of `range` is an eager
        // rebalance: every partition is revoked at a join, after its in-flight events
        // finished (see `AgentContext`), and consumption pauses for the join.
        ("partition.assignment.strategy", "range".into()),
    ])
}

/// Which lane a key goes to: the same key always the same lane (within a process: nothing
/// else depends on the mapping). FNV-1a rather than SipHash: a lane's choice needs no
/// protection from chosen keys (one key always goes to one lane anyway), and SipHash's setup
/// cost more than the rest of the hand-off.
fn lane_of(key: Option<&[u8]>, lanes: usize) -> usize {
    let Some(key) = key else { return 0 };
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in key {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    // Spreads the high bits into the low ones, which the remainder keeps.
    ((hash ^ (hash >> 32)) % lanes as u64) as usize
}

/// The headers a consumed record is read for, found in one pass over its headers (instead
/// of a scan and a copy per header asked for). As [`header_str`]: the first header of a
/// name counts, its value as (lossy) UTF-8.
struct Known<'a> {
    /// Per name of [`Known::NAMES`]: whether it was seen, and its value.
    values: [Option<Option<std::borrow::Cow<'a, str>>>; Known::NAMES.len()],
}

impl<'a> Known<'a> {
    const NAMES: [&'static str; 10] = [
        header::TYPE,
        header::ID,
        header::SOURCE,
        header::TIME,
        header::VERSION,
        header::IDEMPOTENCY_KEY,
        header::CORRELATION,
        header::CAUSATION,
        header::EXPIRES,
        header::REPLAY_ID,
    ];

    fn of(message: &'a Record) -> Self {
        let mut values: [Option<Option<std::borrow::Cow<'a, str>>>; Known::NAMES.len()] =
            Default::default();
        for (name, value) in message.raw_headers() {
            if let Some(i) = Self::NAMES.iter().position(|n| n.as_bytes() == name)
                && values[i].is_none()
            {
                values[i] = Some(value.map(String::from_utf8_lossy));
            }
        }
        Known { values }
    }

    /// The value of header `name` (one of [`Known::NAMES`]).
    fn get(&self, name: &str) -> Option<&str> {
        let i = Self::NAMES.iter().position(|n| *n == name)?;
        self.values[i].as_ref()?.as_deref()
    }
}

/// A lane's metric handles, looked up once (a label set built and hashed per event was a
/// good part of an event's cost).
struct LaneMetrics {
    group: String,
    consumed: std::collections::HashMap<String, Vec<(&'static str, metrics::Counter)>>,
    handler_duration: metrics::Histogram,
    in_flight: metrics::Gauge,
}

impl LaneMetrics {
    fn new(group: &str) -> Self {
        LaneMetrics {
            group: group.to_string(),
            consumed: Default::default(),
            handler_duration: metrics::histogram!(telemetry::HANDLER_DURATION, "group" => group.to_string()),
            in_flight: metrics::gauge!(telemetry::IN_FLIGHT, "group" => group.to_string()),
        }
    }

    /// Counts an event of `event_type` in `agentbus_events_consumed_total`.
    fn count(&mut self, event_type: &str, outcome: &'static str) {
        let counters = match self.consumed.get_mut(event_type) {
            Some(counters) => counters,
            None => self.consumed.entry(event_type.to_string()).or_default(),
        };
        if let Some((_, counter)) = counters.iter().find(|(o, _)| *o == outcome) {
            counter.increment(1);
            return;
        }
        let counter = metrics::counter!(telemetry::EVENTS_CONSUMED, "group" => self.group.clone(), "event_type" => event_type.to_string(), "outcome" => outcome);
        counter.increment(1);
        counters.push((outcome, counter));
    }
}

/// The value of header `name`, as text.
pub fn header_str<M: Message>(message: &M, name: &str) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Events whose dedup records a lane may have on their way (to disk and the changelog) while
/// it goes on handling events. Recording takes a disk flush and a broker round trip; waiting
/// for each before the next event kept a lane to a few hundred events a second. The bound
/// keeps what a failing store can cost small: at most this many events of a lane (and one
/// batch, [`LANE_BATCH`]) handled without a durable record, and they come again (their
/// offsets were never stored).
const RECORDING_WINDOW: usize = 256;

/// Events a lane takes from its queue at once (what is there, up to this many): handled one
/// after the other, then their dedup records are handed to the store in one write per
/// changelog partition and recorded together. Per event, a write, its reply channel and a
/// future of its own cost more than the no-op handler (`ops/bench.sh callgrind agent`). Under
/// a light load a batch is the one event that came, so nothing waits for company.
const LANE_BATCH: usize = 64;

/// How long handled events of a batch may wait for the rest of it before their records are
/// handed over: a no-op handler gets through a batch well within it, a webhook's event each
/// goes on its own (its repeat after a crash stays the events in flight, not a batch).
const HAND_OVER_AFTER: Duration = Duration::from_millis(2);

async fn run_lane(shared: Arc<Shared>, mut work: mpsc::Receiver<Work>, cancel: CancellationToken) {
    let mut lane = LaneMetrics::new(&shared.agent.name);
    // Records of handled events on their way, a batch each; an event's offset is stored when
    // its recording finished (see `Recording::complete`), in whatever order they finish (the
    // tracker stores an offset only once everything before it is final).
    let mut recordings = futures::stream::FuturesUnordered::new();
    // Events in `recordings`.
    let mut recording = 0;
    let mut batch = Vec::with_capacity(LANE_BATCH);
    let mut stopping = false;
    while !stopping {
        let taken = tokio::select! {
            biased;
            Some(done) = recordings.next(), if !recordings.is_empty() => {
                recording -= done;
                continue;
            }
            taken = work.recv_many(&mut batch, LANE_BATCH) => taken,
        };
        if taken == 0 {
            break;
        }
        let mut handled = Vec::new();
        let mut first_handled = Instant::now();
        let mut store_failed = false;
        for w in batch.drain(..) {
            // Stopping (SIGTERM, or the dedup store failed): what is queued is given back,
            // not handled; its next delivery handles it.
            if stopping || cancel.is_cancelled() {
                stopping = true;
                continue;
            }
            lane.in_flight.increment(1.0);
            let (topic, partition, offset) = (
                w.message.topic_arc(),
                w.message.partition(),
                w.message.offset(),
            );
            let outcome = process(&shared, w, &mut lane, &cancel).await;
            lane.in_flight.decrement(1.0);
            // The recordings move on between events too (their changelog records go out as
            // soon as they are on disk here), without waiting for any.
            if !recordings.is_empty() {
                std::future::poll_fn(|cx| {
                    while let std::task::Poll::Ready(Some(done)) = recordings.poll_next_unpin(cx) {
                        recording -= done;
                    }
                    std::task::Poll::Ready(())
                })
                .await;
            }
            match outcome {
                Outcome::Final => finish(&shared, &topic, partition, offset),
                // Stopping: this event and those queued behind it are given back, unstored;
                // their next delivery (here after a restart, or to another process) handles
                // them.
                Outcome::GivenBack => stopping = true,
                Outcome::Handled(h) => {
                    if handled.is_empty() {
                        first_handled = Instant::now();
                    }
                    handled.push((h, topic, partition, offset));
                    // Slow handlers: what was handled is written now rather than after the
                    // rest of the batch, so that a crash repeats no more than it did before
                    // batches.
                    if first_handled.elapsed() >= HAND_OVER_AFTER {
                        let events = std::mem::take(&mut handled);
                        let Some(r) = Recording::hand_over(&shared, events).await else {
                            store_failed = true;
                            break;
                        };
                        recording += r.events.len();
                        recordings.push(r.complete(&shared, &cancel));
                    }
                }
            }
        }
        if store_failed {
            break;
        }
        // What was handled is recorded, even when stopping (within the shutdown's grace).
        // The offsets are stored once the dedup records are durable in both places, so a
        // committed offset never runs ahead of what the dedup store knows.
        if !handled.is_empty() {
            let Some(r) = Recording::hand_over(&shared, handled).await else {
                break;
            };
            recording += r.events.len();
            recordings.push(r.complete(&shared, &cancel));
        }
        while recording >= RECORDING_WINDOW {
            match recordings.next().await {
                Some(done) => recording -= done,
                None => break,
            }
        }
    }
    while recordings.next().await.is_some() {}
}

/// Marks an offset final and stores what can be stored.
fn finish(shared: &Shared, topic: &str, partition: i32, offset: i64) {
    if let Some(done) = shared.tracker.complete(topic, partition, offset)
        && let Err(e) = shared.consumer.store_offset(topic, partition, done)
    {
        // The partition was revoked meanwhile: its next owner takes over from the commit.
        tracing::debug!(error = %e, topic, partition, "storing offset");
    }
}

/// A handled event's dedup record, held in the store ([`ExpiringStore::hold`]) and not yet
/// written.
struct Handled {
    key: Arc<str>,
    expires_ms: u64,
    changelog_partition: i32,
}

/// Dedup keys with their expiry (ms since the epoch): one write to the store.
type DedupKeys = Vec<(Arc<str>, u64)>;

/// The dedup records of a lane's batch of handled events on their way to both places.
struct Recording {
    /// The local writes, one per changelog partition.
    durable: Vec<Durable>,
    /// The events: record, input topic, partition and offset.
    events: Vec<(Handled, Arc<str>, i32, i64)>,
}

impl Recording {
    /// Hands the batch's keys to the local store, one write per changelog partition. None
    /// when the store failed: the agent stops, and the batch's offsets stay unstored.
    async fn hand_over(
        shared: &Shared,
        events: Vec<(Handled, Arc<str>, i32, i64)>,
    ) -> Option<Recording> {
        let mut writes: Vec<(i32, DedupKeys)> = Vec::new();
        for (h, ..) in &events {
            let key = (h.key.clone(), h.expires_ms);
            match writes.iter_mut().find(|(p, _)| *p == h.changelog_partition) {
                Some((_, keys)) => keys.push(key),
                None => writes.push((h.changelog_partition, vec![key])),
            }
        }
        let mut durable = Vec::with_capacity(writes.len());
        for (partition, keys) in writes {
            match shared.dedup.put_held(partition, keys).await {
                Ok(d) => durable.push(d),
                Err(e) => {
                    shared.fail(format!("dedup store unwritable: {e}"));
                    return None;
                }
            }
        }
        Some(Recording { durable, events })
    }

    /// Waits until the records are durable in both places, marking each offset final once
    /// its record is; returns how many events the recording held.
    ///
    /// The order, and why it is safe: (1) the handler succeeded and the key is held in the
    /// local store (`hold`, which `get` sees at once); (2) the key is handed to the store
    /// (`put_held`) and (3) flushed there; only then is the record sent to the changelog
    /// (idempotent, acks=all), and once (4) the changelog acknowledges, (5) the offset is
    /// stored, and committed later. A record whose local write failed never reaches the
    /// changelog: the agent stops, and the event is handled again by whoever takes the
    /// partition (the chaos test of an unwritable store counts on it).
    /// So a committed offset never runs ahead of a record that is not on disk here and on
    /// every in-sync replica: whoever gets the partition next (this process after a restart
    /// from its disk, another one from the changelog) skips every event before that offset
    /// and every one after it that was recorded. A crash between (1) and (5) delivers the
    /// event again; if its record made it to either place the repeat is skipped, else it is
    /// handled again: at least once, never lost.
    async fn complete(self, shared: &Shared, cancel: &CancellationToken) -> usize {
        let count = self.events.len();
        for durable in self.durable {
            if let Err(e) = durable.wait().await {
                shared.fail(format!(
                    "dedup store unwritable: the agent stops taking events (they stay unconsumed): {e}"
                ));
                return count;
            }
        }
        // All sent at once (one produce request carries many), then waited for in order.
        let sent: Vec<_> = self
            .events
            .iter()
            .map(|(h, topic, partition, _)| {
                shared
                    .changelog
                    .send(&h.key, topic, *partition, h.expires_ms)
                    .ok()
            })
            .collect();
        for ((h, topic, partition, offset), first) in self.events.iter().zip(sent) {
            // Stopping before the acknowledgement: the offset stays unstored.
            let Some((changelog_partition, changelog_offset)) = shared
                .changelog
                .record(&h.key, topic, *partition, h.expires_ms, first, cancel)
                .await
            else {
                return count;
            };
            finish(shared, topic, *partition, *offset);
            let mut partitions = shared.partitions.lock().expect("not poisoned");
            if partitions.sole.contains(&changelog_partition) {
                let acked = partitions.acked.entry(changelog_partition).or_insert(-1);
                *acked = (*acked).max(changelog_offset);
            }
        }
        count
    }
}

/// What became of a record.
#[must_use]
enum Outcome {
    /// Final (skipped, duplicate, expired, moved to the retry or dead-letter topic).
    Final,
    /// Handled; final once its dedup record is durable here and in the changelog.
    Handled(Handled),
    /// The agent is stopping: not handled, to be delivered again.
    GivenBack,
}

/// Sleeps for `wait`; false when the agent stops first.
async fn wait_unless_stopping(wait: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

/// The outcome of one record, decided and recorded.
async fn process(
    shared: &Shared,
    w: Work,
    lane: &mut LaneMetrics,
    cancel: &CancellationToken,
) -> Outcome {
    let group = &shared.agent.name;
    fault::strike(group);
    let message = &w.message;
    let known = Known::of(message);
    let event_type = known.get(header::TYPE);
    // Other types share the topic: skip them by header, without decoding.
    if let Some(t) = event_type
        && !shared.agent.subscribes_to(t)
    {
        return Outcome::Final;
    }
    if let Some(expires) = known
        .get(header::EXPIRES)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        && expires < Utc::now()
    {
        lane.count(event_type.unwrap_or(""), outcome::EXPIRED);
        return Outcome::Final;
    }
    let event = match decode(shared, message, &known) {
        Ok(event) => event,
        Err(reason) => {
            let label = event_type.unwrap_or("");
            let failure = Failure::fatal("undecodable", reason);
            return finish_failed(shared, message, w.attempts, &failure, label, cancel).await;
        }
    };
    if !shared.agent.subscribes_to(&event.event_type) {
        return Outcome::Final;
    }
    let replay = known.get(header::REPLAY_ID).map(str::to_string);
    // Shared by the store's job, its pending entry and the changelog record: one copy.
    let dedup_key: Arc<str> = match &replay {
        Some(replay) => format!("{}|{replay}", event.idempotency_key).into(),
        None => event.idempotency_key.as_str().into(),
    };
    match shared.dedup.get(&dedup_key) {
        Ok(Some(_)) => {
            lane.count(&event.event_type, outcome::DUPLICATE);
            return Outcome::Final;
        }
        Ok(None) => {}
        Err(e) => {
            // Without its dedup store the agent must not handle events: stop here, the
            // offset stays unstored and the event comes again.
            shared.fail(format!(
                "dedup store failed: the agent stops taking events (they stay unconsumed): {e}"
            ));
            return Outcome::GivenBack;
        }
    }
    if let Some(not_before) = w.not_before {
        // The header is input too: no wait longer than the agent could have asked for.
        let longest = shared.agent.retry.max_backoff.max(MAX_RETRY_AFTER);
        let wait = (not_before - Utc::now())
            .to_std()
            .unwrap_or_default()
            .min(longest);
        if !wait_unless_stopping(wait, cancel).await {
            return Outcome::GivenBack;
        }
    }

    let policy = &shared.agent.retry;
    let held_since = Instant::now();
    let mut attempt = w.attempts;
    loop {
        attempt = attempt.saturating_add(1);
        let started = Instant::now();
        tracing::debug!(agent = %group, event = %event.id, event_type = %event.event_type, attempt, "handling");
        let result = match shared.handler.handle(&event, attempt).await {
            Ok(follow_ups) => {
                publish_follow_ups(shared, &event, replay.as_deref(), follow_ups).await
            }
            Err(f) => Err(f),
        };
        lane.handler_duration
            .record(started.elapsed().as_secs_f64());
        let failure = match result {
            Ok(()) => {
                let expires_ms = now_ms() + shared.dedup_ttl.as_millis() as u64;
                let changelog_partition = shared.changelog.partition_of(message.partition());
                // Held at once (a repeat of the key, in this lane or another, is a duplicate
                // from now on); written with the lane's other keys of this batch.
                if let Err(e) = shared.dedup.hold(&dedup_key, changelog_partition) {
                    shared.fail(format!("dedup store unwritable: {e}"));
                    return Outcome::GivenBack;
                }
                lane.count(&event.event_type, outcome::PROCESSED);
                return Outcome::Handled(Handled {
                    key: dedup_key,
                    expires_ms,
                    changelog_partition,
                });
            }
            Err(f) => f,
        };
        tracing::debug!(agent = %group, event = %event.id, attempt, kind = failure.kind, error = %failure.message, "handler failed");
        if !failure.retryable || attempt >= policy.attempts {
            return finish_failed(
                shared,
                message,
                attempt,
                &failure,
                &event.event_type,
                cancel,
            )
            .await;
        }
        let jitter = rand::random::<f64>() * 2.0 - 1.0;
        let wait = retry_wait(failure.retry_after, policy.backoff(attempt, jitter));
        if held_since.elapsed().saturating_add(wait) > policy.max_hold {
            // Waiting here would hold the events behind it too long: retry later, elsewhere.
            let not_before = time_after(wait);
            let mut extra = vec![
                (header::ATTEMPTS, attempt.to_string()),
                (header::NOT_BEFORE, format_time(&not_before)),
                (header::ERROR_KIND, failure.kind.to_string()),
                (header::ERROR_MESSAGE, failure.message.clone()),
            ];
            extra.extend(origin_headers(message, group));
            let topic = shared.agent.retry_topic(&shared.kafka.topic_prefix);
            if !forward(shared, message, &topic, &extra, cancel).await {
                return Outcome::GivenBack;
            }
            lane.count(&event.event_type, outcome::RETRIED);
            return Outcome::Final;
        }
        if !wait_unless_stopping(wait, cancel).await {
            return Outcome::GivenBack;
        }
    }
}

/// The wait before the next attempt: what the peer asked for, clamped to
/// [`MAX_RETRY_AFTER`], and at least the policy's backoff.
fn retry_wait(asked: Option<Duration>, backoff: Duration) -> Duration {
    asked
        .map(|asked| asked.min(MAX_RETRY_AFTER))
        .unwrap_or_default()
        .max(backoff)
}

/// Now plus `wait`, saturating at the latest time chrono can represent.
fn time_after(wait: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(wait)
        .ok()
        .and_then(|wait| Utc::now().checked_add_signed(wait))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// A final failure: to the dead-letter topic, or dropped when the agent has none.
async fn finish_failed(
    shared: &Shared,
    message: &Record,
    attempts: u32,
    failure: &Failure,
    event_type: &str,
    cancel: &CancellationToken,
) -> Outcome {
    let group = &shared.agent.name;
    let count = |outcome: &'static str| {
        metrics::counter!(telemetry::EVENTS_CONSUMED, "group" => group.clone(), "event_type" => event_type.to_string(), "outcome" => outcome)
            .increment(1);
    };
    if !shared.agent.dead_letter {
        tracing::error!(agent = %group, kind = failure.kind, error = %failure.message, "event failed for good and the agent has no dead-letter topic; dropped");
        count(outcome::DROPPED);
        return Outcome::Final;
    }
    let mut extra = vec![
        (header::ATTEMPTS, attempts.max(1).to_string()),
        (header::ERROR_KIND, failure.kind.to_string()),
        (
            header::ERROR_MESSAGE,
            failure.message.chars().take(2000).collect(),
        ),
        (header::FAILED_AT, format_time(&Utc::now())),
    ];
    extra.extend(origin_headers(message, group));
    let topic = shared.agent.dlq_topic(&shared.kafka.topic_prefix);
    if !forward(shared, message, &topic, &extra, cancel).await {
        return Outcome::GivenBack;
    }
    tracing::warn!(agent = %group, kind = failure.kind, error = %failure.message, "event dead-lettered");
    count(outcome::DEAD_LETTERED);
    Outcome::Final
}

/// Where a record came from. A record already forwarded keeps its first origin.
fn origin_headers(message: &Record, group: &str) -> Vec<(&'static str, String)> {
    if message.header_str(header::ORIGINAL_TOPIC).is_some() {
        return vec![(header::GROUP, group.to_string())];
    }
    let timestamp = message.timestamp().to_millis().unwrap_or(-1);
    vec![
        (header::ORIGINAL_TOPIC, message.topic().to_string()),
        (header::ORIGINAL_PARTITION, message.partition().to_string()),
        (header::ORIGINAL_OFFSET, message.offset().to_string()),
        (header::ORIGINAL_TIMESTAMP, timestamp.to_string()),
        (header::GROUP, group.to_string()),
    ]
}

/// Copies a record to `topic` — key, value and headers kept, `extra` replacing headers of
/// the same name — and waits for the broker; retries until it succeeds or the agent stops,
/// since the record's offset must not be stored before its copy exists. False when the agent
/// stopped first.
async fn forward(
    shared: &Shared,
    message: &Record,
    topic: &str,
    extra: &[(&'static str, String)],
    cancel: &CancellationToken,
) -> bool {
    let headers = message.copied_headers(&[], extra);
    let mut wait = Duration::from_millis(200);
    loop {
        // While the broker is known to be away, nothing is sent: deliveries that time out
        // make librdkafka bump the producer's epoch, which some brokers mishandle.
        if !shared.publisher.broker_up() {
            if !wait_unless_stopping(Duration::from_millis(500), cancel).await {
                return false;
            }
            continue;
        }
        let record = message.copy_to(topic, headers.clone());
        // The publisher's producer: renewed after a delivery on it failed for good, or timed
        // out on tansu (see `Publisher::renew_producer`), so forwarding recovers with
        // publishing.
        let current = shared.publisher.current_producer();
        match current.producer.send(record, Duration::from_secs(10)).await {
            Ok(_) => {
                shared.publisher.note_acknowledged();
                return true;
            }
            Err((e, _)) => {
                tracing::warn!(topic, error = %e, "could not write the record; retrying");
                match e.rdkafka_error_code() {
                    Some(RDKafkaErrorCode::Fatal) => shared
                        .publisher
                        .delivery_failed_fatally(&current, "a forwarded record failed for good"),
                    Some(RDKafkaErrorCode::MessageTimedOut) => shared
                        .publisher
                        .delivery_timed_out(&current, "a forwarded record timed out"),
                    _ => {}
                }
            }
        }
        // Not kept through the wait: a replaced producer should go as soon as it can.
        drop(current);
        if !wait_unless_stopping(wait, cancel).await {
            return false;
        }
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}

/// A record's headers without those named in `drop` or in `extra`, followed by `extra`.
pub fn copied_headers<M: Message>(
    message: &M,
    drop: &[&str],
    extra: &[(&str, String)],
) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    if let Some(original) = message.headers() {
        for h in original.iter() {
            if !drop.contains(&h.key) && !extra.iter().any(|(name, _)| *name == h.key) {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
    }
    for (name, value) in extra {
        headers = headers.insert(Header {
            key: name,
            value: Some(value.as_bytes()),
        });
    }
    headers
}

/// A copy of `message` for `topic`: same key, value and timestamp, these headers.
pub fn copy_of<'a>(
    message: &'a OwnedMessage,
    topic: &'a str,
    headers: OwnedHeaders,
) -> FutureRecord<'a, [u8], [u8]> {
    let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
    if let Some(key) = message.key() {
        record = record.key(key);
    }
    if let Some(value) = message.payload() {
        record = record.payload(value);
    }
    if let Some(ms) = message.timestamp().to_millis() {
        record = record.timestamp(ms);
    }
    record
}

/// Decodes a record written by agentbus (or any Confluent-framed Avro producer whose
/// schema is in the registry).
fn decode(shared: &Shared, message: &Record, known: &Known<'_>) -> Result<Event, String> {
    let payload = message.payload().ok_or("the record has no value")?;
    let (id, body) = schema::split_wire(payload).map_err(|e| e.to_string())?;
    let version = shared
        .registry
        .by_id(id)
        .ok_or_else(|| format!("unknown schema id {id}"))?;
    // One walk of the body straight to the handler's JSON (src/schema/decode.rs).
    let data = schema::decode_to_json(version, body).map_err(|e| e.to_string())?;
    let text = |name: &str| known.get(name).map(str::to_string);
    let id = text(header::ID).unwrap_or_else(|| {
        format!(
            "{}-{}-{}",
            message.topic(),
            message.partition(),
            message.offset()
        )
    });
    Ok(Event {
        idempotency_key: text(header::IDEMPOTENCY_KEY).unwrap_or_else(|| id.clone()),
        id,
        event_type: text(header::TYPE).unwrap_or_else(|| version.event_type.clone()),
        version: known
            .get(header::VERSION)
            .and_then(|v| v.parse().ok())
            .unwrap_or(version.version),
        source: text(header::SOURCE).unwrap_or_default(),
        time: text(header::TIME),
        key: message
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned()),
        correlation_id: text(header::CORRELATION),
        causation_id: text(header::CAUSATION),
        data,
    })
}

/// The idempotency key of follow-up `i` of the event keyed `key`: `{agent}:{key}:{i}`, or
/// `{agent}:{key}:{replay}:{i}` when handled for a replay. When that is not a valid key (over
/// 256 characters, or a control character from the event's key or the replay id), a digest
/// stands for the key and the replay id: `{agent}:{hex(sha256(key|replay))[..32]}:{i}`, as
/// deterministic (the same event gives the same keys) and valid whatever the inputs, so that
/// the follow-ups are never refused (and dead-lettered) for a key agentbus made.
pub(crate) fn follow_up_key(agent: &str, key: &str, replay: Option<&str>, i: usize) -> String {
    let plain = match replay {
        Some(replay) => format!("{agent}:{key}:{replay}:{i}"),
        None => format!("{agent}:{key}:{i}"),
    };
    if crate::envelope::check_idempotency_key(&plain).is_ok() {
        return plain;
    }
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(key.as_bytes());
    if let Some(replay) = replay {
        // The separator keeps ("a|b", None) and ("a", "b") apart: a key's own `|` does not
        // matter, since with no replay nothing follows.
        hasher.update(b"|");
        hasher.update(replay.as_bytes());
    }
    let digest = hex::encode(hasher.finalize());
    format!("{agent}:{}:{i}", &digest[..32])
}

/// Publishes a handler's follow-up events as the agent's actions: causation = the handled
/// event, the same correlation id, and idempotency keys derived from the handled event so
/// that handling it again never publishes them twice.
///
/// Handling an event again (a redelivery after a crash or a rebalance, a copy of the
/// record, the dedup window passed) is a duplicate: the first handling's follow-ups stand
/// and the repeat's are not written, even when they differ (a latency, a timestamp). A
/// replay (a record with `agentbus-replay-id`: a replay or a redrive) asks for the events
/// to be handled anew: its follow-ups' keys include the replay id, so they are new events.
/// Keys the handler chose itself are its own: a conflict on one stays a failure.
async fn publish_follow_ups(
    shared: &Shared,
    event: &Event,
    replay: Option<&str>,
    follow_ups: Vec<Json>,
) -> Result<(), Failure> {
    if follow_ups.is_empty() {
        return Ok(());
    }
    // Per follow-up: whether its key was derived here (else the handler chose it).
    let mut derived = Vec::with_capacity(follow_ups.len());
    let mut items = Vec::with_capacity(follow_ups.len());
    for (i, mut envelope) in follow_ups.into_iter().enumerate() {
        let Some(fields) = envelope.as_object_mut() else {
            return Err(Failure::fatal(
                "invalid_follow_up",
                format!("follow-up {i} is not an object"),
            ));
        };
        fields
            .entry("source")
            .or_insert_with(|| json!(shared.agent.name));
        derived.push(!fields.contains_key("idempotency_key"));
        fields.entry("idempotency_key").or_insert_with(|| {
            json!(follow_up_key(
                &shared.agent.name,
                &event.idempotency_key,
                replay,
                i
            ))
        });
        let metadata = fields.entry("metadata").or_insert_with(|| json!({}));
        if let Some(meta) = metadata.as_object_mut() {
            meta.insert("causation_id".into(), json!(event.id));
            meta.insert(
                "correlation_id".into(),
                json!(
                    event
                        .correlation_id
                        .clone()
                        .unwrap_or_else(|| event.id.clone())
                ),
            );
        }
        items.push(envelope);
    }
    // Kept for the one-by-one path below.
    let copies = items.clone();
    let request = |items: Vec<Json>| publish::Request {
        items,
        batch: true,
        idempotency_key: None,
        // Follow-ups keep the service's own namespace: their keys derive from the event.
        scope: None,
    };
    let failed = |e: publish::Error| match e {
        publish::Error::BrokerUnavailable(m) => Failure::retryable("publish", m),
        // Another request is writing the key (a concurrent handling of a copy): once it
        // ends this is a duplicate, or a conflict to judge then.
        publish::Error::IdempotencyInProgress(m) => Failure::retryable("publish", m),
        e => Failure::fatal("invalid_follow_up", e.to_string()),
    };
    match shared.publisher.publish(request(items)).await {
        Ok(_) => Ok(()),
        // A key is taken with another body. For a key derived from this event that means this
        // event's own earlier handling published first: its follow-ups stand. Which key it
        // was the error does not say, so the follow-ups go one by one: those not written yet
        // (a batch cut short by the broker) are written, a conflict on a derived key is
        // passed over, and only one on a key the handler chose itself is a failure.
        Err(publish::Error::IdempotencyConflict(why)) => {
            tracing::debug!(agent = %shared.agent.name, event = %event.id, %why, "a follow-up key is taken: one by one");
            for (item, derived) in copies.into_iter().zip(derived) {
                match shared.publisher.publish(request(vec![item])).await {
                    Ok(_) => {}
                    Err(publish::Error::IdempotencyConflict(_)) if derived => {}
                    Err(e) => return Err(failed(e)),
                }
            }
            Ok(())
        }
        Err(e) => Err(failed(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn follow_up_keys_are_valid_idempotency_keys_whatever_the_event_and_replay() {
        use crate::envelope::check_idempotency_key;
        assert_eq!(follow_up_key("a", "k", None, 0), "a:k:0");
        assert_eq!(follow_up_key("a", "k", Some("r"), 1), "a:k:r:1");
        let long = "k".repeat(256);
        for (key, replay) in [
            (long.as_str(), None),
            ("k", Some("a\tb")),
            ("k", Some(long.as_str())),
            ("k\u{7f}", None),
        ] {
            let derived = follow_up_key("agent-x", key, replay, 3);
            assert_eq!(check_idempotency_key(&derived), Ok(()), "{derived:?}");
            assert!(derived.starts_with("agent-x:") && derived.ends_with(":3"));
            // Deterministic, and apart for another replay or follow-up.
            assert_eq!(derived, follow_up_key("agent-x", key, replay, 3));
            assert_ne!(derived, follow_up_key("agent-x", key, replay, 4));
            assert_ne!(derived, follow_up_key("agent-x", key, Some("other\t"), 3));
        }
    }

    #[test]
    fn a_key_always_goes_to_one_lane_and_keys_spread_over_every_lane() {
        let lanes = 8;
        let mut used = [0usize; 8];
        for i in 0..64 {
            let key = format!("agent-{i}");
            let lane = lane_of(Some(key.as_bytes()), lanes);
            assert_eq!(lane, lane_of(Some(key.as_bytes()), lanes));
            used[lane] += 1;
        }
        assert!(used.iter().all(|&n| n > 0), "{used:?}");
        assert_eq!(lane_of(None, lanes), 0);
        assert_eq!(lane_of(Some(b"k"), 1), 0);
    }

    proptest! {
        /// Whatever a peer asks for, the retry arithmetic neither panics nor waits longer
        /// than the clamp (or the policy's own backoff).
        #[test]
        fn any_retry_after_gives_a_bounded_wait_and_a_due_time(
            secs in any::<u64>(),
            nanos in 0u32..1_000_000_000,
            held_ms in any::<u32>(),
            backoff_ms in 0u64..(30 * 24 * 3600 * 1000),
        ) {
            let asked = Duration::new(secs, nanos);
            let backoff = Duration::from_millis(backoff_ms);
            let wait = retry_wait(Some(asked), backoff);
            prop_assert!(wait <= MAX_RETRY_AFTER.max(backoff));
            prop_assert!(wait >= backoff);
            let held = Duration::from_millis(held_ms.into()) + Duration::from_nanos(999_999_999);
            let _ = held.saturating_add(wait);
            let due = time_after(wait);
            let text = format_time(&due);
            let parsed = DateTime::parse_from_rfc3339(&text).map(|t| t.to_utc());
            prop_assert!(parsed.is_ok(), "{text}");
        }
    }
}
