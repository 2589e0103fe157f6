#!/usr/bin/env bash
# Instructions the server executes per request, for each load-test variant: the one cost figure
# that a shared, noisy machine reproduces. One connection by default, so that every request costs
# the same system calls: with several, how many requests one wake-up serves depends on timing,
# which moved the floor by 2 % from run to run. `CONNECTIONS=16` gives the busier picture.
# Installs valgrind and wrk (Debian's packages) when missing.
# Usage: `bash benches/instructions.sh [VARIANT...]`.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/need.sh
need valgrind wrk
cargo build --release --example loadtest -q
variants=("$@")
if [ ${#variants[@]} -eq 0 ]; then
    variants=(bare noop-layer trace-eos after after-outer eos-spawn after-callback after-hook after-outer-callback spawn eos-spawn-sleep after-sleep spawn-sleep)
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf '| variant | requests | instructions / request |\n|---|---:|---:|\n'
for variant in "${variants[@]}"; do
    valgrind --tool=callgrind --callgrind-out-file="$work/$variant.out" \
        target/release/examples/loadtest serve "$variant" --exit-after 12 \
        >"$work/$variant.addr" 2>"$work/$variant.log" &
    server=$!
    for _ in $(seq 100); do
        [ -s "$work/$variant.addr" ] && break
        sleep 0.1
    done
    address=$(head -n1 "$work/$variant.addr")
    requests=$(wrk -t1 -c"${CONNECTIONS:-1}" -d5s "http://$address/" | awk '/requests in/ {print $1}')
    wait "$server"
    total=$(awk '/^summary:/ {print $2}' "$work/$variant.out")
    printf '| %s | %s | %s |\n' "$variant" "$requests" "$((total / requests))"
done
