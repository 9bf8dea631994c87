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
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)
