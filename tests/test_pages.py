"""The worker's HTML pages in a real browser: headless Chromium (Debian's package) loads the user's page and the
operator's page from a running worker on the real broker, the DOM it rendered carries the user's data (window
titles, genres, rationale, recommendations, versions) and the operator's figures, and a screenshot is saved.
No token is set here: the /v1 API and the pages are open on loopback by default."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from streams.broker import EmbeddedBroker
from tests.conftest import WorkerProcess, worker_env

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(*args: str) -> str:
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120).stdout


def _api(port: int, method: str, path: str, body: object = None) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/install.sh installs it)")
def test_user_and_operator_pages_render_in_chromium(tmp_path: Path, data_dir: Path, indexed_qdrant: Path) -> None:
    with EmbeddedBroker() as broker:
        worker = WorkerProcess(worker_env(broker, data_dir, indexed_qdrant), tmp_path / "worker.log").start()
        try:
            items = ["Toy Story (1995)", "Aladdin (1992)", "Lion King, The (1994)"]
            _api(worker.port, "POST", "/v1/events",
                 [{"user_id": "page-u1", "item_id": i, "event_type": "rating", "value": 5.0, "timestamp": 1_000_000 + n}
                  for n, i in enumerate(items)])
            deadline = time.monotonic() + 60
            rec: dict = {}
            while time.monotonic() < deadline:
                rec = _api(worker.port, "GET", "/v1/recommendations/page-u1")
                if rec["source"] == "published" and rec["window_version"] == 3:
                    break
                time.sleep(0.3)
            assert rec.get("window_version") == 3, worker.log_tail()
            # The student writes the rationale in the background: wait for it, the page shows it.
            deadline = time.monotonic() + 240
            user: dict = {}
            while time.monotonic() < deadline:
                user = _api(worker.port, "GET", "/v1/users/page-u1")
                if user["rationale"]:
                    break
                time.sleep(1)
            assert user["rationale"], worker.log_tail()
            rec = _api(worker.port, "GET", "/v1/recommendations/page-u1")

            url = f"http://127.0.0.1:{worker.port}/ui/users/page-u1"
            dom = html.unescape(_chromium("--dump-dom", url))
            shot = tmp_path / "user-page.png"
            _chromium(f"--screenshot={shot}", "--window-size=1280,1800", url)
            ops_dom = html.unescape(_chromium("--dump-dom", f"http://127.0.0.1:{worker.port}/ui/"))
            ops_shot = tmp_path / "operator-page.png"
            _chromium(f"--screenshot={ops_shot}", "--window-size=1280,1400", f"http://127.0.0.1:{worker.port}/ui/")
            missing = html.unescape(_chromium("--dump-dom", f"http://127.0.0.1:{worker.port}/ui/users/nobody-here"))
        finally:
            worker.stop()

    assert "<h1>page-u1</h1>" in dom
    for title in ("Toy Story", "Aladdin", "Lion King, The"):  # the window, with catalogue titles
        assert title in dom
    assert "Animation" in dom and "Children's" in dom  # genres
    assert user["rationale"].strip().splitlines()[0].strip()[:40] in dom  # the rationale
    for item in rec["items"]:  # every recommended item, with its score
        assert item["title"] in dom and f"{item['score']:.4f}" in dom
    assert rec["recommendation_id"] in dom and "smollm2-135m-instruct" in dom  # the answer and the student
    assert "shares " in dom  # the why column
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert "slimstream worker" in ops_dom and "events/s" in ops_dom and "Consumer lag" in ops_dom
    assert "Drift signals" in ops_dom and "Feedback attribution" in ops_dom and "Latency (ms)" in ops_dom
    assert "fast_path_batch_s" in ops_dom  # a measured step with its percentiles
    assert "A/B arms" in ops_dom and "No experiment" in ops_dom
    assert ops_shot.stat().st_size > 10_000
    assert "nobody-here" in missing and "no window and no rationale" in missing
