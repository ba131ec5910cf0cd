"""The proxy's HTTP/1.1 server: llhttp parses the requests, this module frames.

Why not aiohttp's server: on the benchmark's two cores, with the client, the
proxy and the upstream sharing them, aiohttp's request and response objects
cost ~75-85 µs a request of the proxy's ~190, which held throughput at 16
clients under half of direct. The parsing stays in a well-kept C parser
(httptools is llhttp, Node.js's parser, as in uvicorn and in aiohttp's own
C parser); what is written here is the framing around it, kept to what the
proxy needs, every part of it bounded:

- one request at a time per connection: a pipelined request waits for the
  answer before it, and reading pauses meanwhile;
- the request line and each header at most MAX_FIELD bytes, the head at most
  MAX_HEAD bytes (plus one read) and MAX_FIELDS fields, else 400 and close;
- a body over `max_body` bytes (compressed or not) is refused with 413, and
  gzip or deflate bodies are inflated no further than that;
- complete headers within `header_timeout` seconds of the connection's start
  or of the previous answer (an idle kept-alive connection too), else the
  connection is closed: slow clients hold only their own socket;
- a client that leaves cancels its handler (the upstream generation stops);
- HEAD gets the head only; HTTP/1.0 gets no chunks (the stream ends with the
  connection); writes wait while the client's socket buffer is full;
- `stop()`: stop listening, close idle connections, give answers under way
  `grace` seconds, then cancel them.

Malformed requests get 400 without an echo of what was sent (a folded
Authorization header would carry the key) and are logged at debug level.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import time
import zlib
from collections import deque
from email.utils import formatdate

import httptools

log = logging.getLogger("mlx-route-proxy")

MAX_FIELD = 8190  # request line, or one header's name and value (aiohttp's limits)
MAX_HEAD = 64 * 1024  # the whole head
MAX_FIELDS = 100
REASONS = {s.value: s.phrase for s in http.HTTPStatus}
REASONS[499] = "Client Closed Request"
ENCODINGS = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16,
             "deflate": zlib.MAX_WBITS}


class BadBody(Exception):
    """The request body cannot be had: too large (413), malformed or in an unknown
    encoding (400)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Malformed(Exception):
    """Raised in the parser's callbacks: the request breaks a limit."""


class Headers:
    """A request's headers, as the client sent them; names case-insensitive.
    `get` gives a str (UTF-8, surrogateescape), `getall_raw` the bytes as sent."""

    __slots__ = ("items",)

    def __init__(self, items: list[tuple[bytes, bytes]]):
        self.items = items  # (lower-case name, value)

    def getall_raw(self, name: str) -> list[bytes]:
        key = name.lower().encode("latin-1")
        return [v for k, v in self.items if k == key]

    def get(self, name: str, default=None):
        key = name.lower().encode("latin-1")
        for k, v in self.items:
            if k == key:
                return v.decode("utf-8", "surrogateescape")
        return default


class Request:
    """One request: method, path (without the query, not percent-decoded),
    headers, the body as it arrives, and a dict for the handlers' own notes
    (`request["sse"]`)."""

    __slots__ = ("method", "path", "headers", "version", "keep_alive",
                 "content_length", "protocol", "notes", "complete", "chunks", "size",
                 "waiter", "problem")

    def __init__(self, protocol: Connection, method: str, path: str, headers: Headers,
                 version: str, keep_alive: bool, content_length: int | None):
        self.protocol = protocol
        self.method = method
        self.path = path
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.notes: dict = {}
        self.complete = False  # the whole body is here
        self.chunks: list[bytes] = []
        self.size = 0
        self.waiter: asyncio.Future | None = None
        self.problem: BaseException | None = None  # why the body cannot be had

    # the handlers' notes
    def __getitem__(self, key):
        return self.notes[key]

    def __setitem__(self, key, value):
        self.notes[key] = value

    def get(self, key, default=None):
        return self.notes.get(key, default)

    def pop(self, key, default=None):
        return self.notes.pop(key, default)

    @property
    def transport(self) -> asyncio.Transport | None:
        """The client's connection, or None once it is gone."""
        return self.protocol.transport

    # the body
    def body(self) -> bytes:
        """The whole body (inflated); only when `complete`. BadBody if it cannot be had."""
        if self.problem is not None:
            raise self.problem
        raw = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        encoding = self.headers.get("Content-Encoding")
        if encoding is None or encoding.strip().lower() in ("", "identity"):
            return raw
        return self.inflate(raw, encoding.strip().lower())

    def inflate(self, raw: bytes, encoding: str) -> bytes:
        limit = self.protocol.server.max_body
        wbits = ENCODINGS.get(encoding)
        if wbits is None:
            raise BadBody(415, f"Content-Encoding {encoding!r} is not supported "
                               f"(send gzip, deflate or an uncompressed body)")
        for bits in ((wbits, -zlib.MAX_WBITS) if encoding == "deflate" else (wbits,)):
            inflater = zlib.decompressobj(bits)
            try:
                out = inflater.decompress(raw, limit + 1)
            except zlib.error:
                continue  # deflate: raw deflate without the zlib wrapper, as some send it
            if len(out) > limit or inflater.unconsumed_tail:
                raise BadBody(413, "body over the limit once inflated")
            if inflater.eof:
                return out
        raise BadBody(400, f"request body is not valid {encoding}")

    async def read(self) -> bytes:
        """The whole body once it is here (BadBody, or ConnectionResetError if the
        client leaves first)."""
        while not self.complete and self.problem is None:
            self.waiter = self.protocol.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.body()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def _date() -> bytes:
    now = int(time.time())
    if now != _date.at:
        _date.at, _date.text = now, formatdate(now, usegmt=True).encode()
    return _date.text


_date.at, _date.text = -1, b""


def _head(status: int, headers: dict | None, extra: bytes, close: bool,
          keep_alive_1_0: bool) -> bytes:
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, "Unknown").encode()),
             extra, b"Date: ", _date(), b"\r\n"]
    if headers:
        for name, value in headers.items():
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    if close:
        lines.append(b"Connection: close\r\n")
    elif keep_alive_1_0:
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


class Response:
    """An answer whose body is known: sent in one write, with its length."""

    __slots__ = ("status", "body", "headers", "content_type")

    def __init__(self, body: bytes = b"", status: int = 200, headers: dict | None = None,
                 content_type: str = "application/json; charset=utf-8"):
        self.status = status
        self.body = body
        self.headers = headers
        self.content_type = content_type

    def encode(self, close: bool, version: str = "1.1", head_only: bool = False) -> bytes:
        extra = b"Content-Type: %s\r\nContent-Length: %d\r\n" % (
            self.content_type.encode("latin-1"), len(self.body))
        head = _head(self.status, self.headers, extra, close, version == "1.0" and not close)
        return head if head_only else head + self.body

    def send(self, request: Request, close: bool) -> None:
        request.protocol.write(self.encode(close, request.version, request.method == "HEAD"))


class StreamResponse:
    """An answer sent as it is made: `await prepare(request)`, `await write(data)`
    any number of times, `await write_eof(last)`. Chunked for HTTP/1.1; for
    HTTP/1.0 the body ends when the connection closes. Writes raise
    ConnectionResetError once the client is gone, and wait while its socket
    buffer is full."""

    __slots__ = ("status", "headers", "request", "chunked", "finished", "close")

    def __init__(self, status: int = 200, headers: dict | None = None):
        self.status = status
        self.headers = headers
        self.request: Request | None = None
        self.chunked = True
        self.finished = False
        self.close = False

    async def prepare(self, request: Request) -> None:
        self.request = request
        self.chunked = request.version != "1.0"
        self.close = not self.chunked  # an HTTP/1.0 stream ends with the connection
        extra = b"Transfer-Encoding: chunked\r\n" if self.chunked else b""
        request.protocol.write(_head(self.status, self.headers, extra, self.close, False))

    async def write(self, data: bytes) -> None:
        if not data:
            return
        conn = self.request.protocol
        if self.request.method != "HEAD":
            conn.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        if conn.write_paused:
            await conn.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        if self.finished:
            return
        self.finished = True
        conn = self.request.protocol
        if self.request.method == "HEAD":
            return
        if self.chunked:
            conn.write((b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data)) if data else b"0\r\n\r\n")
        elif data:
            conn.write(data)


def error_body(status: int, message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


class Connection(asyncio.Protocol):
    """One client connection: parses with llhttp, answers its requests in turn."""

    def __init__(self, server: Server):
        self.server = server
        self.loop = server.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.parsing: Request | None = None  # the request whose bytes come in now
        self.current: Request | None = None  # the request being answered
        self.task: asyncio.Task | None = None
        self.pending: deque[Request] = deque()  # pipelined, waiting their turn
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.in_head = True  # the bytes coming now are a head (or nothing yet)
        self.head_bytes = 0
        self.waiting_since: float | None = None  # for a head, since (loop time)
        self.timer: asyncio.TimerHandle | None = None
        self.reading = True
        self.write_paused = False
        self.drain_waiter: asyncio.Future | None = None
        self.closing = False  # close after the current answer

    # -- transport events ------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.server.connections.add(self)
        if self.server.stopping:
            transport.close()
            return
        self.waiting_since = self.loop.time()
        self.arm()

    def connection_lost(self, exc) -> None:
        self.transport = None
        self.server.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client left: stop what it asked for
        for request in (self.parsing, self.current):
            if request is not None and not request.complete and request.problem is None:
                request.problem = ConnectionResetError("the client left")
                request._wake()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_exception(ConnectionResetError("the client left"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    async def drain(self) -> None:
        if self.transport is None:
            raise ConnectionResetError("the client left")
        if self.write_paused:
            self.drain_waiter = self.loop.create_future()
            try:
                await self.drain_waiter
            finally:
                self.drain_waiter = None

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client left")
        transport.write(data)

    def data_received(self, data: bytes) -> None:
        was_head = self.in_head
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An Upgrade or CONNECT: the request as parsed is answered, and the
            # connection closes after it (nothing here speaks another protocol).
            self.closing = True
            self.pause()
            if self.parsing is not None and not self.parsing.complete:
                self.refuse(self.parsing, "upgrade before the end of the request")
            return
        except (httptools.HttpParserError, _Malformed) as e:
            # (a limit broken in a callback comes out as HttpParserCallbackError)
            self.refuse(self.parsing, f"{type(e).__name__}: {type(e.__context__).__name__}")
            return
        if was_head and self.in_head:
            # A head can arrive a byte at a time; httptools keeps a header's pieces
            # until it is whole, so its size is bounded here, by what came.
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD:
                self.refuse(self.parsing, "head over the limit")

    def refuse(self, request: Request | None, why: str) -> None:
        """A malformed request: 400 and close (after the answer under way, if any)."""
        log.debug("refused a malformed request (%s)", why)
        self.pause()
        self.closing = True
        if request is not None and request is self.current and not request.complete:
            request.problem = BadBody(400, "malformed request body")
            request._wake()
            return
        if self.current is not None:
            return  # the answer under way goes out, then the connection closes
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(Response(error_body(400, "malformed HTTP request",
                                                     "invalid_request_error"), 400).encode(True))
            self.transport.close()

    def pause(self) -> None:
        if self.reading and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self.reading and not self.closing and self.transport is not None:
            self.reading = True
            self.transport.resume_reading()

    # -- the head timer: one per connection, moved only when it fires -----

    def arm(self) -> None:
        if self.timer is None and self.waiting_since is not None:
            self.timer = self.loop.call_at(self.waiting_since + self.server.header_timeout,
                                           self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        if self.transport is None or self.waiting_since is None:
            return
        if self.loop.time() >= self.waiting_since + self.server.header_timeout:
            log.debug("closed a connection that sent no complete head in %g s",
                      self.server.header_timeout)
            self.transport.close()
        else:
            self.arm()

    # -- parser callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.fields = []

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_FIELD:
            raise _Malformed("request line over the limit")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > MAX_FIELD or len(self.fields) >= MAX_FIELDS:
            raise _Malformed("header over the limits")
        self.fields.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0
        parser = self.parser
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            raise _Malformed("request target") from None
        path = (url.path or b"/").decode("utf-8", "surrogateescape")
        headers = Headers(self.fields)
        length = None
        for name, value in self.fields:
            if name == b"content-length":
                length = int(value)  # llhttp took it: digits, one value
                break
        request = Request(self, parser.get_method().decode("ascii", "replace"), path, headers,
                          parser.get_http_version(), parser.should_keep_alive(), length)
        self.parsing = request
        if self.current is None and not self.pending:
            self.start(request)
        else:
            self.pending.append(request)
            self.pause()

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        if request.problem is not None:
            return
        request.size += len(body)
        if request.size > self.server.max_body:
            request.problem = BadBody(413, "body over the limit")
            request.chunks = []
            request._wake()
            self.closing = True  # the rest of it is not read
            self.pause()
            return
        request.chunks.append(body)

    def on_message_complete(self) -> None:
        request = self.parsing
        self.parsing = None
        self.in_head = True
        if request is not None:
            request.complete = True
            request._wake()

    # -- answering -------------------------------------------------------

    def start(self, request: Request) -> None:
        self.current = request
        self.waiting_since = None
        self.task = self.loop.create_task(self.answer(request))

    async def answer(self, request: Request) -> None:
        try:
            resp = await self.server.handler(request)
        except asyncio.CancelledError:
            return  # the client left, or the server stopped
        except Exception as e:  # a handler's bug: 500, the connection closes
            log.error("error handling a request: %s", type(e).__name__, exc_info=e)
            resp = None
        if self.transport is None:
            return
        close = self.must_close(request)
        try:
            if isinstance(resp, Response):
                resp.send(request, close)
            elif isinstance(resp, StreamResponse) and resp.request is request:
                if not resp.finished:
                    await resp.write_eof()
                close = close or resp.close
            else:
                if resp is not None:
                    log.error("a handler answered %r", type(resp).__name__)
                sent = request.get("sse") is not None  # a stream under way cannot take a 500
                if not sent:
                    body = error_body(500, "internal error (see the proxy's log)",
                                      "internal_error")
                    Response(body, 500).send(request, close=True)
                close = True
            if close:
                self.transport.close()
                return
            if self.write_paused:
                await self.drain()
        except (ConnectionResetError, OSError):
            if self.transport is not None:
                self.transport.close()
            return
        self.task = None
        self.current = None
        if self.pending:
            self.start(self.pending.popleft())
            if not self.pending:
                self.resume()
        else:
            self.waiting_since = self.loop.time()
            self.arm()
            self.resume()

    def must_close(self, request: Request) -> bool:
        return (self.closing or self.server.stopping or not request.keep_alive
                or not request.complete)


class Server:
    """Listens and answers with `handler(request) -> Response | StreamResponse`."""

    def __init__(self, handler, *, max_body: int, header_timeout: float, grace: float = 5.0):
        self.handler = handler
        self.max_body = max_body
        self.header_timeout = header_timeout
        self.grace = grace
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.stopping = False
        self.listener: asyncio.AbstractServer | None = None

    async def listen(self, host: str | None, port: int, backlog: int = 1024) -> None:
        self.listener = await self.loop.create_server(lambda: Connection(self), host, port,
                                                      backlog=backlog)

    async def stop(self) -> None:
        """Stop listening, close idle connections, give answers under way `grace`
        seconds, then cancel them."""
        self.stopping = True
        if self.listener is not None:
            self.listener.close()
        for conn in list(self.connections):
            if conn.current is None and conn.transport is not None:
                conn.transport.close()
        busy = [c.task for c in self.connections if c.task is not None and not c.task.done()]
        if busy:
            await asyncio.wait(busy, timeout=self.grace)
        for conn in list(self.connections):
            if conn.task is not None and not conn.task.done():
                conn.task.cancel()
            if conn.transport is not None:
                conn.transport.close()
        await asyncio.sleep(0)
