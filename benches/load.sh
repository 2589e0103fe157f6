#!/usr/bin/env bash
# The HTTP load benchmark in one command: installs wrk (Debian's package) when it is missing,
# then runs examples/loadtest.rs. Options are passed on, e.g. `bash benches/load.sh --rounds 3`.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/need.sh
need wrk
exec cargo run --release --example loadtest -- "$@"
