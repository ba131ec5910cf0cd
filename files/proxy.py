#!/usr/bin/env python3
"""OpenAI-compatible front door for mlx_lm.server (one file, aiohttp).

    python proxy.py --host 0.0.0.0 --port 8026 --upstream http://127.0.0.1:8025 \
        --public-name glm-5.2 --api-key-file ~/.local/share/mlx-route/proxy.key

What it does, and why (mlx-lm 0.32.2 behaviour, see mlx_lm/server.py):
- Strips `model` (mlx_lm.server tries to load a model of that name and answers
  404), and `draft_model` / `adapters` (they name files on the host that the
  server would load). Replies carry the requested name, or --public-name, in
  JSON bodies and in every SSE chunk; every other field passes untouched.
- Always asks the upstream for a stream. mlx_lm.server only notices a client
  that left when it writes, so a non-streaming request runs on to max_tokens
  after its client is gone (the field report's "wedged for minutes"). A
  streaming upstream writes every token; when our client leaves, we close the
  upstream socket and the server stops at its next token. Non-streaming
  clients get the JSON a non-streaming reply would have had, assembled here.
  Exception: a non-streaming request asking for logprobs is forwarded as is,
  because mlx_lm.server puts logprobs in non-streaming replies only.
- Admission control (--concurrency, --queue), a deadline per request, body
  size and read-time limits, a real readiness probe (the server's own /health
  says 200 while the model is still loading), Prometheus /metrics.
- With --api-key-file every request but /health needs
  `Authorization: Bearer <key>`; it refuses to listen beyond loopback
  without one.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import ssl
import stat
import struct
import sys
import time
import urllib.parse
from collections import deque

from aiohttp import ClientError, web

if sys.version_info >= (3, 11):
    from asyncio import timeout as deadline
else:  # aiohttp depends on async-timeout below 3.11
    from async_timeout import timeout as deadline

log = logging.getLogger("mlx-route-proxy")

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/chat/completions")
# Request fields that make mlx_lm.server load something from disk.
STRIPPED_FIELDS = ("model", "draft_model", "adapters")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
                   1800)
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="OpenAI-compatible proxy in front of mlx_lm.server",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; beyond loopback needs --api-key-file")
    p.add_argument("--port", type=int, default=8026, help="port to listen on")
    p.add_argument("--upstream", default="http://127.0.0.1:8025",
                   help="base URL of mlx_lm.server")
    p.add_argument("--api-key-file", default=None,
                   help="file holding the API key (mode 0600); clients send "
                        "'Authorization: Bearer <key>'")
    p.add_argument("--public-name", default="default_model",
                   help="model name in replies when the client named none, and in /v1/models")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                   help="largest request body accepted (413 above)")
    p.add_argument("--concurrency", type=int, default=4,
                   help="generations forwarded to the upstream at once")
    p.add_argument("--queue", type=int, default=32,
                   help="generations allowed to wait for a slot (429 beyond)")
    p.add_argument("--request-timeout-s", type=float, default=1800,
                   help="deadline of one generation request, queueing included; "
                        "the upstream generation is stopped when it passes")
    p.add_argument("--header-timeout-s", type=float, default=10,
                   help="time a client has to send its request headers (also the idle "
                        "keep-alive time)")
    p.add_argument("--body-timeout-s", type=float, default=30,
                   help="time a client has to send its request body")
    p.add_argument("--connect-timeout-s", type=float, default=5,
                   help="time to open a connection to the upstream")
    p.add_argument("--probe-timeout-s", type=float, default=120,
                   help="time the readiness probe (a 1-token generation) may take")
    p.add_argument("--health-cache-s", type=float, default=30,
                   help="/health trusts a successful generation or probe this recent")
    p.add_argument("--health-wait-s", type=float, default=15,
                   help="longest /health waits for a probe before answering 503")
    p.add_argument("--retry-after-ms", type=int, default=1000,
                   help="Retry-After hint sent with 503 and 429")
    p.add_argument("--maintenance-file", default=None,
                   help="JSON note ({\"message\": ...}) the deploy writes while it restarts the "
                        "server on purpose: 503s then say so, and an answer the restart broke "
                        "off gets 503 + Retry-After instead of 502")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p.parse_args(argv)


def validate(args: argparse.Namespace) -> str | None:
    """The first problem with the flags as one line, or None."""
    if not 0 < args.port < 65536:
        return f"--port {args.port} is not a TCP port (1-65535)"
    if not args.upstream.startswith(("http://", "https://")):
        return f"--upstream {args.upstream!r} must be an http:// or https:// URL"
    for name in ("max_body_bytes", "concurrency", "request_timeout_s", "header_timeout_s",
                 "body_timeout_s", "connect_timeout_s", "probe_timeout_s", "retry_after_ms"):
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})"
    if args.queue < 0:
        return f"--queue must be 0 or more (got {args.queue})"
    if args.api_key_file is None:
        if not is_loopback(args.host):
            return (f"refusing to listen on {args.host} without --api-key-file: anyone on the "
                    f"network could use the model; give a key file or use --host 127.0.0.1")
        return None
    try:
        st = os.stat(args.api_key_file)
    except OSError as e:
        return f"--api-key-file {args.api_key_file}: {e.strerror}"
    if st.st_mode & 0o077:
        return (f"--api-key-file {args.api_key_file} is readable by others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {args.api_key_file}")
    if len(read_key(args.api_key_file)) < 16:
        return f"--api-key-file {args.api_key_file} holds no key of 16 or more characters"
    return None


# ---------------------------------------------------------------------------
# State: readiness, admission, metrics
# ---------------------------------------------------------------------------


class QueueFull(Exception):
    pass


class Gate:
    """At most `limit` holders, at most `queue` waiters; first come, first served."""

    def __init__(self, limit: int, queue: int):
        self.limit, self.queue = limit, queue
        self.active = 0
        self.waiters: deque[asyncio.Future] = deque()

    async def acquire(self) -> None:
        if self.active < self.limit and not self.waiters:
            self.active += 1
            return
        if len(self.waiters) >= self.queue:
            raise QueueFull
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as we were cancelled
            else:
                self.waiters.remove(fut)
            raise

    def release(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes on; active stays the same
                return
        self.active -= 1


class Metrics:
    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.upstream_errors: dict[str, int] = {}
        self.cancelled: dict[str, int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0

    def request(self, path: str, status: int, seconds: float | None = None) -> None:
        key = (path, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if seconds is not None:
            self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum += seconds
            self.latency_count += 1

    def upstream_error(self, kind: str) -> None:
        self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + 1

    def cancel(self, reason: str) -> None:
        self.cancelled[reason] = self.cancelled.get(reason, 0) + 1

    def render(self, gate: Gate, ready: bool) -> str:
        out = ["# HELP proxy_requests_total Requests answered, by path and HTTP status.",
               "# TYPE proxy_requests_total counter"]
        for (path, status), n in sorted(self.requests.items()):
            out.append(f'proxy_requests_total{{path="{path}",code="{status}"}} {n}')
        out += ["# HELP proxy_requests_in_flight Generations being served by the upstream.",
                "# TYPE proxy_requests_in_flight gauge",
                f"proxy_requests_in_flight {gate.active}",
                "# HELP proxy_queue_depth Generations waiting for a slot.",
                "# TYPE proxy_queue_depth gauge",
                f"proxy_queue_depth {len(gate.waiters)}",
                "# HELP proxy_upstream_ready 1 when the last probe or generation succeeded.",
                "# TYPE proxy_upstream_ready gauge",
                f"proxy_upstream_ready {int(ready)}",
                "# HELP proxy_request_duration_seconds Generation requests, arrival to last byte.",
                "# TYPE proxy_request_duration_seconds histogram"]
        cumulative = 0
        for bound, n in zip(LATENCY_BUCKETS, self.buckets):
            cumulative += n
            out.append(f'proxy_request_duration_seconds_bucket{{le="{bound}"}} {cumulative}')
        out += [f'proxy_request_duration_seconds_bucket{{le="+Inf"}} {self.latency_count}',
                f"proxy_request_duration_seconds_sum {self.latency_sum:.6f}",
                f"proxy_request_duration_seconds_count {self.latency_count}",
                "# HELP proxy_upstream_errors_total Upstream failures, by kind.",
                "# TYPE proxy_upstream_errors_total counter"]
        for kind, n in sorted(self.upstream_errors.items()):
            out.append(f'proxy_upstream_errors_total{{kind="{kind}"}} {n}')
        out += ["# HELP proxy_cancelled_generations_total Upstream generations stopped early.",
                "# TYPE proxy_cancelled_generations_total counter"]
        for reason, n in sorted(self.cancelled.items()):
            out.append(f'proxy_cancelled_generations_total{{reason="{reason}"}} {n}')
        return "\n".join(out) + "\n"


class UpstreamDown(Exception):
    """The upstream cannot take requests now (refused, reset, dying, loading)."""


class Proxy:
    def __init__(self, args: argparse.Namespace, key: bytes | None):
        self.args = args
        self.key = key
        self.upstream = args.upstream.rstrip("/")
        self.gate = Gate(args.concurrency, args.queue)
        self.metrics = Metrics()
        self.pool = Upstream(args.upstream, args.connect_timeout_s, keep=args.concurrency + 2)
        self.ready = False
        self.last_ok = -math.inf  # loop time of the last proof of readiness
        self.last_problem = "not probed yet"
        self.probe_task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.recover_task: asyncio.Task | None = None

    # -- lifecycle ----------------------------------------------------------

    async def start(self, app: web.Application) -> None:
        self.loop = asyncio.get_running_loop()
        self.mark_down("not probed yet")

    async def stop(self, app: web.Application) -> None:
        for task in (self.probe_task, self.recover_task):
            if task is not None:
                task.cancel()
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

    def probe(self) -> asyncio.Future:
        """One shared 1-token generation; callers may stop waiting, it goes on."""
        if self.probe_task is None or self.probe_task.done():
            self.probe_task = asyncio.ensure_future(self._probe())
        return asyncio.shield(self.probe_task)

    async def _probe(self) -> bool:
        body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                           "stream": True}).encode()
        conn = None
        try:
            async with deadline(self.args.probe_timeout_s):
                conn = await self.pool.post("/v1/chat/completions", body, wait_head=False)
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
        return str(note.get("message") or "the model is restarting") if isinstance(note, dict) \
            else None

    def unavailable(self, problem: str) -> web.Response:
        note = self.maintenance()
        if note:
            return error(503, f"{note}; retry after {math.ceil(self.args.retry_after_ms / 1000)} s",
                         "upstream_restarting", self.retry_headers())
        return error(503, f"upstream not ready: {problem}", "upstream_unavailable",
                     self.retry_headers())

    def authorized(self, request: web.Request) -> bool:
        if self.key is None:
            return True
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        # compare_digest runs in time independent of where the strings differ
        return hmac.compare_digest(token.strip().encode(), self.key) and scheme.lower() == "bearer"

    def unauthorized(self) -> web.Response:
        return error(401, "missing or wrong API key: send 'Authorization: Bearer "
                          "<key>' (the key is in proxy.key on the host)", "authentication_error",
                          {"WWW-Authenticate": "Bearer"})

    # -- handlers -----------------------------------------------------------

    async def handle_generation(self, request: web.Request) -> web.StreamResponse:
        started = self.now()
        status = 499  # nginx's code for "client closed request": we were cancelled
        try:
            resp = await self.generation(request, started)
            status = resp.status
            return resp
        finally:
            self.metrics.request(request.path, status, self.now() - started)

    async def generation(self, request: web.Request, started: float) -> web.StreamResponse:
        path = request.path
        if request.method != "POST":
            return error(405, f"{path} takes POST", "invalid_request_error", {"Allow": "POST"})
        if not self.authorized(request):
            return self.unauthorized()
        if (request.content_length or 0) > self.args.max_body_bytes:
            return self.too_large()
        try:
            if request.content.is_eof():  # the body came with the headers: no timer needed
                raw = await request.read()
            else:
                async with deadline(self.args.body_timeout_s):
                    raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self.too_large()
        except asyncio.TimeoutError:
            return error(408, f"request body not received within {self.args.body_timeout_s:g} s",
                         "invalid_request_error")
        try:
            body = json.loads(raw)
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
        untouched = raw  # forwarded as the client wrote it unless a field goes
        for field in STRIPPED_FIELDS:
            if field in body:
                del body[field]
                untouched = None
        if not self.ready:
            return self.unavailable(self.last_problem)

        acquired = False
        try:
            async with deadline(max(0.0, started + self.args.request_timeout_s - self.now())):
                try:
                    await self.gate.acquire()
                except QueueFull:
                    return error(429, f"{self.gate.limit} generations running and "
                                 f"{self.gate.queue} waiting; retry later", "rate_limit_error",
                                 self.retry_headers())
                acquired = True
                if stream:
                    return await self.forward_stream(request, path, body, name, untouched)
                if body.get("logprobs") or (body.get("top_logprobs") or -1) > 0:
                    return await self.forward_plain(path, body, name)
                return await self.forward_assembled(path, body, name)
        except asyncio.TimeoutError:
            self.metrics.cancel("deadline")
            msg = f"no complete answer within --request-timeout-s {self.args.request_timeout_s:g}"
            sent = request.get("sse")
            if sent is not None:  # headers are out: tell an SSE client in-band, then end
                await sse_error(sent, msg, "timeout")
                return sent
            return error(504, msg, "timeout")
        except UpstreamDown as e:
            self.mark_down(str(e))
            return self.unavailable(str(e))
        except asyncio.CancelledError:
            self.metrics.cancel("client_left")
            raise
        except (ConnectionResetError, ClientError, OSError) as e:
            sent = request.get("sse")
            if request.transport is None or request.transport.is_closing():
                self.metrics.cancel("client_left")  # we were writing to a client that left
                return sent if sent is not None else error(499, "client left", "client_left")
            self.metrics.upstream_error("broken_stream")
            self.mark_down(f"upstream stream broke: {e or type(e).__name__}")
            if sent is not None:
                await sse_error(sent, "upstream broke off the answer", "upstream_error")
                return sent
            if self.maintenance():  # the deploy stopped the server: nothing was sent, retry
                return self.unavailable(str(e))
            return error(502, f"upstream broke off the answer: {e or type(e).__name__}",
                         "upstream_error")
        finally:
            if acquired:
                self.gate.release()

    def too_large(self) -> web.Response:
        return error(413, f"request body over --max-body-bytes {self.args.max_body_bytes}",
                     "invalid_request_error")

    async def open_upstream(self, path: str, body: dict, raw: bytes | None = None):
        """POST to the upstream; UpstreamDown when it cannot take the request."""
        try:
            conn = await self.pool.post(path, raw or json.dumps(body).encode())
        except OSError as e:
            self.metrics.upstream_error("connect")
            raise UpstreamDown(f"cannot reach {self.upstream}: {e or type(e).__name__}") from e
        if conn.status != 200:
            try:
                raw = await conn.read_all()
            except BaseException:
                conn.abort()
                raise
            self.pool.release(conn)
            if conn.status >= 500 or b"generation thread died" in raw:
                self.metrics.upstream_error(f"status_{conn.status}")
                raise UpstreamDown(f"upstream answered {conn.status}: "
                                   f"{raw[:200].decode('utf-8', 'replace')}")
            return conn, raw
        return conn, None

    async def exchange(self, path: str, body: dict, on_body=None):
        """POST and read the whole answer, waking once; UpstreamDown as open_upstream."""
        conn = None
        try:
            conn = await self.pool.post(path, json.dumps(body).encode(), wait_head=False)
            raw = await conn.read_all(on_body)
        except OSError as e:
            if conn is None or conn.status == 0:  # no answer at all: as a failed connect
                if conn is not None:
                    conn.abort()
                self.metrics.upstream_error("connect")
                raise UpstreamDown(f"cannot reach {self.upstream}: {e or type(e).__name__}") from e
            conn.abort(reset=True)
            raise
        except BaseException:
            if conn is not None:
                conn.abort(reset=True)
            raise
        self.pool.release(conn)
        if conn.status != 200 and (conn.status >= 500 or b"generation thread died" in raw):
            self.metrics.upstream_error(f"status_{conn.status}")
            raise UpstreamDown(f"upstream answered {conn.status}: "
                               f"{raw[:200].decode('utf-8', 'replace')}")
        return conn, raw

    def passthrough_error(self, path: str, resp: UpstreamConnection, raw: bytes) -> web.Response:
        try:
            payload = json.loads(raw)
            if isinstance(payload, dict) and isinstance(payload.get("error"), str):
                payload = {"error": {"message": payload["error"], "type": "upstream_error",
                                     "code": resp.status}}
        except ValueError:
            payload = {"error": {"message": raw[:1000].decode("utf-8", "replace"),
                                 "type": "upstream_error", "code": resp.status}}
        return web.json_response(payload, status=resp.status)

    async def forward_stream(self, request, path, body, name, untouched=None):
        resp, raw = await self.open_upstream(path, body, untouched)
        if raw is not None:
            return self.passthrough_error(path, resp, raw)
        try:
            out = web.StreamResponse(status=200, headers=SSE_HEADERS)
            await out.prepare(request)
            request["sse"] = out
            buf = tail = b""
            field = b'"model": ' + json.dumps(name).encode()
            while data := await resp.read_some():
                if b"data: {" in data:  # tokens are coming: the upstream is healthy
                    self.last_ok = self.now()
                buf += data
                if b"\n\n" not in buf:
                    if b"\r\n\r\n" not in buf:
                        continue
                    buf = buf.replace(b"\r\n", b"\n")
                *events, buf = buf.split(b"\n\n")
                renamed = b"".join([rename_event(e, name, field) for e in events])
                if resp.done:  # the last events go out with the end of our stream: one send
                    tail = renamed
                    break
                await out.write(renamed)
            if buf.strip():
                tail += rename_event(buf, name, field)
        except BaseException:
            resp.abort(reset=True)
            raise
        self.pool.release(resp)
        await out.write_eof(tail)
        return out

    async def forward_plain(self, path, body, name) -> web.Response:
        resp, raw = await self.exchange(path, body)
        if resp.status != 200:
            return self.passthrough_error(path, resp, raw)
        self.mark_ok()
        try:
            reply = json.loads(raw)
        except ValueError:
            return web.Response(body=raw, content_type="application/json")
        if isinstance(reply, dict) and "model" in reply:
            reply["model"] = name
        return web.json_response(reply)

    async def forward_assembled(self, path, body, name) -> web.Response:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        # Events are parsed as they arrive, while the upstream is still writing
        # the next ones: only the last ones are left when the answer is complete.
        chunks: list = []
        tail = b""
        done = False
        bad = None

        def parse(piece: bytes) -> None:
            nonlocal tail, done, bad
            if done or bad is not None:
                return
            *lines, tail = (tail + piece).split(b"\n")
            for line in lines:
                if line.startswith(b"data: {"):
                    self.last_ok = self.now()  # tokens are coming: the upstream is healthy
                    try:
                        chunks.append(json.loads(line[6:]))
                    except ValueError as e:
                        bad = e
                        return
                elif line.startswith(b"data: [DONE]"):
                    done = True
                    return

        resp, raw = await self.exchange(path, body, parse)
        if resp.status != 200:
            return self.passthrough_error(path, resp, raw)
        parse(b"\n")  # a last line without its newline
        if bad is not None:
            raise bad
        if not done:
            self.metrics.upstream_error("broken_stream")
            raise ClientError("the upstream stream ended before [DONE]")
        for chunk in chunks:
            if isinstance(chunk.get("error"), (str, dict)):
                message = chunk["error"]
                message = message.get("message", message) if isinstance(message, dict) else message
                return error(502, f"upstream error: {message}", "upstream_error")
        return web.json_response(assemble(chunks, name))

    async def handle_models(self, request: web.Request) -> web.Response:
        # Our own answer: mlx_lm.server lists its HF cache and local paths (and
        # fails with an empty body when the cache folder is missing), not the
        # one model it serves under the name clients use.
        if not self.authorized(request):
            return self.unauthorized()
        entry = {"id": self.args.public_name, "object": "model", "created": 0,
                 "owned_by": "mlx-route"}
        wanted = request.match_info.get("name")
        if wanted is None:
            return web.json_response({"object": "list", "data": [entry]})
        if wanted != self.args.public_name:
            return error(404, f"no model {wanted!r}; this proxy serves "
                         f"{self.args.public_name!r}", "invalid_request_error")
        return web.json_response(entry)

    async def handle_health(self, request: web.Request) -> web.Response:
        # Open without a key so supervisors and load balancers can ask; it says
        # nothing about the model or the key.
        fresh = self.ready and self.now() - self.last_ok < self.args.health_cache_s
        if not fresh:
            try:
                async with deadline(self.args.health_wait_s):
                    fresh = await self.probe()
            except asyncio.TimeoutError:
                self.last_problem = f"no token within --health-wait-s {self.args.health_wait_s:g}"
        if fresh:
            return web.json_response({"status": "ok", "upstream": self.upstream})
        return web.json_response({"status": "unavailable", "upstream": self.upstream,
                                  "problem": self.last_problem},
                                 status=503, headers=self.retry_headers())

    async def handle_metrics(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return self.unauthorized()
        return web.Response(text=self.metrics.render(self.gate, self.ready),
                            content_type="text/plain", charset="utf-8")

    async def handle_unknown(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return self.unauthorized()
        return error(404, f"no route {request.method} {request.path}; this proxy serves POST "
                     f"{', '.join(GENERATION_PATHS)}, GET /v1/models, /health, /metrics",
                     "not_found")

    def counted(self, label: str, handler):
        """The handler, with its answers counted in /metrics under `label`."""
        async def wrapper(request: web.Request) -> web.StreamResponse:
            status = 499
            try:
                resp = await handler(request)
                status = resp.status
                return resp
            finally:
                self.metrics.request(label, status)
        return wrapper


# ---------------------------------------------------------------------------
# Upstream client
# ---------------------------------------------------------------------------
#
# Why not aiohttp's ClientSession: measured under bench/proxy_bench.py it cost
# about as much CPU per request as everything else in the proxy together (its
# request object, timers and a task wake-up for every piece of a streamed
# answer), enough to miss the added-latency target. The proxy needs one thing
# of it: POST a JSON body over a kept-alive HTTP/1.1 connection and read an
# answer framed by Content-Length, chunked encoding, or the end of the
# connection (mlx_lm.server 0.32.2 speaks HTTP/1.0 and closes after each answer).

MAX_HEAD_BYTES = 64 * 1024
# An idle connection is reused only this soon: a server that closes idle
# connections (aiohttp and nginx after 75 s, uvicorn after 5 s) could close one
# just as a request goes out on it, and a generation request is not retried.
KEEP_IDLE_S = 2.0
HIGH_WATER = 1 << 20  # body bytes held for a slow reader before reading pauses


class UpstreamError(ConnectionError):
    """The upstream connection failed, or its answer broke off or was not HTTP/1.x."""


class UpstreamConnection(asyncio.Protocol):
    """One connection to the upstream, one exchange at a time.

    `await read_head()`, then either `await read_some()` until it returns b""
    (a streamed answer, each piece as it arrives) or `await read_all()` (one
    wake-up for the whole answer). `done` says the answer is complete and
    taken; `reusable` that the connection may carry the next request.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.waiter: asyncio.Future | None = None
        self.idle_since = 0.0
        self.exchange_reset()

    def exchange_reset(self) -> None:
        self.buf = b""                # received, not parsed yet
        self.body: list[bytes] = []   # decoded body, not taken yet
        self.body_size = 0
        self.in_head = True
        self.status = 0
        self.keep_alive = False
        self.framing = ""             # "length", "chunked" or "close"
        self.remaining = 0            # bytes left in the body (length) or this chunk
        self.chunk_state = "size"     # size, data, crlf, trailer
        self.complete = False
        self.error: BaseException | None = None
        self.want = "head"            # what wakes the reader: head, some, all
        self.on_body = None           # called with each decoded piece (read_all)
        self.paused = False
        self.busy = False             # a request is out and its answer not complete

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.complete or self.error is not None:
            if data:  # bytes nobody asked for: the connection is not in a known state
                self.closed = True
                self.transport.abort()
            return
        try:
            self.buf = self.parse(self.buf + data if self.buf else data)
        except UpstreamError as e:
            self.fail(e)
            return
        self.wake()

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
        if not self.in_head and self.framing == "close" and exc is None:
            self.complete = True
        else:
            why = f": {exc}" if exc else ""
            where = "before answering" if self.in_head else "in the middle of its answer"
            self.error = UpstreamError(f"upstream closed the connection {where}{why}")
        self.wake(force=True)

    # -- parsing ------------------------------------------------------------

    def parse(self, data: bytes) -> bytes:
        """Parse what came in; returns the bytes that wait for more."""
        while self.in_head:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HEAD_BYTES:
                    raise UpstreamError(f"upstream sent over {MAX_HEAD_BYTES} bytes of headers")
                return data
            lines = data[:end].decode("latin-1").split("\r\n")
            data = data[end + 4:]
            version, _, rest = lines[0].partition(" ")
            code = rest[:3]
            if not version.startswith("HTTP/1.") or not code.isdigit():
                raise UpstreamError(f"upstream answered {lines[0][:80]!r}, not HTTP/1.x")
            status = int(code)
            if 100 <= status < 200:
                continue  # an interim answer (100 Continue): the real one follows
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    raise UpstreamError(f"upstream sent a bad header line {line[:80]!r}")
                headers[name.strip().lower()] = value.strip()
            self.status, self.in_head = status, False
            self.keep_alive = (version == "HTTP/1.1"
                               and "close" not in headers.get("connection", "").lower())
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self.framing = "chunked"
            elif "content-length" in headers:
                try:
                    self.remaining = int(headers["content-length"])
                except ValueError:
                    raise UpstreamError("upstream sent a bad Content-Length") from None
                self.framing = "length"
                if self.remaining <= 0 or status in (204, 304):
                    self.complete = True
            elif status in (204, 304):
                self.complete = True
            else:
                self.framing, self.keep_alive = "close", False
        if self.complete or not data:
            return data
        if self.framing == "chunked":
            return self.parse_chunks(data)
        if self.framing == "length":
            piece, data = data[:self.remaining], data[self.remaining:]
            self.remaining -= len(piece)
            self.complete = self.remaining == 0
        else:
            piece, data = data, b""
        self.take(piece)
        return data

    def parse_chunks(self, data: bytes) -> bytes:
        pos, end = 0, len(data)
        state, remaining = self.chunk_state, self.remaining
        pieces = []
        try:
            while pos < end:
                if state == "data":
                    stop = min(end, pos + remaining)
                    pieces.append(data[pos:stop])
                    remaining -= stop - pos
                    pos = stop
                    if remaining:
                        break
                    state = "crlf"
                elif state == "crlf":
                    if end - pos < 2:
                        break
                    if data[pos:pos + 2] != b"\r\n":
                        raise UpstreamError("upstream chunked encoding is broken")
                    pos += 2
                    state = "size"
                else:  # "size" or "trailer": one line
                    eol = data.find(b"\r\n", pos)
                    if eol < 0:
                        if end - pos > MAX_HEAD_BYTES:
                            raise UpstreamError("upstream chunked encoding is broken")
                        break
                    line = data[pos:eol]
                    pos = eol + 2
                    if state == "trailer":
                        if not line:
                            self.complete = True
                            break
                        continue
                    try:
                        size = int(line.split(b";", 1)[0], 16)
                    except ValueError:
                        size = -1
                    if size < 0:
                        raise UpstreamError("upstream chunked encoding is broken")
                    if size == 0:
                        state = "trailer"
                    else:
                        remaining, state = size, "data"
        finally:
            self.chunk_state, self.remaining = state, remaining
            if pieces:
                self.take(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        return data[pos:]

    def take(self, piece: bytes) -> None:
        if not piece:
            return
        self.body.append(piece)
        self.body_size += len(piece)
        if self.on_body is not None:
            self.on_body(piece)
        if self.want == "some" and self.body_size > HIGH_WATER and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.closed = True
        self.transport.abort()
        self.wake(force=True)

    def wake(self, force: bool = False) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        want = self.want
        if (force or self.complete or self.error is not None
                or (want == "head" and not self.in_head)
                or (want == "some" and self.body)):
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
        """The whole body, waking once; on_body sees each piece as it arrives."""
        if on_body is not None:
            for piece in self.body:
                on_body(piece)
            self.on_body = on_body
        try:
            while not self.complete:
                if self.error is not None:
                    raise self.error
                await self.wait("all")
        finally:
            self.on_body = None
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
        return (self.complete and self.keep_alive and not self.closed and not self.buf
                and self.error is None)

    def abort(self, reset: bool = False) -> None:
        """Close now; with reset, by a TCP reset rather than a FIN.

        After a FIN the server's next write still succeeds (the reset only
        comes back as its answer), so mlx_lm.server would generate one more
        token before a write fails; after a reset its very next write fails.
        """
        self.closed = True
        if self.transport is None:
            return
        if reset:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


class Upstream:
    """Kept-alive connections to one upstream base URL."""

    def __init__(self, base_url: str, connect_timeout_s: float, keep: int):
        url = urllib.parse.urlsplit(base_url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.prefix = url.path.rstrip("/")
        host_header = self.host if ":" not in self.host else f"[{self.host}]"
        if url.port:
            host_header += f":{url.port}"
        self.head_template = ("POST {path} HTTP/1.1\r\nHost: " + host_header
                              + "\r\nContent-Type: application/json\r\n"
                                "Content-Length: {length}\r\n\r\n")
        self.connect_timeout_s = connect_timeout_s
        self.keep = keep
        self.idle: list[UpstreamConnection] = []

    async def post(self, path: str, body: bytes, wait_head: bool = True) -> UpstreamConnection:
        """Send the request; returns once the status and headers are in (or at
        once, for a caller that waits for the whole answer with read_all).

        UpstreamError when no connection can be made or it breaks before the
        headers (a request is never sent twice: the server may have started it).
        """
        conn = None
        fresh_after = asyncio.get_running_loop().time() - KEEP_IDLE_S
        while self.idle:
            candidate = self.idle.pop()
            if not candidate.closed and candidate.idle_since > fresh_after:
                conn = candidate
                break
            candidate.abort()
        if conn is None:
            conn = await self.connect()
        conn.exchange_reset()
        conn.busy = True
        head = self.head_template.format(path=self.prefix + path, length=len(body))
        conn.transport.write(head.encode("latin-1") + body)
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
                    lambda: UpstreamConnection(loop), self.host, self.port, ssl=self.ssl,
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

    def close(self) -> None:
        for conn in self.idle:
            conn.abort()
        self.idle.clear()


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

CONCATENATED = ("content", "reasoning", "reasoning_content", "refusal", "text")


def assemble(chunks: list[dict], name: str) -> dict:
    """The non-streaming reply that these stream chunks add up to.

    Mirrors mlx_lm.server's own non-streaming shape: message content null when
    empty, tool_calls and reasoning only when present, usage from the usage chunk.
    """
    first = chunks[0] if chunks else {}
    reply = {k: v for k, v in first.items() if k not in ("choices", "usage")}
    obj = reply.get("object", "chat.completion.chunk")
    reply["object"] = obj[:-len(".chunk")] if obj.endswith(".chunk") else obj
    reply["model"] = name
    choices: dict[int, dict] = {}
    usage = None
    for chunk in chunks:
        if chunk.get("usage"):
            usage = chunk["usage"]
        for part in chunk.get("choices") or []:
            index = part.get("index", 0)
            choice = choices.setdefault(index, {"index": index, "finish_reason": None})
            for key, value in part.items():
                if key == "delta":
                    merge_delta(choice.setdefault("message", {}), value)
                elif key == "finish_reason":
                    if value is not None:
                        choice[key] = value
                elif key == "text":
                    choice["text"] = choice.get("text", "") + (value or "")
                elif key == "logprobs" and isinstance(value, dict):
                    merged = choice.setdefault("logprobs", {})
                    for k, v in value.items():
                        merged[k] = merged.get(k, []) + v if isinstance(v, list) else v
                elif key != "index":
                    choice[key] = value
    for choice in choices.values():
        message = choice.get("message")
        if message is not None:
            rest = {k: v for k, v in message.items() if k not in ("role", "content")}
            message = {"role": message.get("role", "assistant"),
                       "content": message.get("content") or None, **rest}
            if "tool_calls" in message:
                message["tool_calls"] = [{k: v for k, v in call.items() if k != "index"}
                                         for _, call in sorted(message["tool_calls"].items())]
            del choice["message"]
            choice["message"] = message  # last, after logprobs, as mlx_lm has it
    reply["choices"] = [choices[i] for i in sorted(choices)]
    if usage is not None:
        reply["usage"] = usage
    return reply


def rename_event(event: bytes, name: str, field: bytes) -> bytes:
    """One SSE event with the model renamed; field is `"model": <name as JSON>`."""
    if event.startswith(b"data: {"):
        # Fast path, byte-exact: mlx_lm.server echoes "default_model" when
        # the request names no model (we strip it), as json.dumps writes it.
        if event.count(b'"model": "default_model"') == 1:
            return event.replace(b'"model": "default_model"', field) + b"\n\n"
        try:
            chunk = json.loads(event[6:])
        except ValueError:
            return event + b"\n\n"
        if isinstance(chunk, dict) and "model" in chunk:
            chunk["model"] = name
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"
    return event + b"\n\n"


def merge_delta(message: dict, delta: dict) -> None:
    for key, value in delta.items():
        if key in CONCATENATED and isinstance(value, str):
            message[key] = (message.get(key) or "") + value
        elif key == "tool_calls" and isinstance(value, list):
            calls = message.setdefault("tool_calls", {})
            for position, call in enumerate(value):
                index = call.get("index", len(calls) if "id" in call else position)
                merged = calls.setdefault(index, {})
                for k, v in call.items():
                    if k == "function" and isinstance(v, dict):
                        fn = merged.setdefault("function", {})
                        for fk, fv in v.items():
                            if fk == "arguments" and isinstance(fv, str):
                                fn[fk] = fn.get(fk, "") + fv
                            elif fv is not None:
                                fn[fk] = fv
                    elif v is not None:
                        merged[k] = v
        elif value is not None:
            message[key] = value


def error(status: int, message: str, kind: str, headers: dict | None = None) -> web.Response:
    """An OpenAI-shaped error, which the openai SDK turns into a typed exception."""
    return web.json_response({"error": {"message": message, "type": kind, "code": status}},
                             status=status, headers=headers)


async def sse_error(out: web.StreamResponse, message: str, kind: str) -> None:
    """An error event for a stream already under way (the openai SDK raises it)."""
    try:
        await out.write(b"data: " + json.dumps(
            {"error": {"message": message, "type": kind}}).encode() + b"\n\n")
        await out.write_eof()
    except (ConnectionResetError, OSError):
        pass



def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def read_key(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read().strip()


def build_app(args: argparse.Namespace, key: bytes | None) -> web.Application:
    proxy = Proxy(args, key)
    # aiohttp's own limit turns a chunked body over the limit into a 413 too.
    app = web.Application(client_max_size=args.max_body_bytes)
    app["proxy"] = proxy
    for path in GENERATION_PATHS:
        app.router.add_route("*", path, proxy.handle_generation)
    app.router.add_get("/v1/models", proxy.counted("/v1/models", proxy.handle_models))
    app.router.add_get("/v1/models/{name:.+}", proxy.counted("/v1/models", proxy.handle_models))
    app.router.add_get("/health", proxy.counted("/health", proxy.handle_health))
    app.router.add_get("/metrics", proxy.counted("/metrics", proxy.handle_metrics))
    app.router.add_route("*", "/{tail:.*}", proxy.counted("other", proxy.handle_unknown))
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.stop)
    return app


async def serve(args: argparse.Namespace, key: bytes | None) -> int:
    app = build_app(args, key)
    # handler_cancellation: a client that disconnects cancels its handler at
    # once, which closes the upstream connection. keepalive_timeout also closes
    # a connection that has not sent complete headers in time (aiohttp arms it
    # at connection start), so slow clients hold only their own socket.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           keepalive_timeout=args.header_timeout_s, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=1024)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        print(f"proxy: cannot listen on {args.host}:{args.port}: {e.strerror}", file=sys.stderr)
        return 1
    log.info("listening on http://%s:%d -> %s (key %s, concurrency %d, queue %d)", args.host,
             args.port, args.upstream, "required" if key else "off", args.concurrency, args.queue)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await runner.cleanup()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = validate(args)
    if problem:
        print(f"proxy: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    key = read_key(args.api_key_file) if args.api_key_file else None
    try:  # in the host lock (requirements/host.in); without it ~0.05 ms more per request
        import uvloop
        return uvloop.run(serve(args, key))
    except ImportError:
        return asyncio.run(serve(args, key))


if __name__ == "__main__":
    sys.exit(main())
