"""`sir-vllm bench-api-memory`: the API server process's memory under many session turns.

Session state lives in the API process (`sir_vllm.sessions`), bounded by the
policy's budget (per session) and by `--kv-max-sessions` / `--kv-session-ttl`
(how many sessions). This benchmark shows that bound on the process itself:
it starts one `vllm serve --kv-policy sirllm` on a tiny model with a small
budget, drives it as fast as it goes with one-token answers, and reads the
API process's resident memory (`VmRSS` of `/proc/PID/status`, PID the `vllm
serve` process it started, not EngineCore or a worker) every N turns through

* part (a): one session of T turns (its budget is full after a few turns);
* part (b): S one-turn sessions, a few at once (the store's cap is reached
  after `--max-sessions` of them; each later one drops the least recently used).

Once the caps are reached the curve must be flat: the verdict compares the
RSS at 25/50/75/100% of each part and the ratio last/halfway.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import random
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PLOT = "api_memory.png"
RESULTS = "api_memory.json"
STORES = ("memory", "sqlite")  # sqlite: a file of this run's own in --out, never the shared default
ONE_SESSION, MANY_SESSIONS = "one_session", "many_sessions"
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
# sir_vllm/sessions/store.py logs one line per state dropped over --kv-max-sessions
_CAP_DROP = re.compile(r"sir-vllm: session '([^']*)' dropped from the \w+ store \(least recently used")


@dataclass
class MemoryConfig:
    out: Path
    model: Path | None = None  # None: a tiny random model (made once, in the cache folder)
    turns: int = 10_000  # part (a): one session of this many turns (0: skip)
    sessions: int = 20_000  # part (b): this many one-turn sessions (0: skip)
    concurrency: int = 4  # part (b): requests in flight
    sample_every: int | None = None  # turns between RSS samples (None: a 50th of each part)
    start_size: int = 4
    entropy_size: int = 60
    max_sessions: int = 1000
    session_ttl: float = 0.0  # 0: never expire (the cap alone bounds the store)
    store: str = "memory"  # --kv-session-store: memory (in the API process) or sqlite (a file)
    prompt_tokens: int = 8  # each turn's new tokens
    seed: int = 0
    server_args: list[str] = field(default_factory=list)
    server_timeout: float = 900.0
    flat_ratio: float = 1.10  # last/halfway above this: not flat
    progress: bool = True

    def validate(self) -> None:
        if self.turns < 0 or self.sessions < 0 or self.turns + self.sessions == 0:
            raise ValueError("--turns and --sessions: at least one part must have turns (both >= 0)")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.sample_every is not None and self.sample_every < 1:
            raise ValueError(f"--sample-every must be >= 1, got {self.sample_every}")
        if self.store not in STORES:
            raise ValueError(f"--store: one of {', '.join(STORES)}, got {self.store!r}")
        if self.max_sessions < 1:
            raise ValueError(f"--max-sessions must be >= 1, got {self.max_sessions}")
        if self.prompt_tokens < 1 or self.prompt_tokens + 1 >= self.entropy_size:
            raise ValueError(f"--prompt-tokens {self.prompt_tokens} + a one-token answer must fit "
                             f"the budget beside the sinks ({self.entropy_size})")

    def every(self, total: int) -> int:
        return self.sample_every or max(1, total // 50)

    def command_line(self) -> str:
        cmd = ["sir-vllm", "bench-api-memory"]
        if self.model:
            cmd += ["--model", str(self.model)]
        cmd += ["--turns", str(self.turns), "--sessions", str(self.sessions),
                "--concurrency", str(self.concurrency)]
        if self.sample_every:
            cmd += ["--sample-every", str(self.sample_every)]
        cmd += ["--start-size", str(self.start_size), "--entropy-size", str(self.entropy_size),
                "--max-sessions", str(self.max_sessions), "--store", self.store]
        for flag, value, default in (("--prompt-tokens", self.prompt_tokens, 8),
                                     ("--seed", self.seed, 0), ("--flat-ratio", self.flat_ratio, 1.10)):
            if value != default:
                cmd += [flag, str(value)]
        if self.server_args:
            cmd += ["--server-args", shlex.join(self.server_args)]
        return shlex.join(cmd + ["--out", str(self.out)])


def store_spec(cfg: MemoryConfig) -> str:
    """The `--kv-session-store` value. A sqlite store gets a file of its own in
    --out: the default file is shared by every server of the host, whose
    sessions would count against this run's cap."""
    return "memory" if cfg.store == "memory" else f"sqlite:{Path(cfg.out).resolve() / 'sessions.sqlite3'}"


def server_args(cfg: MemoryConfig) -> list[str]:
    """The `vllm serve` arguments (model and port aside): float32 on the CPU, a
    small KV pool (the tiny model needs little), the budget, the store and its caps."""
    return ["--dtype", "float32", "--kv-cache-memory-bytes", "512M",
            "--enforce-eager",  # the engine's compile costs minutes of start, nothing in the API process
            "--disable-uvicorn-access-log",  # 30,000 request lines would only cost CPU
            "--kv-policy", "sirllm", "--kv-start-size", str(cfg.start_size),
            "--kv-entropy-size", str(cfg.entropy_size), "--kv-recent-size", "0",
            "--kv-session-store", store_spec(cfg),
            "--kv-max-sessions", str(cfg.max_sessions), "--kv-session-ttl", str(cfg.session_ttl),
            *cfg.server_args]


def rss_kib(pid: int) -> int:
    """The process's resident set (`VmRSS`, KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def process_name(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()


def at_fraction(samples: list[tuple[int, int]], total: int, fraction: float) -> tuple[int, int]:
    """The first (turn, RSS) sample at or after `fraction` of `total` turns (else the last)."""
    goal = fraction * total
    return next((s for s in samples if s[0] >= goal), samples[-1])


def verdict(samples: list[tuple[int, int]], total: int, flat_ratio: float) -> dict:
    """RSS at 25/50/75/100% of a part, the ratio last/halfway and the growth
    over the second half; flat when that ratio is at most `flat_ratio`."""
    points = [at_fraction(samples, total, f) for f in FRACTIONS]
    half, last = points[1], points[-1]
    ratio = last[1] / half[1] if half[1] else None
    span = last[0] - half[0]
    return {
        "rss_mib_at": {f"{int(f * 100)}%": round(p[1] / 1024, 1) for f, p in zip(FRACTIONS, points)},
        "turns_at": {f"{int(f * 100)}%": p[0] for f, p in zip(FRACTIONS, points)},
        "last_over_halfway": ratio,
        "growth_kib_per_1000_turns": (last[1] - half[1]) * 1000 / span if span > 0 else None,
        "flat": ratio is not None and ratio <= flat_ratio,
        "flat_ratio": flat_ratio,
    }


def verdict_line(label: str, v: dict) -> str:
    at = "/".join(f"{x:,.1f}" for x in v["rss_mib_at"].values())
    head = "flat once the caps are reached" if v["flat"] else "NOT flat once the caps are reached"
    growth = v["growth_kib_per_1000_turns"]
    return (f"{label}: {head}: RSS at 25%/50%/75%/100% of the run {at} MiB; last/halfway "
            f"{v['last_over_halfway']:.3f} (flat: <= {v['flat_ratio']:.2f})"
            + (f"; {growth:+,.0f} KiB per 1,000 turns over the second half" if growth is not None else ""))


def count_cap_drops(log_text: str) -> int:
    return len(_CAP_DROP.findall(log_text))


class _Driver:
    """Session turns as fast as the server takes them (httpx: the client must not be the bottleneck)."""

    def __init__(self, url: str, model: str, cfg: MemoryConfig):
        import httpx

        self.cfg, self.model = cfg, model
        self.rng = random.Random(cfg.seed)
        limits = httpx.Limits(max_connections=cfg.concurrency + 2)
        self.http = httpx.AsyncClient(base_url=url, timeout=300, limits=limits)

    def _prompt(self) -> list[int]:
        return [self.rng.randrange(1000, 20000) for _ in range(self.cfg.prompt_tokens)]

    async def turn(self, session_id: str) -> None:
        body = {"model": self.model, "prompt": self._prompt(), "max_tokens": 1, "temperature": 0,
                "ignore_eos": True, "session_id": session_id}
        r = await self.http.post("/v1/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"session {session_id!r}: HTTP {r.status_code}: {r.text[:500]}")

    async def session_status(self, session_id: str) -> int:
        return (await self.http.get(f"/v1/sessions/{session_id}")).status_code

    async def close(self) -> None:
        await self.http.aclose()


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="turn", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


async def one_session(driver: _Driver, pid: int, cfg: MemoryConfig) -> list[tuple[int, int]]:
    """Part (a): one session, `cfg.turns` turns one after another (a session takes one at a time)."""
    every = cfg.every(cfg.turns)
    samples = [(0, rss_kib(pid))]
    with _bar(cfg.turns, "one session", cfg.progress) as bar:
        for t in range(1, cfg.turns + 1):
            await driver.turn("api-memory-one")
            bar.update(1)
            if t % every == 0 or t == cfg.turns:
                samples.append((t, rss_kib(pid)))
    return samples


async def many_sessions(driver: _Driver, pid: int, cfg: MemoryConfig) -> list[tuple[int, int]]:
    """Part (b): `cfg.sessions` new sessions of one turn each, `cfg.concurrency` at once."""
    every = cfg.every(cfg.sessions)
    samples = [(0, rss_kib(pid))]
    ids = iter(range(cfg.sessions))
    done = 0
    with _bar(cfg.sessions, "one-turn sessions", cfg.progress) as bar:
        async def worker() -> None:
            nonlocal done
            for i in ids:
                await driver.turn(f"api-memory-many-{i}")
                done += 1
                bar.update(1)
                if done % every == 0 or done == cfg.sessions:
                    samples.append((done, rss_kib(pid)))

        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
    return sorted(samples)


def tiny_model() -> Path:
    """A tiny random Llama the CPU kernels serve, made once under the cache
    folder (head_dim 64, as SmolLM2's: the 16 of `sir-vllm model tiny` is not
    a CPU attention configuration, its first forward fails)."""
    from sir_vllm.models.bundled import cache_root
    from sir_vllm.models.tiny import make_tiny

    path = cache_root() / "models" / "tiny-llama-head64"
    if not (path / "model.safetensors").exists():
        make_tiny(path, hidden=128, heads=2, kv_heads=1)
    return path


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [(k, results["parts"][k]) for k in (ONE_SESSION, MANY_SESSIONS) if k in results["parts"]]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4), squeeze=False)
    for ax, (key, part) in zip(axes[0], parts):
        xs = [s[0] for s in part["samples"]]
        ax.plot(xs, [s[1] / 1024 for s in part["samples"]], marker=".")
        ax.set_title(part["label"], fontsize=10)
        ax.set_xlabel("turns" if key == ONE_SESSION else "sessions (one turn each)")
        ax.set_ylabel("API process RSS, MiB")
        if key == MANY_SESSIONS:
            ax.axvline(results["settings"]["max_sessions"], color="gray", linestyle="--",
                       label=f"--kv-max-sessions {results['settings']['max_sessions']}")
            ax.legend()
        lo = min(s[1] for s in part["samples"]) / 1024
        ax.set_ylim(lo * 0.95, max(s[1] for s in part["samples"]) / 1024 * 1.05)
        ax.grid(alpha=0.3)
    fig.suptitle("vllm serve --kv-policy sirllm: API server process memory "
                 f"({results['settings']['store']} session store)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _run_parts(url: str, name: str, pid: int, cfg: MemoryConfig) -> dict:
    async def go() -> dict:
        driver = _Driver(url, name, cfg)
        parts = {}
        try:
            await driver.turn("api-memory-warmup")  # the first request builds the session layer
            if cfg.turns:
                t = time.monotonic()
                samples = await one_session(driver, pid, cfg)
                parts[ONE_SESSION] = {"label": f"(a) one session of {cfg.turns:,} turns",
                                      "turns": cfg.turns, "samples": samples,
                                      "seconds": time.monotonic() - t}
            if cfg.sessions:
                t = time.monotonic()
                samples = await many_sessions(driver, pid, cfg)
                first = await driver.session_status("api-memory-many-0")
                last = await driver.session_status(f"api-memory-many-{cfg.sessions - 1}")
                parts[MANY_SESSIONS] = {
                    "label": f"(b) {cfg.sessions:,} one-turn sessions, {cfg.concurrency} at once",
                    "turns": cfg.sessions, "samples": samples, "seconds": time.monotonic() - t,
                    "first_session_status": first, "last_session_status": last}
        finally:
            await driver.close()
        return parts

    parts = asyncio.run(go())
    for part in parts.values():
        part["turns_per_s"] = part["turns"] / part["seconds"] if part["seconds"] > 0 else None
        part["verdict"] = verdict(part["samples"], part["turns"], cfg.flat_ratio)
    return parts


def run_api_memory(cfg: MemoryConfig, log=print) -> dict:
    from sir_vllm.server.process import ServerProcess

    from .runner import machine_info

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(cfg.model) if cfg.model else tiny_model()
    for leftover in out.glob("sessions.sqlite3*"):  # a run starts with an empty store
        leftover.unlink()  # (one a killed run left behind)
    args = server_args(cfg)
    proc = ServerProcess(model=str(model), extra_args=args, served_model_name="api-memory",
                         log_path=out / "server.log")
    log(f"starting vllm serve {model} {' '.join(args)} (log: {proc.log_path})")
    t = time.monotonic()
    proc.start(timeout=cfg.server_timeout)  # stops what it started if it fails
    with proc:
        pid = proc.proc.pid
        log(f"ready after {time.monotonic() - t:.0f} s; API server process {pid}: "
            f"{process_name(pid)[:120]}")
        started_kib = rss_kib(pid)
        parts = _run_parts(proc.url, "api-memory", pid, cfg)
        name = process_name(pid)
    for store_file in out.glob("sessions.sqlite3*"):  # test sessions, no result: not kept
        store_file.unlink()
    drops = count_cap_drops(proc.log_path.read_text(errors="replace"))
    # every session the run made, the warm-up's and part (a)'s included, beyond the cap
    made = 1 + (1 if cfg.turns else 0) + cfg.sessions
    results = {
        "benchmark": "sir-vllm bench-api-memory",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": cfg.command_line(),
        "machine": machine_info(),
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                     "model": str(model), "server_args": args},
        "api_process": {"pid": pid, "cmdline": name, "rss_mib_when_ready": round(started_kib / 1024, 1)},
        "cap_drops_in_log": drops,
        "cap_drops_expected": max(0, made - cfg.max_sessions),
        "parts": parts,
    }
    (out / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    png = plot(results, out / PLOT)
    print_results(results, log)
    log(f"wrote {out / RESULTS}, {png}, {proc.log_path}")
    return results


def print_results(results: dict, log=print) -> None:
    for part in results["parts"].values():
        log("")
        log(f"{part['label']}: {part['turns']:,} turns in {part['seconds']:.0f} s "
            f"({part['turns_per_s']:.1f} turns/s); RSS of the API process every "
            f"{part['samples'][1][0] if len(part['samples']) > 1 else 0:,} turns:")
        log("  turn      RSS MiB")
        for turn, kib in part["samples"]:
            log(f"  {turn:>8,}  {kib / 1024:9.1f}")
    if MANY_SESSIONS in results["parts"]:
        p = results["parts"][MANY_SESSIONS]
        log(f"store cap: {results['cap_drops_in_log']:,} sessions dropped over --kv-max-sessions "
            f"{results['settings']['max_sessions']:,} (server log; expected "
            f"{results['cap_drops_expected']:,}); the first one-turn session now answers HTTP "
            f"{p['first_session_status']}, the last HTTP {p['last_session_status']}")
    log("")
    for part in results["parts"].values():
        log(verdict_line(part["label"], part["verdict"]))
