"""The proxy's own HTTP/1.1 server (files/mlx_route_proxy/server.py): its promises.

llhttp (httptools) parses; server.py frames: one answer at a time per
connection, limits on the head and the body, the head timeout, HEAD, HTTP/1.0,
compressed bodies, upgrades, a graceful stop. Each test talks to the real
proxy (the zipapp, its own process) in front of the stand-in upstream, on
127.0.0.1, with raw sockets where an HTTP client would not send such bytes.
Bounded by socket timeouts and pytest-timeout.
"""

from __future__ import annotations

import gzip
import json
import signal
import socket
import time
import zlib

import httpx2 as httpx
import pytest

from tests.fixtures.proxy import wait_healthy

pytestmark = pytest.mark.timeout(60)

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def start(proxy_factory, upstream_stub, *flags):
    p = proxy_factory(upstream_stub.url, *flags)
    wait_healthy(p.url)
    return p


def connect(p, timeout=10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", p.port), timeout)


def post(body: bytes, *headers: bytes, path=b"/v1/chat/completions", version=b"1.1") -> bytes:
    head = b"POST %s HTTP/%s\r\nHost: x\r\nContent-Type: application/json\r\n" % (path, version)
    if not any(h.lower().startswith(b"transfer-encoding") for h in headers):
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


class Reader:
    """HTTP/1.1 answers read off one socket in turn (status, headers, body)."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def _more(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def answer(self, head_only: bool = False):
        while b"\r\n\r\n" not in self.buf:
            if not self._more():
                raise EOFError(f"closed before a head: {self.buf[:200]!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode()] = value.strip().decode()
        if status == 100:
            return status, headers, b""
        if head_only:
            return status, headers, b""
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(self.buf) < n:
                if not self._more():
                    raise EOFError("closed inside a body")
            body, self.buf = self.buf[:n], self.buf[n:]
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    assert self._more(), "closed inside a chunk"
                size_line, rest = self.buf.split(b"\r\n", 1)
                size = int(size_line, 16)
                while len(rest) < size + 2:
                    assert self._more(), "closed inside a chunk"
                    rest = self.buf.split(b"\r\n", 1)[1]
                body += rest[:size]
                self.buf = rest[size + 2:]
                if size == 0:
                    break
        else:  # delimited by the close
            while self._more():
                pass
            body, self.buf = self.buf, b""
        return status, headers, body

    def closed(self, timeout: float) -> bool:
        """True if the server closes the connection within `timeout` s."""
        self.sock.settimeout(timeout)
        try:
            while self._more():
                pass
            return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False


def test_pipelined_requests_are_answered_in_order(proxy_factory, upstream_stub):
    p = start(proxy_factory, upstream_stub)
    with connect(p) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n" + post(json.dumps(CHAT).encode())
                  + b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
                  + b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n"
                  + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        r = Reader(s)
        status, _, body = r.answer()
        assert status == 200 and json.loads(body)["object"] == "list"
        status, _, body = r.answer()
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]
        status, _, body = r.answer()
        assert status == 404 and json.loads(body)["error"]["type"] == "not_found"
        status, headers, _ = r.answer(head_only=True)  # HEAD: the head, no body
        assert status == 200 and int(headers["content-length"]) > 0
        status, headers, body = r.answer()  # the body after the HEAD's head is this answer's
        assert status == 200 and json.loads(body) == {"status": "ok",
                                                      "upstream": upstream_stub.url}
        assert headers.get("connection") == "close"
        assert r.closed(5)


def test_a_malformed_request_after_a_good_one_gets_the_good_answer_then_a_close(
        proxy_factory, upstream_stub):
    p = start(proxy_factory, upstream_stub)
    with connect(p) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\x00 / HTTP/9\r\n\r\n")
        r = Reader(s)
        assert r.answer()[0] == 200
        assert r.closed(5)
    with connect(p) as s:  # alone, it gets a 400 that does not echo it
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        status, headers, body = Reader(s).answer()
        assert status == 400 and headers["connection"] == "close"
        assert b"Bad" not in body and json.loads(body)["error"]["code"] == 400


@pytest.mark.parametrize("head, why", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "request line over 8190"),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", "one header over 8190"),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n",
     "over 100 headers"),
])
def test_heads_over_the_limits_get_400(proxy_factory, upstream_stub, head, why):
    p = start(proxy_factory, upstream_stub)
    with connect(p) as s:
        s.sendall(head)
        status, headers, _ = Reader(s).answer()
        assert status == 400, why
        assert headers["connection"] == "close"


def test_a_head_trickled_in_pieces_is_bounded(proxy_factory, upstream_stub):
    """Each header under its limit, the head over 64 KiB, sent in pieces: llhttp keeps a
    header's pieces until it is whole, so the bound is on what came."""
    p = start(proxy_factory, upstream_stub)
    with connect(p) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        for i in range(90):
            s.sendall(b"X-%d: %s\r\n" % (i, b"v" * 800))
        status = Reader(s).answer()[0]
        assert status == 400


def test_a_slow_or_idle_client_is_cut_at_the_header_timeout(proxy_factory, upstream_stub):
    p = start(proxy_factory, upstream_stub, "--header-timeout-s", "1")
    with connect(p) as slow, connect(p) as idle, connect(p) as busy:
        t0 = time.monotonic()
        # a long generation is not a slow head: it outlives the timeout
        busy.sendall(post(json.dumps({**CHAT, "max_tokens": 30,
                                      "stub": {"tokens": 30, "delay_s": 0.07}}).encode()))
        for piece in (b"GET /v1/models HTTP/1.1\r\n", b"Host: x\r\n", b"X-A: b\r\n"):
            slow.sendall(piece)
            time.sleep(0.3)
        idle.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        r = Reader(idle)
        assert r.answer()[0] == 200  # answered, then idle on a kept-alive connection
        assert Reader(slow).closed(3)
        assert r.closed(3)
        assert time.monotonic() - t0 < 3
        status, _, body = Reader(busy).answer()
        assert status == 200 and time.monotonic() - t0 > 1.5
        assert json.loads(body)["usage"]["completion_tokens"] == 30


@pytest.mark.parametrize("encoding, compress", [
    ("gzip", gzip.compress), ("deflate", zlib.compress),
    ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as some clients send it
])
def test_compressed_bodies_are_inflated(proxy_factory, upstream_stub, encoding, compress):
    p = start(proxy_factory, upstream_stub)
    with connect(p) as s:
        s.sendall(post(compress(json.dumps(CHAT).encode()),
                       b"Content-Encoding: " + encoding.encode()))
        status, _, body = Reader(s).answer()
    assert status == 200, body
    assert json.loads(body)["object"] == "chat.completion"


@pytest.mark.parametrize("body, encoding, status", [
    (gzip.compress(b" " * 200_000), b"gzip", 413),  # small on the wire, over the limit inflated
    (b"\x1f\x8b not gzip at all", b"gzip", 400),
    (json.dumps(CHAT).encode(), b"br", 415),
])
def test_bad_compressed_bodies_are_refused(proxy_factory, upstream_stub, body, encoding, status):
    p = start(proxy_factory, upstream_stub, "--max-body-bytes", "100000")
    before = len(upstream_stub.generations)  # (the proxy's readiness probe)
    with connect(p) as s:
        s.sendall(post(body, b"Content-Encoding: " + encoding))
        got, _, answer = Reader(s).answer()
    assert got == status, answer
    assert json.loads(answer)["error"]["code"] == status
    assert len(upstream_stub.generations) == before


def test_a_chunked_body_is_read_and_one_over_the_limit_refused(proxy_factory, upstream_stub):
    p = start(proxy_factory, upstream_stub, "--max-body-bytes", "2000")
    raw = json.dumps(CHAT).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(raw[i:i + 7]), raw[i:i + 7])
                       for i in range(0, len(raw), 7)) + b"0\r\n\r\n"
    with connect(p) as s:
        s.sendall(post(chunked, b"Transfer-Encoding: chunked"))
        assert Reader(s).answer()[0] == 200
    with connect(p) as s:
        s.sendall(post(b"", b"Transfer-Encoding: chunked"))
        for _ in range(3):
            s.sendall(b"400\r\n" + b" " * 1024 + b"\r\n")
        status, headers, _ = Reader(s).answer()
        assert status == 413 and headers["connection"] == "close"


def test_http_1_0_gets_a_stream_without_chunks_and_a_close(proxy_factory, upstream_stub):
    p = start(proxy_factory, upstream_stub)
    with connect(p) as s:
        s.sendall(post(json.dumps({**CHAT, "stream": True, "max_tokens": 3}).encode(),
                       version=b"1.0"))
        status, headers, body = Reader(s).answer()
    assert status == 200 and "transfer-encoding" not in headers
    assert headers["connection"] == "close"
    events = [e for e in body.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and len(events) >= 4
    with connect(p) as s:  # HTTP/1.0 with keep-alive asked: kept, and said so
        s.sendall(b"GET /v1/models HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" * 2)
        r = Reader(s)
        for _ in range(2):
            status, headers, _ = r.answer()
            assert status == 200 and headers["connection"] == "keep-alive"


def test_an_upgrade_is_answered_over_http_1_1_then_the_connection_closes(
        proxy_factory, upstream_stub):
    p = start(proxy_factory, upstream_stub)
    with connect(p) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings"
                  b"\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n")
        r = Reader(s)
        assert r.answer()[0] == 200
        assert r.closed(5)
    with connect(p) as s:
        s.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        assert Reader(s).answer()[0] in (400, 404)
    assert httpx.get(p.url + "/v1/models", timeout=5).status_code == 200


def test_stop_closes_idle_connections_and_lets_a_stream_finish_within_its_grace(
        proxy_factory, upstream_stub):
    """SIGTERM: no new connections, idle ones closed at once, an answer under way
    gets up to 5 s to finish."""
    p = start(proxy_factory, upstream_stub)
    with connect(p) as idle, connect(p) as streaming:
        idle.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        idle_reader = Reader(idle)
        assert idle_reader.answer()[0] == 200
        streaming.sendall(post(json.dumps({**CHAT, "stream": True, "max_tokens": 20,
                                           "stub": {"tokens": 20, "delay_s": 0.1}}).encode()))
        time.sleep(0.3)
        t0 = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        assert idle_reader.closed(2)
        status, _, body = Reader(streaming).answer()  # 2 s of tokens: within the grace
        assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
        p.proc.wait(10)
        assert time.monotonic() - t0 < 8
    assert p.proc.returncode == 0
    with pytest.raises(OSError):
        connect(p, 2)


def test_a_client_that_does_not_read_holds_back_the_upstream(proxy_factory, upstream_stub):
    """Back-pressure: while a streaming client reads nothing, the proxy's writes wait,
    it stops reading the upstream, and the generation stalls instead of piling
    up in the proxy; once the client reads, everything arrives."""
    p = start(proxy_factory, upstream_stub)
    # 120 MB of events: on the way, loopback sockets hold up to ~41 MB here (a
    # receiving socket autotunes to 32 MB, net.ipv4.tcp_rmem; a sending one to 4 MB),
    # so more than half of the generation cannot be sent while the client waits.
    tokens, text = 12000, "x" * 10_000
    with connect(p, timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(post(json.dumps({**CHAT, "stream": True, "max_tokens": tokens,
                                   "stub": {"tokens": tokens, "text": text}}).encode()))
        time.sleep(3)  # the stand-in writes ~100 MB/s when nothing holds it back
        held = upstream_stub.generations[-1]
        assert held.finished is None and held.tokens_sent < tokens // 2, held.tokens_sent
        reader = Reader(s)
        status, headers, _ = reader.answer(head_only=True)
        got = bytearray(reader.buf)  # the chunks, read raw (120 MB)
        while not got.endswith(b"0\r\n\r\n"):
            more = s.recv(1 << 20)
            assert more, "closed before the end of the stream"
            got += more
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert got.count(b"x" * 10_000) == tokens
    assert b"data: [DONE]" in got[-100:]
