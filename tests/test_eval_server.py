"""`sir-vllm eval --backend server`: the paper's tasks through a live server's
session API pick what the oracle picks, and the three scoring fields it uses
(`max_tokens: 0`, `session_peek`, `session_reserve_tokens`) behave."""

from __future__ import annotations

import json
import uuid

import openai
import pytest
import requests

from sir_vllm.cli.main import main
from sir_vllm.eval.compare import compare

from conftest import SERVED_NAME

# Evicts: a grocery dialogue is ~600 tokens, a stream-ppl run of 300 tokens ~400.
EVICTING = ["--policy", "sirllm", "--start-size", "4", "--entropy-size", "124"]
BIG = {"name": "sirllm", "start_size": 4, "entropy_size": 2000, "recent_size": 0}
NEAR_TIE = 1e-3


def run_eval(tmp_path, name, *argv) -> dict:
    out = tmp_path / f"{name}.json"
    assert main(["eval", *argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def sid() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def prefill(client, session_id, ids, **extra) -> dict:
    body = {"session_id": session_id, "kv_policy": BIG, "prompt_logprobs": 0, **extra}
    return client.completions.create(model=SERVED_NAME, prompt=ids, max_tokens=0, temperature=0.0,
                                     extra_body=body).model_dump()


def info(server, session_id) -> dict:
    r = requests.get(f"{server.url}/v1/sessions/{session_id}",
                     headers={"Authorization": "Bearer unused"}, timeout=60)
    r.raise_for_status()
    return r.json()


@pytest.fixture(scope="module")
def tok(bundled_model):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(bundled_model)
    return lambda text: t(text, add_special_tokens=False).input_ids


# ---- eval-compare on hand-written results (no server) ----------------------

def _result(preds, scores, backend="reference"):
    return {"task": "grocery", "backend": backend, "scoring": "text", "limit": 1,
            "policy": {"name": "streaming", "start_size": 4, "recent_size": 60, "cache_size": 64},
            "metrics": {"acc_c": 0.5},
            "predictions": [{"episode": "grocery-1", "id": "1", "kind": "csqa", "gold": 0,
                             "pred": p, "scores": s} for i, (p, s) in enumerate(zip(preds, scores))]}


def test_eval_compare_lists_each_flip_with_both_margins(tmp_path, capsys):
    a = _result([0, 1, 2], [[-1.0, -2.0, -3.0], [-2.0, -1.0, -3.0], [-3.0, -2.0, -1.0]])
    b = _result([0, 2, 2], [[-1.0, -2.0, -3.0], [-2.0, -1.5, -1.4999], [-3.0, -2.0, -1.0]], "server")
    cmp = compare(a, b)
    assert (cmp["n_compared"], cmp["n_agree"]) == (3, 2) and cmp["agreement"] == pytest.approx(2 / 3)
    (d,) = cmp["disagreements"]
    assert (d["turn"], d["id"]) == (1, "1") and d["pred"] == [1, 2]  # ids repeat in a dialogue
    assert d["margin"][0] == pytest.approx(1.0) and d["margin"][1] == pytest.approx(1e-4)
    paths = []
    for name, res in (("a", a), ("b", b)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(res))
    out = tmp_path / "cmp.json"
    assert main(["eval-compare", *map(str, paths), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "agreement 0.6667 (2/3 picks)" in printed and "| 1 (1) |" in printed
    assert json.loads(out.read_text())["disagreements"][0]["margin"][1] == pytest.approx(1e-4)
    b["task"] = "rps"
    with pytest.raises(ValueError, match="different tasks"):
        compare(a, b)


def test_eval_compare_pairs_the_rows_and_pools_several_pairs(tmp_path, capsys):
    """Which run is right more often, and by chance? McNemar's exact test on
    the rows right in one run only, per kind; more pairs pooled into one."""
    from sir_vllm.eval.compare import mcnemar_exact

    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(10, 1) == pytest.approx(24 / 2048)  # 2 * (1 + 11) / 2**11
    assert mcnemar_exact(6, 0) == mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    flat = [[-1.0, -2.0, -3.0]] * 6
    a = _result([0, 0, 0, 0, 1, 0], flat)  # gold 0: A right on 5 of 6
    b = _result([0, 1, 1, 1, 1, 0], flat, "server")  # right on 2; only A: 3, only B: 0
    for row in a["predictions"][:2] + b["predictions"][:2]:
        row["kind"] = "key"
    cmp = compare(a, b)
    assert cmp["paired"]["all"] == {"n": 6, "right": [5, 2], "only_a": 3, "only_b": 0,
                                    "mcnemar_p": pytest.approx(0.25)}
    assert cmp["paired"]["key"]["right"] == [2, 1] and cmp["paired"]["csqa"]["only_a"] == 2
    paths = []
    for i, res in enumerate((a, b, a, b)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(res))
    out = tmp_path / "pooled.json"
    assert main(["eval-compare", *map(str, paths), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "right in r0.json only 3, in r1.json only 0 (McNemar exact, two-sided p = 0.25)" in printed
    pooled = json.loads(out.read_text())["pooled"]["all"]
    assert (pooled["n"], pooled["only_a"], pooled["only_b"]) == (12, 6, 0)
    assert pooled["mcnemar_p"] == pytest.approx(2 / 64)
    assert main(["eval-compare", *map(str, paths[:3])]) == 2
    assert "in pairs (A B [A2 B2 ...]), got 3" in capsys.readouterr().err


def test_an_unreachable_server_is_a_message_not_a_traceback(bundled_model, capsys):
    assert main(["eval", "grocery", "--backend", "server", "--url", "http://127.0.0.1:9",
                 "--model", str(bundled_model), "--policy", "sirllm", "--limit", "1"]) == 2
    assert "cannot reach the server at http://127.0.0.1:9" in capsys.readouterr().err


# ---- the scoring fields -------------------------------------------------

def test_max_tokens_0_keeps_exactly_the_prompt(session_client, session_server, tok):
    s, p, q = sid(), tok("Alice keeps a red key in the blue box."), tok(" Bob asks where it is.")
    r1 = prefill(session_client, s, p)
    c = r1["choices"][0]
    assert c["text"] == "" and r1["usage"]["completion_tokens"] == 0
    assert r1["session"]["retained_tokens"] == len(p)
    got = info(session_server, s)
    assert [t["id"] for t in got["tokens"]] == p and got["pending_token"] is None
    r2 = prefill(session_client, s, q)
    # The engine pinned exactly the prompt: turn 2 loads all of it, recomputes nothing.
    assert r2["session"]["loaded_tokens"] == len(p) and r2["session"]["recomputed_tokens"] == 0
    assert [t["id"] for t in info(session_server, s)["tokens"]] == p + q
    rows = r2["choices"][0]["prompt_logprobs"]
    assert len(rows) == len(p + q) and rows[len(p)] is None and rows[-1] is not None


def test_peeks_leave_the_session_as_it_was(session_client, session_server, tok):
    """Peeks then a real turn = the real turn alone, with an evicting budget."""
    small = {"name": "sirllm", "start_size": 4, "entropy_size": 20, "recent_size": 0}  # 24
    first = tok("The grocery list: [chocolate], eggs, flour and a bag of green apples for the pie.")
    nxt = tok(" What did I put in brackets?")
    cands = [tok(" chocolate"), tok(" apples"), tok(" flour and eggs")]
    reserve = len(nxt) + max(map(len, cands))
    a, b = sid(), sid()
    for s in (a, b):
        prefill(session_client, s, first, kv_policy=small)
    before = info(session_server, a)
    peeks = [prefill(session_client, a, nxt + c, kv_policy=small, session_peek=True,
                     session_reserve_tokens=reserve) for c in cands]
    assert all(p["session"]["peek"] and p["session"]["turns"] == 1 for p in peeks)
    assert peeks[0]["session"]["loaded_tokens"] == 24 - reserve < len(first)  # it evicted
    assert info(session_server, a) == before
    ra = prefill(session_client, a, nxt + cands[1], kv_policy=small, session_reserve_tokens=reserve)
    prefill(session_client, b, nxt + cands[1], kv_policy=small, session_reserve_tokens=reserve)
    assert ra["session"]["recomputed_tokens"] == 0  # the peeks left the engine's pins alone
    ia, ib = info(session_server, a), info(session_server, b)
    assert [t["id"] for t in ia["tokens"]] == [t["id"] for t in ib["tokens"]]
    assert [t["score"] for t in ia["tokens"]] == pytest.approx([t["score"] for t in ib["tokens"]],
                                                                abs=1e-4)
    # A peek scores what the committing turn computes.
    tail = len(nxt) + len(cands[1])
    for row_p, row_c in zip(peeks[1]["choices"][0]["prompt_logprobs"][-tail + 1:],
                            ra["choices"][0]["prompt_logprobs"][-tail + 1:]):
        ((tok_p, lp_p),), ((tok_c, lp_c),) = row_p.items(), row_c.items()
        assert tok_p == tok_c and abs(lp_p["logprob"] - lp_c["logprob"]) < 1e-4


def test_scoring_fields_are_refused_where_they_do_not_apply(session_client, tok):
    s = sid()
    with pytest.raises(openai.BadRequestError, match=r"session_reserve_tokens 5 is less than .* 8"):
        prefill(session_client, s, tok("one two three four five six seven eight")[:8],
                session_reserve_tokens=5)
    with pytest.raises(openai.BadRequestError, match="session_peek needs a session"):
        session_client.completions.create(model=SERVED_NAME, prompt="Hi", max_tokens=1,
                                          extra_body={"session_peek": True})
    with pytest.raises(openai.BadRequestError, match="completions sessions only"):
        session_client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
            extra_body={"session_id": sid(), "session_reserve_tokens": 64})
    with pytest.raises(openai.BadRequestError, match="max_tokens must be >= 1 in a chat session"):
        session_client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=0,
            extra_body={"session_id": sid()})


# ---- server vs oracle ------------------------------------------------------

def test_grocery_on_the_server_picks_what_the_oracle_picks(tmp_path, bundled_model, session_server):
    common = ["grocery", "--model", str(bundled_model), *EVICTING, "--limit", "2",
              "--scoring", "text"]
    ref = run_eval(tmp_path, "ref", *common)
    srv = run_eval(tmp_path, "srv", *common, "--backend", "server", "--url", session_server.url,
                   "--concurrency", "2")
    assert srv["backend"] == "server" and srv["policy"] == ref["policy"]
    assert srv["metrics"]["max_retained"] <= 128 and srv["metrics"]["n_dialogues"] == 2
    cmp = compare(ref, srv)
    assert cmp["n_compared"] == 44
    for d in cmp["disagreements"]:
        assert min(d["margin"]) < NEAR_TIE, d
    # The values the picks compared, turn by turn.
    for a, b in zip(ref["predictions"], srv["predictions"]):
        assert (a["episode"], a["id"]) == (b["episode"], b["id"])
        if a["pred"] == b["pred"]:
            assert b["scores"] == pytest.approx(a["scores"], abs=2e-3)
            assert b["retained"] == a["retained"]
    out = tmp_path / "cmp.json"
    assert main(["eval-compare", str(tmp_path / "ref.json"), str(tmp_path / "srv.json"),
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n_compared"] == 44


def test_stream_ppl_on_the_server_matches_the_oracle(tmp_path, bundled_model, session_server):
    common = ["stream-ppl", "--model", str(bundled_model), *EVICTING, "--limit", "300"]
    ref = run_eval(tmp_path, "ref", *common)
    srv = run_eval(tmp_path, "srv", *common, "--backend", "server", "--url", session_server.url)
    assert srv["metrics"]["n_tokens"] == ref["metrics"]["n_tokens"] >= 300
    assert srv["metrics"]["ppl"] == pytest.approx(ref["metrics"]["ppl"], rel=1e-3)


def test_full_cache_on_a_server_is_a_session_that_never_evicts(session_server, bundled_model):
    from sir_vllm.eval.server_backend import ServerBackend
    from sir_vllm.policy import make_policy

    backend = ServerBackend(session_server.url, model=str(bundled_model), concurrency=2)
    assert backend.knobs(make_policy("full")) == {"name": "streaming", "start_size": 0,
                                                  "recent_size": 4096}  # --max-model-len
    session = backend.new_session(make_policy("full"))
    fed = 0
    for i in range(3):
        text = "I like green tea and long walks by the river. " * 12  # > the server's 100
        fed += len(session.r.encode(session.r.message_text("user", text, i == 0)))
        session.feed("user", text)
    got = backend.session_info(session.id)
    assert got["retained_tokens"] == fed > 300 and got["evicted_tokens"] == 0
    session.close()
    r = requests.get(f"{session_server.url}/v1/sessions/{session.id}",
                     headers={"Authorization": "Bearer unused"}, timeout=60)
    assert r.status_code == 404
