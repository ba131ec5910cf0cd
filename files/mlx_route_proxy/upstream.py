"""The upstream client: POST a JSON body over kept-alive HTTP/1.1, read the answer.

Why not aiohttp's ClientSession: measured under bench/proxy_bench.py it cost
about as much CPU per request as everything else in the proxy together (its
request object, timers and a task wake-up for every piece of a streamed
answer). The wire format is parsed by httptools (llhttp, the strict C parser
of uvicorn and Node.js; h11 was tried first and cost ~0.1 ms per answer);
this module adds what the proxy needs around it: connection reuse, one
wake-up per non-streaming answer, back-pressure for slow readers, a bound on
the size of the head, a first-byte timer, the end of a body framed by the
close of the connection (mlx_lm.server 0.32.2 speaks HTTP/1.0 and closes
after each answer), and a TCP reset when a client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
import urllib.parse
from asyncio import timeout as deadline  # (the host's Python is 3.11 or later)

import httptools

from .admission import Ticker

MAX_HEAD_BYTES = 64 * 1024
# An idle connection is reused only this soon: a server that closes idle
# connections (aiohttp and nginx after 75 s, uvicorn after 5 s) could close one
# just as a request goes out on it, and a generation request is not retried.
KEEP_IDLE_S = 2.0
HIGH_WATER = 1 << 20  # body bytes held for a slow reader before reading pauses
FRAMING_HEADERS = (b"content-length", b"transfer-encoding")


class UpstreamError(ConnectionError):
    """The upstream connection failed, or its answer broke off or was not HTTP/1.x."""


class FirstByteTimeout(Exception):
    """The upstream took the request but sent nothing back in time."""


class UpstreamConnection(asyncio.Protocol):
    """One connection to the upstream, one exchange at a time.

    `await read_head()`, then either `await read_some()` until it returns b""
    (a streamed answer, each piece as it arrives) or `await read_all()` (one
    wake-up for the whole answer). `done` says the answer is complete and
    taken; `reusable` that the connection may carry the next request.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, ticker: Ticker | None = None):
        self.loop = loop
        self.ticker = ticker or Ticker()  # the pool's: the first-byte timer
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.waiter: asyncio.Future | None = None
        self.idle_since = 0.0
        self.first_byte_armed = False
        self.exchange_reset()

    def exchange_reset(self, parser: bool = True) -> None:
        """Ready for the next exchange; parser=False keeps the parser (it is new, or
        took a complete kept-alive answer, after which llhttp awaits the next)."""
        if parser:
            self.parser = httptools.HttpResponseParser(self)
        self.body: list[bytes] = []   # decoded body, not taken yet
        self.body_size = 0
        self.in_head = True
        self.head_bytes = 0           # bytes received before the status line and headers ended
        self.status = 0
        self.keep_alive = False
        self.framed = False           # Content-Length or chunked: the body's end is in-band
        self.complete = False
        self.extra = False            # bytes came after the answer: not reusable
        self.error: BaseException | None = None
        self.want = "head"            # what wakes the reader: head, some, all
        self.listener = None          # called with the decoded body of each read (read_all)
        self.shown = 0                # pieces of `body` the listener has seen
        self.enough = False           # the listener has what it needs: read_all returns
        self.settled = None           # called once the answer ends (Upstream.release_later)
        self.paused = False
        self.busy = False             # a request is out and its answer not complete

    def send_request(self, target: str, host: str, body: bytes) -> None:
        self.transport.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json"
                             b"\r\nContent-Length: %d\r\n\r\n%s" % (
                                 target.encode("latin-1"), host.encode("latin-1"), len(body),
                                 body))

    def arm_first_byte(self, seconds: float | None) -> None:
        if seconds:
            self.first_byte_s = seconds
            self.first_byte_armed = True
            self.ticker.add(self.first_byte_late, self.loop.time() + seconds)

    def disarm_first_byte(self) -> None:
        if self.first_byte_armed:
            self.first_byte_armed = False
            self.ticker.remove(self.first_byte_late)

    def first_byte_late(self) -> None:
        self.first_byte_armed = False
        if self.in_head and self.error is None:
            self.error = FirstByteTimeout(
                f"the upstream sent nothing within {self.first_byte_s:g} s")
            self.abort(reset=True)
            self.wake(force=True)

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.complete or self.error is not None:
            if data:  # bytes nobody asked for: the connection is not in a known state
                self.closed = True
                self.transport.abort()
            return
        if self.in_head:
            # llhttp has no bound on the size of the head: this is it
            end = data.find(b"\r\n\r\n")
            self.head_bytes += len(data) if end < 0 else end + 4
            if self.head_bytes > MAX_HEAD_BYTES:
                self.fail(UpstreamError(f"upstream answer is not valid HTTP/1.x: over "
                                        f"{MAX_HEAD_BYTES} bytes of headers"))
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if self.complete:  # garbage after a complete answer: keep the answer, not the line
                self.extra = True
            else:
                where = "its headers" if self.in_head else "its body"
                self.fail(UpstreamError(f"upstream answer is not valid HTTP/1.x ({where}): {e}"))
                return
        if self.listener is not None and len(self.body) > self.shown:
            self.show()
        self.wake()

    def show(self) -> None:
        """The listener gets the body pieces of this read at once (a chunked answer
        is one piece per chunk: one call for all the events of one read)."""
        body, shown = self.body, self.shown
        self.shown = len(body)
        piece = body[shown] if self.shown - shown == 1 else b"".join(body[shown:])
        if self.listener(piece) and self.status == 200:
            self.enough = True  # (an error answer is read to its end: it is the message)

    def eof_received(self) -> bool:
        self.closed = True
        self.finish_at_close()
        return False  # close our side too

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.finish_at_close(exc)

    def finish_at_close(self, exc=None) -> None:
        if self.complete or self.error is not None:
            return
        if exc is None and self.busy and not self.in_head and not self.framed:
            self.complete = True  # a body that ends with the connection (HTTP/1.0)
            self.wake(force=True)
            return
        why = f": {exc}" if exc else ""
        where = "before answering" if self.in_head else "in the middle of its answer"
        self.error = UpstreamError(f"upstream closed the connection {where}{why}")
        self.wake(force=True)

    # -- httptools callbacks --------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            self.extra = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in FRAMING_HEADERS:
            self.framed = True

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        status = self.parser.get_status_code()
        if status < 200:
            self.framed = False  # an interim answer (100 Continue): the real one follows
            return
        self.status, self.in_head = status, False
        self.keep_alive = self.parser.should_keep_alive()
        if status in (204, 304):
            self.framed = True
        if self.first_byte_armed:
            self.disarm_first_byte()

    def on_body(self, body: bytes) -> None:
        if not self.complete and body:
            self.body.append(body)
            self.body_size += len(body)
            if self.want == "some" and self.body_size > HIGH_WATER and not self.paused:
                self.paused = True
                self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if not self.in_head:
            self.complete = True

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.closed = True
        self.transport.abort()
        self.wake(force=True)

    def wake(self, force: bool = False) -> None:
        if self.settled is not None and (self.complete or self.error is not None):
            settled, self.settled = self.settled, None
            settled(self)
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        want = self.want
        if (force or self.complete or self.error is not None
                or (want == "head" and not self.in_head)
                or (want == "some" and self.body)
                or (want == "all" and self.enough)):
            waiter.set_result(None)

    # -- reading ------------------------------------------------------------

    async def wait(self, want: str) -> None:
        self.want = want
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def read_head(self) -> int:
        while self.in_head:
            if self.error is not None:
                raise self.error
            await self.wait("head")
        return self.status

    async def read_some(self) -> bytes:
        """Body bytes received so far (waits for some); b"" once the body is complete."""
        while not self.body:
            if self.error is not None:
                raise self.error
            if self.complete:
                return b""
            await self.wait("some")
        data = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body.clear()
        self.body_size = 0
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        return data

    async def read_all(self, on_body=None) -> bytes:
        """The whole body, waking once; on_body sees the body of each read as it arrives.

        When on_body returns true (it has what it needs: the `[DONE]` event) the
        wait ends before the upstream ends its message, and the caller hands the
        connection to Upstream.release_later: the answer goes to the client one
        upstream write sooner.
        """
        if on_body is not None:
            self.listener, self.shown = on_body, 0
            if self.body:
                self.show()
        try:
            while not self.complete and not self.enough:
                if self.error is not None:
                    raise self.error
                self.want = "all"  # self.wait("all"), one coroutine fewer
                self.waiter = self.loop.create_future()
                try:
                    await self.waiter
                finally:
                    self.waiter = None
        finally:
            self.listener = None
        if self.error is not None:
            raise self.error
        data = b"".join(self.body)
        self.body.clear()
        return data

    @property
    def done(self) -> bool:
        return self.complete and not self.body

    @property
    def reusable(self) -> bool:
        return (self.complete and self.keep_alive and not self.closed and not self.extra
                and self.error is None)

    def abort(self, reset: bool = False) -> None:
        """Close now; with reset, by a TCP reset rather than a FIN.

        After a FIN the server's next write still succeeds (the reset only
        comes back as its answer), so mlx_lm.server would generate one more
        token before a write fails; after a reset its very next write fails.
        """
        self.closed = True
        if self.first_byte_armed:
            self.disarm_first_byte()
        if self.transport is None or self.transport.is_closing():
            return  # aborted already
        if reset:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError, ValueError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


class Upstream:
    """Kept-alive connections to one upstream base URL."""

    def __init__(self, base_url: str, connect_timeout_s: float, keep: int,
                 first_byte_timeout_s: float | None = None, key: bytes | None = None):
        """`key`: sent as `Authorization: Bearer <key>` (an upstream that is another
        host's proxy, routing.py's replicas); None: no header."""
        url = urllib.parse.urlsplit(base_url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.prefix = url.path.rstrip("/")
        host_header = self.host if ":" not in self.host else f"[{self.host}]"
        if url.port:
            host_header += f":{url.port}"
        if key:  # one more header line after Host, at no cost per request
            host_header += "\r\nAuthorization: Bearer " + key.decode("latin-1")
        self.host_header = host_header
        self.connect_timeout_s = connect_timeout_s
        self.first_byte_timeout_s = first_byte_timeout_s
        self.keep = keep
        self.idle: list[UpstreamConnection] = []
        self.ticker = Ticker()  # first-byte timers and grace periods (and app.py's deadlines)

    async def post(self, path: str, body: bytes, wait_head: bool = True,
                   first_byte: bool = True) -> UpstreamConnection:
        """Send the request; returns once the status and headers are in (or at
        once, for a caller that waits for the whole answer with read_all).

        UpstreamError when no connection can be made or it breaks before the
        headers (a request is never sent twice: the server may have started
        it); FirstByteTimeout when the headers do not come in time.
        """
        conn = None
        ticker = self.ticker
        if ticker.loop is None:
            ticker.loop = asyncio.get_running_loop()
        # (not get_running_loop() each time: below Python 3.12 it makes a getpid call)
        fresh_after = ticker.loop.time() - KEEP_IDLE_S
        while self.idle:
            candidate = self.idle.pop()
            if candidate.reusable and candidate.idle_since > fresh_after:
                conn = candidate
                break
            candidate.abort()
        if conn is None:
            conn = await self.connect()
        conn.exchange_reset(parser=False)  # new, or reusable: its last answer is complete
        conn.busy = True
        conn.send_request(self.prefix + path, self.host_header, body)
        if first_byte:
            conn.arm_first_byte(self.first_byte_timeout_s)
        if not wait_head:
            return conn
        try:
            await conn.read_head()
        except BaseException:
            conn.abort(reset=True)  # cancelled (the client left): the server's next write fails
            raise
        return conn

    async def connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with deadline(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(loop, self.ticker), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None)
        except asyncio.TimeoutError:
            raise UpstreamError(f"no connection within {self.connect_timeout_s:g} s") from None
        except OSError as e:  # asyncio words it "Connect call failed (address)"
            why = os.strerror(e.errno) if e.errno else str(e) or type(e).__name__
            raise UpstreamError(f"{why} ({self.host}:{self.port})") from e
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Keep the connection for the next request when it can carry one, else close it."""
        if conn.reusable and len(self.idle) < self.keep:
            conn.busy = False  # its answer stays readable; the next post() starts afresh
            conn.idle_since = conn.loop.time()
            self.idle.append(conn)
        else:
            conn.abort()

    def release_later(self, conn: UpstreamConnection, grace_s: float) -> None:
        """release() once the answer ends, for a caller that stopped reading early
        (read_all's on_body had what it needed); closed if the end takes over grace_s."""
        if conn.complete or conn.error is not None or conn.closed:
            self.release(conn)
            return
        self.ticker.add(conn.abort, conn.loop.time() + grace_s)
        conn.settled = self.settled

    def settled(self, conn: UpstreamConnection) -> None:
        """The end of an answer release_later() waits for came (or the connection failed)."""
        self.ticker.remove(conn.abort)
        self.release(conn)

    def close(self) -> None:
        for conn in self.idle:
            conn.abort()
        self.idle.clear()
