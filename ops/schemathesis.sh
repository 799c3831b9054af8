#!/usr/bin/env bash
# Schemathesis against a running agentbus: every operation of /openapi.json is called with
# generated valid and invalid requests, and every answer is checked:
#   not_a_server_error            no 5xx, whatever the input
#   status_code_conformance       the status is documented for the operation
#   content_type_conformance      the content type is documented for that status
#   response_schema_conformance   the body matches the documented schema
#
#   ops/schemathesis.sh [MAX_EXAMPLES]     (default 50 examples per operation)
#
# It starts what it needs and stops it again: the local test broker (ops/broker.sh, on its own
# port 19292 and data directory target/schemathesis-data, unless AGENTBUS_BROKERS points at a
# Kafka), and `agentbus serve` on 127.0.0.1 on a free port with its own data directory, topic
# prefix and one noop agent. It installs schemathesis 4 with pip when it is missing, prints
# schemathesis's report and exits with its status (non-zero when a check failed).
#
# Settings (environment):
#   AGENTBUS_BIN                   the agentbus binary to run (default: `cargo build`, debug)
#   SCHEMATHESIS_MAX_TIME          time budget of the schemathesis run in seconds (default none)
#   SCHEMATHESIS_CHECKS            checks to run (default: the four above)
#   SCHEMATHESIS_SEED              the random seed (default: a new one each run, printed, so that
#                                  a run that found something can be repeated with it; the test
#                                  command's run, tests/schemathesis.rs, fixes it so CI cannot
#                                  fail by chance; what a random run finds becomes a
#                                  regression test, see tests/http_edges.rs)
#   SCHEMATHESIS_ARGS              more arguments for `schemathesis run`
#   AGENTBUS_SCHEMATHESIS_DIR      data directory (default target/schemathesis-data)
#   AGENTBUS_SCHEMATHESIS_BROKER_PORT   the broker's port (default 19292)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH=$HOME/.cargo/bin:$PATH

examples=${1:-${SCHEMATHESIS_MAX_EXAMPLES:-50}}
seed=${SCHEMATHESIS_SEED:-$(python3 -c 'import random; print(random.SystemRandom().randrange(1, 2**31))')}
case $seed in '' | *[!0-9]*) echo "SCHEMATHESIS_SEED must be a whole number, not '$seed'" >&2; exit 2 ;; esac
checks=${SCHEMATHESIS_CHECKS:-not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance}
data=${AGENTBUS_SCHEMATHESIS_DIR:-$root/target/schemathesis-data}
broker_port=${AGENTBUS_SCHEMATHESIS_BROKER_PORT:-19292}
case $broker_port in 9092 | 19092) echo "port $broker_port belongs to the development or test broker; use another" >&2; exit 2 ;; esac
log() { echo "schemathesis.sh: $*" >&2; }

# --- schemathesis ------------------------------------------------------------------------
command -v python3 >/dev/null || { log "python3 is required to run schemathesis"; exit 1; }
scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
st=
find_st() {
  for candidate in "$scripts/schemathesis" "$(command -v schemathesis || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" --version 2>/dev/null | grep -q 'version 4\.'; then
      st=$candidate
      return 0
    fi
  done
  return 1
}
venv=$root/target/schemathesis-venv
if ! find_st && [ -x "$venv/bin/schemathesis" ]; then scripts=$venv/bin; fi
if ! find_st; then
  log "installing schemathesis 4 with pip..."
  python3 -m pip install --quiet --disable-pip-version-check 'schemathesis>=4,<5' >&2 || true
  if ! find_st; then
    # A Python that refuses installs of its own (Debian's, PEP 668) or has no pip: a venv
    # of the project's own under target/.
    log "pip could not install it here; trying a venv in $venv..."
    if python3 -m venv "$venv" >&2 && "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'schemathesis>=4,<5' >&2; then
      scripts=$venv/bin
    fi
  fi
  if ! find_st; then
    log "FAILED: schemathesis 4 is not installed and 'python3 -m pip install schemathesis' did not install it"
    exit 1
  fi
fi
log "$("$st" --version)"

# --- agentbus ----------------------------------------------------------------------------
bin=${AGENTBUS_BIN:-}
if [ -z "$bin" ]; then
  log "building agentbus (debug)..."
  cargo build --quiet --bin agentbus
  bin=$root/target/debug/agentbus
fi
[ -x "$bin" ] || { log "no agentbus binary at $bin"; exit 1; }

# --- broker ------------------------------------------------------------------------------
started_broker=
broker() { AGENTBUS_DATA_DIR=$data AGENTBUS_BROKER_PORT=$broker_port "$root/ops/broker.sh" "$@"; }
if [ -n "${AGENTBUS_BROKERS:-}" ]; then
  brokers=$AGENTBUS_BROKERS
else
  mkdir -p "$data"
  broker status >/dev/null 2>&1 || started_broker=1
  brokers=$(broker start)
fi
log "broker: $brokers"

# --- the service -------------------------------------------------------------------------
# Runs that failed keep their directory (the service's log) for a while.
find "$data" -maxdepth 1 -name 'run.*' -mmin +120 -exec rm -rf {} + 2>/dev/null || true
mkdir -p "$data"
run=$(mktemp -d "$data/run.XXXXXX")
pid=
cleanup() {
  status=$?
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  if [ "$status" != 0 ] && [ -f "$run/agentbus.log" ]; then
    log "last lines of the service's log ($run/agentbus.log):"
    tail -n 30 "$run/agentbus.log" >&2 || true
  fi
  if [ -n "$started_broker" ]; then broker stop || true; fi
  if [ "$status" = 0 ]; then rm -rf "$run"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$run/consumers"
cat >"$run/consumers/schemathesis-noop.toml" <<'EOF'
# An agent, so that the consumer, dead-letter and replay endpoints have a real group.
name = "schemathesis-noop"
subscribe = ["*"]
[handler]
kind = "noop"
EOF
prefix="st$(date +%s)$$."
AGENTBUS_BROKERS=$brokers \
AGENTBUS_HTTP_ADDR=127.0.0.1:$port \
AGENTBUS_DATA_DIR=$run/data \
AGENTBUS_SCHEMAS_DIR=$root/schemas \
AGENTBUS_CONSUMERS_DIR=$run/consumers \
AGENTBUS_TOPIC_PREFIX=$prefix \
AGENTBUS_TOPIC_PARTITIONS=1 \
AGENTBUS_LAG_INTERVAL=0 \
AGENTBUS_LOG=${AGENTBUS_LOG:-warn} \
  "$bin" serve >"$run/agentbus.log" 2>&1 &
pid=$!
base=http://127.0.0.1:$port
for i in $(seq 1 300); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
  kill -0 "$pid" 2>/dev/null || { log "agentbus serve exited"; exit 1; }
  [ "$i" = 300 ] && { log "agentbus did not listen on $base within 60 s"; exit 1; }
  sleep 0.2
done
log "agentbus: $base (topic prefix $prefix, data $run)"

# --- realistic values ----------------------------------------------------------------------
# Half of the time, path and body parameters take a value that exists (an event type, a
# schema id, the agent's group, a replay time), so that the tests get past 404 and 422 into
# the operations' own logic; the other half is generated. schemathesis reads
# schemathesis.toml from its working directory, the run directory.
python3 - "$base" "$run/schemathesis.toml" <<'PY'
import json, sys, urllib.request
base, out = sys.argv[1], sys.argv[2]
listing = json.load(urllib.request.urlopen(base + "/v1/schemas", timeout=30))
types = [t["event_type"] for t in listing["event_types"]]
ids = sorted({str(v["id"]) for t in listing["event_types"] for v in t.get("versions", [])})
versions = sorted({str(v["version"]) for t in listing["event_types"] for v in t.get("versions", [])})
toml = lambda values: json.dumps(values)
half = lambda name: '{ dictionary = "%s", probability = 0.5 }' % name
with open(out, "w") as f:
    f.write(f"""[dictionaries.event_types]
values = {toml(types)}
[dictionaries.versions]
values = {toml(versions + ["latest"])}
[dictionaries.ids]
values = {toml(ids)}
[dictionaries.groups]
values = ["schemathesis-noop"]
[dictionaries.times]
values = ["2h", "30m", "1s", "2026-01-01T00:00:00Z"]

[parameters]
"path.event_type" = {half("event_types")}
"path.subject" = {half("event_types")}
"path.version" = {half("versions")}
"path.id" = {half("ids")}
"path.group" = {half("groups")}
"body.event_type" = {half("event_types")}
"body.[*].event_type" = {half("event_types")}
"body.to_agent" = {half("groups")}
"body.from" = {half("times")}
"body.until" = {half("times")}
""")
PY

# --- the run -----------------------------------------------------------------------------
args=(run "$base/openapi.json"
  --checks "$checks"
  --max-examples "$examples"
  --workers 1
  --request-timeout 15
  --generation-database none
  --seed "$seed"
  --no-color)
if [ -n "${SCHEMATHESIS_MAX_TIME:-}" ]; then args+=(--max-time "$SCHEMATHESIS_MAX_TIME"); fi
# shellcheck disable=SC2206
if [ -n "${SCHEMATHESIS_ARGS:-}" ]; then args+=($SCHEMATHESIS_ARGS); fi
log "seed $seed (SCHEMATHESIS_SEED=$seed ops/schemathesis.sh $examples repeats this run)"
log "$st ${args[*]}"
st_status=0
(cd "$run" && "$st" "${args[@]}") || st_status=$?
if [ "$st_status" = 0 ]; then
  log "PASSED: no check failed"
else
  log "FAILED: schemathesis exited $st_status (the failures and how to reproduce each are above)"
fi
exit "$st_status"
