//! Versioned Avro schemas: loading `schemas/<event_type>/v<N>.avsc`, checking that each
//! version can read the one before, stable schema ids, and the Confluent wire format.

mod convert;
mod decode;
mod encode;
mod registry;
mod to_json;

pub use convert::{Violation, json_to_avro};
pub use decode::decode_to_json;
pub use registry::{Compatibility, EventType, Registry, SchemaVersion};
pub use to_json::avro_to_json;

use apache_avro::{Schema, types::Value};

/// Errors of loading and using schemas.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The schema directory or one of its files could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A file in the schema directory is not what it must be.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file or directory.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A version cannot read data written with the version before it.
    #[error("{path}: not BACKWARD compatible with v{previous}: {reason}")]
    Incompatible {
        /// The newer schema file.
        path: String,
        /// The version it must be able to read.
        previous: u32,
        /// Why not, as apache-avro's checker puts it.
        reason: String,
    },
    /// Encoding a value that passed validation failed; a bug, not bad input.
    #[error("avro encoding failed: {0}")]
    Encode(String),
    /// A record value is not in the Confluent wire format or not decodable.
    #[error("undecodable value: {0}")]
    Decode(String),
}

/// The magic byte that starts a Confluent wire-format value.
pub const WIRE_MAGIC: u8 = 0;

/// Encodes an already-converted value as Confluent wire format:
/// `0x00`, the schema id (4 bytes, big-endian), the Avro binary body.
///
/// The value must be of `version`'s schema, as [`json_to_avro`] makes it: it is not
/// validated again. Nothing about the schema is resolved per call (see the `encode` module).
pub fn encode_wire(version: &SchemaVersion, value: &Value) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(5 + version.encoded_size_hint());
    out.push(WIRE_MAGIC);
    out.extend_from_slice(&version.id.to_be_bytes());
    encode::encode(value, &version.schema, &version.names, &mut out)?;
    version.note_encoded_size(out.len() - 5);
    Ok(out)
}

/// Splits a Confluent wire-format value into its schema id and Avro body.
pub fn split_wire(bytes: &[u8]) -> Result<(u32, &[u8]), Error> {
    match bytes {
        [WIRE_MAGIC, a, b, c, d, body @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), body)),
        [] => Err(Error::Decode("empty value".into())),
        [WIRE_MAGIC, ..] => Err(Error::Decode("value shorter than the 5-byte header".into())),
        [magic, ..] => Err(Error::Decode(format!(
            "magic byte {magic:#04x}, expected 0x00"
        ))),
    }
}

/// The largest single allocation the Avro decoder may make for one string, bytes or
/// collection: a corrupt length prefix must not make it ask for gigabytes.
const MAX_DECODE_ALLOCATION: usize = 16 * 1024 * 1024;

/// Decodes an Avro body written with `schema`. [`decode_avro_with`] decodes with a loaded
/// version and resolves its schema only once instead of twice.
pub fn decode_avro(schema: &Schema, body: &[u8]) -> Result<Value, Error> {
    let resolved = apache_avro::schema::ResolvedSchema::try_from(schema)
        .map_err(|e| Error::Decode(e.to_string()))?;
    decode_checked(schema, body, resolved.get_names())
}

/// Decodes an Avro body written with `version`'s schema; the check of the decoded value
/// uses the named types resolved when the version was loaded.
pub fn decode_avro_with(version: &SchemaVersion, body: &[u8]) -> Result<Value, Error> {
    decode_checked(&version.schema, body, &version.resolved_names)
}

fn decode_checked<S: std::borrow::Borrow<Schema> + std::fmt::Debug>(
    schema: &Schema,
    mut body: &[u8],
    names: &std::collections::HashMap<apache_avro::schema::Name, S>,
) -> Result<Value, Error> {
    apache_avro::util::max_allocation_bytes(MAX_DECODE_ALLOCATION);
    let reader = apache_avro::reader::datum::GenericDatumReader::builder(schema)
        .build()
        .map_err(|e| Error::Decode(e.to_string()))?;
    let value = reader
        .read_value(&mut body)
        .map_err(|e| Error::Decode(e.to_string()))?;
    if !body.is_empty() {
        return Err(Error::Decode(format!(
            "{} bytes left after the Avro body",
            body.len()
        )));
    }
    // apache-avro 0.22 answers some bodies cut short (a string's length with no bytes, an
    // empty body for a boolean) with a value that is not of the schema: refuse those.
    if !value.validate_with_names(schema, names) {
        return Err(Error::Decode(
            "the Avro body is cut short or does not match the schema".into(),
        ));
    }
    Ok(value)
}
