"""Host tuning a Mac needs to serve a giant model unattended.

- iogpu.wired_limit_mb: how much unified memory the GPU may wire. macOS
  defaults to about 75% of RAM and forgets any change at boot; a 368 GB model
  on a 512 GB Mac needs more. Computed from hw.memsize and the profile's size,
  applied now, and re-applied at every boot by a root LaunchDaemon.
- pmset: never sleep, restart by itself after a power loss.
- launchd's open-files limit (default soft limit 256: the seed's Terminal-Bench
  run died of "Too many open files"), now and at every boot. The services get
  their own NumberOfFiles limits in their plists.
- FileVault is only reported (`fdesetup status`): when it is On, the run warns
  that an unattended restart stops at the unlock screen.

Linux hosts need none of this: tune_host plans nothing there.
"""

from __future__ import annotations

import math
import posixpath
import re
import shlex
from io import StringIO

from pyinfra import host, logger
from pyinfra.api import FactBase, deploy
from pyinfra.facts.server import MacosVersion
from pyinfra.operations import files, server

from tasks.budget import memory_budget, wired_mb
from tasks.common import RouteError, is_macos
from tasks.services import render

DAEMONS_DIR = "/Library/LaunchDaemons"
WIRED_SYSCTL = "iogpu.wired_limit_mb"  # macOS 14+; 13 had debug.iogpu.wired_limit (bytes)


class SysctlValue(FactBase):
    """`sysctl -n <name>`: the value as a string, None when the name does not exist."""

    def command(self, key: str) -> str:
        return f"sysctl -n {shlex.quote(key)} 2>/dev/null || true"

    def process(self, output):
        value = output[0].strip() if output else ""
        return value or None


class PmsetSettings(FactBase):
    """`pmset -g` "Currently in use" settings: {"sleep": "0", "autorestart": "1", ...}."""

    def command(self) -> str:
        return "pmset -g"

    def process(self, output):
        settings = {}
        for line in output:
            # " sleep                0 (sleep prevented by sharingd)"
            match = re.match(r"^\s+(\S.*?)\s+(\S+)(\s+\(.*\))?\s*$", line)
            if match:
                settings[match.group(1)] = match.group(2)
        return settings


class LaunchdMaxfiles(FactBase):
    """`launchctl limit maxfiles` as (soft, hard) strings."""

    def command(self) -> str:
        return "launchctl limit maxfiles"

    def process(self, output):
        fields = output[0].split() if output else []
        return (fields[1], fields[2]) if len(fields) >= 3 else None


class FileVaultStatus(FactBase):
    """`fdesetup status` (any user may ask): {"on": bool, "status": its words},
    None when it gives no answer. "On" also covers encryption or decryption in
    progress and "Off, but will be enabled after the next restart": each means
    the next boot stops at the unlock screen."""

    def command(self) -> str:
        return "fdesetup status 2>/dev/null || true"

    def process(self, output):
        text = " ".join(line.strip() for line in output if line.strip())
        match = re.search(r"FileVault is (On|Off)", text)
        if not match:
            return None
        pending = re.search(r"will be enabled|in progress", text)
        return {"on": match.group(1) == "On" or bool(pending), "status": text}


FILEVAULT_WARNING = (
    "FileVault is On ({status}): an unattended restart needs `sudo fdesetup authrestart` "
    "or FileVault off; LaunchDaemons do not start before the first login, so after a power "
    "cut or an update's restart the route stays down until someone logs in at the Mac"
)


def filevault() -> dict | None:
    """FileVault's state on a Mac (None on Linux, or when fdesetup says nothing)."""
    return host.get_fact(FileVaultStatus) if is_macos() else None


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


def maxfiles() -> tuple[int, int] | None:
    wanted = host.data.get("host_maxfiles")
    if not wanted:
        return None
    soft, hard = (int(v) for v in wanted)
    if soft > hard:
        raise RouteError(
            f"{host.name}: host_maxfiles {wanted}: the soft limit is above the hard one"
        )
    return soft, hard


def boot_commands(limit: int | None, files_limit: tuple[int, int] | None) -> list[str]:
    commands = []
    if limit:
        commands.append(f"/usr/sbin/sysctl -w {WIRED_SYSCTL}={limit}")
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
    if not host.data.get("host_tuning_enabled", True):
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
