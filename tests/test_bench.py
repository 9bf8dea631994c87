"""`sir-vllm bench`: the figures (pure functions), the whole command against a
fake OpenAI-compatible server (fast, no vLLM), and a tiny run against the
shared real servers of conftest (stock and sirllm 4+64+32)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import pytest
from starlette.requests import Request  # module level: FastAPI resolves the annotation here

from sir_vllm.bench.client import RESEND, SESSION, Conversation, TurnRecord, parse_response
from sir_vllm.bench.metrics import (by_turn, first_failure, first_short_answer,
                                    is_context_length_error, late_window, memory_report, ratios,
                                    summarize)
from sir_vllm.bench.report import LATENCY_PLOT, THROUGHPUT_PLOT, split_at_failure
from sir_vllm.bench.runner import (Budget, parse_budget, parse_policies, parse_sessions,
                                   parse_urls, server_args)
from sir_vllm.bench.workload import build_workload, dialogue_turns, synthetic_turns
from sir_vllm.cli.main import main

CONTEXT_MSG = ("This model's maximum context length is 256 tokens. However, your prompt contains "
               "300 input tokens, which exceeds this limit even without any output tokens. "
               "Please reduce the length of the input prompt.")
REQUIRED = ("turns_per_s", "output_tokens_per_s", "ttft_p50", "ttft_p99", "latency_p50",
            "latency_p99", "kv_tokens_per_session")


# -- parsing ---------------------------------------------------------------

def test_parse_budget_and_lists():
    assert parse_budget("4+1020") == Budget(4, 1020, 0)
    assert parse_budget("4+64+32").total == 100
    assert parse_budget("1024") == Budget(4, 1020, 0)
    for bad in ("4+x", "4+0", "1+2+3+4", "-1+10"):
        with pytest.raises(ValueError, match="--budget"):
            parse_budget(bad)
    assert parse_policies("sirllm,none,stock") == ["sirllm", "stock"]
    with pytest.raises(ValueError, match="unknown policy"):
        parse_policies("sirllm,h2o")
    assert parse_sessions("8,1,4,4") == [1, 4, 8]
    with pytest.raises(ValueError):
        parse_sessions("0")
    assert parse_urls("sirllm=http://h:1/,none=http://h:2") == {"sirllm": "http://h:1",
                                                                "stock": "http://h:2"}
    with pytest.raises(ValueError, match="POLICY=URL"):
        parse_urls("http://h:1")


def test_server_args_per_policy():
    b = Budget(4, 64, 32)
    sir = server_args("sirllm", b, 0.7, 512, ["--seed", "1"])
    assert sir[sir.index("--kv-policy") + 1] == "sirllm"
    assert sir[sir.index("--kv-entropy-size") + 1] == "64"
    assert sir[sir.index("--kv-decay") + 1] == "0.7"
    assert sir[sir.index("--max-model-len") + 1] == "512" and sir[-2:] == ["--seed", "1"]
    assert "--enable-per-request-metrics" in sir and "--dtype" in sir
    st = server_args("streaming", b, 0.7, None, [])
    assert st[st.index("--kv-recent-size") + 1] == "96" and "--kv-entropy-size" not in st
    stock = server_args("stock", b, 0.7, None, [])
    assert stock[stock.index("--kv-policy") + 1] == "none" and "--max-model-len" not in stock


def test_cli_validates_before_starting_anything(tmp_path, capsys):
    rc = main(["bench", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--budget", "4+8",
               "--max-tokens", "64", "--policies", "sirllm"])
    assert rc == 2 and "leaves no room" in capsys.readouterr().err


# -- workload ---------------------------------------------------------------

def test_workload_is_fixed_by_the_seed_and_shared_across_sweeps():
    a = synthetic_turns(3, 5, seed=1)
    assert a == synthetic_turns(3, 5, seed=1) and a != synthetic_turns(3, 5, seed=2)
    assert synthetic_turns(1, 5, seed=1)[0] == a[0]  # session 0 is the same in every sweep
    dialogues = [["Hi .", "Hello !"], ["How are you ?", "Fine .", "Good ."], ["Bye ."]]
    d = dialogue_turns(dialogues, 2, 7, seed=0)
    assert [len(x) for x in d] == [7, 7] and d == dialogue_turns(dialogues, 2, 7, seed=0)
    assert set(d[0]) <= {u for dl in dialogues for u in dl}


def test_dailydialog_workload_from_a_file(tmp_path):
    f = tmp_path / "dialogues.txt"
    f.write_text("Hi there . __eou__ Hello ! __eou__\nWhere to ? __eou__ Home . __eou__\n")
    w = build_workload(2, 3, seed=0, data=f)
    assert len(w) == 2 and all(len(x) == 3 for x in w)
    assert set(w[0]) <= {"Hi there .", "Hello !", "Where to ?", "Home ."}


# -- the conversation a client holds -----------------------------------------

class _Renderer:  # stands in for ChatRenderer: the turn's ids only
    def turn_ids(self, user, previous):
        return [len(user)] + ([0] if previous else [])


def test_stock_resends_the_history_and_sessions_send_the_turn():
    conv = Conversation(_Renderer())
    new1 = conv.new_ids("abc")
    assert conv.prompt(RESEND, new1) == conv.prompt(SESSION, new1) == [3]
    conv.commit(new1, [7, 8])
    new2 = conv.new_ids("de")
    assert new2 == [2, 0]
    assert conv.prompt(SESSION, new2) == [2, 0]
    assert conv.prompt(RESEND, new2) == [3, 7, 8, 2, 0]
    assert conv.length == 3


def _response(prompt_tokens, out_ids, session=None, metrics=None):
    out = {"choices": [{"token_ids": out_ids, "text": "x"}],
           "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(out_ids),
                     "prompt_tokens_details": {"cached_tokens": 5}}}
    if session is not None:
        out["session"] = session
    if metrics is not None:
        out["metrics"] = metrics
    return out


def test_parse_response_ttft_and_kv():
    rec = TurnRecord("sirllm", 1, 0, 2, False, 0.0, 500.0, new_tokens=10)
    ids = parse_response(rec, _response(60, [1, 2, 3], {"retained_tokens": 62, "loaded_tokens": 50,
                                                         "evicted_tokens": 4, "budget": 100},
                                        {"generation_time_ms": 120.0, "time_to_first_token_ms": 300,
                                         "queue_time_ms": 2.0}), SESSION, context_tokens=90)
    assert ids == [1, 2, 3]
    assert rec.ttft_ms == 380.0 and rec.prefill_ms == 300 and rec.queue_ms == 2.0
    assert rec.kv_tokens == 62 and rec.budget == 100 and rec.cached_tokens == 5
    assert rec.context_tokens == 90 + 10 + 3
    stock = TurnRecord("stock", 1, 0, 2, False, 0.0, 500.0, new_tokens=10)
    parse_response(stock, _response(100, [1, 2, 3]), RESEND, context_tokens=90)
    assert stock.kv_tokens == 103 and stock.ttft_ms is None
    with pytest.raises(RuntimeError, match="session"):
        parse_response(TurnRecord("sirllm", 1, 0, 1, False, 0, 1), _response(5, [1]), SESSION, 0)


# -- figures -----------------------------------------------------------------

def _rec(policy, session, turn, latency, kv, ok=True, **kw):
    start = kw.pop("start_s", (turn - 1) * 1.0)
    return TurnRecord(policy, 2, session, turn, ok, start, latency, ttft_ms=latency / 2,
                      output_tokens=kw.pop("output_tokens", 8), kv_tokens=kv, new_tokens=5,
                      context_tokens=kw.pop("context_tokens", turn * 13), **kw)


def _stock_records():
    recs = []
    for s in range(2):
        for t in range(1, 4):
            recs.append(_rec("stock", s, t, 100.0 * t, 13 * t))
        recs.append(_rec("stock", s, 4, 5.0, None, ok=False, status=400, error=CONTEXT_MSG,
                         output_tokens=0, context_tokens=300))
    return recs


def _session_records():
    recs = []
    for s in range(2):
        for t in range(1, 5):
            recs.append(_rec("sirllm", s, t, 100.0, min(13 * t, 40), budget=40,
                             evicted_tokens=max(0, 13 * t - 40)))
    return recs


def test_context_length_errors_are_recognised():
    assert is_context_length_error(400, CONTEXT_MSG)
    assert is_context_length_error(400, "Input length (5000) exceeds model's maximum context length (4096).")
    assert not is_context_length_error(409, "session 'x' has a request in progress")
    assert not is_context_length_error(None, "Connection error.")


def test_first_failure_is_stocks_context_limit():
    f = first_failure(_stock_records())
    assert f["turn"] == 4 and f["sessions_failed"] == 2 and f["status"] == 400
    assert f["context_limit"] and f["context_tokens"] == 300 and "maximum context" in f["message"]
    assert first_failure(_session_records()) is None
    short = [_rec("stock", 0, 1, 1.0, 5), _rec("stock", 0, 2, 1.0, 5, output_tokens=3)]
    assert first_short_answer(short, 8)["turn"] == 2


def test_summary_figures():
    s = summarize(_stock_records(), duration_s=2.0, policy="stock", concurrency=2, max_tokens=8)
    for key in (*REQUIRED, "median_ttft_ms", "p99_e2el_ms", "request_throughput", "output_throughput"):
        assert key in s
    assert s["completed"] == 6 and s["failed"] == 2
    assert s["turns_per_s"] == 3.0 and s["output_tokens_per_s"] == 24.0
    assert s["latency_p50"] == 200.0 and s["ttft_p50"] == 100.0
    assert s["kv_tokens_per_session"] == 39 and s["failure"]["turn"] == 4
    rows = by_turn(_stock_records())
    assert [r["turn"] for r in rows] == [1, 2, 3, 4] and rows[3]["failed"] == 2
    assert [r["kv_tokens_mean"] for r in rows[:3]] == [13, 26, 39]
    sir = summarize(_session_records(), 2.0, "sirllm", 2, 8)
    assert sir["kv_tokens_per_session"] == 40 == sir["budget"] and sir["evicting_turns"] == 2


def test_latency_curve_stops_at_the_first_failure():
    rows = by_turn(_stock_records())
    f = first_failure(_stock_records())
    curve, after = split_at_failure(rows, f)
    assert [r["turn"] for r in curve] == [1, 2, 3] and [r["turn"] for r in after] == [4]
    assert split_at_failure(rows, None) == (rows, [])
    # failing from the first turn on: the rows are the curve, nothing drawn apart
    assert split_at_failure(rows, {"turn": 1}) == (rows, [])


def test_late_window_and_ratios():
    runs = {"stock": (_stock_records(), 2.0), "sirllm": (_session_records(), 2.0)}
    win = late_window(runs, width=2)
    assert win["turns"] == [2, 3]  # stock completed turns 1-3 in every session
    assert win["policies"]["stock"]["latency_mean_ms"] == 250.0
    pols = {n: summarize(r, d, n, 2, 8) for n, (r, d) in runs.items()}
    rat = ratios(pols, "stock", win)["sirllm/stock"]
    assert rat["turns_per_s"] == pytest.approx(8 / 6)
    assert rat["late_latency_speedup"] == pytest.approx(2.5)


def test_compaction_times_come_from_the_worker_log():
    from sir_vllm.bench.metrics import attach_compaction, parse_compaction_log

    log = ("(Worker pid=1) INFO 11-26 04:58:37 [worker.py:44] sir-vllm: compaction "
           "req=cmpl-a5ed291bb50476b2-0-a57f406c tokens=55 rotated=0 ms=7.82\n"
           "(Worker pid=1) INFO ... sir-vllm: compaction req=cmpl-x-y-0-b540398d tokens=59 "
           "rotated=55 ms=14.94\nunrelated line\n")
    table = parse_compaction_log(log)
    assert table == {"cmpl-a5ed291bb50476b2": (55, 0, 7.82), "cmpl-x-y": (59, 55, 14.94)}
    recs = [_rec("sirllm", 0, 1, 1.0, 5, request_id="cmpl-nothing"),
            _rec("sirllm", 0, 2, 1.0, 5, request_id="cmpl-x-y")]
    assert attach_compaction(recs, table) == 1
    assert recs[1].compaction_ms == 14.94 and recs[1].rotated_tokens == 55
    s = summarize(recs, 1.0, "sirllm", 1, 8)
    assert s["compaction_turns"] == 1 and s["compaction_ms_p50"] == 14.94


def test_memory_report():
    recs = [_rec("sirllm", 0, t, 100.0 + (t % 3), min(10 * t, 64), budget=64,
                 start_s=float(t)) for t in range(1, 201)]
    m = memory_report(recs, (100, 1000))
    assert m["late"]["turn"] == 200 and m["early"]["turn"] == 100
    assert m["late_over_early"] == pytest.approx(1.0, abs=0.02)
    assert abs(m["latency_slope_ms_per_100_turns"]) < 0.5
    assert m["max_retained_tokens"] == 64 and m["within_budget"]


# -- the whole command against a fake server ------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_app(max_model_len: int, budget: int | None):
    """An OpenAI-compatible completions endpoint that behaves like vLLM for the
    bench: stock refuses prompts past max_model_len, sessions keep <= budget."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    sessions: dict[str, dict] = {}

    @app.get("/v1/models")
    async def models():
        return {"data": [{"id": "fake"}]}

    @app.delete("/v1/sessions/{sid}")
    async def drop(sid: str):
        return JSONResponse({"deleted": sessions.pop(sid, None) is not None},
                            status_code=200 if sid else 404)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt, n = body["prompt"], body["max_tokens"]
        assert body["ignore_eos"] and body["return_token_ids"] and body["temperature"] == 0
        sid = body.get("session_id")
        info = None
        if sid is None:
            if len(prompt) >= max_model_len:
                msg = (f"This model's maximum context length is {max_model_len} tokens. However, your "
                       f"prompt contains {len(prompt)} input tokens, which exceeds this limit even "
                       "without any output tokens. Please reduce the length of the input prompt.")
                return JSONResponse({"error": {"message": msg, "type": "BadRequestError",
                                               "param": None, "code": 400}}, status_code=400)
            n = min(n, max_model_len - len(prompt))
            engine_prompt = len(prompt)
        else:
            s = sessions.setdefault(sid, {"retained": 0, "evicted": 0, "turns": 0})
            coming = len(prompt) + n
            kept = s["retained"]
            if kept + coming > budget:
                kept = budget - coming
                s["evicted"] += s["retained"] - kept
            engine_prompt = kept + (1 if s["turns"] else 0) + len(prompt)
            s.update(retained=engine_prompt + n - 1, turns=s["turns"] + 1)
            info = {"id": sid, "turns": s["turns"], "retained_tokens": s["retained"],
                    "loaded_tokens": kept, "evicted_tokens": s["evicted"], "budget": budget}
        await asyncio.sleep(0.002 + 2e-5 * engine_prompt)
        out = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "fake",
               "choices": [{"index": 0, "text": "ok " * n, "token_ids": [28] * n,
                            "finish_reason": "length", "logprobs": None}],
               "usage": {"prompt_tokens": engine_prompt, "completion_tokens": n,
                         "total_tokens": engine_prompt + n},
               "metrics": {"time_to_first_token_ms": 1.0, "generation_time_ms": 0.5 * (n - 1),
                           "queue_time_ms": 0.1}}
        if info:
            out["session"] = info
        return out

    return app


@pytest.fixture(scope="module")
def fake_servers():
    import uvicorn

    servers, threads, urls = [], [], {}
    for name, app in (("stock", _fake_app(160, None)), ("sirllm", _fake_app(4096, 100))):
        port = _free_port()
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        th = threading.Thread(target=srv.run, daemon=True)
        th.start()
        servers.append(srv)
        threads.append(th)
        urls[name] = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not all(s.started for s in servers):
        assert time.monotonic() < deadline, "fake servers did not start"
        time.sleep(0.05)
    yield urls
    for srv in servers:
        srv.should_exit = True
    for th in threads:
        th.join(10)


def _check_outputs(out: Path, policies: list[str], sweep: bool) -> dict:
    data = json.loads((out / "results.json").read_text())
    assert set(data["policies"]) == set(policies)
    for name, pol in data["policies"].items():
        for key in REQUIRED:
            assert key in pol, (name, key)
        assert pol["turns_per_s"] > 0 and pol["output_tokens_per_s"] > 0
        assert pol["by_turn"] and pol["sweep"]
    for key in ("model", "sessions", "turns", "max_tokens", "budget", "seed", "ttft_method"):
        assert key in data["settings"]
    assert data["command"].startswith("sir-vllm bench ")
    assert "policy" in (out / "results.md").read_text()
    assert (out / LATENCY_PLOT).stat().st_size > 1000
    assert ((out / THROUGHPUT_PLOT).exists() and (out / THROUGHPUT_PLOT).stat().st_size > 1000) == sweep
    assert (out / "turns.jsonl").read_text().count("\n") > 0
    return data


def test_bench_command_end_to_end_on_a_fake_server(fake_servers, bundled_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    urls = ",".join(f"{k}={v}" for k, v in fake_servers.items())
    rc = main(["bench", "--model", str(bundled_tokenizer_dir), "--sessions", "1,2", "--turns", "6",
               "--max-tokens", "16", "--policies", "sirllm,stock", "--budget", "4+64+32",
               "--synthetic", "--url-per-policy", urls, "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "turns/s" in printed and "sirllm/stock" in printed
    data = _check_outputs(out, ["sirllm", "stock"], sweep=True)
    sir, stock = data["policies"]["sirllm"], data["policies"]["stock"]
    assert sir["kv_tokens_per_session"] <= 100 == sir["budget"] and sir["failed"] == 0
    assert sir["evicting_turns"] > 0
    kv = [r["kv_tokens_mean"] for r in stock["by_turn"] if r["kv_tokens_mean"]]
    assert kv == sorted(kv) and kv[-1] > kv[0]  # stock's KV grows with the conversation
    f = stock["failure"]
    assert f and f["context_limit"] and f["status"] == 400 and 2 <= f["turn"] <= 6
    assert stock["sweep"][0]["sessions"] == 1 and stock["sweep"][1]["sessions"] == 2
    assert stock["ttft_p50"] is not None  # from the server's per-request metrics
    assert data["ratios"]["sirllm/stock"]["turns_per_s"] > 0


def test_one_session_memory_mode_on_a_fake_server(fake_servers, bundled_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "memory"
    rc = main(["bench", "--model", str(bundled_tokenizer_dir), "--one-session-turns", "30",
               "--max-tokens", "8", "--budget", "4+64+32", "--synthetic", "--num-warmups", "0",
               "--url-per-policy", f"sirllm={fake_servers['sirllm']}", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    data = _check_outputs(out, ["sirllm"], sweep=False)
    m = data["memory"]["sirllm"]
    assert m["turns_completed"] == 30 and m["within_budget"] and m["max_retained_tokens"] <= 100
    assert "max retained" in capsys.readouterr().out


@pytest.fixture(scope="session")
def bundled_tokenizer_dir(bundled_model):
    return bundled_model


# -- tiny runs on real servers --------------------------------------------------

def test_bench_on_the_shared_servers(server, session_server, bundled_model, tmp_path):
    """stock (`server`) and sirllm 4+64+32 (`session_server`) from conftest:
    2 sessions x 4 turns x 8 tokens, then a real max_model_len refusal."""
    from sir_vllm.bench.client import RESEND, TurnRecord, make_client, run_turn

    out = tmp_path / "bench"
    urls = f"stock={server.url},sirllm={session_server.url}"
    rc = main(["bench", "--model", str(bundled_model), "--sessions", "1,2", "--turns", "4",
               "--max-tokens", "8", "--policies", "sirllm,stock", "--budget", "4+64+32",
               "--synthetic", "--synthetic-words", "10", "--num-warmups", "1",
               "--url-per-policy", urls, "--out", str(out), "--no-progress"])
    assert rc == 0
    data = _check_outputs(out, ["sirllm", "stock"], sweep=True)
    sir, stock = data["policies"]["sirllm"], data["policies"]["stock"]
    assert sir["failed"] == stock["failed"] == 0
    assert sir["budget"] == 100 and sir["kv_tokens_per_session"] <= 100
    assert all(r["output_tokens"] == 8 for r in map(json.loads, (out / "turns.jsonl").open()))
    kv = [r["kv_tokens_mean"] for r in stock["by_turn"]]
    assert kv == sorted(kv) and kv[-1] > kv[0]

    async def too_long():  # the server's max_model_len is 4096: a real 400
        client = make_client(server.url)
        rec = TurnRecord("stock", 1, 0, 1, False, 0.0, 0.0)
        try:
            await run_turn(client, "SmolLM2-135M-Instruct", RESEND, [28] * 4100, 8, None, rec,
                           time.perf_counter(), 0)
        finally:
            await client.close()
        return rec

    rec = asyncio.run(too_long())
    assert not rec.ok and is_context_length_error(rec.status, rec.error), (rec.status, rec.error)


@pytest.mark.slow
def test_bench_starts_its_own_servers(bundled_model, tmp_path):
    """The full path: the bench starts `vllm serve` per policy (minutes on 2 cores)."""
    out = tmp_path / "own"
    rc = main(["bench", "--model", str(bundled_model), "--sessions", "2", "--turns", "3",
               "--max-tokens", "8", "--policies", "sirllm,streaming,stock", "--budget", "4+64+32",
               "--max-model-len", "256", "--synthetic", "--num-warmups", "1", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    data = _check_outputs(out, ["sirllm", "streaming", "stock"], sweep=False)
    for name in ("sirllm", "streaming"):
        assert data["policies"][name]["kv_tokens_per_session"] <= 100
        assert data["policies"][name]["ttft_p50"] is not None
        assert data["policies"][name]["compaction_turns"] > 0  # joined from the server log
    assert data["policies"]["stock"]["ttft_p50"] is not None
