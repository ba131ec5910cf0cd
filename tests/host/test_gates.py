"""Trust gates: what the field report checked by hand before trusting the route
(docs/field-report.md, "Trust gates").

Every request goes through the proxy, as clients use it, with the key when one
is set; prompts and limits are the profile's `gates` (route.json). Walls are
printed and kept as junit properties (reports/host-suite-<host>.xml).

The Hermes child-agent gate runs on the host when the deploy provisioned
Hermes there (workload_enabled, tasks/workload.py: its venv and this route's
provider); else on the workstation where `hermes` (the hermes-agent package)
is installed and the profile names a provider for this route; otherwise it is
reported as skipped, NOT RUN.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time

import pytest

PROXY_CLIENT_MODEL = "openai/glm52"  # what LiteLLM / Terminal-Bench send (docs/field-report.md)
LEAKS = ("<think>", "</think>", "<tool_call>", "<tool_response>")
REASONING_FIELDS = ("reasoning", "reasoning_content", "thinking")


@pytest.fixture(scope="module")
def gates(route):
    if not (route.get("cluster") or {}).get("serves_http", True):  # before the autouse skip
        pytest.skip("a cluster host without rank 0: no HTTP side, no gates here")
    gates = route.get("gates")
    assert gates, ("route.json has no `gates`: the profile defines none or the host was "
                   "deployed by an older version; run the deploy again")
    return gates


def curl_auth(route) -> str:
    key_file = route["proxy"].get("client_key_file") or route["proxy"]["key_file"]
    # the key is read on the host and never leaves it in a log
    return f'-H "Authorization: Bearer $(cat {shlex.quote(key_file)})" ' if key_file else ""


def proxy_url(route: dict) -> str:
    """The proxy as the host reaches it (route.json's address: proxy_host, or loopback)."""
    return f"http://{route['proxy'].get('address', '127.0.0.1')}:{route['proxy']['port']}"


def post(host, route, body: dict, timeout: int) -> tuple[int, dict | str, float]:
    """POST /v1/chat/completions to the proxy with curl on the host: status, body, wall (s)."""
    out = host.run(
        f"curl -sS --max-time {int(timeout)} -X POST {curl_auth(route)}"
        f"-H 'Content-Type: application/json' --data-binary {shlex.quote(json.dumps(body))} "
        f"-w '\\n%{{http_code}} %{{time_total}}' "
        f"{proxy_url(route)}/v1/chat/completions"
    )
    assert out.rc == 0, f"curl failed on the host: {out.stderr}"
    text, _, meta = out.stdout.rpartition("\n")
    status, wall = meta.split()
    try:
        return int(status), json.loads(text), float(wall)
    except ValueError:
        return int(status), text, float(wall)


def chat_body(gates: dict, messages: list, **extra) -> dict:
    return {"model": PROXY_CLIENT_MODEL, "messages": messages, "temperature": 0,
            "max_tokens": gates.get("max_tokens", 64), **extra}


@pytest.fixture(scope="module")
def tool_call(host, route, gates):
    """One request that should make the model call a tool (shared by two gates)."""
    body = chat_body(gates, gates["tool_call_messages"], tools=gates["tools"])
    return post(host, route, body, gates["max_wall_s"])


def test_model_calls_a_tool_natively(tool_call, gates, record_property):
    status, reply, wall = tool_call
    record_property("wall_s", wall)
    print(f"native tool call: {wall:.2f} s")
    assert status == 200, reply
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls", f"no tool call: {choice}"
    calls = choice["message"].get("tool_calls") or []
    assert len(calls) == 1, choice
    want = gates["tool_call_expect"]
    assert calls[0]["function"]["name"] == want["name"], calls[0]
    arguments = json.loads(calls[0]["function"]["arguments"])  # real JSON, not text
    assert isinstance(arguments, dict), arguments
    for name, value in want["arguments"].items():
        assert str(arguments.get(name, "")).lower() == str(value).lower(), arguments
    assert wall <= gates["max_wall_s"]


def test_tool_result_round_trip_ends_in_a_final_answer(host, route, gates, tool_call,
                                                       record_property):
    status, reply, _ = tool_call
    assert status == 200 and reply["choices"][0]["message"].get("tool_calls"), (
        "no tool call to answer: see test_model_calls_a_tool_natively")
    asked = reply["choices"][0]["message"]
    call_id = asked["tool_calls"][0].get("id") or "call_1"
    messages = gates["tool_call_messages"] + [
        {"role": "assistant", "content": asked.get("content") or "",
         "tool_calls": asked["tool_calls"]},
        {"role": "tool", "tool_call_id": call_id, "content": gates["tool_result"]},
    ]
    status, reply, wall = post(host, route, chat_body(gates, messages, tools=gates["tools"]),
                               gates["max_wall_s"])
    record_property("wall_s", wall)
    print(f"tool-result round trip: {wall:.2f} s")
    assert status == 200, reply
    choice = reply["choices"][0]
    content = choice["message"].get("content") or ""
    assert choice["finish_reason"] == "stop", choice
    assert not choice["message"].get("tool_calls"), f"called a tool again: {choice}"
    assert not any(tag in content for tag in LEAKS), f"template markup leaked: {content!r}"
    assert gates["tool_result_expect"] in content, (
        f"the answer ignores the tool result ({gates['tool_result']}): {content!r}")
    assert wall <= gates["max_wall_s"]


def test_concurrent_requests_all_complete(host, route, gates, record_property):
    n = int(gates.get("concurrent_requests", 3))
    body = chat_body(gates, route["smoke"]["messages"],
                     max_tokens=route["smoke"].get("max_tokens", 16))
    data = shlex.quote(json.dumps(body))
    url = f"{proxy_url(route)}/v1/chat/completions"
    script = (
        "d=$(mktemp -d); "
        f"for i in $(seq 1 {n}); do curl -sS --max-time {int(gates['max_wall_s'])} -X POST "
        f"{curl_auth(route)}-H 'Content-Type: application/json' --data-binary {data} "
        f"-o $d/$i.body -w '%{{http_code}} %{{time_total}}' {url} > $d/$i.meta & done; wait; "
        f"for i in $(seq 1 {n}); do printf '%s\\t' \"$(cat $d/$i.meta)\"; tr -d '\\n' < $d/$i.body;"
        " echo; done; rm -rf $d"
    )
    started = time.monotonic()
    out = host.run(script)
    total = time.monotonic() - started
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == n, out.stdout + out.stderr
    walls = []
    for line in lines:
        meta, _, body_text = line.partition("\t")
        status, wall = meta.split()
        assert status == "200", line
        reply = json.loads(body_text)
        assert reply["choices"][0]["message"]["content"], reply
        walls.append(float(wall))
    record_property("walls_s", walls)
    record_property("total_wall_s", round(total, 2))
    print(f"{n} concurrent: walls {', '.join(f'{w:.2f}' for w in walls)} s, "
          f"total {total:.2f} s (seen from the workstation)")
    assert max(walls) <= gates["max_wall_s"]


def test_replies_are_clean_and_normalized_every_time(host, route, gates, record_property):
    walls, shapes = [], []
    for _ in range(3):
        status, reply, wall = post(host, route, chat_body(
            gates, route["smoke"]["messages"], max_tokens=route["smoke"].get("max_tokens", 16)),
            gates["max_wall_s"])
        walls.append(wall)
        assert status == 200, reply
        assert reply["model"] == PROXY_CLIENT_MODEL, reply
        message = reply["choices"][0]["message"]
        assert message["role"] == "assistant" and message["content"], message
        assert not any(tag in message["content"] for tag in LEAKS), message
        assert not set(REASONING_FIELDS) & set(message), f"reasoning fields leaked: {message}"
        assert not message.get("tool_calls"), f"tool metadata without tools: {message}"
        shapes.append(sorted(message))
    record_property("walls_s", walls)
    print(f"normalization: walls {', '.join(f'{w:.2f}' for w in walls)} s")
    assert shapes == [shapes[0]] * 3, f"the reply's shape changed between repeats: {shapes}"


def test_cached_follow_up_costs_a_fraction_of_the_cold_prefill(host, route, gates, request,
                                                               model_server, record_property):
    """The server's prompt cache. With replicas on other hosts (route_replicas) the
    proxy may send the follow-up to another replica than the cold request, so this
    host's server is measured directly there."""
    from tools.route_report import run_probes

    manifest = request.config.getoption("--route-manifest")
    data = run_probes(host, manifest, only="cache", via="server" if route.get("replicas")
                      else "proxy", sizes={"cache_tokens": gates["cache_prompt_tokens"]})
    cache = data["prefix_cache"]
    record_property("prefix_cache", cache)
    print(f"prefix cache: cold {cache['cold_ttft_s']:.2f} s for {cache['cold_prompt_tokens']} "
          f"tokens, follow-up {cache['followup_ttft_s']:.2f} s "
          f"({cache['followup_cached_tokens']} cached): ratio {cache['ratio']}")
    assert cache["followup_cached_tokens"] >= cache["cold_prompt_tokens"] // 2, (
        f"the follow-up was not served from the prompt cache: {cache}")
    assert cache["ratio"] <= gates["cache_followup_max_ratio"], cache


def hermes_on_host(host, workload: dict, provider: str, model: str, query: str):
    """`hermes chat` as the deploy provisioned it on the host (workload_enabled):
    its venv, its HERMES_HOME with this route's provider; exit, stdout, stderr."""
    q = shlex.quote
    out = host.run(
        f"HERMES_HOME={q(workload['hermes_home'])} {q(workload['hermes'])} chat -Q "
        f"--provider {q(provider)} --model {q(model)} -t safe -q {q(query)} < /dev/null")
    return out.rc, out.stdout, out.stderr


def test_hermes_child_agent_completes_small_tasks(host, route, gates, record_property):
    workload = route.get("workload") or {}
    provider = gates.get("hermes_provider") or workload.get("hermes_provider")
    model = gates["hermes_model"] if gates.get("hermes_provider") else (
        workload.get("hermes_model") or gates["hermes_model"])
    if workload.get("hermes"):
        where = "the host (workload_enabled)"

        def hermes_chat(query: str):
            return hermes_on_host(host, workload, provider, model, query)
    else:
        hermes = shutil.which("hermes")
        if hermes is None:
            pytest.skip("NOT RUN: `hermes` is not installed on this workstation and the "
                        "deploy did not provision it (workload_enabled=False); the Hermes "
                        "gate has not passed")
        if not provider:
            pytest.skip("NOT RUN: the profile's gates name no hermes_provider for this route "
                        "(the field report named one for its route); the Hermes gate has not passed")
        where = "this workstation"

        def hermes_chat(query: str):
            proc = subprocess.run(
                [hermes, "chat", "-Q", "--provider", provider, "--model", model,
                 "-t", "safe", "-q", query],
                capture_output=True, text=True, timeout=gates.get("hermes_timeout_s", 600),
                stdin=subprocess.DEVNULL)
            return proc.returncode, proc.stdout, proc.stderr
    results = []
    for task in gates["hermes_tasks"]:
        started = time.monotonic()
        rc, stdout, stderr = hermes_chat(task["query"])
        wall = time.monotonic() - started
        results.append({"task": task["name"], "exit": rc, "wall_s": round(wall, 2)})
        print(f"hermes {task['name']} on {where}: exit {rc}, {wall:.2f} s")
        assert rc == 0, f"{task['name']}: {stderr[-800:]}"
        assert task["expect"] in stdout, f"{task['name']}: {stdout[-800:]}"
    record_property("hermes", results)
