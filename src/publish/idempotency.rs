//! The publish idempotency store: a sled tree in the data directory that keeps, per
//! idempotency key, a hash of the request and the first result, for a window (24 h by
//! default). It survives restarts; a sweeper removes expired keys.
//!
//! A second index, ordered by expiry time, makes a sweep cost what it removes, not the
//! size of the store.

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
    /// A stored record is not what this version writes.
    #[error("idempotency store: unreadable record for key {0:?}")]
    Corrupt(String),
}

/// The store. Cheap to share behind an `Arc`.
pub struct IdempotencyStore {
    db: sled::Db,
    keys: sled::Tree,
    by_expiry: sled::Tree,
    ttl: Duration,
    in_flight: Mutex<HashSet<String>>,
    count: AtomicI64,
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

impl IdempotencyStore {
    /// Opens (or creates) the store under `dir`.
    pub fn open(dir: &Path, ttl: Duration) -> Result<Arc<Self>, Error> {
        let db = sled::Config::new()
            .path(dir)
            // Flushed explicitly before a publish is answered; the periodic flush only
            // covers the sweeper's deletions.
            .flush_every_ms(Some(1000))
            .open()?;
        let keys = db.open_tree("publish_keys")?;
        let by_expiry = db.open_tree("publish_keys_by_expiry")?;
        let count = AtomicI64::new(keys.len() as i64);
        let store = Arc::new(IdempotencyStore {
            db,
            keys,
            by_expiry,
            ttl,
            in_flight: Mutex::new(HashSet::new()),
            count,
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

    /// Looks `key` up; when it is new, adds it to `claim` so no concurrent request can
    /// write it too.
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
            // Expired but not yet swept: forget it now so the count stays true.
            if self.keys.remove(key)?.is_some() {
                self.count.fetch_sub(1, Ordering::Relaxed);
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

    /// Records the results of written events and makes them durable before returning,
    /// so that a publish is never answered 200 with its key only in memory.
    pub async fn complete(
        &self,
        entries: &[(&str, RequestHash, &PublishResult)],
    ) -> Result<(), Error> {
        if entries.is_empty() {
            return Ok(());
        }
        let expires = now_ms() + self.ttl.as_millis() as u64;
        let mut keys = sled::Batch::default();
        let mut by_expiry = sled::Batch::default();
        for (key, hash, result) in entries {
            let mut value = Vec::with_capacity(160);
            value.extend_from_slice(&expires.to_be_bytes());
            value.extend_from_slice(hash);
            serde_json::to_writer(&mut value, result).expect("a result serializes");
            keys.insert(key.as_bytes(), value);
            by_expiry.insert(expiry_key(expires, key), &[]);
        }
        self.keys.apply_batch(keys)?;
        self.by_expiry.apply_batch(by_expiry)?;
        self.db.flush_async().await?;
        let added = self
            .count
            .fetch_add(entries.len() as i64, Ordering::Relaxed)
            + entries.len() as i64;
        metrics::gauge!(crate::telemetry::IDEMPOTENCY_KEYS).set(added as f64);
        Ok(())
    }

    /// Removes keys whose window has passed; returns how many.
    pub fn sweep(&self) -> Result<usize, Error> {
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
            let left = self.count.fetch_sub(removed as i64, Ordering::Relaxed) - removed as i64;
            metrics::gauge!(crate::telemetry::IDEMPOTENCY_KEYS).set(left.max(0) as f64);
            metrics::counter!(crate::telemetry::IDEMPOTENCY_SWEPT).increment(removed as u64);
        }
        Ok(removed)
    }

    /// Writes everything to disk (at shutdown).
    pub fn flush(&self) -> Result<(), Error> {
        self.db.flush()?;
        Ok(())
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
        assert_eq!(store.sweep().unwrap(), 1);
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
