"""The proxy's HTTP surface: handlers, the key check, readiness, forwarding.

Served by server.py (HTTP/1.1 on llhttp): `Front` finds the handler with one
dict lookup and wraps it in the key check and the counting."""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import math
from asyncio import timeout as deadline  # (the host's Python is 3.11 or later)

from . import metrics as metrics_mod
from .admission import Deadline, Gate, QueueFull
from .affinity import CacheUsage, Policy, stream_usage
from .metrics import GENERATION_PATHS, Metrics
from .routing import (UNKNOWN, Router, parse_key_files, parse_replicas, parse_routes,
                      read_upstream_key, route_args, upstream_urls)
from .server import BadBody, Request, Response, StreamResponse, error_body
from .sse import (Assembler, BadUpstream, EventSplitter, as_stream, dumps, event_data, loads,
                  rename_event)
from .upstream import FirstByteTimeout, Upstream, UpstreamConnection
from .watchdog import Watchdog, note_expired

log = logging.getLogger("mlx-route-proxy")

# Request fields that make mlx_lm.server load something from disk.
STRIPPED_FIELDS = ("model", "draft_model", "adapters")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}
OPEN_PATHS = ("/health",)  # answered without the key (with less detail)
# After [DONE] the client gets its answer at once; the upstream has this long
# to end its message before its connection is closed instead of reused.
DONE_GRACE_S = 0.5


class UpstreamUnavailable(Exception):
    """The upstream cannot take requests now (refused, reset, dying, loading): the
    proxy answers 503. Raised from a failed connection (an OSError such as
    `upstream.UpstreamError`) or a 5xx answer. `unreached`: the upstream said 503,
    so no generation started there (another host's proxy whose server is down or
    restarting) and another replica may take the request."""

    def __init__(self, message: str, unreached: bool = False):
        super().__init__(message)
        self.unreached = unreached


class StreamCut(ConnectionError):
    """The upstream's stream ended before `data: [DONE]`."""


def json_response(data, status: int = 200, headers: dict | None = None) -> Response:
    return Response(dumps(data), status, headers)


def error(status: int, message: str, kind: str, headers: dict | None = None) -> Response:
    """An OpenAI-shaped error, which the openai SDK turns into a typed exception
    (the shape server.py's own 400 and 500 have too)."""
    return Response(error_body(status, message, kind), status, headers)


async def sse_error(out: StreamResponse, message: str, kind: str) -> None:
    """An error event for a stream already under way (the openai SDK raises it)."""
    try:
        await out.write(b"data: " + json.dumps(
            {"error": {"message": message, "type": kind}}).encode() + b"\n\n")
        await out.write_eof()
    except (ConnectionResetError, OSError, RuntimeError):
        pass


class Proxy:
    def __init__(self, args: argparse.Namespace, key: bytes | None):
        self.args = args
        self.key = key
        self.upstream = args.upstream.rstrip("/")
        self.gate = Gate(args.concurrency, args.queue)
        self.metrics = Metrics()
        self.pool = Upstream(args.upstream, args.connect_timeout_s, keep=args.concurrency + 2,
                             first_byte_timeout_s=args.first_byte_timeout_s,
                             key=getattr(args, "upstream_key", None))
        self.ready = False
        self.last_ok = -math.inf  # loop time of the last proof of readiness
        self.last_probe = -math.inf  # loop time the last probe started
        self.last_problem = "not probed yet"
        self.probe_task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.recover_task: asyncio.Task | None = None
        # loop time of the last byte of a generation in flight (tokens, or the
        # `: keepalive` lines of a prefill): the watchdog's sign of progress
        self.last_upstream_activity = -math.inf
        self.watchdog: Watchdog | None = None
        self.router: Router | None = None  # several models: who answers which name (routing.py)
        self.usage = CacheUsage()  # prompt and cached tokens the upstream reported
        self.ask_usage = False  # ask every stream's usage upstream (set by the Router)

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.now = self.loop.time  # the method below, one call fewer (~10 a request)
        self.mark_down("not probed yet")
        if getattr(self.args, "restart_command", None):
            self.watchdog = Watchdog(self, self.args)
            self.watchdog.start()

    async def stop(self) -> None:
        for task in (self.probe_task, self.recover_task):
            if task is not None:
                task.cancel()
        if self.watchdog is not None:
            self.watchdog.stop()
        self.pool.close()

    # -- readiness ----------------------------------------------------------

    def now(self) -> float:
        return self.loop.time()

    def mark_ok(self) -> None:
        self.ready = True
        self.last_ok = self.now()

    def mark_down(self, problem: str) -> None:
        self.last_problem = problem
        if self.ready:
            log.warning("upstream not ready: %s", problem)
        self.ready = False
        if self.recover_task is None or self.recover_task.done():
            self.recover_task = asyncio.ensure_future(self.recover())

    async def recover(self) -> None:
        """Probe until the upstream generates again."""
        while not self.ready:
            if await self.probe():
                log.info("upstream ready: %s", self.upstream)
                return
            await asyncio.sleep(self.args.retry_after_ms / 1000)

    def probing(self) -> bool:
        return self.probe_task is not None and not self.probe_task.done()

    def probe(self) -> asyncio.Future:
        """One shared 1-token generation; callers may stop waiting, it goes on."""
        if not self.probing():
            self.last_probe = self.now()
            self.probe_task = asyncio.ensure_future(self._probe())
        return asyncio.shield(self.probe_task)

    async def _probe(self) -> bool:
        body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                           "stream": True}).encode()
        conn = None
        try:
            async with deadline(self.args.probe_timeout_s):
                conn = await self.pool.post("/v1/chat/completions", body, wait_head=False,
                                            first_byte=False)
                # Read to the end: leaving early makes the server log a
                # broken pipe for every probe.
                raw = await conn.read_all()
                self.pool.release(conn)
                if conn.status != 200:
                    text = raw[:200].decode("utf-8", "replace")
                    self.metrics.upstream_error("probe")
                    self.last_problem = f"probe answered {conn.status}: {text}"
                    if conn.status >= 500 or "generation thread died" in text:
                        self.ready = False
                    return False
                if raw.startswith(b"data: {") or b"\ndata: {" in raw:
                    self.mark_ok()
                    return True
                self.last_problem = "probe stream ended without a token"
        except asyncio.TimeoutError:
            self.last_problem = (f"no token within {self.args.probe_timeout_s:g} s "
                                 f"(model still loading?)")
        except OSError as e:
            self.last_problem = f"cannot reach {self.upstream}: {e or type(e).__name__}"
        finally:
            if conn is not None and not conn.done:
                conn.abort()
        self.metrics.upstream_error("probe")
        return False

    # -- responses ----------------------------------------------------------

    def retry_headers(self) -> dict:
        ms = self.args.retry_after_ms
        return {"Retry-After": str(math.ceil(ms / 1000)), "retry-after-ms": str(ms)}

    def maintenance(self) -> str | None:
        """The deploy's note while it restarts the server, or None (read on error paths only)."""
        if not self.args.maintenance_file:
            return None
        try:
            with open(self.args.maintenance_file) as handle:
                note = json.load(handle)
        except (OSError, ValueError):
            return None
        if not isinstance(note, dict) or note_expired(note):
            return None  # (expired: the switch that wrote it died half-way)
        return str(note.get("message") or "the model is restarting")

    def unavailable(self, problem: str) -> Response:
        note = self.maintenance()
        if note:
            return error(503, f"{note}; retry after {math.ceil(self.args.retry_after_ms / 1000)} s",
                         "upstream_restarting", self.retry_headers())
        return error(503, f"upstream not ready: {problem}", "upstream_unavailable",
                     self.retry_headers())

    def authorized(self, request: Request) -> bool:
        """One `Authorization: Bearer <key>` header with the key; any bytes are fine."""
        if self.key is None:
            return True
        given = request.headers.getall_raw("Authorization")
        if len(given) != 1:
            return False
        scheme, _, token = given[0].partition(b" ")
        # compare_digest runs in time independent of where the strings differ
        return hmac.compare_digest(token.strip(), self.key) and scheme.lower() == b"bearer"

    def unauthorized(self) -> Response:
        return error(401, "missing or wrong API key: send 'Authorization: Bearer "
                          "<key>' (the key is in proxy.key on the host)", "authentication_error",
                          {"WWW-Authenticate": "Bearer"})

    # -- handlers -----------------------------------------------------------

    async def handle_generation(self, request: Request) -> Response | StreamResponse:
        started = self.now()
        path = request.path
        if request.method != "POST":
            return error(405, f"{path} takes POST", "invalid_request_error", {"Allow": "POST"})
        if (request.content_length or 0) > self.args.max_body_bytes:
            return self.too_large()
        try:
            if request.complete:  # the body came with the headers: no timer, no waiting
                raw = request.body()
            else:
                async with deadline(self.args.body_timeout_s):
                    raw = await request.read()
        except BadBody as e:
            if e.status == 413:
                return self.too_large()
            return error(e.status, str(e), "invalid_request_error")
        except asyncio.TimeoutError:
            return error(408, f"request body not received within {self.args.body_timeout_s:g} s",
                         "invalid_request_error")
        try:
            body = loads(raw)
        except ValueError as e:
            return error(400, f"request body is not valid JSON: {e}", "invalid_request_error")
        if not isinstance(body, dict):
            return error(400, "request body must be a JSON object", "invalid_request_error")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            return error(400, "'stream' must be true or false", "invalid_request_error")
        name = body.get("model") or self.args.public_name
        if not isinstance(name, str):
            return error(400, "'model' must be a string", "invalid_request_error")
        logprobs, top = body.get("logprobs"), body.get("top_logprobs")
        if logprobs is not None and not isinstance(logprobs, (bool, int)):
            return error(400, "'logprobs' must be a boolean or an integer",
                         "invalid_request_error")
        if top is not None and (isinstance(top, bool) or not isinstance(top, int)):
            return error(400, "'top_logprobs' must be an integer", "invalid_request_error")
        untouched = raw  # forwarded as the client wrote it unless a field goes
        for field in STRIPPED_FIELDS:
            if field in body:
                del body[field]
                untouched = None
        if self.router is not None:  # several models: the one the name says (routing.py)
            replicas = self.router.pick(name)
            if replicas is None:
                self.router.count(UNKNOWN, 404)
                return error(404, self.router.unknown_message(name), "invalid_request_error")
            return await self.router.serve(replicas, request, started, path, body, name,
                                           untouched, stream, logprobs, top)
        return await self.serve(request, started, path, body, name, untouched, stream, logprobs,
                                top)

    async def serve(self, request, started, path, body, name, untouched, stream, logprobs, top):
        """A checked generation request to this model's upstream: queue, forward, answer.
        request["unreached"]: it never reached the upstream (a replica may take it)."""
        if not self.ready:
            request["unreached"] = True
            return self.unavailable(self.last_problem)

        acquired = False
        end = started + self.args.request_timeout_s
        try:
            with Deadline(self.pool.ticker, end):
                acquired = self.gate.try_acquire() or await self.acquire()
                if stream:
                    return await self.forward_stream(request, path, body, name, untouched)
                if logprobs or (top or 0) > 0:
                    resp = await self.forward_plain(path, body, name)
                else:
                    resp = await self.forward_assembled(path, body, name, untouched)
                if self.now() > end:  # assembly is linear, but the deadline is the deadline
                    raise asyncio.TimeoutError
                return resp
        except QueueFull:
            return error(429, f"{self.gate.limit} generations running and "
                         f"{self.gate.queue} waiting; retry later", "rate_limit_error",
                         self.retry_headers())
        except asyncio.TimeoutError:
            self.metrics.cancel("deadline")
            msg = f"no complete answer within --request-timeout-s {self.args.request_timeout_s:g}"
            return await self.fail(request, 504, msg, "timeout")
        except FirstByteTimeout as e:
            self.metrics.cancel("first_byte")
            self.metrics.upstream_error("first_byte_timeout")
            return await self.fail(request, 504, f"{e} (--first-byte-timeout-s)", "timeout")
        except UpstreamUnavailable as e:
            if e.__cause__ is not None or e.unreached:  # no connection, no answer, or a 503
                request["unreached"] = True
            self.mark_down(str(e))
            return self.unavailable(str(e))
        except BadUpstream as e:
            self.metrics.upstream_error("malformed")
            return await self.fail(request, 502, f"upstream sent a malformed answer: {e}",
                                   "upstream_error")
        except asyncio.CancelledError:
            self.metrics.cancel("client_left")
            raise
        except (ConnectionResetError, OSError) as e:
            if request.transport is None or request.transport.is_closing():
                self.metrics.cancel("client_left")  # we were writing to a client that left
                sent = request.get("sse")
                return sent if sent is not None else error(499, "client left", "client_left")
            self.metrics.upstream_error("broken_stream")
            self.mark_down(f"upstream stream broke: {e or type(e).__name__}")
            if request.get("sse") is None and self.maintenance():
                # the deploy stopped the server and nothing was sent yet: retry
                return self.unavailable(str(e))
            return await self.fail(request, 502,
                                   f"upstream broke off the answer: {e or type(e).__name__}",
                                   "upstream_error")
        finally:
            if acquired:
                self.gate.release()

    async def acquire(self) -> bool:
        """Wait for a slot (QueueFull when the queue is full); True once it is ours."""
        await self.gate.acquire()
        return True

    async def fail(self, request, status: int, message: str, kind: str):
        """An error answer; in-band once a stream's headers are out."""
        sent = request.get("sse")
        if sent is not None:
            if not request.get("sse_done"):  # nothing goes after [DONE]
                await sse_error(sent, message, kind)
            return sent
        return error(status, message, kind)

    def too_large(self) -> Response:
        return error(413, f"request body over --max-body-bytes {self.args.max_body_bytes}",
                     "invalid_request_error")

    async def open_upstream(self, path: str, body: dict, raw: bytes | None = None):
        """POST to the upstream; UpstreamUnavailable when it cannot take the request."""
        try:
            conn = await self.pool.post(path, raw or dumps(body))
        except FirstByteTimeout:
            raise
        except OSError as e:
            self.metrics.upstream_error("connect")
            raise UpstreamUnavailable(f"cannot reach {self.upstream}: {e or type(e).__name__}") from e
        if conn.status != 200:
            try:
                raw = await conn.read_all()
            except BaseException:
                conn.abort()
                raise
            self.pool.release(conn)
            self.check_unavailable(conn.status, raw)
            return conn, raw
        return conn, None

    async def exchange(self, path: str, body: dict, on_body=None, raw: bytes | None = None):
        """POST (raw: the body's bytes, if known) and read the whole answer, waking once;
        UpstreamUnavailable as open_upstream."""
        conn = None
        try:
            conn = await self.pool.post(path, raw or dumps(body), wait_head=False)
            raw = await conn.read_all(on_body)
        except FirstByteTimeout:
            conn.abort(reset=True)
            raise
        except OSError as e:
            if conn is None or conn.status == 0:  # no answer at all: as a failed connect
                if conn is not None:
                    conn.abort()
                self.metrics.upstream_error("connect")
                raise UpstreamUnavailable(f"cannot reach {self.upstream}: {e or type(e).__name__}") from e
            conn.abort(reset=True)
            raise
        except BaseException:
            if conn is not None:
                conn.abort(reset=True)
            raise
        self.pool.release_later(conn, DONE_GRACE_S)  # on_body may stop at [DONE]
        if conn.status != 200:
            self.check_unavailable(conn.status, raw)
        return conn, raw

    def check_unavailable(self, status: int, raw: bytes) -> None:
        """UpstreamUnavailable for an error answer that says the upstream cannot generate
        now (a 5xx, or mlx_lm.server's 404 "generation thread died"); a 503 also says
        no generation started there (another replica may take the request)."""
        if status >= 500 or b"generation thread died" in raw:
            self.metrics.upstream_error(f"status_{status}")
            raise UpstreamUnavailable(f"upstream answered {status}: "
                                      f"{raw[:200].decode('utf-8', 'replace')}",
                                      unreached=status == 503)

    def passthrough_error(self, resp: UpstreamConnection, raw: bytes) -> Response:
        """The upstream's own error (a 4xx: bad request, unknown model), OpenAI-shaped."""
        status = resp.status if 400 <= resp.status < 500 else 502
        try:
            payload = loads(raw)
        except ValueError:
            payload = None
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            return json_response(payload, status=status)
        if isinstance(payload, dict) and isinstance(payload.get("error"), str):
            message = payload["error"]
        else:
            message = raw[:1000].decode("utf-8", "replace")
        return error(status, message, "upstream_error")

    async def forward_stream(self, request, path, body, name, untouched=None):
        watch, strip = stream_usage(body, self.ask_usage)
        if strip:
            untouched = None  # stream_options changed
        resp, raw = await self.open_upstream(path, body, untouched)
        if raw is not None:
            return self.passthrough_error(resp, raw)
        try:
            out = StreamResponse(200, SSE_HEADERS)
            await out.prepare(request)
            request["sse"] = out
            splitter = EventSplitter()
            field = b'"model": ' + json.dumps(name).encode()
            finished = False  # [DONE] seen
            tail = b""
            while data := await resp.read_some():
                self.last_upstream_activity = self.now()
                if b"data: {" in data:  # tokens are coming: the upstream is healthy
                    self.last_ok = self.now()
                events = splitter.feed(data)
                if not events:
                    continue
                renamed = []
                for e in events:
                    if watch and b'"usage": {' in e:  # the usage chunk (cached tokens)
                        self.usage.add_event(event_data(e))
                        if strip:  # asked by the proxy, not by the client
                            continue
                    try:
                        renamed.append(rename_event(e, name, field))
                    except BadUpstream:
                        await out.write(b"".join(renamed))  # what came before it, then the error
                        raise
                    if e.endswith(b"[DONE]") and event_data(e) == b"[DONE]":
                        finished = True  # anything after [DONE] goes nowhere
                        break
                renamed = b"".join(renamed)
                if finished or resp.done:  # the last events go out with the end: one send
                    tail = renamed
                    break
                await out.write(renamed)
        except BaseException:
            resp.abort(reset=True)
            raise
        if not finished:
            # Cut off (mlx_lm.server streams until it closes the connection): a
            # partial last event is dropped, and the client is told in-band.
            resp.abort()
            if tail:
                await out.write(tail)
            raise StreamCut("the upstream stream ended before [DONE]")
        request["sse_done"] = True
        await out.write_eof(tail)
        if not resp.complete:
            # The client has its whole answer; wait a moment for the upstream's
            # end of message, to reuse the connection, and never long.
            try:
                async with deadline(DONE_GRACE_S):
                    while await resp.read_some():
                        pass
            except (asyncio.TimeoutError, OSError):
                resp.abort()
        self.pool.release(resp)
        return out

    async def forward_plain(self, path, body, name) -> Response:
        resp, raw = await self.exchange(path, body)
        if resp.status != 200:
            return self.passthrough_error(resp, raw)
        try:
            reply = loads(raw)
        except ValueError as e:
            raise BadUpstream(f"reply is not valid JSON: {e}") from None
        self.mark_ok()
        if isinstance(reply, dict) and "model" in reply:
            reply["model"] = name
            self.usage.add(reply.get("usage"))
        return json_response(reply)

    async def forward_assembled(self, path, body, name, untouched=None) -> Response:
        # the client's bytes with two keys changed when that is sure, else encoded anew
        streamed = as_stream(untouched, body) if untouched is not None else None
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        # Events are parsed and merged as they arrive, while the upstream is
        # still writing the next ones: linear in the answer, and other clients
        # are served between the pieces.
        collect = Collector(self, name)
        resp, raw = await self.exchange(path, body, collect, streamed)
        if resp.status != 200:
            return self.passthrough_error(resp, raw)
        if not collect.done and collect.bad is None:
            collect(b"\n\n")  # a last event without its blank line
        if collect.bad is not None:
            raise collect.bad
        if not collect.done:
            raise StreamCut("the upstream stream ended before [DONE]")
        assembler = collect.assembler
        if assembler.error is not None:
            return error(502, f"upstream error: {assembler.error}", "upstream_error")
        self.usage.add(assembler.usage)
        return json_response(assembler.reply())

    async def handle_models(self, request: Request, wanted: str | None = None) -> Response:
        # Our own answer: mlx_lm.server lists its HF cache and local paths (and
        # fails with an empty body when the cache folder is missing), not the
        # one model it serves under the name clients use.
        names = [self.args.public_name] if self.router is None else self.router.entries()
        if wanted is None:
            return json_response({"object": "list", "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "mlx-route"}
                for n in names]})
        if self.router is not None and not self.router.single:
            replicas = self.router.pick(wanted)
            if replicas is None:
                return error(404, self.router.unknown_message(wanted), "invalid_request_error")
            return json_response({"id": replicas[0].args.public_name, "object": "model",
                                      "created": 0, "owned_by": "mlx-route"})
        entry = {"id": self.args.public_name, "object": "model", "created": 0,
                 "owned_by": "mlx-route"}
        if wanted != self.args.public_name:
            return error(404, f"no model {wanted!r}; this proxy serves "
                         f"{self.args.public_name!r}", "invalid_request_error")
        return json_response(entry)

    async def handle_health(self, request: Request) -> Response:
        # Open without a key so supervisors and load balancers can ask: then it
        # says ok or unavailable and nothing else, and starts at most one probe
        # per --health-cache-s (while the upstream is down the proxy probes
        # on its own). With the key (or with none set): the problem and upstream.
        trusted = self.authorized(request)
        now = self.now()
        fresh = self.ready and now - self.last_ok < self.args.health_cache_s
        if not fresh:
            may_probe = trusted or self.probing() or (
                self.ready and now - self.last_probe >= self.args.health_cache_s)
            if may_probe:
                try:
                    async with deadline(self.args.health_wait_s):
                        fresh = await self.probe()
                except asyncio.TimeoutError:
                    self.last_problem = (f"no token within --health-wait-s "
                                         f"{self.args.health_wait_s:g}")
            else:
                fresh = self.ready
        down = {} if self.router is None else self.router.down(self, fresh)
        if (fresh if self.router is None else not down):
            body = {"status": "ok", "upstream": self.upstream} if trusted else {"status": "ok"}
            return json_response(body)
        body = {"status": "unavailable"}
        if trusted:
            body.update(upstream=self.upstream, problem=self.last_problem if self.router is None
                        else "; ".join(f"model {m!r}: {problem}" for m, problem in down.items()))
        return json_response(body, status=503, headers=self.retry_headers())

    async def handle_metrics(self, request: Request) -> Response:
        text = self.metrics.render(self.gate.active, len(self.gate.waiters), self.ready)
        if self.watchdog is not None:
            text += "\n".join(self.watchdog.render()) + "\n"
        if self.router is not None:
            text += self.router.render()
        else:
            text += "\n".join(self.usage.render()) + "\n"
        return Response(text.encode(), content_type="text/plain; charset=utf-8")

    async def handle_unknown(self, request: Request) -> Response:
        return error(404, f"no route {request.method} {request.path}; this proxy serves POST "
                     f"{', '.join(GENERATION_PATHS)}, GET /v1/models, /health, /metrics",
                     "not_found")


class Collector:
    """forward_assembled's reader: takes the events of each piece of the upstream's
    stream as it arrives (read_all's on_body) into an Assembler; true once [DONE]
    came (the rest is not needed). A malformed event is kept in `bad`."""

    __slots__ = ("proxy", "assembler", "splitter", "done", "bad")

    def __init__(self, proxy: Proxy, name: str):
        self.proxy = proxy
        self.assembler = Assembler(name)
        self.splitter = EventSplitter()
        self.done = False
        self.bad: BadUpstream | None = None

    def __call__(self, piece: bytes) -> bool:
        proxy = self.proxy
        proxy.last_upstream_activity = now = proxy.now()
        if self.done or self.bad is not None:
            return False
        try:
            payloads = None
            if (piece.endswith(b"\n\n") and b"\r" not in piece and not self.splitter.pending
                    and not self.splitter.cr):
                # whole one-line `data: ` events, the usual case: what the
                # splitter and event_data would make of them
                payloads = piece[:-2].split(b"\n\n")
                for i, event in enumerate(payloads):
                    if not event.startswith(b"data: ") or b"\n" in event:
                        payloads = None
                        break
                    payloads[i] = event[6:]
            if payloads is None:
                payloads = [event_data(event) for event in self.splitter.feed(piece)]
            for payload in payloads:
                if payload is None:
                    continue
                if payload == b"[DONE]":
                    self.done = True
                    return True
                proxy.last_ok = now  # tokens are coming: the upstream is healthy
                try:
                    chunk = loads(payload)
                except ValueError as e:
                    raise BadUpstream(f"event is not valid JSON: {e}") from None
                self.assembler.add(chunk)
        except BadUpstream as e:
            self.bad = e
        return False


def auth_middleware(proxy: Proxy, handler):
    """`handler` behind the key: every path but /health needs it (checked before the
    path is looked at: 401 comes before 404 or 405)."""
    key, authorized, unauthorized = proxy.key, proxy.authorized, proxy.unauthorized

    async def check_key(request: Request):
        if key is not None and request.path not in OPEN_PATHS and not authorized(request):
            return unauthorized()
        return await handler(request)

    return check_key


MODELS_PREFIX = "/v1/models/"


class Front:
    """What the server calls with each request: the Expect check,
    then the counting (metrics), the key check and the handler of the path.

    The paths: the generation paths take any
    method (the handler answers 405), /v1/models[/<name>], /health and
    /metrics take GET and HEAD, anything else is handle_unknown's 404.
    """

    def __init__(self, proxy: Proxy, proxies: list[Proxy], key: bytes | None):
        self.proxy = proxy
        self.proxies = proxies  # every model's and replica's Proxy, started and stopped here
        self.any_method = dict.fromkeys(GENERATION_PATHS, proxy.handle_generation)
        self.get = {"/v1/models": proxy.handle_models, "/health": proxy.handle_health,
                    "/metrics": proxy.handle_metrics}
        handler = self.dispatch
        if key is not None:
            handler = auth_middleware(proxy, handler)
        self.counted = metrics_mod.middleware(proxy.metrics, handler)

    async def __call__(self, request: Request) -> Response | StreamResponse:
        expect = request.headers.get("Expect")
        if expect and request.version == "1.1":  # before the key and the counting
            if expect.lower() != "100-continue":
                return error(417, "unknown Expect; only 100-continue is understood",
                             "invalid_request_error")
            if not request.complete:
                request.protocol.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return await self.counted(request)

    async def dispatch(self, request: Request) -> Response | StreamResponse:
        path = request.path
        handler = self.any_method.get(path)
        if handler is not None:
            return await handler(request)
        if request.method in ("GET", "HEAD"):
            handler = self.get.get(path)
            if handler is not None:
                return await handler(request)
            if path.startswith(MODELS_PREFIX) and len(path) > len(MODELS_PREFIX):
                return await self.proxy.handle_models(request, path[len(MODELS_PREFIX):])
        return await self.proxy.handle_unknown(request)

    async def start(self) -> None:
        for proxy in self.proxies:
            await proxy.start()

    async def stop(self) -> None:
        for proxy in self.proxies:
            await proxy.stop()


def build_app(args: argparse.Namespace, key: bytes | None) -> Front:
    routes, aliases = parse_routes(getattr(args, "route", None) or [],
                                   getattr(args, "alias", None) or [], args.public_name)
    replicas = parse_replicas(getattr(args, "replica", None) or [],
                              [args.public_name, *(r["name"] for r in routes)])
    keys = parse_key_files(getattr(args, "upstream_key_file", None) or [],
                           upstream_urls(args, routes, replicas))
    if keys.get(args.upstream):  # the first model's upstream is another host's proxy
        args = argparse.Namespace(**{**vars(args),
                                     "upstream_key": read_upstream_key(keys[args.upstream])})
    proxy = Proxy(args, key)
    proxies = [proxy]
    routes = [{**r, "key_file": keys.get(r["upstream"])} for r in routes]
    replicas = [{**r, "key_file": keys.get(r["upstream"])} for r in replicas]
    if routes or replicas:  # several models or replicas, one Proxy each (routing.py)
        models = {args.public_name: [proxy]}
        for route in [*routes, *replicas]:
            other = Proxy(route_args(args, route), key)
            models.setdefault(route["name"], []).append(other)
            proxies.append(other)
        proxy.router = Router(models, aliases, Policy(
            args.replica_policy, args.affinity_min_match, args.affinity_max_imbalance,
            args.affinity_max_entries, args.affinity_block_chars))
    return Front(proxy, proxies, key)
