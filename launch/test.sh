#!/usr/bin/env bash
# Run the test suite, doing all set-up first. Extra arguments go to pytest
# (e.g. `-m slow` for the long benchmarks, `-k policy`).
set -euo pipefail
. "$(dirname "$0")/setup.sh"
cd "$SIR_VLLM_ROOT"
exec python -m pytest "$@"
