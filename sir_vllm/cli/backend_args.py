"""The backend flags shared by `eval` and `replay`: the oracle here, or a live server."""

from __future__ import annotations

import argparse


def add_backend_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backend")
    g.add_argument("--backend", choices=["reference", "server"], default="reference",
                   help="reference: the PyTorch oracle in this process; server: a running "
                        "`vllm serve --kv-policy sirllm|streaming` (--url), the policy sent "
                        "with every request")
    g.add_argument("--model", default=None,
                   help="checkpoint folder (sir-vllm model prepare); server backend: the "
                        "tokenizer (eval's default: the served model's path)")
    g.add_argument("--url", default=None, help="server base URL, e.g. http://127.0.0.1:8000")
    g.add_argument("--api-key", default="unused", help="server API key (sessions belong to it)")
    g.add_argument("--served-model-name", default=None,
                   help="model name on the server (default: its first model)")
