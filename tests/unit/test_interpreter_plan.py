"""venv_python as the deploy's non-login SSH shell runs it (tasks/interpreter.py),
planned against the fake Mac of inventories/fake_mac.py.

On a Mac reached over SSH, `python3` is /usr/bin/python3 (Apple's 3.9): Homebrew's
PATH is only set by ~/.zprofile. The deploy must not build the venv from it.
"""

from __future__ import annotations

import pytest

from tests.fixtures.fake_mac import run_plan

pytestmark = pytest.mark.timeout(120)

SYSTEM_PYTHON3 = ["command -v python3)", "/usr/bin/python3\n3 9"]
NO_HOMEBREW_312 = ["command -v /opt/homebrew/bin/python3.12", ""]


def venv_creation(plan) -> list[str]:
    return plan.matching(r" -m venv ")


def test_system_python3_with_homebrews_present_builds_the_venv_from_homebrews(tmp_path):
    plan = run_plan(tmp_path, {"responses": [SYSTEM_PYTHON3]}, "venv_python=python3")
    assert plan.code == 0, plan.output[-3000:]
    created = venv_creation(plan)
    assert created and all(c.startswith("/opt/homebrew/bin/python3.12 -m venv ") for c in created), \
        created
    assert "using Homebrew's /opt/homebrew/bin/python3.12" in plan.output


def test_system_python3_alone_is_refused_with_the_homebrew_path_to_install(tmp_path):
    plan = run_plan(tmp_path, {"responses": [SYSTEM_PYTHON3, NO_HOMEBREW_312]},
                    "venv_python=python3")
    assert plan.code != 0
    assert venv_creation(plan) == []
    assert "/usr/bin/python3, Python 3.9; the host lock needs 3.11 or newer" in plan.output
    assert "brew install python@3.12" in plan.output
    assert "/opt/homebrew/bin/python3.12" in plan.output


def test_an_interpreter_that_does_not_run_is_refused(tmp_path):
    plan = run_plan(tmp_path, {"responses": [NO_HOMEBREW_312]})  # the data's own path
    assert plan.code != 0
    assert "venv_python '/opt/homebrew/bin/python3.12' is not on PATH, or does not run, " \
        "in the deploy's non-login (SSH) shell" in plan.output


def test_homebrew_python_named_in_data_is_used_as_given(tmp_path):
    plan = run_plan(tmp_path)
    assert plan.code == 0, plan.output[-3000:]
    assert [c.split(" -m venv ")[0] for c in venv_creation(plan)] == ["/opt/homebrew/bin/python3.12"]
