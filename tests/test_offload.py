"""The host tier under the pins (`--kv-offload-bytes`, issue 14): a session
whose pinned KV the full pool drops is saved to host memory, and its next
turn copies its kept tokens back, re-rotated, instead of recomputing them.

Synthetic tensors for the save and restore (both KV layouts), the scheduler
role on a fake block pool for what is planned, the worker role for the order
it runs in, and a real server whose pool holds four blocks: the restored
session answers exactly as an identical session that kept its pins.
"""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch

pytest.importorskip("vllm")

from sir_vllm.connector.offload import (ForgetOp, HostIndex, MoveOp, Offloaded,  # noqa: E402
                                        RestoreOp, SaveOp, parse_offload_bytes)
from sir_vllm.connector.protocol import EngineQuery, TurnParams, TurnReply  # noqa: E402
from sir_vllm.connector.scheduler import slots  # noqa: E402
from sir_vllm.connector.worker import SessionWorker  # noqa: E402
from sir_vllm.kv.offload import restore_tokens, save_tokens  # noqa: E402

from conftest import SERVED_NAME, SESSION_POLICY_ARGS, started_server  # noqa: E402
from fake_block_pool import BS, Blocks, capped, pin, req  # noqa: E402
from test_kv import make_caches, random_kv, ref_rope, ref_spec, slot_of  # noqa: E402

SEQ = 96  # make_caches' sequence: three blocks of 32 tokens


# ---- save and restore on synthetic caches --------------------------------------

def scramble(caches):
    """What the pool does to dropped blocks: other requests write over them."""
    for i, kv in enumerate(caches.values()):
        kv.copy_(random_kv(tuple(kv.shape), kv.dtype, 90 + i))


@pytest.mark.parametrize("is_neox,rotary_dim", [(True, 64), (False, 32)])
def test_restored_tokens_are_the_saved_ones_at_their_new_positions(kind, is_neox, rotary_dim):
    spec = ref_spec(rotary_dim, is_neox)
    layout, caches, raw = make_caches(kind, spec)
    before = {n: layout.read(kv, slot_of(torch.arange(SEQ))) for n, kv in caches.items()}
    saved = save_tokens(caches, layout, slot_of(torch.arange(SEQ)))
    scramble(caches)

    old = torch.cat([torch.arange(4), torch.tensor([5, 6, 9, 31, 32, 33, 60]), torch.arange(80, 96)])
    new = torch.arange(len(old))
    dst = torch.tensor([1, 3]).repeat_interleave(32)[: len(new)] * 32 + new % 32  # other blocks
    restore_tokens(caches, layout, saved, old, dst, new - old, spec)

    for i, (name, kv) in enumerate(caches.items()):
        rk, v = raw[i]
        k_got, v_got = layout.read(kv, dst)
        torch.testing.assert_close(k_got, ref_rope(rk[old], new, rotary_dim, is_neox), atol=3e-5, rtol=0)
        assert torch.equal(v_got, v[old])
        assert torch.equal(k_got[:4], before[name][0][:4])  # sinks (Δ = 0): bit for bit


def test_restore_checks_its_arguments(kind):
    spec = ref_spec(64, True)
    layout, caches, _ = make_caches(kind, spec)
    saved = save_tokens(caches, layout, slot_of(torch.arange(8)))
    with pytest.raises(ValueError, match="index"):
        restore_tokens(caches, layout, saved, [0, 1], [0], [0, 0], spec)
    with pytest.raises(ValueError, match="RopeSpec"):
        restore_tokens(caches, layout, saved, [5], [0], [-5], None)
    with pytest.raises(ValueError, match="saved layers"):
        restore_tokens(caches, layout, saved[:1], [0], [0])


# ---- the scheduler's index: capacity, LRU, the worker's plan in order ----------

def test_the_host_index_keeps_the_most_recent_within_its_capacity():
    host = HostIndex(capacity_tokens=10)
    assert host.save("A", Offloaded([1] * 4, "a1"), [0, 1, 2, 3])
    assert host.save("B", Offloaded([2] * 4, "b1"), [4, 5, 6, 7])
    host.restore("r", "A", [0, 1], [8, 9], [0, 0])  # A used again: B is now the oldest
    assert host.save("C", Offloaded([3] * 4, "c1"), [10, 11, 12, 13])
    assert list(host.entries) == ["A", "C"] and host.tokens == 8
    assert not host.save("D", Offloaded([4] * 11, "d1"), list(range(11)))  # never fits
    assert host.get("D") is None
    assert host.take_ops() == [SaveOp("A", [0, 1, 2, 3]), SaveOp("B", [4, 5, 6, 7]),
                               RestoreOp("r", "A", [0, 1], [8, 9], [0, 0]), ForgetOp("B"),
                               SaveOp("C", [10, 11, 12, 13])]
    host.touch("A")  # a request of A arrived: C is now the oldest
    host.save("E", Offloaded([5] * 4, "e1"), [0, 1, 2, 3])
    assert list(host.entries) == ["A", "E"]
    host.take_ops()
    assert host.take_ops() == [] and host.forget("A") and not host.forget("A")
    assert not HostIndex(0).save("A", Offloaded([1], "a1"), [0])  # off


def test_offload_bytes_takes_vllm_sizes_and_refuses_the_rest():
    assert parse_offload_bytes("2G") == 2 * 2**30 and parse_offload_bytes("1g") == 10**9
    assert parse_offload_bytes("0") == 0 and parse_offload_bytes(4096) == 4096
    for bad in ("-1", "lots", "1.5G"):
        with pytest.raises(ValueError, match="bytes >= 0"):
            parse_offload_bytes(bad)
    assert HostIndex.from_config({"offload_bytes": "1K"}, lambda: 100).capacity == 10
    assert not HostIndex.from_config({}, lambda: 1 // 0).enabled  # off: the engine is not asked


# ---- the scheduler role: a dropped session's next turn is restored ------------

def offloading(capacity_tokens):
    sched = capped(0)
    sched.host = HostIndex(capacity_tokens)
    return sched


def next_turn(key, keep, new=(50,), expect=None):
    """Session `key`'s second turn keeping `keep` of the 8 tokens pin() left
    (turn `expect`, by default `key`'s first)."""
    first = [*range(100, 107), 7]  # pin(): the first turn's prompt and answer
    return req(f"{key}-2", [first[i] for i in keep] + list(new),
               TurnParams(key=key, turn=f"{key}-t2", old_len=8, keep=list(keep),
                          expect=expect or f"{key}-t1"),
               computed=len(keep) + len(new), output=[9, 9])


def test_a_dropped_session_is_saved_and_its_next_turn_restored():
    sched = offloading(64)
    pin(sched, "A", [0, 1], when=1.0)
    pin(sched, "B", [2, 3], when=2.0)
    pin(sched, "C", [4], when=3.0)
    sched.build_connector_meta(None)
    sched.get_num_new_matched_tokens(req("x", range(6)), 0)  # drops A, the least recent
    assert "A" not in sched.pinned
    step = SimpleNamespace(has_sync_kv_loads=False)  # x got no external tokens
    assert sched.build_connector_meta(step).host_ops == [SaveOp("A", list(range(8)))]
    assert step.has_sync_kv_loads  # the save runs before the forward reuses A's blocks
    quiet = SimpleNamespace(has_sync_kv_loads=False)
    sched.build_connector_meta(quiet)
    assert not quiet.has_sync_kv_loads  # no host work: vLLM's order stays

    keep = [0, 1, 5, 7]  # two sinks' worth and two later tokens: the last two move left
    a2 = next_turn("A", keep)
    sched.on_new_request(a2)
    assert sched.get_num_new_matched_tokens(a2, 0) == (4, False)
    sched.update_state_after_alloc(a2, Blocks([0, 1, 5]), 4)
    meta = sched.build_connector_meta(None)
    assert meta.loads == []
    assert meta.host_ops == [RestoreOp("A-2", "A", keep, slots([0, 1, 5], range(4), BS), [0, 0, -3, -4])]
    _, reply = sched.request_finished(a2, [0, 1, 5])
    assert TurnReply.from_kv_transfer_params(reply) == TurnReply(pinned=5, recomputed=0)
    assert sched.build_connector_meta(None).host_ops == [ForgetOp("A")]  # new pins replace it
    stats = sched.take_stats().data
    assert stats["offloaded_tokens"] == 8 and stats["restored_tokens"] == 4
    assert stats["recomputed_tokens"] == 0 and stats["pins_dropped"] == 1


def test_a_session_restored_from_a_local_hit_copies_only_the_rest():
    sched = offloading(64)
    pin(sched, "A", [0, 1], when=1.0)
    pin(sched, "B", [2, 3, 4, 5], when=2.0)
    sched.get_num_new_matched_tokens(req("x", range(6)), 0)  # drops A
    a2 = next_turn("A", list(range(8)))
    sched.on_new_request(a2)
    assert sched.get_num_new_matched_tokens(a2, 4) == (4, False)  # 4 found by the prefix cache
    sched.update_state_after_alloc(a2, Blocks([0, 1, 2]), 4)
    restore = sched.build_connector_meta(None).host_ops[-1]
    assert restore == RestoreOp("A-2", "A", [4, 5, 6, 7], slots([0, 1, 2], range(4, 8), BS), [0] * 4)


def test_a_regenerated_turn_takes_the_shared_prefix_from_the_saved_copy():
    """Regenerate after the first attempt's pins were dropped and saved: the
    replayed turn copies the prompt prefix the two share, in place (delta 0),
    from host memory instead of recomputing it; another keep set gets nothing."""
    sched = offloading(64)
    pin(sched, "A", [0, 1], when=1.0)
    keep = [0, 1, 5, 7]
    first = next_turn("A", keep)  # A's second turn, loaded from A's pins
    sched.on_new_request(first)
    sched.update_state_after_alloc(first, Blocks([2, 3]), 4)
    sched.request_finished(first, [2, 3])
    sched.pinned["A"].last_used = 1.0
    pin(sched, "B", [4, 5], when=2.0)
    sched.build_connector_meta(None)
    sched.get_num_new_matched_tokens(req("x", range(10)), 0)  # drops A: saved with its origin
    assert "A" not in sched.pinned and sched.host.get("A").turn == "A-t2"

    again = next_turn("A", keep)  # the same turn, replayed: it expects A-t1, the copy is A-t2's
    again.request_id = "A-3"
    sched.on_new_request(again)
    assert sched.get_num_new_matched_tokens(again, 0) == (4, False)  # all but one prompt token
    sched.update_state_after_alloc(again, Blocks([0, 1]), 4)
    restore = sched.build_connector_meta(None).host_ops[-1]
    assert restore == RestoreOp("A-3", "A", [0, 1, 2, 3], slots([0, 1], range(4), BS), [0] * 4)
    assert sched.recomputed["A-3"] == 0
    other = next_turn("A", [0, 1, 5, 6])  # another keep set: not the same origin
    assert sched.get_num_new_matched_tokens(other, 0) == (0, False)


def test_without_room_in_the_tier_a_dropped_session_recomputes():
    sched = offloading(8)  # one session's 8 tokens
    pin(sched, "A", [0, 1], when=1.0)
    pin(sched, "B", [2, 3], when=2.0)
    pin(sched, "C", [4, 5], when=3.0)
    stock = req("x", range(10))  # 12 tokens: 3 blocks
    sched.get_num_new_matched_tokens(stock, 0)  # drops A then B; B's copy evicts A's
    assert set(sched.pinned) == {"C"} and list(sched.host.entries) == ["B"]
    assert [type(op) for op in sched.build_connector_meta(None).host_ops] == [SaveOp, ForgetOp, SaveOp]
    a2 = next_turn("A", list(range(8)))
    sched.on_new_request(a2)
    assert sched.get_num_new_matched_tokens(a2, 0) == (0, False)  # nothing to load: no wrong KV
    sched.update_state_after_alloc(a2, Blocks([0, 1, 2]), 0)
    _, reply = sched.request_finished(a2, [0, 1, 2])
    assert TurnReply.from_kv_transfer_params(reply).recomputed == 8
    assert offloading(4).host.save("A", Offloaded([1] * 8, "t"), range(8)) is False  # too big


def test_a_saved_copy_of_another_turn_is_never_loaded():
    sched = offloading(64)
    pin(sched, "A", [0, 1], when=1.0)
    pin(sched, "B", [2, 3, 4, 5], when=2.0)
    sched.get_num_new_matched_tokens(req("x", range(6)), 0)  # drops A (turn A-t1)
    stale = next_turn("A", list(range(8)))
    stale.kv_transfer_params = TurnParams(key="A", turn="A-t3", old_len=8, keep=list(range(8)),
                                          expect="A-t2").to_kv_transfer_params()
    sched.on_new_request(stale)
    assert sched.get_num_new_matched_tokens(stale, 0) == (0, False)
    other = next_turn("A", [0, 1, 2, 3], new=(60,))
    other.prompt_token_ids[0] = 999  # the prompt does not start with the kept tokens
    assert sched.get_num_new_matched_tokens(other, 0) == (0, False)


def test_deleting_a_session_forgets_its_saved_copy():
    sched = offloading(64)
    pin(sched, "A", [0, 1], when=1.0)
    pin(sched, "B", [2, 3, 4, 5], when=2.0)
    sched.get_num_new_matched_tokens(req("x", range(6)), 0)  # drops A: saved
    sched.build_connector_meta(None)
    assert sched.handle_query(EngineQuery.DROP, ["A"]) == 1
    assert sched.host.entries == {} and sched.handle_query(EngineQuery.DROP, ["A"]) == 0
    assert sched.build_connector_meta(None).host_ops == [ForgetOp("A")]


def test_a_long_turn_whose_pins_were_saved_moves_the_copy_to_the_session():
    """A long turn's last pass pins under its own key, then the API MOVEs them
    to the session's. Dropped (and saved) in between, the copy moves instead,
    replacing the session's older one, and the session's next turn restores
    from it rather than recomputing."""
    sched = offloading(64)
    pin(sched, "S", [0, 1], when=1.0)  # the session's state before the long turn
    pin(sched, "L", [2, 3], when=2.0)  # the long turn's last pass (turn L-t1)
    pin(sched, "C", [4, 5], when=3.0)
    sched.get_num_new_matched_tokens(req("x", range(10)), 0)  # drops S then L: both saved
    assert set(sched.host.entries) == {"S", "L"}
    sched.build_connector_meta(None)
    assert sched.handle_query(EngineQuery.MOVE, ["L", "S"]) is True
    assert list(sched.host.entries) == ["S"] and sched.host.get("S").turn == "L-t1"
    assert sched.build_connector_meta(None).host_ops == [ForgetOp("S"), MoveOp("L", "S")]
    assert sched.handle_query(EngineQuery.MOVE, ["L", "S"]) is False  # nothing left under L
    assert list(sched.host.entries) == ["S"] and sched.build_connector_meta(None).host_ops == []

    keep = [0, 1, 5, 7]
    s2 = next_turn("S", keep, expect="L-t1")  # the state the long turn left
    sched.on_new_request(s2)
    assert sched.get_num_new_matched_tokens(s2, 0) == (4, False)  # from the moved copy
    sched.update_state_after_alloc(s2, Blocks([0, 1]), 4)
    assert sched.build_connector_meta(None).host_ops == [
        RestoreOp("S-2", "S", keep, slots([0, 1], range(4), BS), [0, 0, -3, -4])]


# ---- the worker role: the plan, in order, on synthetic caches ------------------

def test_the_worker_saves_restores_and_forgets_in_the_planned_order(kind):
    spec = ref_spec(64, True)
    layout, caches, raw = make_caches(kind, spec)
    worker = SessionWorker(vllm_config=None)
    worker.kv_caches, worker.layout, worker._rope = caches, layout, spec
    src = slot_of(torch.arange(SEQ)).tolist()
    old = [0, 1, 2, 3, 40, 41]
    dst = slot_of(torch.arange(6)).tolist()  # into the blocks the save read: saved first
    worker.run_host_ops([SaveOp("A", src), RestoreOp("r", "A", old, dst, [0, 0, 0, 0, -36, -36])])
    for i, kv in enumerate(caches.values()):
        k_got, v_got = layout.read(kv, torch.tensor(dst))
        torch.testing.assert_close(k_got, ref_rope(raw[i][0][old], torch.arange(6), 64, True),
                                   atol=3e-5, rtol=0)
        assert torch.equal(v_got, raw[i][1][old])
    worker.run_host_ops([SaveOp("B", src)])
    b = worker.host["B"]
    worker.run_host_ops([ForgetOp("A"), MoveOp("B", "A")])  # B's copy is A's now
    assert list(worker.host) == ["A"] and worker.host["A"] is b
    worker.run_host_ops([MoveOp("gone", "A")])  # a copy this rank never got: A's stays
    assert worker.host["A"] is b
    worker.run_host_ops([ForgetOp("A")])
    assert worker.host == {}
    with pytest.raises(RuntimeError, match="no host copy of session key A"):
        worker.run_host_ops([RestoreOp("r2", "A", [0], [0], [0])])


# ---- through a real server whose pool holds four blocks ------------------------

BLOCK_TOKENS = 128
TOKEN_BYTES = 30 * 3 * 64 * 2 * 4  # SmolLM2-135M in float32
POOL_BLOCKS = 5  # one is vLLM's null block: four usable


@pytest.fixture(scope="module")
def offload_server(bundled_model, tmp_path_factory):
    proc = started_server(bundled_model, tmp_path_factory.mktemp("offload-server"),
                          ["--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes",
                           str((POOL_BLOCKS * BLOCK_TOKENS + BLOCK_TOKENS // 2) * TOKEN_BYTES),
                           "--max-model-len", "256", "--kv-offload-bytes", "64M",
                           *SESSION_POLICY_ARGS])
    yield proc
    proc.stop()


def session_request(server, endpoint, sid, **body):
    """One greedy 8-token session turn, its token ids returned."""
    return requests.post(f"{server.url}/v1/{endpoint}", timeout=300, json={
        "model": SERVED_NAME, "max_tokens": 8, "temperature": 0.0, "session_id": sid,
        "return_token_ids": True, "ignore_eos": True, **body}).json()


def turn(server, sid, prompt):
    return session_request(server, "completions", sid, prompt=prompt, logprobs=0)


FIRST = ("Session {k}: my name is Ada and the secret word is apple. I live in a small town by "
         "the sea, where the boats come in every morning and the market opens at seven. My "
         "sister keeps bees, my brother fixes bicycles, and I write letters to old friends. On "
         "Sundays we walk along the cliffs together and count the gulls.")
SECOND = (" Tell me again, slowly and in one short sentence, what the secret word was and where "
          "I said that I live, please.")


def test_a_dropped_session_restored_from_host_memory_answers_as_if_pinned(offload_server):
    log = offload_server.log_path.read_text(errors="replace")
    assert f"KV cache size: {POOL_BLOCKS * BLOCK_TOKENS} tokens" in log, "the pool is not the size assumed"
    tag = uuid.uuid4().hex[:6]
    sid = {k: f"offload-{tag}-{k}" for k in ("A", "A2", "B", "C", "D")}
    # four one-block pins fill the pool, oldest first; A and its twin A2 say the same
    first = {k: turn(offload_server, sid[k], FIRST.format(k="X" if k.startswith("A") else k))
             for k in ("A", "B", "C", "A2")}
    assert 60 < len(first["A"]["choices"][0]["prompt_token_ids"]) < 92  # one block, under budget
    turn(offload_server, sid["D"], FIRST.format(k="D"))  # drops A's pins, the least recent: saved
    a = turn(offload_server, sid["A"], SECOND)  # restored from host memory (drops B's pins)
    twin = turn(offload_server, sid["A2"], SECOND)  # loaded from its pins (drops C's)
    for r in (a, twin):
        s = r["session"]
        assert s["turns"] == 2 and s["recomputed_tokens"] == 0 and s["evicted_tokens"] > 0
    assert a["session"]["loaded_tokens"] == twin["session"]["loaded_tokens"] > 0
    assert a["choices"][0]["token_ids"] == twin["choices"][0]["token_ids"]
    diff = np.abs(np.array(a["choices"][0]["logprobs"]["token_logprobs"])
                  - np.array(twin["choices"][0]["logprobs"]["token_logprobs"]))
    assert diff.max() < 1e-5, diff.max()

    log = offload_server.log_path.read_text(errors="replace")
    assert f"session {sid['A']!r}" in log and "saved to host memory" in log
    assert "from host memory" in log
    metrics = requests.get(offload_server.url + "/metrics", timeout=30).text
    restored = [float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("vllm:sir_restored_tokens_total")]
    assert restored and sum(restored) >= a["session"]["loaded_tokens"]


def chat(server, sid, messages):
    return session_request(server, "chat/completions", sid, messages=messages)


def test_a_regenerated_answer_whose_pins_were_saved_replays_from_host_memory(offload_server):
    """Regenerate after the pool dropped the first attempt's pins: the saved
    copy serves the replayed prompt (nothing recomputed) and the answer is
    the first attempt's, token for token."""
    tag = uuid.uuid4().hex[:6]
    sid = {k: f"regen-{tag}-{k}" for k in ("R", "X", "Y", "Z", "W")}
    history = [{"role": "user", "content": "Hi, I am Ada. The secret word is apple."}]
    history.append({"role": "assistant",
                    "content": chat(offload_server, sid["R"], history)["choices"][0]["message"]["content"]})
    history.append({"role": "user", "content": "What was the secret word?"})
    first = chat(offload_server, sid["R"], history)  # R's pins: one block, left by this attempt
    assert first["session"]["loaded_tokens"] > 0 and first["session"]["turns"] == 2
    assert len(first["prompt_token_ids"]) + 8 <= BLOCK_TOKENS
    for k in ("X", "Y", "Z"):  # three more one-block pins fill the pool
        turn(offload_server, sid[k], FIRST.format(k=k))
    turn(offload_server, sid["W"], FIRST.format(k="W"))  # drops R's pins, the least recent: saved
    log = offload_server.log_path.read_text(errors="replace")
    assert f"session {sid['R']!r}" in log

    again = chat(offload_server, sid["R"], history)  # the history without the last answer
    s = again["session"]
    assert s["rolled_back_turns"] == 1 and s["turns"] == 2 and s["rebuilt"] is False
    assert s["recomputed_tokens"] == 0 and s["loaded_tokens"] > 0
    assert again["choices"][0]["token_ids"] == first["choices"][0]["token_ids"]
    assert again["prompt_token_ids"] == first["prompt_token_ids"]
