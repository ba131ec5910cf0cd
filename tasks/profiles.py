"""The profiles a host serves (route_profiles) and the names clients may use for
them (route_aliases), as data; each profile its own mlx_lm.server on its own port.

    route_profiles = {"glm-5.2-mxfp4": 8025, "qwen3-30b": 8012}
    route_aliases = {"openai/glm52": "glm-5.2-mxfp4", "qwen": "qwen3-30b"}

model_profile is the host's first profile: the `server` service on server_port,
what the smoke, the host suite's gates and the probes check. Every other
profile is a service `server-<profile>` on its port, its weights in
model_root/<profile>. The proxy routes a request by the name it sends (a
profile's public_name or an alias); with one profile any name goes to it.

Nothing here touches the host: `served()` is a pure function of the data, so
the deploy, the budget and the unit tests read the same list.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

from tasks.common import RouteError
from tasks.service_spec import SERVER

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a profile key, usable in a service label


@dataclass(frozen=True)
class Served:
    profile: str  # key of model_profiles
    port: int | None  # its mlx_lm.server's port (None: on a front door only, no server here)
    service: str  # "server" (model_profile) or "server-<profile>" ("" on a front door only)
    public_name: str  # the name replies carry when a client sends none
    aliases: tuple[str, ...]  # more names clients may send for it
    # other servers of this profile the proxy spreads its requests over (route_replicas):
    # (URL, key file on this host or None)
    replicas: tuple[tuple[str, str | None], ...] = ()
    # other inventory hosts serving it ({"host": name} entries): the deploy finds
    # their proxy's URL and copies their key here (tasks/replicas.py)
    replica_hosts: tuple[str, ...] = ()

    @property
    def primary(self) -> bool:
        return self.service == SERVER


def _port(who: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise RouteError(f"{who}: route_profiles[{name!r}] must be a TCP port (1-65535), got "
                         f"{value!r}; e.g. route_profiles = {{{name!r}: 8027}}")
    return value


def served(data, who: str) -> list[Served]:
    """The profiles `data` (host.data, or any mapping with .get) serves, model_profile
    first; refuses, with what to fix, a set that cannot be served side by side."""
    profiles = data.get("model_profiles") or {}
    primary = data.get("model_profile")
    table = data.get("route_profiles")
    if table is None:
        table = {primary: data.get("server_port")}
    if not isinstance(table, dict) or not table:
        raise RouteError(f"{who}: route_profiles must be None or a dict {{profile: server "
                         f"port}}, got {table!r}")
    if primary not in table:
        raise RouteError(f"{who}: route_profiles {sorted(table)} does not hold model_profile "
                         f"{primary!r}: the host's first profile is model_profile (the one its "
                         "gates check); add it, on server_port")
    if table[primary] != data.get("server_port"):
        raise RouteError(f"{who}: route_profiles[{primary!r}] is {table[primary]!r} but "
                         f"server_port is {data.get('server_port')!r}: model_profile is served "
                         "on server_port; make them equal")
    if data.get("route_front_door_only"):
        return _front_door(data, who, profiles, primary)
    public = data.get("proxy_public_name")
    out, ports = [], {}
    for name in [primary, *sorted(n for n in table if n != primary)]:
        if name not in profiles:
            raise RouteError(f"{who}: route_profiles names {name!r}, which is not in "
                             f"model_profiles (known: {', '.join(sorted(profiles))})")
        if not isinstance(name, str) or not NAME.match(name):
            raise RouteError(f"{who}: profile name {name!r} cannot name a service: letters, "
                             "digits, '.', '_', '-' only")
        port = _port(who, name, table[name])
        if port in ports or port == data.get("proxy_port"):
            other = ports.get(port, "proxy_port")
            raise RouteError(f"{who}: route_profiles gives port {port} to {name!r} and to "
                             f"{other!r}: each server needs its own port")
        ports[port] = name
        prof = profiles[name]
        out.append(Served(
            profile=name, port=port,
            service=SERVER if name == primary else f"{SERVER}-{name}",
            public_name=(public if name == primary and public else prof["public_name"]),
            aliases=()))
    return _with_replicas(_with_aliases(out, data.get("route_aliases"), who),
                          data.get("route_replicas"), who)


def _front_door(data, who: str, profiles: dict, primary: str) -> list[Served]:
    """route_front_door_only: the profiles of route_replicas, each served by its
    replicas only (no server on this host), model_profile first."""
    if data.get("route_profiles") is not None:
        raise RouteError(f"{who}: route_front_door_only runs no model server here, but "
                         "route_profiles is set; set route_profiles = None and list the "
                         "profiles and their hosts in route_replicas")
    replicas = data.get("route_replicas")
    if not isinstance(replicas, dict) or primary not in replicas:
        raise RouteError(f"{who}: route_front_door_only needs route_replicas to list "
                         f"model_profile {primary!r} (the proxy's first model) with the hosts "
                         f"that serve it, e.g. {{{primary!r}: [{{\"host\": \"studio1.local\"}}, "
                         f"{{\"host\": \"studio2.local\"}}]}}")
    public = data.get("proxy_public_name")
    out = []
    for name in [primary, *(n for n in replicas if n != primary)]:
        if name not in profiles:
            raise RouteError(f"{who}: route_replicas names {name!r}, which is not in "
                             f"model_profiles (known: {', '.join(sorted(profiles))})")
        if not replicas[name]:
            raise RouteError(f"{who}: route_replicas[{name!r}] is empty: a front door only "
                             "needs at least one host serving it")
        out.append(Served(profile=name, port=None, service="",
                          public_name=(public if name == primary and public
                                       else profiles[name]["public_name"]), aliases=()))
    return _with_replicas(_with_aliases(out, data.get("route_aliases"), who), replicas, who)


def _with_replicas(out: list[Served], replicas, who: str) -> list[Served]:
    if replicas is None:
        replicas = {}
    example = ('e.g. {"glm-5.2-mxfp4": [{"url": "http://studio2.local:8026", '
               '"key_file": "~/.config/mlx-route/studio2.key"}]} or, for a host of '
               'this inventory, {"glm-5.2-mxfp4": [{"host": "studio2.local"}]}')
    if not isinstance(replicas, dict):
        raise RouteError(f"{who}: route_replicas must be a dict {{profile: [replica, ...]}}, "
                         f"{example}; got {replicas!r}")
    by_profile = {s.profile: s for s in out}
    found: dict[str, list] = {}
    hosts: dict[str, list] = {}
    for name, entries in replicas.items():
        if name not in by_profile:
            raise RouteError(f"{who}: route_replicas names {name!r}, which this host does not "
                             f"serve (route_profiles: {sorted(by_profile)})")
        if not isinstance(entries, list):
            raise RouteError(f"{who}: route_replicas[{name!r}] must be a list, {example}")
        for entry in entries:
            if isinstance(entry, dict) and set(entry) == {"host"}:
                if not isinstance(entry["host"], str) or not entry["host"] or entry["host"] == who:
                    raise RouteError(f"{who}: route_replicas[{name!r}] entry {entry!r}: \"host\" "
                                     "must name another host of the inventory")
                hosts.setdefault(name, []).append(entry["host"])
                continue
            url = entry.get("url") if isinstance(entry, dict) else None
            key = entry.get("key_file") if isinstance(entry, dict) else None
            if (not isinstance(url, str) or not url.startswith(("http://", "https://"))
                    or not (key is None or isinstance(key, str)) or set(entry) - {"url", "key_file"}):
                raise RouteError(f"{who}: route_replicas[{name!r}] entry {entry!r} needs a "
                                 "\"url\" (http:// or https://) and may have a \"key_file\", "
                                 f"or is {{\"host\": <inventory name>}} alone; {example}")
            found.setdefault(name, []).append((url, key))
    return [Served(**{**s.__dict__, "replicas": tuple(found.get(s.profile, ())),
                      "replica_hosts": tuple(hosts.get(s.profile, ()))}) for s in out]


def _with_aliases(out: list[Served], aliases, who: str) -> list[Served]:
    if aliases is None:
        aliases = {}
    if not isinstance(aliases, dict):
        raise RouteError(f"{who}: route_aliases must be a dict {{client name: profile}}, got "
                         f"{aliases!r}")
    by_profile = {s.profile: s for s in out}
    names = {s.public_name: s.profile for s in out}
    if len(names) < len(out):
        raise RouteError(f"{who}: two served profiles share a public_name "
                         f"({[s.public_name for s in out]}): clients could not tell them apart")
    extra: dict[str, list[str]] = {s.profile: [] for s in out}
    for alias, target in aliases.items():
        if not isinstance(alias, str) or not alias.strip():
            raise RouteError(f"{who}: route_aliases key {alias!r} must be a non-empty name")
        if target not in by_profile:
            raise RouteError(f"{who}: route_aliases[{alias!r}] = {target!r} is not a profile "
                             f"this host serves (route_profiles: {sorted(by_profile)})")
        if alias in names and names[alias] != target:
            raise RouteError(f"{who}: route_aliases[{alias!r}] points at {target!r}, but "
                             f"{alias!r} already names {names[alias]!r}")
        names[alias] = target
        extra[target].append(alias)
    return [Served(**{**s.__dict__, "aliases": tuple(sorted(extra[s.profile]))}) for s in out]


@contextmanager
def data_for(host_data, which: Served):
    """host.data (a pyinfra HostData) as it would be for a host whose model_profile
    is `which.profile` (weights in model_root/<profile>, served on its port), for
    the steps written for model_profile (the weights' download and check); the
    host's own data is back afterwards."""
    overrides = host_data.override_datas
    keys = {"model_profile": which.profile, "model_dir": None, "server_port": which.port}
    saved = {key: overrides[key] for key in keys if key in overrides}
    overrides.update(keys)
    try:
        yield
    finally:
        for key in keys:
            overrides.pop(key, None)
        overrides.update(saved)
