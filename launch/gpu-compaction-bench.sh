#!/usr/bin/env bash
# The GPU checks of the fused KV compaction (issue 14), in one command, on a
# CUDA machine with torch and triton installed. vLLM is not needed and never
# imported; nothing is installed (the package runs from this checkout).
#
#   bash launch/gpu-compaction-bench.sh [extra sir-vllm bench-compaction args]
#
# 1. tests/test_kv_fused.py on CUDA (the compiled Triton kernel against the
#    reference, bit for bit in fp32/fp16/bf16), if pytest is installed;
# 2. `sir-vllm bench-compaction` on a Llama-3-8B-shaped cache (32 layers, 8 KV
#    heads, head_dim 128, fp16, block 16, 1K kept tokens into new blocks):
#    the Triton kernel over a small tuning grid, then the whole worker call on
#    the Triton and torch paths, each against Tensor.copy_ of the same bytes;
#    goal: the kernel at >= 70% of that copy bandwidth;
# 3. the same with --in-place (overlapping slots, staged) and in bfloat16.
#
# Results: stdout, and JSON + logs under $OUT (if set) or /tmp/sir-vllm-compaction-bench/.
# About 2-4 minutes on an H100/H200 (mostly Triton compiles). Exit status:
# non-zero if a test fails or a path differs from the reference.
#
#   PYTHON   the interpreter with torch + triton (default: python3)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESULTS="${OUT:-${TMPDIR:-/tmp}/sir-vllm-compaction-bench}"
PY="${PYTHON:-python3}"
mkdir -p "$RESULTS"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
log() { printf '[gpu-compaction-bench] %s\n' "$*" >&2; }

nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>&1 | tee "$RESULTS/gpu.txt"
"$PY" - <<'EOF' || { log "needs torch with CUDA, triton and numpy"; exit 2; }
import numpy, torch, triton
assert torch.cuda.is_available(), "torch sees no CUDA device"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"{torch.cuda.get_device_name()}")
EOF

status=0
if "$PY" -c "import pytest" 2>/dev/null; then
  log "tests/test_kv_fused.py (CPU interpreter + CUDA compiled)"
  # --noconftest: the suite's conftest starts vllm serve fixtures; these tests need none.
  timeout 900 "$PY" -m pytest tests/test_kv_fused.py -q -p no:cacheprovider --noconftest \
      2>&1 | tee "$RESULTS/test_kv_fused.log" | tail -15
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  log "pytest not installed: skipping tests/test_kv_fused.py (the bench still checks each path)"
fi

bench() {  # NAME ARGS...
  local name=$1; shift
  log "bench-compaction $name: $*"
  timeout 600 "$PY" -m sir_vllm.cli.main bench-compaction --device cuda --json "$RESULTS/$name.json" "$@" \
      2>&1 | tee "$RESULTS/$name.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}
bench llama3-8b-fp16 --block-t 8,16,32 --head-group 1,2,8 --num-warps 2,4,8 "$@"
bench llama3-8b-fp16-in-place --in-place "$@"
bench llama3-8b-bf16 --dtype bfloat16 "$@"

"$PY" - "$RESULTS" <<'EOF'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    goal = r.get("goal", {})
    kernel = goal.get("best_kernel_of_copy")
    checks = ", ".join(f"{k}: {'exact' if c['bit_exact'] else 'DIFFER'}" for k, c in r["checks"].items())
    print(f"{f.stem:<28} copy {r['copy']['gb_per_s']:7.1f} GB/s  best kernel "
          f"{'-' if kernel is None else f'{kernel:.0%}'} of copy {goal.get('best_tuning', '')}  [{checks}]")
EOF
log "results in $RESULTS (exit $status)"
exit $status
