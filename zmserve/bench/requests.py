"""What a run sends: request lines (`{"servable", "method", "inputs", "instances"}`) or one generated tensor,
each turned into a `RequestSpec` up front, so sending costs no numpy work."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from zmserve.bench.errors import BenchError
from zmserve.bench.lines import json_object, parse_lines
from zmserve.codec import ALLOWED_DTYPES, Instance

FILLS = ("ones", "zeros", "random")
VALUE_KEYS = frozenset({"shape", "dtype", "fill", "npy"})
REQUEST_KEYS = frozenset({"servable", "method", "inputs", "instances"})


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: where to (None: the command line's --servable/--method), and its instances."""

    servable: str | None
    method: str | None
    instances: list[Instance]

    @property
    def bytes_out(self) -> int:
        return payload_bytes(self.instances)

    def positional(self) -> list[list[np.ndarray]]:
        """The instances as lists of positional inputs (a GraphCell takes its inputs in order, not by name)."""
        return [[np.asarray(v) for v in instance.values()] for instance in self.instances]


def payload_bytes(instances: Iterable[Mapping[str, Any]]) -> int:
    """Bytes of tensor payload (what travels in value frames)."""
    total = 0
    for instance in instances:
        for value in instance.values():
            if isinstance(value, np.ndarray):
                total += value.nbytes
            elif isinstance(value, str | bytes):
                total += len(value)
            else:
                total += np.asarray(value).nbytes
    return total


def parse_shape(text: str) -> list[int]:
    """`128x96` (or `128,96`) -> [128, 96]; an empty string is a scalar."""
    text = text.strip()
    if not text:
        return []
    parts = text.replace(",", "x").split("x")
    if not all(part.strip().isdigit() for part in parts):
        raise BenchError(f"shape {text!r} is not like 128x96")
    return [int(part) for part in parts]


def parse_fill(text: str) -> str | float:
    """`ones`, `zeros`, `random` or a number."""
    if text in FILLS:
        return text
    try:
        return float(text)
    except ValueError:
        raise BenchError(f"fill {text!r} is not one of {', '.join(FILLS)} or a number") from None


def make_array(shape: Sequence[int], dtype: str, fill: str | float, rng: np.random.Generator) -> np.ndarray:
    """A tensor of `shape`/`dtype` filled with ones, zeros, one number, or uniform random values."""
    if dtype not in ALLOWED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(sorted(ALLOWED_DTYPES))}")
    if fill == "ones":
        return np.ones(shape, dtype=dtype)
    if fill == "zeros":
        return np.zeros(shape, dtype=dtype)
    if fill == "random":
        kind = np.dtype(dtype).kind
        if kind == "f":
            return rng.uniform(-1.0, 1.0, shape).astype(dtype)
        if kind == "b":
            return rng.integers(0, 2, shape).astype(dtype)
        return rng.integers(0, 100, shape).astype(dtype)
    if isinstance(fill, bool) or not isinstance(fill, int | float):
        raise ValueError(f"fill {fill!r} is not one of {', '.join(FILLS)} or a number")
    return np.full(shape, fill, dtype=dtype)


def build_value(name: str, spec: Any, rng: np.random.Generator) -> np.ndarray:
    """One input from its JSON description: `{"shape", "dtype", "fill"}` or `{"npy": path}`."""
    if not isinstance(spec, dict):
        raise ValueError(f"input {name!r} must be an object like {{\"shape\": [128, 96], \"dtype\": \"float32\"}}")
    unknown = set(spec) - VALUE_KEYS
    if unknown:
        raise ValueError(f"input {name!r} has unknown keys {sorted(unknown)}; allowed: {sorted(VALUE_KEYS)}")
    if "npy" in spec:
        if len(spec) != 1:
            raise ValueError(f"input {name!r}: 'npy' cannot be combined with shape/dtype/fill")
        try:
            return np.load(spec["npy"], allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"input {name!r}: cannot load {spec['npy']!r}: {exc}") from None
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ValueError(f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")
    return make_array(shape, spec.get("dtype", "float32"), spec.get("fill", "ones"), rng)


def parse_request(line: str, rng: np.random.Generator) -> RequestSpec:
    """One JSON request line -> RequestSpec; raises ValueError saying what is wrong."""
    document = json_object(line, "a request line")
    unknown = set(document) - REQUEST_KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; allowed: {sorted(REQUEST_KEYS)}")
    inputs = document.get("inputs")
    if not isinstance(inputs, dict) or not inputs:
        raise ValueError("'inputs' must be a non-empty object of name -> {shape, dtype, fill} or {npy}")
    count = document.get("instances", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"'instances' must be a positive integer, got {count!r}")
    for key in ("servable", "method"):
        if key in document and not isinstance(document[key], str):
            raise ValueError(f"'{key}' must be a string")
    instance = {name: build_value(name, spec, rng) for name, spec in inputs.items()}
    return RequestSpec(document.get("servable"), document.get("method"), [instance] * count)


def read_requests(lines: Iterable[str], source: str, seed: int | None = None) -> list[RequestSpec]:
    """Every request of a JSON-lines stream (blank lines skipped); a bad line fails with `source:line: why`."""
    rng = np.random.default_rng(seed)
    requests = parse_lines(lines, source, lambda line: parse_request(line, rng))
    if not requests:
        raise BenchError(f"{source}: no requests (expected one JSON object per line)")
    return requests


def generated_line(input_name: str, shape: str, dtype: str, fill: str, count: int) -> str:
    """`--shape/--dtype/--fill/--count` as the request line meaning the same."""
    parsed_fill = parse_fill(fill)
    inputs = {input_name: {"shape": parse_shape(shape), "dtype": dtype, "fill": parsed_fill}}
    return json.dumps({"inputs": inputs, "instances": count})


def generated_request(input_name: str, shape: str, dtype: str, fill: str, count: int,
                      seed: int | None) -> RequestSpec:
    """The one request of `--shape/--dtype/--fill/--count`."""
    try:
        array = make_array(parse_shape(shape), dtype, parse_fill(fill), np.random.default_rng(seed))
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    return RequestSpec(None, None, [{input_name: array}] * count)
