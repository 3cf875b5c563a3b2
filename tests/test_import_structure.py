"""The package's imports point one way: data -> encoders -> adapters -> pipeline -> generation,
with review, evaluation and training beside, ui/ and cli/ on top.

Read with ast (tests/import_graph.py), never by importing, so a cycle shows even where lazy
imports keep the interpreter from tripping on it. Imports inside functions count; only
``if TYPE_CHECKING:`` blocks are left out (they never run).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import import_graph

PACKAGE = Path(__file__).resolve().parents[1] / "histolab"

# review/ holds the rating store, sessions and their analysis: it must run without any model.
REVIEW_MUST_NOT_IMPORT = (
    "adapters",
    "batch",
    "cli",
    "embedded",
    "encoders",
    "generation",
    "pipeline",
    "single_file",
    "training",
    "ui",
)


def test_no_import_cycle_between_histolab_modules():
    graph = import_graph.build(PACKAGE)
    found = import_graph.cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_module_imports_another_modules_private_name():
    graph = import_graph.build(PACKAGE)
    lines = [f"{who}:{line} uses {mod}.{name}" for who, mod, name, line in graph.private]
    assert not lines, "private names used across modules:\n" + "\n".join(lines)


def test_the_review_package_needs_no_models():
    graph = import_graph.build(PACKAGE)
    bad = sorted(
        f"{mod} imports {dep}"
        for mod, deps in graph.edges.items()
        if mod.startswith("histolab.review")
        for dep in deps
        if dep.split(".")[1] in REVIEW_MUST_NOT_IMPORT
    )
    assert not bad, "\n".join(bad)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text))
    return root


def test_the_checker_sees_lazy_relative_and_submodule_cycles(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from pkg import b\n",  # `from package import submodule`
            "b.py": "def f():\n    from .sub import c  # lazy and relative\n",
            "sub/__init__.py": "",
            "sub/c.py": "import pkg.a as alias\n",
            "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n",
            "e.py": "from pkg import d\n",
        },
    )
    graph = import_graph.build(root)
    assert import_graph.cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    # d <-> e is no cycle: d's import of e only exists for type checkers.
    assert "pkg.e" not in graph.edges["pkg.d"]


def test_the_checker_sees_private_names_imported_or_reached_through_an_alias(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "low.py": "_secret = 1\n__version__ = '1'\ndef _helper(): pass\n",
            "high.py": "from pkg.low import _secret, __version__\nimport pkg.low as low\nlow._helper()\n",
            "self_use.py": "_x = 1\n",
        },
    )
    graph = import_graph.build(root)
    assert sorted((who, mod, name) for who, mod, name, _ in graph.private) == [
        ("pkg.high", "pkg.low", "_helper"),
        ("pkg.high", "pkg.low", "_secret"),
    ]
    assert import_graph.cycles(graph) == []
