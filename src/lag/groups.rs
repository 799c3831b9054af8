//! Which consumer groups a cluster has, and who is in them.
//!
//! librdkafka lists groups only together with DescribeGroups (`rd_kafka_list_groups` sends
//! both): on Apache Kafka that is the one way, and it names the members. Some
//! Kafka-compatible brokers fail DescribeGroups (tansu 0.6 drops the connection): with
//! [`Quirks::no_describe_groups`](crate::broker::Quirks), and only then, a failed describe
//! falls back to a plain `ListGroups` v0 request written here by hand (the rdkafka crate has
//! no admin call for it) for brokers reached without TLS or SASL. Membership is then unknown,
//! and said so.

use std::{
    io::{Read, Write},
    net::{TcpStream, ToSocketAddrs},
    time::Duration,
};

use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;

use crate::config::KafkaArgs;

/// One member of a group, as DescribeGroups tells.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    /// The member id the coordinator gave.
    pub member_id: String,
    /// The client id the member set.
    pub client_id: String,
    /// Where it connects from.
    pub client_host: String,
}

/// A consumer group of the cluster.
#[derive(Debug, Clone, Serialize)]
pub struct Group {
    /// Its id.
    pub name: String,
    /// `Stable`, `Empty`, ... when the broker described it.
    pub state: Option<String>,
    /// Its members when the broker described it; `None` when that is unknown.
    pub members: Option<Vec<Member>>,
}

/// Every consumer group of the cluster: `described` (the answer of [`describe`] for every
/// group) when the broker could. Else, with [`Quirks::no_describe_groups`](crate::broker::Quirks),
/// listed with a bare `ListGroups` (no state, no members), the second value saying why the
/// members are unknown; on Apache Kafka the failure is the answer (try again).
pub fn list(
    kafka: &KafkaArgs,
    timeout: Duration,
    described: Result<Vec<Group>, String>,
) -> Result<(Vec<Group>, Option<String>), String> {
    match described {
        Ok(groups) => Ok((groups, None)),
        Err(why) if !kafka.quirks().no_describe_groups => {
            Err(format!("the broker did not describe groups ({why})"))
        }
        Err(why) => {
            let why = format!("the broker did not describe groups ({why})");
            list_bare(kafka, timeout)
                .map(|groups| (groups, Some(why.clone())))
                .map_err(|e| format!("{why}; listing them failed too: {e}"))
        }
    }
}

/// Describes `group` (or every group) through librdkafka, on a client of its own: with
/// [`Quirks::no_describe_groups`](crate::broker::Quirks), a broker that fails the request
/// drops that client's connection and no other (its errors are not logged: they are
/// expected). For repeated calls on Apache Kafka, [`describe_with`] reuses a client.
pub fn describe(
    kafka: &KafkaArgs,
    group: Option<&str>,
    timeout: Duration,
) -> Result<Vec<Group>, String> {
    let quiet = [("log_level", "3".to_string())];
    let defaults: &[(&str, String)] = if kafka.quirks().no_describe_groups {
        &quiet
    } else {
        &[]
    };
    let client: BaseConsumer = kafka
        .client_config_with(defaults)
        .create()
        .map_err(|e| e.to_string())?;
    describe_with(&client, group, timeout)
}

/// Describes `group` (or every group) through librdkafka's group list on `client`.
pub fn describe_with<C: rdkafka::consumer::ConsumerContext>(
    client: &BaseConsumer<C>,
    group: Option<&str>,
    timeout: Duration,
) -> Result<Vec<Group>, String> {
    let list = client
        .fetch_group_list(group, timeout)
        .map_err(|e| e.to_string())?;
    Ok(list
        .groups()
        .iter()
        .filter(|g| g.protocol_type() == "consumer" || g.protocol_type().is_empty())
        .map(|g| Group {
            name: g.name().to_string(),
            state: Some(g.state().to_string()),
            members: Some(
                g.members()
                    .iter()
                    .map(|m| Member {
                        member_id: m.id().to_string(),
                        client_id: m.client_id().to_string(),
                        client_host: m.client_host().to_string(),
                    })
                    .collect(),
            ),
        })
        .collect())
}

/// Whether the cluster is reached without TLS or SASL: the requests written by hand here and
/// in [`super::offsets`] speak plaintext only.
pub(crate) fn plaintext(kafka: &KafkaArgs) -> bool {
    kafka
        .client_config()
        .get("security.protocol")
        .is_none_or(|p| p.eq_ignore_ascii_case("plaintext"))
}

/// `ListGroups` v0 to every broker of the cluster.
fn list_bare(kafka: &KafkaArgs, timeout: Duration) -> Result<Vec<Group>, String> {
    if !plaintext(kafka) {
        return Err("a bare ListGroups needs a plaintext listener".into());
    }
    let client: BaseConsumer = kafka.client_config().create().map_err(|e| e.to_string())?;
    let metadata = client
        .fetch_metadata(None, timeout)
        .map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    for broker in metadata.brokers() {
        let listed = list_groups_v0(&format!("{}:{}", broker.host(), broker.port()), timeout)
            .map_err(|e| format!("ListGroups to {}:{}: {e}", broker.host(), broker.port()))?;
        names.extend(listed);
    }
    names.sort();
    names.dedup();
    Ok(names
        .into_iter()
        .map(|name| Group {
            name,
            state: None,
            members: None,
        })
        .collect())
}

const LIST_GROUPS: i16 = 16;

/// The consumer groups one broker coordinates (`ListGroups` v0, the protocol's simplest
/// request: no body; the answer is an error code and (group, protocol type) pairs).
fn list_groups_v0(addr: &str, timeout: Duration) -> std::io::Result<Vec<String>> {
    let target = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let mut stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let client_id = b"agentbus";
    let mut request = Vec::new();
    request.extend_from_slice(&LIST_GROUPS.to_be_bytes());
    request.extend_from_slice(&0i16.to_be_bytes()); // version
    request.extend_from_slice(&1i32.to_be_bytes()); // correlation id
    request.extend_from_slice(&(client_id.len() as i16).to_be_bytes());
    request.extend_from_slice(client_id);
    stream.write_all(&(request.len() as i32).to_be_bytes())?;
    stream.write_all(&request)?;
    let mut size = [0u8; 4];
    stream.read_exact(&mut size)?;
    let size = i32::from_be_bytes(size);
    if !(0..=16 << 20).contains(&size) {
        return Err(std::io::Error::other(format!("answer of {size} bytes")));
    }
    let mut body = vec![0u8; size as usize];
    stream.read_exact(&mut body)?;
    parse_list_groups_v0(&body).map_err(std::io::Error::other)
}

/// Parses a `ListGroups` v0 answer (after its size): correlation id, error code, then the
/// array of (group id, protocol type); keeps the consumer groups.
fn parse_list_groups_v0(body: &[u8]) -> Result<Vec<String>, String> {
    let mut r = super::offsets::Reader(body);
    let _correlation = r.i32()?;
    let error = r.i16()?;
    if error != 0 {
        return Err(format!("error code {error}"));
    }
    let count = r.i32()?;
    let mut out = Vec::new();
    for _ in 0..count.max(0) {
        let group = r.string()?;
        let protocol = r.string()?;
        if protocol == "consumer" || protocol.is_empty() {
            out.push(group);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as i16).to_be_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    #[test]
    fn parses_a_list_groups_answer_and_keeps_consumer_groups() {
        let mut body = Vec::new();
        body.extend_from_slice(&1i32.to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
        body.extend_from_slice(&2i32.to_be_bytes());
        body.extend(string("planner"));
        body.extend(string("consumer"));
        body.extend(string("connect-cluster"));
        body.extend(string("connect"));
        assert_eq!(parse_list_groups_v0(&body).unwrap(), vec!["planner"]);
    }

    #[test]
    fn only_with_the_tansu_quirk_does_a_failed_describe_fall_back_to_a_bare_list() {
        let kafka = |quirks| KafkaArgs {
            brokers: "127.0.0.1:1".into(),
            topic_prefix: String::new(),
            broker_quirks: quirks,
            ..KafkaArgs::default()
        };
        let timeout = Duration::from_millis(300);
        let failed = || Err("BrokerTransportFailure".to_string());
        let on_kafka = list(&kafka(crate::broker::BrokerQuirks::None), timeout, failed());
        assert_eq!(
            on_kafka.unwrap_err(),
            "the broker did not describe groups (BrokerTransportFailure)"
        );
        let on_tansu = list(
            &kafka(crate::broker::BrokerQuirks::Tansu),
            timeout,
            failed(),
        );
        let why = on_tansu.unwrap_err();
        assert!(why.contains("listing them failed too"), "{why}");
    }

    #[test]
    fn a_short_or_failed_answer_is_an_error_not_a_panic() {
        assert!(parse_list_groups_v0(&[0, 0, 0, 1, 0]).is_err());
        let mut failed = 1i32.to_be_bytes().to_vec();
        failed.extend_from_slice(&15i16.to_be_bytes());
        assert_eq!(parse_list_groups_v0(&failed).unwrap_err(), "error code 15");
        let mut cut = 1i32.to_be_bytes().to_vec();
        cut.extend_from_slice(&0i16.to_be_bytes());
        cut.extend_from_slice(&3i32.to_be_bytes());
        cut.extend(string("a"));
        assert!(parse_list_groups_v0(&cut).is_err());
    }
}
