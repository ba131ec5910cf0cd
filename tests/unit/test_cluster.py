"""A cluster's data (tasks/cluster.py): checked with errors that say what to
fix, the hostfiles as mlx 0.32's own launcher reads and writes them, each
rank's service, and the memory budget per rank."""

from __future__ import annotations

import argparse
import json

import pytest
from mlx._distributed_utils import launch as mlx_launch
from mlx._distributed_utils.common import Hostfile

import group_data.all as defaults
from tasks.budget import GiB, compute
from tasks.cluster import ClusterError, check_hosts, check_model, parse, rank_services
from tasks.service_spec import Service

DATA = {"cluster_backend": "ring", "cluster_parallel": "tensor", "cluster_port": 32323}
TWO_MACS = [{"host": "studio-a.local", "ip": "10.0.7.1"}, {"host": "studio-b.local", "ip": "10.0.7.2"}]


def cluster(ranks=TWO_MACS, **data):
    return parse({**DATA, "cluster_ranks": ranks, **data}, "studio-a.local")


def test_no_ranks_is_no_cluster_and_the_defaults_parse():
    assert parse({**DATA, "cluster_ranks": []}, "h") is None
    assert parse({k: getattr(defaults, k) for k in dir(defaults) if k.startswith("cluster_")},
                 "h") is None


def test_the_hostfile_is_what_mlx_launch_reads_and_ring_json_what_it_would_write(tmp_path):
    """mlx's own Hostfile parser reads the deploy's hostfile.json, and its own
    launch_ring, given it, computes the MLX_HOSTFILE the deploy writes as ring.json."""
    c = cluster()
    files = c.files()
    path = tmp_path / "hostfile.json"
    path.write_text(files["hostfile.json"])
    parsed = Hostfile.from_file(path)
    assert parsed.backend == "ring"
    assert [(h.rank, h.ssh_hostname, h.ips) for h in parsed.hosts] == [
        (0, "studio-a.local", ["10.0.7.1"]), (1, "studio-b.local", ["10.0.7.2"])]
    seen = {}

    def capture(command_class, arguments, verbose):
        seen["files"] = arguments[0][0][4]

    args = argparse.Namespace(starting_port=32323, connections_per_ip=1, env=[], verbose=False,
                              cwd=None, python=None)
    original = mlx_launch._launch_with_io
    mlx_launch._launch_with_io = capture
    try:
        mlx_launch.launch_ring(None, parsed.hosts, args, ["true"])
    finally:
        mlx_launch._launch_with_io = original
    assert json.loads(seen["files"]["MLX_HOSTFILE"]) == json.loads(files["ring.json"])
    assert c.rank_env(1, "/r/cluster") == {"MLX_RANK": "1",
                                           "MLX_HOSTFILE": "/r/cluster/ring.json"}


def test_jaccl_gets_devices_and_the_coordinator(tmp_path):
    ranks = [{**TWO_MACS[0], "rdma": [None, "rdma_en3"]}, {**TWO_MACS[1], "rdma": ["rdma_en3", None]}]
    c = cluster(ranks, cluster_backend="jaccl")
    files = c.files()
    assert json.loads(files["ibv_devices.json"]) == [[None, "rdma_en3"], ["rdma_en3", None]]
    (tmp_path / "h.json").write_text(files["hostfile.json"])
    assert [h.rdma for h in Hostfile.from_file(tmp_path / "h.json").hosts] == [
        [None, "rdma_en3"], ["rdma_en3", None]]
    assert c.rank_env(0, "/c") == {"MLX_RANK": "0", "MLX_IBV_DEVICES": "/c/ibv_devices.json",
                                   "MLX_JACCL_COORDINATOR": "10.0.7.1:32323"}


@pytest.mark.parametrize("ranks, data, words", [
    ([TWO_MACS[0]], {}, "at least 2 ranks"),
    (TWO_MACS, {"cluster_backend": "mpi"}, "cluster_backend 'mpi'"),
    (TWO_MACS, {"cluster_parallel": "expert"}, "cluster_parallel 'expert'"),
    (TWO_MACS, {"cluster_port": 80}, "cluster_port must be"),
    ([TWO_MACS[0], {"host": "studio-b.local"}], {}, "rank 1 of cluster_ranks"),
    ([TWO_MACS[0], {"host": "b", "ip": "studio-b.local"}], {}, "not an IP address"),
    (TWO_MACS, {"cluster_backend": "jaccl"}, "jaccl needs each rank's \"rdma\""),
    ([{**TWO_MACS[0], "rdma": ["x", "y"]}, TWO_MACS[1]], {"cluster_backend": "jaccl"},
     "null for itself"),
    ([{**TWO_MACS[0], "rdma": [None, "x"]}, TWO_MACS[1]], {}, "remove it or use jaccl"),
])
def test_bad_cluster_data_is_refused_with_what_to_fix(ranks, data, words):
    with pytest.raises(ClusterError, match=None) as err:
        cluster(ranks, **data)
    assert words in str(err.value)


def test_hosts_must_be_in_the_inventory_and_run_a_rank():
    c = cluster()
    check_hosts(c, "studio-a.local", ["studio-a.local", "studio-b.local"])
    with pytest.raises(ClusterError, match="studio-b.local, not in the inventory"):
        check_hosts(c, "studio-a.local", ["studio-a.local"])
    with pytest.raises(ClusterError, match="runs none of its ranks"):
        check_hosts(c, "other", ["studio-a.local", "studio-b.local", "other"])


def test_the_models_heads_must_divide_for_tensor_parallelism():
    smollm2 = {"num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30}
    with pytest.raises(ClusterError, match="num_attention_heads = 9 does not divide by 2"):
        check_model(cluster(), smollm2, "h")
    three = cluster([{"host": "@local", "ip": "127.0.0.1"}] * 3)
    check_model(three, smollm2, "h")
    check_model(cluster(cluster_parallel="pipeline"), smollm2, "h")
    with pytest.raises(ClusterError, match="30 for 31 ranks"):
        check_model(cluster([{"host": "h", "ip": "127.0.0.1"}] * 31, cluster_parallel="pipeline"),
                    smollm2, "h")


def server(**kw) -> Service:
    return Service(name="server", label="org.mlxroute.server", description="mlx_lm.server",
                   argv=["py", "-m", "mlx_lm.server", "--port", "8025"], env={"HOME": "/h"},
                   workdir="/h", stdout="/l/server.out.log", stderr="/l/server.err.log",
                   nofile=65536, restart_delay=5, stop_timeout_s=30, log_max_mb=50,
                   log_keep=5, interactive=True)


def test_each_rank_is_the_server_with_its_rank_environment():
    local = cluster([{"host": "@local", "ip": "127.0.0.1"}] * 3, cluster_parallel="pipeline")
    services = rank_services(local, server(), "@local", "/r/cluster", "org.mlxroute", "/l")
    assert list(services) == ["server", "server-rank1", "server-rank2"]
    assert services["server"].label == "org.mlxroute.server"
    assert services["server-rank2"].label == "org.mlxroute.server-rank2"
    assert services["server-rank2"].env == {"HOME": "/h", "MLX_RANK": "2",
                                            "MLX_HOSTFILE": "/r/cluster/ring.json"}
    assert services["server-rank2"].argv[-1] == "--pipeline"
    assert services["server-rank1"].stdout == "/l/server-rank1.out.log"
    remote = rank_services(cluster(), server(), "studio-b.local", "/c", "org.mlxroute", "/l")
    assert list(remote) == ["server-rank1"]


def test_the_memory_budget_counts_a_ranks_share_of_the_weights():
    """GLM-5.2 (368 GiB) does not fit one 256 GiB Mac; half of it does."""
    prof = {"size_gib": 368, "server_args": {"prompt-cache-bytes": 2 * GiB}}
    data = {"host_memory_headroom_gib": 16, "host_memory_model_overhead": 1.1,
            "host_memory_route_gib": 0.25, "host_other_services": [],
            "server_prompt_cache_fraction": 0.5, "model_profile": "glm-5.2-mxfp4"}
    with pytest.raises(Exception, match="does not fit"):
        compute(256 * GiB, None, prof, data, "studio-a.local")
    half = compute(256 * GiB, None, prof, data, "studio-a.local", share=0.5)
    assert half.model == pytest.approx(368 * 1.1 / 2)
    with pytest.raises(Exception, match=r"0.333 of the weights"):
        compute(128 * GiB, None, prof, data, "studio-a.local", share=1 / 3)
