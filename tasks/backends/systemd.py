"""systemd system units, where systemd is PID 1 (needs root: run pyinfra with --sudo)."""

from __future__ import annotations

import shlex
from io import StringIO

from pyinfra import host
from pyinfra.facts.systemd import SystemdStatus
from pyinfra.operations import files, server

from tasks.as_user import as_root, other_route_user
from tasks.common import paths
from tasks.services import Service, render

UNIT_DIR = "/etc/systemd/system"


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
            user=paths().user,
            wanted_by="multi-user.target",
        )

    def prepare(self) -> None:
        pass

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
        server.shell(name=f"(Re)start the {svc.name} under systemd",
                     commands=[self.start_command(svc)], **as_root(self.sudo))

    def is_running(self, svc: Service) -> bool:
        return bool(host.get_fact(SystemdStatus).get(f"{svc.label}.service"))
