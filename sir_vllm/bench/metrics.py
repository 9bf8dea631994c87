"""From turn records to figures: pure functions (no server, no I/O).

Times are in milliseconds (as `vllm bench serve` reports them), rates per
second. Every summary carries both this project's keys (`turns_per_s`,
`ttft_p50`, ...) and the `vllm bench serve` names for the same figures
(`request_throughput`, `median_ttft_ms`, ...). Compaction times come from the
server's `/metrics` (the `vllm:sir_compaction_seconds` histogram, read before
and after a run: `read_histogram`, `histogram_delta`).
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

from .client import TurnRecord

_CONTEXT_ERROR = re.compile(r"maximum context length|max_model_len|context length", re.I)
COMPACTION_METRIC = "vllm:sir_compaction_seconds"  # one observation per load of kept tokens


def percentile(values, q: float) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.percentile(vals, q)) if vals else None


def mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def std(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.std(vals)) if vals else None


def is_context_length_error(status: int | None, message: str | None) -> bool:
    """vLLM's answer to a conversation that no longer fits `max_model_len`."""
    return status == 400 and bool(_CONTEXT_ERROR.search(message or ""))


def first_failure(records: list[TurnRecord]) -> dict | None:
    """The earliest failed turn (1-based), how many sessions failed, and why."""
    failed = [r for r in records if not r.ok]
    if not failed:
        return None
    first = min(failed, key=lambda r: (r.turn, r.session))
    return {
        "turn": first.turn,
        "session": first.session,
        "sessions_failed": len({r.session for r in failed}),
        "status": first.status,
        "message": first.error,
        "context_limit": is_context_length_error(first.status, first.error),
        "context_tokens": first.context_tokens,  # the conversation the failed request carried
    }


def first_short_answer(records: list[TurnRecord], max_tokens: int) -> dict | None:
    """The earliest turn whose answer came back shorter than asked: with
    `ignore_eos` only a clamp does that (vLLM cuts `max_tokens` to what is left
    of `max_model_len` before it refuses the prompt outright)."""
    short = [r for r in records if r.ok and r.output_tokens < max_tokens]
    if not short:
        return None
    first = min(short, key=lambda r: (r.turn, r.session))
    return {"turn": first.turn, "session": first.session, "output_tokens": first.output_tokens,
            "context_tokens": first.context_tokens, "turns": len(short)}


def read_histogram(text: str, name: str = COMPACTION_METRIC) -> dict:
    """A Prometheus histogram from a `/metrics` page, summed over its label
    sets (engines, models): {"count", "sum", "buckets": {upper bound: cumulative count}}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {"count": 0.0, "sum": 0.0, "buckets": {}}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == name + "_count":
                out["count"] += sample.value
            elif sample.name == name + "_sum":
                out["sum"] += sample.value
            elif sample.name == name + "_bucket":
                le = float(sample.labels["le"])
                out["buckets"][le] = out["buckets"].get(le, 0.0) + sample.value
    return out


def histogram_delta(before: dict, after: dict) -> dict:
    """What a histogram observed between two reads."""
    return {"count": after["count"] - before["count"], "sum": after["sum"] - before["sum"],
            "buckets": {le: n - before["buckets"].get(le, 0.0) for le, n in after["buckets"].items()}}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile (0..1) of cumulative buckets, interpolated within its
    bucket as Prometheus's `histogram_quantile` does; None with no observation."""
    bounds = sorted(buckets)
    if not bounds or not buckets[bounds[-1]]:
        return None
    rank, lower, below = q * buckets[bounds[-1]], 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if le == float("inf"):
                return lower  # above the highest finite bound: its bound, as Prometheus
            inside = buckets[le] - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, buckets[le]
    return lower


def compaction_figures(delta: dict | None) -> dict:
    """A run's compactions from the delta of `vllm:sir_compaction_seconds`: how
    many (one per load of kept tokens), mean (exact) and p50/p99 (from the
    buckets), in ms."""
    count = int(round(delta["count"])) if delta else 0

    def ms(seconds):
        return None if seconds is None else seconds * 1e3

    return {
        "compaction_turns": count,
        "compaction_ms_p50": ms(histogram_quantile(0.5, delta["buckets"])) if count else None,
        "compaction_ms_p99": ms(histogram_quantile(0.99, delta["buckets"])) if count else None,
        "compaction_ms_mean": ms(delta["sum"] / count) if count else None,
    }


def eviction_flags(records: list[TurnRecord]) -> dict[tuple[int, int], bool]:
    """(session, turn) -> whether the session evicted before that turn."""
    flags = {}
    by_session = defaultdict(list)
    for r in records:
        by_session[r.session].append(r)
    for recs in by_session.values():
        prev = 0
        for r in sorted(recs, key=lambda r: r.turn):
            if r.ok and r.evicted_tokens is not None:
                flags[(r.session, r.turn)] = r.evicted_tokens > prev
                prev = r.evicted_tokens
    return flags


def by_turn(records: list[TurnRecord]) -> list[dict]:
    """Per turn number, over sessions: latency, TTFT, KV and context (the curves)."""
    groups = defaultdict(list)
    for r in records:
        groups[r.turn].append(r)
    rows = []
    for t in sorted(groups):
        recs = groups[t]
        ok = [r for r in recs if r.ok]
        rows.append({
            "turn": t,
            "completed": len(ok),
            "failed": len(recs) - len(ok),
            "latency_mean_ms": mean(r.latency_ms for r in ok),
            "latency_p50_ms": percentile([r.latency_ms for r in ok], 50),
            "ttft_mean_ms": mean(r.ttft_ms for r in ok),
            "ttft_p50_ms": percentile([r.ttft_ms for r in ok], 50),
            "tpot_mean_ms": mean(r.tpot_ms for r in ok),
            "kv_tokens_mean": mean(r.kv_tokens for r in ok),
            "kv_tokens_max": max((r.kv_tokens for r in ok if r.kv_tokens is not None), default=None),
            "context_tokens_mean": mean(r.context_tokens for r in ok),
            "prompt_tokens_mean": mean(r.prompt_tokens for r in ok),
        })
    return rows


def _window_rate(recs: list[TurnRecord]) -> float | None:
    if not recs:
        return None
    span = max(r.end_s for r in recs) - min(r.start_s for r in recs)
    return len(recs) / span if span > 0 else None


def summarize(records: list[TurnRecord], duration_s: float, policy: str, concurrency: int,
              max_tokens: int, compaction: dict | None = None) -> dict:
    """One run (one policy, one number of sessions) as figures; `compaction`:
    the run's `histogram_delta` of `vllm:sir_compaction_seconds`, if read."""
    ok = [r for r in records if r.ok]
    lat = [r.latency_ms for r in ok]
    ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
    tpot = [r.tpot_ms for r in ok if r.tpot_ms is not None]
    estimate = [r.ttft_estimate_ms for r in ok if r.ttft_estimate_ms is not None]
    out_tokens = sum(r.output_tokens for r in ok)

    def rate(n: float) -> float | None:
        return n / duration_s if duration_s > 0 else None

    final_kv = {}
    peak_kv = defaultdict(int)
    for r in ok:
        if r.kv_tokens is not None:
            final_kv[r.session] = r.kv_tokens  # records are in turn order per session
            peak_kv[r.session] = max(peak_kv[r.session], r.kv_tokens)
    evict = eviction_flags(records)
    lat_evict = [r.latency_ms for r in ok if evict.get((r.session, r.turn))]
    lat_keep = [r.latency_ms for r in ok if (r.session, r.turn) in evict and not evict[(r.session, r.turn)]]
    budgets = {r.budget for r in ok if r.budget is not None}
    summary = {
        "policy": policy,
        "sessions": concurrency,
        "turns_attempted": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration": duration_s,
        "turns_per_s": rate(len(ok)) if ok else 0.0,
        "output_tokens_per_s": rate(out_tokens) if ok else 0.0,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "ttft_mean": mean(ttft),
        "tpot_p50": percentile(tpot, 50),
        "tpot_p99": percentile(tpot, 99),
        "tpot_mean": mean(tpot),
        "streamed": bool(ok) and all(r.streamed for r in ok),
        # latency - the server's decode interval: the non-streaming estimate of TTFT
        "ttft_estimate_p50": percentile(estimate, 50),
        "ttft_estimate_p99": percentile(estimate, 99),
        "latency_p50": percentile(lat, 50),
        "latency_p99": percentile(lat, 99),
        "latency_mean": mean(lat),
        "kv_tokens_per_session": max(peak_kv.values(), default=None),
        "kv_tokens_per_session_final_mean": mean(final_kv.values()),
        "max_context_tokens": max((r.context_tokens for r in ok), default=0),
        "budget": min(budgets) if budgets else None,
        "evicting_turns": sum(1 for v in evict.values() if v),
        "latency_p50_evicting": percentile(lat_evict, 50),
        "latency_p50_not_evicting": percentile(lat_keep, 50),
        **compaction_figures(compaction),
        "prefill_p50": percentile([r.prefill_ms for r in ok], 50),
        "queue_p50": percentile([r.queue_ms for r in ok], 50),
        "total_input_tokens": sum(r.new_tokens for r in ok),
        "total_prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),
        "total_cached_tokens": sum(r.cached_tokens or 0 for r in ok),
        "total_output_tokens": out_tokens,
        "failure": first_failure(records),
        "short_answer": first_short_answer(records, max_tokens),
        # the same figures under `vllm bench serve`'s names
        "completed_requests": len(ok),
        "request_throughput": rate(len(ok)) if ok else 0.0,
        "output_throughput": rate(out_tokens) if ok else 0.0,
        "max_concurrency": concurrency,
        "mean_ttft_ms": mean(ttft),
        "median_ttft_ms": percentile(ttft, 50),
        "std_ttft_ms": std(ttft),
        "p99_ttft_ms": percentile(ttft, 99),
        "mean_tpot_ms": mean(tpot),
        "median_tpot_ms": percentile(tpot, 50),
        "std_tpot_ms": std(tpot),
        "p99_tpot_ms": percentile(tpot, 99),
        "mean_e2el_ms": mean(lat),
        "median_e2el_ms": percentile(lat, 50),
        "std_e2el_ms": std(lat),
        "p99_e2el_ms": percentile(lat, 99),
        "by_turn": by_turn(records),
    }
    return summary


def late_window(runs: dict[str, tuple[list[TurnRecord], float]], width: int = 10) -> dict | None:
    """The last `width` turn numbers that every policy completed in every
    session; per policy, the mean latency and turns/s over that window.
    Compares policies at the deepest point they all reached."""
    common = None
    for recs, _ in runs.values():
        sessions = {r.session for r in recs}
        done = defaultdict(set)
        for r in recs:
            if r.ok:
                done[r.turn].add(r.session)
        reached = {t for t, s in done.items() if s == sessions}
        # turns completed by all sessions, contiguous from 1
        last = 0
        while last + 1 in reached:
            last += 1
        common = last if common is None else min(common, last)
    if not common:
        return None
    lo = max(1, common - width + 1)
    out = {"turns": [lo, common], "policies": {}}
    for name, (recs, _) in runs.items():
        win = [r for r in recs if r.ok and lo <= r.turn <= common]
        out["policies"][name] = {
            "latency_mean_ms": mean(r.latency_ms for r in win),
            "turns_per_s": _window_rate(win),
            "context_tokens_mean": mean(r.context_tokens for r in win),
            "kv_tokens_mean": mean(r.kv_tokens for r in win),
        }
    return out


def ratios(policies: dict[str, dict], baseline: str = "stock",
           window: dict | None = None) -> dict:
    """Each policy's throughput over the baseline's (x > 1: faster than stock)."""
    base = policies.get(baseline)
    if not base:
        return {}
    out = {}
    for name, s in policies.items():
        if name == baseline:
            continue
        row = {}
        for key in ("turns_per_s", "output_tokens_per_s"):
            if s.get(key) and base.get(key):
                row[key] = s[key] / base[key]
        if s.get("latency_p50") and base.get("latency_p50"):
            row["latency_p50_speedup"] = base["latency_p50"] / s["latency_p50"]
        if window and name in window["policies"] and baseline in window["policies"]:
            a, b = window["policies"][name], window["policies"][baseline]
            if a["turns_per_s"] and b["turns_per_s"]:
                row["late_turns_per_s"] = a["turns_per_s"] / b["turns_per_s"]
            if a["latency_mean_ms"] and b["latency_mean_ms"]:
                row["late_latency_speedup"] = b["latency_mean_ms"] / a["latency_mean_ms"]
        out[f"{name}/{baseline}"] = row
    return out


def memory_report(records: list[TurnRecord], turns: tuple[int, int] = (100, 1000),
                  window: int = 10) -> dict:
    """Issue 4's bounded-memory figure for one long session: latency near turn
    a vs near turn b (median over `window` turns ending there, and the turn
    itself), the slope of latency against the turn number, and the peak KV
    held against the budget."""
    ok = sorted((r for r in records if r.ok), key=lambda r: r.turn)
    last = ok[-1].turn if ok else 0
    a, b = turns
    b = min(b, last)
    a = min(a, b)

    def near(t: int) -> dict:
        win = [r.latency_ms for r in ok if t - window < r.turn <= t]
        at = next((r.latency_ms for r in ok if r.turn == t), None)
        return {"turn": t, "latency_ms": at, "latency_median_ms": percentile(win, 50)}

    xs = np.array([r.turn for r in ok], dtype=float)
    ys = np.array([r.latency_ms for r in ok], dtype=float)
    slope = float(np.polyfit(xs, ys, 1)[0]) * 100 if len(ok) >= 2 else None
    kv = [r.kv_tokens for r in ok if r.kv_tokens is not None]
    budgets = {r.budget for r in ok if r.budget is not None}
    budget = min(budgets) if budgets else None
    ra, rb = near(a), near(b)
    ratio = (rb["latency_median_ms"] / ra["latency_median_ms"]
             if ra["latency_median_ms"] and rb["latency_median_ms"] else None)
    return {
        "turns_completed": len(ok),
        "early": ra,
        "late": rb,
        "late_over_early": ratio,
        "latency_slope_ms_per_100_turns": slope,
        "max_retained_tokens": max(kv) if kv else None,
        "budget": budget,
        "within_budget": (max(kv) <= budget) if kv and budget is not None else None,
        "max_context_tokens": max((r.context_tokens for r in ok), default=0),
    }


# the settings two runs must share for their turns to be the same turns
SAME_TURNS = ("model", "sessions", "turns", "max_tokens", "budget", "decay", "seed", "workload",
              "max_user_tokens", "max_model_len")


def ttft_by_mode(streamed: dict, unstreamed: dict) -> dict:
    """Issue 11's TTFT figure from two results documents of the same turns,
    one streamed and one `--no-stream`: per policy, the time to the first
    token as a client sees it in each mode (p50/p99, ms). Streamed: the
    measured TTFT. Not streamed: the first token arrives with the whole
    response, so it is the turn latency; beside it the server-metrics
    estimate the non-streaming bench reported as TTFT. `ratio_p50`: the
    policy's non-streamed p50 over its streamed p50; `vs_stock_p50`: stock's
    streamed p50 over the policy's."""
    a, b = streamed["settings"], unstreamed["settings"]
    differ = [k for k in SAME_TURNS if a.get(k) != b.get(k)]
    if differ:
        raise ValueError("the two runs are not of the same turns: they differ in "
                         + ", ".join(f"{k} ({a.get(k)!r} vs {b.get(k)!r})" for k in differ))
    rows = {}
    for name in dict.fromkeys([*streamed["policies"], *unstreamed["policies"]]):
        s, u = streamed["policies"].get(name), unstreamed["policies"].get(name)
        row = {}
        if s:
            row["streamed_ttft_p50_ms"], row["streamed_ttft_p99_ms"] = s["ttft_p50"], s["ttft_p99"]
            row["streamed_tpot_p50_ms"] = s.get("tpot_p50")
        if u:
            row["unstreamed_first_token_p50_ms"] = u["latency_p50"]
            row["unstreamed_first_token_p99_ms"] = u["latency_p99"]
            row["unstreamed_estimate_p50_ms"] = u.get("ttft_estimate_p50", u.get("ttft_p50"))
            row["unstreamed_estimate_p99_ms"] = u.get("ttft_estimate_p99", u.get("ttft_p99"))
        if s and u and s["ttft_p50"]:
            row["ratio_p50"] = u["latency_p50"] / s["ttft_p50"]
        rows[name] = row
    stock = rows.get("stock", {}).get("streamed_ttft_p50_ms")
    for name, row in rows.items():
        if name != "stock" and stock and row.get("streamed_ttft_p50_ms"):
            row["vs_stock_p50"] = stock / row["streamed_ttft_p50_ms"]
    return {"streamed_command": streamed.get("command"),
            "unstreamed_command": unstreamed.get("command"), "policies": rows}
