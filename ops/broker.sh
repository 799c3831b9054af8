#!/usr/bin/env bash
# A local Kafka-compatible broker for development and tests: tansu 0.6.0 with SQLite storage.
#
#   ops/broker.sh start    install tansu if missing, start it, wait until it answers; prints
#                          the bootstrap address (idempotent: a running broker is reused)
#   ops/broker.sh stop     stop the broker this script started
#   ops/broker.sh status   print the address and exit 0 when it answers, exit 1 otherwise
#
# With AGENTBUS_BROKERS set, nothing is started: that Kafka is used and its address printed.
# Settings: AGENTBUS_DATA_DIR (default ./data; the broker keeps data in $AGENTBUS_DATA_DIR/tansu),
# AGENTBUS_BROKER_PORT (default 9092), AGENTBUS_BROKER_ADVERTISED (the host:port the broker tells
# clients to connect to; default its own address — set it to put a proxy in front, e.g. TLS).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
data_dir=${AGENTBUS_DATA_DIR:-$root/data}
case $data_dir in /*) ;; *) data_dir=$root/$data_dir ;; esac
port=${AGENTBUS_BROKER_PORT:-9092}
dir=$data_dir/tansu
pidfile=$dir/tansu.pid
log=$dir/tansu.log
version=0.6.0
addr=127.0.0.1:$port

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }
running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

install() {
  export PATH=$HOME/.cargo/bin:$PATH
  if command -v tansu >/dev/null && tansu --version 2>/dev/null | grep -q "$version"; then
    return
  fi
  echo "installing tansu $version with SQLite storage (about 10 minutes, once per machine)..." >&2
  cargo install tansu --version "$version" --locked --features libsql >&2
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
  if answers; then
    echo "something not started by this script listens on $addr; using it" >&2
    echo "$addr"
    return
  fi
  install
  export PATH=$HOME/.cargo/bin:$PATH
  # tansu reads the SQLite path of the URL relative to its working directory.
  (cd "$dir" && exec setsid tansu broker \
    --listener-url "tcp://$addr" \
    --advertised-listener-url "tcp://${AGENTBUS_BROKER_ADVERTISED:-$addr}" \
    --storage-engine "sqlite://./broker.db" \
    </dev/null >>"$log" 2>&1 9>&-) &
  echo $! >"$pidfile"
  for _ in $(seq 1 150); do
    if answers; then
      echo "$addr"
      return
    fi
    if ! running; then
      echo "tansu exited; last lines of $log:" >&2
      tail -20 "$log" >&2
      exit 1
    fi
    sleep 0.2
  done
  echo "tansu did not answer on $addr within 30 s; see $log" >&2
  exit 1
}

stop() {
  [ -n "${AGENTBUS_BROKERS:-}" ] && return
  if running; then
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
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
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
