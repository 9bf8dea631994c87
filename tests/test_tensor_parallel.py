"""Tensor parallelism inside one engine (issue 13): TP 2 answers as TP 1.

vLLM shards the KV heads over the tensor-parallel ranks; the connector's
scheduler role plans per token, and every rank's worker applies that same plan
to its own shard. A 20-turn session on the tiny serving model (2 KV heads, one
per rank), with a 4+40+16 budget so most turns evict, runs through a TP 1 and
then a TP 2 `vllm serve --kv-policy sirllm` (one after the other, same flags,
greedy, fixed prompts): every turn must give the same answer tokens, the same
retained tokens and every answer token's logprob within 1e-3, and both ranks'
workers must have run every compaction.

vLLM's automatic OpenMP binding gives each rank a NUMA node of its own and
refuses TP 2 on a one-node machine ("Not enough allowed NUMA nodes to bind
threads of 2 local CPUWorkers"), stock or not: the TP 2 server gets an
explicit `VLLM_CPU_OMP_THREADS_BIND`, one share of the allowed cores per rank.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from sir_vllm.policy import make_policy
from sir_vllm.replay import ServerReplayer
from sir_vllm.server.process import ServerProcess

SERVED = "tiny"
MAX_TOKENS = 16
POLICY = make_policy("sirllm", start_size=4, entropy_size=40, recent_size=16, decay=0.9)
SERVE_ARGS = ["--dtype", "float32", "--kv-cache-memory-bytes", "256M", "--max-model-len", "1024",
              "--enforce-eager", "--distributed-executor-backend", "mp",
              "--kv-policy", "sirllm", "--kv-start-size", "4", "--kv-entropy-size", "40",
              "--kv-recent-size", "16", "--kv-decay", "0.9", "--kv-session-store", "memory"]
PROMPTS = [
    "Hi! My name is Ada and I live in Lisbon.",
    "What should I cook tonight?",
    "I have rice, two eggs and a lemon.",
    "Can you make it spicy?",
    "My sister is visiting on Friday.",
    "She does not eat meat.",
    "Suggest a dessert as well.",
    "How long will all of that take?",
    "What wine goes with it?",
    "Actually we drink tea.",
    "Tell me a fun fact about tea.",
    "Where is tea grown?",
    "Is green tea healthier than black tea?",
    "How hot should the water be?",
    "What is the capital of Portugal?",
    "Name three rivers in Europe.",
    "Which one is the longest?",
    "Write a haiku about rain.",
    "Now one about the sea.",
    "What is my name and where do I live?",
]
COMPACTION = re.compile(r"sir-vllm: compaction req=(\S+) tokens=(\d+) rotated=(\d+) .*tp_rank=(\d+)")


@dataclass
class Turn:
    token_ids: list[int]
    logprobs: list[float]
    retained_ids: list[int]
    evicted: int  # the session's evicted tokens so far
    loaded: int   # tokens carried over into this turn (a compaction job)


def omp_binding(ranks: int) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` giving each rank an equal share of the allowed cores."""
    cpus = sorted(os.sched_getaffinity(0))
    share = len(cpus) // ranks
    assert share, f"{ranks} ranks need at least {ranks} cores, this process may use {cpus}"
    return "|".join(",".join(map(str, cpus[r * share:(r + 1) * share])) for r in range(ranks))


def retained_ids(url: str, session_id: str) -> list[int]:
    r = requests.get(f"{url}/v1/sessions/{session_id}", timeout=60,
                     headers={"Authorization": "Bearer unused"})  # the replayer's key
    r.raise_for_status()
    return [t["id"] for t in r.json()["tokens"]]


def run_session(model: Path, tp: int, log_path: Path) -> tuple[list[Turn], str]:
    """Start a TP `tp` server, run the 20 turns, stop it; (turns, server log)."""
    env = {"VLLM_CPU_OMP_THREADS_BIND": omp_binding(tp)} if tp > 1 else {}
    proc = ServerProcess(model=str(model), served_model_name=SERVED, log_path=log_path, env=env,
                         extra_args=[*SERVE_ARGS, "--tensor-parallel-size", str(tp)])
    proc.start(timeout=float(os.environ.get("SIR_VLLM_SERVER_TIMEOUT", "900")))
    try:
        replayer = ServerReplayer(POLICY, str(model), proc.url, SERVED)
        turns = []
        for user in PROMPTS:
            served, out = replayer.turn(user, MAX_TOKENS)
            session = out.model_extra["session"]
            turns.append(Turn(served.token_ids, served.logprobs,
                              retained_ids(proc.url, replayer.session_id),
                              session["evicted_tokens"], session["loaded_tokens"]))
        replayer.close()
    finally:
        proc.stop()
    return turns, log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def sessions(tiny_serving_model, tmp_path_factory):
    """{tp: (turns, log)} for TP 1 and TP 2, the servers started one after the other."""
    logs = tmp_path_factory.mktemp("tensor-parallel")
    return {tp: run_session(tiny_serving_model, tp, logs / f"vllm-serve-tp{tp}.log")
            for tp in (1, 2)}


def compactions(log: str) -> dict[int, list[tuple[str, int, int]]]:
    """The worker's compaction lines by TP rank: (request, tokens, rotated) each."""
    by_rank: dict[int, list[tuple[str, int, int]]] = {}
    for req, tokens, rotated, rank in COMPACTION.findall(log):
        by_rank.setdefault(int(rank), []).append((req, int(tokens), int(rotated)))
    return by_rank


def test_tp2_answers_as_tp1_on_every_turn(sessions):
    one, _ = sessions[1]
    two, _ = sessions[2]
    assert len(one) == len(two) == len(PROMPTS)
    for i, (a, b) in enumerate(zip(one, two)):
        assert b.token_ids == a.token_ids, f"turn {i}: different answers"
        assert b.retained_ids == a.retained_ids, f"turn {i}: different retained tokens"
        assert len(b.retained_ids) <= POLICY.cache_size
        for j, (x, y) in enumerate(zip(a.logprobs, b.logprobs)):
            assert abs(x - y) <= 1e-3, f"turn {i} token {j}: {x} vs {y}"
    evicting = sum(t.evicted > prev.evicted for prev, t in zip(one, one[1:]))
    assert evicting >= 15  # the budget really is exercised


def test_both_ranks_run_every_compaction(sessions):
    turns, log = sessions[2]
    jobs = sum(t.loaded > 0 for t in turns)
    assert jobs >= 15
    by_rank = compactions(log)
    assert sorted(by_rank) == [0, 1], f"compaction lines by rank: {by_rank}"
    assert len(by_rank[0]) == jobs
    assert sorted(by_rank[1]) == sorted(by_rank[0])  # the same plan, applied on each shard
    assert any(rotated for _, _, rotated in by_rank[0])  # keys re-rotated, not only copied
    assert "world_size=2" in log


def test_tp1_compacts_on_its_one_rank(sessions):
    turns, log = sessions[1]
    by_rank = compactions(log)
    assert sorted(by_rank) == [0]
    assert len(by_rank[0]) == sum(t.loaded > 0 for t in turns)
