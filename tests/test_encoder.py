"""The ONNX text encoder: agrees with the PyTorch model, is exported once and cached, is thread-safe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from models.encoder import OnnxMiniLMEncoder, TextEncoder, default_model_dir, load_encoder
from streams.settings import Settings

ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "Toy Story (1995). Genres: Animation, Children's, Comedy.",
    "The user enjoys dark crime thrillers with morally grey detectives and twisty plots.",
    "Heat.",
    "",
    "ünïcödé — «quotes» and emoji 🎬 in a title",
    "word " * 400,  # longer than the 256-token limit: truncated like sentence-transformers does
]


def shared_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """One encoder cache per test session, shared by the test modules that need an encoder."""
    data_dir = tmp_path_factory.getbasetemp() / "shared-encoder-data"
    return Settings.from_env(data={"data_dir": data_dir}, qdrant={"path": str(data_dir / "qdrant")}, encoder={"batch_size": 4})


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> OnnxMiniLMEncoder:
    enc = load_encoder(shared_settings(tmp_path_factory))
    assert isinstance(enc, OnnxMiniLMEncoder)
    return enc


def _reference(texts: list[str]) -> np.ndarray:
    """Embeddings from the PyTorch model: sentence-transformers when installed, else its pipeline by hand."""
    model_dir = str(default_model_dir())
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        import torch
        from transformers import AutoModel, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
        batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            tokens = model(**batch)[0]
        mask = batch["attention_mask"][..., None].float()
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=1).numpy()
    st = SentenceTransformer(model_dir, device="cpu", local_files_only=True)
    return st.encode(texts, batch_size=8, normalize_embeddings=True, convert_to_numpy=True)


def test_protocol_and_shapes(encoder: OnnxMiniLMEncoder) -> None:
    assert isinstance(encoder, TextEncoder)
    assert encoder.dim == 384
    assert encoder.version.startswith("all-MiniLM-L6-v2-")
    v = encoder.encode(TEXTS)
    assert v.shape == (len(TEXTS), 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError):
        encoder.encode("a single string")


def test_matches_pytorch_reference(encoder: OnnxMiniLMEncoder) -> None:
    ours = encoder.encode(TEXTS)
    ref = _reference(TEXTS)
    cos = (ours * ref).sum(axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.999, cos


def test_batching_and_padding_do_not_change_results(encoder: OnnxMiniLMEncoder) -> None:
    together = encoder.encode(TEXTS)  # batch size 4: mixed lengths, padded
    alone = np.stack([encoder.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_semantically_close_texts_score_higher(encoder: OnnxMiniLMEncoder) -> None:
    q, near, far = encoder.encode([
        "an animated comedy for kids about toys that come alive",
        "Toy Story (1995). Genres: Animation, Children's, Comedy.",
        "Schindler's List (1993). Genres: Drama, War.",
    ])
    assert q @ near > q @ far + 0.2
    war_q, war, cartoon = encoder.encode([
        "a harrowing film about the Second World War and the Holocaust",
        "Schindler's List (1993). Genres: Drama, War.",
        "Toy Story (1995). Genres: Animation, Children's, Comedy.",
    ])
    assert war_q @ war > war_q @ cartoon + 0.2


def test_thread_safe(encoder: OnnxMiniLMEncoder) -> None:
    expected = encoder.encode(TEXTS)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: encoder.encode(TEXTS), range(8)))
    for r in results:
        np.testing.assert_allclose(r, expected, atol=1e-5)


def test_cached_export_is_reused(encoder: OnnxMiniLMEncoder) -> None:
    path = encoder.onnx_path
    assert path.is_file() and path.parent == Path(encoder.settings.data.data_dir) / "encoder"
    mtime = path.stat().st_mtime_ns
    again = OnnxMiniLMEncoder(encoder.settings)
    again.load()
    assert not again.exported
    assert again.onnx_path == path and path.stat().st_mtime_ns == mtime
    assert again.version == encoder.version
    np.testing.assert_allclose(again.encode(TEXTS[:2]), encoder.encode(TEXTS[:2]), atol=1e-6)
    assert not list(path.parent.glob("*.tmp"))


def _run_python(code: str, data_dir: Path, **kwargs) -> subprocess.Popen[str]:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSTREAM_")}
    env["SLIMSTREAM_DATA_DIR"] = str(data_dir)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


_PROBE = """
    import json, sys
    from models.encoder import load_encoder
    from streams.settings import Settings
    enc = load_encoder(Settings.from_env())
    vec = enc.encode(["Toy Story (1995)."])[0]
    print(json.dumps({"exported": enc.exported, "torch": "torch" in sys.modules, "path": str(enc.onnx_path),
                      "head": vec[:4].tolist()}))
"""


def test_cached_load_does_not_import_torch(encoder: OnnxMiniLMEncoder) -> None:
    proc = _run_python(_PROBE, Path(encoder.settings.data.data_dir))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {**result, "exported": False, "torch": False, "path": str(encoder.onnx_path)}
    np.testing.assert_allclose(result["head"], encoder.encode(["Toy Story (1995)."])[0][:4], atol=1e-5)


def test_two_processes_export_once(tmp_path: Path) -> None:
    """Two cold processes race for the same cache: one exports, the other waits and loads its file."""
    procs = [_run_python(_PROBE, tmp_path) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["exported"] for r in results) == [False, True]
    assert results[0]["path"] == results[1]["path"]
    np.testing.assert_allclose(results[0]["head"], results[1]["head"], atol=1e-6)
    files = sorted(p.name for p in (tmp_path / "encoder").iterdir())
    assert [f for f in files if f.endswith(".onnx")] == [Path(results[0]["path"]).name]
    assert not [f for f in files if f.endswith(".tmp")]
