"""The command itself: it lists every entry of the job table and each name reaches its own job; help, config
errors, the config reference, dry runs and the rerun of a complete run at once (no torch, diffusers, timm or
Ray loaded), every flag explained with its default, a version, and a config reference that stays current with
the typed configs."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.feather as feather
import pytest
import yaml

from jobs import cli
from jobs.commands import COMMANDS
from pipeline.generate.config import load_config
from pipeline.schema import MANIFEST_FILE, RUN_FILE
from tests.conftest import cpu_manifest

HEAVY = ("torch", "torchvision", "diffusers", "timm", "ray", "transformers", "mlflow")
ROOT = Path(__file__).parent.parent
PROBE = f"""
import json, sys
from jobs import cli
try:
    code = cli.main(sys.argv[1:] + ['--help'])
except SystemExit as stop:
    code = stop.code
print(json.dumps({{'code': code, 'heavy': sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""
ANSWER = f"""
import json, sys
from jobs import cli
code = cli.main(sys.argv[1:])
print(json.dumps({{'code': code, 'heavy': sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_is_listed_and_reaches_its_job(name, capsys):
    assert cli.main(["--help"]) == 0
    assert f"  {name.ljust(max(map(len, COMMANDS)))}  {COMMANDS[name].summary}\n" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        cli.main([name, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: jepa-minority {name} ")


def test_an_unknown_command_is_refused_naming_every_command(capsys):
    assert cli.main(["trian"]) == 2
    assert capsys.readouterr().err.endswith(f"unknown command 'trian'; choose one of: {', '.join(COMMANDS)}\n")
    assert cli.main([]) == 2


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_parses_without_loading_the_ml_stack(command):
    probe = subprocess.run([sys.executable, "-c", PROBE, command], capture_output=True, text=True, timeout=120)
    result = json.loads(probe.stdout.splitlines()[-1])
    assert result == {"code": 0, "heavy": []}
    assert f"usage: jepa-minority {command}" in probe.stdout


@pytest.mark.parametrize("answer", ["config error", "config", "dry run", "no-op rerun"])
def test_quick_answers_load_no_ml_library(answer, write_config, tmp_path):
    """Config parsing, the preflight and a complete run's rerun need no torch, diffusers, timm or Ray (issue #26)."""
    path, out = write_config(model={"dtype": "float32"}), tmp_path / "out"  # the same identity on any machine
    args, code, said = {
        "config error": (["generate", path, "--set", "sampling.steps=0"], 2, "sampling: steps must be an integer"),
        "config": (["config"], 0, "sampling.guidance.k (int, default 9)"),
        "dry run": (["generate", path, "--dry-run"], 0, "dry run: 12 samples planned"),
        "no-op rerun": (["generate", path], 0, "status:    complete"),
    }[answer]
    if answer == "no-op rerun":
        out.mkdir()
        feather.write_feather(cpu_manifest(load_config(path)).table, out / MANIFEST_FILE)
        (out / RUN_FILE).write_text(json.dumps({"counts": {"committed": 12, "failed": 0}}))
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    probe = subprocess.run([sys.executable, "-c", ANSWER, *args], capture_output=True, text=True, timeout=120, env=env)
    assert json.loads(probe.stdout.splitlines()[-1]) == {"code": code, "heavy": []}, probe.stderr
    assert said in probe.stdout + probe.stderr


def test_every_flag_of_every_command_has_help_and_the_top_level_help_describes_each(capsys):
    for name, command in COMMANDS.items():
        parser = __import__(command.module, fromlist=["build_parser"]).build_parser()
        for action in parser._actions:
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}: no help"
        assert parser.description and parser.formatter_class.__name__ == "HelpFormatter"
    assert cli.main(["--help"]) == 0
    printed = capsys.readouterr().out
    for name in COMMANDS:
        (line,) = [line for line in printed.splitlines() if line.startswith(f"  {name} ")]
        assert len(line.split(None, 1)[1]) > 20, line


def test_help_shows_the_defaults_of_the_configs_themselves(capsys):
    from pipeline.evaluate.config import ScoreConfig
    from pipeline.serve.config import ServeLimits

    for command in ("score", "serve"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"images per encoder call (default: {ScoreConfig.batch_size})" in text
    assert f"images per generate request (default: {ServeLimits.max_n})" in text
    assert "(default: 8000)" in text  # a parser's own default is shown too


def test_version_is_the_installed_package_version(capsys):
    from importlib.metadata import version

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"jepa-minority {version('jepa-minority')}"


def test_config_reference_covers_every_key_with_a_meaning_and_docs_config_md_is_current(capsys):
    from pipeline.generate.config import GenerateConfig
    from pipeline.generate.config_doc import as_markdown, config_reference
    from pipeline.settings import flatten, to_dict

    sections = config_reference()
    keys = {k.key: k for section in sections for k in section.keys}
    assert set(keys) == set(flatten(to_dict(GenerateConfig())))
    assert all(k.meaning for k in keys.values()), [k.key for k in keys.values() if not k.meaning]
    assert keys["work.count"].default == "8" and keys["storage.endpoint_url"].type == "str | None"
    assert (ROOT / "docs" / "config.md").read_text() == as_markdown(sections), \
        "docs/config.md is stale: run 'jepa-minority config --markdown > docs/config.md'"


def test_the_defaults_printed_as_yaml_load_back_as_the_defaults(tmp_path, capsys):
    from pipeline.generate.config import GenerateConfig, load_config

    assert cli.main(["config", "--defaults"]) == 0
    path = tmp_path / "defaults.yaml"
    path.write_text(capsys.readouterr().out)
    assert yaml.safe_load(path.read_text())["work"]["count"] == 8
    assert load_config(path) == GenerateConfig()


def test_help_shows_values_and_words_never_python_source(capsys):
    """A default written as a module constant shows its value; a comment never names a Python object."""
    from guidance.methods import METHODS
    from guidance.presets import PRESETS
    from pipeline.evaluate.rarity import DEFAULT_K
    from pipeline.generate.config_doc import as_text, config_reference

    for command in COMMANDS:
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
    text = " ".join((capsys.readouterr().out + as_text(config_reference())).split())
    for source in ("DEFAULT_K", "METHODS", "PRESETS", "torch.cuda", "default_factory", "lambda"):
        assert source not in text
    assert f"k of AvgkNN, LOF and Rarity Score (default: {DEFAULT_K})" in text
    assert "torch device (default: cuda when available, else cpu)" in text
    *first, last = METHODS
    assert f"sampling.method (str, default jepa): {', '.join(first)} or {last}" in text
    listed = text.split("model.preset (str, default pixel-unet): a model preset: ", 1)[1].split(" ...", 1)[0]
    assert set(listed.split(", ")) <= set(PRESETS)


def test_a_user_error_ends_a_job_in_one_line_with_exit_2_and_any_other_error_keeps_its_traceback(capsys):
    """``refusing`` is the one place jobs turn bad input into a line and exit 2; a plain ValueError is a bug."""
    from jobs.options import refusing
    from pipeline.settings import UserError

    @refusing("probe")
    def refuses(argv: list[str] | None = None) -> int:
        raise UserError("probe.key must be >= 1, got 0")

    @refusing("probe")
    def breaks(argv: list[str] | None = None) -> int:
        raise ValueError("an internal bug")

    assert refuses([]) == 2
    assert capsys.readouterr().err == "jepa-minority probe: probe.key must be >= 1, got 0\n"
    with pytest.raises(ValueError, match="an internal bug"):
        breaks([])
    jobs = [name for name in COMMANDS if name != "config"]  # config takes no input that can be wrong
    unguarded = [name for name in jobs if not hasattr(importlib.import_module(COMMANDS[name].module).main, "__wrapped__")]
    assert unguarded == []
