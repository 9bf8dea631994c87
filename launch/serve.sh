#!/usr/bin/env bash
# Start the OpenAI-compatible server on the bundled SmolLM2-135M-Instruct,
# on 127.0.0.1:8000, with SirLLM session memory (4 sinks + 1020 tokens kept by
# surprisal, the paper's setting, kept as the default by measurement: see
# README, "Choosing the split"), doing all set-up first. Extra arguments go
# to `vllm serve` and override these (e.g. --port 8001 --kv-decay 0.9).
set -euo pipefail
. "$(dirname "$0")/setup.sh"

args=(--host 127.0.0.1 --port 8000 --served-model-name SmolLM2-135M-Instruct
      --max-model-len 8192
      --kv-policy sirllm --kv-start-size 4 --kv-entropy-size 1020 --kv-recent-size 0)
if [ "$SIR_VLLM_TARGET" = cpu ]; then
  # float32 on the CPU, and a fixed 4 GiB KV pool (about 90K tokens here).
  args+=(--dtype float32 --kv-cache-memory-bytes 4G)
fi
exec vllm serve "$SIR_VLLM_MODEL" "${args[@]}" "$@"
