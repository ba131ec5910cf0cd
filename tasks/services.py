"""The route's two services, described once as data.

`route_services()` says everything about the server and the proxy (argv, env,
working directory, logs, limits, restart policy); the backends in
tasks/backends/ only render that description into their own format (a
supervisor program, a systemd unit, a launchd plist). Nothing about a service
is written twice.
"""

from __future__ import annotations

import json
import posixpath
import shlex
from dataclasses import dataclass, field
from io import StringIO

import jinja2
from pyinfra import host
from pyinfra.facts.files import FileContents
from pyinfra.operations import files

from tasks import as_user
from tasks.budget import prompt_cache_bytes
from tasks.common import REPO, RouteError, RoutePaths, fingerprint, paths, profile

SERVER = "server"
PROXY = "proxy"


@dataclass(frozen=True)
class Service:
    name: str  # short name: "server", "proxy"
    label: str  # backend-wide name: org.mlxroute.server
    description: str
    argv: list[str]
    env: dict[str, str]
    workdir: str
    stdout: str
    stderr: str
    nofile: int
    restart_delay: int
    # Each log rotated at this size (MB), this many rotated copies kept: the
    # total stays under (log_keep + 1) x log_max_mb per log.
    log_max_mb: int
    log_keep: int
    # launchd ProcessType Interactive: the server must not be throttled.
    interactive: bool = False
    after: list[str] = field(default_factory=list)  # labels it starts after


def server_argv(p: RoutePaths, prof: dict) -> list[str]:
    argv = [
        p.python, "-m", "mlx_lm.server",
        "--model", p.model_dir,
        "--host", host.data.server_host,
        "--port", str(host.data.server_port),
    ]
    if prof.get("trust_remote_code"):
        argv.append("--trust-remote-code")
    server_args = dict(prof.get("server_args", {}))
    cache_bytes = prompt_cache_bytes()
    if cache_bytes is not None:
        server_args["prompt-cache-bytes"] = cache_bytes
    for flag, value in server_args.items():
        if value is True:
            argv.append(f"--{flag}")
        elif value is not False and value is not None:
            argv += [f"--{flag}", str(value)]
    if host.data.get("server_serve_any_model"):
        argv.append("--serve-any-model")
    argv += [str(arg) for arg in host.data.get("server_extra_args") or []]
    return argv


def public_name(prof: dict) -> str:
    return host.data.get("proxy_public_name") or prof["public_name"]


def proxy_key_file(p: RoutePaths) -> str | None:
    return posixpath.join(p.route_home, "proxy.key") if host.data.get("proxy_api_key") else None


def proxy_argv(p: RoutePaths, prof: dict, server: Service | None = None) -> list[str]:
    from tasks.proxy_args import proxy_argv as build
    from tasks.proxy_artifact import ARTIFACT

    return build(p.python, p.script(ARTIFACT), proxy_key_file(p), host.data, public_name(prof),
                 maintenance_file(p), watchdog_commands(server) if server else None)


def watchdog_commands(server: Service) -> tuple[str, str] | None:
    """(restart, pid) shell commands the proxy's watchdog uses on the server,
    from the backend that keeps it alive; None when watchdog_enabled is off."""
    if not host.data.get("watchdog_enabled"):
        return None
    from tasks.backends import select_backend

    backend = select_backend()
    return backend.watchdog_restart_command(server), backend.watchdog_pid_command(server)


def sudoers_path() -> str:
    """The sudoers drop-in that lets the route user restart the server (the
    watchdog); sudo skips files whose name holds a dot."""
    return "/etc/sudoers.d/" + host.data.service_label_prefix.replace(".", "-") + "-watchdog"


def sudoers_rule(user: str, command: str) -> str:
    """One NOPASSWD rule for exactly `command` (an absolute path and its arguments)."""
    return ("# mlx-route: the proxy's watchdog restarts a stuck server (tasks/services.py)\n"
            f"{user} ALL=(root) NOPASSWD: {command}\n")


def maintenance_file(p: RoutePaths) -> str:
    """The note `routectl.py switch` writes while it restarts the server; the proxy shows it."""
    return posixpath.join(p.state_dir, "maintenance.json")


def base_env(p: RoutePaths) -> dict[str, str]:
    venv_bin = posixpath.join(p.venv, "bin")
    # Homebrew and Docker live outside launchd's minimal PATH (seed, section 8).
    path = ":".join([venv_bin, "/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin",
                     "/usr/sbin", "/sbin"])
    return {
        "HOME": p.home,
        "PATH": path,
        # mlx_lm.server's /v1/models fails with an empty body when the HF
        # cache folder does not exist (docs/field-report.md); keep it inside route_home.
        "HF_HUB_CACHE": posixpath.join(p.route_home, "hf-cache"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def route_services() -> dict[str, Service]:
    p = paths()
    prof = profile()
    label = host.data.service_label_prefix
    if int(host.data.service_log_max_mb) < 1 or int(host.data.service_log_keep) < 1:
        raise RouteError(
            f"{host.name}: service_log_max_mb {host.data.service_log_max_mb} and "
            f"service_log_keep {host.data.service_log_keep} must both be at least 1"
        )
    common = dict(
        env=base_env(p),
        workdir=p.home,
        nofile=int(host.data.service_nofile),
        restart_delay=int(host.data.service_restart_delay_s),
        log_max_mb=int(host.data.service_log_max_mb),
        log_keep=int(host.data.service_log_keep),
    )
    server = Service(
        name=SERVER,
        label=f"{label}.{SERVER}",
        description=f"mlx_lm.server serving {host.data.model_profile}",
        argv=server_argv(p, prof),
        stdout=posixpath.join(p.logs_dir, "server.out.log"),
        stderr=posixpath.join(p.logs_dir, "server.err.log"),
        interactive=True,
        **common,
    )
    return {
        SERVER: server,
        PROXY: Service(
            name=PROXY,
            label=f"{label}.{PROXY}",
            description=f"OpenAI-compatible proxy in front of {host.data.model_profile}",
            argv=proxy_argv(p, prof, server),
            stdout=posixpath.join(p.logs_dir, "proxy.out.log"),
            stderr=posixpath.join(p.logs_dir, "proxy.err.log"),
            after=[f"{label}.{SERVER}"],
            **common,
        ),
    }


def _systemd_quote(arg: str) -> str:
    if arg and all(c.isalnum() or c in "-_./:=@+," for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(REPO / "templates"),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,
)
TEMPLATES.filters["supervisor_quote"] = lambda arg: shlex.quote(arg).replace("%", "%%")
TEMPLATES.filters["systemd_quote"] = _systemd_quote
TEMPLATES.filters["tojson"] = json.dumps


def render(template: str, **context) -> str:
    """Render one of templates/ with the route's Jinja environment."""
    return TEMPLATES.get_template(template).render(**context)


def stamp_path(svc: Service) -> str:
    return posixpath.join(paths().state_dir, f"{svc.name}.applied")


def deploy_service(backend, svc: Service, code: list[bytes | str], after_restart=None,
                   force: bool = False) -> bool:
    """Put the service's definition in place and (re)start it only when needed.

    A restart is needed when the rendered definition or the service's code
    (`code`: lock file, patches, scripts) differs from what was last started
    successfully (a stamp on the host), or when the service is not running.
    The stamp is written only after the service answered, so a failed run is
    retried by the next one instead of being forgotten. Returns whether a
    restart was planned.
    """
    text = backend.render(svc)
    desired = fingerprint(backend.name, text, *code)
    applied = host.get_fact(FileContents, stamp_path(svc))
    needed = force or applied != [desired] or not backend.is_running(svc)
    backend.install(svc, text)
    if needed:
        backend.restart(svc)
        if after_restart:
            after_restart()
    record_started(svc, desired)
    return needed


def record_started(svc: Service, desired: str) -> None:
    """The stamp of what answered; written only after it did (a failed run retries)."""
    as_user.put(
        name=f"Record the {svc.name} as started ({desired})",
        src=StringIO(desired + "\n"),
        dest=stamp_path(svc),
    )
