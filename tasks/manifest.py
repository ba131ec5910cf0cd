"""route.json: what the host suite (tests/host) and the probes read about the
route as deployed, written on the host next to the route."""

from __future__ import annotations

import json
import posixpath
from io import StringIO

from pyinfra import host
from pyinfra.api import deploy

from tasks import as_user
from tasks.backends import select_backend
from tasks.common import RouteError, paths, profile
from tasks.host_facts import filevault
from tasks.service_spec import SERVER
from tasks.proxy_args import local_address
from tasks.proxy_key import client_key_path
from tasks.services import (host_cluster, public_name, proxy_key_file, remote_upstreams,
                            route_services, server_blas, served_profiles)
from tasks.workload import manifest_part as workload_manifest

SIZES = ("needle_tokens", "cache_tokens", "integers", "prose_words", "timeout_s")


def bench_sizes(prof: dict) -> dict:
    """The profile's `bench` sizes with the bench_* data keys on top."""
    sizes = dict(prof.get("bench") or {})
    for name in SIZES:
        value = host.data.get(f"bench_{name}")
        if value is not None:
            if not isinstance(value, (int, float)) or value <= 0:
                raise RouteError(f"{host.name}: bench_{name} must be a positive number, "
                                 f"got {value!r}")
            sizes[name] = value
    return sizes


MANIFEST = "route.json"


def cluster_part() -> dict | None:
    """A cluster host's part (tasks/cluster.py): the ranks, which run here, the
    backend and the sharding; None without cluster_ranks."""
    cluster = host_cluster()
    if cluster is None:
        return None
    local = cluster.local_ranks(host.name)
    return {"size": cluster.size, "backend": cluster.backend, "parallel": cluster.parallel,
            "ranks": [{"rank": r, "host": rank.host, "ip": rank.ip}
                      for r, rank in enumerate(cluster.ranks)],
            "local_ranks": local, "serves_http": 0 in local}


def host_part(cluster: dict | None, p, prof: dict, backend, services: dict) -> dict:
    """What every route.json says of its host, a rank-only cluster host's included:
    the model's files, the cluster part, and the services as the backend runs them."""
    return {
        "cluster": cluster,
        "profile": host.data.model_profile,
        "model_dir": p.model_dir,
        "shards": prof["shards"],
        "backend": backend.name,
        **backend.manifest_extras(),
        # who owns the route, and what its services run: how the host suite checks
        # them when it connects as another user (ownership, processes)
        "user": p.user,
        "service_definitions": {name: backend.definition_path(svc)
                                for name, svc in services.items()},
        # [command, regex]: the service runs when the command's output matches
        "service_running": {name: list(backend.running_check(svc))
                            for name, svc in services.items()},
        "services": {name: svc.label for name, svc in services.items()},
        # Linux: the BLAS the model servers preload (server_blas_library): the host
        # suite finds `mapped` in each one's /proc/<pid>/maps; mapped None: the
        # library is missing (the deploy warned) or not asked for, or macOS
        "server_blas": blas_manifest(backend, services),
        "venv": p.venv,
        "route_home": p.route_home,
        # macOS: `fdesetup status` at deploy time ({"on", "status"}); None elsewhere
        "filevault": filevault(),
    }


def manifest() -> dict:
    """What the host suite needs to know about the route, as deployed. A cluster host
    without rank 0 gets only its host part: its ranks, their services and files (no
    HTTP side: no proxy, no server port; the host suite checks what is here)."""
    cluster = cluster_part()
    p = paths()
    prof = profile()
    backend = select_backend()
    services = route_services()
    part = host_part(cluster, p, prof, backend, services)
    if cluster is not None and not cluster["serves_http"]:
        return part
    return {
        **part,
        "public_name": public_name(prof),
        "smoke": prof["smoke"],
        "gates": prof.get("gates", {}),
        "bench": bench_sizes(prof),
        "server": {"host": host.data.server_host, "port": host.data.server_port},
        # every profile this host serves (route_profiles), model_profile first: the
        # names the proxy answers to, its service and port, its smoke
        "served": [{"profile": s.profile, "public_name": s.public_name, "aliases": list(s.aliases),
                    "service": s.service, "port": s.port,
                    "smoke": host.data.model_profiles[s.profile]["smoke"]}
                   for s in served_profiles()],
        # other hosts' proxies the proxy spreads a model over (route_replicas)
        "replicas": {name: [url for url, _ in entries]
                     for name, entries in remote_upstreams(p, served_profiles()).items() if entries},
        "proxy": {
            "host": host.data.proxy_host,
            "port": host.data.proxy_port,
            # where the host itself reaches it (curl, probes): proxy_host unless that
            # is every address (then loopback)
            "address": local_address(str(host.data.proxy_host)),
            "key_file": proxy_key_file(p),
            # what a client connecting as the SSH user reads (tasks/proxy_key.py)
            "client_key_file": client_key_path(p),
        },
        # prints the server's pid (the probes' memory readings)
        "server_pid_command": (backend.watchdog_pid_command(services[SERVER])
                               if SERVER in services else None),
        # route_front_door_only: no model server here; the host suite checks the proxy only
        "front_door_only": SERVER not in services,
        # workload_enabled: tb-route, the runs, Hermes and its provider (tasks/workload.py)
        "workload": workload_manifest(),
    }


def blas_manifest(backend, services: dict) -> dict:
    library, real = server_blas()
    return {
        "library": library,
        "mapped": real,
        "pid_commands": {name: backend.watchdog_pid_command(svc)
                         for name, svc in services.items()
                         if real is not None and name.startswith(SERVER)},
    }


def manifest_path() -> str:
    return posixpath.join(paths().route_home, MANIFEST)


@deploy("Write the route manifest")
def write_manifest():
    as_user.put(
        name="Write route.json (what the host suite checks)",
        src=StringIO(json.dumps(manifest(), indent=2, sort_keys=True) + "\n"),
        dest=manifest_path(),
    )
