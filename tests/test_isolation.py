"""Sessions of two API keys never meet (issue 15): 32 sessions, the same 16
session ids under each of `vllm serve --api-key key-a key-b`, each told a
secret of its own, turns interleaved and concurrent. No session's retained
text ever holds another session's secret; a session only one key made is a
404 to the other key's GET, view and DELETE (and is still there after), and
a turn under the other key on its id starts a session of that key's own.
"""

from __future__ import annotations

import os
import random
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from sir_vllm.server.process import ServerProcess

KEYS = ("key-a", "key-b")
IDS = 16  # per key: 32 sessions
ROUNDS = 4  # turns per session
SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", "64M",
               "--max-model-len", "1024", "--kv-policy", "sirllm", "--kv-start-size", "4",
               "--kv-entropy-size", "300", "--kv-recent-size", "16", "--api-key", *KEYS]


@pytest.fixture(scope="module")
def keyed_server(tiny_serving_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("isolation-server")
    proc = ServerProcess(model=str(tiny_serving_model), served_model_name="tiny",
                         log_path=tmp / "vllm-serve.log", extra_args=SERVER_ARGS)
    proc.start(timeout=float(os.environ.get("SIR_VLLM_SERVER_TIMEOUT", "900")))
    yield proc
    proc.stop()


def auth(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


class Sessions:
    """The 32 sessions' clients: a secret each, chat ones keep their history."""

    def __init__(self, url: str):
        self.url = url
        rng = random.Random(15)
        self.ids = [f"iso-{k}-{uuid.uuid4().hex[:6]}" for k in range(IDS)]
        self.secrets = {(key, sid): f"Z{rng.getrandbits(40):010x}Q" for key in KEYS for sid in self.ids}
        self.history: dict[tuple[str, str], list[dict]] = {s: [] for s in self.secrets}
        self.http = httpx.Client(timeout=300)

    def chat(self, sid: str) -> bool:
        return sid in self.ids and self.ids.index(sid) % 2 == 1  # odd ids: chat, the rest: completions

    def text_for(self, who: tuple[str, str], turn: int) -> str:
        if turn == 0:
            return f"Remember this secret code: {self.secrets[who]}. Keep it safe."
        return f" Tell me about the weather on day {turn}."

    def turn(self, who: tuple[str, str], k: int) -> dict:
        key, sid = who
        text = self.text_for(who, k)
        if self.chat(sid):
            msgs = [*self.history[who], {"role": "user", "content": text}]
            body = {"model": "tiny", "messages": msgs, "max_tokens": 4, "temperature": 0,
                    "ignore_eos": True, "session_id": sid}
            r = self.http.post(self.url + "/v1/chat/completions", json=body, headers=auth(key))
            assert r.status_code == 200, r.text
            self.history[who] = [*msgs, {"role": "assistant",
                                         "content": r.json()["choices"][0]["message"]["content"]}]
        else:
            body = {"model": "tiny", "prompt": text, "max_tokens": 4, "temperature": 0,
                    "ignore_eos": True, "session_id": sid}
            r = self.http.post(self.url + "/v1/completions", json=body, headers=auth(key))
            assert r.status_code == 200, r.text
        return r.json()["session"]

    def retained_text(self, who: tuple[str, str]) -> str:
        key, sid = who
        r = self.http.get(f"{self.url}/v1/sessions/{sid}", headers=auth(key))
        assert r.status_code == 200, r.text
        return "".join(t["text"] for t in r.json()["tokens"])

    def check_no_leak(self) -> None:
        for who in self.secrets:
            text = self.retained_text(who)
            assert self.secrets[who] in text, f"{who} lost its own secret: {text!r}"
            foreign = [other for other, secret in self.secrets.items() if other != who and secret in text]
            assert not foreign, f"{who} holds the secrets of {foreign}"


def test_two_keys_same_ids_never_share_memory(keyed_server):
    s = Sessions(keyed_server.url)
    rng = random.Random(0)
    with ThreadPoolExecutor(8) as pool:
        for k in range(ROUNDS):
            order = list(s.secrets)
            rng.shuffle(order)  # both keys' turns interleaved, 8 at a time
            sessions = list(pool.map(lambda who: s.turn(who, k), order))
            assert all(x["turns"] == k + 1 for x in sessions), sessions
            s.check_no_leak()


def test_the_other_keys_requests_are_404(keyed_server):
    url = keyed_server.url
    s = Sessions(url)
    sid = f"only-a-{uuid.uuid4().hex[:6]}"
    secret = ("key-a", sid)
    s.secrets[secret] = "Zonlyforkeya1Q"
    s.history[secret] = []
    s.turn(secret, 0)
    s.turn(secret, 1)
    before = s.http.get(f"{url}/v1/sessions/{sid}", headers=auth("key-a")).json()
    assert before["turns"] == 2 and s.secrets[secret] in s.retained_text(secret)
    for key in (None, "key-c"):  # vLLM's own check: no key, or one it was not given
        assert s.http.get(f"{url}/v1/sessions/{sid}", headers=auth(key)).status_code == 401
    other = auth("key-b")
    for method, path in (("GET", f"/v1/sessions/{sid}"), ("GET", f"/v1/sessions/{sid}/view"),
                         ("DELETE", f"/v1/sessions/{sid}")):
        r = s.http.request(method, url + path, headers=other)
        assert r.status_code == 404, (method, path, r.status_code, r.text[:200])
    assert sid not in s.http.get(f"{url}/v1/sessions", headers=other).text
    assert sid in s.http.get(f"{url}/v1/sessions", headers=auth("key-a")).text
    # "continuing" it under key-b starts key-b's own session: nothing of key-a's is loaded
    mine = ("key-b", sid)
    s.secrets[mine], s.history[mine] = "Zonlyforkeyb2Q", []
    fresh = s.turn(mine, 1)
    assert fresh["turns"] == 1 and fresh["loaded_tokens"] == 0
    assert s.secrets[secret] not in s.retained_text(mine)
    after = s.http.get(f"{url}/v1/sessions/{sid}", headers=auth("key-a")).json()
    assert after["tokens"] == before["tokens"] and after["turns"] == 2  # untouched by key-b
    assert s.http.delete(f"{url}/v1/sessions/{sid}", headers=other).status_code == 200  # b's own
    assert s.http.get(f"{url}/v1/sessions/{sid}", headers=auth("key-a")).status_code == 200
