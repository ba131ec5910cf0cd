"""Command line, logging and the server loop."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import re
import signal
import stat
import sys

from .affinity import POLICIES
from .app import build_app
from .routing import (RouteSpecError, parse_key_files, parse_replicas, parse_routes,
                      upstream_urls)
from .server import Server

log = logging.getLogger("mlx-route-proxy")


# Limits that must be positive: (flag, type, default, help), in the order
# validate() checks them.
LIMITS = (
    ("--max-body-bytes", int, 4 * 1024 * 1024, "largest request body accepted (413 above)"),
    ("--concurrency", int, 4, "generations forwarded to the upstream at once"),
    ("--request-timeout-s", float, 1800,
     "deadline of one generation request, queueing included; the upstream generation is "
     "stopped when it passes"),
    ("--first-byte-timeout-s", float, 300,
     "time the upstream has to start answering a generation (its status line; "
     "mlx_lm.server sends it before prefill); 504 and the slot is freed when it passes"),
    ("--header-timeout-s", float, 10,
     "time a client has to send its request headers (also the idle keep-alive time)"),
    ("--body-timeout-s", float, 30, "time a client has to send its request body"),
    ("--connect-timeout-s", float, 5, "time to open a connection to the upstream"),
    ("--probe-timeout-s", float, 120,
     "time the readiness probe (a 1-token generation) may take"),
    ("--retry-after-ms", int, 1000, "Retry-After hint sent with 503 and 429"),
)

# The watchdog's timings that must be positive (--watchdog-min-cpu-s may be 0).
WATCHDOG_LIMITS = (
    ("--watchdog-stuck-s", float, 180,
     "how long the server may give no token while its CPU time stands still and no byte "
     "of a generation comes, before it is restarted"),
    ("--watchdog-interval-s", float, 10, "seconds between two looks at the server"),
    ("--watchdog-backoff-s", float, 60,
     "least time between two restarts; doubled after each restart that brings no token"),
    ("--watchdog-backoff-max-s", float, 1800, "the backoff's ceiling"),
)


# The cache-aware replica policy's bounds that must be positive (affinity.py).
AFFINITY_LIMITS = (
    ("--affinity-max-entries", int, 65536,
     "prompt blocks remembered per replica (about 100 bytes each); least recently used go first"),
    ("--affinity-block-chars", int, 256,
     "characters of prompt text hashed as one block (the unit of a prefix match)"),
)


def dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="proxy.pyz",
        description="OpenAI-compatible proxy in front of mlx_lm.server",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; beyond loopback needs --api-key-file")
    p.add_argument("--port", type=int, default=8026, help="port to listen on")
    p.add_argument("--upstream", default="http://127.0.0.1:8025",
                   help="base URL of mlx_lm.server")
    p.add_argument("--route", action="append", default=[], metavar="JSON",
                   help='one more model behind this proxy, routed by name: {"name": ..., '
                        '"upstream": "http://127.0.0.1:PORT"} and optionally its watchdog\'s '
                        '"restart_command" and "server_pid_command"; repeat for each')
    p.add_argument("--alias", action="append", default=[], metavar="NAME=MODEL",
                   help="a name clients may send for a model (--public-name or a --route's "
                        "name); with several models an unknown name gets 404")
    p.add_argument("--replica", action="append", default=[], metavar="MODEL=URL",
                   help="one more upstream serving MODEL (--public-name or a --route's name): "
                        "requests go to the ready replica with the fewest in flight; a replica "
                        "that fails is left out until its probe answers; a request that never "
                        "reached one is retried on another")
    r = p.add_argument_group("replica policy", "which replica of a model takes a request "
                             "(files/mlx_route_proxy/affinity.py); only with --replica")
    r.add_argument("--replica-policy", default="cache-aware", choices=POLICIES,
                   help="round-robin: in turn; least-busy: the ready replica with the fewest "
                        "generations in flight; cache-aware: the one that was sent the longest "
                        "prefix of the prompt (its prompt cache likely holds it), unless it is "
                        "much busier than the least busy one")
    r.add_argument("--affinity-min-match", type=float, default=0.5,
                   help="cache-aware: share of the prompt (0-1] a replica must have seen to be "
                        "preferred; below it, the least busy replica")
    r.add_argument("--affinity-max-imbalance", type=int, default=4,
                   help="cache-aware: how many more generations (in flight and queued) the "
                        "best-matching replica may have than the least busy one")
    for flag, kind, default, text in AFFINITY_LIMITS:
        r.add_argument(flag, type=kind, default=default, help=text)
    p.add_argument("--upstream-key-file", action="append", default=[], metavar="URL=PATH",
                   help="the key of an upstream that needs one (another host's proxy: a "
                        "--replica, or --upstream and --route on a host that runs only the "
                        "proxy): sent as 'Authorization: Bearer <key>'; mode 0600")
    p.add_argument("--api-key-file", default=None,
                   help="file holding the API key (mode 0600); clients send "
                        "'Authorization: Bearer <key>'")
    p.add_argument("--public-name", default="default_model",
                   help="model name in replies when the client named none, and in /v1/models")
    for flag, kind, default, text in LIMITS:
        p.add_argument(flag, type=kind, default=default, help=text)
    p.add_argument("--queue", type=int, default=32,
                   help="generations allowed to wait for a slot (429 beyond)")
    p.add_argument("--health-cache-s", type=float, default=30,
                   help="/health trusts a successful generation or probe this recent")
    p.add_argument("--health-wait-s", type=float, default=15,
                   help="longest /health waits for a probe before answering 503")
    p.add_argument("--maintenance-file", default=None,
                   help="JSON note ({\"message\": ...}) the deploy writes while it restarts the "
                        "server on purpose: 503s then say so, and an answer the restart broke "
                        "off before anything was sent gets 503 + Retry-After instead of 502")
    w = p.add_argument_group("watchdog", "restart a server that is alive but cannot generate "
                             "(files/mlx_route_proxy/watchdog.py); off without --restart-command")
    w.add_argument("--restart-command", default=None,
                   help="shell command that restarts the server through its service manager "
                        "(launchctl kickstart -k, supervisorctl restart, systemctl restart)")
    w.add_argument("--server-pid-command", default=None,
                   help="shell command that prints the server's pid (nothing or 0: not "
                        "running); needed with --restart-command")
    for flag, kind, default, text in WATCHDOG_LIMITS:
        w.add_argument(flag, type=kind, default=default, help=text)
    w.add_argument("--watchdog-min-cpu-s", type=float, default=0.5,
                   help="CPU seconds the server must use between two looks to count as working "
                        "(a prefill, a model loading)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p.parse_args(argv)


def first_not_positive(args: argparse.Namespace, limits) -> str | None:
    for flag, *_ in limits:
        if getattr(args, dest(flag)) <= 0:
            return f"{flag} must be positive (got {getattr(args, dest(flag))})"
    return None


def validate(args: argparse.Namespace) -> str | None:
    """The first problem with the flags as one line, or None."""
    if not 0 < args.port < 65536:
        return f"--port {args.port} is not a TCP port (1-65535)"
    if not args.upstream.startswith(("http://", "https://")):
        return f"--upstream {args.upstream!r} must be an http:// or https:// URL"
    problem = first_not_positive(args, LIMITS)
    if problem:
        return problem
    if args.queue < 0:
        return f"--queue must be 0 or more (got {args.queue})"
    problem = first_not_positive(args, AFFINITY_LIMITS)
    if problem:
        return problem
    if not 0 < args.affinity_min_match <= 1:
        return (f"--affinity-min-match must be a share of the prompt above 0 and at most 1 "
                f"(got {args.affinity_min_match:g}), e.g. 0.5")
    if args.affinity_max_imbalance < 0:
        return f"--affinity-max-imbalance must be 0 or more (got {args.affinity_max_imbalance})"
    try:
        routes, _ = parse_routes(args.route, args.alias, args.public_name)
        replicas = parse_replicas(args.replica, [args.public_name, *(r["name"] for r in routes)])
        keys = parse_key_files(args.upstream_key_file, upstream_urls(args, routes, replicas))
    except RouteSpecError as e:
        return str(e)
    for path in keys.values():
        problem = key_file_problem("--upstream-key-file", path)
        if problem:
            return problem
    if args.restart_command:
        if not args.server_pid_command:
            return "--restart-command needs --server-pid-command (the watchdog reads its CPU time)"
        problem = first_not_positive(args, WATCHDOG_LIMITS)
        if problem:
            return problem
        if args.watchdog_min_cpu_s < 0:
            return f"--watchdog-min-cpu-s must be 0 or more (got {args.watchdog_min_cpu_s})"
    if args.api_key_file is None:
        if not is_loopback(args.host):
            return (f"refusing to listen on {args.host} without --api-key-file: anyone on the "
                    f"network could use the model; give a key file or use --host 127.0.0.1")
        return None
    return key_file_problem("--api-key-file", args.api_key_file)


def key_file_problem(flag: str, path: str) -> str | None:
    """What is wrong with a key file (missing, readable by others, too short), or None."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"{flag} {path}: {e.strerror}"
    if st.st_mode & 0o077:
        return (f"{flag} {path} is readable by others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")
    key = read_key(path)
    if len(key) < 16 or any(c in key for c in b" \t\r\n"):
        return f"{flag} {path} holds no key of 16 or more characters (and no blanks)"
    return None


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


# -- no key material in any log line or error answer ---------------------------------

BEARER = re.compile(r"(?i)(bearer)(\s|\\[rnt]|\\x[0-9a-f]{2})+[^\s'\"\\]+")


class RedactingFormatter(logging.Formatter):
    """Formats as usual, then removes the key and anything sent as a Bearer token."""

    def __init__(self, fmt: str, key: bytes | None, *more: bytes):
        super().__init__(fmt)
        self.secrets = [k.decode("utf-8", "replace") for k in (key, *more) if k]

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self.secrets:
            text = text.replace(secret, "[key]")
        return BEARER.sub(r"\1 [redacted]", text)


async def serve(args: argparse.Namespace, key: bytes | None) -> int:
    front = build_app(args, key)
    loop = asyncio.get_running_loop()
    # header_timeout_s bounds both a head that comes too slowly and an idle
    # kept-alive connection: slow clients hold only their own socket. A client
    # that disconnects cancels its handler, which closes the upstream connection.
    server = Server(front, max_body=args.max_body_bytes, header_timeout=args.header_timeout_s,
                    grace=5.0)
    await front.start()
    try:
        await server.listen(args.host, args.port, backlog=1024)
    except OSError as e:
        await front.stop()
        print(f"proxy: cannot listen on {args.host}:{args.port}: {e.strerror}", file=sys.stderr)
        return 1
    log.info("listening on http://%s:%d -> %s (key %s, concurrency %d, queue %d)", args.host,
             args.port, args.upstream, "required" if key else "off", args.concurrency, args.queue)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await server.stop()
    await front.stop()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = validate(args)
    if problem:
        print(f"proxy: {problem}", file=sys.stderr)
        return 2
    key = read_key(args.api_key_file) if args.api_key_file else None
    handler = logging.StreamHandler(sys.stderr)
    upstream_keys = [read_key(text.partition("=")[2]) for text in args.upstream_key_file]
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                            key, *upstream_keys))
    logging.basicConfig(level=args.log_level, handlers=[handler])
    try:  # in the host lock (requirements/host.in); without it ~0.05 ms more per request
        import uvloop
        return uvloop.run(serve(args, key))
    except ImportError:
        return asyncio.run(serve(args, key))
