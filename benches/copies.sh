#!/usr/bin/env bash
# Large memory copies per real call: every memcpy/memmove of 64 bytes or more made while
# `calls <mode> 2000` runs (the requests, responses and futures moved between layers, in
# hyper and in ours), counted by a preloaded shim (benches/copies/shim.c). Deterministic:
# one thread, sequential calls.
#   bash benches/copies.sh bare floor stack +replay +timeout +breaker +retry +deadline +id
#   BY_CALLER=1 bash benches/copies.sh stack      # also the 25 largest callers and sizes
set -euo pipefail
cd "$(dirname "$0")/.."
CALLS=2000
cargo build --release -q -p steadfast-bench --bin calls
bin=target/release/calls
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cc -O2 -shared -fPIC -o "$out/shim.so" benches/copies/shim.c -ldl
echo "| mode | large copies per call | bytes copied per call | small copies per call |"
echo "|---|---:|---:|---:|"
for mode in "$@"; do
    COPIES_OUT="$out/$mode.txt" LD_PRELOAD="$out/shim.so" "$bin" "$mode" "$CALLS" >/dev/null
    # Only what happens on (nearly) every call: setup copies are left out.
    awk -v n="$CALLS" -v mode="$mode" '
        $1 == "small" { small = $3; next }
        $4 >= n / 2 { copies += $4; bytes += $3 * $4 }
        END { printf "| %s | %.1f | %.0f | %.1f |\n", mode, copies / n, bytes / n, small / n }
    ' "$out/$mode.txt"
done
if [[ -n ${BY_CALLER:-} ]]; then
    for mode in "$@"; do
        echo
        echo "$mode: the largest callers (bytes per call, size × copies per call, function)"
        awk -v n="$CALLS" '$1 != "small" && $4 >= n / 2 && $1 ~ /calls$/ { print $2, $3, $4 }' \
            "$out/$mode.txt" | sort -k2,2nr >"$out/rows"
        awk '{ print "0x" $1 }' "$out/rows" | addr2line -f -C -e "$bin" | awk 'NR % 2 == 1' \
            >"$out/names"
        paste -d' ' "$out/rows" "$out/names" |
            awk -v n="$CALLS" '{ f = $4; for (i = 5; i <= NF; i++) f = f " " $i;
                key = f SUBSEP $2; b[key] += $2 * $3 / n; c[key] += $3 / n }
                END { for (k in b) { split(k, p, SUBSEP);
                    printf "%7.0f  %5d B x %.1f  %s\n", b[k], p[2], c[k], substr(p[1], 1, 140) } }' |
            sort -rn | awk 'NR <= 25'
    done
fi
