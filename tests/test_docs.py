"""The README and the command line's help describe every command and option a user can type."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from histolab.cli import build_parser

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def _subparsers(parser: argparse.ArgumentParser, prefix: str = ""):
    """(name, parser) for every command and nested sub-command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{prefix} {name}".strip()
                yield full, sub
                yield from _subparsers(sub, full)


def test_every_command_is_in_the_readme():
    top = [name for name, _ in _subparsers(build_parser()) if " " not in name]
    assert len(top) >= 7, top
    missing = [name for name in top if not re.search(rf"histolab {re.escape(name)}\b", README)]
    assert not missing, f"README never shows `python -m histolab NAME` for: {missing}"


def test_every_option_has_help():
    undocumented = []
    for name, sub in _subparsers(build_parser()):
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if action.help == argparse.SUPPRESS:
                continue
            if not (action.help or "").strip():
                undocumented.append(f"{name}: {'/'.join(action.option_strings) or action.dest}")
    assert not undocumented, f"options without help text: {undocumented}"


def test_readme_quick_start_commands_exist():
    root = Path(__file__).resolve().parent.parent
    for script in re.findall(r"bash (scripts/\S+\.sh)", README):
        assert (root / script).is_file(), script
    assert "bash scripts/install.sh && .venv/bin/python app.py" in README
    assert "bash scripts/test.sh" in README
    ci = (root / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci


def test_spaces_front_matter_matches_the_pins():
    front = README.split("---")[1]
    pins = dict(
        line.split("==")
        for line in (Path(__file__).resolve().parent.parent / "requirements.txt").read_text().split()
        if "==" in line
    )
    assert re.search(r"^sdk: gradio$", front, re.M)
    assert re.search(r"^app_file: app.py$", front, re.M)
    assert re.search(rf"^sdk_version: {re.escape(pins['gradio'])}$", front, re.M), pins["gradio"]
    assert re.search(r'^python_version: "3\.11"$', front, re.M)
