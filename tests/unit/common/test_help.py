"""Every command's --help prints and exits 0 (issue 19: `lmx kvstore -h`
crashed on the "%" in a setting's help)."""
from __future__ import annotations

import pytest

from services import cli

COMMANDS = ["admission", "worker", "kvstore", "front", "chat", "status", "watch", "demo",
            "up", "down", "ps"]


def test_the_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["-h"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"lmx {command}" in out


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_every_command_prints_its_help(command, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, flag])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lmx")
    assert command in out.splitlines()[0]
