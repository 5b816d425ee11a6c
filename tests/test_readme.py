"""The README's first screen is what a new user runs: the demo command installs the package
alone, the test command the test extras, and CI runs exactly that test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_the_demo_needs_no_test_extras_and_ci_runs_the_readmes_test_command() -> None:
    demo, tests = quick_start_commands()[:2]
    assert "pip install -e . " in demo and "[test]" not in demo and demo.endswith("klined demo")
    assert tests == ".venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, "the CI script must run the README's test command as written"
