"""Fixtures of the host suite: the route as the deploy described it on the host.

Run against any deployed host, by the deploy's last step or by hand:

    pytest tests/host --hosts=local://            # this machine
    pytest tests/host --hosts=ssh://me@studio     # a Mac over SSH
    pytest tests/host --hosts=ssh://me@studio --ssh-config=reports/ssh/studio.config
                                                  # ... with the inventory's SSH settings

Everything is read or run on the host (testinfra's `host.run`, `host.file`),
so the checks are the same on Linux and macOS; host.socket, host.service and
host.process are not used because testinfra does not implement them on macOS.
"""

from __future__ import annotations

import json
import shlex

import pytest


def client_key_file(route: dict) -> str | None:
    """The proxy key the SSH user may read (its own copy when the route is route_user's)."""
    return route["proxy"].get("client_key_file") or route["proxy"]["key_file"]


def proxy_address(route: dict) -> str:
    """Where the host reaches its proxy (route.json; loopback before it said)."""
    return route["proxy"].get("address", "127.0.0.1")


@pytest.fixture(scope="module")
def route(host, request):
    path = request.config.getoption("--route-manifest")
    if path.startswith("~/"):
        path = host.run("printf %s \"$HOME\"").stdout + path[1:]
    manifest = host.file(path)
    assert manifest.exists, f"{path} is missing on the host: run the deploy first"
    return json.loads(manifest.content_string)


@pytest.fixture(autouse=True)
def rank_host_checks_only(request):
    """A cluster host without rank 0 (route.json's cluster.serves_http false) runs
    only ranks: no proxy, no server port. There the tests marked `rank_host`
    run (the ranks' services, the weights, the files' owner); the others skip."""
    if "route" not in request.fixturenames or request.node.get_closest_marker("rank_host"):
        return
    skip_on_a_rank_host(request.getfixturevalue("route"))


def skip_on_a_rank_host(route: dict) -> None:
    """Skip (a test, or a module-scoped fixture's tests) on a cluster host without rank 0."""
    cluster = route.get("cluster") or {}
    if cluster and not cluster.get("serves_http", True):
        pytest.skip(f"a cluster host without rank 0 (ranks {cluster.get('local_ranks')}): "
                    "no HTTP side here; rank 0's host is checked for it")


@pytest.fixture(scope="module")
def model_server(route):
    """For the checks of this host's model server: skips them on a host that runs
    only the front door (route_front_door_only: route.json's front_door_only)."""
    if route.get("front_door_only"):
        pytest.skip("this host runs only the front door (route_front_door_only): no model "
                    "server, no weights, no GPU tuning here")


@pytest.fixture(scope="module")
def http(host, route):
    """curl run on the host, so loopback-only services are reachable."""

    def call(method: str, port: int, path: str, body: dict | None = None, key: bool = True,
             timeout: int = 300) -> tuple[int, str]:
        auth = ""
        key_file = client_key_file(route)
        if key and key_file and port == route["proxy"]["port"]:
            # the key is read on the host and never leaves it in a log
            auth = f'-H "Authorization: Bearer $(cat {shlex.quote(key_file)})" '
        data = ""
        if body is not None:
            data = f"-H 'Content-Type: application/json' --data-binary {shlex.quote(json.dumps(body))} "
        address = proxy_address(route) if port == route["proxy"]["port"] else "127.0.0.1"
        out = host.run(
            f"curl -sS --max-time {timeout} -X {method} {auth}{data}"
            f"-w '\\n%{{http_code}}' http://{address}:{port}{path}"
        )
        assert out.rc == 0, f"curl failed on the host: {out.stderr}"
        text, _, status = out.stdout.rpartition("\n")
        return int(status), text

    return call
