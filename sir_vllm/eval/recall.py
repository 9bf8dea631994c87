"""Recall against distance: does a fact told k turns ago survive the cache?

One session per episode (`recall_data.RecallEpisode`):

    fact turn      the user tells the fact; the answer is "OK" (a one-candidate
                   choice, as Grocery's key turn), the same under every policy
    k fillers      DailyDialog utterances as the user's turns, each answered by
                   the model itself, greedily, up to `answer_tokens` tokens or
                   its end-of-message token, under the policy being measured
    question       a 4-way choice (chance 25%) scored like every choice task
                   (`scoring.py`; `text`: length-normalised log-likelihood)

Before the question the runner asks the session whether the fact's bracketed
answer ("[Ada]") still reads in its cache (`fact_in_cache`, Grocery's
`key_in_cache`). The full cache cannot outgrow the model's window: a distance
whose longest conversation could exceed it (every answer at `answer_tokens`)
is skipped for `full` and said so in the metrics, not run to a failure.
"""

from __future__ import annotations

import hashlib

from tqdm import tqdm

from ..policy import Policy
from . import scoring
from .recall_data import CHOICES, RecallEpisode
from .tasks import open_session, run_sessions

FACT_ANSWER = "OK"


def conversation_bound(renderer, episode: RecallEpisode, answer_tokens: int) -> int:
    """Tokens the episode's conversation holds at most when its question is
    scored: every answer cut at answer_tokens (a cut answer is owed the
    longest closing text) plus the question and its longest candidate."""
    cut = [renderer.encode("a")[0]]  # a previous answer that did not end its message
    n = len(renderer.turn_ids(episode.fact.statement, None)) + len(renderer.answer_ids(FACT_ANSWER))
    for utterance in episode.fillers:
        n += len(renderer.turn_ids(utterance, cut)) + answer_tokens
    question = episode.fact.question
    n += len(renderer.turn_ids(question.message("letter"), cut))  # the longer form
    return n + max(len(renderer.answer_ids(t)) for t in question.texts)


def skipped_distances(backend, policy: Policy, episodes: list[RecallEpisode],
                      answer_tokens: int) -> dict[int, str]:
    """Distances the policy cannot run on this backend, with the reason: only
    the full cache, whose conversation must fit the model's window."""
    if policy.name != "full":
        return {}
    window = getattr(backend, "max_model_len", None)
    if not window:
        raise RuntimeError("--policy full needs the model's window (max_position_embeddings "
                           "or the server's max_model_len)")
    longest: dict[int, int] = {}
    for e in episodes:
        n = conversation_bound(backend.renderer, e, answer_tokens)
        longest[e.k] = max(longest.get(e.k, 0), n)
    return {k: (f"the full cache does not fit: the conversation may reach {n} tokens, more "
                f"than the model's {window}-token window")
            for k, n in sorted(longest.items()) if n > window}


def run_recall(backend, policy: Policy, episodes: list[RecallEpisode], mode: str,
               answer_tokens: int) -> tuple[list[dict], dict[int, str]]:
    """Run every episode whose distance the policy can take; returns the
    prediction rows (one per episode, in episode order) and the skipped
    distances with their reasons."""
    skipped = skipped_distances(backend, policy, episodes, answer_tokens)
    todo = [e for e in episodes if e.k not in skipped]
    order = sorted(range(len(todo)), key=lambda i: -todo[i].k)  # long ones first: a short tail
    with tqdm(total=sum(e.k + 2 for e in todo), desc="recall-distance", unit="turn",
              dynamic_ncols=True, mininterval=2.0) as bar:
        rows = run_sessions(backend, todo,
                            lambda e, stop: _episode(backend, policy, e, mode, answer_tokens, bar,
                                                     stop),
                            order=order)
    return [r for r in rows if r is not None], skipped


def _episode(backend, policy: Policy, episode: RecallEpisode, mode: str, answer_tokens: int,
             bar, stop) -> dict | None:
    fact, question = episode.fact, episode.fact.question
    digest = hashlib.sha1()
    distance = generated = repeats = ended = 0
    previous = None
    eos = backend.renderer.tokenizer.eos_token_id
    with open_session(backend, policy) as session:
        told = session.choose(fact.statement, [FACT_ANSWER], mode)
        max_retained = told.retained
        bar.update(1)
        for utterance in episode.fillers:
            if stop.is_set():
                return None
            answer = session.generate(utterance, answer_tokens)
            digest.update(b"%d:" % len(answer.ids) + ",".join(map(str, answer.ids)).encode() + b";")
            distance += answer.input_tokens + len(answer.ids)
            generated += len(answer.ids)
            repeats += answer.ids == previous
            ended += answer.ids[-1] == eos
            previous = answer.ids
            max_retained = max(max_retained, answer.retained)
            bar.update(1)
        held = session.holds_text(fact.marker)
        choice = session.choose(question.message(mode), scoring.candidates(question, mode), mode)
        bar.update(1)
    return {"episode": episode.id, "id": question.id, "kind": "recall", "k": episode.k,
            "fact": fact.index, "fact_kind": fact.kind, "answer": fact.answer,
            "pred": choice.index, "gold": question.gold,
            "scores": [round(v, 6) for v in choice.scores], "retained": choice.retained,
            "max_retained": max(max_retained, choice.retained), "fact_in_cache": held,
            "distance_tokens": distance, "answer_tokens": generated, "ended_answers": ended,
            "repeated_answers": repeats, "answers_sha1": digest.hexdigest()}


def recall_metrics(predictions: list[dict], distances: list[int],
                   skipped: dict[int, str]) -> dict:
    """Accuracy per distance (and the diagnostics), keyed by str(k) for JSON."""
    per_k = {}
    for k in distances:
        if k in skipped:
            per_k[str(k)] = {"skipped": skipped[k], "n_facts": 0}
            continue
        rows = [p for p in predictions if p["k"] == k]
        n = len(rows)
        per_k[str(k)] = {
            "acc": sum(r["pred"] == r["gold"] for r in rows) / n if n else float("nan"),
            "n_facts": n,
            "fact_in_cache": sum(r["fact_in_cache"] for r in rows) / n if n else float("nan"),
            "mean_distance_tokens": sum(r["distance_tokens"] for r in rows) / n if n else 0.0,
            "max_retained": max((r["max_retained"] for r in rows), default=0),
            # filler answers identical to the one before (a small model's copy loop)
            "repeated_answer_share": sum(r["repeated_answers"] for r in rows) / max(1, n * k),
        }
    return {"per_k": per_k, "distances": list(distances), "chance": 1 / CHOICES,
            "n_episodes": len(predictions), "skipped": {str(k): v for k, v in skipped.items()},
            "max_retained": max((p["max_retained"] for p in predictions), default=0)}
