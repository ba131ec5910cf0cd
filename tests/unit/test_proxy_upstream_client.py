"""The proxy's HTTP/1.1 upstream client (mlx_route_proxy.upstream, on httptools):
framing, errors, reuse.

The parser is fed answers cut at every byte (a real socket may split them
anywhere); reuse, refusal and the proxy's non-streaming assembly (events cut
across reads, a stream that ends before [DONE]) run against real sockets on
127.0.0.1, the upstream a raw HTTP/1.0 socket like mlx_lm.server.
The stand-in and real-server suites (test_proxy_stub.py, test_proxy_mlx.py)
cover the same client end to end.
"""

from __future__ import annotations

import asyncio
import json
import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

from tests.fixtures.proxy import load_proxy

proxy = load_proxy()

CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n"
           b"e\r\ndata: {\"a\": 1}\r\n"
           b"7;ext=1\r\n\n\ndata:\r\n"
           b"9\r\n [DONE]\n\n\r\n"
           b"0\r\nX-Trailer: t\r\n\r\n")
CHUNKED_BODY = b"data: {\"a\": 1}\n\ndata: [DONE]\n\n"


class Transport:
    def __init__(self):
        self.aborted = self.paused = False

    def abort(self):
        self.aborted = True

    def write(self, data):
        pass

    def is_closing(self):
        return self.aborted

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def get_extra_info(self, name):
        return None


def feed(answer: bytes, step: int, close: bool = False):
    """A connection that was sent a request and then received `answer` in `step`-byte reads."""
    loop = asyncio.new_event_loop()
    conn = proxy.UpstreamConnection(loop)
    conn.connection_made(Transport())
    conn.busy = True
    conn.send_request("/v1/chat/completions", "upstream", b"{}")
    body = b""
    for i in range(0, len(answer), step):
        conn.data_received(answer[i:i + step])
        body += b"".join(conn.body)
        conn.body.clear()
    if close:
        conn.eof_received()
    loop.close()
    return conn, body


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_client_decodes_chunked_answers_cut_anywhere(step):
    conn, body = feed(CHUNKED, step)
    assert (conn.status, body, conn.complete, conn.reusable) == (200, CHUNKED_BODY, True, True)


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_client_reads_content_length_answers_and_skips_interim_ones(step):
    answer = (b"HTTP/1.1 100 Continue\r\n\r\n"
              b"HTTP/1.1 404 Not Found\r\nContent-Length: 11\r\n\r\n{\"error\":1}")
    conn, body = feed(answer, step)
    assert (conn.status, body, conn.complete, conn.reusable) == (404, b'{"error":1}', True, True)


def test_client_reads_http10_answers_to_the_close_and_does_not_reuse_them():
    # mlx_lm.server 0.32.2: BaseHTTPRequestHandler, HTTP/1.0, no Content-Length.
    conn, body = feed(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                      b"data: [DONE]\n\n", 4, close=True)
    assert (body, conn.complete, conn.reusable) == (b"data: [DONE]\n\n", True, False)


@pytest.mark.parametrize("answer, problem", [
    (CHUNKED[:90], "in the middle of its answer"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "in the middle of its answer"),
    (b"HTTP/1.1 200 OK\r\nContent-", "before answering"),
])
def test_client_says_when_the_upstream_closes_mid_answer(answer, problem):
    conn, _ = feed(answer, 3, close=True)
    assert isinstance(conn.error, proxy.UpstreamError) and problem in str(conn.error)
    assert not conn.reusable


@pytest.mark.parametrize("answer, step", [
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", 1000),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 1000),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY", 1000),
    (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", 1000),
    (b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * (70 * 1024), 1000),
    # Issue 15: the old parser checked the size of each read, not of the head.
    (b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * (100 * 1024) + b"\r\n\r\n", 60 * 1024),
    (b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\n{}", 1000),  # read as 200 before
])
def test_client_refuses_answers_that_are_not_http(answer, step):
    conn, _ = feed(answer, step)
    assert isinstance(conn.error, proxy.UpstreamError), conn.error
    assert "not valid HTTP/1.x" in str(conn.error)
    assert conn.transport.aborted


def test_client_drops_a_connection_that_talks_out_of_turn():
    conn, _ = feed(CHUNKED, 1000)
    conn.busy = False  # back in the pool
    conn.data_received(b"HTTP/1.1 200 OK\r\n")
    assert conn.closed and conn.transport.aborted


class KeepAliveServer:
    """Answers every request on a connection with a fixed chunked answer; counts connections.

    `pause_s`: how long it waits between the `[DONE]` event and the end of the message.
    """

    def __init__(self):
        self.pause_s = 0.0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn):
        with conn, contextlib.suppress(OSError):  # the client may abort its connection
            conn.settimeout(10)
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    more = conn.recv(65536)
                    if not more:
                        return
                    data += more
                head, _, data = data.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(data) < length:
                    data += conn.recv(65536)
                data = data[length:]
                end = CHUNKED.index(b"0\r\nX-Trailer")
                conn.sendall(CHUNKED[:end])
                time.sleep(self.pause_s)
                conn.sendall(CHUNKED[end:])


def test_client_reuses_a_kept_alive_connection():
    """Also after a reader that stopped at [DONE] (the proxy's non-streaming
    answers): the connection goes back to the pool when the message ends, and
    is closed when the end does not come within the grace time."""
    server = KeepAliveServer()

    async def requests():
        pool = proxy.Upstream(f"http://127.0.0.1:{server.port}", 5, keep=2)
        bodies, ended = [], []
        for pause_s, grace_s in ((0, None), (0.1, 5), (0, None), (1, 0.05), (0, None)):
            server.pause_s = pause_s
            conn = await pool.post("/v1/chat/completions", b"{}", wait_head=False)
            if grace_s is None:
                bodies.append(await conn.read_all())
                pool.release(conn)
                continue
            # stops at [DONE], before the end of the message
            bodies.append(await conn.read_all(lambda piece: b"[DONE]" in piece))
            ended.append(conn.complete)
            pool.release_later(conn, grace_s)
            await asyncio.sleep(0.15)  # the end came (or the grace ran out)
        pool.close()
        return bodies, ended

    bodies, ended = asyncio.run(requests())
    assert bodies == [CHUNKED_BODY] * 5
    assert ended == [False, False]
    # one connection until the end failed to come in time; then a new one
    assert server.connections == 2
    server.sock.close()


def test_client_says_it_cannot_connect_to_a_closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens

    async def connect():
        await proxy.Upstream(f"http://127.0.0.1:{port}", 5, keep=2).post("/x", b"{}")

    with pytest.raises(proxy.UpstreamError, match="refused"):
        asyncio.run(connect())


def raw_upstream(answer_parts):
    """An HTTP/1.0 upstream on a raw socket (like mlx_lm.server: answer, then close).

    The readiness probe gets a one-token answer; every other request gets
    `answer_parts`, sent 50 ms apart so that each arrives in its own read.
    """
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            # A probe may still be in flight when the test stops the proxy.
            with conn, contextlib.suppress(OSError):
                request = conn.recv(65536)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
                if b'"max_tokens": 1' in request:
                    conn.sendall(b'data: {"choices": []}\n\ndata: [DONE]\n\n')
                    continue
                for part in answer_parts:
                    time.sleep(0.05)
                    conn.sendall(part)

    threading.Thread(target=serve, daemon=True).start()
    return srv


def post_chat(proxy_url: str):
    import httpx2 as httpx
    return httpx.post(proxy_url + "/v1/chat/completions", timeout=10,
                      json={"messages": [{"role": "user", "content": "hi"}]})


def wait_ready(proxy_url: str) -> None:
    import httpx2 as httpx
    end = time.monotonic() + 10
    while time.monotonic() < end:
        if httpx.get(proxy_url + "/health", timeout=5).status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("proxy never ready")


def test_proxy_assembles_events_cut_across_reads(proxy_factory):
    event = (b'data: {"model": "default_model", '
             b'"choices": [{"index": 0, "delta": {"content": "%s"}}]}\n\n')
    srv = raw_upstream([event % b"Hel", (event % b"lo")[:30], (event % b"lo")[30:],
                        b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}'
                        b"\n\ndata: [DONE]"])  # the last line without its newline
    p = proxy_factory(f"http://127.0.0.1:{srv.getsockname()[1]}", "--public-name", "glm-5.2")
    wait_ready(p.url)
    r = post_chat(p.url)
    srv.close()
    choice = r.json()["choices"][0]
    assert (r.status_code, choice["message"]["content"], choice["finish_reason"],
            r.json()["model"]) == (200, "Hello", "stop", "glm-5.2")


def test_proxy_answers_502_when_the_upstream_stops_before_done(proxy_factory):
    event = (b'data: {"model": "default_model", '
             b'"choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n')
    srv = raw_upstream([event, event])  # then closes: no [DONE]
    p = proxy_factory(f"http://127.0.0.1:{srv.getsockname()[1]}")
    wait_ready(p.url)
    r = post_chat(p.url)
    srv.close()
    assert r.status_code == 502 and "upstream broke off" in r.json()["error"]["message"], r.text


def test_ticker_runs_each_deadline_at_its_time_and_never_a_removed_one():
    """admission.Ticker: the deadlines of all requests on one loop timer."""

    async def run():
        loop = asyncio.get_running_loop()
        ticker, fired = proxy.Ticker(), []
        t0 = loop.time()
        calls = {name: (lambda name=name: fired.append((name, loop.time() - t0)))
                 for name in ("late", "early", "removed", "due")}
        for name, delay in (("late", 0.25), ("removed", 0.1), ("early", 0.05), ("due", -1)):
            ticker.add(calls[name], t0 + delay)
        ticker.remove(calls["removed"])
        await asyncio.sleep(0.4)
        return fired, ticker

    fired, ticker = asyncio.run(run())
    assert [name for name, _ in fired] == ["due", "early", "late"]
    assert fired[1][1] >= 0.05 and fired[2][1] >= 0.25  # never early
    assert not ticker.pending and ticker.handle is None  # nothing left behind


def test_deadline_on_the_ticker_is_asyncio_timeout():
    """admission.Deadline: TimeoutError at the deadline, nothing pending after
    one that did not expire, and a cancel from outside stays a cancel."""

    async def run():
        loop = asyncio.get_running_loop()
        ticker = proxy.Ticker()
        with pytest.raises(asyncio.TimeoutError):
            with proxy.Deadline(ticker, loop.time() + 0.05):
                await asyncio.sleep(5)
        with proxy.Deadline(ticker, loop.time() + 5):
            await asyncio.sleep(0)
        assert not ticker.pending

        async def guarded():
            with proxy.Deadline(ticker, loop.time() + 5):
                await asyncio.sleep(5)

        task = asyncio.ensure_future(guarded())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not ticker.pending

    asyncio.run(run())


def test_assembly_fast_path_reads_events_as_the_splitter_does():
    """app.Collector takes a piece that is one whole one-line event without the
    splitter: whole pieces and the same bytes cut at every byte give the same
    reply, the same end and the same refusal, odd events included."""
    app = __import__("mlx_route_proxy.app", fromlist=["Collector"])

    class Owner:  # what Collector touches of its Proxy
        now = staticmethod(time.monotonic)
        last_ok = last_upstream_activity = 0.0

    def chunk(content, extra=b""):
        return (b'{"id": "c1", "object": "chat.completion.chunk", "model": "default_model", '
                b'"choices": [{"index": 0, "delta": {"content": "%s"}%s}]}' % (content, extra))

    streams = [
        [b"data: " + chunk(b"Hel") + b"\n\n", b"data:  " + chunk(b"lo") + b"\n\n",
         b'data: {"choices": [], "usage": {"total_tokens": 3}}\n\n', b"data: [DONE]\n\n"],
        [b"data: " + chunk(b"a") + b"\r\n\r\n", b"data: [DONE]\r\n\r\n"],  # CRLF events
        [b"data: " + chunk(b"a") + b"\n\n", b": keepalive\n\n", b"data: [DONE]\r\n\n"],
        [b"data: " + chunk(b"a", b', "finish_reason": "stop"') + b"\n\n", b"data: [DONE] \n\n"],
        [b"data: " + chunk(b"a") + b"\n\n", b"data: {\"choices\": 1}\n\n"],  # malformed
        [b"data: " + chunk(b"a") + b"\n\n", b"data: {not json}\n\n", b"data: [DONE]\n\n"],
    ]
    for pieces in streams:
        results = []
        for cut in (pieces, [bytes([b]) for b in b"".join(pieces)]):
            collect = app.Collector(Owner(), "glm-5.2")
            ended = [collect(piece) for piece in cut]
            bad = None if collect.bad is None else str(collect.bad)
            reply = collect.assembler.reply() if collect.bad is None else None
            results.append((collect.done, any(ended), bad, reply))
        assert results[0] == results[1], pieces


def test_non_streaming_request_is_made_a_stream_in_its_bytes_exactly_as_by_encoding():
    """sse.as_stream: the client's body with stream true and usage asked, without
    encoding it again. Whenever it answers, the upstream reads exactly what the
    encoded body says; when it cannot be sure which `stream` is the top-level
    one it declines (None) and the body is encoded instead."""
    sse = __import__("mlx_route_proxy.sse", fromlist=["as_stream"])
    made = [
        b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "stream": false}',
        b'{"stream":false,"max_tokens":1}',
        b' {\n\t"stream"\r\n :\n false , "n": 1e2, "seed": 1180591620717411303424}  \n',
        b'{"messages": [{"role": "user", "content": "say \\"stream\\" please"}], "stream": false}',
        b'{"max_tokens": 1}',  # no stream at all: both keys added
        b'{"max_tokens": 1, "stub": {"stream": true}}',  # a nested one, no top-level one
        b'{"a": "x", "a": "y", "stream": false}',  # a duplicate of another key stays as sent
    ]
    declined = [
        b'{"stream": false, "stub": {"stream": false}}',  # which one is it?
        b'{"mode": "stream", "stream": false}',  # "stream" as a value too
        b'{"\\u0073tream": false, "stub": {"stream": false}}',  # the key written escaped
        b'{"stream": false, "stream_options": {"include_usage": false}}',
        b'{"stream": false, "stream": false}',
        b'{}',
    ]
    for raw in made + declined:
        body = sse.loads(raw)
        out = sse.as_stream(raw, body)
        if raw in declined:
            assert out is None, raw
            continue
        assert out is not None, raw
        want = dict(body, stream=True, stream_options={"include_usage": True})
        assert sse.loads(out) == want and json.loads(out) == want, (raw, out)
        assert list(json.loads(out)) == list(want), (raw, out)  # the encoder's key order
