"""Releases: what the server runs, built beside what it runs now.

A release is one venv holding the interpreter's packages from the lock and the
patched mlx-lm. It is immutable: its id hashes everything that makes it (the
interpreter and its version, the lock, the patch series), so a change to any
of them builds a new release beside the running one and a re-run with nothing
changed finds the release it wants already there. Layout under `venv_path`
(the anchors: Homebrew's Cellar + `opt` links, Capistrano's releases/current):

    releases/<id>/    one venv per release, `.mlx-route-release` written last
    next -> releases/<id>      the release this deploy builds and patches;
                               the deploy-time tools (weights, patches) run from it
    current -> releases/<id>   what the services run; moved only by
                               `routectl.py switch` once the new release has
                               answered, and moved back when it did not
    releases.json     the current release and the previous good ones

Building never touches `current`: a failed pip install, or a release that
installs but cannot generate, leaves the running server on what worked.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shlex
from dataclasses import dataclass

from pyinfra import host
from pyinfra.api import FactBase, deploy
from pyinfra.operations import server

from tasks import as_user
from tasks.common import REPO, fingerprint, paths, repo_file
from tasks.interpreter import Interpreter, resolve_python
from tasks.wheelhouse import pip_source_args, ship_wheelhouse

MARKER = ".mlx-route-release"


class ReleaseState(FactBase):
    """What the host has under venv_path: the targets of `current` and `next`,
    and the state of one release ("complete", "partial", "broken", "absent")."""

    def command(self, root: str, release: str) -> str:
        q = shlex.quote
        rel = posixpath.join(root, "releases", release)
        python = posixpath.join(rel, "bin", "python")
        return (
            f"echo current=$(readlink {q(posixpath.join(root, 'current'))} 2>/dev/null); "
            f"echo next=$(readlink {q(posixpath.join(root, 'next'))} 2>/dev/null); "
            f"if {q(python)} -c 'import sys' >/dev/null 2>&1; then "
            f"if [ -f {q(posixpath.join(rel, MARKER))} ]; then echo wanted=complete; "
            f"else echo wanted=partial; fi; "
            f"elif [ -e {q(rel)} ]; then echo wanted=broken; else echo wanted=absent; fi"
        )

    def process(self, output):
        state = {}
        for line in output:
            key, _, value = line.strip().partition("=")
            state[key] = posixpath.basename(value) if key in ("current", "next") else value
        return state


@dataclass(frozen=True)
class Release:
    id: str
    dir: str
    python: str
    interpreter: str  # what the venv is made from
    version: str  # of that interpreter


def lock_text() -> bytes:
    return repo_file(host.data.venv_requirements).read_bytes()


def series_parts() -> list[bytes]:
    """The patch series and its applier, as they shape a release (none when off)."""
    if not host.data.patches_enabled:
        return []
    patches = REPO / "patches"
    return [repo_file("files/mlx_patches.py").read_bytes(),
            *(path.read_bytes() for path in sorted(patches.glob("*.patch"))),
            (patches / "series").read_bytes()]


def wanted_release() -> Release:
    """The release this host's data asks for (its id, where it lives)."""
    path = resolve_python()
    version = ".".join(map(str, host.get_fact(Interpreter, python=path)[1]))
    release_id = fingerprint(path, version, lock_text(), *series_parts())
    p = paths()
    release_dir = p.release_dir(release_id)
    return Release(release_id, release_dir, posixpath.join(release_dir, "bin", "python"),
                   path, version)


def release_state(release: Release) -> dict:
    return host.get_fact(ReleaseState, root=paths().venv_root, release=release.id)


def record(release: Release) -> str:
    return json.dumps({
        "id": release.id,
        "interpreter": release.interpreter,
        "python_version": release.version,
        "lock_sha256": hashlib.sha256(lock_text()).hexdigest(),
        "patches": bool(host.data.patches_enabled),
    }, sort_keys=True)


@deploy("Build the release the server will run")
def build_release():
    p = paths()
    release = wanted_release()
    state = release_state(release)
    q = shlex.quote
    # venv_wheelhouse: the packages come from the workstation (tasks/wheelhouse.py)
    ship_wheelhouse(release.interpreter)

    if state.get("wanted") != "complete":
        if state.get("wanted") in ("partial", "broken"):
            server.shell(
                name=f"Remove the unfinished release {release.id} (a build that stopped "
                     "half-way, or an interpreter that no longer runs)",
                commands=[f"rm -rf {q(release.dir)}"],
            )
        server.shell(
            name=f"Create release {release.id} with {release.interpreter} "
                 f"(Python {release.version}), beside the running one",
            commands=[f"mkdir -p {q(posixpath.dirname(release.dir))}",
                      f"{q(release.interpreter)} -m venv {q(release.dir)}"],
        )
        remote_lock = posixpath.join(release.dir, "requirements.txt")
        as_user.put(
            name=f"Upload the lock file into release {release.id}",
            src=str(repo_file(host.data.venv_requirements)),
            dest=remote_lock,
        )
        server.shell(
            name=f"Install the pinned packages into release {release.id}",
            commands=[
                f"{q(release.python)} -m pip install --disable-pip-version-check --no-input "
                f"-q {pip_source_args()}-r {q(remote_lock)}",
                # written last: a release without it is unfinished
                f"echo {q(record(release))} > {q(posixpath.join(release.dir, MARKER))}",
            ],
        )

    if state.get("next") != release.id:
        server.shell(
            name=f"Point next at release {release.id}",
            commands=[f"ln -sfn {q('releases/' + release.id)} {q(p.next_venv)}"],
        )
