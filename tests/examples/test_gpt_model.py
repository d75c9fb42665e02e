"""The GPT example exported per rank (two subgraphs each) and run for real with no service in between
(examples/gpt/direct.py: the KV state kept in numpy as an agent keeps it), against the float64 numpy reference:
logits within 1e-4 and the same tokens, greedy and seeded, for prompts prefilled whole and in chunks and decoded
together as rows of one call."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from zmserve.sampling import SamplingParams

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gpt"
pytestmark = pytest.mark.slow

LOGITS_TOLERANCE = 1e-4
PROMPTS = ["ROMEO.\nBut soft, what light through yonder window breaks?", "To be, or not", "KING"]


def load_gpt_module(name: str) -> ModuleType:
    """examples/gpt/<name>.py as module gpt_<name> (examples/minilm has modules of the same names)."""
    module_name = f"gpt_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, EXAMPLE / f"{name}.py")
        assert spec is not None and spec.loader is not None
        sys.modules[module_name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[module_name]


direct = load_gpt_module("direct")


@pytest.fixture(scope="module")
def reference():
    return load_gpt_module("reference").Reference()


LAYOUTS = {"tp1": (1, 1), "pp2": (2, 2), "tp2pp2": (4, 2), "tp2pp4": (8, 4)}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """Every layout exported by one process (one MindSpore import): name -> its model/ folder."""
    root = tmp_path_factory.mktemp("gpt")
    script = (f"from pathlib import Path; from tests.cluster import load_example_module; "
              f"export = load_example_module(Path({str(EXAMPLE / 'export_model.py')!r}), 'gpt_export', "
              f"keep_siblings=True).export\n"
              + "".join(f"export(Path({str(root / name)!r}), {r}, {s})\n" for name, (r, s) in LAYOUTS.items()))
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, cwd=EXAMPLE.parents[1],
                   env={**os.environ, "GLOG_v": "3"}, timeout=600)
    return {name: root / name / "model" for name in LAYOUTS}


@pytest.fixture(scope="module", params=["tp1", "tp2pp2"])
def pipeline(request, exports) -> Iterator:
    pipeline = direct.open_pipeline(exports[request.param])
    try:
        yield pipeline
    finally:
        pipeline.close()


def check_against_reference(reference, results, prompts: list[list[int]], params: list[SamplingParams]) -> None:
    for prompt, result, sampling in zip(prompts, results, params, strict=True):
        expected = reference.generate(prompt, sampling)
        assert result.token_ids == expected.token_ids
        assert result.finish_reason == expected.finish_reason
        full = reference.logits([*prompt, *result.token_ids])
        assert len(result.logits) == len(result.token_ids) + (result.finish_reason == "stop")
        for step, logits in enumerate(result.logits):
            np.testing.assert_allclose(logits, full[len(prompt) - 1 + step], rtol=0, atol=LOGITS_TOLERANCE)


def test_greedy_tokens_and_logits_match_the_reference(pipeline, reference) -> None:
    """Three prompts of different lengths, one prefilled in chunks of 4, decoded together as the rows of one call."""
    prompts = [reference.encode(p) for p in PROMPTS]
    params = [SamplingParams(max_tokens=8)] * len(prompts)
    results = direct.generate(pipeline, prompts, params, reference.eos, reference.config["max_len"],
                              prefill_chunk=4, keep_logits=True)
    check_against_reference(reference, results, prompts, params)


def test_seeded_sampling_matches_the_reference(pipeline, reference) -> None:
    prompts = [reference.encode(p) for p in PROMPTS[:2]]
    params = [SamplingParams(max_tokens=6, temperature=0.9, top_k=40, seed=7),
              SamplingParams(max_tokens=6, temperature=1.2, top_p=0.9, frequency_penalty=0.5, seed=8)]
    results = direct.generate(pipeline, prompts, params, reference.eos, reference.config["max_len"],
                              keep_logits=True)
    check_against_reference(reference, results, prompts, params)


def test_state_is_freed_when_a_sequence_ends(pipeline, reference) -> None:
    if not isinstance(pipeline, direct.LocalPipeline):
        pytest.skip("the state lives in the rank processes")
    direct.generate(pipeline, [reference.encode("Good")], [SamplingParams(max_tokens=3)], reference.eos,
                    reference.config["max_len"])
    assert all(not states.arrays for stage in pipeline.stages for states in stage.states.values())


def test_two_stages_in_one_process_give_the_same_tokens(exports, reference) -> None:
    pipeline = direct.open_pipeline(exports["pp2"])
    assert isinstance(pipeline, direct.LocalPipeline) and len(pipeline.stages) == 2
    prompts = [reference.encode(PROMPTS[0]), reference.encode(PROMPTS[1])]
    params = [SamplingParams(max_tokens=4)] * 2
    results = direct.generate(pipeline, prompts, params, reference.eos, reference.config["max_len"],
                              prefill_chunk=8, keep_logits=True)
    check_against_reference(reference, results, prompts, params)


@pytest.mark.parametrize("layout", ["tp2pp2", "tp2pp4"])
def test_group_config_describes_both_subgraphs(exports, reference, layout: str) -> None:
    """Every rank's files and signature; the shapes follow the layout (layers per stage, heads per rank)."""
    rank_size, stage_size = LAYOUTS[layout]
    tp, c = rank_size // stage_size, reference.config
    state = {"name": "kv", "dtype": "float32",
             "shape": [c["n_layers"] // stage_size, 2, c["n_heads"] // tp, c["max_len"], c["d_model"] // c["n_heads"]],
             "batch_axis": 2, "time_axis": 4, "update": "kv_new", "positions": "positions"}
    for rank in range(rank_size):
        config = json.loads((exports[layout] / f"device{rank}" / "group_config.json").read_text())
        stage = rank // tp
        assert (config["rank"], config["stage"], config["tp_rank"], config["tp_size"]) == (rank, stage, rank % tp, tp)
        assert (config["rank_size"], config["stage_size"]) == (rank_size, stage_size)
        prefill, decode = config["subgraphs"]
        assert [prefill["file"], decode["file"]] == ["gpt_0.mindir", "gpt_1.mindir"]
        first = "tokens" if stage == 0 else "hidden"
        assert [v["name"] for v in prefill["inputs"]] == [first, "positions"]
        assert config["inputs"] == prefill["inputs"] and config["outputs"] == prefill["outputs"]
        last = stage == stage_size - 1
        assert [v["name"] for v in decode["outputs"]] == (["logits"] if last else ["hidden", "positions"])
        assert prefill["inputs"][0]["shape"][:2] == [-1, -1] and decode["inputs"][0]["shape"][:2] == [-1, 1]
        for subgraph in (prefill, decode):
            assert (exports[layout] / f"device{rank}" / subgraph["file"]).is_file()
            assert subgraph["state"] == state
