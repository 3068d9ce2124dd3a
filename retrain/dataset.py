"""The rationale dataset: what the teacher wrote for which window, as versioned JSONL.

One line per training example. ``slimstream teacher-rationales`` writes it; ``slimstream distill`` reads it.
The prompt is stored as the exact chat messages so distillation trains on what the stream will ask.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

DATASET_FORMAT = 1


class RationaleRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    user_id: str
    window: list[str] = Field(description="Item ids shown to the teacher, oldest to newest.")
    target_items: list[str] = Field(default_factory=list, description="The user's next items (outcome filter).")
    messages: list[dict[str, str]] = Field(description="The chat prompt (system + user).")
    rationale: str
    teacher: str = Field(description="Teacher id: model name and endpoint kind.")
    score: float | None = Field(None, description="Outcome score of the kept sample (higher is better).")
    prompt_version: str
    dataset_version: str
    format: int = DATASET_FORMAT


def write_records(path: Path, records: Iterable[RationaleRecord], append: bool = True) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("a" if append else "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(r.model_dump_json() + "\n")
            fh.flush()  # one line per example as soon as it exists: a crash loses at most the current one
            n += 1
    return n


def read_records(path: Path) -> Iterator[RationaleRecord]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield RationaleRecord.model_validate(json.loads(line))
            except (json.JSONDecodeError, ValueError) as exc:
                raise ValueError(f"{path}:{lineno}: not a rationale record: {exc}") from None
