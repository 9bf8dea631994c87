"""The memory inspector: a session's state as one self-contained HTML page.

Pure functions from a `SessionState` (and the tokenizer) to HTML, so the pages
are unit-tested without a server; `server.session_endpoints` serves them at
`GET /v1/sessions/{id}/view` and `GET /v1/sessions`. A page loads nothing:
inline CSS, the chart drawn here as inline SVG, no script, no web font (it is
served with a CSP that forbids all of those, so text a client sent can at
worst be shown, never run). Every piece of client text is escaped here.
"""

from __future__ import annotations

import html
import math
import time
from urllib.parse import quote

import numpy as np

from sir_vllm.sessions import SessionState

LIST_PATH = "/v1/sessions"
SESSION_PATH = "/v1/sessions/"

# ColorBrewer YlOrRd: light yellow for tokens the model expected, dark red for
# the ones that surprised it. Sequential and legible in greyscale.
PALETTE = ("#ffffcc", "#ffeda0", "#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#b10026")
NO_SCORE = "#d4d4d8"  # a NaN or infinite score

CHART_W, CHART_H, CHART_PAD = 560, 150, 34


def e(value) -> str:
    """Escaped for HTML text and for a double- or single-quoted attribute."""
    return html.escape(str(value), quote=True)


def session_href(session_id: str) -> str:
    return SESSION_PATH + quote(session_id, safe="/:@+=~") + "/view"


# -- colours ------------------------------------------------------------------

SCALE_TOP = 0.95  # the scale ends at this quantile: one outlier would pale every other token


def score_range(scores) -> tuple[float, float]:
    """The colour scale: from 0 (or a lower score) to the 95th percentile of the
    finite scores (higher ones get the darkest colour)."""
    finite = np.array([float(s) for s in scores if math.isfinite(float(s))])
    lo = min(0.0, float(finite.min())) if finite.size else 0.0
    hi = float(np.quantile(finite, SCALE_TOP)) if finite.size else lo
    return lo, (hi if hi > lo else lo + 1.0)


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def score_colour(score: float, lo: float, hi: float) -> str:
    """The background for `score` on the scale lo..hi (clamped): PALETTE interpolated."""
    if not math.isfinite(score):
        return NO_SCORE
    t = min(1.0, max(0.0, (score - lo) / (hi - lo)))
    pos = t * (len(PALETTE) - 1)
    i = min(int(pos), len(PALETTE) - 2)
    a, b, f = _rgb(PALETTE[i]), _rgb(PALETTE[i + 1]), pos - i
    return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, b))


def text_colour(background: str) -> str:
    """Black on light backgrounds, white on dark ones (relative luminance)."""
    r, g, b = (c / 255 for c in _rgb(background))
    return "#111" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "#fff"


# -- the retained tokens --------------------------------------------------------

def marks(n: int, policy) -> tuple[range, range]:
    """(sinks, recent window): index ranges of the first `start_size` tokens and,
    when the policy keeps one, the last `recent_size` (they may overlap)."""
    start = min(n, int(getattr(policy, "start_size", 0) or 0))
    recent = min(n, int(getattr(policy, "recent_size", 0) or 0))
    return range(start), range(n - recent, n)


def token_html(text: str) -> str:
    """A token's text, escaped, with what it would otherwise hide marked: a newline
    or tab keeps itself and gains a CSS mark (↵, ⇥), so the page's text is the
    token's text; a control character becomes its Unicode "control picture"
    (the HTML parser would rewrite or drop some of them)."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append('<span class="nl">\n</span>')
        elif ch == "\t":
            out.append('<span class="tab">\t</span>')
        elif ord(ch) < 32 or ord(ch) == 127 or 128 <= ord(ch) < 160:
            picture = chr(0x2400 + ord(ch)) if ord(ch) < 32 else "\u2421" if ord(ch) == 127 else "\ufffd"
            out.append(f'<span class="ctl" title="U+{ord(ch):04X}">{picture}</span>')
        else:
            out.append(e(ch))
    return "".join(out)


def tokens_html(state: SessionState, tokenizer) -> tuple[str, tuple[float, float]]:
    """The retained tokens, in order, one span each; and the colour scale used."""
    head = state.head
    scores = [float(s) for s in head.scores]
    lo, hi = score_range(scores)
    sinks, recent = marks(head.size, state.policy)
    spans = []
    for i, (tid, score) in enumerate(zip(head.token_ids, scores)):
        tid = int(tid)
        kinds = ["t"]
        roles = []
        if i in sinks:
            kinds.append("sink")
            roles.append("sink")
        if i in recent:
            kinds.append("recent")
            roles.append("recent")
            if i == recent.start:
                kinds.append("recent-start")
        bg = score_colour(score, lo, hi)
        shown = f"{score:.3f}" if math.isfinite(score) else "none"
        title = " \u00b7 ".join([f"#{i}", f"id {tid}", f"score {shown}", *roles])
        spans.append(f'<span class="{" ".join(kinds)}" data-i="{i}" data-score="{e(shown)}" '
                     f'title="{e(title)}" style="background:{bg};color:{text_colour(bg)}">'
                     f'{token_html(tokenizer.decode([tid]))}</span>')
    return "".join(spans), (lo, hi)


def legend_html(lo: float, hi: float, top: float, sinks: int, recent: int) -> str:
    """The colour scale (`top`: the highest score, beyond the scale's end or not),
    and the marks."""
    stops = ", ".join(PALETTE)
    beyond = f"+ (highest {top:.2f})" if top > hi else ""
    return (
        '<div class="legend">'
        '<span class="scale"><span class="lab">score</span>'
        f'<span class="num">{lo:.2f}</span><span class="bar" style="background:linear-gradient('
        f'to right, {stops})"></span><span class="num">{hi:.2f}{beyond}</span>'
        '<span class="hint">surprisal in nats, decayed each turn</span></span>'
        f'<span class="key"><span class="t sink">sink</span> attention sinks ({sinks})</span>'
        f'<span class="key"><span class="t recent recent-start">recent</span> recent window ({recent})</span>'
        f'<span class="key"><span class="t"><span class="nl"></span></span> newline</span>'
        "</div>")


# -- the chart ------------------------------------------------------------------

def chart_points(trace, ceiling: int, width: int = CHART_W, height: int = CHART_H,
                 pad: int = CHART_PAD) -> list[tuple[float, float]]:
    """SVG (x, y) of each (turn, retained, evicted) point: turns spread over the
    width (one turn: the middle), 0..ceiling retained tokens bottom to top."""
    if not trace:
        return []
    turns = [t[0] for t in trace]
    first, last = min(turns), max(turns)
    ceiling = max(1, ceiling)
    span_x, span_y = width - 2 * pad, height - 2 * pad
    points = []
    for turn, retained, _ in trace:
        x = pad + (span_x / 2 if last == first else span_x * (turn - first) / (last - first))
        y = height - pad - span_y * min(retained, ceiling) / ceiling
        points.append((round(x, 1), round(y, 1)))
    return points


def chart_svg(trace, budget: int | None) -> str:
    """Retained tokens per turn (the last turns the state traces), the budget dashed."""
    if not trace:
        return '<p class="muted">No turns traced yet.</p>'
    ceiling = max([budget or 0, *(t[1] for t in trace)])
    pts = chart_points(trace, ceiling)
    w, h, p = CHART_W, CHART_H, CHART_PAD
    bottom, top = h - p, p
    parts = [f'<svg class="chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
             'role="img" aria-label="retained tokens per turn">',
             f'<line class="axis" x1="{p}" y1="{bottom}" x2="{w - p}" y2="{bottom}"/>',
             f'<line class="axis" x1="{p}" y1="{top}" x2="{p}" y2="{bottom}"/>',
             f'<text x="{p - 6}" y="{bottom + 4}" text-anchor="end">0</text>',
             f'<text x="{p - 6}" y="{top + 4}" text-anchor="end">{ceiling}</text>',
             f'<text x="{pts[0][0]}" y="{h - 12}" text-anchor="middle">turn {trace[0][0]}</text>']
    if len(pts) > 1:
        parts.append(f'<text x="{pts[-1][0]}" y="{h - 12}" text-anchor="middle">'
                     f'turn {trace[-1][0]}</text>')
    if budget:
        parts.append(f'<line class="budget" x1="{p}" y1="{top}" x2="{w - p}" y2="{top}"/>'
                     f'<text class="budget-label" x="{w - p}" y="{top - 6}" text-anchor="end">'
                     f'budget {budget}</text>')
    parts.append(f'<polyline class="line" points="{" ".join(f"{x},{y}" for x, y in pts)}"/>')
    for (x, y), (turn, retained, evicted) in zip(pts, trace):
        parts.append(f'<circle class="pt" cx="{x}" cy="{y}" r="3" data-turn="{turn}" '
                     f'data-retained="{retained}"><title>turn {turn}: {retained} retained, '
                     f'{evicted} evicted so far</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


# -- pages ----------------------------------------------------------------------

def when(ts: float, now: float) -> str:
    ago = max(0.0, now - ts)
    rel = (f"{ago:.0f} s" if ago < 120 else f"{ago / 60:.0f} min" if ago < 7200
           else f"{ago / 3600:.0f} h" if ago < 172800 else f"{ago / 86400:.0f} days")
    return f'{time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))} UTC ({rel} ago)'


def policy_text(policy) -> str:
    d = dict(policy.to_dict())
    name = d.pop("name", getattr(policy, "name", "?"))
    d.pop("cache_size", None)
    knobs = ", ".join(f"{k} {v}" for k, v in d.items())
    return f"{name} ({knobs})" if knobs else str(name)


STYLE = """
:root{color-scheme:light}
body{margin:24px;color:#111;background:#fafafa;
  font:14px/1.45 system-ui,"DejaVu Sans","Liberation Sans",Arial,sans-serif}
a{color:#1d4ed8}
h1{font-size:20px;margin:4px 0 10px}h2{font-size:15px;margin:18px 0 6px}
code,.tokens{font-family:ui-monospace,"DejaVu Sans Mono","Liberation Mono",Menlo,Consolas,monospace}
.facts{display:flex;flex-wrap:wrap;gap:6px 22px;margin:0;padding:10px 14px;
  background:#fff;border:1px solid #e4e4e7;border-radius:6px}
.facts div{display:flex;flex-direction:column}
.facts dt{font-size:11px;color:#71717a;text-transform:uppercase;letter-spacing:.04em}
.facts dd{margin:0;font-weight:600}
.muted{color:#71717a}
.chart text{font-size:11px;fill:#52525b}.chart .axis{stroke:#a1a1aa}
.chart .line{fill:none;stroke:#b10026;stroke-width:2}
.chart .pt{fill:#b10026}.chart .budget{stroke:#1d4ed8;stroke-dasharray:5 4}
.chart .budget-label{fill:#1d4ed8}
.tokens{white-space:pre-wrap;word-break:break-all;line-height:2.05;font-size:14px;
  background:#fff;padding:12px 14px;border:1px solid #e4e4e7;border-radius:6px}
.t{margin-right:1px;padding:2px 0;border-radius:2px}
.t.sink{outline:2px solid #1d4ed8;outline-offset:-1px}
.t.recent{box-shadow:inset 0 -3px 0 #059669}
.t.recent-start{border-left:3px solid #059669}
.nl::before{content:"\\21b5";opacity:.8}.tab::before{content:"\\21e5";opacity:.8}.ctl{opacity:.8}
.legend{display:flex;flex-wrap:wrap;align-items:center;gap:8px 20px;margin:6px 0 10px;font-size:13px}
.legend .scale{display:flex;align-items:center;gap:6px}
.legend .bar{display:inline-block;width:180px;height:12px;border:1px solid #d4d4d8}
.legend .lab{font-weight:600}.legend .hint{color:#71717a}
.legend .key .t{padding:2px 4px;background:#fff}
table{border-collapse:collapse;background:#fff;border:1px solid #e4e4e7}
th,td{padding:6px 12px;text-align:left;border-bottom:1px solid #e4e4e7}
th{font-size:12px;color:#52525b}td.n{text-align:right;font-variant-numeric:tabular-nums}
"""


def page(title: str, body: str) -> str:
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<title>{e(title)}</title><style>{STYLE}</style></head><body>{body}</body></html>')


def render_session(state: SessionState, tokenizer, now: float | None = None) -> str:
    """The inspector page of one session."""
    now = time.time() if now is None else now
    head, budget = state.head, state.policy.cache_size
    spans, (lo, hi) = tokens_html(state, tokenizer)
    top = max([hi, *(float(x) for x in head.scores if math.isfinite(float(x)))])
    sinks, recent = marks(head.size, state.policy)
    retained = f"{head.size} / {budget} ({100 * head.size / budget:.0f}%)" if budget else f"{head.size}"
    facts = [("policy", policy_text(state.policy)), ("budget", budget if budget else "unbounded"),
             ("retained / budget", retained), ("turns", head.turns),
             ("evicted so far", head.evicted_total), ("api", state.api or "-"),
             ("last used", when(state.last_used, now))]
    if head.pending is not None:
        facts.append(("next input token", f"{tokenizer.decode([int(head.pending)])!r}"))
    traced = len(state.trace)
    note = f" (the last {traced})" if state.trace and traced < head.turns else ""
    body = (
        f'<nav><a href="{LIST_PATH}">\u2190 all sessions</a></nav>'
        f'<h1>Session <code>{e(state.id)}</code></h1>'
        '<dl class="facts">' + "".join(f'<div><dt>{e(k)}</dt><dd data-fact="{e(k)}">{e(v)}</dd></div>'
                                       for k, v in facts) + "</dl>"
        f"<h2>Retained tokens per turn{note}</h2>{chart_svg(state.trace, budget)}"
        f"<h2>Retained text ({head.size} tokens, in cache order)</h2>"
        f"{legend_html(lo, hi, top, len(sinks), len(recent))}"
        f'<div class="tokens" id="tokens">{spans}</div>')
    return page(f"{state.id} \u00b7 sir-vllm session memory", body)


def render_list(states: list[SessionState], now: float | None = None) -> str:
    """The tenant's sessions, most recently used first, each linking its page."""
    now = time.time() if now is None else now
    rows = []
    for s in sorted(states, key=lambda s: s.last_used, reverse=True):
        budget = s.policy.cache_size or "\u221e"
        rows.append(
            f'<tr><td><a href="{e(session_href(s.id))}"><code>{e(s.id)}</code></a></td>'
            f'<td>{e(s.api or "-")}</td><td>{e(s.policy.name)}</td><td class="n">{s.turns}</td>'
            f'<td class="n">{s.head.size} / {budget}</td>'
            f'<td class="n">{s.head.evicted_total}</td><td>{e(when(s.last_used, now))}</td></tr>')
    table = ('<table><thead><tr><th>session</th><th>api</th><th>policy</th><th>turns</th>'
             '<th>retained / budget</th><th>evicted</th><th>last used</th></tr></thead>'
             f'<tbody>{"".join(rows)}</tbody></table>') if rows else \
        '<p class="muted">No sessions for this API key.</p>'
    body = (f"<h1>Sessions ({len(rows)})</h1>"
            '<p class="muted">The sessions of the API key that asked; each links its memory.</p>'
            f"{table}")
    return page("sir-vllm sessions", body)


def render_error(status: int, message: str) -> str:
    return page(f"{status} \u00b7 sir-vllm",
                f'<nav><a href="{LIST_PATH}">\u2190 all sessions</a></nav>'
                f"<h1>{status}</h1><p>{e(message)}</p>")
