#!/usr/bin/env bash
# Reproduce the oracle's tables in docs/results.md: every line of
# docs/results/oracle-commands.txt ("NAME COMMAND...") runs with the bundled
# model and writes docs/results/oracle/NAME.json (+ .log). Two runs at a time,
# one thread each (faster than one run on two threads on this 2-core machine).
# Runs whose JSON exists are skipped; pass names to run only those.
set -euo pipefail
. "$(dirname "$0")/setup.sh"
cd "$SIR_VLLM_ROOT"
out=docs/results/oracle
mkdir -p "$out"
export OMP_NUM_THREADS=1 SIR_VLLM_MODEL out
grep -v '^\s*$' docs/results/oracle-commands.txt | while read -r name cmd; do
  if [ $# -gt 0 ] && ! printf '%s\n' "$@" | grep -qx "$name"; then continue; fi
  [ -f "$out/$name.json" ] && continue
  printf '%s\t%s\n' "$name" "$cmd"
done | xargs -P 2 -d '\n' -I{} bash -c '
  name="${1%%$'"'"'\t'"'"'*}"; cmd="${1#*$'"'"'\t'"'"'}"
  echo "[results] $name: $cmd"
  $cmd --model "$SIR_VLLM_MODEL" --out "$out/$name.json" > "$out/$name.log" 2>&1 \
    && tail -n 4 "$out/$name.log" | head -n 3 || echo "[results] $name FAILED (see $out/$name.log)"
' _ {}
