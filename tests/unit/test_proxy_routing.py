"""Routing by model name (files/mlx_route_proxy/routing.py): one proxy, two upstreams.

Two stand-in upstreams (tests/fixtures/upstream_stub.py, used where the real
mlx_lm.server cannot fail on demand: a 500 from one model while the other
answers) behind the real proxy.pyz, driven with the openai SDK. The same
routing against two real mlx_lm.server processes: tests/e2e/test_two_models.py.
"""

from __future__ import annotations

import importlib
import json
import time

import httpx2 as httpx
import openai
import pytest

from tests.fixtures.proxy import load_proxy
from tests.fixtures.upstream_stub import UpstreamStub
from tests.fixtures.proxy import wait_healthy
from tests.unit.test_proxy_stub import CHAT, client, metric

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def second_stub():
    stub = UpstreamStub().start()
    yield stub
    stub.close()


@pytest.fixture
def two(upstream_stub, second_stub, proxy_factory):
    p = proxy_factory(upstream_stub.url, "--public-name", "glm-5.2", "--retry-after-ms", "200",
                      "--route", json.dumps({"name": "qwen3-30b", "upstream": second_stub.url}),
                      "--alias", "openai/glm52=glm-5.2", "--alias", "glm52=glm-5.2",
                      "--alias", "qwen=qwen3-30b")
    wait_healthy(p.url)
    return p


def test_each_name_and_alias_goes_to_its_model_and_the_reply_carries_the_name_sent(
        two, upstream_stub, second_stub):
    c = client(two)
    for name, stub in [("glm-5.2", upstream_stub), ("openai/glm52", upstream_stub),
                       ("qwen", second_stub), ("qwen3-30b", second_stub)]:
        before = (len(upstream_stub.generations), len(second_stub.generations))
        reply = c.chat.completions.create(model=name, messages=CHAT)
        assert reply.model == name
        assert reply.choices[0].message.content
        chunks = list(c.chat.completions.create(model=name, messages=CHAT, stream=True))
        assert {chunk.model for chunk in chunks} == {name}
        after = (len(upstream_stub.generations), len(second_stub.generations))
        grew = [a - b for a, b in zip(after, before)]
        # the probes of /health may add to either; the two chats went to this model only
        assert grew[0 if stub is upstream_stub else 1] >= 2
        assert "model" not in stub.generations[-1].body  # stripped, as with one model
    # no name: the first model
    plain = httpx.post(two.url + "/v1/chat/completions", json={"messages": CHAT}, timeout=10)
    assert plain.status_code == 200 and plain.json()["model"] == "glm-5.2"


def test_an_unknown_name_gets_404_listing_the_names_served(two, upstream_stub, second_stub):
    sent = len(upstream_stub.generations) + len(second_stub.generations)
    with pytest.raises(openai.NotFoundError) as refused:
        client(two).chat.completions.create(model="gpt-4o", messages=CHAT)
    message = refused.value.body["message"]
    assert message.startswith("no model 'gpt-4o' here; this proxy serves 'glm-5.2', 'qwen3-30b'")
    assert "'openai/glm52' (glm-5.2)" in message and "'qwen' (qwen3-30b)" in message
    assert len(upstream_stub.generations) + len(second_stub.generations) <= sent + 2  # probes
    assert metric(two, 'proxy_model_requests_total{model="_unknown",code="404"}') == 1


def test_models_lists_what_is_served_and_resolves_aliases(two):
    listed = client(two).models.list()
    assert [m.id for m in listed.data] == ["glm-5.2", "qwen3-30b"]
    assert client(two).models.retrieve("qwen").id == "qwen3-30b"
    with pytest.raises(openai.NotFoundError):
        client(two).models.retrieve("gpt-4o")


def test_metrics_per_model_and_one_model_down_leaves_the_other_serving(two, second_stub):
    c = client(two)
    c.chat.completions.create(model="glm52", messages=CHAT)
    c.chat.completions.create(model="qwen", messages=CHAT)
    second_stub.mode = "error_500"
    with pytest.raises(openai.APIStatusError) as down:
        c.chat.completions.create(model="qwen", messages=CHAT)
    assert down.value.status_code == 503
    assert c.chat.completions.create(model="glm-5.2", messages=CHAT).model == "glm-5.2"
    assert metric(two, 'proxy_model_requests_total{model="glm-5.2",code="200"}') == 2
    assert metric(two, 'proxy_model_requests_total{model="qwen3-30b",code="200"}') == 1
    assert metric(two, 'proxy_model_requests_total{model="qwen3-30b",code="503"}') == 1
    assert metric(two, 'proxy_model_upstream_errors_total{model="qwen3-30b",kind="status_500"}') >= 1
    assert metric(two, 'proxy_model_in_flight{model="glm-5.2"}') == 0
    assert metric(two, 'proxy_model_ready{model="qwen3-30b"}') == 0
    assert metric(two, 'proxy_model_ready{model="glm-5.2"}') == 1
    health = httpx.get(two.url + "/health", timeout=30)
    assert health.status_code == 503
    assert "model 'qwen3-30b'" in health.json()["problem"]
    second_stub.mode = "ok"  # back: the proxy's own probes find it
    wait_healthy(two.url, timeout=20)
    assert c.chat.completions.create(model="qwen", messages=CHAT).model == "qwen"


def test_one_model_still_takes_any_name(upstream_stub, proxy_factory):
    p = proxy_factory(upstream_stub.url, "--public-name", "glm-5.2", "--alias", "glm52=glm-5.2")
    wait_healthy(p.url)
    assert client(p).chat.completions.create(model="anything", messages=CHAT).model == "anything"
    assert [m.id for m in client(p).models.list().data] == ["glm-5.2"]


@pytest.mark.parametrize("flags, words", [
    (["--route", "{not json"], "is not JSON"),
    (["--route", '{"name": "q"}'], 'needs a "name" and an "upstream"'),
    (["--route", '{"name": "q", "upstream": "ftp://x"}'], "must be an http:// or https:// URL"),
    (["--route", '{"name": "default_model", "upstream": "http://127.0.0.1:1"}'],
     "already served"),
    (["--route", '{"name": "q", "upstream": "http://127.0.0.1:1", "restart_command": "x"}'],
     "go together"),
    (["--alias", "x=nope"], "must be NAME=MODEL with MODEL one of the names served"),
    (["--replica", "nope=http://127.0.0.1:1"], "must be MODEL=URL with MODEL one of the names"),
    (["--replica", "default_model=127.0.0.1:1"], "must be an http:// or https:// URL"),
    (["--upstream-key-file", "http://127.0.0.1:1=/k"], "must be URL=PATH with URL one of the "
                                                        "upstream URLs"),
])
def test_bad_route_flags_are_refused_with_one_line(flags, words):
    cli = importlib.import_module(load_proxy().__name__ + ".cli")
    assert words in cli.validate(cli.parse_args(flags))


def test_the_proxy_exits_on_a_bad_route_before_listening(upstream_stub, proxy_factory):
    with pytest.raises(RuntimeError, match=r"exited 2 before listening on \d+: proxy: --alias"):
        proxy_factory(upstream_stub.url, "--alias", "x=nope")


def test_replicas_share_the_load_a_dead_one_is_left_out_and_comes_back(
        upstream_stub, second_stub, proxy_factory):
    p = proxy_factory(upstream_stub.url, "--public-name", "glm-5.2", "--retry-after-ms", "200",
                      "--replica", f"glm-5.2={second_stub.url}")
    wait_healthy(p.url)
    c = client(p)
    for _ in range(6):
        assert c.chat.completions.create(model="glm-5.2", messages=CHAT).model == "glm-5.2"
    # in turn while idle: each replica took some of them (probes aside)
    assert metric(p, f'proxy_replica_requests_total{{model="glm-5.2",upstream="{upstream_stub.url}"') >= 2
    assert metric(p, f'proxy_replica_requests_total{{model="glm-5.2",upstream="{second_stub.url}"') >= 2
    second_stub.stop()  # the replica goes away between two requests: nobody is told
    for _ in range(4):  # the one that meets the dead replica is retried on the other
        assert c.chat.completions.create(model="glm-5.2", messages=CHAT).model == "glm-5.2"
    assert metric(p, 'proxy_replica_retries_total{model="glm-5.2"}') >= 1
    assert metric(p, f'proxy_replica_ready{{model="glm-5.2",upstream="{second_stub.url}"}}') == 0
    assert httpx.get(p.url + "/health", timeout=30).status_code == 200  # one replica is enough
    back = second_stub.start()  # on its port again
    deadline = time.monotonic() + 20  # its probe, every --retry-after-ms, puts it back
    while metric(p, f'proxy_replica_ready{{model="glm-5.2",upstream="{back.url}"}}') != 1:
        assert time.monotonic() < deadline, "the replica was not put back"
        time.sleep(0.2)
    served = len([g for g in back.generations if g.body.get("max_tokens") != 1])
    for _ in range(4):
        c.chat.completions.create(model="glm-5.2", messages=CHAT)
    assert len([g for g in back.generations if g.body.get("max_tokens") != 1]) > served


def test_a_replica_behind_another_proxy_gets_its_key_and_the_key_stays_out_of_the_log(
        upstream_stub, second_stub, proxy_factory, tmp_path):
    """The front door (one host's proxy) and a replica that is another host's proxy,
    which takes only requests with its key (as on a LAN)."""
    key = "r" * 43
    key_file = tmp_path / "studio2.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    other = proxy_factory(second_stub.url, "--public-name", "glm-5.2", "--api-key-file",
                          str(key_file))
    front = proxy_factory(upstream_stub.url, "--public-name", "glm-5.2", "--log-level", "DEBUG",
                          "--replica", f"glm-5.2={other.url}",
                          "--upstream-key-file", f"{other.url}={key_file}")
    wait_healthy(front.url)
    c = client(front)
    for _ in range(4):
        assert c.chat.completions.create(model="openai/glm52", messages=CHAT).model == \
            "openai/glm52"
    # the other host's proxy took some of them, with its key (without it: 401)
    assert metric(front, f'proxy_replica_requests_total{{model="glm-5.2",upstream="{other.url}",'
                         'code="200"}') >= 1
    assert metric(other, 'proxy_requests_total{path="/v1/chat/completions",code="200"}',
                  headers={"Authorization": f"Bearer {key}"}) >= 1
    assert key not in front.log()
    key_file.chmod(0o644)
    with pytest.raises(RuntimeError, match="--upstream-key-file .* is readable by others"):
        proxy_factory(upstream_stub.url, "--replica", f"default_model={other.url}",
                      "--upstream-key-file", f"{other.url}={key_file}")


def test_a_replica_proxy_that_answers_503_is_left_out_and_the_request_taken_elsewhere(
        upstream_stub, second_stub, proxy_factory):
    """A replica that is another host's proxy whose server went away answers 503
    (nothing was generated there): the front door tries the next replica instead of
    passing the 503 on, and leaves that replica out until its probe gets a token."""
    other = proxy_factory(second_stub.url, "--public-name", "glm-5.2", "--retry-after-ms", "200")
    front = proxy_factory(upstream_stub.url, "--public-name", "glm-5.2", "--retry-after-ms",
                          "200", "--replica", f"glm-5.2={other.url}",
                          "--replica-policy", "round-robin")
    wait_healthy(front.url)
    c = client(front)
    for _ in range(4):
        assert c.chat.completions.create(model="glm-5.2", messages=CHAT).model == "glm-5.2"
    assert metric(front, f'proxy_replica_requests_total{{model="glm-5.2",upstream="{other.url}",'
                         'code="200"}') >= 1
    second_stub.stop()  # the other host's server is gone; its proxy is up and says 503
    for stream in (False, True, False, True):
        got = c.chat.completions.create(model="glm-5.2", messages=CHAT, stream=stream)
        if stream:
            assert "".join(chunk.choices[0].delta.content or "" for chunk in got
                           if chunk.choices)
        else:
            assert got.model == "glm-5.2"
    assert metric(front, f'proxy_replica_requests_total{{model="glm-5.2",upstream="{other.url}",'
                         'code="503"}') >= 1
    assert metric(front, 'proxy_replica_retries_total{model="glm-5.2"}') >= 1
    assert metric(front, f'proxy_replica_ready{{model="glm-5.2",upstream="{other.url}"}}') == 0
    assert metric(front, 'proxy_model_requests_total{model="glm-5.2",code="503"}') == 0


def test_a_front_door_with_no_server_of_its_own_sends_its_key_to_each_upstream(
        upstream_stub, second_stub, proxy_factory, tmp_path):
    """A host that runs only the proxy (route_front_door_only): its --upstream and
    its --replica are both other hosts' proxies, each wanting its own key."""
    proxies = []
    for name, stub in (("studio1", upstream_stub), ("studio2", second_stub)):
        key_file = tmp_path / f"{name}.key"
        key_file.write_text(name * 8 + "\n")
        key_file.chmod(0o600)
        proxies.append((proxy_factory(stub.url, "--public-name", "glm-5.2", "--api-key-file",
                                      str(key_file)), key_file))
    (one, one_key), (two, two_key) = proxies
    front = proxy_factory(one.url, "--public-name", "glm-5.2", "--replica", f"glm-5.2={two.url}",
                          "--upstream-key-file", f"{one.url}={one_key}",
                          "--upstream-key-file", f"{two.url}={two_key}")
    wait_healthy(front.url)
    c = client(front)
    for _ in range(4):
        assert c.chat.completions.create(model="glm-5.2", messages=CHAT).model == "glm-5.2"
    for upstream in (one, two):
        assert metric(front, f'proxy_replica_requests_total{{model="glm-5.2",'
                             f'upstream="{upstream.url}",code="200"}}') >= 1
    assert "studio1" not in front.log() and "studio2" not in front.log()
