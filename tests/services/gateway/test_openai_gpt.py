"""End to end on the real GPT example (examples/gpt): export it sharded over 2 ranks, serve it, and ask the gateway's
OpenAI API with the official `openai` package and the zmq client. The served tokens are the float64 numpy
reference's (examples/gpt/reference.py, the same sampler): greedy, and sampled with a seed; the streamed text (SSE)
equals the whole answer and the zmq client's, and the token ids decode to the text the API returned.

Skipped, with the reason, while the example is incomplete (its servable_config.py, export or tokenizer missing):
the integrator enables it once the model and runtime work is merged."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from zmserve.client import generation_inputs
from zmserve.local import LocalCluster
from zmserve.sampling import SamplingParams

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
GPT = REPO / "examples" / "gpt"
NEEDED = [GPT / "gpt" / "servable_config.py", GPT / "export_model.py", GPT / "reference.py",
          GPT / "weights" / "tokenizer.json"]
MISSING = [str(path.relative_to(REPO)) for path in NEEDED if not path.exists()]
if MISSING:
    pytest.skip(f"examples/gpt is not complete yet (missing {', '.join(MISSING)})", allow_module_level=True)

import openai  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

RANKS = 2
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, str]]:
    workdir = tmp_path_factory.mktemp("openai_gpt")
    subprocess.run([sys.executable, str(GPT / "export_model.py"), "--rank-size", str(RANKS), "--stage-size", "1",
                    "--output-dir", str(workdir)], check=True, capture_output=True)
    model_files = [workdir / "model" / f"device{rank}" for rank in range(RANKS)]
    servable = workdir / "servables" / "gpt"  # the servable folder, with the layout it serves and its files
    shutil.copytree(GPT / "gpt", servable)
    (servable / "layout.json").write_text(json.dumps({"rank_size": RANKS, "stage_size": 1}))
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(GPT / "weights" / name, servable / name)
    cluster = LocalCluster(workdir, servable.parent, "gpt", model_files)
    try:
        cluster.wait_ready(generation_inputs("hi", max_tokens=1), method="generate")
        yield cluster, cluster.start_gateway("gateway")
    finally:
        codes = cluster.stop()
    assert set(codes.values()) == {0}, codes


def test_greedy_text_is_the_same_streamed_whole_and_over_zmq(served: tuple[LocalCluster, str]) -> None:
    cluster, url = served
    api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    whole = api.completions.create(model="gpt", prompt=PROMPT, max_tokens=12, temperature=0)
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model="gpt", prompt=PROMPT, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert whole.choices[0].text == streamed and whole.usage.completion_tokens <= 12
    with cluster.client("generate") as client:
        generation = client.generate(PROMPT, max_tokens=12, timeout=120).result()
    assert generation.text == whole.choices[0].text
    tokenizer = Tokenizer.from_file(str(GPT / "weights" / "tokenizer.json"))
    assert tokenizer.decode(generation.token_ids) == generation.text
    expected = reference().generate(reference().encode(PROMPT), SamplingParams(max_tokens=12))
    assert generation.token_ids == expected.token_ids and generation.finish_reason == expected.finish_reason


def test_a_seed_gives_the_same_sample_twice(served: tuple[LocalCluster, str]) -> None:
    api = openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0, timeout=120)
    texts = {api.completions.create(model="gpt", prompt=PROMPT, max_tokens=8, temperature=0.8, top_p=0.9,
                                    seed=7).choices[0].text for _ in range(2)}
    model = reference()
    expected = model.generate(model.encode(PROMPT), SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=7))
    assert texts == {model.decode(expected.token_ids)}


_reference = []


def reference():
    """examples/gpt/reference.py's Reference (loaded once: it reads the weights)."""
    if not _reference:
        spec = importlib.util.spec_from_file_location("gpt_reference", GPT / "reference.py")
        assert spec is not None and spec.loader is not None
        module = sys.modules["gpt_reference"] = importlib.util.module_from_spec(spec)  # its dataclass needs it
        spec.loader.exec_module(module)
        _reference.append(module.Reference())
    return _reference[0]
