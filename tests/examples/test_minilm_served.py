"""all-MiniLM-L6-v2 served for real (broker, worker, agents in TP x PP) against the independent numpy forward
pass over the same safetensors: every embedding within 1e-5 per element, for every layout the example supports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.cluster import REPO, Exports, load_example_module
from zmserve.client import ClientError
from zmserve.local import LocalCluster

EXAMPLE = REPO / "examples" / "minilm"
# keep_siblings: embed_texts imports `assets` when it is called
embed_texts = load_example_module(EXAMPLE / "reference.py", "minilm_reference", keep_siblings=True).embed_texts

pytestmark = pytest.mark.slow

CAT = "A cat sits on the mat."
TEXTS = [
    CAT,
    " ".join(["The quick brown fox jumps over the lazy dog near the quiet riverbank."] * 30),
    "Grüße aus Köln, 東京",
    "",
]


@pytest.fixture(scope="module")
def reference_embeddings() -> np.ndarray:
    """Unpadded token ids of each text through the float64 numpy model."""
    return embed_texts(TEXTS)


@pytest.mark.parametrize(("rank_size", "stage_size", "curve"),
                         [(1, 1, False), (2, 1, False), (2, 2, False), (4, 2, False), (2, 2, True)])
def test_served_embeddings_match_numpy(tmp_path: Path, exports: Exports, reference_embeddings: np.ndarray,
                                       rank_size: int, stage_size: int, curve: bool) -> None:
    """curve: every link with CURVE and --require-curve (docs/SECURITY.md)."""
    model_files = exports.minilm(rank_size, stage_size)
    config = (EXAMPLE / "minilm" / "servable_config.py").read_text().replace(
        "declare_servable(rank_size=4, stage_size=2,", f"declare_servable(rank_size={rank_size}, "
                                                         f"stage_size={stage_size},")
    assert f"rank_size={rank_size}" in config
    (tmp_path / "servables" / "minilm").mkdir(parents=True)
    (tmp_path / "servables" / "minilm" / "servable_config.py").write_text(config)
    cluster = LocalCluster(tmp_path, tmp_path / "servables", "minilm", model_files, curve=curve)
    try:
        cluster.wait_ready({"text": "warm up"}, method="embed", timeout=300)
        with cluster.client("embed") as client:
            served = client.infer([{"text": text} for text in TEXTS], timeout=120)
            alone = client.infer({"text": CAT}, timeout=60)[0]["embedding"]
            with pytest.raises(ClientError) as refused:
                client.infer({"text": 42}, timeout=60)
    finally:
        codes = cluster.stop()
    embeddings = np.stack([row["embedding"] for row in served])
    assert embeddings.shape == (len(TEXTS), 384) and embeddings.dtype == np.float32
    differences = np.abs(embeddings - reference_embeddings).max(axis=1)
    assert (differences <= 1e-5).all(), dict(zip(["short", "long", "non_ascii", "empty"], differences, strict=True))
    assert abs(float(np.linalg.norm(alone)) - 1.0) < 1e-6
    assert refused.value.code == "INVALID_ARGUMENT", refused.value
    assert refused.value.message == ("instance 0: stage 'tokenize' rejected its input: text must be a string, got "
                                     "a tensor (int64, shape [])"), refused.value
    np.testing.assert_allclose(alone, embeddings[0], atol=1e-6)
    assert set(codes.values()) == {0}, codes
