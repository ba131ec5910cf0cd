"""Two models on one host, for real: two mlx_lm.server processes of the small
model (the session's server and a second one under another name), one proxy.pyz
in front routing by the name the openai SDK sends, and the memory budget of
this machine for the two profiles held against what the servers use."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import openai
import pytest

from group_data.all import model_profiles
from tasks.budget import GiB, MemoryLimits, compute
from tasks.profiles import served
from tests.unit.test_profiles import DATA
from tests.unit.test_proxy_stub import wait_healthy

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


def test_two_profiles_routed_by_name_within_the_budget(mlx_server, mlx_server_factory,
                                                        proxy_factory):
    first, second = served(HOST_DATA, "here")
    ram, cgroup = ram_and_cgroup()
    budget = compute(ram, cgroup, SMOL, HOST_DATA, "here", 1.0, (("smollm2-bis", BIS),))
    bis = mlx_server_factory(server_args={
        **SMOL["server_args"],
        "prompt-cache-bytes": int(budget.model_of("smollm2-bis")[1] * GiB)})
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
