"""One turn of a session: plan the prompt before it, commit the result after it.

The prompt is `kept ids + pending token + new ids`; the engine connector loads
the kept tokens' KV from the session's pinned blocks (`keep` are indices into
the session's cached tokens). Nothing in the session changes until the turn
has succeeded (`commit_turn`), so a failed turn leaves it as it was (and a
peek, which is never committed, leaves it as it was by construction).

A turn with max_tokens 0 is a prefill (lm-eval's scoring idiom): the session
keeps exactly the prompt and no pending token. `reserve` plans the eviction as
if that many tokens came this turn (a choice task reserves the context plus its
longest candidate for every candidate's peek and for the committing prefill,
so all of them see the same keep set).

The budget binds from the second turn on: the first turn of a session may be
longer than the budget, as in the reference code (nothing to evict yet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sir_vllm.connector.protocol import PARAMS_KEY
from sir_vllm.policy import SessionScores, turn_scores
from sir_vllm.sessions.store import Session


class TurnError(ValueError):
    """The turn cannot be served as asked (HTTP 400)."""


@dataclass
class TurnPlan:
    prompt_ids: list[int]
    kept: int  # tokens whose KV the connector loads
    keep: list[int] | None  # None: everything kept (no eviction)
    scores: SessionScores  # the session's scores after this turn's eviction + decay
    kv_transfer_params: dict


def tokens_needed(session: Session, new_ids: list[int], max_tokens: int) -> int:
    """Tokens the turn adds to the cache at most. With an answer, the pending
    token stands in for the last answer token (which gets no KV); a prefill
    keeps the pending token and every new one."""
    if max_tokens > 0:
        return len(new_ids) + max_tokens
    return len(new_ids) + (session.pending is not None)


def plan_turn(session: Session, new_ids: list[int], max_tokens: int,
              reserve: int | None = None) -> TurnPlan:
    policy = session.policy
    if max_tokens < 0:
        raise TurnError("max_tokens must be >= 0 in a session (0: prefill only)")
    num_coming = tokens_needed(session, new_ids, max_tokens)
    what = f"turn of {len(new_ids)} tokens + max_tokens {max_tokens} = {num_coming}"
    if reserve is not None:
        if reserve < num_coming:
            raise TurnError(f"session_reserve_tokens {reserve} is less than the {what} tokens "
                            f"it must hold")
        num_coming, what = reserve, f"turn reserving {reserve} tokens (session_reserve_tokens)"
    budget = policy.cache_size
    scores = SessionScores(session.scores.scores.copy(), session.scores.turns)
    # A first turn is never refused for its size: nothing is cached yet, so
    # there is nothing to evict (the reference code's rule, the oracle's too);
    # the session comes back under the budget at its next turn's eviction.
    # Only the model's context limit bounds it (vLLM's own 400).
    try:
        keep = scores.before_turn(policy, num_coming)
    except ValueError as e:
        raise TurnError(f"{what} does not fit the session budget of {budget} tokens: {e}") from None
    kept_ids = session.token_ids if keep is None else [session.token_ids[i] for i in keep]
    pending = [] if session.pending is None else [session.pending]
    prompt = [*kept_ids, *pending, *new_ids]
    if not prompt:
        raise TurnError("empty prompt")
    params = {PARAMS_KEY: {"id": session.key, "name": session.id, "old_len": len(session.token_ids),
                           "keep": None if keep is None else [int(i) for i in keep]}}
    return TurnPlan(prompt, len(kept_ids), None if keep is None else list(map(int, keep)),
                    scores, params)


def prompt_surprisal(prompt_logprobs: list | None, prompt_ids: list[int], start: int) -> list[float]:
    """-log p of prompt tokens start..end from vLLM's `prompt_logprobs` rows.

    Row j holds the logprob of prompt token j given tokens < j (row 0 is None).
    Rows before `start + 1` belong to loaded positions and are never read.
    """
    out = [math.nan]  # x_0 of the turn: no logit of its own in this pass
    for j in range(start + 1, len(prompt_ids)):
        row = prompt_logprobs[j]
        entry = row.get(str(prompt_ids[j]), row.get(prompt_ids[j])) if row else None
        if entry is None:
            raise RuntimeError(f"no prompt logprob for position {j}")
        out.append(-float(entry["logprob"]))
    return out


def commit_turn(session: Session, plan: TurnPlan, output_ids: list[int],
                prompt_logprobs: list | None, output_logprobs: list[float] | None,
                prefill_only: bool = False) -> None:
    """Record the turn: cached = prompt + answer minus its last token (now
    pending); a prefill (`prefill_only`, output_ids ignored) caches the prompt."""
    if prefill_only:
        output_ids, output_logprobs = [], []
    elif not output_ids:
        raise RuntimeError("a session turn produced no token")
    n_new = len(plan.prompt_ids) - plan.kept + max(len(output_ids) - 1, 0)
    if session.policy.needs_scores:
        s = prompt_surprisal(prompt_logprobs, plan.prompt_ids, plan.kept)
        s += [-float(x) for x in (output_logprobs or [])[: len(output_ids) - 1]]
        new_scores = turn_scores(session.policy.score, np.asarray(s))
    else:
        new_scores = np.zeros(n_new)
    assert len(new_scores) == n_new, (len(new_scores), n_new)
    old = len(session.token_ids)
    plan.scores.after_turn(new_scores)
    session.scores = plan.scores
    session.token_ids = list(plan.prompt_ids) + list(output_ids[:-1])
    session.pending = int(output_ids[-1]) if output_ids else None
    session.answer_ids = [int(t) for t in output_ids]
    session.evicted_total += old - plan.kept
    assert len(session.token_ids) == session.scores.size
