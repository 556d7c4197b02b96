#!/usr/bin/env bash
# Instructions per call under callgrind, as a markdown table (deterministic: the same build
# gives the same figures, whatever the neighbours do). About 2 minutes once built.
#   bash benches/instructions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v valgrind >/dev/null; then
    apt-get update -qq && apt-get install -y -qq valgrind >/dev/null
fi
CALLS=20000
cargo build --release -q -p steadfast-bench --bin instructions
bin=target/release/instructions
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "| case | contender | instructions/call | × bare | × best peer |"
echo "|---|---|---:|---:|---:|"
"$bin" --list | while read -r case contenders; do
    declare -A ir=()
    for c in $contenders; do
        valgrind --tool=callgrind --callgrind-out-file="$out/$case.$c" \
            --toggle-collect='instructions::measured*' "$bin" "$case" "$c" "$CALLS" >/dev/null 2>&1
        total=$(awk '/^summary:/ {print $2; exit}' "$out/$case.$c")
        ir[$c]=$(( total / CALLS ))
    done
    best=""
    for c in $contenders; do
        [[ $c == bare || $c == steadfast || $c == floor || $c == +* ]] && continue
        if [[ -z $best || ${ir[$c]} -lt $best ]]; then best=${ir[$c]}; fi
    done
    for c in $contenders; do
        peer="—"
        [[ -n $best ]] && peer=$(awk -v a="${ir[$c]}" -v b="$best" 'BEGIN {printf "%.2f", a / b}')
        bare=$(awk -v a="${ir[$c]}" -v b="${ir[bare]}" 'BEGIN {printf "%.2f", a / b}')
        echo "| $case | $c | ${ir[$c]} | $bare | $peer |"
    done
    unset ir
done
