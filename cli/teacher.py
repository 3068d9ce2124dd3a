"""Teacher commands: ``serve-teacher`` (an OpenAI-compatible server) and ``teacher-rationales`` (a dataset)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import Progress

from cli.base import cli, console, fail, load_settings, progress_bar


# --- serve-teacher ---------------------------------------------------------------------------------------
@cli.command("serve-teacher")
def serve_teacher(
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port")] = 8000,
    host: Annotated[str, typer.Option(help="bind address (0.0.0.0 in a container)")] = "127.0.0.1",
    teacher: Annotated[str, typer.Option(help="embedded teacher: 0.5b or 1.5b (scripts/install-teacher.sh)")] = "0.5b",
    gguf: Annotated[Optional[Path], typer.Option(help="serve this GGUF file instead of the embedded teacher")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="model id clients send (default: the teacher's or the GGUF's name)")] = None,
    max_concurrency: Annotated[int, typer.Option(min=1, help="generations running at once")] = 1,
    max_queue: Annotated[int, typer.Option(min=0, help="requests waiting for a slot; more get 503 + Retry-After")] = 8,
    max_tokens_default: Annotated[int, typer.Option(min=1, help="completion tokens when a request names none")] = 256,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch threads (default SLIMSTREAM_STUDENT_THREADS)")] = None,
    backend: Annotated[str, typer.Option(help="transformers, or llamacpp (~6x faster; the slimstream[llamacpp] extra)")] = "transformers",
    api_key: Annotated[Optional[str], typer.Option(envvar="SLIMSTREAM_SERVE_API_KEY", show_default=False,
                                                   help="require this bearer token on /v1")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Serve the offline teacher (or any GGUF chat model) as an OpenAI-compatible API on /v1."""
    if teacher not in ("0.5b", "1.5b"):
        raise typer.BadParameter(f"unknown teacher {teacher!r}: 0.5b or 1.5b", param_hint="--teacher")
    if log_level.lower() not in {"debug", "info", "warning", "error"}:
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    if gguf is not None and not gguf.is_file():
        raise typer.BadParameter(f"no such file: {gguf}", param_hint="--gguf")
    if backend not in ("transformers", "llamacpp"):
        raise typer.BadParameter(f"unknown backend {backend!r}: transformers or llamacpp", param_hint="--backend")
    from models.serving import api_server

    argv = ["--host", host, "--port", str(port), "--teacher", teacher, "--max-concurrency", str(max_concurrency),
            "--max-queue", str(max_queue), "--max-tokens-default", str(max_tokens_default),
            "--log-level", log_level.lower(), "--backend", backend]
    if gguf is not None:
        argv += ["--gguf-dir", str(gguf.parent), "--gguf-file", gguf.name]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if threads:
        argv += ["--threads", str(threads)]
    if api_key:
        argv += ["--api-key", api_key]
    try:
        api_server.main(argv)
    except (FileNotFoundError, ValueError) as exc:  # teacher wheels not installed, damaged parts
        fail(str(exc))



# --- teacher-rationales ---------------------------------------------------------------------------------
@cli.command("teacher-rationales")
def teacher_rationales(
    data: Annotated[Optional[str], typer.Option(help="ml-1m, ml-100k or a directory (default: SLIMSTREAM_DATASET)")] = None,
    users: Annotated[int, typer.Option(help="seeded training users (a larger N on the same version adds users)")] = 100,
    samples: Annotated[int, typer.Option(help="teacher samples per window; the best by outcome score is kept")] = 4,
    window_size: Annotated[Optional[int], typer.Option(help="items in the prompt window (default: SLIMSTREAM_WINDOW_SIZE)")] = None,
    targets: Annotated[int, typer.Option(help="next training items after the window used to score samples")] = 3,
    seed: Annotated[int, typer.Option(help="seed of the user draw and the teacher's sampling")] = 0,
    temperature: Annotated[float, typer.Option(help="sampling temperature (> 0)")] = 0.8,
    max_tokens: Annotated[Optional[int], typer.Option(help="tokens per rationale (default: SLIMSTREAM_TEACHER_MAX_TOKENS)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="directory of the datasets (default <data_dir>/rationales)")] = None,
    version: Annotated[Optional[str], typer.Option(help="dataset version, the file name (default <data>-<prompt>-<model>)")] = None,
) -> None:
    """Outcome-filtered teacher rationales for training windows: OUT/VERSION.jsonl (+ .meta.json); resumable."""
    import re as _re

    from models.encoder import load_encoder
    from models.openai_client import ChatError
    from models.teacher import open_teacher
    from retrain.forget import ForgetLedger
    from retrain.rationales import generate_rationales

    for name, value in (("--users", users), ("--samples", samples), ("--window-size", window_size),
                        ("--targets", targets), ("--max-tokens", max_tokens)):
        if value is not None and value < 1:
            raise typer.BadParameter(f"must be at least 1, got {value}", param_hint=name)
    if temperature <= 0:
        raise typer.BadParameter(f"must be > 0, got {temperature}", param_hint="--temperature")
    if version is not None and not _re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", version):
        raise typer.BadParameter("letters, digits, '.', '_' and '-' only", param_hint="--version")
    settings = load_settings()
    source = data or settings.data.dataset
    out_dir = out or settings.data.data_dir / "rationales"

    async def job(progress: Progress, task) -> object:  # type: ignore[no-untyped-def]
        encoder = await asyncio.to_thread(load_encoder, settings)
        async with open_teacher(settings) as teacher:
            return await generate_rationales(
                source, teacher=teacher, encoder=encoder, out_dir=out_dir, dataset_version=version, n_users=users,
                ledger=ForgetLedger.for_settings(settings),
                samples=samples, window_size=window_size or settings.worker.window_size, n_targets=targets, seed=seed,
                temperature=temperature, max_tokens=max_tokens,
                progress=lambda done, total: progress.update(task, completed=done, total=total))

    def stop(signum: int, frame: object) -> None:
        # SIGTERM (a scheduler stopping the job) like Ctrl-C: the job's clean-up writes the .meta.json counts.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with progress_bar() as progress:
        task = progress.add_task("teacher rationales", total=None)
        try:
            result = asyncio.run(job(progress, task))
        except ChatError as exc:
            fail(f"teacher at {settings.teacher.url} (SLIMSTREAM_TEACHER_URL) failed: {exc}")
        except (ValueError, FileNotFoundError) as exc:
            fail(str(exc), 2)
    console.print(f"{result.path}: {result.records} records ({result.written} new, {result.skipped} already there"
                  + (f", {result.empty} with only empty samples" if result.empty else "") + "); "
                  f"teacher: {result.teacher_stats['http_requests']} requests, "
                  f"{result.teacher_stats['cache_hits']} cached, ${result.teacher_stats['cost_usd']:.4f}")


