"""supervisord, installed into the route's venv, where systemd is not PID 1.

supervisord runs as the service user with its own socket under route_home, so
it needs no root and never touches a system-wide supervisor.
"""

from __future__ import annotations

import posixpath
import shlex
from io import StringIO

from pyinfra import host, logger
from pyinfra.api import FactBase
from pyinfra.operations import files, server

from tasks import as_user
from tasks.common import paths
from tasks.service_spec import Service
from tasks.templates import render


class SupervisorStatus(FactBase):
    """Program name -> state (RUNNING, STARTING, FATAL...); None when supervisord is down."""

    def command(self, ctl: str) -> str:
        # `pid` prints supervisord's pid only when it answers on its socket;
        # `status` exits non-zero when any program is stopped, so its exit
        # code is ignored.
        return f"{ctl} pid 2>/dev/null | grep -qE '^[0-9]+$' && {{ {ctl} status 2>&1; true; }} || echo DOWN"

    def process(self, output):
        if output and output[0].strip() == "DOWN":
            return None
        states = {}
        for line in output:
            fields = line.split()
            if len(fields) >= 2 and fields[1].isupper():
                states[fields[0]] = fields[1]
        return states


class HardNofile(FactBase):
    """The hard open-files limit a process started over this connection gets."""

    def command(self) -> str:
        return "ulimit -Hn"

    def process(self, output):
        value = output[0].strip() if output else "unlimited"
        return None if value == "unlimited" else int(value)


class SupervisorBackend:
    name = "supervisor"
    sudo = False  # supervisord runs as the route user

    def __init__(self) -> None:
        p = paths()
        self.root = posixpath.join(p.route_home, "supervisor")
        self.conf = posixpath.join(self.root, "supervisord.conf")
        self.conf_d = posixpath.join(self.root, "conf.d")
        self.pidfile = posixpath.join(self.root, "supervisord.pid")
        # From `next`: it exists from the release step on, `current` only after
        # the first switch (any release's supervisorctl talks to supervisord).
        self.ctl = f"{shlex.quote(p.next_bin('supervisorctl'))} -c {shlex.quote(self.conf)}"
        # The proxy's watchdog outlives deploys: the release it runs from.
        self.current_ctl = (f"{shlex.quote(p.venv_bin('supervisorctl'))} "
                            f"-c {shlex.quote(self.conf)}")
        self.supervisord = f"{shlex.quote(p.next_bin('supervisord'))} -c {shlex.quote(self.conf)}"
        self.release_record = posixpath.join(p.state_dir, "supervisord.release")
        self.next_venv = p.next_venv
        self.home = p.home
        self.logs_dir = p.logs_dir

    def definition_path(self, svc: Service) -> str:
        return posixpath.join(self.conf_d, f"{svc.name}.conf")

    def render(self, svc: Service) -> str:
        return render("supervisor/program.conf.j2", svc=svc)

    def _status(self) -> dict | None:
        return host.get_fact(SupervisorStatus, ctl=self.ctl)

    def prepare(self, services: dict[str, Service]) -> None:
        files.directory(name="Create the supervisor directories", path=self.conf_d, present=True)
        as_user.put(
            name="Write supervisord.conf",
            src=StringIO(render(
                "supervisor/supervisord.conf.j2",
                sock=posixpath.join(self.root, "supervisor.sock"),
                pidfile=self.pidfile,
                logfile=posixpath.join(self.logs_dir, "supervisord.log"),
                conf_d=self.conf_d,
                home=self.home,
                nofile=self.nofile(),
                # supervisord's own log is rotated as the services' are
                log_max_mb=int(host.data.service_log_max_mb),
                log_keep=int(host.data.service_log_keep),
            )),
            dest=self.conf,
        )
        if self._status() is None:
            server.shell(
                name="Start supervisord",
                commands=[
                    f"{self.supervisord}",
                    # its release stays on the host while it runs (never pruned)
                    f"basename \"$(readlink {shlex.quote(self.next_venv)})\" > "
                    f"{shlex.quote(self.release_record)}",
                ],
            )

    def nofile(self) -> int:
        """service_nofile, capped by the hard limit (supervisord refuses to start above it)."""
        wanted = int(host.data.service_nofile)
        hard = host.get_fact(HardNofile)
        if hard is not None and hard < wanted:
            logger.warning(
                f"{host.name}: service_nofile {wanted} is above the hard limit {hard}; "
                f"the services get {hard} (raise the hard limit to get more)"
            )
            return hard
        return wanted

    def install(self, svc: Service, text: str) -> None:
        as_user.put(
            name=f"Write the supervisor program for the {svc.name}",
            src=StringIO(text),
            dest=self.definition_path(svc),
        )

    def start_command(self, svc: Service) -> str:
        """Load the program's definition again and start it.

        remove + add rereads the definition and starts the program once;
        `update` would leave an unchanged definition running old code."""
        name = shlex.quote(svc.name)
        return (f"{self.ctl} reread >/dev/null && "
                f"{{ {self.ctl} stop {name}; {self.ctl} remove {name}; }} >/dev/null 2>&1; "
                f"{self.ctl} add {name}")

    def stop_command(self, svc: Service) -> str:
        return f"{self.ctl} stop {shlex.quote(svc.name)} >/dev/null 2>&1 || true"

    def restart(self, svc: Service) -> None:
        server.shell(name=f"(Re)start the {svc.name} under supervisor",
                     commands=[self.start_command(svc)])

    def watchdog_restart_command(self, svc: Service) -> str:
        return f"{self.current_ctl} restart {shlex.quote(svc.name)}"

    def watchdog_pid_command(self, svc: Service) -> str:
        return f"{self.current_ctl} pid {shlex.quote(svc.name)}"

    def running_check(self, svc: Service) -> tuple[str, str]:
        return f"{self.ctl} status {shlex.quote(svc.name)} 2>&1", r"\sRUNNING\s"

    def manifest_extras(self) -> dict:
        return {"backend_ctl": self.ctl, "supervisord_pidfile": self.pidfile,
                "launchd_domain": None}

    def is_running(self, svc: Service) -> bool:
        return (self._status() or {}).get(svc.name) in ("RUNNING", "STARTING")
