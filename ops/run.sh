#!/usr/bin/env bash
# The quick start on a fresh machine: build agentbus, start the local Apache Kafka (one KRaft
# node; a JRE, Maven and Kafka's jars installed on first use by ops/broker.sh; tansu instead
# with AGENTBUS_LOCAL_BROKER=tansu) unless AGENTBUS_BROKERS is set, run `agentbus serve` with
# the sample schemas and agents, show the loop working (a publish with curl and one with
# `agentbus publish`, an agent taking the task, its lag as agentbus and as Kafka's own
# kafka-consumer-groups see it), print where the API and metrics are, and keep serving until
# Ctrl-C.
#
#   AGENTBUS_RUN_DEBUG=1   a debug build (much faster to build, slower to run)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$HOME/.cargo/bin:$PATH

export AGENTBUS_HTTP_ADDR=${AGENTBUS_HTTP_ADDR:-127.0.0.1:8080}
export AGENTBUS_DATA_DIR=${AGENTBUS_DATA_DIR:-$PWD/data}
export AGENTBUS_SCHEMAS_DIR=${AGENTBUS_SCHEMAS_DIR:-$PWD/schemas}
export AGENTBUS_CONSUMERS_DIR=${AGENTBUS_CONSUMERS_DIR:-$PWD/consumers}

# librdkafka is built with TLS (OpenSSL's headers); aws-lc-sys (rustls) with cmake.
packages=()
pkg-config --exists openssl 2>/dev/null || packages+=(libssl-dev pkg-config)
command -v cc >/dev/null || packages+=(build-essential)
command -v cmake >/dev/null || packages+=(cmake)
if [ ${#packages[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "==> installing from Debian: ${packages[*]}"
    apt-get update -qq && apt-get install -y -qq "${packages[@]}" >/dev/null
  else
    echo "missing: ${packages[*]} (Debian package names)" >&2
    exit 1
  fi
fi
if [ -n "${AGENTBUS_RUN_DEBUG:-}" ]; then
  echo "==> building agentbus (debug)"
  cargo build --quiet --bin agentbus
  bin=target/debug/agentbus
else
  echo "==> building agentbus (release)"
  cargo build --release --quiet --bin agentbus
  bin=target/release/agentbus
fi

echo "==> broker"
AGENTBUS_BROKERS=$(ops/broker.sh start)
export AGENTBUS_BROKERS
echo "    Kafka at $AGENTBUS_BROKERS"
# tansu's gaps are worked around only when named (src/broker.rs); Apache Kafka needs none.
if [ "${AGENTBUS_LOCAL_BROKER:-kafka}" = tansu ]; then
  export AGENTBUS_BROKER_QUIRKS=${AGENTBUS_BROKER_QUIRKS:-tansu}
fi

echo "==> schemas"
$bin schemas check | tail -1

url=http://$AGENTBUS_HTTP_ADDR
echo "==> agentbus serve on $url"
$bin serve &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT INT TERM
for _ in $(seq 1 300); do
  curl -sf "$url/readyz" >/dev/null && break
  kill -0 $pid 2>/dev/null || { echo "agentbus serve exited" >&2; exit 1; }
  sleep 0.2
done
curl -sf "$url/readyz" >/dev/null || { echo "agentbus did not become ready" >&2; exit 1; }

agent_id=demo-$(date +%s)
echo "==> publish with curl: agent.created"
curl -sS -X POST "$url/v1/events" -H 'content-type: application/json' -d @- <<JSON
{"event_type": "agent.created", "source": "daa-service", "partition_key": "$agent_id",
 "data": {"agent_id": "$agent_id", "type": "researcher", "cognitive_pattern": "systems", "created_by": "user123"},
 "metadata": {"correlation_id": "req-$agent_id"}}
JSON
echo
echo "==> publish with agentbus publish: agent.task.requested"
$bin publish --url "$url" --type agent.task.requested --source run.sh --key "$agent_id" \
  --meta "correlation_id=req-$agent_id" \
  --data "{\"task_id\":\"$(cat /proc/sys/kernel/random/uuid)\",\"agent_id\":\"$agent_id\",\"description\":\"plan the week\"}"
echo "==> a schema violation is refused with the field path"
curl -sS -X POST "$url/v1/events" -H 'content-type: application/json' \
  -d '{"event_type":"agent.created","source":"run.sh","data":{"agent_id":7}}'
echo
echo "==> the loop: nutrition-planner (consumers/nutrition-planner.toml) takes the task through"
echo "    its webhook (the demo agent agentbus serves) and publishes agent.task.completed"
for _ in $(seq 1 100); do
  curl -sS "$url/metrics" | grep -q 'agentbus_events_published_total{event_type="agent.task.completed",outcome="written"}' && break
  sleep 0.2
done
curl -sS "$url/metrics" | grep -E '^agentbus_events_(published|consumed)_total' || true
echo "==> the agent's group: state, members and lag (agentbus lag --group nutrition-planner)"
$bin lag --group nutrition-planner || true
if [ "${AGENTBUS_LOCAL_BROKER:-kafka}" = kafka ]; then
  echo "==> the same group as Kafka's own tool sees it (kafka-consumer-groups --describe)"
  ops/broker.sh tool org.apache.kafka.tools.consumer.group.ConsumerGroupCommand \
    --bootstrap-server "$AGENTBUS_BROKERS" --describe --group nutrition-planner 2>&1 || true
fi
echo "==> what replaying the last hour of tasks to it would copy (agentbus replay --dry-run)"
$bin replay --from 1h --event-type 'agent.task.*' --to-agent nutrition-planner --dry-run | tail -1 || true

cat <<EOF

agentbus is running (pid $pid):
  API        $url/v1/events   (POST an envelope or a batch)
  schemas    $url/v1/schemas  and the Confluent registry at $url/registry
  health     $url/healthz  $url/readyz
  metrics    $url/metrics  (lag: $url/v1/consumers)
  OpenAPI    $url/openapi.json
  Kafka      $AGENTBUS_BROKERS  (topics <domain>.events)
Ctrl-C stops it (the broker keeps running; ops/broker.sh stop stops it).
EOF
wait $pid
