#!/bin/sh
# What spans cost (see benches/spans.rs): the span benchmark built without spans
# (`--cfg duraflow_no_spans`) and built normally, compared. Extra arguments go to criterion.
#
#   sh benches/spans.sh
#       The two-command procedure: the build without spans saved as criterion's baseline
#       `no-spans`, then the normal build run with `--baseline no-spans`; its last lines
#       are the ratios against the targets.
#
#   ROUNDS=6 sh benches/spans.sh --measurement-time 4 --warm-up-time 1
#       For a noisy (shared) machine: ROUNDS short rounds, each running both builds back to
#       back (in alternating order, so a drift in load favours neither) and printing its
#       ratios; then the median ratio of each variant over the rounds. Add
#       DURAFLOW_SPANS_CPU=1 to measure CPU time instead of wall time (see benches/spans.rs).
#
# The build without spans uses its own target directory ($CARGO_TARGET_DIR/no-spans) so it
# does not evict the normal build; both write their results to one criterion directory.
set -eu
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$PWD/target}
export CRITERION_HOME="${CRITERION_HOME:-$target/criterion}"
rounds=${ROUNDS:-0}

without_spans() {
    CARGO_TARGET_DIR="$target/no-spans" RUSTFLAGS="--cfg duraflow_no_spans" \
        cargo bench --bench spans -- "$@"
}
with_spans() {
    CARGO_TARGET_DIR="$target" cargo bench --bench spans -- "$@"
}

if [ "$rounds" -eq 0 ]; then
    without_spans --save-baseline no-spans "$@"
    with_spans --baseline no-spans "$@"
    exit
fi

ratios=$(mktemp)
trap 'rm -f "$ratios"' EXIT
round=1
while [ "$round" -le "$rounds" ]; do
    echo "== round $round of $rounds ($(uptime | sed 's/.*load/load/'))"
    if [ $((round % 2)) -eq 1 ]; then
        without_spans --save-baseline no-spans "$@" >/dev/null 2>&1
        with_spans --save-baseline spans "$@" >/dev/null 2>&1
    else
        with_spans --save-baseline spans "$@" >/dev/null 2>&1
        without_spans --save-baseline no-spans "$@" >/dev/null 2>&1
    fi
    DURAFLOW_SPANS_COMPARE=1 with_spans 2>/dev/null | tee -a "$ratios" | grep 'x  \['
    round=$((round + 1))
done
echo "== median over $rounds rounds (against the build without spans, no_subscriber)"
for id in no_subscriber registry_only progress_layer progress_layer_global; do
    grep "^$id " "$ratios" | awk '{ sub("x", "", $2); print $2 }' | sort -n |
        awk -v id="$id" '{ v[NR] = $1 } END {
            if (NR == 0) exit
            m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            printf "%-16s %.3fx  (%+.1f%%; min %.3f, max %.3f)\n", id, m, (m - 1) * 100, v[1], v[NR]
        }'
done
