"""The soak, CI-sized (issue 15): sessions under KV-pool pressure with aborted
streams and malformed requests between their turns, a kill -9 and restart on
the same SQLite store halfway; 0 crashes, 0 5xx, turn counts that follow,
retained tokens within the budget, and every KV block free once the sessions
are deleted. The full run (8 sessions x 1,000 turns) is `sir-vllm bench-soak`
(docs/results.md, "Soak"). The unit tests at the end check the aborting
client's read-before-close, without a server."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from sir_vllm.bench.soak import DONE, DRAIN_GAP_S, DRAIN_MAX_S, Soak, SoakConfig, failures, run_soak, summary


def soak(model, out, sessions: int, turns: int) -> dict:
    cfg = SoakConfig(out=out, model=model, sessions=sessions, turns=turns, abort_every=5,
                     malformed_every=3, pool_blocks=4, max_model_len=256,
                     server_timeout=float(os.environ.get("SIR_VLLM_SERVER_TIMEOUT", "900")))
    results = run_soak(cfg)
    print("\n" + summary(results))
    assert not failures(results), "\n".join(failures(results))
    c = results["counts"]
    assert c["turns"] == sessions * turns
    assert c["streams_aborted"] > 0 and c["malformed"] >= sessions * (turns // 3)
    assert results["pins_dropped"] > 0 and c["recomputed_turns"] > 0  # the pool was under pressure
    assert results["max_retained_tokens"] <= results["budget"]
    assert set(results["rss"]) == {"server_1", "server_2"}
    return results


def test_soak_with_a_restart(tiny_serving_model, tmp_path):
    soak(tiny_serving_model, tmp_path, sessions=4, turns=40)


@pytest.mark.slow
def test_full_soak(tiny_serving_model, tmp_path):
    soak(tiny_serving_model, tmp_path, sessions=8, turns=1000)


async def _lines(ready: list[str], later: list[str] = ()):
    """SSE lines: `ready` already arrived, `later` only after a pause longer than the drain waits."""
    for line in ready:
        yield line
    if later:
        await asyncio.sleep(4 * DRAIN_GAP_S)
    for line in later:
        yield line


def _data(event: dict) -> str:
    return "data: " + json.dumps(event)


def test_an_aborting_client_reads_a_whole_answer_that_already_arrived():
    """A client behind the server holds the committed turn's end: the drain sees it."""
    ready = [_data({"choices": [{"text": "a"}]}), "",
             _data({"choices": [{"text": "b", "finish_reason": "length"}], "session": {"turns": 3}}), "", DONE]
    line, end = asyncio.run(Soak._drain(_lines(ready)))
    assert line == DONE and end["session"] == {"turns": 3}


def test_an_aborting_client_stops_at_a_pause_and_leaves():
    """The turn still running (a pause before its next event): the drain returns
    without its end, so the client closes the stream."""
    ready = [_data({"choices": [{"text": "a"}]}), ""]
    later = [_data({"choices": [{"text": "b"}], "session": {"turns": 3}}), "", DONE]
    line, end = asyncio.run(Soak._drain(_lines(ready, later)))
    assert line != DONE and end is None


def test_an_aborting_client_leaves_a_stream_that_never_pauses():
    """Events without a pause for longer than DRAIN_MAX_S: the drain stops at its deadline."""
    async def endless():
        while True:
            await asyncio.sleep(DRAIN_GAP_S / 10)
            yield _data({"choices": [{"text": "a"}]})

    async def timed():
        t0 = asyncio.get_running_loop().time()
        out = await Soak._drain(endless())
        return out, asyncio.get_running_loop().time() - t0

    (line, end), took = asyncio.run(timed())
    assert line != DONE and end is None and DRAIN_MAX_S <= took < DRAIN_MAX_S + 5


def test_an_error_event_is_not_a_committed_turn():
    ready = [_data({"error": {"message": "the engine stream ended without a finish", "code": 502}}), "", DONE]
    line, end = asyncio.run(Soak._drain(_lines(ready)))
    assert line == DONE and "error" in end and "session" not in end
