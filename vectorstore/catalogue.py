"""Index an item catalogue into the vector store, idempotently.

Each item's payload carries ``text_hash = sha256(item_text(item) + encoder.version)``. Re-running over
the same catalogue with the same encoder embeds nothing; an edited item (title, year, genres) or a new
encoder version re-embeds exactly the affected items; items gone from the catalogue are deleted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from models.encoder import TextEncoder
from streams.datasets import Item, item_text
from vectorstore.store import VectorStore

# Items embedded and written per step: bounds memory and gives the progress callback a steady beat.
_CHUNK = 256


@dataclass(frozen=True)
class IndexReport:
    total: int  # items in the catalogue
    embedded: int  # new or changed items (re-)embedded by this run
    unchanged: int  # already indexed with the same text and encoder version
    removed: int  # indexed items no longer in the catalogue, deleted

    def __str__(self) -> str:
        return (f"{self.total} items: {self.embedded} embedded, {self.unchanged} unchanged, "
                f"{self.removed} removed")


def text_hash(item: Item, encoder_version: str) -> str:
    """What decides whether an item must be re-embedded: its text and the encoder that embeds it."""
    return hashlib.sha256(f"{item_text(item)}\n{encoder_version}".encode()).hexdigest()


def index_catalogue(
    store: VectorStore,
    encoder: TextEncoder,
    items: Sequence[Item],
    progress: Callable[[int, int], None] | None = None,
) -> IndexReport:
    """Bring the store's item collection in line with ``items``.

    ``progress(done, total)`` is called after each chunk, where ``total`` counts the items to embed in
    this run (so an up-to-date catalogue reports ``(0, 0)`` once).
    """
    if not items:
        # Almost certainly a wrong path or an empty export; indexing it would delete the whole index.
        raise ValueError("refusing to index an empty catalogue (it would delete every indexed item)")
    seen: set[str] = set()
    for item in items:
        if item.item_id in seen:
            raise ValueError(f"duplicate item_id {item.item_id!r} in the catalogue")
        seen.add(item.item_id)

    store.ensure_collections(encoder.dim)
    stored = store.existing_item_hashes()
    hashes = {item.item_id: text_hash(item, encoder.version) for item in items}
    todo = [item for item in items if stored.get(item.item_id) != hashes[item.item_id]]
    gone = [item_id for item_id in stored if item_id not in hashes]

    if progress is not None:
        progress(0, len(todo))
    for start in range(0, len(todo), _CHUNK):
        chunk = todo[start:start + _CHUNK]
        vectors = encoder.encode([item_text(item) for item in chunk])
        store.upsert_items(chunk, vectors, [hashes[item.item_id] for item in chunk])
        if progress is not None:
            progress(start + len(chunk), len(todo))
    if gone:
        store.delete_items(gone)
    return IndexReport(total=len(items), embedded=len(todo), unchanged=len(items) - len(todo), removed=len(gone))
