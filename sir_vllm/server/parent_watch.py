"""vLLM's engine-side processes end when the process that started them dies.

A `kill -9` of `vllm serve` leaves its EngineCore (re-parented to init) and
that EngineCore's workers running, holding gigabytes and a share of the cores,
until someone kills them by hand; stock vLLM never notices. The plugin runs
in every vLLM process, so `start()` gives each engine-side one (EngineCore,
its workers, the DP coordinator, the extra API servers of
`--api-server-count`) a daemon thread that polls `os.getppid()`. Once the
parent is gone it logs why, SIGTERMs its own process (so vLLM's shutdown runs
and frees its shared memory), and SIGKILLs it after a grace period. Workers
watch EngineCore, so a whole tree goes level by level.

The top-level process (the API server, a user's script) is never watched: its
parent is a shell or a supervisor. Polling rather than PR_SET_PDEATHSIG: that
signal follows the parent *thread* that forked, not the process, and a spawned
child can only ask for it after the exec, when the parent may already be gone.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
import time

logger = logging.getLogger("vllm.sir_vllm.server")

# multiprocessing names vLLM 0.32 gives its child processes (`Process(name=...)`).
WATCHED_NAME_PREFIXES = ("EngineCore", "VllmWorker", "VLLM_DP_Coordinator", "ApiServer_", "APIServer_")
POLL_SECONDS = 1.0
GRACE_MARGIN_SECONDS = 6.0

_watching_pid: int | None = None  # a fork child inherits this value but not the thread


def should_watch() -> bool:
    """True in a multiprocessing child that vLLM started under one of its own names."""
    if multiprocessing.parent_process() is None:
        return False
    return multiprocessing.current_process().name.startswith(WATCHED_NAME_PREFIXES)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    return True


def expected_parent() -> int | None:
    """The pid `os.getppid()` must keep returning; None when the parent is already gone.

    The plugin loads seconds after the process starts, so the parent may have
    died before: the multiprocessing parent's pid (known from the start) then
    differs from `getppid()`. Where they differ while that parent lives (a
    forkserver start), the OS parent is what is watched.
    """
    parent = multiprocessing.parent_process()
    ppid = os.getppid()
    if parent is None or parent.pid == ppid:
        return ppid
    return ppid if _pid_alive(parent.pid) else None


def default_grace() -> float:
    """Longer than vLLM's own shutdown of its workers, so a SIGKILL cuts only a hang.

    EngineCore waits VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS for its workers,
    then 4 s after SIGTERMing them; on 2 cores the whole clean path took 12 s.
    """
    try:
        workers = float(os.environ.get("VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", "5"))
    except ValueError:
        workers = 5.0
    return workers + 4.0 + GRACE_MARGIN_SECONDS


def stop_self(reason: str, grace: float) -> None:
    """SIGTERM this process (vLLM's own shutdown), then SIGKILL it if still alive after `grace`."""
    me = os.getpid()
    name = multiprocessing.current_process().name
    logger.warning("sir-vllm: %s (pid %d): %s; shutting down (SIGTERM, SIGKILL after %.0fs)",
                   name, me, reason, grace)
    os.kill(me, signal.SIGTERM)
    time.sleep(grace)
    logger.warning("sir-vllm: %s (pid %d) still alive %.0fs after SIGTERM; SIGKILL", name, me, grace)
    os.kill(me, signal.SIGKILL)


def watch(parent: int | None, poll: float, grace: float) -> None:
    while parent is not None and os.getppid() == parent:
        time.sleep(poll)
    stop_self(f"parent process {parent} is gone" if parent else "parent process is gone", grace)


def start(poll: float = POLL_SECONDS, grace: float | None = None) -> bool:
    """Watch this process's parent if this is an engine-side vLLM process.

    Cheap and idempotent: one watch per process; returns whether this call
    started it. `grace` defaults to `default_grace()`. Also arms the children
    this process forks through multiprocessing, in which vLLM calls no plugin
    again (its "loaded" flag is inherited).
    """
    global _watching_pid
    _install_fork_hook(poll, grace)
    if _watching_pid == os.getpid() or not should_watch():
        return False
    _watching_pid = os.getpid()
    grace = default_grace() if grace is None else grace
    threading.Thread(target=watch, args=(expected_parent(), poll, grace),
                     name="sir-vllm-parent-watch", daemon=True).start()
    return True


class _ForkHook:
    """A weak-referenceable owner for `multiprocessing.util.register_after_fork`."""

    def __init__(self, poll: float, grace: float | None):
        self.poll, self.grace = poll, grace

    def run(self) -> None:
        start(self.poll, self.grace)


_fork_hook: _ForkHook | None = None


def _install_fork_hook(poll: float, grace: float | None) -> None:
    global _fork_hook
    if _fork_hook is not None:
        return
    _fork_hook = _ForkHook(poll, grace)
    # Runs in each fork-started child once its name and parent are set.
    multiprocessing.util.register_after_fork(_fork_hook, _ForkHook.run)
