"""Documentation read from source files without importing them (so `--help` loads no torch or Ray):
each dataclass field's annotation, default and one-line comment."""

from __future__ import annotations

import ast
import importlib.util
import io
import tokenize
from dataclasses import dataclass
from functools import cache
from pathlib import Path


@dataclass(frozen=True)
class FieldDoc:
    """One dataclass field as written: ``name: annotation = default  # meaning``."""

    name: str
    annotation: str
    default: str | None  # the default's source text; None when the field is required
    meaning: str  # the field's trailing comment ("" when it has none)


@cache
def _source(module: str) -> str:
    """The module's source text, found without importing it or its parent packages (``guidance``
    imports torch): the top-level package's folder, then the dotted path inside it."""
    top, *inner = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or (inner and not spec.submodule_search_locations) or (not inner and spec.origin is None):
        raise ValueError(f"no source for module {module}")
    path = Path(spec.origin) if not inner else Path(spec.submodule_search_locations[0]).joinpath(*inner)
    for candidate in (path, path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    raise ValueError(f"no source for module {module}")


@cache
def field_docs(module: str, class_name: str) -> dict[str, FieldDoc]:
    """The fields of dataclass ``class_name`` in ``module``, by name, in their written order."""
    source = _source(module)
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    tree = ast.parse(source)
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if node is None:
        raise ValueError(f"module {module} defines no class {class_name}")
    constants = _constants(module)
    docs: dict[str, FieldDoc] = {}
    for statement in node.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        docs[statement.target.id] = FieldDoc(
            name=statement.target.id,
            annotation=ast.unparse(statement.annotation),
            default=None if statement.value is None else _default_text(constants.get(ast.unparse(statement.value),
                                                                                     statement.value)),
            meaning=comments.get(statement.end_lineno, ""),
        )
    return docs


def _default_text(value: ast.expr) -> str:
    """``field(default_factory=X)`` reads as ``X()``, ``default_factory=lambda: E`` as ``E``; others as written."""
    if isinstance(value, ast.Call) and ast.unparse(value.func) in ("field", "dataclasses.field"):
        for keyword in value.keywords:
            if keyword.arg == "default":
                return ast.unparse(keyword.value)
            if keyword.arg == "default_factory":
                factory = keyword.value
                return ast.unparse(factory.body) if isinstance(factory, ast.Lambda) else f"{ast.unparse(factory)}()"
    return ast.unparse(value)


@cache
def _constants(module: str) -> dict[str, ast.expr]:
    """The module's literal constants (``DEFAULT_K = 5``), its own and those it imports by name from a module of
    this project, so that a default written as a constant shows its value."""
    constants: dict[str, ast.expr] = {}
    for statement in ast.parse(_source(module)).body:
        if isinstance(statement, ast.ImportFrom) and statement.module and statement.level == 0 \
                and statement.module.split(".")[0] in ("guidance", "pipeline"):
            imported = _constants(statement.module)
            constants |= {alias.asname or alias.name: imported[alias.name] for alias in statement.names
                          if alias.name in imported}
        elif isinstance(statement, ast.Assign) and _is_literal(statement.value):
            constants |= {target.id: statement.value for target in statement.targets if isinstance(target, ast.Name)}
    return constants


def _is_literal(value: ast.expr) -> bool:
    """A module constant whose value the help can show (``DEFAULT_K = 5``), as opposed to a computed one."""
    try:
        ast.literal_eval(value)
    except ValueError:
        return False
    return True
