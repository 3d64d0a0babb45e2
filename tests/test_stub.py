"""The type stub ``_rlox.pyi`` describes exactly what the native module exports."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from rlox import _rlox

STUB = ast.parse((Path(_rlox.__file__).parent / "_rlox.pyi").read_text())


def _params(node: ast.FunctionDef) -> list[str]:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg != "self"]
    return names + [x.arg for x in (a.vararg, a.kwarg) if x is not None]


def _stub_items() -> dict[str, ast.AST]:
    return {
        n.name if not isinstance(n, ast.AnnAssign) else n.target.id: n
        for n in STUB.body
        if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AnnAssign))
    }


def test_stub_names_match_module():
    public = {n for n in dir(_rlox) if not n.startswith("_")} | {"__version__"}
    assert set(_stub_items()) == public


@pytest.mark.parametrize("name", sorted(_stub_items()))
def test_stub_signatures_match(name):
    node = _stub_items()[name]
    obj = getattr(_rlox, name)
    if isinstance(node, ast.FunctionDef):
        assert _params(node) == list(inspect.signature(obj).parameters), name
    elif isinstance(node, ast.ClassDef):
        methods = {
            n.name: n for n in node.body if isinstance(n, ast.FunctionDef) and n.name != "__init__"
        }
        real = {n for n in vars(obj) if not n.startswith("_") or n == "__len__"}
        assert set(methods) == real, name
        for m, fn in methods.items():
            target = getattr(obj, m)
            if isinstance(target, property) or not callable(target):
                continue
            sig = inspect.signature(target)
            got = [p for p in sig.parameters if p != "self"]
            assert _params(fn) == got, f"{name}.{m}"
        init = next((n for n in node.body if getattr(n, "name", "") == "__init__"), None)
        if init is not None:
            assert _params(init) == list(inspect.signature(obj).parameters), name
