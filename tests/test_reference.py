"""The oracle: its plain forward equals transformers, and its cache follows the policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sir_vllm.chat import ChatRenderer
from sir_vllm.policy import SirLLMPolicy, StreamingPolicy, make_policy
from sir_vllm.reference import Llama, ReferenceSession
from sir_vllm.reference.llama import rope


@pytest.fixture(scope="module")
def oracle(bundled_model):
    return Llama(bundled_model)


@pytest.fixture(scope="module")
def hf(bundled_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bundled_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def oracle64(bundled_model):
    return Llama(bundled_model, dtype=torch.float64)


@pytest.fixture(scope="module")
def hf64(bundled_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bundled_model, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def renderer(bundled_model):
    from transformers import AutoTokenizer

    return ChatRenderer(AutoTokenizer.from_pretrained(bundled_model))


def hf_logprobs(hf, ids):
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)


def chunked_logits(model, ids, cuts):
    cache, chunks = model.empty_cache(), []
    for a, b in zip([0, *cuts], [*cuts, len(ids)]):
        logits, kv = model.forward(torch.tensor([ids[a:b]]), cache)
        cache = cache.extend(type(kv)([k[0] for k in kv.keys], [v[0] for v in kv.values]))
        chunks.append(logits[0])
    return torch.cat(chunks)


def test_whole_text_forward_is_transformers_bit_for_bit(oracle, hf, renderer):
    ids = renderer.encode("The quick brown fox jumps over the lazy dog. " * 6)
    ours, _ = oracle.forward(torch.tensor([ids]), oracle.empty_cache())
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_turn_by_turn_forward_equals_transformers_whole_text(oracle64, hf64, oracle, hf, renderer):
    """Cached, chunked turns give the whole-text logits within 1e-4 (float64:
    the math; in float32 the chunking alone moves logits by ~1e-4, as it moves
    transformers' own, so fp32 is held to 3e-4)."""
    ids = renderer.encode("The quick brown fox jumps over the lazy dog. " * 20)
    cuts = [7, 30, 31, 32, 60, 100]
    with torch.no_grad():
        whole64 = hf64(torch.tensor([ids])).logits[0]
        whole32 = hf(torch.tensor([ids])).logits[0]
    assert (chunked_logits(oracle64, ids, cuts) - whole64).abs().max().item() <= 1e-4
    assert (chunked_logits(oracle, ids, cuts) - whole32).abs().max().item() <= 3e-4


def test_multi_turn_session_without_eviction_matches_transformers(oracle, hf, renderer):
    session = ReferenceSession(oracle, SirLLMPolicy(start_size=4, entropy_size=4000))
    answer = None
    for text in ["What is the capital of France?", "And of Italy?", "Thanks!"]:
        new = renderer.turn_ids(text, answer)
        prior = len(session.ids)  # the carried token is in input_ids, not yet in ids
        turn = session.generate(new, max_tokens=12, stop_ids={renderer.tokenizer.eos_token_id})
        assert turn.kept is None
        stream = session.ids + session.pending
        start = prior + len(turn.input_ids)  # first answer token's index in the stream
        assert stream[start:] == turn.answer_ids
        ref = hf_logprobs(hf, stream)
        for j, (tok, lp) in enumerate(zip(turn.answer_ids, turn.logprobs)):
            assert abs(ref[start + j - 1, tok].item() - lp) <= 3e-4
            assert tok == int(ref[start + j - 1].argmax())
        answer = turn.answer_ids
    # Every token that has KV has a score; the carried token does not yet.
    assert len(session.scores) == len(session.ids) == len(stream) - 1
    assert session.pending == stream[-1:]


def test_compacted_cache_positions_are_cache_indices(oracle, hf, renderer):
    """After eviction, kept token j sits at position j: rebuild that cache for
    transformers (keys rotated at 0..k-1) and compare the next turn's logits."""
    from transformers import DynamicCache

    policy = SirLLMPolicy(start_size=4, entropy_size=24, recent_size=8)
    session = ReferenceSession(oracle, policy)
    answer = None
    for text in ["My name is Ada and I like tea.", "What do I like?"]:
        turn = session.generate(renderer.turn_ids(text, answer), max_tokens=6)
        answer = turn.answer_ids
    new = renderer.turn_ids("Say it again.", answer)
    before = session.cache
    keep = policy.select(session.scores, len(session.pending) + len(new) + 6)
    assert keep is not None and len(keep) < len(before)
    kept = before.select(torch.as_tensor(keep))
    inputs = session.pending + new
    ours, _ = oracle.forward(torch.tensor([inputs]), kept)

    k = len(keep)
    dc = DynamicCache()
    for layer, (key, val) in enumerate(zip(kept.keys, kept.values)):
        dc.update(rope(key, torch.arange(k), oracle.config.rope_theta)[None], val[None], layer)
    with torch.no_grad():
        theirs = hf(torch.tensor([inputs]), past_key_values=dc,
                    position_ids=torch.arange(k, k + len(inputs))[None]).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_session_evicts_to_budget_and_keeps_sinks(oracle, renderer):
    policy = SirLLMPolicy(start_size=4, entropy_size=40, recent_size=16, decay=0.5)
    session = ReferenceSession(oracle, policy)
    answer, evicted = None, 0
    first_ids = None
    for i in range(6):
        turn = session.generate(renderer.turn_ids(f"Tell me fact number {i}.", answer), max_tokens=8)
        answer = turn.answer_ids
        first_ids = first_ids or turn.input_ids[:4]
        evicted += turn.kept is not None
        assert turn.retained <= policy.cache_size
        assert session.ids[:4] == first_ids  # attention sinks never move
        assert len(session.scores) == len(session.ids) == len(session.cache)
    assert evicted >= 3


def test_choice_turn_keeps_the_picked_candidate(oracle, renderer):
    session = ReferenceSession(oracle, make_policy("full"))
    ctx = renderer.turn_ids("Which is a fruit? (A) apple (B) brick", None)
    cands = [renderer.answer_ids(t) for t in ("apple", "brick")]
    turn = session.choose(ctx, cands, pick=lambda lps: int(np.argmax([sum(x) for x in lps])))
    assert session.ids == ctx + cands[turn.choice]
    assert len(turn.candidate_logprobs) == 2
    # Scoring a candidate in the batch equals generating it teacher-forced.
    other = ReferenceSession(oracle, make_policy("full"))
    forced = other.generate(ctx, max_tokens=len(cands[0]), forced=cands[0])
    assert np.allclose(forced.logprobs, turn.candidate_logprobs[0], atol=1e-4)


def test_streaming_policy_window(oracle, renderer):
    policy = StreamingPolicy(start_size=2, recent_size=30)
    session = ReferenceSession(oracle, policy)
    answer = None
    for i in range(4):
        turn = session.generate(renderer.turn_ids(f"Count to {i}.", answer), max_tokens=5)
        answer = turn.answer_ids
        if turn.kept is not None:
            n_before = turn.kept[-1] + 1
            assert turn.kept[:2] == [0, 1]
            assert turn.kept[2:] == list(range(turn.kept[2], n_before))
