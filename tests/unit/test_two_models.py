"""Two models on one host, for real: two mlx_lm.server processes of the small
model (the session's server and a second one under another name), one proxy.pyz
in front routing by the name the openai SDK sends, the memory budget of
this machine for the two profiles held against what the servers use; then the
same two servers as two replicas of one model, one killed mid-run and brought
back (two hosts' servers on loopback: the SSH test hosts cannot run mlx)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import openai
import pytest

from group_data.all import model_profiles
from tasks.budget import GiB, MemoryLimits, compute
from tasks.profiles import served
from tests.fixtures.mlx_server import start_mlx_server
from tests.unit.test_profiles import DATA
from tests.fixtures.proxy import wait_healthy
from tests.unit.test_proxy_stub import metric

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SMOL = model_profiles["smollm2-135m"]
QUESTION = SMOL["smoke"]["messages"]
# The second profile: the same weights under another public name, as a host's data would say.
BIS = {**SMOL, "public_name": "smollm2-bis"}
HOST_DATA = {**DATA, "model_profiles": {**DATA["model_profiles"], "smollm2-bis": BIS},
             "model_profile": "smollm2-135m",
             "route_profiles": {"smollm2-135m": DATA["server_port"], "smollm2-bis": 8027},
             "route_aliases": {"openai/smol": "smollm2-135m", "qwen": "smollm2-bis"}}


def answered(server) -> int:
    """Chat completions this mlx_lm.server logged (its own request log)."""
    return len(re.findall(r'"POST /v1/chat/completions HTTP/1\.1" 200', server.log()))


def rss_gib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024 / GiB


def ram_and_cgroup() -> tuple[int, int | None]:
    """This machine's memory as the deploy reads it (MemoryLimits' own shell command)."""
    fact = MemoryLimits()
    out = subprocess.run(["sh", "-c", fact.command()], capture_output=True, text=True,
                         timeout=30).stdout.splitlines()
    limits = fact.process(out)
    return limits["ram"], limits["cgroup"]


@pytest.fixture(scope="module")
def budget():
    """This machine's memory budget for the two profiles, as the deploy computes it."""
    ram, cgroup = ram_and_cgroup()
    return compute(ram, cgroup, SMOL, HOST_DATA, "here", 1.0, (("smollm2-bis", BIS),))


def bis_args(budget) -> dict:
    return {**SMOL["server_args"],
            "prompt-cache-bytes": int(budget.model_of("smollm2-bis")[1] * GiB)}


@pytest.fixture(scope="module")
def bis(smollm2_model_dir, tmp_path_factory, budget):
    """The second server (the second profile; a replica of the first in the last test)."""
    base = tmp_path_factory.mktemp("bis")
    started = [start_mlx_server(smollm2_model_dir, base / "bis.log", base / "hf-cache",
                                server_args=bis_args(budget))]
    yield started
    for server in started:
        server.stop()


def test_two_profiles_routed_by_name_within_the_budget(mlx_server, bis, budget, proxy_factory):
    first, second = served(HOST_DATA, "here")
    bis = bis[-1]
    routes = [{"name": second.public_name, "upstream": bis.url}]
    aliases = [f"{a}={s.public_name}" for s in (first, second) for a in s.aliases]
    proxy = proxy_factory(mlx_server.url, "--public-name", first.public_name,
                          *(f for r in routes for f in ("--route", json.dumps(r))),
                          *(f for a in aliases for f in ("--alias", a)))
    wait_healthy(proxy.url, timeout=120)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0,
                           timeout=120)

    assert [m.id for m in client.models.list().data] == ["smollm2-135m", "smollm2-bis"]
    # a chat to each name and alias, a stream to each model: each only at its own server
    for name, server, other, stream in [
            ("smollm2-135m", mlx_server, bis, True), ("openai/smol", mlx_server, bis, False),
            ("qwen", bis, mlx_server, True), ("smollm2-bis", bis, mlx_server, False)]:
        before = answered(server), answered(other)
        reply = client.chat.completions.create(model=name, messages=QUESTION, max_tokens=16,
                                               temperature=0)
        assert reply.model == name
        assert SMOL["smoke"]["expect"] in reply.choices[0].message.content
        if stream:
            chunks = list(client.chat.completions.create(
                model=name, messages=QUESTION, max_tokens=16, temperature=0, stream=True))
            assert {c.model for c in chunks} == {name}
            assert SMOL["smoke"]["expect"] in "".join(
                c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert (answered(server), answered(other)) == (before[0] + 1 + stream, before[1]), name
    with pytest.raises(openai.NotFoundError, match="this proxy serves 'smollm2-135m', "
                                                   "'smollm2-bis'"):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=4)

    # what each server holds, against its lines of the budget (weights x overhead + prompt cache)
    for server, (model, cache) in [(mlx_server, budget.model_of(None)),
                                   (bis, budget.model_of("smollm2-bis"))]:
        used = rss_gib(server.proc.pid)
        print(f"{server.url}: RSS {used:.2f} GiB; budget model {model:.2f} + cache {cache:.2f}")
        assert used < model + cache, budget.line()
    print(budget.line())


def test_two_replicas_one_killed_mid_run_and_brought_back(mlx_server, bis, budget,
                                                          smollm2_model_dir, tmp_path,
                                                          proxy_factory):
    replica = bis[-1]
    proxy = proxy_factory(mlx_server.url, "--public-name", "smollm2-135m", "--retry-after-ms",
                          "500", "--replica", f"smollm2-135m={replica.url}")
    wait_healthy(proxy.url, timeout=120)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0,
                           timeout=120)

    def ask() -> None:
        reply = client.chat.completions.create(model="smollm2-135m", messages=QUESTION,
                                               max_tokens=4, temperature=0)
        assert reply.model == "smollm2-135m" and reply.choices[0].message.content

    def taken(server) -> float:  # generations the proxy sent there and got answered (no probes)
        return metric(proxy, f'proxy_replica_requests_total{{model="smollm2-135m",'
                             f'upstream="{server.url}",code="200"}}')

    before = answered(mlx_server), answered(replica)
    for _ in range(4):
        ask()
    assert taken(mlx_server) >= 1 and taken(replica) >= 1  # both took some
    assert answered(mlx_server) > before[0] and answered(replica) > before[1]  # as they logged
    replica.stop()  # killed between two requests: the proxy is not told
    for _ in range(3):
        ask()  # the one that meets the dead replica goes to the other: no error
    assert metric(proxy, 'proxy_replica_retries_total{model="smollm2-135m"}') >= 1
    assert metric(proxy, f'proxy_replica_ready{{model="smollm2-135m",upstream="{replica.url}"}}') == 0
    back = start_mlx_server(smollm2_model_dir, tmp_path / "back.log", tmp_path / "hf-cache",
                            port=replica.port, server_args=bis_args(budget))
    bis.append(back)
    deadline = time.monotonic() + 60  # the proxy's own probe puts it back
    while metric(proxy, f'proxy_replica_ready{{model="smollm2-135m",upstream="{back.url}"}}') != 1:
        assert time.monotonic() < deadline, "the replica was not put back"
        time.sleep(0.5)
    served_before = answered(back), taken(back)
    for _ in range(3):
        ask()
    assert answered(back) > served_before[0] and taken(back) > served_before[1]
