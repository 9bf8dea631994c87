"""`sir-vllm eval-grid`: SirLLM's budget split lined up by recent share, and the
rule that picks the default, on hand-written results (no model needed)."""

from __future__ import annotations

import json

import pytest

from sir_vllm.cli.main import main
from sir_vllm.eval import grid


def sirllm(entropy, recent, start=4):
    return {"name": "sirllm", "start_size": start, "entropy_size": entropy, "recent_size": recent,
            "decay": 1.0, "score": "paper", "cache_size": start + entropy + recent}


def streaming(recent, start=4):
    return {"name": "streaming", "start_size": start, "recent_size": recent,
            "cache_size": start + recent}


def recall(policy, acc, k=100):
    return {"task": "recall-distance", "policy": policy,
            "metrics": {"per_k": {str(k): {"acc": acc, "n_facts": 40}}}}


def ppl(policy, value):
    return {"task": "stream-ppl", "policy": policy, "metrics": {"ppl": value}}


def grocery(policy, right: list[bool]):
    """One recall question per dialogue (right or wrong) and one CSQA question each."""
    preds = []
    for i, ok in enumerate(right):
        preds.append({"episode": f"grocery-{i}", "kind": "recall", "pred": 0 if ok else 1,
                      "gold": 0, "retained": 100})
        preds.append({"episode": f"grocery-{i}", "kind": "csqa", "pred": 0, "gold": 0,
                      "retained": 100})
    return {"task": "grocery", "scoring": "text", "policy": policy, "predictions": preds,
            "metrics": {"acc_g": sum(right) / len(right), "n_dialogues": len(right)}}


def named(results):
    return [dict(r, _file=f"r{i}.json") for i, r in enumerate(results)]


def test_recent_share_lines_up_budgets_of_different_sizes():
    assert grid.recent_share(sirllm(1020, 0)) == 0
    assert grid.recent_share(sirllm(765, 255)) == 0.25
    # the grid's rows: 1,024 and 512 budgets split alike land on one share
    shares = [s.share for s in grid.build(named([
        recall(sirllm(764, 256), 0.4), recall(sirllm(252, 768), 0.3),
        grocery(sirllm(380, 128), [True]), grocery(sirllm(124, 384), [True])]))]
    assert shares == [0.25, 0.75]
    assert grid.recent_share(streaming(1020)) == 1.0
    with pytest.raises(ValueError, match="no budget split"):
        grid.recent_share({"name": "full", "cache_size": None})


def test_the_rule_keeps_memory_first_then_takes_the_lowest_perplexity():
    results = named([
        recall(sirllm(1020, 0), 0.725), recall(sirllm(764, 256), 0.71), recall(streaming(1020), 0.275),
        ppl(sirllm(1020, 0), 62.3), ppl(sirllm(764, 256), 14.5), ppl(streaming(1020), 13.6),
    ])
    splits = grid.build(results)
    assert [s.share for s in splits] == [0, 0.25, 1.0]
    pick, why = grid.choose(splits)
    # 71.0 is within 2 points of 72.5 and has the lower perplexity; 27.5 is not
    assert pick.share == 0.25 and pick.labels == {"recall": "4+764+256", "ppl": "4+764+256"}
    assert "2 of 3 splits" in why and "100% recent (recall 27.5)" in why
    # a tighter margin leaves only the best recall
    assert grid.choose(splits, margin=1.0)[0].share == 0


def test_when_no_split_keeps_all_memory_the_smallest_worst_shortfall_wins():
    results = named([
        recall(sirllm(1020, 0), 0.725), recall(sirllm(956, 64), 0.625), recall(streaming(1020), 0.275),
        grocery(sirllm(508, 0), [True] * 39 + [False] * 11),      # 78.0
        grocery(sirllm(476, 32), [True] * 41 + [False] * 9),      # 82.0
        grocery(streaming(508), [True] * 15 + [False] * 35),      # 30.0
        ppl(sirllm(1020, 0), 62.6), ppl(sirllm(956, 64), 19.9), ppl(streaming(1020), 13.6)])
    pick, why = grid.choose(grid.build(results))
    # 0% is 4 points short on Grocery, 5% is 10 short on recall: neither within 2
    assert pick.share == 0 and "within 4 points" in why and "margin widened" in why
    assert grid.choose(grid.build(results), margin=10)[0].share == 0.05  # both in: lower ppl wins


def test_a_split_missing_a_measure_does_not_compete():
    results = named([recall(sirllm(1020, 0), 0.5), recall(sirllm(508, 512), 0.5),
                     ppl(sirllm(1020, 0), 60.0)])
    pick, why = grid.choose(grid.build(results))
    assert pick.share == 0  # 50% recent has no perplexity: it cannot win on it
    assert "not compared, a measure missing: 50% recent (no ppl)" in why
    with pytest.raises(ValueError, match="nothing to choose from"):
        grid.choose(grid.build(named([recall(sirllm(1020, 0), 0.5), ppl(sirllm(508, 512), 14.0)])))


def test_without_perplexity_the_split_that_remembers_most_wins():
    """Both within the margin and no stream-ppl to trade for: the smaller
    shortfall wins even at a larger recent share; an equal one, the smaller share."""
    pick, why = grid.choose(grid.build(named([recall(sirllm(1020, 0), 0.60),
                                              recall(sirllm(956, 64), 0.615)])))
    assert pick.share == 0.05 and "no stream-ppl to weigh" in why
    tie = grid.choose(grid.build(named([recall(sirllm(1020, 0), 0.6), recall(sirllm(956, 64), 0.6)])))[0]
    assert tie.share == 0


def test_grocery_reads_the_first_dialogues_when_asked():
    long = grocery(sirllm(508, 0), [True, True, False, False])       # 50% over 4, 100% over 2
    short = grocery(sirllm(380, 128), [False, True])                  # 50% over 2
    splits = grid.build(named([long, short]), grocery_dialogues=2)
    assert [s.values["grocery"] for s in splits] == [100.0, 50.0]
    assert grid.build(named([long]))[0].values["grocery"] == 50.0
    with pytest.raises(ValueError, match="fewer than --grocery-dialogues 3"):
        grid.build(named([short]), grocery_dialogues=3)


def test_two_results_for_one_split_and_task_are_refused():
    with pytest.raises(ValueError, match="two recall results for a 25% recent share"):
        grid.build(named([recall(sirllm(764, 256), 0.4), recall(sirllm(380, 128), 0.5)]))


def test_eval_grid_command_prints_table_and_pick_and_draws(tmp_path, capsys):
    paths = []
    for i, r in enumerate([recall(sirllm(1020, 0), 0.725), recall(sirllm(764, 256), 0.45),
                           recall(streaming(1020), 0.275), ppl(sirllm(1020, 0), 62.3),
                           ppl(sirllm(764, 256), 14.5), ppl(streaming(1020), 13.6),
                           grocery(sirllm(508, 0), [True, True, False]),
                           grocery(streaming(508), [False, False, True])]):
        path = tmp_path / f"r{i}.json"
        path.write_text(json.dumps(r))
        paths.append(str(path))
    png = tmp_path / "plot" / "grid.png"
    assert main(["eval-grid", *paths, "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| recent share | recall k=100 (%) | Grocery ACC_g (%) | stream-ppl |" in out
    assert "| 0% **(rule's pick)** | 72.5 (4+1020+0) | 66.7 (4+508+0) | 62.30 (4+1020+0) |" in out
    assert "| 25% | 45.0 (4+764+256) | – | 14.50 (4+764+256) |" in out
    assert "The rule picks 0% recent" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize("extra, message", [
    (["--k", "500"], "no recall measured at k=500"),
    (["--grocery-dialogues", "0"], "--grocery-dialogues must be >= 1"),
    (["--margin", "-1"], "--margin must be >= 0"),
])
def test_bad_grid_input_is_refused_with_a_reason(tmp_path, capsys, extra, message):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recall(sirllm(1020, 0), 0.5)))
    assert main(["eval-grid", str(path), "--out", str(tmp_path / "g.png"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_result_of_another_task_or_policy_is_refused(tmp_path, capsys):
    dd = tmp_path / "dd.json"
    dd.write_text(json.dumps({"task": "dailydialog", "policy": sirllm(508, 0)}))
    assert main(["eval-grid", str(dd)]) == 2
    assert "eval-grid reads recall-distance, grocery, stream-ppl results" in capsys.readouterr().err
    full = tmp_path / "full.json"
    full.write_text(json.dumps(ppl({"name": "full", "cache_size": None}, 10.0)))
    assert main(["eval-grid", str(full)]) == 2
    assert "takes sirllm and streaming results" in capsys.readouterr().err
