"""The house rules: which package may import which (ARCHITECTURE.md), and the light modules stay light."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("generate", "curate", "serve", "evaluate", "demo")
HEAVY = ("torch", "diffusers", "timm")

# What each package may not import. Data flows one way: work -> samplers -> rows -> storage -> curation
# -> serve / evaluate; the shared ground under pipeline/ serves every room and imports none.
FORBIDDEN = {
    "guidance": ("pipeline", "jobs"),
    "pipeline": ("jobs",),
    "pipeline.<ground>": tuple(f"pipeline.{room}" for room in ROOMS),
    "pipeline.generate": ("pipeline.curate", "pipeline.serve", "pipeline.evaluate", "pipeline.demo"),
    "pipeline.curate": ("pipeline.serve", "pipeline.evaluate", "pipeline.demo"),
    "pipeline.serve": ("pipeline.evaluate", "pipeline.demo"),
    "pipeline.evaluate": ("pipeline.serve", "pipeline.demo"),
    "pipeline.demo": ("pipeline.serve", "pipeline.evaluate"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (function-level imports count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def packages_of(module: str) -> list[str]:
    """The rule keys that apply to a module."""
    keys = [key for key in FORBIDDEN if key != "pipeline.<ground>" and (module == key or module.startswith(key + "."))]
    if module.startswith("pipeline.") and module.split(".")[1] not in ROOMS:
        keys.append("pipeline.<ground>")
    return keys


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(files: list[Path]) -> list[str]:
    found = []
    for path in files:
        module = module_name(path)
        for key in packages_of(module):
            for name in sorted(imported_modules(path)):
                for banned in FORBIDDEN[key]:
                    if within(name, banned):
                        found.append(f"{module} imports {name} ({key} may not import {banned})")
    return found


def test_the_import_rules_hold():
    files = sorted([*ROOT.glob("guidance/**/*.py"), *ROOT.glob("pipeline/**/*.py")])
    assert len(files) > 30
    assert violations(files) == []


def test_the_import_rules_catch_a_backward_import(tmp_path, monkeypatch):
    """A room importing a later room, the ground importing a room, guidance importing pipeline: each is named."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    bad = {
        "pipeline/generate/config.py": "from pipeline.curate.filter import FilterConfig\n",
        "pipeline/storage.py": "def f():\n    import pipeline.generate.job\n",
        "pipeline/serve/browse.py": "from pipeline.evaluate import metrics\n",
        "guidance/models.py": "import pipeline.schema\n",
        "pipeline/curate/refresh.py": "from pipeline.generate.job import run_generation\n",  # allowed
    }
    for name, text in bad.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = violations(sorted(tmp_path.glob("**/*.py")))
    assert found == [
        "guidance.models imports pipeline.schema (guidance may not import pipeline)",
        "pipeline.generate.config imports pipeline.curate.filter (pipeline.generate may not import pipeline.curate)",
        "pipeline.serve.browse imports pipeline.evaluate (pipeline.serve may not import pipeline.evaluate)",
        "pipeline.storage imports pipeline.generate.job (pipeline.<ground> may not import pipeline.generate)",
    ]


@pytest.mark.parametrize("module", ["pipeline.serve.browse", "pipeline.curate.filter", "pipeline.rows", "jobs.cli",
                                    "pipeline.curate.config", "pipeline.evaluate.config", "pipeline.serve.config",
                                    "jobs.options"])
def test_light_modules_import_no_ml_stack(module):
    """What a driver or the page imports must not pull in torch, diffusers or timm (checked in a fresh process)."""
    probe = (f"import sys, json, importlib\nimportlib.import_module({module!r})\n"
             f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert json.loads(out) == []
