"""Host tuning a Mac needs to serve a giant model unattended.

- iogpu.wired_limit_mb: how much unified memory the GPU may wire. macOS
  defaults to about 75% of RAM and forgets any change at boot; a 368 GB model
  on a 512 GB Mac needs more. Computed from hw.memsize and the profile's size,
  applied now, and re-applied at every boot by a root LaunchDaemon.
- pmset: never sleep, restart by itself after a power loss.
- launchd's open-files limit (default soft limit 256: the field report's
  Terminal-Bench run died of "Too many open files"), now and at every boot: the only system
  file limits the deploy sets. The services raise their own soft limit in
  their launcher (files/route_run.py), not with NumberOfFiles keys, which in a
  LaunchDaemon would also set kern.maxfiles/kern.maxfilesperproc.
- Boot order: launchd starts every LaunchDaemon at once; the server's launcher
  waits (bounded) for the wired limit computed here before it starts.
- FileVault is only reported (`fdesetup status`): when it is On, the run warns
  that an unattended restart stops at the unlock screen.

Linux hosts need none of this: tune_host plans nothing there.
"""

from __future__ import annotations

import math
import posixpath
import shlex
from io import StringIO

from pyinfra import host, logger
from pyinfra.api import deploy
from pyinfra.facts.server import MacosVersion
from pyinfra.operations import files, server

from tasks.budget import memory_budget, wired_mb
from tasks.common import RouteError, is_macos
from tasks.host_facts import LaunchdMaxfiles, PmsetSettings, SysctlValue, filevault
from tasks.templates import render

DAEMONS_DIR = "/Library/LaunchDaemons"
WIRED_SYSCTL = "iogpu.wired_limit_mb"  # macOS 14+; 13 had debug.iogpu.wired_limit (bytes)
TUNED_LINE = 'echo "host tuning applied at $(/bin/date +%s)"'

FILEVAULT_WARNING = (
    "FileVault is On ({status}): an unattended restart needs `sudo fdesetup authrestart` "
    "or FileVault off; LaunchDaemons do not start before the first login, so after a power "
    "cut or an update's restart the route stays down until someone logs in at the Mac"
)


def warn_filevault() -> None:
    state = filevault()
    if state and state["on"]:
        logger.warning(f"{host.name}: " + FILEVAULT_WARNING.format(status=state["status"]))


def boot_label() -> str:
    return f"{host.data.service_label_prefix}.host-tuning"


def boot_plist_path() -> str:
    return posixpath.join(DAEMONS_DIR, f"{boot_label()}.plist")


def wired_limit_mb() -> int | None:
    """The GPU wired-memory limit for this host and profile; None: leave macOS's default.

    Computed, it is the memory line of the host's budget (RAM less the headroom
    left to macOS), where the budget already refused a profile that does not
    fit. Set by hand, it must be below the RAM and hold the model.
    """
    setting = host.data.host_wired_limit_mb
    if setting == 0:
        return None
    budget = memory_budget()
    if setting is None:
        return wired_mb(budget)
    limit, ram = int(setting), math.floor(budget.ram * 1024)
    if limit >= ram:
        raise RouteError(
            f"{host.name}: host_wired_limit_mb {limit} is not below the RAM ({ram} MB); "
            "leave room for macOS, or set it to None to compute it"
        )
    need = math.ceil(budget.model * 1024)
    if need > limit:
        raise RouteError(
            f"{host.name}: model profile {host.data.model_profile!r} needs {need} MB "
            f"(size_gib x host_memory_model_overhead) but host_wired_limit_mb is {limit} MB; "
            "raise it, set it to None to compute it, or use a smaller model_profile"
        )
    return limit


def server_wait_sysctl() -> str | None:
    """NAME=VALUE the server's launcher waits for before it starts (files/route_run.py):
    the GPU wired limit this plan computed, which the host-tuning LaunchDaemon sets
    at boot while launchd starts the server beside it. None: nothing to wait for."""
    if not is_macos() or not host.data.get("host_tuning_enabled", True):
        return None
    limit = wired_limit_mb()
    return f"{WIRED_SYSCTL}={limit}" if limit else None


def maxfiles() -> tuple[int, int] | None:
    wanted = host.data.get("host_maxfiles")
    if not wanted:
        return None
    soft, hard = (int(v) for v in wanted)
    if soft > hard:
        raise RouteError(
            f"{host.name}: host_maxfiles {wanted}: the soft limit is above the hard one"
        )
    nofile = int(host.data.service_nofile)
    if nofile > hard:
        raise RouteError(
            f"{host.name}: service_nofile {nofile} is above host_maxfiles' hard limit {hard}: "
            "the services could not get it; lower service_nofile or raise host_maxfiles"
        )
    return soft, hard


def boot_commands(limit: int | None, files_limit: tuple[int, int] | None) -> list[str]:
    commands = []
    if limit:
        commands.append(f"/usr/sbin/sysctl -w {WIRED_SYSCTL}={limit}")
        # when, for the host suite's boot-order check (the server starts after this)
        commands.append(TUNED_LINE)
    if files_limit:
        commands.append(f"/bin/launchctl limit maxfiles {files_limit[0]} {files_limit[1]}")
    return commands


def render_boot_plist(commands: list[str]) -> str:
    return render(
        "launchd/boot_tuning.plist.j2",
        label=boot_label(),
        argv=["/bin/sh", "-c", "; ".join(commands)],
        log=f"/var/log/{boot_label()}.log",
    )


@deploy("Tune the host")
def tune_host():
    if not is_macos():
        return
    warn_filevault()  # whether or not the host is tuned
    if not host.data.host_tuning_enabled:
        return
    version = host.get_fact(MacosVersion) or "0"
    limit = wired_limit_mb()
    major = version.split(".")[0]
    if limit and (not major.isdigit() or int(major) < 14):
        raise RouteError(
            f"{host.name}: macOS {version} has no {WIRED_SYSCTL} (macOS 14 or later); "
            "update macOS, or set host_wired_limit_mb = 0 to leave the GPU limit alone"
        )
    files_limit = maxfiles()

    if limit and host.get_fact(SysctlValue, key=WIRED_SYSCTL) != str(limit):
        server.shell(
            name=f"Let the GPU wire up to {limit} MB of memory ({WIRED_SYSCTL})",
            commands=[f"sysctl -w {WIRED_SYSCTL}={limit}"],
            _sudo=True,
        )

    pmset = {str(k): str(v) for k, v in (host.data.get("host_pmset") or {}).items()}
    current = host.get_fact(PmsetSettings) or {}
    changed = {key: value for key, value in pmset.items() if current.get(key) != value}
    if changed:
        server.shell(
            name="Never sleep and restart after a power loss (pmset: "
                 + ", ".join(f"{k} {v}" for k, v in changed.items()) + ")",
            commands=["pmset -a " + " ".join(f"{shlex.quote(k)} {shlex.quote(v)}"
                                             for k, v in changed.items())],
            _sudo=True,
        )

    if files_limit and host.get_fact(LaunchdMaxfiles) != tuple(str(v) for v in files_limit):
        server.shell(
            name=f"Raise launchd's open-files limit to {files_limit[0]}/{files_limit[1]}",
            commands=[f"launchctl limit maxfiles {files_limit[0]} {files_limit[1]}"],
            _sudo=True,
        )

    commands = boot_commands(limit, files_limit)
    if commands:
        # Loaded by launchd at the next boot (RunAtLoad): the values above are
        # already applied, so nothing is bootstrapped now.
        files.put(
            name=f"Re-apply the GPU and open-files limits at every boot ({boot_label()})",
            src=StringIO(render_boot_plist(commands)),
            dest=boot_plist_path(),
            user="root",
            group="wheel",
            mode="644",
            _sudo=True,
        )
    else:
        files.file(
            name=f"Remove the boot-time tuning daemon ({boot_label()})",
            path=boot_plist_path(),
            present=False,
            _sudo=True,
        )
