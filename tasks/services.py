"""The route's services (a server per served profile, the proxy), described once as data.

`route_services()` says everything about the server and the proxy (argv, env,
working directory, logs, limits, restart policy); the backends in
tasks/backends/ only render that description into their own format (a
supervisor program, a systemd unit, a launchd plist). Nothing about a service
is written twice. What a `Service` holds: tasks/service_spec.py.
"""

from __future__ import annotations

import json
import posixpath

from pyinfra import host, logger

from tasks.backends import select_backend
from tasks.budget import prompt_cache_bytes
from tasks.cluster import Cluster, ClusterError, check_hosts, parse, rank_services
from tasks.common import RouteError, RoutePaths, is_macos, paths, profile, _resolve
from tasks.host_facts import ReadableFile
from tasks.profiles import Served, served
from tasks.proxy_args import proxy_argv
from tasks.proxy_artifact import ARTIFACT
from tasks.proxy_key import key_path
from tasks.replicas import host_replicas
from tasks.service_spec import PROXY, SERVER, Service, blas_env

BLAS_FIX = "apt-get install libopenblas0-pthread"
_blas_warned: set[str] = set()


def server_flags(server_args: dict) -> list[str]:
    """mlx_lm.server flags from a profile's server_args ({"max-tokens": 256}):
    True is the bare flag, False and None leave it out."""
    argv = []
    for flag, value in server_args.items():
        if value is True:
            argv.append(f"--{flag}")
        elif value is not False and value is not None:
            argv += [f"--{flag}", str(value)]
    return argv


def model_dir(p: RoutePaths, served_profile: Served) -> str:
    """Where a served profile's weights are: model_profile's as paths() says,
    every other one in model_root/<profile>."""
    if served_profile.primary:
        return p.model_dir
    return posixpath.join(_resolve(p.home, host.data.model_root), served_profile.profile)


def served_profiles() -> list[Served]:
    """This host's profiles (route_profiles), model_profile first (tasks/profiles.py)."""
    return served(host.data, host.name)


def server_argv(p: RoutePaths, prof: dict, which: Served | None = None) -> list[str]:
    """mlx_lm.server's argv for a served profile (None: model_profile)."""
    which = which or served_profiles()[0]
    argv = [
        p.python, "-m", "mlx_lm.server",
        "--model", model_dir(p, which),
        "--host", host.data.server_host,
        "--port", str(which.port),
    ]
    if prof.get("trust_remote_code"):
        argv.append("--trust-remote-code")
    server_args = dict(prof.get("server_args", {}))
    cache_bytes = prompt_cache_bytes(None if which.primary else which.profile)
    if cache_bytes is not None:
        server_args["prompt-cache-bytes"] = cache_bytes
    argv += server_flags(server_args)
    if host.data.get("server_serve_any_model"):
        argv.append("--serve-any-model")
    argv += [str(arg) for arg in host.data.get("server_extra_args") or []]
    return argv


def public_name(prof: dict) -> str:
    return host.data.get("proxy_public_name") or prof["public_name"]


def proxy_key_file(p: RoutePaths) -> str | None:
    """The key file the proxy is started with; None: no key is required."""
    return key_path(p) if host.data.get("proxy_api_key") else None


def front_door_only() -> bool:
    """This host runs only the proxy, in front of other hosts' (route_front_door_only)."""
    return bool(host.data.get("route_front_door_only"))


def remote_upstreams(p: RoutePaths, profiles: list[Served]) -> dict[str, list]:
    """{public name: [(URL, key file on this host or None)]}: other hosts' proxies
    serving each profile (route_replicas: by URL, then by inventory host)."""
    out = {which.public_name: [(url, _resolve(p.home, key) if key else None)
                               for url, key in which.replicas] for which in profiles}
    for name, _, url, key_file in host_replicas(profiles):  # {"host": ...} (tasks/replicas.py)
        out[name].append((url, key_file))
    return out


def proxy_service_argv(p: RoutePaths, prof: dict, server: Service | None = None,
                       servers: dict[str, Service] | None = None) -> list[str]:
    """The proxy's argv for this host (tasks/proxy_args.py builds it from data):
    model_profile's server as its upstream, every other served profile as a
    --route, the aliases as --alias (tasks/profiles.py), other hosts' servers of
    a profile as --replica. A front door only has no server: each profile's first
    other host is its upstream, the rest its replicas."""
    profiles = served_profiles()
    remote = remote_upstreams(p, profiles)
    front = front_door_only()

    def upstream(which: Served) -> str:
        if front:
            return remote[which.public_name][0][0]
        return f"http://{host.data.server_host}:{which.port}"

    argv = proxy_argv(p.python, p.script(ARTIFACT), proxy_key_file(p), host.data,
                      public_name(prof), maintenance_file(p),
                      watchdog_commands(server) if server else None, upstream(profiles[0]))
    for which in profiles[1:]:
        route = {"name": which.public_name, "upstream": upstream(which)}
        commands = watchdog_commands(servers[which.service]) if servers else None
        if commands:
            route.update(restart_command=commands[0], server_pid_command=commands[1])
        argv += ["--route", json.dumps(route, sort_keys=True)]
    names = {which.profile: which.public_name for which in profiles}
    for which in profiles:
        for alias in which.aliases:
            argv += ["--alias", f"{alias}={names[which.profile]}"]
    for name, entries in remote.items():
        for index, (url, key_file) in enumerate(entries):
            if index or not front:
                argv += ["--replica", f"{name}={url}"]
            if key_file:
                argv += ["--upstream-key-file", f"{url}={key_file}"]
    return argv


def watchdog_commands(server: Service) -> tuple[str, str] | None:
    """(restart, pid) shell commands the proxy's watchdog uses on the server,
    from the backend that keeps it alive; None when watchdog_enabled is off."""
    if not host.data.get("watchdog_enabled"):
        return None
    backend = select_backend()
    return backend.watchdog_restart_command(server), backend.watchdog_pid_command(server)


def maintenance_file(p: RoutePaths) -> str:
    """The note `routectl.py switch` writes while it restarts the server; the proxy shows it."""
    return posixpath.join(p.state_dir, "maintenance.json")


def base_env(p: RoutePaths) -> dict[str, str]:
    venv_bin = posixpath.join(p.venv, "bin")
    # Homebrew and Docker live outside launchd's minimal PATH (docs/field-report.md,
    # "What went wrong").
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


def server_blas() -> tuple[str | None, str | None]:
    """(library asked by server_blas_library, its real path when the model servers
    preload it). Linux only: on macOS MLX runs on Metal/Accelerate, nothing is
    preloaded. A library missing on the host is a warning naming the fix, and the
    servers keep the mlx wheel's own BLAS (docs/linux.md)."""
    library = host.data.server_blas_library
    threads = host.data.server_blas_threads
    if library is not None and (not isinstance(library, str) or not library.startswith("/")):
        raise RouteError(f"{host.name}: server_blas_library {library!r} must be an absolute "
                         "path (e.g. /usr/lib/x86_64-linux-gnu/openblas-pthread/"
                         "libopenblas.so.0) or None (the mlx wheel's own BLAS)")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise RouteError(f"{host.name}: server_blas_threads {threads!r} must be a positive "
                         "integer or None (OpenBLAS's default: one thread per core)")
    if library is None or is_macos():
        return library, None
    real = host.get_fact(ReadableFile, library)
    if real is None and host.name not in _blas_warned:
        _blas_warned.add(host.name)
        logger.warning(
            f"{host.name}: server_blas_library {library} is not on this host, so "
            "mlx_lm.server keeps the mlx wheel's bundled reference BLAS (prefill ~10x "
            f"slower on CPU). Fix: `{BLAS_FIX}` on the host and deploy again (or set "
            "server_blas_library = None to keep the wheel's BLAS without this warning)"
        )
    return library, real


def server_env(p: RoutePaths) -> dict[str, str]:
    """A model server's environment: base_env plus, on Linux, its BLAS (server_blas)."""
    library, real = server_blas()
    env = base_env(p)
    if real is not None:
        env.update(blas_env(library, host.data.server_blas_threads))
    return env


def host_cluster() -> Cluster | None:
    """This host's cluster (cluster_* data), checked against the inventory; None:
    a single server."""
    try:
        cluster = parse(host.data, host.name)
        if cluster is not None:
            check_hosts(cluster, host.name, [h.name for h in host.inventory])
        return cluster
    except ClusterError as exc:
        raise RouteError(str(exc)) from None


def cluster_dir(p: RoutePaths) -> str:
    """Where the cluster's hostfiles live on each of its hosts."""
    return posixpath.join(p.route_home, "cluster")


def serves_http() -> bool:
    """This host runs the HTTP side (rank 0, or no cluster): the proxy, route.json, the suite."""
    cluster = host_cluster()
    return cluster is None or 0 in cluster.local_ranks(host.name)


def route_services() -> dict[str, Service]:
    """The server and the proxy; on a cluster host, its ranks' servers (rank 0
    is `server`) and the proxy only where rank 0 runs (tasks/cluster.py)."""
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
        stop_timeout_s=int(host.data.service_stop_timeout_s),
        log_max_mb=int(host.data.service_log_max_mb),
        log_keep=int(host.data.service_log_keep),
    )
    servers = dict(common, env=server_env(p))
    profiles = served_profiles()
    if front_door_only():  # the proxy alone, in front of other hosts (no server, no watchdog)
        return {PROXY: Service(
            name=PROXY,
            label=f"{label}.{PROXY}",
            description="OpenAI-compatible front door for "
                        + ", ".join(which.profile for which in profiles) + " on other hosts",
            argv=proxy_service_argv(p, prof),
            stdout=posixpath.join(p.logs_dir, "proxy.out.log"),
            stderr=posixpath.join(p.logs_dir, "proxy.err.log"),
            **common,
        )}
    server = Service(
        name=SERVER,
        label=f"{label}.{SERVER}",
        description=f"mlx_lm.server serving {host.data.model_profile}",
        argv=server_argv(p, prof),
        stdout=posixpath.join(p.logs_dir, "server.out.log"),
        stderr=posixpath.join(p.logs_dir, "server.err.log"),
        interactive=True,
        port=int(host.data.server_port),
        **servers,
    )
    extra = {}
    for which in profiles[1:]:
        extra[which.service] = Service(
            name=which.service,
            label=f"{label}.{which.service}",
            description=f"mlx_lm.server serving {which.profile}",
            argv=server_argv(p, host.data.model_profiles[which.profile], which),
            stdout=posixpath.join(p.logs_dir, f"{which.service}.out.log"),
            stderr=posixpath.join(p.logs_dir, f"{which.service}.err.log"),
            interactive=True,
            port=which.port,
            **servers,
        )
    cluster = host_cluster()
    if cluster is not None and extra:
        raise RouteError(f"{host.name}: route_profiles serves {len(profiles)} profiles, but "
                         "this host is in a cluster (cluster_ranks): a cluster serves one "
                         "model; set route_profiles = None there")
    if cluster is not None:
        ranks = rank_services(cluster, server, host.name, cluster_dir(p), label, p.logs_dir)
        if SERVER not in ranks:
            return ranks
        server = ranks[SERVER]
        others = {name: svc for name, svc in ranks.items() if name != SERVER}
    else:
        others = extra
    return {
        SERVER: server,
        **others,
        PROXY: Service(
            name=PROXY,
            label=f"{label}.{PROXY}",
            description="OpenAI-compatible proxy in front of "
                        + ", ".join(which.profile for which in profiles),
            argv=proxy_service_argv(p, prof, server, extra),
            stdout=posixpath.join(p.logs_dir, "proxy.out.log"),
            stderr=posixpath.join(p.logs_dir, "proxy.err.log"),
            after=[f"{label}.{SERVER}", *(svc.label for svc in extra.values())],
            **common,
        ),
    }
