"""Prometheus counters, and the middleware that counts every answer."""

from __future__ import annotations

import asyncio
import bisect
import time

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/chat/completions")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
                   1800)


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

    def render(self, active: int, queued: int, ready: bool) -> str:
        out = ["# HELP proxy_requests_total Requests answered, by path and HTTP status.",
               "# TYPE proxy_requests_total counter"]
        for (path, status), n in sorted(self.requests.items()):
            out.append(f'proxy_requests_total{{path="{path}",code="{status}"}} {n}')
        out += ["# HELP proxy_requests_in_flight Generations being served by the upstream.",
                "# TYPE proxy_requests_in_flight gauge",
                f"proxy_requests_in_flight {active}",
                "# HELP proxy_queue_depth Generations waiting for a slot.",
                "# TYPE proxy_queue_depth gauge",
                f"proxy_queue_depth {queued}",
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


def label(path: str) -> str:
    """The path as /metrics names it (a bounded set, whatever clients ask for)."""
    if path in GENERATION_PATHS:
        return path
    if path == "/v1/models" or path.startswith("/v1/models/"):
        return "/v1/models"
    if path in ("/health", "/metrics"):
        return path
    return "other"


def middleware(metrics: Metrics, handler):
    """`handler`, counting every answer by path and status; generations also by duration."""
    clock = time.monotonic

    timed_paths = frozenset(GENERATION_PATHS)

    async def count(request):
        path = request.path
        timed = path in timed_paths
        if not timed:
            path = label(path)
        started = clock() if timed else 0.0
        status = 499  # nginx's code for "client closed request": we were cancelled
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except asyncio.CancelledError:
            raise
        except Exception:
            status = 500
            raise
        finally:
            metrics.request(path, status, clock() - started if timed else None)

    return count
