#!/usr/bin/env bash
# Sets up and runs every test: the README's test command, and what .ci/run runs.
#
# Installs what the tests need (tansu, through ops/broker.sh), starts the local broker unless
# AGENTBUS_BROKERS points at another Kafka, then runs the whole cargo test suite (unit,
# property and integration tests against the real broker) and prints the summary.
set -euo pipefail
cd "$(dirname "$0")/.."

export PATH=$HOME/.cargo/bin:$PATH
command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }

# librdkafka is built from source by rdkafka-sys: it needs a C toolchain, make and perl.
missing=()
for tool in cc make perl curl flock setsid; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq build-essential perl curl util-linux >/dev/null
  else
    echo "missing tools: ${missing[*]}" >&2
    exit 1
  fi
fi

# librdkafka is built with TLS (OpenSSL): it needs OpenSSL's headers and pkg-config.
if ! pkg-config --exists openssl 2>/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq libssl-dev pkg-config >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libssl-dev pkg-config >/dev/null; }
  else
    echo "OpenSSL headers are required: install libssl-dev and pkg-config" >&2
    exit 1
  fi
fi
# The TLS test puts socat (OpenSSL) in front of its broker; the rules tests need promtool.
if ! command -v socat >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq socat >/dev/null 2>&1 || true
fi

# promtool checks the alert rules; a real Prometheus server scrapes agentbus in one test.
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing Debian's prometheus package (promtool and the server)..."
    (apt-get install -y -qq prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq prometheus >/dev/null; })
    # The package starts a system-wide server on :9090; the tests run their own.
    systemctl stop prometheus >/dev/null 2>&1 || service prometheus stop >/dev/null 2>&1 || pkill -x prometheus || true
  else
    echo "promtool and prometheus are required: install Debian's prometheus package" >&2
    exit 1
  fi
fi

# The tests' broker: its own port and data directory (tests/common/mod.rs uses the same).
export AGENTBUS_TEST_BROKER_PORT=${AGENTBUS_TEST_BROKER_PORT:-19092}
export AGENTBUS_TEST_DATA_DIR=${AGENTBUS_TEST_DATA_DIR:-$PWD/target/test-data}
broker() { AGENTBUS_BROKER_PORT=$AGENTBUS_TEST_BROKER_PORT AGENTBUS_DATA_DIR=$AGENTBUS_TEST_DATA_DIR ops/broker.sh "$@"; }

started_broker=
if [ -z "${AGENTBUS_BROKERS:-}" ]; then
  if ! broker status >/dev/null 2>&1; then
    started_broker=1
  fi
  echo "broker: $(broker start)"
else
  echo "broker: $AGENTBUS_BROKERS (external)"
fi
cleanup() { if [ -n "$started_broker" ]; then broker stop; fi; }
trap cleanup EXIT

log=$(mktemp)
status=0
cargo test --no-fail-fast --all-targets "$@" 2>&1 | tee "$log" || status=$?

passed=$(grep -E '^test result:' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -E '^test result:' "$log" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
echo
echo "summary:"
grep -E '^test result:' "$log" || true
echo "$passed passed, $failed failed"
rm -f "$log"
exit $status
