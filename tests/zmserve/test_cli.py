"""The `zmserve` command line as a user meets it: every option explains itself in --help, every option reads the
environment variable its --help names (ZMSERVE_<COMMAND>_<OPTION>), and the broker's worker port follows --bind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from zmserve.cli import following_port, main


def every_command(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                                                      click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from every_command(sub, (*path, name))


COMMANDS = dict(every_command(main))
OPTIONS = [(path, option) for path, command in COMMANDS.items() for option in command.params
           if isinstance(option, click.Option) and not option.hidden]


def test_the_commands_a_user_meets_are_all_checked() -> None:
    assert {" ".join(path) for path in COMMANDS} >= {"", "broker", "worker", "serve", "agent", "bench",
                                                     "bench run", "bench report"}


@pytest.mark.parametrize(("path", "option"), OPTIONS,
                         ids=[f"{' '.join(path) or 'zmserve'} {option.opts[0]}" for path, option in OPTIONS])
def test_every_option_has_help_and_names_its_environment_variable(path: tuple[str, ...],
                                                                  option: click.Option) -> None:
    assert option.help and len(option.help) > 15, f"{option.opts} has no help text"
    if option.name == "help":
        return
    flag = max((o for o in option.opts if o.startswith("--")), key=len)
    expected = "_".join(["ZMSERVE", *path, flag[2:]]).replace("-", "_").upper()
    assert option.envvar == expected and option.show_envvar


@pytest.mark.parametrize("path", sorted({p for p, _ in OPTIONS if p}), ids=lambda p: " ".join(p))
def test_help_of_every_command_shows_the_variables(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # click wraps long lines, also inside "env var: NAME"
    assert "env var: ZMSERVE_" + "_".join(path).replace("-", "_").upper() in text


def test_servable_dir_says_it_is_the_parent_of_the_servable_folder() -> None:
    for command in ("worker", "serve"):
        [option] = [o for o in COMMANDS[(command,)].params if o.name == "servable_dir"]
        assert "PARENT" in (option.help or "")


def test_worker_options_come_from_the_command_prefixed_variables(tmp_path: Path) -> None:
    """ZMSERVE_WORKER_SERVABLE_DIR and ZMSERVE_WORKER_SERVABLE reach the worker: it looks for that servable."""
    result = CliRunner().invoke(main, ["worker"], env={"ZMSERVE_WORKER_SERVABLE_DIR": str(tmp_path),
                                                       "ZMSERVE_WORKER_SERVABLE": "nothing_here"})
    assert result.exit_code == 1
    assert str(tmp_path / "nothing_here") in result.output, result.output


def test_a_variable_without_the_command_is_not_read(tmp_path: Path) -> None:
    """What the README says: ZMSERVE_SERVABLE_DIR is not a variable of any command."""
    result = CliRunner().invoke(main, ["worker", "--servable", "x"], env={"ZMSERVE_SERVABLE_DIR": str(tmp_path)})
    assert result.exit_code == 2 and "Missing option '--servable-dir'" in result.output


def test_the_log_level_variable_is_read() -> None:
    result = CliRunner().invoke(main, ["broker", "--bind", "not an address"], env={"ZMSERVE_LOG_LEVEL": "shout"})
    assert result.exit_code == 2 and "Invalid value for '--log-level'" in result.output


@pytest.mark.parametrize(
    ("bind", "workers"),
    [
        ("tcp://127.0.0.1:5600", "tcp://127.0.0.1:5601"),
        ("127.0.0.1:5600", "tcp://127.0.0.1:5601"),
        ("tcp://0.0.0.0:6000", "tcp://0.0.0.0:6001"),
        ("tcp://127.0.0.1:0", "tcp://127.0.0.1:0"),
    ],
)
def test_the_brokers_worker_port_follows_its_client_port(bind: str, workers: str) -> None:
    assert following_port(bind) == workers


def test_a_broker_address_that_is_not_host_port_is_one_line() -> None:
    result = CliRunner().invoke(main, ["broker", "--bind", "127.0.0.1"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["Error: address '127.0.0.1' is not host:port"]
