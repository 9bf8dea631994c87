"""The benchmark's outputs: a table on stdout, results.md, results.json, PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

LATENCY_PLOT = "latency_vs_turn.png"
THROUGHPUT_PLOT = "throughput_vs_sessions.png"
TTFT_PLOT = "ttft_vs_turn.png"
TTFT_MODES_PLOT = "ttft_by_mode.png"


def _fmt(v, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _failure_text(s: dict) -> str:
    f = s.get("failure")
    if not f:
        return "none"
    return f"turn {f['turn']} ({f['status']})"


COLUMNS = [
    ("policy", lambda s: s["policy"]),
    ("sessions", lambda s: _fmt(s["sessions"])),
    ("turns ok/failed", lambda s: f"{s['completed']}/{s['failed']}"),
    ("turns/s", lambda s: _fmt(s["turns_per_s"], 2)),
    ("out tok/s", lambda s: _fmt(s["output_tokens_per_s"], 1)),
    ("TTFT p50 ms", lambda s: _fmt(s["ttft_p50"], 0)),
    ("TTFT p99 ms", lambda s: _fmt(s["ttft_p99"], 0)),
    ("TPOT p50 ms", lambda s: _fmt(s.get("tpot_p50"), 1)),
    ("TPOT p99 ms", lambda s: _fmt(s.get("tpot_p99"), 1)),
    ("latency p50 ms", lambda s: _fmt(s["latency_p50"], 0)),
    ("latency p99 ms", lambda s: _fmt(s["latency_p99"], 0)),
    ("KV tok/session (peak)", lambda s: _fmt(s["kv_tokens_per_session"])),
    ("context (peak)", lambda s: _fmt(s["max_context_tokens"])),
    ("evicting turns", lambda s: _fmt(s["evicting_turns"]) if s.get("budget") else "–"),
    ("first failure", _failure_text),
]


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    for pol in results["policies"].values():
        for s in pol["sweep"]:
            rows.append([fn(s) for _, fn in COLUMNS])
    return rows


def text_table(results: dict) -> str:
    head = [name for name, _ in COLUMNS]
    rows = table_rows(results)
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) if rows else len(head[i])
              for i in range(len(head))]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _settings_lines(st: dict) -> list[str]:
    b = st.get("budget") or {}
    lines = [
        f"- model: `{st['model']}`; workload: {st['workload']}, seed {st['seed']}",
        f"- sessions: {', '.join(map(str, st['sessions']))}; turns per session: {st['turns']}; "
        f"answer: exactly {st['max_tokens']} tokens (greedy, `ignore_eos`)",
        f"- session policies' budget: {b.get('start')} + {b.get('entropy')} + {b.get('recent')} "
        f"= {b.get('total')} tokens (sirllm: start + entropy + recent, decay {st.get('decay')}; "
        f"streaming: {b.get('start')} sinks + {b.get('total', 0) - b.get('start', 0)} recent)",
        f"- stock: `--kv-policy none`, prefix caching on, the client resends the whole "
        f"conversation each turn; max_model_len: {st.get('max_model_len') or 'the model default'}",
        f"- {'streamed' if st.get('stream') else 'not streamed (`--no-stream`)'}; "
        f"TTFT: {st['ttft_method']}",
    ]
    if st.get("server_args"):
        lines.append(f"- extra server arguments (every policy): `{' '.join(st['server_args'])}`")
    return lines


def markdown(results: dict) -> str:
    st = results["settings"]
    m = results.get("machine", {})
    out = ["# sir-vllm bench", "",
           f"Command: `{results['command']}`  ",
           f"Date: {results['date']}  ",
           f"Machine: {m.get('description', '?')}", "", "## Settings", ""]
    out += _settings_lines(st)
    out += ["", "## Results", "", markdown_table([c for c, _ in COLUMNS], table_rows(results)), ""]
    ratios = results.get("ratios") or {}
    if ratios:
        out += ["## Ratios against stock vLLM", "",
                "x > 1: the policy is faster than stock vLLM resending the history "
                "(largest number of sessions; `late` = the window below).", ""]
        keys = ["turns_per_s", "output_tokens_per_s", "latency_p50_speedup", "late_turns_per_s",
                "late_latency_speedup"]
        rows = [[name] + [_fmt(r.get(k), 2) for k in keys] for name, r in ratios.items()]
        out += [markdown_table(["policy / baseline", *keys], rows), ""]
        by_s = results.get("ratios_by_sessions") or {}
        if len(by_s) > 1:
            out += ["By number of sessions (turns/s over stock's):", ""]
            names = sorted({n for r in by_s.values() for n in r})
            rows = [[str(k)] + [_fmt(by_s[k].get(n, {}).get("turns_per_s"), 2) for n in names]
                    for k in by_s]
            out += [markdown_table(["sessions", *names], rows), ""]
    win = results.get("late_window")
    if win:
        lo, hi = win["turns"]
        out += [f"## At depth: turns {lo}–{hi} (the last turns every policy completed)", ""]
        rows = [[n, _fmt(w["latency_mean_ms"], 0), _fmt(w["turns_per_s"], 2),
                 _fmt(w["context_tokens_mean"], 0), _fmt(w["kv_tokens_mean"], 0)]
                for n, w in win["policies"].items()]
        out += [markdown_table(["policy", "latency mean ms", "turns/s", "conversation tokens",
                                "KV tokens held"], rows), ""]
    fails = [(n, p["failure"], p.get("short_answer")) for n, p in results["policies"].items()
             if p.get("failure") or p.get("short_answer")]
    if fails:
        out += ["## Failures", ""]
        for name, f, short in fails:
            if short:
                out.append(f"- {name}: answers cut short from turn {short['turn']} on "
                           f"({short['output_tokens']} of {st['max_tokens']} tokens at "
                           f"{short['context_tokens']} conversation tokens: max_model_len clamp)")
            if f:
                kind = "max_model_len exceeded" if f["context_limit"] else "error"
                out.append(f"- {name}: first failure at turn {f['turn']} ({kind}, HTTP "
                           f"{f['status']}, {f['sessions_failed']} session(s), conversation of "
                           f"{f['context_tokens']} tokens): `{f['message']}`")
        out.append("")
    evict = [(n, p) for n, p in results["policies"].items() if p.get("budget") is not None]
    if evict:
        out += ["## Evictions (session policies)", ""]
        for name, pol in evict:
            line = f"- {name}: {pol['evicting_turns']} of {pol['completed']} turns evicted"
            if pol.get("latency_p50_evicting") is not None and pol.get("latency_p50_not_evicting") is not None:
                line += (f"; latency p50 {_fmt(pol['latency_p50_evicting'], 0)} ms on those vs "
                         f"{_fmt(pol['latency_p50_not_evicting'], 0)} ms on the others")
            if pol.get("compaction_ms_p50") is not None:
                line += (f"; compaction (copy + RoPE re-rotation of the kept KV, worker log) "
                         f"p50 {_fmt(pol['compaction_ms_p50'], 2)} ms, p99 "
                         f"{_fmt(pol['compaction_ms_p99'], 2)} ms per turn over "
                         f"{pol['compaction_turns']} turns")
            out.append(line)
        out.append("")
    mem = results.get("memory") or {}
    if mem:
        out += ["", "## One long session (bounded memory)", ""]
        rows = []
        for name, r in mem.items():
            rows.append([name, _fmt(r["turns_completed"]),
                         f"{_fmt(r['early']['latency_median_ms'], 0)} (turn {r['early']['turn']})",
                         f"{_fmt(r['late']['latency_median_ms'], 0)} (turn {r['late']['turn']})",
                         _fmt(r["late_over_early"], 2), _fmt(r["latency_slope_ms_per_100_turns"], 2),
                         _fmt(r["max_retained_tokens"]), _fmt(r["budget"]),
                         _fmt(r["max_context_tokens"])])
        out += [markdown_table(["policy", "turns", "latency ms, median of 10 turns to", "… to",
                                "late/early", "slope ms/100 turns", "max retained", "budget",
                                "conversation tokens"], rows), ""]
    modes = results.get("ttft_by_mode")
    if modes:
        out += ttft_by_mode_lines(modes)
    plots = results.get("plots") or []
    if plots:
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    by = _by_turn_rows(results)
    if by:
        out += ["## Latency against turn number (largest number of sessions)", "", by, ""]
    return "\n".join(out).rstrip() + "\n"


def ttft_by_mode_lines(modes: dict) -> list[str]:
    """results.md's section for issue 11's TTFT figure (`metrics.ttft_by_mode`)."""
    out = ["## Time to first token: streamed vs not, and vs stock", "",
           "Streamed: request sent -> first chunk with a token (client-side). Not streamed: "
           "the first token comes with the whole response, at the turn latency; beside it the "
           "estimate `--no-stream` reports as TTFT (latency minus the server's decode interval). "
           "Same turns (same seed and settings) in both runs.", "",
           f"- streamed run: `{modes.get('streamed_command')}`",
           f"- not-streamed run: `{modes.get('unstreamed_command')}`", ""]
    head = ["policy", "streamed TTFT p50 ms", "p99", "not streamed: first token p50 ms", "p99",
            "server estimate p50 ms", "p99", "not streamed / streamed (p50)",
            "stock streamed / this (p50)"]
    rows = []
    for name, r in modes["policies"].items():
        rows.append([name, _fmt(r.get("streamed_ttft_p50_ms"), 0), _fmt(r.get("streamed_ttft_p99_ms"), 0),
                     _fmt(r.get("unstreamed_first_token_p50_ms"), 0),
                     _fmt(r.get("unstreamed_first_token_p99_ms"), 0),
                     _fmt(r.get("unstreamed_estimate_p50_ms"), 0),
                     _fmt(r.get("unstreamed_estimate_p99_ms"), 0),
                     _fmt(r.get("ratio_p50"), 2), _fmt(r.get("vs_stock_p50"), 2)])
    return out + [markdown_table(head, rows), ""]


def _by_turn_rows(results: dict, max_rows: int = 25) -> str:
    pols = results["policies"]
    turns = sorted({row["turn"] for p in pols.values() for row in p.get("by_turn", [])})
    if not turns:
        return ""
    step = max(1, math.ceil(len(turns) / max_rows))
    pick = sorted(set(turns[::step]) | {turns[-1]})
    index = {n: {row["turn"]: row for row in p.get("by_turn", [])} for n, p in pols.items()}
    head = ["turn"]
    for n in pols:
        head += [f"{n} latency ms", f"{n} TTFT ms", f"{n} KV tokens"]
    rows = []
    for t in pick:
        row = [str(t)]
        for n in pols:
            r = index[n].get(t)
            row += [_fmt(r["latency_mean_ms"], 0) if r else "–",
                    _fmt(r.get("ttft_mean_ms"), 0) if r else "–",
                    _fmt(r["kv_tokens_mean"], 0) if r else "–"]
        rows.append(row)
    return markdown_table(head, rows)


def _rolling_median(ys: list[float], width: int) -> list[float]:
    import numpy as np

    half = width // 2
    return [float(np.median(ys[max(0, i - half): i + half + 1])) for i in range(len(ys))]


def split_at_failure(rows: list[dict], failure: dict | None) -> tuple[list[dict], list[dict]]:
    """Per-turn rows before a policy's first failed turn, and from it on.

    After the first failure fewer sessions share the engine and the survivors'
    answers are cut short by the context limit, so those latencies are not
    comparable with the curve's: the plot draws them apart (faint crosses).
    """
    if not failure:
        return rows, []
    before = [r for r in rows if r["turn"] < failure["turn"]]
    after = [r for r in rows if r["turn"] >= failure["turn"]]
    return (before, after) if before else (after, [])


def plot_latency_vs_turn(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    budget = None
    for name, pol in results["policies"].items():
        rows = [r for r in pol.get("by_turn", []) if r["latency_mean_ms"] is not None]
        if not rows:
            continue
        f = pol.get("failure")
        rows, after = split_at_failure(rows, f)
        xs = [r["turn"] for r in rows]
        ys = [r["latency_mean_ms"] for r in rows]
        line = _curve(ax1, xs, ys, name)
        ax2.plot(xs, [r["kv_tokens_mean"] for r in rows], label=name, color=line.get_color())
        if after:
            ax1.plot([r["turn"] for r in after], [r["latency_mean_ms"] for r in after], "x",
                     color=line.get_color(), alpha=0.4,
                     label=f"{name} after its first failure (fewer sessions)")
        if f:
            ax1.axvline(f["turn"], color=line.get_color(), linestyle=":", alpha=0.7)
            ax1.annotate(f"{name} fails", (f["turn"], ax1.get_ylim()[1]), fontsize=8,
                         color=line.get_color(), ha="right", va="top", rotation=90)
        budget = budget or pol.get("budget")
    if budget:
        ax2.axhline(budget, color="gray", linestyle="--", linewidth=1, label=f"budget {budget}")
    sessions = max(results["settings"]["sessions"])
    ax1.set_ylabel("turn latency, ms (mean over sessions)")
    ax1.set_title(f"Turn latency against turn number ({sessions} concurrent "
                  f"session{'s' if sessions > 1 else ''}, "
                  f"{results['settings']['max_tokens']}-token answers)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.set_ylabel("KV tokens held per session")
    ax2.set_xlabel("turn")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _curve(ax, xs, ys, label):
    """A per-turn curve: raw with markers when short; long runs a rolling median over the faint raw."""
    if len(xs) < 60:
        line, = ax.plot(xs, ys, label=label, marker=".")
    else:
        line, = ax.plot(xs, _rolling_median(ys, max(5, len(xs) // 50)),
                        label=f"{label} (rolling median)")
        ax.plot(xs, ys, color=line.get_color(), alpha=0.25, linewidth=0.7)
    return line


def plot_ttft_vs_turn(results: dict, path: Path) -> Path:
    """TTFT (top) and TPOT (bottom) against the turn number, per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for name, pol in results["policies"].items():
        rows, _ = split_at_failure([r for r in pol.get("by_turn", [])
                                    if r.get("ttft_mean_ms") is not None], pol.get("failure"))
        if not rows:
            continue
        xs = [r["turn"] for r in rows]
        line = _curve(ax1, xs, [r["ttft_mean_ms"] for r in rows], name)
        tp = [(r["turn"], r["tpot_mean_ms"]) for r in rows if r.get("tpot_mean_ms") is not None]
        if tp:
            ax2.plot(*zip(*tp), label=name, color=line.get_color(),
                     marker="." if len(tp) < 60 else None)
    st = results["settings"]
    how = "streamed, client-side" if st.get("stream") else "not streamed: server-metrics estimate"
    n = max(st["sessions"])
    ax1.set_title(f"Time to first token against turn number ({how}; "
                  f"{n} concurrent session{'s' if n > 1 else ''})")
    ax1.set_ylabel("TTFT, ms (mean over sessions)")
    ax2.set_ylabel("TPOT, ms (mean over sessions)")
    ax2.set_xlabel("turn")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ttft_by_mode(streamed: dict, unstreamed: dict, path: Path) -> Path:
    """Issue 11's figure against the turn number: each policy's streamed TTFT
    and, dashed, its not-streamed first token (the turn latency), p50 over sessions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {}
    for results, key, style, what in ((streamed, "ttft_p50_ms", "-", "streamed TTFT"),
                                      (unstreamed, "latency_p50_ms", "--",
                                       "not streamed: first token = latency")):
        for name, pol in results["policies"].items():
            rows, _ = split_at_failure([r for r in pol.get("by_turn", []) if r.get(key) is not None],
                                       pol.get("failure"))
            if not rows:
                continue
            line, = ax.plot([r["turn"] for r in rows], [r[key] for r in rows], style,
                            marker="." if len(rows) < 60 else None, color=colors.get(name),
                            label=f"{name}, {what}")
            colors[name] = line.get_color()
    st = streamed["settings"]
    ax.set_title(f"Time to first token per turn ({max(st['sessions'])} sessions, "
                 f"{st['max_tokens']}-token answers; p50 over sessions)")
    ax.set_xlabel("turn")
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_throughput_vs_sessions(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, pol in results["policies"].items():
        xs = [s["sessions"] for s in pol["sweep"]]
        ax1.plot(xs, [s["turns_per_s"] for s in pol["sweep"]], marker="o", label=name)
        ax2.plot(xs, [s["output_tokens_per_s"] for s in pol["sweep"]], marker="o", label=name)
    ticks = sorted({s["sessions"] for pol in results["policies"].values() for s in pol["sweep"]})
    for ax, label in ((ax1, "turns/s"), (ax2, "output tokens/s")):
        ax.set_xticks(ticks)
        ax.set_xlabel("concurrent sessions")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Throughput against sessions ({results['settings']['turns']} turns each)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(results: dict, out_dir: Path, other: dict | None = None) -> list[Path]:
    """results.json, results.md and the plots into `out_dir`; returns the paths.
    `other`: the run of the other streaming mode (`--compare-with`), for the TTFT-by-mode plot."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [plot_latency_vs_turn(results, out_dir / LATENCY_PLOT),
             plot_ttft_vs_turn(results, out_dir / TTFT_PLOT)]
    if len(results["settings"]["sessions"]) > 1:
        plots.append(plot_throughput_vs_sessions(results, out_dir / THROUGHPUT_PLOT))
    if other is not None and results.get("ttft_by_mode"):
        pair = (results, other) if results["settings"].get("stream") else (other, results)
        plots.append(plot_ttft_by_mode(*pair, out_dir / TTFT_MODES_PLOT))
    if results.get("pressure"):
        from .pressure import PRESSURE_PLOT, plot_pressure

        plots.append(plot_pressure(results, out_dir / PRESSURE_PLOT))
    results["plots"] = [p.name for p in plots]
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    md_path = out_dir / "results.md"
    text = markdown(results)
    if results.get("pressure"):
        from .pressure import pressure_markdown

        text += "\n" + pressure_markdown(results)
    md_path.write_text(text)
    return [json_path, md_path, *plots]


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
