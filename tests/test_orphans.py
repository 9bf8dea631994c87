"""A `kill -9` of `vllm serve` leaves none of its processes behind (project issue 15).

The unit tests stand a small script in for the API server: it starts a
multiprocessing child under a vLLM process name, as vLLM starts EngineCore
and its workers, and is then killed with SIGKILL. The last test does the same
to a real `vllm serve` on the tiny model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sir_vllm.plugin import PROBE_ENV
from sir_vllm.server import parent_watch
from sir_vllm.server.process import ServerProcess

# The stand-in API server: starts one child, prints its pid once the child is
# set up, then waits to be killed.
MIDDLE = '''
import multiprocessing as mp, os, signal, sys, time
from sir_vllm.server import parent_watch

def child(conn, call_start, ignore_term, start_after_orphaned, grace):
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if start_after_orphaned:  # the plugin loads only after the parent died
        conn.send("ready")
        while os.getppid() == mp.parent_process().pid:
            time.sleep(0.05)
    if call_start:
        parent_watch.start(poll=0.1, grace=grace)
    if not start_after_orphaned:
        conn.send("ready")
    time.sleep(600)

if __name__ == "__main__":
    method, name, call_start, ignore_term, start_after_orphaned, grace = sys.argv[1:]
    flags = [v == "1" for v in (call_start, ignore_term, start_after_orphaned)]
    # The top-level process (the API server's place) is never watched; this
    # also arms the fork hook, with the short poll and grace.
    top_level_watched = parent_watch.start(poll=0.1, grace=float(grace))
    ctx = mp.get_context(method)
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=child, name=name, args=(send, *flags, float(grace)))
    p.start()
    assert recv.recv() == "ready"
    print(p.pid, int(top_level_watched), flush=True)
    time.sleep(600)
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:  # a zombie is dead for our purpose
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def _survivors(pids, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def orphan(tmp_path):
    """`orphan(**how)`: start the stand-in and its child, SIGKILL the stand-in.

    Returns the child's pid and the file its stderr goes to; a child still
    alive at the end of the test is killed.
    """
    script = tmp_path / "middle.py"
    script.write_text(MIDDLE)
    children = []

    def make(*, method="spawn", name="EngineCore", call_start=True, ignore_term=False,
             start_after_orphaned=False, grace=2.0) -> tuple[int, Path]:
        err = tmp_path / f"child-{len(children)}.err"
        flags = [str(int(f)) for f in (call_start, ignore_term, start_after_orphaned)]
        with open(err, "w") as stderr:
            middle = subprocess.Popen([sys.executable, str(script), method, name, *flags, str(grace)],
                                      stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            line = middle.stdout.readline().split()
            assert line, err.read_text()
            child, top_level_watched = int(line[0]), line[1] == "1"
            children.append(child)
        finally:
            middle.kill()
            middle.wait()
        assert not top_level_watched
        return child, err

    yield make
    for child in children:
        _kill(child)


def test_an_engine_process_ends_when_its_parent_is_killed(orphan):
    child, err = orphan()
    assert _survivors([child], 5) == []
    assert f"EngineCore (pid {child}): parent process" in err.read_text()


def test_a_forked_worker_is_watched_without_loading_the_plugin_again(orphan):
    # With the fork start method vLLM does not call plugins in the child.
    child, err = orphan(method="fork", name="VllmWorker-0", call_start=False)
    assert _survivors([child], 5) == []
    assert f"VllmWorker-0 (pid {child}): parent process" in err.read_text()


def test_an_engine_that_ignores_sigterm_is_killed_after_the_grace(orphan):
    child, err = orphan(ignore_term=True, grace=1.0)
    time.sleep(0.6)
    assert _alive(child)  # SIGTERM alone did not end it
    assert _survivors([child], 5) == []
    assert "SIGKILL" in err.read_text().splitlines()[-1]


def test_a_parent_that_died_before_the_plugin_loaded_is_noticed(orphan):
    child, err = orphan(start_after_orphaned=True)
    assert _survivors([child], 5) == []
    assert "is gone" in err.read_text()


def test_children_vllm_did_not_name_are_left_alone(orphan):
    child, _ = orphan(name="SomeoneElsesHelper")
    time.sleep(1.5)  # 15 polls
    assert _alive(child)


def test_the_test_process_itself_is_not_watched():
    assert not parent_watch.should_watch()


def _group_members(pgid: int) -> set[int]:
    members = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[-1].split()[3]) == pgid:
                        members.add(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
    return members


def _describe(pids) -> str:
    lines = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            lines.append(f"{pid}: {cmd}")
        except FileNotFoundError:
            lines.append(f"{pid}: (gone)")
    return "\n".join(lines)


def test_kill_9_of_vllm_serve_leaves_no_process_of_it(tiny_serving_model, tmp_path):
    probe = tmp_path / "plugin-loads.tsv"
    server = ServerProcess(
        model=str(tiny_serving_model), log_path=tmp_path / "vllm-serve.log",
        env={PROBE_ENV: str(probe)},
        extra_args=["--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", "256M",
                    "--max-model-len", "1024"])  # eager: the test reads processes, not speed
    server.start(timeout=float(os.environ.get("SIR_VLLM_SERVER_TIMEOUT", "900")))
    api = server.proc.pid
    try:
        loads = dict(line.split("\t")[::-1] for line in probe.read_text().splitlines())
        assert "EngineCore" in loads and any(n.startswith("VllmWorker") for n in loads), loads
        pids = _group_members(api) | {int(p) for p in loads.values() if _alive(int(p))}
        assert len(pids) >= 3, _describe(pids)  # API server, EngineCore, a worker

        os.kill(api, signal.SIGKILL)  # only the API server; nothing of its cleanup runs
        server.proc.wait()
        started = time.monotonic()
        left = _survivors(pids, 30)
        assert left == [], f"alive 30 s after kill -9 of the API server:\n{_describe(left)}"
        print(f"all {len(pids)} processes gone {time.monotonic() - started:.1f} s after the kill")
        assert "EngineCore (pid" in server.log_tail(200) and "is gone" in server.log_tail(200)
    finally:
        for pid in _group_members(api):
            _kill(pid)
        server.stop()
