"""Releases: built beside what runs, left alone when healthy, rebuilt when broken.

Runs the real pyinfra CLI against @local with venv_path and the lock file in a
temporary folder; the lock holds no package so no download is needed, but the
venv and pip really run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))


@pytest.fixture
def release_data(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("# no packages\n")
    return tmp_path / "venvs", lock


def run(tmp_path, root: Path, lock: Path, python: str = sys.executable):
    return subprocess.run(
        [PYINFRA, "-y", "@local", "tests/deploys/release_only.py",
         "--data", f"venv_path={root}", "--data", f"venv_requirements={lock}",
         "--data", f"venv_python={python}", "--data", f"route_home={tmp_path / 'route'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


def releases(root: Path) -> list[str]:
    return sorted(path.name for path in (root / "releases").iterdir())


def test_release_is_built_then_left_alone_then_rebuilt_when_its_python_is_gone(
        release_data, tmp_path):
    root, lock = release_data
    first = run(tmp_path, root, lock)
    assert first.returncode == 0, first.stderr[-3000:]
    (release,) = releases(root)
    python = root / "releases" / release / "bin" / "python"
    assert subprocess.run([python, "-c", "import sys"]).returncode == 0
    record = json.loads((root / "releases" / release / ".mlx-route-release").read_text())
    assert record["id"] == release and record["python_version"] == "%d.%d" % sys.version_info[:2]
    assert (root / "next").resolve() == (root / "releases" / release).resolve()
    assert not (root / "current").exists()  # only a switch of the server moves `current`
    marker = root / "releases" / release / "kept"
    marker.write_text("a healthy release is never touched")

    second = run(tmp_path, root, lock)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Create release" not in second.stdout + second.stderr
    assert "Install the pinned packages" not in second.stdout + second.stderr
    assert marker.exists()

    # What an OS or Homebrew upgrade does: the interpreter the venv points at is gone.
    for name in ("python", "python3", f"python{sys.version_info.major}.{sys.version_info.minor}"):
        target = python.parent / name
        if target.exists() or target.is_symlink():
            target.unlink()
            target.symlink_to(tmp_path / "gone" / "python3")
    third = run(tmp_path, root, lock)
    log = third.stdout + third.stderr
    assert third.returncode == 0, log[-3000:]
    assert f"Remove the unfinished release {release}" in log
    assert not marker.exists()
    assert subprocess.run([python, "-c", "import sys"]).returncode == 0


def test_changed_lock_builds_a_new_release_beside_the_old_one(release_data, tmp_path):
    root, lock = release_data
    assert run(tmp_path, root, lock).returncode == 0
    (old,) = releases(root)
    marker = root / "releases" / old / "kept"
    marker.write_text("x")
    lock.write_text("# no packages, new lock\n")
    result = run(tmp_path, root, lock)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    new = [name for name in releases(root) if name != old]
    assert len(new) == 1, releases(root)
    assert f"Create release {new[0]}" in log and f"Point next at release {new[0]}" in log
    assert marker.exists()  # the old release is untouched
    assert (root / "next").resolve().name == new[0]


def test_missing_interpreter_is_a_clear_error(release_data, tmp_path):
    root, lock = release_data
    result = run(tmp_path, root, lock, python="python3.99-not-installed")
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "venv_python 'python3.99-not-installed' is not on PATH" in log
    assert not root.exists()


def test_an_interpreter_below_the_locks_floor_is_refused_with_what_to_do(release_data, tmp_path):
    """A stand-in for an old system python3 (3.9): a script answering as it would."""
    root, lock = release_data
    old = tmp_path / "python3"
    old.write_text("#!/bin/sh\necho 3 9\n")
    old.chmod(0o755)
    result = run(tmp_path, root, lock, python=str(old))
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Python 3.9; the host lock needs 3.11 or newer" in log
    assert not root.exists()
