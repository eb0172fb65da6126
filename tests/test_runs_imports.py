"""The floors: flatworld.runs never imports flatworld.agents (the agents build on runs' protocol;
callers hand runs the agent entries it may use)."""

from __future__ import annotations

import ast
from pathlib import Path

import flatworld.runs

RUNS = Path(flatworld.runs.__file__).parent


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in `path`, at module level or inside a function, and of
    every importlib.import_module / __import__ call with a literal name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "flatworld.runs" if node.level else ""  # a relative import stays in runs
            found.append((node.lineno, node.module or base))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                      if node.module]  # fmt: skip  (`from flatworld import agents`)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def test_no_file_under_runs_imports_agents():
    files = sorted(RUNS.rglob("*.py"))
    assert len(files) >= 5, files
    upward = [f"{path.relative_to(RUNS.parent)}:{line} imports {module}"
              for path in files for line, module in imported_modules(path)
              if module == "flatworld.agents" or module.startswith("flatworld.agents.")]
    assert not upward, upward


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from flatworld.agents import AGENTS\n"
                      "def g():\n    from flatworld import agents\n"
                      "import importlib\nimportlib.import_module('flatworld.agents.tdmpc2')\n")
    modules = [m for _, m in imported_modules(sample)]
    assert "flatworld.agents" in modules and "flatworld.agents.tdmpc2" in modules
    assert modules.count("flatworld.agents") == 2
