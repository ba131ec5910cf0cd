"""What a host says about itself that the route reads: on a Mac sysctl values,
pmset settings, launchd's open-files limit, FileVault's state; on Linux whether
the BLAS library to preload is there."""

from __future__ import annotations

import re
import shlex

from pyinfra import host
from pyinfra.api import FactBase

from tasks.common import is_macos


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


class ReadableFile(FactBase):
    """The real path of a readable file (symlinks resolved), None when absent."""

    def command(self, path: str) -> str:
        q = shlex.quote(path)
        return f"if test -f {q} && test -r {q}; then readlink -f {q}; else echo absent; fi"

    def process(self, output):
        line = output[0].strip() if output else ""
        return line if line.startswith("/") else None


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


def filevault() -> dict | None:
    """FileVault's state on a Mac (None on Linux, or when fdesetup says nothing)."""
    return host.get_fact(FileVaultStatus) if is_macos() else None
