"""Rank tables in MindSpore's schema: which server holds which rank.

```json
{"version": "1.0", "server_count": "1",
 "server_list": [{"server_id": "127.0.0.1", "host_nic_ip": "reserve",
                  "device": [{"device_id": "0", "device_ip": "192.1.27.6", "rank_id": "0"}, ...]}],
 "status": "completed"}
```
A table that disagrees with the servable's rank_size, repeats a rank or misses one is rejected when the worker
starts, with a message naming the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class RankTableError(ValueError):
    pass


@dataclass(frozen=True)
class RankEntry:
    rank_id: int
    server_id: str
    device_id: int
    device_ip: str


@dataclass(frozen=True)
class RankTable:
    entries: dict[int, RankEntry]
    source: str

    @classmethod
    def load(cls, path: str | Path, rank_size: int) -> RankTable:
        try:
            document = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RankTableError(f"rank table {path}: {exc}") from None
        return cls.parse(document, rank_size, str(path))

    @classmethod
    def parse(cls, document: Any, rank_size: int, source: str = "rank table") -> RankTable:
        def fail(problem: str) -> RankTableError:
            return RankTableError(f"{source}: {problem}")

        if not isinstance(document, dict) or not isinstance(document.get("server_list"), list):
            raise fail("needs a 'server_list' list")
        servers = document["server_list"]
        if "server_count" in document and _as_int(document["server_count"]) != len(servers):
            raise fail(f"server_count is {document['server_count']} but server_list has {len(servers)} servers")
        if document.get("status", "completed") != "completed":
            raise fail(f"status is {document.get('status')!r}, expected 'completed'")
        entries: dict[int, RankEntry] = {}
        for server in servers:
            if not isinstance(server, dict) or not isinstance(server.get("device"), list):
                raise fail("each server needs a 'device' list")
            server_id = str(server.get("server_id", ""))
            for device in server["device"]:
                rank = _as_int(device.get("rank_id")) if isinstance(device, dict) else None
                if rank is None:
                    raise fail(f"server {server_id}: a device has no integer rank_id: {device!r}")
                if rank in entries:
                    raise fail(f"rank {rank} appears twice (servers {entries[rank].server_id} and {server_id})")
                entries[rank] = RankEntry(rank, server_id, _as_int(device.get("device_id")) or 0,
                                          str(device.get("device_ip", "")))
        if len(entries) != rank_size:
            raise fail(f"lists {len(entries)} ranks but the servable's rank_size is {rank_size}")
        missing = [r for r in range(rank_size) if r not in entries]
        if missing:
            raise fail(f"ranks {missing} are missing (ranks must be 0..{rank_size - 1})")
        return cls(entries, source)

    def ranks_of_server(self, server_id: str) -> list[int]:
        return sorted(r for r, e in self.entries.items() if e.server_id == server_id)

    def to_document(self) -> dict[str, Any]:
        servers: dict[str, list[RankEntry]] = {}
        for entry in sorted(self.entries.values(), key=lambda e: e.rank_id):
            servers.setdefault(entry.server_id, []).append(entry)
        return write_document(servers)


def write_document(servers: dict[str, list[RankEntry]]) -> dict[str, Any]:
    """A rank table document in MindSpore's schema."""
    return {
        "version": "1.0",
        "server_count": str(len(servers)),
        "server_list": [
            {
                "server_id": server_id,
                "device": [{"device_id": str(e.device_id), "device_ip": e.device_ip, "rank_id": str(e.rank_id)}
                           for e in entries],
                "host_nic_ip": "reserve",
            }
            for server_id, entries in servers.items()
        ],
        "status": "completed",
    }


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
