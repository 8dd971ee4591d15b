"""`--help` of every command: flags read as flags, and the text fits an 80-column terminal."""

from __future__ import annotations

from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from facefind.retrieval.cli import app


def _command_paths(command: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [path]
    for name, sub in getattr(command, "commands", {}).items():  # typer vendors click: duck-type groups
        paths += _command_paths(sub, path + (name,))
    return paths


COMMANDS = _command_paths(typer.main.get_command(app))


def test_every_command_is_walked() -> None:
    # Guards the walk itself: a change that hid the subcommands would make the tests below vacuous.
    names = {" ".join(p) for p in COMMANDS}
    assert {"", "query", "similar", "predict", "demo", "train", "index", "bench", "bench query"} <= names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "facefind")
def test_help_fits_80_columns_and_shows_flags_as_flags(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(line for line in lines if len(line) > 80)
    assert "<bool>" not in result.output and "BOOLEAN" not in result.output
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    flags = [opt for p in command.params if getattr(p, "is_flag", False) for opt in p.opts]
    assert path != ("query",) or "--json" in flags  # the check below has flags to look at
    for flag in flags:
        assert f"{flag} <" not in result.output, f"{flag} is shown as taking a value"


def test_summaries_in_the_command_list_are_whole() -> None:
    result = CliRunner().invoke(app, ["--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert not [line for line in result.output.split("Commands:")[1].splitlines() if line.endswith("...")]
    assert "write galleries." in result.output  # the demo's summary, past where click would cut it
