"""Generation end to end (issue 21): Python stages that loop over `model.call(..., subgraph=0/1)` on a two-subgraph
stateful model, the state kept per sequence in the agent, continuous batching, slots and their release.

One real cluster (broker, worker with --max-sequences 3, one agent) serves tests/stateful_model.py's tiny model,
whose every token depends on the whole history kept in the agent's state: a token computed from a wrong, stale or
foreign state differs from the numpy reference. Nothing is killed in this cluster; the agent-loss test has its own.
A third cluster serves the real GPT example (examples/gpt) over two pipeline stages through its own
servable_config.py, checked against examples/gpt/reference.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import stateful_model
from tests.cluster import agent_pids, load_example_module, log_events, wait_for, write_servable
from tests.stateful_model import SERVABLE_CONFIG
from zmserve.client import ClientError
from zmserve.local import LocalCluster
from zmserve.protocol import ErrorCode
from zmserve.sampling import SamplingParams
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


def test_each_instance_of_a_request_generates_from_a_fresh_state(cluster: LocalCluster) -> None:
    """The tiny model sums its whole cache: a second instance that inherited the first one's state would differ."""
    with cluster.client("predict") as client:
        results = client.infer([instance([6, 2, 9, 9, 1], 8), instance([4], 6)], timeout=30)
    assert [r["tokens"].tolist() for r in results] == [stateful_model.reference_generate([6, 2, 9, 9, 1], 8),
                                                       stateful_model.reference_generate([4], 6)]


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


GPT = Path(__file__).resolve().parents[2] / "examples" / "gpt"


@pytest.fixture(scope="module")
def gpt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Any]]:
    """The real GPT example (examples/gpt, 4 layers) exported over two pipeline stages and served by its own
    servable_config.py (copied beside the model with its layout.json, as a deployment does), with
    examples/gpt/reference.py (float64 numpy, no cache, no shared code) to check its tokens against."""
    Reference = load_example_module(GPT / "reference.py", "gpt_reference_for_generation").Reference

    workdir = tmp_path_factory.mktemp("gpt_pp2")
    subprocess.run([sys.executable, str(GPT / "export_model.py"), "--rank-size", "2", "--stage-size", "2",
                    "--output-dir", str(workdir)], check=True, capture_output=True, env={**os.environ, "GLOG_v": "3"})
    servables = workdir / "servables"
    shutil.copytree(GPT / "gpt", servables / "gpt")
    (servables / "gpt" / "layout.json").write_text(json.dumps({"rank_size": 2, "stage_size": 2}))
    (workdir / "cluster").mkdir()
    # Every new input shape (a prompt length, a decode batch size) compiles the graph once, holding the agent's GIL:
    # on a loaded 2-core machine that can outlast the default 3 s of heartbeat silence: every link here allows 9 s.
    slow_heartbeat = ["--heartbeat-interval", "3"]
    cluster = LocalCluster(workdir / "cluster", servables, "gpt",
                           [workdir / "model" / "device0", workdir / "model" / "device1"], slow_heartbeat,
                           slow_heartbeat, slow_heartbeat)
    try:
        cluster.wait_ready({"prompt": "hi", "max_tokens": np.array(1, np.int32)})
        yield cluster, Reference()
    finally:
        cluster.stop()


def sampling_inputs(prompt: str, params: SamplingParams) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": np.array(params.max_tokens, np.int32),
            "temperature": np.array(params.temperature, np.float32), "top_k": np.array(params.top_k, np.int32),
            "top_p": np.array(params.top_p, np.float32),
            "frequency_penalty": np.array(params.frequency_penalty, np.float32),
            "presence_penalty": np.array(params.presence_penalty, np.float32),
            "seed": np.array(-1 if params.seed is None else params.seed, np.int64)}


def test_gpt_over_two_stages_gives_the_references_tokens_to_concurrent_requests(gpt: tuple[LocalCluster, Any]
                                                                                ) -> None:
    cluster, reference = gpt
    prompts = ["ROMEO.\nWhat light", "The", " ".join(["And so the king said unto them"] * 6)]
    params = [SamplingParams(max_tokens=10), SamplingParams(max_tokens=8),
              SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, frequency_penalty=0.5, seed=7)]
    assert len(reference.encode(prompts[2])) > 32  # prefilled in two chunks
    with cluster.client("predict") as client:
        futures = [client.infer_async(sampling_inputs(prompt, p), timeout=120)
                   for prompt, p in zip(prompts, params, strict=True)]
        for prompt, p, future in zip(prompts, params, futures, strict=True):
            (result,) = future.result()
            expected = reference.generate(reference.encode(prompt), p)
            assert result["token_ids"].tolist() == expected.token_ids, prompt
            assert result["finish_reason"] == expected.finish_reason
            assert result["text"] == reference.decode(expected.token_ids)
            assert int(result["prompt_tokens"]) == len(reference.encode(prompt))
            assert int(result["completion_tokens"]) == len(expected.token_ids)


def test_gpt_generate_streams_each_token_and_its_text(gpt: tuple[LocalCluster, Any]) -> None:
    cluster, reference = gpt
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=40, seed=3)
    expected = reference.generate(reference.encode("JULIET."), params)
    with cluster.client("generate") as client, client.infer_stream(sampling_inputs("JULIET.", params),
                                                                   timeout=60) as stream:
        partials = list(stream)
        final = stream.result()
    assert [p["token_ids"].tolist() for p in partials] == [[token] for token in expected.token_ids]
    assert "".join(p["text"] for p in partials) == final["text"] == reference.decode(expected.token_ids)
    assert final["token_ids"].tolist() == expected.token_ids


def test_gpt_defaults_a_full_context_and_a_prompt_too_long(gpt: tuple[LocalCluster, Any]) -> None:
    cluster, reference = gpt
    max_len = reference.config["max_len"]
    with cluster.client("predict") as client:
        (result,) = client.infer({"prompt": "KING."}, timeout=60)  # every sampling input left out: the defaults
        assert result["token_ids"].tolist() == reference.generate(reference.encode("KING."),
                                                                  SamplingParams()).token_ids
        long = " ".join(["the"] * (max_len - 3))
        room = max_len - len(reference.encode(long))
        (result,) = client.infer({"prompt": long, "max_tokens": np.array(room + 5, np.int32)}, timeout=60)
        assert (len(result["token_ids"]), result["finish_reason"]) == (room, "length")
        with pytest.raises(ClientError) as refused:
            client.infer({"prompt": " ".join(["the"] * (max_len + 10))}, timeout=60)
    assert refused.value.code == ErrorCode.INVALID_ARGUMENT
    assert f"the model takes 1 to {max_len}" in refused.value.message
    wait_for(lambda: sequences(cluster) == 0, 5, what="every slot free")
