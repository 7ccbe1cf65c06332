"""`dvc status` is never wrong about code: every source file a stage's command can import
lies under one of that stage's `deps` in dvc.yaml.

A stage's command is `dntsync <command> ...`; its code is `dntsync.cli`, the command's
module (`dntsync.cli.COMMANDS`) and everything they import within the package, at module
level or inside a function (an over-approximation: a file that a command might import
counts as imported).
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from conftest import REPO_ROOT
from dntsync.cli import COMMANDS

SRC = REPO_ROOT / "src"


def module_file(name: str) -> Path | None:
    """The source file of module `name` of the package, or None (not ours, or not a module)."""
    if name != "dntsync" and not name.startswith("dntsync."):
        return None
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path, name: str) -> set[str]:
    """The package's modules that `path` (module `name`) imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # submodules
    return {m for m in found if module_file(m) is not None}


def closure(roots: list[str]) -> set[Path]:
    """Every source file imported, directly or not, by the modules `roots` (and their packages)."""
    todo, seen = list(roots), set()
    while todo:
        name = todo.pop()
        if name in seen or module_file(name) is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # the parent packages run first
        todo += sorted(imported_modules(module_file(name), name))
    return {module_file(name) for name in seen}


def stages() -> dict[str, dict]:
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    out = {}
    for name, stage in spec["stages"].items():
        body = stage.get("do", stage)  # foreach: the template
        out[name] = body
    return out


def test_the_import_closure_follows_imports_inside_functions_and_packages():
    files = {p.relative_to(SRC).as_posix() for p in closure(["dntsync.stages.train_marl"])}
    assert {"dntsync/__init__.py", "dntsync/stages/__init__.py", "dntsync/marl/training.py",
            "dntsync/env/core.py", "dntsync/network/radio.py", "dntsync/config.py"} <= files
    assert "dntsync/stages/tune.py" not in files


def test_every_stage_declares_every_source_file_its_command_imports():
    missing = []
    for name, stage in stages().items():
        words = stage["cmd"].split()
        assert words[0] == "dntsync" and words[1] in COMMANDS, f"{name}: {stage['cmd']}"
        deps = [d.rstrip("/") for d in stage.get("deps", [])]
        for path in sorted(closure(["dntsync.cli", COMMANDS[words[1]]])):
            rel = path.relative_to(REPO_ROOT).as_posix()
            if not any(rel == d or rel.startswith(d + "/") for d in deps):
                missing.append(f"{name}: {rel}")
    assert not missing, "dvc.yaml deps miss files the stages import:\n" + "\n".join(missing)


def test_layers_hold():
    """network <- env <- twin / marl <- stages <- cli: nothing below `stages` imports it, and
    a stage imports no other stage, only the shared helpers (`common`, `runs`)."""
    helpers = {"dntsync.stages", "dntsync.stages.common", "dntsync.stages.runs"}
    broken = []
    for path in sorted((SRC / "dntsync").rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        found = imported_modules(path, name)
        if name.startswith("dntsync.stages."):
            broken += [f"{name} -> {m}" for m in found
                       if m.startswith("dntsync.stages.") and m not in helpers and m != name]
        elif name not in ("dntsync.cli", "dntsync.stages"):
            broken += [f"{name} -> {m}" for m in found if m == "dntsync.cli" or m.startswith("dntsync.stages")]
    assert not broken, broken
