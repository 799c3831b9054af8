#!/usr/bin/env bash
# The local broker for development, tests and benchmarks: Apache Kafka (one KRaft node, broker
# and controller in one process) installed from Maven Central, or tansu 0.6.0 on machines
# without Java (AGENTBUS_LOCAL_BROKER=tansu).
#
#   ops/broker.sh start     install the broker if missing, start it, wait until a metadata
#                           request answers; prints the bootstrap address (idempotent: a
#                           running broker is reused; one starter at a time, flock'd)
#   ops/broker.sh stop      stop the broker this script started
#   ops/broker.sh status    print the address and exit 0 when it answers, exit 1 otherwise
#   ops/broker.sh install   only install (Kafka's jars into the cache, or tansu)
#   ops/broker.sh tool CLASS ARGS...
#                           run one of Kafka's own tools from the same jars, e.g.
#                           org.apache.kafka.tools.consumer.group.ConsumerGroupCommand
#   ops/broker.sh classpath print the classpath of Kafka's jars
#
# With AGENTBUS_BROKERS set, nothing is started: that Kafka is used and its address printed.
# Settings:
#   AGENTBUS_LOCAL_BROKER       kafka (default) or tansu
#   AGENTBUS_DATA_DIR           default ./data; the broker keeps its data in $AGENTBUS_DATA_DIR/kafka
#                               (or /tansu)
#   AGENTBUS_BROKER_PORT        the PLAINTEXT listener, default 9092; the controller listens on
#                               AGENTBUS_BROKER_CONTROLLER_PORT (default the port + 1)
#   AGENTBUS_BROKER_LISTENERS   more listeners beside PLAINTEXT, each NAME://127.0.0.1:PORT,
#                               comma-separated (NAME: SSL, SASL_SSL or SASL_PLAINTEXT, or any
#                               name mapped in the extra config); also advertised
#   AGENTBUS_BROKER_EXTRA_CONFIG a file of server.properties lines appended to the generated ones
#                               (TLS keystores, SASL mechanisms; a later line wins)
#   AGENTBUS_BROKER_FORMAT_ARGS extra arguments to the storage format, split on blanks, never
#                               globbed (e.g. --add-scram SCRAM-SHA-512=[name=alice,password=x]);
#                               used only when the storage is formatted (the first start)
#   AGENTBUS_BROKER_HEAP        the JVM heap, default 512m
#   AGENTBUS_BROKER_CACHE       where the jars go, default ~/.cache/agentbus (a variable named
#                               AGENTBUS_KAFKA_* would be a librdkafka setting to agentbus)
#   AGENTBUS_BROKER_START_TIMEOUT seconds to wait for the first answer, default 120
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
data_dir=${AGENTBUS_DATA_DIR:-$root/data}
case $data_dir in /*) ;; *) data_dir=$root/$data_dir ;; esac
port=${AGENTBUS_BROKER_PORT:-9092}
cport=${AGENTBUS_BROKER_CONTROLLER_PORT:-$((port + 1))}
kind=${AGENTBUS_LOCAL_BROKER:-kafka}
addr=127.0.0.1:$port
extra_listeners=${AGENTBUS_BROKER_LISTENERS:-}

# Kafka's jars, tools and JVM settings (the version is pinned once, in ops/kafka/pom.xml).
# shellcheck source=ops/kafka/lib.sh
. "$root/ops/kafka/lib.sh"
tansu_version=0.6.0

case $kind in
  kafka) dir=$data_dir/kafka ;;
  tansu) dir=$data_dir/tansu ;;
  *) echo "AGENTBUS_LOCAL_BROKER must be kafka or tansu, not '$kind'" >&2; exit 2 ;;
esac
pidfile=$dir/broker.pid
log=$dir/broker.log

port_open() { port_open_at "$port"; }
# Our broker runs: the pid in the pid file is alive and is the broker of this directory (not
# a process that reused the pid after a reboot).
running() {
  [ -f "$pidfile" ] || return 1
  local pid
  pid=$(cat "$pidfile")
  kill -0 "$pid" 2>/dev/null || return 1
  local mine=$dir/server.properties
  [ "$kind" = tansu ] && mine=tcp://$addr
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$mine"
}

java_opts_node() { java_opts "${AGENTBUS_BROKER_HEAP:-512m}"; }

install_tansu() {
  export PATH=$HOME/.cargo/bin:$PATH
  if command -v tansu >/dev/null && tansu --version 2>/dev/null | grep -q "$tansu_version"; then
    return
  fi
  echo "installing tansu $tansu_version with SQLite storage (about 10 minutes, once per machine)..." >&2
  cargo install tansu --version "$tansu_version" --locked --features libsql >&2
}

install() {
  case $kind in
    kafka) install_kafka ;;
    tansu) install_tansu ;;
  esac
}

# One metadata request (DescribeCluster) answered: the broker is up, not only its port.
answers() {
  port_open || return 1
  [ "$kind" = tansu ] && return 0
  kafka_answers "$addr"
}

write_config() {
  cat >"$dir/server.properties" <<EOF
# Written by ops/broker.sh: one KRaft node on 127.0.0.1 (broker and controller in one process).
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport${extra_listeners:+,$extra_listeners}
# Never 0.0.0.0 or empty: that would advertise the host name.
advertised.listeners=PLAINTEXT://127.0.0.1:$port${extra_listeners:+,$extra_listeners}
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL,SASL_PLAINTEXT:SASL_PLAINTEXT
log.dirs=$dir/logs
# One node: every internal topic has one replica (the defaults, 3 and min ISR 2, never
# become available here).
offsets.topic.replication.factor=1
# Fewer offsets partitions than the default 50: created at the first group join, faster.
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Groups start at once instead of waiting 3 s for more members.
group.initial.rebalance.delay.ms=0
# As in production: agentbus creates its topics itself, a typo must not create one.
auto.create.topics.enable=false
num.partitions=1
# Tests make many topics; segment files stay small.
log.segment.bytes=67108864
log.retention.check.interval.ms=60000
EOF
  if [ -n "${AGENTBUS_BROKER_EXTRA_CONFIG:-}" ]; then
    {
      echo "# From $AGENTBUS_BROKER_EXTRA_CONFIG"
      cat "$AGENTBUS_BROKER_EXTRA_CONFIG"
    } >>"$dir/server.properties"
  fi
}

start_kafka() {
  install_kafka
  write_config
  if [ ! -f "$dir/logs/meta.properties" ]; then
    local id format_args=()
    id=$(random_cluster_id)
    # Split on blanks without globbing: SCRAM credentials are written [name=...,password=...].
    read -r -a format_args <<<"${AGENTBUS_BROKER_FORMAT_ARGS:-}"
    # The format's own output names the SCRAM users, never their passwords; it goes to the log.
    tool kafka.tools.StorageTool format -t "$id" -c "$dir/server.properties" \
      "${format_args[@]}" >>"$log" 2>&1 || {
      echo "formatting the storage failed; last lines of $log:" >&2
      tail -20 "$log" >&2
      exit 1
    }
  fi
  # shellcheck disable=SC2046
  (exec setsid java $(java_opts_node) \
    -Dkafka.logs.dir="$dir" \
    -Dlog4j2.configurationFile="$root/ops/kafka/log4j2.properties" \
    -cp "$libs/*" kafka.Kafka "$dir/server.properties" \
    </dev/null >>"$log" 2>&1 9>&-) &
  echo $! >"$pidfile"
}

start_tansu() {
  install_tansu
  export PATH=$HOME/.cargo/bin:$PATH
  # tansu reads the SQLite path of the URL relative to its working directory.
  (cd "$dir" && exec setsid tansu broker \
    --listener-url "tcp://$addr" \
    --advertised-listener-url "tcp://$addr" \
    --storage-engine "sqlite://./broker.db" \
    </dev/null >>"$log" 2>&1 9>&-) &
  echo $! >"$pidfile"
}

start() {
  if [ -n "${AGENTBUS_BROKERS:-}" ]; then
    echo "$AGENTBUS_BROKERS"
    return
  fi
  mkdir -p "$dir"
  # One starter at a time: tests in parallel all call this.
  exec 9>"$dir/.lock"
  flock 9
  if running && answers; then
    echo "$addr"
    return
  fi
  if ! running && port_open; then
    echo "something not started by this script listens on $addr; using it" >&2
    echo "$addr"
    return
  fi
  if running; then
    # Started but not answering yet (another starter gave up waiting): wait for it below.
    :
  else
    case $kind in
      kafka) start_kafka ;;
      tansu) start_tansu ;;
    esac
  fi
  local started=$SECONDS limit=${AGENTBUS_BROKER_START_TIMEOUT:-120}
  while [ $((SECONDS - started)) -lt "$limit" ]; do
    if answers; then
      echo "$addr"
      return
    fi
    # Alive, not running(): just after the start the pid may still be the subshell that is
    # about to exec java, whose command line is not the broker's yet.
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "the broker exited; last lines of $log and $dir/server.log:" >&2
      tail -20 "$log" >&2
      tail -20 "$dir/server.log" >&2 2>/dev/null || true
      exit 1
    fi
    sleep 0.5
  done
  echo "the broker did not answer on $addr within $limit s; see $log and $dir/server.log" >&2
  exit 1
}

stop() {
  [ -n "${AGENTBUS_BROKERS:-}" ] && return
  [ -d "$dir" ] || return 0
  # Not while another call starts it.
  exec 9>"$dir/.lock"
  flock 9
  if running; then
    pid=$(cat "$pidfile")
    kill "$pid"
    # A controlled shutdown of one node takes a few seconds.
    for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

status() {
  if [ -n "${AGENTBUS_BROKERS:-}" ]; then
    echo "$AGENTBUS_BROKERS (external)"
    return
  fi
  if answers; then
    echo "$addr"
  else
    echo "no broker on $addr" >&2
    exit 1
  fi
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  install) install ;;
  tool) shift; tool "$@" ;;
  classpath) install_kafka; echo "$libs/*" ;;
  *) echo "usage: $0 start|stop|status|install|tool CLASS ARGS...|classpath" >&2; exit 2 ;;
esac
