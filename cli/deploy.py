"""Deployment commands: ``index-items``, ``topics``, ``init``, ``schemas``, ``export-student``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

import streams
from cli.base import cli, console, fail, load_settings, progress_bar
from streams.settings import Settings

SCHEMA_DIR = Path(streams.__file__).parent / "schemas"  # the package data the contracts test compares
OPENAPI_FILE = Path(streams.__file__).resolve().parents[1] / "docs" / "openapi.json"  # a source checkout's docs


# --- index-items -----------------------------------------------------------------------------------------
@cli.command("index-items")
def index_items(
    items: Annotated[Optional[str], typer.Option(help="ml-1m, ml-100k, or an items .csv/.jsonl file or dir")] = None,
) -> None:
    """Embed the item catalogue into Qdrant (idempotent: unchanged items are not re-embedded)."""
    settings = load_settings()
    report = index_source(settings, items or settings.data.dataset)
    console.print(f"items: {report.total} total, {report.embedded} embedded, {report.unchanged} unchanged, "
                  f"{report.removed} removed")


def index_source(settings: Settings, source: str):  # type: ignore[no-untyped-def]
    from models.encoder import load_encoder
    from streams.datasets import load_items
    from vectorstore.catalogue import index_catalogue
    from vectorstore.store import VectorStore

    try:
        catalogue = load_items(source)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc), 2)
    encoder = load_encoder(settings)
    store = VectorStore(settings)
    try:
        store.ensure_collections(encoder.dim)
        with progress_bar() as progress:
            task = progress.add_task("embedding items", total=len(catalogue))
            return index_catalogue(store, encoder, catalogue,
                                   progress=lambda done, total: progress.update(task, completed=done, total=total))
    finally:
        store.close()



# --- topics ----------------------------------------------------------------------------------------------
@cli.command()
def topics(
    timeout: Annotated[float, typer.Option(min=1, help="seconds to wait for the broker")] = 60.0,
) -> None:
    """Create the app's topics up front (partition counts from settings) and check existing ones match."""
    create_topics(load_settings(), timeout)


def create_topics(settings: Settings, timeout: float) -> None:
    from streams.topics import TopicMismatch, ensure_topics, topic_specs

    try:
        counts = asyncio.run(ensure_topics(settings, timeout=timeout))
    except TopicMismatch as exc:
        fail(str(exc))
    for spec in topic_specs(settings):
        console.print(f"{spec.name}: {counts[spec.name]} partition(s){' (compacted)' if spec.compacted else ''}"
                      f" - {spec.purpose}")


# --- init ------------------------------------------------------------------------------------------------
@cli.command()
def init(
    timeout: Annotated[float, typer.Option(min=1, help="seconds to wait for the broker")] = 60.0,
) -> None:
    """One-shot deployment set-up: create the topics, then index the catalogue (SLIMSTREAM_DATASET) into Qdrant.
    Idempotent: run it before the workers on every deploy."""
    settings = load_settings()
    create_topics(settings, timeout)
    report = index_source(settings, settings.data.dataset)
    console.print(f"catalogue {settings.data.dataset}: {report.total} items ({report.embedded} embedded now, "
                  f"{report.unchanged} unchanged, {report.removed} removed)")


# --- export-student --------------------------------------------------------------------------------------
@cli.command("export-student")
def export_student(
    out: Annotated[Path, typer.Argument(help="directory to write the Hugging Face-format student into")],
    if_missing: Annotated[bool, typer.Option("--if-missing", help="do nothing when OUT already holds an export")] = False,
) -> None:
    """Write the base student as a Hugging Face model directory (safetensors, config, tokenizer, chat template),
    the format vLLM serves; registry adapters are LoRA adapters for exactly these weights."""
    from models.student import export_base_model

    settings = load_settings()
    if if_missing and (out / "config.json").is_file():
        console.print(f"{out} already holds an export; nothing to do")
        return
    try:
        path = export_base_model(settings, out)
    except (FileNotFoundError, FileExistsError) as exc:
        fail(str(exc))
    console.print(f"student {settings.student.model_version} written to {path}")



# --- schemas ---------------------------------------------------------------------------------------------
@cli.command()
def schemas(out: Annotated[Path, typer.Option(help="directory")] = SCHEMA_DIR) -> None:
    """Write the JSON Schema of every event contract, and docs/openapi.json (the HTTP API)."""
    from streams.events import SCHEMA_MODELS

    out.mkdir(parents=True, exist_ok=True)
    for name, model in SCHEMA_MODELS.items():
        (out / f"{name}.schema.json").write_text(json.dumps(model.model_json_schema(), indent=2) + "\n")
    console.print(f"wrote {len(SCHEMA_MODELS)} schemas to {out}")
    from agents.api.openapi import openapi_document

    OPENAPI_FILE.write_text(json.dumps(openapi_document(), indent=2) + "\n")
    console.print(f"wrote the HTTP API's OpenAPI description to {OPENAPI_FILE}")

