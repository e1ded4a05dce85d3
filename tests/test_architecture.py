"""The shape of the code: imports point one way (entry points -> tasks -> library), tasks are independent plug-ins,
models hold no training logic, no import cycles. The contracts live in .importlinter; this runs them."""
import configparser
import pkgutil
import sys
from pathlib import Path

import pixelformer
from conftest import REPO, run_process


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    out = run_process([str(lint), "--config", str(REPO / ".importlinter")], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "4 kept, 0 broken" in out.stdout


def test_every_library_module_is_under_the_library_contract():
    # A new module of the library must be listed, or the contract would not cover it.
    contracts = configparser.ConfigParser()
    contracts.read(REPO / ".importlinter")
    listed = set(contracts["importlinter:contract:library"]["source_modules"].split())
    modules = {f"pixelformer.{m.name}" for m in pkgutil.iter_modules(pixelformer.__path__)}
    assert modules - {"pixelformer.tasks", "pixelformer.cli"} == listed


def test_no_library_function_is_longer_than_80_lines():
    # a function that does not fit a screen does more than one thing: split it (entry points under cli/ included)
    import ast

    long = []
    for path in sorted((REPO / "pixelformer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} "
                            f"({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
