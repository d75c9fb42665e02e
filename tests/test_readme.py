"""README.md runs as written: its blocks, pasted in order into one bash on one machine, from the repository's root.

The blocks run in one bash process, in a private network namespace (so the README's own ports, 5500 and the
others, are free and nothing else on the machine is touched), in a copy of the repository (so the exported models
and `run.jsonl` land in a temporary folder). Python blocks are fed to `python` in the same shell, as if typed
into it. What the test does with a block is said by an HTML comment on the line before it:
  `<!-- readme-test: the file PATH -->`  the block is that file's content, word for word;
  `<!-- readme-test: not run (why) -->`  not run (e.g. it needs several machines).
The first block (install and run the example, run the tests) is not run: the test suite runs its own tests, and
`tests/examples/test_matmul_distributed.py` and the section below cover what `run_local.py` does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
FIRST_BLOCK = [
    "tools/venv.sh && .venv/bin/python examples/matmul_distributed/run_local.py",
    "tools/venv.sh && .venv/bin/python -m pytest -q",
]
RUN_TIMEOUT_S = 1500.0
MARKER = re.compile(r"<!--\s*readme-test:\s*(?P<what>.*?)\s*-->")


@dataclass
class Block:
    language: str
    text: str
    line: int
    marker: str | None


def readme_blocks() -> list[Block]:
    """Every fenced block, with its language and the readme-test comment on the line before it (if any)."""
    blocks: list[Block] = []
    lines = README.read_text().splitlines()
    index = 0
    while index < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[index])
        if fence is None:
            index += 1
            continue
        start = index
        end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
        previous = lines[start - 1] if start > 0 else ""
        marker = MARKER.search(previous)
        blocks.append(Block(fence[1], "\n".join(lines[start + 1:end]) + "\n", start + 1,
                            marker["what"] if marker else None))
        index = end + 1
    return blocks


def script_of(blocks: list[Block]) -> str:
    """One bash script that does what pasting the blocks in order does; background jobs end with it."""
    parts = ["set -eo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT"]
    for number, block in enumerate(blocks, start=1):
        parts.append(f"echo '=== README block {number} (line {block.line}) ===' >&2")
        if block.language == "bash":
            parts.append(block.text)
        elif block.language == "python":
            parts.append(f"python - <<'README_PYTHON'\n{block.text}README_PYTHON")
        else:
            raise AssertionError(f"README line {block.line}: a ```{block.language} block with no readme-test note")
    return "\n".join(parts) + "\n"


def test_the_first_block_is_the_two_commands() -> None:
    first = readme_blocks()[0]
    assert first.text.splitlines() == FIRST_BLOCK


def test_file_listings_are_the_files() -> None:
    listings = [b for b in readme_blocks() if b.marker and b.marker.startswith("the file ")]
    assert listings
    for block in listings:
        path = REPO / block.marker.removeprefix("the file ")
        assert block.text == path.read_text(), f"README line {block.line} is not {path}"


def copy_of_the_repository(destination: Path) -> Path:
    """The tracked tree without exports, caches and the venv (which is linked: the README activates it)."""
    root = destination / "zmserve"
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(
        ".venv", ".git", "model", "__pycache__", "*.log", "*.jsonl", ".pytest_cache", ".ruff_cache", "rank_table_*",
        "versions"))
    (root / ".venv").symlink_to(REPO / ".venv")
    return root


@pytest.mark.slow
def test_readme_runs_as_written(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("a private network namespace needs root, unshare and ip (the README binds its own ports)")
    blocks = [b for b in readme_blocks()[1:] if b.marker is None]
    script = tmp_path / "readme.sh"
    script.write_text(script_of(blocks))
    root = copy_of_the_repository(tmp_path)
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    started = time.monotonic()
    process = subprocess.Popen(["unshare", "--net", "bash", "-c", f"ip link set lo up && exec bash {script}"],
                               cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"the README did not finish in {RUN_TIMEOUT_S:.0f} s\n{tail(stderr)}") from None
    print(f"the README ran in {time.monotonic() - started:.0f} s\n{stdout}")
    (tmp_path / "stderr.txt").write_text(stderr)
    assert process.returncode == 0, f"exit {process.returncode}\n{tail(stdout)}\n{tail(stderr)}"

    assert "Traceback" not in stdout + stderr, tail(stderr)
    troubles = [line for line in log_lines(stderr) if line["level"] in ("warning", "error", "critical")]
    assert not troubles, troubles
    assert "[{'y': array([[-48., -48., ..., -48., -48.]," in stdout  # client.py
    assert stdout.count("[{'y': array([[-24., -24., ..., -24., -24.],") == 2  # the rollout: version 2, then 0
    assert "-48.0 -96.0 (128, 16)" in stdout  # the Client section
    assert "INVALID_ARGUMENT instance 0: model input 'x' must have shape (128, 96)" in stdout
    assert stdout.count('{"instances":[{"y":[[-48.0,-48.0,-48.0,') == 2  # the HTTP gateway: JSON list and b64
    assert "(128, 16) -48.0 -48.0" in stdout  # tritonclient
    assert "== bench report summary of 1000 records from stdin ==" in stdout and '"count": ' in stdout
    assert "== bench report summary of 100 records from stdin ==" in stdout  # --direct
    difference = float(re.search(r"largest difference from numpy (\S+)", stdout)[1])
    assert difference < 1e-4
    similarities = re.findall(r"^([+-]\d\.\d{4})  '", stdout, re.MULTILINE)
    assert len(similarities) == 4  # examples/minilm/client.py's pairs
    assert re.search(r"^\(384,\) 0\.\d+$", stdout, re.MULTILINE)


def log_lines(stderr: str) -> list[dict]:
    lines = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "level" in record and "event" in record:
                lines.append(record)
    return lines


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])
