"""README stays true: every data key is documented, the commands exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def data_keys() -> list[str]:
    tree = ast.parse((REPO / "group_data" / "all.py").read_text())
    return [
        target.id
        for node in tree.body if isinstance(node, ast.Assign)
        for target in node.targets if isinstance(target, ast.Name)
        if not target.id.startswith("_")  # pyinfra does not take these as data keys
    ]


def test_every_data_key_is_documented_in_readme():
    missing = [key for key in data_keys() if f"`{key}`" not in README]
    assert missing == [], f"README.md does not document: {missing}"


def test_readme_shows_the_users_command_and_the_two_quick_start_commands():
    assert "pyinfra inventory.py deploy.py" in README
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^\s*(\./run \S+)", quick, re.M)
    assert commands[:2] == ["./run deploy", "./run test"], commands


def test_ci_runs_the_readme_test_command():
    assert "./run test" in (REPO / ".ci" / "run").read_text()
