"""Clients that stay on one API process of an `--api-server-count N` server.

The processes share one listening socket, and the kernel hands each new
connection to either. A keep-alive connection stays on the process that
accepted it, but the server closes it after 5 s idle (uvicorn's keep-alive)
and the next one may land on the other process. A `ProcessClient` checks its
connection before each request (a GET of a missing session: no engine work)
and reconnects until it is back on its process.

A `bounded_reader` client fixes its socket's receive buffer (512 KiB: the
kernel doubles what it asks for), so that a stream it stops reading stalls
the server's sends once the server's send buffer (up to `tcp_wmem`'s maximum,
4 MiB here on loopback) and that receive buffer are full: `stall_bound()`
bytes. A stream several times that bound keeps its turn (and its session's
lease) open until the client reads on, however fast the engine generates; a
test that needs the stall checks the bytes it streamed against the bound.
The buffer is small enough to bound the stall and large enough to read a
stream at loopback speed (4 KiB took 441 s to read 17 MB; a plain client 17 s)."""

from __future__ import annotations

import socket
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import httpx

REPLICA = "x-sir-replica"  # which API process answered (server.middleware)
PROBE = "/v1/sessions/probe"
RECEIVE_BUFFER = 256 * 1024  # bytes asked for (the kernel doubles it)


def plain_client() -> httpx.Client:
    return httpx.Client(timeout=300)


def bounded_reader() -> httpx.Client:
    """A client whose streams, when it stops reading, stall the server's sends
    after `stall_bound()` bytes."""
    options = [(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)]
    return httpx.Client(timeout=300, transport=httpx.HTTPTransport(socket_options=options))


def _kernel_limit(name: str) -> int:
    return int(Path("/proc/sys/net", name).read_text().split()[-1])


def stall_bound() -> int:
    """The most bytes of a stream a server can send to a `bounded_reader` that
    reads nothing: its send buffer at `tcp_wmem`'s maximum, plus the reader's
    receive buffer (its request, capped by `rmem_max`, doubled)."""
    receive = 2 * min(RECEIVE_BUFFER, _kernel_limit("core/rmem_max"))
    return _kernel_limit("ipv4/tcp_wmem") + receive


def stalled(streamed: int) -> bool:
    """Whether a stream of `streamed` bytes to a `bounded_reader` is more than
    twice `stall_bound()`: so the server's sends waited for the reader."""
    return streamed > 2 * stall_bound()


def _process_of(client: httpx.Client, url: str) -> str:
    """Which API process `client`'s connection is on (a GET of no session)."""
    return client.get(url + PROBE).headers[REPLICA]


def _connect(url: str, wanted: set[str] | None, count: int, tries: int,
             make: Callable[[], httpx.Client] = plain_client) -> dict[str, httpx.Client]:
    """Keep-alive clients on `count` different processes (of `wanted`, when given)."""
    def probe(_):
        c = make()
        return c, _process_of(c, url)

    found: dict[str, httpx.Client] = {}
    with ThreadPoolExecutor(8) as pool:  # concurrent connects: every process accepts some
        for c, who in pool.map(probe, range(tries)):
            if who in found or len(found) >= count or (wanted and who not in wanted):
                c.close()
            else:
                found[who] = c
    assert len(found) == count, f"{tries} connections reached only {set(found)}"
    return found


class ProcessClient:
    """An httpx client whose requests all reach one API process."""

    def __init__(self, url: str, process: str, client: httpx.Client,
                 make: Callable[[], httpx.Client] = plain_client):
        self.url, self.process, self._client, self._make = url, process, client, make

    def on_its_process(self) -> httpx.Client:
        if _process_of(self._client, self.url) != self.process:
            self._client.close()  # the idle connection was closed; a new one went elsewhere
            self._client = _connect(self.url, {self.process}, 1, 64, self._make)[self.process]
        return self._client

    def get(self, *args, **kw):
        return self.on_its_process().get(*args, **kw)

    def post(self, *args, **kw):
        return self.on_its_process().post(*args, **kw)

    def delete(self, *args, **kw):
        return self.on_its_process().delete(*args, **kw)

    def stream(self, *args, **kw):
        return self.on_its_process().stream(*args, **kw)

    def close(self) -> None:
        self._client.close()


def clients_on_each_process(url: str, count: int = 2, tries: int = 64,
                            make: Callable[[], httpx.Client] = plain_client) -> list[ProcessClient]:
    """One client per API process, for `count` different processes."""
    return [ProcessClient(url, who, c, make)
            for who, c in _connect(url, None, count, tries, make).items()]
