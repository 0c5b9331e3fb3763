"""Every option of every subcommand explains itself in --help."""

import click
import pytest
from click.testing import CliRunner

from charrnn.cli import main

COMMANDS = sorted(main.commands)


def _options(command):
    return [p for p in command.params if isinstance(p, click.Option)
            and not ({"--help", "--version"} & set(p.opts))]


def test_every_subcommand_is_covered():
    assert {"train", "sample", "names", "eval", "score", "info", "plot", "export"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help(name):
    command = main.commands[name]
    assert _options(command), f"{name} has no options to check"
    missing = ["/".join(p.opts + p.secondary_opts) for p in _options(command)
               if not (p.help or "").strip()]
    assert not missing, f"charrnn {name}: options without help text: {', '.join(missing)}"


@pytest.mark.parametrize("name", COMMANDS)
def test_help_renders(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage:") and f" {name} " in result.output.splitlines()[0]
    for option in _options(main.commands[name]):
        assert option.opts[-1] in result.output, f"{option.opts[-1]} missing from `{name} --help`"
