#!/usr/bin/env bash
# Benchmarks on Apache Kafka, each against baselines in the same run on the same broker: raw
# librdkafka and, for publish and consume, Kafka's own perf tools (kafka-producer-perf-test,
# kafka-consumer-perf-test, from the jars ops/broker.sh installs). Every round has topics of
# its own (and its own `agentbus serve`); the summaries are medians over the rounds and every
# ratio is printed.
#
#   ops/bench.sh publish [agentbus-bench publish flags...]  raw, raw with headers, perf tool,
#                        agentbus HTTP batches; then single-event latency
#   ops/bench.sh consume [agentbus-bench consume flags...]  throughput (raw, perf tool, no-op
#                        agent), then publish-to-handler latency at 100, 200, 500 events/s
#   ops/bench.sh replay  [agentbus-bench replay flags...]   replay vs a raw consume-and-produce copy
#   ops/bench.sh lag     [agentbus-bench lag flags...]      lag collections, 50 groups x 16 partitions
#   ops/bench.sh soak    [agentbus-bench soak flags...]     steady load (2 minutes; --duration 10m)
#   ops/bench.sh scale   [agentbus-bench scale flags...]    1, 2, 3 `agentbus agent run` processes
#                        of one agent, webhook taking a fixed time per event
#
# `target/release/agentbus-bench <what> --help` lists every flag. The benchmarks run on a
# Kafka of their own (AGENTBUS_BENCH_BROKER_PORT, default 49092, data in target/bench-kafka,
# emptied at every start and stopped at the end), so that they never disturb a test broker;
# with AGENTBUS_BROKERS set, that Kafka is used instead (Kafka's jars are still installed for
# the perf tools). One benchmark at a time (flock'd). Release binaries are built first.
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-}
[ -n "$what" ] || { echo "usage: $0 publish|consume|replay|lag|soak|scale [flags]" >&2; exit 2; }
shift
case $what in
  publish|consume|replay|lag|soak|scale) ;;
  *) echo "unknown benchmark $what (publish|consume|replay|lag|soak|scale)" >&2; exit 2 ;;
esac

mkdir -p target
exec 8>target/bench.lock
flock 8

own_broker=
[ -z "${AGENTBUS_BROKERS:-}" ] && own_broker=1
# Only the broker's settings; AGENTBUS_DATA_DIR and the port never reach the benchmark's own
# agentbus processes, which get their own.
broker() {
  AGENTBUS_DATA_DIR=$PWD/target/bench-kafka AGENTBUS_BROKER_PORT=${AGENTBUS_BENCH_BROKER_PORT:-49092} \
    ops/broker.sh "$@"
}
stop_broker() {
  [ -n "$own_broker" ] && broker stop
  return 0
}

cargo build --release --quiet --bin agentbus --bin agentbus-bench
AGENTBUS_BENCH_KAFKA_CLASSPATH=$(broker classpath)
export AGENTBUS_BENCH_KAFKA_CLASSPATH

if [ -n "$own_broker" ]; then
  broker stop
  rm -rf target/bench-kafka
  trap stop_broker EXIT
fi
started=$SECONDS
brokers=$(broker start)
broker_flags=()
if [ -n "$own_broker" ]; then
  echo "own Kafka broker at $brokers (started in $((SECONDS - started)) s), data in target/bench-kafka"
  [ "$what" = consume ] && broker_flags=(--broker-pid "$(cat target/bench-kafka/kafka/broker.pid)")
else
  echo "Kafka at $brokers (AGENTBUS_BROKERS)"
fi
echo "$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) before the run"

agentbus_flags=()
case $what in publish|consume|soak|scale) agentbus_flags=(--agentbus target/release/agentbus) ;; esac
prefix="bench$(date +%s%N)."
target/release/agentbus-bench "$what" --brokers "$brokers" --topic-prefix "$prefix" \
  "${agentbus_flags[@]}" "${broker_flags[@]}" "$@"
echo "load average $(cut -d' ' -f1-3 /proc/loadavg) after the run"
