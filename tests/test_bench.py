"""`sir-vllm bench`: the figures (pure functions), the streaming client's
TTFT/TPOT on synthetic chunk timings, the whole command against a fake
OpenAI-compatible server (fast, no vLLM; streamed and not), tiny runs against
the shared real servers of conftest (stock and sirllm 4+64+32), and
`sir-vllm bench-api-memory` (its verdict on synthetic samples; a tiny run)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import pytest
from starlette.requests import Request  # module level: FastAPI resolves the annotation here

from sir_vllm.bench.client import (RESEND, SESSION, Conversation, TurnRecord, assemble_stream,
                                   parse_response, parse_stream, stream_timings)
from sir_vllm.bench.metrics import (by_turn, first_failure, first_short_answer,
                                    is_context_length_error, late_window, memory_report, ratios,
                                    summarize, ttft_by_mode)
from sir_vllm.bench.report import (LATENCY_PLOT, THROUGHPUT_PLOT, TTFT_MODES_PLOT, TTFT_PLOT,
                                   split_at_failure)
from sir_vllm.bench.runner import (Budget, parse_budget, parse_policies, parse_sessions,
                                   parse_urls, server_args)
from sir_vllm.bench.workload import build_workload, dialogue_turns, synthetic_turns
from sir_vllm.cli.main import main

CONTEXT_MSG = ("This model's maximum context length is 256 tokens. However, your prompt contains "
               "300 input tokens, which exceeds this limit even without any output tokens. "
               "Please reduce the length of the input prompt.")
REQUIRED = ("turns_per_s", "output_tokens_per_s", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99",
            "latency_p50", "latency_p99", "kv_tokens_per_session", "median_ttft_ms",
            "median_tpot_ms", "p99_ttft_ms", "p99_tpot_ms")


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
    assert rec.tpot_ms == 60.0  # the server's decode interval over the 2 tokens after the first


def _chunk(ids=None, finish=None, **top):
    choice = {"index": 0, "text": "x" * len(ids or []), "token_ids": ids, "finish_reason": finish}
    return {"id": "cmpl-s", "choices": [choice], **top}


def _usage_chunk(prompt, completion, session=None, metrics=None):
    out = {"id": "cmpl-s", "choices": [], "usage": {"prompt_tokens": prompt,
                                                    "completion_tokens": completion,
                                                    "prompt_tokens_details": {"cached_tokens": 7}}}
    if session is not None:
        out["session"] = session
    if metrics is not None:
        out["metrics"] = metrics
    return out


def test_stream_timings_are_first_token_and_the_mean_gap_after_it():
    sent = 10.0
    chunks = [(10.25, _chunk([5])), (10.30, _chunk([6, 7])), (10.45, _chunk([8], "length")),
              (10.46, _usage_chunk(3, 4))]
    ttft, tpot, n = stream_timings(sent, chunks)
    assert ttft == pytest.approx(250.0) and n == 3
    assert tpot == pytest.approx((10.45 - 10.25) * 1000 / 3)  # 4 tokens: 3 gaps
    # the usage count wins over what the chunks carried (vLLM's own definition)
    assert stream_timings(sent, chunks, output_tokens=5)[1] == pytest.approx(200.0 / 4)
    # a one-token answer has no TPOT; a stream without tokens has no TTFT
    assert stream_timings(sent, [(10.1, _chunk([5], "length"))]) == (pytest.approx(100.0), None, 1)
    assert stream_timings(sent, [(10.1, _chunk([])), (10.2, _usage_chunk(3, 0))]) == (None, None, 0)


def test_parse_stream_keeps_what_a_whole_response_gives():
    session = {"retained_tokens": 62, "loaded_tokens": 50, "evicted_tokens": 4, "budget": 100}
    metrics = {"generation_time_ms": 150.0, "time_to_first_token_ms": 30.0, "queue_time_ms": 1.0}
    chunks = [(0.0, _chunk([])),  # an empty first chunk is not the first token
              (0.2, _chunk([1])), (0.25, _chunk([2])), (0.35, _chunk([3], "length")),
              (0.36, _usage_chunk(60, 3, session, metrics))]
    rec = TurnRecord("sirllm", 1, 0, 2, False, 0.0, 400.0, new_tokens=10)
    ids = parse_stream(rec, -0.1, chunks, SESSION, context_tokens=90)
    assert ids == [1, 2, 3] and rec.streamed and rec.token_chunks == 3
    assert rec.ttft_ms == pytest.approx(300.0) and rec.tpot_ms == pytest.approx(75.0)
    assert rec.ttft_estimate_ms == 250.0  # latency - the server's decode interval, kept beside
    assert rec.kv_tokens == 62 and rec.loaded_tokens == 50 and rec.evicted_tokens == 4
    assert rec.budget == 100 and rec.prompt_tokens == 60 and rec.cached_tokens == 7
    assert rec.output_tokens == 3 and rec.context_tokens == 90 + 10 + 3
    assert rec.request_id == "cmpl-s" and rec.prefill_ms == 30.0
    stock = TurnRecord("stock", 1, 0, 2, False, 0.0, 400.0, new_tokens=10)
    parse_stream(stock, 0.0, chunks[:4] + [(0.36, _usage_chunk(100, 3))], RESEND, 90)
    assert stock.kv_tokens == 103 and stock.ttft_estimate_ms is None
    # a session stream whose last chunk lacks the `session` object is an error, as a response's
    with pytest.raises(RuntimeError, match="session"):
        parse_stream(TurnRecord("sirllm", 1, 0, 1, False, 0, 1), 0.0,
                     chunks[:4] + [(0.36, _usage_chunk(60, 3))], SESSION, 0)
    assert assemble_stream([c for _, c in chunks])["choices"][0]["token_ids"] == [1, 2, 3]


# -- figures -----------------------------------------------------------------

def _rec(policy, session, turn, latency, kv, ok=True, **kw):
    start = kw.pop("start_s", (turn - 1) * 1.0)
    return TurnRecord(policy, 2, session, turn, ok, start, latency, ttft_ms=latency / 2,
                      tpot_ms=latency / 10,
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
    assert s["tpot_p50"] == s["median_tpot_ms"] == 20.0 and s["median_e2el_ms"] == 200.0
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


def test_compaction_times_come_from_the_metrics_histogram():
    """A run's compactions: the delta of `vllm:sir_compaction_seconds` read from
    /metrics before and after it (summed over engines), p50/p99 from its buckets."""
    from sir_vllm.bench.metrics import (compaction_figures, histogram_delta, histogram_quantile,
                                        read_histogram)

    def page(n0, n1, total, sum_s):  # two engines' series, as vLLM's /metrics shows them
        rows = ["# HELP vllm:sir_compaction_seconds Time a load job took.",
                "# TYPE vllm:sir_compaction_seconds histogram"]
        for engine, (small, all_) in (("0", (n0, n1)), ("1", (0, total - n1))):
            lab = f'engine="{engine}",model_name="m"'
            cum = {"0.001": small, "0.01": all_, "+Inf": all_}
            rows += [f'vllm:sir_compaction_seconds_bucket{{{lab},le="{le}"}} {v}' for le, v in cum.items()]
            rows += [f"vllm:sir_compaction_seconds_count{{{lab}}} {all_}",
                     f"vllm:sir_compaction_seconds_sum{{{lab}}} {sum_s if engine == '0' else 0.0}"]
        return "\n".join(rows) + "\n"

    before = read_histogram(page(1, 2, 2, 0.003))
    assert before == {"count": 2.0, "sum": 0.003, "buckets": {0.001: 1.0, 0.01: 2.0, float("inf"): 2.0}}
    after = read_histogram(page(3, 6, 8, 0.033))
    delta = histogram_delta(before, after)
    assert delta["count"] == 6 and delta["sum"] == pytest.approx(0.03)
    assert delta["buckets"] == {0.001: 2.0, 0.01: 6.0, float("inf"): 6.0}
    assert histogram_quantile(0.5, delta["buckets"]) == pytest.approx(0.001 + 0.009 * 0.25)
    assert histogram_quantile(0.25, {1.0: 4.0, float("inf"): 8.0}) == pytest.approx(0.5)
    assert histogram_quantile(0.9, {1.0: 4.0, float("inf"): 8.0}) == 1.0  # past the last bound
    assert histogram_quantile(0.5, {1.0: 0.0, float("inf"): 0.0}) is None
    figures = compaction_figures(delta)
    assert figures["compaction_turns"] == 6 and figures["compaction_ms_mean"] == pytest.approx(5.0)
    assert figures["compaction_ms_p50"] == pytest.approx(3.25)
    recs = [_rec("sirllm", 0, 1, 1.0, 5), _rec("sirllm", 0, 2, 1.0, 5)]
    s = summarize(recs, 1.0, "sirllm", 1, 8, compaction=delta)
    assert s["compaction_turns"] == 6 and s["compaction_ms_p99"] == pytest.approx(
        1e3 * (0.001 + 0.009 * (0.99 * 6 - 2) / 4))
    assert summarize(recs, 1.0, "stock", 1, 8)["compaction_turns"] == 0


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
    from fastapi.responses import JSONResponse, StreamingResponse

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
        usage = {"prompt_tokens": engine_prompt, "completion_tokens": n,
                 "total_tokens": engine_prompt + n}
        metrics = {"time_to_first_token_ms": 1.0, "generation_time_ms": 0.5 * (n - 1),
                   "queue_time_ms": 0.1}
        if body.get("stream"):  # vLLM's chunks: a token each, then usage (+ session) last
            assert body["stream_options"] == {"include_usage": True}

            async def chunks():
                await asyncio.sleep(0.002 + 2e-5 * engine_prompt)
                for i in range(n):
                    choice = {"index": 0, "text": "ok ", "token_ids": [28], "logprobs": None,
                              "finish_reason": "length" if i == n - 1 else None}
                    yield f"data: {json.dumps({'id': 'cmpl-1', 'choices': [choice]})}\n\n"
                    await asyncio.sleep(0.0005)
                last = {"id": "cmpl-1", "choices": [], "usage": usage, "metrics": metrics}
                if info:
                    last["session"] = info
                yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(chunks(), media_type="text/event-stream")
        await asyncio.sleep(0.002 + 2e-5 * engine_prompt)
        out = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "fake",
               "choices": [{"index": 0, "text": "ok " * n, "token_ids": [28] * n,
                            "finish_reason": "length", "logprobs": None}],
               "usage": usage, "metrics": metrics}
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


def _check_outputs(out: Path, policies: list[str], sweep: bool, stream: bool = True) -> dict:
    data = json.loads((out / "results.json").read_text())
    assert set(data["policies"]) == set(policies)
    for name, pol in data["policies"].items():
        for key in REQUIRED:
            assert key in pol, (name, key)
        assert pol["turns_per_s"] > 0 and pol["output_tokens_per_s"] > 0
        assert pol["by_turn"] and pol["sweep"]
    for key in ("model", "sessions", "turns", "max_tokens", "budget", "seed", "ttft_method"):
        assert key in data["settings"]
    assert data["settings"]["stream"] is stream and ("--no-stream" in data["command"]) is not stream
    for pol in data["policies"].values():
        assert pol["streamed"] is stream
    assert (out / TTFT_PLOT).stat().st_size > 1000
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
    assert stock["ttft_p50"] is not None and stock["tpot_p50"] is not None  # measured on the stream
    assert stock["ttft_p50"] <= stock["latency_p50"]
    assert stock["ttft_estimate_p50"] is not None  # the server's metrics, kept beside
    assert data["ratios"]["sirllm/stock"]["turns_per_s"] > 0
    turns = [json.loads(line) for line in (out / "turns.jsonl").open()]
    assert all(t["streamed"] and t["token_chunks"] == t["output_tokens"] for t in turns if t["ok"])
    assert all(t["ttft_ms"] < t["latency_ms"] for t in turns if t["ok"])

    # the same turns without streaming, compared with the streamed run: issue 11's figure
    flat = tmp_path / "no-stream"
    rc = main(["bench", "--model", str(bundled_tokenizer_dir), "--sessions", "1,2", "--turns", "6",
               "--max-tokens", "16", "--policies", "sirllm", "--budget", "4+64+32",
               "--synthetic", "--url-per-policy", urls, "--out", str(flat), "--no-progress",
               "--no-stream", "--compare-with", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "time to first token p50" in printed
    again = _check_outputs(flat, ["sirllm"], sweep=True, stream=False)
    sir_flat = again["policies"]["sirllm"]
    assert sir_flat["ttft_p50"] == sir_flat["ttft_estimate_p50"]  # the estimate, as before
    assert [r["kv_tokens_mean"] for r in sir_flat["by_turn"]] == [r["kv_tokens_mean"] for r in sir["by_turn"]]
    modes = again["ttft_by_mode"]["policies"]
    assert set(modes) == {"sirllm", "stock"}
    assert modes["sirllm"]["unstreamed_first_token_p50_ms"] == sir_flat["latency_p50"]
    assert modes["sirllm"]["streamed_ttft_p50_ms"] == sir["ttft_p50"]
    assert modes["sirllm"]["vs_stock_p50"] == pytest.approx(stock["ttft_p50"] / sir["ttft_p50"])
    assert "Time to first token: streamed vs not" in (flat / "results.md").read_text()
    assert (flat / TTFT_MODES_PLOT).stat().st_size > 1000


def test_compare_with_refuses_other_turns_or_the_same_mode(fake_servers, bundled_tokenizer_dir,
                                                         tmp_path, capsys):
    """Checked before a single turn runs: a figure of two different workloads would be wrong."""
    urls = f"sirllm={fake_servers['sirllm']}"
    common = ["bench", "--model", str(bundled_tokenizer_dir), "--sessions", "1", "--turns", "2",
              "--max-tokens", "4", "--policies", "sirllm", "--budget", "4+64+32", "--synthetic",
              "--num-warmups", "0", "--url-per-policy", urls, "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    rc = main([*common, "--seed", "1", "--no-stream", "--compare-with", str(tmp_path / "a"),
               "--out", str(tmp_path / "b")])
    assert rc == 2 and "ran other turns: seed 0 there, 1 here" in capsys.readouterr().err
    rc = main([*common, "--compare-with", str(tmp_path / "a"), "--out", str(tmp_path / "c")])
    assert rc == 2 and "streamed too" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_ttft_by_mode_pairs_a_streamed_run_with_a_flat_one():
    def doc(stream, seed=0, **pols):
        return {"command": f"cmd {stream}", "settings": {"model": "m", "sessions": [2], "turns": 3,
                                                         "max_tokens": 8, "seed": seed,
                                                         "stream": stream},
                "policies": pols}

    streamed = doc(True, sirllm={"ttft_p50": 20.0, "ttft_p99": 40.0, "tpot_p50": 5.0},
                   stock={"ttft_p50": 50.0, "ttft_p99": 90.0, "tpot_p50": 6.0})
    flat = doc(False, sirllm={"latency_p50": 60.0, "latency_p99": 80.0, "ttft_p50": 21.0,
                              "ttft_p99": 41.0, "ttft_estimate_p50": 21.0, "ttft_estimate_p99": 41.0})
    m = ttft_by_mode(streamed, flat)["policies"]
    assert m["sirllm"]["ratio_p50"] == 3.0 and m["sirllm"]["vs_stock_p50"] == 2.5
    assert m["sirllm"]["unstreamed_estimate_p50_ms"] == 21.0
    assert "unstreamed_first_token_p50_ms" not in m["stock"]  # stock ran streamed only
    with pytest.raises(ValueError, match="seed"):
        ttft_by_mode(streamed, doc(False, seed=1, **flat["policies"]))


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
    """stock (`server`) and sirllm 4+64+32 (`session_server`) from conftest,
    streamed: 2 sessions x 4 turns x 8 tokens; then one prompt streamed and
    not (the same answer), and a real max_model_len refusal."""
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
    turns = [json.loads(line) for line in (out / "turns.jsonl").open()]
    assert all(r["output_tokens"] == 8 for r in turns)
    kv = [r["kv_tokens_mean"] for r in stock["by_turn"]]
    assert kv == sorted(kv) and kv[-1] > kv[0]
    # streamed on both servers; the session object came in the last chunk
    assert all(r["streamed"] and 0 < r["ttft_ms"] < r["latency_ms"] for r in turns)
    assert all(r["tpot_ms"] > 0 and 1 <= r["token_chunks"] <= 8 for r in turns)
    assert all(r["kv_tokens"] and r["budget"] == 100 for r in turns if r["policy"] == "sirllm")
    assert sir["median_ttft_ms"] is not None and stock["median_tpot_ms"] is not None

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

    async def both_ways():  # greedy: a stream carries the same tokens as a whole response
        client = make_client(server.url)
        recs = [TurnRecord("stock", 1, 0, 1, False, 0.0, 0.0) for _ in range(2)]
        try:
            return [await run_turn(client, "SmolLM2-135M-Instruct", RESEND, [28, 29, 30] * 5, 8,
                                   None, rec, time.perf_counter(), 0, stream=stream)
                    for rec, stream in zip(recs, (True, False))], recs
        finally:
            await client.close()

    (streamed, whole), (s_rec, w_rec) = asyncio.run(both_ways())
    assert streamed == whole and len(whole) == 8 and s_rec.streamed and not w_rec.streamed


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
        assert data["policies"][name]["compaction_turns"] > 0  # from the server's /metrics
    assert data["policies"]["stock"]["ttft_p50"] is not None


# -- sir-vllm bench-api-memory ----------------------------------------------------

def test_api_memory_verdict_on_synthetic_samples():
    from sir_vllm.bench.api_memory import count_cap_drops, verdict, verdict_line

    flat = [(t, 800_000 + (5_000 if t else 0)) for t in range(0, 1001, 100)]
    v = verdict(flat, 1000, 1.10)
    assert v["flat"] and v["last_over_halfway"] == 1.0 and v["turns_at"]["25%"] == 300
    assert v["rss_mib_at"]["100%"] == round(805_000 / 1024, 1)
    assert verdict_line("(a)", v).startswith("(a): flat once the caps are reached: RSS at "
                                             "25%/50%/75%/100% of the run 786.1/786.1/786.1/786.1 MiB")
    growing = [(t, 800_000 + 300 * t) for t in range(0, 1001, 100)]
    g = verdict(growing, 1000, 1.10)
    assert not g["flat"] and g["last_over_halfway"] == pytest.approx(1_100_000 / 950_000)
    assert g["growth_kib_per_1000_turns"] == pytest.approx(300_000)
    assert "NOT flat" in verdict_line("(b)", g)
    log = ("(APIServer pid=1) WARNING ... sir-vllm: session 'api-memory-many-3' dropped from the "
           "memory store (least recently used, over --kv-max-sessions; idle 0s, 1 turns); its next "
           "request starts a new session\n"
           "... sir-vllm: session 'x' dropped from the memory store (idle longer than "
           "--kv-session-ttl; idle 9s, 1 turns)\n")
    assert count_cap_drops(log) == 1


@pytest.mark.parametrize("store", ["memory", pytest.param("sqlite", marks=pytest.mark.slow)])
def test_api_memory_tiny_run(tmp_path, capsys, store):
    """`sir-vllm bench-api-memory` in small: its own server on a tiny model, 200
    turns of one session then 400 one-turn sessions over a cap of 100; the RSS
    read is the API process's, the cap holds (log and GET), the server is gone.
    About 50 s each on 2 idle cores (eager engine); the sqlite store's twin
    runs with -m slow, to keep the default suite to one more server start."""
    import subprocess

    out = tmp_path / "api-memory"
    rc = main(["bench-api-memory", "--turns", "200", "--sessions", "400", "--max-sessions", "100",
               "--store", store, "--sample-every", "50", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "api_memory.json").read_text())
    api = data["api_process"]
    assert " serve " in api["cmdline"] and "EngineCore" not in api["cmdline"]
    assert f"sessions in the {store} store, at most 100" in (out / "server.log").read_text()
    one, many = data["parts"]["one_session"], data["parts"]["many_sessions"]
    assert [t for t, _ in one["samples"]] == [0, 50, 100, 150, 200]
    assert [t for t, _ in many["samples"]] == [0, 50, 100, 150, 200, 250, 300, 350, 400]
    assert all(kib > 100_000 for _, kib in one["samples"] + many["samples"])  # a Python server's RSS
    # 402 sessions made (warm-up, part (a), 400) against a cap of 100
    assert data["cap_drops_in_log"] == data["cap_drops_expected"] == 302
    assert many["first_session_status"] == 404 and many["last_session_status"] == 200
    assert printed.count("once the caps are reached: RSS at 25%/50%/75%/100% of the run") == 2
    assert (out / "api_memory.png").stat().st_size > 1000
    alive = subprocess.run(["pgrep", "-f", f"vllm serve {out}"], capture_output=True, text=True)
    assert alive.stdout.strip() == ""


# -- the pressure scenario (issue 14) ---------------------------------------------

def test_pressure_plan_sizes_the_pool_from_the_histories():
    from sir_vllm.bench.pressure import plan_pressure

    small = plan_pressure([100, 200, 300, 400], 0.25, 1000, budget=64, max_tokens=8)
    # a quarter of 1,000 tokens is less than one max_model_len request (400 + 8 -> 512)
    assert small.max_model_len == 512 and small.pool_tokens == 512
    assert small.server_args() == ["--kv-cache-memory-bytes", str(512 * 1000)]
    big = plan_pressure([1000] * 64, 0.25, 46080, budget=256, max_tokens=32)
    assert big.pool_tokens == 16000 // 128 * 128 + 128 * (16000 % 128 > 0)  # whole blocks
    assert big.max_model_len == 1152 and big.pool_bytes == big.pool_tokens * 46080
    assert 3.9 < big.histories_over_pool <= 4.0 and big.to_dict()["budgets_over_pool"] > 1
    with pytest.raises(ValueError, match="pressure-fraction"):
        plan_pressure([100], 0, 1000, 64, 8)


def test_pressure_kv_bytes_per_token_and_disjoint_sessions(bundled_model):
    from sir_vllm.bench.pressure import kv_bytes_per_token, session_slices

    # SmolLM2-135M: 30 layers x 3 KV heads x 64 x K,V: 46,080 bytes a float32 token
    assert kv_bytes_per_token(bundled_model) == 46080
    assert kv_bytes_per_token(bundled_model, "bfloat16") == 23040
    assert session_slices([16, 4, 64]) == {4: (0, 4), 16: (4, 20), 64: (20, 84)}


def test_pressure_history_tokens_count_every_turn_and_answer():
    from sir_vllm.bench.pressure import history_tokens

    class R(_Renderer):
        def encode(self, text):
            return [1] * len(text)

    # turn ids [3], [2, 0], [1, 0] (the stand-in answer closes turns 2 and 3) + 3 answers of 5
    assert history_tokens(["abc", "de", "f"], R(), 5) == 1 + 2 + 2 + 15


METRICS_PAGE = """\
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="m"} 7.0
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 250.0
# HELP vllm:sir_pins_dropped_total idle sessions whose pins were dropped
# TYPE vllm:sir_pins_dropped_total counter
vllm:sir_pins_dropped_total{engine="0",model_name="m"} 3.0
vllm:sir_pins_dropped_created{engine="0",model_name="m"} 1.7e9
"""


def test_pressure_counters_from_metrics():
    from sir_vllm.bench.pressure import counters_delta, read_counters

    now = read_counters(METRICS_PAGE)
    assert now["preemptions"] == 7 and now["prefix_cache_hits"] == 250
    assert now["pins_dropped"] == 3 and now["pin_miss_tokens"] is None  # not published
    before = read_counters(METRICS_PAGE.replace(" 7.0", " 2.0").replace(" 1000.0", " 200.0"))
    d = counters_delta(before, now)
    assert d["preemptions"] == 5 and d["prefix_cache_queries"] == 800
    assert d["prefix_cache_hits"] == 0 and d["pin_miss_tokens"] is None


def _turn(policy, session, turn, **kw):
    return TurnRecord(policy, 2, session, turn, True, 0.0, 10.0, **kw)


def test_pressure_figures_pinned_vs_recomputed():
    from sir_vllm.bench.pressure import pressure_figures

    sir = [_turn("sirllm", 0, 1, kv_tokens=50, budget=64, recomputed_tokens=0),
           _turn("sirllm", 0, 2, kv_tokens=64, budget=64, loaded_tokens=50, recomputed_tokens=0),
           _turn("sirllm", 1, 1, kv_tokens=40, budget=64, recomputed_tokens=0),
           _turn("sirllm", 1, 2, kv_tokens=60, budget=64, loaded_tokens=10, recomputed_tokens=30)]
    f = pressure_figures(sir, {"prefix_cache_queries": 100.0, "prefix_cache_hits": 25.0,
                               "pins_dropped": 1.0, "preemptions": 0.0})
    assert (f["sessions_pinned"], f["sessions_recomputed"]) == (1, 1)
    assert f["history_tokens_recomputed"] == 30 and f["kept_tokens_loaded"] == 60
    assert f["within_budget"] is True and f["kv_tokens_per_session_max"] == 64
    assert f["prefix_cache_hit_rate"] == 0.25 and f["pins_dropped"] == 1
    # stock: the prefix cache hits whole blocks; a miss of more than a block is a recompute
    stock = [_turn("stock", 0, 2, new_tokens=20, prompt_tokens=300, cached_tokens=256),
             _turn("stock", 1, 2, new_tokens=20, prompt_tokens=300, cached_tokens=0)]
    g = pressure_figures(stock, None, block_size=128)
    assert (g["sessions_pinned"], g["sessions_recomputed"]) == (1, 1)
    assert g["history_tokens_recomputed"] == 24 + 280 and g["within_budget"] is None
    assert g["preemptions"] is None and g["prefix_cache_hit_rate"] is None


def test_pressure_scenario_defaults_and_refusals(tmp_path):
    from sir_vllm.cli.bench_cmd import config_from_args
    from sir_vllm.cli.main import build_parser

    parse = build_parser().parse_args
    cfg = config_from_args(parse(["bench", "--model", "m", "--scenario", "pressure",
                                  "--out", str(tmp_path)]))
    assert cfg.sessions == [4, 16, 64] and cfg.turns == 16 and cfg.max_tokens == 32
    assert cfg.budget == Budget(4, 252, 0) and cfg.pressure == 0.25
    assert "--scenario pressure --pressure-fraction 0.25" in cfg.command_line()
    plain = config_from_args(parse(["bench", "--model", "m", "--out", str(tmp_path)]))
    assert plain.sessions == [4] and plain.turns == 8 and plain.budget.total == 1024
    assert plain.pressure is None and "--scenario" not in plain.command_line()
    mine = config_from_args(parse(["bench", "--model", "m", "--scenario", "pressure", "--turns",
                                   "5", "--pressure-fraction", "0.5", "--out", str(tmp_path)]))
    assert mine.turns == 5 and mine.pressure == 0.5
    with pytest.raises(ValueError, match="one-session-turns"):
        config_from_args(parse(["bench", "--model", "m", "--scenario", "pressure",
                                "--one-session-turns", "10", "--out", str(tmp_path)]))


def test_pressure_scenario_on_fake_servers(fake_servers, bundled_tokenizer_dir, tmp_path):
    """The whole pressure path without vLLM: the plan, disjoint sessions per
    run, the figures, the table and the plot (the fake servers publish no
    /metrics: those columns stay empty)."""
    from sir_vllm.bench.pressure import PRESSURE_PLOT

    out = tmp_path / "pressure"
    urls = ",".join(f"{k}={v}" for k, v in fake_servers.items())
    rc = main(["bench", "--model", str(bundled_tokenizer_dir), "--scenario", "pressure",
               "--sessions", "1,2", "--turns", "3", "--max-tokens", "8", "--policies",
               "sirllm,stock", "--budget", "4+64+32", "--synthetic", "--url-per-policy", urls,
               "--out", str(out), "--no-progress"])
    assert rc == 0
    data = _check_outputs(out, ["sirllm", "stock"], sweep=True)
    plan = data["pressure"]
    assert plan["sessions"] == 2 and plan["pool_tokens"] >= plan["max_model_len"]
    assert data["settings"]["scenario"] == "pressure"
    for pol in data["policies"].values():
        for s in pol["sweep"]:
            assert s["pressure"]["sessions_run"] == s["sessions"]
            assert s["pressure"]["preemptions"] is None  # no /metrics on the fake servers
    assert data["policies"]["sirllm"]["sweep"][-1]["pressure"]["within_budget"] is True
    # 1 + 2 sessions, each run its own: 9 turns per policy, sessions 0..1 within each run
    turns = [json.loads(line) for line in (out / "turns.jsonl").open()]
    assert sum(r["policy"] == "stock" for r in turns) == 9
    md = (out / "results.md").read_text()
    assert "## Pressure" in md and "sessions pinned / recomputed" in md
    assert (out / PRESSURE_PLOT).stat().st_size > 1000


def test_pressure_scenario_tiny_run(tiny_serving_model, tmp_path):
    """The pressure scenario end to end on its own servers (a tiny model, CI):
    8 sessions x 8 turns whose histories are 4x the pool. The pressure is
    real (stock misses the prefix cache, sirllm's sessions lose pins and
    recompute kept tokens), and sirllm never holds more than its budget."""
    out = tmp_path / "pressure"
    rc = main(["bench", "--model", str(tiny_serving_model), "--scenario", "pressure",
               "--sessions", "8", "--turns", "8", "--max-tokens", "8", "--policies", "sirllm,stock",
               "--budget", "4+60", "--synthetic", "--synthetic-words", "10", "--num-warmups", "1",
               "--server-args=--enforce-eager", "--out", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    plan = data["pressure"]
    assert plan["histories_over_pool"] >= 3.0
    sir = data["policies"]["sirllm"]["sweep"][-1]
    stock = data["policies"]["stock"]["sweep"][-1]
    assert sir["failed"] == stock["failed"] == 0
    p, q = sir["pressure"], stock["pressure"]
    assert p["within_budget"] is True and p["kv_tokens_per_session_max"] <= 64
    assert p["sessions_recomputed"] > 0 and p["history_tokens_recomputed"] > 0
    assert (p["pins_dropped"] or 0) + (p["pin_miss_tokens"] or 0) > 0 or p["preemptions"] > 0
    assert q["sessions_recomputed"] > 0 and q["prefix_cache_hit_rate"] < 1.0
    assert q["prefix_cache_queries"] > q["prefix_cache_hits"]
    args = data["policies"]["stock"]["server"]["args"]
    assert args[len(args) - 1 - args[::-1].index("--kv-cache-memory-bytes") + 1] == str(plan["pool_bytes"])
