"""Two HTML pages served by the worker, rendered on the server (no build step, no script): a user's page
(``/ui/users/{user_id}``: the window with titles and genres, the rationale, the recommendations with scores and
why, the versions, freshness) and the operator's page (``/ui/``: events/s, lag, latency percentiles, versions,
drift signals, attribution). Both read what the API and ``/stats/`` read; every value is escaped (item titles
and rationales are data from outside)."""

from __future__ import annotations

import html
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from faust.web import Request, Response, View

from agents.api.routes import authorize
from agents.api.serving import ApiError, Filters, recommendations, user_view
from agents.routing import at_owner
from agents.state import owned_partitions, runtime
from agents.web import stats_snapshot, telemetry_state
from streams.app import app, windows

RATE_SAMPLES: deque[tuple[float, int]] = deque(maxlen=61)  # (monotonic time, events_in), one per second

_STYLE = """body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:70rem;color:#1d2330;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.1rem;margin-top:1.6rem;border-bottom:1px solid #dde}table{border-collapse:collapse;width:100%}
td,th{padding:.3rem .5rem;border-bottom:1px solid #eef;text-align:left;vertical-align:top}th{color:#556}
.num{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#778}.tag{display:inline-block;background:#eef2ff;
border-radius:.6rem;padding:0 .45rem;margin:0 .15rem .15rem 0;font-size:.85em}pre{white-space:pre-wrap;background:#f7f8fb;
padding:.8rem;border-radius:.4rem}.kv td:first-child{color:#556;width:16rem}"""


def _page(title: str, body: str, refresh_s: int | None = None) -> str:
    meta = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}<title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>'
            f"<body>{body}</body></html>")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _tags(values: Iterable[str]) -> str:
    return "".join(f'<span class="tag">{_e(v)}</span>' for v in values)


def _kv(rows: Sequence[tuple[str, Any]]) -> str:
    return '<table class="kv">' + "".join(f"<tr><td>{_e(k)}</td><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return f"{seconds:.1f} s ago" if seconds < 120 else f"{seconds / 60:.1f} min ago"


async def user_page(user_id: str) -> tuple[int, str]:
    """The user's page: 404 when the stream knows nothing of the user."""
    raw = windows.get(user_id)
    try:
        user = await user_view(runtime, user_id, raw)
    except ApiError as exc:
        return exc.status, _page(f"{user_id}: unknown", f"<h1>{_e(user_id)}</h1><p>{_e(exc.error)}</p>")
    rec = await recommendations(runtime, user_id, raw, Filters(k=runtime.settings.retrieval.top_k))
    genres = await runtime.item_genres_many([w.item_id for w in user.window])
    window_genres = {g for gs in genres.values() for g in gs}
    window_rows = "".join(
        f"<tr><td>{_e(user.window_titles.get(w.item_id, w.item_id))}</td><td>{_tags(genres.get(w.item_id, ()))}</td>"
        f"<td>{_e(w.event_type)}</td><td class=num>{_e('' if w.value is None else f'{w.value:g}')}</td>"
        f"<td class=num>{time.strftime('%Y-%m-%d %H:%M', time.gmtime(w.timestamp))}</td></tr>"
        for w in reversed(user.window))
    rec_rows = []
    for n, item in enumerate(rec.items, 1):
        shared = [g for g in item.genres if g in window_genres]
        why = (f"shares {', '.join(shared)} with your window" if shared else "outside your window's genres")
        rec_rows.append(f"<tr><td class=num>{n}</td><td>{_e(item.title)}</td><td>{_tags(item.genres)}</td>"
                        f"<td class=num>{item.score:.4f}</td><td class=muted>{_e(why)}</td></tr>")
    rationale = (f"<pre>{_e(user.rationale)}</pre>" if user.rationale else
                 '<p class="muted">No rationale yet: the student has not written one for this user.</p>')
    body = (
        f"<h1>{_e(user_id)}</h1>"
        + _kv([("window version", _e(user.window_version)),
               ("recommendation", f"{_e(rec.recommendation_id)} ({_e(rec.source)}, {_e(rec.path.value if rec.path else '')} path)"),
               ("ranked", _e(_ago(rec.age_s)) + ("" if rec.window_version == rec.current_window_version else
                                                  " (for an older window: the next answer is on its way)")),
               ("ranker", _e(rec.ranker_version)), ("student", _e(rec.student_version)),
               ("rationale written by", _e(user.rationale_model_version or "none yet")
                + ("" if rec.rationale_current else ' <span class="muted">(for an earlier window)</span>'))])
        + "<h2>Why: the student's rationale</h2>" + rationale
        + "<h2>Your preference</h2>" + (
            f"<p>{_e(user.preference)} <span class=muted>(used by the ranker: "
            f"{_e(runtime.settings.retrieval.preference_mode)})</span></p>" if user.preference else
            '<p class="muted">None set (PUT /v1/users/{user}/preference).</p>')
        + f"<h2>Recommendations ({len(rec.items)})</h2><table><tr><th>#</th><th>title</th><th>genres</th>"
        + "<th class=num>score</th><th>why</th></tr>" + "".join(rec_rows) + "</table>"
        + f"<h2>Window ({len(user.window)} items, newest first)</h2><table><tr><th>title</th><th>genres</th>"
        + "<th>event</th><th class=num>value</th><th class=num>time (UTC)</th></tr>" + window_rows + "</table>")
    return 200, _page(f"{user_id}: recommendations", body)


def _events_per_s() -> float | None:
    if len(RATE_SAMPLES) < 2:
        return None
    (t0, n0), (t1, n1) = RATE_SAMPLES[0], RATE_SAMPLES[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else None


def operator_page() -> str:
    stats, state = stats_snapshot(), telemetry_state()
    rate = _events_per_s()
    latency = stats["load"]["latency_s"]
    lat_rows = "".join(f"<tr><td>{_e(name)}</td>" + "".join(
        f"<td class=num>{_num(None if v.get(q) is None else v[q] * 1000, '.1f')}</td>" for q in ("p50", "p99", "max"))
        + f"<td class=num>{_e(v.get('n'))}</td></tr>" for name, v in sorted(latency.items()))
    lag_rows = "".join(f"<tr><td>{_e(t)}</td><td class=num>{p}</td><td class=num>{n}</td></tr>"
                       for (t, p), n in sorted(state["lag"].items()))
    drift = stats["drift"]
    signals = drift.get("signals", {})
    sig_rows = "".join(f"<tr><td>{_e(k)}</td><td class=num>{_num(v, '.4f')}</td>"
                       f"<td class=num>{_e(drift.get('samples', {}).get(k))}</td></tr>" for k, v in signals.items())
    attribution = stats["attribution"]
    att_rows = "".join(f"<tr><td>{_e(k)}</td><td class=num>{v['impressions']}</td><td class=num>{v['hits']}</td>"
                       f"<td class=num>{v['misses']}</td><td class=num>{_num(v['hit_rate'], '.3f')}</td></tr>"
                       for k, v in attribution.items() if k != "unattributed")
    body = (
        "<h1>slimstream worker</h1>"
        + _kv([("events/s (last minute)", _e("warming up" if rate is None else f"{rate:.1f}")),
               ("events in / applied", f"{stats.get('events_in', 0)} / {stats.get('events_applied', 0)}"),
               ("dead letters", _e(stats.get("dead_letters", 0))),
               ("recommendations fast / slow", f"{stats.get('recommendations_fast', 0)} / {stats.get('recommendations_slow', 0)}"),
               ("rationale backlog", _e(stats["load"]["rationale_backlog"].get("waiting_users"))),
               ("partitions owned", _e(sorted(owned_partitions()))),
               ("student", _e(stats["student_model_version"])), ("ranker", _e(stats["ranker_version"] or "text-cosine")),
               ("uptime", _e(f"{time.time() - runtime.started_at:.0f} s"))])
        + "<h2>Latency (ms)</h2><table><tr><th>step</th><th class=num>p50</th><th class=num>p99</th>"
        + "<th class=num>max</th><th class=num>n</th></tr>" + lat_rows + "</table>"
        + "<h2>Consumer lag</h2><table><tr><th>topic</th><th class=num>partition</th><th class=num>records</th></tr>"
        + (lag_rows or '<tr><td colspan=3 class="muted">no committed offsets yet</td></tr>') + "</table>"
        + "<h2>Drift signals</h2><table><tr><th>signal</th><th class=num>value</th><th class=num>samples</th></tr>"
        + sig_rows + "</table>"
        + f"<p class=muted>reference: {_e(drift.get('reference_source'))}; last decision: "
        + f"{_e((drift.get('last_decision') or {}).get('signals', 'none'))}</p>"
        + "<h2>Feedback attribution</h2><table><tr><th>ranker / path</th><th class=num>impressions</th>"
        + "<th class=num>hits</th><th class=num>misses</th><th class=num>hit rate</th></tr>" + att_rows + "</table>"
        + f"<p class=muted>unattributed responses: {_e(attribution.get('unattributed', 0))}</p>"
        + "<h2>A/B arms</h2>" + _ab_section(stats["ab"]))
    return _page("slimstream worker", body, refresh_s=5)


def _interval(rate: dict[str, Any]) -> str:
    if not rate["n"]:
        return '<span class="muted">no data</span>'
    lo, hi = rate["ci95"]
    return f"{rate['rate']:.3f} [{lo:.3f}, {hi:.3f}] (n={rate['n']})"


def _ab_section(ab: dict[str, Any]) -> str:
    if not ab.get("enabled"):
        return '<p class="muted">No experiment (SLIMSTREAM_AB_ENABLED).</p>'
    rows = "".join(
        f"<tr><td>{_e(arm)}</td><td>{_e(ab['versions'][arm]['student'])}</td><td>{_e(ab['versions'][arm]['ranker'])}</td>"
        f"<td class=num>{block['impressions']}</td><td class=num>{_interval(block['online_hit_rate'])}</td>"
        f"<td class=num>{_interval(block['attributed_hit_rate'])}</td></tr>" for arm, block in ab["arms"].items())
    diff = ab.get("online_hit_rate_difference")
    note = (f"online hit rate, b - a: {diff['b_minus_a']:+.4f} [{diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}]"
            if diff else "b - a: not enough data yet")
    return (f"<p class=muted>salt {_e(ab['salt'])}, arm b share {ab['share_b']:.2f}</p><table><tr><th>arm</th>"
            "<th>student</th><th>ranker</th><th class=num>impressions</th><th class=num>online HR [95% CI]</th>"
            f"<th class=num>attributed HR [95% CI]</th></tr>{rows}</table><p class=muted>{_e(note)}</p>")


@app.timer(1.0)
async def _sample_rate() -> None:
    RATE_SAMPLES.append((time.monotonic(), runtime.metrics["events_in"]))


def _authorized(request: Request) -> bool:
    try:
        authorize(request)
    except ApiError:
        return False
    return True


@app.page("/ui/users/{user_id}")
class UserPage(View):
    async def get(self, request: Request, user_id: str) -> Response:
        if not _authorized(request):
            return self.html("<p>missing or wrong bearer token</p>", status=401)
        routed = await at_owner(self, request, user_id)
        if routed is not None:
            return routed
        if not runtime.store_ready.is_set():
            return self.html(_page("not ready", "<p>The worker is still loading; retry shortly.</p>"), status=503)
        status, page = await user_page(user_id)
        return self.html(page, status=status)


@app.page("/ui/")
class OperatorPage(View):
    async def get(self, request: Request) -> Response:
        if not _authorized(request):
            return self.html("<p>missing or wrong bearer token</p>", status=401)
        return self.html(operator_page())


__all__ = ["operator_page", "user_page"]
