//! The committed offsets of many consumer groups with a few requests, written here by hand.
//!
//! librdkafka answers committed offsets only through a consumer whose `group.id` is the group:
//! one client per group, each with its own threads (about four), connections and copy of the
//! cluster's metadata. On a cluster of a few hundred groups and thousands of topics that was
//! half a gigabyte and a thousand threads in an idle `serve`. Kafka ≥ 3.0 answers many groups
//! in one request instead: FindCoordinator v4 takes a batch of keys (KIP-699) and OffsetFetch
//! v8 a batch of groups (KIP-709). This module speaks those two (and ApiVersions v0, to know
//! whether the broker does) over one plaintext connection per broker, kept between
//! collections, with no thread of its own.
//!
//! The wire format is written and read here rather than with a protocol crate: the generated
//! decoders of the `kafka-protocol` crate reserve an array's memory by the count the peer
//! sends (`Vec::with_capacity(n)`), so a malformed answer could abort the process on a failed
//! allocation; here every count is checked against the bytes left first, and a short or
//! malformed answer is an error, never a panic. The three messages are small.
//!
//! Without a plaintext listener (TLS, SASL) or on a broker without these versions, the
//! caller falls back to per-group librdkafka clients (see `LagMonitor` in the parent module).

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{TcpStream, ToSocketAddrs},
    time::{Duration, Instant},
};

/// A committed offset: (topic, partition, offset).
pub(crate) type Committed = (String, i32, i64);

/// Per group, its coordinator's `host:port` or the error code found for it.
type Coordinators = Vec<(String, Result<String, i16>)>;

/// Per group, its committed offsets or its error code.
type GroupOffsets = Vec<(String, Result<Vec<Committed>, i16>)>;

const API_VERSIONS: i16 = 18;
const FIND_COORDINATOR: i16 = 10;
const OFFSET_FETCH: i16 = 9;
/// The first FindCoordinator with a batch of keys.
const FIND_COORDINATOR_VERSION: i16 = 4;
/// The first OffsetFetch with a batch of groups (v9 adds member ids, not needed here).
const OFFSET_FETCH_VERSION: i16 = 8;

const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;
const COORDINATOR_NOT_AVAILABLE: i16 = 15;
const NOT_COORDINATOR: i16 = 16;
const GROUP_ID_NOT_FOUND: i16 = 69;

/// Groups per FindCoordinator request.
const FIND_BATCH: usize = 100;
/// Groups per OffsetFetch request: with every topic asked for, an answer holds every
/// committed partition of its groups; 50 keep it far below [`MAX_ANSWER`].
const FETCH_BATCH: usize = 50;
/// The largest answer read; a bigger size is taken for a malformed one.
const MAX_ANSWER: i32 = 64 << 20;

/// Why the committed offsets could not be fetched this way.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    /// The broker does not speak the batched versions: use per-group clients.
    #[error("the broker does not support batched offset fetches: {0}")]
    Unsupported(String),
    /// The collection's time ran out.
    #[error("fetching committed offsets timed out")]
    Timeout,
    /// A connection failed.
    #[error("{addr}: {source}")]
    Io {
        /// The broker.
        addr: String,
        /// What failed.
        source: std::io::Error,
    },
    /// An answer could not be read.
    #[error("{addr}: malformed answer: {why}")]
    Malformed {
        /// The broker.
        addr: String,
        /// What was wrong.
        why: String,
    },
    /// The broker answered an error for a group (after one retry where one helps).
    #[error("group {group}: broker error code {code}")]
    Group {
        /// The group.
        group: String,
        /// Kafka's error code.
        code: i16,
    },
    /// No broker of the cluster is known.
    #[error("no broker to ask")]
    NoBroker,
}

/// Connections and coordinators, kept between collections.
#[derive(Default)]
pub(crate) struct Fetcher {
    /// One connection per broker (`host:port`).
    conns: HashMap<String, TcpStream>,
    /// The coordinator (`host:port`) of each group, as last found.
    coordinators: HashMap<String, String>,
    correlation: i32,
    /// Whether the broker speaks the batched versions, once asked.
    supported: Option<bool>,
}

impl Fetcher {
    /// Whether the broker was found not to speak the batched versions.
    pub(crate) fn unsupported(&self) -> bool {
        self.supported == Some(false)
    }

    /// The committed offsets of `groups` (none for a group with none or unknown to the
    /// broker), asking the brokers `bootstrap` (`host:port`) where the coordinators are, by
    /// `deadline`.
    pub(crate) fn committed(
        &mut self,
        bootstrap: &[String],
        groups: &[String],
        deadline: Instant,
    ) -> Result<HashMap<String, Vec<Committed>>, FetchError> {
        let mut out = HashMap::new();
        if groups.is_empty() {
            return Ok(out);
        }
        if self.supported.is_none() {
            self.check_versions(bootstrap, deadline)?;
        }
        if self.unsupported() {
            return Err(FetchError::Unsupported("ApiVersions".into()));
        }
        self.coordinators.retain(|g, _| groups.contains(g));
        let mut pending: Vec<String> = groups.to_vec();
        // A coordinator still loading its groups, or one that moved, is looked up and asked
        // once more; what fails twice is the answer.
        for attempt in 0..2 {
            let mut failed: Vec<(String, i16)> = Vec::new();
            let unknown: Vec<String> = pending
                .iter()
                .filter(|g| !self.coordinators.contains_key(*g))
                .cloned()
                .collect();
            for chunk in unknown.chunks(FIND_BATCH) {
                for (group, found) in self.find_coordinators(bootstrap, chunk, deadline)? {
                    match found {
                        Ok(addr) => {
                            self.coordinators.insert(group, addr);
                        }
                        Err(code) => failed.push((group, code)),
                    }
                }
            }
            let mut by_coordinator: HashMap<String, Vec<String>> = HashMap::new();
            for group in &pending {
                if let Some(addr) = self.coordinators.get(group) {
                    by_coordinator
                        .entry(addr.clone())
                        .or_default()
                        .push(group.clone());
                }
            }
            for (addr, groups) in by_coordinator {
                for chunk in groups.chunks(FETCH_BATCH) {
                    for (group, answer) in self.offset_fetch(&addr, chunk, deadline)? {
                        match answer {
                            Ok(offsets) => {
                                out.insert(group, offsets);
                            }
                            Err(code) => {
                                self.coordinators.remove(&group);
                                failed.push((group, code));
                            }
                        }
                    }
                }
            }
            let retry = |code: i16| {
                matches!(
                    code,
                    COORDINATOR_LOAD_IN_PROGRESS | COORDINATOR_NOT_AVAILABLE | NOT_COORDINATOR
                )
            };
            if let Some((group, code)) = failed
                .iter()
                .find(|(_, code)| attempt == 1 || !retry(*code))
            {
                return Err(FetchError::Group {
                    group: group.clone(),
                    code: *code,
                });
            }
            pending = failed.into_iter().map(|(g, _)| g).collect();
            if pending.is_empty() {
                break;
            }
            // Give a loading coordinator a moment, within the deadline.
            std::thread::sleep(
                Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now())),
            );
        }
        // A group the broker answered nothing for (it should not happen) has no offsets.
        for group in groups {
            out.entry(group.clone()).or_default();
        }
        Ok(out)
    }

    /// Asks the first broker that answers which versions it speaks.
    fn check_versions(
        &mut self,
        bootstrap: &[String],
        deadline: Instant,
    ) -> Result<(), FetchError> {
        let (addr, body) = self.call_any(bootstrap, API_VERSIONS, 0, &[], deadline)?;
        let versions = parse_api_versions_v0(&body).map_err(|why| FetchError::Malformed {
            addr: addr.clone(),
            why,
        })?;
        let speaks = |key: i16, version: i16| {
            versions
                .iter()
                .any(|&(k, min, max)| k == key && min <= version && version <= max)
        };
        self.supported = Some(
            speaks(FIND_COORDINATOR, FIND_COORDINATOR_VERSION)
                && speaks(OFFSET_FETCH, OFFSET_FETCH_VERSION),
        );
        if self.unsupported() {
            // Not used again: no connection left open.
            self.conns.clear();
        }
        Ok(())
    }

    /// The coordinator of each group (`host:port`) or the error code found for it.
    fn find_coordinators(
        &mut self,
        bootstrap: &[String],
        groups: &[String],
        deadline: Instant,
    ) -> Result<Coordinators, FetchError> {
        let mut body = vec![0u8]; // key type: group
        compact_array_len(&mut body, groups.len());
        for g in groups {
            compact_string(&mut body, g);
        }
        body.push(0); // tagged fields
        let (addr, answer) = self.call_any(
            bootstrap,
            FIND_COORDINATOR,
            FIND_COORDINATOR_VERSION,
            &body,
            deadline,
        )?;
        parse_find_coordinator_v4(&answer).map_err(|why| FetchError::Malformed { addr, why })
    }

    /// Every committed offset of each group (all topics), or the group's error code.
    fn offset_fetch(
        &mut self,
        addr: &str,
        groups: &[String],
        deadline: Instant,
    ) -> Result<GroupOffsets, FetchError> {
        let mut body = Vec::new();
        compact_array_len(&mut body, groups.len());
        for g in groups {
            compact_string(&mut body, g);
            body.push(0); // topics: null, every topic the group committed on
            body.push(0); // tagged fields
        }
        // Not require_stable: Kafka's own kafka-consumer-groups does not ask for it either, so
        // the offsets are the same as the ones it shows.
        body.push(0);
        body.push(0); // tagged fields
        let answer = self.call(addr, OFFSET_FETCH, OFFSET_FETCH_VERSION, &body, deadline)?;
        parse_offset_fetch_v8(&answer).map_err(|why| FetchError::Malformed {
            addr: addr.to_string(),
            why,
        })
    }

    /// [`Fetcher::call`] to the first of `brokers` that answers.
    fn call_any(
        &mut self,
        brokers: &[String],
        api_key: i16,
        version: i16,
        body: &[u8],
        deadline: Instant,
    ) -> Result<(String, Vec<u8>), FetchError> {
        let mut last = FetchError::NoBroker;
        for addr in brokers {
            match self.call(addr, api_key, version, body, deadline) {
                Ok(answer) => return Ok((addr.clone(), answer)),
                Err(e @ FetchError::Io { .. }) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// One request and its answer's body (after the response header), on the connection
    /// kept to `addr`; a kept connection the broker closed meanwhile (idle connections are
    /// closed after `connections.max.idle.ms`) is opened again once.
    fn call(
        &mut self,
        addr: &str,
        api_key: i16,
        version: i16,
        body: &[u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, FetchError> {
        // Out of time is a timeout however it shows (a read timed out, no time left to
        // connect): the collection fails instead of asking group by group for as long again.
        let io = |source: std::io::Error| {
            if Instant::now() >= deadline
                || matches!(
                    source.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                )
            {
                FetchError::Timeout
            } else {
                FetchError::Io {
                    addr: addr.to_string(),
                    source,
                }
            }
        };
        for fresh in [false, true] {
            if fresh || !self.conns.contains_key(addr) {
                self.conns.remove(addr);
                let stream = connect(addr, deadline).map_err(io)?;
                self.conns.insert(addr.to_string(), stream);
            }
            self.correlation = self.correlation.wrapping_add(1);
            let correlation = self.correlation;
            let stream = self.conns.get_mut(addr).expect("connected above");
            match exchange(stream, api_key, version, correlation, body, deadline) {
                Ok(answer) => {
                    // ApiVersions answers with header v0 always; flexible versions with v1.
                    let flexible = api_key != API_VERSIONS;
                    return parse_response_header(&answer, correlation, flexible).map_err(|why| {
                        self.conns.remove(addr);
                        FetchError::Malformed {
                            addr: addr.to_string(),
                            why,
                        }
                    });
                }
                Err(e) => {
                    self.conns.remove(addr);
                    let e = io(e);
                    if fresh || matches!(e, FetchError::Timeout) {
                        return Err(e);
                    }
                }
            }
        }
        unreachable!("the second attempt returns")
    }
}

fn remaining(deadline: Instant) -> std::io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "deadline passed",
        ));
    }
    Ok(left)
}

fn connect(addr: &str, deadline: Instant) -> std::io::Result<TcpStream> {
    let target = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let stream = TcpStream::connect_timeout(&target, remaining(deadline)?)?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Writes one request (header v1 for ApiVersions v0, v2 for the flexible versions) and reads
/// one answer, whole.
fn exchange(
    stream: &mut TcpStream,
    api_key: i16,
    version: i16,
    correlation: i32,
    body: &[u8],
    deadline: Instant,
) -> std::io::Result<Vec<u8>> {
    let client_id = b"agentbus-lag";
    let mut request = Vec::with_capacity(body.len() + 32);
    request.extend_from_slice(&0i32.to_be_bytes()); // size, set below
    request.extend_from_slice(&api_key.to_be_bytes());
    request.extend_from_slice(&version.to_be_bytes());
    request.extend_from_slice(&correlation.to_be_bytes());
    request.extend_from_slice(&(client_id.len() as i16).to_be_bytes());
    request.extend_from_slice(client_id);
    if api_key != API_VERSIONS {
        request.push(0); // header tagged fields
    }
    request.extend_from_slice(body);
    let size = (request.len() - 4) as i32;
    request[..4].copy_from_slice(&size.to_be_bytes());
    stream.set_write_timeout(Some(remaining(deadline)?))?;
    stream.write_all(&request)?;
    let mut size = [0u8; 4];
    read_exact(stream, &mut size, deadline)?;
    let size = i32::from_be_bytes(size);
    if !(0..=MAX_ANSWER).contains(&size) {
        return Err(std::io::Error::other(format!("answer of {size} bytes")));
    }
    let mut answer = vec![0u8; size as usize];
    read_exact(stream, &mut answer, deadline)?;
    Ok(answer)
}

/// `read_exact` with the read timeout shrinking to the deadline.
fn read_exact(
    stream: &mut TcpStream,
    mut buf: &mut [u8],
    deadline: Instant,
) -> std::io::Result<()> {
    while !buf.is_empty() {
        stream.set_read_timeout(Some(remaining(deadline)?))?;
        match stream.read(buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn compact_array_len(out: &mut Vec<u8>, n: usize) {
    unsigned_varint(out, n as u64 + 1);
}

fn compact_string(out: &mut Vec<u8>, s: &str) {
    unsigned_varint(out, s.len() as u64 + 1);
    out.extend_from_slice(s.as_bytes());
}

fn unsigned_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The body after the response header; checks the correlation id.
fn parse_response_header(
    answer: &[u8],
    correlation: i32,
    flexible: bool,
) -> Result<Vec<u8>, String> {
    let mut r = Reader(answer);
    let got = r.i32()?;
    if got != correlation {
        return Err(format!("correlation id {got}, not {correlation}"));
    }
    if flexible {
        r.tagged_fields()?;
    }
    Ok(r.0.to_vec())
}

/// ApiVersions v0: error code, then (api key, min, max) per API.
fn parse_api_versions_v0(body: &[u8]) -> Result<Vec<(i16, i16, i16)>, String> {
    let mut r = Reader(body);
    let error = r.i16()?;
    if error != 0 {
        return Err(format!("ApiVersions error code {error}"));
    }
    let n = r.array_len(6)?;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push((r.i16()?, r.i16()?, r.i16()?));
    }
    Ok(out)
}

/// FindCoordinator v4: per key, its coordinator's `host:port` or the error code.
fn parse_find_coordinator_v4(body: &[u8]) -> Result<Coordinators, String> {
    let mut r = Reader(body);
    let _throttle = r.i32()?;
    let n = r.compact_array_len()?;
    let mut out = Vec::new();
    for _ in 0..n {
        let key = r.compact_string()?;
        let _node = r.i32()?;
        let host = r.compact_string()?;
        let port = r.i32()?;
        let error = r.i16()?;
        let _message = r.compact_nullable_string()?;
        r.tagged_fields()?;
        out.push((
            key,
            if error == 0 {
                Ok(format!("{host}:{port}"))
            } else {
                Err(error)
            },
        ));
    }
    r.tagged_fields()?;
    Ok(out)
}

/// OffsetFetch v8: per group, its committed offsets, or the group's error code. A group the
/// broker does not know has none; partitions without a committed offset (-1) or of a topic
/// gone are left out; another partition error is the group's error.
fn parse_offset_fetch_v8(body: &[u8]) -> Result<GroupOffsets, String> {
    let mut r = Reader(body);
    let _throttle = r.i32()?;
    let groups = r.compact_array_len()?;
    let mut out = Vec::new();
    for _ in 0..groups {
        let group = r.compact_string()?;
        let mut offsets = Vec::new();
        let mut partition_error = 0;
        let topics = r.compact_array_len()?;
        for _ in 0..topics {
            let topic = r.compact_string()?;
            let partitions = r.compact_array_len()?;
            for _ in 0..partitions {
                let partition = r.i32()?;
                let offset = r.i64()?;
                let _epoch = r.i32()?;
                let _metadata = r.compact_nullable_string()?;
                let error = r.i16()?;
                r.tagged_fields()?;
                match error {
                    0 if offset >= 0 => offsets.push((topic.clone(), partition, offset)),
                    0 | UNKNOWN_TOPIC_OR_PARTITION => {}
                    e => partition_error = e,
                }
            }
            r.tagged_fields()?;
        }
        let error = r.i16()?;
        r.tagged_fields()?;
        let answer = match (error, partition_error) {
            (0 | GROUP_ID_NOT_FOUND, 0) => Ok(if error == 0 { offsets } else { Vec::new() }),
            (0, e) | (e, _) => Err(e),
        };
        out.push((group, answer));
    }
    r.tagged_fields()?;
    Ok(out)
}

/// Reads big-endian fields from an answer; running short is an error. Also what
/// [`super::groups`] reads its ListGroups v0 answer with.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.0.len() < n {
            return Err("answer cut short".into());
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }
    pub(crate) fn i16(&mut self) -> Result<i16, String> {
        Ok(i16::from_be_bytes(self.array()?))
    }
    pub(crate) fn i32(&mut self) -> Result<i32, String> {
        Ok(i32::from_be_bytes(self.array()?))
    }
    /// A (non-compact) string: an i16 length, then its bytes; a negative length (null) is
    /// read as empty.
    pub(crate) fn string(&mut self) -> Result<String, String> {
        let n = self.i16()?;
        let bytes = self.take(n.max(0) as usize)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| e.to_string())
    }
    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_be_bytes(self.array()?))
    }
    fn unsigned_varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..35).step_by(7) {
            let b = self.take(1)?[0];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }
    /// A count of elements of at least `min_size` bytes each: more than the bytes left can
    /// hold is malformed (and nothing is reserved by it).
    fn checked(&self, n: u64, min_size: usize) -> Result<usize, String> {
        if n > (self.0.len() / min_size.max(1)) as u64 {
            return Err(format!("array of {n} elements in {} bytes", self.0.len()));
        }
        Ok(n as usize)
    }
    fn array_len(&mut self, min_size: usize) -> Result<usize, String> {
        let n = self.i32()?;
        if n < 0 {
            return Err("null array".into());
        }
        self.checked(n as u64, min_size)
    }
    /// A non-null compact array (length + 1); each element at least one byte.
    fn compact_array_len(&mut self) -> Result<usize, String> {
        match self.unsigned_varint()? {
            0 => Err("null array".into()),
            n => self.checked(n - 1, 1),
        }
    }
    fn compact_nullable_string(&mut self) -> Result<Option<String>, String> {
        match self.unsigned_varint()? {
            0 => Ok(None),
            n => {
                let n = self.checked(n - 1, 1)?;
                let bytes = self.take(n)?;
                String::from_utf8(bytes.to_vec())
                    .map(Some)
                    .map_err(|e| e.to_string())
            }
        }
    }
    fn compact_string(&mut self) -> Result<String, String> {
        self.compact_nullable_string()?
            .ok_or_else(|| "null string".to_string())
    }
    fn tagged_fields(&mut self) -> Result<(), String> {
        let n = self.unsigned_varint()?;
        let n = self.checked(n, 2)?;
        for _ in 0..n {
            let _tag = self.unsigned_varint()?;
            let size = self.unsigned_varint()?;
            let size = self.checked(size, 1)?;
            self.take(size)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (group, its partitions as (topic, partition, offset, error), its error).
    type Answer<'a> = (&'a str, &'a [(&'a str, i32, i64, i16)], i16);

    fn offset_fetch_answer(groups: &[Answer]) -> Vec<u8> {
        let mut b = 0i32.to_be_bytes().to_vec();
        compact_array_len(&mut b, groups.len());
        for (group, partitions, error) in groups {
            compact_string(&mut b, group);
            compact_array_len(&mut b, partitions.len());
            // One topic per partition, for brevity.
            for (topic, partition, offset, error) in *partitions {
                compact_string(&mut b, topic);
                compact_array_len(&mut b, 1);
                b.extend_from_slice(&partition.to_be_bytes());
                b.extend_from_slice(&offset.to_be_bytes());
                b.extend_from_slice(&(-1i32).to_be_bytes());
                b.push(1); // metadata: ""
                b.extend_from_slice(&error.to_be_bytes());
                b.push(0);
                b.push(0);
            }
            b.extend_from_slice(&error.to_be_bytes());
            b.push(0);
        }
        b.push(0);
        b
    }

    #[test]
    fn an_offset_fetch_answer_gives_each_group_its_offsets_or_its_error() {
        let body = offset_fetch_answer(&[
            (
                "a",
                &[("t", 0, 5, 0), ("t", 1, -1, 0), ("gone", 0, 3, 3)],
                0,
            ),
            ("b", &[], GROUP_ID_NOT_FOUND),
            ("c", &[], NOT_COORDINATOR),
            ("d", &[("t", 0, 1, 88)], 0),
        ]);
        let parsed = parse_offset_fetch_v8(&body).unwrap();
        assert_eq!(
            parsed,
            vec![
                ("a".to_string(), Ok(vec![("t".to_string(), 0, 5)])),
                ("b".to_string(), Ok(vec![])),
                ("c".to_string(), Err(NOT_COORDINATOR)),
                ("d".to_string(), Err(88)),
            ]
        );
    }

    #[test]
    fn every_truncation_of_an_answer_is_an_error_not_a_panic() {
        let body = offset_fetch_answer(&[("a", &[("t", 0, 5, 0)], 0)]);
        for n in 0..body.len() {
            assert!(parse_offset_fetch_v8(&body[..n]).is_err(), "{n} bytes");
        }
        let mut find = 0i32.to_be_bytes().to_vec();
        compact_array_len(&mut find, 1);
        compact_string(&mut find, "g");
        find.extend_from_slice(&1i32.to_be_bytes());
        compact_string(&mut find, "localhost");
        find.extend_from_slice(&9092i32.to_be_bytes());
        find.extend_from_slice(&0i16.to_be_bytes());
        find.push(0);
        find.push(0);
        find.push(0);
        assert_eq!(
            parse_find_coordinator_v4(&find).unwrap(),
            vec![("g".to_string(), Ok("localhost:9092".to_string()))]
        );
        for n in 0..find.len() {
            assert!(parse_find_coordinator_v4(&find[..n]).is_err(), "{n} bytes");
        }
        let mut versions = 0i16.to_be_bytes().to_vec();
        versions.extend_from_slice(&1i32.to_be_bytes());
        for v in [OFFSET_FETCH, 0, 9] {
            versions.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(parse_api_versions_v0(&versions).unwrap(), vec![(9, 0, 9)]);
        for n in 0..versions.len() {
            assert!(parse_api_versions_v0(&versions[..n]).is_err(), "{n} bytes");
        }
    }

    #[test]
    fn a_huge_count_is_malformed_and_reserves_nothing() {
        // Four billion groups claimed in a dozen bytes.
        let mut body = 0i32.to_be_bytes().to_vec();
        unsigned_varint(&mut body, u32::MAX as u64);
        body.extend_from_slice(&[0; 8]);
        assert!(
            parse_offset_fetch_v8(&body)
                .unwrap_err()
                .contains("elements")
        );
        let mut versions = 0i16.to_be_bytes().to_vec();
        versions.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(parse_api_versions_v0(&versions).is_err());
        // A varint that never ends.
        let mut endless = 0i32.to_be_bytes().to_vec();
        endless.extend_from_slice(&[0xff; 12]);
        assert!(parse_offset_fetch_v8(&endless).is_err());
    }

    #[test]
    fn a_wrong_correlation_id_is_malformed() {
        let mut answer = 7i32.to_be_bytes().to_vec();
        answer.push(0);
        answer.push(42);
        assert_eq!(parse_response_header(&answer, 7, true).unwrap(), vec![42]);
        assert!(parse_response_header(&answer, 8, true).is_err());
        assert_eq!(
            parse_response_header(&answer, 7, false).unwrap(),
            vec![0, 42]
        );
    }

    #[test]
    fn varints_round_trip() {
        for v in [0u64, 1, 127, 128, 300, 16_383, 16_384, u32::MAX as u64] {
            let mut b = Vec::new();
            unsigned_varint(&mut b, v);
            assert_eq!(Reader(&b).unsigned_varint().unwrap(), v);
        }
    }

    /// A broker that answers ApiVersions, FindCoordinator (itself, for every key) and
    /// OffsetFetch: NOT_COORDINATOR the first time, then offset 7 on t/0 for every group.
    /// Returns its address and the count of each request seen.
    fn fake_broker() -> (
        String,
        std::sync::Arc<std::sync::Mutex<HashMap<i16, usize>>>,
    ) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(HashMap::<i16, usize>::new()));
        let (me, counts) = (addr.clone(), seen.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let (me, counts) = (me.clone(), counts.clone());
                std::thread::spawn(move || {
                    loop {
                        let mut size = [0u8; 4];
                        if stream.read_exact(&mut size).is_err() {
                            return;
                        }
                        let mut request = vec![0u8; i32::from_be_bytes(size) as usize];
                        stream.read_exact(&mut request).unwrap();
                        let key = i16::from_be_bytes([request[0], request[1]]);
                        let correlation = &request[4..8];
                        let n = {
                            let mut c = counts.lock().unwrap();
                            let n = c.entry(key).or_default();
                            *n += 1;
                            *n
                        };
                        let mut answer = correlation.to_vec();
                        if key != API_VERSIONS {
                            answer.push(0);
                        }
                        match key {
                            API_VERSIONS => {
                                answer.extend_from_slice(&0i16.to_be_bytes());
                                answer.extend_from_slice(&2i32.to_be_bytes());
                                for v in [FIND_COORDINATOR, 0, 4, OFFSET_FETCH, 0, 8] {
                                    answer.extend_from_slice(&v.to_be_bytes());
                                }
                            }
                            FIND_COORDINATOR => {
                                let (host, port) = me.split_once(':').unwrap();
                                answer.extend_from_slice(&0i32.to_be_bytes());
                                compact_array_len(&mut answer, 1);
                                compact_string(&mut answer, "g");
                                answer.extend_from_slice(&1i32.to_be_bytes());
                                compact_string(&mut answer, host);
                                answer
                                    .extend_from_slice(&port.parse::<i32>().unwrap().to_be_bytes());
                                answer.extend_from_slice(&0i16.to_be_bytes());
                                answer.extend_from_slice(&[0, 0, 0]);
                            }
                            _ => {
                                let body = if n == 1 {
                                    offset_fetch_answer(&[("g", &[], NOT_COORDINATOR)])
                                } else {
                                    offset_fetch_answer(&[("g", &[("t", 0, 7, 0)], 0)])
                                };
                                answer.extend_from_slice(&body);
                            }
                        }
                        let mut framed = (answer.len() as i32).to_be_bytes().to_vec();
                        framed.extend_from_slice(&answer);
                        stream.write_all(&framed).unwrap();
                    }
                });
            }
        });
        (addr, seen)
    }

    #[test]
    fn a_moved_coordinator_is_found_again_once_and_asked_again() {
        let (addr, seen) = fake_broker();
        let mut fetcher = Fetcher::default();
        let deadline = Instant::now() + Duration::from_secs(5);
        let got = fetcher
            .committed(std::slice::from_ref(&addr), &["g".to_string()], deadline)
            .unwrap();
        assert_eq!(got["g"], vec![("t".to_string(), 0, 7)]);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[&FIND_COORDINATOR], 2, "{seen:?}");
        assert_eq!(seen[&OFFSET_FETCH], 2, "{seen:?}");
        // The connection is kept: the next collection asks on it, no lookup.
        let again = fetcher
            .committed(&[addr], &["g".to_string()], deadline)
            .unwrap();
        assert_eq!(again["g"], vec![("t".to_string(), 0, 7)]);
    }

    #[test]
    fn a_broker_that_never_answers_times_out_by_the_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let started = Instant::now();
        let deadline = started + Duration::from_millis(300);
        let got = Fetcher::default().committed(&[addr], &["g".to_string()], deadline);
        assert!(matches!(got, Err(FetchError::Timeout)), "{got:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(held.join());
    }
}
