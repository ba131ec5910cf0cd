"""What already holds the route's ports, and retiring what data says may go.

A Mac set up by hand (the field report's) already runs its own LaunchAgents
on the server and proxy ports (com.*.glm52-mlx-server on 8025,
com.*.glm52-strip-proxy on 8026). A deploy that started beside them would
fail late and obscurely, so the plan looks first: every listener on
server_port, proxy_port (and route_profiles' ports) that is not this route's own (its command line
names neither the route's releases nor route_home) stops the deploy, before
anything runs, with its pid, command and launchd label or systemd unit;
unless its label is in `service_retire`, which boots it out and disables it
(launchd) or stops and disables it (systemd). Labels in `service_retire`
that are loaded but not listening are retired as well.
"""

from __future__ import annotations

import shlex

from pyinfra import host
from pyinfra.api import FactBase, deploy
from pyinfra.facts.files import Directory
from pyinfra.facts.systemd import SystemdEnabled, SystemdStatus
from pyinfra.operations import server

from tasks import launchctl
from tasks.common import RouteError, is_macos, paths
from tasks.profiles import served


class PortListeners(FactBase):
    """[{"port", "pid", "args", "label"}] of the processes listening on the ports.

    The label is the launchd job (macOS: `launchctl list`, the user's and, when
    sudo needs no password, the system's) or the systemd unit (Linux)."""

    def command(self, ports: tuple, darwin: bool) -> str:
        label = (
            "$({ launchctl list; sudo -n launchctl list; } 2>/dev/null "
            "| awk -v p=$pid '$1 == p {print $3; exit}')" if darwin else
            "$(grep -o '[^/]*\\.service' /proc/$pid/cgroup 2>/dev/null | head -n 1)"
        )
        return (
            f"for port in {' '.join(str(int(p)) for p in ports)}; do "
            "for pid in $(lsof -nP -iTCP:$port -sTCP:LISTEN -t 2>/dev/null | sort -u); do "
            f"echo \"port=$port pid=$pid label={label} args=$(ps -o args= -p $pid)\"; "
            "done; done; true"
        )

    def process(self, output):
        found = []
        for line in output:
            if not line.startswith("port="):
                continue
            fields = {}
            rest = line.strip()
            for key in ("port", "pid", "label"):
                head, _, rest = rest.partition(" ")
                fields[key] = head.split("=", 1)[1] if "=" in head else ""
            fields["args"] = rest.split("=", 1)[1] if rest.startswith("args=") else rest
            found.append(fields)
        return found


def ours(args: str) -> bool:
    p = paths()
    return p.venv_root + "/" in args or p.route_home + "/" in args


def foreign_listeners() -> list[dict]:
    ports = (host.data.proxy_port, *(which.port for which in served(host.data, host.name)
                                     if which.port is not None))
    return [found for found in host.get_fact(PortListeners, ports=ports, darwin=is_macos()) or []
            if not ours(found["args"])]


def retire_targets() -> list[str]:
    retire = host.data.service_retire or []
    if not isinstance(retire, (list, tuple)) or not all(isinstance(x, str) for x in retire):
        raise RouteError(f"{host.name}: service_retire must be a list of launchd labels or "
                         f"systemd units, got {retire!r}")
    return list(retire)


def check_ports() -> list[dict]:
    """The foreign listeners data allows to retire; RouteError for any other."""
    retire = retire_targets()
    allowed, blocking = [], []
    for found in foreign_listeners():
        (allowed if found["label"] and found["label"] in retire else blocking).append(found)
    if blocking:
        lines = "; ".join(
            f"port {f['port']} is held by pid {f['pid']} ({f['args'][:160]})"
            + (f", {'launchd job' if is_macos() else 'systemd unit'} {f['label']}"
               if f["label"] else "")
            for f in blocking)
        labels = sorted({f["label"] for f in blocking if f["label"]})
        hint = (f"add {', '.join(repr(x) for x in labels)} to service_retire to stop and "
                "disable it, " if labels else "stop that process, ")
        raise RouteError(f"{host.name}: the route's ports are taken by something else: {lines}. "
                         f"Nothing was changed. To go on: {hint}or move the route with "
                         "server_port / proxy_port")
    return allowed


def _launchd_domains() -> list[tuple[str, bool]]:
    """(domain, needs sudo) where a retired label may be loaded."""
    uid = host.get_fact(launchctl.UserId, user=paths().user)
    return [("system", True), (f"gui/{uid}", False), (f"user/{uid}", False)]


@deploy("Retire the services data says the route replaces")
def retire_services():
    check_ports()
    q = shlex.quote
    for label in retire_targets():
        if is_macos():
            for domain, sudo in _launchd_domains():
                target = f"{domain}/{label}"
                if host.get_fact(launchctl.LaunchdPrint, target=target, _sudo=sudo):
                    server.shell(
                        name=f"Retire {target} (service_retire): bootout and disable",
                        commands=[f"launchctl bootout {q(target)} || true",
                                  f"launchctl disable {q(target)}"],
                        _sudo=sudo,
                    )
        elif host.get_fact(Directory, "/run/systemd/system"):
            unit = label if "." in label else f"{label}.service"
            if (host.get_fact(SystemdStatus).get(unit)
                    or host.get_fact(SystemdEnabled).get(unit)):
                server.shell(
                    name=f"Retire {unit} (service_retire): stop and disable",
                    commands=[f"systemctl disable --now {q(unit)}"],
                )
