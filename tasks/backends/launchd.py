"""launchd on macOS: the services as LaunchDaemons (default) or LaunchAgents.

`service_launchd_domain` (group_data/all.py) chooses:

  "system"  /Library/LaunchDaemons, `UserName` = the route user. Loaded at boot
            with nobody logged in, so the route comes back by itself after an
            OS update and reboot. Needs root (the SSH user is an admin: sudo).
  "gui"     ~/Library/LaunchAgents in gui/<uid>: only while that user is
            logged in at the console (the field report's setup, loaded by hand).
  "user"    ~/Library/LaunchAgents in user/<uid> with LimitLoadToSessionType
            Background: works over SSH, but exists only while the user has a
            session, so it does not start after an unattended reboot.
"""

from __future__ import annotations

import posixpath
import shlex
from io import StringIO

from pyinfra import host
from pyinfra.operations import files

from tasks import as_user, launchctl
from tasks.as_user import as_root, other_route_user
from tasks.backends.sudoers import watchdog_rule
from tasks.common import RouteError, paths
from tasks.launcher import launcher_argv, launcher_sha, upload_launcher
from tasks.service_spec import Service, model_servers
from tasks.templates import render
from tasks.tuning import server_wait_sysctl

DOMAINS = ("system", "gui", "user")
DAEMONS_DIR = "/Library/LaunchDaemons"
NEWSYSLOG_DIR = "/etc/newsyslog.d"  # earlier deploys rotated the logs with newsyslog
LAUNCHCTL = "/bin/launchctl"


def launchd_domain_kind() -> str:
    kind = host.data.service_launchd_domain
    if kind not in DOMAINS:
        raise RouteError(
            f"{host.name}: service_launchd_domain {kind!r} is not one of {', '.join(DOMAINS)}; "
            "\"system\" (LaunchDaemons, starts at boot) is the one that survives a reboot"
        )
    return kind


class LaunchdBackend:
    name = "launchd"

    def __init__(self) -> None:
        p = paths()
        self.paths = p
        self.kind = launchd_domain_kind()
        if self.kind == "system":
            self.domain = "system"
            self.plist_dir = DAEMONS_DIR
        else:
            uid = host.get_fact(launchctl.UserId, user=p.user)
            if uid is None:
                raise RouteError(f"{host.name}: cannot find the uid of user {p.user!r}")
            self.domain = f"{self.kind}/{uid}"
            self.plist_dir = posixpath.join(p.home, "Library", "LaunchAgents")
        # LaunchDaemons and another user's agents are root's business; the
        # connecting admin gets there with sudo.
        self.sudo = self.kind == "system" or bool(host.data.get("route_user"))
        self._reload: dict[str, bool] = {}

    def definition_path(self, svc: Service) -> str:
        return posixpath.join(self.plist_dir, f"{svc.label}.plist")

    def render(self, svc: Service) -> str:
        # The launcher writes the logs (StandardOutPath would be launchd's file, never
        # reopened) and sets the open-files limit (NumberOfFiles in a LaunchDaemon would
        # set the system-wide sysctls); the server waits for the plan's GPU wired limit.
        wait = server_wait_sysctl() if svc.port is not None else None  # a model server
        return render(
            "launchd/service.plist.j2",
            svc=svc,
            argv=launcher_argv(svc, nofile=True, wait=wait),
            launcher_sha=launcher_sha(),
            user_name=self.paths.user if self.kind == "system" else None,
            session_type="Background" if self.kind == "user" else None,
        )

    def newsyslog_path(self) -> str:
        return posixpath.join(NEWSYSLOG_DIR, f"{host.data.service_label_prefix}.conf")

    def prepare(self, services: dict[str, Service]) -> None:
        if self.kind != "system" and not host.get_fact(launchctl.LaunchdDomainExists,
                                                       domain=self.domain):
            hint = ("log in at the Mac's console (or enable automatic login)"
                    if self.kind == "gui" else "open an SSH session as that user")
            raise RouteError(
                f"{host.name}: launchd domain {self.domain} does not exist now; {hint}, "
                "or set service_launchd_domain = \"system\" (LaunchDaemons, no login needed)"
            )
        if self.kind != "system":
            files.directory(
                name="Create ~/Library/LaunchAgents",
                path=self.plist_dir,
                present=True,
                _sudo=self.sudo,
                _sudo_user=self.paths.user if self.sudo else None,
            )
        if self.kind == "system" and model_servers(services):  # a cluster's rank-only host: none
            self.prepare_watchdog(model_servers(services))
        upload_launcher()
        # newsyslog renamed the logs under a service that kept writing into the renamed
        # file; files/route_run.py rotates them now
        files.file(
            name="Remove the newsyslog rule of earlier deploys (route_run.py rotates the logs)",
            path=self.newsyslog_path(),
            present=False,
            **as_root(),
        )

    def kickstart(self, svc: Service) -> str:
        return f"{LAUNCHCTL} kickstart -k {self.domain}/{svc.label}"

    def watchdog_restart_command(self, svc: Service) -> str:
        """kickstart -k: launchd stops the job (SIGTERM, SIGKILL after ExitTimeOut) and
        starts it again. A LaunchDaemon is root's: the route user gets there through
        sudo, allowed for exactly this command (prepare_watchdog)."""
        if self.kind == "system":
            return f"/usr/bin/sudo -n {self.kickstart(svc)}"
        return self.kickstart(svc)

    def watchdog_pid_command(self, svc: Service) -> str:
        """The process listening on the server's port (the route user's own)."""
        return f"/usr/sbin/lsof -t -nP -iTCP:{int(svc.port or host.data.server_port)} -sTCP:LISTEN"

    def prepare_watchdog(self, servers: list[Service]) -> None:
        watchdog_rule(self.paths.user, [self.kickstart(svc) for svc in servers], "kickstart",
                      "wheel", as_root())

    def install(self, svc: Service, text: str) -> None:
        if self.kind != "system" and other_route_user():
            # another user's agent: as that user, without pyinfra's setfacl (tasks/as_user.py)
            op = as_user.put(
                name=f"Write the launchd plist for the {svc.name} ({self.domain})",
                src=StringIO(text),
                dest=self.definition_path(svc),
                mode="644",
            )
            self._reload[svc.name] = op is not None
            return
        owner = {"user": "root", "group": "wheel"} if self.kind == "system" else {}
        op = files.put(
            name=f"Write the launchd plist for the {svc.name} ({self.domain})",
            src=StringIO(text),
            dest=self.definition_path(svc),
            mode="644",
            **as_root(self.sudo),
            # launchd refuses a LaunchDaemon that is not root:wheel 644 with the
            # same "5: Input/output error" as a loaded label
            **owner,
        )
        self._reload[svc.name] = op.will_change

    def restart(self, svc: Service) -> None:
        launchctl.service(
            name=f"(Re)start the {svc.name} under launchd ({self.domain}/{svc.label})",
            label=svc.label,
            plist=self.definition_path(svc),
            domain=self.domain,
            reload=self._reload.get(svc.name, True),
            restart=True,
            bootstrap_retries=int(host.data.service_launchd_bootstrap_retries),
            **as_root(self.sudo),
        )

    def start_command(self, svc: Service) -> str:
        """Read the plist again (bootstrap) and start the job: a stopped job is booted out."""
        q = shlex.quote
        plist = self.definition_path(svc)
        target = f"{self.domain}/{svc.label}"
        retries = int(host.data.service_launchd_bootstrap_retries)
        return (f"plutil -lint -s {q(plist)} && launchctl enable {q(target)} && "
                + launchctl.bootstrap_command(self.domain, svc.label, plist, retries, host.name))

    def stop_command(self, svc: Service) -> str:
        """bootout, then wait (bounded) until launchd has let go of the label."""
        target = shlex.quote(f"{self.domain}/{svc.label}")
        return (f"launchctl bootout {target} >/dev/null 2>&1 || true; n=0; "
                f"while launchctl print {target} >/dev/null 2>&1 && [ $n -lt 30 ]; do "
                f"sleep 1; n=$((n+1)); done")

    def running_check(self, svc: Service) -> tuple[str, str]:
        return f"launchctl print {shlex.quote(self.domain + '/' + svc.label)}", r"state = running"

    def manifest_extras(self) -> dict:
        return {"backend_ctl": None, "supervisord_pidfile": None, "launchd_domain": self.domain}

    def is_running(self, svc: Service) -> bool:
        status = host.get_fact(launchctl.LaunchdPrint, target=f"{self.domain}/{svc.label}")
        return bool(status) and status.get("state") == "running"
