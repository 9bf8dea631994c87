"""vLLM internals are reached through one module, pinned to the tested version."""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import pytest

import sir_vllm
from sir_vllm import vllm_adapter

PACKAGE = Path(sir_vllm.__file__).parent


def _vllm_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "vllm"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
            found.append(node.module)
    return found


def test_only_the_adapter_imports_vllm():
    offenders = {str(p.relative_to(PACKAGE)): _vllm_imports(p)
                 for p in PACKAGE.rglob("*.py") if p.name != "vllm_adapter.py"}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert _vllm_imports(PACKAGE / "vllm_adapter.py")  # the check can see an import


def test_installed_vllm_is_the_pinned_version():
    vllm_adapter.check_version()
    assert vllm_adapter.vllm_version().startswith(vllm_adapter.VLLM_VERSION)


# -- vLLM's config, CLI and frontend, through the adapter ------------------------

@pytest.fixture(scope="module")
def engine_config(bundled_model):
    """`VllmConfig`s vLLM itself builds for the bundled model (no engine started)."""
    from vllm.engine.arg_utils import EngineArgs

    def build(**kwargs):
        return EngineArgs(model=str(bundled_model), **kwargs).create_engine_config()

    return build


def _bytes_from_config_json(model_dir: Path, dtype_bytes: int) -> int:
    c = json.loads((Path(model_dir) / "config.json").read_text())
    head = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * kv_heads * head * dtype_bytes


@pytest.mark.parametrize("kwargs, dtype_bytes", [
    ({"dtype": "float32"}, 4),  # kv cache "auto": the model's dtype
    ({"dtype": "float32", "kv_cache_dtype": "fp8"}, 1),
    ({"dtype": "float32", "kv_cache_dtype": "fp8_e5m2"}, 1),
    ({"dtype": "float32", "kv_cache_dtype": "bfloat16"}, 2),
])
def test_kv_bytes_per_token_follows_the_kv_cache_dtype(engine_config, bundled_model, kwargs,
                                                       dtype_bytes):
    config = engine_config(**kwargs)
    assert config.cache_config.cache_dtype == kwargs.get("kv_cache_dtype", "auto")
    assert vllm_adapter.kv_bytes_per_token(config) == _bytes_from_config_json(bundled_model,
                                                                              dtype_bytes)


def test_chat_template_loads_a_file_or_inline_jinja(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    assert vllm_adapter.load_chat_template(str(path)) == path.read_text()
    inline = "{{ messages[0].content }}\n"
    assert vllm_adapter.load_chat_template(inline) == inline
    assert vllm_adapter.load_chat_template(None) is None
    with pytest.raises(ValueError, match="no_such_template.jinja"):
        vllm_adapter.load_chat_template(str(tmp_path / "no_such_template.jinja"))


def test_parser_options_and_middleware_list():
    p = argparse.ArgumentParser()
    assert not vllm_adapter.has_option(p, "--kv-policy")
    p.add_argument("--kv-policy")
    assert vllm_adapter.has_option(p, "--kv-policy") and not vllm_adapter.has_option(p, "--kv")
    args = argparse.Namespace(middleware=None)
    assert vllm_adapter.add_middleware(args, "a.B") and args.middleware == ["a.B"]
    args.middleware = ["x.Y"]
    vllm_adapter.add_middleware(args, "a.B")
    vllm_adapter.add_middleware(args, "a.B")  # once only
    assert args.middleware == ["x.Y", "a.B"]
    assert not vllm_adapter.add_middleware(argparse.Namespace(), "a.B")  # an engine-only parser
