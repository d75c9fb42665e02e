"""One result line per request: `{"id", "send_time", "latency_ms", "status", "bytes_out", "bytes_in"}`, plus
`"message"` (why) when the request failed, and for a generation (`zmserve bench --prompts`): `"tokens"` (completion
tokens), `"ttft_ms"` (time to the first streamed tokens; null when none came) and `"itl_ms"` (each gap between two
streamed answers in a row, in order).

`send_time` is wall-clock seconds (so lines from several processes line up), `latency_ms` the time from just
before the send to the moment the answer arrived, `status` "OK" or the error code, `bytes_out`/`bytes_in` the
tensor payload (value frames, not headers).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from zmserve.bench.lines import json_object, parse_lines

OK = "OK"
RECORD_FIELDS = ("id", "send_time", "latency_ms", "status", "bytes_out", "bytes_in")
"""The fields of every record; a failed one adds "message"."""


@dataclass(frozen=True)
class Record:
    id: int
    send_time: float
    latency_ms: float
    status: str
    bytes_out: int = 0
    bytes_in: int = 0
    message: str | None = None
    tokens: int | None = None
    """A generation's completion tokens (None: not a generation)."""
    ttft_ms: float | None = None
    itl_ms: tuple[float, ...] | None = None
    spans: dict[str, float] | None = None
    """A traced request's hop-to-hop µs (`zmserve bench run --trace N`, zmserve/trace.py); else None."""

    @classmethod
    def measured(cls, request_id: int, send_time: float, latency_s: float, status: str, bytes_out: int,
                 bytes_in: int, message: str | None = None) -> Record:
        """A record from raw measurements (seconds), rounded as written."""
        return cls(request_id, round(send_time, 6), round(latency_s * 1000.0, 4), status, bytes_out, bytes_in,
                   None if status == OK else (message or status))

    def with_tokens(self, tokens: int, ttft_s: float | None, gaps_s: list[float]) -> Record:
        """This record as a generation's: its token count, time to first token and inter-token gaps (seconds)."""
        return replace(self, tokens=tokens, ttft_ms=None if ttft_s is None else round(ttft_s * 1000.0, 4),
                       itl_ms=tuple(round(gap * 1000.0, 4) for gap in gaps_s))

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def end_time(self) -> float:
        return self.send_time + self.latency_ms / 1000.0

    def to_dict(self) -> dict[str, Any]:
        fields = {"id": self.id, "send_time": self.send_time, "latency_ms": self.latency_ms, "status": self.status,
                  "bytes_out": self.bytes_out, "bytes_in": self.bytes_in}
        if self.message is not None:
            fields["message"] = self.message
        if self.spans is not None:
            fields["spans"] = self.spans
        if self.tokens is not None:
            fields.update(tokens=self.tokens, ttft_ms=self.ttft_ms, itl_ms=list(self.itl_ms or ()))
        return fields

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, line: str) -> Record:
        """One result line -> Record; ValueError says why it is not one. Missing byte counts are 0 and a
        missing id is -1 (lines written by other tools)."""
        document = json_object(line, "a result line")
        for key in ("send_time", "latency_ms"):
            if not _is_number(document.get(key)):
                raise ValueError(f"'{key}' must be a number, got {document.get(key)!r}")
        if not isinstance(document.get("status"), str):
            raise ValueError(f"'status' must be a string, got {document.get('status')!r}")
        for key in ("id", "bytes_out", "bytes_in"):
            if key in document and (not isinstance(document[key], int) or isinstance(document[key], bool)):
                raise ValueError(f"'{key}' must be an integer, got {document[key]!r}")
        message = document.get("message")
        if message is not None and not isinstance(message, str):
            raise ValueError(f"'message' must be a string, got {message!r}")
        spans = document.get("spans")
        record = cls(document.get("id", -1), float(document["send_time"]), float(document["latency_ms"]),
                     document["status"], document.get("bytes_out", 0), document.get("bytes_in", 0), message,
                     spans=spans if isinstance(spans, dict) else None)
        if "tokens" not in document:
            return record
        tokens, ttft, gaps = document["tokens"], document.get("ttft_ms"), document.get("itl_ms", [])
        if not isinstance(tokens, int) or isinstance(tokens, bool):
            raise ValueError(f"'tokens' must be an integer, got {tokens!r}")
        if ttft is not None and not _is_number(ttft):
            raise ValueError(f"'ttft_ms' must be a number or null, got {ttft!r}")
        if not isinstance(gaps, list) or not all(_is_number(gap) for gap in gaps):
            raise ValueError(f"'itl_ms' must be a list of numbers, got {gaps!r:.80}")
        return replace(record, tokens=tokens, ttft_ms=None if ttft is None else float(ttft),
                       itl_ms=tuple(float(gap) for gap in gaps))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_records(lines: Iterable[str], source: str) -> list[Record]:
    """Every record of a JSON-lines stream (blank lines skipped); a bad line fails with `source:line: why`."""
    return parse_lines(lines, source, Record.from_json)
