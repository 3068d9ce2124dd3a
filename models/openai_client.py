"""A client for any OpenAI-compatible chat-completions endpoint: the teacher's and the vLLM student's.

vLLM's server, a hosted API, or ``python -m models.serving.api_server`` (the embedded offline teacher): the
same :class:`ChatClient`. It is async (``httpx.AsyncClient`` with an explicit ``httpx.Timeout``), keeps at
most ``max_concurrency`` requests in flight, retries timeouts, connection errors, 429 and 5xx with
exponential backoff and full jitter (a ``Retry-After`` header is honoured), never retries other 4xx, counts
tokens and cost from each response's ``usage``, and (given a ``cache_dir``) caches answers on disk (sqlite) by
a hash of the model, the messages and the sampling parameters, so a rerun of a teacher job costs nothing.
Identical requests in flight at the same time are sent once. Where it is and how to call it is a
:class:`streams.settings.ChatEndpoint` (the teacher's settings section is one).

Usage::

    async with ChatClient(settings.teacher, cache_dir=d) as teacher:
        texts = await teacher.complete(messages, n=4, temperature=0.7, seed=1)
        print(teacher.stats.cost_usd)
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from streams.settings import ChatEndpoint

log = logging.getLogger(__name__)

CACHE_FILE = "teacher-cache.sqlite3"  # the file name predates the student using this client
_RETRY_AFTER_CAP_S = 300.0


# --------------------------------------------------------------------------------------------------------
# errors


class ChatError(Exception):
    """Base of the chat client's errors."""


class ChatRequestError(ChatError):
    """The endpoint refused the request with a 4xx other than 429 (bad request, auth, unknown model): not
    retried, the same request would fail again."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"endpoint answered {status}: {message}")
        self.status = status
        self.message = message


class ChatResponseError(ChatError):
    """A 200 whose body is not a usable chat completion (or has fewer choices than asked for)."""


class ChatUnavailableError(ChatError):
    """Every attempt failed with a retryable error (timeout, connection, 429, 5xx)."""

    def __init__(self, message: str, *, attempts: int, last_status: int | None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_status = last_status


class ChatTimeoutError(ChatUnavailableError):
    """Every attempt failed and the last one timed out."""


class _Retryable(Exception):
    def __init__(self, reason: str, *, status: int | None = None, retry_after: float | None = None,
                 timeout: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.retry_after = retry_after
        self.timeout = timeout


# --------------------------------------------------------------------------------------------------------
# results and accounting


@dataclass(frozen=True)
class ChatCompletion:
    """One ``complete`` call's answer: ``n`` texts, their finish reasons, the tokens and cost of the call
    (zero cost when ``cached``: nothing was sent)."""

    texts: list[str]
    finish_reasons: list[str | None]
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    model: str
    cached: bool


@dataclass
class ChatStats:
    calls: int = 0  # complete() calls
    cache_hits: int = 0  # answered from the disk cache
    coalesced: int = 0  # joined an identical request already in flight
    http_requests: int = 0  # HTTP attempts, retries included
    retries: int = 0
    failures: int = 0  # calls that raised
    prompt_tokens: int = 0  # from `usage`, HTTP answers only
    completion_tokens: int = 0
    usage_missing: int = 0  # answers without a `usage` field
    cost_usd: float = 0.0
    in_flight: int = 0
    peak_in_flight: int = 0
    by_status: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------
# the disk cache


class ResponseCache:
    """Answers by request hash in one sqlite file (WAL). Thread-safe: one connection behind a lock; other
    processes may share the file (sqlite's own locking, 30 s busy timeout). Call it off the event loop."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / CACHE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
                "request TEXT NOT NULL, response TEXT NOT NULL, created REAL NOT NULL)"
            )

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            return json.loads(row[0])
        except json.JSONDecodeError:
            return None

    def put(self, key: str, model: str, request: dict[str, Any], response: dict[str, Any]) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO responses (key, model, request, response, created) VALUES (?, ?, ?, ?, ?)",
                (key, model, json.dumps(request, ensure_ascii=False), json.dumps(response, ensure_ascii=False),
                 time.time()),
            )

    def delete_prompts(self, prompts: Sequence[Any]) -> int:
        """Delete the answers whose request carried one of ``prompts`` (chat message lists); how many went.
        Forgetting a user (retrain/forget.py): a cached request shows the user's window."""
        if not prompts:
            return 0
        wanted = {json.dumps(p, sort_keys=True, ensure_ascii=False) for p in prompts}
        with self._lock:
            doomed = []
            for key, request in self._conn.execute("SELECT key, request FROM responses"):
                try:
                    messages = json.loads(request).get("messages")
                except (json.JSONDecodeError, AttributeError):
                    continue
                if json.dumps(messages, sort_keys=True, ensure_ascii=False) in wanted:
                    doomed.append((key,))
            self._conn.executemany("DELETE FROM responses WHERE key = ?", doomed)
        return len(doomed)

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def request_key(payload: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of (model, messages, sampling parameters)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


# --------------------------------------------------------------------------------------------------------
# the client


def api_headers(api_key: SecretStr | None) -> dict[str, str]:
    """Headers for an OpenAI-compatible server: a bearer token only when a non-empty key is set."""
    headers = {"Accept": "application/json"}
    if api_key is not None and api_key.get_secret_value():
        headers["Authorization"] = f"Bearer {api_key.get_secret_value()}"
    return headers


class ChatClient:
    """Async client of an OpenAI-compatible ``/chat/completions``. Use as an async context manager (or call
    :meth:`aclose`). ``cache_dir``: where the sqlite cache lives; None: no cache. ``transport``: an
    ``httpx`` transport for special set-ups (a proxy, a mounted app). ``name`` says whose endpoint it is in
    logs and errors ("teacher", "student server")."""

    def __init__(
        self,
        config: ChatEndpoint,
        *,
        cache_dir: str | Path | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
        name: str = "teacher",
    ) -> None:
        self.config = c = config
        self.name = name
        self._http = httpx.AsyncClient(
            base_url=c.url.rstrip("/") + "/",
            headers=api_headers(c.api_key),
            timeout=httpx.Timeout(c.timeout_s, connect=c.connect_timeout_s),
            limits=httpx.Limits(max_connections=c.max_concurrency,
                                max_keepalive_connections=c.max_concurrency),
            transport=transport,
        )
        self._slots = asyncio.Semaphore(c.max_concurrency)
        self.cache = ResponseCache(cache_dir) if cache_dir is not None else None
        self.stats = ChatStats()
        self._rng = rng or random.Random()
        self._inflight: dict[str, asyncio.Task[ChatCompletion]] = {}

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        await self._http.aclose()
        if self.cache is not None:
            self.cache.close()

    # -- public API --------------------------------------------------------------------------------------

    async def complete(
        self,
        messages: Sequence[dict[str, str]],
        *,
        n: int = 1,
        temperature: float = 0.7,
        top_p: float = 1.0,
        max_tokens: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> list[str]:
        """``n`` completions of the chat ``messages``. Raises a :class:`ChatError`."""
        result = await self.complete_detailed(messages, n=n, temperature=temperature, top_p=top_p,
                                              max_tokens=max_tokens, seed=seed, stop=stop)
        return result.texts

    async def complete_detailed(
        self,
        messages: Sequence[dict[str, str]],
        *,
        n: int = 1,
        temperature: float = 0.7,
        top_p: float = 1.0,
        max_tokens: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> ChatCompletion:
        """Like :meth:`complete`, with finish reasons, tokens, cost and whether the cache answered."""
        if n < 1:
            raise ValueError("n must be >= 1")
        payload: dict[str, Any] = {
            "model": self.config.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "n": n,
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens or self.config.max_tokens,
            "seed": seed,
            "stop": list(stop) if stop else None,
        }
        key = request_key(payload)
        self.stats.calls += 1
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._cached_or_fetch(key, payload))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._forget(key, t))
        else:
            self.stats.coalesced += 1
        try:
            return await asyncio.shield(task)
        except ChatError:
            self.stats.failures += 1
            raise

    # -- internals ---------------------------------------------------------------------------------------

    def _forget(self, key: str, task: asyncio.Task[ChatCompletion]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have been cancelled

    async def _cached_or_fetch(self, key: str, payload: dict[str, Any]) -> ChatCompletion:
        if self.cache is not None:
            hit = await asyncio.to_thread(self.cache.get, key)
            if hit is not None:
                self.stats.cache_hits += 1
                return ChatCompletion(texts=hit["texts"], finish_reasons=hit["finish_reasons"],
                                         prompt_tokens=hit["prompt_tokens"], completion_tokens=hit["completion_tokens"],
                                         cost_usd=0.0, model=hit["model"], cached=True)
        result = await self._fetch(payload)
        if self.cache is not None:
            record = {"texts": result.texts, "finish_reasons": result.finish_reasons, "model": result.model,
                      "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
            try:
                await asyncio.to_thread(self.cache.put, key, self.config.model, payload, record)
            except sqlite3.Error:  # a full disk must not lose an answer already paid for
                log.warning("%s cache write failed", self.name, exc_info=True)
        return result

    async def _fetch(self, payload: dict[str, Any]) -> ChatCompletion:
        body = {k: v for k, v in payload.items() if v is not None}
        c = self.config
        attempts = c.max_retries + 1
        last: _Retryable | None = None
        for attempt in range(attempts):
            try:
                return await self._attempt(body, payload["n"])
            except _Retryable as exc:
                last = exc
            if attempt + 1 == attempts:
                break
            delay = self._backoff(attempt, last.retry_after)
            self.stats.retries += 1
            log.warning("%s request failed (%s); retry %d/%d in %.2f s", self.name, last, attempt + 1,
                        c.max_retries, delay)
            await asyncio.sleep(delay)
        assert last is not None
        cls = ChatTimeoutError if last.timeout else ChatUnavailableError
        raise cls(f"{self.name} at {c.url} unavailable after {attempts} attempt(s): {last}",
                  attempts=attempts, last_status=last.status) from last

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter under an exponentially growing ceiling; at least ``Retry-After`` when the server sent one."""
        c = self.config
        ceiling = min(c.backoff_max_s, c.backoff_base_s * (2 ** attempt))
        delay = self._rng.uniform(0.0, ceiling)
        if retry_after is not None:
            delay = min(retry_after, _RETRY_AFTER_CAP_S) + self._rng.uniform(0.0, c.backoff_base_s)
        return delay

    async def _attempt(self, body: dict[str, Any], n: int) -> ChatCompletion:
        async with self._slots:
            self.stats.in_flight += 1
            self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
            self.stats.http_requests += 1
            try:
                response = await self._http.post("chat/completions", json=body)
            except httpx.TimeoutException as exc:
                raise _Retryable(f"timeout ({type(exc).__name__})", timeout=True) from exc
            except httpx.TransportError as exc:
                raise _Retryable(f"connection error ({type(exc).__name__}: {exc})") from exc
            finally:
                self.stats.in_flight -= 1
        status = response.status_code
        self.stats.by_status[str(status)] = self.stats.by_status.get(str(status), 0) + 1
        if status == 200:
            return self._parse(response, n)
        message = _error_message(response)
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}: {message}", status=status,
                             retry_after=parse_retry_after(response.headers.get("Retry-After")))
        raise ChatRequestError(status, message)

    def _parse(self, response: httpx.Response, n: int) -> ChatCompletion:
        try:
            data = response.json()
            choices = sorted(data["choices"], key=lambda ch: ch.get("index", 0))
            texts = [(ch.get("message") or {}).get("content") or "" for ch in choices]
            reasons = [ch.get("finish_reason") for ch in choices]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ChatResponseError(f"not a chat completion: {response.text[:300]!r}") from exc
        if len(texts) < n:
            raise ChatResponseError(f"asked for {n} choices, got {len(texts)} (does the endpoint support n?)")
        usage = data.get("usage") or {}
        if not usage:
            self.stats.usage_missing += 1
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        cost = self.config.cost(prompt_tokens, completion_tokens)
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        self.stats.cost_usd += cost
        return ChatCompletion(texts=texts[:n], finish_reasons=reasons[:n], prompt_tokens=prompt_tokens,
                                 completion_tokens=completion_tokens, cost_usd=cost,
                                 model=str(data.get("model") or self.config.model), cached=False)


def _error_message(response: httpx.Response) -> str:
    try:
        data = response.json()
        err = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    except ValueError:
        pass
    return response.text[:300] or response.reason_phrase


__all__ = [
    "ChatClient",
    "ChatCompletion",
    "ChatError",
    "ChatRequestError",
    "ChatResponseError",
    "ChatStats",
    "ChatTimeoutError",
    "ChatUnavailableError",
    "ResponseCache",
    "api_headers",
    "parse_retry_after",
    "request_key",
]
