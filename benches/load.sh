#!/usr/bin/env bash
# The HTTP load benchmark in one command: installs wrk (Debian's package) when it is missing,
# then runs examples/loadtest.rs. Options are passed on, e.g. `bash benches/load.sh --rounds 3`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null; then
    echo "wrk is missing; installing it with apt-get" >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq wrk
fi
exec cargo run --release --example loadtest -- "$@"
