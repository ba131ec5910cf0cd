"""The proxy (the proxy.pyz zipapp) in front of a real mlx_lm.server serving SmolLM2-135M.

The client is the official openai SDK. "The server stops generating" is
observed from outside, as an operator would: the server process's CPU time
(/proc/<pid>/stat) stops growing. A control run straight to the server shows
the measure sees a generation that goes on (the field report's wedge).
"""

from __future__ import annotations

import json
import os
import time

import httpx2 as httpx
import openai
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
LONG = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]
# After the proxy resets the connection, mlx_lm.server's next token write fails;
# its batch loop then finishes its time budget (TimeBudget(budget=0.5) in
# mlx_lm/server.py 0.32.2) before it drops the request: up to 0.5 s more, plus
# CPU-sampling slack.
STOP_SLACK_S = 0.9
QUIET_LIMIT_S = 240.0  # bound on waiting for a generation of max_tokens=120 to end


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_for(pid: int, since: float, limit: float = 30.0) -> float:
    """Seconds after `since` that the process kept a core over a third busy."""
    tick, last_busy, idle = 0.02, since, 0
    prev = cpu_seconds(pid)
    while idle < 15 and time.monotonic() - since < limit:
        time.sleep(tick)
        now = cpu_seconds(pid)
        if now - prev > tick / 3:
            last_busy, idle = time.monotonic(), 0
        else:
            idle += 1
        prev = now
    return last_busy - since


@pytest.fixture(scope="module")
def route(mlx_server, tmp_path_factory):
    """The proxy in front of the session's real server (its own process, real flags)."""
    from tests.fixtures.proxy import start_proxy

    log = tmp_path_factory.mktemp("proxy") / "proxy.log"
    p = start_proxy(mlx_server.url, "--public-name", "smollm2-135m", log_path=log)
    end = time.monotonic() + 120
    while httpx.get(p.url + "/health", timeout=60).status_code != 200:
        assert time.monotonic() < end, p.log()
        time.sleep(0.5)
    yield p
    p.stop()


def sdk(base_url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0,
                         **{"timeout": 120, **kw})


def test_proxy_plain_chat_matches_the_server_non_streaming_reply(route, mlx_server):
    via = sdk(route.url).chat.completions.create(model="openai/glm52", messages=FRANCE,
                                                 max_tokens=16, temperature=0)
    direct = httpx.post(mlx_server.url + "/v1/chat/completions", timeout=120, json={
        "messages": FRANCE, "max_tokens": 16, "temperature": 0}).json()
    assert via.model == "openai/glm52"
    assert "Paris" in via.choices[0].message.content
    assert via.choices[0].message.content == direct["choices"][0]["message"]["content"]
    assert via.choices[0].finish_reason == direct["choices"][0]["finish_reason"]
    assert via.usage.completion_tokens == direct["usage"]["completion_tokens"]
    assert via.usage.prompt_tokens == direct["usage"]["prompt_tokens"]
    assert via.object == direct["object"] == "chat.completion"


def test_proxy_streams_real_chunks_with_the_public_name(route):
    chunks = list(sdk(route.url).chat.completions.create(
        messages=FRANCE, model="", max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert {c.model for c in chunks} == {"smollm2-135m"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].usage.completion_tokens > 0


def test_proxy_passes_real_tool_calls(route, mlx_server):
    # A 135M model needs one worked example before it calls a tool.
    messages = [
        {"role": "user", "content": "What is the weather in London?"},
        {"role": "assistant", "content": '<tool_call>{"name": "get_weather", '
                                         '"arguments": {"city": "London"}}</tool_call>'},
        {"role": "user", "content": "What is the weather in Paris?"},
    ]
    direct = httpx.post(mlx_server.url + "/v1/chat/completions", timeout=120, json={
        "messages": messages, "tools": [WEATHER_TOOL], "max_tokens": 64,
        "temperature": 0}).json()
    via = sdk(route.url).chat.completions.create(
        model="m", messages=messages, tools=[WEATHER_TOOL], max_tokens=64, temperature=0)
    want = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in direct["choices"][0]["message"].get("tool_calls", [])]
    assert want, f"the model made no tool call: {direct}"
    got = [(c.function.name, json.loads(c.function.arguments))
           for c in via.choices[0].message.tool_calls]
    assert got == want
    assert via.choices[0].finish_reason == direct["choices"][0]["finish_reason"] == "tool_calls"
    streamed = list(sdk(route.url).chat.completions.create(
        model="m", messages=messages, tools=[WEATHER_TOOL], max_tokens=64, temperature=0,
        stream=True))
    calls = [tc for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == want


def test_proxy_stops_generation_when_client_times_out(route, mlx_server):
    pid = mlx_server.proc.pid
    body = dict(messages=LONG, max_tokens=120, temperature=0)
    # Control: straight to the server, a client timeout leaves it generating.
    with pytest.raises(openai.APITimeoutError):
        sdk(mlx_server.url, timeout=1.0).chat.completions.create(model="default_model", **body)
    # until it is idle again (max_tokens bounds it), so the control's tokens
    # cannot be taken for the proxied request's on a slow, loaded machine
    wedged = busy_for(pid, time.monotonic(), limit=QUIET_LIMIT_S)
    assert wedged > 3, "control failed: the server stopped by itself"
    assert wedged < QUIET_LIMIT_S, "the control generation did not end: cannot measure"

    with pytest.raises(openai.APITimeoutError):
        sdk(route.url, timeout=1.0).chat.completions.create(model="m", **body)
    stopped = busy_for(pid, time.monotonic())
    # one token's write fails, then the batch loop's time budget: a token is at most
    # the control's time per token (its 120 tokens and the prompt), on a loaded machine
    token = wedged / body["max_tokens"]
    assert stopped < token + STOP_SLACK_S, (stopped, token, wedged)
    t0 = time.monotonic()  # and the server takes the next request at once
    reply = sdk(route.url).chat.completions.create(model="m", messages=FRANCE, max_tokens=16,
                                                   temperature=0)
    assert "Paris" in reply.choices[0].message.content and time.monotonic() - t0 < 10


def test_proxy_stops_generation_when_streaming_client_leaves(route, mlx_server):
    # start from an idle server (an earlier test's generation would count as ours)
    assert busy_for(mlx_server.proc.pid, time.monotonic(), limit=QUIET_LIMIT_S) < QUIET_LIMIT_S
    stream = sdk(route.url).chat.completions.create(model="m", messages=LONG, max_tokens=120,
                                                    temperature=0, stream=True)
    arrivals = []
    for chunk in stream:
        arrivals.append(time.monotonic())
        if len(arrivals) == 6:
            break
    stream.close()
    left = time.monotonic()
    token = max(b - a for a, b in zip(arrivals[1:], arrivals[2:]))
    stopped = busy_for(mlx_server.proc.pid, left)
    assert stopped < token + STOP_SLACK_S, (stopped, token)
    metrics = httpx.get(route.url + "/metrics").text
    assert 'proxy_cancelled_generations_total{reason="client_left"}' in metrics


def test_proxy_health_is_a_real_generation(route):
    r = httpx.get(route.url + "/health", timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "ok"
