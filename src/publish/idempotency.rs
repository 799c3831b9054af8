//! The publish idempotency store: a file in the data directory that keeps, per idempotency
//! key, a hash of the request and the first result, for a window (24 h by default). It
//! survives restarts; a sweeper removes expired keys.
//!
//! It is a [`WindowStore`] (redb, with memory bounded however many keys it holds), plus the
//! keys being written right now.

use std::{
    collections::HashSet,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{store, window::WindowStore};

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
    /// The underlying store failed.
    #[error("idempotency store: {0}")]
    Store(#[from] store::Error),
    /// A stored record is not what this version writes.
    #[error("idempotency store: unreadable record for key {0:?}")]
    Corrupt(String),
}

/// The store. Cheap to share behind an `Arc`.
pub struct IdempotencyStore {
    entries: WindowStore,
    ttl: Duration,
    in_flight: Mutex<HashSet<String>>,
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

impl IdempotencyStore {
    /// Opens (or creates) the store under `dir`.
    pub fn open(dir: &Path, ttl: Duration) -> Result<Arc<Self>, Error> {
        let store = Arc::new(IdempotencyStore {
            entries: WindowStore::open(dir)?,
            ttl,
            in_flight: Mutex::new(HashSet::new()),
        });
        store.report();
        Ok(store)
    }

    /// Why the store stopped working, if it did (every publish fails since).
    pub fn failure(&self) -> Option<String> {
        self.entries.failure()
    }

    /// Keys currently held (expired ones count until swept).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn report(&self) {
        metrics::gauge!(crate::telemetry::IDEMPOTENCY_KEYS).set(self.len() as f64);
    }

    /// Looks `key` up; when it is new (or expired), adds it to `claim` so no concurrent
    /// request can write it too.
    pub fn begin(&self, key: &str, hash: &RequestHash, claim: &mut Claim) -> Result<Lookup, Error> {
        if let Some(raw) = self.entries.get(key)? {
            let (stored_hash, result) =
                decode(&raw).ok_or_else(|| Error::Corrupt(key.to_string()))?;
            return Ok(if stored_hash == *hash {
                Lookup::Duplicate(PublishResult {
                    duplicate: true,
                    ..result
                })
            } else {
                Lookup::Conflict
            });
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
        let records = entries
            .iter()
            .map(|(key, hash, result)| {
                let mut value = Vec::with_capacity(200);
                value.extend_from_slice(hash);
                serde_json::to_writer(&mut value, result).expect("a result serializes");
                (key.to_string(), value)
            })
            .collect();
        self.entries.put(records, self.ttl).await?;
        self.report();
        Ok(())
    }

    /// Removes keys whose window has passed; returns how many.
    pub async fn sweep(&self) -> Result<usize, Error> {
        let removed = self.entries.sweep().await?;
        metrics::counter!(crate::telemetry::IDEMPOTENCY_SWEPT).increment(removed as u64);
        self.report();
        Ok(removed)
    }

    /// Writes everything to disk (at shutdown).
    pub async fn flush(&self) -> Result<(), Error> {
        Ok(self.entries.flush().await?)
    }
}

fn decode(raw: &[u8]) -> Option<(RequestHash, PublishResult)> {
    let hash: RequestHash = raw.get(..32)?.try_into().ok()?;
    let result = serde_json::from_slice(raw.get(32..)?).ok()?;
    Some((hash, result))
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
    async fn keys_survive_a_reopen_and_expire() {
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
