"""The ``jepa-minority`` command: it lists every entry of the job table, and each name reaches its own job."""

from __future__ import annotations

import pytest

from jobs import cli
from pipeline.commands import COMMANDS


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_is_listed_and_reaches_its_job(name, capsys):
    assert cli.main(["--help"]) == 0
    assert f"  {name.ljust(max(map(len, COMMANDS)))}  {COMMANDS[name].summary}\n" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        cli.main([name, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: jepa-minority {name} ")


def test_an_unknown_command_is_refused_naming_every_command(capsys):
    assert cli.main(["trian"]) == 2
    assert capsys.readouterr().err.endswith(f"unknown command 'trian'; choose one of: {', '.join(COMMANDS)}\n")
    assert cli.main([]) == 2
