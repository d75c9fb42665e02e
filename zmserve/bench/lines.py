"""JSON lines in and out of the bench: request lines and result lines share one reader."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from zmserve.bench.errors import BenchError

T = TypeVar("T")
STDIN = "-"


def json_object(line: str, what: str) -> dict[str, Any]:
    """Parse one JSON line that must be an object; ValueError says what is wrong."""
    try:
        document = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{what} must be a JSON object")
    return document


def source_name(source: str) -> str:
    return "stdin" if source == STDIN else source


def open_lines(source: str) -> Iterator[str]:
    """The lines of a file, or of stdin for '-'; an unreadable file is a BenchError."""
    if source == STDIN:
        yield from sys.stdin
        return
    try:
        with open(source) as handle:
            yield from handle
    except OSError as exc:
        raise BenchError(f"cannot read {source}: {exc}") from None


def parse_lines(lines: Iterable[str], source: str, parse: Callable[[str], T]) -> list[T]:
    """`parse` applied to every non-blank line; a bad line fails with `source:line: why`."""
    parsed = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            parsed.append(parse(line))
        except ValueError as exc:
            raise BenchError(f"{source}:{number}: {exc}") from None
    return parsed
