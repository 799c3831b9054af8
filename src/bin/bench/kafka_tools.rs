//! Kafka's own perf tools (`kafka-producer-perf-test`, `kafka-consumer-perf-test`) as a second
//! baseline beside raw librdkafka, run from the jars ops/broker.sh installed.

use std::collections::HashMap;

use anyhow::{Context, bail};

/// Where Kafka's jars are (`ops/broker.sh classpath`), when the perf tools are to run.
#[derive(Clone, clap::Args)]
pub struct ToolArgs {
    /// The classpath of Kafka's jars (`ops/broker.sh classpath`); without it the perf-tool
    /// baseline is left out.
    #[arg(long, env = "AGENTBUS_BENCH_KAFKA_CLASSPATH")]
    pub kafka_classpath: Option<String>,
    /// log4j2 configuration of the tools (only warnings, to stderr).
    #[arg(long, default_value = "ops/kafka/log4j2-tools.properties")]
    pub kafka_tools_log4j: String,
}

/// What kafka-producer-perf-test reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProducerPerf {
    pub records_per_sec: f64,
    pub mb_per_sec: f64,
}

/// What kafka-consumer-perf-test reports: the rate over its whole run (group join included)
/// and over its fetch time only (the one comparable with a rate from the first record on).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConsumerPerf {
    pub records_per_sec: f64,
    pub mb_per_sec: f64,
    pub fetch_records_per_sec: f64,
    pub fetch_mb_per_sec: f64,
}

impl ToolArgs {
    /// Runs one of Kafka's classes with the JVM options of kafka-run-class.sh and the heap
    /// the perf-test scripts give it (`-Xmx512M`); its standard output.
    async fn java(&self, class: &str, args: &[String]) -> anyhow::Result<String> {
        let Some(classpath) = &self.kafka_classpath else {
            bail!("no --kafka-classpath");
        };
        let output = tokio::process::Command::new("java")
            .args([
                "-Xmx512M",
                "-server",
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
                "-XX:InitiatingHeapOccupancyPercent=35",
                "-XX:+ExplicitGCInvokesConcurrent",
                "-Djava.awt.headless=true",
            ])
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.kafka_tools_log4j
            ))
            .arg("-cp")
            .arg(classpath)
            .arg(class)
            .args(args)
            .output()
            .await
            .context("running java")?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!(
                "{class} failed ({}): {}{}",
                output.status,
                stdout,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(stdout)
    }

    /// Whether the perf tools are to run.
    pub fn enabled(&self) -> bool {
        self.kafka_classpath.is_some()
    }

    /// kafka-producer-perf-test: `n` records of `size` bytes into `topic` (which must exist),
    /// unthrottled, with the settings of agentbus's producer that matter (acks=all, idempotent).
    pub async fn producer_perf(
        &self,
        brokers: &str,
        topic: &str,
        n: usize,
        size: usize,
    ) -> anyhow::Result<ProducerPerf> {
        let out = self
            .java(
                "org.apache.kafka.tools.ProducerPerformance",
                &[
                    "--topic".into(),
                    topic.into(),
                    "--num-records".into(),
                    n.to_string(),
                    "--record-size".into(),
                    size.to_string(),
                    "--throughput".into(),
                    "-1".into(),
                    "--producer-props".into(),
                    format!("bootstrap.servers={brokers}"),
                    "acks=all".into(),
                    "enable.idempotence=true".into(),
                ],
            )
            .await?;
        parse_producer_perf(&out)
    }

    /// kafka-consumer-perf-test: the first `n` records of `topic`, in a new group.
    pub async fn consumer_perf(
        &self,
        brokers: &str,
        topic: &str,
        n: usize,
    ) -> anyhow::Result<ConsumerPerf> {
        let out = self
            .java(
                "org.apache.kafka.tools.ConsumerPerformance",
                &[
                    "--bootstrap-server".into(),
                    brokers.into(),
                    "--topic".into(),
                    topic.into(),
                    "--messages".into(),
                    n.to_string(),
                    "--group".into(),
                    format!("bench-perf-{}", uuid::Uuid::new_v4().simple()),
                    "--timeout".into(),
                    "60000".into(),
                ],
            )
            .await?;
        parse_consumer_perf(&out)
    }
}

/// The summary line: `50000 records sent, 24757.1 records/sec (7.08 MB/sec), ...`.
pub fn parse_producer_perf(out: &str) -> anyhow::Result<ProducerPerf> {
    let line = out
        .lines()
        .rev()
        .find(|l| l.contains(" records sent, ") && l.contains(" records/sec ("))
        .with_context(|| format!("no summary line in kafka-producer-perf-test's output: {out}"))?;
    let number_before = |marker: &str| -> anyhow::Result<f64> {
        let end = line
            .find(marker)
            .with_context(|| format!("no {marker:?} in {line:?}"))?;
        let start = line[..end].rfind([' ', '(']).map_or(0, |i| i + 1);
        line[start..end]
            .parse()
            .with_context(|| format!("reading the number before {marker:?} in {line:?}"))
    };
    Ok(ProducerPerf {
        records_per_sec: number_before(" records/sec")?,
        mb_per_sec: number_before(" MB/sec")?,
    })
}

/// The header line `start.time, end.time, data.consumed.in.MB, MB.sec, ...` and the line of
/// values after it.
pub fn parse_consumer_perf(out: &str) -> anyhow::Result<ConsumerPerf> {
    let mut lines = out.lines().skip_while(|l| !l.starts_with("start.time"));
    let header = lines
        .next()
        .with_context(|| format!("no header in kafka-consumer-perf-test's output: {out}"))?;
    let values = lines
        .next()
        .with_context(|| format!("no values in kafka-consumer-perf-test's output: {out}"))?;
    let fields: HashMap<&str, &str> = header
        .split(',')
        .map(str::trim)
        .zip(values.split(',').map(str::trim))
        .collect();
    let get = |name: &str| -> anyhow::Result<f64> {
        fields
            .get(name)
            .with_context(|| format!("no {name} in {header:?}"))?
            .parse()
            .with_context(|| format!("{name} in {values:?}"))
    };
    let read = get("data.consumed.in.nMsg")?;
    if read == 0.0 {
        bail!("kafka-consumer-perf-test read nothing: {out}");
    }
    Ok(ConsumerPerf {
        records_per_sec: get("nMsg.sec")?,
        mb_per_sec: get("MB.sec")?,
        fetch_records_per_sec: get("fetch.nMsg.sec")?,
        fetch_mb_per_sec: get("fetch.MB.sec")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_producer_summary() {
        let out = "20000 records sent, 22675.7 records/sec (6.49 MB/sec), 281.67 ms avg latency, 515.00 ms max latency, 287 ms 50th, 366 ms 95th, 377 ms 99th, 384 ms 99.9th.\n";
        assert_eq!(
            parse_producer_perf(out).unwrap(),
            ProducerPerf {
                records_per_sec: 22675.7,
                mb_per_sec: 6.49
            }
        );
        assert!(parse_producer_perf("nothing here\n").is_err());
    }

    #[test]
    fn reads_the_consumer_summary() {
        let out = "WARN something\nstart.time, end.time, data.consumed.in.MB, MB.sec, data.consumed.in.nMsg, nMsg.sec, rebalance.time.ms, fetch.time.ms, fetch.MB.sec, fetch.nMsg.sec\n2026-12-01 16:14:08:727, 2026-12-01 16:14:09:428, 5.7220, 8.1627, 20000, 28530.6705, 536, 165, 34.6791, 121212.1212\n";
        assert_eq!(
            parse_consumer_perf(out).unwrap(),
            ConsumerPerf {
                records_per_sec: 28530.6705,
                mb_per_sec: 8.1627,
                fetch_records_per_sec: 121212.1212,
                fetch_mb_per_sec: 34.6791
            }
        );
        let none = "start.time, end.time, data.consumed.in.MB, MB.sec, data.consumed.in.nMsg, nMsg.sec, rebalance.time.ms, fetch.time.ms, fetch.MB.sec, fetch.nMsg.sec\n2026-12-01 16:14:08:727, 2026-12-01 16:14:09:428, 0.0000, 0.0000, 0, 0.0000, 536, 165, 0.0000, 0.0000\n";
        assert!(parse_consumer_perf(none).is_err());
    }
}
