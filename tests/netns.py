"""Hosts for real, as network namespaces joined by veth links to a bridge in the first one, and faults on their
links.

    with three_hosts() as hosts:                        # the usual three, as below
        subprocess.Popen([*hosts.exec("host_a"), ...])
    with hosts("server", "host_a", "host_b") as names:  # any roles: role -> namespace, addressed address(i)
        subprocess.Popen(in_namespace(names["host_a"], [...]))

  ns "server"  10.231.0.1  (the bridge br0)  broker + worker
  ns "host_a"  10.231.0.2  agents of stage 0
  ns "host_b"  10.231.0.3  agents of stage 1

Each namespace has its own loopback and its own ports, so every test picks the addresses it likes. Faults, each
between two hosts in both directions (rules in each host's OUTPUT chain, matched by the other's address), or on a
host's own link:
  `delay(a, b, ms)`     every packet waits `ms` (NFQUEUE and tests/netdelay.py: this kernel has no netem);
  `loss(a, b, percent)` packets dropped at random (iptables' statistic match);
  `partition(a, b)`     nothing passes;
  `link_down(host)`     the host's own veth is down (it reaches nobody); `link_up(host)` brings it back;
  `heal()`              every rule and delay removed.
Needs root, iproute2 and iptables; `skip_reason()` says what is missing, and the namespaces skip the calling test
with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from zmserve.supervision import reap

SUBNET = "10.231.0"
ROLES = ("server", "host_a", "host_b")
NETDELAY = Path(__file__).resolve().parent / "netdelay.py"


def address(index: int) -> str:
    """The address of the index-th host (0 is the first, which holds the bridge)."""
    return f"{SUBNET}.{index + 1}"


ADDRESS = {role: address(index) for index, role in enumerate(ROLES)}


def skip_reason(faults: bool = False) -> str | None:
    """Why these namespaces (and, with `faults`, their faults) cannot be made here; None if they can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if faults and shutil.which("iptables") is None:
        return "iptables is not installed (apt-get install iptables)"
    return None


def ip(*args: str, namespace: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    subprocess.run([*prefix, "ip", *args], check=True, capture_output=True, text=True)


def iptables(namespace: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", namespace, "iptables", *args], check=True, capture_output=True, text=True)


def in_namespace(namespace: str, command: list[str]) -> list[str]:
    """`command` run inside a namespace (`ip netns exec` execs it: the process's pid is the command's)."""
    return ["ip", "netns", "exec", namespace, *command]


@dataclass
class Hosts:
    names: dict[str, str]
    """role -> namespace name"""
    addresses: dict[str, str]
    """role -> its address"""
    links: dict[str, str] = field(default_factory=dict)
    """every role but the first -> the name of its veth inside its namespace"""
    delayers: list[subprocess.Popen] = field(default_factory=list)
    queues: int = 0

    def exec(self, role: str) -> list[str]:
        """The command prefix that runs a program on `role`."""
        return in_namespace(self.names[role], [])

    def delay(self, a: str, b: str, ms: float) -> None:
        for source, target in ((a, b), (b, a)):
            self.queues += 1
            queue = str(self.queues)
            delayer = subprocess.Popen([*self.exec(source), sys.executable, str(NETDELAY), queue, str(ms)],
                                       stdout=subprocess.PIPE, text=True)
            self.delayers.append(delayer)
            if delayer.stdout is None or delayer.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the delayer on {source} did not start")
            iptables(self.names[source], "-A", "OUTPUT", "-d", self.addresses[target], "-j", "NFQUEUE",
                     "--queue-num", queue, "--queue-bypass")

    def loss(self, a: str, b: str, percent: float) -> None:
        for source, target in ((a, b), (b, a)):
            iptables(self.names[source], "-A", "OUTPUT", "-d", self.addresses[target], "-m", "statistic", "--mode",
                     "random", "--probability", str(percent / 100), "-j", "DROP")

    def partition(self, a: str, b: str) -> None:
        for source, target in ((a, b), (b, a)):
            iptables(self.names[source], "-A", "OUTPUT", "-d", self.addresses[target], "-j", "DROP")

    def link_down(self, host: str) -> None:
        ip("link", "set", self.links[host], "down", namespace=self.names[host])

    def link_up(self, host: str) -> None:
        ip("link", "set", self.links[host], "up", namespace=self.names[host])

    def heal(self) -> None:
        for name in self.names.values():
            iptables(name, "-F", "OUTPUT")
        for delayer in self.delayers:
            reap(delayer, timeout=5)
        self.delayers.clear()
        for host in self.links:
            self.link_up(host)


@contextlib.contextmanager
def network(*roles: str) -> Iterator[Hosts]:
    """Create one namespace per role, addressed `address(i)` in order, the first holding the bridge (skipping the
    calling test where the machine does not allow it); removed on exit, with every delayer."""
    import pytest

    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:6]
    names = {role: f"zms-{role[:6]}-{tag}" for role in roles}
    created: list[str] = []
    hosts = Hosts(names, {role: address(index) for index, role in enumerate(roles)})
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
            hosts.links[role] = inner
        yield hosts
    finally:
        for delayer in hosts.delayers:
            reap(delayer, timeout=5)
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def three_hosts() -> contextlib.AbstractContextManager[Hosts]:
    """The usual three: "server" (broker and worker), "host_a" and "host_b" (the agents of two stages)."""
    return network(*ROLES)


@contextlib.contextmanager
def hosts(*roles: str) -> Iterator[dict[str, str]]:
    """One namespace per role: role -> namespace name."""
    with network(*roles) as made:
        yield made.names
