#!/usr/bin/env bash
# Runs every benchmark and prints the tables the README quotes.
#   bash benches/run.sh            # in-process (criterion) + end-to-end HTTP
# About 10 minutes on 2 cores from a fresh clone (most of it compiling the peers).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f target/criterion/steadfast-allocs.tsv
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
cargo bench -p steadfast-bench --bench layers -- --noplot >/dev/null
echo
echo "## In-process (ns per call; ratios from the same run)"
echo
cargo run --release -q -p steadfast-bench --bin report
echo
echo "## End to end over loopback HTTP/1"
echo
cargo run --release -q -p steadfast-bench --bin e2e
