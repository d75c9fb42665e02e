"""Chaos: a steady load from several clients on a rank_size-2 MatMul cluster while a random agent process is
SIGKILLed every few seconds (each time once the service is serving again).

    .venv/bin/python benchmarks/chaos.py --duration 300

Checked throughout: every request gets exactly one answer on the wire and its future resolves (a result, or
UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED; anything else is a violation); every result is -(x @ 0.5)
within 1e-5; after each kill the service serves again (the outage is kill -> first success of a request sent
after the kill); after `stop()` every process the cluster ever ran is gone. Prints one JSON summary and exits 1
if anything was violated. `tests/chaos/test_chaos.py` runs the same code for a minute.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from services.agent.agent import rank_of_process_name
from zmserve.client import Client, ClientError, IOThread
from zmserve.local import LocalCluster
from zmserve.protocol import Error, Reply, ServingError, decode
from zmserve.supervision import process_name

REPO = Path(__file__).resolve().parent.parent
MATMUL_EXAMPLE = REPO / "examples" / "matmul_distributed"
CONFIG = """
from zmserve.server import distributed, register

model = distributed.declare_servable(rank_size=2, stage_size=1, with_batch_dim=False)


@register.register_method(output_names=["y"])
def predict(x):
    return register.add_stage(model, x, outputs_count=1)
"""
ALLOWED_ERRORS = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})
HANG_GRACE_S = 5.0
"""A future still unresolved this long after its request's timeout counts as a hung client."""
RECOVERY_TIMEOUT_S = 90.0
WIRE_SETTLE_S = 10.0
"""How long, after the load stops, answers that lost the race against the client's own deadline may take."""
ORPHAN_WAIT_S = 10.0


def matmul_reference(x: np.ndarray) -> np.ndarray:
    return -(x.astype(np.float64) @ np.full((96, 16), 0.5)).astype(np.float32)


class CountingIOThread(IOThread):
    """The async client's IO thread, counting by request id every answer that reaches its socket, including
    answers to requests its own deadline already ended: "exactly one reply" is a property of the wire, and a
    future resolves once whatever arrives after it."""

    def __init__(self, *args: Any) -> None:
        self.wire_answers: Counter[Any] = Counter()
        self.counting = threading.Lock()
        super().__init__(*args)

    def resolve(self, frames: list[zmq.Frame]) -> None:
        try:
            request_id = decode(frames[0], Reply, Error).id
        except ServingError:
            request_id = "unreadable"
        with self.counting:
            self.wire_answers[request_id] += 1
        super().resolve(frames)


class CountingClient(Client):
    """A Client whose async path counts every answer on the wire (`answers`)."""

    io_thread_class = CountingIOThread

    def answers(self) -> Counter[Any]:
        io = self._io
        if not isinstance(io, CountingIOThread):
            return Counter()
        with io.counting:
            return Counter(io.wire_answers)


@dataclass
class Outcome:
    sent: float
    done: float
    code: str
    """OK, an error code, or HUNG."""


@dataclass
class Load:
    """What the client threads saw, appended under a lock; the killer reads it to spot recovery."""

    outcomes: list[Outcome] = field(default_factory=list)
    wrong: int = 0
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome, wrong: bool = False, unexpected: str | None = None) -> None:
        with self.lock:
            self.outcomes.append(outcome)
            self.wrong += wrong
            if unexpected is not None:
                self.unexpected.append(unexpected)

    def first_success_sent_after(self, moment: float, start_index: int) -> Outcome | None:
        with self.lock:
            return next((o for o in self.outcomes[start_index:] if o.code == "OK" and o.sent > moment), None)

    def __len__(self) -> int:
        with self.lock:
            return len(self.outcomes)


def client_loop(client: CountingClient, load: Load, stop: threading.Event, seed: int, timeout: float,
                pause: float, sent: list[int]) -> None:
    """One request at a time, random x, until stopped; `sent[0]` counts requests (the client numbers them 1..)."""
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        x = rng.standard_normal((128, 96)).astype(np.float32)
        started = time.monotonic()
        future = client.infer_async({"x": x}, timeout=timeout)
        sent[0] += 1
        try:
            y = future.result(timeout=timeout + HANG_GRACE_S)[0]["y"]
        except ClientError as error:
            code = str(error.code)
            load.add(Outcome(started, time.monotonic(), code),
                     unexpected=None if code in ALLOWED_ERRORS else f"{code}: {error.message}")
        except concurrent.futures.TimeoutError:
            load.add(Outcome(started, time.monotonic(), "HUNG"), unexpected="HUNG: future never resolved")
        else:
            wrong = not np.allclose(y, matmul_reference(x), atol=1e-5, rtol=0)
            load.add(Outcome(started, time.monotonic(), "OK"), wrong=wrong)
        stop.wait(pause)


def process_identity(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a live pid: a pid alone may be reused by an unrelated process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return children


def agent_pids(launcher: int) -> list[int]:
    """The launcher's active agents (its other children are standby agents waiting to be used)."""
    return [pid for pid in child_pids(launcher) if rank_of_process_name(process_name(pid)) is not None]


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        children = child_pids(todo.pop())
        found.extend(children)
        todo.extend(children)
    return found


def ancestors(pid: int) -> set[int]:
    """This process and its parents (their command lines may name the work directory too)."""
    found = set()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def export_matmul(workdir: Path) -> list[Path]:
    subprocess.run([sys.executable, str(MATMUL_EXAMPLE / "export_model.py"), "--rank-size", "2",
                    "--output-dir", str(workdir / "model"), "--rank-table", str(workdir / "rank_table.json")],
                   check=True, capture_output=True, env={**os.environ, "GLOG_v": "3"})
    return [workdir / "model" / f"device{r}" / "matmul.mindir" for r in range(2)]


class Chaos:
    """One chaos run: a cluster in `workdir`, `clients` load threads, agent kills for `duration` seconds."""

    def __init__(self, workdir: Path, duration: float, clients: int = 4, timeout: float = 5.0,
                 pause: float = 0.02, kill_every: tuple[float, float] = (2.0, 5.0), seed: int = 0) -> None:
        self.workdir, self.duration, self.clients, self.timeout = workdir, duration, clients, timeout
        self.pause, self.kill_every = pause, kill_every
        self.rng = random.Random(seed)
        self.seed = seed
        self.load = Load()
        self.kills: list[dict[str, Any]] = []
        self.seen: dict[int, tuple[str, str]] = {}
        """Every process the cluster ran (pid -> start time, command line), for the orphan check."""

    def run(self) -> dict[str, Any]:
        """Export, start, load and kill, stop, check; returns the summary (its `violations` empty if all held)."""
        model_files = export_matmul(self.workdir)
        servable_dir = self.workdir / "servables"
        (servable_dir / "matmul").mkdir(parents=True, exist_ok=True)
        (servable_dir / "matmul" / "servable_config.py").write_text(CONFIG)
        cluster = LocalCluster(self.workdir, servable_dir, "matmul", model_files)
        markers = [cluster.client_address.removeprefix("tcp://"), cluster.worker_address.removeprefix("tcp://"),
                   cluster.distributed_address, str(self.workdir)]
        stop = threading.Event()
        threads: list[threading.Thread] = []
        clients: list[CountingClient] = []
        sent: list[list[int]] = []
        violations: list[str] = []
        started = time.monotonic()
        try:
            cluster.wait_ready({"x": np.ones((128, 96), np.float32)})
            self.remember(cluster)
            started = time.monotonic()
            for index in range(self.clients):
                client = CountingClient(cluster.client_address, "matmul", "predict")
                clients.append(client)
                sent.append([0])
                thread = threading.Thread(target=client_loop, name=f"chaos-client-{index}", daemon=True,
                                          args=(client, self.load, stop, self.seed * 100 + index, self.timeout,
                                                self.pause, sent[-1]))
                threads.append(thread)
                thread.start()
            try:
                violations += self.kill_until(started + self.duration, cluster)
            except AssertionError as error:  # a cluster process died (LocalCluster.check_alive)
                violations.append(str(error))
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=self.timeout + 2 * HANG_GRACE_S)
            if any(thread.is_alive() for thread in threads):
                violations.append("a client thread did not finish")
            violations += self.check_wire(clients, [s[0] for s in sent])
            for client in clients:
                client.close()
            self.remember(cluster)
            codes = cluster.stop()
        elapsed = time.monotonic() - started
        if set(codes.values()) != {0}:
            violations.append(f"exit codes {codes}")
        orphans = self.orphans(markers)
        if orphans:
            violations.append(f"orphan processes: {orphans}")
        return self.summary(elapsed, codes, orphans, violations, sum(s[0] for s in sent))

    def kill_until(self, end: float, cluster: LocalCluster) -> list[str]:
        """Kill a random agent, wait until a request sent after the kill succeeds, serve a while, again."""
        launcher = cluster.processes["agents"].pid
        while True:
            serve_until = time.monotonic() + self.rng.uniform(*self.kill_every)
            while time.monotonic() < min(serve_until, end):
                cluster.check_alive()
                self.remember(cluster)
                time.sleep(0.1)
            if time.monotonic() >= end:
                return []
            agents = sorted(agent_pids(launcher))
            if not agents:
                return [f"the launcher has no agents to kill\n{cluster.log_tails()}"]
            victim = self.rng.choice(agents)
            rank = command_line(victim).split("--rank ")[-1].split(" ")[0]
            index = len(self.load)
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            kill: dict[str, Any] = {"pid": victim, "rank": rank, "at_s": round(killed_at - (end - self.duration), 2)}
            self.kills.append(kill)
            while (first := self.load.first_success_sent_after(killed_at, index)) is None:
                if time.monotonic() - killed_at > RECOVERY_TIMEOUT_S:
                    return [f"not serving {RECOVERY_TIMEOUT_S} s after killing agent {victim}\n{cluster.log_tails()}"]
                cluster.check_alive()
                self.remember(cluster)
                time.sleep(0.05)
            kill["outage_s"] = round(first.done - killed_at, 3)

    def remember(self, cluster: LocalCluster) -> None:
        """Note every process of the cluster's trees now (polled often, so short-lived agents are seen too)."""
        for process in cluster.processes.values():
            for pid in [process.pid, *descendants(process.pid)]:
                identity = process_identity(pid)
                if identity is not None and pid not in self.seen:
                    self.seen[pid] = (identity[1], command_line(pid))

    def check_wire(self, clients: list[CountingClient], sent: list[int]) -> list[str]:
        """Every request id 1..n of every client answered exactly once on the wire."""
        def unanswered(client: CountingClient, count: int) -> bool:
            answers = client.answers()
            return any(answers[i] == 0 for i in range(1, count + 1))

        deadline = time.monotonic() + WIRE_SETTLE_S
        while time.monotonic() < deadline and any(unanswered(c, n) for c, n in zip(clients, sent, strict=True)):
            time.sleep(0.05)
        problems = []
        for index, (client, count) in enumerate(zip(clients, sent, strict=True)):
            answers = client.answers()
            missing = [i for i in range(1, count + 1) if answers[i] == 0]
            duplicated = {i: n for i, n in answers.items() if n > 1}
            unknown = {i: n for i, n in answers.items() if not (isinstance(i, int) and 1 <= i <= count)}
            if missing or duplicated or unknown:
                problems.append(f"client {index}: no answer to {missing[:10]} ({len(missing)}), several answers "
                                f"to {duplicated}, answers to unknown ids {unknown}")
        return problems

    def orphans(self, markers: list[str]) -> list[str]:
        """Processes still alive after stop(): any the cluster ran, or any naming its ports or directory."""
        ours = ancestors(os.getpid())

        def alive() -> list[str]:
            found = [f"{pid} {cmd}" for pid, (start, cmd) in self.seen.items()
                     if (identity := process_identity(pid)) is not None and identity[1] == start]
            for proc in Path("/proc").glob("[0-9]*"):
                pid = int(proc.name)
                if pid not in ours and pid not in self.seen and any(m in command_line(pid) for m in markers):
                    found.append(f"{pid} {command_line(pid)}")
            return found

        deadline = time.monotonic() + ORPHAN_WAIT_S
        while (found := alive()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return found

    def summary(self, elapsed: float, codes: dict[str, int], orphans: list[str], violations: list[str],
                requests_sent: int) -> dict[str, Any]:
        outcomes = self.load.outcomes
        errors = Counter(o.code for o in outcomes if o.code != "OK")
        outages = [k["outage_s"] for k in self.kills if "outage_s" in k]
        hung = errors.pop("HUNG", 0)
        if hung:
            violations.append(f"{hung} futures never resolved")
        if self.load.wrong:
            violations.append(f"{self.load.wrong} wrong results")
        if self.load.unexpected:
            violations.append(f"{len(self.load.unexpected)} unexpected answers, e.g. {self.load.unexpected[:3]}")
        if len(outages) != len(self.kills):
            violations.append(f"{len(self.kills) - len(outages)} kills without recovery")
        return {
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "duration_s": round(elapsed, 1),
            "clients": self.clients,
            "timeout_s": self.timeout,
            "requests_sent": requests_sent,
            "answered": len(outcomes) - hung,
            "ok": sum(o.code == "OK" for o in outcomes),
            "wrong_results": self.load.wrong,
            "errors_by_code": dict(sorted(errors.items())),
            "hung": hung,
            "kills": len(self.kills),
            "recoveries": len(outages),
            "longest_outage_s": max(outages, default=None),
            "mean_outage_s": round(sum(outages) / len(outages), 3) if outages else None,
            "kill_log": self.kills,
            "exit_codes": codes,
            "orphans": orphans,
            "violations": violations,
            "workdir": str(self.workdir),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load and kills")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=5.0, help="each request's timeout")
    parser.add_argument("--pause", type=float, default=0.02, help="seconds each client waits between requests")
    parser.add_argument("--kill-min", type=float, default=2.0, help="seconds of service before a kill, at least")
    parser.add_argument("--kill-max", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="logs and model (default: a new temp dir)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="zmserve-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    summary = Chaos(workdir, args.duration, args.clients, args.timeout, args.pause, (args.kill_min, args.kill_max),
                    args.seed).run()
    print(json.dumps(summary, indent=2))
    sys.exit(1 if summary["violations"] else 0)


if __name__ == "__main__":
    main()
