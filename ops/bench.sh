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
#   ops/bench.sh soak    [agentbus-bench soak flags...]     5 000 events/s for 10 minutes, RSS every
#                        5 s (--rate, --duration, --sample; AGENTBUS_BENCH_SOAK_RATE, _DURATION)
#   ops/bench.sh scale   [agentbus-bench scale flags...]    1, 2, 3 `agentbus agent run` processes
#                        of one agent, webhook taking a fixed time per event
#   ops/bench.sh overload [agentbus-bench overload flags...] single events at twice the sustainable
#                        rate, open loop, with the publish limit and without it
#   ops/bench.sh callgrind [publish|agent]   instructions and allocations per event under
#                        valgrind --tool=callgrind; raw outputs in target/callgrind/<time>/
#   ops/bench.sh all     every one of the above in turn (AGENTBUS_BENCH_SOAK_DURATION etc. apply)
#
# `target/release/agentbus-bench <what> --help` lists every flag. AGENTBUS_BENCH_AGENTBUS=PATH
# measures another agentbus binary (say an earlier commit's release build) with this tree's
# bench, for a before/after in the same run conditions. The benchmarks run on a
# Kafka of their own (AGENTBUS_BENCH_BROKER_PORT, default 49092, data in target/bench-kafka,
# emptied at every start and stopped at the end), so that they never disturb a test broker;
# with AGENTBUS_BROKERS set, that Kafka is used instead (Kafka's jars are still installed for
# the perf tools). One benchmark at a time (flock'd). Release binaries are built first.
set -euo pipefail
cd "$(dirname "$0")/.."

benches="publish consume replay lag soak scale overload callgrind"
what=${1:-}
[ -n "$what" ] || { echo "usage: $0 ${benches// /|}|all [flags]" >&2; exit 2; }
shift
case " $benches all " in
  *" $what "*) ;;
  *) echo "unknown benchmark $what (${benches// /|}|all)" >&2; exit 2 ;;
esac

mkdir -p target
if [ -z "${AGENTBUS_BENCH_LOCKED:-}" ]; then
  exec 8>target/bench.lock
  flock 8
fi

if [ "$what" = all ]; then
  # Each in turn, each with a broker of its own; this run holds the lock for all of them.
  for b in $benches; do
    echo "=== ops/bench.sh $b ($(date -u +%H:%M:%S) UTC)"
    # One that fails (a broker that would not start) does not stop the others.
    AGENTBUS_BENCH_LOCKED=1 "$0" "$b" || { echo "=== ops/bench.sh $b failed"; failed="$failed $b"; }
  done
  [ -z "${failed:-}" ] || { echo "failed:$failed" >&2; exit 1; }
  exit 0
fi

if [ "$what" = callgrind ] && ! command -v valgrind >/dev/null; then
  echo "installing valgrind" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind; } >&2
fi

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

# `ops/bench.sh callgrind [publish|agent] [agentbus-bench callgrind flags...]` (`agent --backlog`:
# the agent works through events published before it started): the work runs in
# agentbus-bench under valgrind, counted between two marker functions (see
# src/bin/bench/callgrind.rs): part 1 start-up and warm-up (not counted), part 2 the work,
# part 3 as long idle. Instructions (Ir) and
# allocator calls are counts, the same run to run up to the idle threads' timer wake-ups
# (window 2 shows their size).
callgrind() {
  local which=(publish agent)
  case ${1:-} in publish|agent) which=("$1"); shift ;; esac
  local out
  out=target/callgrind/$(date -u +%Y%m%dT%H%M%SZ)
  mkdir -p "$out"
  for w in "${which[@]}"; do
    local n=1000 unit="events" flags=()
    [ "$w" = publish ] && { n=$((10 * 100)); unit="events (10 batches of 100)"; }
    echo "callgrind $w: valgrind --tool=callgrind, output in $out/$w.out.*"
    valgrind --tool=callgrind --callgrind-out-file="$out/$w.out" \
      --dump-before='*callgrind_dump_here*' \
      target/release/agentbus-bench callgrind "$w" --brokers "$brokers" \
      --topic-prefix "${prefix}cg-$w." --agentbus target/release/agentbus "${flags[@]}" "$@" \
      2>"$out/$w.valgrind.log" | tee "$out/$w.bench.log"
    local work idle work_allocs idle_allocs
    # The agent says how many events its window held (with --backlog, not exactly 1 000).
    if [ "$w" = agent ]; then
      n=$(sed -n 's/^callgrind agent: \([0-9]*\) events handled in the window.*/\1/p' "$out/$w.bench.log")
      [ -n "$n" ] && [ "$n" -gt 0 ] || { echo "callgrind agent: no count of events in $out/$w.bench.log" >&2; exit 1; }
    fi
    read -r work work_allocs < <(target/release/agentbus-bench callgrind-count "$out/$w.out.2")
    read -r idle idle_allocs < <(target/release/agentbus-bench callgrind-count "$out/$w.out.3")
    echo "  window: $work instructions, $work_allocs allocator calls for $n $unit"
    echo "  idle window as long: $idle instructions, $idle_allocs allocator calls"
    echo "  per event: $((work / n)) instructions ($(((work - idle) / n)) less the idle window's), $((work_allocs / n)) allocations ($(((work_allocs - idle_allocs) / n)) less idle)"
    # Inclusive: callgrind_annotate, agentbus's own functions (the thread and runtime frames
    # above them include everything). Self: from the dump itself (see callgrind::count).
    echo "  top 5 agentbus functions, inclusive (callgrind_annotate --inclusive=yes; all in $out/$w.inclusive.txt):"
    callgrind_annotate --inclusive=yes --threshold=100 "$out/$w.out.2" 2>/dev/null >"$out/$w.inclusive.txt" || true
    { grep -E '^ *[0-9,]+ ' "$out/$w.inclusive.txt" | grep 'agentbus::' | head -5 | cut -c1-180 | sed 's/^/    /'; } || true
    echo "  top 5 functions, self (all in $out/$w.self.txt):"
    target/release/agentbus-bench callgrind-count --top 40 "$out/$w.out.2" | tail -n +2 >"$out/$w.self.txt"
    head -5 "$out/$w.self.txt" | cut -c1-180 | sed 's/^/    /'
  done
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
# AGENTBUS_BENCH_AGENTBUS: another agentbus binary to measure (an earlier commit's build, for a
# before/after on the same broker in the same hour); this tree's release build by default.
agentbus_bin=${AGENTBUS_BENCH_AGENTBUS:-target/release/agentbus}
[ -x "$agentbus_bin" ] || { echo "AGENTBUS_BENCH_AGENTBUS: $agentbus_bin is not an executable" >&2; exit 2; }
echo "agentbus binary: $agentbus_bin"
case $what in publish|consume|soak|scale|overload) agentbus_flags=(--agentbus "$agentbus_bin") ;; esac
prefix="bench$(date +%s%N)."
if [ "$what" = callgrind ]; then
  callgrind "$@"
else
  target/release/agentbus-bench "$what" --brokers "$brokers" --topic-prefix "$prefix" \
    "${agentbus_flags[@]}" "${broker_flags[@]}" "$@"
fi
echo "load average $(cut -d' ' -f1-3 /proc/loadavg) after the run"
