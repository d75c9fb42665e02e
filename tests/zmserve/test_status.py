"""`zmserve status` in-process (click's runner) against a real Broker on a thread; the text it draws."""

from __future__ import annotations

import json
import threading

from click.testing import CliRunner

from zmserve.cli import main
from zmserve.protocol import AgentStatus, ServableInfo, Status, Traffic, WorkerInfo
from zmserve.status import duration, milliseconds, render
from zmserve.transport import free_port
from zmserve_services.broker.broker import Broker


def test_json_and_text_from_a_running_broker() -> None:
    broker = Broker("tcp://127.0.0.1:0", None)
    thread = threading.Thread(target=broker.run, daemon=True)
    thread.start()
    try:
        runner = CliRunner()
        result = runner.invoke(main, ["status", "--broker", broker.client_endpoint, "--json"])
        assert result.exit_code == 0, result.output
        answer = json.loads(result.stdout)
        assert answer["type"] == "status" and answer["workers"] == [] and answer["servables"] == []
        result = runner.invoke(main, ["status", "--broker", broker.client_endpoint])
        assert result.exit_code == 0 and "no servable is registered" in result.stdout
    finally:
        broker.stop()
        thread.join(timeout=10)


def test_no_broker_exits_1_with_one_line() -> None:
    result = CliRunner().invoke(main, ["status", "--broker", f"127.0.0.1:{free_port()}", "--timeout", "0.2"])
    assert result.exit_code == 1
    assert "Error: no answer from the broker at tcp://127.0.0.1:" in result.output


def test_text_lists_servables_workers_and_agents_by_stage() -> None:
    agents = [AgentStatus(0, 0, "ready", "a", 10, 0.25), AgentStatus(1, 1, "restarting", "b", 11, None, 2)]
    worker = WorkerInfo(servable="mlp", version=1, ready=False, reason="waiting for agents: 1/2 registered",
                        state="waiting_for_agents", address="10.0.0.1:6200", host="box", pid=7, methods=["predict"],
                        agents=agents, requests=0, queued=0, calls_in_flight=0, in_flight=0, status_age=0.4)
    status = Status(id=1, uptime_s=3725, in_flight=0,
                    servables=[ServableInfo("mlp", 1, ["predict"], False, "waiting for agents: 1/2 registered")],
                    lost=["old"], workers=[worker],
                    traffic=[Traffic("mlp", 60.0, 120, 3, 1.234, 25.0, 5, [])])
    lines = render(status, "tcp://b:5500").splitlines()
    assert lines[0] == "broker tcp://b:5500  up 1h 2m 5s  0 requests in flight"
    assert lines[2].split() == ["SERVABLE", "VERSION", "METHODS", "READY", "REQUESTS/60s", "ERRORS", "P50", "P99"]
    assert lines[3].split() == ["mlp", "1", "predict", "no", "120", "3", "1.23", "ms", "25.0", "ms"]
    assert lines[4].split() == ["old", "-", "-", "lost"]
    assert "NOT READY: waiting for agents: 1/2 registered" in lines[6]
    assert lines[9].split() == ["0", "0", "ready", "a", "10", "0.7", "s", "ago", "0"]  # 0.25 + the status's 0.4
    assert lines[10].split() == ["1", "1", "restarting", "b", "11", "-", "2"]


def test_units() -> None:
    assert [duration(s) for s in (5, 65, 3600, 90061)] == ["5s", "1m 5s", "1h 0m 0s", "1d 1h 1m 1s"]
    assert [milliseconds(v) for v in (None, 1.234, 12.34, 2500.0)] == ["-", "1.23 ms", "12.3 ms", "2.50 s"]
