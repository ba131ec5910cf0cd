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
import stat
import struct
import sys
import time
from collections import deque

from aiohttp import ClientError, ClientSession, ClientTimeout, DummyCookieJar, TCPConnector, web

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
        self.session: ClientSession | None = None
        self.ready = False
        self.last_ok = -math.inf  # loop time of the last proof of readiness
        self.last_problem = "not probed yet"
        self.probe_task: asyncio.Task | None = None
        self.recover_task: asyncio.Task | None = None

    # -- lifecycle ----------------------------------------------------------

    async def start(self, app: web.Application) -> None:
        self.session = ClientSession(
            connector=TCPConnector(limit=0), cookie_jar=DummyCookieJar(),
            timeout=ClientTimeout(total=None, sock_connect=self.args.connect_timeout_s),
            auto_decompress=False)
        self.mark_down("not probed yet")

    async def stop(self, app: web.Application) -> None:
        for task in (self.probe_task, self.recover_task):
            if task is not None:
                task.cancel()
        await self.session.close()

    # -- readiness ----------------------------------------------------------

    def now(self) -> float:
        return asyncio.get_running_loop().time()

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
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                "stream": True}
        try:
            async with deadline(self.args.probe_timeout_s):
                async with self.session.post(self.upstream + "/v1/chat/completions",
                                             json=body) as resp:
                    if resp.status != 200:
                        text = (await resp.read())[:200].decode("utf-8", "replace")
                        self.metrics.upstream_error("probe")
                        self.last_problem = f"probe answered {resp.status}: {text}"
                        if resp.status >= 500 or "generation thread died" in text:
                            self.ready = False
                        return False
                    # Read to the end: leaving early makes the server log a
                    # broken pipe for every probe.
                    token = False
                    async for line in resp.content:
                        token = token or line.startswith(b"data: {")
                    if token:
                        self.mark_ok()
                        return True
                    self.last_problem = "probe stream ended without a token"
        except asyncio.TimeoutError:
            self.last_problem = (f"no token within {self.args.probe_timeout_s:g} s "
                                 f"(model still loading?)")
        except (ClientError, OSError) as e:
            self.last_problem = f"cannot reach {self.upstream}: {e or type(e).__name__}"
        self.metrics.upstream_error("probe")
        return False

    # -- responses ----------------------------------------------------------

    def retry_headers(self) -> dict:
        ms = self.args.retry_after_ms
        return {"Retry-After": str(math.ceil(ms / 1000)), "retry-after-ms": str(ms)}

    def unavailable(self, problem: str) -> web.Response:
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
        for field in STRIPPED_FIELDS:
            body.pop(field, None)
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
                    return await self.forward_stream(request, path, body, name)
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
            return error(502, f"upstream broke off the answer: {e or type(e).__name__}",
                         "upstream_error")
        finally:
            if acquired:
                self.gate.release()

    def too_large(self) -> web.Response:
        return error(413, f"request body over --max-body-bytes {self.args.max_body_bytes}",
                     "invalid_request_error")

    async def open_upstream(self, path: str, body: dict):
        """POST to the upstream; UpstreamDown when it cannot take the request."""
        try:
            resp = await self.session.post(self.upstream + path, data=json.dumps(body).encode(),
                                           headers={"Content-Type": "application/json"})
        except (ClientError, OSError) as e:
            self.metrics.upstream_error("connect")
            raise UpstreamDown(f"cannot reach {self.upstream}: {e or type(e).__name__}") from e
        if resp.status != 200:
            raw = await resp.read()
            resp.release()
            if resp.status >= 500 or b"generation thread died" in raw:
                self.metrics.upstream_error(f"status_{resp.status}")
                raise UpstreamDown(f"upstream answered {resp.status}: "
                                   f"{raw[:200].decode('utf-8', 'replace')}")
            return resp, raw
        return resp, None

    def passthrough_error(self, path: str, resp, raw: bytes) -> web.Response:
        try:
            payload = json.loads(raw)
            if isinstance(payload, dict) and isinstance(payload.get("error"), str):
                payload = {"error": {"message": payload["error"], "type": "upstream_error",
                                     "code": resp.status}}
        except ValueError:
            payload = {"error": {"message": raw[:1000].decode("utf-8", "replace"),
                                 "type": "upstream_error", "code": resp.status}}
        return web.json_response(payload, status=resp.status)

    async def forward_stream(self, request, path, body, name) -> web.StreamResponse:
        resp, raw = await self.open_upstream(path, body)
        if raw is not None:
            return self.passthrough_error(path, resp, raw)
        try:
            out = web.StreamResponse(status=200, headers=SSE_HEADERS)
            await out.prepare(request)
            request["sse"] = out
            buf = b""
            async for data in resp.content.iter_any():
                buf += data
                if b"\n\n" not in buf:
                    if b"\r\n\r\n" not in buf:
                        continue
                    buf = buf.replace(b"\r\n", b"\n")
                *events, buf = buf.split(b"\n\n")
                await out.write(b"".join(self.rename_event(e, name) for e in events))
            if buf.strip():
                await out.write(self.rename_event(buf, name))
        except BaseException:
            reset(resp)
            resp.close()
            raise
        resp.release()  # back to the pool when read to the end (aiohttp closes it otherwise)
        await out.write_eof()
        return out

    def rename_event(self, event: bytes, name: str) -> bytes:
        if event.startswith(b"data: {"):
            self.last_ok = self.now()
            # Fast path, byte-exact: mlx_lm.server echoes "default_model" when
            # the request names no model (we strip it), as json.dumps writes it.
            if event.count(b'"model": "default_model"') == 1:
                renamed = b'"model": ' + json.dumps(name).encode()
                return event.replace(b'"model": "default_model"', renamed) + b"\n\n"
            try:
                chunk = json.loads(event[6:])
            except ValueError:
                return event + b"\n\n"
            if isinstance(chunk, dict) and "model" in chunk:
                chunk["model"] = name
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"
        return event + b"\n\n"

    async def forward_plain(self, path, body, name) -> web.Response:
        resp, raw = await self.open_upstream(path, body)
        if raw is not None:
            return self.passthrough_error(path, resp, raw)
        try:
            raw = await resp.read()
        except BaseException:
            reset(resp)
            resp.close()
            raise
        resp.release()
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
        resp, raw = await self.open_upstream(path, body)
        if raw is not None:
            return self.passthrough_error(path, resp, raw)
        chunks = []
        done = False
        buf = b""
        try:
            async for data in resp.content.iter_any():
                *lines, buf = (buf + data).split(b"\n")
                for line in lines:
                    if line.startswith(b"data: {"):
                        chunks.append(json.loads(line[6:]))
                    elif line.startswith(b"data: [DONE]"):
                        done = True
                if chunks:
                    self.last_ok = self.now()
                if done:
                    break
            if done and not resp.content.is_eof():
                # The end of the HTTP body follows [DONE] at once; reading it
                # keeps the upstream connection reusable (a new one costs more).
                with contextlib.suppress(asyncio.TimeoutError):
                    async with deadline(1.0):
                        await resp.content.read()
        except BaseException:
            reset(resp)
            resp.close()
            raise
        resp.release()
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


def reset(resp) -> None:
    """Close the upstream connection with a TCP reset rather than a FIN.

    After a FIN the server's next write still succeeds (the reset only comes
    back as its answer), so mlx_lm.server would generate one more token before
    a write fails; after a reset its very next write fails.
    """
    conn = resp.connection
    transport = conn.transport if conn is not None else None
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
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
    try:  # optional: a faster event loop, about a third less CPU per request
        import uvloop
        return uvloop.run(serve(args, key))
    except ImportError:
        return asyncio.run(serve(args, key))


if __name__ == "__main__":
    sys.exit(main())
