"""Service managers that keep the route alive, one module each.

Every backend renders the same `tasks.service_spec.Service` description into
its own format and knows how to (re)start one service and whether it runs;
`Backend` below is that interface, and the only one the other tasks use.
"""

from __future__ import annotations

from typing import Protocol

from pyinfra import host
from pyinfra.facts.files import Directory

from tasks.backends.launchd import LaunchdBackend
from tasks.backends.supervisor import SupervisorBackend
from tasks.backends.systemd import SystemdBackend
from tasks.common import RouteError, is_macos
from tasks.service_spec import Service

BACKENDS = ("launchd", "systemd", "supervisor")


class Backend(Protocol):
    name: str  # "launchd", "systemd", "supervisor"
    sudo: bool  # its operations need root (through sudo)

    def definition_path(self, svc: Service) -> str:
        """Where the rendered definition lives on the host."""

    def render(self, svc: Service) -> str:
        """The definition's text (a template)."""

    def prepare(self, services: dict[str, Service]) -> None:
        """Operations needed once before any service (e.g. start supervisord)."""

    def install(self, svc: Service, text: str) -> None:
        """Put the definition in place (an operation)."""

    def restart(self, svc: Service) -> None:
        """Load the definition and (re)start the service (operations)."""

    def start_command(self, svc: Service) -> str:
        """A shell command that loads the definition again and starts the service."""

    def stop_command(self, svc: Service) -> str:
        """A shell command that stops the service (and succeeds when it is stopped)."""

    def is_running(self, svc: Service) -> bool:
        """Whether the service runs now, read at plan time."""

    def watchdog_restart_command(self, svc: Service) -> str:
        """What the proxy's watchdog runs, as the route user, to restart the service."""

    def watchdog_pid_command(self, svc: Service) -> str:
        """What prints the service's pid, as the route user."""

    def running_check(self, svc: Service) -> tuple[str, str]:
        """(shell command, regular expression): the service runs when the command's
        output matches. The host suite and the probes run it on the host."""

    def manifest_extras(self) -> dict:
        """This backend's own keys of route.json (None where they do not apply):
        backend_ctl, supervisord_pidfile, launchd_domain."""


def select_backend() -> Backend:
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
        return LaunchdBackend()
    if choice == "systemd":
        return SystemdBackend()
    return SupervisorBackend()
