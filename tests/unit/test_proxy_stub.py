"""The proxy (the proxy.pyz zipapp) against the stand-in upstream (tests/fixtures/upstream_stub.py).

The stand-in is used where the real mlx_lm.server cannot fail on demand
(loading forever, refusing, dying, a chosen token pace, telling when it
noticed a departed client); tests/unit/test_proxy_mlx.py covers the same
promises against the real server where it can. Each test is bounded by
pytest-timeout and by the client timeouts in it.
"""

from __future__ import annotations

import json
import os
import socket
import time

import httpx2 as httpx
import openai
import pytest

from tests.fixtures.proxy import wait_healthy

pytestmark = pytest.mark.timeout(60)

CHAT = [{"role": "user", "content": "hi"}]
KEY = "k" * 43


@pytest.fixture
def proxy(upstream_stub, proxy_factory):
    p = proxy_factory(upstream_stub.url, "--public-name", "glm-5.2", "--retry-after-ms", "200")
    wait_healthy(p.url)
    return p


def client(p, **kw) -> openai.OpenAI:
    kw.setdefault("api_key", "unused")
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 10)
    return openai.OpenAI(base_url=p.url + "/v1", **kw)


def metric(p, line_start: str, headers=None) -> float:
    text = httpx.get(p.url + "/metrics", headers=headers).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(line_start)]
    return sum(values)


# -- 1. model field ------------------------------------------------------------


def test_proxy_strips_model_and_answers_with_requested_name(proxy, upstream_stub):
    reply = client(proxy).chat.completions.create(
        model="openai/glm52", messages=CHAT, extra_body={"stub": {"tokens": 3}})
    assert reply.model == "openai/glm52"
    assert reply.choices[0].message.content == "tok" * 3
    sent = upstream_stub.generations[-1].body
    assert "model" not in sent and sent["messages"] == CHAT


def test_proxy_strips_fields_that_load_files_on_the_host(proxy, upstream_stub):
    httpx.post(proxy.url + "/v1/chat/completions", json={
        "messages": CHAT, "draft_model": "/etc", "adapters": "/tmp/x", "stub": {"tokens": 1}})
    sent = upstream_stub.generations[-1].body
    assert "draft_model" not in sent and "adapters" not in sent


def test_proxy_names_public_model_in_every_stream_chunk(proxy):
    r = httpx.post(proxy.url + "/v1/chat/completions", json={
        "messages": CHAT, "stream": True, "stream_options": {"include_usage": True},
        "stub": {"tokens": 4}})
    events = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: {")]
    assert len(events) == 6  # 4 tokens, the finish chunk, the usage chunk
    assert {e["model"] for e in events} == {"glm-5.2"}
    assert events[-1]["usage"]["completion_tokens"] == 4


def test_proxy_passes_tool_calls_reasoning_and_usage_untouched(proxy):
    spec = {"tokens": 2, "tool_call": True, "reasoning": "think"}
    plain = client(proxy).chat.completions.create(model="m", messages=CHAT,
                                                  extra_body={"stub": spec})
    call = plain.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather", {"city": "Paris"})
    assert plain.choices[0].finish_reason == "tool_calls"
    assert plain.choices[0].message.model_extra["reasoning"] == "think"
    assert plain.usage.total_tokens == 9
    streamed = list(client(proxy).chat.completions.create(
        model="m", messages=CHAT, stream=True, extra_body={"stub": spec}))
    deltas = [c.choices[0].delta for c in streamed if c.choices]
    assert any(d.tool_calls and d.tool_calls[0].function.name == "get_weather" for d in deltas)


def test_proxy_assembles_the_reply_a_non_streaming_upstream_would_give(proxy, upstream_stub):
    """Same request straight to the stand-in (non-streaming) and through the proxy."""
    spec = {"tokens": 3, "tool_call": True, "reasoning": "r"}
    direct = httpx.post(upstream_stub.url + "/v1/chat/completions",
                        json={"messages": CHAT, "stub": spec}).json()
    via = httpx.post(proxy.url + "/v1/chat/completions",
                     json={"messages": CHAT, "stub": spec}).json()
    assert upstream_stub.generations[-1].stream is True  # the proxy asked for a stream
    for reply in (direct, via):
        del reply["id"], reply["created"], reply["model"]
    assert via == direct


def test_proxy_assembles_text_completions(proxy):
    reply = client(proxy).completions.create(model="x", prompt="a",
                                             extra_body={"stub": {"tokens": 2}})
    assert reply.choices[0].text == "toktok"
    assert reply.usage.completion_tokens == 2 and reply.model == "x"


def test_proxy_lists_the_public_model(proxy):
    assert [m.id for m in client(proxy).models.list()] == ["glm-5.2"]


# -- 2. streaming as it arrives --------------------------------------------------


def test_proxy_streams_each_chunk_as_it_arrives(proxy):
    body = {"messages": CHAT, "stream": True,
            "stub": {"tokens": 5, "delay_s": 0.2, "keepalives": 1}}
    with httpx.Client(timeout=10) as http:  # built before the clock starts
        arrivals, t0 = [], time.monotonic()
        with http.stream("POST", proxy.url + "/v1/chat/completions", json=body) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith((": keepalive", "data: {")):
                    arrivals.append((time.monotonic() - t0, line[:12]))
    assert arrivals[0][1].startswith(": keepalive")  # comments pass through too
    # not held back until the end (~1.2 s): the first line comes ~1 s before the last
    assert arrivals[0][0] < 0.3 and arrivals[-1][0] - arrivals[0][0] > 0.6, arrivals
    gaps = [b[0] - a[0] for a, b in zip(arrivals[1:], arrivals[2:5])]
    assert all(g > 0.1 for g in gaps), arrivals


# -- 4. a client that leaves stops the generation ---------------------------------


def test_proxy_stops_generation_when_streaming_client_leaves(proxy, upstream_stub):
    body = {"messages": CHAT, "stream": True, "stub": {"tokens": 500, "delay_s": 0.01}}
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
        left = time.monotonic()
    gen = upstream_stub.wait_for(lambda: upstream_stub.generations[-1].finished
                                 and upstream_stub.generations[-1])
    assert gen.finished - left < 0.1
    assert gen.tokens_sent < 50


def test_proxy_stops_generation_when_non_streaming_client_times_out(proxy, upstream_stub):
    """The field report's wedge: a client timeout left the server generating for minutes."""
    with pytest.raises(openai.APITimeoutError):
        client(proxy, timeout=0.5).chat.completions.create(
            model="m", messages=CHAT, extra_body={"stub": {"tokens": 1000, "delay_s": 0.01}})
    left = time.monotonic()
    gen = upstream_stub.wait_for(lambda: upstream_stub.generations[-1].finished
                                 and upstream_stub.generations[-1])
    assert gen.finished - left < 0.1 and gen.tokens_sent < 100
    end = time.monotonic() + 5
    while metric(proxy, 'proxy_cancelled_generations_total{reason="client_left"}') < 1:
        assert time.monotonic() < end, "cancelled generation not counted"
        time.sleep(0.05)


def test_proxy_deadline_stops_generation(upstream_stub, proxy_factory):
    p = proxy_factory(upstream_stub.url, "--request-timeout-s", "0.5")
    wait_healthy(p.url)
    t0 = time.monotonic()
    r = httpx.post(p.url + "/v1/chat/completions", timeout=10,
                   json={"messages": CHAT, "stub": {"tokens": 1000, "delay_s": 0.01}})
    assert r.status_code == 504 and "request-timeout-s" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 2
    gen = upstream_stub.wait_for(lambda: upstream_stub.generations[-1].finished
                                 and upstream_stub.generations[-1])
    assert gen.tokens_sent < 100
    with pytest.raises(openai.APIError, match="request-timeout-s"):  # in-band for streams
        for _ in client(p).chat.completions.create(
                model="m", messages=CHAT, stream=True,
                extra_body={"stub": {"tokens": 1000, "delay_s": 0.01}}):
            pass


# -- 5. bad input ----------------------------------------------------------------


def test_proxy_answers_malformed_json_with_400(proxy):
    r = httpx.post(proxy.url + "/v1/chat/completions", content=b"{not json",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(proxy.url + "/v1/chat/completions", json=[1, 2])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]


def test_proxy_refuses_body_over_limit_with_413(upstream_stub, proxy_factory):
    p = proxy_factory(upstream_stub.url, "--max-body-bytes", "100000")
    wait_healthy(p.url)
    n = len(upstream_stub.generations)
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 10_000_000}]}).encode()
    r = httpx.post(p.url + "/v1/chat/completions", content=big, timeout=10,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "max-body-bytes" in r.json()["error"]["message"]

    def chunked():
        for _ in range(20):
            yield b"x" * 10_000
    r = httpx.post(p.url + "/v1/chat/completions", content=chunked(), timeout=10)
    assert r.status_code == 413
    assert len(upstream_stub.generations) == n  # nothing reached the upstream


def test_proxy_answers_unknown_path_with_404(proxy):
    r = httpx.get(proxy.url + "/v1/embeddings")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = httpx.get(proxy.url + "/v1/chat/completions")
    assert r.status_code == 405


def test_proxy_slow_clients_do_not_block_others(upstream_stub, proxy_factory):
    p = proxy_factory(upstream_stub.url, "--header-timeout-s", "1", "--body-timeout-s", "1")
    wait_healthy(p.url)
    stuck_headers = [socket.create_connection(("127.0.0.1", p.port)) for _ in range(20)]
    for s in stuck_headers:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never ends
    stuck_body = socket.create_connection(("127.0.0.1", p.port))
    stuck_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    t0 = time.monotonic()
    reply = client(p).chat.completions.create(model="m", messages=CHAT,
                                              extra_body={"stub": {"tokens": 1}})
    assert reply.choices[0].message.content == "tok" and time.monotonic() - t0 < 0.5
    stuck_body.settimeout(5)
    assert b" 408 " in stuck_body.recv(1000).split(b"\r\n")[0] + b" "
    for s in stuck_headers:  # closed by the proxy after --header-timeout-s
        s.settimeout(5)
        assert s.recv(1000) == b""
        s.close()
    stuck_body.close()


# -- 6. upstream down or loading ---------------------------------------------------


def test_proxy_answers_503_with_retry_after_when_upstream_down_and_recovers(proxy,
                                                                            upstream_stub):
    upstream_stub.stop()
    t0 = time.monotonic()
    r = httpx.post(proxy.url + "/v1/chat/completions", json={"messages": CHAT})
    assert r.status_code == 503 and time.monotonic() - t0 < 1
    assert r.headers["retry-after-ms"] == "200" and r.headers["retry-after"] == "1"
    assert "not ready" in r.json()["error"]["message"]
    assert httpx.get(proxy.url + "/health", timeout=20).status_code == 503
    upstream_stub.start()
    wait_healthy(proxy.url)
    reply = client(proxy).chat.completions.create(model="m", messages=CHAT,
                                                  extra_body={"stub": {"tokens": 1}})
    assert reply.choices[0].message.content == "tok"
    assert proxy.proc.poll() is None


def test_proxy_answers_503_while_upstream_loads_never_hangs(upstream_stub, proxy_factory):
    upstream_stub.mode = "loading"  # accepts, answers /health 200, never generates
    p = proxy_factory(upstream_stub.url, "--probe-timeout-s", "1", "--health-wait-s", "0.5",
                      "--retry-after-ms", "200")
    t0 = time.monotonic()
    h = httpx.get(p.url + "/health", timeout=10)
    assert h.status_code == 503 and time.monotonic() - t0 < 2
    r = httpx.post(p.url + "/v1/chat/completions", json={"messages": CHAT}, timeout=10)
    assert r.status_code == 503 and "retry-after-ms" in r.headers
    upstream_stub.mode = "ok"
    wait_healthy(p.url, timeout=10)


def test_proxy_answers_503_when_generation_thread_died(proxy, upstream_stub):
    upstream_stub.mode = "thread_died"
    r = httpx.post(proxy.url + "/v1/chat/completions", json={"messages": CHAT})
    assert r.status_code == 503 and "generation thread died" in r.json()["error"]["message"]
    assert metric(proxy, "proxy_upstream_errors_total") >= 1


def test_proxy_ends_stream_with_error_when_upstream_dies_mid_stream(proxy, upstream_stub):
    stream = client(proxy).chat.completions.create(
        model="m", messages=CHAT, stream=True,
        extra_body={"stub": {"tokens": 500, "delay_s": 0.01}})
    with pytest.raises(openai.APIError, match="upstream broke off"):
        for i, _ in enumerate(stream):
            if i == 3:
                upstream_stub.stop()


# -- 7. security -------------------------------------------------------------------


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "proxy.key"
    path.write_text(KEY + "\n")
    path.chmod(0o600)
    return path


def test_proxy_requires_bearer_key_when_given_one(upstream_stub, proxy_factory, key_file):
    p = proxy_factory(upstream_stub.url, "--api-key-file", str(key_file))
    wait_healthy(p.url)  # /health needs no key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                             ("GET", "/metrics"), ("GET", "/nowhere")):
            r = httpx.request(method, p.url + path, headers=headers, json={"messages": CHAT})
            assert r.status_code == 401, (headers, path)
            assert "Bearer" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        client(p, api_key="wrong").models.list()
    reply = client(p, api_key=KEY).chat.completions.create(
        model="m", messages=CHAT, extra_body={"stub": {"tokens": 1}})
    assert reply.choices[0].message.content == "tok"


def test_proxy_refuses_to_listen_beyond_loopback_without_key(upstream_stub, proxy_factory):
    with pytest.raises(RuntimeError, match="refusing to listen on 0.0.0.0 without"):
        proxy_factory(upstream_stub.url, host="0.0.0.0")


def test_proxy_refuses_key_file_readable_by_others(upstream_stub, proxy_factory, key_file):
    os.chmod(key_file, 0o644)
    with pytest.raises(RuntimeError, match="chmod 600"):
        proxy_factory(upstream_stub.url, "--api-key-file", str(key_file), host="0.0.0.0")


def test_proxy_rejects_bad_flags_with_one_line(upstream_stub, proxy_factory):
    with pytest.raises(RuntimeError, match=r"exited 2 .*: proxy: --concurrency must be "
                                           r"positive \(got 0\)\n$"):
        proxy_factory(upstream_stub.url, "--concurrency", "0")


# -- 8. health and metrics -----------------------------------------------------------


def test_proxy_metrics_are_prometheus_text(proxy):
    client(proxy).chat.completions.create(model="m", messages=CHAT,
                                          extra_body={"stub": {"tokens": 1}})
    httpx.get(proxy.url + "/nope")
    text = httpx.get(proxy.url + "/metrics").text
    for name in ("proxy_requests_total", "proxy_requests_in_flight", "proxy_queue_depth",
                 "proxy_request_duration_seconds", "proxy_upstream_errors_total",
                 "proxy_cancelled_generations_total"):
        assert f"# TYPE {name} " in text
    assert 'proxy_requests_total{path="/v1/chat/completions",code="200"} 1' in text
    assert 'proxy_requests_total{path="other",code="404"} 1' in text
    assert "proxy_request_duration_seconds_count 1" in text


# -- 9. admission control --------------------------------------------------------------


def test_proxy_queues_a_burst_and_answers_429_when_queue_is_full(upstream_stub, proxy_factory):
    p = proxy_factory(upstream_stub.url, "--concurrency", "2", "--queue", "2",
                      "--retry-after-ms", "300")
    wait_healthy(p.url)
    slow = {"messages": CHAT, "stream": True, "stub": {"tokens": 200, "delay_s": 0.01}}
    streams = [httpx.stream("POST", p.url + "/v1/chat/completions", json=slow, timeout=20)
               for _ in range(2)]
    opened = [s.__enter__() for s in streams]
    assert metric(p, "proxy_requests_in_flight") == 2
    with httpx.Client(timeout=20) as c:
        import concurrent.futures as cf
        with cf.ThreadPoolExecutor(4) as pool:
            queued = [pool.submit(c.post, p.url + "/v1/chat/completions",
                                  json={"messages": CHAT, "stub": {"tokens": 1}})
                      for _ in range(2)]
            end = time.monotonic() + 5
            while metric(p, "proxy_queue_depth") < 2:
                assert time.monotonic() < end
                time.sleep(0.02)
            assert len(upstream_stub.running()) == 2  # the burst did not reach the server
            r = c.post(p.url + "/v1/chat/completions", json={"messages": CHAT})
            assert r.status_code == 429 and r.headers["retry-after-ms"] == "300"
            for s in streams:
                s.__exit__(None, None, None)
            assert [f.result().status_code for f in queued] == [200, 200]
    del opened


def test_proxy_resets_upstream_so_the_servers_next_write_fails(proxy_factory):
    """After a FIN the server's next write still succeeds and it generates one more
    token; after the proxy's reset its very next write fails. A raw socket
    upstream shows which write fails (aiohttp hides that)."""
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    event = b'data: {"model": "default_model", "choices": [{"index": 0, "delta": {}}]}\n\n'
    outcomes = []

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            request = conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Connection: close\r\n\r\n" + event)
            if b'"max_tokens": 1' in request:  # the proxy's readiness probe
                conn.sendall(b"data: [DONE]\n\n")
            else:
                time.sleep(0.5)  # the client leaves meanwhile
                writes = []
                for _ in range(2):
                    try:
                        conn.send(event)
                        writes.append("ok")
                    except OSError as e:
                        writes.append(type(e).__name__)
                outcomes.append(writes)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    p = proxy_factory(f"http://127.0.0.1:{srv.getsockname()[1]}")
    wait_healthy(p.url)
    with httpx.stream("POST", p.url + "/v1/chat/completions",
                      json={"messages": CHAT, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break
    end = time.monotonic() + 5
    while not outcomes and time.monotonic() < end:
        time.sleep(0.05)
    srv.close()
    assert outcomes and outcomes[0][0] != "ok", outcomes


def test_proxy_deadline_covers_time_in_the_queue(upstream_stub, proxy_factory):
    """The deadline starts when the request arrives, not when it gets a slot.
    Times are seconds apart so the two readings stay apart on a loaded machine:
    counted from arrival the 504 comes at 3 s, counted from the slot at 5.5 s."""
    p = proxy_factory(upstream_stub.url, "--concurrency", "1", "--request-timeout-s", "3")
    wait_healthy(p.url)
    slow = {"messages": CHAT, "stream": True, "stub": {"tokens": 300, "delay_s": 0.03}}
    with httpx.stream("POST", p.url + "/v1/chat/completions", json=slow, timeout=20):
        time.sleep(0.5)  # the slot is taken until the first request's deadline, at 3 s
        t0 = time.monotonic()
        # Queued 2.5 s, then 5 s of work: only a deadline that counts the queue ends it at 3 s.
        r = httpx.post(p.url + "/v1/chat/completions", timeout=20,
                       json={"messages": CHAT, "stub": {"tokens": 1, "delay_s": 5.0}})
        elapsed = time.monotonic() - t0
    assert r.status_code == 504 and 2.7 < elapsed < 4.3, (r.text, elapsed)
