"""Generation end to end (issue 21): Python stages that loop over `model.call(..., subgraph=0/1)` on a two-subgraph
stateful model, the state kept per sequence in the agent, continuous batching, slots and their release.

One real cluster (broker, worker with --max-sequences 3, one agent) serves tests/stateful_model.py's tiny model,
whose every token depends on the whole history kept in the agent's state: a token computed from a wrong, stale or
foreign state differs from the numpy reference. Nothing is killed in this cluster; the agent-loss test has its own.
A third cluster serves the same model through examples/gpt/gpt/servable_config.py (a word-level tokenizer over its
11 tokens), so the GPT example's servable is tested end to end before any GPT export exists.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import stateful_model
from cluster import agent_pids, log_events, wait_for, write_servable
from stateful_model import SERVABLE_CONFIG

from zmserve.client import ClientError
from zmserve.local import LocalCluster
from zmserve.protocol import ErrorCode
from zmserve.sampling import Sampler, SamplingParams
from zmserve.status import query_status

pytestmark = pytest.mark.slow

MAX_SEQUENCES = 3



def instance(prompt: list[int], max_tokens: int) -> dict[str, np.ndarray]:
    return {"prompt": np.array(prompt, np.int32), "max_tokens": np.array(max_tokens, np.int32)}


def hold_instance(steps: int = 100_000) -> dict[str, np.ndarray]:
    return {"prompt": np.array([3, 1], np.int32), "steps": np.array(steps, np.int32)}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("stateful_model")
    stateful_model.export(workdir / "model")
    write_servable(workdir / "servables", "tiny", SERVABLE_CONFIG)
    return workdir


@pytest.fixture(scope="module")
def cluster(model_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("generation"), model_folder / "servables", "tiny",
                           [model_folder / "model" / "device0"], ["--max-sequences", str(MAX_SEQUENCES)])
    try:
        cluster.wait_ready(instance([1, 2], 2))
        yield cluster
    finally:
        cluster.stop()


def sequences(cluster: LocalCluster) -> int:
    (worker,) = query_status(cluster.client_address).workers
    return worker.sequences


def agent_held(cluster: LocalCluster) -> int | None:
    """Sequences the agent holds state for, from its latest allocation or release line."""
    events = log_events(cluster.logs["agents"], "sequence_allocated") + \
        log_events(cluster.logs["agents"], "sequences_released")
    return max(events, key=lambda e: e["timestamp"])["held"] if events else None


def test_concurrent_generations_match_the_reference_and_share_decode_steps(cluster: LocalCluster) -> None:
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [2, 2, 10, 0]]
    lengths = [12, 7, 15, 10]
    with cluster.client("predict") as client:
        futures: list[Future] = []
        for round_ in range(2):  # more requests than slots would be refused: two rounds of at most 3
            batch = range(3) if round_ == 0 else range(3, 4)
            futures = [client.infer_async(instance(prompts[i], lengths[i]), timeout=60) for i in batch]
            for i, future in zip(batch, futures, strict=True):
                (result,) = future.result()
                assert result["tokens"].tolist() == stateful_model.reference_generate(prompts[i], lengths[i])
    metrics = urllib.request.urlopen(cluster.metrics["worker"], timeout=5).read().decode()
    steps = {line.split(" ")[0].split("{")[0]: float(line.split(" ")[-1]) for line in metrics.splitlines()
             if line.startswith("zmserve_worker_step_sequences_") and not line.startswith("#")
             and "_bucket" not in line}
    assert steps["zmserve_worker_step_sequences_sum"] > steps["zmserve_worker_step_sequences_count"], \
        "no decode step carried more than one sequence"
    wait_for(lambda: sequences(cluster) == 0, 5, what="slots free")


def test_a_generator_stage_that_calls_the_model_streams_each_token(cluster: LocalCluster) -> None:
    expected = stateful_model.reference_generate([4, 4, 1], 9)
    with cluster.client("generate") as client:
        (whole,) = client.infer(instance([4, 4, 1], 9), timeout=30)
        with client.infer_stream(instance([4, 4, 1], 9), timeout=30) as stream:
            partials = [partial["tokens"].tolist() for partial in stream]
            final = stream.result()
    assert whole["tokens"].tolist() == expected
    assert partials == [[token] for token in expected]
    assert final["tokens"].tolist() == expected


def test_a_full_server_refuses_at_once_and_a_cancel_frees_the_slot(cluster: LocalCluster) -> None:
    with cluster.client("hold") as client:
        holders = [client.infer_async(hold_instance(), timeout=60) for _ in range(MAX_SEQUENCES)]
        wait_for(lambda: sequences(cluster) == MAX_SEQUENCES, 10, what="every slot held")
        started = time.monotonic()
        with pytest.raises(ClientError) as refused:
            client.infer(hold_instance(1), timeout=30)
        assert refused.value.code == ErrorCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started < 2
        for future in holders:
            future.cancel()
        wait_for(lambda: sequences(cluster) == 0, 5, what="slots free after the cancels")
        wait_for(lambda: agent_held(cluster) == 0, 5, what="the agent freed every sequence's state")
        (result,) = cluster.client("predict").infer(instance([1, 2, 3], 5), timeout=30)
    assert result["tokens"].tolist() == stateful_model.reference_generate([1, 2, 3], 5)


def test_a_deadline_frees_the_slot(cluster: LocalCluster) -> None:
    with cluster.client("hold") as client:
        started = time.monotonic()
        with pytest.raises(ClientError) as expired:
            client.infer(hold_instance(), timeout=0.5)
        assert expired.value.code == ErrorCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5
    wait_for(lambda: sequences(cluster) == 0, 5, what="slot free after the deadline")
    wait_for(lambda: agent_held(cluster) == 0, 5, what="the agent freed the sequence's state")


def test_two_pipeline_stages_keep_their_own_state_and_an_agent_lost_ends_every_request(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Stage 0 and stage 1 each keep a state (tests/stateful_model.py, export_two_stages): the calls, their
    sequences and releases cross the stage boundary. Then the stage-1 agent is killed while three sequences run:
    each ends UNAVAILABLE, the slots come back, and after the restart the tokens are right again."""
    workdir = tmp_path_factory.mktemp("two_stages")
    stateful_model.export_two_stages(workdir / "model")
    write_servable(workdir / "servables", "tiny", SERVABLE_CONFIG.replace("rank_size=1, stage_size=1",
                                                                 "rank_size=2, stage_size=2"))
    (workdir / "cluster").mkdir()
    cluster = LocalCluster(workdir / "cluster", workdir / "servables", "tiny",
                           [workdir / "model" / "device0", workdir / "model" / "device1"], ["--max-sequences", "4"])
    try:
        cluster.wait_ready(instance([1], 1))
        prompts = [[3, 1, 4], [5, 9, 2, 6], [8]]
        with cluster.client("predict") as client:
            futures = [client.infer_async(instance(prompt, 9), timeout=60) for prompt in prompts]
            for prompt, future in zip(prompts, futures, strict=True):
                (result,) = future.result()
                assert result["tokens"].tolist() == stateful_model.reference_two_stages(prompt, 9)
        with cluster.client("hold") as client:
            running = [client.infer_async(hold_instance(), timeout=60) for _ in range(3)]
            wait_for(lambda: sequences(cluster) == 3, 10, what="three sequences running")
            os.kill(agent_pids(cluster.processes["agents"].pid)[1], signal.SIGKILL)
            for future in running:
                with pytest.raises(ClientError) as lost:
                    future.result(timeout=30)
                assert lost.value.code == ErrorCode.UNAVAILABLE
        wait_for(lambda: sequences(cluster) == 0, 5, what="slots free after the loss")
        cluster.wait_ready(instance([3, 1, 4], 6))
        (result,) = cluster.client("predict").infer(instance([3, 1, 4], 6), timeout=30)
        assert result["tokens"].tolist() == stateful_model.reference_two_stages([3, 1, 4], 6)
    finally:
        cluster.stop()


GPT_SERVABLE = Path(__file__).resolve().parents[2] / "examples" / "gpt" / "gpt" / "servable_config.py"


@pytest.fixture(scope="module")
def gpt_cluster(model_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    servables = tmp_path_factory.mktemp("gpt_servables")
    folder = servables / "gpt"
    folder.mkdir()
    shutil.copy(GPT_SERVABLE, folder / "servable_config.py")
    (folder / "config.json").write_text(json.dumps({"max_len": stateful_model.MAX_LEN,
                                                    "vocab_size": stateful_model.VOCAB}))
    (folder / "layout.json").write_text(json.dumps({"rank_size": 1, "stage_size": 1}))
    stateful_model.write_tokenizer(folder / "tokenizer.json")
    cluster = LocalCluster(tmp_path_factory.mktemp("gpt"), servables, "gpt", [model_folder / "model" / "device0"])
    try:
        cluster.wait_ready({"prompt": "one two"})
        yield cluster
    finally:
        cluster.stop()


def words(ids: list[int]) -> str:
    return " ".join(stateful_model.WORDS[i] for i in ids)


def test_gpt_servable_predicts_the_whole_answer_with_default_inputs(gpt_cluster: LocalCluster) -> None:
    prompt = [3, 1, 4]
    expected = stateful_model.reference_generate(prompt, SamplingParams().max_tokens)
    with gpt_cluster.client("predict") as client:
        (result,) = client.infer({"prompt": words(prompt)}, timeout=30)
    assert result["token_ids"].tolist() == expected
    assert result["text"] == words(expected)
    assert result["finish_reason"] == "length"
    assert int(result["prompt_tokens"]) == 3 and int(result["completion_tokens"]) == len(expected)


def test_gpt_servable_streams_seeded_samples_like_the_reference(gpt_cluster: LocalCluster) -> None:
    prompt = [2, 7]
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=6, top_p=0.9, frequency_penalty=0.3, seed=11)
    expected = stateful_model.reference_generate(prompt, params.max_tokens, Sampler(params))
    inputs = {"prompt": words(prompt), "max_tokens": np.array(12, np.int32),
              "temperature": np.array(0.8, np.float32), "top_k": np.array(6, np.int32),
              "top_p": np.array(0.9, np.float32), "frequency_penalty": np.array(0.3, np.float32),
              "seed": np.array(11, np.int64)}
    with gpt_cluster.client("generate") as client, client.infer_stream(inputs, timeout=30) as stream:
        partials = list(stream)
        final = stream.result()
    assert [p["token_ids"].tolist() for p in partials] == [[token] for token in expected]
    assert "".join(p["text"] for p in partials) == words(expected) == final["text"]
    assert final["token_ids"].tolist() == expected


def test_gpt_servable_stops_at_a_full_context_and_refuses_a_prompt_that_does_not_fit(
        gpt_cluster: LocalCluster) -> None:
    prompt = [1, 5] * 10  # 20 of the model's 24 positions: room for 4 tokens
    with gpt_cluster.client("predict") as client:
        (result,) = client.infer({"prompt": words(prompt), "max_tokens": np.array(10, np.int32)}, timeout=30)
        assert result["token_ids"].tolist() == stateful_model.reference_generate(prompt, 4)
        assert result["finish_reason"] == "length"
        with pytest.raises(ClientError) as refused:
            client.infer({"prompt": words([1] * 25)}, timeout=30)
    assert refused.value.code == ErrorCode.INVALID_ARGUMENT
    assert "the model takes 1 to 24" in refused.value.message
    wait_for(lambda: sequences(gpt_cluster) == 0, 5, what="the refused request's slot free")


GPT = Path(__file__).resolve().parents[2] / "examples" / "gpt"


def test_the_gpt_example_over_two_pipeline_stages_gives_the_references_tokens(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """The real GPT example (examples/gpt, 4 layers), exported over two pipeline stages and served by its own
    servable_config.py: three concurrent requests (two greedy, one seeded sample, one prompt longer than a prefill
    chunk) give examples/gpt/reference.py's tokens (float64 numpy, no cache, no shared code)."""
    import subprocess
    import sys

    sys.path.insert(0, str(GPT))
    from reference import Reference

    workdir = tmp_path_factory.mktemp("gpt_pp2")
    subprocess.run([sys.executable, str(GPT / "export_model.py"), "--rank-size", "2", "--stage-size", "2",
                    "--output-dir", str(workdir)], check=True, capture_output=True, env={**os.environ, "GLOG_v": "3"})
    servables = workdir / "servables"
    shutil.copytree(GPT / "gpt", servables / "gpt")
    (servables / "gpt" / "layout.json").write_text(json.dumps({"rank_size": 2, "stage_size": 2}))
    reference = Reference()
    prompts = ["ROMEO.\nWhat light", "The", " ".join(["And so the king said unto them"] * 6)]
    params = [SamplingParams(max_tokens=10), SamplingParams(max_tokens=8),
              SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, seed=7)]
    assert len(reference.encode(prompts[2])) > 32  # prefilled in two chunks
    (workdir / "cluster").mkdir()
    cluster = LocalCluster(workdir / "cluster", servables, "gpt",
                           [workdir / "model" / "device0", workdir / "model" / "device1"])
    try:
        cluster.wait_ready({"prompt": "hi", "max_tokens": np.array(1, np.int32)})
        with cluster.client("predict") as client:
            futures = [client.infer_async({"prompt": prompt, "max_tokens": np.array(p.max_tokens, np.int32),
                                           "temperature": np.array(p.temperature, np.float32),
                                           "top_p": np.array(p.top_p, np.float32),
                                           "seed": np.array(-1 if p.seed is None else p.seed, np.int64)}, timeout=120)
                       for prompt, p in zip(prompts, params, strict=True)]
            for prompt, p, future in zip(prompts, params, futures, strict=True):
                (result,) = future.result()
                expected = reference.generate(reference.encode(prompt), p)
                assert result["token_ids"].tolist() == expected.token_ids, prompt
                assert result["finish_reason"] == expected.finish_reason
                assert result["text"] == reference.decode(expected.token_ids)
    finally:
        cluster.stop()
