"""The package's structure: layers that import downwards only, and one home for K."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONF_DIR, ROOT

PACKAGE = ROOT / "dreg"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def dreg_imports(path: Path) -> tuple[set[str], list[str]]:
    """(modules imported at module level, modules imported inside functions) of ``path``."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dreg"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("dreg")]
        else:
            continue
        (top.update if node in tree.body else nested.extend)(names)
    return top, nested


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_no_import_is_hidden_inside_a_function():
    """A lazy import of our own modules is how a cycle hides; there are none."""
    hidden = {name: nested for name, p in MODULES.items() if (nested := dreg_imports(p)[1])}
    assert not hidden


def test_module_imports_form_no_cycle():
    graph = {
        name: {m for m in dreg_imports(path)[0] if m in MODULES and m != name}
        for name, path in MODULES.items()
    }
    done: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        assert name not in stack, "import cycle: " + " -> ".join((*stack, name))
        if name in done:
            return
        for dep in graph[name]:
            visit(dep, (*stack, name))
        done.add(name)

    for name in graph:
        visit(name, ())


def test_the_training_path_imports_no_diagnostics():
    """Statically: the module-level imports reachable from dreg.run (with no import hidden in
    a function, tested above, these are all it loads)."""
    graph = {
        name: {m for m in dreg_imports(path)[0] if m in MODULES and m != name}
        for name, path in MODULES.items()
    }
    reached, todo = set(), ["dreg.run", "dreg"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(graph[name])
    assert not {m for m in reached if m.startswith(("dreg.diagnostics", "dreg.callbacks"))}


@pytest.mark.slow  # a fresh interpreter importing torch and Lightning
def test_the_training_path_loads_no_diagnostics():
    code = (
        "import dreg.run, sys; "
        "bad = [m for m in sys.modules if m.startswith(('dreg.diagnostics', 'dreg.callbacks'))]; "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_k_has_one_home():
    for path in sorted((CONF_DIR / "estimator").glob("*.yaml")):
        assert "num_samples" not in yaml.safe_load(path.read_text()), path.name


def test_nothing_in_the_package_reads_the_source_tree():
    """Paths to conf/ or tests/ break an installed package; the diagnostics need none."""
    for name, path in MODULES.items():
        text = path.read_text()
        assert '"conf"' not in text and "parents[2]" not in text, name
        assert "from tests" not in text and "import tests" not in text, name
