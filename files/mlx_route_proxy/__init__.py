"""OpenAI-compatible front door for mlx_lm.server (asyncio, httptools), shipped as one zipapp.

    python proxy.pyz --host 0.0.0.0 --port 8026 --upstream http://127.0.0.1:8025 \
        --public-name glm-5.2 --api-key-file ~/.local/share/mlx-route/proxy.key

Modules: cli (flags, logging, the server loop), server (HTTP/1.1 to clients on
httptools: framing, limits, timeouts, cancellation), app (the paths, handlers,
the key check and readiness), admission
(concurrency and queue; deadlines on one loop timer), upstream (the HTTP/1.1
client on httptools), sse (splitting, renaming and assembling events, strict
JSON), metrics (Prometheus counters and their middleware).

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
- Admission control (--concurrency, --queue), a deadline per request, a
  first-byte timeout, body size and read-time limits, a real readiness probe
  (the server's own /health says 200 while the model is still loading),
  Prometheus /metrics.
- With --api-key-file every request but /health needs
  `Authorization: Bearer <key>`; it refuses to listen beyond loopback
  without one. /health without the key says only ok or unavailable.
"""

from .admission import Deadline, Gate, QueueFull, Ticker
from .app import Proxy, build_app, error
from .cli import main, parse_args, read_key, validate
from .metrics import Metrics
from .sse import Assembler, BadUpstream, EventSplitter, loads, rename_event
from .upstream import (FirstByteTimeout, Upstream, UpstreamConnection, UpstreamError,
                       MAX_HEAD_BYTES)

__all__ = ["Assembler", "BadUpstream", "Deadline", "EventSplitter", "FirstByteTimeout", "Gate",
           "MAX_HEAD_BYTES", "Metrics", "Proxy", "QueueFull", "Upstream", "UpstreamConnection",
           "UpstreamError", "build_app", "error", "loads", "main", "parse_args", "read_key",
           "rename_event", "Ticker", "validate"]
