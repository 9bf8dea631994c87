"""Tables in the paper's layout (Markdown, printed and written) and JSON."""

from __future__ import annotations

import json
from pathlib import Path


def policy_label(policy: dict) -> str:
    if policy["name"] == "sirllm":
        return (f"SirLLM {policy['start_size']}+{policy['entropy_size']}+{policy['recent_size']}"
                f" d={policy['decay']:g} ({policy['score']})")
    if policy["name"] == "streaming":
        return f"StreamingLLM {policy['start_size']}+{policy['recent_size']}"
    return "full cache"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table(result: dict) -> str:
    task, m, label = result["task"], result["metrics"], policy_label(result["policy"])
    if task == "grocery":
        kept = _pct(m["key_in_cache"]) if "key_in_cache" in m else "n/a"
        rows = ["| method | scoring | ACC_c | ACC_g | key in cache at recall | dialogues |",
                "|---|---|---|---|---|---|",
                f"| {label} | {result['scoring']} | {_pct(m['acc_c'])} | {_pct(m['acc_g'])} "
                f"| {kept} | {m['n_dialogues']} |"]
    elif task == "dailydialog":
        rows = ["| method | scoring | Acc | rows |", "|---|---|---|---|",
                f"| {label} | {result['scoring']} | {_pct(m['acc'])} | {m['n_rows']} |"]
    elif task == "rps":
        players = [p for p in m if p != "avg_win"]
        head = "| method | scoring | " + " | ".join(f"{p} win/tie/lose" for p in players) + " | avg win |"
        cells = " | ".join(f"{_pct(m[p]['win'])}/{_pct(m[p]['tie'])}/{_pct(m[p]['lose'])}"
                           for p in players)
        rows = [head, "|---|---|" + "---|" * len(players) + "---|",
                f"| {label} | {result['scoring']} | {cells} | {_pct(m['avg_win'])} |"]
    elif task == "recall-distance":
        rows = ["| method | scoring | k | facts | distance (tokens) | accuracy | fact in cache "
                "| max retained |", "|---|---|---|---|---|---|---|---|"]
        for k, row in m["per_k"].items():
            if "skipped" in row:
                rows.append(f"| {label} | {result['scoring']} | {k} | 0 | – | skipped | – | – |")
                continue
            rows.append(f"| {label} | {result['scoring']} | {k} | {row['n_facts']} "
                        f"| {row['mean_distance_tokens']:.0f} | {_pct(row['acc'])} "
                        f"| {_pct(row['fact_in_cache'])} | {row['max_retained']} |")
        rows += [f"\nk={k}: {why}" for k, why in m.get("skipped", {}).items()]
    else:
        rows = ["| method | PPL | tokens |", "|---|---|---|",
                f"| {label} | {m['ppl']:.3f} | {m['n_tokens']} |"]
    return "\n".join(rows)


def read_results(paths: list[Path], tasks: tuple[str, ...], refusal: str) -> list[dict]:
    """Result JSONs (`sir-vllm eval --out`) of the given tasks, each with its path
    under `_file`; a missing file or another task's result is an error (`refusal`
    says what the command takes)."""
    results = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"no such result file: {path}")
        result = json.loads(path.read_text())
        if result.get("task") not in tasks:
            raise ValueError(f"{path}: a {result.get('task')!r} result; {refusal}")
        result["_file"] = str(path)
        results.append(result)
    return results


def write_json(result: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
