"""Re-provisioning a host the model fills: the real deploy inside a memory cgroup.

The target Mac holds one copy of GLM-5.2 and never two. Here a Linux memory
cgroup (tests/fixtures/cgroup.py) holds one copy of the small model's whole
route (pyinfra, supervisord, mlx_lm.server, the proxy, the deploy's tools)
and not two: measured on this machine, the server is ~0.70 GiB resident, a
smoke generation ~0.65 GiB, the proxy and supervisord ~0.06 GiB. Everything
runs for real inside it, with its own paths and ports beside README's route.

In order (one host, state carried from test to test):
1. a fresh deploy: the budget reads the cgroup's limit and picks stop-first;
2. the control: overlap forced on a server change is killed for memory;
3. a lock change builds a new release and moves the server to it, stop-first,
   while a client polling the proxy sees only 200s and 503s with Retry-After;
   the host suite passes;
4. a release that cannot generate (tests/fixtures/fault_release.py: a stand-in
   wheel that refuses `mlx_lm.generate`, since no registry serves a broken
   build on demand) leaves the route on the previous release, in both
   strategies;
5. `pyinfra ... rollback.py` moves the server back to the release before.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures import cgroup
from tests.fixtures.fault_release import broken_lock, changed_lock

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
# Measured here: the running route is 0.67 GiB resident (server 0.70 GiB RSS with
# shared pages), 0.77 GiB with pyinfra; a smoke beside it brings it to 1.39 GiB.
LIMIT_GIB = 1.2
SERVER_PORT, PROXY_PORT = 18125, 18126
CHAT = json.dumps({"model": "openai/glm52", "max_tokens": 1,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()


class Host:
    """The cgroup, the route's folders, and how to run pyinfra inside."""

    def __init__(self, base: Path):
        self.base = base
        self.cg = cgroup.MemoryCgroup(f"mlxroute-test-{os.getpid()}", int(LIMIT_GIB * 2**30))
        self.root = base / "venvs"
        self.route_home = base / "route"
        self.measured: dict = {"limit_gib": LIMIT_GIB, "deploys": []}
        self.data = [
            f"route_home={self.route_home}", f"venv_path={self.root}",
            f"model_root={base / 'models'}", f"route_logs_dir={base / 'logs'}",
            f"server_port={SERVER_PORT}", f"proxy_port={PROXY_PORT}",
            "service_label_prefix=org.mlxroute-cgtest",
            # the proxy and supervisord, measured: 0.06 GiB; pyinfra's own 0.1 GiB runs here too
            "host_memory_route_gib=0.15",
        ]

    def pyinfra(self, *data: str, deploy: str = "deploy.py", timeout: int = 840):
        argv = [*self.cg.enter_command(), PYINFRA, "-y", "inventory.py", deploy]
        for item in [*self.data, *data]:
            argv += ["--data", item]
        started = time.monotonic()
        result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.measured["deploys"].append({
            "data": [d for d in data if not d.startswith("venv_requirements")], "deploy": deploy,
            "code": result.returncode, "seconds": round(time.monotonic() - started, 1),
            "oom_kills": self.cg.oom_kills(), "peak_gib": round((self.cg.peak() or 0) / 2**30, 3)})
        return result.returncode, result.stdout + result.stderr

    def current(self) -> str:
        return os.readlink(self.root / "current").rsplit("/", 1)[-1]

    def releases(self) -> dict:
        return json.loads((self.root / "releases.json").read_text())

    def close(self) -> None:
        ctl = self.root / "next" / "bin" / "supervisorctl"
        conf = self.route_home / "supervisor" / "supervisord.conf"
        if ctl.exists() and conf.exists():
            subprocess.run([str(ctl), "-c", str(conf), "shutdown"], capture_output=True,
                           timeout=60)
        self.cg.close()


def chat(timeout: float = 60) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{PROXY_PORT}/v1/chat/completions",
                                     data=CHAT, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class Poller(threading.Thread):
    """A client asking the proxy for 1 token every 0.25 s (bounded: 900 s at most)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen: list[tuple[int, str | None, bytes]] = []
        self.stop = threading.Event()

    def run(self):
        deadline = time.monotonic() + 900
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                status, headers, body = chat(timeout=120)
                self.seen.append((status, headers.get("Retry-After"), body[:300]))
            except OSError as e:  # a refused or reset connection: never acceptable here
                self.seen.append((0, None, repr(e).encode()))
            self.stop.wait(0.25)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    why = cgroup.available()
    if why:
        pytest.fail(f"this test needs a memory cgroup: {why} (run the suite as root)")
    h = Host(tmp_path_factory.mktemp("memory-limit"))
    yield h
    # what README quotes (reports/ is git-ignored)
    (REPO / "reports").mkdir(exist_ok=True)
    (REPO / "reports" / "e2e-memory-limit.json").write_text(json.dumps(h.measured, indent=1))
    h.close()
    shutil.rmtree(h.base, ignore_errors=True)


@pytest.fixture(scope="module")
def first(host):
    code, log = host.pyinfra("verify_enabled=False")
    assert code == 0, log[-5000:]
    return log


def test_a_fresh_deploy_inside_the_limit_reads_it_and_restarts_stop_first(host, first):
    assert f"cgroup limit {LIMIT_GIB:.2f} = {LIMIT_GIB:.2f}; model 0.66" in first
    assert "a second copy of the model does NOT fit; restart strategy: stop-first" in first
    assert host.cg.oom_kills() == 0
    assert chat()[0] == 200


def test_forcing_overlap_is_killed_for_memory_the_control(host, first):
    """Shows the limit is real: a smoke beside the running server does not fit."""
    before = host.cg.oom_kills()
    code, log = host.pyinfra("verify_enabled=False", "server_restart_strategy=overlap",
                             'server_extra_args=["--prefill-step-size", "512"]')
    # the kernel picks the victim: the smoke (the deploy fails, the route stays as it
    # was) or the running server, the larger (seen since the smoke runs on OpenBLAS:
    # the switch then starts the new release); either way, not both in the limit
    assert host.cg.oom_kills() > before, (code, log[-3000:])


def test_a_new_release_is_switched_to_stop_first_while_clients_see_only_200_and_503(
        host, first, tmp_path):
    old = host.current()
    poller = Poller()
    lock = changed_lock(tmp_path)
    # after the control, the server may be down: the proxy says 503 until the deploy is done
    poller.start()
    try:
        code, log = host.pyinfra(f"venv_requirements={lock}")
    finally:
        poller.stop.set()
        poller.join(timeout=150)
    assert code == 0, log[-5000:]
    new = host.current()
    assert new != old and f"Switch the server to release {new}, stop-first" in log
    assert "passed" in log and " failed" not in log.split("Verify the route", 1)[-1]
    statuses = {status for status, _, _ in poller.seen}
    assert statuses <= {200, 503}, [s for s in poller.seen if s[0] not in (200, 503)][:5]
    restarting = [s for s in poller.seen if s[0] == 503]
    assert restarting, "no 503 was seen: the server was never stopped?"
    assert all(retry for _, retry, _ in restarting)  # every 503 says when to come back
    assert any(b"the model is restarting" in body for _, _, body in restarting)
    assert poller.seen[-1][0] == 200
    first_503 = next(i for i, s in enumerate(poller.seen) if s[0] == 503)
    last_503 = max(i for i, s in enumerate(poller.seen) if s[0] == 503)
    host.measured["poller"] = {
        "requests": len(poller.seen), "ok": sum(s[0] == 200 for s in poller.seen),
        "restarting_503": len(restarting), "503_window_requests": last_503 - first_503 + 1}
    assert host.releases()["previous"][0] == old
    assert (host.root / "releases" / old).is_dir()  # kept for a rollback


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """One lock, so both strategies try the same broken release (built once)."""
    return broken_lock(tmp_path_factory.mktemp("broken-release"))


@pytest.mark.parametrize("strategy", ["stop-first", "overlap"])
def test_a_release_that_cannot_generate_leaves_the_route_on_the_previous_one(
        host, first, broken, strategy):
    before = host.current()
    current_link = os.readlink(host.root / "current")
    code, log = host.pyinfra("verify_enabled=False", f"venv_requirements={broken}",
                             f"server_restart_strategy={strategy}")
    assert code != 0, log[-3000:]
    assert "mlxroute-fault: this release was built unable to generate" in log
    if strategy == "stop-first":
        assert f"rolled back: the route is back on release {before}" in log
    else:
        assert f"nothing changed: the server still runs release {before}" in log
    assert os.readlink(host.root / "current") == current_link
    broken = host.releases()["failed"]
    assert any("unable to generate" in entry["why"] for entry in broken.values())
    status, _, body = chat()
    assert status == 200, body


def test_rollback_by_hand_goes_back_to_the_release_before(host, first):
    state = host.releases()
    current, previous = state["current"], state["previous"][0]
    code, log = host.pyinfra(deploy="rollback.py")
    assert code == 0, log[-3000:]
    assert host.current() == previous
    assert host.releases()["previous"][0] == current
    assert chat()[0] == 200
