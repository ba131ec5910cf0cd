"""venv_wheelhouse (tasks/wheelhouse.py): what the workstation downloads for a host.

pip download --platform evaluates markers with the workstation's values; the
wheelhouse evaluates the lock's markers with the host's, so a Linux workstation
builds a Mac's wheelhouse with mlx-metal and without mlx-cpu and supervisor.
The download itself, for the Linux SSH test hosts, runs in
tests/e2e/test_ssh_deploy.py.
"""

from __future__ import annotations

from tasks.common import REPO
from tasks.wheelhouse import REPORT, lock_for, platform_tags

LOCK = (REPO / "requirements" / "host.txt").read_text()

MAC = {"implementation_name": "cpython", "implementation_version": "3.12.8", "os_name": "posix",
       "platform_machine": "arm64", "platform_release": "24.1.0", "platform_system": "Darwin",
       "platform_version": "Darwin Kernel Version 24.1.0", "python_full_version": "3.12.8",
       "platform_python_implementation": "CPython", "python_version": "3.12",
       "sys_platform": "darwin", "libc": "", "macos": "15.1"}
LINUX = {**MAC, "platform_machine": "x86_64", "platform_system": "Linux", "platform_release": "6.1",
         "sys_platform": "linux", "python_version": "3.11", "python_full_version": "3.11.2",
         "implementation_version": "3.11.2", "libc": "2.36", "macos": ""}


def names(requirements: list[str]) -> set[str]:
    return {r.split("==")[0].lower() for r in requirements}


def test_a_macs_wheelhouse_follows_the_macs_markers_not_the_workstations():
    mac = lock_for(LOCK, MAC)
    assert "mlx-metal" in names(mac) and "mlx" in names(mac)
    assert not names(mac) & {"mlx-cpu", "supervisor"}
    assert all(";" not in r for r in mac), "markers are evaluated, not passed to pip"


def test_a_linux_hosts_wheelhouse_has_mlx_cpu_and_supervisor():
    linux = lock_for(LOCK, LINUX)
    assert {"mlx-cpu", "supervisor", "mlx"} <= names(linux)
    assert "mlx-metal" not in names(linux)
    pins = [r for r in LOCK.splitlines() if r.strip() and not r.startswith("#")]
    assert len(linux) == len(pins) - 1  # everything but the darwin-only line


def test_platform_tags_of_a_mac_and_a_linux_host():
    mac = platform_tags(MAC)
    assert mac[0] == "macosx_15_0_arm64"
    assert {"macosx_11_0_arm64", "macosx_14_0_arm64", "macosx_10_9_universal2"} <= set(mac)
    assert not [tag for tag in mac if "x86_64" in tag or "16_0" in tag]
    linux = platform_tags(LINUX)
    assert linux[0] == "manylinux_2_36_x86_64"
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64"} <= set(linux)
    assert "manylinux_2_37_x86_64" not in linux


def test_the_host_report_runs_and_names_every_marker_key():
    import json
    import subprocess
    import sys

    from packaging.markers import default_environment

    env = json.loads(subprocess.run([sys.executable, "-c", REPORT], capture_output=True,
                                    text=True, check=True).stdout)
    assert set(default_environment()) <= set(env)
    assert {k: env[k] for k in default_environment()} == default_environment()
