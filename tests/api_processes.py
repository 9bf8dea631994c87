"""Clients that stay on one API process of an `--api-server-count N` server.

The processes share one listening socket, and the kernel hands each new
connection to either. A keep-alive connection stays on the process that
accepted it, but the server closes it after 5 s idle (uvicorn's keep-alive)
and the next one may land on the other process. A `ProcessClient` checks its
connection before each request (a GET of a missing session: no engine work)
and reconnects until it is back on its process.

A `slow_reader` client takes only a few KB into its socket: once a stream it
stops reading has filled that and the server's send buffers, the server's
sends wait, so the turn (and its session's lease) lasts until the client
reads on, however fast the engine generates."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import httpx

REPLICA = "x-sir-replica"  # which API process answered (server.middleware)
PROBE = "/v1/sessions/probe"
SMALL_RECEIVE_BUFFER = 4096  # bytes (the kernel doubles it)


def plain_client() -> httpx.Client:
    return httpx.Client(timeout=300)


def slow_reader() -> httpx.Client:
    """A client whose streams, when it stops reading, stall the server's sends."""
    options = [(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RECEIVE_BUFFER)]
    return httpx.Client(timeout=300, transport=httpx.HTTPTransport(socket_options=options))


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
