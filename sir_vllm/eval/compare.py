"""Do two eval runs pick the same answers? (`sir-vllm eval-compare A.json B.json`)

Two result JSONs of one task and subset (say the oracle and a server, or two
servers) are matched row by row (player, episode, turn id). The report gives
the agreement rate of the picks and lists each disagreement with both runs'
margin between their top two candidates: a flip on a near-tie is noise in the
last digits (float32 vs float64 logits, a keep set decided by a near-equal
score), a flip on a wide margin is a real difference.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .scoring import margin


def _keyed(rows: list[dict]) -> dict[tuple, dict]:
    """Rows by (player, episode, turn number in the episode, id): turn ids
    alone repeat within a dialogue (every Grocery question of dialogue 3 is "3")."""
    seen: dict[tuple, int] = {}
    out = {}
    for row in rows:
        episode = (row.get("player"), row.get("episode"))
        n = seen[episode] = seen.get(episode, -1) + 1
        out[(*episode, n, row.get("id"))] = row
    return out


def compare(a: dict, b: dict) -> dict:
    """The comparison of two result dicts (as `sir-vllm eval --out` writes them)."""
    if a.get("task") != b.get("task"):
        raise ValueError(f"different tasks: {a.get('task')!r} vs {b.get('task')!r}")
    out = {"task": a["task"], "scoring": [a.get("scoring"), b.get("scoring")],
           "runs": [_run_label(a), _run_label(b)],
           "metrics": [a.get("metrics"), b.get("metrics")]}
    if a["task"] == "stream-ppl":
        pa, pb = a["metrics"]["ppl"], b["metrics"]["ppl"]
        out["ppl_relative_difference"] = abs(pa - pb) / max(abs(pa), 1e-12)
        return out
    rows_a, rows_b = _keyed(a.get("predictions") or []), _keyed(b.get("predictions") or [])
    common = [k for k in rows_a if k in rows_b]
    if not common:
        raise ValueError("the two runs share no prediction rows (same task and subset?)")
    disagreements = []
    for k in common:
        ra, rb = rows_a[k], rows_b[k]
        if ra["pred"] != rb["pred"]:
            disagreements.append({
                "player": k[0], "episode": k[1], "turn": k[2], "id": k[3], "kind": ra.get("kind"),
                "gold": ra.get("gold"), "pred": [ra["pred"], rb["pred"]],
                "margin": [margin(ra.get("scores")), margin(rb.get("scores"))],
                "scores": [ra.get("scores"), rb.get("scores")]})
    out.update(n_compared=len(common), n_agree=len(common) - len(disagreements),
               agreement=(len(common) - len(disagreements)) / len(common),
               only_in=[len(rows_a) - len(common), len(rows_b) - len(common)],
               disagreements=disagreements)
    streams = [k for k in common if "answers_sha1" in rows_a[k] and "answers_sha1" in rows_b[k]]
    if streams:  # recall-distance: did both generate the same filler answers, token for token?
        out["n_same_answers"] = sum(rows_a[k]["answers_sha1"] == rows_b[k]["answers_sha1"]
                                    for k in streams)
        out["n_answer_streams"] = len(streams)
    return out


def _run_label(result: dict) -> str:
    from .report import policy_label

    where = result.get("backend", "?")
    if result.get("url"):
        where += f" {result['url']}"
    return f"{where}, {policy_label(result['policy'])}, limit {result.get('limit')}"


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def table(cmp: dict, names: tuple[str, str] = ("A", "B"), max_rows: int = 50) -> str:
    lines = [f"{names[0]}: {cmp['runs'][0]}", f"{names[1]}: {cmp['runs'][1]}"]
    if cmp["scoring"][0] != cmp["scoring"][1]:
        lines.append(f"warning: different scoring modes {cmp['scoring']}")
    if cmp["task"] == "stream-ppl":
        pa, pb = (m["ppl"] for m in cmp["metrics"])
        lines.append(f"ppl {pa:.4f} vs {pb:.4f} (relative difference "
                     f"{cmp['ppl_relative_difference']:.2e})")
        return "\n".join(lines)
    lines.append(f"agreement {cmp['agreement']:.4f} ({cmp['n_agree']}/{cmp['n_compared']} picks)")
    if "n_answer_streams" in cmp:
        lines.append(f"same generated answers, token for token: {cmp['n_same_answers']}/"
                     f"{cmp['n_answer_streams']} episodes")
    if any(cmp["only_in"]):
        lines.append(f"rows in one run only: {names[0]} {cmp['only_in'][0]}, "
                     f"{names[1]} {cmp['only_in'][1]}")
    if cmp["disagreements"]:
        lines += ["", f"| episode | turn (id) | kind | gold | pick {names[0]} | pick {names[1]} "
                      f"| margin {names[0]} | margin {names[1]} |",
                  "|---|---|---|---|---|---|---|---|"]
        for d in cmp["disagreements"][:max_rows]:
            episode = d["episode"] if d["player"] is None else f"{d['player']} {d['episode']}"
            lines.append(f"| {episode} | {d['turn']} ({d['id']}) | {d['kind']} | {d['gold']} | {d['pred'][0]} "
                         f"| {d['pred'][1]} | {_fmt(d['margin'][0])} | {_fmt(d['margin'][1])} |")
        if len(cmp["disagreements"]) > max_rows:
            lines.append(f"... {len(cmp['disagreements']) - max_rows} more (see --out)")
    return "\n".join(lines)


def compare_files(path_a: Path, path_b: Path) -> dict:
    a, b = (json.loads(Path(p).read_text()) for p in (path_a, path_b))
    out = compare(a, b)
    out["files"] = [str(path_a), str(path_b)]
    return out
