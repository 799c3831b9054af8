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

#[cfg(test)]
mod tests {
    use super::*;

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
