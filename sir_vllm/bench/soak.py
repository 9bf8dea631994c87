"""A soak: many session turns under KV-pool pressure, hostile traffic between
them, and one `kill -9` and restart in the middle.

`run_soak(cfg)` starts `vllm serve --kv-policy sirllm` with a KV pool too small
to pin every session (so pins are dropped and their tokens recomputed) and a
SQLite session store of its own, then drives `sessions` sessions at once, each
`turns` completions turns of random token ids. Between turns it interleaves
streams it closes after a chunk or two (each must leave the session as it
was) and malformed requests from the fuzzer's menu (`bench.fuzz`, each must be
a 4xx). Halfway it kills the API server with SIGKILL and starts it again on
the same store; every session goes on from where it was.

It counts what must be zero: crashes (the server gone, a dropped connection),
5xx answers, valid turns refused, turn counts that do not follow (an abort
that committed, a turn lost in the restart), retained tokens above the
budget; and once every session is deleted, the KV blocks still pinned or in
use (`vllm:sir_pinned_kv_blocks`, `vllm:kv_cache_usage_perc` on /metrics).
It samples the API process's RSS (first and last of each server process).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sir_vllm.bench import fuzz

RESULTS = "soak.json"
MAX_TURN_TOKENS = 16384  # --kv-max-turn-tokens: room for the long answers of the aborted streams
# An aborted stream's answer: many passes past the budget, seconds of work even on the tiny
# model, so the close comes long before the turn's end (an aborted turn costs only the
# passes run before the server sees the close)
ABORTED_ANSWER_TOKENS = 12288
# Before it closes, an aborting client reads what has already arrived: a client that fell
# behind the server (a loaded machine) may already hold the whole answer, a turn the server
# committed. It stops at the first gap of DRAIN_GAP_S between events, or after DRAIN_MAX_S.
DRAIN_GAP_S = 0.05
DRAIN_MAX_S = 1.0
DONE = "data: [DONE]"
ZERO = ("crashes", "server_errors", "refused_turns", "turn_mismatches", "over_budget",
        "malformed_accepted", "malformed_without_reason")


@dataclass
class SoakConfig:
    out: Path
    model: Path | None = None  # None: the tiny random model of bench.api_memory
    served_name: str = "soak"
    sessions: int = 8
    turns: int = 1000  # per session
    prompt_tokens: int = 8
    max_tokens: int = 4
    abort_every: int = 10  # an aborted stream before every N-th turn of a session (0: none)
    malformed_every: int = 7  # a malformed request before every N-th turn (0: none)
    restart: bool = True  # kill -9 and restart halfway
    block_size: int = 128
    pool_blocks: int = 6  # the KV pool (one of them vLLM's null block): too small to pin all
    max_model_len: int = 512
    start_size: int = 4
    entropy_size: int = 60
    recent_size: int = 0
    seed: int = 0
    rss_every: int = 50  # turns (all sessions together) between RSS samples
    timeout: float = 120.0  # one request's limit: beyond it a request hangs
    server_timeout: float = 900.0
    server_args: list[str] = field(default_factory=list)

    @property
    def budget(self) -> int:
        return self.start_size + self.entropy_size + self.recent_size


def kv_bytes_per_token(model: Path, dtype_bytes: int = 4) -> int:
    """K and V of every layer, per token, from the checkpoint's config.json (float32)."""
    c = json.loads((Path(model) / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def server_args(cfg: SoakConfig, model: Path) -> list[str]:
    pool = cfg.pool_blocks * cfg.block_size * kv_bytes_per_token(model)
    return ["--dtype", "float32", "--enforce-eager", "--block-size", str(cfg.block_size),
            "--kv-cache-memory-bytes", str(pool), "--max-model-len", str(cfg.max_model_len),
            "--kv-policy", "sirllm", "--kv-start-size", str(cfg.start_size),
            "--kv-entropy-size", str(cfg.entropy_size), "--kv-recent-size", str(cfg.recent_size),
            "--kv-max-turn-tokens", str(MAX_TURN_TOKENS),
            "--kv-session-store", f"sqlite:{Path(cfg.out).resolve() / 'sessions.sqlite3'}",
            *cfg.server_args]


def _final_event(line: str) -> dict | None:
    """The event of an SSE line that ends a turn: the committed turn's last (it
    carries `session`) or an error; None for any other line."""
    if not line.startswith("data: {") or ('"session"' not in line and '"error"' not in line):
        return None
    event = json.loads(line[6:])
    return event if "session" in event or "error" in event else None


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def scrape(url: str) -> dict[str, float]:
    """/metrics as {sample name: value summed over its labels}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=60).text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


class Soak:
    """The run's state: the server, the counts, each session's expected turn count."""

    def __init__(self, cfg: SoakConfig, model: Path, log=print):
        self.cfg, self.model, self.log = cfg, model, log
        self.counts: Counter = Counter()
        self.expected: dict[str, int] = {}  # session id -> turns it must have
        self.max_retained = 0
        self.rss: list[dict] = []  # {"server": k, "turn": n, "rss_kib": r}
        self.problems: list[str] = []  # the first few of each failure, for the report
        self.server = None
        self.servers = 0
        self.turns_done = 0
        self.pins_dropped = 0.0
        self.rng = random.Random(cfg.seed)
        self.malformed: dict[str, list[fuzz.Case]] = {}
        self.last_abort: dict[str, str] = {}  # session id -> its aborted stream since its last turn

    # -- the server ----------------------------------------------------------------
    def start_server(self):
        from sir_vllm.server.process import ServerProcess

        self.servers += 1
        out = Path(self.cfg.out)
        self.server = ServerProcess(model=str(self.model), served_model_name=self.cfg.served_name,
                                    extra_args=server_args(self.cfg, self.model),
                                    log_path=out / f"server-{self.servers}.log")
        self.server.start(timeout=self.cfg.server_timeout)
        self.sample_rss()

    def kill_9(self) -> None:
        """SIGKILL the API server alone (its engine processes follow it: server/parent_watch.py)."""
        self.sample_rss()
        self.pins_dropped += scrape(self.server.url).get("vllm:sir_pins_dropped_total", 0.0)
        os.kill(self.server.proc.pid, signal.SIGKILL)
        self.server.proc.wait(30)
        self.server.stop()

    def sample_rss(self) -> None:
        kib = rss_kib(self.server.proc.pid)
        if kib is not None:
            self.rss.append({"server": self.servers, "turn": self.turns_done, "rss_kib": kib})

    def fail(self, what: str, detail: str) -> None:
        self.counts[what] += 1
        if sum(p.startswith(what) for p in self.problems) < 5:
            self.problems.append(f"{what}: {detail}")

    # -- one session's traffic -------------------------------------------------------
    def _prompt(self) -> list[int]:
        return [self.rng.randrange(100, 40000) for _ in range(self.cfg.prompt_tokens)]

    def _body(self, sid: str, **extra) -> dict:
        return {"model": self.cfg.served_name, "prompt": self._prompt(), "max_tokens": self.cfg.max_tokens,
                "temperature": 0, "ignore_eos": True, "session_id": sid, **extra}

    async def _post(self, client, body: dict):
        """A valid turn, retried while the session is busy (a stream we left may still hold it)."""
        for _ in range(200):
            r = await client.post(self.server.url + fuzz.COMPLETIONS, json=body)
            if r.status_code != 409:
                return r
            self.counts["conflicts_retried"] += 1
            await asyncio.sleep(0.05)
        return r

    async def turn(self, client, sid: str) -> None:
        try:
            r = await self._post(client, self._body(sid))
        except Exception as e:
            return self.fail("crashes", f"turn of {sid}: {type(e).__name__}: {e}")
        if r.status_code >= 500:
            return self.fail("server_errors", f"turn of {sid}: {r.status_code} {r.text[:200]}")
        if r.status_code != 200:
            return self.fail("refused_turns", f"turn of {sid}: {r.status_code} {r.text[:200]}")
        s = r.json()["session"]
        self.expected[sid] = self.expected.get(sid, 0) + 1
        self.counts["turns"] += 1
        self.counts["recomputed_turns"] += s["recomputed_tokens"] > 0
        self.counts["recomputed_tokens"] += s["recomputed_tokens"]
        self.max_retained = max(self.max_retained, s["retained_tokens"])
        if s["retained_tokens"] > s["budget"] or s["budget"] > self.cfg.budget:
            self.fail("over_budget", f"{sid}: retained {s['retained_tokens']} of budget {s['budget']}")
        if s["turns"] != self.expected[sid]:
            self.fail("turn_mismatches", f"{sid}: turns {s['turns']}, expected {self.expected[sid]} "
                                         f"(last: {self.last_abort.get(sid, 'no aborted stream')}; "
                                         f"this turn answered at {time.time():.3f})")
            self.expected[sid] = s["turns"]
        self.last_abort.pop(sid, None)

    async def aborted_stream(self, client, sid: str) -> None:
        """A stream closed after a chunk or two (and the events already there: a
        client behind the server reads a turn the server finished, see DRAIN_GAP_S).
        Its answer is far longer than the budget (a long turn, pass after pass), so
        the close comes before its end: a turn it committed all the same is a
        mismatch in the next turn's count."""
        body = self._body(sid, stream=True, max_tokens=ABORTED_ANSWER_TOKENS)
        after = self.rng.choice([1, 2, 3])
        try:
            async with client.stream("POST", self.server.url + fuzz.COMPLETIONS, json=body) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    if r.status_code >= 500:
                        return self.fail("server_errors", f"stream of {sid}: {r.status_code} {text[:200]}")
                    self.counts[f"stream_{r.status_code}"] += 1  # 409: the session was busy
                    return
                lines = r.aiter_lines()
                seen, line, end = 0, "", None
                async for line in lines:
                    seen += line.startswith("data: ")
                    end = end or _final_event(line)
                    if line == DONE or seen >= after:
                        break
                if line != DONE:
                    line, drained = await self._drain(lines)
                    end = end or drained
                if line == DONE and end and "error" in end:
                    return self.fail("server_errors", f"stream of {sid}: {json.dumps(end)[:200]}")
                if line == DONE:  # it ended before we left: a committed turn
                    self.expected[sid] = self.expected.get(sid, 0) + 1
                    self.counts["streams_completed"] += 1
                    return
                self.counts["streams_aborted"] += 1
                self.last_abort[sid] = f"aborted stream after {seen} events, closing at {time.time():.3f}"
                # leaving the block closes the connection: the abort
        except Exception as e:
            self.fail("crashes", f"stream of {sid}: {type(e).__name__}: {e}")

    @staticmethod
    async def _drain(lines) -> tuple[str, dict | None]:
        """Read the events already here (see DRAIN_GAP_S): the last line read, and
        the turn's final event among them (`_final_event`)."""
        line, end = "", None
        # a deadline checked between reads, not an outer timeout: Python 3.11's
        # wait_for swallows a cancel that lands as its read completes, so a
        # stream sending without pause would be read to its end
        deadline = time.monotonic() + DRAIN_MAX_S
        try:
            while line != DONE and (left := deadline - time.monotonic()) > 0:
                line = await asyncio.wait_for(anext(lines), min(DRAIN_GAP_S, left))
                end = end or _final_event(line)
        except (TimeoutError, StopAsyncIteration):
            pass
        return line, end

    async def malformed_request(self, client, sid: str) -> None:
        pool = self.malformed.get(sid)
        if not pool:
            target = fuzz.Target(model=self.cfg.served_name, canary=sid, max_turn_tokens=MAX_TURN_TOKENS)
            pool = [c for c in fuzz.cases(self.rng.randrange(2 ** 31), 400, target)
                    if c.canary and c.expect == fuzz.REJECT and not c.kind.startswith("path:")]
            self.malformed[sid] = pool
        case = pool.pop()
        o = await fuzz._send(client, self.server.url, case, self.cfg.timeout, self.cfg.budget)
        self.counts["malformed"] += 1
        if o.status is None:
            return self.fail("crashes", f"malformed {case.kind} on {sid}: {o.failure}")
        if o.status >= 500:
            return self.fail("server_errors", f"malformed {case.kind}: {o.failure}")
        if o.status < 400:
            return self.fail("malformed_accepted", f"{case.kind}: {o.failure}")
        if o.status == 409:
            self.counts["malformed_409"] += 1
        elif o.failure is not None:
            self.fail("malformed_without_reason", f"{case.kind}: {o.failure}")

    async def session(self, client, sid: str, first: int, last: int) -> None:
        cfg = self.cfg
        for k in range(first, last):
            if cfg.abort_every and k % cfg.abort_every == cfg.abort_every - 1:
                await self.aborted_stream(client, sid)
            if cfg.malformed_every and k % cfg.malformed_every == cfg.malformed_every - 1:
                await self.malformed_request(client, sid)
            await self.turn(client, sid)
            self.turns_done += 1
            if self.turns_done % cfg.rss_every == 0:
                self.sample_rss()
            if self.server.proc.poll() is not None:
                return self.fail("crashes", f"the server exited with {self.server.proc.returncode}")

    async def phase(self, sids: list[str], first: int, last: int) -> None:
        import httpx

        limits = httpx.Limits(max_connections=4 * len(sids), max_keepalive_connections=len(sids))
        async with httpx.AsyncClient(timeout=self.cfg.timeout, limits=limits) as client:
            await asyncio.gather(*(self.session(client, sid, first, last) for sid in sids))

    # -- checks around the traffic ----------------------------------------------------
    def check_resumed(self, sids: list[str]) -> None:
        """After the restart every session is where it was (turns), from the SQLite store."""
        import httpx

        for sid in sids:
            r = httpx.get(f"{self.server.url}{fuzz.SESSIONS}{sid}", timeout=60)
            turns = r.json().get("turns") if r.status_code == 200 else None
            if turns != self.expected.get(sid):
                self.fail("turn_mismatches", f"{sid} after the restart: {r.status_code} turns {turns}, "
                                             f"expected {self.expected.get(sid)}")

    def delete_all(self, sids: list[str]) -> dict:
        """Delete every session; then the pool must hold no pin and no block in use."""
        import httpx

        url = self.server.url
        for sid in sids:
            for _ in range(100):
                r = httpx.delete(f"{url}{fuzz.SESSIONS}{sid}", timeout=60)
                if r.status_code != 409:
                    break
                time.sleep(0.1)
            if r.status_code != 200:
                self.fail("refused_turns", f"DELETE {sid}: {r.status_code} {r.text[:200]}")
        # one stock request: a scheduler step, so vLLM's own pool gauge is fresh
        httpx.post(url + fuzz.COMPLETIONS, json={"model": self.cfg.served_name, "prompt": [100, 200],
                                                 "max_tokens": 1}, timeout=60)
        m = scrape(url)
        self.pins_dropped += m.get("vllm:sir_pins_dropped_total", 0.0)
        return {"pinned_blocks": m.get("vllm:sir_pinned_kv_blocks"),
                "pinned_sessions": m.get("vllm:sir_sessions_pinned"),
                "sessions_live": m.get("vllm:sir_sessions_live"),
                "kv_cache_usage": m.get("vllm:kv_cache_usage_perc")}


def tiny_model() -> Path:
    from sir_vllm.bench.api_memory import tiny_model as made

    return made()


def run_soak(cfg: SoakConfig, log=print) -> dict:
    """The whole soak; returns (and writes to OUT/soak.json) its figures."""
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    model = Path(cfg.model) if cfg.model else tiny_model()
    soak = Soak(cfg, model, log)
    sids = [f"soak-{k}-{soak.rng.getrandbits(32):08x}" for k in range(cfg.sessions)]
    half = cfg.turns // 2 if cfg.restart else cfg.turns
    t0 = time.monotonic()
    soak.start_server()
    try:
        asyncio.run(soak.phase(sids, 0, half))
        log(f"soak: {soak.turns_done} turns on server 1 in {time.monotonic() - t0:.0f} s")
        if cfg.restart:
            soak.kill_9()
            t1 = time.monotonic()
            soak.start_server()
            restart_s = time.monotonic() - t1
            soak.check_resumed(sids)
            asyncio.run(soak.phase(sids, half, cfg.turns))
        else:
            restart_s = None
        soak.sample_rss()
        pool = soak.delete_all(sids)
    finally:
        if soak.server is not None:
            soak.server.stop()
    rss = {}
    for k in range(1, soak.servers + 1):
        mine = [s["rss_kib"] for s in soak.rss if s["server"] == k]
        if mine:
            rss[f"server_{k}"] = {"first_kib": mine[0], "last_kib": mine[-1], "max_kib": max(mine),
                                  "samples": len(mine)}
    results = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
               "model": str(model), "seconds": round(time.monotonic() - t0, 1),
               "restart_seconds": None if restart_s is None else round(restart_s, 1),
               "counts": {k: soak.counts.get(k, 0) for k in sorted(set(soak.counts) | set(ZERO))},
               "max_retained_tokens": soak.max_retained, "budget": cfg.budget,
               "pins_dropped": soak.pins_dropped, "rss": rss, "rss_samples": soak.rss,
               "pool_after_delete": pool, "problems": soak.problems}
    (Path(cfg.out) / RESULTS).write_text(json.dumps(results, indent=1))
    return results


def failures(results: dict) -> list[str]:
    """What the soak must not show (empty: a clean run)."""
    out = [f"{k} = {results['counts'][k]}" for k in ZERO if results["counts"].get(k)]
    pool = results["pool_after_delete"]
    if pool.get("pinned_blocks") or pool.get("pinned_sessions"):
        out.append(f"pins left after every session was deleted: {pool}")
    if pool.get("kv_cache_usage"):
        out.append(f"KV blocks still in use after every session was deleted: {pool}")
    if pool.get("sessions_live"):
        out.append(f"sessions left in the store: {pool}")
    return out + results["problems"]


def summary(results: dict) -> str:
    c = results["counts"]
    rss = "; ".join(f"{k}: {v['first_kib'] / 1024:.0f} -> {v['last_kib'] / 1024:.0f} MiB "
                    f"(max {v['max_kib'] / 1024:.0f})" for k, v in results["rss"].items())
    lines = [f"{c.get('turns', 0)} turns in {results['seconds']:.0f} s "
             f"(restart to ready: {results['restart_seconds']} s); "
             f"aborted streams {c.get('streams_aborted', 0)} (completed before the close "
             f"{c.get('streams_completed', 0)}), malformed {c.get('malformed', 0)}, "
             f"409s retried {c.get('conflicts_retried', 0)}",
             "must be 0: " + ", ".join(f"{k} {c.get(k, 0)}" for k in ZERO),
             f"retained tokens at most {results['max_retained_tokens']} of budget {results['budget']}; "
             f"turns that recomputed dropped pins {c.get('recomputed_turns', 0)} "
             f"({c.get('recomputed_tokens', 0)} tokens); pins dropped for pool pressure "
             f"{results['pins_dropped']:.0f}",
             f"API process RSS {rss}",
             f"after deleting every session: {results['pool_after_delete']}"]
    return "\n".join(lines)
