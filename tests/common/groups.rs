//! Consumer groups with committed offsets, for the lag tests.

use rdkafka::{
    ClientConfig, Offset, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer},
};

/// Commits, for each group of `groups`, the offsets `offsets(i)` (one per partition, from
/// partition 0) of its index `i` on `topic`: 16 groups at a time, each on a client of its own
/// (a client commits for its own group only). Blocking.
pub fn commit_groups<const P: usize>(
    brokers: &str,
    topic: &str,
    groups: &[String],
    offsets: impl Fn(usize) -> [i64; P] + Sync,
) {
    for (c, chunk) in groups.chunks(16).enumerate() {
        std::thread::scope(|scope| {
            for (i, group) in chunk.iter().enumerate() {
                let at = offsets(c * 16 + i);
                scope.spawn(move || {
                    let consumer: BaseConsumer = ClientConfig::new()
                        .set("bootstrap.servers", brokers)
                        .set("group.id", group)
                        .create()
                        .unwrap();
                    let mut tpl = TopicPartitionList::new();
                    for (p, o) in at.iter().enumerate() {
                        tpl.add_partition_offset(topic, p as i32, Offset::Offset(*o))
                            .unwrap();
                    }
                    consumer.commit(&tpl, CommitMode::Sync).unwrap();
                });
            }
        });
    }
}
