"""The proxy's command line, built from host data (`python proxy.pyz --help`).

Kept apart from the task modules so it is a plain function: the service
description calls it, and tests check it against the proxy's own parser.
"""

from __future__ import annotations

# data key -> flag of the proxy (files/mlx_route_proxy/cli.py); a key set to None leaves the proxy's default.
LIMIT_FLAGS = {
    "proxy_max_body_bytes": "--max-body-bytes",
    "proxy_concurrency": "--concurrency",
    "proxy_queue": "--queue",
    "proxy_request_timeout_s": "--request-timeout-s",
    "proxy_first_byte_timeout_s": "--first-byte-timeout-s",
    "proxy_header_timeout_s": "--header-timeout-s",
    "proxy_body_timeout_s": "--body-timeout-s",
    "proxy_probe_timeout_s": "--probe-timeout-s",
    "proxy_retry_after_ms": "--retry-after-ms",
    "proxy_log_level": "--log-level",
}

# data key -> replica policy flag (files/mlx_route_proxy/affinity.py); used with route_replicas.
ROUTING_FLAGS = {
    "route_replica_policy": "--replica-policy",
    "route_affinity_min_match": "--affinity-min-match",
    "route_affinity_max_imbalance": "--affinity-max-imbalance",
    "route_affinity_max_entries": "--affinity-max-entries",
    "route_affinity_block_chars": "--affinity-block-chars",
}

# data key -> watchdog flag (files/mlx_route_proxy/watchdog.py), passed when watchdog_enabled.
WATCHDOG_FLAGS = {
    "watchdog_stuck_s": "--watchdog-stuck-s",
    "watchdog_interval_s": "--watchdog-interval-s",
    "watchdog_min_cpu_s": "--watchdog-min-cpu-s",
    "watchdog_backoff_s": "--watchdog-backoff-s",
    "watchdog_backoff_max_s": "--watchdog-backoff-max-s",
}


def local_address(listen: str) -> str:
    """Where a process on the host reaches a proxy listening on `listen` (proxy_host):
    loopback when it listens on every address, else that address."""
    if listen in ("0.0.0.0", "::", "", "localhost"):
        return "127.0.0.1"
    return f"[{listen}]" if ":" in listen else listen


def proxy_argv(python: str, script: str, key_file: str | None, data,
               public_name: str | None = None, maintenance_file: str | None = None,
               watchdog: tuple[str, str] | None = None, upstream: str | None = None) -> list[str]:
    """argv of the proxy service; `data` is a pyinfra host.data (or any .get()).

    `watchdog`: (restart command, pid command) of the server from its backend;
    None (or watchdog_enabled False) leaves the watchdog off. `upstream`: the
    first model's upstream when it is not this host's server (a front door only)."""
    name = public_name or data.get("proxy_public_name")
    argv = [python, script,
            "--host", str(data.get("proxy_host")),
            "--port", str(data.get("proxy_port")),
            "--upstream", upstream or f"http://{data.get('server_host')}:{data.get('server_port')}"]
    if name:
        argv += ["--public-name", str(name)]
    if key_file:
        argv += ["--api-key-file", key_file]
    if maintenance_file:
        argv += ["--maintenance-file", maintenance_file]
    for key, flag in {**LIMIT_FLAGS, **ROUTING_FLAGS}.items():
        value = data.get(key)
        if value is not None:
            argv += [flag, str(value)]
    if watchdog and data.get("watchdog_enabled"):
        argv += ["--restart-command", watchdog[0], "--server-pid-command", watchdog[1]]
        for key, flag in WATCHDOG_FLAGS.items():
            value = data.get(key)
            if value is not None:
                argv += [flag, str(value)]
    return argv
