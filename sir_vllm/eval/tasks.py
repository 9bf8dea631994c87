"""Run the paper's tasks through a backend and compute their metrics.

Each runner returns `(metrics, predictions)`; metrics use the names the
results JSON promises: acc_c/acc_g (grocery), acc (dailydialog),
per player win/tie/lose + avg_win (rps), ppl (stream-ppl).
"""

from __future__ import annotations

import math
import re
import threading
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from ..policy import Policy
from . import scoring
from .data import Episode, stream_messages


def _bar(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="turn", dynamic_ncols=True, mininterval=2.0)


def run_choice_episodes(backend, policy: Policy, episodes: list[Episode], mode: str,
                        desc: str) -> list[dict]:
    """One session per episode; every turn's pick stays in that session's cache.

    Episodes are independent: up to `backend.concurrency` run at once (a
    server serves many sessions; the oracle runs them one by one). The rows
    come back in episode order whatever the order they finish in."""
    with _bar(sum(len(e.turns) for e in episodes), desc) as bar:
        results = run_sessions(backend, episodes,
                               lambda e, stop: _run_episode(backend, policy, e, mode, bar, stop))
    return [row for rows in results for row in rows]


def run_sessions(backend, items: list, one, order: list[int] | None = None) -> list:
    """`one(item, stop)` for every item, up to `backend.concurrency` at once
    (one session each); results in item order whatever the order they finish
    in. `order`: the order to start them in (longest first shortens the tail).
    `stop` is set on the first failure, so the other items can end early."""
    workers = min(max(1, int(getattr(backend, "concurrency", 1))), len(items))
    stop = threading.Event()
    order = list(range(len(items))) if order is None else order
    if workers <= 1:
        done = {i: one(items[i], stop) for i in order}
        return [done[i] for i in range(len(items))]
    with ThreadPoolExecutor(workers) as pool:
        futures = {i: pool.submit(one, items[i], stop) for i in order}
        try:
            return [futures[i].result() for i in range(len(items))]
        except BaseException:
            stop.set()
            for f in futures.values():
                f.cancel()
            raise


@contextmanager
def open_session(backend, policy: Policy):
    """A backend session, closed afterwards where the backend has something to
    free (a server session is deleted; an oracle session is just dropped)."""
    session = backend.new_session(policy)
    try:
        yield session
    finally:
        if hasattr(session, "close"):
            session.close()


def _run_episode(backend, policy: Policy, episode: Episode, mode: str, bar,
                 stop: threading.Event) -> list[dict]:
    rows = []
    with open_session(backend, policy) as session:
        key = None
        for turn in episode.turns:
            if stop.is_set():
                break
            row = {"episode": episode.id, "id": turn.id, "kind": turn.kind}
            if turn.kind == "key":
                key = _bracketed(turn.question)
            if turn.kind == "recall" and key and hasattr(session, "holds_text"):
                # Diagnostic: is the key's grocery still in the cache when asked?
                row["key_in_cache"] = session.holds_text(key)
            choice = session.choose(turn.message(mode), scoring.candidates(turn, mode), mode)
            row.update(pred=choice.index, gold=turn.gold, user_choice=turn.user_choice,
                       retained=choice.retained)
            if getattr(choice, "scores", None):
                row["scores"] = [round(v, 6) for v in choice.scores]
            rows.append(row)
            bar.update(1)
    return rows


def _bracketed(text: str) -> str | None:
    m = re.search(r"\[[^\]]+\]", text)
    return m.group(0) if m else None


def _accuracy(rows: list[dict]) -> float:
    return sum(r["pred"] == r["gold"] for r in rows) / len(rows) if rows else float("nan")


def grocery_metrics(predictions: list[dict]) -> dict:
    csqa = [p for p in predictions if p["kind"] == "csqa"]
    recall = [p for p in predictions if p["kind"] == "recall"]
    metrics = {"acc_c": _accuracy(csqa), "acc_g": _accuracy(recall),
               "n_dialogues": len(recall), "n_csqa": len(csqa),
               "max_retained": max(p["retained"] for p in predictions)}
    held = [p["key_in_cache"] for p in recall if "key_in_cache" in p]
    if held:
        metrics["key_in_cache"] = sum(held) / len(held)
    return metrics


def dailydialog_metrics(predictions: list[dict]) -> dict:
    return {"acc": _accuracy(predictions), "n_rows": len(predictions),
            "n_dialogues": len({p["episode"] for p in predictions}),
            "max_retained": max(p["retained"] for p in predictions)}


def rps_metrics(predictions_by_player: dict[str, list[dict]]) -> dict:
    metrics = {}
    for player, rows in predictions_by_player.items():
        n = len(rows)
        win = sum(r["pred"] == r["gold"] for r in rows) / n
        tie = sum(r["pred"] == r["user_choice"] for r in rows) / n
        metrics[player] = {"win": win, "tie": tie, "lose": 1.0 - win - tie, "n_rounds": n}
    metrics["avg_win"] = sum(m["win"] for m in metrics.values()) / len(predictions_by_player)
    return metrics


def run_stream_ppl(backend, policy: Policy, dialogues: list[list[str]], max_tokens: int) -> dict:
    """Feed the dialogues as one long conversation (utterances alternate user
    and assistant), one message a turn, until `max_tokens` tokens are scored.

    A message's first token (the template's `<|im_start|>`) is not scored: its
    prediction sits at the previous message's last position, whose row a
    server session does not return (that position's KV is loaded, not
    recomputed); every other token of every message is."""
    with open_session(backend, policy) as session:
        return _stream(session, dialogues, max_tokens)


def _stream(session, dialogues: list[list[str]], max_tokens: int) -> dict:
    total_nll, count, turns = 0.0, 0, 0
    with tqdm(total=max_tokens, desc="stream-ppl", unit="tok", dynamic_ncols=True,
              mininterval=2.0) as bar:
        for role, utterance in stream_messages(dialogues):
            logprobs = session.feed(role, utterance)
            scored = [lp for lp in logprobs[1:] if not math.isnan(lp)]
            total_nll -= sum(scored)
            count += len(scored)
            turns += 1
            bar.update(len(scored))
            if count >= max_tokens:
                break
    return {"ppl": math.exp(total_nll / count), "nll": total_nll / count,
            "n_tokens": count, "n_turns": turns}
