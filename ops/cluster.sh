#!/usr/bin/env bash
# A three-broker Apache Kafka cluster on this machine, for trying agentbus on a cluster and for
# the broker-fault tests (tests/cluster.rs, ops/chaos.sh cluster): three KRaft nodes, each a
# broker and a controller in one process (static controller.quorum.voters, one cluster id
# formatted on all three), of the Kafka ops/broker.sh installs (the version pinned in
# ops/kafka/pom.xml), on 127.0.0.1 with ports and data directories of their own.
#
#   ops/cluster.sh start       install Kafka if missing, start every node that is not running,
#                              wait until all three answer and the cluster has 3 brokers;
#                              prints the bootstrap servers (idempotent: running nodes are
#                              kept; one caller at a time, flock'd)
#   ops/cluster.sh stop        clean shutdown (SIGTERM) of every node
#   ops/cluster.sh status      each node's state (up, starting, down) and the brokers the
#                              cluster has; exit 0 when all three are up
#   ops/cluster.sh kill N      SIGKILL node N (1, 2 or 3)
#   ops/cluster.sh stop N      clean shutdown of node N only
#   ops/cluster.sh restart N   start node N again (after a kill or a stop; a running node is
#                              shut down cleanly first) and wait until it answers and is one
#                              of the cluster's brokers again
#   ops/cluster.sh wait-isr    wait until no partition is under-replicated (every replica
#                              back in its ISR), e.g. between the steps of a rolling restart
#   ops/cluster.sh bootstrap   print the bootstrap servers (nothing started)
#   ops/cluster.sh tool CLASS ARGS...
#                              one of Kafka's tools, as ops/broker.sh tool
#
# Every topic gets replication factor 3 and min.insync.replicas=2 unless created otherwise
# (agentbus sets both itself, from the number of brokers), the internal topics (consumer
# offsets, transaction state, share-group state) too; topics are never created on first use.
#
# Settings:
#   AGENTBUS_DATA_DIR            default ./data; the nodes keep their data in
#                                $AGENTBUS_DATA_DIR/cluster/node{1,2,3}
#   AGENTBUS_CLUSTER_PORT        the base port, default 39092: node N's PLAINTEXT listener is
#                                base + 2(N-1), its controller the port after it (39092/39093,
#                                39094/39095, 39096/39097)
#   AGENTBUS_CLUSTER_HEAP        each node's JVM heap, default 384m
#   AGENTBUS_CLUSTER_JAVA_OPTS   more JVM options for every node (split on blanks)
#   AGENTBUS_CLUSTER_EXTRA_CONFIG a file of server.properties lines appended to every node's
#                                generated ones (a later line wins), e.g.
#                                broker.session.timeout.ms=4000 for a faster fencing
#   AGENTBUS_CLUSTER_START_TIMEOUT seconds to wait for the nodes, default 120
#   AGENTBUS_BROKER_CACHE        where Kafka's jars are, as for ops/broker.sh
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=ops/kafka/lib.sh
. "$root/ops/kafka/lib.sh"

data_dir=${AGENTBUS_DATA_DIR:-$root/data}
case $data_dir in /*) ;; *) data_dir=$root/$data_dir ;; esac
dir=$data_dir/cluster
base=${AGENTBUS_CLUSTER_PORT:-39092}
heap=${AGENTBUS_CLUSTER_HEAP:-384m}
nodes="1 2 3"

port_of() { echo $((base + 2 * ($1 - 1))); }
cport_of() { echo $((base + 2 * ($1 - 1) + 1)); }
addr_of() { echo "127.0.0.1:$(port_of "$1")"; }
node_dir() { echo "$dir/node$1"; }
bootstrap() {
  local n out=
  for n in $nodes; do out=${out:+$out,}$(addr_of "$n"); done
  echo "$out"
}
voters() {
  local n out=
  for n in $nodes; do out=${out:+$out,}$n@127.0.0.1:$(cport_of "$n"); done
  echo "$out"
}

check_node() {
  case ${1:-} in
    1 | 2 | 3) ;;
    *) echo "a node is 1, 2 or 3, not '${1:-}'" >&2; exit 2 ;;
  esac
}

# Node $1 runs: the pid in its pid file is alive and is the node of this directory (not a
# process that reused the pid).
running() {
  local pidfile pid
  pidfile=$(node_dir "$1")/node.pid
  [ -f "$pidfile" ] || return 1
  pid=$(cat "$pidfile")
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$(node_dir "$1")/server.properties"
}

pid_of() { cat "$(node_dir "$1")/node.pid"; }

write_config() {
  local n=$1 d
  d=$(node_dir "$n")
  cat >"$d/server.properties" <<EOF
# Written by ops/cluster.sh: node $n of three (broker and controller in one process).
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$(voters)
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://$(addr_of "$n"),CONTROLLER://127.0.0.1:$(cport_of "$n")
# Never 0.0.0.0 or empty: that would advertise the host name.
advertised.listeners=PLAINTEXT://$(addr_of "$n")
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$d/logs
# As on a production cluster: three replicas, a write acknowledged (acks=all) once two have
# it, so that one broker may be lost at any time without losing or refusing writes.
default.replication.factor=3
min.insync.replicas=2
offsets.topic.replication.factor=3
# Fewer offsets partitions than the default 50: created at the first group join, faster.
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
# Groups start at once instead of waiting 3 s for more members.
group.initial.rebalance.delay.ms=0
# agentbus creates its topics itself, a typo must not create one.
auto.create.topics.enable=false
num.partitions=1
# Tests make many topics; segment files stay small.
log.segment.bytes=67108864
log.retention.check.interval.ms=60000
EOF
  if [ -n "${AGENTBUS_CLUSTER_EXTRA_CONFIG:-}" ]; then
    {
      echo "# From $AGENTBUS_CLUSTER_EXTRA_CONFIG"
      cat "$AGENTBUS_CLUSTER_EXTRA_CONFIG"
    } >>"$d/server.properties"
  fi
}

cluster_id() {
  if [ ! -f "$dir/cluster.id" ]; then
    random_cluster_id >"$dir/cluster.id.tmp"
    mv "$dir/cluster.id.tmp" "$dir/cluster.id"
  fi
}

# Writes node $1's configuration and, the first time, formats its storage with the
# cluster's id.
prepare_node() {
  local n=$1 d
  d=$(node_dir "$n")
  mkdir -p "$d"
  write_config "$n"
  if [ ! -f "$d/logs/meta.properties" ]; then
    # Static voters: no --standalone or --initial-controllers, the same id on every node.
    tool kafka.tools.StorageTool format -t "$(cat "$dir/cluster.id")" -c "$d/server.properties" \
      >>"$d/node.log" 2>&1 || {
      echo "formatting node $n failed; last lines of $d/node.log:" >&2
      tail -20 "$d/node.log" >&2
      exit 1
    }
  fi
}

# Starts node $1 (not waiting for it).
launch_node() {
  local n=$1 d
  d=$(node_dir "$n")
  # Readiness is this line once more in the server log (see wait_for).
  grep -c "Kafka Server started" "$d/server.log" 2>/dev/null >"$d/started.count" || true
  # shellcheck disable=SC2046
  (exec setsid java $(java_opts "$heap") ${AGENTBUS_CLUSTER_JAVA_OPTS:-} \
    -Dkafka.logs.dir="$d" \
    -Dlog4j2.configurationFile="$root/ops/kafka/log4j2.properties" \
    -cp "$libs/*" kafka.Kafka "$d/server.properties" \
    </dev/null >>"$d/node.log" 2>&1 9>&-) &
  echo $! >"$d/node.pid"
}

# The ids of the brokers the cluster's metadata lists (the live, unfenced ones), one a line,
# as node $1 answers; nothing when it does not answer.
brokers_seen_by() {
  timeout 20 java -Xmx64m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile="$root/ops/kafka/log4j2-tools.properties" \
    -cp "$libs/*" org.apache.kafka.tools.BrokerApiVersionsCommand \
    --bootstrap-server "$(addr_of "$1")" 2>/dev/null |
    sed -n 's/^[^ ]* (id: \([0-9]*\) .*/\1/p' | sort -u || true
}

# Node $1 finished its start: KafkaRaftServer logs "Kafka Server started" (INFO, kept by
# ops/kafka/log4j2.properties) once its broker is unfenced, i.e. registered with the quorum
# and caught up with the metadata; once more than before its last start. Cheaper than a
# metadata request, which costs a JVM start per probe.
started() {
  local d before now
  d=$(node_dir "$1")
  before=$(cat "$d/started.count" 2>/dev/null || echo 0)
  now=$(grep -c "Kafka Server started" "$d/server.log" 2>/dev/null || true)
  [ "${now:-0}" -gt "${before:-0}" ] && port_open_at "$(port_of "$1")"
}

# Waits until every node in $@ has started (and is a broker of the cluster).
wait_for() {
  local started=$SECONDS limit=${AGENTBUS_CLUSTER_START_TIMEOUT:-120} n pending
  while [ $((SECONDS - started)) -lt "$limit" ]; do
    pending=
    for n in "$@"; do
      if ! running "$n" && ! kill -0 "$(pid_of "$n")" 2>/dev/null; then
        echo "node $n exited; last lines of $(node_dir "$n")/node.log and server.log:" >&2
        tail -20 "$(node_dir "$n")/node.log" >&2
        tail -20 "$(node_dir "$n")/server.log" >&2 2>/dev/null || true
        exit 1
      fi
      started "$n" || pending="$pending $n"
    done
    if [ -z "$pending" ]; then
      return 0
    fi
    sleep 0.2
  done
  echo "node(s)$pending did not join the cluster within $limit s; see $dir/node*/server.log" >&2
  exit 1
}

lock() {
  mkdir -p "$dir"
  exec 9>"$dir/.lock"
  flock 9
}

start() {
  install_kafka
  lock
  local n todo=() pids=()
  cluster_id
  for n in $nodes; do
    if ! running "$n"; then
      if port_open_at "$(port_of "$n")"; then
        echo "something not started by this script listens on $(addr_of "$n")" >&2
        exit 1
      fi
      todo+=("$n")
    fi
  done
  # The formats in parallel (a JVM each), then the nodes.
  for n in "${todo[@]}"; do
    prepare_node "$n" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  for n in "${todo[@]}"; do launch_node "$n"; done
  # shellcheck disable=SC2086
  wait_for $nodes
  # The cluster's metadata lists all three (one request: a JVM start).
  local since=$SECONDS
  until [ "$(brokers_seen_by 1 | wc -l)" -eq 3 ]; do
    if [ $((SECONDS - since)) -gt "${AGENTBUS_CLUSTER_START_TIMEOUT:-120}" ]; then
      echo "the cluster does not list three brokers: $(brokers_seen_by 1 | tr '\n' ' ')" >&2
      exit 1
    fi
    sleep 0.5
  done
  bootstrap
}

# SIGTERM (a controlled shutdown: its partitions' leadership moves first), then SIGKILL if it
# takes more than a minute.
stop_node() {
  local n=$1 pid
  running "$n" || { rm -f "$(node_dir "$n")/node.pid"; return 0; }
  pid=$(pid_of "$n")
  kill "$pid"
  for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$(node_dir "$n")/node.pid"
}

stop() {
  [ -d "$dir" ] || return 0
  lock
  local n pids=()
  # All at once: a node that waits for its controlled shutdown needs the others' quorum.
  for n in $nodes; do
    stop_node "$n" &
    pids+=($!)
  done
  wait "${pids[@]}"
}

kill_node() {
  check_node "$1"
  lock
  if running "$1"; then
    kill -9 "$(pid_of "$1")"
    # Gone (its ports free) before this returns.
    while kill -0 "$(pid_of "$1")" 2>/dev/null; do sleep 0.05; done
  fi
  rm -f "$(node_dir "$1")/node.pid"
}

restart_node() {
  check_node "$1"
  [ -f "$dir/cluster.id" ] || { echo "no cluster in $dir: ops/cluster.sh start first" >&2; exit 1; }
  install_kafka
  lock
  stop_node "$1"
  prepare_node "$1"
  launch_node "$1"
  wait_for "$1"
  bootstrap
}

status() {
  local n state all=0 seen=
  for n in $nodes; do
    if running "$n"; then
      if kafka_answers "$(addr_of "$n")"; then
        state="up (pid $(pid_of "$n"))"
        [ -n "$seen" ] || seen=$(brokers_seen_by "$n" | tr '\n' ' ')
      else
        state="starting (pid $(pid_of "$n"))"
        all=1
      fi
    else
      state=down
      all=1
    fi
    printf 'node %s  %-16s  %s\n' "$n" "$(addr_of "$n")" "$state"
  done
  echo "brokers in the cluster: ${seen:-none answer}"
  return $all
}

wait_isr() {
  local since=$SECONDS out
  while :; do
    out=$(tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$(bootstrap)" \
      --describe --under-replicated-partitions 2>/dev/null) && [ -z "$out" ] && return 0
    if [ $((SECONDS - since)) -gt "${AGENTBUS_CLUSTER_START_TIMEOUT:-120}" ]; then
      echo "still under-replicated:" >&2
      echo "$out" >&2
      exit 1
    fi
    sleep 1
  done
}

case ${1:-} in
  start) start ;;
  stop) if [ -n "${2:-}" ]; then check_node "$2"; lock; stop_node "$2"; else stop; fi ;;
  status) status ;;
  kill) kill_node "${2:-}" ;;
  restart) restart_node "${2:-}" ;;
  wait-isr) install_kafka; wait_isr ;;
  bootstrap) bootstrap ;;
  tool) shift; tool "$@" ;;
  *) echo "usage: $0 start|stop [N]|status|kill N|restart N|wait-isr|bootstrap|tool CLASS ARGS..." >&2; exit 2 ;;
esac
