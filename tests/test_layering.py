"""The tree is the architecture: ``node/``'s packages import only the packages below them.

From the bottom: ``core`` (errors, configuration, metrics, logging), ``dicom`` (encoded
objects), ``store`` (the spool) and ``analysis``, the network's workarounds ``net.fast``,
then ``net``, ``sr``, ``process`` (analysis composed with the SR), ``jobs`` and ``tools``,
and on top the shell (``cli``, ``service``, ``check``). Every import counts: those inside
functions and those for type checking only. No cycles between modules either."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

LAYERS = ("core", "dicom", "store", "analysis", "net.fast", "net", "sr", "process", "jobs", "tools")
SHELL = "shell"  # node/*.py: cli, service, check, __main__


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """``node.net.fast.netopts`` -> ``net.fast``; ``node.cli`` -> shell; ``node`` -> ''."""
    parts = module.split(".")[1:]
    if not parts:
        return ""  # node/__init__.py: the version only
    inner = ".".join(parts[:-1]) if len(parts) > 1 else ""
    if (ROOT / "node" / Path(*parts)).is_dir():  # a package's __init__
        inner = ".".join(parts)
    return inner or SHELL


def rank(package: str) -> int:
    if package == "":
        return -1
    return len(LAYERS) if package == SHELL else LAYERS.index(package)


def imports_of(path: Path) -> set[str]:
    """Every ``node`` module that ``path`` imports, anywhere in the file."""
    me = module_name(path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "node"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "node":
                found.add(node.module)
                subs = {f"{node.module}.{a.name}" for a in node.names}
                found |= {s for s in subs if _exists(s)}  # from node.x import module
    return found - {me}


def _exists(module: str) -> bool:
    path = ROOT / Path(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted((ROOT / "node").rglob("*.py"))}


def upward(edges: dict[str, set[str]]) -> list[str]:
    """Imports of a package above the importer's, or across one floor."""
    out = []
    for importer, targets in edges.items():
        mine = package_of(importer)
        for target in sorted(targets):
            theirs = package_of(target)
            if theirs != mine and rank(theirs) >= rank(mine):
                out.append(f"{importer} ({mine or 'node'}) imports {target} ({theirs})")
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle between modules, found by depth-first search."""
    found, state = [], {}  # 1: on the stack, 2: done

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                found.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return found


def test_every_module_is_in_a_known_package():
    unknown = {package_of(m) for m in graph()} - {*LAYERS, SHELL, ""}
    assert unknown == set()


def test_no_package_imports_one_above_it_and_no_module_cycles():
    edges = graph()
    assert len(edges) > 40 and sum(map(len, edges.values())) > 100  # the scan sees the tree
    assert upward(edges) == []
    assert cycles(edges) == []


def test_the_checks_see_an_upward_import_and_a_cycle():
    edges = graph()
    edges["node.core.config"] = edges["node.core.config"] | {"node.analysis.threads"}
    assert upward(edges) == ["node.core.config (core) imports node.analysis.threads (analysis)"]
    assert cycles(edges) == [["node.analysis.threads", "node.core.config", "node.analysis.threads"]]
    edges = graph()
    edges["node.net.scp"] = edges["node.net.scp"] | {"node.sr.report"}  # across one floor
    assert upward(edges) == ["node.net.scp (net) imports node.sr.report (sr)"]
