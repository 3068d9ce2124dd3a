"""Forgetting a user on disk: everything the project writes that names them, and a ledger that keeps them out.

The stream's part (window, rationale points, recommendation) is the worker's, driven by the ``forget`` control
record (:mod:`agents.forget`). This module is the files' part, run by ``slimstream forget``:

* every JSONL record with the user's ``user_id`` under the data directory and the registry: teacher
  rationale datasets (``rationales/``), the retrain cycles' datasets and their training splits
  (``<registry>/data/``), rewritten atomically without them;
* the teacher/student response cache (sqlite): the answers to those records' prompts (the prompt shows the
  user's window, so the cached request is their data too);
* the ledger ``<data_dir>/forgotten.jsonl``: a SHA-256 of each forgotten user id and when. Datasets built later
  from a dataset source (``teacher-rationales``, a retrain cycle over a dataset) skip these users. The ledger
  keeps a hash, not the id; a hash of a guessable id can be matched by whoever can guess it, which is what
  the skip needs. A Kafka source needs no ledger: the control record itself, read in log order, drops the
  user's earlier events (:func:`drop_forgotten`).

Not reachable from here: the records already in Kafka's interactions topic (they age out with its retention;
nothing reads them again except a retrain cycle, which drops them) and copies outside the data directory.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from models.openai_client import CACHE_FILE, ResponseCache
from streams.registry import write_text_atomic
from streams.settings import Settings

LEDGER = "forgotten.jsonl"
_SKIP_DIRS = {"faust", "qdrant", "qdrant-template", "encoder", "student", "student-gguf", "teacher", "checkpoints"}
E = TypeVar("E")


def forget_hash(user_id: str) -> str:
    return hashlib.sha256(f"slimstream-forget:{user_id}".encode()).hexdigest()


class ForgetLedger:
    """``<data_dir>/forgotten.jsonl``: one ``{"user_sha256", "forgotten_at"}`` line per forget, appended."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def for_settings(cls, settings: Settings) -> ForgetLedger:
        return cls(settings.data.data_dir / LEDGER)

    def add(self, user_id: str, at: float | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"user_sha256": forget_hash(user_id), "forgotten_at": at or time.time()}) + "\n")

    def hashes(self) -> frozenset[str]:
        if not self.path.is_file():
            return frozenset()
        out = set()
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.add(json.loads(line)["user_sha256"])
        return frozenset(out)

    def __contains__(self, user_id: object) -> bool:
        return isinstance(user_id, str) and forget_hash(user_id) in self.hashes()

    def keep(self, items: Iterable[E], user_of: Any = lambda e: e.user_id) -> list[E]:
        """``items`` without those of forgotten users (one ledger read)."""
        gone = self.hashes()
        return [e for e in items if forget_hash(str(user_of(e))) not in gone] if gone else list(items)


@dataclass
class ScrubReport:
    files: dict[str, int] = field(default_factory=dict)  # path -> records removed
    cache_rows: int = 0

    @property
    def records(self) -> int:
        return sum(self.files.values())


def _jsonl_files(roots: Sequence[Path]) -> Iterator[Path]:
    seen: set[Path] = set()
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.jsonl")):
            real = path.resolve()
            if real in seen or any(part in _SKIP_DIRS for part in path.relative_to(root).parts[:-1]):
                continue
            seen.add(real)
            yield path


def _scrub_jsonl(path: Path, user_id: str) -> tuple[int, list[Any]]:
    """Rewrite ``path`` without the records of ``user_id``; returns (removed, their prompts)."""
    needle = json.dumps(user_id)  # the id as it appears in a JSON line: cheap pre-filter before parsing
    text = path.read_text(encoding="utf-8")
    if needle not in text:
        return 0, []
    kept, prompts = [], []
    for line in text.splitlines(keepends=True):
        if needle in line:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) and record.get("user_id") == user_id:
                if record.get("messages"):
                    prompts.append(record["messages"])
                continue
        kept.append(line)
    removed = len(text.splitlines()) - len(kept)
    if removed:
        write_text_atomic(path, "".join(kept))
    return removed, prompts


def scrub_files(settings: Settings, user_id: str) -> ScrubReport:
    """Remove ``user_id``'s records from every dataset file the project wrote, and their cached answers."""
    report = ScrubReport()
    prompts: list[Any] = []
    for path in _jsonl_files([settings.data.data_dir, settings.registry_path]):
        if path.name == LEDGER:
            continue
        removed, found = _scrub_jsonl(path, user_id)
        if removed:
            report.files[str(path)] = removed
            prompts.extend(found)
    if prompts:
        for path in settings.data.data_dir.rglob(CACHE_FILE):  # the teacher's and any student server's cache
            cache = ResponseCache(path.parent)
            try:
                report.cache_rows += cache.delete_prompts(prompts)
            finally:
                cache.close()
    return report


def drop_forgotten(events: list[E], forget_user: str) -> list[E]:
    """A log read in order met a forget record of ``forget_user``: the user's events read so far go."""
    return [e for e in events if getattr(e, "user_id", None) != forget_user]


__all__ = ["LEDGER", "ForgetLedger", "ScrubReport", "drop_forgotten", "forget_hash", "scrub_files"]
