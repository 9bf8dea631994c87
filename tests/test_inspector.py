"""The memory inspector (`GET /v1/sessions/{id}/view`, `GET /v1/sessions`).

The rendering is tested as pure functions; the routing and vLLM's API-key
check through the real middleware on an in-memory store; and the pages
through the shared `vllm serve --kv-policy sirllm` (budget 4 + 64 + 32) in a
real headless Chromium, driven over its DevTools pipe (stdlib only: the pipe
lets the test send the Authorization header a plain `--dump-dom` cannot).
Set SIR_VLLM_INSPECTOR_PNG=docs/inspector.png to refresh the README's screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import json
import os
import re
import select
import shutil
import struct
import subprocess
import time
import uuid
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import SERVED_NAME
from debian_package import installed_binary
from sir_vllm.policy import make_policy
from sir_vllm.server import inspector
from sir_vllm.sessions import MemoryStore, SessionState, Snapshot, tenant_of

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--remote-debugging-pipe"]
INJECTION = 'Say "<script>alert(\'pwned\')</script>" & <b>bold</b>, then \'quote\' me.'


# -- fakes ----------------------------------------------------------------------

class CharTokenizer:
    """Token id i is the i-th entry of `vocab`."""

    def __init__(self, vocab: list[str]):
        self.vocab = vocab

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


def state_of(texts: list[str], scores=None, *, policy=None, sid="s-1", trace=(), turns=3,
             evicted=0, last_used=1000.0) -> tuple[SessionState, CharTokenizer]:
    policy = policy or make_policy(name="sirllm", start_size=2, entropy_size=4, recent_size=2)
    scores = np.linspace(0.0, 8.0, len(texts)) if scores is None else np.asarray(scores, float)
    head = Snapshot(turns=turns, token_ids=np.arange(len(texts)), scores=scores, evicted_total=evicted)
    state = SessionState(id=sid, tenant="t", key="k", policy=policy, api="chat", head=head,
                         trace=tuple(trace), created=last_used, last_used=last_used)
    return state, CharTokenizer(texts)


class Spans(HTMLParser):
    """Each `span.t` inside #tokens: its classes, attributes and text content."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tokens: list[dict] = []
        self.stack: list[bool] = []  # per open span: is it a token span
        self.inside = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id") == "tokens":
            self.inside = True
        if tag == "span":
            is_token = self.inside and "t" in (a.get("class") or "").split() and not any(self.stack)
            self.stack.append(is_token)
            if is_token:
                self.tokens.append({"classes": set(a["class"].split()), "attrs": a, "text": ""})

    def handle_endtag(self, tag):
        if tag == "span" and self.stack:
            self.stack.pop()
        if tag == "div" and self.inside and not self.stack:
            self.inside = False

    def handle_data(self, data):
        if any(self.stack):
            self.tokens[-1]["text"] += data


def spans(page: str) -> list[dict]:
    p = Spans()
    p.feed(page)
    return p.tokens


# -- rendering: pure functions --------------------------------------------------

def test_token_text_is_escaped_and_comes_back_exactly():
    texts = ["<|im_start|>", "user", "\n", *re.findall(r"\S+|\s", INJECTION), "\"'", "&amp;"]
    state, tok = state_of(texts)
    page = inspector.render_session(state, tok)
    assert "<script" not in page.lower() and "<b>" not in page
    assert "&lt;script&gt;" in page and "&quot;" in page and "&#x27;" in page
    assert [s["text"] for s in spans(page)] == texts  # the DOM text is the token text


def test_session_id_is_escaped_in_text_and_quoted_in_links():
    state, tok = state_of(["a"], sid="ops/a+b=c~d")
    assert "<code>ops/a+b=c~d</code>" in inspector.render_session(state, tok)
    listing = inspector.render_list([state])
    assert 'href="/v1/sessions/ops/a+b=c~d/view"' in listing
    assert inspector.session_href("é") == "/v1/sessions/%C3%A9/view"


def test_whitespace_and_control_characters_are_marked():
    html = inspector.token_html("a\nb\tc\x01\x7f")
    assert html == ('a<span class="nl">\n</span>b<span class="tab">\t</span>c'
                    '<span class="ctl" title="U+0001">\u2401</span>'
                    '<span class="ctl" title="U+007F">\u2421</span>')
    page = inspector.render_session(*state_of(["x"]))
    assert '.nl::before{content:"\\21b5"' in page  # ↵ drawn before each newline


def test_score_colours_run_light_to_dark_and_clamp():
    lo, hi = 0.0, 10.0
    colours = [inspector.score_colour(s, lo, hi) for s in np.linspace(lo, hi, 15)]
    assert colours[0] == inspector.PALETTE[0] and colours[-1] == inspector.PALETTE[-1]

    def luminance(c):
        r, g, b = inspector._rgb(c)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    lums = [luminance(c) for c in colours]
    assert all(a > b for a, b in zip(lums, lums[1:])), lums  # a higher score is darker
    assert inspector.score_colour(-5, lo, hi) == inspector.PALETTE[0]
    assert inspector.score_colour(99, lo, hi) == inspector.PALETTE[-1]
    assert inspector.score_colour(float("nan"), lo, hi) == inspector.NO_SCORE
    assert inspector.text_colour(inspector.PALETTE[0]) == "#111"
    assert inspector.text_colour(inspector.PALETTE[-1]) == "#fff"
    assert inspector.score_range([1.0, float("inf"), 4.0]) == pytest.approx((0.0, 3.85))  # 95th pct
    assert inspector.score_range([*[1.0] * 99, 500.0]) == (0.0, 1.0)  # an outlier pales nothing
    assert inspector.score_range([-2.0, 2.0]) == pytest.approx((-2.0, 1.8))
    assert inspector.score_range([]) == (0.0, 1.0)


def test_each_token_shows_its_score_colour():
    scores = [0, 2, 4, 6, 8, 30]
    state, tok = state_of(list("abcdef"), scores=scores)
    page = inspector.render_session(state, tok)
    lo, hi = inspector.score_range(scores)
    assert (lo, hi) == pytest.approx((0.0, 24.5))
    for s, score in zip(spans(page), scores):
        bg = inspector.score_colour(score, lo, hi)
        assert f"background:{bg};" in s["attrs"]["style"]
        assert s["attrs"]["data-score"] == f"{score:.3f}"
    assert spans(page)[-1]["attrs"]["style"].startswith(f"background:{inspector.PALETTE[-1]};")
    assert '<span class="num">24.50+ (highest 30.00)</span>' in page  # the legend says so


def test_sinks_and_recent_window_are_marked():
    sirllm = make_policy(name="sirllm", start_size=2, entropy_size=4, recent_size=3)
    state, tok = state_of(list("abcdefgh"), policy=sirllm)
    got = spans(inspector.render_session(state, tok))
    assert [i for i, s in enumerate(got) if "sink" in s["classes"]] == [0, 1]
    assert [i for i, s in enumerate(got) if "recent" in s["classes"]] == [5, 6, 7]
    assert [i for i, s in enumerate(got) if "recent-start" in s["classes"]] == [5]
    no_recent = make_policy(name="sirllm", start_size=2, entropy_size=4, recent_size=0)
    assert inspector.marks(8, no_recent) == (range(2), range(8, 8))
    assert inspector.marks(1, sirllm) == (range(1), range(0, 1))  # fewer tokens than the marks
    assert inspector.marks(5, make_policy(name="full")) == (range(0), range(5, 5))


def test_chart_points_map_turns_and_retained_counts():
    trace = [(1, 30, 0), (2, 60, 0), (5, 100, 40)]
    pts = inspector.chart_points(trace, 100, width=200, height=100, pad=10)
    assert pts == [(10.0, 66.0), (55.0, 42.0), (190.0, 10.0)]  # x by turn, y: 0 at 90, 100 at 10
    assert inspector.chart_points([(7, 50, 0)], 100, width=200, height=100, pad=10) == [(100.0, 50.0)]
    assert inspector.chart_points([], 100) == []
    svg = inspector.chart_svg(trace, 100)
    drawn = inspector.chart_points(trace, 100)
    assert f'points="{" ".join(f"{x},{y}" for x, y in drawn)}"' in svg
    assert svg.count("<circle") == 3 and "budget 100" in svg
    assert "turn 5: 100 retained, 40 evicted so far" in svg
    assert "No turns traced" in inspector.chart_svg((), 100)


def test_header_states_the_budget_and_evictions():
    trace = [(1, 8, 0), (2, 8, 5)]
    state, tok = state_of(list("abcdefgh"), trace=trace, turns=2, evicted=5)
    page = inspector.render_session(state, tok)
    for fact, value in [("retained / budget", "8 / 8 (100%)"), ("turns", "2"),
                        ("evicted so far", "5"), ("budget", "8")]:
        assert f'<dd data-fact="{fact}">{value}</dd>' in page
    assert "sirllm (start_size 2, entropy_size 4, recent_size 2" in page
    assert page.count("<circle") == 2


def test_list_page_links_sessions_most_recent_first():
    old, tok = state_of(list("ab"), sid="old-one", last_used=1000.0)
    new, _ = state_of(list("abc"), sid="new-one", last_used=2000.0)
    page = inspector.render_list([old, new], now=2060.0)
    assert page.index("new-one") < page.index("old-one")
    assert 'href="/v1/sessions/new-one/view"' in page and "(60 s ago)" in page
    assert "No sessions" in inspector.render_list([])


# -- routing and auth: the real middleware, vLLM's own API-key check ------------

class Asgi:
    """One request through `SessionMiddleware`, with vLLM's `--api-key` set to KEYS."""

    KEYS = ["key-a", "key-b"]
    TEXTS = ["a", "<", "b", "\n"]  # every session's tokens

    def __init__(self):
        from sir_vllm.server.middleware import SessionMiddleware
        from sir_vllm.server import settings
        from sir_vllm.sessions import ServiceConfig, SessionService

        async def stock(scope, receive, send):  # the app below: vLLM's routes
            raise AssertionError(f"reached vLLM: {scope['path']}")

        self.mw = SessionMiddleware(stock)
        self.mw.__dict__["tokenizer"] = CharTokenizer(self.TEXTS)
        self.store = MemoryStore()
        self.mw.service = SessionService(self.store, engine=None, config=ServiceConfig(
            make_policy(name="sirllm", start_size=1, entropy_size=2, recent_size=1)), renderer=None)
        self.app_state = SimpleNamespace(args=SimpleNamespace(api_key=self.KEYS))
        self.namespace = settings.current.namespace

    def add(self, key: str, sid: str):
        state, _ = state_of(self.TEXTS, sid=sid, last_used=time.time())
        state.tenant = tenant_of(key, self.namespace)
        asyncio.run(self.store.put(state))

    def __call__(self, method: str, path: str, key: str | None = None) -> tuple[int, dict, str]:
        headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
        scope = {"type": "http", "method": method, "path": path, "headers": headers,
                 "app": SimpleNamespace(state=self.app_state), "query_string": b"", "root_path": ""}
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(msg):
            sent.append(msg)

        asyncio.run(self.mw(scope, receive, send))
        start = sent[0]
        hdrs = {k.decode(): v.decode() for k, v in start["headers"]}
        return start["status"], hdrs, b"".join(m.get("body", b"") for m in sent[1:]).decode()


def test_pages_are_behind_the_api_key_and_the_tenant():
    app = Asgi()
    app.add("key-a", "mine")
    app.add("key-b", "theirs")
    app.add("key-a", "a/view")  # an id that ends like a view path
    for path in ("/v1/sessions", "/v1/sessions/mine/view"):
        assert app("GET", path)[0] == 401  # vLLM's check, before anything of ours
        assert app("GET", path, "wrong")[0] == 401
    status, hdrs, page = app("GET", "/v1/sessions/mine/view", "key-a")
    assert status == 200 and hdrs["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in hdrs["content-security-policy"] and "script" not in hdrs[
        "content-security-policy"]
    assert [s["text"] for s in spans(page)] == Asgi.TEXTS
    assert app("GET", "/v1/sessions/theirs/view", "key-a")[0] == 404
    assert app("GET", "/v1/sessions/nobody/view", "key-a")[0] == 404
    assert app("GET", "/v1/sessions/bad id/view", "key-a")[0] == 400
    _, _, mine = app("GET", "/v1/sessions", "key-a")
    assert "/v1/sessions/mine/view" in mine and "theirs" not in mine
    _, _, theirs = app("GET", "/v1/sessions", "key-b")
    assert "/v1/sessions/theirs/view" in theirs and "mine" not in theirs
    assert app("POST", "/v1/sessions", "key-a")[0] == 405
    # the JSON endpoint is as it was, for every id
    status, hdrs, body = app("GET", "/v1/sessions/mine", "key-a")
    assert status == 200 and hdrs["content-type"] == "application/json"
    assert [t["text"] for t in json.loads(body)["tokens"]] == Asgi.TEXTS
    status, _, body = app("DELETE", "/v1/sessions/a/view", "key-a")
    assert status == 200 and json.loads(body) == {"id": "a/view", "deleted": True}


# -- a real browser ---------------------------------------------------------------

def chromium_binary() -> str:
    return installed_binary("chromium", "chromium")


class Browser:
    """Headless Chromium over the DevTools pipe (fds 3 and 4, NUL-framed JSON).

    `with Browser(folder) as b: b.load(url, headers)`: status, the page's token
    texts and its HTML as the DOM holds them, and a full-page PNG."""

    def __init__(self, folder: Path, width: int = 1100, height: int = 800):
        self.folder, self.width, self.height = Path(folder), width, height
        self.proc: subprocess.Popen | None = None
        self.next_id = 0
        self.buffer = b""
        self.events: list[dict] = []

    def __enter__(self) -> "Browser":
        profile = self.folder / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        to_child, from_parent = os.pipe()
        to_parent, from_child = os.pipe()
        # above 10 first, so the child's dup2 onto 3 and 4 cannot clobber them
        keep = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_child, from_child)]
        self.write_fd = fcntl.fcntl(from_parent, fcntl.F_DUPFD_CLOEXEC, 10)
        self.read_fd = fcntl.fcntl(to_parent, fcntl.F_DUPFD_CLOEXEC, 10)
        for fd in (to_child, from_parent, to_parent, from_child):
            os.close(fd)

        def child_fds():
            os.dup2(keep[0], 3)
            os.dup2(keep[1], 4)

        log = open(self.folder / "chromium.log", "wb")
        self.proc = subprocess.Popen(
            [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=False,
            preexec_fn=child_fds, start_new_session=True)
        log.close()
        for fd in keep:
            os.close(fd)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        try:
            self.call("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - it is going away either way
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        for fd in (self.read_fd, self.write_fd):
            os.close(fd)
        self.proc = None

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.write_fd, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited: {(self.folder / 'chromium.log').read_text()[-2000:]}")
            self.buffer += chunk
        frame, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(frame)

    def _wait_event(self, method: str, session: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == method and ev.get("sessionId") == session:
                    return self.events.pop(i)
            self.events.append(self._read(deadline))

    def load(self, url: str, headers: dict, screenshot: Path | None = None) -> dict:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        try:
            for method, params in [("Page.enable", {}), ("Network.enable", {}),
                                   ("Network.setExtraHTTPHeaders", {"headers": headers}),
                                   ("Emulation.setDeviceMetricsOverride", {
                                       "width": self.width, "height": self.height,
                                       "deviceScaleFactor": 1, "mobile": False})]:
                self.call(method, params, s)
            self.events.clear()
            self.call("Page.navigate", {"url": url}, s)
            while True:
                ev = self._wait_event("Network.responseReceived", s)
                if ev["params"]["type"] == "Document":
                    status = ev["params"]["response"]["status"]
                    break
            self._wait_event("Page.loadEventFired", s)
            found = self.call("Runtime.evaluate", {"returnByValue": True, "expression": """({
                tokens: [...document.querySelectorAll('#tokens > span.t')].map(
                    t => ({text: t.textContent, classes: [...t.classList]})),
                scripts: document.scripts.length,
                points: document.querySelectorAll('svg.chart circle').length,
                links: [...document.querySelectorAll('a')].map(a => a.getAttribute('href')),
                html: document.documentElement.outerHTML})"""}, s)["result"]["value"]
            found["status"] = status
            if screenshot is not None:
                size = self.call("Page.getLayoutMetrics", {}, s)["cssContentSize"]
                self.call("Emulation.setDeviceMetricsOverride", {
                    "width": self.width, "height": min(4000, max(self.height, int(size["height"]))),
                    "deviceScaleFactor": 1, "mobile": False}, s)
                png = base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"}, s)["data"])
                screenshot.write_bytes(png)
            return found
        finally:
            self.call("Target.closeTarget", {"targetId": target})


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


CONVERSATION = [
    "Hi! My name is Ada and I keep my spare key in the blue box under the stairs.",
    INJECTION,
    "Tell me a fun fact about tea.\nOne line, please.",
    "And one about the moon?",
    "What is my name, and where is my spare key?",
]


def chat_session(client, sid: str, key: str = "unused") -> None:
    history = []
    for text in CONVERSATION:
        history.append({"role": "user", "content": text})
        reply = client.chat.completions.create(
            model=SERVED_NAME, messages=history, temperature=0, max_tokens=40,
            extra_headers={"X-Session-ID": sid, "Authorization": f"Bearer {key}"})
        history.append({"role": "assistant", "content": reply.choices[0].message.content})


def test_the_view_in_a_real_browser(session_client, session_server, tmp_path):
    import requests

    sid = f"inspect-{uuid.uuid4().hex[:8]}"
    chat_session(session_client, sid)
    info = requests.get(f"{session_server.url}/v1/sessions/{sid}", timeout=60,
                        headers={"Authorization": "Bearer unused"}).json()
    assert info["evicted_tokens"] > 0 and info["turns"] == len(CONVERSATION)
    shot = tmp_path / "inspector.png"
    with Browser(tmp_path) as browser:
        view = browser.load(f"{session_server.url}/v1/sessions/{sid}/view",
                            {"Authorization": "Bearer unused"}, screenshot=shot)
        assert view["status"] == 200
        assert [t["text"] for t in view["tokens"]] == [t["text"] for t in info["tokens"]]
        n, start, recent = len(view["tokens"]), 4, 32
        assert [i for i, t in enumerate(view["tokens"]) if "sink" in t["classes"]] == list(range(start))
        assert [i for i, t in enumerate(view["tokens"]) if "recent" in t["classes"]] == \
            list(range(n - recent, n))
        assert view["scripts"] == 0 and "<script" not in view["html"]  # the client's text stayed text
        assert view["points"] == len(CONVERSATION)
        assert f'<dd data-fact="evicted so far">{info["evicted_tokens"]}</dd>' in view["html"]

        other = browser.load(f"{session_server.url}/v1/sessions/{sid}/view",
                             {"Authorization": "Bearer someone-else"})
        assert other["status"] == 404 and other["tokens"] == []

        listing = browser.load(f"{session_server.url}/v1/sessions", {"Authorization": "Bearer unused"})
        assert listing["status"] == 200 and f"/v1/sessions/{sid}/view" in listing["links"]
        theirs = browser.load(f"{session_server.url}/v1/sessions",
                              {"Authorization": "Bearer someone-else"})
        assert theirs["status"] == 200 and sid not in theirs["html"]
    assert browser.proc is None
    width, height = png_size(shot)
    assert width == 1100 and height >= 600
    if os.environ.get("SIR_VLLM_INSPECTOR_PNG"):
        shutil.copyfile(shot, os.environ["SIR_VLLM_INSPECTOR_PNG"])


def test_the_injection_is_shown_as_text_in_a_browser(session_client, session_server, tmp_path):
    """The client's own `<script>` and quotes, still retained, render as text."""
    sid = f"inject-{uuid.uuid4().hex[:8]}"
    session_client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": INJECTION}], temperature=0,
        max_tokens=4, extra_headers={"X-Session-ID": sid})
    with Browser(tmp_path) as browser:
        view = browser.load(f"{session_server.url}/v1/sessions/{sid}/view",
                            {"Authorization": "Bearer unused"})
    assert view["status"] == 200 and view["scripts"] == 0
    assert INJECTION in "".join(t["text"] for t in view["tokens"])
