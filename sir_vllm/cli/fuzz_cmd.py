"""`sir-vllm bench-fuzz`: the seeded fuzzer of session requests against a server."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

# The CI fuzz test's server (tests/conftest.py session_server): the same flags here.
POLICY_ARGS = ["--kv-policy", "sirllm", "--kv-start-size", "4", "--kv-entropy-size", "64",
               "--kv-recent-size", "32", "--kv-max-turn-tokens", "8000"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-fuzz",
        help="fuzz session requests: every one a 4xx with a reason, the canary unchanged",
        description=(
            "Send --requests seeded hostile session requests (bad types and sizes, unicode and "
            "NUL, out-of-vocabulary token ids, huge ids and bodies, bad kv_policy, reserved "
            "fields, aborted streams; a few valid turns) to a server (--url) or to one started "
            "here (the bundled model unless --model), then check /health and that a canary "
            "session's memory is unchanged and answers as its twin. Exit status 1 on any 5xx, "
            "hang, 4xx without a reason, bad input accepted or canary change."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--timeout", type=float, default=60.0, help="one request's limit (a hang beyond)")
    p.add_argument("--url", default=None, help="a running server [default: start one here]")
    p.add_argument("--served-name", default="SmolLM2-135M-Instruct",
                   help="the model name the server serves (with --url)")
    p.add_argument("--model", type=Path, default=None, help="checkpoint to serve [default: the bundled]")
    p.add_argument("--max-turn-tokens", type=int, default=8000,
                   help="the server's --kv-max-turn-tokens (sizes the huge cases)")
    p.add_argument("--server-args", default="", help="extra `vllm serve` arguments, one string")
    p.add_argument("--log", type=Path, default=Path("/tmp/sir-vllm-fuzz-server.log"))
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..bench.fuzz import run_fuzz

    server = None
    url, name = args.url, args.served_name
    if url is None:
        from ..models.bundled import prepare
        from ..server.process import CPU_DEFAULT_ARGS, ServerProcess

        model = args.model or prepare()
        name = "fuzz"
        server = ServerProcess(model=str(model), served_model_name=name, log_path=args.log,
                               extra_args=[*CPU_DEFAULT_ARGS, "--max-model-len", "4096", *POLICY_ARGS,
                                           *shlex.split(args.server_args)]).start(timeout=900)
        url = server.url
    try:
        report = run_fuzz(url, name, n=args.requests, seed=args.seed, concurrency=args.concurrency,
                          timeout=args.timeout, max_turn_tokens=args.max_turn_tokens,
                          progress=None)
    finally:
        if server is not None:
            server.stop()
    print(report.summary())
    for kind, counts in sorted(report.by_kind.items()):
        print(f"  {kind}: {dict(sorted(counts.items(), key=str))}")
    return 1 if report.failures else 0
