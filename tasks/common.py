"""What every task needs: the host's paths and the selected model profile.

Paths in data are relative to the service user's home unless absolute; this
module is the one place that resolves them, so no task joins paths itself.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from pathlib import Path

from pyinfra import host
from pyinfra.api import FactBase
from pyinfra.facts.server import Home, Kernel, User

REPO = Path(__file__).resolve().parent.parent


class RouteError(Exception):
    """A problem a person must fix; the message says what and how."""


@dataclass(frozen=True)
class RoutePaths:
    home: str
    user: str
    route_home: str  # scripts, patches, state, keys
    bin_dir: str  # uploaded helper scripts (files/)
    state_dir: str  # stamps of what has been applied
    venv_root: str  # venv_path: releases/, current, next (tasks/release.py)
    venv: str  # the release the services run: venv_root/current
    python: str  # its interpreter
    next_venv: str  # the release this deploy builds: venv_root/next
    next_python: str  # its interpreter: deploy-time tools run from it
    model_dir: str
    logs_dir: str

    def venv_bin(self, name: str) -> str:
        return posixpath.join(self.venv, "bin", name)

    def next_bin(self, name: str) -> str:
        return posixpath.join(self.next_venv, "bin", name)

    def release_dir(self, release: str) -> str:
        return posixpath.join(self.venv_root, "releases", release)

    def script(self, name: str) -> str:
        return posixpath.join(self.bin_dir, name)


def _resolve(home: str, path: str) -> str:
    path = path.replace("~/", "", 1) if path.startswith("~/") else path
    return path if path.startswith("/") else posixpath.join(home, path)


class LoginName(FactBase):
    """`id -un`: the connecting user by its account, also where $USER is unset
    (pyinfra's User fact reads $USER, empty under some service managers and CI)."""

    def command(self) -> str:
        return "id -un"

    def process(self, output):
        return output[0].strip() if output else ""


def route_user() -> str:
    return host.data.get("route_user") or host.get_fact(User) or host.get_fact(LoginName)


def paths() -> RoutePaths:
    user = route_user()
    home = host.get_fact(Home, user=user if host.data.get("route_user") else "")
    if not home:
        raise RouteError(f"{host.name}: cannot find the home directory of user {user!r}")
    route_home = _resolve(home, host.data.route_home)
    venv_root = _resolve(home, host.data.venv_path)
    venv = posixpath.join(venv_root, "current")
    next_venv = posixpath.join(venv_root, "next")
    return RoutePaths(
        home=home,
        user=user,
        route_home=route_home,
        bin_dir=posixpath.join(route_home, "bin"),
        state_dir=posixpath.join(route_home, "state"),
        venv_root=venv_root,
        venv=venv,
        python=posixpath.join(venv, "bin", "python"),
        next_venv=next_venv,
        next_python=posixpath.join(next_venv, "bin", "python"),
        model_dir=_resolve(home, host.data.model_dir) if host.data.model_dir
        else posixpath.join(_resolve(home, host.data.model_root), host.data.model_profile),
        logs_dir=_resolve(home, host.data.route_logs_dir),
    )


def profile() -> dict:
    """The selected model profile, with a clear error for a misspelt name."""
    profiles = host.data.model_profiles
    name = host.data.model_profile
    if name not in profiles:
        raise RouteError(
            f"{host.name}: model_profile {name!r} is not in model_profiles "
            f"(known: {', '.join(sorted(profiles))}); fix the host's data in inventory.py"
        )
    return profiles[name]


def is_macos() -> bool:
    return host.get_fact(Kernel) == "Darwin"


def fingerprint(*parts: bytes | str) -> str:
    """A short stable hash of what a service is made of (definition, code)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def repo_file(relpath: str) -> Path:
    """A file of this repository (templates, files, patches, lock files)."""
    path = REPO / relpath
    if not path.exists():
        raise RouteError(f"{relpath} does not exist in {REPO}")
    return path
