"""The pinned Python environment that runs mlx_lm.server and the proxy."""

from __future__ import annotations

import hashlib
import posixpath
import shlex

from pyinfra import host
from pyinfra.api import FactBase, deploy
from pyinfra.operations import files, server

from tasks.common import paths, repo_file
from tasks.interpreter import resolve_python

LOCK_STAMP = ".mlx-route-lock"


class VenvState(FactBase):
    """("ok", <lock hash installed>) / ("broken", None) / ("absent", None).

    A venv is broken when its interpreter no longer runs, which is what an OS
    or Homebrew upgrade does to a venv built on the old Python.
    """

    def command(self, venv: str) -> str:
        python = shlex.quote(posixpath.join(venv, "bin", "python"))
        stamp = shlex.quote(posixpath.join(venv, LOCK_STAMP))
        return (
            f"if {python} -c 'import sys' >/dev/null 2>&1; then echo ok; cat {stamp} 2>/dev/null || true; "
            f"elif test -e {shlex.quote(venv)}; then echo broken; else echo absent; fi"
        )

    def process(self, output):
        state = output[0].strip() if output else "absent"
        lock = output[1].strip() if len(output) > 1 else None
        return state, lock


def lock_text() -> bytes:
    return repo_file(host.data.venv_requirements).read_bytes()


def lock_hash() -> str:
    return hashlib.sha256(lock_text()).hexdigest()


@deploy("Create the pinned Python environment")
def create_venv():
    p = paths()
    state, installed = host.get_fact(VenvState, venv=p.venv)
    wanted = lock_hash()

    if state != "ok":
        interpreter = resolve_python()  # as the SSH shell runs it; checked
        if state == "broken":
            server.shell(
                name=f"Remove the broken venv at {p.venv} (its interpreter no longer runs)",
                commands=[f"rm -rf {shlex.quote(p.venv)}"],
            )
        server.shell(
            name=f"Create the venv at {p.venv} with {interpreter}",
            commands=[f"{shlex.quote(interpreter)} -m venv {shlex.quote(p.venv)}"],
        )

    if state != "ok" or installed != wanted:
        remote_lock = posixpath.join(p.route_home, "requirements.txt")
        files.put(
            name="Upload the venv lock file",
            src=str(repo_file(host.data.venv_requirements)),
            dest=remote_lock,
        )
        server.shell(
            name="Install the pinned packages into the venv",
            commands=[
                f"{shlex.quote(p.python)} -m pip install --disable-pip-version-check --no-input "
                f"-q -r {shlex.quote(remote_lock)}",
                f"echo {wanted} > {shlex.quote(posixpath.join(p.venv, LOCK_STAMP))}",
            ],
        )
