"""Durable, shared session state (issue 12) through real `vllm serve` processes
on a tiny model: a session survives `kill -9` and a restart on the same SQLite
store, and two API server processes share sessions through Redis (turns of
one session on either process, one request per session at a time)."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from sir_vllm.server.process import ServerProcess

from api_processes import REPLICA, bounded_reader, clients_on_each_process, stall_bound, stalled
from redis_server import RedisServer

POLICY = ["--kv-policy", "sirllm", "--kv-start-size", "4", "--kv-entropy-size", "60",
          "--kv-recent-size", "0"]
BASE = ["--dtype", "float32", "--kv-cache-memory-bytes", "256M", "--max-model-len", "1024",
        "--enforce-eager"]
NO_EVICTION = {"name": "sirllm", "start_size": 4, "entropy_size": 900, "recent_size": 0}
LOGPROBS = 200  # per token of the busy test's long answer: its stream, past twice stall_bound()
PROMPTS = ["The quick brown fox", " jumps over the lazy dog.", " Then it sleeps.", " And wakes up."]


def serve(model, tmp_path, name, *extra) -> ServerProcess:
    proc = ServerProcess(model=str(model), served_model_name="tiny", log_path=tmp_path / f"{name}.log",
                         extra_args=[*BASE, *POLICY, *extra])
    return proc.start(timeout=float(os.environ.get("SIR_VLLM_SERVER_TIMEOUT", "900")))


def turn(url, sid, prompt, client=None, **extra):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True, "session_id": sid, **extra}
    post = (client or httpx).post
    r = post(url + "/v1/completions", json=body, timeout=300,
             **({} if client else {"headers": {"Connection": "close"}}))
    return r


def info(url, sid):
    r = httpx.get(f"{url}/v1/sessions/{sid}", timeout=60)
    r.raise_for_status()
    return r.json()


def kill_9(server: ServerProcess) -> None:
    """kill -9 the API server only (its engine processes follow: server/parent_watch.py)."""
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(30)
    server.stop()


def test_a_session_survives_kill_9_and_a_restart(tiny_serving_model, tmp_path):
    store = f"sqlite:{tmp_path / 'sessions.sqlite3'}"
    sid, ref = f"dur-{uuid.uuid4().hex[:8]}", f"ref-{uuid.uuid4().hex[:8]}"
    first = serve(tiny_serving_model, tmp_path, "first", "--kv-session-store", store)
    try:
        for prompt in PROMPTS[:3]:
            for s in (sid, ref):
                assert turn(first.url, s, prompt, kv_policy=NO_EVICTION).status_code == 200
        want = turn(first.url, ref, PROMPTS[3]).json()  # the uninterrupted server's next answer
        before = info(first.url, sid)
    finally:
        kill_9(first)
    t0 = time.monotonic()
    second = serve(tiny_serving_model, tmp_path, "second", "--kv-session-store", store)
    try:
        restarted = time.monotonic() - t0
        after = info(second.url, sid)
        assert after["tokens"] == before["tokens"] and after["turns"] == 3  # ids and scores exact
        t1 = time.monotonic()
        got = turn(second.url, sid, PROMPTS[3]).json()
        first_answer = time.monotonic() - t1
        s = got["session"]
        assert s["turns"] == 4 and s["recomputed_tokens"] == before["retained_tokens"] > 0
        assert s["loaded_tokens"] == 0
        assert got["choices"][0]["token_ids"] == want["choices"][0]["token_ids"]
        assert got["choices"][0]["prompt_token_ids"] == want["choices"][0]["prompt_token_ids"]
        t2 = time.monotonic()
        assert turn(second.url, f"new-{sid}", PROMPTS[3]).status_code == 200
        fresh = time.monotonic() - t2
        print(f"\nrestart to ready {restarted:.1f} s; first answer: resumed session "
              f"{first_answer * 1e3:.0f} ms ({s['recomputed_tokens']} kept tokens recomputed), "
              f"a fresh session {fresh * 1e3:.0f} ms")
    finally:
        second.stop()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="module")
def two_api_servers(tiny_serving_model, tmp_path_factory, redis_url):
    proc = serve(tiny_serving_model, tmp_path_factory.mktemp("two-api"), "two-api",
                 "--api-server-count", "2", "--kv-session-store", redis_url,
                 "--max-logprobs", str(LOGPROBS))
    yield proc
    proc.stop()


def test_one_session_on_two_api_processes(two_api_servers):
    url = two_api_servers.url
    spread, alone = f"spread-{uuid.uuid4().hex[:6]}", f"alone-{uuid.uuid4().hex[:6]}"
    first, second = clients_on_each_process(url)
    served_by = []
    for i in range(8):
        prompt = f" Step {i}: count the number {i * 3}."
        a = turn(url, spread, prompt, client=(first, second)[i % 2])  # alternating processes
        b = turn(url, alone, prompt, client=first)  # every turn on one process
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        served_by.append(a.headers[REPLICA])
        assert a.json()["choices"][0]["token_ids"] == b.json()["choices"][0]["token_ids"], i
        assert a.json()["session"] == {**b.json()["session"], "id": spread}
    assert served_by == [first.process, second.process] * 4, served_by
    assert info(url, spread)["evicted_tokens"] > 0
    for c in (first, second):
        c.close()


def test_a_busy_session_is_a_409_from_either_process(two_api_servers):
    url = two_api_servers.url
    sid = f"busy-{uuid.uuid4().hex[:6]}"
    holder, started, probed = {}, threading.Event(), threading.Event()

    def long_turn():  # a long answer (in segments past the budget) its client stops reading
        # Its chunks (LOGPROBS log-probs a token) add up to several times what the
        # server's send buffer and the reader's receive buffer hold (api_processes),
        # so the turn cannot commit until the reader reads on, after the probes.
        with bounded_reader() as h:
            with h.stream("POST", url + "/v1/completions", json={
                    "model": "tiny", "prompt": "Go on.", "max_tokens": 3000, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "logprobs": LOGPROBS,
                    "session_id": sid}) as r:
                holder["by"] = r.headers[REPLICA]
                started.set()
                probed.wait(120)
                lines = list(r.iter_lines())
                holder["bytes"] = sum(len(line) + 1 for line in lines)
                holder["last"] = [line for line in lines if line.startswith("data:")][-1]

    t = threading.Thread(target=long_turn)
    t.start()
    assert started.wait(120)
    # Probes on new connections, 8 at a time, until both processes have answered:
    # the holder's process is busy with its log-probs, and a kept-alive client's
    # next request was seen to land on the other process (its connection closed).
    answers: dict[str, list[int]] = {}
    try:
        with ThreadPoolExecutor(8) as pool:
            for _ in range(8):
                for r in pool.map(lambda _: turn(url, sid, " Again."), range(8)):
                    answers.setdefault(r.headers[REPLICA], []).append(r.status_code)
                if len(answers) == 2:
                    break
    finally:
        probed.set()
        t.join()
    # what the 409s rely on: the holder's sends waited for its reader
    assert stalled(holder["bytes"]), \
        f"the holder streamed {holder['bytes']} B, bound {stall_bound()} B: raise LOGPROBS"
    assert len(answers) == 2 and {c for codes in answers.values() for c in codes} == {409}, answers
    assert holder["by"] in answers and holder["last"] == "data: [DONE]"
    assert turn(url, sid, " Done.").status_code == 200  # the lease went with the turn
