"""A small filesystem registry of distilled student adapters.

Layout under the registry root (default ``<data_dir>/registry``)::

    v0001/manifest.json      what was trained from what: base model, parent, data, hyper-parameters, metrics
    v0001/adapter/           the PEFT LoRA adapter (``TransformersStudent(adapter_dir=...)`` loads it)
    v0001/train_log.jsonl    one line per optimizer step
    CURRENT                  the version the stream serves (absent: the base model)
    history.jsonl            every promote / rollback, appended
    rankers/                 the trained rankers: the same layout, one ``models/ranker_artifact.py``
                             directory per version (CURRENT absent: the worker serves the text ranker)

A version directory appears in one ``os.rename`` of a finished staging directory, so readers never see a
half-written version; ``CURRENT`` is replaced atomically too. Promote and rollback hold a file lock, so two
processes cannot interleave them. The model version the stream reports for a version is
``<settings.student.model_version>+<version>``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from streams.settings import Settings

MANIFEST = "manifest.json"
ADAPTER = "adapter"
CURRENT = "CURRENT"
HISTORY = "history.jsonl"
RANKERS = "rankers"
TEXT_RANKER = "text-cosine"  # what serves while no ranker is promoted (agents/recommend.py's text ranker)
MANIFEST_FORMAT = 1

_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_AUTO_VERSION = re.compile(r"^v(\d+)$")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def validate_version(version: str) -> str:
    if not _VERSION_NAME.match(version) or version in (ADAPTER, CURRENT, RANKERS):
        raise ValueError(f"invalid version name {version!r}: use letters, digits, '.', '_', '-' (max 64)")
    return version


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_registry_dir(settings: Settings) -> Path:
    """``data.registry_dir`` when it is set, else ``<data_dir>/registry``."""
    return settings.registry_path


class ModelRegistry:
    """Versioned artifacts plus a ``CURRENT`` pointer with promote / rollback history. ``artifact``: the file a
    version must have to be promoted (the student's LoRA adapter config; a ranker's weights)."""

    def __init__(self, root: str | os.PathLike[str], artifact: str = f"{ADAPTER}/adapter_config.json",
                 kind: str = "student") -> None:
        self.root = Path(root)
        self.artifact = artifact
        self.kind = kind

    @classmethod
    def for_settings(cls, settings: Settings) -> ModelRegistry:
        return cls(default_registry_dir(settings))

    @classmethod
    def rankers_for_settings(cls, settings: Settings) -> ModelRegistry:
        """The ranker registry: ``<registry>/rankers``."""
        return cls.for_settings(settings).rankers()

    def rankers(self) -> ModelRegistry:
        """The ranker registry beside this student registry (``<root>/rankers``)."""
        return ModelRegistry(self.root / RANKERS, artifact="weights.pt", kind="ranker")

    # -- versions ----------------------------------------------------------------------------------------

    def version_dir(self, version: str) -> Path:
        return self.root / validate_version(version)

    def adapter_dir(self, version: str) -> Path:
        return self.version_dir(version) / ADAPTER

    def exists(self, version: str) -> bool:
        return _VERSION_NAME.match(version) is not None and (self.root / version / MANIFEST).is_file()

    def list_versions(self) -> list[str]:
        """Published versions, oldest first (``v<N>`` by N, then others by creation time)."""
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir()
                 if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()]

        def key(name: str) -> tuple[int, float, str]:
            m = _AUTO_VERSION.match(name)
            if m:
                return (0, float(m.group(1)), name)
            return (1, (self.root / name / MANIFEST).stat().st_mtime, name)

        return sorted(found, key=key)

    def get(self, version: str) -> dict[str, Any]:
        """The version's manifest. Raises ``KeyError`` for an unknown version."""
        if not self.exists(version):
            raise KeyError(f"no model version {version!r} in {self.root}")
        return json.loads((self.root / version / MANIFEST).read_text(encoding="utf-8"))

    def latest(self) -> str | None:
        versions = self.list_versions()
        return versions[-1] if versions else None

    def model_version(self, version: str | None, settings: Settings) -> str:
        """What recommendations report for ``version`` (``None``: the base student; for rankers: the text
        ranker)."""
        if self.kind == "ranker":
            return TEXT_RANKER if version is None else f"ranker+{version}"
        base = settings.student.model_version
        return base if version is None else f"{base}+{version}"

    # -- publishing --------------------------------------------------------------------------------------

    def staging_dir(self) -> Path:
        """A fresh hidden directory inside the root to build a version in (same filesystem: rename works)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f".staging-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        return path

    def _next_auto_version(self) -> str:
        numbers = [int(m.group(1)) for p in (self.root.iterdir() if self.root.is_dir() else ())
                   if (m := _AUTO_VERSION.match(p.name))]
        return f"v{max(numbers, default=0) + 1:04d}"

    def publish(self, staging: Path, version: str | None = None,
                manifest: dict[str, Any] | None = None) -> str:
        """Rename the finished ``staging`` directory to ``<root>/<version>`` and return the version.

        With ``version=None`` the next free ``v<NNNN>`` is taken (retrying if another process took it
        first). ``manifest``, when given, is written into the staging directory first with its
        ``"version"`` set to the final name.
        """
        with self._lock():
            while True:
                name = validate_version(version) if version else self._next_auto_version()
                if manifest is not None:
                    manifest["version"] = name
                    write_text_atomic(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
                if not (staging / MANIFEST).is_file():
                    raise ValueError(f"{staging} has no {MANIFEST}")
                target = self.root / name
                try:
                    if target.exists():
                        raise FileExistsError(target)
                    os.rename(staging, target)  # fails if target appeared meanwhile (non-empty)
                except OSError:
                    if version:
                        raise FileExistsError(f"model version {name!r} already exists in {self.root}") from None
                    continue
                return name

    # -- CURRENT, promote, rollback ----------------------------------------------------------------------

    def current(self) -> str | None:
        """The served version, or ``None`` for the base model."""
        try:
            text = (self.root / CURRENT).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return text or None

    def current_adapter_dir(self) -> Path | None:
        version = self.current()
        return None if version is None else self.adapter_dir(version)

    def history(self) -> list[dict[str, Any]]:
        path = self.root / HISTORY
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def promote(self, version: str, *, reason: str = "") -> None:
        """Make ``version`` the served one. A no-op when it already is."""
        if not self.exists(version):
            raise KeyError(f"no model version {version!r} in {self.root}")
        if not (self.version_dir(version) / self.artifact).is_file():
            raise ValueError(f"{self.kind} version {version!r} has no {self.artifact}")
        with self._lock():
            previous = self.current()
            if previous == version:
                return
            self._record("promote", version, previous, reason)

    def rollback(self, *, reason: str = "") -> str | None:
        """Undo the last promote still in effect: serve the version that was current before it (``None``:
        the base model). Returns the new current version. Raises ``LookupError`` when nothing was promoted.
        """
        with self._lock():
            stack = self._served_stack()
            if not stack:
                raise LookupError("nothing to roll back: the base model is being served")
            previous = stack[-1]
            target = stack[-2] if len(stack) > 1 else None
            self._record("rollback", target, previous, reason)
            return target

    def _served_stack(self) -> list[str]:
        """Replay the history: promote pushes, rollback pops."""
        stack: list[str] = []
        for entry in self.history():
            if entry.get("action") == "promote":
                stack.append(entry["version"])
            elif entry.get("action") == "rollback" and stack:
                stack.pop()
        return stack

    def _record(self, action: str, version: str | None, previous: str | None, reason: str) -> None:
        entry = {"at": utc_now(), "ts": time.time(), "action": action, "version": version,
                 "previous": previous, "reason": reason}
        with (self.root / HISTORY).open("a", encoding="utf-8") as fh:  # the log first: CURRENT follows it
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if version is None:
            (self.root / CURRENT).unlink(missing_ok=True)
        else:
            write_text_atomic(self.root / CURRENT, version + "\n")

    @contextmanager
    def _lock(self) -> Iterator[None]:
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / ".lock"), timeout=60):
            yield


__all__ = [
    "ADAPTER",
    "CURRENT",
    "HISTORY",
    "MANIFEST",
    "MANIFEST_FORMAT",
    "ModelRegistry",
    "RANKERS",
    "TEXT_RANKER",
    "default_registry_dir",
    "utc_now",
    "validate_version",
    "write_text_atomic",
]
