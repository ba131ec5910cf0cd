"""One model served by several ranks: MLX's own distributed engine.

A cluster is data (`cluster_*` keys, group_data/all.py): the ranks in order,
each a host of the inventory and the address the ranks talk over, the backend
(`ring` over Ethernet or Thunderbolt IP, `jaccl` over Thunderbolt 5 RDMA) and
the sharding (`tensor`, mlx-lm's default, or `pipeline`, mlx_lm.server's
`--pipeline`). Every host of the cluster is provisioned as any other (release,
weights, patches); what differs is its server:

- rank 0 is the route's `server` service (mlx_lm.server serving HTTP, behind
  the proxy, watched by the watchdog); its host also runs the proxy;
- every other rank is a service of its own, `<prefix>.server-rank<N>`, running
  the same mlx_lm.server command (it serves no HTTP: mlx_lm.server's rank > 0
  only follows rank 0's batches);
- each rank gets what `mlx.launch` would give it, without the SSH fan-out:
  MLX_RANK and, for ring, MLX_HOSTFILE (the ranks' `ip:port` list, rank r
  listening on cluster_port + r, as mlx.launch's --starting-port); for jaccl
  MLX_IBV_DEVICES and MLX_JACCL_COORDINATOR (rank 0's address). The deploy
  also writes the hostfile `mlx.launch --hostfile` reads, to run the group by
  hand.

So each rank is kept alive by its own host's service manager. A rank that
dies breaks the group: the other ranks' collectives fail ("[ring] connection
to a peer was lost"), ranks > 0 exit and are restarted, rank 0's generation
thread dies (its /health says 503, the proxy answers 503 + Retry-After) and
the proxy's watchdog restarts it; the restarted ranks wait for each other
and form the group again.
"""

from __future__ import annotations

import ipaddress
import json
import posixpath
from dataclasses import dataclass, replace

BACKENDS = ("ring", "jaccl")
PARALLEL = ("tensor", "pipeline")


class ClusterError(ValueError):
    """Bad cluster data; the message says what to fix (a RouteError in the deploy)."""


@dataclass(frozen=True)
class Rank:
    host: str  # the inventory name of the host that runs it
    ip: str  # the address the other ranks reach it on
    rdma: tuple | None = None  # jaccl: the RDMA device towards each rank (None: itself)


@dataclass(frozen=True)
class Cluster:
    ranks: tuple[Rank, ...]
    backend: str
    parallel: str
    port: int

    @property
    def size(self) -> int:
        return len(self.ranks)

    def local_ranks(self, host_name: str) -> list[int]:
        return [r for r, rank in enumerate(self.ranks) if rank.host == host_name]

    def share(self, host_name: str) -> float:
        """The part of the weights this host's ranks hold (an even split)."""
        return len(self.local_ranks(host_name)) / self.size

    def launch_hostfile(self) -> dict:
        """The hostfile of `mlx.launch --hostfile` (mlx 0.32: backend, envs, hosts):
        each host by its inventory name (its SSH name), @local as 127.0.0.1."""
        hosts = []
        for rank in self.ranks:
            # mlx.launch runs a rank on 127.0.0.1 without SSH; other names go to `ssh`
            ssh = "127.0.0.1" if rank.host == "@local" else rank.host
            entry = {"ssh": ssh, "ips": [rank.ip]}
            if rank.rdma is not None:
                entry["rdma"] = list(rank.rdma)
            hosts.append(entry)
        return {"backend": self.backend, "envs": [], "hosts": hosts}

    def ring_hostfile(self) -> list[list[str]]:
        """MLX_HOSTFILE of the ring backend: rank r listens on ip:port+r (what
        mlx.launch writes with --starting-port port and one connection per ip)."""
        return [[f"{rank.ip}:{self.port + r}"] for r, rank in enumerate(self.ranks)]

    def ibv_devices(self) -> list:
        """MLX_IBV_DEVICES of the jaccl backend: each rank's device towards each rank."""
        return [list(rank.rdma) for rank in self.ranks]

    def rank_env(self, rank: int, files_dir: str) -> dict[str, str]:
        """The environment a rank's server runs with; `files_dir` holds cluster_files()."""
        env = {"MLX_RANK": str(rank)}
        if self.backend == "ring":
            env["MLX_HOSTFILE"] = posixpath.join(files_dir, "ring.json")
        else:
            env["MLX_IBV_DEVICES"] = posixpath.join(files_dir, "ibv_devices.json")
            env["MLX_JACCL_COORDINATOR"] = f"{self.ranks[0].ip}:{self.port}"
        return env

    def files(self) -> dict[str, str]:
        """name -> text of the files every host of the cluster gets (same bytes everywhere)."""
        out = {"hostfile.json": json.dumps(self.launch_hostfile(), indent=1) + "\n"}
        if self.backend == "ring":
            out["ring.json"] = json.dumps(self.ring_hostfile()) + "\n"
        else:
            out["ibv_devices.json"] = json.dumps(self.ibv_devices()) + "\n"
        return out

    def server_flags(self) -> list[str]:
        return ["--pipeline"] if self.parallel == "pipeline" else []


def parse(data, who: str) -> Cluster | None:
    """The cluster in a host's data (a mapping with .get); None when cluster_ranks is empty."""
    ranks = data.get("cluster_ranks") or []
    if not ranks:
        return None
    fix = "fix cluster_ranks in inventory.py (README: Several Macs, one model)"
    if not isinstance(ranks, (list, tuple)) or len(ranks) < 2:
        raise ClusterError(f"{who}: cluster_ranks must list at least 2 ranks, got {ranks!r}; {fix}")
    backend = data.get("cluster_backend")
    if backend not in BACKENDS:
        raise ClusterError(f"{who}: cluster_backend {backend!r} is not one of "
                           f"{', '.join(BACKENDS)}; fix it in inventory.py or group_data/all.py")
    parallel = data.get("cluster_parallel")
    if parallel not in PARALLEL:
        raise ClusterError(f"{who}: cluster_parallel {parallel!r} is not one of "
                           f"{', '.join(PARALLEL)}; fix it in inventory.py or group_data/all.py")
    port = data.get("cluster_port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1024 <= port <= 65535 - len(ranks):
        raise ClusterError(f"{who}: cluster_port must be a port from 1024 to {65535 - len(ranks)} "
                           f"(rank r listens on cluster_port + r), got {port!r}")
    parsed = []
    for r, entry in enumerate(ranks):
        if not isinstance(entry, dict) or not entry.get("host") or not entry.get("ip"):
            raise ClusterError(f"{who}: rank {r} of cluster_ranks is {entry!r}: each rank needs "
                               f"a \"host\" (its inventory name) and an \"ip\"; {fix}")
        try:
            ipaddress.ip_address(entry["ip"])
        except ValueError:
            raise ClusterError(f"{who}: rank {r}'s ip {entry['ip']!r} is not an IP address (the "
                               f"ring backend connects to addresses, not names); {fix}") from None
        rdma = entry.get("rdma")
        if backend == "jaccl":
            if (not isinstance(rdma, (list, tuple)) or len(rdma) != len(ranks)
                    or rdma[r] is not None
                    or any(not isinstance(d, str) or not d for i, d in enumerate(rdma) if i != r)):
                raise ClusterError(
                    f"{who}: jaccl needs each rank's \"rdma\": one RDMA device name towards each "
                    f"rank and null for itself ({len(ranks)} entries); rank {r} has {rdma!r}. "
                    "`ibv_devices` on the Mac lists them (rdma_en2 ...); " + fix)
            rdma = tuple(rdma)
        elif rdma is not None:
            raise ClusterError(f"{who}: rank {r} has \"rdma\" but cluster_backend is {backend!r}; "
                               "remove it or use jaccl")
        parsed.append(Rank(host=str(entry["host"]), ip=str(entry["ip"]), rdma=rdma))
    return Cluster(ranks=tuple(parsed), backend=backend, parallel=parallel, port=port)


def check_hosts(cluster: Cluster, host_name: str, inventory_names) -> None:
    """Every rank's host is in the inventory, and this host is one of them."""
    missing = sorted({r.host for r in cluster.ranks} - set(inventory_names))
    if missing:
        raise ClusterError(f"{host_name}: cluster_ranks names {', '.join(missing)}, not in the "
                           "inventory: every rank's host is provisioned by the same run")
    if not cluster.local_ranks(host_name):
        raise ClusterError(f"{host_name}: has cluster_ranks but runs none of its ranks: give the "
                           "cluster's data to its hosts only (an inventory group)")


def check_model(cluster: Cluster, config: dict, who: str) -> None:
    """What the model's config.json says about splitting it `cluster.size` ways."""
    n = cluster.size
    if cluster.parallel == "tensor":
        for key in ("num_attention_heads", "num_key_value_heads"):
            heads = config.get(key)
            if isinstance(heads, int) and heads % n:
                raise ClusterError(
                    f"{who}: tensor parallelism splits the attention heads across the ranks, "
                    f"and {key} = {heads} does not divide by {n} ranks: use a rank count that "
                    f"divides it, or cluster_parallel = \"pipeline\" if the model supports it")
    else:
        layers = config.get("num_hidden_layers")
        if isinstance(layers, int) and layers < n:
            raise ClusterError(f"{who}: pipeline parallelism gives each rank whole layers, and "
                               f"the model has {layers} for {n} ranks: use fewer ranks")


def rank_service_name(rank: int) -> str:
    """Rank 0 is the route's `server`; rank N > 0 is `server-rankN`."""
    return "server" if rank == 0 else f"server-rank{rank}"


def rank_services(cluster: Cluster, server, host_name: str, files_dir: str, label_prefix: str,
                  logs_dir: str) -> dict:
    """The server services of this host's ranks, from the route's single-server
    `server` Service: same command (plus --pipeline), the rank's environment,
    its own name, label and logs. Returns {name: Service}."""
    out = {}
    for rank in cluster.local_ranks(host_name):
        name = rank_service_name(rank)
        out[name] = replace(
            server,
            name=name,
            label=f"{label_prefix}.{name}",
            description=f"{server.description}, rank {rank} of {cluster.size} "
                        f"({cluster.backend}, {cluster.parallel})",
            argv=[*server.argv, *cluster.server_flags()],
            env={**server.env, **cluster.rank_env(rank, files_dir)},
            stdout=posixpath.join(logs_dir, f"{name}.out.log"),
            stderr=posixpath.join(logs_dir, f"{name}.err.log"),
            port=server.port if rank == 0 else None,  # only rank 0 answers HTTP
        )
    return out
