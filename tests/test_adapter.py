"""vLLM internals are reached through one module, pinned to the tested version."""

from __future__ import annotations

import ast
from pathlib import Path

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
