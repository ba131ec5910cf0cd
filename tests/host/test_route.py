"""The route is healthy: the promises a user checks after every deploy."""

from __future__ import annotations

import json
import posixpath
import re
import shlex

import pytest

PROXY_CLIENT_MODEL = "openai/glm52"  # what LiteLLM / Terminal-Bench send (docs/field-report.md)


def listening(host, port: int) -> set[str]:
    """Addresses with a TCP listener on `port` (lsof works on macOS and Linux).

    lsof shows only the connecting user's sockets unless it runs as root: when
    the services run as another route_user it finds nothing, and the socket
    tables every user may read answer instead (`ss` on Linux, `netstat` on macOS)."""
    port = int(port)
    out = host.run(f"lsof -nP -iTCP:{port} -sTCP:LISTEN -Fn")
    found = {line[1:].rsplit(":", 1)[0] for line in out.stdout.splitlines() if line.startswith("n")}
    if found:
        return found
    if host.system_info.type == "linux":
        out = host.run(f"ss -Hltn 'sport = :{port}'")
        # State Recv-Q Send-Q Local:Port Peer:Port
        return {line.split()[3].rsplit(":", 1)[0] for line in out.stdout.splitlines()
                if len(line.split()) >= 5}
    out = host.run("netstat -an -p tcp")
    # tcp4 0 0 127.0.0.1.8025 *.* LISTEN  (the port after the last dot)
    addresses = set()
    for line in out.stdout.splitlines():
        cols = line.split()
        if len(cols) >= 6 and cols[-1] == "LISTEN" and cols[3].endswith(f".{port}"):
            address = cols[3][: -len(f".{port}")]
            addresses.add("127.0.0.1" if address == "localhost" else address)
    return addresses


def supervised_by_ps(host, route, name: str) -> tuple[bool, str]:
    """The program runs as route_user, a child of the route's supervisord: read
    from the process table, for a suite connected as another user (supervisord's
    socket is its owner's only)."""
    pid = host.file(route["supervisord_pidfile"]).content_string.strip()
    # uids: ps cuts user names to 8 characters
    uid = host.run(f"id -u {shlex.quote(route['user'])}").stdout.strip()
    table = host.run("ps -ww -e -o pid=,ppid=,uid=,args=").stdout.splitlines()
    rows = [line.split(None, 3) for line in table if len(line.split(None, 3)) == 4]
    parent = [row for row in rows if row[0] == pid]
    definition = host.file(route["service_definitions"][name]).content_string
    (command,) = [line[len("command="):] for line in definition.splitlines()
                  if line.startswith("command=")]
    argv = " ".join(shlex.split(command.replace("%%", "%")))
    children = [row for row in rows if row[1] == pid and row[3].startswith(argv)]
    ok = bool(uid) and bool(parent) and parent[0][2] == uid and bool(children) and all(
        row[2] == uid for row in children)
    return ok, f"supervisord {parent[:1]}, {name}: {children}"


def test_server_listens_on_loopback_only(host, route, model_server):
    addresses = listening(host, route["server"]["port"])
    assert addresses, f"nothing listens on the server port {route['server']['port']}"
    assert addresses <= {"127.0.0.1", "[::1]", "localhost"}, (
        f"mlx_lm.server must stay on loopback, found {sorted(addresses)}"
    )


def test_proxy_listens_where_data_says(host, route):
    addresses = listening(host, route["proxy"]["port"])
    wanted = route["proxy"]["host"]
    assert addresses, f"nothing listens on the proxy port {route['proxy']['port']}"
    if wanted in ("0.0.0.0", "*"):
        assert addresses & {"*", "0.0.0.0"}, f"proxy should listen on all addresses: {addresses}"
    else:
        assert addresses == {wanted}, f"proxy should listen on {wanted} only: {addresses}"


@pytest.mark.rank_host
def test_every_shard_of_the_index_is_present(host, route, model_server):
    index = host.file(posixpath.join(route["model_dir"], "model.safetensors.index.json"))
    assert index.exists, f"{index.path} is missing: the weights are incomplete"
    shards = sorted(set(json.loads(index.content_string)["weight_map"].values()))
    assert len(shards) == route["shards"], (
        f"the index names {len(shards)} shards, the profile expects {route['shards']}"
    )
    for shard in shards:
        f = host.file(posixpath.join(route["model_dir"], shard))
        assert f.exists and f.size > 0, f"{f.path} is missing or empty"
    listed = host.run(f"find {shlex.quote(route['model_dir'])} -maxdepth 1 -name '*.safetensors'")
    assert len(listed.stdout.split()) == route["shards"]
    leftovers = host.run(f"find {shlex.quote(route['model_dir'])} -name '*.incomplete'")
    assert leftovers.stdout.strip() == "", f"unfinished downloads: {leftovers.stdout}"


def service_running(host, route, name: str) -> tuple[bool, str]:
    """The backend's own check, from route.json (tasks/backends: running_check)."""
    command, running = route["service_running"][name]
    out = host.run(command)
    if "Permission denied" in out.stdout + out.stderr and route.get("supervisord_pidfile"):
        return supervised_by_ps(host, route, name)
    return bool(re.search(running, out.stdout, re.M)), out.stdout[:500]


def test_server_runs_under_its_service_manager(host, route, model_server):
    ok, status = service_running(host, route, "server")
    assert ok, f"the server is not running under {route['backend']}: {status}"


@pytest.mark.rank_host
def test_every_cluster_rank_runs_under_its_service_manager(host, route):
    """A cluster (tasks/cluster.py): this host's other ranks, server-rankN, run too."""
    ranks = sorted(name for name in route["service_running"] if name.startswith("server-rank"))
    if not ranks:
        pytest.skip("no cluster ranks on this host besides the server (cluster_ranks is empty)")
    down = {}
    for name in ranks:
        ok, status = service_running(host, route, name)
        if not ok:
            down[name] = status
    assert not down, f"cluster ranks not running under {route['backend']}: {down}"


def read_as_route_user(host, command: str):
    """`command` as the suite's user, else through `sudo -n` (the services may run
    as another route_user, whose pids and /proc maps are not ours to read)."""
    out = host.run(command)
    if out.rc != 0 or not out.stdout.strip():
        out = host.run(f"sudo -n sh -c {shlex.quote(command)}")
    return out


@pytest.mark.rank_host
def test_every_model_server_runs_with_the_blas_data_asks_for(host, route):
    """Linux, server_blas_library: each model server (server, server-<profile>,
    cluster ranks) has the preloaded BLAS in its memory map; the mlx wheel's own
    reference BLAS is ~10x slower at prefill (docs/linux.md)."""
    blas = route.get("server_blas") or {}
    if blas.get("library") is None:
        pytest.skip("server_blas_library is None: the servers use the mlx wheel's own BLAS")
    if route["backend"] == "launchd":
        pytest.skip("macOS: MLX runs on Metal, nothing is preloaded")
    if blas["mapped"] is None:
        pytest.fail(f"server_blas_library {blas['library']} was missing on the host at deploy "
                    "time, so the servers run the mlx wheel's slow reference BLAS: "
                    "`apt-get install libopenblas0-pthread` and deploy again (or set "
                    "server_blas_library = None)")
    missing, unreadable = {}, {}
    for name, command in sorted(blas["pid_commands"].items()):
        out = read_as_route_user(host, command)
        pid = out.stdout.strip()
        if not pid.isdigit() or pid == "0":
            unreadable[name] = f"no pid from {command!r}: {(pid or out.stderr.strip())[:200]!r}"
            continue
        maps = read_as_route_user(host, f"cat /proc/{pid}/maps")
        if not maps.stdout.strip():
            unreadable[name] = f"/proc/{pid}/maps: {maps.stderr.strip()[:200]}"
        elif blas["mapped"] not in maps.stdout:
            libs = sorted({line.split()[-1] for line in maps.stdout.splitlines()
                           if "blas" in line.lower()})
            missing[name] = f"pid {pid} maps no {blas['mapped']}; its BLAS: {libs}"
    assert not missing, f"model servers without the BLAS data asks for: {missing}"
    if unreadable:
        # the server runs as another route_user and sudo asks for a password:
        # what could be read passed, the rest is said, not guessed
        pytest.skip(f"not readable as this user or with sudo -n: {unreadable}")


def test_proxy_runs_under_its_service_manager(host, route):
    ok, status = service_running(host, route, "proxy")
    assert ok, f"the proxy is not running under {route['backend']}: {status}"


def test_models_endpoint_answers_through_the_proxy(http, route):
    status, body = http("GET", route["proxy"]["port"], "/v1/models")
    assert status == 200, body
    assert json.loads(body)["data"], body


def test_chat_through_the_proxy_answers_and_normalizes_the_model(http, route):
    smoke = route["smoke"]
    # one profile: any name goes to it; several: the proxy routes by name
    name = PROXY_CLIENT_MODEL if len(route.get("served") or [None]) == 1 else route["public_name"]
    status, body = http("POST", route["proxy"]["port"], "/v1/chat/completions", {
        "model": name,
        "messages": smoke["messages"],
        "max_tokens": smoke.get("max_tokens", 16),
        "temperature": 0,
    })
    assert status == 200, body
    reply = json.loads(body)
    assert reply["model"] == name, reply
    content = reply["choices"][0]["message"]["content"]
    assert smoke["expect"] in content, f"expected {smoke['expect']!r} in {content!r}"


def test_every_served_profile_runs_and_answers_by_each_of_its_names(host, http, route, model_server):
    served = route.get("served") or []
    if len(served) < 2:
        pytest.skip("one profile (route_profiles None): the chat test above covers it")
    status, body = http("GET", route["proxy"]["port"], "/v1/models")
    assert [m["id"] for m in json.loads(body)["data"]] == [s["public_name"] for s in served]
    for s in served:
        ok, status_text = service_running(host, route, s["service"])
        assert ok, f"{s['service']} ({s['profile']}) is not running: {status_text}"
        for name in [s["public_name"], *s["aliases"]]:
            status, body = http("POST", route["proxy"]["port"], "/v1/chat/completions", {
                "model": name, "messages": s["smoke"]["messages"],
                "max_tokens": s["smoke"].get("max_tokens", 16), "temperature": 0})
            assert status == 200, (name, body)
            reply = json.loads(body)
            assert reply["model"] == name, reply
            assert s["smoke"]["expect"] in reply["choices"][0]["message"]["content"], (name, reply)
    status, body = http("POST", route["proxy"]["port"], "/v1/chat/completions", {
        "model": "no-such-model", "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1})
    assert status == 404 and "this proxy serves" in body, body


def test_proxy_refuses_a_request_without_the_key(http, route):
    if not route["proxy"]["key_file"]:
        pytest.skip("proxy_api_key is off: the proxy takes no key (it stays on loopback)")
    status, body = http("GET", route["proxy"]["port"], "/v1/models", key=False)
    assert status == 401, body


def test_proxy_without_a_key_stays_on_loopback(route):
    if route["proxy"]["key_file"]:
        pytest.skip("proxy_api_key is on: the proxy may listen beyond loopback")
    assert route["proxy"]["host"] in ("127.0.0.1", "::1", "localhost"), (
        f"a proxy without a key must not listen on {route['proxy']['host']}: set proxy_api_key")


@pytest.mark.rank_host
def test_route_files_belong_to_the_route_user(host, route):
    """The venv (its releases), the weights, route_home and the manifest are
    route_user's, also when the deploy connected as another user."""
    owner = route.get("user")
    assert owner, "route.json names no user: deploy again"
    release = host.run(f"readlink -f {shlex.quote(route['venv'])}").stdout.strip()
    weights = [] if route.get("front_door_only") else [route["model_dir"]]
    for path in (route["venv"], release, posixpath.join(release, "pyvenv.cfg"), *weights,
                 route["route_home"], posixpath.join(route["route_home"], "route.json")):
        f = host.file(path)
        assert f.exists, f"{path} is missing"
        assert f.user == owner, f"{path} belongs to {f.user}, not to route_user {owner}"
