"""The host's memory budget: one table, in GiB, that every memory decision reads.

    memory   min(RAM - host_memory_headroom_gib, the memory cgroup's limit)
             (macOS: hw.memsize; Linux: MemTotal and every memory cgroup
             limit above the deploy's shell, v1 or v2; the OS lives outside a
             cgroup, so its headroom is not taken from one)
    - model  size_gib x host_memory_model_overhead (GLM-5.2: 368 GiB on disk,
             a ~395 GB MLX peak when first loaded: about x1.07); on a
             cluster host (tasks/cluster.py) x the share of the ranks it
             runs (ranks here / ranks in all: an even split of the weights)
    - route  host_memory_route_gib: the proxy, the service manager, the deploy's tools
    - others host_other_services: other model services that stay up beside
    - more   the other profiles this host serves (route_profiles,
             tasks/profiles.py): each size_gib x host_memory_model_overhead
    - cache  --prompt-cache-bytes: server_prompt_cache_fraction of what is left,
             never below the profile's own value; with several profiles each
             gets its own floor plus an even share of the fraction of what is
             left above the floors
    = free   what stays unused while the route serves

A second copy of the model (the smoke generation beside the running server)
fits only when `free` holds another `model`: that picks the restart strategy
(tasks/server.py). A profile that does not fit at all is refused with the
numbers before anything changes. The GPU wired limit of a Mac is the same
`memory` line (tasks/tuning.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pyinfra import host, logger
from pyinfra.api import FactBase

from tasks.cluster import ClusterError, parse
from tasks.common import RouteError, profile
from tasks.profiles import served

GiB = 2**30
STRATEGIES = ("auto", "overlap", "stop-first")


class MemoryLimits(FactBase):
    """{"ram": bytes, "cgroup": bytes or None} for a shell started like the services."""

    def command(self) -> str:
        # cgroup v1: the memory controller's line of /proc/self/cgroup; v2: "0::".
        # Each limit from the shell's group up to the root counts (a parent's
        # limit binds its children).
        return r"""
if [ "$(uname -s)" = Darwin ]; then echo "ram $(sysctl -n hw.memsize)"; exit 0; fi
awk '/^MemTotal:/ {printf "ram %.0f\n", $2 * 1024}' /proc/meminfo
walk() { d=$1; top=$2; file=$3
  while [ -n "$d" ]; do
    [ -r "$d/$file" ] && echo "cgroup $(cat "$d/$file")"
    [ "$d" = "$top" ] && break; d=$(dirname "$d"); done; }
v1=$(awk -F: '$2 ~ /(^|,)memory(,|$)/ {print $3; exit}' /proc/self/cgroup 2>/dev/null)
[ -n "$v1" ] && [ -d /sys/fs/cgroup/memory ] && \
  walk "/sys/fs/cgroup/memory${v1%/}" /sys/fs/cgroup/memory memory.limit_in_bytes
v2=$(awk -F: '$1 == "0" {print $3; exit}' /proc/self/cgroup 2>/dev/null)
for top in /sys/fs/cgroup /sys/fs/cgroup/unified; do
  [ -n "$v2" ] && [ -f "$top/cgroup.controllers" ] && walk "$top${v2%/}" "$top" memory.max
done
true
"""

    def process(self, output):
        ram, limits = None, []
        for line in output:
            kind, _, value = line.strip().partition(" ")
            if not value.isdigit():
                continue  # "max" (v2, no limit) or an unreadable value
            if kind == "ram":
                ram = int(value)
            elif kind == "cgroup":
                limits.append(int(value))
        return {"ram": ram, "cgroup": min(limits) if limits else None}


@dataclass(frozen=True)
class Budget:
    ram: float
    cgroup: float | None
    headroom: float
    model: float
    route: float
    others: tuple[tuple[str, float], ...]
    cache: float
    cache_floor: float
    # the other profiles served beside (route_profiles): (profile, model GiB, its cache GiB)
    extra: tuple[tuple[str, float, float], ...] = ()

    @property
    def memory(self) -> float:
        """What the route may use: RAM less the OS's headroom, or the cgroup's limit."""
        usable = self.ram - self.headroom
        return min(usable, self.cgroup) if self.cgroup is not None else usable

    @property
    def free(self) -> float:
        return (self.memory - self.model - self.route - self.other_total - self.cache
                - sum(model + cache for _, model, cache in self.extra))

    @property
    def other_total(self) -> float:
        return sum(gib for _, gib in self.others)

    @property
    def second_copy_fits(self) -> bool:
        return self.free >= self.model

    def model_of(self, name: str | None) -> tuple[float, float]:
        """(model GiB, prompt cache GiB) of a served profile; None: model_profile."""
        for profile_name, model, cache in self.extra:
            if profile_name == name:
                return model, cache
        return self.model, self.cache

    def line(self) -> str:
        limit = (f"cgroup limit {self.cgroup:.2f}" if self.cgroup is not None
                 and self.cgroup < self.ram - self.headroom
                 else f"RAM {self.ram:.2f} - headroom {self.headroom:.2f}")
        others = "".join(f" - {label} {gib:.2f}" for label, gib in self.others)
        more = "".join(f" - model {name} {model:.2f} - its prompt cache {cache:.2f}"
                       for name, model, cache in self.extra)
        return (f"memory budget (GiB): {limit} = {self.memory:.2f}; model {self.model:.2f}"
                f" - route {self.route:.2f}{others} - prompt cache {self.cache:.2f}{more}"
                f" = free {self.free:.2f}; a second copy of the model "
                f"{'fits' if self.second_copy_fits else 'does NOT fit'}")


def _number(who: str, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise RouteError(f"{who}: {key} must be a number >= 0, got {value!r}; "
                         "fix it in inventory.py or group_data/all.py")
    return float(value)


def other_services(who: str, entries) -> tuple[tuple[str, float], ...]:
    """host_other_services as (label, GiB) pairs, checked."""
    pairs = []
    for entry in entries or []:
        if not isinstance(entry, dict) or "label" not in entry or "memory_gib" not in entry:
            raise RouteError(
                f"{who}: host_other_services entry {entry!r} needs a \"label\" and a "
                "\"memory_gib\" (e.g. {\"label\": \"com.example.qwen\", \"memory_gib\": 40})")
        pairs.append((str(entry["label"]), _number(who, "memory_gib", entry["memory_gib"])))
    return tuple(pairs)


def compute(ram_bytes: int, cgroup_bytes: int | None, prof: dict, data, who: str,
            share: float = 1.0, extra: tuple[tuple[str, dict], ...] = ()) -> Budget:
    """The budget from the host's numbers and its data (a mapping with .get);
    `share` is the part of the weights this host holds (a cluster's ranks);
    `extra` the other profiles served beside, (name, profile); refuses, naming
    `who`, what cannot fit."""
    fraction = data.get("server_prompt_cache_fraction")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0 < fraction <= 1):
        raise RouteError(f"{who}: server_prompt_cache_fraction must be in (0, 1] or None, "
                         f"got {fraction!r}: fix it in inventory.py or group_data/all.py")
    floor = cache_floor(prof)
    overhead = _number(who, "host_memory_model_overhead", data.get("host_memory_model_overhead"))
    more = tuple((name, _number(who, f"{name}'s size_gib", other["size_gib"]) * overhead,
                  cache_floor(other)) for name, other in extra)
    partial = Budget(
        ram=ram_bytes / GiB,
        cgroup=cgroup_bytes / GiB if cgroup_bytes is not None and cgroup_bytes < ram_bytes
        else None,
        headroom=_number(who, "host_memory_headroom_gib", data.get("host_memory_headroom_gib")),
        model=_number(who, "size_gib", prof["size_gib"])
        * _number(who, "host_memory_model_overhead", data.get("host_memory_model_overhead"))
        * share,
        route=_number(who, "host_memory_route_gib", data.get("host_memory_route_gib")),
        others=other_services(who, data.get("host_other_services")),
        cache=0.0,
        cache_floor=floor,
        extra=tuple((name, model, 0.0) for name, model, _ in more),
    )
    spare = partial.free
    floors = floor + sum(f for _, _, f in more)
    if spare < floors:
        short = Budget(**{**partial.__dict__, "cache": floor,
                          "extra": tuple((n, m, f) for n, m, f in more)})
        part = f" ({share:.3g} of the weights: this host's cluster ranks)" if share < 1 else ""
        what = (f"model profile {data.get('model_profile')!r}" if not more else
                f"model profiles {[data.get('model_profile'), *(n for n, _, _ in more)]} "
                "(route_profiles) together")
        raise RouteError(
            f"{who}: {what} do{'es' if not more else ''} not fit in this host's "
            f"memory{part}: {short.line().split('; a second')[0]} (each prompt cache at its "
            "floor, the profile's prompt-cache-bytes). Use a smaller model_profile, fewer "
            "route_profiles or a host with more memory (or more cluster ranks), stop the "
            "services in host_other_services, or lower host_memory_headroom_gib if the OS "
            "needs less"
        )
    if not more:
        cache = floor if fraction is None else max(floor, fraction * spare)
        return Budget(**{**partial.__dict__, "cache": cache})
    share_each = 0.0 if fraction is None else fraction * (spare - floors) / (1 + len(more))
    return Budget(**{**partial.__dict__, "cache": floor + share_each,
                     "extra": tuple((n, m, f + share_each) for n, m, f in more)})


def cache_floor(prof: dict) -> float:
    """The profile's own --prompt-cache-bytes, in GiB (0 without one)."""
    return int(prof.get("server_args", {}).get("prompt-cache-bytes") or 0) / GiB


def memory_budget() -> Budget:
    """This host's budget (from facts; computed once a host and logged)."""
    limits = host.get_fact(MemoryLimits)
    if not limits or not limits.get("ram"):
        raise RouteError(f"{host.name}: cannot read the memory size (hw.memsize or "
                         "/proc/meminfo) of the host")
    try:
        cluster = parse(host.data, host.name)
    except ClusterError as exc:
        raise RouteError(str(exc)) from None
    share = cluster.share(host.name) if cluster is not None else 1.0
    profiles = host.data.model_profiles
    extra = tuple((s.profile, profiles[s.profile])
                  for s in served(host.data, host.name) if not s.primary)
    budget = compute(limits["ram"], limits.get("cgroup"), profile(), host.data, host.name, share,
                     extra)
    if host.name not in _LOGGED:  # one line a host in the plan, however often it is read
        _LOGGED.add(host.name)
        logger.info(f"{host.name}: {budget.line()}; restart strategy: {restart_strategy(budget)}")
    return budget


_LOGGED: set[str] = set()


def prompt_cache_bytes(profile_name: str | None = None) -> int | None:
    """--prompt-cache-bytes of a served profile (None: model_profile) from the budget
    (None: the profile's flag stays as is)."""
    if host.data.server_prompt_cache_fraction is None:
        return None
    return int(memory_budget().model_of(profile_name)[1] * GiB)


def restart_strategy(budget: Budget, profile_name: str | None = None) -> str:
    """"overlap" (smoke beside the running server) when a second copy of that profile's
    model (None: model_profile) fits, else "stop-first"."""
    choice = host.data.server_restart_strategy
    if choice not in STRATEGIES:
        raise RouteError(f"{host.name}: server_restart_strategy {choice!r} is not one of "
                         f"{', '.join(STRATEGIES)}")
    if choice != "auto":
        return choice
    if parse(host.data, host.name) is not None:
        return "stop-first"  # a cluster's ranks restart together: there is no second group
    return "overlap" if budget.free >= budget.model_of(profile_name)[0] else "stop-first"


def wired_mb(budget: Budget) -> int:
    """The Mac's GPU wired limit: the budget's memory line, in MB."""
    return math.floor(budget.memory * 1024)
