#!/usr/bin/env bash
# Recall against distance through the server (docs/results/recall-commands.txt):
# run the named recall lines of docs/results/oracle-commands.txt with
# launch/results-server.sh (one `vllm serve --kv-policy sirllm`, --concurrency 8;
# runs whose JSON exists are skipped), then draw every recall result there into
# docs/results/server/recall-distance.png and its table (recall-distance.md).
# Default names: the six policies, about an hour each on 2 cores (5.3 h in all;
# several at once against one server finish sooner: docs/results/recall-commands.txt).
set -euo pipefail
. "$(dirname "$0")/setup.sh"
cd "$SIR_VLLM_ROOT"
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(recall-sirllm recall-sirllm-d0.9 recall-streaming recall-full
  recall-sirllm-764-256 recall-sirllm-956-64)
bash launch/results-server.sh "${names[@]}"
out=docs/results/server
mapfile -t runs < <(ls "$out"/recall-*-server.json 2>/dev/null)
[ ${#runs[@]} -gt 0 ] || { echo "[results] no recall results in $out"; exit 1; }
sir-vllm eval-plot "${runs[@]}" --out "$out/recall-distance.png" | tee "$out/recall-distance.md"
