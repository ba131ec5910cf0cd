"""The host venv: created, left alone when healthy, rebuilt when broken.

Runs the real pyinfra CLI against @local with the venv and its lock file in a
temporary folder; the lock holds no package so no download is needed, but pip
really runs on it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))


@pytest.fixture
def venv_data(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("# no packages\n")
    return tmp_path / "venv", lock


def run(tmp_path, venv: Path, lock: Path, python: str = sys.executable):
    result = subprocess.run(
        [PYINFRA, "-y", "@local", "tests/deploys/release_only.py",
         "--data", f"venv_path={venv}", "--data", f"venv_requirements={lock}",
         "--data", f"venv_python={python}", "--data", f"route_home={tmp_path / 'route'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    return result


def test_venv_is_created_then_left_alone_then_rebuilt_when_its_python_is_gone(venv_data, tmp_path):
    venv, lock = venv_data
    first = run(tmp_path, venv, lock)
    assert first.returncode == 0, first.stderr[-3000:]
    python = venv / "bin" / "python"
    assert subprocess.run([python, "-c", "import sys"]).returncode == 0
    stamp = venv / ".mlx-route-lock"
    assert stamp.exists()
    marker = venv / "kept"
    marker.write_text("a healthy venv is never touched")

    second = run(tmp_path, venv, lock)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Create the venv" not in second.stdout + second.stderr
    assert "Install the pinned packages" not in second.stdout + second.stderr
    assert marker.exists()

    # What an OS or Homebrew upgrade does: the interpreter the venv points at is gone.
    for name in ("python", "python3", f"python{sys.version_info.major}.{sys.version_info.minor}"):
        target = venv / "bin" / name
        if target.exists() or target.is_symlink():
            target.unlink()
            target.symlink_to(tmp_path / "gone" / "python3")
    third = run(tmp_path, venv, lock)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "Remove the broken venv" in third.stdout + third.stderr
    assert not marker.exists()
    assert subprocess.run([python, "-c", "import sys"]).returncode == 0


def test_changed_lock_reinstalls_without_recreating(venv_data, tmp_path):
    venv, lock = venv_data
    assert run(tmp_path, venv, lock).returncode == 0
    marker = venv / "kept"
    marker.write_text("x")
    lock.write_text("# no packages, new lock\n")
    result = run(tmp_path, venv, lock)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Install the pinned packages" in log
    assert "Create the venv" not in log
    assert marker.exists()


def test_missing_interpreter_is_a_clear_error(venv_data, tmp_path):
    venv, lock = venv_data
    result = run(tmp_path, venv, lock, python="python3.99-not-installed")
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "venv_python 'python3.99-not-installed' is not on PATH" in log
    assert not venv.exists()
