#!/usr/bin/env bash
# The long, coverage-guided fuzz run (libFuzzer through cargo-fuzz) of agentbus's hostile-input
# surfaces. `cargo test` runs the same properties briefly as proptest tests (tests/fuzz.rs);
# this is the run to leave going for minutes or hours.
#
#   ops/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 300 s each, every target)
#
# Targets (ops/fuzz/fuzz_targets/, properties in ops/fuzz/src/lib.rs):
#   envelope       Envelope::parse on arbitrary bytes that are JSON (then JSON -> Avro of its data)
#   json_to_avro   json_to_avro: first byte picks a schema, the rest is the data; accepted data
#                  must encode, decode to the same value and survive avro_to_json
#   decode_avro    split_wire + decode_avro: first byte picks a schema, the rest is a record value
#   definition     consume::definition::parse of arbitrary text, then the backoffs it implies
#
# It installs cargo-fuzz (`cargo install cargo-fuzz --locked`, about a minute) when missing.
# cargo-fuzz needs nightly compiler flags; on the stable toolchain RUSTC_BOOTSTRAP=1 allows
# them. The fuzz crate is its own workspace, built in ops/fuzz/target (the first build compiles
# every dependency, librdkafka included: several minutes). The corpus grows in
# ops/fuzz/corpus/<target> (not committed), starting from ops/fuzz/seeds/<target> (committed;
# `cargo test --test fuzz -- --ignored write_fuzz_seeds` writes them anew from the schemas).
#
# Settings: FUZZ_SANITIZER (default none: agentbus forbids unsafe code; `address` works too,
# slower), FUZZ_ARGS (more libFuzzer flags, e.g. "-jobs=2 -workers=2").
#
# A crash is saved in ops/fuzz/artifacts/<target>/; this script prints it as a Rust byte
# array and the regression test to add to tests/fuzz.rs, so that it fails in `cargo test`
# until it is fixed. libFuzzer stops at the first crash; to go on past known ones and collect
# every failing input: FUZZ_ARGS="-fork=1 -ignore_crashes=1" ops/fuzz.sh 600.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH=$HOME/.cargo/bin:$PATH

seconds=${1:-300}
shift || true
all=(envelope json_to_avro decode_avro definition)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz (cargo install cargo-fuzz --locked)..." >&2
  cargo install cargo-fuzz --locked >&2
fi
export RUSTC_BOOTSTRAP=1
# The fuzz crate builds with the main package's dependency versions.
[ -f ops/fuzz/Cargo.lock ] || cp Cargo.lock ops/fuzz/Cargo.lock
flags=(--fuzz-dir ops/fuzz -O --debug-assertions --sanitizer "${FUZZ_SANITIZER:-none}")

echo "building the fuzz targets..." >&2
cargo fuzz build "${flags[@]}" >&2

check_fn() {
  case $1 in
    envelope) echo check_envelope_bytes ;;
    json_to_avro) echo check_convert_bytes ;;
    decode_avro) echo check_decode_bytes ;;
    definition) echo check_definition_bytes ;;
  esac
}
dict_of() {
  case $1 in
    envelope | json_to_avro) echo "-dict=ops/fuzz/dicts/json.dict" ;;
    definition) echo "-dict=ops/fuzz/dicts/toml.dict" ;;
  esac
}
bytes_literal() { od -An -v -tx1 "$1" | tr -s ' \n' '  ' | sed -E 's/ ?([0-9a-f]{2})/0x\1, /g; s/, $//'; }

summary=()
crashed=0
for target in "${targets[@]}"; do
  fn=$(check_fn "$target")
  [ -n "$fn" ] || { echo "unknown target $target (one of: ${all[*]})" >&2; exit 2; }
  corpus=ops/fuzz/corpus/$target
  artifacts=ops/fuzz/artifacts/$target
  mkdir -p "$corpus" "$artifacts"
  log=$(mktemp)
  marker=$(mktemp)
  echo "=== $target: ${seconds}s ===" >&2
  status=0
  # shellcheck disable=SC2046,SC2086
  cargo fuzz run "${flags[@]}" "$target" "$corpus" "ops/fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
    -print_final_stats=1 $(dict_of "$target") ${FUZZ_ARGS:-} 2>&1 | tee "$log" >&2 || status=$?
  # Inputs run: libFuzzer's final stats, or in fork mode its last progress line (#N: ...).
  runs=$({ grep -Eo 'stat::number_of_executed_units: *[0-9]+|^#[0-9]+' "$log" || true; } | grep -Eo '[0-9]+$' | tail -1)
  # Every input saved in this run (several with FUZZ_ARGS="-fork=1 -ignore_crashes=1").
  mapfile -t found < <(find "$artifacts" -type f -newer "$marker" | sort)
  if [ "$status" = 0 ] && [ ${#found[@]} = 0 ]; then
    summary+=("$target: ok, ${runs:-?} inputs in ${seconds}s, corpus $(ls "$corpus" | wc -l) files")
  else
    crashed=1
    summary+=("$target: FAILED (exit $status) after ${runs:-?} inputs: ${#found[@]} failing input(s) in $artifacts")
    for artifact in "${found[@]}"; do
      name=$(basename "$artifact" | tr -c 'a-z0-9\n' '_' | cut -c1-20)
      cat >&2 <<EOF

--- $target found a failing input: $artifact
Reproduce:  RUSTC_BOOTSTRAP=1 cargo fuzz run ${flags[*]} $target $artifact
Show it:    RUSTC_BOOTSTRAP=1 cargo fuzz fmt ${flags[*]} $target $artifact
Minimize:   RUSTC_BOOTSTRAP=1 cargo fuzz tmin ${flags[*]} $target $artifact
Regression test for tests/fuzz.rs (fails in \`cargo test\` until fixed):

#[test]
fn regression_${target}_${name}() {
    props::${fn}(&[$(bytes_literal "$artifact")]);
}

EOF
    done
  fi
  rm -f "$log" "$marker"
done

echo >&2
echo "fuzz summary (${seconds}s per target):"
printf '  %s\n' "${summary[@]}"
exit $crashed
