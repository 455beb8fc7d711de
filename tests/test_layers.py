"""The folders are the architecture: rules/ (pure: the config and the mapping) imports nothing from
backends/ (what acts on the host and AWS). Fast: it reads the sources with ast and imports nothing."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "pam_rolegate"


def imported_names(source, relpath):
    """(line, absolute dotted name) for every import in `source`, the file at `relpath` below
    pam_rolegate/; relative imports resolved, and `from X import Y` named as X.Y."""
    package = ["pam_rolegate"] + list(pathlib.PurePath(relpath).parent.parts)
    for node in ast.walk(ast.parse(source, relpath)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def upward_imports(source, relpath):
    return [f"pam_rolegate/{relpath}:{line}: imports {name}" for line, name in imported_names(source, relpath)
            if name == "pam_rolegate.backends" or name.startswith("pam_rolegate.backends.")]


@pytest.mark.parametrize("path", sorted((PACKAGE / "rules").glob("*.py")), ids=lambda p: p.name)
def test_rules__imports_nothing_from_backends(path):
    found = upward_imports(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE)))
    assert not found, ("rules/ must not import backends/ (a check against the host belongs in "
                       "pam_rolegate/hostcheck.py): " + "; ".join(found))


def test_rules__the_import_walk_names_each_upward_import():
    """The check above can fail: every spelling of an import of backends/ from rules/ is named."""
    source = ("from ..backends import store\nfrom .. import backends\nimport pam_rolegate.backends.firewall\n"
              "def f():\n    from ..backends.sts import assume\n")
    found = upward_imports(source, "rules/sample.py")
    assert len(found) == 4, f"the walk missed an import of backends/ (found only {found})"
    assert found[0] == "pam_rolegate/rules/sample.py:1: imports pam_rolegate.backends.store", \
        f"the walk resolved a relative import wrongly: {found[0]}"
    assert not upward_imports("from .settings import Config\nfrom ..errors import ConfigError\n",
                              "rules/sample.py"), "the walk named an import that stays inside rules/ or errors"


# -- core/: the registry's parts report changes to listeners and never import records or lifecycle --

CORE = PACKAGE / "core"
LISTENERS = ("pam_rolegate.core.records", "pam_rolegate.core.lifecycle")


def core_imports(path):
    """The core modules (pam_rolegate.core.NAME) that core file `path` imports."""
    found = set()
    for _line, name in imported_names(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE))):
        parts = name.split(".")
        if parts[:2] == ["pam_rolegate", "core"] and len(parts) > 2 and (CORE / f"{parts[2]}.py").exists():
            found.add(f"pam_rolegate.core.{parts[2]}")
    return found


@pytest.mark.parametrize("path", sorted(p for p in CORE.glob("*.py") if f"pam_rolegate.core.{p.stem}" not in LISTENERS),
                         ids=lambda p: p.name)
def test_core__the_registrys_parts_import_neither_records_nor_lifecycle(path):
    found = sorted(core_imports(path) & set(LISTENERS))
    assert not found, (f"core/{path.name} imports {found}: the registry reports changes to the listeners it is "
                       "handed (docs/internals.md), it never imports them")


def test_core__its_modules_import_each_other_without_a_circle():
    graph = {f"pam_rolegate.core.{p.stem}": core_imports(p) for p in CORE.glob("*.py")}
    assert "pam_rolegate.core.grants" in graph["pam_rolegate.core.registry"] | graph["pam_rolegate.core.records"], \
        f"the walk found none of the core's imports of grants.py: {graph}"

    def circle_from(start, path):
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == start:
                return path + [nxt]
            if nxt not in path:
                found = circle_from(start, path + [nxt])
                if found:
                    return found
        return None

    circles = [c for c in (circle_from(m, [m]) for m in sorted(graph)) if c]
    assert not circles, "core/ modules import each other in a circle: " + " -> ".join(circles[0])
