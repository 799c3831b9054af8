//! The schema directory, loaded once at start-up.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use apache_avro::{
    Schema,
    schema::{Name, ResolvedSchema},
    schema_compatibility::SchemaCompatibility,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::Error;
use crate::envelope::valid_event_type;

/// Whether a type's versions must stay readable by their successors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compatibility {
    /// Each version reads data written with the version before it (the default).
    Backward,
    /// The type opted out: versions are not checked against each other.
    None,
}

/// `schemas/<event_type>/type.toml`: optional settings of one event type.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TypeFile {
    /// `backward` (default) or `none` to opt out of the compatibility check.
    #[serde(default = "default_compat")]
    compatibility: Compatibility,
    /// What the event means, shown by `GET /v1/schemas`.
    #[serde(default)]
    description: Option<String>,
}

fn default_compat() -> Compatibility {
    Compatibility::Backward
}

/// One major version of an event type's schema.
#[derive(Debug)]
pub struct SchemaVersion {
    /// The event type it describes, e.g. `agent.created`.
    pub event_type: String,
    /// Its major version, from `v<N>.avsc`.
    pub version: u32,
    /// Its stable id: the same schema under the same type gets the same id everywhere.
    pub id: u32,
    /// The parsed schema.
    pub schema: Schema,
    /// The schema as JSON text (compact), as served by the registry API.
    pub text: String,
    /// Named types inside it (records, enums, fixed), for resolving references.
    pub(crate) names: HashMap<String, Schema>,
    /// The same, keyed as apache-avro resolves them, for checking decoded values without
    /// resolving the schema again per record.
    pub(crate) resolved_names: HashMap<Name, Schema>,
    /// The size of the last value encoded with it: the next one's buffer starts that large.
    last_encoded: AtomicUsize,
}

/// All versions of one event type.
#[derive(Debug)]
pub struct EventType {
    /// The dotted name.
    pub name: String,
    /// Its versions, ascending.
    pub versions: BTreeMap<u32, Arc<SchemaVersion>>,
    /// Whether versions are checked for compatibility.
    pub compatibility: Compatibility,
    /// What the event means, if the type says.
    pub description: Option<String>,
}

impl SchemaVersion {
    /// Parses and checks one schema file's text.
    pub fn parse(event_type: &str, version: u32, text: &str) -> Result<SchemaVersion, String> {
        let schema = Schema::parse_str(text).map_err(|e| e.to_string())?;
        if !matches!(schema, Schema::Record(_)) {
            return Err(
                "the top-level schema must be a record (an event's data is a JSON object)".into(),
            );
        }
        let mut names = HashMap::new();
        collect_names(&schema, &mut names)?;
        let compact: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let resolved_names = ResolvedSchema::try_from(&schema)
            .map_err(|e| e.to_string())?
            .get_names()
            .iter()
            .map(|(name, schema)| (name.clone(), (*schema).clone()))
            .collect();
        Ok(SchemaVersion {
            event_type: event_type.to_string(),
            version,
            id: schema_id(event_type, &schema.canonical_form()),
            schema,
            text: compact.to_string(),
            names,
            resolved_names,
            last_encoded: AtomicUsize::new(64),
        })
    }

    /// How large a buffer an encoded value likely needs.
    pub(crate) fn encoded_size_hint(&self) -> usize {
        self.last_encoded.load(Ordering::Relaxed)
    }

    /// Remembers how large an encoded value was (see [`SchemaVersion::encoded_size_hint`]).
    pub(crate) fn note_encoded_size(&self, bytes: usize) {
        // Bounded, so that one huge event does not make every later buffer huge.
        self.last_encoded
            .store(bytes.min(64 * 1024), Ordering::Relaxed);
    }
}

impl EventType {
    /// The newest version.
    pub fn latest(&self) -> &Arc<SchemaVersion> {
        self.versions
            .values()
            .next_back()
            .expect("a loaded type has at least one version")
    }

    /// The domain, the first segment of the name, which picks the topic.
    pub fn domain(&self) -> &str {
        self.name.split('.').next().unwrap_or(&self.name)
    }
}

/// Every event type of a schema directory.
#[derive(Debug, Default)]
pub struct Registry {
    types: BTreeMap<String, EventType>,
    by_id: HashMap<u32, Arc<SchemaVersion>>,
}

impl Registry {
    /// Loads and checks a schema directory. Fails naming the file and the reason when a
    /// file is not valid Avro, is misnamed, or breaks BACKWARD compatibility.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| Error::Io { path, source }
        };
        let mut registry = Registry::default();
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .collect::<Result<_, _>>()
            .map_err(io(dir))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.eq_ignore_ascii_case("README.md") {
                continue;
            }
            if !path.is_dir() {
                return Err(invalid(
                    &path,
                    "expected a directory named after an event type".into(),
                ));
            }
            if !valid_event_type(&name) {
                return Err(invalid(
                    &path,
                    "directory name is not an event type (dotted lowercase, at least two segments)"
                        .into(),
                ));
            }
            let event_type = load_type(&path, &name)?;
            for version in event_type.versions.values() {
                if let Some(other) = registry.by_id.get(&version.id) {
                    return Err(invalid(
                        &path,
                        format!(
                            "schema id {} of v{} collides with {} v{}; change either schema",
                            version.id, version.version, other.event_type, other.version
                        ),
                    ));
                }
                registry.by_id.insert(version.id, version.clone());
            }
            registry.types.insert(name, event_type);
        }
        if registry.types.is_empty() {
            return Err(invalid(dir, "no event types found".into()));
        }
        Ok(registry)
    }

    /// An event type by name.
    pub fn event_type(&self, name: &str) -> Option<&EventType> {
        self.types.get(name)
    }

    /// All event types, by name.
    pub fn event_types(&self) -> impl Iterator<Item = &EventType> {
        self.types.values()
    }

    /// A schema version by its id.
    pub fn by_id(&self, id: u32) -> Option<&Arc<SchemaVersion>> {
        self.by_id.get(&id)
    }

    /// The distinct domains, which are the event topics' names without `.events`.
    pub fn domains(&self) -> Vec<String> {
        let mut domains: Vec<String> = self
            .types
            .values()
            .map(|t| t.domain().to_string())
            .collect();
        domains.sort();
        domains.dedup();
        domains
    }

    /// Number of schema versions loaded.
    pub fn version_count(&self) -> usize {
        self.by_id.len()
    }
}

fn invalid(path: &Path, reason: String) -> Error {
    Error::Invalid {
        path: path.display().to_string(),
        reason,
    }
}

fn load_type(dir: &Path, name: &str) -> Result<EventType, Error> {
    let mut settings = TypeFile {
        compatibility: Compatibility::Backward,
        description: None,
    };
    let mut versions = BTreeMap::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .and_then(|rd| rd.collect::<Result<Vec<_>, _>>())
        .map_err(|source| Error::Io {
            path: dir.display().to_string(),
            source,
        })?;
    files.sort_by_key(|e| e.file_name());
    for file in files {
        let path = file.path();
        let file_name = file.file_name().to_string_lossy().into_owned();
        if file_name.starts_with('.') {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        if file_name == "type.toml" {
            settings = toml::from_str(&text).map_err(|e| invalid(&path, e.to_string()))?;
            continue;
        }
        let version = file_name
            .strip_prefix('v')
            .and_then(|rest| rest.strip_suffix(".avsc"))
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|n| *n >= 1)
            .ok_or_else(|| {
                invalid(
                    &path,
                    "unexpected file: schema files are named v<N>.avsc (N ≥ 1), settings type.toml"
                        .into(),
                )
            })?;
        versions.insert(version, (path, text));
    }
    if versions.is_empty() {
        return Err(invalid(dir, "no v<N>.avsc schema in it".into()));
    }

    let mut loaded: BTreeMap<u32, Arc<SchemaVersion>> = BTreeMap::new();
    for (expected, (version, (path, text))) in (1u32..).zip(versions) {
        if version != expected {
            return Err(invalid(
                &path,
                format!("versions must run 1, 2, 3... without gaps; v{expected} is missing"),
            ));
        }
        let parsed =
            SchemaVersion::parse(name, version, &text).map_err(|reason| invalid(&path, reason))?;
        if let Some(previous) = loaded.get(&(version - 1))
            && settings.compatibility == Compatibility::Backward
        {
            check_backward(&previous.schema, &parsed.schema).map_err(|reason| {
                Error::Incompatible {
                    path: path.display().to_string(),
                    previous: version - 1,
                    reason,
                }
            })?;
        }
        loaded.insert(version, Arc::new(parsed));
    }
    Ok(EventType {
        name: name.to_string(),
        versions: loaded,
        compatibility: settings.compatibility,
        description: settings.description,
    })
}

/// A v(N) reader must read v(N-1) data completely: a partial match (say, an enum that lost
/// a symbol without a default) fails too, as it would in a Confluent registry.
fn check_backward(writer: &Schema, reader: &Schema) -> Result<(), String> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(apache_avro::schema_compatibility::Compatibility::Full) => Ok(()),
        Ok(_) => Err("the new version can read only part of the old data \
                      (an enum symbol or union branch is gone without a default)"
            .into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Stable ids: derived from the type and the schema's Parsing Canonical Form, so the same
/// directory gives the same ids on every instance and restart, and adding a type or a
/// version never renumbers the others. 31 bits, never 0, like Confluent's positive ids.
fn schema_id(event_type: &str, canonical: &str) -> u32 {
    let mut hasher = Sha256::new();
    hasher.update(event_type.as_bytes());
    hasher.update([0]);
    hasher.update(canonical.as_bytes());
    let digest = hasher.finalize();
    let id = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) & 0x7fff_ffff;
    id.max(1)
}

/// Walks a schema, collecting its named types and refusing what the converter cannot
/// carry faithfully.
fn collect_names(schema: &Schema, names: &mut HashMap<String, Schema>) -> Result<(), String> {
    match schema {
        Schema::Record(record) => {
            names.insert(record.name.fullname(None), schema.clone());
            for field in &record.fields {
                collect_names(&field.schema, names)?;
            }
        }
        Schema::Enum(e) => {
            names.insert(e.name.fullname(None), schema.clone());
        }
        Schema::Fixed(f) => {
            names.insert(f.name.fullname(None), schema.clone());
        }
        Schema::Array(a) => collect_names(&a.items, names)?,
        Schema::Map(m) => collect_names(&m.types, names)?,
        Schema::Union(u) => {
            for branch in u.variants() {
                collect_names(branch, names)?;
            }
        }
        Schema::BigDecimal => {
            return Err(
                "logical type big-decimal is not supported; use decimal with a precision and scale"
                    .into(),
            );
        }
        _ => {}
    }
    Ok(())
}
