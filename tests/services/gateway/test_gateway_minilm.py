"""all-MiniLM-L6-v2 served for real (2 pipeline stages) behind the gateway: sentence embeddings through curl
(MindSpore Serving's scheme, several instances) and through tritonclient (BYTES in, FP32 out, JSON and binary),
each within 1e-5 of the independent numpy forward pass."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as triton

from tests.cluster import REPO, Exports, load_example_module
from tests.services.gateway.gateway_client import curl
from zmserve.local import LocalCluster

pytestmark = pytest.mark.slow

EXAMPLE = REPO / "examples" / "minilm"
# keep_siblings: embed_texts imports `assets` when it is called
embed_texts = load_example_module(EXAMPLE / "reference.py", "minilm_reference", keep_siblings=True).embed_texts

TEXTS = ["A cat sits on the mat.", "Grüße aus Köln, 東京", "The quick brown fox jumps over the lazy dog."]
RANK_SIZE, STAGE_SIZE = 2, 2


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """Each text's embedding from the float64 numpy model over the same safetensors."""
    return embed_texts(TEXTS)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, exports: Exports) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("gateway_minilm")
    model_files = exports.minilm(RANK_SIZE, STAGE_SIZE)
    config = (EXAMPLE / "minilm" / "servable_config.py").read_text().replace(
        "declare_servable(rank_size=4, stage_size=2,", f"declare_servable(rank_size={RANK_SIZE}, "
                                                         f"stage_size={STAGE_SIZE},")
    (workdir / "servables" / "minilm").mkdir(parents=True)
    (workdir / "servables" / "minilm" / "servable_config.py").write_text(config)
    cluster = LocalCluster(workdir, workdir / "servables", "minilm", model_files)
    try:
        cluster.wait_ready({"text": "warm up"}, method="embed", timeout=300)
        yield cluster.start_gateway("gateway")
    finally:
        codes = cluster.stop()
    assert set(codes.values()) == {0}, codes


def test_curl_embeds_several_sentences(gateway: str, reference: np.ndarray) -> None:
    body = json.dumps({"instances": [{"text": text} for text in TEXTS]}).encode()
    status, answer = curl(gateway, "/model/minilm:embed", body)
    assert status == 200
    embeddings = np.array([instance["embedding"] for instance in answer["instances"]])
    assert embeddings.shape == (len(TEXTS), 384)
    assert np.abs(embeddings - reference).max() <= 1e-5


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_embeds_a_sentence(gateway: str, reference: np.ndarray, binary: bool) -> None:
    client = triton.InferenceServerClient(gateway.removeprefix("http://"))
    assert client.is_model_ready("minilm")
    assert client.get_model_metadata("minilm")["parameters"]["method"] == "embed"
    for text, expected in zip(TEXTS, reference, strict=True):
        tensor = triton.InferInput("text", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([text.encode()], dtype=object), binary_data=binary)
        result = client.infer("minilm", [tensor], outputs=[triton.InferRequestedOutput("embedding",
                                                                                       binary_data=binary)])
        embedding = result.as_numpy("embedding")
        assert embedding.dtype == np.float32 and embedding.shape == (384,)
        assert np.abs(embedding - expected).max() <= 1e-5


def test_a_number_where_text_belongs_is_the_callers_error(gateway: str) -> None:
    """The tokenize stage refuses it (InvalidInput): 400 with its words, not a 500 blaming the server."""
    status, answer = curl(gateway, "/model/minilm:embed", json.dumps({"instances": [{"text": 42}]}).encode())
    assert status == 400, answer
    assert answer == {"error_msg": "instance 0: stage 'tokenize' rejected its input: text must be a string, got a "
                                   "tensor (int32, shape [])"}
