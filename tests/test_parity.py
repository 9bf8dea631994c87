"""The served SirLLM matches the oracle token for token (issue: parity).

A 40-turn session through the real `vllm serve --kv-policy sirllm` and the
official `openai` client, budget 4+64+32, answers of up to 32 tokens, so most
turns evict. The oracle replays the server's exact tokens (teacher-forced, so
one near-tie cannot derail the rest) and, after every turn, must hold the same
retained tokens, give every answer token's log-prob within 1e-3, and rank the
server's token first (or within 1e-4 of its top).

The three policies' server sessions run at once, as a chat service's do (the
server never waits on the oracle: teacher forcing makes the oracle follow the
server), so the engine batches them; each test then replays one of them.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from sir_vllm.cli.main import main
from sir_vllm.eval.data import default_data_dir, load_dialogue_stream
from sir_vllm.policy import make_policy
from sir_vllm.replay import ReferenceReplayer, ServerReplayer

from conftest import SERVED_NAME

MAX_TOKENS = 32


def user_turns(n: int) -> list[str]:
    """The opening utterances of DailyDialog test dialogues, a turn each."""
    dialogues = load_dialogue_stream(default_data_dir() / "dailydialog" / "dialogues_test.txt")
    return [d[0] for d in dialogues[:n]]


def retained_ids(server, session_id: str) -> list[int]:
    r = requests.get(f"{server.url}/v1/sessions/{session_id}", timeout=60,
                     headers={"Authorization": "Bearer unused"})  # the replayer's key
    r.raise_for_status()
    return [t["id"] for t in r.json()["tokens"]]


POLICIES = {
    "sirllm": make_policy("sirllm", start_size=4, entropy_size=64, recent_size=32, decay=1.0),
    "sirllm-decay0.7": make_policy("sirllm", start_size=4, entropy_size=64, recent_size=32,
                                   decay=0.7),
    "streaming": make_policy("streaming", start_size=4, recent_size=96),
}
TURNS = 40


def served_session(policy, server, model: str) -> list[tuple]:
    """One 40-turn session on the server: per turn, what it answered and the
    token ids the session then retained (read before the next turn)."""
    replayer = ServerReplayer(policy, model, server.url, SERVED_NAME)
    try:
        return [(replayer.turn(user, MAX_TOKENS)[0], retained_ids(server, replayer.session_id))
                for user in user_turns(TURNS)]
    finally:
        replayer.close()


@pytest.fixture(scope="module")
def served(session_server, bundled_model):
    """All three policies' sessions, in flight at once on the one server."""
    with ThreadPoolExecutor(len(POLICIES)) as pool:
        futures = {name: pool.submit(served_session, policy, session_server, str(bundled_model))
                   for name, policy in POLICIES.items()}
        return {name: f.exception() or f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(POLICIES))
def test_forty_turns_match_the_oracle(name, served, bundled_model):
    policy, session = POLICIES[name], served[name]
    if isinstance(session, BaseException):
        raise session
    oracle = ReferenceReplayer(policy, str(bundled_model))
    evicting = 0
    for i, (user, (turn_served, kept_ids)) in enumerate(zip(user_turns(TURNS), session)):
        mine, turn = oracle.turn(user, MAX_TOKENS, forced=turn_served.token_ids)
        assert turn_served.input_ids == mine.input_ids, f"turn {i}: different prompts"
        assert turn_served.retained == mine.retained <= policy.cache_size, f"turn {i}"
        assert kept_ids == oracle.session.ids, f"turn {i}"
        for j, (tok, lp) in enumerate(zip(turn_served.token_ids, turn_served.logprobs)):
            assert abs(lp - turn.logprobs[j]) <= 1e-3, f"turn {i} token {j}"
            assert tok == turn.greedy_ids[j] or turn.top_logprobs[j] - turn.logprobs[j] <= 1e-4
        evicting += turn.kept is not None
    assert len(session) == TURNS
    assert evicting >= 30  # the budget really is exercised


def test_replay_cli_prints_the_same_lines_on_both_backends(tmp_path, session_server,
                                                           bundled_model, capsys):
    transcript = tmp_path / "t.jsonl"
    transcript.write_text("".join(json.dumps({"user": u}) + "\n" for u in user_turns(6)))
    common = [str(transcript), "--model", str(bundled_model), "--policy", "sirllm",
              "--start-size", "4", "--entropy-size", "64", "--recent-size", "32",
              "--max-tokens", "24"]
    assert main(["replay", *common, "--backend", "reference"]) == 0
    reference = capsys.readouterr().out.splitlines()
    assert main(["replay", *common, "--backend", "server", "--url", session_server.url]) == 0
    served = capsys.readouterr().out.splitlines()
    assert len(reference) == 6
    assert served == reference
    assert all(json.loads(line)["retained"] <= 100 for line in served)
