"""Catalogue and interaction loading: the bundled MovieLens files and users' CSV/JSONL files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streams.datasets import Interaction, Item, item_text, load_interactions, load_items, sample_users


# --- bundled MovieLens -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ml100k_interactions() -> list[Interaction]:
    return load_interactions("ml-100k")


def test_ml1m_items() -> None:
    items = load_items("ml-1m")
    assert len(items) == 3883
    assert len({i.item_id for i in items}) == 3883
    assert all(i.year is not None and 1900 <= i.year <= 2001 for i in items)
    assert all(i.genres for i in items)
    toy = items[0]
    assert toy == Item(item_id="Toy Story (1995)", title="Toy Story", year=1995,
                       genres=("Animation", "Children's", "Comedy"))
    assert item_text(toy) == "Toy Story (1995). Genres: Animation, Children's, Comedy."


def test_ml100k_items_are_deduplicated_and_tolerate_placeholders() -> None:
    items = load_items("ml-100k")
    ids = [i.item_id for i in items]
    assert len(ids) == len(set(ids)) == 1664  # 1682 rows, 18 listed twice
    by_id = {i.item_id: i for i in items}
    assert by_id["GoldenEye (1995)"].genres == ("Action", "Adventure", "Thriller")
    # the file's placeholder rows load with no year and no "unknown" pseudo-genre
    assert by_id["unkonwn (unkonwn)"].year is None
    assert by_id["unkonwn (unkonwn)"].genres == ()


def test_ml100k_interactions(ml100k_interactions: list[Interaction]) -> None:
    inter = ml100k_interactions
    assert len(inter) == 100_000
    assert inter[0] == Interaction("100k_196", "Kolya (1996)", 3.0, 881250949.0)
    assert len({i.user_id for i in inter}) == 943
    assert {i.rating for i in inter} == {1.0, 2.0, 3.0, 4.0, 5.0}
    catalogue = {i.item_id for i in load_items("ml-100k")}
    assert {i.item_id for i in inter} <= catalogue


def test_ml1m_interactions_load() -> None:
    inter = load_interactions("ml-1m")
    assert len(inter) == 1_000_209
    assert inter[0] == Interaction("1m_1", "One Flew Over the Cuckoo's Nest (1975)", 5.0, 978300760.0)
    assert isinstance(inter[-1].timestamp, float)


def test_sample_users_is_seeded_and_time_ordered(ml100k_interactions: list[Interaction]) -> None:
    a = sample_users(ml100k_interactions, 25, seed=3)
    b = sample_users(list(reversed(ml100k_interactions)), 25, seed=3)
    users = {i.user_id for i in a}
    assert len(users) == 25
    assert users == {i.user_id for i in b}  # the draw does not depend on input order
    assert {i.user_id for i in sample_users(ml100k_interactions, 25, seed=4)} != users
    keys = [(i.timestamp, i.user_id) for i in a]
    assert keys == sorted(keys)
    # every event of each chosen user is there
    per_user = {u: sum(1 for i in ml100k_interactions if i.user_id == u) for u in users}
    assert len(a) == sum(per_user.values())
    assert min(per_user.values()) >= 5


def test_sample_users_min_events_and_limits() -> None:
    inter = [Interaction("heavy", f"i{k}", None, float(k)) for k in range(6)]
    inter += [Interaction("light", "i0", None, 1.0)]
    assert {i.user_id for i in sample_users(inter, 10, seed=0)} == {"heavy"}
    assert len(sample_users(inter, 10, seed=0, min_events=1)) == 7
    with pytest.raises(ValueError):
        sample_users(inter, 0, seed=0)


def test_unknown_source_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="ml-1m"):
        load_items("ml-25m")


# --- item text ------------------------------------------------------------------------------------------
def test_item_text_variants() -> None:
    assert item_text(Item(item_id="x", title="American President, The", year=1995, genres=("Drama",))) == \
        "The American President (1995). Genres: Drama."
    assert item_text(Item(item_id="x", title="Heat", year=None, genres=())) == "Heat."
    assert item_text(Item(item_id="x", title="Heat", year=1995)) == "Heat (1995)."


# --- user files -----------------------------------------------------------------------------------------
def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_user_items_csv(tmp_path: Path) -> None:
    f = _write(tmp_path / "items.csv",
               "\ufeffitem_id,title,year,genres,extra\n"
               "m1,Toy Story,1995,Animation|Children's|Comedy,x\n"
               'm2,"Good, the Bad and the Ugly, The",,Western,y\n'
               "\n"
               "m3,Untitled,2020,,z\n")
    items = load_items(str(f))
    assert items == [
        Item(item_id="m1", title="Toy Story", year=1995, genres=("Animation", "Children's", "Comedy")),
        Item(item_id="m2", title="Good, the Bad and the Ugly, The", year=None, genres=("Western",)),
        Item(item_id="m3", title="Untitled", year=2020, genres=()),
    ]
    assert load_items(str(tmp_path)) == items  # a directory holding items.csv


def test_user_items_csv_optional_columns(tmp_path: Path) -> None:
    f = _write(tmp_path / "cat.csv", "item_id,title\na,Alpha\n")
    assert load_items(str(f)) == [Item(item_id="a", title="Alpha")]


def test_user_items_jsonl(tmp_path: Path) -> None:
    rows = [
        {"item_id": "m1", "title": "Toy Story", "year": 1995, "genres": ["Animation", "Comedy"]},
        {"item_id": 42, "title": "Numbered", "year": None},
        {"item_id": "m3", "title": "Piped", "genres": "Drama|War"},
    ]
    f = _write(tmp_path / "items.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = load_items(str(tmp_path))
    assert items == [
        Item(item_id="m1", title="Toy Story", year=1995, genres=("Animation", "Comedy")),
        Item(item_id="42", title="Numbered"),
        Item(item_id="m3", title="Piped", genres=("Drama", "War")),
    ]
    assert load_items(str(f)) == items


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("items.csv", "item_id,year\nm1,1999\n", r"items\.csv:1: missing column\(s\) title"),
        ("items.csv", "item_id,title,year\nm1,A,1999\nm2,B,nineteen\n", r"items\.csv:3: year must be an integer"),
        ("items.csv", "item_id,title,year\nm1,A,1999,extra\n", r"items\.csv:2: 4 fields, the header has 3"),
        ("items.csv", "item_id,title,year\nm1,A\n", r"items\.csv:2: fewer fields"),
        ("items.csv", "item_id,title\n,A\n", r"items\.csv:2: item_id is empty"),
        ("items.csv", "item_id,title\nm1,\n", r"items\.csv:2: title must be a non-empty string"),
        ("items.csv", "item_id,title\nm1,A\nm1,B\n", r"items\.csv:3: item_id 'm1' already defined .* line 2"),
        ("items.jsonl", '{"item_id": "m1", "title": "A"}\n{"item_id": "m2", "title": \n',
         r"items\.jsonl:2: malformed JSON"),
        ("items.jsonl", '{"item_id": "m1"}\n', r"items\.jsonl:1: missing key\(s\) title"),
        ("items.jsonl", '["m1", "A"]\n', r"items\.jsonl:1: expected a JSON object"),
        ("items.jsonl", '{"item_id": "m1", "title": "A", "genres": [1]}\n', r"items\.jsonl:1: genres must be"),
        ("items.jsonl", '{"item_id": "m1", "title": "A", "year": 1999.5}\n', r"items\.jsonl:1: year must be"),
    ],
)
def test_bad_item_files_name_file_and_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    f = _write(tmp_path / name, content)
    with pytest.raises(ValueError, match=message) as err:
        load_items(str(f))
    assert str(f) in str(err.value)


def test_item_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="items.csv"):
        load_items(str(tmp_path))
    _write(tmp_path / "items.csv", "item_id,title\na,A\n")
    _write(tmp_path / "items.jsonl", '{"item_id": "a", "title": "A"}\n')
    with pytest.raises(ValueError, match="keep only one"):
        load_items(str(tmp_path))
    with pytest.raises(ValueError, match="unsupported"):
        load_items(str(_write(tmp_path / "items.txt", "a")))


def test_user_interactions_csv_and_jsonl(tmp_path: Path) -> None:
    _write(tmp_path / "interactions.csv",
           "user_id,item_id,timestamp,rating\n"
           "u1,m1,100,4.5\n"
           "u1,m2,2001-09-09T01:46:40,\n"
           "u2,m1,150.5,3\n")
    assert load_interactions(str(tmp_path)) == [
        Interaction("u1", "m1", 4.5, 100.0),
        Interaction("u1", "m2", None, 1_000_000_000.0),  # naive ISO-8601 is UTC
        Interaction("u2", "m1", 3.0, 150.5),
    ]
    f = _write(tmp_path / "log.csv", "user_id,item_id,timestamp\nu1,m1,5\n")  # no rating column
    assert load_interactions(str(f)) == [Interaction("u1", "m1", None, 5.0)]
    j = _write(tmp_path / "log.jsonl",
               '{"user_id": "u1", "item_id": "m1", "timestamp": 7, "rating": 2}\n'
               '{"user_id": 9, "item_id": "m2", "timestamp": "2001-09-09T01:46:40+00:00"}\n')
    assert load_interactions(str(j)) == [Interaction("u1", "m1", 2.0, 7.0),
                                         Interaction("9", "m2", None, 1_000_000_000.0)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("user_id,item_id\nu1,m1\n", r":1: missing column\(s\) timestamp"),
        ("user_id,item_id,timestamp\nu1,m1,yesterday\n", r":2: timestamp must be epoch seconds"),
        ("user_id,item_id,timestamp\nu1,m1,-5\n", r":2: timestamp must be a finite, non-negative"),
        ("user_id,item_id,timestamp,rating\nu1,m1,5,good\n", r":2: rating must be a number"),
        ("user_id,item_id,timestamp\nu1,,5\n", r":2: item_id is empty"),
    ],
)
def test_bad_interaction_rows(tmp_path: Path, content: str, message: str) -> None:
    f = _write(tmp_path / "interactions.csv", content)
    with pytest.raises(ValueError, match=message) as err:
        load_interactions(str(tmp_path))
    assert str(f) in str(err.value)
