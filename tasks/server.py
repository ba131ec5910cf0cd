"""mlx_lm.server on loopback, moved from release to release with rollback.

A restart is needed when the server's rendered definition, its release
(tasks/release.py) or the profile differ from what last answered (a stamp on
the host), or when it is not running. Then one host-side command,
`routectl.py switch`, does the whole move so that no failure can leave it half
done: the smoke generation (the server's own template arguments), pointing
`current` at the release, the start and the readiness wait, and on any
failure the previous release and definition back and started. The memory
budget (tasks/budget.py) picks the order: beside the running server when a
second copy of the model fits ("overlap"), else the server is stopped first
("stop-first") while the proxy answers 503 + Retry-After.
"""

from __future__ import annotations

import json
import posixpath
import shlex
from io import StringIO

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import FileContents
from pyinfra.operations import files, server

from tasks import as_user
from tasks.as_user import as_root
from tasks.backends import select_backend
from tasks.budget import memory_budget, restart_strategy
from tasks.cluster import ClusterError, check_model
from tasks.common import RouteError, fingerprint, paths, profile, repo_file
from tasks.release import release_state, wanted_release
from tasks.restarts import record_started, stamp_path
from tasks.service_spec import BLAS_KEYS, SERVER
from tasks.profiles import Served
from tasks.services import (cluster_dir, host_cluster, maintenance_file, model_dir,
                            route_services, served_profiles)

def flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


def smoke_spec(argv: list[str], prof: dict, model_dir: str, env: dict | None = None) -> dict:
    """The smoke generation, prompted as the server will prompt the model; `env`: the
    server's environment, of which the smoke takes the BLAS (tasks/services.server_blas)."""
    smoke = prof["smoke"]
    missing = [key for key in ("messages", "expect", "max_tokens") if key not in smoke]
    if missing:
        raise RouteError(f"{host.name}: model profile {host.data.model_profile!r}: its smoke has "
                         f"no {', '.join(missing)}; add them (README, model_*: the profile fields)")
    return {
        "model": model_dir,
        "messages": smoke["messages"],
        "expect": smoke["expect"],
        "max_tokens": int(smoke["max_tokens"]),
        "trust_remote_code": "--trust-remote-code" in argv,
        "chat_template_args": flag_value(argv, "--chat-template-args"),
        **({"env": blas} if (blas := {k: v for k, v in (env or {}).items()
                                      if k in BLAS_KEYS}) else {}),
    }


def switch_command(backend, svc, release: str, strategy: str, staged: str | None,
                   protect: list[str], python: str | None = None, ranks: list | None = None,
                   which: Served | None = None) -> str:
    """`routectl.py switch` to `release` (an id, or "previous" for a rollback).
    `ranks`: a cluster's other ranks on this host, stopped and started with the
    server (rank 0); a cluster has no smoke (no host holds the whole model).
    `which`: the served profile (route_profiles) of `svc`; None: model_profile."""
    p = paths()
    which = which or served_profiles()[0]
    prof = host.data.model_profiles[which.profile]
    q = shlex.quote
    group = [*(ranks or []), svc]
    smoke = (None if host_cluster() is not None
             else smoke_spec(svc.argv, prof, model_dir(p, which), svc.env))
    argv = [
        python or p.release_dir(release) + "/bin/python", p.script("routectl.py"), "switch",
        "--root", p.venv_root, "--release", release, "--strategy", strategy,
        "--stop", " ; ".join(backend.stop_command(s) for s in group),
        "--start", " && ".join(f"{{ {backend.start_command(s)} ; }}" for s in group)
        if ranks else backend.start_command(svc),
        "--smoke", json.dumps(smoke, sort_keys=True),
        "--smoke-timeout", str(int(prof["ready_timeout_s"])),
        "--url", f"http://{host.data.server_host}:{which.port}",
        "--timeout", str(int(prof["ready_timeout_s"])),
        "--keep", str(int(host.data.venv_releases_keep)),
        "--maintenance", maintenance_file(p),
        "--stop-timeout", str(int(host.data.service_stop_timeout_s)),
    ]
    if staged:
        argv += ["--definition", backend.definition_path(svc), "--staged", staged]
    for record in protect:
        argv += ["--protect", record]
    if backend.sudo:
        argv += ["--run-as", p.user]
    return " ".join(q(a) for a in argv)


def protected_releases() -> list[str]:
    """Files naming releases still in use by other processes (never pruned)."""
    state = paths().state_dir
    return [posixpath.join(state, name) for name in ("proxy.release", "supervisord.release")]


def cluster_ranks(services: dict) -> list:
    """This host's server services of a cluster's ranks other than rank 0."""
    return [svc for name, svc in services.items() if name.startswith(f"{SERVER}-rank")]


def put_cluster_files(p) -> str:
    """The cluster's hostfiles on this host (same bytes on every rank's host);
    their fingerprint, a part of every rank's definition. Refuses a model
    whose config.json cannot be split across the ranks as data asks."""
    cluster = host_cluster()
    config = host.get_fact(FileContents, posixpath.join(p.model_dir, "config.json"))
    if config:
        try:
            check_model(cluster, json.loads("\n".join(config)), host.name)
        except (ClusterError, ValueError) as exc:
            raise RouteError(str(exc)) from None
    files.directory(name="Create the cluster directory", path=cluster_dir(p), present=True)
    for name, text in sorted(cluster.files().items()):
        as_user.put(name=f"Write the cluster's {name}", src=StringIO(text),
                    dest=posixpath.join(cluster_dir(p), name))
    return fingerprint(*[f"{n}\n{t}" for n, t in sorted(cluster.files().items())])


@deploy("Start mlx_lm.server")
def start_server():
    p = paths()
    prof = profile()
    backend = select_backend()
    services = route_services()
    release = wanted_release()
    budget = memory_budget()
    strategy = restart_strategy(budget)
    cluster = host_cluster()
    ranks = cluster_ranks(services)
    if SERVER not in services:  # a cluster host without rank 0
        start_ranks(p, prof, backend, services, release)
    else:
        extra, rank_texts = prepare_server(p, backend, services, cluster, ranks)
    if cluster is not None:
        cluster_barrier(p)  # one line for every host of the cluster: see there
    if SERVER not in services:
        return
    profiles = served_profiles()
    current = release_state(release).get("current")
    switch_server(p, backend, services[SERVER], prof, release, strategy, current,
                  [*extra, *rank_texts], ranks, profiles[0])
    for which in profiles[1:]:  # the other profiles this host serves (route_profiles)
        switch_server(p, backend, services[which.service], host.data.model_profiles[which.profile],
                      release, restart_strategy(budget, which.profile), current, [], [], which)


def prepare_server(p, backend, services, cluster, ranks) -> tuple[list, list]:
    """routectl.py, the folders, the backend's files, a cluster's hostfiles and
    this host's other ranks' definitions; (the hostfiles' fingerprint, the
    ranks' definitions): parts of the server's own."""
    as_user.put(name="Upload routectl.py", src=str(repo_file("files/routectl.py")),
                dest=p.script("routectl.py"))
    files.directory(name="Create the log directory", path=p.logs_dir, present=True)
    files.directory(name="Create the HF cache directory", path=services[SERVER].env["HF_HUB_CACHE"],
                    present=True)
    files.directory(name="Create the state directory", path=p.state_dir, present=True)
    backend.prepare(services)
    extra = [put_cluster_files(p)] if cluster is not None else []
    rank_texts = [backend.render(r) for r in ranks]
    for rank, rank_text in zip(ranks, rank_texts):
        backend.install(rank, rank_text)  # started by the switch, with rank 0
    return extra, rank_texts


def switch_server(p, backend, svc, prof, release, strategy, current, extra, ranks,
                  which: Served) -> None:
    """One server (model_profile's, or another served profile's) to the release and its
    definition, through `routectl.py switch`, unless it already runs them."""
    text = backend.render(svc)
    desired = fingerprint(backend.name, text, release.id, json.dumps(prof, sort_keys=True),
                          *extra)
    applied = host.get_fact(FileContents, stamp_path(svc))
    definition = host.get_fact(FileContents, backend.definition_path(svc))
    if (applied == [desired] and current == release.id and backend.is_running(svc)
            and all(backend.is_running(r) for r in ranks)):
        backend.install(svc, text)  # no change: keeps the definition as it is
        return

    staged = None
    if definition is None or "\n".join(definition) != text.rstrip("\n"):
        staged = posixpath.join(p.state_dir, f"{svc.name}.definition.next")
        as_user.put(name=f"Stage the new {svc.name} definition", src=StringIO(text), dest=staged)
    what = (f"release {release.id}" if current != release.id
            else f"release {release.id} (same release: new definition or not running)")
    who = "the server" if which.primary else f"the {which.profile} server"
    server.shell(
        name=f"Switch {who} to {what}, {strategy}"
             + (f" (from {current}; rollback on failure)" if current else ""),
        commands=[switch_command(backend, svc, release.id, strategy, staged,
                                 protected_releases(), ranks=ranks, which=which)],
        **as_root(backend.sudo),
    )
    record_started(svc, desired)


def ranks_switch_command(backend, ranks: list, release: str, timeout: int,
                         protect: list[str]) -> str:
    """`routectl.py switch` of a cluster host without rank 0: its ranks stopped,
    `current` moved, started, the release recorded and old ones pruned, as on
    rank 0's host. No smoke and no readiness wait here (no host holds the whole
    model, and these ranks serve no HTTP): rank 0's switch on its host waits for
    a generation through every rank, so the group's check is that one. A rank
    that does not start puts the previous release back here."""
    p = paths()
    q = shlex.quote
    argv = [
        p.release_dir(release) + "/bin/python", p.script("routectl.py"), "switch",
        "--root", p.venv_root, "--release", release, "--strategy", "stop-first",
        "--stop", " ; ".join(backend.stop_command(s) for s in ranks),
        "--start", " && ".join(f"{{ {backend.start_command(s)} ; }}" for s in ranks),
        "--smoke", "null", "--timeout", str(timeout),
        "--keep", str(int(host.data.venv_releases_keep)),
    ]
    for record in protect:
        argv += ["--protect", record]
    if backend.sudo:
        argv += ["--run-as", p.user]
    return " ".join(q(a) for a in argv)


def cluster_barrier(p) -> None:
    """One operation every host of a cluster runs from this same line, so pyinfra
    (which orders each host's operations and runs one operation on all hosts
    before the next) runs it only after the rank-only hosts switched their ranks
    and before rank 0's switch, whose readiness wait needs every rank up: a
    rank-only host has more operations before it (its uploads through sudo), so
    without this rank 0 would wait for ranks not started yet. Changes nothing."""
    files.directory(name="The cluster's directory (rank 0 starts after the other hosts' ranks)",
                    path=cluster_dir(p), present=True)


def start_ranks(p, prof, backend, services, release) -> None:
    """A cluster host without rank 0: its ranks' services, switched to the release
    together (routectl.py switch: `current` moved, old releases pruned, the
    previous release back if a rank does not start) when their definition, the
    release, the profile or the hostfiles changed, or one of them is not running.
    Rank 0's host holds the HTTP side; these ranks join its group when they start."""
    as_user.put(name="Upload routectl.py", src=str(repo_file("files/routectl.py")),
                dest=p.script("routectl.py"))
    files.directory(name="Create the log directory", path=p.logs_dir, present=True)
    files.directory(name="Create the HF cache directory",
                    path=next(iter(services.values())).env["HF_HUB_CACHE"], present=True)
    files.directory(name="Create the state directory", path=p.state_dir, present=True)
    backend.prepare(services)
    hostfiles = put_cluster_files(p)
    current = release_state(release).get("current")
    ranks = list(services.values())
    desired = {}
    for svc in ranks:
        text = backend.render(svc)
        desired[svc.name] = fingerprint(backend.name, text, release.id,
                                        json.dumps(prof, sort_keys=True), hostfiles)
        backend.install(svc, text)  # started (or restarted) by the switch below
    if current == release.id and all(
            host.get_fact(FileContents, stamp_path(svc)) == [desired[svc.name]]
            and backend.is_running(svc) for svc in ranks):
        return
    server.shell(
        name=f"Switch the cluster ranks {', '.join(s.name for s in ranks)} to release "
             f"{release.id}" + (f" (from {current})" if current else ""),
        commands=[ranks_switch_command(backend, ranks, release.id, int(prof["ready_timeout_s"]),
                                       protected_releases())],
        **as_root(backend.sudo),
    )
    for svc in ranks:
        record_started(svc, desired[svc.name])


@deploy("Roll the server back to the previous release")
def roll_back_server():
    """By hand (rollback.py): the release before `current`, with the same
    strategy and checks as a deploy; the next deploy moves to what data asks."""
    p = paths()
    backend = select_backend()
    svc = route_services()[SERVER]
    strategy = restart_strategy(memory_budget())
    as_user.put(name="Upload routectl.py", src=str(repo_file("files/routectl.py")),
              dest=p.script("routectl.py"))
    server.shell(
        name=f"Switch the server back to the previous release ({strategy})",
        commands=[switch_command(backend, svc, "previous", strategy, None, protected_releases(),
                                 python=p.python)],
        **as_root(backend.sudo),
    )
