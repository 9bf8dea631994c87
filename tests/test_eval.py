"""`sir-vllm eval` on small subsets of the paper's data, with the oracle."""

from __future__ import annotations

import json

import pytest

from sir_vllm.cli.main import main
from sir_vllm.eval import data, scoring
from sir_vllm.eval.tasks import grocery_metrics, rps_metrics

DATA = data.default_data_dir()


def run_eval(tmp_path, *argv) -> dict:
    out = tmp_path / "result.json"
    assert main(["eval", *argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_grocery_episodes_follow_the_paper():
    episodes = data.load_grocery(data.default_file("grocery", DATA), limit=3)
    assert len(episodes) == 3
    kinds = [t.kind for t in episodes[0].turns]
    assert kinds == ["key"] + ["csqa"] * 20 + ["recall"]
    recall = episodes[0].turns[-1]
    key = episodes[0].turns[0].question
    assert recall.texts[recall.gold] in key  # the asked grocery is the one given


class _RecordingSession:
    """Stands in for a backend session: remembers the messages it was asked."""

    def __init__(self, asked):
        self.asked = asked

    def choose(self, message, candidates, mode):
        from types import SimpleNamespace
        self.asked.append((message, candidates))
        return SimpleNamespace(index=0, retained=len(self.asked))


class _RecordingBackend:
    def __init__(self):
        self.asked = []

    def new_session(self, policy):
        return _RecordingSession(self.asked)


@pytest.mark.parametrize("loader", ["grocery", "dailydialog"])
def test_text_scoring_asks_without_the_listed_choices_and_letter_with_them(loader):
    from sir_vllm.eval.tasks import run_choice_episodes
    from sir_vllm.policy import make_policy
    load = data.load_grocery if loader == "grocery" else data.load_dailydialog
    episodes = load(data.default_file(loader, DATA), limit=2 if loader == "grocery" else 6)
    asked = {}
    for mode in ("letter", "text"):
        backend = _RecordingBackend()
        run_choice_episodes(backend, make_policy("full"), episodes, mode, mode)
        asked[mode] = backend.asked
    assert len(asked["letter"]) == len(asked["text"]) == sum(len(e.turns) for e in episodes)
    for (lq, lc), (tq, tc) in zip(asked["letter"], asked["text"]):
        if lc == ["OK"]:           # the grocery key turn: nothing to list
            assert lq == tq
            continue
        assert " Choices: " in lq and " Choices: " not in tq
        assert lq.startswith(tq)   # the same question, the list dropped
        assert all(f"({letter})" in lq for letter in lc)
        assert not any(text in tq.split("?")[-1] for text in tc if len(text) > 3)


def test_rps_prompt_names_the_previous_move():
    ep = data.load_rps(data.rps_files(DATA)["rock"], limit=3, player="rock")
    assert ep.turns[0].question == data.RPS_FIRST
    prev = ep.turns[0].texts[ep.turns[0].user_choice]
    assert f"I chose [{prev}]" in ep.turns[1].question


def test_text_scoring_normalises_by_bytes_and_letter_uses_first_token():
    texts = ["ab", "abcd"]
    # text: -2/2 = -1.0 beats -3/4 = -0.75? no: -0.75 is larger.
    assert scoring.pick("text", texts, [1, 2], [[-2.0, -9.0], [-1.0, -2.0]]) == 1
    assert scoring.pick("letter", texts, [1, 1], [[-0.5, -9.0], [-1.0, 0.0]]) == 0
    with pytest.raises(ValueError, match="scoring"):
        scoring.candidates(None, "words")


def test_metrics_by_hand():
    rows = [{"kind": "csqa", "pred": 1, "gold": 1, "retained": 5},
            {"kind": "csqa", "pred": 0, "gold": 1, "retained": 9},
            {"kind": "recall", "pred": 2, "gold": 2, "retained": 9, "key_in_cache": True}]
    m = grocery_metrics(rows)
    assert (m["acc_c"], m["acc_g"], m["max_retained"], m["key_in_cache"]) == (0.5, 1.0, 9, 1.0)
    r = rps_metrics({"rock": [{"pred": 1, "gold": 1, "user_choice": 0},
                              {"pred": 0, "gold": 1, "user_choice": 0},
                              {"pred": 2, "gold": 1, "user_choice": 0}]})
    assert r["rock"]["win"] == pytest.approx(1 / 3) and r["rock"]["tie"] == pytest.approx(1 / 3)
    assert r["avg_win"] == pytest.approx(1 / 3)


def test_grocery_cli_json_and_budget(tmp_path, bundled_model, capsys):
    res = run_eval(tmp_path, "grocery", "--model", str(bundled_model), "--policy", "sirllm",
                   "--start-size", "4", "--entropy-size", "200", "--limit", "1")
    assert res["policy"] == {"name": "sirllm", "start_size": 4, "entropy_size": 200,
                             "recent_size": 0, "decay": 1.0, "score": "paper", "cache_size": 204}
    m = res["metrics"]
    assert set(m) >= {"acc_c", "acc_g", "key_in_cache"} and m["n_csqa"] == 20
    assert m["max_retained"] <= 204
    assert "| method | scoring | ACC_c | ACC_g" in capsys.readouterr().out
    again = run_eval(tmp_path, "grocery", "--model", str(bundled_model), "--policy", "sirllm",
                     "--start-size", "4", "--entropy-size", "200", "--limit", "1")
    assert again["predictions"] == res["predictions"]  # deterministic


def test_full_cache_holds_the_grocery_at_recall(tmp_path, bundled_model):
    res = run_eval(tmp_path, "grocery", "--model", str(bundled_model), "--policy", "full",
                   "--limit", "1")
    assert res["metrics"]["key_in_cache"] == 1.0
    # Without the listed choices (`text`) a dialogue is ~600-700 tokens: it fits
    # the paper's 1,024 and outgrows 512, the budget results.md uses to evict.
    assert 512 < res["metrics"]["max_retained"] <= 1024


def test_dailydialog_and_rps_cli(tmp_path, bundled_model):
    dd = run_eval(tmp_path, "dailydialog", "--model", str(bundled_model), "--policy", "streaming",
                  "--limit", "6", "--scoring", "letter")
    assert dd["metrics"]["n_rows"] == 6 and 0.0 <= dd["metrics"]["acc"] <= 1.0
    assert dd["policy"]["cache_size"] == 512
    rps = run_eval(tmp_path, "rps", "--model", str(bundled_model), "--policy", "sirllm",
                   "--limit", "4", "--data", str(data.rps_files(DATA)["paper"]))
    m = rps["metrics"]
    assert list(m) == ["rock_paper_scissors_dominant_paper", "avg_win"]
    row = m["rock_paper_scissors_dominant_paper"]
    assert row["n_rounds"] == 4 and row["win"] + row["tie"] + row["lose"] == pytest.approx(1.0)
    assert rps["policy"]["decay"] == 0.9  # the paper's setting for rps


def test_stream_ppl_shows_the_attention_sink_effect(tmp_path, bundled_model):
    """StreamingLLM's finding, reproduced: a window without sinks breaks down
    once it slides; keeping 4 sink tokens at the same budget does not."""
    def ppl(*knobs):
        res = run_eval(tmp_path, "stream-ppl", "--model", str(bundled_model), "--policy",
                       "streaming", *knobs, "--limit", "300")
        assert res["metrics"]["n_tokens"] >= 300
        return res["metrics"]["ppl"]

    window, sinks = ppl("--start-size", "0", "--recent-size", "64"), ppl("--recent-size", "60")
    assert 1.0 < sinks < window / 5


def test_bad_flags_are_refused(bundled_model, capsys):
    assert main(["eval", "grocery", "--model", str(bundled_model), "--policy", "streaming",
                 "--decay", "0.5"]) == 2
    assert "--decay" in capsys.readouterr().err
    assert main(["eval", "grocery", "--model", str(bundled_model), "--policy", "sirllm",
                 "--decay", "1.5"]) == 2
    assert "decay" in capsys.readouterr().err


def test_lockstep_names_the_tokens_a_near_tie_swaps():
    """Two sides whose scores differ in the last digits at the top-K boundary
    keep different tokens; split_point lists exactly those, with both scores."""
    import numpy as np

    from sir_vllm.eval.lockstep import split_point
    from sir_vllm.policy import make_policy

    pol = make_policy("sirllm", start_size=1, entropy_size=3, recent_size=0)
    ids = [10, 11, 12, 13, 14, 15]
    oracle = np.array([0.0, 5.0, 1.0000002, 0.2, 1.0000001, 0.5])
    server = np.array([0.0, 5.0, 1.0000001, 0.2, 1.0000002, 0.5])
    swapped = split_point(ids, pol, 1, oracle, server)  # the sink + the top 2 scores
    assert [(s["position"], s["token"], s["kept_by"]) for s in swapped] == [
        (2, 12, "oracle"), (4, 14, "server")]
    assert swapped[0]["oracle_score"] == pytest.approx(1.0000002)
    assert split_point(ids, pol, 1, oracle, oracle) == []
