"""Do two eval runs pick the same answers? (`sir-vllm eval-compare A.json B.json`)

Two result JSONs of one task and subset (say the oracle and a server, or two
servers) are matched row by row (player, episode, turn id). The report gives
the agreement rate of the picks and lists each disagreement with both runs'
margin between their top two candidates: a flip on a near-tie is noise in the
last digits (float32 vs float64 logits, a keep set decided by a near-equal
score), a flip on a wide margin is a real difference.

For two policies on the same questions the question is which is right more
often, and whether by chance: the rows are paired (right in one run only,
each way) and tested with McNemar's exact test, per row kind; `pool` adds
the pairs of several comparisons (say two seeds' facts) into one test.
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
    out["paired"] = _paired(rows_a, rows_b, common)
    streams = [k for k in common if "answers_sha1" in rows_a[k] and "answers_sha1" in rows_b[k]]
    if streams:  # recall-distance: did both generate the same filler answers, token for token?
        out["n_same_answers"] = sum(rows_a[k]["answers_sha1"] == rows_b[k]["answers_sha1"]
                                    for k in streams)
        out["n_answer_streams"] = len(streams)
    return out


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p: under no difference each of the
    only_a + only_b discordant pairs goes either way with probability 1/2."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _counts(right: list[tuple[bool, bool]]) -> dict:
    only_a = sum(a and not b for a, b in right)
    only_b = sum(b and not a for a, b in right)
    return {"n": len(right), "right": [sum(a for a, _ in right), sum(b for _, b in right)],
            "only_a": only_a, "only_b": only_b, "mcnemar_p": mcnemar_exact(only_a, only_b)}


def _paired(rows_a: dict, rows_b: dict, common: list) -> dict:
    """Right in A only / in B only, over all scored rows and per row kind."""
    by_kind: dict[str, list[tuple[bool, bool]]] = {}
    for k in common:
        ra, rb = rows_a[k], rows_b[k]
        if ra.get("gold") is None or rb.get("gold") is None:
            continue
        by_kind.setdefault(str(ra.get("kind")), []).append(
            (ra["pred"] == ra["gold"], rb["pred"] == rb["gold"]))
    if len(by_kind) > 1:
        by_kind = {"all": [r for rights in by_kind.values() for r in rights], **by_kind}
    return {kind: _counts(right) for kind, right in by_kind.items()}


def pool(cmps: list[dict]) -> dict:
    """The paired counts of several comparisons added up, per row kind, tested again."""
    out: dict[str, dict] = {}
    for cmp in cmps:
        for kind, c in cmp.get("paired", {}).items():
            t = out.setdefault(kind, {"n": 0, "right": [0, 0], "only_a": 0, "only_b": 0})
            t["n"] += c["n"]
            t["right"] = [t["right"][0] + c["right"][0], t["right"][1] + c["right"][1]]
            t["only_a"] += c["only_a"]
            t["only_b"] += c["only_b"]
    for t in out.values():
        t["mcnemar_p"] = mcnemar_exact(t["only_a"], t["only_b"])
    return out


def paired_lines(paired: dict, names: tuple[str, str]) -> list[str]:
    return [f"{kind}: right {names[0]} {c['right'][0]}/{c['n']} ({100 * c['right'][0] / c['n']:.1f}%), "
            f"{names[1]} {c['right'][1]}/{c['n']} ({100 * c['right'][1] / c['n']:.1f}%); right in "
            f"{names[0]} only {c['only_a']}, in {names[1]} only {c['only_b']} "
            f"(McNemar exact, two-sided p = {c['mcnemar_p']:.3g})" for kind, c in paired.items()]


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
    lines += paired_lines(cmp.get("paired", {}), names)
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
