"""The package's import graph (read with ast, nothing imported): no circle,
and data flows one way (STYLE.md): the connection's path imports no process
or operator module, nothing imports cli, errors imports nothing of ours."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tcp_intercept

PACKAGE = Path(tcp_intercept.__file__).parent
PATH = {"listener", "limits", "connection", "relay", "pipes", "table", "timeouts",
        "tcpinfo", "summary", "histograms",
        "descriptors", "steering", "sockopts", "address", "config", "evloop", "errors",
        "counters", "logs", "reclaim", "recipe", "policy", "policy_file", "policy_values"}
PROCESSES = {"cli", "startup", "master", "worker", "listing", "channel", "handover", "privileges",
             "detach", "liveness", "policy_keeper"}
OPERATORS = {"control", "request_server", "metrics", "status", "report", "ctl", "top"}



def imports(module: str) -> set[str]:
    """The package's modules that module imports, anywhere in its text
    (also inside functions and TYPE_CHECKING blocks)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tcp_intercept"):
            found.add(node.module.split(".")[1] if "." in node.module else "__init__")
    return {name for name in found if (PACKAGE / f"{name}.py").exists()} - {module}


GRAPH = {path.stem: imports(path.stem) for path in PACKAGE.glob("*.py")}


def test_the_map_names_every_module():
    named = PATH | PROCESSES | OPERATORS | {"__init__", "__main__"}
    assert set(GRAPH) == named, "a module outside the map: put it in one of its bands"


def test_no_import_circle():
    done: set[str] = set()

    def visit(module: str, trail: list[str]) -> None:
        if module in trail:
            circle = trail[trail.index(module):] + [module]
            pytest.fail("import circle: " + " -> ".join(circle))
        if module in done:
            return
        for imported in sorted(GRAPH[module]):
            visit(imported, [*trail, module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])


def test_the_connection_path_imports_no_process_or_operator_module():
    for module in PATH:
        assert not GRAPH[module] & (PROCESSES | OPERATORS), module


def test_nothing_imports_cli_and_errors_imports_nothing():
    assert [m for m in GRAPH if "cli" in GRAPH[m]] == ["__main__"]
    assert GRAPH["errors"] == set()


def test_the_readme_map_names_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    missing = [m for m in GRAPH if not m.startswith("__") and f"        {m}.py " not in readme]
    assert not missing, f"README's How it works does not list {missing}"
