"""--memory-limit without MindSpore: size parsing, finding a cgroup hierarchy (on fake /proc and /sys trees), and the
real mechanism on this machine's kernel: a plain Python child in an agent cgroup is OOM-killed past its limit,
the kill is counted, and the cgroup is removed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from zmserve_services.agent.memory_limit import (
    CGROUP_PREFIX,
    Hierarchy,
    MemoryLimitError,
    find_hierarchy,
    format_size,
    parse_size,
)

MIB = 1 << 20


@pytest.mark.parametrize(("text", "size"), [
    ("1.5G", 1536 * MIB), ("1536M", 1536 * MIB), ("1536MiB", 1536 * MIB), ("1.5gib", 1536 * MIB),
    ("2g", 2048 * MIB), ("1GB", 1024 * MIB), ("512k", 512 * 1024), ("1610612736", 1536 * MIB), (" 64M ", 64 * MIB),
    ("1T", 1 << 40), ("100b", 100),
])
def test_sizes_parse_in_powers_of_1024(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "abc", "-1G", "0", "0.0G", "1.5X", "1iB", "1.5 G B", "1e9"])
def test_bad_sizes_are_refused_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|positive"):
        parse_size(text)


def test_sizes_print_for_people() -> None:
    assert [format_size(s) for s in (1536 * MIB, 1 << 30, int(1.25 * (1 << 30)), 25292800, 1023)] == [
        "1.5 GiB", "1 GiB", "1.25 GiB", "24.12 MiB", "1023 B"]


def fake_system(tmp_path: Path, cgroup: str, mountinfo: str, files: dict[str, str]) -> tuple[Path, Path]:
    proc, root = tmp_path / "proc", tmp_path / "root"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "mountinfo").write_text(mountinfo)
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return proc, root


HYBRID_MOUNTS = """\
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTS = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_cgroup_v2_is_used_when_the_memory_controller_is_delegated(tmp_path: Path) -> None:
    proc, root = fake_system(tmp_path, "0::/user.slice/zm.scope\n", V2_MOUNTS, {
        "sys/fs/cgroup/user.slice/zm.scope/cgroup.controllers": "cpu io memory pids\n",
        "sys/fs/cgroup/user.slice/zm.scope/cgroup.subtree_control": "memory\n",
    })
    assert find_hierarchy(proc, root) == Hierarchy(2, root / "sys/fs/cgroup/user.slice/zm.scope")


def test_cgroup_v1_memory_is_the_fallback_when_v2_has_no_memory_controller(tmp_path: Path) -> None:
    """This machine's layout: memory bound to v1, an empty v2 hierarchy mounted beside it."""
    proc, root = fake_system(tmp_path, "4:memory:/process_api/abc\n0::/\n", HYBRID_MOUNTS, {
        "sys/fs/cgroup/unified/cgroup.controllers": "\n",
        "sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes": "9223372036854771712\n",
    })
    assert find_hierarchy(proc, root) == Hierarchy(1, root / "sys/fs/cgroup/memory/process_api/abc")


def test_a_container_mount_root_is_stripped_from_the_cgroup_path(tmp_path: Path) -> None:
    mounts = "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    proc, root = fake_system(tmp_path, "4:memory:/docker/abc/sub\n", mounts, {
        "sys/fs/cgroup/memory/sub/memory.limit_in_bytes": "1\n"})
    assert find_hierarchy(proc, root).parent == root / "sys/fs/cgroup/memory/sub"


def test_no_usable_hierarchy_says_what_was_tried(tmp_path: Path) -> None:
    proc, root = fake_system(tmp_path, "0::/\n", "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n",
                             {"sys/fs/cgroup/unified/cgroup.controllers": "cpu\n"})
    with pytest.raises(MemoryLimitError, match=r"cgroup v2 at .*memory controller is not available.*"
                                               r"cgroup v1: no memory controller mounted"):
        find_hierarchy(proc, root)


@pytest.fixture
def hierarchy() -> Hierarchy:
    try:
        return find_hierarchy()
    except MemoryLimitError as error:
        pytest.skip(f"no memory cgroup here: {error}")


def run_in_cgroup(hierarchy: Hierarchy, name: str, limit: int, allocate_mib: int):
    cgroup = hierarchy.create(name, limit)
    touch = f"b = bytearray({allocate_mib} << 20); b[::4096] = b'x' * len(b[::4096]); print('survived')"
    done = subprocess.run([sys.executable, "-c", touch], preexec_fn=cgroup.join, capture_output=True, text=True,
                          timeout=60)
    return cgroup, done


def test_a_process_over_its_limit_is_oom_killed_and_the_kill_is_counted(hierarchy: Hierarchy) -> None:
    cgroup, done = run_in_cgroup(hierarchy, f"{CGROUP_PREFIX}test-over", 64 * MIB, 200)
    try:
        assert done.returncode == -9 and "survived" not in done.stdout
        assert cgroup.oom_kills() == 1
        peak = cgroup.peak()
        assert peak is None or peak >= 60 * MIB
    finally:
        cgroup.remove()
    assert not cgroup.path.exists()


def test_a_process_under_its_limit_runs_and_nothing_is_counted(hierarchy: Hierarchy) -> None:
    cgroup, done = run_in_cgroup(hierarchy, f"{CGROUP_PREFIX}test-under", 128 * MIB, 16)
    try:
        assert done.returncode == 0 and "survived" in done.stdout
        assert cgroup.oom_kills() == 0
    finally:
        cgroup.remove()


def test_cgroups_of_a_dead_launcher_are_removed(hierarchy: Hierarchy) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = hierarchy.create(f"{CGROUP_PREFIX}{int(dead.stdout)}-rank0-0", 64 * MIB)
    alive = hierarchy.create(f"{CGROUP_PREFIX}{os.getpid()}-rank0-0", 64 * MIB)
    try:
        assert stale.path in hierarchy.remove_stale()
        assert not stale.path.exists() and alive.path.exists()
    finally:
        alive.remove()
        stale.remove()
