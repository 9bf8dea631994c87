"""One turn of a session: plan the prompt before it, commit the result after it.

The prompt is `kept ids + pending token + new ids`; the engine connector loads
the kept tokens' KV from the session's pinned blocks (`keep` are indices into
the session's cached tokens). Planning changes nothing: a turn's result is a
new `Snapshot` made by `commit_turn`, so a failed, aborted or peeked turn
leaves the session as it was by construction.

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
import uuid
from dataclasses import dataclass

import numpy as np

from sir_vllm.connector.protocol import TurnParams
from sir_vllm.policy import SessionScores, turn_scores
from sir_vllm.sessions.state import ANSWER_TAIL, Snapshot


class TurnError(ValueError):
    """The turn cannot be served as asked (HTTP 400)."""


@dataclass(frozen=True)
class TurnPlan:
    base: Snapshot  # the state the turn starts from
    prompt_ids: list[int]
    kept: int  # tokens whose KV the connector loads
    keep: list[int] | None  # None: everything kept (no eviction)
    scores: SessionScores  # the session's scores after this turn's eviction + decay
    params: TurnParams


def tokens_needed(base: Snapshot, new_ids: list[int], max_tokens: int) -> int:
    """Tokens the turn adds to the cache at most. With an answer, the pending
    token stands in for the last answer token (which gets no KV); a prefill
    keeps the pending token and every new one."""
    if max_tokens > 0:
        return len(new_ids) + max_tokens
    return len(new_ids) + (base.pending is not None)


def plan_turn(base: Snapshot, policy, key: str, new_ids: list[int], max_tokens: int,
              reserve: int | None = None, name: str = "", peek: bool = False,
              continues: bool = False, source: str | None = None,
              release_source: bool = False) -> TurnPlan:
    """The prompt and keep set of a turn (or of one pass of a long turn:
    `continues` for every pass after its first, which evicts without decay;
    `key`/`source`: where the pass pins and where it loads from)."""
    if max_tokens < 0:
        raise TurnError("max_tokens must be >= 0 in a session (0: prefill only)")
    num_coming = tokens_needed(base, new_ids, max_tokens)
    what = f"turn of {len(new_ids)} tokens + max_tokens {max_tokens} = {num_coming}"
    if reserve is not None:
        if reserve < num_coming:
            raise TurnError(f"session_reserve_tokens {reserve} is less than the {what} tokens "
                            f"it must hold")
        num_coming, what = reserve, f"turn reserving {reserve} tokens (session_reserve_tokens)"
    scores = SessionScores(base.scores.copy(), base.turns)
    # A first turn is never refused for its size: nothing is cached yet, so
    # there is nothing to evict (the reference code's rule, the oracle's too);
    # the session comes back under the budget at its next turn's eviction.
    # Only the model's context limit bounds it (vLLM's own 400).
    try:
        keep = scores.before_turn(policy, num_coming, continues_turn=continues)
    except ValueError as e:
        raise TurnError(f"{what} does not fit the session budget of {policy.cache_size} tokens: "
                        f"{e}") from None
    ids = base.token_ids
    kept_ids = ids.tolist() if keep is None else ids[keep].tolist()
    pending = [] if base.pending is None else [int(base.pending)]
    prompt = [*kept_ids, *pending, *new_ids]
    if not prompt:
        raise TurnError("empty prompt")
    keep_list = None if keep is None else [int(i) for i in keep]
    params = TurnParams(key=key, turn=uuid.uuid4().hex, old_len=base.size, keep=keep_list,
                        expect=base.turn_id, name=name, peek=peek,
                        source=None if source == key else source, release_source=release_source)
    return TurnPlan(base, prompt, len(kept_ids), keep_list, scores, params)


def prompt_surprisal(prompt_logprobs: list[float | None], start: int) -> list[float]:
    """-log p of the prompt tokens start.. (the turn's own), from each prompt
    position's log-prob (position j: log p(token j | tokens < j); None where
    the engine gives none). Positions before `start + 1` are loaded, never read."""
    out = [math.nan]  # x_0 of the turn: no logit of its own in this pass
    for j in range(start + 1, len(prompt_logprobs)):
        lp = prompt_logprobs[j]
        if lp is None:
            raise RuntimeError(f"no prompt logprob for position {j}")
        out.append(-float(lp))
    return out


def commit_turn(plan: TurnPlan, policy, output_ids: list[int], prompt_logprobs: list | None,
                output_logprobs: list[float] | None, prefill_only: bool = False,
                messages: int | None = None, chain: str | None = None,
                continues: bool = False) -> Snapshot:
    """The snapshot after the turn: cached = prompt + answer minus its last
    token (now pending); a prefill (`prefill_only`, output_ids ignored) caches
    the prompt. `messages`/`chain`: a chat turn's consumed-message record."""
    if prefill_only:
        output_ids, output_logprobs = [], []
    elif not output_ids:
        raise RuntimeError("a session turn produced no token")
    n_new = len(plan.prompt_ids) - plan.kept + max(len(output_ids) - 1, 0)
    if policy.needs_scores:
        s = prompt_surprisal(prompt_logprobs, plan.kept)
        s += [-float(x) for x in (output_logprobs or [])[: len(output_ids) - 1]]
        new_scores = turn_scores(policy.score, np.asarray(s))
    else:
        new_scores = np.zeros(n_new)
    assert len(new_scores) == n_new, (len(new_scores), n_new)
    scores = SessionScores(plan.scores.scores.copy(), plan.scores.turns)
    scores.after_turn(new_scores, continues_turn=continues)
    base = plan.base
    token_ids = np.asarray([*plan.prompt_ids, *output_ids[:-1]], dtype=np.int64)
    return Snapshot(
        turns=scores.turns, token_ids=token_ids, scores=scores.scores,
        pending=int(output_ids[-1]) if output_ids else None,
        answer_tail=tuple(int(t) for t in output_ids[-ANSWER_TAIL:]),
        evicted_total=base.evicted_total + base.size - plan.kept,
        turn_id=plan.params.turn,
        messages=base.messages if messages is None else messages,
        chain=base.chain if chain is None else chain)
