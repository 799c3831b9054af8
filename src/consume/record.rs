//! A consumed record as the lanes hold it: what they need, copied out of librdkafka's message
//! in one buffer. `BorrowedMessage::detach` into an `OwnedMessage` cost an allocation per
//! header (librdkafka copies each one), a String for the topic and a Vec each for the key
//! and the value: about twenty allocations per event, for headers that are read once and
//! forwarded only on the rare way to the retry or dead-letter topic.

use std::sync::Arc;

use rdkafka::{
    Message, Timestamp,
    message::{Header, Headers, OwnedHeaders},
    producer::FutureRecord,
};

/// A byte range of [`Record::data`].
#[derive(Clone, Copy)]
struct Span {
    start: u32,
    end: u32,
}

/// One header: its name's and its value's spans.
#[derive(Clone, Copy)]
struct HeaderSpan {
    name: Span,
    value: Option<Span>,
}

/// A consumed record: topic (shared by every record of it), partition, offset, timestamp,
/// and key, value and headers back to back in one buffer.
pub(crate) struct Record {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    timestamp: Timestamp,
    data: Vec<u8>,
    key: Option<Span>,
    payload: Option<Span>,
    headers: Vec<HeaderSpan>,
}

/// The topics records came from, each once: a record's topic is a reference to its entry.
#[derive(Default)]
pub(crate) struct Topics(Vec<Arc<str>>);

impl Topics {
    /// The shared name of `topic`.
    pub(crate) fn intern(&mut self, topic: &str) -> Arc<str> {
        if let Some(known) = self.0.iter().find(|t| &***t == topic) {
            return known.clone();
        }
        let new: Arc<str> = Arc::from(topic);
        self.0.push(new.clone());
        new
    }
}

impl Record {
    /// Copies `message` (of topic `topic`, interned by the caller).
    pub(crate) fn copy<M: Message>(message: &M, topic: Arc<str>) -> Self {
        let key = message.key();
        let payload = message.payload();
        let headers = message.headers();
        let count = headers.map_or(0, |h| h.count());
        // One pass over the headers (each read from librdkafka checks its name's UTF-8):
        // room for agentbus's usual headers (about 40 bytes each), grown if need be.
        let size = key.map_or(0, <[u8]>::len) + payload.map_or(0, <[u8]>::len) + 48 * count;
        let mut data = Vec::with_capacity(size);
        let mut put = |bytes: &[u8]| {
            let start = data.len() as u32;
            data.extend_from_slice(bytes);
            Span {
                start,
                end: data.len() as u32,
            }
        };
        let key = key.map(&mut put);
        let payload = payload.map(&mut put);
        let mut spans = Vec::with_capacity(count);
        if let Some(h) = headers {
            for header in h.iter() {
                spans.push(HeaderSpan {
                    name: put(header.key.as_bytes()),
                    value: header.value.map(&mut put),
                });
            }
        }
        Record {
            topic,
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message.timestamp(),
            data,
            key,
            payload,
            headers: spans,
        }
    }

    fn bytes(&self, span: Span) -> &[u8] {
        &self.data[span.start as usize..span.end as usize]
    }

    /// The record's topic.
    pub(crate) fn topic(&self) -> &str {
        &self.topic
    }

    /// The record's topic, shared.
    pub(crate) fn topic_arc(&self) -> Arc<str> {
        self.topic.clone()
    }

    /// The record's partition.
    pub(crate) fn partition(&self) -> i32 {
        self.partition
    }

    /// The record's offset.
    pub(crate) fn offset(&self) -> i64 {
        self.offset
    }

    /// The record's timestamp.
    pub(crate) fn timestamp(&self) -> Timestamp {
        self.timestamp
    }

    /// The record's key.
    pub(crate) fn key(&self) -> Option<&[u8]> {
        self.key.map(|s| self.bytes(s))
    }

    /// The record's value.
    pub(crate) fn payload(&self) -> Option<&[u8]> {
        self.payload.map(|s| self.bytes(s))
    }

    /// The headers, in order: name and value. A name that is not UTF-8 cannot come from
    /// librdkafka (its header names are C strings it hands over as `&str`); it reads as "".
    pub(crate) fn headers(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
        self.headers.iter().map(|h| {
            (
                std::str::from_utf8(self.bytes(h.name)).unwrap_or_default(),
                h.value.map(|v| self.bytes(v)),
            )
        })
    }

    /// The headers, in order, with their names as bytes (no UTF-8 check: for comparing).
    pub(crate) fn raw_headers(&self) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
        self.headers
            .iter()
            .map(|h| (self.bytes(h.name), h.value.map(|v| self.bytes(v))))
    }

    /// The value of the first header named `name`, as (lossy) UTF-8, as
    /// [`super::header_str`] reads it.
    pub(crate) fn header_str(&self, name: &str) -> Option<String> {
        self.raw_headers()
            .find(|(n, _)| *n == name.as_bytes())
            .and_then(|(_, v)| v)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The headers without those named in `drop` or in `extra`, followed by `extra`, as
    /// [`super::copied_headers`] makes them.
    pub(crate) fn copied_headers(&self, drop: &[&str], extra: &[(&str, String)]) -> OwnedHeaders {
        let mut headers = OwnedHeaders::new_with_capacity(self.headers.len() + extra.len());
        for (name, value) in self.headers() {
            if !drop.contains(&name) && !extra.iter().any(|(n, _)| *n == name) {
                headers = headers.insert(Header { key: name, value });
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

    /// A copy of the record for `topic`: same key, value and timestamp, these headers, as
    /// [`super::copy_of`] makes it.
    pub(crate) fn copy_to<'a>(
        &'a self,
        topic: &'a str,
        headers: OwnedHeaders,
    ) -> FutureRecord<'a, [u8], [u8]> {
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
        if let Some(key) = self.key() {
            record = record.key(key);
        }
        if let Some(value) = self.payload() {
            record = record.payload(value);
        }
        if let Some(ms) = self.timestamp.to_millis() {
            record = record.timestamp(ms);
        }
        record
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::OwnedMessage;

    #[test]
    fn a_copy_keeps_key_value_headers_and_position_and_forwards_them() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ce_type",
                value: Some("a.b"),
            })
            .insert(Header {
                key: "empty",
                value: None::<&[u8]>,
            })
            .insert(Header {
                key: "ce_type",
                value: Some("second"),
            });
        let message = OwnedMessage::new(
            Some(b"value".to_vec()),
            Some(b"key".to_vec()),
            "t".into(),
            Timestamp::CreateTime(42),
            3,
            17,
            Some(headers),
        );
        let mut topics = Topics::default();
        let topic = topics.intern("t");
        assert!(Arc::ptr_eq(&topic, &topics.intern("t")));
        let record = Record::copy(&message, topic);
        assert_eq!(
            (record.topic(), record.partition(), record.offset()),
            ("t", 3, 17)
        );
        assert_eq!(record.timestamp(), Timestamp::CreateTime(42));
        assert_eq!(record.key(), Some(&b"key"[..]));
        assert_eq!(record.payload(), Some(&b"value"[..]));
        let all: Vec<_> = record.headers().collect();
        assert_eq!(
            all,
            vec![
                ("ce_type", Some(&b"a.b"[..])),
                ("empty", None),
                ("ce_type", Some(&b"second"[..]))
            ]
        );
        // The first of a name counts, as for librdkafka's messages.
        assert_eq!(record.header_str("ce_type").as_deref(), Some("a.b"));
        assert_eq!(record.header_str("empty"), None);
        let copied = record.copied_headers(&["empty"], &[("x", "1".into())]);
        let names: Vec<_> = copied.iter().map(|h| (h.key, h.value)).collect();
        assert_eq!(
            names,
            vec![
                ("ce_type", Some(&b"a.b"[..])),
                ("ce_type", Some(&b"second"[..])),
                ("x", Some(&b"1"[..]))
            ]
        );
        // A record without key, value or headers.
        let bare = OwnedMessage::new(None, None, "t".into(), Timestamp::NotAvailable, 0, 0, None);
        let record = Record::copy(&bare, topics.intern("t"));
        assert_eq!((record.key(), record.payload()), (None, None));
        assert_eq!(record.headers().count(), 0);
    }
}
