"""The drift reference format: what a registry version was distilled on, written by the retrain job next to the
version (``<registry>/<version>/drift_reference.json``) and read by the worker's drift monitor and the next
retrain cycle. It sits below both so that neither imports the other."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from streams.registry import ModelRegistry, utc_now, write_text_atomic

log = logging.getLogger(__name__)


class GenreSnapshot(BaseModel):
    """A frozen genre mix: the reference the live window is compared with. ``events``: how many went in."""

    model_config = ConfigDict(frozen=True)

    proportions: dict[str, float]
    events: int = Field(ge=0)
    created_at: str = Field(default_factory=utc_now)

    def save(self, path: str | Path) -> None:
        write_text_atomic(Path(path), self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: str | Path) -> GenreSnapshot:
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))


class DriftReference(BaseModel):
    """What the serving student was distilled on, to measure drift against. Any part may be missing; the
    signal that needs it is then not evaluated."""

    model_config = ConfigDict(frozen=True)

    FORMAT: ClassVar[int] = 1

    format: int = FORMAT
    model_version: str | None = None
    genres: GenreSnapshot | None = None
    rationale_centroid: list[float] | None = None
    rationale_samples: int | None = Field(
        None, ge=0, description="Rationales the centroid averages; None: not recorded (older files).")
    hit_rate: float | None = Field(None, ge=0, le=1, description="Online hit rate of model_version at the reference.")
    created_at: str = Field(default_factory=utc_now)

    def save(self, path: str | Path) -> None:
        write_text_atomic(Path(path), self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: str | Path) -> DriftReference:
        ref = cls.model_validate_json(Path(path).read_text(encoding="utf-8"))
        if ref.format != cls.FORMAT:
            raise ValueError(f"{path}: drift reference format {ref.format}, this code reads {cls.FORMAT}")
        return ref


DRIFT_REFERENCE_FILE = "drift_reference.json"  # in <registry>/<version>/, written by the retrain job


def drift_reference_path(registry: ModelRegistry, version: str) -> Path:
    return registry.version_dir(version) / DRIFT_REFERENCE_FILE


def read_drift_reference(registry: ModelRegistry, version: str | None) -> DriftReference | None:
    """Registry ``version``'s drift reference; None for the base model, a version without one, or one that
    cannot be read (logged: monitoring must never stop the worker or the retrain job)."""
    if version is None:
        return None
    path = drift_reference_path(registry, version)
    if not path.is_file():
        return None
    try:
        return DriftReference.load(path)
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable drift reference %s: %s", path, exc)
        return None


__all__ = ["DRIFT_REFERENCE_FILE", "DriftReference", "GenreSnapshot", "drift_reference_path", "read_drift_reference"]
