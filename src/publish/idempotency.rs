//! The publish idempotency store: a sled tree in the data directory that keeps, per
//! idempotency key, a hash of the request and the first result, for a window (24 h by
//! default). It survives restarts; a sweeper removes expired keys.
//!
//! A second index, ordered by expiry time, makes a sweep cost what it removes, not the
//! size of the store.
//!
//! Every write goes through one writer thread that applies what has queued up and then
//! flushes once for all of it (group commit). Besides being fast, this keeps sled 0.34 away
//! from concurrent flushes racing writers, which deadlock it under load.

use std::{
    collections::HashSet,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

/// The answer first given for a key, as stored and as replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishResult {
    /// The event's id.
    pub event_id: String,
    /// Its type.
    pub event_type: String,
    /// The schema major version it was encoded with.
    pub event_version: u32,
    /// Where it was written.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Whether this answer repeats an earlier one (nothing was written this time).
    #[serde(default)]
    pub duplicate: bool,
}

/// SHA-256 of a request item, to tell a repeat from a different body under the same key.
pub type RequestHash = [u8; 32];

/// What the store knows of a key.
#[derive(Debug)]
pub enum Lookup {
    /// Not seen within the window: the caller now holds the key until it completes or drops
    /// the [`Claim`].
    New,
    /// Seen with the same request: the first result.
    Duplicate(PublishResult),
    /// Seen with a different request.
    Conflict,
    /// Another request with this key is being written right now.
    InProgress,
}

/// Errors of the store: the disk, or a record that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// sled failed (I/O, corruption).
    #[error("idempotency store: {0}")]
    Sled(#[from] sled::Error),
    /// The writer thread failed to write or flush; what it was given is not durable.
    #[error("idempotency store: {0}")]
    Write(String),
    /// A stored record is not what this version writes.
    #[error("idempotency store: unreadable record for key {0:?}")]
    Corrupt(String),
}

/// The store. Cheap to share behind an `Arc`.
pub struct IdempotencyStore {
    keys: sled::Tree,
    ttl: Duration,
    in_flight: Mutex<HashSet<String>>,
    count: Arc<AtomicI64>,
    writer: mpsc::Sender<Job>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for IdempotencyStore {
    /// Closes the queue and waits for the writer to finish what it has and release the
    /// database, so the directory can be opened again at once.
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.writer, closed));
        if let Some(thread) = self.writer_thread.lock().expect("not poisoned").take() {
            let _ = thread.join();
        }
    }
}

/// Work for the writer thread; each job is answered once it is on disk.
enum Job {
    Complete {
        records: Vec<(String, Vec<u8>)>,
        expires: u64,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Sweep {
        reply: oneshot::Sender<Result<usize, String>>,
    },
    Flush {
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// Keys claimed by one request; dropping it releases those not completed.
pub struct Claim {
    store: Arc<IdempotencyStore>,
    keys: Vec<String>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut in_flight = self.store.in_flight.lock().expect("not poisoned");
        for key in &self.keys {
            in_flight.remove(key);
        }
    }
}

impl Claim {
    /// An empty claim on `store`.
    pub fn new(store: &Arc<IdempotencyStore>) -> Claim {
        Claim {
            store: store.clone(),
            keys: Vec::new(),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Jobs taken into one group commit at most.
const MAX_GROUP: usize = 512;

impl IdempotencyStore {
    /// Opens (or creates) the store under `dir` and starts its writer thread, which ends
    /// when the store is dropped.
    pub fn open(dir: &Path, ttl: Duration) -> Result<Arc<Self>, Error> {
        let db = sled::Config::new()
            .path(dir)
            // The writer thread flushes; a second flusher would race it.
            .flush_every_ms(None)
            .open()?;
        let keys = db.open_tree("publish_keys")?;
        let by_expiry = db.open_tree("publish_keys_by_expiry")?;
        let count = Arc::new(AtomicI64::new(keys.len() as i64));
        let (writer, jobs) = mpsc::channel(4096);
        let writer_state = Writer {
            db,
            keys: keys.clone(),
            by_expiry,
            count: count.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("idempotency-writer".into())
            .spawn(move || writer_state.run(jobs))
            .map_err(|e| Error::Write(format!("starting the writer thread: {e}")))?;
        let store = Arc::new(IdempotencyStore {
            keys,
            ttl,
            in_flight: Mutex::new(HashSet::new()),
            count,
            writer,
            writer_thread: Mutex::new(Some(thread)),
        });
        metrics::gauge!(crate::telemetry::IDEMPOTENCY_KEYS).set(store.len() as f64);
        Ok(store)
    }

    /// Keys currently held (expired ones count until swept).
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed).max(0) as usize
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Looks `key` up; when it is new (or expired), adds it to `claim` so no concurrent
    /// request can write it too.
    pub fn begin(&self, key: &str, hash: &RequestHash, claim: &mut Claim) -> Result<Lookup, Error> {
        if let Some(raw) = self.keys.get(key)? {
            let (expires, stored_hash, result) =
                decode(&raw).ok_or_else(|| Error::Corrupt(key.to_string()))?;
            if expires > now_ms() {
                return Ok(if stored_hash == *hash {
                    Lookup::Duplicate(PublishResult {
                        duplicate: true,
                        ..result
                    })
                } else {
                    Lookup::Conflict
                });
            }
        }
        let mut in_flight = self.in_flight.lock().expect("not poisoned");
        if in_flight.insert(key.to_string()) {
            claim.keys.push(key.to_string());
            Ok(Lookup::New)
        } else {
            Ok(Lookup::InProgress)
        }
    }

    /// Records the results of written events and returns once they are on disk, so that
    /// a publish is never answered 200 with its key only in memory.
    pub async fn complete(
        &self,
        entries: &[(&str, RequestHash, &PublishResult)],
    ) -> Result<(), Error> {
        if entries.is_empty() {
            return Ok(());
        }
        let records = entries
            .iter()
            .map(|(key, hash, result)| {
                let mut value = Vec::with_capacity(200);
                value.extend_from_slice(&[0; 8]); // expiry, set by the writer
                value.extend_from_slice(hash);
                serde_json::to_writer(&mut value, result).expect("a result serializes");
                (key.to_string(), value)
            })
            .collect();
        let expires = now_ms() + self.ttl.as_millis() as u64;
        let (reply, done) = oneshot::channel();
        self.submit(Job::Complete {
            records,
            expires,
            reply,
        })
        .await?;
        done.await
            .map_err(|_| Error::Write("the writer thread stopped".into()))?
            .map_err(Error::Write)
    }

    /// Removes keys whose window has passed; returns how many.
    pub async fn sweep(&self) -> Result<usize, Error> {
        let (reply, done) = oneshot::channel();
        self.submit(Job::Sweep { reply }).await?;
        done.await
            .map_err(|_| Error::Write("the writer thread stopped".into()))?
            .map_err(Error::Write)
    }

    /// Writes everything to disk (at shutdown).
    pub async fn flush(&self) -> Result<(), Error> {
        let (reply, done) = oneshot::channel();
        self.submit(Job::Flush { reply }).await?;
        done.await
            .map_err(|_| Error::Write("the writer thread stopped".into()))?
            .map_err(Error::Write)
    }

    async fn submit(&self, job: Job) -> Result<(), Error> {
        self.writer
            .send(job)
            .await
            .map_err(|_| Error::Write("the writer thread stopped".into()))
    }
}

/// The writer thread's side of the store.
struct Writer {
    db: sled::Db,
    keys: sled::Tree,
    by_expiry: sled::Tree,
    count: Arc<AtomicI64>,
}

impl Writer {
    fn run(self, mut jobs: mpsc::Receiver<Job>) {
        while let Some(first) = jobs.blocking_recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match jobs.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            let mut applied = Vec::with_capacity(group.len());
            for job in group {
                let outcome = match &job {
                    Job::Complete {
                        records, expires, ..
                    } => self.complete(records, *expires).map(|()| 0),
                    Job::Sweep { .. } => self.sweep(),
                    Job::Flush { .. } => Ok(0),
                };
                applied.push((job, outcome.map_err(|e| e.to_string())));
            }
            let flushed = self.db.flush().map(|_| ()).map_err(|e| e.to_string());
            let gauge = self.count.load(Ordering::Relaxed).max(0) as f64;
            metrics::gauge!(crate::telemetry::IDEMPOTENCY_KEYS).set(gauge);
            for (job, outcome) in applied {
                let outcome = flushed.clone().and(outcome);
                // A requester that went away no longer needs the answer.
                match job {
                    Job::Complete { reply, .. } | Job::Flush { reply } => {
                        let _ = reply.send(outcome.map(|_| ()));
                    }
                    Job::Sweep { reply } => {
                        let _ = reply.send(outcome);
                    }
                }
            }
        }
    }

    fn complete(&self, records: &[(String, Vec<u8>)], expires: u64) -> Result<(), sled::Error> {
        for (key, value) in records {
            let mut value = value.clone();
            value[..8].copy_from_slice(&expires.to_be_bytes());
            if self.keys.insert(key.as_bytes(), value)?.is_none() {
                self.count.fetch_add(1, Ordering::Relaxed);
            }
            self.by_expiry.insert(expiry_key(expires, key), &[])?;
        }
        Ok(())
    }

    fn sweep(&self) -> Result<usize, sled::Error> {
        let now = now_ms();
        let mut removed = 0;
        for entry in self.by_expiry.range(..now.to_be_bytes().to_vec()) {
            let (index_key, _) = entry?;
            let key = &index_key[8..];
            // The key may have been written again since with a later expiry; keep it then.
            if let Some(raw) = self.keys.get(key)?
                && decode(&raw).is_none_or(|(expires, _, _)| expires <= now)
            {
                self.keys.remove(key)?;
                removed += 1;
            }
            self.by_expiry.remove(index_key)?;
        }
        if removed > 0 {
            self.count.fetch_sub(removed as i64, Ordering::Relaxed);
            metrics::counter!(crate::telemetry::IDEMPOTENCY_SWEPT).increment(removed as u64);
        }
        Ok(removed)
    }
}

fn expiry_key(expires: u64, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&expires.to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

fn decode(raw: &[u8]) -> Option<(u64, RequestHash, PublishResult)> {
    let expires = u64::from_be_bytes(raw.get(..8)?.try_into().ok()?);
    let hash: RequestHash = raw.get(8..40)?.try_into().ok()?;
    let result = serde_json::from_slice(raw.get(40..)?).ok()?;
    Some((expires, hash, result))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(offset: i64) -> PublishResult {
        PublishResult {
            event_id: "e".into(),
            event_type: "agent.created".into(),
            event_version: 1,
            topic: "agent.events".into(),
            partition: 0,
            offset,
            duplicate: false,
        }
    }

    #[tokio::test]
    async fn a_completed_key_is_a_duplicate_with_the_same_hash_and_a_conflict_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let store = IdempotencyStore::open(dir.path(), Duration::from_secs(60)).unwrap();
        let mut claim = Claim::new(&store);
        assert!(matches!(
            store.begin("k", &[1; 32], &mut claim).unwrap(),
            Lookup::New
        ));
        let mut other = Claim::new(&store);
        assert!(matches!(
            store.begin("k", &[1; 32], &mut other).unwrap(),
            Lookup::InProgress
        ));
        store.complete(&[("k", [1; 32], &result(7))]).await.unwrap();
        drop(claim);
        match store.begin("k", &[1; 32], &mut other).unwrap() {
            Lookup::Duplicate(r) => assert!(r.duplicate && r.offset == 7),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            store.begin("k", &[2; 32], &mut other).unwrap(),
            Lookup::Conflict
        ));
    }

    #[tokio::test]
    async fn keys_survive_a_reopen_and_are_swept_once_expired() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = IdempotencyStore::open(dir.path(), Duration::from_millis(50)).unwrap();
            store
                .complete(&[("old", [1; 32], &result(1))])
                .await
                .unwrap();
        }
        let store = IdempotencyStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
        assert_eq!(store.len(), 1);
        store
            .complete(&[("new", [1; 32], &result(2))])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(store.sweep().await.unwrap(), 1);
        assert_eq!(store.len(), 1);
        let mut claim = Claim::new(&store);
        assert!(matches!(
            store.begin("old", &[9; 32], &mut claim).unwrap(),
            Lookup::New
        ));
        assert!(matches!(
            store.begin("new", &[1; 32], &mut claim).unwrap(),
            Lookup::Duplicate(_)
        ));
    }
}
