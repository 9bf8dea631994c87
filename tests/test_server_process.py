"""Servers started by tests and benchmarks do not outlive the process that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead for our purpose
        return f.read().split(")")[-1].split()[0] != "Z"


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


def test_child_dies_when_its_starter_is_killed():
    starter = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, time\n"
         "from sir_vllm.server.process import die_with_parent\n"
         "p = subprocess.Popen(['sleep', '600'], preexec_fn=die_with_parent)\n"
         "print(p.pid, flush=True)\n"
         "time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True)
    child = int(starter.stdout.readline())
    assert _alive(child)
    assert os.getpgid(child) == child  # its own process group, as `stop` expects
    starter.send_signal(signal.SIGKILL)  # no cleanup code runs in the starter
    starter.wait()
    assert _gone_within(child, 10)


def _starter_of(child_code: str, grace: float) -> tuple[subprocess.Popen, int]:
    """A process that starts `child_code` through `popen_guarded`; returns it and the child's pid.

    The child prints "ready" once its signal set-up is done; the starter then
    reports the child's pid, so the caller kills the starter at a known point.
    """
    starter = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time\n"
         "from sir_vllm.server.process import popen_guarded\n"
         f"p, g = popen_guarded([sys.executable, '-c', {child_code!r}], grace={grace},"
         " stdout=subprocess.PIPE, text=True)\n"
         "assert p.stdout.readline().strip() == 'ready'\n"
         "print(p.pid, flush=True)\n"
         "time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True)
    return starter, int(starter.stdout.readline())


# A server still starting up: the one PDEATHSIG SIGTERM arrives while it is
# not yet handled, and is lost.
DEAF_FOR_5S = ("import signal, time\n"
               "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
               "print('ready', flush=True)\n"
               "time.sleep(5)\n"
               "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
               "time.sleep(600)\n")


def test_a_child_that_lost_the_parent_death_signal_is_still_stopped():
    starter, child = _starter_of(DEAF_FOR_5S, grace=30)
    starter.kill()
    starter.wait()
    time.sleep(1.0)
    assert _alive(child)  # the PDEATHSIG SIGTERM alone did not stop it
    assert _gone_within(child, 15)  # the guard's repeated SIGTERM did


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period():
    starter, child = _starter_of(
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n", grace=2)
    starter.kill()
    starter.wait()
    assert _gone_within(child, 10)


def test_the_guard_leaves_by_itself_once_the_group_is_stopped():
    from sir_vllm.server.process import popen_guarded

    proc, guard = popen_guarded(["sleep", "600"])
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait()
    assert guard.wait(timeout=10) == 0
