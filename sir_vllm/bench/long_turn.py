"""`sir-vllm bench-long-turn`: one session fed far more than its budget (issue 17's proof).

A turn too long for the budget runs as passes (`sir_vllm.policy.chunks`):
its input in prefill chunks, its answer in segments, each pass evicting as
the policy says. This benchmark shows what that buys on a real `vllm serve
--kv-policy sirllm` (started here): a session fed `--input-tokens` tokens
(DailyDialog text, repeated) in turns of `--turn-tokens` token ids, then
asked for one streamed answer of `--answer-tokens` tokens (`ignore_eos`),

* keeps at most the budget (`retained_tokens` of every turn; fails loudly if not);
* spends the same time per 1K tokens at the end as at the start (ms per 1K
  input tokens over the first and the last `--window-tokens`, ms per 1K
  output tokens over the answer's first and last `--answer-window-tokens`);
* holds the memory of the API server and of the engine (EngineCore, worker)
  flat (RSS after every turn and every `--answer-window-tokens` output tokens).

Input turns are prefill turns (`max_tokens: 0`): the session then keeps
exactly the text fed, no one-token answer between turns, and a turn's time is
its chunks' prefill alone. The session opens with a turn of one pass's worth
of tokens: a session's first turn is not bounded by the budget (it runs whole
when it fits the model's window, as in the reference code), a later turn is.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .api_memory import at_fraction, process_name, rss_kib, store_spec
from .runner import Budget, bench_policy, machine_info, server_args as policy_server_args

RESULTS, SUMMARY, PLOT = "results.json", "results.md", "long_turn.png"
SESSION_ID, WARMUP_ID = "long-turn", "long-turn-warmup"
ANSWER_PROMPT = "\n\nNow write a long story about everything you have read above.\n"
API, ENGINE, WORKER = "api_server", "engine_core", "worker"


@dataclass
class LongTurnConfig:
    model: Path
    out: Path
    input_tokens: int = 1_000_000
    turn_tokens: int = 10_000
    answer_tokens: int = 10_000
    budget: Budget = field(default_factory=lambda: Budget(4, 1020, 0))
    decay: float = 1.0
    chunk_tokens: int | None = None  # --kv-chunk-tokens; None: the server's default
    data: Path | None = None  # DailyDialog raw text; None: the shared folder's dialogues_test.txt
    window_tokens: int = 10_000  # input: first vs last this many tokens
    answer_window_tokens: int = 1_000  # answer: first vs last, and the blocks RSS is sampled after
    store: str = "memory"  # --kv-session-store (sqlite: a file of this run's own in --out)
    max_model_len: int | None = None
    server_args: list[str] = field(default_factory=list)
    server_timeout: float = 900.0
    request_timeout: float = 3600.0
    flat_ratio: float = 1.10  # the verdicts' bound (time and memory); only the budget fails the run
    progress: bool = True

    @property
    def policy(self):
        return bench_policy("sirllm", self.budget, self.decay)

    @property
    def room(self) -> int:
        """What the budget leaves beside the sinks: a later turn above it runs in passes."""
        return self.budget.total - self.budget.start

    @property
    def chunk(self) -> int:
        """The tokens of one pass, as the server picks them (`sir_vllm.policy.chunks`)."""
        from sir_vllm.policy.chunks import default_chunk, max_chunk

        return min(self.chunk_tokens or default_chunk(self.policy), max_chunk(self.policy))

    def validate(self) -> None:
        if self.turn_tokens <= self.room + self.chunk:
            raise ValueError(f"--turn-tokens {self.turn_tokens} must be above the budget's room beside "
                             f"the sinks plus the opening pass ({self.room} + {self.chunk}): the turn "
                             f"after the opening one (--turn-tokens - {self.chunk}) must run in chunks")
        if self.input_tokens < self.turn_tokens:
            raise ValueError(f"--input-tokens {self.input_tokens}: at least one turn ({self.turn_tokens})")
        if self.answer_tokens <= self.room:
            raise ValueError(f"--answer-tokens {self.answer_tokens} must be above the budget's room "
                             f"({self.room}), so the answer runs in segments")
        if not 0 < self.window_tokens <= self.input_tokens // 2:
            raise ValueError(f"--window-tokens must be in 1..{self.input_tokens // 2} (half the input)")
        if not 0 < self.answer_window_tokens <= self.answer_tokens // 2:
            raise ValueError(f"--answer-window-tokens must be in 1..{self.answer_tokens // 2}")
        if self.store not in ("memory", "sqlite"):
            raise ValueError(f"--store: memory or sqlite, got {self.store!r}")

    def command_line(self) -> str:
        b = self.budget
        cmd = ["sir-vllm", "bench-long-turn", "--model", str(self.model),
               "--input-tokens", str(self.input_tokens), "--turn-tokens", str(self.turn_tokens),
               "--answer-tokens", str(self.answer_tokens),
               "--budget", f"{b.start}+{b.entropy}" + (f"+{b.recent}" if b.recent else "")]
        for flag, value, default in (
                ("--decay", self.decay, 1.0), ("--chunk-tokens", self.chunk_tokens, None),
                ("--data", self.data, None), ("--window-tokens", self.window_tokens, 10_000),
                ("--answer-window-tokens", self.answer_window_tokens, 1_000),
                ("--store", self.store, "memory"), ("--max-model-len", self.max_model_len, None),
                ("--flat-ratio", self.flat_ratio, 1.10)):
            if value != default:
                cmd += [flag, str(value)]
        if self.server_args:
            cmd += [f"--server-args={shlex.join(self.server_args)}"]  # '=': the value starts with --
        return shlex.join(cmd + ["--out", str(self.out)])


# -- the input ------------------------------------------------------------------

def dialogue_ids(tokenizer, data: Path | None) -> list[int]:
    """DailyDialog's raw text as token ids, one dialogue after another, a
    newline between utterances (the test split: ~130K tokens, repeated as needed)."""
    from sir_vllm.eval.data import default_data_dir, default_file, load_dialogue_stream

    path = Path(data) if data else default_file("stream-ppl", default_data_dir())
    ids: list[int] = []
    for dialogue in load_dialogue_stream(path):
        ids += tokenizer("\n".join(dialogue) + "\n", add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"no text in {path}")
    return ids


def input_stream(source: list[int], n: int) -> list[int]:
    """The first `n` ids of `source` repeated."""
    return (source * (n // len(source) + 1))[:n]


def turn_sizes(cfg: LongTurnConfig) -> list[int]:
    """The opening pass, a turn that tops it up to --turn-tokens, then turns of
    --turn-tokens: turns end at multiples of --turn-tokens, so the first and the
    last window (of --turn-tokens) are whole turns. A last turn too short to
    run in chunks joins the one before it."""
    sizes = [cfg.chunk, cfg.turn_tokens - cfg.chunk]
    left = cfg.input_tokens - cfg.turn_tokens
    while left > 0:
        sizes.append(min(cfg.turn_tokens, left))
        left -= sizes[-1]
    if len(sizes) > 2 and sizes[-1] <= cfg.room:
        tail = sizes.pop()
        sizes[-1] += tail
    return sizes


# -- the server's processes -------------------------------------------------------

def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/*/stat (the parent is its 4th field)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return sorted(out)


def server_processes(api_pid: int) -> dict[str, int]:
    """{label: pid}: the API server (the `vllm serve` process) and, among its
    descendants, vLLM's EngineCore and worker processes (their process titles,
    `VLLM::EngineCore`, `VLLM::Worker...`); helpers (multiprocessing's
    resource tracker) are left out."""
    found, todo, workers = {API: api_pid}, [api_pid], []
    while todo:
        for child in children(todo.pop()):
            todo.append(child)
            try:
                name = process_name(child)
            except OSError:
                continue
            if "EngineCore" in name:
                found[ENGINE] = child
            elif "Worker" in name:
                workers.append(child)
    for i, pid in enumerate(workers):
        found[WORKER if len(workers) == 1 else f"{WORKER}_{i}"] = pid
    return found


def sample_rss(procs: dict[str, int]) -> dict[str, int]:
    return {label: rss_kib(pid) for label, pid in procs.items()}


# -- the session's turns ----------------------------------------------------------

class _Session:
    """One session's completions turns over httpx (sync: one turn at a time is all a session takes)."""

    def __init__(self, url: str, model: str, session_id: str, timeout: float):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=timeout)
        self.model, self.session_id = model, session_id

    def _body(self, ids: list[int], max_tokens: int, **extra) -> dict:
        return {"model": self.model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                "session_id": self.session_id, **extra}

    def prefill(self, ids: list[int]) -> dict:
        """A prefill turn (`max_tokens: 0`): {latency_ms, session, retained_before}."""
        t = time.perf_counter()
        r = self.http.post("/v1/completions", json=self._body(ids, 0))
        latency = (time.perf_counter() - t) * 1000
        if r.status_code != 200:
            raise RuntimeError(f"session {self.session_id!r}: HTTP {r.status_code}: {r.text[:500]}")
        return {"latency_ms": latency, "session": r.json()["session"],
                "retained_before": _int(r.headers.get("x-session-retained-tokens"))}

    def answer(self, ids: list[int], max_tokens: int, on_tokens=None) -> dict:
        """A streamed answer (`ignore_eos`): each token's arrival (ms after the
        request was sent), the final `session` object, the usage; `on_tokens(n)`
        after each chunk with tokens, n the answer's tokens so far."""
        # the token ids: a token without text of its own (half a character) counts too
        body = self._body(ids, max_tokens, stream=True, ignore_eos=True, return_token_ids=True,
                          stream_options={"include_usage": True})
        times, session, usage, finish, t = [], None, None, None, time.perf_counter()
        with self.http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"session {self.session_id!r}: HTTP {r.status_code}: "
                                   f"{r.read().decode(errors='replace')[:500]}")
            retained_before = _int(r.headers.get("x-session-retained-tokens"))
            for line in r.iter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                now = (time.perf_counter() - t) * 1000
                for choice in chunk.get("choices") or []:
                    n = len(choice.get("token_ids") or [])
                    times += [now] * n
                    finish = choice.get("finish_reason") or finish
                    if n and on_tokens:
                        on_tokens(len(times))
                session = chunk.get("session") or session
                usage = chunk.get("usage") or usage
        if session is None:
            raise RuntimeError(f"session {self.session_id!r}: the stream carried no `session` object")
        if usage and usage.get("completion_tokens") != len(times):
            raise RuntimeError(f"session {self.session_id!r}: {len(times)} tokens streamed, the usage "
                               f"says {usage.get('completion_tokens')}")
        return {"token_ms": times, "latency_ms": (time.perf_counter() - t) * 1000, "session": session,
                "usage": usage, "finish_reason": finish, "retained_before": retained_before}

    def delete(self) -> None:
        self.http.delete(f"/v1/sessions/{self.session_id}")

    def close(self) -> None:
        self.http.close()


def _int(v) -> int | None:
    return int(v) if v not in (None, "") else None


def warm_up(url: str, model: str, cfg: LongTurnConfig, ids: list[int]) -> dict:
    """A throw-away session through both long-turn paths (chunked prefill,
    segmented streamed answer), so the measured session's first turn pays no
    first-request costs. Returns its rates and what they project for the run
    (rough: the warm-up is short and its first requests are the slow ones)."""
    s = _Session(url, model, WARMUP_ID, cfg.request_timeout)
    try:
        s.prefill(ids[:cfg.chunk])
        turn = s.prefill(ids[:cfg.room + 1])
        answer = s.answer(ids[:cfg.room - cfg.chunk], cfg.chunk + 1)
        s.delete()
    finally:
        s.close()
    ms = answer["token_ms"]
    rates = {"prefill_ms_per_1k": turn["latency_ms"] * 1000 / (cfg.room + 1),
             "answer_ms_per_1k": (ms[-1] - ms[0]) * 1000 / max(1, len(ms) - 1)}
    rates["projected_s"] = (cfg.input_tokens * rates["prefill_ms_per_1k"]
                            + cfg.answer_tokens * rates["answer_ms_per_1k"]) / 1e6
    return rates


class OverBudget(RuntimeError):
    """A turn left the session holding more than its budget: the run stops there."""

    def __init__(self, message: str, partial: dict):
        super().__init__(message)
        self.partial = partial


def _check_budget(where: str, record: dict, partial: dict) -> None:
    budget = record["session"]["budget"]
    for key, value in (("retained after it", record["session"]["retained_tokens"]),
                       ("kept going in", record["retained_before"])):
        if value is not None and value > budget:
            raise OverBudget(f"{where}: the session {key} {value:,} tokens, above its budget of "
                             f"{budget:,}", partial)


def drive(url: str, model: str, cfg: LongTurnConfig, ids: list[int], answer_ids: list[int],
          procs: dict[str, int]) -> dict:
    """The measured session: the input turns, then the answer; RSS after every
    turn and every `answer_window_tokens` output tokens. Stops at the first
    turn that leaves more than the budget (OverBudget, with what ran)."""
    from tqdm import tqdm

    sizes = turn_sizes(cfg)
    s = _Session(url, model, SESSION_ID, cfg.request_timeout)
    samples = [{"fed": 0, "phase": "start", "rss_kib": sample_rss(procs)}]
    turns, fed = [], 0
    bar = tqdm(total=cfg.input_tokens + cfg.answer_tokens, unit="tok", unit_scale=True,
               desc="long session", disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True)
    try:
        t0 = time.monotonic()
        for i, n in enumerate(sizes):
            out = s.prefill(ids[fed:fed + n])
            fed += n
            sess = out["session"]
            _check_budget(f"input turn {i} ({fed:,} tokens fed)", out,
                          {"turns": turns, "rss_samples": samples})
            turns.append({"turn": i, "tokens": n, "fed": fed, "opening": i == 0,
                          "latency_ms": out["latency_ms"], "ms_per_1k": out["latency_ms"] * 1000 / n,
                          "retained_before": out["retained_before"],
                          "retained_tokens": sess["retained_tokens"], "chunks": sess.get("chunks"),
                          "segments": sess.get("segments"), "evicted_tokens": sess.get("evicted_tokens"),
                          "budget": sess.get("budget"), "load_1min": os.getloadavg()[0]})
            samples.append({"fed": fed, "phase": "input", "rss_kib": sample_rss(procs)})
            bar.update(n)
            bar.set_postfix(retained=sess["retained_tokens"], ms_per_1k=f"{turns[-1]['ms_per_1k']:.0f}")
        input_s = time.monotonic() - t0

        step = cfg.answer_window_tokens
        next_sample = [step]

        def on_tokens(done: int) -> None:
            bar.update(done - (bar.n - cfg.input_tokens))
            while done >= next_sample[0]:
                samples.append({"fed": fed + next_sample[0], "phase": "answer", "rss_kib": sample_rss(procs)})
                next_sample[0] += step

        t0 = time.monotonic()
        answer = s.answer(answer_ids, cfg.answer_tokens, on_tokens)
        answer_s = time.monotonic() - t0
        _check_budget("the answer", answer, {"turns": turns, "answer": answer, "rss_samples": samples})
        if samples[-1]["phase"] != "answer" or samples[-1]["fed"] != fed + len(answer["token_ms"]):
            samples.append({"fed": fed + len(answer["token_ms"]), "phase": "answer",
                            "rss_kib": sample_rss(procs)})
        answer["prompt_tokens"] = len(answer_ids)
        answer["load_1min"] = os.getloadavg()[0]
    finally:
        bar.close()
        s.close()
    return {"turns": turns, "answer": answer, "rss_samples": samples,
            "seconds": {"input": input_s, "answer": answer_s}}


# -- the figures ------------------------------------------------------------------

def window_ms_per_1k(turns: list[dict], window: int, last: bool) -> dict:
    """ms per 1K tokens over the first (or last) turns that hold `window` tokens."""
    picked, tokens = [], 0
    for t in (reversed(turns) if last else turns):
        picked.append(t)
        tokens += t["tokens"]
        if tokens >= window:
            break
    ms = sum(t["latency_ms"] for t in picked)
    return {"tokens": tokens, "turns": sorted(t["turn"] for t in picked), "ms": ms,
            "ms_per_1k": ms * 1000 / tokens}


def answer_windows(token_ms: list[float], window: int) -> tuple[dict, dict]:
    """ms per 1K output tokens over the answer's first and last `window`
    tokens (the first counted from the request: it holds the first token's wait)."""
    n = len(token_ms)
    first = token_ms[window - 1]
    last = token_ms[-1] - token_ms[n - window - 1]
    return ({"tokens": window, "ms": first, "ms_per_1k": first * 1000 / window},
            {"tokens": window, "ms": last, "ms_per_1k": last * 1000 / window})


def answer_blocks(token_ms: list[float], block: int) -> list[dict]:
    """ms per 1K output tokens of each `block` tokens of the answer (the
    first counted from the request)."""
    out, prev = [], 0.0
    for end in range(block, len(token_ms) + 1, block):
        out.append({"output_tokens": end, "ms_per_1k": (token_ms[end - 1] - prev) * 1000 / block})
        prev = token_ms[end - 1]
    return out


def memory_figures(samples: list[dict], flat_ratio: float) -> dict:
    """Per process: RSS (MiB) first (after the warm-up, before the session),
    halfway and last over all tokens fed, last/first and last/halfway."""
    total = samples[-1]["fed"]
    out = {}
    for label in samples[0]["rss_kib"]:
        series = [(s["fed"], s["rss_kib"][label]) for s in samples]
        first, half, last = series[0][1], at_fraction(series, total, 0.5)[1], series[-1][1]
        out[label] = {"first_mib": first / 1024, "halfway_mib": half / 1024, "last_mib": last / 1024,
                      "max_mib": max(v for _, v in series) / 1024,
                      "last_over_first": last / first, "last_over_halfway": last / half,
                      "flat": last / half <= flat_ratio}
    return out


def _within(ratio: float, bound: float) -> bool:
    return 1 / bound <= ratio <= bound


def figures(run: dict, cfg: LongTurnConfig) -> dict:
    turns = [t for t in run["turns"] if not t["opening"]]  # the chunked ones
    answer = run["answer"]
    budget = answer["session"]["budget"]
    retained = [(t["turn"], t["retained_tokens"]) for t in run["turns"]]
    retained += [("answer", answer["session"]["retained_tokens"])]
    retained += [(t["turn"], t["retained_before"]) for t in run["turns"] if t["retained_before"] is not None]
    worst = max(retained, key=lambda r: r[1])
    # the opening pass counts: the first window is the first tokens fed
    first_in, last_in = (window_ms_per_1k(run["turns"], cfg.window_tokens, last) for last in (False, True))
    first_out, last_out = answer_windows(answer["token_ms"], cfg.answer_window_tokens)
    return {
        "budget": budget, "budget_asked": cfg.budget.total,
        "max_retained": worst[1], "max_retained_at": worst[0],
        "within_budget": worst[1] <= budget,
        "input_tokens": sum(t["tokens"] for t in run["turns"]),
        "input_turns": len(turns), "turn_tokens_min": min(t["tokens"] for t in turns),
        "turn_tokens_max": max(t["tokens"] for t in turns), "chunks_per_turn_min": min(t["chunks"] for t in turns),
        "chunks_per_turn_max": max(t["chunks"] for t in turns),
        "chunks_total": sum(t["chunks"] for t in run["turns"]),
        "evicted_tokens": answer["session"]["evicted_tokens"],
        "input_ms_per_1k": {"first": first_in, "last": last_in,
                            "last_over_first": last_in["ms_per_1k"] / first_in["ms_per_1k"],
                            "flat": _within(last_in["ms_per_1k"] / first_in["ms_per_1k"], cfg.flat_ratio)},
        "output_tokens": len(answer["token_ms"]), "segments": answer["session"]["segments"],
        "ttft_ms": answer["token_ms"][0] if answer["token_ms"] else None,
        "output_ms_per_1k": {"first": first_out, "last": last_out,
                             "last_over_first": last_out["ms_per_1k"] / first_out["ms_per_1k"],
                             "flat": _within(last_out["ms_per_1k"] / first_out["ms_per_1k"], cfg.flat_ratio),
                             "blocks": answer_blocks(answer["token_ms"], cfg.answer_window_tokens)},
        "memory": memory_figures(run["rss_samples"], cfg.flat_ratio),
        "flat_ratio": cfg.flat_ratio,
    }


def summary_lines(results: dict) -> list[str]:
    f, st = results["figures"], results["settings"]
    i, o = f["input_ms_per_1k"], f["output_ms_per_1k"]
    bound = f["flat_ratio"]
    flat = lambda r: "flat" if _within(r, bound) else "GROWS" if r > bound else "falls"
    grows = lambda r: "flat" if r <= bound else "GROWS"
    lines = [
        f"retained tokens: max {f['max_retained']:,} (at turn {f['max_retained_at']}) vs budget "
        f"{f['budget']:,}: {'never above it' if f['within_budget'] else 'ABOVE THE BUDGET'}",
        f"input: {f['input_tokens']:,} tokens: an opening pass of {st['chunk']}, then {f['input_turns']} "
        f"turns of {f['turn_tokens_min']:,}-{f['turn_tokens_max']:,} tokens in "
        f"{f['chunks_per_turn_min']}-{f['chunks_per_turn_max']} chunks of at most {st['chunk']} tokens "
        f"each, {f['chunks_total']:,} chunks in all",
        f"ms per 1K input tokens: first {i['first']['tokens']:,} tokens {i['first']['ms_per_1k']:,.1f}, "
        f"last {i['last']['tokens']:,} {i['last']['ms_per_1k']:,.1f}; last/first {i['last_over_first']:.3f} "
        f"({flat(i['last_over_first'])}: flat within {1 / bound:.2f}..{bound:.2f})",
        f"answer: {f['output_tokens']:,} tokens in {f['segments']} segments; first token after "
        f"{f['ttft_ms']:,.0f} ms; the session evicted {f['evicted_tokens']:,} tokens in all",
        f"ms per 1K output tokens: first {o['first']['tokens']:,} {o['first']['ms_per_1k']:,.1f}, "
        f"last {o['last']['tokens']:,} {o['last']['ms_per_1k']:,.1f}; last/first {o['last_over_first']:.3f} "
        f"({flat(o['last_over_first'])})",
    ]
    for label, m in f["memory"].items():
        lines.append(f"RSS {label} (pid {results['processes'][label]}): first {m['first_mib']:,.1f} MiB, "
                     f"halfway {m['halfway_mib']:,.1f}, last {m['last_mib']:,.1f} (max {m['max_mib']:,.1f}); "
                     f"last/first {m['last_over_first']:.3f}, last/halfway {m['last_over_halfway']:.3f} "
                     f"({grows(m['last_over_halfway'])}: flat <= {bound:.2f})")
    s = results["seconds"]
    lines.append(f"time: server start {s['server_start']:.0f} s, warm-up {s['warmup']:.0f} s, input "
                 f"{s['input']:,.0f} s, answer {s['answer']:,.0f} s, whole run {s['total']:,.0f} s; "
                 f"1-min load average {results['load_1min']['start']:.2f} at the start, median "
                 f"{results['load_1min']['median_during']:.2f} during, {results['load_1min']['end']:.2f} "
                 f"at the end")
    return lines


def markdown(results: dict) -> str:
    from .report import markdown_table

    f, st = results["figures"], results["settings"]
    i, o = f["input_ms_per_1k"], f["output_ms_per_1k"]
    rows = [["retained tokens, max (budget)", f"{f['max_retained']:,} ({f['budget']:,})", "", "",
             "never above the budget" if f["within_budget"] else "**ABOVE THE BUDGET**", ""],
            [f"ms per 1K input tokens (first {i['first']['tokens']:,} / last {i['last']['tokens']:,})",
             f"{i['first']['ms_per_1k']:,.1f}", "", f"{i['last']['ms_per_1k']:,.1f}",
             f"{i['last_over_first']:.3f}", ""],
            [f"ms per 1K output tokens (first / last {o['first']['tokens']:,})",
             f"{o['first']['ms_per_1k']:,.1f}", "", f"{o['last']['ms_per_1k']:,.1f}",
             f"{o['last_over_first']:.3f}", ""]]
    for label, m in f["memory"].items():
        rows.append([f"RSS {label}, MiB", f"{m['first_mib']:,.1f}", f"{m['halfway_mib']:,.1f}",
                     f"{m['last_mib']:,.1f}", f"{m['last_over_first']:.3f}", f"{m['last_over_halfway']:.3f}"])
    return "\n".join([
        "# One long session: bounded KV, flat time and memory (issue 17)", "",
        f"`{results['command']}`", "",
        f"{results['date']}; {results['machine']['description']}.", "",
        markdown_table(["figure", "first", "halfway", "last", "last/first", "last/halfway"], rows), "",
        *[f"- {line}" for line in summary_lines(results)], "",
        f"![ms per 1K tokens, retained tokens and RSS against tokens fed]({PLOT})", ""])


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run, f = results["run"], results["figures"]
    turns = [t for t in run["turns"] if not t["opening"]]
    fed_in = f["input_tokens"]
    inputs = [s for s in run["rss_samples"] if s["phase"] != "answer"]
    answers = [inputs[-1]] + [s for s in run["rss_samples"] if s["phase"] == "answer"]
    fig, ax = plt.subplots(3, 2, figsize=(12, 9), sharex="col",
                           gridspec_kw={"width_ratios": [3, 2]})
    ax[0][0].plot([t["fed"] / 1000 for t in turns], [t["ms_per_1k"] for t in turns], marker=".", lw=0.8)
    ax[0][0].set_ylabel("ms per 1K input tokens\n(each turn)")
    blocks = f["output_ms_per_1k"]["blocks"]
    ax[0][1].plot([b["output_tokens"] / 1000 for b in blocks], [b["ms_per_1k"] for b in blocks], marker=".")
    ax[0][1].set_ylabel(f"ms per 1K output tokens\n(each {results['settings']['answer_window_tokens']:,})")
    for a in ax[0]:
        a.set_ylim(bottom=0)
    ax[1][0].plot([t["fed"] / 1000 for t in run["turns"]], [t["retained_tokens"] for t in run["turns"]],
                  marker=".", lw=0.8, label="retained after the turn")
    ax[1][1].plot([0, f["output_tokens"] / 1000],
                  [run["answer"]["retained_before"] or 0, run["answer"]["session"]["retained_tokens"]],
                  marker="o", label="kept going in, retained after")
    for a in ax[1]:
        a.axhline(f["budget"], color="red", ls="--", label=f"budget {f['budget']:,}")
        a.set_ylim(0, f["budget"] * 1.15)
        a.legend(fontsize=8, loc="lower right")
    ax[1][0].set_ylabel("session's retained tokens")
    for label in f["memory"]:
        ax[2][0].plot([s["fed"] / 1000 for s in inputs], [s["rss_kib"][label] / 1024 for s in inputs],
                      label=label)
        ax[2][1].plot([(s["fed"] - fed_in) / 1000 for s in answers],
                      [s["rss_kib"][label] / 1024 for s in answers], marker=".", label=label)
    ax[2][0].set_ylabel("RSS, MiB")
    ax[2][0].set_xlabel("input tokens fed (thousands)")
    ax[2][1].set_xlabel("output tokens of the answer (thousands)")
    for a in ax[2]:
        a.set_ylim(bottom=0)
        a.legend(fontsize=8)
    for a in ax.flat:
        a.grid(alpha=0.3)
    st = results["settings"]
    fig.suptitle(f"one sirllm session, budget {f['budget']:,}: {fed_in:,} input tokens in turns of "
                 f"{st['turn_tokens']:,}, then a {f['output_tokens']:,}-token answer "
                 f"(passes of {st['chunk']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the run ----------------------------------------------------------------------

def server_args(cfg: LongTurnConfig) -> list[str]:
    """`vllm serve` arguments (model and port aside): the bench's float32 CPU
    defaults, the budget's knobs, the chunk size if given, the session store."""
    args = policy_server_args("sirllm", cfg.budget, cfg.decay, cfg.max_model_len)
    if cfg.chunk_tokens:
        args += ["--kv-chunk-tokens", str(cfg.chunk_tokens)]
    return args + ["--kv-session-store", store_spec(cfg), *cfg.server_args]


def run_long_turn(cfg: LongTurnConfig, log=print) -> dict:
    from transformers import AutoTokenizer

    from sir_vllm.server.process import ServerProcess

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob("sessions.sqlite3*"):
        leftover.unlink()
    started, load_start = time.monotonic(), os.getloadavg()[0]
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.model))
    ids = input_stream(dialogue_ids(tokenizer, cfg.data), cfg.input_tokens)
    answer_ids = tokenizer(ANSWER_PROMPT, add_special_tokens=False)["input_ids"]
    args = server_args(cfg)
    name = Path(cfg.model).name
    proc = ServerProcess(model=str(cfg.model), extra_args=args, served_model_name=name,
                         log_path=out / "server.log")
    log(f"starting vllm serve {cfg.model} {' '.join(args)} (log: {proc.log_path})")
    t = time.monotonic()
    proc.start(timeout=cfg.server_timeout)  # stops what it started if it fails
    with proc:
        server_start = time.monotonic() - t
        procs = server_processes(proc.proc.pid)
        log(f"ready after {server_start:.0f} s; processes: "
            + ", ".join(f"{k} {v} ({process_name(v)[:40]})" for k, v in procs.items()))
        t = time.monotonic()
        warm = warm_up(proc.url, name, cfg, ids)
        warmup_s = time.monotonic() - t
        log(f"warm-up: {warm['prefill_ms_per_1k']:,.0f} ms per 1K input tokens, "
            f"{warm['answer_ms_per_1k']:,.0f} ms per 1K output tokens: this run should take about "
            f"{warm['projected_s'] / 60:,.0f} min more")
        try:
            run = drive(proc.url, name, cfg, ids, answer_ids, procs)
        except OverBudget as e:
            (out / RESULTS).write_text(json.dumps({"failed": str(e), "command": cfg.command_line(),
                                                   "processes": procs, "run": e.partial}, indent=1) + "\n")
            log(f"FAILED: {e} (what ran: {out / RESULTS})")
            raise
    loads = sorted(t["load_1min"] for t in run["turns"])
    results = {
        "benchmark": "sir-vllm bench-long-turn",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": cfg.command_line(),
        "machine": machine_info(),
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                     "budget": cfg.budget.to_dict(), "chunk": cfg.chunk, "room": cfg.room,
                     "input_turns": "prefill (max_tokens 0)", "answer_prompt": ANSWER_PROMPT,
                     "server_args": args},
        "processes": procs,
        "warmup": warm,
        "seconds": {"server_start": server_start, "warmup": warmup_s, **run["seconds"],
                    "total": time.monotonic() - started},
        "load_1min": {"start": load_start, "median_during": loads[len(loads) // 2],
                      "end": os.getloadavg()[0]},
        "run": run,
    }
    results["figures"] = figures(run, cfg)
    (out / RESULTS).write_text(json.dumps(results, indent=1) + "\n")
    (out / SUMMARY).write_text(markdown(results))
    plot(results, out / PLOT)
    log("")
    for line in summary_lines(results):
        log(line)
    log(f"wrote {out / RESULTS}, {out / SUMMARY}, {out / PLOT}, {proc.log_path}")
    f = results["figures"]
    if not f["within_budget"]:
        raise RuntimeError(f"the session retained {f['max_retained']:,} tokens (at turn "
                           f"{f['max_retained_at']}), above its budget of {f['budget']:,}")
    return results
