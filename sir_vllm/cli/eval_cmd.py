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
    "recall-distance": {"budget": 1024, "decay": 1.0},
}
# recall-distance: the distances (filler turns), facts per distance, and the
# filler answers' length (16 tokens: a short chat reply; SmolLM2-135M's
# answers run longer, so most are cut there, which keeps a k=500 conversation
# near 20K tokens and one policy's run through the server near an hour with
# `--facts 40 40 40 8`: docs/results/recall-commands.txt).
DEFAULT_DISTANCES = [5, 20, 100, 500]
DEFAULT_FACTS = 40
DEFAULT_ANSWER_TOKENS = 16


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..eval.data import TASKS
    from ..eval.scoring import SCORING_MODES

    p = sub.add_parser(
        "eval", help="run a paper task (grocery, dailydialog, rps), stream-ppl or recall-distance "
                     "under a KV policy",
        description=(
            "Run one of the SirLLM paper's tasks with a bounded KV cache. grocery: remember a "
            "grocery across 20 CommonsenseQA questions (ACC_c, ACC_g); dailydialog: pick the "
            "best response (acc); rps: Rock-Paper-Scissors against three biased players "
            "(win/tie/lose); stream-ppl: perplexity of the DailyDialog text fed turn by turn; "
            "recall-distance: a fact (a name, a number, a place) told in one turn, k turns of "
            "unrelated DailyDialog chat answered by the model itself, then a 4-way question "
            "about the fact (accuracy per k, and whether the fact was still in the cache). "
            "Unset knobs take the paper's settings for the task (grocery/rps/stream-ppl/"
            "recall-distance: budget 1024; dailydialog: 512; decay 1.0 / 0.7 / 0.9 / 1.0 / 1.0)."),
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
                   help="one file in the task's format instead (rps: one player's file; "
                        "recall-distance: the filler text, default dailydialog/"
                        "dialogues_validation.txt)")
    p.add_argument("--limit", type=int, default=None,
                   help="grocery: dialogues; dailydialog: rows (default 2000, the paper's); "
                        "rps: rounds per player (default 2000); stream-ppl: tokens (default "
                        "50000); recall-distance: use --facts")
    p.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    r = p.add_argument_group("recall-distance")
    r.add_argument("--distances", type=int, nargs="+", default=DEFAULT_DISTANCES, metavar="K",
                   help="filler turns between the fact and its question")
    r.add_argument("--facts", type=int, nargs="+", default=[DEFAULT_FACTS], metavar="N",
                   help="facts (episodes) per distance: one count for every K, or one per K "
                        "(facts 0..N-1 of the seed, the same at every K and for every policy; "
                        "`--facts 40 40 40 8` with the default distances: about an hour per "
                        "policy through a server on 2 cores)")
    r.add_argument("--seed", type=int, default=0, help="the facts and their fillers")
    r.add_argument("--answer-tokens", type=int, default=DEFAULT_ANSWER_TOKENS,
                   help="the longest filler answer the model generates (greedy; it stops "
                        "earlier at its end-of-message token)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..eval import data, report, tasks
    from ..eval.backends import make_backend

    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    defaults = TASK_DEFAULTS[args.task]
    policy = policy_from_args(args, **defaults)
    data_dir = args.data_dir or data.default_data_dir()
    if args.task == "recall-distance":  # the data first: a bad flag fails before the model loads
        from ..eval import recall, recall_data

        settings = _recall_settings(args)
        path = args.data or recall_data.default_filler_file(data_dir)
        episodes = recall_data.build_episodes(settings["distances"], settings["facts"],
                                              settings["seed"], recall_data.load_fillers(path))
    elif _recall_flags_given(args):
        raise ValueError("--distances, --facts, --seed and --answer-tokens apply to "
                         "recall-distance only")
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
    elif args.task == "stream-ppl":
        path = args.data or data.default_file("stream-ppl", data_dir)
        metrics = tasks.run_stream_ppl(backend, policy, data.load_dialogue_stream(path),
                                       args.limit or 50_000)
    else:
        predictions, skipped = recall.run_recall(backend, policy, episodes, args.scoring,
                                                 settings["answer_tokens"])
        metrics = recall.recall_metrics(predictions, settings["distances"], skipped)
    result = {
        "task": args.task, "backend": args.backend,
        "model": str(args.model or getattr(backend, "tokenizer_path", None)),
        **({"url": backend.url, "concurrency": backend.concurrency}
           if args.backend == "server" else {}),
        "policy": policy.to_dict(), "scoring": args.scoring if args.task != "stream-ppl" else None,
        "data": str(path), "limit": args.limit,
        **({"recall": settings} if args.task == "recall-distance" else {}),
        "metrics": metrics,
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


def _recall_flags_given(args: argparse.Namespace) -> bool:
    return (args.distances != DEFAULT_DISTANCES or args.facts != [DEFAULT_FACTS]
            or args.seed != 0 or args.answer_tokens != DEFAULT_ANSWER_TOKENS)


def _recall_settings(args: argparse.Namespace) -> dict:
    """recall-distance's flags, checked: the distances, the facts per distance."""
    if args.limit is not None:
        raise ValueError("--limit does not apply to recall-distance: use --facts N per distance")
    distances = list(args.distances)
    if any(k < 0 for k in distances) or len(set(distances)) != len(distances):
        raise ValueError(f"--distances must be distinct numbers >= 0, got {distances}")
    facts = list(args.facts)
    if len(facts) == 1:
        facts = facts * len(distances)
    if len(facts) != len(distances):
        raise ValueError(f"--facts takes one count or one per distance ({len(distances)}), "
                         f"got {len(facts)}")
    if any(n < 1 for n in facts):
        raise ValueError(f"--facts must be >= 1, got {args.facts}")
    if args.answer_tokens < 1:
        raise ValueError(f"--answer-tokens must be >= 1, got {args.answer_tokens}")
    return {"distances": distances, "facts": facts, "seed": args.seed,
            "answer_tokens": args.answer_tokens}
