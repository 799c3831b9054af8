#!/usr/bin/env bash
# Sets up and runs every test: the README's test command, and what .ci/run runs.
#
#   ops/test.sh                      the whole suite on Apache Kafka
#   ops/test.sh --broker tansu       the whole suite on tansu (AGENTBUS_LOCAL_BROKER=tansu)
#   ops/test.sh --test codecs ...    anything else goes to `cargo test` (a subset)
#
# On a machine with nothing but the Rust toolchain it installs, from Debian, what the build
# and the tests need (a C toolchain, cmake, perl, OpenSSL's headers, Prometheus, and Docker
# Compose where a docker client is installed), and through ops/broker.sh a JRE, Maven and
# Apache Kafka's jars. It starts the tests' own broker on its
# own port and data directory (AGENTBUS_TEST_BROKER_PORT, default 19092; stopped again at the
# end if this script started it) unless AGENTBUS_BROKERS points at another Kafka, runs the
# whole cargo test suite (unit, property and integration tests against the real broker) and
# prints a summary with each test binary's result and the time every step took.
set -euo pipefail
cd "$(dirname "$0")/.."

export PATH=$HOME/.cargo/bin:$PATH
command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }

cargo_args=()
while [ $# -gt 0 ]; do
  case $1 in
    --broker)
      [ $# -ge 2 ] || { echo "--broker needs kafka or tansu" >&2; exit 2; }
      export AGENTBUS_LOCAL_BROKER=$2
      shift 2
      ;;
    --broker=*) export AGENTBUS_LOCAL_BROKER=${1#--broker=}; shift ;;
    *) cargo_args+=("$1"); shift ;;
  esac
done
export AGENTBUS_LOCAL_BROKER=${AGENTBUS_LOCAL_BROKER:-kafka}
case $AGENTBUS_LOCAL_BROKER in
  kafka | tansu) ;;
  *) echo "--broker must be kafka or tansu, not '$AGENTBUS_LOCAL_BROKER'" >&2; exit 2 ;;
esac
# Every agentbus the tests start (in-process or as a process) works around tansu's quirks on
# tansu only (src/broker.rs); on Kafka none is on.
if [ "$AGENTBUS_LOCAL_BROKER" = tansu ]; then
  export AGENTBUS_BROKER_QUIRKS=tansu
else
  export AGENTBUS_BROKER_QUIRKS=${AGENTBUS_BROKER_QUIRKS:-none}
fi

timings=()
step_started=$SECONDS
step() { timings+=("$(printf '%-28s %5ss' "$1" $((SECONDS - step_started)))"); step_started=$SECONDS; }

apt_updated=
apt_install() {
  if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
    echo "missing: $* (install them: Debian packages of these names)" >&2
    exit 1
  fi
  echo "installing from Debian: $*"
  if [ -z "$apt_updated" ]; then
    apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# librdkafka is built from source by rdkafka-sys: a C toolchain, make and perl; its TLS needs
# OpenSSL's headers and pkg-config (zstd-sys, lz4 and snappy need only the C compiler: no
# bindgen, so no libclang). aws-lc-sys (rustls's crypto for reqwest) is built with cmake.
# The scripts need curl, flock and setsid.
packages=()
for tool in cc c++ make cmake perl curl flock setsid pkg-config; do
  if ! command -v "$tool" >/dev/null; then
    case $tool in
      cc | c++ | make) packages+=(build-essential) ;;
      flock | setsid) packages+=(util-linux) ;;
      *) packages+=("$tool") ;;
    esac
  fi
done
pkg-config --exists openssl 2>/dev/null || packages+=(libssl-dev)
# promtool checks the alert rules; a real Prometheus server scrapes agentbus in one test.
install_prometheus=
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  packages+=(prometheus)
  install_prometheus=1
fi
# schemathesis (PyPI) checks the API against its OpenAPI description: Python with venv, so
# that ops/schemathesis.sh can install it even where the system Python refuses pip installs.
command -v python3 >/dev/null || packages+=(python3 python3-venv python3-pip)
if command -v python3 >/dev/null && ! python3 -m venv --help >/dev/null 2>&1; then
  packages+=(python3-venv)
fi
# Where a docker client is installed, a test checks compose.yml with `docker compose config`.
if command -v docker >/dev/null && ! docker compose version >/dev/null 2>&1 \
  && ! command -v docker-compose >/dev/null; then
  packages+=(docker-compose)
fi
if [ ${#packages[@]} -gt 0 ]; then
  mapfile -t packages < <(printf '%s\n' "${packages[@]}" | sort -u)
  apt_install "${packages[@]}"
fi
if [ -n "$install_prometheus" ]; then
  # The package starts a system-wide server on :9090; the tests run their own.
  systemctl stop prometheus >/dev/null 2>&1 || service prometheus stop >/dev/null 2>&1 || true
fi
step "build and test tools"

# The tests' broker: its own port and data directory (tests/common/mod.rs uses the same).
export AGENTBUS_TEST_BROKER_PORT=${AGENTBUS_TEST_BROKER_PORT:-19092}
export AGENTBUS_TEST_DATA_DIR=${AGENTBUS_TEST_DATA_DIR:-$PWD/target/test-data}
broker() {
  AGENTBUS_BROKER_PORT=$AGENTBUS_TEST_BROKER_PORT \
    AGENTBUS_BROKER_CONTROLLER_PORT=${AGENTBUS_TEST_BROKER_CONTROLLER_PORT:-$((AGENTBUS_TEST_BROKER_PORT + 1))} \
    AGENTBUS_DATA_DIR=$AGENTBUS_TEST_DATA_DIR ops/broker.sh "$@"
}

# Kafka's jars (and a JRE and Maven) even with an external broker: the tests that need a
# broker of their own (chaos, TLS, codecs) and Kafka's tools run from them.
if [ "$AGENTBUS_LOCAL_BROKER" = kafka ]; then
  (unset AGENTBUS_BROKERS; ops/broker.sh install)
  step "Apache Kafka installed"
fi

started_broker=
cleanup() { if [ -n "$started_broker" ]; then broker stop || true; fi; }
trap cleanup EXIT
if [ -z "${AGENTBUS_BROKERS:-}" ]; then
  if ! broker status >/dev/null 2>&1; then
    started_broker=1
  fi
  echo "broker ($AGENTBUS_LOCAL_BROKER): $(broker start)"
  step "test broker started"
else
  echo "broker: $AGENTBUS_BROKERS (external)"
fi

log=$(mktemp)
status=0
# Every target unless the arguments pick some (`--all-targets --test x` would run them all).
[ ${#cargo_args[@]} -eq 0 ] && cargo_args=(--all-targets)
cargo test --no-fail-fast "${cargo_args[@]}" 2>&1 | tee "$log" || status=$?
step "cargo test"

passed=$(grep -E '^test result:' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -E '^test result:' "$log" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
echo
echo "summary (broker: ${AGENTBUS_BROKERS:-$AGENTBUS_LOCAL_BROKER on 127.0.0.1:$AGENTBUS_TEST_BROKER_PORT}):"
# Each binary's result beside its name.
awk '/^ *Running /{name=($2 == "unittests" ? $3 : $2)} /^ *Doc-tests /{name="doc-tests " $2} /^test result:/{printf "  %-48s %s\n", name, $0}' "$log"
failures=$(sed -n 's/^    \([A-Za-z0-9_:]*\)$/\1/p' "$log" | sort -u)
if [ -n "$failures" ]; then
  echo "failed tests:"
  printf '  %s\n' $failures
fi
echo "$passed passed, $failed failed"
echo "time:"
printf '  %s\n' "${timings[@]}"
rm -f "$log"
exit $status
