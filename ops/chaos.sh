#!/usr/bin/env bash
# Longer chaos runs ("Nothing lost"): the scenarios of tests/chaos.rs with more load and longer
# outages, then a report of what each came to.
#
#   ops/chaos.sh              every scenario, one after the other
#   ops/chaos.sh broker       only those whose test name matches (cargo test filter):
#                             broker, sigkilled, dedup_store, did_not_write
#   ops/chaos.sh cluster [filter]
#                             the broker faults of tests/cluster.rs on a three-broker cluster
#                             of their own (ops/cluster.sh, free ports, Kafka's own fencing
#                             and heartbeat times), longer: repeated leader kills under more
#                             load, two brokers down for a while, rolling restarts; then what
#                             each measured (no shared test broker is used)
#
# Scenarios: the broker stopped and restarted under a steady publish load (an Apache Kafka of
# its own, started by ops/broker.sh on free ports and a temporary data directory, never the
# shared test broker, also when AGENTBUS_BROKERS names one; tansu with
# AGENTBUS_LOCAL_BROKER=tansu); the service
# SIGKILLed under load, restarted, and every event retried; an agent whose dedup store becomes
# unwritable (needs root: chattr +i); records agentbus did not write on a subscribed topic.
#
# Knobs (environment; defaults here, the tests' own defaults are shorter):
#   CHAOS_BROKER_RATE=50     events/s while the broker is stopped and restarted
#   CHAOS_BEFORE_SECS=10     load before the broker stops
#   CHAOS_DOWN_SECS=20       how long the broker stays down
#   CHAOS_AFTER_SECS=15      load after it is started again
#   CHAOS_RECOVERY_SECS=60   then, how long to wait for a publish to succeed again
#   CHAOS_KILL_RATE=400      events/s before the service is SIGKILLed
#   CHAOS_KILL_AFTER_SECS=10 load before the kill
#   CHAOS_AGENT_EVENTS=200   events before and after the dedup store breaks
#   CHAOS_STRICT=1           also fail when a retry wrote an unanswered event a second time
#   CHAOS_RELEASE=1          build the service and the tests with --release
#
# The report: per load scenario, events sent, acknowledged (200), refused, unanswered, found
# in Kafka, acknowledged but missing (must be 0) and records written twice; then every
# scenario's detail line. Exits non-zero when a test failed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$HOME/.cargo/bin:$PATH

# The cluster scenarios. Knobs (the tests' own defaults are shorter):
#   CLUSTER_SESSION_TIMEOUT_MS=9000  broker.session.timeout.ms (Kafka's default): how long a
#                                    SIGKILLed broker stays leader before it is fenced
#   CLUSTER_HEARTBEAT_MS=2000        broker.heartbeat.interval.ms (Kafka's default)
#   CLUSTER_RATE=400                 events/s while leaders are SIGKILLed
#   CLUSTER_KILLS=3                  leaders killed (and restarted) one after another
#   CLUSTER_BEFORE_SECS=10           load before each kill
#   CLUSTER_AFTER_SECS=5             load after the new leader, and after the restart
#   CLUSTER_PUBLISH_TIMEOUT_SECS=20  the publish timeout then (above the fencing time)
#   CLUSTER_SHORT_TIMEOUT_SECS=5     the publish timeout with two brokers down (the default)
#   CLUSTER_DOWN_SECS=20             how long two brokers stay down (20 events/s meanwhile)
#   CLUSTER_RECOVERY_SECS=120        how long a publish may take to succeed again
#   CLUSTER_AGENT_RATE=100           events/s to the two agent processes
#   CLUSTER_ROLLING_ROUNDS=2         rolling restarts of all three brokers
if [ "${1:-}" = cluster ]; then
  shift
  export CLUSTER_SESSION_TIMEOUT_MS=${CLUSTER_SESSION_TIMEOUT_MS:-9000}
  export CLUSTER_HEARTBEAT_MS=${CLUSTER_HEARTBEAT_MS:-2000}
  export CLUSTER_RATE=${CLUSTER_RATE:-400}
  export CLUSTER_KILLS=${CLUSTER_KILLS:-3}
  export CLUSTER_BEFORE_SECS=${CLUSTER_BEFORE_SECS:-10}
  export CLUSTER_AFTER_SECS=${CLUSTER_AFTER_SECS:-5}
  export CLUSTER_PUBLISH_TIMEOUT_SECS=${CLUSTER_PUBLISH_TIMEOUT_SECS:-20}
  export CLUSTER_SHORT_TIMEOUT_SECS=${CLUSTER_SHORT_TIMEOUT_SECS:-5}
  export CLUSTER_DOWN_SECS=${CLUSTER_DOWN_SECS:-20}
  export CLUSTER_RECOVERY_SECS=${CLUSTER_RECOVERY_SECS:-120}
  export CLUSTER_AGENT_RATE=${CLUSTER_AGENT_RATE:-100}
  export CLUSTER_ROLLING_ROUNDS=${CLUSTER_ROLLING_ROUNDS:-2}
  (unset AGENTBUS_BROKERS; ops/broker.sh install)
  log=$(mktemp)
  trap 'rm -f "$log"' EXIT
  profile=()
  [ -n "${CHAOS_RELEASE:-}" ] && profile=(--release)
  status=0
  cargo test "${profile[@]}" --test cluster "$@" -- --nocapture --test-threads=1 2>&1 | tee "$log" || status=$?
  echo
  echo "cluster chaos report (broker.session.timeout.ms=$CLUSTER_SESSION_TIMEOUT_MS)"
  sed -n 's/.*CLUSTER \([a-z-]*:.*\)/\1/p' "$log" | sed 's/ \([a-z_]*=\)/\n    \1/g'
  echo
  grep -E '^test result:' "$log" || true
  failed=$(grep -E '^    [a-z0-9_]+$' "$log" | sort -u || true)
  [ -n "$failed" ] && printf 'failed:\n%s\n' "$failed"
  exit $status
fi

export CHAOS_BROKER_RATE=${CHAOS_BROKER_RATE:-50}
export CHAOS_BEFORE_SECS=${CHAOS_BEFORE_SECS:-10}
export CHAOS_DOWN_SECS=${CHAOS_DOWN_SECS:-20}
export CHAOS_AFTER_SECS=${CHAOS_AFTER_SECS:-15}
export CHAOS_RECOVERY_SECS=${CHAOS_RECOVERY_SECS:-60}
export CHAOS_KILL_RATE=${CHAOS_KILL_RATE:-400}
export CHAOS_KILL_AFTER_SECS=${CHAOS_KILL_AFTER_SECS:-10}
export CHAOS_AGENT_EVENTS=${CHAOS_AGENT_EVENTS:-200}

# The shared test broker (the scenarios that do not stop a broker use it), as ops/test.sh.
export AGENTBUS_TEST_BROKER_PORT=${AGENTBUS_TEST_BROKER_PORT:-19092}
export AGENTBUS_TEST_DATA_DIR=${AGENTBUS_TEST_DATA_DIR:-$PWD/target/test-data}
broker() {
  AGENTBUS_BROKER_PORT=$AGENTBUS_TEST_BROKER_PORT \
    AGENTBUS_BROKER_CONTROLLER_PORT=${AGENTBUS_TEST_BROKER_CONTROLLER_PORT:-$((AGENTBUS_TEST_BROKER_PORT + 1))} \
    AGENTBUS_DATA_DIR=$AGENTBUS_TEST_DATA_DIR ops/broker.sh "$@"
}
# Kafka's jars for the scenarios' own brokers, also when the shared one is external.
if [ "${AGENTBUS_LOCAL_BROKER:-kafka}" = kafka ]; then
  (unset AGENTBUS_BROKERS; ops/broker.sh install)
fi
started_broker=
if [ -z "${AGENTBUS_BROKERS:-}" ] && ! broker status >/dev/null 2>&1; then
  started_broker=1
fi
echo "broker: $(broker start)"
log=$(mktemp)
cleanup() {
  rm -f "$log"
  if [ -n "$started_broker" ]; then broker stop; fi
}
trap cleanup EXIT

profile=()
[ -n "${CHAOS_RELEASE:-}" ] && profile=(--release)
status=0
cargo test "${profile[@]}" --test chaos "$@" -- --nocapture --test-threads=1 2>&1 | tee "$log" || status=$?

# With --nocapture a test's lines can follow its "test ... " line: take them from anywhere.
echo
echo "chaos report"
sed -n 's/.*\(CHAOS-ROW .*\)/\1/p' "$log" | awk '
  BEGIN { printf "%-16s %8s %8s %8s %10s %8s %8s %10s\n", "scenario", "sent", "acked", "refused", "unanswered", "found", "missing", "duplicates" }
  { printf "%-16s %8s %8s %8s %10s %8s %8s %10s\n", $2, $3, $4, $5, $6, $7, $8, $9 }
'
echo
sed -n 's/.*CHAOS \([a-z-]* *[a-z]*:.*\)/\1/p' "$log"
echo
grep -E '^test result:' "$log" || true
failed=$(grep -E '^    [a-z0-9_]+$' "$log" | sort -u || true)
[ -n "$failed" ] && printf 'failed:\n%s\n' "$failed"
exit $status
