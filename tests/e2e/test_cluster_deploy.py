"""One model on several ranks, deployed for real across two SSH hosts.

The two Linux test hosts of tests/fixtures/ssh_hosts.py (network namespaces,
each with its own sshd and users; host B's route reached only through sudo
with a password), joined by a direct link (link_hosts: a veth pair, as two
Macs joined by a cable). README's deploy over SSH with a cluster in the
inventory's data: three ranks of the small model (SmolLM2-135M has 9 attention
heads and 3 KV heads: tensor parallelism splits them 3 ways, not 2), ranks 0
and 1 on host A, rank 2 on host B, MLX's ring backend over the link's
addresses, each rank a program of its host's supervisord (`server` = rank 0
behind A's proxy, `server-rank1` on A, `server-rank2` on B, as route_user).
Then, in order (state carried from test to test):

1. the deploy's host suite passes over SSH on both hosts (B: its rank, its
   weights and files; A: everything, the chat through the proxy included);
2. at temperature 0 the group answers, through A's proxy, the same text as a
   single-rank mlx_lm.server (A's release, A's weights) for the same prompts,
   and the logits of the model sharded across the two hosts (ranks run by hand
   in the hosts' namespaces on a ring.json like the deployed one) stay within
   LOGIT_TOLERANCE of one rank's; prefill and decode rates of both are printed
   (README: Several Macs, one model);
3. rank 2, on host B, killed with SIGKILL takes the route down cleanly (A's
   proxy answers 503 with Retry-After) and the two service managers bring the
   whole group back (patch 0005), every rank on a new pid.

Needs root (skipped otherwise, as the SSH deploy); `pytest -m "not e2e"` leaves it out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest

from tests.e2e.test_deploy import REPO, deploy
from tests.fixtures.ports import free_port
from tests.fixtures.ssh_hosts import inventory_text, missing_requirements, ssh_hosts

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

PROFILE = "smollm2-135m"
RANKS = 3
RING_PORT = 32323  # group_data/all.py's cluster_port: each host has its own ports
# max |logit difference| allowed between the sharded and the single-rank model
# (float32; the all-reduce sums partial products in another order): measured
# 1.7e-4 here (README), bounded with room to spare
LOGIT_TOLERANCE = 1e-3
# the second, ~160 tokens, also gives the prefill and decode rates of both
PROMPTS = ["What is the capital of France?", "Summarize this text in one sentence. " + " ".join(
    f"Line {i}: the river carries water from the hills to the sea." for i in range(8))]

LOGITS = r"""
import json, sys
import numpy as np
import mlx.core as mx
from mlx_lm import load
from mlx_lm.utils import sharded_load
group = mx.distributed.init()
path, prompts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model, tok = sharded_load(path) if group.size() > 1 else load(path)
for i, text in enumerate(prompts):
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    mx.eval(logits)  # on every rank: each holds a part of every layer
    if group.rank() == 0:
        np.save(f"{out}-{i}.npy", np.array(logits))
"""


class Cluster:
    """The two hosts, the deploy's route.json of each, A's proxy and its key."""

    def __init__(self, hosts, ips, inventory: str):
        self.a, self.b = hosts
        self.ips = ips
        self.inventory = inventory
        self.route_a = json.loads(self.a.route_json.read_text())
        self.route_b = json.loads(self.b.route_json.read_text())
        self.proxy = f"http://{self.a.address}:{self.route_a['proxy']['port']}"
        self.key = Path(self.route_a["proxy"]["key_file"]).read_text().strip()

    def ctl(self, route: dict, *args: str) -> str:
        """supervisorctl of a host's route (run here as root, on its socket)."""
        return subprocess.run(f"{route['backend_ctl']} {' '.join(args)}", shell=True,
                              capture_output=True, text=True, timeout=60).stdout

    def pids(self) -> dict[str, int]:
        return {"server": int(self.ctl(self.route_a, "pid", "server").strip() or 0),
                "server-rank1": int(self.ctl(self.route_a, "pid", "server-rank1").strip() or 0),
                "server-rank2": int(self.ctl(self.route_b, "pid", "server-rank2").strip() or 0)}


def cluster_data(hosts) -> dict[int, str]:
    """Each host's cluster keys (as an inventory group would give them), for inventory_text:
    ranks 0 and 1 on A, rank 2 on B, over the A-B bridge's addresses."""
    a, b = hosts
    ranks = [{"host": a.address, "ip": a.bridge_address}, {"host": a.address, "ip": a.bridge_address},
             {"host": b.address, "ip": b.bridge_address}]
    keys = (f"'cluster_ranks': {ranks!r}, 'cluster_backend': 'ring', "
            # ranks blocked in a collective take SIGTERM late: SIGKILL them sooner
            "'service_stop_timeout_s': 5, "
            # the route checks of the host suite on both hosts; the model's trust gates
            # are the single-rank hosts' (test_ssh_deploy.py): at this cluster's decode
            # rate on 2 shared cores they take minutes, and its logits are checked below
            "'verify_gates': False, ")
    return {0: keys, 1: keys}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = missing_requirements()
    if reason:
        pytest.skip(f"SSH test hosts: {reason}")
    with ssh_hosts(2) as (made, key, known_hosts):
        ips = (made[0].bridge_address, made[1].bridge_address)
        base = tmp_path_factory.mktemp("cluster")
        wheelhouse = base / "wheelhouse"
        wheelhouse.mkdir()
        inventory = base / "inventory_cluster.py"
        inventory.write_text(inventory_text(made, key, known_hosts, wheelhouse, PROFILE,
                                            extra=cluster_data(made)))
        started = time.monotonic()
        result, log = deploy(inventory=str(inventory), timeout=1100)
        assert result.returncode == 0, log[-8000:]
        c = Cluster(made, ips, str(inventory))
        c.deploy_s, c.log = time.monotonic() - started, log
        yield c


def post(url: str, body: dict, key: str | None, timeout: float = 300):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                     headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def generate(url: str, key: str | None, text: str, max_tokens: int = 8) -> tuple[str, dict]:
    """At temperature 0, streamed: the answer, and its rates (prefill = uncached
    prompt tokens / time to the first token, decode = the rest)."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        # mlx_lm.server's own name for its model (another name makes it load that
        # one); the proxy strips the name anyway
        json.dumps({"model": "default_model", "temperature": 0.0, "max_tokens": max_tokens,
                    "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": text}]}).encode(), headers)
    started = time.monotonic()
    first = usage = None
    parts = []
    with urllib.request.urlopen(request, timeout=600) as reply:
        for line in reply:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    first = first or time.monotonic()
                    parts.append(choice["delta"]["content"])
            usage = event.get("usage") or usage
    end = time.monotonic()
    uncached = usage["prompt_tokens"] - (usage.get("prompt_tokens_details") or {}).get(
        "cached_tokens", 0)
    return "".join(parts), {
        "prompt_tokens": usage["prompt_tokens"], "uncached": uncached,
        "output_tokens": usage["completion_tokens"],
        "prefill_tok_s": round(uncached / (first - started), 2),
        "decode_tok_s": round((usage["completion_tokens"] - 1) / (end - first), 2)}


def suite_cases(host) -> dict[str, list[str]]:
    """The deploy's host-suite report of a host: test -> [failure/error/skipped tags]."""
    report = REPO / "reports" / f"host-suite-{host.address.replace('.', '_')}.xml"
    return {case.get("name").split("[")[0]: [child.tag for child in case]  # no [ssh://...]
            for case in ElementTree.parse(report).iter("testcase")
            if "[" not in case.get("name") or case.get("name").endswith(f"{host.address}]")}


def test_the_cluster_deploys_over_ssh_and_the_host_suite_passes_on_both_hosts(cluster):
    log = cluster.log
    for host in (cluster.a, cluster.b):
        assert f"--hosts=ssh://{host.name}@{host.address}" in log, log[-3000:]
    suites = [line for line in log.splitlines() if "passed" in line and " in " in line]
    assert len(suites) >= 2 and not any("failed" in line for line in suites), suites
    # each host's suite over SSH: the route checks (verify_gates False: no trust gates)
    cases = {host.name: suite_cases(host) for host in (cluster.a, cluster.b)}
    assert cases[cluster.a.name]["test_chat_through_the_proxy_answers_and_normalizes_the_model"] \
        == [], cases[cluster.a.name]
    assert not any(name.startswith("test_model_calls") for name in cases[cluster.a.name])
    # B: its rank, its weights and its files checked; the HTTP side skipped there
    passed = {name for name, tags in cases[cluster.b.name].items() if not tags}
    assert {"test_every_cluster_rank_runs_under_its_service_manager",
            "test_every_shard_of_the_index_is_present",
            "test_route_files_belong_to_the_route_user"} <= passed <= {
        "test_every_cluster_rank_runs_under_its_service_manager",
        "test_every_shard_of_the_index_is_present", "test_route_files_belong_to_the_route_user",
        "test_every_model_server_runs_with_the_blas_data_asks_for"}, cases[cluster.b.name]
    # B runs rank 2 only, as route_user, and says so in its route.json
    assert cluster.route_b["cluster"]["local_ranks"] == [2]
    assert not cluster.route_b["cluster"]["serves_http"]
    assert set(cluster.route_b["services"]) == {"server-rank2"}
    assert cluster.route_a["cluster"]["local_ranks"] == [0, 1]
    ring = [[f"{cluster.ips[0]}:{RING_PORT}"], [f"{cluster.ips[0]}:{RING_PORT + 1}"],
            [f"{cluster.ips[1]}:{RING_PORT + 2}"]]
    for route in (cluster.route_a, cluster.route_b):
        assert json.loads((Path(route["route_home"]) / "cluster" / "ring.json").read_text()) \
            == ring
    status = cluster.ctl(cluster.route_b, "status")
    assert "server-rank2" in status and "RUNNING" in status, status
    assert "Paris" in generate(cluster.proxy, cluster.key, PROMPTS[0])[0]
    print(f"\ncluster deploy over SSH (2 hosts, wheelhouse, venvs, conversion, 3 ranks): "
          f"{cluster.deploy_s:.0f} s")


def blas_env(pid: int) -> dict[str, str]:
    """The BLAS settings a deployed rank runs with (server_blas_*: LD_PRELOAD,
    OPENBLAS_NUM_THREADS), read from its own process: one rank gets the same."""
    env = dict(item.split("=", 1) for item in
               Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in item)
    return {k: v for k, v in env.items() if k in ("LD_PRELOAD", "OPENBLAS_NUM_THREADS")}


def test_the_ranks_answer_as_one_server_does(cluster, tmp_path):
    python = str(Path(cluster.route_a["venv"]) / "bin" / "python")
    model = cluster.route_a["model_dir"]
    port = free_port()
    log = (tmp_path / "single.log").open("w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **blas_env(cluster.pids()["server"])}
    single = subprocess.Popen(
        [python, "-m", "mlx_lm.server", "--model", model, "--host", "127.0.0.1", "--port",
         str(port), "--temp", "0.0", "--max-tokens", "256"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                generate(url, None, "Hi", 1)
                break
            except (OSError, KeyError, TypeError):
                assert single.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "single.log").read_text()[-2000:]
                time.sleep(1)
        measured = {}
        for text in PROMPTS:  # each prompt new to both servers: nothing cached
            one, measured["single"] = generate(url, None, text)
            many, measured["ranks"] = generate(cluster.proxy, cluster.key, text)
            assert many == one, text
    finally:
        single.terminate()
        single.wait(30)
    print(f"\nsame prompt, 1 rank vs {RANKS} ranks on 2 hosts (tensor, ring; BLAS "
          f"{env.get('LD_PRELOAD', 'of the mlx wheel')}): " + json.dumps(measured))

    # the logits themselves: the same three ranks, in the same namespaces, by hand
    script = tmp_path / "logits.py"
    script.write_text(LOGITS)
    out_one, out_many = tmp_path / "one", tmp_path / "many"
    one = subprocess.run([python, str(script), model, json.dumps(PROMPTS), str(out_one)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    ring = tmp_path / "ring.json"
    ring.write_text(json.dumps([[f"{cluster.ips[0]}:{RING_PORT + 100}"],
                                [f"{cluster.ips[0]}:{RING_PORT + 101}"],
                                [f"{cluster.ips[1]}:{RING_PORT + 102}"]]))
    ranks = []
    for rank, host in enumerate([cluster.a, cluster.a, cluster.b]):
        ranks.append(subprocess.Popen(
            ["ip", "netns", "exec", host.name, python, str(script), model, json.dumps(PROMPTS),
             str(out_many)],
            env={**env, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(ring)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for process in ranks:
        try:
            outputs.append(process.communicate(timeout=300)[0])
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(30)
    assert all(p.returncode == 0 for p in ranks), "\n".join(o[-1500:] for o in outputs)
    worst = 0.0
    for i in range(len(PROMPTS)):
        a, b = np.load(f"{out_one}-{i}.npy"), np.load(f"{out_many}-{i}.npy")
        assert a.shape == b.shape
        assert (a.argmax(-1) == b.argmax(-1)).all()
        worst = max(worst, float(np.abs(a - b).max()))
    print(f"max |logit difference|, {RANKS} ranks on 2 hosts vs 1, {len(PROMPTS)} prompts: "
          f"{worst:.2e}")
    assert worst < LOGIT_TOLERANCE


def test_a_dead_rank_on_the_other_host_takes_the_route_down_and_the_group_comes_back(cluster):
    before = cluster.pids()
    assert all(before.values()), before
    killed = time.monotonic()
    os.kill(before["server-rank2"], signal.SIGKILL)
    seen_503, waited = None, []
    # the restarted group loads the model again on its first request (lazily, every rank)
    deadline = killed + 420

    def logs() -> str:
        return "\n".join(
            f"--- {log}\n{log.read_text(errors='replace')[-1500:]}"
            for route in (cluster.route_a, cluster.route_b)
            for log in sorted((Path(route["route_home"]) / "logs").glob("server*.err.log")))

    while True:
        try:
            status, headers, body = post(cluster.proxy, {
                "model": PROFILE, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]},
                cluster.key, timeout=30)
        except (TimeoutError, OSError) as exc:  # a request taken by the group as it broke
            waited.append(repr(exc))
            status, headers, body = None, {}, b""
        if status == 503:
            seen_503 = seen_503 or headers
        elif status == 200 and seen_503:
            break
        else:
            assert status in (200, None), (status, body[:300])
        assert time.monotonic() < deadline, (
            f"the group did not come back: {cluster.ctl(cluster.route_a, 'status')} "
            f"{cluster.ctl(cluster.route_b, 'status')} {waited}\n{logs()}")
        time.sleep(1)
    back = time.monotonic() - killed
    assert {k.lower(): v for k, v in seen_503.items()}.get("retry-after"), seen_503
    after = cluster.pids()
    assert all(after[name] != before[name] for name in before), (before, after)
    print(f"\nrank 2 (host B) killed: route back after {back:.0f} s; "
          f"requests that timed out meanwhile: {len(waited)}")
