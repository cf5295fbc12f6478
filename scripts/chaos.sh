#!/usr/bin/env bash
# Long run of the chaos harness (tests/chaos.rs) in release mode.
#
#   scripts/chaos.sh FIRST_SEED LAST_SEED STEPS [LOG]
#
# Runs seeds FIRST..=LAST with STEPS fault steps each, one seed per test
# invocation (a violation in one seed does not stop the others), and prints
# the totals to paste into RELIABILITY.md: seeds, steps, faults by kind,
# operator actions (refused), migrations, bytes checked, violations, and
# the one-line rerun command of every failing seed. Extra environment
# (DLSM_CHAOS_NO=..., DLSM_CHAOS_NODES=...) is passed through.
set -uo pipefail
first=${1:?usage: scripts/chaos.sh FIRST_SEED LAST_SEED STEPS [LOG]}
last=${2:?usage: scripts/chaos.sh FIRST_SEED LAST_SEED STEPS [LOG]}
steps=${3:?usage: scripts/chaos.sh FIRST_SEED LAST_SEED STEPS [LOG]}
cd "$(dirname "$0")/.."
log=${4:-target/chaos-$first-$last-$steps.log}
mkdir -p "$(dirname "$log")"
: >"$log"
bin=$(cargo test --release --test chaos --no-run 2>&1 | sed -n 's/.*Executable tests\/chaos.rs (\(.*\))/\1/p' | tail -1)
[ -x "$bin" ] || { echo "cannot build the chaos test"; exit 1; }
echo "chaos binary: $bin"
start=$(date +%s)
for seed in $(seq "$first" "$last"); do
    DLSM_CHAOS_SEED=$seed DLSM_CHAOS_STEPS=$steps DLSM_CHAOS_RUNS=1 \
        "$bin" --nocapture >>"$log" 2>&1
    grep "^CHAOS seed=$seed " "$log" | tail -1
done
secs=$(($(date +%s) - start))
echo
echo "== chaos long run: seeds $first..=$last, $steps steps each, $(date -u +%FT%TZ), ${secs}s, $(git rev-parse --short HEAD)"
grep '^CHAOS seed=' "$log" | awk -v secs="$secs" '
{
    gsub(/\(refused /, "(refused_");
    for (i = 2; i <= NF; i++) {
        split($i, kv, "=");
        k = kv[1]; v = substr($i, length(k) + 2);
        if (k == "steps" || k == "bytes_checked" || k == "violations" || k == "writes_acked" || k == "reads_checked") tot[k] += v;
        else if (k == "faults" || k == "operator" || k == "migrations" || k == "stale") {
            n = split(v, parts, ",");
            for (j = 1; j <= n; j++) {
                split(parts[j], p, ":");
                if (p[1] == "") continue;
                name = k "." p[1];
                val = p[2]; ref = 0;
                if (match(val, /\(refused_[0-9]+\)/)) { ref = substr(val, RSTART + 9, RLENGTH - 10); val = substr(val, 1, RSTART - 1) }
                sum[name] += val; refused[name] += ref; seen[name] = 1;
            }
        }
    }
    seeds++;
}
END {
    printf "seeds=%d steps=%d writes_acked=%d reads_checked=%d bytes_checked=%d violations=%d\n", seeds, tot["steps"], tot["writes_acked"], tot["reads_checked"], tot["bytes_checked"], tot["violations"];
    for (k in seen) {
        if (k ~ /^operator\./) printf "  %s=%d (refused %d)\n", k, sum[k], refused[k];
        else printf "  %s=%d\n", k, sum[k];
    }
}' | sort
echo "violations:"
grep '^CHAOS VIOLATION' "$log" | sed 's/^CHAOS VIOLATION /  /' || true
grep -- '--- rerun: ' "$log" | sed 's/^--- rerun: /  rerun: /' | sort -u || true
echo "full log: $log"
