"""Stop a server's process group once the process that started it has died.

`die_with_parent` (PR_SET_PDEATHSIG) sends one SIGTERM when the starter dies,
but a `vllm serve` still starting its engine can lose that one signal: a
pytest killed during a slow start-up left servers holding the cores. This
guard, a small process of its own started beside the server, watches its
parent (the starter); when the starter is gone it sends SIGTERM to the
server's group every second for a grace period, then SIGKILL. It exits by
itself once the group is gone (the normal `stop`).

    python -m sir_vllm.server.orphan_guard STARTER_PID PGID [GRACE_SECONDS]

The starter's pid is an argument, not the guard's `getppid()` at start: a
starter killed while the guard is still importing would be missed.
"""

from __future__ import annotations

import os
import signal
import sys
import time

POLL_SECONDS = 0.5
DEFAULT_GRACE_SECONDS = 30.0


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or its pids now someone else's
        return False
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(pgid: int, grace: float) -> None:
    """SIGTERM the group every second until it is gone or `grace` is over, then SIGKILL."""
    deadline = time.monotonic() + grace
    while group_alive(pgid) and time.monotonic() < deadline:
        _signal_group(pgid, signal.SIGTERM)
        time.sleep(1.0)
    if group_alive(pgid):
        _signal_group(pgid, signal.SIGKILL)


def guard(starter: int, pgid: int, grace: float) -> None:
    while group_alive(pgid):
        if os.getppid() != starter:  # re-parented: the starter died
            stop_group(pgid, grace)
            return
        time.sleep(POLL_SECONDS)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    guard(int(argv[0]), int(argv[1]), float(argv[2]) if len(argv) == 3 else DEFAULT_GRACE_SECONDS)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
