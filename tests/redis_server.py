"""A private `redis-server` for tests: a free port on 127.0.0.1, no persistence,
stopped by its owner. The binary is installed (apt-get) when it is missing,
so the Redis tests run rather than skip on a fresh machine."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from debian_package import installed_binary


def redis_server_binary() -> str:
    return installed_binary("redis-server", "redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _PortTaken(Exception):
    pass


class RedisServer:
    """`with RedisServer(folder) as url:` a running server for the block."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0, attempts: int = 3) -> str:
        """Start it and wait for PING; a port taken meanwhile is retried with another."""
        for attempt in range(attempts):
            try:
                return self._start(timeout)
            except _PortTaken:
                self.port = free_port()
        raise RuntimeError(f"redis-server could not bind a free port in {attempts} tries")

    def _start(self, timeout: float) -> str:
        import redis

        self.folder.mkdir(parents=True, exist_ok=True)
        log_path = self.folder / "redis-server.log"
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.folder),
                 "--daemonize", "no"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                text = log_path.read_text(errors="replace")
                self.proc = None
                if "Address already in use" in text:
                    raise _PortTaken()
                raise RuntimeError(f"redis-server exited: {text[-2000:]}")
            try:
                with redis.Redis(port=self.port, socket_timeout=1) as client:
                    client.ping()
                return self.url
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer in {timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
