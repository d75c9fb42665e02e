"""Hosts for tests, for real: network namespaces joined by veth pairs to a bridge in the first one.

    with hosts("server", "host_a", "host_b") as names:   # server 10.231.0.1, host_a .2, host_b .3
        subprocess.Popen(in_namespace(names["host_a"], [...]))

Each namespace has its own loopback and its own ports, so every test picks the addresses it likes. Skips the test
(with the reason) where the machine does not allow `ip netns` (not root, no iproute2).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

SUBNET = "10.231.0"


def ip(*args: str, namespace: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    subprocess.run([*prefix, "ip", *args], check=True, capture_output=True, text=True)


def address(index: int) -> str:
    """The address of the index-th host given to `hosts` (0 is the first, which holds the bridge)."""
    return f"{SUBNET}.{index + 1}"


def in_namespace(namespace: str, command: list[str]) -> list[str]:
    """`command` run inside a namespace (`ip netns exec` execs it: the process's pid is the command's)."""
    return ["ip", "netns", "exec", namespace, *command]


@contextlib.contextmanager
def hosts(*roles: str) -> Iterator[dict[str, str]]:
    """One namespace per role (role -> namespace name), addressed `address(i)` in order; deleted on exit."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    tag = uuid.uuid4().hex[:6]
    names = {role: f"zms-{role[:6]}-{tag}" for role in roles}
    created: list[str] = []
    try:
        for name in names.values():
            try:
                ip("netns", "add", name)
            except subprocess.CalledProcessError as error:
                pytest.skip(f"`ip netns add` is not allowed here: {error.stderr.strip()}")
            created.append(name)
            ip("link", "set", "lo", "up", namespace=name)
        first = names[roles[0]]
        ip("link", "add", "br0", "type", "bridge", namespace=first)
        ip("addr", "add", f"{address(0)}/24", "dev", "br0", namespace=first)
        ip("link", "set", "br0", "up", namespace=first)
        for index, role in enumerate(roles[1:], start=1):
            outer, inner = f"zv{tag}{index}s", f"zv{tag}{index}h"
            ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            ip("link", "set", outer, "netns", first)
            ip("link", "set", inner, "netns", names[role])
            ip("link", "set", outer, "master", "br0", namespace=first)
            ip("link", "set", outer, "up", namespace=first)
            ip("addr", "add", f"{address(index)}/24", "dev", inner, namespace=names[role])
            ip("link", "set", inner, "up", namespace=names[role])
        yield names
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
