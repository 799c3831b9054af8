//! Path and query parameters that name Kafka things, checked at the edge: a name Kafka cannot
//! have is the caller's error (400), never handed to librdkafka (where a NUL fails the C
//! string conversion and a control character makes client creation fail, both once answered
//! as 503).

use super::error::ApiError;

/// The longest consumer group name accepted. Kafka sets no limit of its own; this one is far
/// above any real group's (agentbus's own groups also name topics, at most 249 characters).
pub const MAX_GROUP_CHARS: usize = 255;

/// Why `group` cannot be a consumer group, if it cannot.
pub fn group_problem(group: &str) -> Option<String> {
    if group.is_empty() {
        return Some("a consumer group name is not empty".into());
    }
    if group.chars().count() > MAX_GROUP_CHARS {
        return Some(format!(
            "a consumer group name has at most {MAX_GROUP_CHARS} characters"
        ));
    }
    if let Some(c) = group.chars().find(|c| c.is_control()) {
        return Some(format!(
            "a consumer group name has no control characters (found U+{:04X})",
            c as u32
        ));
    }
    if group.trim() != group {
        return Some("a consumer group name neither starts nor ends with white space".into());
    }
    None
}

/// `Ok` for a name a consumer group can have; else `400 invalid_parameter` naming `group`.
pub fn check_group(group: &str) -> Result<(), ApiError> {
    match group_problem(group) {
        None => Ok(()),
        Some(why) => Err(ApiError::invalid_parameter("path:group", why)),
    }
}

/// The longest topic name Kafka accepts.
pub const MAX_TOPIC_CHARS: usize = 249;

/// The longest replay id accepted.
pub const MAX_REPLAY_ID_CHARS: usize = 200;

/// Why `topic` cannot be a Kafka topic name, if it cannot: Kafka's own rule, 1 to 249 of
/// `[A-Za-z0-9._-]` (so also no NUL, which librdkafka's C strings cannot carry: rdkafka
/// panics on it in places).
pub fn topic_problem(topic: &str) -> Option<String> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_CHARS {
        return Some(format!(
            "a topic name has 1 to {MAX_TOPIC_CHARS} characters"
        ));
    }
    if matches!(topic, "." | "..") {
        return Some("a topic name is not \".\" or \"..\"".into());
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Some(format!(
            "a topic name has only ASCII letters, digits, '.', '_' and '-' (found U+{:04X})",
            c as u32
        ));
    }
    None
}

/// Why `agent` cannot name an agent, if it cannot: its replay topic (`<agent>.replay`) is
/// named after it, so it follows the topic rule.
pub fn agent_problem(agent: &str) -> Option<String> {
    topic_problem(agent).map(|why| format!("an agent's name makes its topics' names: {why}"))
}

/// Why `id` cannot be a replay id, if it cannot: 1 to 200 characters, no control characters
/// (it becomes part of the follow-ups' idempotency keys and a record header).
pub fn replay_id_problem(id: &str) -> Option<String> {
    if id.is_empty() || id.chars().count() > MAX_REPLAY_ID_CHARS {
        return Some(format!(
            "a replay id has 1 to {MAX_REPLAY_ID_CHARS} characters"
        ));
    }
    if let Some(c) = id.chars().find(|c| c.is_control()) {
        return Some(format!(
            "a replay id has no control characters (found U+{:04X})",
            c as u32
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_agent_and_replay_id_rules() {
        for bad in ["", "a\0b", "a b", "ä", ".", "..", "a/b", &"t".repeat(250)] {
            assert!(topic_problem(bad).is_some(), "{bad:?}");
            assert!(agent_problem(bad).is_some(), "{bad:?}");
        }
        for good in ["a", "t1.agent.events", "A-b_c.9", &"t".repeat(249)] {
            assert_eq!(topic_problem(good), None, "{good:?}");
        }
        for bad in ["", "a\tb", "\0", &"r".repeat(201)] {
            assert!(replay_id_problem(bad).is_some(), "{bad:?}");
        }
        for good in ["r", "replay 1 ä", &"r".repeat(200)] {
            assert_eq!(replay_id_problem(good), None, "{good:?}");
        }
    }

    #[test]
    fn names_kafka_cannot_have_are_refused() {
        for bad in ["", "\r", "\0", "a\nb", "a\u{7f}", "a\u{85}", " a", "a\t"] {
            assert!(group_problem(bad).is_some(), "{bad:?}");
        }
        assert!(group_problem(&"g".repeat(MAX_GROUP_CHARS + 1)).is_some());
        for good in [
            "billing",
            "a.b-c_d",
            "Gruppe ä",
            &"g".repeat(MAX_GROUP_CHARS),
        ] {
            assert_eq!(group_problem(good), None, "{good:?}");
        }
    }
}
