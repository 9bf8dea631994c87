#!/usr/bin/env bash
# Reproduce the server tables in docs/results.md ("The paper's tasks through
# the server"): start one `vllm serve --kv-policy sirllm` on the bundled model
# (launch/serve.sh, port 8100; or use a running one: SIR_VLLM_URL=...), run
# the named lines of docs/results/oracle-commands.txt through it
# (--backend server --concurrency 8) into docs/results/server/NAME-server.json,
# then compare each with the oracle's docs/results/oracle/NAME.json
# (compare-NAME.json). One run at a time; the sessions of a run are the
# concurrency. Runs whose JSON exists are skipped. Default names: the table's.
set -euo pipefail
. "$(dirname "$0")/setup.sh"
cd "$SIR_VLLM_ROOT"
out=docs/results/server
mkdir -p "$out"
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(grocery-text-sirllm-512 grocery-text-streaming-512 grocery-text-full
  dailydialog-sirllm-192 dailydialog-streaming-192 dailydialog-full rps-sirllm rps-streaming
  ppl-sirllm ppl-streaming)

url="${SIR_VLLM_URL:-}"
if [ -z "$url" ]; then
  url=http://127.0.0.1:8100
  bash launch/serve.sh --port 8100 > "$out/vllm-serve.log" 2>&1 &
  server=$!
  trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
  echo "[results] starting vllm serve on $url (log: $out/vllm-serve.log)"
  until curl -sf "$url/health" > /dev/null; do
    kill -0 "$server" 2>/dev/null || { echo "[results] vllm serve exited; see $out/vllm-serve.log"; exit 1; }
    sleep 5
  done
fi

for name in "${names[@]}"; do
  cmd="$(awk -v n="$name" '$1 == n { $1 = ""; print substr($0, 2) }' docs/results/oracle-commands.txt)"
  [ -n "$cmd" ] || { echo "[results] $name: not in docs/results/oracle-commands.txt"; exit 2; }
  if [ ! -f "$out/$name-server.json" ]; then
    echo "[results] $name: $cmd --backend server"
    $cmd --model "$SIR_VLLM_MODEL" --backend server --url "$url" --concurrency 8 \
      --out "$out/$name-server.json" > "$out/$name-server.log" 2>&1 \
      || { echo "[results] $name FAILED (see $out/$name-server.log)"; continue; }
  fi
  if [ -f "docs/results/oracle/$name.json" ]; then
    sir-vllm eval-compare "docs/results/oracle/$name.json" "$out/$name-server.json" \
      --out "$out/compare-$name.json" | tail -n 2
  fi
done
