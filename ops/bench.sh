#!/usr/bin/env bash
# Benchmarks, each against a raw librdkafka baseline in the same run (on the same broker, or for
# the consume latency rounds on a fresh broker of the same kind for each side).
#
#   ops/bench.sh publish [agentbus-bench publish flags...]
#   ops/bench.sh consume [agentbus-bench consume flags...]  throughput, then latency per rate and side,
#                        each on a fresh broker (the script sets --part, --rate and --rounds itself)
#   ops/bench.sh replay  [agentbus-bench replay flags...]   replay vs a raw consume-and-produce copy
#   ops/bench.sh lag     [agentbus-bench lag flags...]      one lag collection, 50 groups x 16 partitions
#   ops/bench.sh soak    [agentbus-bench soak flags...]     steady load for 10 minutes, memory sampled
#
# Starts the local broker (or uses AGENTBUS_BROKERS), builds release binaries, starts
# `agentbus serve` on a free port with its own topic prefix and data directory, runs the load
# generator, and prints both rates, the ratio, single-event latency and the service's peak
# memory (VmHWM). When the local broker fails during a run, its first panic is printed.
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-}
[ -n "$what" ] || { echo "usage: $0 publish|consume|replay|lag|soak [flags]" >&2; exit 2; }
shift

own_broker=
[ -z "${AGENTBUS_BROKERS:-}" ] && own_broker=1
if [ -n "$own_broker" ]; then
  export AGENTBUS_BROKER_PORT=${AGENTBUS_BENCH_BROKER_PORT:-19192}
  export AGENTBUS_DATA_DIR=$PWD/target/bench-data
fi
cargo build --release --quiet --bin agentbus --bin agentbus-bench

# A fresh broker of its own for every run (unless AGENTBUS_BROKERS), so figures do not depend
# on what earlier runs left in it.
fresh_broker() {
  if [ -n "$own_broker" ]; then
    ops/broker.sh stop
    rm -rf "$AGENTBUS_DATA_DIR/tansu"
  fi
  brokers=$(ops/broker.sh start)
  broker_failed=
  prefix="bench$(date +%s%N)."
  broker_pid=()
  [ -n "$own_broker" ] && broker_pid=(--broker-pid "$(cat "$AGENTBUS_DATA_DIR/tansu/tansu.pid")")
  return 0
}

work=
pid=
broker_failed=
stop_all() {
  if [ -n "$own_broker" ] && [ -z "$broker_failed" ] && grep -q panicked "$AGENTBUS_DATA_DIR/tansu/tansu.log" 2>/dev/null; then
    broker_failed=1
    echo "the broker failed during the run: $(grep -m1 -A1 panicked "$AGENTBUS_DATA_DIR/tansu/tansu.log" | tr '\n' ' ')"
  fi
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  pid=
  [ -n "$work" ] && rm -rf "$work"
  work=
  if [ -n "$own_broker" ]; then ops/broker.sh stop; fi
  return 0
}
trap stop_all EXIT

# `agentbus serve` (no agents) on a free port against the fresh broker.
start_service() {
  work=$(mktemp -d)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  AGENTBUS_BROKERS=$brokers AGENTBUS_HTTP_ADDR=127.0.0.1:$port AGENTBUS_DATA_DIR=$work \
    AGENTBUS_TOPIC_PREFIX=$prefix AGENTBUS_LOG=warn AGENTBUS_SCHEMAS_DIR=schemas \
    AGENTBUS_CONSUMERS_DIR=$work/no-agents target/release/agentbus serve &
  pid=$!
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
    sleep 0.1
  done
  curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || { echo "agentbus did not become ready" >&2; exit 1; }
  echo "broker $brokers, agentbus pid $pid on 127.0.0.1:$port, $(nproc) cores"
}

peak_memory() {
  echo "agentbus peak memory (VmHWM): $(awk '/VmHWM/ {printf "%.1f MiB", $2/1024}' /proc/$pid/status)"
}

case $what in
  replay|lag)
    # No running service needed.
    fresh_broker
    echo "broker $brokers, $(nproc) cores"
    target/release/agentbus-bench "$what" --brokers "$brokers" --topic-prefix "$prefix" "$@"
    ;;
  publish)
    fresh_broker
    start_service
    target/release/agentbus-bench publish --brokers "$brokers" --url "http://127.0.0.1:$port" --service-pid "$pid" "$@"
    peak_memory
    ;;
  soak)
    fresh_broker
    start_service
    target/release/agentbus-bench soak --url "http://127.0.0.1:$port" --service-pid "$pid" "$@"
    peak_memory
    ;;
  consume)
    # tansu slows as its database grows, and after a round at 500 events/s the next one on
    # the same broker suffers whichever side it is: so every run gets a fresh broker of its
    # own: the throughput runs, then at each rate (AGENTBUS_BENCH_RATES) a latency round of
    # the raw baseline (a) and one of agentbus (b), AGENTBUS_BENCH_ROUNDS times. tansu 0.6's
    # storage sometimes dies under such load (with raw clients too): a run that failed with
    # the broker is run once more on a fresh broker, and the output says so. The script fails
    # when a run failed for any other reason, or twice.
    parts=(throughput)
    failed_runs=0
    for rate in ${AGENTBUS_BENCH_RATES:-100 200 500}; do
      for _ in $(seq 1 "${AGENTBUS_BENCH_ROUNDS:-1}"); do
        parts+=("latency:$rate:a" "latency:$rate:b")
      done
    done
    for part in "${parts[@]}"; do
      IFS=: read -r kind rate side <<<"$part"
      flags=(--part "$kind")
      [ "$kind" = latency ] && flags+=(--rate "$rate" --rounds "$side")
      for attempt in 1 2; do
        fresh_broker
        start_service
        ok=
        if target/release/agentbus-bench consume "${flags[@]}" --brokers "$brokers" --topic-prefix "$prefix" \
          --url "http://127.0.0.1:$port" --agentbus target/release/agentbus --service-pid "$pid" \
          "${broker_pid[@]}" "$@"; then
          ok=1
        fi
        peak_memory
        stop_all
        [ -n "$ok" ] && break
        if [ -z "$broker_failed" ] || [ "$attempt" = 2 ]; then
          echo "the $part run failed (see above)" >&2
          failed_runs=$((failed_runs + 1))
          break
        fi
        echo "attempt $attempt of the $part run failed with the broker; once more on a fresh broker"
      done
    done
    [ "$failed_runs" = 0 ] || exit 1
    ;;
  *) echo "unknown benchmark $what" >&2; exit 2 ;;
esac
