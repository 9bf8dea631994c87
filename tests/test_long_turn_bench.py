"""`sir-vllm bench-long-turn` (issue 17's proof): its figures on synthetic
timings (fast), and the whole command in small against its own real `vllm
serve` on a tiny random model: 2,000 input tokens in turns of 500, a
300-token answer, budget 4+60 (passes of 15 tokens), so every turn runs in
chunks and the answer in segments. The tiny model's answers are noise; the
passes, the timing and the memory paths are the real ones. About 40 s of
server time after a start of one to three minutes on 2 cores (eager engine)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sir_vllm.bench.long_turn import (API, ENGINE, WORKER, LongTurnConfig, OverBudget, _check_budget,
                                      answer_blocks, answer_windows, input_stream, turn_sizes,
                                      window_ms_per_1k)
from sir_vllm.bench.runner import parse_budget
from sir_vllm.cli.main import main


def small(**kw) -> LongTurnConfig:
    args = dict(model=Path("m"), out=Path("o"), input_tokens=2000, turn_tokens=500, answer_tokens=300,
                budget=parse_budget("4+60"), window_tokens=500, answer_window_tokens=100)
    return LongTurnConfig(**{**args, **kw})


def test_turns_open_with_one_pass_and_add_up_to_the_input():
    cfg = small()
    assert cfg.chunk == 15 and cfg.room == 60  # a quarter of the room beside the sinks
    assert turn_sizes(cfg) == [15, 485, 500, 500, 500]  # turns end at multiples of 500
    assert turn_sizes(small(input_tokens=2030)) == [15, 485, 500, 500, 530]  # 30 left: joins the last
    assert turn_sizes(small(input_tokens=2100)) == [15, 485, 500, 500, 500, 100]
    assert sum(turn_sizes(LongTurnConfig(model=Path("m"), out=Path("o")))) == 1_000_000
    assert input_stream([1, 2, 3], 7) == [1, 2, 3, 1, 2, 3, 1]


def test_validation_refuses_turns_that_would_not_run_in_passes():
    for bad, match in ((dict(turn_tokens=75), "--turn-tokens"), (dict(input_tokens=400), "--input-tokens"), (dict(answer_tokens=50), "--answer-tokens"),
                       (dict(window_tokens=1500), "--window-tokens"),
                       (dict(answer_window_tokens=200), "--answer-window-tokens")):
        with pytest.raises(ValueError, match=match):
            small(**bad).validate()
    small().validate()


def test_time_windows():
    turns = [{"turn": i, "tokens": 500, "latency_ms": ms} for i, ms in enumerate([1000, 600, 500, 800])]
    first = window_ms_per_1k(turns, 1000, last=False)
    last = window_ms_per_1k(turns, 1000, last=True)
    assert first["turns"] == [0, 1] and first["ms_per_1k"] == 1600
    assert last["turns"] == [2, 3] and last["ms_per_1k"] == 1300
    token_ms = [10.0 * (i + 1) for i in range(300)]  # a token every 10 ms
    a, b = answer_windows(token_ms, 100)
    assert a["ms_per_1k"] == pytest.approx(10_000) and b["ms_per_1k"] == pytest.approx(10_000)
    assert [x["output_tokens"] for x in answer_blocks(token_ms, 100)] == [100, 200, 300]


def test_a_turn_over_the_budget_stops_the_run():
    ok = {"session": {"budget": 64, "retained_tokens": 64}, "retained_before": 49}
    _check_budget("turn 1", ok, {})
    for bad in ({**ok, "session": {"budget": 64, "retained_tokens": 65}}, {**ok, "retained_before": 70}):
        with pytest.raises(OverBudget, match="above its budget of 64") as e:
            _check_budget("turn 2", bad, {"turns": [1]})
        assert e.value.partial == {"turns": [1]}


def test_cli_validates_before_starting_anything(tmp_path, capsys):
    rc = main(["bench-long-turn", "--model", str(tmp_path), "--turn-tokens", "100",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "--turn-tokens 100 must be above" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_long_turn_bench_tiny_run(tiny_serving_model, tmp_path, capsys):
    out = tmp_path / "long-turn"
    rc = main(["bench-long-turn", "--model", str(tiny_serving_model), "--input-tokens", "2000",
               "--turn-tokens", "500", "--answer-tokens", "300", "--budget", "4+60",
               "--window-tokens", "500", "--answer-window-tokens", "100",
               "--server-args", "--enforce-eager --kv-cache-memory-bytes 256M",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    f, run = data["figures"], data["run"]
    assert f["budget"] == 64 and f["within_budget"] and f["max_retained"] <= 64
    turns = run["turns"]
    assert [t["tokens"] for t in turns] == [15, 485, 500, 500, 500]
    assert all(t["retained_tokens"] <= 64 for t in turns)
    assert all(t["chunks"] > 1 for t in turns[1:])  # 500 tokens in passes of 15
    assert run["answer"]["session"]["segments"] > 1 and len(run["answer"]["token_ms"]) == 300
    for key in ("input_ms_per_1k", "output_ms_per_1k"):
        assert f[key]["first"]["ms_per_1k"] > 0 and f[key]["last_over_first"] > 0
    assert {API, ENGINE, WORKER} <= set(f["memory"])
    assert all(m["first_mib"] > 50 and m["last_over_halfway"] > 0 for m in f["memory"].values())
    assert f["input_ms_per_1k"]["first"]["turns"] == [0, 1] and f["input_ms_per_1k"]["last"]["turns"] == [4]
    assert [s["fed"] for s in run["rss_samples"]] == [0, 15, 500, 1000, 1500, 2000, 2100, 2200, 2300]
    for text in ("retained tokens: max", "ms per 1K input tokens: first 500 tokens", "last 500 ",
                 "ms per 1K output tokens: first 100", "RSS engine_core", "last/halfway"):
        assert text in printed
    assert "| retained tokens, max (budget) | 64 (64) |" in (out / "results.md").read_text()
    assert (out / "long_turn.png").stat().st_size > 1000
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(alive(p) for p in data["processes"].values()):
        time.sleep(0.5)
    assert not any(alive(p) for p in data["processes"].values())  # the server and its engine are gone


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
