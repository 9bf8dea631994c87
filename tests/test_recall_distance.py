"""`sir-vllm eval recall-distance`: the data, the task on the oracle, and the
server producing the oracle's token stream (filler answers, picks, scores)."""

from __future__ import annotations

import json
import re

import pytest

from sir_vllm.cli.main import main
from sir_vllm.eval import recall_data
from sir_vllm.eval.recall_data import CITIES, NAMES, build_episodes, make_fact

DISTANCES = [5, 20, 100, 500]


@pytest.fixture(scope="module")
def dialogues():
    return recall_data.load_fillers(recall_data.default_filler_file())


def run_eval(tmp_path, name, *argv) -> dict:
    out = tmp_path / f"{name}.json"
    assert main(["eval", "recall-distance", *argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


# ---- the data -----------------------------------------------------------

def test_episodes_are_a_function_of_the_seed(dialogues):
    a = build_episodes(DISTANCES, [6, 6, 3, 2], 7, dialogues)
    b = build_episodes(DISTANCES, [6, 6, 3, 2], 7, dialogues)
    assert [(e.id, e.fact.values, e.fact.gold, e.fillers) for e in a] == \
           [(e.id, e.fact.values, e.fact.gold, e.fillers) for e in b]
    other = build_episodes(DISTANCES, [6, 6, 3, 2], 8, dialogues)
    assert [e.fact.values for e in other] != [e.fact.values for e in a]
    assert [e.fillers for e in other] != [e.fillers for e in a]
    # Fact i is the same whatever the counts asked, and at every distance.
    more = build_episodes([5], [20], 7, dialogues)
    assert [e.fact for e in more[:6]] == [e.fact for e in a if e.k == 5]
    by_k = {(e.k, e.fact.index): e for e in a}
    assert by_k[(500, 1)].fact == by_k[(5, 1)].fact
    assert by_k[(500, 1)].fillers[:100] == by_k[(100, 1)].fillers
    assert [len(e.fillers) for e in a] == [e.k for e in a]


def test_four_distinct_candidates_of_one_kind_with_the_gold_among_them():
    pools = {"name": set(NAMES), "place": set(CITIES)}
    golds = []
    for i in range(90):
        fact = make_fact(0, i)
        q = fact.question
        assert len(set(q.texts)) == 4 and 0 <= q.gold < 4
        assert q.texts[q.gold] == fact.answer and fact.marker == f"[{fact.answer}]"
        assert fact.marker in fact.statement  # the fact turn tells the gold, bracketed
        assert not any(v in fact.statement for i, v in enumerate(q.texts) if i != q.gold)
        if fact.kind == "number":
            assert all(re.fullmatch(r"[1-9]\d{3}", v) for v in q.texts)
        else:
            assert set(q.texts) <= pools[fact.kind]
        # text scoring asks without the list; letter scoring lists every choice
        assert not any(v in q.message("text") for v in q.texts)
        assert all(f"({letter}) {v}" in q.message("letter") for letter, v in zip("ABCD", q.texts))
        golds.append(q.gold)
    assert [make_fact(0, i).kind for i in range(6)] == ["name", "number", "place"] * 2
    assert set(golds) == {0, 1, 2, 3}  # the gold's position is drawn, not fixed
    # No value can read inside another of its kind (the cache check looks for "[value]").
    for pool in (NAMES, CITIES):
        assert len(set(pool)) == len(pool)
        assert not [(a, b) for a in pool for b in pool if a != b and a.lower() in b.lower()]


SUBJECT = {"name": r"\bneighbou?rs?\b", "number": r"\blockers?\b", "place": r"\bsisters?\b"}


def test_fillers_never_mention_the_fact(dialogues):
    utterances = {u for d in dialogues for u in d}
    for e in build_episodes([300], [12], 3, dialogues):
        assert len(e.fillers) == 300 and set(e.fillers) <= utterances
        for filler in e.fillers:
            for value in e.fact.question.texts:
                assert not re.search(rf"\b{re.escape(value)}\b", filler, re.IGNORECASE), filler
            assert "[" not in filler and "]" not in filler
            assert not re.search(SUBJECT[e.fact.kind], filler, re.IGNORECASE), filler


def test_the_same_fillers_skip_what_a_fact_mentions(dialogues):
    """A filler run walks the dialogues in order from its start: skipping an
    utterance that names the fact is the only gap."""
    fact = make_fact(0, 0)
    run = recall_data.filler_turns(fact, dialogues, 400, 0)
    flat = [u for d in dialogues for u in d]
    start = flat.index(run[0])
    window = [u for u in (flat[start:] + flat[:start]) if not fact.avoid.search(u)][:400]
    assert run == window


# ---- the task on the oracle (tiny model) --------------------------------

TINY = ["--policy", "sirllm", "--entropy-size", "124", "--answer-tokens", "8"]


def test_recall_distance_end_to_end_on_the_oracle(tmp_path, tiny_model, capsys):
    res = run_eval(tmp_path, "a", "--model", str(tiny_model), *TINY,
                   "--distances", "0", "2", "12", "--facts", "3", "2", "2")
    m = res["metrics"]
    assert res["task"] == "recall-distance" and res["policy"]["cache_size"] == 128
    assert res["recall"] == {"distances": [0, 2, 12], "facts": [3, 2, 2], "seed": 0,
                             "answer_tokens": 8}
    assert [m["per_k"][k]["n_facts"] for k in ("0", "2", "12")] == [3, 2, 2]
    rows = res["predictions"]
    assert [r["k"] for r in rows] == [0, 0, 0, 2, 2, 12, 12]  # episode order, not run order
    for r in rows:
        assert r["answer_tokens"] <= 8 * r["k"] and len(r["scores"]) == 4
        assert r["max_retained"] <= 128 and r["pred"] in range(4)
        assert r["distance_tokens"] > 0 or r["k"] == 0
    # Nothing is evicted before the question at k=0; 12 turns through 128 slots evict it.
    assert m["per_k"]["0"]["fact_in_cache"] == 1.0
    assert m["per_k"]["12"]["mean_distance_tokens"] > 128
    out = capsys.readouterr().out
    assert "| method | scoring | k | facts | distance (tokens) | accuracy | fact in cache" in out
    again = run_eval(tmp_path, "b", "--model", str(tiny_model), *TINY,
                     "--distances", "0", "2", "12", "--facts", "3", "2", "2")
    assert again["predictions"] == rows  # deterministic: same facts, fillers, answers


def test_streaming_loses_the_fact_that_the_full_cache_keeps(tmp_path, tiny_model):
    common = ["--model", str(tiny_model), "--distances", "10", "--facts", "2",
              "--answer-tokens", "8"]
    streaming = run_eval(tmp_path, "s", *common, "--policy", "streaming", "--recent-size", "124")
    full = run_eval(tmp_path, "f", *common, "--policy", "full")
    assert streaming["metrics"]["per_k"]["10"]["fact_in_cache"] == 0.0
    assert full["metrics"]["per_k"]["10"]["fact_in_cache"] == 1.0
    assert full["metrics"]["max_retained"] > 128 >= streaming["metrics"]["max_retained"]


def test_the_full_cache_skips_a_distance_past_the_window_and_says_so(tmp_path, tiny_model):
    res = run_eval(tmp_path, "f", "--model", str(tiny_model), "--policy", "full",
                   "--distances", "1", "400", "--facts", "2", "--answer-tokens", "16")
    m = res["metrics"]
    assert m["per_k"]["1"]["n_facts"] == 2
    assert m["per_k"]["400"]["n_facts"] == 0 and "8192-token window" in m["per_k"]["400"]["skipped"]
    assert list(m["skipped"]) == ["400"] and {r["k"] for r in res["predictions"]} == {1}


def test_eval_plot_draws_a_line_per_result(tmp_path, tiny_model, capsys):
    common = ["--model", str(tiny_model), "--distances", "0", "3", "--facts", "2",
              "--answer-tokens", "4"]
    paths = []
    for name, policy in (("sir", TINY[:4]), ("full", ["--policy", "full"])):
        run_eval(tmp_path, name, *common, *policy)
        paths.append(str(tmp_path / f"{name}.json"))
    png = tmp_path / "plot" / "recall.png"
    capsys.readouterr()
    assert main(["eval-plot", *paths, "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| method | k=0 | k=3 |" in out and "| full cache |" in out and "| SirLLM 4+124+0" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    grocery = tmp_path / "grocery.json"
    grocery.write_text(json.dumps({"task": "grocery"}))
    assert main(["eval-plot", str(grocery), "--out", str(png)]) == 2
    assert "draws recall-distance results" in capsys.readouterr().err


def _recall_result(policy, rows, skipped=None):
    from sir_vllm.eval.recall import recall_metrics

    return {"task": "recall-distance", "backend": "reference", "scoring": "text", "limit": None,
            "policy": policy, "seconds": 1.0, "date": "today",
            "metrics": recall_metrics(rows, [5, 500], skipped or {}), "predictions": rows}


def _row(k, fact, pred, held, sha):
    return {"episode": f"recall-k{k}-f{fact}", "id": f"recall-{fact}", "kind": "recall", "k": k,
            "pred": pred, "gold": 1, "scores": [-2.0, -1.0, -3.0, -4.0], "fact_in_cache": held,
            "distance_tokens": 40 * k, "max_retained": 100, "repeated_answers": 1,
            "answers_sha1": sha}


def test_metrics_compare_and_summary_of_hand_written_results():
    from sir_vllm.eval.compare import compare
    from sir_vllm.eval.summary import summarize

    sir = {"name": "sirllm", "start_size": 4, "entropy_size": 1020, "recent_size": 0,
           "decay": 1.0, "score": "paper", "cache_size": 1024}
    a = _recall_result(sir, [_row(5, 0, 1, True, "x"), _row(5, 1, 0, True, "y"),
                             _row(500, 0, 1, False, "z")])
    per_k = a["metrics"]["per_k"]
    assert (per_k["5"]["acc"], per_k["5"]["n_facts"], per_k["5"]["fact_in_cache"]) == (0.5, 2, 1.0)
    assert per_k["500"]["acc"] == 1.0 and per_k["500"]["fact_in_cache"] == 0.0
    assert per_k["5"]["repeated_answer_share"] == pytest.approx(2 / 10)
    b = _recall_result(sir, [_row(5, 0, 1, True, "x"), _row(5, 1, 2, True, "other"),
                             _row(500, 0, 1, False, "z")])
    cmp = compare(a, b)
    assert (cmp["n_agree"], cmp["n_same_answers"], cmp["n_answer_streams"]) == (2, 2, 3)
    full = _recall_result({"name": "full", "cache_size": None}, [_row(5, 0, 1, True, "x")],
                          skipped={500: "does not fit"})
    assert full["metrics"]["per_k"]["500"] == {"skipped": "does not fit", "n_facts": 0}
    text = summarize([dict(a, _file="a.json"), dict(full, _file="f.json")])
    rows = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert rows[0].startswith("| method | scoring | k |") and len(rows) == 1 + 2 + 2
    assert "| full cache | text | 500 | 0 | – | skipped |" in text


@pytest.mark.parametrize("argv, message", [
    (["--distances", "5", "20", "--facts", "1", "2", "3"], "one count or one per distance"),
    (["--distances", "5", "5"], "distinct"),
    (["--facts", "0"], "--facts must be >= 1"),
    (["--answer-tokens", "0"], "--answer-tokens must be >= 1"),
    (["--limit", "3"], "use --facts"),
])
def test_bad_recall_flags_are_refused(tiny_model, capsys, argv, message):
    assert main(["eval", "recall-distance", "--model", str(tiny_model), "--policy", "full",
                 *argv]) == 2
    assert message in capsys.readouterr().err


def test_recall_flags_on_another_task_are_refused(tiny_model, capsys):
    assert main(["eval", "grocery", "--model", str(tiny_model), "--policy", "full",
                 "--distances", "5"]) == 2
    assert "apply to recall-distance only" in capsys.readouterr().err


# ---- server vs oracle ---------------------------------------------------

SERVER_POLICY = {"name": "sirllm", "start_size": 4, "entropy_size": 100, "recent_size": 24,
                 "decay": 0.9}


def test_a_generated_turn_is_the_oracles_on_the_server(session_server, bundled_model):
    """Turn by turn on both backends: the same answer tokens (stopping at the
    end-of-message token where the oracle stops), the same retained counts,
    and after the answers (one left pending) the same pick and scores."""
    from sir_vllm.eval.backends import ReferenceBackend
    from sir_vllm.eval.server_backend import ServerBackend
    from sir_vllm.policy import make_policy

    policy = make_policy(**SERVER_POLICY)
    oracle = ReferenceBackend(bundled_model).new_session(policy)
    server = ServerBackend(session_server.url, model=str(bundled_model)).new_session(policy)
    eos = oracle.r.tokenizer.eos_token_id
    try:
        told = [s.choose("Please remember this: my sister lives in [Oslo].", ["OK"], "text")
                for s in (oracle, server)]
        assert told[0].retained == told[1].retained
        ended = 0
        for text in ("Reply with one word: is tea hot or cold?", "Do you like music ?",
                     "What a lovely day , isn't it ?", "Thanks . See you tomorrow ."):
            a, b = oracle.generate(text, 24), server.generate(text, 24)
            assert a.ids == b.ids and a.retained == b.retained and a.input_tokens == b.input_tokens
            ended += a.ids[-1] == eos and len(a.ids) < 24
        assert ended >= 1  # at least one answer stopped at <|im_end|> on both sides
        assert oracle.holds_text("[Oslo]") == server.holds_text("[Oslo]")
        cands = ["Oslo", "Lima", "Perth", "Riga"]
        asked = "Which city does my sister live in?"
        q = [s.choose(asked, cands, "text") for s in (oracle, server)]
        assert q[0].index == q[1].index and q[0].retained == q[1].retained <= 128
        assert q[1].scores == pytest.approx(q[0].scores, abs=1e-4)
    finally:
        server.close()


def test_recall_distance_on_the_server_picks_what_the_oracle_picks(tmp_path, bundled_model,
                                                                  session_server):
    common = ["--model", str(bundled_model), "--policy", "sirllm", "--entropy-size", "100",
              "--recent-size", "24", "--distances", "2", "6", "--facts", "2",
              "--answer-tokens", "12"]
    ref = run_eval(tmp_path, "ref", *common)
    srv = run_eval(tmp_path, "srv", *common, "--backend", "server", "--url", session_server.url,
                   "--concurrency", "2")
    assert srv["backend"] == "server" and srv["policy"] == ref["policy"]
    assert len(ref["predictions"]) == len(srv["predictions"]) == 4
    for a, b in zip(ref["predictions"], srv["predictions"]):
        assert a["episode"] == b["episode"]
        assert a["answers_sha1"] == b["answers_sha1"]  # the same filler answers, token for token
        assert (a["pred"], a["retained"], a["max_retained"], a["fact_in_cache"]) == \
               (b["pred"], b["retained"], b["max_retained"], b["fact_in_cache"])
        assert b["scores"] == pytest.approx(a["scores"], abs=1e-4)
    assert max(r["max_retained"] for r in srv["predictions"]) == 128  # it evicted
    cmp_out = tmp_path / "cmp.json"
    assert main(["eval-compare", str(tmp_path / "ref.json"), str(tmp_path / "srv.json"),
                 "--out", str(cmp_out)]) == 0
    cmp = json.loads(cmp_out.read_text())
    assert (cmp["n_agree"], cmp["n_same_answers"], cmp["n_answer_streams"]) == (4, 4, 4)
    # The full cache past the server's window (--max-model-len 4096) is skipped, not a failure.
    full = run_eval(tmp_path, "full", "--model", str(bundled_model), "--policy", "full",
                    "--distances", "300", "--facts", "1", "--backend", "server",
                    "--url", session_server.url)
    assert "4096-token window" in full["metrics"]["per_k"]["300"]["skipped"]
