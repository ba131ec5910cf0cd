"""systemd system units, where systemd is PID 1 (needs root: run pyinfra with --sudo)."""

from __future__ import annotations

import shlex
from io import StringIO

from pyinfra import host
from pyinfra.facts.systemd import SystemdStatus
from pyinfra.operations import files, systemd

from tasks.as_user import as_root, other_route_user
from tasks.backends.sudoers import watchdog_rule
from tasks.common import paths
from tasks.launcher import launcher_argv, launcher_sha, upload_launcher
from tasks.service_spec import Service, model_servers
from tasks.templates import render

UNIT_DIR = "/etc/systemd/system"
SYSTEMCTL = "/usr/bin/systemctl"


def runs_as_root(user: str) -> bool:
    """The unit has no User= (the template leaves it out for an empty user): root."""
    return user in ("", "root")


class SystemdBackend:
    name = "systemd"

    @property
    def sudo(self) -> bool:
        """The deploy connects as root (pyinfra --sudo) for system units; inside the
        deploys that run as another route_user, they ask for root again."""
        return bool(other_route_user())

    def definition_path(self, svc: Service) -> str:
        return f"{UNIT_DIR}/{svc.label}.service"

    def render(self, svc: Service) -> str:
        return render(
            "systemd/unit.service.j2",
            svc=svc,
            # the launcher writes and rotates the logs, then becomes the service (MainPID)
            argv=launcher_argv(svc),
            launcher_sha=launcher_sha(),
            user=paths().user,
            wanted_by="multi-user.target",
        )

    def prepare(self, services: dict[str, Service]) -> None:
        upload_launcher()
        user = paths().user
        if runs_as_root(user) or not model_servers(services):  # a cluster's rank-only host: none
            return
        watchdog_rule(user, [self.restart_unit(svc) for svc in model_servers(services)],
                      "restart", "root", as_root(self.sudo))

    def restart_unit(self, svc: Service) -> str:
        return f"{SYSTEMCTL} restart {svc.label}.service"

    def watchdog_restart_command(self, svc: Service) -> str:
        """As the route user: through sudo, allowed for this command only (prepare)."""
        command = self.restart_unit(svc)
        return command if runs_as_root(paths().user) else f"/usr/bin/sudo -n {command}"

    def watchdog_pid_command(self, svc: Service) -> str:
        return f"{SYSTEMCTL} show --property MainPID --value {shlex.quote(svc.label + '.service')}"

    def install(self, svc: Service, text: str) -> None:
        files.put(
            name=f"Write the systemd unit for the {svc.name}",
            src=StringIO(text),
            dest=self.definition_path(svc),
            mode="644",
            **as_root(self.sudo),
        )

    def start_command(self, svc: Service) -> str:
        unit = shlex.quote(f"{svc.label}.service")
        return f"systemctl daemon-reload && systemctl enable {unit} && systemctl restart {unit}"

    def stop_command(self, svc: Service) -> str:
        return f"systemctl stop {shlex.quote(svc.label + '.service')} || true"

    def restart(self, svc: Service) -> None:
        systemd.service(name=f"(Re)start the {svc.name} under systemd",
                        service=f"{svc.label}.service", running=True, restarted=True,
                        enabled=True, daemon_reload=True, **as_root(self.sudo))

    def running_check(self, svc: Service) -> tuple[str, str]:
        return f"systemctl is-active {shlex.quote(svc.label + '.service')}", r"^active$"

    def manifest_extras(self) -> dict:
        return {"backend_ctl": None, "supervisord_pidfile": None, "launchd_domain": None}

    def is_running(self, svc: Service) -> bool:
        return bool(host.get_fact(SystemdStatus).get(f"{svc.label}.service"))
