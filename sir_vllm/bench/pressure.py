"""The pressure scenario (issue 14): S sessions x T turns that outgrow the KV pool.

`--scenario pressure` sizes every server's KV pool (`--kv-cache-memory-bytes`)
from the workload itself, so it holds about `fraction` (a quarter) of the full
histories of the largest number of sessions: stock vLLM, which resends each
history, must evict and recompute (or preempt), while a session policy holds
at most its budget per session. Each number of sessions runs its own sessions
(disjoint slices of one seeded workload), so a run never finds the previous
run's histories in the prefix cache; every policy gets the same slices.

The figures beyond `summarize`'s come from two places: the server's `/metrics`
counters read around each run (preemptions, prefix-cache hit rate, pins
dropped, pin-miss tokens) and the turns' own records (which sessions kept
their KV pinned and which recomputed part of it).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from .client import TurnRecord

PRESSURE_PLOT = "pressure_turns_vs_sessions.png"
CPU_BLOCK_SIZE = 128  # vLLM's CPU backend default block size (tokens per KV block)
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "fp8": 1}

# `/metrics` counters the scenario reads around each run (summed over labels)
COUNTERS = {
    "preemptions": "vllm:num_preemptions",
    "prefix_cache_queries": "vllm:prefix_cache_queries",
    "prefix_cache_hits": "vllm:prefix_cache_hits",
    "pins_dropped": "vllm:sir_pins_dropped",
    "pin_miss_tokens": "vllm:sir_pin_miss_tokens",
    "turns_held": "vllm:sir_turns_held",
    "offloaded_tokens": "vllm:sir_offloaded_tokens",
    "restored_tokens": "vllm:sir_restored_tokens",
    "tokens_loaded": "vllm:sir_tokens_loaded",
    "tokens_recomputed": "vllm:sir_tokens_recomputed",
}


def kv_bytes_per_token(model_dir: str | Path, dtype: str = "float32") -> int:
    """Bytes one cached token takes: K and V x layers x KV heads x head size x
    dtype size, from the checkpoint's config.json (the client side of
    `vllm_adapter.kv_bytes_per_token`, which needs the engine's config)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    size = DTYPE_BYTES.get(str(dtype).lower())
    if size is None:
        raise ValueError(f"pressure scenario: unknown --dtype {dtype!r}")
    return 2 * cfg["num_hidden_layers"] * heads * head * size


def history_tokens(messages: list[str], renderer, max_tokens: int) -> int:
    """A session's whole conversation in tokens (every turn's ids + every
    `max_tokens` answer), rendered with a stand-in answer: what stock vLLM
    must hold to keep the history cached."""
    answer = renderer.encode("ok")[:1] * max_tokens
    total, prev = 0, None
    for user in messages:
        total += len(renderer.turn_ids(user, prev)) + max_tokens
        prev = answer
    return total


def session_slices(sessions: list[int]) -> dict[int, tuple[int, int]]:
    """Each number of sessions -> its own [start, stop) of the workload."""
    out, at = {}, 0
    for s in sorted(sessions):
        out[s] = (at, at + s)
        at += s
    return out


def _round_up(n: int, block: int) -> int:
    return int(math.ceil(n / block) * block)


@dataclass
class PressurePlan:
    """The KV pool every server of the run gets, and why."""

    fraction: float            # of the largest run's full histories
    sessions: int              # the largest number of sessions (the pressure point)
    history_tokens_mean: float
    history_tokens_max: int
    histories_total: int       # the largest run's histories, summed (tokens)
    bytes_per_token: int
    block_size: int
    pool_tokens: int
    pool_bytes: int
    max_model_len: int
    budget: int

    @property
    def histories_over_pool(self) -> float:
        return self.histories_total / self.pool_tokens

    @property
    def budgets_over_pool(self) -> float:
        return self.sessions * self.budget / self.pool_tokens

    def server_args(self) -> list[str]:
        """Appended to every server's arguments (later flags win in vLLM's parser)."""
        return ["--kv-cache-memory-bytes", str(self.pool_bytes)]

    def to_dict(self) -> dict:
        return {**asdict(self), "histories_over_pool": self.histories_over_pool,
                "budgets_over_pool": self.budgets_over_pool}


def plan_pressure(histories: list[int], fraction: float, bytes_per_token: int, budget: int,
                  max_tokens: int, block_size: int = CPU_BLOCK_SIZE,
                  max_model_len: int | None = None) -> PressurePlan:
    """The pool for `histories` (the largest run's, in tokens): `fraction` of
    their sum, in whole blocks, and never less than one max_model_len request
    (vLLM refuses to start otherwise). max_model_len: the longest history plus
    an answer, in whole blocks, unless given."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--pressure-fraction must be in (0, 1], got {fraction}")
    if not histories:
        raise ValueError("pressure scenario: no sessions")
    longest = max(histories)
    mml = max_model_len or _round_up(longest + max_tokens, block_size)
    pool = max(_round_up(int(fraction * sum(histories)), block_size), _round_up(mml, block_size))
    return PressurePlan(fraction=fraction, sessions=len(histories),
                        history_tokens_mean=sum(histories) / len(histories),
                        history_tokens_max=longest, histories_total=sum(histories),
                        bytes_per_token=bytes_per_token, block_size=block_size,
                        pool_tokens=pool, pool_bytes=pool * bytes_per_token, max_model_len=mml,
                        budget=budget)


# -- /metrics counters --------------------------------------------------------

def read_counters(text: str) -> dict[str, float | None]:
    """The scenario's counters from a `/metrics` page (None: not published)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {name: key for key, name in COUNTERS.items()}
    out: dict[str, float | None] = {key: None for key in COUNTERS}
    for family in text_string_to_metric_families(text):
        key = wanted.get(family.name) or wanted.get(family.name.removesuffix("_total"))
        if key is None:
            continue
        for sample in family.samples:
            if sample.name.endswith(("_created",)):
                continue
            out[key] = (out[key] or 0.0) + sample.value
    return out


def counters_delta(before: dict, after: dict) -> dict[str, float | None]:
    return {k: (None if after.get(k) is None else after[k] - (before.get(k) or 0.0))
            for k in COUNTERS}


def fetch_counters(url: str) -> dict[str, float | None] | None:
    """The server's counters now, or None from a server without `/metrics`."""
    import httpx

    r = httpx.get(url.rstrip("/") + "/metrics", timeout=60)
    if r.status_code == 404:
        return None
    r.raise_for_status()
    return read_counters(r.text)


# -- figures from the turns ---------------------------------------------------

def history_recomputed(r: TurnRecord) -> int:
    """Tokens of what the conversation had before this turn that the turn
    computed again: a session's `recomputed_tokens` (kept tokens found
    unpinned), stock's history tokens the prefix cache did not have."""
    if r.budget is not None:
        return int(r.recomputed_tokens or 0)
    earlier = (r.prompt_tokens or 0) - r.new_tokens
    return max(0, earlier - int(r.cached_tokens or 0))


def pressure_figures(records: list[TurnRecord], counters: dict | None,
                     block_size: int = CPU_BLOCK_SIZE) -> dict:
    """One run's pressure figures. A session counts as recomputed when one of
    its turns recomputed part of its history (stock: more than one block's
    worth, since the prefix cache hits whole blocks only); the rest stayed
    pinned (stock: cached)."""
    ok = [r for r in records if r.ok]
    by_session = defaultdict(list)
    for r in ok:
        by_session[r.session].append(r)
    slack = {True: 0, False: block_size}  # session policy?
    recomputed_sessions = sum(
        1 for recs in by_session.values()
        if any(history_recomputed(r) > slack[r.budget is not None] for r in recs if r.turn > 1))
    kv = [r.kv_tokens for r in ok if r.kv_tokens is not None]
    budgets = {r.budget for r in ok if r.budget is not None}
    budget = min(budgets) if budgets else None
    later = [r for r in ok if r.turn > 1]
    c = counters or {}
    queries, hits = c.get("prefix_cache_queries"), c.get("prefix_cache_hits")
    return {
        "sessions_run": len({r.session for r in records}),
        "sessions_pinned": len(by_session) - recomputed_sessions,
        "sessions_recomputed": recomputed_sessions,
        "history_tokens_recomputed": sum(history_recomputed(r) for r in later),
        "kept_tokens_loaded": sum(int(r.loaded_tokens or 0) for r in later),
        "turns_recomputing": sum(1 for r in later
                                 if history_recomputed(r) > slack[r.budget is not None]),
        "kv_tokens_per_session_mean": (sum(kv) / len(kv)) if kv else None,
        "kv_tokens_per_session_max": max(kv) if kv else None,
        "within_budget": (max(kv) <= budget) if kv and budget is not None else None,
        "preemptions": c.get("preemptions"),
        "prefix_cache_queries": queries,
        "prefix_cache_hits": hits,
        "prefix_cache_hit_rate": (hits / queries) if queries and hits is not None else None,
        "pins_dropped": c.get("pins_dropped"),
        "pin_miss_tokens": c.get("pin_miss_tokens"),
        "turns_held": c.get("turns_held"),
        "offloaded_tokens": c.get("offloaded_tokens"),
        "restored_tokens": c.get("restored_tokens"),
        "queue_ms_mean": _mean(r.queue_ms for r in ok),
        "prefill_ms_mean": _mean(r.prefill_ms for r in ok),
        "prompt_tokens_mean": _mean(r.prompt_tokens for r in ok),
        "cached_tokens_mean": _mean(r.cached_tokens for r in ok),
    }


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


# -- report --------------------------------------------------------------------

def _f(v, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def pressure_rows(results: dict) -> list[list[str]]:
    rows = []
    for name, pol in results["policies"].items():
        for s in pol["sweep"]:
            p = s.get("pressure") or {}
            rate = p.get("prefix_cache_hit_rate")
            rows.append([
                name, _f(s["sessions"]), _f(s["turns_per_s"], 2), _f(s["output_tokens_per_s"], 1),
                _f(s["ttft_p50"], 0), _f(s["ttft_p99"], 0), _f(s["latency_p50"], 0),
                _f(s["latency_p99"], 0), _f(p.get("preemptions"), 0),
                "–" if rate is None else f"{100 * rate:.0f}%",
                f"{p.get('sessions_pinned', '–')} / {p.get('sessions_recomputed', '–')}",
                _f(p.get("history_tokens_recomputed")), _f(p.get("pins_dropped"), 0),
                _f(p.get("restored_tokens"), 0),
                _f(p.get("kv_tokens_per_session_mean"), 0), _f(p.get("kv_tokens_per_session_max")),
                _f(p.get("queue_ms_mean"), 0), _f(p.get("prefill_ms_mean"), 0),
                _f(s.get("compaction_ms_mean"), 1),
            ])
    return rows


PRESSURE_HEAD = ["policy", "sessions", "turns/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms",
                 "latency p50 ms", "latency p99 ms", "preemptions", "prefix-cache hit rate",
                 "sessions pinned / recomputed", "history tokens recomputed", "pins dropped",
                 "kept tokens restored from host",
                 "KV tok/session mean", "KV tok/session max", "queue ms mean",
                 "prefill ms mean", "compaction ms mean"]


def pressure_markdown(results: dict) -> str:
    from .report import markdown_table

    plan = results["pressure"]
    lines = ["## Pressure (the KV pool holds a fraction of the histories)", "",
             f"- KV pool: {plan['pool_tokens']:,} tokens ({plan['pool_bytes']:,} bytes = "
             f"{plan['pool_tokens']:,} x {plan['bytes_per_token']:,} bytes/token, blocks of "
             f"{plan['block_size']}), every server; max_model_len {plan['max_model_len']:,}",
             f"- at {plan['sessions']} sessions: histories {plan['histories_total']:,} tokens "
             f"(mean {plan['history_tokens_mean']:,.0f}, max {plan['history_tokens_max']:,}) = "
             f"{plan['histories_over_pool']:.2f}x the pool; their budgets "
             f"({plan['budget']} each) {plan['budgets_over_pool']:.2f}x the pool",
             "- each number of sessions runs its own sessions (no run finds another's history "
             "cached); every policy the same ones",
             "- sessions pinned / recomputed: sessions whose every turn found its history's KV "
             "(a session's kept tokens pinned; stock: its prefix cached, to within a block) / "
             "sessions with a turn that recomputed part of it", ""]
    lines += [markdown_table(PRESSURE_HEAD, pressure_rows(results)), ""]
    by_s = results.get("ratios_by_sessions") or {}
    if by_s:
        names = sorted({n for r in by_s.values() for n in r})
        rows = [[str(k)] + [_f(by_s[k].get(n, {}).get("turns_per_s"), 2) for n in names]
                for k in by_s]
        lines += ["turns/s over stock's, by number of sessions:", "",
                  markdown_table(["sessions", *names], rows), ""]
    lines += [f"![turns/s against sessions]({PRESSURE_PLOT})", ""]
    return "\n".join(lines)


def plot_pressure(results: dict, path: Path) -> Path:
    """turns/s (left) and turn latency p50 (right) against sessions, per policy,
    with the number of sessions whose histories the pool holds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = results["pressure"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pol in results["policies"].items():
        xs = [s["sessions"] for s in pol["sweep"]]
        ax1.plot(xs, [s["turns_per_s"] for s in pol["sweep"]], marker="o", label=name)
        ax2.plot(xs, [s["latency_p50"] for s in pol["sweep"]], marker="o", label=name)
    fits = plan["pool_tokens"] / plan["history_tokens_mean"]
    ticks = sorted({s["sessions"] for pol in results["policies"].values() for s in pol["sweep"]})
    for ax, label in ((ax1, "turns/s"), (ax2, "turn latency p50, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.axvline(fits, color="gray", linestyle="--", linewidth=1,
                   label=f"pool holds {fits:.0f} whole histories")
        ax.set_xlabel("concurrent sessions")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    st = results["settings"]
    fig.suptitle(f"KV pool {plan['pool_tokens']:,} tokens; {st['turns']} turns x "
                 f"{st['max_tokens']}-token answers; budget {st['budget']['total']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
