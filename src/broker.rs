//! Which broker quirks agentbus works around: the one seam between "Kafka as Apache Kafka
//! does it" and the Kafka-compatible brokers that differ.
//!
//! The setting `--broker-quirks` / `AGENTBUS_BROKER_QUIRKS` picks a set: `none` (the default,
//! Apache Kafka and brokers that behave like it), where every Kafka client runs librdkafka's
//! plain path, or `tansu` (tansu 0.6). Every workaround reads its own named switch of
//! [`Quirks`], so that what only one broker needs never runs on another's path.

use std::time::Duration;

/// The broker named by `--broker-quirks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BrokerQuirks {
    /// Apache Kafka (and brokers that behave like it): no workaround.
    #[default]
    None,
    /// tansu 0.6, a young Kafka-compatible broker.
    Tansu,
}

impl BrokerQuirks {
    /// The workarounds this broker needs.
    pub fn quirks(self) -> Quirks {
        match self {
            BrokerQuirks::None => Quirks::NONE,
            BrokerQuirks::Tansu => Quirks::TANSU,
        }
    }
}

/// The broker quirks that are on. Each switch names what a broker does differently from
/// Apache Kafka; every one is off on Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quirks {
    /// tansu 0.6: after deliveries timed out, librdkafka bumps the idempotent producer's
    /// epoch; tansu panics on that bump and fails every request of that producer until it
    /// is restarted. So the publisher replaces a producer a delivery on which timed out (a
    /// new producer id starts clean). Apache Kafka takes the bump: the producer is kept.
    pub renew_producer_after_timeout: bool,
    /// tansu 0.6: offsets-for-times answers offset 0 instead of "none" when every record of
    /// a partition is older than the time asked, which would reset or replay the whole
    /// partition. So each answer is checked against the timestamp of the record it points
    /// at, and a replay's `until` answered at its start reads on to the end. Apache Kafka's
    /// answers are exact.
    pub offsets_for_times_zero_for_none: bool,
    /// tansu 0.6: a fetch waits about half of `fetch.wait.max.ms` even when records are
    /// there, and a first fetch of a partition is slow; reads that check a record take
    /// longer to time out.
    pub slow_fetches: bool,
    /// tansu 0.6: DescribeGroups is not served (the broker drops the connection). So groups
    /// are described on a client of their own, a failure is not asked again for a while,
    /// groups are then listed with a bare ListGroups v0 (membership unknown), and an offset
    /// reset needs `--assume-inactive`, as nothing can tell whether the group is active.
    pub no_describe_groups: bool,
}

impl Quirks {
    /// Apache Kafka: none.
    pub const NONE: Quirks = Quirks {
        renew_producer_after_timeout: false,
        offsets_for_times_zero_for_none: false,
        slow_fetches: false,
        no_describe_groups: false,
    };

    /// tansu 0.6: all of them.
    pub const TANSU: Quirks = Quirks {
        renew_producer_after_timeout: true,
        offsets_for_times_zero_for_none: true,
        slow_fetches: true,
        no_describe_groups: true,
    };

    /// How long reading the record at an offset (to check it) may take.
    pub fn check_timeout(self) -> Duration {
        if self.slow_fetches {
            Duration::from_secs(60)
        } else {
            Duration::from_secs(15)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        kafka: crate::config::KafkaArgs,
    }

    fn parse(args: &[&str]) -> Result<crate::config::KafkaArgs, clap::Error> {
        Wrapper::try_parse_from(std::iter::once("test").chain(args.iter().copied()))
            .map(|w| w.kafka)
    }

    #[test]
    fn no_quirk_by_default_and_every_one_with_tansu() {
        // The environment may name a broker (ops/test.sh --broker tansu): only an explicit
        // flag is compared here, and the default is checked on the type itself.
        assert_eq!(BrokerQuirks::default(), BrokerQuirks::None);
        assert_eq!(BrokerQuirks::default().quirks(), Quirks::default());
        assert_eq!(
            parse(&["--broker-quirks", "none"]).unwrap().quirks(),
            Quirks::NONE
        );
        let tansu = parse(&["--broker-quirks", "tansu"]).unwrap().quirks();
        assert_eq!(tansu, Quirks::TANSU);
        assert!(
            tansu.renew_producer_after_timeout
                && tansu.offsets_for_times_zero_for_none
                && tansu.slow_fetches
                && tansu.no_describe_groups
        );
        assert!(Quirks::TANSU.check_timeout() > Quirks::NONE.check_timeout());
    }

    #[test]
    fn an_unknown_broker_is_refused_naming_the_choices() {
        let e = parse(&["--broker-quirks", "redpanda"]).err().unwrap();
        let text = e.to_string();
        assert!(text.contains("none") && text.contains("tansu"), "{text}");
    }

    #[test]
    fn without_the_flag_the_default_is_apache_kafka() {
        if std::env::var_os("AGENTBUS_BROKER_QUIRKS").is_some() {
            return;
        }
        assert_eq!(parse(&[]).unwrap().broker_quirks, BrokerQuirks::None);
    }
}
