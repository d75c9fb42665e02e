"""MindSpore's TLS inside a group (zmserve/collective_tls.py), for real on CPU: a scheduler and two members
form a group and AllReduce a tensor. With TLS the tensor's bytes appear on no loopback packet (without, they
do: the check can fail), and a member holding another cluster's folder cannot join."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from zmserve.collective import start_scheduler
from zmserve.collective_tls import CollectiveTls, CollectiveTlsError, generate
from zmserve.supervision import reap
from zmserve.transport import free_port

pytestmark = pytest.mark.slow

MEMBER = textwrap.dedent("""
    import sys
    import numpy as np
    from zmserve.collective import import_mindspore, join_group
    from zmserve.collective_tls import CollectiveTls

    port, rank, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    join_group("127.0.0.1", port, 2, rank, CollectiveTls.load(folder) if folder else None)
    import_mindspore()
    from mindspore import Tensor, nn, ops

    class Sum(nn.Cell):
        def __init__(self):
            super().__init__()
            self.reduce = ops.AllReduce()

        def construct(self, x):
            return self.reduce(x)

    print(float(Sum()(Tensor(np.full(4096, 1000.25 + rank, np.float32))).asnumpy()[0]), flush=True)
""")
NEEDLES = [np.full(8, 1000.25 + rank, np.float32).tobytes() for rank in range(2)]


class NeedleCount:
    """Counts, in every loopback packet while it runs, the copies of each rank's input (stores nothing: other
    tests may move gigabytes over the loopback meanwhile)."""

    def __init__(self) -> None:
        try:
            self.raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        except PermissionError:
            pytest.skip("capturing loopback packets needs CAP_NET_RAW (root)")
        self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        self.raw.bind(("lo", 0))
        self.raw.settimeout(0.05)
        self.counts = [0, 0]
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while self.running:
            try:
                packet = self.raw.recv(1 << 17)
            except TimeoutError:
                continue
            for rank, needle in enumerate(NEEDLES):
                self.counts[rank] += packet.count(needle)

    def stop(self) -> list[int]:
        self.running = False
        self.thread.join()
        self.raw.close()
        return self.counts


def run_group(folders: list[Path | None], workdir: Path, timeout: float = 120) -> list[tuple[int | None, str]]:
    """A scheduler (with folders[0]) and members 0 and 1 (folders[1], folders[2]); each one's exit code and output
    (None: still running at the timeout, then killed)."""
    member = workdir / "member.py"  # MindSpore compiles a Cell from its source file: not from `python -c`
    member.write_text(MEMBER)
    port = free_port()
    env = {**os.environ, "GLOG_v": "3"}
    scheduler_tls = CollectiveTls.load(folders[0]) if folders[0] else None
    processes = [start_scheduler("127.0.0.1", port, 2, tls=scheduler_tls, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)]
    for rank in range(2):
        folder = folders[rank + 1]
        processes.append(subprocess.Popen([sys.executable, str(member), str(port), str(rank), str(folder or "")],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outcomes = []
    for process in processes:
        try:
            out, _ = process.communicate(timeout=timeout)
            outcomes.append((process.returncode, out))
        except subprocess.TimeoutExpired:
            reap(process)
            outcomes.append((None, process.communicate()[0]))
        timeout = 5  # the first to hang has used the time
    return outcomes


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("collective_tls") / "cluster")


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_tls_hides_the_collectives_tensors(folder: Path, tls: bool, tmp_path: Path) -> None:
    capture = NeedleCount()
    try:
        outcomes = run_group([folder if tls else None] * 3, tmp_path)
    finally:
        counts = capture.stop()
    # the members' sums prove the group formed and the collective ran (how the scheduler exits afterwards
    # depends on which member leaves first: docs/shared mindspore-cpu-facts, "exit race")
    for _, out in outcomes[1:]:
        assert "2001.5" in out.split(), out[-3000:]
    if tls:
        assert counts == [0, 0], counts
    else:
        assert min(counts) > 0, counts


def test_a_member_of_another_cluster_cannot_join(folder: Path, tmp_path: Path) -> None:
    other = generate(tmp_path / "other")
    outcomes = run_group([folder, folder, other], tmp_path, timeout=60)
    assert outcomes[2][0] not in (0, None), outcomes[2][1][-2000:]  # the stranger gave up: its CA is unknown
    assert "2001.5" not in outcomes[1][1].split()  # the group never formed: member 0 has no sum


def test_generate_writes_a_complete_folder_once(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == ["ca.crt", "client.p12", "password", "server.p12"]
    assert (folder / "password").stat().st_mode & 0o077 == 0
    assert CollectiveTls.load(folder).folder == folder.resolve()
    with pytest.raises(CollectiveTlsError, match="never overwritten"):
        generate(folder)
    (folder.parent / "partial").mkdir()
    with pytest.raises(CollectiveTlsError, match=r"lacks ca\.crt, server\.p12, client\.p12, password"):
        CollectiveTls.load(folder.parent / "partial")
