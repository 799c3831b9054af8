//! Who may do what: API keys with scopes.
//!
//! A key is `ab_<id>_<secret>`: the id names it (and is not secret), the secret is 32 random
//! bytes. The service keeps only a salted SHA-256 of the secret (`agentbus keys new` prints
//! the key once and the line to configure), compared in constant time. The secret being
//! random and long, a fast hash is enough: there is nothing to guess.
//!
//! Scopes: `publish` (optionally only some event types, and only as some `source` names),
//! `read` (schemas, consumers and lag, dead letters, replay jobs, integrations), `admin`
//! (replays, redrive; implies `read`).

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{consume::definition::pattern_matches, ratelimit::TokenBucket};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// `POST /v1/events`.
    Publish,
    /// Reading: schemas, consumers, lag, dead letters, replay jobs.
    Read,
    /// Replays, redrive; implies `read`.
    Admin,
}

impl Scope {
    /// Its name in the keys file and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Publish => "publish",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }
}

/// A key as configured (one `[[key]]` of the keys file).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyConfig {
    /// Who holds it; shown in logs, never the secret.
    name: String,
    /// The key's id (the part after `ab_`).
    id: String,
    /// `sha256$<salt hex>$<digest hex>`.
    hash: String,
    scopes: Vec<Scope>,
    /// Event types (or patterns like `agent.task.*`) it may publish; empty: all.
    #[serde(default)]
    event_types: Vec<String>,
    /// `source` names it may publish as; empty: any.
    #[serde(default)]
    sources: Vec<String>,
    /// Requests a second on average (default: the service's `--key-rate`).
    rate_per_second: Option<f64>,
    /// Requests at once above the average (default: twice the rate).
    burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    key: Vec<KeyConfig>,
}

/// A configured key.
#[derive(Debug)]
pub struct ApiKey {
    /// Who holds it.
    pub name: String,
    id: String,
    salt: Vec<u8>,
    digest: Vec<u8>,
    scopes: Vec<Scope>,
    event_types: Vec<String>,
    sources: Vec<String>,
    bucket: TokenBucket,
}

impl ApiKey {
    /// Whether the key has `scope` (`admin` includes `read`).
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
            || (scope == Scope::Read && self.scopes.contains(&Scope::Admin))
    }

    /// Whether it may publish `event_type`; the reason when not.
    pub fn may_publish(&self, event_type: &str) -> Result<(), String> {
        if self.event_types.is_empty()
            || self
                .event_types
                .iter()
                .any(|p| pattern_matches(p, event_type))
        {
            return Ok(());
        }
        Err(format!(
            "key {:?} may not publish {event_type:?} (allowed: {})",
            self.name,
            self.event_types.join(", ")
        ))
    }

    /// Whether it may publish as `source`; the reason when not.
    pub fn may_publish_as(&self, source: &str) -> Result<(), String> {
        if self.sources.is_empty() || self.sources.iter().any(|s| s == source) {
            return Ok(());
        }
        Err(format!(
            "key {:?} may not publish as source {source:?} (allowed: {})",
            self.name,
            self.sources.join(", ")
        ))
    }

    /// The key's id (not secret): scopes its holder's idempotency keys.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Takes a request from its rate limit, or says when to come back.
    pub fn take(&self) -> Result<(), Duration> {
        self.bucket.try_take()
    }
}

/// Errors of loading the keys file.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct Error {
    file: String,
    message: String,
}

/// Why a request is not authenticated.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A key that is not (or no longer) configured, or a wrong secret.
    Invalid,
}

/// The configured keys.
#[derive(Debug, Default)]
pub struct Keys {
    by_id: HashMap<String, Arc<ApiKey>>,
}

impl Keys {
    /// Loads a keys file (TOML, `[[key]]` tables).
    pub fn load(path: &Path, default_rate: f64) -> Result<Keys, Error> {
        let error = |message: String| Error {
            file: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        Self::parse(&text, default_rate).map_err(error)
    }

    /// Parses the keys file's text.
    pub fn parse(text: &str, default_rate: f64) -> Result<Keys, String> {
        let file: KeysFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut by_id = HashMap::new();
        for (i, k) in file.key.into_iter().enumerate() {
            let at = format!("key[{i}] ({})", k.name);
            let mut parts = k.hash.split('$');
            let (Some("sha256"), Some(salt), Some(digest), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(format!("{at}.hash: expected sha256$<salt>$<digest>"));
            };
            let salt = hex::decode(salt).map_err(|e| format!("{at}.hash: salt: {e}"))?;
            let digest = hex::decode(digest).map_err(|e| format!("{at}.hash: digest: {e}"))?;
            if digest.len() != 32 {
                return Err(format!("{at}.hash: the digest is not 32 bytes"));
            }
            if k.scopes.is_empty() {
                return Err(format!("{at}.scopes: give at least one scope"));
            }
            let rate = k.rate_per_second.unwrap_or(default_rate);
            if !(rate > 0.0 && rate.is_finite()) {
                return Err(format!("{at}.rate_per_second: must be above 0"));
            }
            let burst = k
                .burst
                .unwrap_or((rate * 2.0).ceil().min(u32::MAX as f64) as u32);
            let key = ApiKey {
                name: k.name,
                id: k.id.clone(),
                salt,
                digest,
                scopes: k.scopes,
                event_types: k.event_types,
                sources: k.sources,
                bucket: TokenBucket::new(rate, burst),
            };
            if by_id.insert(k.id.clone(), Arc::new(key)).is_some() {
                return Err(format!("{at}.id: {} is used twice", k.id));
            }
        }
        Ok(Keys { by_id })
    }

    /// Whether no key is configured.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The key an `Authorization` header value presents.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Arc<ApiKey>, Denied> {
        let token = authorization
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then_some(token.trim())
            })
            .ok_or(Denied::Missing)?;
        let (id, secret) = parse_key(token).ok_or(Denied::Invalid)?;
        let Some(key) = self.by_id.get(id) else {
            return Err(Denied::Invalid);
        };
        let presented = digest(&key.salt, secret);
        if bool::from(presented.as_slice().ct_eq(&key.digest)) {
            Ok(key.clone())
        } else {
            Err(Denied::Invalid)
        }
    }

    /// The names of the keys (for the start-up log).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .by_id
            .values()
            .map(|k| format!("{} ({})", k.name, k.id))
            .collect();
        names.sort();
        names
    }
}

fn parse_key(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("ab_")?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

fn digest(salt: &[u8], secret: &str) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(secret.as_bytes());
    hasher.finalize().to_vec()
}

/// A new key: the key itself (to hand to its holder, shown once) and the `[[key]]` entry to
/// add to the keys file (limited to `event_types` and `sources` when they are not empty).
pub fn new_key(
    name: &str,
    scopes: &[Scope],
    event_types: &[String],
    sources: &[String],
) -> (String, String) {
    /// The entry as written: [`KeyConfig`]'s fields without the rate settings.
    #[derive(Serialize)]
    struct Entry<'a> {
        name: &'a str,
        id: &'a str,
        hash: &'a str,
        scopes: &'a [Scope],
        #[serde(skip_serializing_if = "<[String]>::is_empty")]
        event_types: &'a [String],
        #[serde(skip_serializing_if = "<[String]>::is_empty")]
        sources: &'a [String],
    }
    #[derive(Serialize)]
    struct File<'a> {
        key: [Entry<'a>; 1],
    }
    let id = hex::encode(rand::random::<[u8; 6]>());
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let salt = rand::random::<[u8; 16]>();
    let hash = format!(
        "sha256${}${}",
        hex::encode(salt),
        hex::encode(digest(&salt, &secret))
    );
    let entry = toml::to_string(&File {
        key: [Entry {
            name,
            id: &id,
            hash: &hash,
            scopes,
            event_types,
            sources,
        }],
    })
    .expect("an entry of strings is TOML");
    (format!("ab_{id}_{secret}"), entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_with(extra: &str) -> (Keys, String) {
        let (key, entry) = new_key("planner", &[Scope::Publish], &[], &[]);
        let keys = Keys::parse(&format!("{entry}{extra}"), 100.0).unwrap();
        (keys, key)
    }

    #[test]
    fn a_new_key_authenticates_and_nothing_else_does() {
        let (keys, key) = keys_with("");
        let found = keys.authenticate(Some(&format!("Bearer {key}"))).unwrap();
        assert_eq!(found.name, "planner");
        assert!(found.allows(Scope::Publish));
        assert!(!found.allows(Scope::Read) && !found.allows(Scope::Admin));
        assert_eq!(keys.authenticate(None).unwrap_err(), Denied::Missing);
        assert_eq!(keys.authenticate(Some(&key)).unwrap_err(), Denied::Missing);
        let last = if key.ends_with('0') { '1' } else { '0' };
        let wrong = format!("Bearer {}{last}", &key[..key.len() - 1]);
        assert_eq!(
            keys.authenticate(Some(&wrong)).unwrap_err(),
            Denied::Invalid
        );
        assert_eq!(
            keys.authenticate(Some("Bearer ab_nope_x")).unwrap_err(),
            Denied::Invalid
        );
        assert_eq!(
            keys.authenticate(Some("Bearer junk")).unwrap_err(),
            Denied::Invalid
        );
    }

    #[test]
    fn the_file_holds_no_secret() {
        let (key, entry) = new_key("planner", &[Scope::Read, Scope::Admin], &[], &[]);
        let secret = key.rsplit('_').next().unwrap();
        assert!(!entry.contains(secret));
        assert!(entry.contains("scopes = [\"read\", \"admin\"]"), "{entry}");
        let keys = Keys::parse(&entry, 1.0).unwrap();
        let k = keys.authenticate(Some(&format!("bearer {key}"))).unwrap();
        assert!(k.allows(Scope::Read), "admin implies read");
    }

    #[test]
    fn publish_limits_by_event_type_and_source() {
        let (key, entry) = new_key("planner", &[Scope::Publish], &[], &[]);
        let entry = format!("{entry}event_types = [\"agent.task.*\"]\nsources = [\"planner\"]\n");
        let keys = Keys::parse(&entry, 1.0).unwrap();
        let k = keys.authenticate(Some(&format!("Bearer {key}"))).unwrap();
        assert!(k.may_publish("agent.task.requested").is_ok());
        assert!(k.may_publish_as("planner").is_ok());
        assert!(
            k.may_publish("agent.created")
                .unwrap_err()
                .contains("agent.created")
        );
        assert!(k.may_publish_as("budget").unwrap_err().contains("budget"));
    }

    #[test]
    fn bad_files_name_the_key_and_field() {
        let e = Keys::parse(
            "[[key]]\nname=\"a\"\nid=\"1\"\nhash=\"md5$x$y\"\nscopes=[\"read\"]\n",
            1.0,
        )
        .unwrap_err();
        assert!(e.contains("key[0] (a).hash"), "{e}");
        let e = Keys::parse(
            "[[key]]\nname=\"a\"\nid=\"1\"\nhash=\"x\"\nscopes=[\"root\"]\n",
            1.0,
        )
        .unwrap_err();
        assert!(e.contains("root"), "{e}");
        let (_, entry) = new_key("a", &[Scope::Read], &[], &[]);
        let e = Keys::parse(&format!("{entry}{entry}"), 1.0).unwrap_err();
        assert!(e.contains("used twice"), "{e}");
    }

    #[test]
    fn each_key_has_its_own_rate() {
        let (key, entry) = new_key("a", &[Scope::Read], &[], &[]);
        let keys =
            Keys::parse(&format!("{entry}rate_per_second = 1.0\nburst = 2\n"), 100.0).unwrap();
        let k = keys.authenticate(Some(&format!("Bearer {key}"))).unwrap();
        assert!(k.take().is_ok() && k.take().is_ok());
        assert!(k.take().is_err());
    }
}
