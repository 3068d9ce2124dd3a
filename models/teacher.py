"""The teacher: SLIM's large LLM behind any OpenAI-compatible chat endpoint (the ``teacher`` settings section).

The client is :class:`models.openai_client.ChatClient`; this module says where a teacher's answers are cached
and how a teacher is named in the datasets and manifests it produced.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from models.openai_client import ChatClient
from streams.settings import ChatEndpoint, Settings

CACHE_DIR = "teacher-cache"


def teacher_cache_dir(data_dir: str | Path) -> Path:
    """Where teacher answers are cached (sqlite): a rerun of a teacher job costs nothing."""
    return Path(data_dir) / CACHE_DIR


def open_teacher(settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None) -> ChatClient:
    """A client of the configured teacher with the disk cache under ``<data_dir>/teacher-cache``."""
    return ChatClient(settings.teacher, cache_dir=teacher_cache_dir(settings.data.data_dir), transport=transport,
                      name="teacher")


def teacher_id(endpoint: ChatEndpoint) -> str:
    """``model@url``: how a dataset or a manifest names the teacher that wrote it."""
    return f"{endpoint.model}@{endpoint.url}"


__all__ = ["CACHE_DIR", "open_teacher", "teacher_cache_dir", "teacher_id"]
