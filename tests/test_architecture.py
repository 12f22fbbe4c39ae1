"""Architecture rules that hold for the whole library.

- All SQL lives in the store package (``cicm/store/``): the rest of ``cicm`` calls its named reads and writes.
- The sub-packages form layers (``LAYERS``): a package imports only from lower layers, so the graph has no
  upward arrow and no cycle. Prefect lives only in the top-level ``flows/`` package; backtests, the agent and the
  planning pipeline run without it.
"""
from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "cicm"
STORE = PACKAGE / "store"

# Methods that run SQL text: DuckDB's (execute, executemany, sql, query), the Store's (query, query_bulk) and
# the dashboard Reading's (q, scalar).
SQL_METHODS = {"execute", "executemany", "sql", "query", "query_bulk", "q", "scalar"}

# Words that start or make a statement. Upper case, as this code base writes SQL, so prose and identifiers
# ("select", "update") do not count.
SQL_WORDS = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|COPY|ATTACH|DETACH|CHECKPOINT|PRAGMA|BEGIN|COMMIT|ROLLBACK"
    r"|SET\s+\w+\s*=|WITH\s+\w+\s+AS|EXPORT|IMPORT\s+DATABASE)\b")
# A whole statement in any string, wherever it goes (a variable, a constant, a helper's argument).
SQL_STATEMENT = re.compile(
    r"\bSELECT\b[\s\S]+\bFROM\b|\bINSERT\s+(OR\s+\w+\s+)?INTO\b|\bDELETE\s+FROM\b|\bUPDATE\s+\w+\s+SET\b"
    r"|\bCREATE\s+(OR\s+REPLACE\s+)?(TEMP\s+|TEMPORARY\s+)?(TABLE|VIEW|INDEX)\b")

# Modules outside cicm/store that may still hold SQL, each with its reason. Keep this short.
ALLOWED: set[str] = set()  # none: the ecovisor's own telemetry file is cicm/store/ecovisor.py


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if STORE not in p.parents)


def _strings(node: ast.AST) -> list[str]:
    """The literal text inside an expression: string constants and the fixed parts of f-strings."""
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def sql_outside_the_store(path: Path) -> list[str]:
    """``file:line: what`` for each place in the module that runs or holds SQL text."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(REPO).as_posix() if REPO in path.parents else path.name
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SQL_METHODS:
            args = [*node.args[:1], *(k.value for k in node.keywords if k.arg in ("sql", "query"))]
            for arg in args:
                if any(SQL_WORDS.search(s) for s in _strings(arg)):
                    found.append(f"{rel}:{node.lineno}: SQL passed to .{node.func.attr}()")
                    break
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if SQL_STATEMENT.search(node.value):
                found.append(f"{rel}:{node.lineno}: SQL statement in a string")
    return found


def test_no_sql_outside_the_store_package():
    found = [hit for path in _modules() if path.relative_to(REPO).as_posix() not in ALLOWED
             for hit in sql_outside_the_store(path)]
    assert not found, "SQL belongs in cicm/store (a named read or write):\n" + "\n".join(found)


def test_the_allowed_list_is_still_needed():
    for rel in ALLOWED:
        assert sql_outside_the_store(REPO / rel), f"{rel} holds no SQL any more: remove it from ALLOWED"


@pytest.mark.parametrize("source, found", [
    ('store.query("SELECT * FROM runs")', True),
    ('store.con.execute(f"DELETE FROM {table} WHERE hour < {cut}")', True),
    ('con.sql("CHECKPOINT")', True),
    ('r.q("""SELECT a\n FROM b""", [x])', True),
    ('SQL = "INSERT OR REPLACE INTO t SELECT * FROM x"', True),
    ('store.query(sql, params)', False),
    ('store.query_bulk(text)', False),
    ('"""Select the newest forecast: SELECT-free prose."""', False),
    ('log.info("select from the update list")', False),
    ('page.query_selector("#table")', False),
])
def test_the_rule_finds_sql(tmp_path, source, found):
    module = tmp_path / "mod.py"
    module.write_text(source + "\n")
    assert bool(sql_outside_the_store(module)) == found, source


CONSUMER_MODULES = ("plan", "slo", "agent", "dashboard")


@pytest.mark.parametrize("name", CONSUMER_MODULES)
def test_named_store_functions_document_what_they_return(name):
    """Each named read or write says what it returns (the frame's columns, or the value) in its docstring."""
    import importlib

    module = importlib.import_module(f"cicm.store.{name}")
    functions = [f for n, f in inspect.getmembers(module, inspect.isfunction)
                 if not n.startswith("_") and f.__module__ == module.__name__]
    assert functions
    for f in functions:
        doc = inspect.getdoc(f) or ""
        assert doc, f"cicm.store.{name}.{f.__name__} has no docstring"
        sig = inspect.signature(f)
        assert list(sig.parameters)[0] in ("store", "src"), f"{f.__name__} takes the store first"
        if str(sig.return_annotation) in ("pd.DataFrame", "DataFrame"):
            assert "Columns:" in doc, f"cicm.store.{name}.{f.__name__}: document the frame's columns"


def test_consumer_modules_import_without_duckdb():
    """The named reads are plain functions over a store handle: importing them does not load DuckDB."""
    import subprocess
    import sys

    code = ("import sys; import cicm.store.plan, cicm.store.slo, cicm.store.agent, cicm.store.dashboard; "
            "print('duckdb' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------ layers

# Each cicm sub-package (or top-level module) and its layer: it may import only from lower layers.
LAYERS = {
    "errors": 0, "paths": 0, "clikit": 1, "reasons": 0, "ops": 1, "timeutil": 1, "stdio": 0, "httpclient": 1,
    "jsonsafe": 0, "commitguard": 0,
    "config": 2, "store": 2, "optimize": 2, "models": 2,
    "carbon": 3, "data": 3, "demo": 3, "telemetry_sources": 3, "ecovisor": 3,
    "planning": 4, "enforce": 4, "dashboards": 4,
    "backtest": 5,
    "cli": 6,
}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports, at any depth (function-level imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if node.module == "cicm")
    return found


def _edges() -> dict[tuple[str, str], str]:
    """(importer unit, imported unit) -> one file that makes the edge."""
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        src = _unit(".".join(rel.parts))
        for name in _imports(path):
            if name.startswith("cicm.") and _unit(name) != src:
                edges.setdefault((src, _unit(name)), str(rel))
    return edges


def test_every_package_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert units == set(LAYERS), f"give these a layer: {sorted(units - set(LAYERS))}; gone: {sorted(set(LAYERS) - units)}"


def test_imports_only_go_down_the_layers():
    upward = [f"{src} -> {dst} ({where})" for (src, dst), where in _edges().items()
              if dst in LAYERS and LAYERS[dst] >= LAYERS[src]]
    assert not upward, "upward or sideways imports: " + "; ".join(sorted(upward))


def test_the_rule_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from cicm.planning.stages import x\n")
    assert "cicm.planning.stages" in _imports(f)


def test_only_the_cli_reaches_the_prefect_flows():
    reach = sorted(str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")
                   if any(n.split(".")[0] in ("flows", "prefect") for n in _imports(p)))
    assert reach == ["cicm/cli.py"], reach


def test_backtests_agent_and_pipeline_run_without_prefect():
    import subprocess
    import sys

    code = ("import sys, cicm.backtest.runner, cicm.backtest.queue_policy, cicm.enforce.agent, cicm.enforce.cli, "
            "cicm.planning.pipeline, cicm.planning.slo, cicm.planning.scale; "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'flows'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == ""


def test_the_flows_are_thin():
    """The top-level flows hold Prefect wiring only: every function is short, and the pipeline is not in them."""
    for path in (REPO / "flows").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 40, f"{path.name}:{node.name} is {length} lines"

