"""The HTTP front of the OpenAI-compatible server (aiohttp).

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health`` (200 with a few counters) and
``GET /metrics`` (all counters, JSON). With ``api_key`` set, the ``/v1`` routes want
``Authorization: Bearer <key>``.

Run it::

    python -m models.serving.api_server --port 8000                       # the embedded teacher (0.5B)
    python -m models.serving.api_server --port 8000 --gguf-dir D --gguf-file F [--served-model-name NAME]

The model is loaded before the port opens: poll ``/health`` to know when the server is up.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import sys
import time
from pathlib import Path

from aiohttp import web
from pydantic import ValidationError

from models.serving.protocol import ChatCompletionRequest
from models.serving.serving import OpenAIServingChat, ServingError, bad_request

log = logging.getLogger(__name__)

SERVING_KEY: web.AppKey[OpenAIServingChat] = web.AppKey("serving", OpenAIServingChat)
API_KEY: web.AppKey[str | None] = web.AppKey("api_key", str)  # type: ignore[arg-type]


def _error(exc: ServingError) -> web.Response:
    return web.json_response(exc.response().model_dump(), status=exc.status, headers=exc.headers)


def _count(serving: OpenAIServingChat, status: int) -> None:
    key = str(status)
    serving.stats.by_status[key] = serving.stats.by_status.get(key, 0) + 1


def _authorized(request: web.Request) -> bool:
    key = request.app[API_KEY]
    if not key:
        return True
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())


async def chat_completions(request: web.Request) -> web.Response:
    serving = request.app[SERVING_KEY]
    serving.stats.requests_total += 1
    try:
        if not _authorized(request):
            raise ServingError(401, "invalid or missing API key", "AuthenticationError")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad_request("the request body is not valid JSON") from None
        try:
            chat_request = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            raise bad_request(f"invalid request: {param}: {first.get('msg')}", param) from None
        response = await serving.create_chat_completion(chat_request)
    except ServingError as exc:
        if exc.status in (400, 404, 401):
            serving.stats.bad_requests += 1
        _count(serving, exc.status)
        return _error(exc)
    except Exception as exc:  # a backend failure: 500, the server goes on
        log.exception("chat completion failed")
        serving.stats.errors += 1
        _count(serving, 500)
        return _error(ServingError(500, f"generation failed: {type(exc).__name__}: {exc}", "InternalServerError"))
    _count(serving, 200)
    return web.json_response(response.model_dump())


async def models(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _error(ServingError(401, "invalid or missing API key", "AuthenticationError"))
    return web.json_response(request.app[SERVING_KEY].show_models().model_dump())


async def health(request: web.Request) -> web.Response:
    serving = request.app[SERVING_KEY]
    s = serving.stats
    return web.json_response({"status": "ok", "model": serving.model_name, "requests_total": s.requests_total,
                              "running": s.running, "waiting": s.waiting})


async def metrics(request: web.Request) -> web.Response:
    serving = request.app[SERVING_KEY]
    return web.json_response({"model": serving.model_name, "max_concurrency": serving.max_concurrency,
                              "max_queue": serving.max_queue, **serving.stats.as_dict()})


def build_app(serving: OpenAIServingChat, *, api_key: str | None = None) -> web.Application:
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[SERVING_KEY] = serving
    app[API_KEY] = api_key
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)

    async def on_shutdown(_: web.Application) -> None:
        serving.close()

    app.on_shutdown.append(on_shutdown)
    return app


# --------------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.serving.api_server",
                                description="OpenAI-compatible chat-completions server for a local GGUF model.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--gguf-dir", type=Path, help="directory holding the GGUF (default: the embedded teacher)")
    p.add_argument("--gguf-file", help="GGUF file name in --gguf-dir")
    p.add_argument("--teacher", choices=["0.5b", "1.5b"], default="0.5b",
                   help="embedded teacher to serve when --gguf-file is not given (assembled on first use)")
    p.add_argument("--served-model-name", help="the model id clients send (default: the GGUF's stem)")
    p.add_argument("--data-dir", type=Path, help="caches (default: SLIMSTREAM_DATA_DIR or .slimstream)")
    p.add_argument("--max-concurrency", type=int, default=1, help="generations running at once")
    p.add_argument("--max-queue", type=int, default=8, help="requests waiting for a slot; more get 503")
    p.add_argument("--retry-after", type=float, default=1.0, help="Retry-After seconds sent with a 503")
    p.add_argument("--max-tokens-default", type=int, default=256)
    p.add_argument("--max-tokens-limit", type=int, default=2048)
    p.add_argument("--backend", choices=["transformers", "llamacpp"], default="transformers",
                   help="transformers (de-quantized, always installed) or llamacpp (quantized, ~6x faster; "
                        "the slimstream[llamacpp] extra)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: SLIMSTREAM_STUDENT_THREADS)")
    p.add_argument("--generation-timeout", type=float, default=600.0, help="time limit of one generation, s")
    p.add_argument("--api-key", default=os.environ.get("SLIMSTREAM_SERVE_API_KEY"),
                   help="require this bearer token (default: SLIMSTREAM_SERVE_API_KEY; none if unset)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    if args.gguf_dir is not None and args.gguf_file is None:
        p.error("--gguf-dir needs --gguf-file")
    if args.max_concurrency < 1 or args.max_queue < 0:
        p.error("--max-concurrency must be >= 1 and --max-queue >= 0")
    return args


def build_serving(args: argparse.Namespace) -> OpenAIServingChat:
    """Load the model (blocking) and wrap it in the serving layer."""
    from models.serving.backend import ChatBackend, TransformersChatBackend
    from streams.settings import Settings

    settings = Settings.from_env()  # an entry point (python -m models.serving.api_server)
    data_dir = args.data_dir or settings.data.data_dir
    if args.gguf_file:
        gguf = (args.gguf_dir or Path(".")) / args.gguf_file
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF not found: {gguf}")
        model_id = args.served_model_name or gguf.stem
    else:
        from models.teacher_weights import VARIANTS, assemble_teacher

        gguf = assemble_teacher(args.teacher, data_dir)
        model_id = args.served_model_name or VARIANTS[args.teacher].model_id
    threads = args.threads or settings.student.threads
    backend: ChatBackend
    if args.backend == "llamacpp":
        from models.llamacpp import LlamaCppChatBackend

        backend = LlamaCppChatBackend(gguf, model_id=model_id, threads=threads, deadline_s=args.generation_timeout)
    else:
        backend = TransformersChatBackend.from_gguf(gguf, data_dir=data_dir, model_id=model_id, threads=threads,
                                                    deadline_s=args.generation_timeout)
    return OpenAIServingChat(
        backend, served_model_name=model_id, max_concurrency=args.max_concurrency, max_queue=args.max_queue,
        retry_after_s=args.retry_after, max_tokens_default=args.max_tokens_default,
        max_tokens_limit=args.max_tokens_limit,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    started = time.perf_counter()
    serving = build_serving(args)
    log.info("serving %s on http://%s:%d/v1 (loaded in %.1f s; %d running + %d queued)", serving.model_name,
             args.host, args.port, time.perf_counter() - started, serving.max_concurrency, serving.max_queue)
    # handler_cancellation: a client that disconnects cancels its handler, which stops the generation.
    web.run_app(build_app(serving, api_key=args.api_key), host=args.host, port=args.port,
                handler_cancellation=True, print=None, access_log=None, shutdown_timeout=5.0)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as exc:  # no GGUF, teacher wheels not installed, damaged parts
        print(f"api_server: error: {exc}", file=sys.stderr)
        sys.exit(1)
