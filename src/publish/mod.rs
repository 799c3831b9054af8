//! The publish path: checked envelopes → idempotency → Avro in Confluent wire format with
//! CloudEvents headers → an idempotent, acks=all Kafka producer. A publish is answered only
//! after the broker acknowledged every event in it.

pub mod idempotency;
mod request_hash;
pub mod size;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::future::join_all;
use rdkafka::{
    error::{KafkaError, KafkaResult, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord, Producer},
};
use serde_json::Value as Json;

use crate::{
    broker::Quirks,
    config::KafkaArgs,
    envelope::{Envelope, format_time},
    schema::{self, Registry, SchemaVersion, Violation},
    telemetry::{self, outcome},
};
pub use idempotency::{Claim, IdempotencyStore, Lookup, PublishResult, RequestHash};

/// Why an envelope was refused before anything was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The envelope itself is wrong (`400 invalid_envelope`).
    InvalidEnvelope,
    /// No schema directory for the type (`422 unknown_event_type`).
    UnknownEventType,
    /// The type has no such version (`422 unknown_event_version`).
    UnknownEventVersion,
    /// `data` does not match the schema (`422 schema_violation`).
    SchemaViolation,
}

/// Errors of a publish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing was written: the first item's kind, and every item's violations.
    #[error("{message}")]
    Rejected {
        /// The kind of the first failing item.
        kind: Rejection,
        /// A one-line summary.
        message: String,
        /// Every violation, with paths.
        details: Vec<Violation>,
    },
    /// An event is larger than the broker takes (the producer's `message.max.bytes` or the
    /// topic's `max.message.bytes`): it can never be written (`413 payload_too_large`).
    #[error("{message}")]
    TooLarge {
        /// A one-line summary naming the limit.
        message: String,
        /// Each event over the limit, with its size and the limit.
        details: Vec<Violation>,
    },
    /// The idempotency key was used with a different request.
    #[error("{0}")]
    IdempotencyConflict(String),
    /// The idempotency key is being written now by another request: answered like a
    /// conflict (409), but it may well succeed (as a duplicate) once that request ends.
    #[error("{0}")]
    IdempotencyInProgress(String),
    /// The broker did not acknowledge (down, slow, queue full). Events of the request that
    /// were acknowledged are recorded, so a retry with the same keys writes only the rest.
    #[error("{0}")]
    BrokerUnavailable(String),
    /// The idempotency store failed; nothing is answered as written.
    #[error(transparent)]
    Store(#[from] idempotency::Error),
    /// Encoding failed after validation passed: a bug, reported as such.
    #[error(transparent)]
    Internal(#[from] schema::Error),
}

/// One publish request: one envelope, or a batch.
#[derive(Debug)]
pub struct Request {
    /// The envelopes as received.
    pub items: Vec<Json>,
    /// Whether the body was a JSON array (paths then start with `[i]`).
    pub batch: bool,
    /// The `Idempotency-Key` header; for a batch, item `i` gets `<key>/<i>`.
    pub idempotency_key: Option<String>,
    /// Whose idempotency keys these are (the API key's id): holders of different API keys
    /// never meet each other's keys. `None` without authentication.
    pub scope: Option<String>,
}

/// Publishes events. Shared by the HTTP handlers behind an `Arc`.
pub struct Publisher {
    producer: std::sync::RwLock<CurrentProducer>,
    renewed: std::sync::Mutex<Option<Instant>>,
    registry: Arc<Registry>,
    store: Arc<IdempotencyStore>,
    kafka: KafkaArgs,
    timeout: Duration,
    broker_up: Arc<AtomicBool>,
    /// What each topic takes: the largest record, and the timestamps it takes and keeps.
    limits: size::TopicLimits,
    /// When the broker last acknowledged a delivery: ms since `created` (0: never).
    last_ack_ms: std::sync::atomic::AtomicU64,
    created: Instant,
}

/// The publisher's producers, and whether they must be replaced (a delivery on one failed
/// fatally, or timed out on a broker with [`Quirks::renew_producer_after_timeout`]).
///
/// Two producers, because one `linger.ms` cannot serve both kinds of request: a lone event
/// should leave at once (a request of one event waits for nothing else), while the events of
/// a batch, and of many requests at once, travel best in fuller produce requests. Ordering
/// is not at stake: the events of one request all go through one producer, in order, and a
/// client that needs two requests in order waits for the first's answer, which comes only
/// after the broker acknowledged it.
#[derive(Clone)]
pub struct CurrentProducer {
    /// Send batches (and agents' follow-ups) with this one ([`producer_config`]).
    pub producer: FutureProducer,
    /// Send a request's lone event with this one ([`single_producer_config`]).
    pub single: FutureProducer,
    spoiled: Arc<AtomicBool>,
}

impl CurrentProducer {
    fn new(producers: Producers) -> Self {
        CurrentProducer {
            producer: producers.batch,
            single: producers.single,
            spoiled: Arc::new(AtomicBool::new(false)),
        }
    }

    fn is_spoiled(&self) -> bool {
        self.spoiled.load(Ordering::Relaxed)
    }
}

/// The two producers a [`Publisher`] writes with (see [`CurrentProducer`]).
pub struct Producers {
    /// For batches ([`producer_config`]).
    pub batch: FutureProducer,
    /// For requests of one event ([`single_producer_config`]).
    pub single: FutureProducer,
}

impl Producers {
    /// Both producers, for the brokers of `kafka`, deliveries bounded by `timeout`.
    pub fn create(kafka: &KafkaArgs, timeout: Duration) -> KafkaResult<Producers> {
        Ok(Producers {
            batch: producer_config(kafka, timeout).create()?,
            single: single_producer_config(kafka, timeout).create()?,
        })
    }
}

/// An event ready to be written.
struct Prepared {
    envelope: Envelope,
    version: Arc<SchemaVersion>,
    /// The record value, in Confluent wire format.
    value: Vec<u8>,
    topic: String,
    /// The record key (the partition key).
    record_key: String,
    /// The idempotency key.
    key: String,
    /// The key under which the idempotency store keeps it (scoped by API key).
    store_key: String,
    hash: RequestHash,
    /// Header values formatted once, for the record and for its size.
    texts: HeaderTexts,
    /// The headers' share of the record's size.
    header_bytes: usize,
}

/// The header values that are not already strings in the envelope.
struct HeaderTexts {
    /// `ce_id`: the event id, hyphenated.
    id: String,
    /// `ce_time`.
    time: String,
    /// `ce_eventversion`.
    version: String,
    /// `ce_expiresat`, when the event expires.
    expires: Option<String>,
}

enum PrepareError {
    Rejected(Rejection, Vec<Violation>),
    Encode(schema::Error),
}

impl Publisher {
    /// Why the idempotency store stopped working, if it did: then every publish fails.
    pub fn store_failure(&self) -> Option<String> {
        self.store.failure()
    }

    /// A publisher over `producers`. `retention` is the one agentbus gives the
    /// topics it creates (`--topic-retention`): it bounds the age of an event's timestamp on a
    /// topic whose `retention.ms` the broker does not tell.
    pub fn new(
        producers: Producers,
        registry: Arc<Registry>,
        store: Arc<IdempotencyStore>,
        kafka: KafkaArgs,
        timeout: Duration,
        broker_up: Arc<AtomicBool>,
        retention: Duration,
    ) -> Self {
        Publisher {
            limits: size::TopicLimits::new(&producer_config(&kafka, timeout), retention),
            producer: std::sync::RwLock::new(CurrentProducer::new(producers)),
            renewed: std::sync::Mutex::new(None),
            registry,
            store,
            kafka,
            timeout,
            broker_up,
            last_ack_ms: std::sync::atomic::AtomicU64::new(0),
            created: Instant::now(),
        }
    }

    /// Notes that the broker acknowledged a delivery: it is there, however slow its answers
    /// to the broker watch's probes.
    pub fn note_acknowledged(&self) {
        let ms = self.created.elapsed().as_millis().max(1) as u64;
        self.last_ack_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Whether the broker acknowledged a delivery within `window`.
    fn acknowledged_within(&self, window: Duration) -> bool {
        let last = self.last_ack_ms.load(Ordering::Relaxed);
        last > 0 && self.created.elapsed().as_millis() as u64 <= last + window.as_millis() as u64
    }

    /// Whether the broker answered lately (see [`watch_broker`]).
    pub fn broker_up(&self) -> bool {
        self.broker_up.load(Ordering::Relaxed)
    }

    /// The batch producer, for probing the broker.
    pub fn producer(&self) -> FutureProducer {
        self.current_producer().producer
    }

    /// Waits up to `grace` for both producers to deliver what they hold (at shutdown).
    /// Blocking: call it off the runtime's workers.
    pub fn flush_blocking(&self, grace: Duration) -> Result<(), KafkaError> {
        let current = self.current_producer();
        let deadline = Instant::now() + grace;
        // Both, even when the first does not finish in time: the second's events count too.
        let batch = current.producer.flush(grace);
        let single = current
            .single
            .flush(deadline.saturating_duration_since(Instant::now()));
        batch.and(single)
    }

    /// The producer in use, to send with and to mark when a delivery on it timed out.
    pub fn current_producer(&self) -> CurrentProducer {
        self.producer.read().expect("producer lock").clone()
    }

    /// Replaces the producer by a new one (a new idempotent producer id) if it is spoiled, at
    /// most once per [`RENEW_AT_MOST_EVERY`]. On every broker, a delivery that failed with a
    /// fatal error spoils it: an idempotent librdkafka producer that raised a fatal error
    /// fails every later send. With [`Quirks::renew_producer_after_timeout`] (tansu 0.6), a
    /// timed-out delivery spoils it too: librdkafka then bumps the producer's epoch, which
    /// tansu panics on, failing every request until restarted. A new producer starts clean.
    /// The old one's queued deliveries fail (503: not acknowledged). A producer that is not
    /// spoiled is kept: replacing it under a slow broker would fail its writes in flight for
    /// nothing.
    pub fn renew_producer(&self, why: &str) {
        let mut renewed = self.renewed.lock().expect("renew lock");
        if !self.current_producer().is_spoiled()
            || renewed.is_some_and(|at| at.elapsed() < RENEW_AT_MOST_EVERY)
        {
            return;
        }
        match Producers::create(&self.kafka, self.timeout) {
            Ok(fresh) => {
                let old = std::mem::replace(
                    &mut *self.producer.write().expect("producer lock"),
                    CurrentProducer::new(fresh),
                );
                *renewed = Some(Instant::now());
                tracing::warn!(why, "renewed the Kafka producer");
                // Destroying a client joins its threads: not on the runtime's workers.
                std::thread::spawn(move || drop(old));
            }
            Err(e) => tracing::error!(error = %e, "could not create a new Kafka producer"),
        }
    }

    /// Notes that a delivery on `producer` timed out. Only with
    /// [`Quirks::renew_producer_after_timeout`] is the producer renewed for it (see
    /// [`Publisher::renew_producer`]); on Apache Kafka librdkafka's own epoch bump recovers
    /// the producer, which is kept.
    pub fn delivery_timed_out(&self, producer: &CurrentProducer, why: &str) {
        let Quirks {
            renew_producer_after_timeout,
            ..
        } = self.kafka.quirks();
        if renew_producer_after_timeout {
            self.delivery_failed_fatally(producer, why);
        }
    }

    /// Notes that a delivery on `producer` failed with a fatal (idempotence) error, and renews
    /// it, on every broker (see [`Publisher::renew_producer`]).
    pub fn delivery_failed_fatally(&self, producer: &CurrentProducer, why: &str) {
        producer.spoiled.store(true, Ordering::Relaxed);
        self.renew_producer(why);
    }

    /// Validates every item, then writes those not written before, and answers in input
    /// order. Nothing is written unless every item is valid.
    pub async fn publish(&self, request: Request) -> Result<Vec<PublishResult>, Error> {
        let batch = request.batch;
        let prepared = self.prepare(request)?;
        self.check_limits(&prepared, batch).await?;

        // Idempotency: repeats answer their first result, conflicts refuse the request.
        let mut claim = Claim::new(&self.store);
        let mut answers: Vec<Option<PublishResult>> = vec![None; prepared.len()];
        let mut first_index: HashMap<&str, usize> = HashMap::new();
        let mut copies = Vec::new();
        let mut to_write = Vec::new();
        for (i, p) in prepared.iter().enumerate() {
            if let Some(&j) = first_index.get(p.store_key.as_str()) {
                if prepared[j].hash != p.hash {
                    return Err(conflict(
                        &p.key,
                        "twice in this batch with different bodies",
                    ));
                }
                copies.push((i, j));
                continue;
            }
            first_index.insert(&p.store_key, i);
            match self.store.begin(&p.store_key, &p.hash, &mut claim)? {
                Lookup::New => to_write.push(i),
                Lookup::Duplicate(result) => answers[i] = Some(result),
                Lookup::Conflict => {
                    return Err(conflict(&p.key, "already used with a different request"));
                }
                Lookup::InProgress => {
                    return Err(Error::IdempotencyInProgress(format!(
                        "idempotency key {:?} in use by a request still in progress",
                        p.key
                    )));
                }
            }
        }

        if !to_write.is_empty() && !self.broker_up.load(Ordering::Relaxed) {
            count(&prepared, &to_write, outcome::FAILED);
            return Err(Error::BrokerUnavailable(
                "the Kafka broker is not reachable; retry later".into(),
            ));
        }

        let deliveries = self.write(&prepared, &to_write).await;
        let mut written = Vec::new();
        // The item that failed, and why.
        let mut failure: Option<(usize, Failure)> = None;
        // Topics whose configuration was read again for a refused timestamp.
        let mut read_again: Vec<&str> = Vec::new();
        for (&i, delivery) in to_write.iter().zip(deliveries) {
            match delivery {
                Ok((partition, offset)) => {
                    let p = &prepared[i];
                    answers[i] = Some(PublishResult {
                        event_id: p.texts.id.clone(),
                        event_type: p.envelope.event_type.clone(),
                        event_version: p.version.version,
                        topic: p.topic.clone(),
                        partition,
                        offset,
                        duplicate: false,
                    });
                    written.push(i);
                }
                Err(e) => {
                    let e = self.judge_too_large(&prepared[i], e).await;
                    let e = self
                        .judge_invalid_timestamp(&prepared[i], e, &mut read_again)
                        .await;
                    // A record the broker can never take wins: a retry would fail the same way.
                    if e.is_final() || !failure.as_ref().is_some_and(|(_, f)| f.is_final()) {
                        failure = Some((i, e));
                    }
                }
            }
        }
        let entries: Vec<_> = written
            .iter()
            .map(|&i| {
                let p = &prepared[i];
                (
                    p.store_key.as_str(),
                    p.hash,
                    answers[i].as_ref().expect("set above"),
                )
            })
            .collect();
        self.store.complete(&entries).await?;
        drop(claim);
        count(&prepared, &written, outcome::WRITTEN);

        if let Some((i, e)) = failure {
            let failed: Vec<usize> = to_write
                .iter()
                .copied()
                .filter(|i| answers[*i].is_none())
                .collect();
            count(&prepared, &failed, outcome::FAILED);
            return Err(match e {
                Failure::Unavailable(why) => Error::BrokerUnavailable(why),
                Failure::TooLarge(why) => Error::TooLarge {
                    message: why,
                    details: Vec::new(),
                },
                Failure::InvalidTimestamp(why) => Error::Rejected {
                    kind: Rejection::InvalidEnvelope,
                    details: vec![Violation {
                        path: if batch {
                            format!("[{i}].timestamp")
                        } else {
                            "timestamp".into()
                        },
                        message: why.clone(),
                    }],
                    // Unlike a refusal before producing, the broker's comes after the rest of
                    // the batch may have been written: say so, and that a retry is safe.
                    message: if written.is_empty() {
                        why
                    } else {
                        format!(
                            "{why}; {} other event(s) of the batch were written and are recorded \
                             (a retry with the same idempotency keys does not write them again)",
                            written.len()
                        )
                    },
                },
            });
        }
        for (i, j) in copies {
            answers[i] = answers[j].clone().map(|r| PublishResult {
                duplicate: true,
                ..r
            });
        }
        let duplicates: Vec<usize> = (0..prepared.len())
            .filter(|i| answers[*i].as_ref().is_some_and(|r| r.duplicate))
            .collect();
        count(&prepared, &duplicates, outcome::DUPLICATE);
        Ok(answers
            .into_iter()
            .map(|a| a.expect("every item is answered"))
            .collect())
    }

    /// A delivery refused as too large is about the record only when the record itself is
    /// over the limit: the broker also refuses a record batch larger than the topic's
    /// `max.message.bytes` (lowered below the producer's `batch.size`), and then the event
    /// is fine alone and a retry (in another batch) may well pass: 503, not 413. The
    /// topic's limit is read again first, since a stale one may be why the check passed.
    async fn judge_too_large(&self, p: &Prepared, failure: Failure) -> Failure {
        let Failure::TooLarge(why) = failure else {
            return failure;
        };
        self.limits.forget(&p.topic);
        // With a codec on, the check before producing knew only the producer's limit: here
        // the topic's counts too, or such an event would be answered 503 and retried forever.
        let limit = self
            .limits
            .of_uncompressed(&p.topic, self.broker_up())
            .await;
        let bytes = record_bytes(p);
        if bytes > limit.max_record {
            return Failure::TooLarge(why);
        }
        Failure::Unavailable(format!(
            "the broker refused a record batch as too large ({why}), but this event ({bytes} \
             bytes as a record) fits {}: the batch it travelled in was larger than the topic \
             takes; retry (a batch.size below the topic's max.message.bytes avoids this)",
            limit.explain(&p.topic)
        ))
    }

    /// A delivery refused for its timestamp (INVALID_TIMESTAMP) is about the event only when
    /// its own timestamp is outside the topic's bounds as read again now: the broker refuses a
    /// whole record batch for one record's timestamp, and a batch mixes the events of every
    /// request to one partition, so an event that travelled with a bad one fails with it.
    /// Such an event is fine alone: 503, retry. The topic's configuration is read again first
    /// (once per request and topic), since a stale one (it changed within the cache's minute)
    /// is why the check before producing let the bad event through.
    async fn judge_invalid_timestamp<'p>(
        &self,
        p: &'p Prepared,
        failure: Failure,
        read_again: &mut Vec<&'p str>,
    ) -> Failure {
        let Failure::InvalidTimestamp(why) = failure else {
            return failure;
        };
        if !read_again.contains(&p.topic.as_str()) {
            self.limits.forget(&p.topic);
            read_again.push(&p.topic);
        }
        let limits = self.limits.of(&p.topic, self.broker_up()).await;
        let now_ms = chrono::Utc::now().timestamp_millis();
        let at_ms = p.envelope.timestamp.timestamp_millis();
        match limits.timestamps.refuse(at_ms, now_ms, &p.topic) {
            Some(own) => Failure::InvalidTimestamp(format!("{own} ({why})")),
            None => Failure::Unavailable(format!(
                "the broker refused the record batch this event travelled in for a timestamp \
                 ({why}), but this event's timestamp is within what topic {} takes: another \
                 event of the batch was the cause; retry",
                p.topic
            )),
        }
    }

    /// Refuses the request when an event could never be written or kept, so that it is not
    /// retried into the broker (and not answered 503) and nothing of the request is written:
    /// its timestamp is outside what its topic takes or keeps (`400 invalid_envelope` at
    /// `timestamp`; see [`size::Timestamps`]: the broker would refuse it, or delete it at its
    /// next retention check after a 200), or it is larger than the topic takes (413). The
    /// topic cache is looked at once per run of events of one topic; per event, the checks are
    /// a few integer comparisons.
    async fn check_limits(&self, prepared: &[Prepared], batch: bool) -> Result<(), Error> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let path = |i: usize, field: &str| {
            if batch {
                format!("[{i}].{field}")
            } else {
                field.to_string()
            }
        };
        let mut too_large = Vec::new();
        let mut timestamps = Vec::new();
        let mut current: Option<(&str, size::Limits)> = None;
        for (i, p) in prepared.iter().enumerate() {
            if current.as_ref().is_none_or(|(topic, _)| *topic != p.topic) {
                let limits = self.limits.of(&p.topic, self.broker_up()).await;
                current = Some((&p.topic, limits));
            }
            let (_, limits) = current.as_ref().expect("set above");
            let at_ms = p.envelope.timestamp.timestamp_millis();
            if let Some(why) = limits.timestamps.refuse(at_ms, now_ms, &p.topic) {
                timestamps.push(Violation {
                    path: path(i, "timestamp"),
                    message: why,
                });
            }
            let bytes = record_bytes(p);
            if bytes > limits.size.max_record {
                too_large.push(Violation {
                    path: path(i, "data"),
                    message: format!(
                        "the event is {bytes} bytes as a Kafka record (key, Avro value, headers); {}",
                        limits.size.explain(&p.topic)
                    ),
                });
            }
        }
        // An envelope the topic cannot take is the more basic fault: it wins over a size.
        let (details, what, of_envelope) = if !timestamps.is_empty() {
            (
                timestamps,
                "have a timestamp their topic does not take or keep",
                true,
            )
        } else if !too_large.is_empty() {
            (too_large, "are larger than the broker takes", false)
        } else {
            return Ok(());
        };
        let which: Vec<usize> = (0..prepared.len()).collect();
        count(prepared, &which, outcome::REJECTED);
        let first = &details[0].message;
        let message = if batch {
            format!(
                "{} event(s) of the batch {what}; nothing in the batch was written; the first: \
                 {first}",
                details.len()
            )
        } else {
            first.clone()
        };
        Err(if of_envelope {
            Error::Rejected {
                kind: Rejection::InvalidEnvelope,
                message,
                details,
            }
        } else {
            Error::TooLarge { message, details }
        })
    }

    /// Checks envelopes, resolves schemas, converts and encodes every item; on any failure
    /// reports every failing item's violations and writes nothing.
    fn prepare(&self, request: Request) -> Result<Vec<Prepared>, Error> {
        let mut prepared = Vec::with_capacity(request.items.len());
        let mut details = Vec::new();
        let mut first_kind = None;
        let mut failed = 0;
        let Request {
            items,
            batch,
            idempotency_key,
            scope,
        } = request;
        let mut scratch = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let hash = request_hash::request_hash(&item, &mut scratch);
            match self.prepare_one(
                item,
                hash,
                i,
                batch,
                idempotency_key.as_deref(),
                scope.as_deref(),
            ) {
                Ok(p) => prepared.push(p),
                Err(PrepareError::Rejected(kind, violations)) => {
                    first_kind.get_or_insert(kind);
                    details.extend(violations);
                    failed += 1;
                }
                Err(PrepareError::Encode(e)) => return Err(Error::Internal(e)),
            }
        }
        let Some(kind) = first_kind else {
            return Ok(prepared);
        };
        let message = match kind {
            Rejection::InvalidEnvelope => "the envelope is not valid",
            Rejection::UnknownEventType => "unknown event type",
            Rejection::UnknownEventVersion => "unknown event version",
            Rejection::SchemaViolation => "data does not match the event's schema",
        };
        let message = if batch {
            format!("{message}; nothing in the batch was written ({failed} item(s) failed)")
        } else {
            message.to_string()
        };
        metrics::counter!(telemetry::EVENTS_PUBLISHED, "event_type" => "", "outcome" => outcome::REJECTED)
            .increment(failed as u64);
        Err(Error::Rejected {
            kind,
            message,
            details,
        })
    }

    fn prepare_one(
        &self,
        item: Json,
        hash: RequestHash,
        i: usize,
        batch: bool,
        header_key: Option<&str>,
        scope: Option<&str>,
    ) -> Result<Prepared, PrepareError> {
        let root = if batch {
            format!("[{i}]")
        } else {
            String::new()
        };
        let at = |field: &str| {
            if root.is_empty() {
                field.to_string()
            } else {
                format!("{root}.{field}")
            }
        };
        let rejected = |kind, path: String, message: String| {
            PrepareError::Rejected(kind, vec![Violation { path, message }])
        };
        let envelope = Envelope::parse(item, &root)
            .map_err(|v| PrepareError::Rejected(Rejection::InvalidEnvelope, v))?;
        let event_type = self
            .registry
            .event_type(&envelope.event_type)
            .ok_or_else(|| {
                rejected(
                    Rejection::UnknownEventType,
                    at("event_type"),
                    format!("no schema for event type {:?}", envelope.event_type),
                )
            })?;
        let version = match envelope.event_version {
            None => event_type.latest().clone(),
            Some(n) => event_type.versions.get(&n).cloned().ok_or_else(|| {
                let known: Vec<String> = event_type.versions.keys().map(u32::to_string).collect();
                rejected(
                    Rejection::UnknownEventVersion,
                    at("event_version"),
                    format!(
                        "{} has no version {n}; it has {}",
                        event_type.name,
                        known.join(", ")
                    ),
                )
            })?,
        };
        let avro = schema::json_to_avro(&version, &envelope.data, &at("data"))
            .map_err(|v| PrepareError::Rejected(Rejection::SchemaViolation, v))?;
        let value = schema::encode_wire(&version, &avro).map_err(PrepareError::Encode)?;
        let idempotency_key = match (header_key, &envelope.idempotency_key) {
            (Some(header), _) if batch => format!("{header}/{i}"),
            (Some(header), _) => header.to_string(),
            (None, Some(body)) => body.clone(),
            (None, None) => envelope.event_id.to_string(),
        };
        let store_key = match scope {
            Some(scope) => format!("{scope}\u{1f}{idempotency_key}"),
            None => idempotency_key.clone(),
        };
        let texts = HeaderTexts {
            id: envelope.event_id.hyphenated().to_string(),
            time: format_time(&envelope.timestamp),
            version: version.version.to_string(),
            expires: envelope.expires_at().map(|t| format_time(&t)),
        };
        let mut header_bytes = 0;
        each_header(&envelope, &idempotency_key, &texts, |prefix, key, value| {
            header_bytes += size::header_size(prefix.len() + key.len(), value.len());
        });
        Ok(Prepared {
            topic: self.kafka.events_topic(event_type.domain()),
            record_key: envelope.key(&idempotency_key),
            envelope,
            version,
            value,
            key: idempotency_key,
            store_key,
            hash,
            texts,
            header_bytes,
        })
    }

    /// Hands the chosen items to the producer and waits, bounded by the publish timeout,
    /// for each acknowledgement: `(partition, offset)` or why not.
    async fn write(
        &self,
        prepared: &[Prepared],
        which: &[usize],
    ) -> Vec<Result<(i32, i64), Failure>> {
        let deadline = Instant::now() + self.timeout + Duration::from_secs(1);
        let current = self.current_producer();
        let producer = if which.len() == 1 {
            &current.single
        } else {
            &current.producer
        };
        let mut pending = Vec::with_capacity(which.len());
        for &i in which {
            let p = &prepared[i];
            let headers = headers(p);
            let record = FutureRecord::to(&p.topic)
                .key(p.record_key.as_bytes())
                .payload(&p.value)
                .timestamp(p.envelope.timestamp.timestamp_millis())
                .headers(headers);
            pending.push(producer.send_result(record).map_err(|(e, _)| e));
        }
        let (timed_out, fatal) = (AtomicBool::new(false), AtomicBool::new(false));
        let waits = pending.into_iter().map(|sent| {
            let (timed_out, fatal) = (&timed_out, &fatal);
            async move {
                let future = sent.map_err(describe)?;
                let late = || {
                    timed_out.store(true, Ordering::Relaxed);
                    Err(Failure::Unavailable(TIMED_OUT.to_string()))
                };
                match tokio::time::timeout_at(deadline.into(), future).await {
                    Err(_) => late(),
                    Ok(Err(_)) => Err(Failure::Unavailable(
                        "the producer was shut down".to_string(),
                    )),
                    Ok(Ok(Err((e, _))))
                        if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageTimedOut) =>
                    {
                        late()
                    }
                    Ok(Ok(Err((e, _)))) => {
                        // An idempotence fatal error fails every later send too: renew.
                        if e.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
                            fatal.store(true, Ordering::Relaxed);
                        }
                        Err(describe(e))
                    }
                    Ok(Ok(Ok(delivery))) => {
                        self.note_acknowledged();
                        Ok((delivery.partition, delivery.offset))
                    }
                }
            }
        });
        let results = join_all(waits).await;
        if fatal.load(Ordering::Relaxed) {
            self.delivery_failed_fatally(&current, "a delivery failed for good");
        } else if timed_out.load(Ordering::Relaxed) {
            self.delivery_timed_out(&current, "deliveries timed out");
        }
        results
    }
}

/// Why a delivery failed when the broker did not answer in time.
const TIMED_OUT: &str = "the broker did not acknowledge in time";

/// The least time between two renewals of the producer.
const RENEW_AT_MOST_EVERY: Duration = Duration::from_secs(5);

/// The size of `p` as a Kafka record (key, value, headers and record overhead).
fn record_bytes(p: &Prepared) -> usize {
    size::record_size(p.record_key.len(), p.value.len(), []).saturating_add(p.header_bytes)
}

fn conflict(key: &str, why: &str) -> Error {
    Error::IdempotencyConflict(format!("idempotency key {key:?} {why}"))
}

/// Why a delivery failed, as the client should take it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// Retry later (503).
    Unavailable(String),
    /// Never fits (413): librdkafka or the broker found the record or batch too large.
    TooLarge(String),
    /// The broker refused the record's timestamp (INVALID_TIMESTAMP): outside the topic's
    /// `message.timestamp.before.max.ms` / `after.max.ms` by the broker's clock. A retry
    /// cannot help: `400 invalid_envelope` (once [`Publisher::judge_invalid_timestamp`] found
    /// the event's own timestamp at fault).
    InvalidTimestamp(String),
}

impl Failure {
    /// Whether a retry would fail the same way.
    fn is_final(&self) -> bool {
        matches!(self, Failure::TooLarge(_) | Failure::InvalidTimestamp(_))
    }
}

fn describe(e: KafkaError) -> Failure {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::QueueFull) => {
            Failure::Unavailable("the producer queue is full; retry later".into())
        }
        Some(RDKafkaErrorCode::MessageTimedOut) => Failure::Unavailable(TIMED_OUT.into()),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge) => {
            Failure::TooLarge(format!(
                "the event is larger than the broker takes (producer message.max.bytes or the \
                 topic's max.message.bytes): {e}"
            ))
        }
        Some(RDKafkaErrorCode::InvalidTimestamp) => Failure::InvalidTimestamp(format!(
            "the broker refused the event's timestamp as outside what the topic takes \
             (message.timestamp.before.max.ms, message.timestamp.after.max.ms by the broker's \
             clock); a retry cannot help: {e}"
        )),
        _ => Failure::Unavailable(format!("the broker did not accept the event: {e}")),
    }
}

/// Counts `which` events by type: one counter lookup per type, not per event (a batch is
/// mostly of one type).
fn count(prepared: &[Prepared], which: &[usize], outcome: &'static str) {
    let mut runs: Vec<(&str, u64)> = Vec::new();
    for &i in which {
        let event_type = prepared[i].envelope.event_type.as_str();
        match runs.iter_mut().find(|(t, _)| *t == event_type) {
            Some((_, n)) => *n += 1,
            None => runs.push((event_type, 1)),
        }
    }
    for (event_type, n) in runs {
        metrics::counter!(
            telemetry::EVENTS_PUBLISHED,
            "event_type" => event_type.to_owned(),
            "outcome" => outcome
        )
        .increment(n);
    }
}

/// Calls `f(key prefix, key, value)` for each CloudEvents 1.0 Kafka binary-mode header of
/// the event (CONTRACT.md §3). Metadata other than the correlation and causation ids
/// travels as `agentbus-meta-<key>`, the one key with a prefix.
fn each_header(e: &Envelope, key: &str, texts: &HeaderTexts, mut f: impl FnMut(&str, &str, &str)) {
    f("", "ce_specversion", "1.0");
    f("", "ce_id", &texts.id);
    f("", "ce_type", &e.event_type);
    f("", "ce_source", &e.source);
    f("", "ce_time", &texts.time);
    f("", "content-type", "application/avro");
    f("", "ce_eventversion", &texts.version);
    f("", "ce_idempotencykey", key);
    for (name, value) in &e.metadata {
        match name.as_str() {
            "correlation_id" => f("", "ce_correlationid", value),
            "causation_id" => f("", "ce_causationid", value),
            other => f(META_PREFIX, other, value),
        }
    }
    if let Some(expires) = &texts.expires {
        f("", "ce_expiresat", expires);
    }
}

/// The header key prefix of metadata entries without a CloudEvents extension.
const META_PREFIX: &str = "agentbus-meta-";

/// The record headers of `p` (see [`each_header`]).
fn headers(p: &Prepared) -> OwnedHeaders {
    let mut h = Some(OwnedHeaders::new_with_capacity(
        10 + p.envelope.metadata.len(),
    ));
    each_header(&p.envelope, &p.key, &p.texts, |prefix, key, value| {
        let headers = h.take().expect("put back below");
        h = Some(if prefix.is_empty() {
            headers.insert(header(key, value))
        } else {
            headers.insert(header(&format!("{prefix}{key}"), value))
        });
    });
    h.expect("put back above")
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

/// The batch producer's settings. Each one matters for "answered 200 means durably written";
/// any can be overridden with `AGENTBUS_KAFKA_<NAME>` (say, `AGENTBUS_KAFKA_LINGER_MS`, which
/// then applies to the single-event producer too).
pub fn producer_config(kafka: &KafkaArgs, timeout: Duration) -> rdkafka::ClientConfig {
    // How long a lone event waits for company before its produce request goes out.
    // librdkafka's 5 ms, measured against 1 and 2 ms in `ops/bench.sh publish` on a quiet
    // machine (one run each): batches of 100 reached 0.69 / 0.43 / 0.53 of the raw producer
    // with the same headers, at 33 / 44 / 43 µs of CPU per event (fewer, fuller produce
    // requests). Requests of one event go through the single-event producer instead.
    producer_config_lingering(kafka, timeout, "5")
}

/// The settings of the producer of requests that write one event: [`producer_config`]'s,
/// with `linger.ms` 0: a lone event goes out at once. Under load librdkafka still fills
/// produce requests, since events queue while the requests in flight (5 at most with
/// idempotence) are unanswered. Measured on 2 cores with Apache Kafka 4.1
/// (`ops/bench.sh publish` and `ops/bench.sh consume --part latency --latency-rounds abbb`,
/// 2026-12-08, later rounds): single events at 1 000/s were answered p50 1.8, p99 6.2 ms
/// with 0 against p50 3.3, p99 6.9 ms with 1 ms, and publish → handler latency was p50
/// 2.2 / 2.1 ms, p99 19.9 / 10.4 ms with 0 against p50 3.3 / 3.3, p99 18.5 / 17.4 ms with
/// 1 ms. The price is the broker's CPU at that rate: 52–57 % of a core against 41–46 %
/// (a record batch per event). (In 2026-11, before the idempotency log, 0 had made
/// publish → handler p99 271 and 607 ms; that no longer shows.)
pub fn single_producer_config(kafka: &KafkaArgs, timeout: Duration) -> rdkafka::ClientConfig {
    producer_config_lingering(kafka, timeout, "0")
}

fn producer_config_lingering(
    kafka: &KafkaArgs,
    timeout: Duration,
    linger_ms: &str,
) -> rdkafka::ClientConfig {
    let mut config = kafka.client_config_with(&[
        // No duplicates or reordering from the producer's own retries.
        ("enable.idempotence", "true".into()),
        // Acknowledged only once every in-sync replica has the event.
        ("acks", "all".into()),
        // librdkafka's own bound on a delivery: past it the delivery fails and we answer 503.
        ("message.timeout.ms", timeout.as_millis().to_string()),
        // How long an event waits for company before its produce request goes out (see
        // the two callers).
        ("linger.ms", linger_ms.into()),
        // Produce requests are small and answered one by one: Nagle's algorithm would hold
        // a request back until the previous one's segment is acknowledged.
        ("socket.nagle.disable", "true".into()),
        // Refuse quickly (queue full → 503) instead of buffering without bound.
        ("queue.buffering.max.messages", "200000".into()),
    ]);
    // A record batch must fit what the broker takes, or every event in it is refused
    // together: librdkafka's batch.size is capped to the limits agentbus knows, the
    // producer's message.max.bytes and Kafka's default max.message.bytes. A topic with a
    // lower max.message.bytes needs a lower batch.size (AGENTBUS_KAFKA_BATCH_SIZE); without
    // it a refused batch is answered 503 (retry), never 413 for an event that fits.
    let setting = |name: &str, default: usize| {
        config
            .get(name)
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(default)
    };
    let batch = setting("batch.size", size::LIBRDKAFKA_DEFAULT_BATCH)
        .min(setting("message.max.bytes", size::LIBRDKAFKA_DEFAULT_MAX))
        .min(size::KAFKA_DEFAULT_TOPIC_MAX);
    config.set("batch.size", batch.to_string());
    config
}

/// Probes that must fail in a row before the broker counts as unreachable: one slow answer
/// under load must not turn publishes away.
const PROBES_TO_FAIL: u32 = 2;

/// How long a probe of the broker waits for its answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The topic whose metadata the broker probe asks for (it need not exist).
const PROBE_TOPIC: &str = "__agentbus_probe";

/// Watches the broker with a metadata request every `interval`, so that publishes fail
/// fast while it is away and `/readyz` tells the truth. It counts as reachable from the first
/// answer, and as unreachable after [`PROBES_TO_FAIL`] probes in a row got none while no
/// delivery was acknowledged either: a broker busy enough to answer a probe late is still
/// there as long as it acknowledges writes. That holds on every broker, not as a quirk: tansu
/// under load showed it first, but a busy Apache Kafka (a saturated network or request
/// thread, a long GC pause between two answers) can answer a metadata probe late too, and an
/// acknowledged delivery is proof of reachability whatever the broker. Turning publishes away
/// (and, with [`Quirks::renew_producer_after_timeout`], renewing the producer) under it would
/// fail writes the broker takes.
pub async fn watch_broker(
    publisher: Arc<Publisher>,
    up: Arc<AtomicBool>,
    interval: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let mut failures = 0;
    // A client of its own that never produces. Probing on the producer's client made the
    // probe wait behind produce requests to a broker that had just died: Kafka answers a
    // connection's requests in order, and acks=all requests to partitions the dead broker
    // led stall until it is fenced (9 s by default). Two probes then timed out, publishes
    // were turned away and the producer renewed while two of three brokers were up
    // (issue 12). This client picks a broker it can reach.
    let probe: Option<Arc<BaseConsumer>> = match publisher.kafka.client_config().create() {
        Ok(client) => Some(Arc::new(client)),
        Err(e) => {
            tracing::warn!(error = %e, "broker probe client; probing with the producer's client");
            None
        }
    };
    loop {
        let client = publisher.producer();
        let probe = probe.clone();
        let answered = tokio::task::spawn_blocking(move || match probe {
            // One topic's metadata, not every topic's: an answer is all the probe needs,
            // and a shared cluster's full metadata is large. The name is never created
            // (a consumer's metadata requests do not ask for auto-creation).
            Some(probe) => probe
                .fetch_metadata(Some(PROBE_TOPIC), PROBE_TIMEOUT)
                .is_ok(),
            None => client
                .client()
                .fetch_metadata(Some(PROBE_TOPIC), PROBE_TIMEOUT)
                .is_ok(),
        })
        .await
        .unwrap_or(false)
            || publisher.acknowledged_within(interval);
        failures = if answered { 0 } else { failures + 1 };
        let reachable = answered || (up.load(Ordering::Relaxed) && failures < PROBES_TO_FAIL);
        // While the broker is away, and before it counts as back, a spoiled producer (a
        // delivery failed for good, or timed out on tansu) is replaced, so that it is gone
        // before it can reach the broker again; each tick, since a renewal may have been held
        // back by RENEW_AT_MOST_EVERY. (librdkafka reconnects by itself, so a producer still
        // dirty when the broker answers may meet it before this: that is the remaining window.)
        if !reachable || !up.load(Ordering::Relaxed) {
            publisher.renew_producer("deliveries failed while the broker was unreachable");
        }
        if up.swap(reachable, Ordering::Relaxed) != reachable {
            if reachable {
                tracing::info!("broker reachable");
            } else {
                tracing::warn!("broker unreachable; publishes answer 503 until it is back");
            }
        }
        metrics::gauge!(telemetry::BROKER_UP).set(if reachable { 1.0 } else { 0.0 });
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    /// A publisher whose broker is nowhere: producers are created, nothing is sent.
    fn publisher(dir: &std::path::Path) -> Publisher {
        publisher_for(dir, crate::broker::BrokerQuirks::None)
    }

    /// [`publisher`] working around `quirks`.
    fn publisher_for(dir: &std::path::Path, quirks: crate::broker::BrokerQuirks) -> Publisher {
        let kafka = KafkaArgs {
            brokers: "127.0.0.1:1".into(),
            topic_prefix: String::new(),
            broker_quirks: quirks,
            ..KafkaArgs::default()
        };
        let schemas = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        Publisher::new(
            Producers::create(&kafka, Duration::from_secs(5)).unwrap(),
            Arc::new(Registry::load(&schemas).unwrap()),
            IdempotencyStore::open(dir, Duration::from_secs(60)).unwrap(),
            kafka,
            Duration::from_secs(5),
            Arc::new(AtomicBool::new(true)),
            Duration::from_secs(30 * 24 * 3600),
        )
    }

    fn id(p: &Publisher) -> usize {
        p.producer().client().native_ptr() as usize
    }

    #[tokio::test]
    async fn on_tansu_the_producer_is_renewed_only_after_a_delivery_on_it_timed_out_and_not_twice_in_a_row()
     {
        let dir = tempfile::tempdir().unwrap();
        let p = publisher_for(dir.path(), crate::broker::BrokerQuirks::Tansu);
        let first = id(&p);
        // The broker watch flips (either way): a producer without timed-out deliveries stays.
        p.renew_producer("the broker became unreachable");
        assert_eq!(id(&p), first);

        let current = p.current_producer();
        p.delivery_timed_out(&current, "deliveries timed out");
        let second = id(&p);
        assert_ne!(
            second, first,
            "a producer whose delivery timed out was kept"
        );

        // A timeout reported on the replaced producer does not touch the new one.
        p.delivery_timed_out(&current, "late report");
        assert_eq!(id(&p), second);
        // The new one's own timeout within RENEW_AT_MOST_EVERY: kept for now, renewed at the
        // watch's next flip once that time has passed.
        p.delivery_timed_out(&p.current_producer(), "again");
        assert_eq!(id(&p), second);
        *p.renewed.lock().unwrap() = Some(Instant::now() - RENEW_AT_MOST_EVERY);
        p.renew_producer("the broker is back");
        assert_ne!(id(&p), second);
    }

    #[tokio::test]
    async fn on_kafka_a_timed_out_delivery_keeps_the_producer_and_a_fatal_error_renews_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = publisher(dir.path());
        let first = id(&p);
        // librdkafka's own epoch bump recovers the producer on Kafka: kept, also when the
        // broker watch flips afterwards.
        p.delivery_timed_out(&p.current_producer(), "deliveries timed out");
        p.renew_producer("the broker became unreachable");
        assert_eq!(
            id(&p),
            first,
            "a producer was renewed for a timeout on Kafka"
        );
        // A fatal idempotence error makes a producer unusable on any broker: renewed.
        p.delivery_failed_fatally(&p.current_producer(), "a delivery failed for good");
        assert_ne!(id(&p), first, "a producer that failed fatally was kept");
    }

    #[test]
    fn the_request_hash_ignores_spacing_and_key_order_and_is_what_earlier_versions_stored() {
        let item: Json = serde_json::from_str(
            r#"{"event_type":"agent.created","source":"s","data":{"b":1,"a":"x\u00e9\n"}}"#,
        )
        .unwrap();
        // Records written before the hash was streamed hold SHA-256 of the compact text.
        let stored: RequestHash = Sha256::digest(item.to_string().as_bytes()).into();
        let hash = |item: &Json| request_hash::request_hash(item, &mut Vec::new());
        assert_eq!(hash(&item), stored);
        let respaced: Json = serde_json::from_str(
            "{ \"data\": {\"a\": \"x\u{e9}\\n\", \"b\": 1}, \"source\": \"s\",\n \"event_type\": \"agent.created\" }",
        )
        .unwrap();
        assert_eq!(hash(&respaced), stored);
        let other: Json = serde_json::from_str(
            r#"{"event_type":"agent.created","source":"s","data":{"b":2,"a":"x\u00e9\n"}}"#,
        )
        .unwrap();
        assert_ne!(hash(&other), stored);
    }

    #[test]
    fn the_size_counted_for_the_headers_is_that_of_the_headers_sent() {
        use rdkafka::message::Headers;
        let dir = tempfile::tempdir().unwrap();
        let p = publisher(dir.path());
        let item = serde_json::json!({
            "event_type": "agent.created", "source": "s", "ttl_ms": 1000,
            "data": {"agent_id": "a", "type": "researcher", "cognitive_pattern": "systems", "created_by": "u"},
            "metadata": {"correlation_id": "c", "causation_id": "cc", "tenant": "acme"}
        });
        let prepared = p
            .prepare(Request {
                items: vec![item],
                batch: false,
                idempotency_key: Some("k".into()),
                scope: None,
            })
            .unwrap_or_else(|e| panic!("{e}"));
        let sent = headers(&prepared[0]);
        assert_eq!(sent.count(), 12, "8 fixed, 3 from metadata, ce_expiresat");
        let bytes: usize = sent
            .iter()
            .map(|h| size::header_size(h.key.len(), h.value.map_or(0, <[u8]>::len)))
            .sum();
        assert_eq!(prepared[0].header_bytes, bytes);
        let meta = sent
            .iter()
            .find(|h| h.key == "agentbus-meta-tenant")
            .unwrap();
        assert_eq!(meta.value, Some(&b"acme"[..]));
    }

    #[test]
    fn a_record_too_large_for_kafka_is_a_413_never_a_503() {
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::MessageBatchTooLarge,
        ] {
            assert!(matches!(
                describe(KafkaError::MessageProduction(code)),
                Failure::TooLarge(_)
            ));
        }
        assert!(matches!(
            describe(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)),
            Failure::Unavailable(_)
        ));
    }

    #[test]
    fn a_timestamp_the_broker_refuses_is_final_never_a_503() {
        let failure = describe(KafkaError::MessageProduction(
            RDKafkaErrorCode::InvalidTimestamp,
        ));
        assert!(
            matches!(&failure, Failure::InvalidTimestamp(why) if why.contains("after.max.ms")),
            "{failure:?}"
        );
        assert!(failure.is_final());
        assert!(!Failure::Unavailable(TIMED_OUT.into()).is_final());
    }

    #[test]
    fn acknowledgements_count_for_a_window() {
        let dir = tempfile::tempdir().unwrap();
        let p = publisher(dir.path());
        assert!(!p.acknowledged_within(Duration::from_secs(1)));
        p.note_acknowledged();
        assert!(p.acknowledged_within(Duration::from_secs(1)));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!p.acknowledged_within(Duration::from_millis(10)));
    }
}
