"""Which replica takes a request (files/mlx_route_proxy/affinity.py), and the cache
counters the upstreams report.

The policy's own tests order replicas that are plain objects with the fields the
policy reads (ready, a real admission Gate, the model name, the URL): the
thresholds need chosen loads, which real servers cannot be held at. The rest
drives the real proxy.pyz with the openai SDK in front of two stand-in
upstreams (tests/fixtures/upstream_stub.py: the real mlx_lm.server's prompt
cache cannot be told what to report); the same policy against two real
mlx_lm.server processes and their real cached_tokens:
tests/unit/test_affinity_real.py.
"""

from __future__ import annotations

import importlib
import json
import time
from types import SimpleNamespace

import httpx2 as httpx
import pytest

from tasks.proxy_args import proxy_argv
from tests.fixtures.proxy import load_proxy
from tests.unit.test_proxy_deploy import group_data
from tests.unit.test_proxy_routing import second_stub  # noqa: F401 (fixture)
from tests.fixtures.proxy import wait_healthy
from tests.unit.test_proxy_stub import client, metric

pytestmark = pytest.mark.timeout(60)

affinity = importlib.import_module(load_proxy().__name__ + ".affinity")
admission = importlib.import_module(load_proxy().__name__ + ".admission")


def replica(url: str, active: int = 0, ready: bool = True):
    gate = admission.Gate(4, 32)
    gate.active = active
    return SimpleNamespace(upstream=url, ready=ready, gate=gate,
                           args=SimpleNamespace(public_name="m"))


def policy(name="cache-aware", min_match=0.5, max_imbalance=2, max_entries=1000, block=8):
    return affinity.Policy(name, min_match, max_imbalance, max_entries, block)


def chat(*texts: str) -> dict:
    return {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                         for i, t in enumerate(texts)]}


LONG = "a conversation about the weather in Paris, " * 4


def test_a_conversation_goes_back_to_the_replica_that_saw_its_prefix():
    a, b = replica("a"), replica("b")
    pol = policy()
    first, chain = pol.order([a, b], chat(LONG))
    assert pol.decisions[("m", "miss")] == 1  # nobody saw it: the least busy, in turn
    pol.served(first[0], chain)
    for _ in range(4):  # whatever the turn says, the next turns go where the prefix is
        order, chain = pol.order([a, b], chat(LONG, "sunny", "and tomorrow?"))
        assert order[0] is first[0]
        pol.served(order[0], chain)
    assert pol.decisions[("m", "hit")] == 4
    other = [r for r in (a, b) if r is not first[0]][0]
    order, _ = pol.order([a, b], chat("something else entirely, " * 8))
    assert pol.decisions[("m", "miss")] == 2 and len(order) == 2
    first[0].ready = False  # the replica that holds it is down: the other, and its index goes
    order, _ = pol.order([a, b], chat(LONG, "sunny", "and tomorrow?"))
    assert order == [other] and not pol.index(first[0]).seen


def test_too_little_matched_or_a_much_busier_replica_falls_back_to_the_least_busy():
    a, b = replica("a"), replica("b", active=1)
    pol = policy(min_match=0.9)
    pol.served(b, affinity.block_hashes(affinity.prompt_text(chat(LONG)), 8))
    # b saw the first message, which is less than 0.9 of this prompt: the least busy
    order, _ = pol.order([a, b], chat(LONG, "x" * len(LONG)))
    assert order[0] is a and pol.decisions[("m", "miss")] == 1
    # b saw all of it: b, though busier, while within the imbalance...
    order, _ = pol.order([a, b], chat(LONG))
    assert order[0] is b and pol.decisions[("m", "hit")] == 1
    b.gate.active = 3  # ...and not once it has more than 2 more than a
    order, _ = pol.order([a, b], chat(LONG))
    assert order[0] is a and pol.decisions[("m", "imbalance")] == 1


def test_other_policies_ignore_the_prompt():
    a, b = replica("a"), replica("b", active=2)
    rr = policy("round-robin")
    firsts = [rr.order([a, b], chat(LONG))[0][0] for _ in range(4)]
    assert firsts.count(a) == 2 and firsts.count(b) == 2  # in turn, whatever the load
    lb = policy("least-busy")
    assert {lb.order([a, b], chat(LONG))[0][0].upstream for _ in range(4)} == {"a"}
    assert not rr.decisions and not lb.decisions
    down = [replica("c", ready=False), replica("d", ready=False)]
    order, _ = rr.order(down, chat(LONG))  # none ready: one, whose answer says why
    assert len(order) == 1 and order[0] in down


def test_the_index_is_bounded_and_forgets_a_prompts_tail_before_its_head():
    index = affinity.PrefixIndex(max_entries=10)
    chain = affinity.block_hashes("x" * 8 * 25, 8)
    assert len(chain) == 25 and len(set(chain)) == 25  # chained: equal blocks, other hashes
    index.add(chain)
    assert len(index.seen) == 10 and index.match(chain) == 10  # the first 10 blocks stay
    other = affinity.block_hashes("y" * 8 * 6, 8)
    index.add(other)
    assert len(index.seen) == 10 and index.match(other) == 6 and index.match(chain) == 4


def test_the_prompt_text_is_roles_and_contents_and_the_chain_hashes_whole_blocks():
    text = affinity.prompt_text({"messages": [{"role": "system", "content": "s"},
                                              {"role": "user", "content": [{"type": "text",
                                                                            "text": "t"}]}]})
    assert text.startswith("system\x00s\x01user\x00") and '"text": "t"' in text
    assert affinity.prompt_text({"prompt": "abc"}) == "abc"
    assert affinity.block_hashes("abcdefg", 8) == []  # under one block: nothing to match
    one, two = (affinity.block_hashes(t, 4) for t in ("abcdefgh", "abcdefgX"))
    assert one[0] == two[0] and one[1] != two[1]


@pytest.fixture
def replicated(upstream_stub, second_stub, proxy_factory):  # noqa: F811
    def start(*flags: str):
        p = proxy_factory(upstream_stub.url, "--public-name", "glm-5.2", "--retry-after-ms",
                          "200", "--replica", f"glm-5.2={second_stub.url}",
                          "--affinity-block-chars", "32", *flags)
        wait_healthy(p.url)
        return p
    return start


def conversations(p, n=3, turns=3) -> None:
    """n interleaved conversations of `turns` turns each, every turn resending the whole
    history (as chat clients do); each conversation's text names it."""
    history = {c: [{"role": "system", "content": f"Conversation {c}. " + LONG}]
               for c in range(n)}
    for turn in range(turns):
        for c in range(n):
            history[c].append({"role": "user", "content": f"Turn {turn} of {c}: go on."})
            reply = client(p).chat.completions.create(model="glm-5.2", messages=history[c])
            history[c].append({"role": "assistant", "content": reply.choices[0].message.content})


def where(stubs) -> dict[int, set[int]]:
    """conversation -> the stand-ins that answered its turns (probes left out)."""
    out: dict[int, set[int]] = {}
    for i, stub in enumerate(stubs):
        for g in stub.generations:
            messages = g.body.get("messages") or []
            if messages and messages[0]["content"].startswith("Conversation "):
                out.setdefault(int(messages[0]["content"].split()[1][:-1]), set()).add(i)
    return out


def test_cache_aware_keeps_each_conversation_on_one_replica_round_robin_does_not(
        replicated, upstream_stub, second_stub):  # noqa: F811
    p = replicated("--replica-policy", "cache-aware")
    conversations(p)  # 3 conversations: round-robin moves each (3 turns, 2 replicas)
    stays = where([upstream_stub, second_stub])
    assert len(stays) == 3 and all(len(s) == 1 for s in stays.values()), stays
    assert {i for s in stays.values() for i in s} == {0, 1}  # both replicas took some
    assert metric(p, 'proxy_affinity_decisions_total{model="glm-5.2",decision="hit"}') == 6
    assert metric(p, 'proxy_affinity_decisions_total{model="glm-5.2",decision="miss"}') == 3
    assert metric(p, 'proxy_affinity_index_blocks{model="glm-5.2"') > 0
    upstream_stub.generations.clear()
    second_stub.generations.clear()
    rr = replicated("--replica-policy", "round-robin")
    conversations(rr)
    assert any(len(s) > 1 for s in where([upstream_stub, second_stub]).values())
    assert "proxy_affinity_decisions_total" not in httpx.get(rr.url + "/metrics").text


def test_a_client_that_leaves_at_done_still_leaves_its_conversation_where_it_went(
        replicated, upstream_stub, second_stub):  # noqa: F811
    """The openai SDK may close its connection at [DONE] while the proxy still waits
    for the upstream's end of message (mlx_lm.server ends a stream by closing): the
    handler is cancelled, and the turn must still count for its replica."""
    p = replicated()
    body = {"model": "glm-5.2", "stream": True, "stub": {"linger_s": 0.4},
            "messages": [{"role": "system", "content": "Conversation 7. " + LONG}]}
    with httpx.Client(timeout=10) as c:
        with c.stream("POST", p.url + "/v1/chat/completions", json=body) as reply:
            for line in reply.iter_lines():
                if line == "data: [DONE]":
                    break  # and close the connection at once
    time.sleep(0.6)  # the proxy's grace wait would be over by now
    body["messages"].append({"role": "user", "content": "And the next turn, please."})
    client(p).chat.completions.create(model="glm-5.2", messages=body["messages"])
    assert metric(p, 'proxy_affinity_decisions_total{model="glm-5.2",decision="hit"}') == 1
    stays = where([upstream_stub, second_stub])
    assert len(stays[7]) == 1, stays


def test_cached_tokens_are_counted_per_replica_and_usage_asked_upstream_is_stripped(
        replicated, upstream_stub, second_stub):  # noqa: F811
    p = replicated()
    c = client(p)
    stub = {"stub": {"cached_tokens": 5}}
    c.chat.completions.create(model="glm-5.2", messages=[{"role": "user", "content": "hi"}],
                              extra_body=stub)
    chunks = list(c.chat.completions.create(
        model="glm-5.2", messages=[{"role": "user", "content": "hi"}], stream=True,
        extra_body=stub))
    assert chunks and all(ch.usage is None for ch in chunks)  # the client did not ask
    asked = [g for s in (upstream_stub, second_stub) for g in s.generations if g.stream
             and g.body.get("stub")]
    assert all(g.body["stream_options"] == {"include_usage": True} for g in asked)
    chunks = list(c.chat.completions.create(
        model="glm-5.2", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}, extra_body=stub))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 5  # it asked: it gets it
    prompt = metric(p, 'proxy_replica_prompt_tokens_total{model="glm-5.2"')
    cached = metric(p, 'proxy_replica_cached_tokens_total{model="glm-5.2"')
    assert (prompt, cached) == (3 * 7, 3 * 5)  # the stand-in reports 7 prompt tokens
    assert metric(p, 'proxy_model_cached_tokens_total{model="glm-5.2"}') == 15


def test_one_upstream_counts_the_usage_it_is_given_and_asks_for_none(
        upstream_stub, proxy_factory):
    p = proxy_factory(upstream_stub.url)
    wait_healthy(p.url)
    c = client(p)
    stub = {"stub": {"cached_tokens": 2}}
    c.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                              extra_body=stub)
    list(c.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                   stream=True, extra_body=stub))
    assert "stream_options" not in upstream_stub.generations[-1].body  # forwarded as written
    assert metric(p, "proxy_prompt_tokens_total") == 7  # the stream's usage was not asked
    assert metric(p, "proxy_cached_prompt_tokens_total") == 2


@pytest.mark.parametrize("flags, words", [
    (["--affinity-min-match", "0"], "--affinity-min-match must be a share of the prompt"),
    (["--affinity-min-match", "1.5"], "--affinity-min-match must be a share of the prompt"),
    (["--affinity-max-imbalance", "-1"], "--affinity-max-imbalance must be 0 or more"),
    (["--affinity-max-entries", "0"], "--affinity-max-entries must be positive"),
    (["--affinity-block-chars", "-4"], "--affinity-block-chars must be positive"),
])
def test_bad_policy_flags_are_refused_with_one_line(flags, words):
    cli = importlib.import_module(load_proxy().__name__ + ".cli")
    assert words in cli.validate(cli.parse_args(flags))


def test_an_unknown_policy_is_refused_naming_the_policies(upstream_stub, proxy_factory):
    with pytest.raises(RuntimeError, match="invalid choice: 'sticky'.*'round-robin', "
                                           "'least-busy', 'cache-aware'"):
        proxy_factory(upstream_stub.url, "--replica-policy", "sticky")


def test_the_deploy_passes_the_policy_from_data():
    data = dict(group_data(), route_replica_policy="round-robin", route_affinity_min_match=0.25)
    argv = proxy_argv("py", "proxy.py", None, data)
    assert json.dumps(argv).count("--replica-policy") == 1
    assert argv[argv.index("--replica-policy") + 1] == "round-robin"
    assert argv[argv.index("--affinity-min-match") + 1] == "0.25"
