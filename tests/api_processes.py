"""Clients that stay on one API process of an `--api-server-count N` server.

The processes share one listening socket, and the kernel hands each new
connection to either. A keep-alive connection stays on the process that
accepted it, but the server closes it after 5 s idle (uvicorn's keep-alive)
and the next one may land on the other process. A `ProcessClient` checks its
connection before each request (a GET of a missing session: no engine work)
and reconnects until it is back on its process."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

REPLICA = "x-sir-replica"  # which API process answered (server.middleware)
PROBE = "/v1/sessions/probe"


def _connect(url: str, wanted: set[str] | None, count: int, tries: int) -> dict[str, httpx.Client]:
    """Keep-alive clients on `count` different processes (of `wanted`, when given)."""
    def probe(_):
        c = httpx.Client(timeout=300)
        return c, c.get(url + PROBE).headers[REPLICA]

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

    def __init__(self, url: str, process: str, client: httpx.Client):
        self.url, self.process, self._client = url, process, client

    def on_its_process(self) -> httpx.Client:
        if self._client.get(self.url + PROBE).headers[REPLICA] != self.process:
            self._client.close()  # the idle connection was closed; a new one went elsewhere
            self._client = _connect(self.url, {self.process}, 1, 64)[self.process]
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


def clients_on_each_process(url: str, count: int = 2, tries: int = 64) -> list[ProcessClient]:
    """One client per API process, for `count` different processes."""
    return [ProcessClient(url, who, c) for who, c in _connect(url, None, count, tries).items()]
