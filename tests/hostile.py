"""A corpus of hostile interaction records: every way a producer (buggy or malicious) can get a value wrong.

``hostile_corpus(n)`` returns ``n`` records cycling through :data:`KINDS`, each with the reason the worker
must give when it dead-letters it (a substring of the dead letter's ``error``). None of them is a valid
event under any setting a test uses (replay mode included), so every one must reach the dead-letter topic,
and none may reach a window. Deterministic for a seed. Used by ``tests/test_backlog.py``,
``tests/test_contracts.py`` and ``benchmarks/backlog.py``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import NamedTuple


class HostileRecord(NamedTuple):
    kind: str
    key: bytes | None
    value: bytes | None
    reason: str  # a substring of the dead letter's error


def _event(user: str, **over: object) -> dict:
    body: dict = {"user_id": user, "item_id": "Toy Story (1995)", "event_type": "rating", "value": 4.0,
                  "timestamp": 978300760.0}
    body.update(over)
    return {k: v for k, v in body.items() if v is not _DROP}


_DROP = object()


def _dumps(body: dict) -> bytes:
    return json.dumps(body, allow_nan=True).encode()


def _raw(user: str, field: str, literal: str) -> bytes:
    """An event whose ``field`` is the JSON text ``literal`` verbatim (NaN, Infinity, huge numbers, ...)."""
    body = _event(user)
    body[field] = "@@"
    return _dumps(body).replace(b'"@@"', literal.encode())


Maker = Callable[[random.Random, str, int], tuple[bytes | None, bytes | None, str]]


def _k(user: str) -> bytes:
    return user.encode()


KINDS: dict[str, Maker] = {
    # framing
    "tombstone": lambda r, u, i: (_k(u), None, "tombstone"),
    "empty": lambda r, u, i: (_k(u), b"", "malformed JSON"),
    "whitespace": lambda r, u, i: (_k(u), b"  \n\t ", "malformed JSON"),
    "truncated_json": lambda r, u, i: (_k(u), _dumps(_event(u))[: r.randint(1, 40)], "malformed JSON"),
    "garbage_bytes": lambda r, u, i: (_k(u), bytes(r.getrandbits(8) for _ in range(r.randint(1, 64))) + b"\xff",
                                      "malformed JSON"),
    "not_an_object": lambda r, u, i: (_k(u), r.choice([b"[1, 2]", b'"event"', b"42", b"null", b"true"]),
                                      "expected a JSON object"),
    "deep_nesting_array": lambda r, u, i: (_k(u), b'{"user_id":"' + u.encode() + b'","x":' + b"[" * 3000 + b"]" * 3000
                                           + b"}", "malformed JSON"),
    "deep_nesting_object": lambda r, u, i: (_k(u), b'{"a":' * 2500 + b"1" + b"}" * 2500, "malformed JSON"),
    "oversized_20k": lambda r, u, i: (_k(u), _dumps(_event(u, item_id="x" * 20_000)), "too large"),
    "oversized_900k": lambda r, u, i: (_k(u), _dumps(_event(u, pad="p" * 900_000)), "too large"),
    # encodings
    "utf16": lambda r, u, i: (_k(u), json.dumps(_event(u)).encode("utf-16"), "malformed JSON"),
    "utf32": lambda r, u, i: (_k(u), json.dumps(_event(u)).encode("utf-32"), "malformed JSON"),
    "utf8_bom": lambda r, u, i: (_k(u), b"\xef\xbb\xbf" + _dumps(_event(u)), "malformed JSON"),
    "invalid_utf8": lambda r, u, i: (_k(u), _dumps(_event(u)).replace(b"Toy", b"T\xc0\xafy"), "malformed JSON"),
    "lone_surrogate": lambda r, u, i: (_k(u), _dumps(_event(u)).replace(b"Toy", b"\\ud800oy"), "malformed JSON"),
    # fields and types
    "missing_user": lambda r, u, i: (_k(u), _dumps(_event(u, user_id=_DROP)), "user_id"),
    "missing_item": lambda r, u, i: (_k(u), _dumps(_event(u, item_id=_DROP)), "item_id"),
    "missing_timestamp": lambda r, u, i: (_k(u), _dumps(_event(u, timestamp=_DROP)), "timestamp"),
    "int_user_id": lambda r, u, i: (_k(u), _dumps(_event(u, user_id=r.randint(0, 10**6))), "user_id"),
    "string_timestamp": lambda r, u, i: (_k(u), _dumps(_event(u, timestamp="978300760")), "timestamp"),
    "bool_timestamp": lambda r, u, i: (_k(u), _dumps(_event(u, timestamp=True)), "timestamp"),
    "list_value": lambda r, u, i: (_k(u), _dumps(_event(u, value=[1, 2])), "value"),
    "string_value": lambda r, u, i: (_k(u), _dumps(_event(u, value="5")), "value"),
    # numbers
    "timestamp_1e20": lambda r, u, i: (_k(u), _dumps(_event(u, timestamp=1e20)), "timestamp"),
    "timestamp_1e308": lambda r, u, i: (_k(u), _dumps(_event(u, timestamp=1e308)), "timestamp"),
    "timestamp_infinity": lambda r, u, i: (_k(u), _raw(u, "timestamp", r.choice(["Infinity", "-Infinity"])),
                                           "timestamp"),
    "timestamp_nan": lambda r, u, i: (_k(u), _raw(u, "timestamp", "NaN"), "timestamp"),
    "timestamp_overflow": lambda r, u, i: (_k(u), _raw(u, "timestamp", "1" + "0" * 400), "timestamp"),
    "timestamp_negative": lambda r, u, i: (_k(u), _dumps(_event(u, timestamp=-5.0)), "timestamp"),
    "timestamp_future": lambda r, u, i: (_k(u), _dumps(_event(u, timestamp=time.time() + 365 * 86_400)),
                                         "future"),
    "timestamp_milliseconds": lambda r, u, i: (_k(u), _dumps(_event(u, timestamp=time.time() * 1000)), "timestamp"),
    "value_nan": lambda r, u, i: (_k(u), _raw(u, "value", r.choice(["NaN", "Infinity", "-Infinity", "1e400"])),
                                  "value"),
    # ids
    "blank_user_id": lambda r, u, i: (_k(u), _dumps(_event(u, user_id=r.choice([" ", "   ", "\t", "\u3000"]))),
                                      "user_id"),
    "blank_event_type": lambda r, u, i: (_k(u), _dumps(_event(u, event_type=r.choice([" ", "  ", "\n"]))),
                                         "event_type"),
    "blank_item_id": lambda r, u, i: (_k(u), _dumps(_event(u, item_id=" \u00a0 ")), "item_id"),
    "control_char_user_id": lambda r, u, i: (_k(u), _dumps(_event(u, user_id=u + r.choice(
        ["\x00", "\n", "\x1b[31m", "\x7f", "\u202e", "\u200b"]))), "user_id"),
    "control_char_item_id": lambda r, u, i: (_k(u), _dumps(_event(u, item_id="Toy\x00Story")), "item_id"),
    "long_user_id": lambda r, u, i: (_k(u), _dumps(_event(u, user_id="u" * 600)), "user_id"),
    "long_event_type": lambda r, u, i: (_k(u), _dumps(_event(u, event_type="t" * 40)), "event_type"),
    "long_event_id": lambda r, u, i: (_k(u), _dumps(_event(u, event_id="e" * 300)), "event_id"),
    "blank_event_id": lambda r, u, i: (_k(u), _dumps(_event(u, event_id="")), "event_id"),
    # keys
    "huge_key_bad_value": lambda r, u, i: (b"k" * 100_000, b"{not json", "malformed JSON"),
    "binary_key_bad_value": lambda r, u, i: (bytes([0xff, 0x00, 0xfe]) * 10, b"[]", "expected a JSON object"),
    "no_key_bad_value": lambda r, u, i: (None, _dumps(_event(u, timestamp="soon")), "timestamp"),
}


# Kinds whose records are large: a few of each prove the point without publishing hundreds of megabytes.
LARGE = {"oversized_900k": 8, "huge_key_bad_value": 32}


def hostile_corpus(n: int, seed: int = 0, users: int = 64) -> list[HostileRecord]:
    """``n`` hostile records, cycling through every kind (so ``n >= len(KINDS)`` covers them all; the
    :data:`LARGE` kinds only up to their count, then a small kind instead), their keys spread over ``users``
    hostile user ids (and so over every partition)."""
    rng = random.Random(seed)
    kinds = list(KINDS.items())
    small = [(k, m) for k, m in kinds if k not in LARGE]
    made: dict[str, int] = {}
    out = []
    for i in range(n):
        kind, make = kinds[i % len(kinds)]
        if made.get(kind, 0) >= LARGE.get(kind, n):
            kind, make = small[i % len(small)]
        made[kind] = made.get(kind, 0) + 1
        key, value, reason = make(rng, f"hostile-{i % users}", i)
        out.append(HostileRecord(kind, key, value, reason))
    return out


def interleave(good: list, bad: list) -> list:
    """``bad`` spread evenly among ``good`` (order within each kept); what is left of ``bad`` goes last."""
    step = max(1, len(good) // max(1, len(bad)))
    out, rest = [], iter(bad)
    for k, rec in enumerate(good):
        out.append(rec)
        if k % step == step - 1:
            nxt = next(rest, None)
            if nxt is not None:
                out.append(nxt)
    out.extend(rest)
    return out


__all__ = ["KINDS", "HostileRecord", "hostile_corpus", "interleave"]
