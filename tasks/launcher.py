"""files/route_run.py, the launcher of the services under launchd and systemd.

The service manager starts the launcher; it forks the writer of the service's
logs (each rotated at `service_log_max_mb`, `service_log_keep` copies kept),
gives the service a pipe for stdout and stderr, and then becomes the service
(exec). launchd and systemd open a log once and never reopen it, so renaming
it cannot bound it (docs/macos.md, "Logs"). On macOS it also raises the
open-files limit (no NumberOfFiles keys: in a LaunchDaemon they set the
system-wide kern.maxfiles) and makes the server wait for the plan's GPU wired
limit at boot (docs/macos.md, "Boot order"). supervisord rotates its own logs
and does not use it.
"""

from __future__ import annotations

import hashlib

from pyinfra import host

from tasks import as_user
from tasks.common import REPO, RouteError, paths
from tasks.service_spec import Service

LAUNCHER = "route_run.py"


def launcher_sha() -> str:
    """Written into every definition that runs the launcher: a new launcher restarts
    the service."""
    return hashlib.sha256((REPO / "files" / LAUNCHER).read_bytes()).hexdigest()[:16]


def launcher_argv(svc: Service, nofile: bool = False, wait: str | None = None) -> list[str]:
    """The service's argv under the launcher. nofile: raise the open-files limit to
    svc.nofile (launchd); wait: NAME=VALUE of a sysctl to wait for before starting."""
    p = paths()
    argv = [p.python, p.script(LAUNCHER), "--stdout", svc.stdout, "--stderr", svc.stderr,
            "--max-bytes", str(svc.log_max_mb * 1048576), "--keep", str(svc.log_keep)]
    if nofile:
        argv += ["--nofile", str(svc.nofile)]
    if wait:
        wait_s = int(host.data.host_wired_limit_wait_s)
        if wait_s < 1:
            raise RouteError(
                f"{host.name}: host_wired_limit_wait_s {wait_s} must be at least 1 (seconds the "
                "server waits at boot for the GPU wired limit)"
            )
        argv += ["--wait-sysctl", wait, "--wait-s", str(wait_s)]
    return argv + ["--", *svc.argv]


def upload_launcher() -> None:
    as_user.put(name=f"Upload {LAUNCHER}", src=str(REPO / "files" / LAUNCHER),
                dest=paths().script(LAUNCHER))
