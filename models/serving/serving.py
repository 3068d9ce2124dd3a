"""The serving layer: validate a chat-completions request, admit it under a bounded queue, run the
blocking backend in a thread pool, and build the OpenAI response.

Admission control, like an overloaded inference server: at most ``max_concurrency`` generations run at
once and at most ``max_queue`` more wait for a slot; a request beyond that is refused at once with
:class:`ServingError` (HTTP 503, ``Retry-After``) instead of queueing without bound. A request whose client
goes away (the handler is cancelled) stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from models.serving.backend import ChatBackend, Generation
from models.serving.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    UsageInfo,
)

log = logging.getLogger(__name__)


class ServingError(Exception):
    """An error answer: HTTP ``status``, OpenAI error ``type``, extra response ``headers``."""

    def __init__(self, status: int, message: str, type_: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.headers = headers or {}

    def response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.status))


def bad_request(message: str, param: str | None = None) -> ServingError:
    return ServingError(400, message, "BadRequestError", param=param)


@dataclass
class ServingStats:
    """Counters served at ``/metrics`` (and partly at ``/health``)."""

    requests_total: int = 0  # every POST /v1/chat/completions, valid or not
    completed: int = 0
    rejected_overloaded: int = 0
    bad_requests: int = 0
    errors: int = 0
    cancelled: int = 0  # the client went away during generation
    prompt_tokens: int = 0
    completion_tokens: int = 0
    running: int = 0
    waiting: int = 0
    peak_running: int = 0
    peak_active: int = 0  # running + waiting, high-water mark
    generation_seconds: float = 0.0
    by_status: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["by_status"] = dict(self.by_status)
        d["completion_tokens_per_s"] = (
            round(self.completion_tokens / self.generation_seconds, 3) if self.generation_seconds else None
        )
        return d


class OpenAIServingChat:
    """``/v1/chat/completions`` and ``/v1/models`` over a :class:`ChatBackend`.

    ``max_tokens_default``: completion tokens when the request names none; ``max_tokens_limit``: the most a
    request may ask for (more is a 400); ``max_n``: the most choices per request; ``retry_after_s``: the
    ``Retry-After`` sent with a 503.
    """

    def __init__(
        self,
        backend: ChatBackend,
        *,
        served_model_name: str | None = None,
        max_concurrency: int = 1,
        max_queue: int = 8,
        retry_after_s: float = 1.0,
        max_tokens_default: int = 256,
        max_tokens_limit: int = 2048,
        max_n: int = 8,
    ) -> None:
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError("max_concurrency must be >= 1 and max_queue >= 0")
        self.backend = backend
        self.model_name = served_model_name or backend.model_id
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.max_tokens_default = max_tokens_default
        self.max_tokens_limit = max_tokens_limit
        self.max_n = max_n
        self.stats = ServingStats()
        self._slots = asyncio.Semaphore(max_concurrency)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="generate")
        self._cancel_events: set[threading.Event] = set()

    # -- endpoints ---------------------------------------------------------------------------------------

    def show_models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, root=self.backend.model_id,
                                         max_model_len=self.backend.max_model_len)])

    async def create_chat_completion(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        """Raises :class:`ServingError` for every non-200 answer."""
        self._check(request)
        max_tokens = request.requested_max_tokens or self.max_tokens_default
        active = self.stats.running + self.stats.waiting
        if active >= self.max_concurrency + self.max_queue:
            self.stats.rejected_overloaded += 1
            raise ServingError(
                503, f"server overloaded: {active} requests in flight (max {self.max_concurrency} running + "
                f"{self.max_queue} queued); retry later", "ServiceUnavailableError",
                headers={"Retry-After": str(max(1, math.ceil(self.retry_after_s)))},
            )
        self.stats.waiting += 1
        self.stats.peak_active = max(self.stats.peak_active, active + 1)
        try:
            await self._slots.acquire()
        finally:
            self.stats.waiting -= 1
        try:
            self.stats.running += 1
            self.stats.peak_running = max(self.stats.peak_running, self.stats.running)
            generations = await self._generate(request, max_tokens)
        finally:
            self.stats.running -= 1
            self._slots.release()
        usage = UsageInfo(prompt_tokens=generations[0].prompt_tokens,
                          completion_tokens=sum(g.completion_tokens for g in generations))
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        self.stats.completed += 1
        self.stats.prompt_tokens += usage.prompt_tokens
        self.stats.completion_tokens += usage.completion_tokens
        return ChatCompletionResponse(
            model=self.model_name,
            choices=[
                ChatCompletionChoice(index=i, message=ChatMessage(role="assistant", content=g.text),
                                     finish_reason=g.finish_reason)
                for i, g in enumerate(generations)
            ],
            usage=usage,
        )

    # -- internals ---------------------------------------------------------------------------------------

    def _check(self, request: ChatCompletionRequest) -> None:
        if request.model != self.model_name:
            raise ServingError(404, f"the model `{request.model}` does not exist; this server serves "
                               f"`{self.model_name}`", "NotFoundError", param="model")
        if request.stream:
            raise bad_request("streaming is not supported by this server; send stream=false", "stream")
        if request.n > self.max_n:
            raise bad_request(f"n must be <= {self.max_n}", "n")
        asked = request.requested_max_tokens
        if asked is not None and asked > self.max_tokens_limit:
            raise bad_request(f"max_tokens must be <= {self.max_tokens_limit}", "max_tokens")
        if not any(m.content.strip() for m in request.messages):
            raise bad_request("messages have no content", "messages")

    async def _generate(self, request: ChatCompletionRequest, max_tokens: int) -> list[Generation]:
        cancel = threading.Event()
        self._cancel_events.add(cancel)
        messages = [m.model_dump() for m in request.messages]
        loop = asyncio.get_running_loop()
        started = time.perf_counter()

        def call() -> list[Generation]:
            return self.backend.complete(
                messages, max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                n=request.n, seed=request.seed, stop=request.stop_list, cancelled=cancel.is_set,
            )

        future = loop.run_in_executor(self._pool, call)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The client went away: stop the generation at its next token and keep the slot until the
            # thread is free again, so the concurrency bound holds for what really runs.
            cancel.set()
            self.stats.cancelled += 1
            await asyncio.wait([future])
            if not future.cancelled():
                future.exception()  # retrieved: nobody else will
            raise
        finally:
            self.stats.generation_seconds += time.perf_counter() - started
            self._cancel_events.discard(cancel)

    def close(self) -> None:
        """Stop running generations at their next token and free the pool (the server is shutting down)."""
        for ev in list(self._cancel_events):
            ev.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["OpenAIServingChat", "ServingError", "ServingStats", "bad_request"]
