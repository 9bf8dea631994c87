"""Shared fixtures: the prepared model and the `vllm serve` processes.

An engine takes one to three minutes to start on the CPU (about 50 s with
`--enforce-eager`, 150 s compiled), so tests share two servers per test
session: stock (`server`) and SirLLM (`session_server`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sir_vllm.models.bundled import prepare
from sir_vllm.server.process import CPU_DEFAULT_ARGS, ServerProcess

SERVED_NAME = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    return prepare()


def started_server(model: Path, log_dir: Path, extra_args: list[str], env: dict | None = None):
    """A real `vllm serve` on the bundled model; the caller stops it."""
    proc = ServerProcess(model=str(model), served_model_name=SERVED_NAME,
                         extra_args=extra_args, log_path=log_dir / "vllm-serve.log",
                         env=env or {})
    return proc.start(timeout=float(os.environ.get("SIR_VLLM_SERVER_TIMEOUT", "900")))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from sir_vllm.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_serving_model(tmp_path_factory) -> Path:
    """A tiny model vLLM's CPU kernels serve: head_dim 64 (SmolLM2's; the 16 of
    `tiny_model` fails at the first forward on the CPU) and 2 KV heads, so it
    also splits over 2 tensor-parallel ranks."""
    from sir_vllm.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-serving"), hidden=128, heads=2, kv_heads=2)


@pytest.fixture(scope="session")
def plugin_probe(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("probe") / "plugin-loads.tsv"


@pytest.fixture(scope="session")
def server(bundled_model, plugin_probe, tmp_path_factory):
    """`vllm serve` on the bundled model, started through the real CLI.

    `--enforce-eager`: compiling the model costs about 100 s of the start here
    and its few requests gain nothing from it; `session_server` keeps vLLM's
    default (compiled) path, the one `launch/serve.sh` runs."""
    proc = started_server(bundled_model, tmp_path_factory.mktemp("server"),
                          [*CPU_DEFAULT_ARGS, "--enforce-eager", "--max-model-len", "4096"],
                          env={"SIR_VLLM_PLUGIN_PROBE": str(plugin_probe)})
    yield proc
    proc.stop()


# The sessions tests' server: small SirLLM budget, so a few turns evict.
SESSION_POLICY_ARGS = ["--kv-policy", "sirllm", "--kv-start-size", "4",
                       "--kv-entropy-size", "64", "--kv-recent-size", "32",
                       "--kv-max-turn-tokens", "8000"]


@pytest.fixture(scope="session")
def session_server(bundled_model, tmp_path_factory):
    """`vllm serve --kv-policy sirllm` on the bundled model (one per test session)."""
    proc = started_server(bundled_model, tmp_path_factory.mktemp("session-server"),
                          [*CPU_DEFAULT_ARGS, "--max-model-len", "4096", *SESSION_POLICY_ARGS])
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def session_client(session_server):
    from openai import OpenAI

    return OpenAI(base_url=session_server.url + "/v1", api_key="unused", timeout=300)


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=300)


@pytest.fixture(params=["cpu", "gpu"])
def kind(request):
    """A KV layout to test on synthetic tensors: vLLM's packed CPU pages, or the
    GPU backends' (indexed on the CPU here)."""
    if request.param == "cpu":
        pytest.importorskip("vllm._custom_ops")
    return request.param
