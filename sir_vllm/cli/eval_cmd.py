"""`sir-vllm eval TASK`: the paper's tasks and stream perplexity under a policy."""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

from .backend_args import add_backend_args
from .policy_args import add_policy_args, policy_from_args

# The paper's settings per task: budget (start + entropy + recent) and decay.
TASK_DEFAULTS = {
    "grocery": {"budget": 1024, "decay": 1.0},
    "dailydialog": {"budget": 512, "decay": 0.7},
    "rps": {"budget": 1024, "decay": 0.9},
    "stream-ppl": {"budget": 1024, "decay": 1.0},
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..eval.data import TASKS
    from ..eval.scoring import SCORING_MODES

    p = sub.add_parser(
        "eval", help="run a paper task (grocery, dailydialog, rps) or stream-ppl under a KV policy",
        description=(
            "Run one of the SirLLM paper's tasks with a bounded KV cache. grocery: remember a "
            "grocery across 20 CommonsenseQA questions (ACC_c, ACC_g); dailydialog: pick the "
            "best response (acc); rps: Rock-Paper-Scissors against three biased players "
            "(win/tie/lose); stream-ppl: perplexity of the DailyDialog text fed turn by turn. "
            "Unset knobs take the paper's settings for the task (grocery/rps/stream-ppl: "
            "budget 1024; dailydialog: 512; decay 1.0 / 0.7 / 0.9 / 1.0)."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("task", choices=TASKS)
    add_backend_args(p)
    p.add_argument("--concurrency", type=int, default=8,
                   help="server backend: sessions (dialogues, RPS players) in flight at once, "
                        "one session per dialogue")
    add_policy_args(p)
    p.add_argument("--scoring", choices=SCORING_MODES, default="text",
                   help="letter: log-prob of the choice letter (the paper); text: length-"
                        "normalised log-likelihood of the choice text (lm-eval acc_norm)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the SirLLM data folder (default: ../shared/data/sirllm beside the repo)")
    p.add_argument("--data", type=Path, default=None,
                   help="one file in the task's format instead (rps: one player's file)")
    p.add_argument("--limit", type=int, default=None,
                   help="grocery: dialogues; dailydialog: rows (default 2000, the paper's); "
                        "rps: rounds per player (default 2000); stream-ppl: tokens (default 50000)")
    p.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..eval import data, report, tasks
    from ..eval.backends import make_backend

    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    defaults = TASK_DEFAULTS[args.task]
    policy = policy_from_args(args, **defaults)
    data_dir = args.data_dir or data.default_data_dir()
    if args.backend == "reference" and not args.model:
        raise ValueError("--backend reference needs --model DIR")
    backend = make_backend(args.backend, model=args.model, url=args.url, api_key=args.api_key,
                           concurrency=args.concurrency, served_model_name=args.served_model_name)
    started = time.monotonic()
    predictions = None
    if args.task == "grocery":
        path = args.data or data.default_file("grocery", data_dir)
        episodes = data.load_grocery(path, args.limit)
        predictions = tasks.run_choice_episodes(backend, policy, episodes, args.scoring, "grocery")
        metrics = tasks.grocery_metrics(predictions)
    elif args.task == "dailydialog":
        path = args.data or data.default_file("dailydialog", data_dir)
        episodes = data.load_dailydialog(path, args.limit or 2000)
        predictions = tasks.run_choice_episodes(backend, policy, episodes, args.scoring,
                                                "dailydialog")
        metrics = tasks.dailydialog_metrics(predictions)
    elif args.task == "rps":
        files = {Path(args.data).stem: args.data} if args.data else data.rps_files(data_dir)
        path = [str(f) for f in files.values()]
        episodes = [data.load_rps(f, args.limit or 2000, player) for player, f in files.items()]
        rows = tasks.run_choice_episodes(backend, policy, episodes, args.scoring, "rps")
        by_player = {player: [r for r in rows if r["episode"] == e.id]
                     for player, e in zip(files, episodes)}
        metrics = tasks.rps_metrics(by_player)
        predictions = [dict(p, player=k) for k, rows in by_player.items() for p in rows]
    else:
        path = args.data or data.default_file("stream-ppl", data_dir)
        metrics = tasks.run_stream_ppl(backend, policy, data.load_dialogue_stream(path),
                                       args.limit or 50_000)
    result = {
        "task": args.task, "backend": args.backend,
        "model": str(args.model or getattr(backend, "tokenizer_path", None)),
        **({"url": backend.url, "concurrency": backend.concurrency}
           if args.backend == "server" else {}),
        "policy": policy.to_dict(), "scoring": args.scoring if args.task != "stream-ppl" else None,
        "data": str(path), "limit": args.limit, "metrics": metrics,
        "seconds": round(time.monotonic() - started, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "predictions": predictions,
    }
    print(report.table(result))
    print(f"({result['seconds']} s)")
    if args.out:
        report.write_json(result, args.out)
        print(f"wrote {args.out}")
    return 0
