"""Service managers that keep the route alive, one module each.

Every backend renders the same `tasks.services.Service` description into its
own format and knows how to (re)start one service and whether it runs:

    definition_path(svc) -> str      where the rendered definition lives
    render(svc) -> str               the definition's text (a template)
    prepare()                        operations needed once (e.g. start supervisord)
    install(svc, text)               put the definition in place (operation)
    restart(svc)                     load the definition and (re)start (operations)
    is_running(svc) -> bool          read at plan time
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.facts.files import Directory

from tasks.common import RouteError, is_macos

BACKENDS = ("launchd", "systemd", "supervisor")


def select_backend():
    """The backend named by data, or the one this host's OS runs."""
    choice = host.data.service_backend
    if choice not in ("auto", *BACKENDS):
        raise RouteError(
            f"{host.name}: service_backend {choice!r} is not one of auto, {', '.join(BACKENDS)}"
        )
    if choice == "auto":
        if is_macos():
            choice = "launchd"
        elif host.get_fact(Directory, "/run/systemd/system"):
            # /run/systemd/system exists only when systemd is PID 1 (sd_booted).
            choice = "systemd"
        else:
            choice = "supervisor"
    if choice == "launchd":
        from tasks.backends.launchd import LaunchdBackend

        return LaunchdBackend()
    if choice == "systemd":
        from tasks.backends.systemd import SystemdBackend

        return SystemdBackend()
    from tasks.backends.supervisor import SupervisorBackend

    return SupervisorBackend()
