"""What a service is, as data: the `Service` the backends render.

Nothing here reads host data; tasks/services.py builds the route's two
services from it, the backends (tasks/backends/) turn one into a supervisor
program, a systemd unit or a launchd plist.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SERVER = "server"
PROXY = "proxy"


def model_servers(services: dict) -> list:
    """The services that are model servers behind the proxy (each with its port):
    `server` and, with route_profiles, `server-<profile>`; the watchdog restarts them."""
    return [svc for svc in services.values() if svc.port is not None]


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
    stop_timeout_s: int  # after SIGTERM, before SIGKILL
    # Each log rotated at this size (MB), this many rotated copies kept: the
    # total stays under (log_keep + 1) x log_max_mb per log.
    log_max_mb: int
    log_keep: int
    # launchd ProcessType Interactive: the server must not be throttled.
    interactive: bool = False
    after: list[str] = field(default_factory=list)  # labels it starts after
    # a model server behind the proxy: its TCP port (launchd finds its pid by it; the
    # watchdog's sudoers rule covers it); None: the proxy, a cluster's rank above 0
    port: int | None = None


# the variables blas_env() sets (the smoke generation takes them from the server's env)
BLAS_KEYS = ("LD_PRELOAD", "OPENBLAS_NUM_THREADS")


def blas_env(library: str | None, threads: int | None) -> dict[str, str]:
    """The environment that makes an MLX process on Linux use `library` as its BLAS
    (server_blas_library, server_blas_threads): the mlx-cpu wheel's bundled
    reference BLAS is ~40x slower at matrix products (docs/linux.md). {} for None.
    The deploy (tasks/services.py) and the tests' servers both build it here."""
    if library is None:
        return {}
    env = {"LD_PRELOAD": library}
    if threads is not None:
        env["OPENBLAS_NUM_THREADS"] = str(int(threads))
    return env
