"""Start and stop a real `vllm serve` process (tests, benchmarks, eval).

The benchmark and the test suite both need servers they own: this keeps the
command line, the readiness wait and the clean shutdown in one place.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .orphan_guard import DEFAULT_GRACE_SECONDS

# CPU defaults that fit this project's 2-core / 24 GiB machines: float32 (the
# CPU kernels' reference precision) and a fixed KV pool, which also skips the
# CPU worker's "fraction of node memory" check.
CPU_DEFAULT_ARGS = ["--dtype", "float32", "--kv-cache-memory-bytes", "2G"]


def die_with_parent() -> None:
    """`preexec_fn`: the child gets SIGTERM when the process that started it dies.

    Servers run in their own process group (so `stop` can signal the whole
    tree), which also shields them from a Ctrl-C or a CI timeout that kills
    the test run: without this, a killed pytest leaves engines holding the
    cores. Linux only (prctl PR_SET_PDEATHSIG); a no-op elsewhere.
    """
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def popen_guarded(command: list[str], grace: float = DEFAULT_GRACE_SECONDS, **kwargs) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Start `command` in its own process group, with an orphan guard beside it.

    Returns (process, guard). The guard (`orphan_guard`) stops the group if
    this process dies without stopping it, even where the PDEATHSIG signal
    was lost during a slow start-up.
    """
    proc = subprocess.Popen(command, preexec_fn=die_with_parent, **kwargs)
    guard = subprocess.Popen(
        [sys.executable, "-m", "sir_vllm.server.orphan_guard",
         str(os.getpid()), str(proc.pid), str(grace)],
        start_new_session=True,  # a Ctrl-C to our group must not take it down too
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )
    return proc, guard


def stop_guarded(proc: subprocess.Popen | None, guard: subprocess.Popen | None,
                 timeout: float = 30.0) -> None:
    """Stop what `popen_guarded` started: SIGTERM the process's group, SIGKILL
    after `timeout`, then its guard (nothing is left to guard)."""
    if proc is not None and proc.poll() is None:
        pgid = os.getpgid(proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            proc.wait()
    if guard is not None and guard.poll() is None:
        guard.kill()
        guard.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    """The `vllm` console script beside the running interpreter."""
    candidate = Path(sys.executable).parent / "vllm"
    return str(candidate) if candidate.exists() else "vllm"


@dataclass
class ServerProcess:
    """One `vllm serve` child process, logging to `log_path`."""

    model: str
    extra_args: list[str] = field(default_factory=list)
    served_model_name: str = "model"
    host: str = "127.0.0.1"
    port: int = 0
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    guard: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            vllm_executable(), "serve", self.model,
            "--host", self.host, "--port", str(self.port),
            "--served-model-name", self.served_model_name,
            *self.extra_args,
        ]

    def start(self, timeout: float = 600.0) -> "ServerProcess":
        if not self.port:
            self.port = free_port()
        if self.log_path is None:
            self.log_path = Path(f"/tmp/sir-vllm-server-{self.port}.log")
        log = open(self.log_path, "w")
        self.proc, self.guard = popen_guarded(
            self.command(), stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        try:
            self.wait_ready(timeout)
        except BaseException:  # a failed start, or a Ctrl-C during its minutes, leaves nothing running
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with {self.proc.returncode}; last log lines:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the whole process group (API server, EngineCore, workers)."""
        stop_guarded(self.proc, self.guard, timeout)

    def __enter__(self) -> "ServerProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
