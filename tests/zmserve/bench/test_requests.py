"""Request lines and generated requests (zmserve/bench/requests.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from zmserve.bench.errors import BenchError
from zmserve.bench.requests import (
    RequestSpec,
    generated_line,
    generated_request,
    parse_fill,
    parse_shape,
    read_requests,
)


def run_lines(lines: list[str], seed: int = 0) -> list[RequestSpec]:
    return read_requests(lines, "stdin", seed)


def test_fills_shapes_and_instances() -> None:
    requests = run_lines([
        '{"servable": "matmul", "method": "predict", "inputs": {"x": {"shape": [128, 96], "dtype": "float32", '
        '"fill": 1.0}}}',
        "",
        '{"inputs": {"x": {"shape": [2, 3], "dtype": "int32", "fill": "zeros"}}, "instances": 3}',
        '{"inputs": {"x": {"shape": [4, 5], "fill": "random"}, "y": {"shape": [], "dtype": "float64", "fill": 2.5}}}',
    ])
    assert len(requests) == 3
    first, second, third = requests
    assert (first.servable, first.method) == ("matmul", "predict")
    x = first.instances[0]["x"]
    assert x.shape == (128, 96) and x.dtype == np.float32 and (x == 1.0).all()
    assert first.bytes_out == 128 * 96 * 4
    assert (second.servable, second.method) == (None, None)
    assert len(second.instances) == 3 and second.instances[0]["x"].dtype == np.int32
    assert (second.instances[2]["x"] == 0).all()
    assert third.instances[0]["x"].dtype == np.float32
    random = third.instances[0]["x"]
    assert ((random >= -1) & (random <= 1)).all() and len(np.unique(random)) > 1
    assert third.instances[0]["y"].shape == () and third.instances[0]["y"] == 2.5
    assert [a.shape for a in third.positional()[0]] == [(4, 5), ()]


def test_random_fill_is_reproducible_with_a_seed() -> None:
    line = ['{"inputs": {"x": {"shape": [8, 8], "fill": "random"}}}']
    np.testing.assert_array_equal(run_lines(line, seed=5)[0].instances[0]["x"],
                                  run_lines(line, seed=5)[0].instances[0]["x"])


def test_npy_input(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.int64).reshape(3, 4)
    np.save(tmp_path / "a.npy", array)
    (spec,) = run_lines([json.dumps({"inputs": {"x": {"npy": str(tmp_path / "a.npy")}}, "instances": 2})])
    assert len(spec.instances) == 2
    np.testing.assert_array_equal(spec.instances[1]["x"], array)
    assert spec.bytes_out == 2 * array.nbytes


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"servable": "m"}', "'inputs' must be a non-empty object"),
        ('{"inputs": {"x": {"shape": [2, -1]}}}', "'shape' must be a list of non-negative integers"),
        ('{"inputs": {"x": {"shape": "128x96"}}}', "'shape' must be a list"),
        ('{"inputs": {"x": {"shape": [2], "dtype": "complex64"}}}', "dtype 'complex64' is not one of"),
        ('{"inputs": {"x": {"shape": [2], "fill": "twos"}}}', "fill 'twos' is not one of"),
        ('{"inputs": {"x": {"shape": [2], "fil": 1}}}', "unknown keys ['fil']"),
        ('{"inputs": {"x": {"npy": "/no/such/file.npy"}}}', "cannot load '/no/such/file.npy'"),
        ('{"inputs": {"x": {"npy": "a.npy", "shape": [1]}}}', "'npy' cannot be combined"),
        ('{"inputs": {"x": {"shape": [2]}}, "instances": 0}', "'instances' must be a positive integer"),
        ('{"inputs": {"x": {"shape": [2]}}, "instance": 2}', "unknown keys ['instance']"),
        ('{"inputs": {"x": [1, 2]}}', "input 'x' must be an object"),
    ],
)
def test_bad_line_names_its_line_and_why(line: str, fragment: str) -> None:
    good = '{"inputs": {"x": {"shape": [2]}}}'
    with pytest.raises(BenchError) as caught:
        run_lines([good, "", line])
    assert caught.value.message.startswith("stdin:3: ")
    assert fragment in caught.value.message


def test_no_lines_is_an_error() -> None:
    with pytest.raises(BenchError, match="no requests"):
        run_lines(["", "  "])


def test_shape_and_fill_flags() -> None:
    assert parse_shape("128x96") == [128, 96]
    assert parse_shape("4,5,6") == [4, 5, 6]
    assert parse_shape("") == []
    assert parse_fill("random") == "random"
    assert parse_fill("-0.5") == -0.5
    with pytest.raises(BenchError):
        parse_shape("128 by 96")
    with pytest.raises(BenchError):
        parse_fill("lots")


@pytest.mark.parametrize(("shape", "dtype", "fill", "count"),
                         [("128x96", "float32", "ones", 1), ("3x2", "int32", "7", 4), ("", "float64", "zeros", 2)])
def test_generated_line_means_the_same_as_the_flags(shape: str, dtype: str, fill: str, count: int) -> None:
    """A --processes run hands `--shape ...` to its processes as a request line: both must build one request."""
    from_flags = generated_request("x", shape, dtype, fill, count, seed=0)
    (from_line,) = run_lines([generated_line("x", shape, dtype, fill, count)])
    assert (from_line.servable, from_line.method) == (None, None)
    assert len(from_line.instances) == len(from_flags.instances) == count
    expected, got = from_flags.instances[0]["x"], from_line.instances[0]["x"]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
