"""Chaos: a steady load from several clients on a 2-stage servable (examples/mlp_pipeline, PP2 x TP2: four agents
in two groups) while faults hit every phase of its life, one after the other, each once the servable serves again:

    agent_kill          SIGKILL an agent while serving
    agent_kill_forming  SIGKILL an agent, then SIGKILL another while the new groups form (inside init())
    agent_kill_loading  SIGKILL an agent, then SIGKILL another once the first new agent has joined its group
                        (the others load and warm up)
    agent_stop          SIGSTOP an agent for 1-6 s, then SIGCONT (if it is still alive)
    standby_kill        SIGKILL a standby agent (nothing should notice)
    worker_kill         SIGKILL the worker, start it again with the same arguments
    broker_kill         SIGKILL the broker, start it again on the same ports

    .venv/bin/python -m benchmarks.chaos --duration 600

Checked throughout: every future resolves (a result, or UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED;
anything else is a violation); no request is answered twice on the wire, and every one is answered on the wire
once, except those the client itself ended at their deadline because a broker died with them; every result is the
unsharded numpy forward pass within 1e-5; after each fault the servable serves again (the outage is the fault ->
the first success of a request sent after it); after `stop()` every exit code is 0 and every process the cluster
ever ran is gone. Prints one JSON summary (with the load average before and after, and the longest outage per
fault kind) and exits 1 if anything was violated. `tests/chaos/test_chaos.py` runs the same code briefly.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.util
import itertools
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from zmserve.client import Client, ClientError, IOThread
from zmserve.local import LocalCluster
from zmserve.protocol import Error, Reply, ServingError, decode
from zmserve.supervision import process_name
from zmserve_services.agent.agent import rank_of_process_name

REPO = Path(__file__).resolve().parent.parent
MLP_EXAMPLE = REPO / "examples" / "mlp_pipeline"
RANK_SIZE, STAGE_SIZE = 4, 2
FAULTS = ("agent_kill", "agent_kill_forming", "agent_kill_loading", "agent_stop", "standby_kill", "worker_kill",
          "broker_kill")
ALLOWED_ERRORS = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})
HANG_GRACE_S = 5.0
"""A future still unresolved this long after its request's timeout counts as a hung client."""
RECOVERY_TIMEOUT_S = 90.0
PHASE_WAIT_S = 60.0
"""How long a fault aimed at a phase waits for that phase to begin."""
WIRE_SETTLE_S = 10.0
"""How long, after the load stops, answers that lost the race against the client's own deadline may take."""
ORPHAN_WAIT_S = 10.0


def load_mlp_export() -> Any:
    spec = importlib.util.spec_from_file_location("mlp_export_for_chaos", MLP_EXAMPLE / "export_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mlp = load_mlp_export()
WEIGHTS = mlp.make_weights(mlp.DEFAULT_LAYERS, mlp.DEFAULT_HIDDEN, mlp.DEFAULT_FFN)


def reference(x: np.ndarray) -> np.ndarray:
    return mlp.reference_forward(x, WEIGHTS)


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
    client: int = 0
    request_id: int = 0
    local: bool = False
    """Ended by the client's own clock (DEADLINE_EXCEEDED with no answer from the broker)."""


@dataclass
class Load:
    """What the client threads saw, appended under a lock; the fault loop reads it to spot recovery."""

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


def mlp_input(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((mlp.DEFAULT_BATCH, mlp.DEFAULT_HIDDEN)).astype(np.float32)


def client_loop(client: CountingClient, load: Load, stop: threading.Event, seed: int, timeout: float,
                pause: float, sent: list[int], index: int = 0, make_input: Callable = mlp_input,
                expected: Callable = reference, input_name: str = "x", output_name: str = "y") -> None:
    """One request at a time, random input, until stopped; `sent[0]` counts requests (the client numbers them 1..,
    so the count is also the id of the last one)."""
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        x = make_input(rng)
        started = time.monotonic()
        future = client.infer_async({input_name: x}, timeout=timeout)
        sent[0] += 1
        request_id = sent[0]
        try:
            y = future.result(timeout=timeout + HANG_GRACE_S)[0][output_name]
        except ClientError as error:
            code = str(error.code)
            load.add(Outcome(started, time.monotonic(), code, index, request_id,
                             local=error.message.startswith("no reply before the deadline")),
                     unexpected=None if code in ALLOWED_ERRORS else f"{code}: {error.message}")
        except concurrent.futures.TimeoutError:
            load.add(Outcome(started, time.monotonic(), "HUNG", index, request_id),
                     unexpected="HUNG: future never resolved")
        else:
            wrong = not np.allclose(y, expected(x), atol=1e-5, rtol=0)
            load.add(Outcome(started, time.monotonic(), "OK", index, request_id), wrong=wrong)
        stop.wait(pause)


# ---- processes --------------------------------------------------------------------------------------------------
def process_identity(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a live pid: a pid alone may be reused by an unrelated process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:  # gone meanwhile
        return children
    for task in tasks:
        try:
            children.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return children


def agent_pids(launcher: int) -> list[int]:
    """The launcher's active agents (its other children are standby agents waiting to be used)."""
    return [pid for pid in child_pids(launcher) if rank_of_process_name(process_name(pid)) is not None]


def standby_pids(launcher: int) -> list[int]:
    return [pid for pid in child_pids(launcher) if rank_of_process_name(process_name(pid)) is None]


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


def load_average() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


class LogTail:
    """New JSON lines of a log file since the last call (the file may be replaced by a restarted process)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.inode = path, 0, None

    def records(self) -> list[dict[str, Any]]:
        try:
            stat = self.path.stat()
        except OSError:
            return []
        if stat.st_ino != self.inode or stat.st_size < self.offset:
            self.inode, self.offset = stat.st_ino, 0
        with self.path.open("rb") as file:
            file.seek(self.offset)
            data = file.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        records = []
        for line in complete.splitlines():
            if line.startswith(b"{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records


def check_wire(clients: list[CountingClient], sent: list[int], excused: set[tuple[int, int]] | None = None
               ) -> list[str]:
    """Every request id 1..n of every client answered exactly once on the wire: none twice, and none never except
    the `excused` (client index, id) pairs."""
    excused = excused or set()

    def unanswered(index: int, client: CountingClient, count: int) -> bool:
        answers = client.answers()
        return any(answers[i] == 0 and (index, i) not in excused for i in range(1, count + 1))

    deadline = time.monotonic() + WIRE_SETTLE_S
    pairs = list(enumerate(zip(clients, sent, strict=True)))
    while time.monotonic() < deadline and any(unanswered(i, c, n) for i, (c, n) in pairs):
        time.sleep(0.05)
    problems = []
    for index, (client, count) in pairs:
        answers = client.answers()
        missing = [i for i in range(1, count + 1) if answers[i] == 0 and (index, i) not in excused]
        duplicated = {i: n for i, n in answers.items() if n > 1}
        unknown = {i: n for i, n in answers.items() if not (isinstance(i, int) and 1 <= i <= count)}
        if missing or duplicated or unknown:
            problems.append(f"client {index}: no answer to {missing[:10]} ({len(missing)}), several answers "
                            f"to {duplicated}, answers to unknown ids {unknown}")
    return problems


def export_mlp(workdir: Path) -> list[Path]:
    subprocess.run([sys.executable, str(MLP_EXAMPLE / "export_model.py"), "--rank-size", str(RANK_SIZE),
                    "--stage-size", str(STAGE_SIZE), "--output-dir", str(workdir / "model")],
                   check=True, capture_output=True, env={**os.environ, "GLOG_v": "3"})
    return [workdir / "model" / f"device{r}" / "mlp.mindir" for r in range(RANK_SIZE)]


# ---- the run ----------------------------------------------------------------------------------------------------
class Chaos:
    """One chaos run: a cluster in `workdir`, `clients` load threads, faults for `duration` seconds."""

    def __init__(self, workdir: Path, duration: float, clients: int = 4, timeout: float = 5.0,
                 pause: float = 0.02, serve_between: tuple[float, float] = (2.0, 5.0),
                 faults: tuple[str, ...] = FAULTS, seed: int = 0, rounds: int | None = None) -> None:
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS}")
        self.workdir, self.duration, self.clients, self.timeout = workdir, duration, clients, timeout
        self.pause, self.serve_between, self.faults = pause, serve_between, faults
        self.rounds = rounds
        """Stop after this many rounds (every fault kind once each), or at `duration`, whichever comes first."""
        self.rng = random.Random(seed)
        self.seed = seed
        self.load = Load()
        self.injected: list[dict[str, Any]] = []
        self.seen: dict[int, tuple[str, str]] = {}
        """Every process the cluster ran (pid -> start time, command line), for the orphan check."""
        self.restarts: Counter[str] = Counter()
        self.broker_kills: list[float] = []
        self.started = time.monotonic()

    def run(self) -> dict[str, Any]:
        """Export, start, load and faults, stop, check; returns the summary (`violations` empty if all held)."""
        load_before = load_average()
        model_files = export_mlp(self.workdir)
        cluster = LocalCluster(self.workdir, MLP_EXAMPLE, "mlp", model_files, standby=True)
        markers = [cluster.client_address.removeprefix("tcp://"), cluster.worker_address.removeprefix("tcp://"),
                   cluster.distributed_address, str(self.workdir)]
        stop = threading.Event()
        threads: list[threading.Thread] = []
        clients: list[CountingClient] = []
        sent: list[list[int]] = []
        violations: list[str] = []
        started = time.monotonic()
        try:
            cluster.wait_ready({"x": np.zeros((mlp.DEFAULT_BATCH, mlp.DEFAULT_HIDDEN), np.float32)})
            self.remember(cluster)
            started = self.started = time.monotonic()
            for index in range(self.clients):
                client = CountingClient(cluster.client_address, "mlp", "predict")
                clients.append(client)
                sent.append([0])
                thread = threading.Thread(target=client_loop, name=f"chaos-client-{index}", daemon=True,
                                          args=(client, self.load, stop, self.seed * 100 + index, self.timeout,
                                                self.pause, sent[-1], index))
                threads.append(thread)
                thread.start()
            try:
                violations += self.inject_until(started + self.duration, cluster)
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
        return self.summary(elapsed, codes, orphans, violations, sum(s[0] for s in sent), load_before)

    def inject_until(self, end: float, cluster: LocalCluster) -> list[str]:
        """Serve a while, inject the next fault, wait until a request sent after it succeeds; again, until `end`.
        Faults come in rounds, each round every kind once in a random order."""
        order: list[str] = []
        tails = {name: LogTail(cluster.logs[name]) for name in ("worker", "agents")}
        for turn in itertools.count():
            if self.rounds is not None and turn >= self.rounds * len(self.faults):
                return []
            serve_until = time.monotonic() + self.rng.uniform(*self.serve_between)
            while time.monotonic() < min(serve_until, end):
                cluster.check_alive()
                self.remember(cluster)
                time.sleep(0.1)
            if time.monotonic() >= end:
                return []
            if not order:
                order = self.rng.sample(self.faults, len(self.faults))
            kind = order.pop()
            for tail in tails.values():
                tail.records()  # only what happens from now on counts for the phase this fault waits for
            index = len(self.load)
            fault = self.inject(kind, cluster, tails)
            if fault is None:
                continue
            self.injected.append(fault)
            at = fault.pop("moment")
            fault["at_s"] = round(at - self.started, 2)
            while (first := self.load.first_success_sent_after(at, index)) is None:
                if time.monotonic() - at > RECOVERY_TIMEOUT_S:
                    return [f"not serving {RECOVERY_TIMEOUT_S} s after {fault}\n{cluster.log_tails()}"]
                cluster.check_alive()
                self.remember(cluster)
                time.sleep(0.05)
            fault["outage_s"] = round(first.done - at, 3)
            fault["load1"] = load_average()[0]
        return []

    # ---- the faults -----------------------------------------------------------------------------------------
    def inject(self, kind: str, cluster: LocalCluster, tails: dict[str, LogTail]) -> dict[str, Any] | None:
        """Inject one fault; its record with `moment` (monotonic) when it hit, or None when it does not apply."""
        launcher = cluster.processes["agents"].pid
        record: dict[str, Any] = {"kind": kind}
        if kind == "agent_kill":
            return self.kill_agent(launcher, record)
        if kind in ("agent_kill_forming", "agent_kill_loading"):
            if self.kill_agent(launcher, {}) is None:
                return None
            if kind == "agent_kill_forming":
                phase = self.wait_for_event(tails["worker"], "forming_groups", cluster)
                time.sleep(self.rng.uniform(0.0, 1.5))  # the agents are importing, or inside init()
            else:
                phase = self.wait_for_event(tails["agents"], "group_joined", cluster)
            if phase is None:
                record["skipped"] = "the phase did not come"
                return None
            return self.kill_agent(launcher, record)
        if kind == "agent_stop":
            agents = agent_pids(launcher)
            if not agents:
                return None
            victim = self.rng.choice(agents)
            moment = time.monotonic()
            os.kill(victim, signal.SIGSTOP)
            held = self.rng.uniform(1.0, 6.0)
            time.sleep(held)
            if process_identity(victim) is not None:
                os.kill(victim, signal.SIGCONT)
            return {**record, "pid": victim, "held_s": round(held, 2), "moment": moment}
        if kind == "standby_kill":
            standbys = standby_pids(launcher)
            if not standbys:
                return None
            victim = self.rng.choice(standbys)
            moment = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            return {**record, "pid": victim, "moment": moment}
        if kind in ("worker_kill", "broker_kill"):
            name = kind.removesuffix("_kill")
            process = cluster.processes[name]
            self.remember(cluster)
            moment = time.monotonic()
            os.kill(process.pid, signal.SIGKILL)
            if name == "broker":
                self.broker_kills.append(moment)
            process.wait(timeout=10)
            self.restart(cluster, name)
            return {**record, "pid": process.pid, "moment": moment}
        raise ValueError(kind)

    def kill_agent(self, launcher: int, record: dict[str, Any]) -> dict[str, Any] | None:
        agents = agent_pids(launcher)
        if not agents:
            return None
        victim = self.rng.choice(agents)
        rank = rank_of_process_name(process_name(victim))
        moment = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        return {**record, "pid": victim, "rank": rank, "moment": moment}

    def wait_for_event(self, tail: LogTail, event: str, cluster: LocalCluster) -> dict[str, Any] | None:
        deadline = time.monotonic() + PHASE_WAIT_S
        while time.monotonic() < deadline:
            found = next((r for r in tail.records() if r.get("event") == event), None)
            if found is not None:
                return found
            cluster.check_alive()
            self.remember(cluster)
            time.sleep(0.02)
        return None

    def restart(self, cluster: LocalCluster, name: str) -> None:
        """What a process supervisor would do: start it again with the same arguments (its log so far kept)."""
        self.restarts[name] += 1
        log = cluster.logs[name]
        log.rename(log.with_name(f"{name}.{self.restarts[name]}.log"))
        arguments = list(cluster.processes[name].args)
        cluster.start(name, arguments[arguments.index("--log-level") + 2:])

    # ---- the checks -----------------------------------------------------------------------------------------
    def remember(self, cluster: LocalCluster) -> None:
        """Note every process of the cluster's trees now (polled often, so short-lived agents are seen too)."""
        for process in cluster.processes.values():
            for pid in [process.pid, *descendants(process.pid)]:
                identity = process_identity(pid)
                if identity is not None and pid not in self.seen:
                    self.seen[pid] = (identity[1], command_line(pid))

    def lost_with_a_broker(self, outcome: Outcome) -> bool:
        """A request the client ended by its own clock while a broker died: nobody was left to answer it."""
        return outcome.local and any(outcome.sent - 1.0 <= killed <= outcome.done for killed in self.broker_kills)

    def check_wire(self, clients: list[CountingClient], sent: list[int]) -> list[str]:
        with self.load.lock:
            excused = {(o.client, o.request_id) for o in self.load.outcomes if self.lost_with_a_broker(o)}
        return check_wire(clients, sent, excused)

    def orphans(self, markers: list[str]) -> list[str]:
        """Processes still alive after stop(): any the cluster ran, or any naming its ports or directory."""
        ours = ancestors(os.getpid())

        def alive() -> list[str]:
            found = [f"{pid} {cmd}" for pid, (start, cmd) in self.seen.items()
                     if (identity := process_identity(pid)) is not None and identity[1] == start
                     and identity[0] != "Z"]
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
                requests_sent: int, load_before: list[float]) -> dict[str, Any]:
        outcomes = self.load.outcomes
        errors = Counter(o.code for o in outcomes if o.code != "OK")
        hung = errors.pop("HUNG", 0)
        if hung:
            violations.append(f"{hung} futures never resolved")
        if self.load.wrong:
            violations.append(f"{self.load.wrong} wrong results")
        if self.load.unexpected:
            violations.append(f"{len(self.load.unexpected)} unexpected answers, e.g. {self.load.unexpected[:3]}")
        unrecovered = [f for f in self.injected if "outage_s" not in f]
        if unrecovered:
            violations.append(f"{len(unrecovered)} faults without recovery")
        by_kind: dict[str, dict[str, Any]] = {}
        for kind in self.faults:
            outages = [f["outage_s"] for f in self.injected if f["kind"] == kind and "outage_s" in f]
            by_kind[kind] = {"count": len([f for f in self.injected if f["kind"] == kind]),
                             "mean_outage_s": round(sum(outages) / len(outages), 2) if outages else None,
                             "longest_outage_s": max(outages, default=None)}
        return {
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "load_average_before": load_before,
            "load_average_after": load_average(),
            "servable": f"mlp PP{STAGE_SIZE} x TP{RANK_SIZE // STAGE_SIZE}",
            "duration_s": round(elapsed, 1),
            "clients": self.clients,
            "timeout_s": self.timeout,
            "requests_sent": requests_sent,
            "answered": len(outcomes) - hung,
            "ok": sum(o.code == "OK" for o in outcomes),
            "wrong_results": self.load.wrong,
            "errors_by_code": dict(sorted(errors.items())),
            "ended_by_the_client_after_a_broker_kill": sum(self.lost_with_a_broker(o) for o in outcomes),
            "hung": hung,
            "faults": len(self.injected),
            "recoveries": len(self.injected) - len(unrecovered),
            "by_kind": by_kind,
            "longest_outage_s": max((f["outage_s"] for f in self.injected if "outage_s" in f), default=None),
            "fault_log": self.injected,
            "exit_codes": codes,
            "orphans": orphans,
            "violations": violations,
            "workdir": str(self.workdir),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load and faults")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=5.0, help="each request's timeout")
    parser.add_argument("--pause", type=float, default=0.02, help="seconds each client waits between requests")
    parser.add_argument("--serve-min", type=float, default=2.0, help="seconds of service before a fault, at least")
    parser.add_argument("--serve-max", type=float, default=5.0)
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, from {', '.join(FAULTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="logs and model (default: a new temp dir)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="zmserve-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    summary = Chaos(workdir, args.duration, args.clients, args.timeout, args.pause, (args.serve_min, args.serve_max),
                    tuple(f for f in args.faults.split(",") if f), args.seed).run()
    print(json.dumps(summary, indent=2))
    sys.exit(1 if summary["violations"] else 0)


if __name__ == "__main__":
    main()
