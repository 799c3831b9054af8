//! The request hash of one envelope, which tells a repeat from a different body under the
//! same idempotency key.
//!
//! It is SHA-256 of the envelope's compact JSON text with object keys sorted (serde_json's
//! maps are ordered): the same body sent again, however spaced or ordered, is the same
//! request. The idempotency store holds these hashes for a day, so the text must stay byte
//! for byte what `serde_json::to_string` writes, or a retry across an upgrade would be
//! refused as a conflict. It is written here into one buffer instead of through serde_json's
//! serializer, which feeds the hash a few bytes at a time and escapes every string byte by
//! byte; strings that need escaping, and numbers, still go through serde_json itself.

use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use super::RequestHash;

/// The hash of `item` (see the module docs). `scratch` is a buffer to reuse between items.
pub fn request_hash(item: &Json, scratch: &mut Vec<u8>) -> RequestHash {
    scratch.clear();
    compact(item, scratch);
    Sha256::digest(scratch.as_slice()).into()
}

/// Appends `value` as `serde_json::to_string` writes it.
fn compact(value: &Json, out: &mut Vec<u8>) {
    match value {
        Json::Null => out.extend_from_slice(b"null"),
        Json::Bool(true) => out.extend_from_slice(b"true"),
        Json::Bool(false) => out.extend_from_slice(b"false"),
        Json::Number(n) => serde_json::to_writer(&mut *out, n).expect("a number serializes"),
        Json::String(s) => string(s, out),
        Json::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                compact(item, out);
            }
            out.push(b']');
        }
        Json::Object(map) => {
            out.push(b'{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                string(key, out);
                out.push(b':');
                compact(item, out);
            }
            out.push(b'}');
        }
    }
}

/// Appends `s` as a JSON string: as is between quotes when nothing in it needs escaping
/// (serde_json escapes `"`, `\` and control characters only), else through serde_json.
fn string(s: &str, out: &mut Vec<u8>) {
    if s.bytes().any(|b| ESCAPED[usize::from(b)]) {
        serde_json::to_writer(&mut *out, s).expect("a string serializes");
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// The bytes serde_json escapes in a string: control characters, `"` and `\`.
static ESCAPED: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_json() -> impl Strategy<Value = Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            any::<i64>().prop_map(Json::from),
            any::<u64>().prop_map(Json::from),
            any::<f64>().prop_map(Json::from),
            ".*".prop_map(Json::String),
            "[\"\\\\\\x00-\\x1f\\x7f a-zé]{0,8}".prop_map(Json::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
                prop::collection::btree_map(".{0,6}", inner, 0..6)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The text hashed is exactly serde_json's, so hashes stored by earlier versions
        /// still match the same body.
        #[test]
        fn the_text_hashed_is_serde_jsons_compact_text(value in arb_json()) {
            let mut out = Vec::new();
            compact(&value, &mut out);
            prop_assert_eq!(String::from_utf8(out).unwrap(), value.to_string());
            let stored: RequestHash = Sha256::digest(value.to_string().as_bytes()).into();
            prop_assert_eq!(request_hash(&value, &mut Vec::new()), stored);
        }
    }
}
