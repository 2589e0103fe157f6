#!/usr/bin/env bash
# Contention that one pinned worker hides: futex system calls (contended locks and parked
# workers) per 1,000 requests, with the server on two worker threads, each `AfterLayer` variant
# side by side with the floor a user would write instead, over interleaved rounds.
#
# Method: each round starts every variant's server under `strace -f -c -e trace=futex` (which
# counts the calls of all its threads), loads it with `wrk` (one thread, 16 connections) for a
# fixed time, and divides the calls by the requests served. The order of the variants rotates
# from round to round; the report gives each round's ratio of a variant to its floor, and the
# median of those ratios. strace slows the server down, which is why only ratios taken in the
# same round mean anything. Installs strace and wrk (Debian's packages) when missing.
# Usage: `bash benches/futex.sh [ROUNDS] [SECONDS]` (3 rounds of 5 s by default).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
seconds=${2:-5}
source benches/need.sh
need strace wrk
cargo build --release --example loadtest -q
# Each pair: a variant and its floor.
pairs=("after-callback eos-spawn" "after-sleep eos-spawn-sleep")
variants=(eos-spawn after-callback eos-spawn-sleep after-sleep)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

measure() { # variant round -> futex calls per 1,000 requests
    local variant=$1 round=$2 out="$work/$1.$2"
    WORKERS=2 strace -f -c -e trace=futex -o "$out.strace" \
        target/release/examples/loadtest serve "$variant" --exit-after $((seconds + 3)) \
        >"$out.addr" 2>/dev/null &
    local server=$!
    for _ in $(seq 100); do
        [ -s "$out.addr" ] && break
        sleep 0.1
    done
    local requests
    requests=$(wrk -t1 -c16 -d"${seconds}s" "http://$(head -n1 "$out.addr")/" | awk '/requests in/ {print $1}')
    wait "$server"
    local calls
    calls=$(awk '$NF == "futex" {print $4}' "$out.strace")
    echo "$variant $round $requests ${calls:-0}" >>"$work/results"
}

for round in $(seq "$rounds"); do
    shift_by=$(( (round - 1) % ${#variants[@]} ))
    order=("${variants[@]:$shift_by}" "${variants[@]:0:$shift_by}")
    for variant in "${order[@]}"; do
        measure "$variant" "$round"
    done
done

printf '| variant | round | requests | futex calls | per 1,000 requests |\n|---|---:|---:|---:|---:|\n'
awk '{printf "| %s | %s | %s | %s | %.1f |\n", $1, $2, $3, $4, 1000 * $4 / $3}' "$work/results"
printf '\n| variant / floor | ratio per round | median |\n|---|---|---:|\n'
for pair in "${pairs[@]}"; do
    read -r variant floor <<<"$pair"
    awk -v v="$variant" -v f="$floor" '
        $1 == v { a[$2] = 1000 * $4 / $3 }
        $1 == f { b[$2] = 1000 * $4 / $3 }
        END {
            n = 0
            for (r in a) if (b[r] > 0) { ratios[++n] = a[r] / b[r] }
            # Sort the ratios to take their median.
            for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++)
                if (ratios[j] < ratios[i]) { t = ratios[i]; ratios[i] = ratios[j]; ratios[j] = t }
            list = ""
            for (i = 1; i <= n; i++) list = list sprintf("%s%.2f", (i > 1 ? ", " : ""), ratios[i])
            median = (n % 2) ? ratios[(n + 1) / 2] : (ratios[n / 2] + ratios[n / 2 + 1]) / 2
            printf "| %s / %s | %s | %.2f |\n", v, f, list, median
        }' "$work/results"
done
