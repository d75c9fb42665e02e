"""Per-agent memory limits enforced by the kernel: every agent process runs in a memory cgroup of its own.

Why a cgroup and not a resource limit (measured with MindSpore 2.10 on CPU, docs/BENCHMARKS.md §9):
RLIMIT_AS and RLIMIT_DATA count address space, not memory. An agent that holds 430 MB needs about 2.3 GB of
address space (MindSpore's CPU memory pool reserves it on the first call), so an RLIMIT_AS or RLIMIT_DATA of
1.2 GiB already fails a 6 KB model, and the failure is a "Memory not enough" error inside a MindSpore kernel, not
a death anyone can attribute to the limit. RLIMIT_RSS is ignored by Linux. A memory cgroup limits what the
process really holds (anonymous memory plus page cache, which the kernel reclaims first); past the limit the
kernel's OOM killer SIGKILLs the process and counts the kill in the cgroup, so the launcher can say why it died.

Which cgroup: cgroup v2 (`memory.max`) when the launcher's own v2 cgroup can hand the memory controller to its
children; otherwise cgroup v1 (`memory.limit_in_bytes`) under the launcher's own v1 memory cgroup. The agent's
cgroup is a child of the launcher's, created before the agent starts, joined by the child between fork and exec
(so every page it ever touches is charged to it), and removed once the process is reaped. Cgroups left by a
launcher that was SIGKILLed are removed by the next launcher (`remove_stale`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
CGROUP_PREFIX = "zmserve-agent-"


class MemoryLimitError(RuntimeError):
    """The limit cannot be applied on this machine (the message says what was tried)."""


def parse_size(text: str) -> int:
    """'1.5G', '1536M', '1536MiB', '2g', '1610612736' -> bytes. Units are powers of 1024 (as in docker --memory);
    an optional 'i' and/or 'B' may follow the unit letter."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b?)\s*", text, re.IGNORECASE)
    if match is None or (match.group(3) and not match.group(2) and match.group(3).lower() != "b"):
        raise ValueError(f"{text!r} is not a size: use a number with an optional K, M, G or T (powers of 1024), "
                         f"e.g. 1.5G or 1536M")
    size = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"{text!r}: a memory limit must be positive")
    return size


def format_size(size: int) -> str:
    """Bytes for people: 1610612736 -> '1.5 GiB', 25292800 -> '24.12 MiB'."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.2f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{size} B"


@dataclass(frozen=True)
class Hierarchy:
    """Where this process may create memory-limited child cgroups."""

    version: int
    parent: Path
    """This process's own memory cgroup directory: agent cgroups are created inside it."""

    @property
    def limit_file(self) -> str:
        return "memory.max" if self.version == 2 else "memory.limit_in_bytes"

    def create(self, name: str, limit: int) -> AgentCgroup:
        path = self.parent / name
        path.mkdir()
        try:
            (path / self.limit_file).write_text(str(limit))
            # No swap beyond the limit either (a no-op on a machine without swap).
            if self.version == 2:
                _write_if_present(path / "memory.swap.max", "0")
            else:
                _write_if_present(path / "memory.memsw.limit_in_bytes", str(limit))
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            raise
        return AgentCgroup(path, self.version, limit)

    def remove_stale(self) -> list[Path]:
        """Remove agent cgroups whose launcher is gone (e.g. SIGKILLed before its cleanup); returns them."""
        removed = []
        for path in self.parent.glob(f"{CGROUP_PREFIX}*"):
            match = re.match(rf"{CGROUP_PREFIX}(\d+)-", path.name)
            if match is None or _pid_alive(int(match.group(1))):
                continue
            with contextlib.suppress(OSError):
                path.rmdir()  # only succeeds when no process is left in it
                removed.append(path)
        return removed


@dataclass(frozen=True)
class AgentCgroup:
    """One agent process's cgroup."""

    path: Path
    version: int
    limit: int

    def join(self) -> None:
        """Move the calling process into this cgroup (the launcher's child runs this between fork and exec, so
        only plain system calls)."""
        fd = os.open(self.path / "cgroup.procs", os.O_WRONLY)
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)

    def oom_kills(self) -> int:
        """How many processes the OOM killer ended in this cgroup (it holds only the agent)."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        counters = _read_counters(self.path / name)
        if "oom_kill" in counters:
            return counters["oom_kill"]
        # v1 before Linux 4.13 has no oom_kill line: a limit hit is the best sign left.
        return int(counters.get("under_oom", 0) > 0 or _read_int(self.path / "memory.failcnt") > 0)

    def peak(self) -> int | None:
        """The most memory charged to the cgroup at any moment (None where the kernel does not say)."""
        return _read_int(self.path / ("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"), None)

    def remove(self) -> None:
        """Remove the cgroup once its process has been reaped (the kernel refuses while a process is in it)."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as error:
                if error.errno != errno.EBUSY:
                    raise
                # A reaped process can take a moment to leave its cgroup.
                os.sched_yield()


def find_hierarchy(proc: Path = Path("/proc"), root: Path = Path("/")) -> Hierarchy:
    """cgroup v2 if this process's v2 cgroup can give the memory controller to children, else cgroup v1's memory
    controller; MemoryLimitError saying why neither works. `proc`/`root` exist so tests can pass a fake tree."""
    mounts = _cgroup_mounts((proc / "self" / "mountinfo").read_text())
    memberships = _memberships((proc / "self" / "cgroup").read_text())
    problems = []
    if "cgroup2" in mounts and "" in memberships:
        parent = _resolve(root, mounts["cgroup2"], memberships[""])
        problem = _check_v2(parent)
        if problem is None:
            return Hierarchy(2, parent)
        problems.append(f"cgroup v2 at {parent}: {problem}")
    else:
        problems.append("cgroup v2: not mounted")
    if "memory" in mounts and "memory" in memberships:
        parent = _resolve(root, mounts["memory"], memberships["memory"])
        if os.access(parent, os.W_OK) and (parent / "memory.limit_in_bytes").is_file():
            return Hierarchy(1, parent)
        problems.append(f"cgroup v1 at {parent}: not writable by this user")
    else:
        problems.append("cgroup v1: no memory controller mounted")
    raise MemoryLimitError("--memory-limit needs a memory cgroup this user may create children in; "
                           + "; ".join(problems))


def _check_v2(parent: Path) -> str | None:
    """None if children of `parent` can get memory.max; else why not."""
    if "memory" not in _read_words(parent / "cgroup.controllers"):
        return "the memory controller is not available here (bound to cgroup v1, or not delegated)"
    if "memory" in _read_words(parent / "cgroup.subtree_control"):
        return None
    try:
        (parent / "cgroup.subtree_control").write_text("+memory")
    except OSError as error:
        # EBUSY: the cgroup holds processes itself (cgroup v2's "no internal processes" rule).
        return f"cannot enable the memory controller for children ({error.strerror})"
    return None


def _cgroup_mounts(mountinfo: str) -> dict[str, tuple[str, Path]]:
    """{'cgroup2' or v1 controller name: (mount root, mount point)} from /proc/self/mountinfo."""
    mounts: dict[str, tuple[str, Path]] = {}
    for line in mountinfo.splitlines():
        fields, _, tail = line.partition(" - ")
        parts, tail_parts = fields.split(), tail.split()
        if len(parts) < 5 or len(tail_parts) < 3:
            continue
        fstype, options = tail_parts[0], tail_parts[2].split(",")
        if fstype == "cgroup2":
            mounts.setdefault("cgroup2", (parts[3], Path(parts[4])))
        elif fstype == "cgroup" and "memory" in options:
            mounts.setdefault("memory", (parts[3], Path(parts[4])))
    return mounts


def _memberships(text: str) -> dict[str, str]:
    """{'' (v2) or v1 controller name: path} from /proc/self/cgroup."""
    memberships = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            memberships[controller] = path
    return memberships


def _resolve(root: Path, mount: tuple[str, Path], path: str) -> Path:
    """The directory of cgroup `path` under a mount whose own root is `mount[0]` (not '/' inside a container)."""
    mount_root, mount_point = mount
    relative = path[len(mount_root):] if mount_root != "/" and path.startswith(mount_root) else path
    return root / str(mount_point).lstrip("/") / relative.lstrip("/")


def _read_counters(path: Path) -> dict[str, int]:
    counters = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                counters[key] = int(value)
    return counters


def _read_int(path: Path, default: int | None = 0) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def _read_words(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


def _write_if_present(path: Path, value: str) -> None:
    if path.exists():
        path.write_text(value)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
