"""The interpreter the host venv is built from, as the deploy's SSH shell runs it.

pyinfra runs commands in a non-login shell: on a Mac its PATH is the system
one (Homebrew's PATH is set in ~/.zprofile, which only a login shell reads),
so `python3` there is /usr/bin/python3, Apple's 3.9 or the stub that asks to
install the command line tools. This module resolves `venv_python` the way
that shell will, prefers Homebrew's Python when `python3` is the system one,
and refuses an interpreter below what the lock needs, with what to do.
"""

from __future__ import annotations

import shlex

from pyinfra import host, logger
from pyinfra.api import FactBase

from tasks.common import RouteError, is_macos

# requirements/host.txt's floor: mlx-lm 0.32.2, numpy 2.4 and transformers 5
# all say Requires-Python >= 3.11.
MIN_VERSION = (3, 11)
# Homebrew's prefixes (Apple Silicon, Intel) and the Pythons it ships, newest first
HOMEBREW_PYTHONS = [f"{prefix}/bin/python3.{minor}" for minor in (14, 13, 12, 11)
                    for prefix in ("/opt/homebrew", "/usr/local")]


class Interpreter(FactBase):
    """(path, (major, minor)) of a command as this shell runs it, or None when
    there is no such command or it does not run."""

    def command(self, python: str) -> str:
        # the path as found, not sys.executable: Homebrew's resolves into a
        # versioned Cellar folder that the next `brew upgrade` removes
        report = "import sys; print(*sys.version_info[:2])"
        return (f"P=$(command -v {shlex.quote(python)}) && echo \"$P\" && "
                f"\"$P\" -c {shlex.quote(report)} 2>/dev/null || true")

    def process(self, output):
        lines = [line.strip() for line in output if line.strip()]
        try:
            major, minor = (int(part) for part in lines[1].split())
        except (IndexError, ValueError):
            return None
        return lines[0], (major, minor)


def _homebrew_python() -> tuple[str, tuple[int, int]] | None:
    for candidate in HOMEBREW_PYTHONS:
        found = host.get_fact(Interpreter, python=candidate)
        if found and found[1] >= MIN_VERSION:
            return candidate, found[1]
    return None


def resolve_python() -> str:
    """The interpreter to build the venv from: a path, checked."""
    wanted = host.data.venv_python
    found = host.get_fact(Interpreter, python=wanted)
    macos = is_macos()
    hint = ("install Homebrew's (brew install python@3.12) and set venv_python to "
            "/opt/homebrew/bin/python3.12" if macos else
            "install one and set venv_python to its path")
    if macos and not wanted.startswith("/") and (found is None or found[0].startswith("/usr/bin/")):
        homebrew = _homebrew_python()
        if homebrew:
            logger.info(f"{host.name}: venv_python {wanted!r} is "
                        f"{found[0] if found else 'not on the SSH PATH'}; using Homebrew's "
                        f"{homebrew[0]} (set venv_python to choose)")
            return homebrew[0]
    if found is None:
        raise RouteError(f"{host.name}: venv_python {wanted!r} is not on PATH, or does not run, "
                         f"in the deploy's non-login (SSH) shell; {hint}")
    path, version = found
    if version < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        raise RouteError(f"{host.name}: venv_python {wanted!r} is {path}, Python "
                         f"{'.'.join(map(str, version))}; the host lock needs {need} or newer: "
                         f"{hint}")
    return path
