"""The readiness signals a supervisor reads (zmserve/readiness.py): systemd's notification socket, a ready file."""

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from zmserve.readiness import Readiness, sd_notify


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, named in $NOTIFY_SOCKET as systemd names it."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify")
        receiver.bind(address)
    else:
        address = f"@zmserve-test-notify-{id(receiver)}"
        receiver.bind("\0" + address[1:])
    receiver.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    yield receiver
    receiver.close()


def test_no_notify_socket_means_no_notification(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False


def test_ready_once_then_status_then_stopping(notify_socket: socket.socket, tmp_path: Path) -> None:
    ready_file = tmp_path / "run" / "ready"
    readiness = Readiness(ready_file)
    assert not ready_file.exists()
    readiness.set_ready("serving m version 1")
    assert notify_socket.recv(4096).decode().splitlines() == ["READY=1", "STATUS=serving m version 1"]
    assert ready_file.exists()
    readiness.set_not_ready("restarting its agents")
    assert notify_socket.recv(4096).decode() == "STATUS=restarting its agents"
    assert not ready_file.exists()
    readiness.set_ready("serving m version 1")
    assert notify_socket.recv(4096).decode() == "STATUS=serving m version 1"  # READY=1 only the first time
    assert ready_file.exists()
    readiness.stopping("draining")
    assert notify_socket.recv(4096).decode().splitlines() == ["STOPPING=1", "STATUS=draining"]
    assert not ready_file.exists()


def test_a_ready_file_left_by_a_dead_process_is_removed_at_start(tmp_path: Path) -> None:
    stale = tmp_path / "ready"
    stale.write_text("4711\n")
    Readiness(stale)
    assert not stale.exists()
