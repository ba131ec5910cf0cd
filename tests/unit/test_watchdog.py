"""The proxy's watchdog restarts a server that is alive but cannot generate,
through its service manager, and leaves a working or deploying server alone
(issue 16, item 5; files/mlx_route_proxy/watchdog.py).

Real parts: a real supervisord (the one in this venv, as the deploy runs it on
Linux) in a tmp dir, running the server program rendered from the route's own
template (templates/supervisor/program.conf.j2) around a real mlx_lm.server
serving SmolLM2-135M on loopback; the proxy as the deploy ships it (the
zipapp, its own process) with the watchdog flags the supervisor backend gives
it: `supervisorctl restart server` to restart, `supervisorctl pid server` for
the pid whose CPU time it reads from /proc. Short limits from flags
(--watchdog-stuck-s 10, --watchdog-interval-s 2) instead of the data's
defaults (180 s, 10 s).

How each fault is made:
- frozen: SIGSTOP to the server's pid (a wedged process, mlx-lm issue 1493:
  alive, 0% CPU, no token);
- generation thread dead: the venv's stock mlx-lm (without patch 0004),
  started through the test-only wrapper tests/fixtures/mlx_fault.py; creating
  its fault file makes the next batch step raise `[metal::malloc] Resource
  limit (499000) exceeded` (mlx-lm issues 1505, 1672), after which stock
  mlx_lm.server answers 404 "generation thread died" and /health 503 while the
  process stays up;
- long prefill: a prompt of random words that takes longer than the stuck
  limit to prefill on this machine's 2 cores (the duration is measured and
  asserted, so the test cannot pass on a prompt that is too short);
- a deploy at work: the maintenance note `routectl.py switch` writes.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tasks.service_spec import Service
from tasks.services import server_flags
from tasks.templates import render
from tests.fixtures import mlx_fault
from tests.fixtures.mlx_server import PROFILE, mlx_env
from tests.fixtures.ports import free_port
from tests.fixtures.proxy import ProxyProcess, start_proxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STUCK_S, INTERVAL_S = 10, 2
# the restart command runs at most STUCK_S + 2 x INTERVAL_S after the last
# progress (watchdog.py); + a few seconds for the probe, the stop and the start
RESTART_LIMIT_S = STUCK_S + 2 * INTERVAL_S + 8
READY_S = 120  # the small model loads in seconds; bounded generously for a loaded machine


class Route:
    """supervisord + the server program + the proxy with its watchdog, in tmp_path."""

    def __init__(self, tmp_path: Path, model_dir: Path, fault_file: Path | None = None,
                 launcher: bool = False):
        self.tmp = tmp_path
        self.port = free_port()
        self.conf = tmp_path / "supervisord.conf"
        self.ctl = f"{BIN / 'supervisorctl'} -c {self.conf}"
        self.maintenance = tmp_path / "state" / "maintenance.json"
        self.maintenance.parent.mkdir()
        logs = tmp_path / "logs"
        logs.mkdir()
        (tmp_path / "hf-cache").mkdir()
        server_argv = ["server", "--model", str(model_dir), "--host", "127.0.0.1",
                       "--port", str(self.port), *server_flags(PROFILE["server_args"])]
        env = {"HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **mlx_env()}
        if fault_file is None:
            argv = [sys.executable, "-m", "mlx_lm", *server_argv]
        else:  # the stock mlx_lm of this venv, through the fault wrapper
            argv = mlx_fault.argv(*server_argv)
            env |= {"PYTHONPATH": str(REPO), mlx_fault.ENV: str(fault_file)}
        stdout, stderr = logs / "server.out.log", logs / "server.err.log"
        if launcher:
            # as the systemd unit and the launchd plist run it (tasks/launcher.py): the
            # launcher writes the server's logs and execs it; supervisord's own logs of
            # the program stay empty
            argv = [sys.executable, str(REPO / "files" / "route_run.py"), "--stdout", str(stdout),
                    "--stderr", str(stderr), "--max-bytes", str(50 * 2**20), "--keep", "2",
                    "--", *argv]
            stdout, stderr = logs / "supervisor.out.log", logs / "supervisor.err.log"
        svc = Service(name="server", label="org.mlxroute.server", description="test server",
                      argv=argv, env=env, workdir=str(REPO), stdout=str(stdout),
                      stderr=str(stderr), nofile=1024, restart_delay=1, stop_timeout_s=30,
                      log_max_mb=50, log_keep=2, interactive=True)
        conf_d = tmp_path / "conf.d"
        conf_d.mkdir()
        (conf_d / "server.conf").write_text(render("supervisor/program.conf.j2", svc=svc))
        self.conf.write_text(render(
            "supervisor/supervisord.conf.j2", sock=tmp_path / "s.sock",
            pidfile=tmp_path / "s.pid", logfile=logs / "supervisord.log", conf_d=conf_d,
            home=tmp_path, nofile=1024, log_max_mb=10, log_keep=3,
        ))
        self.supervisord = subprocess.Popen(
            [str(BIN / "supervisord"), "-n", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        self.proxy: ProxyProcess | None = None
        self.server_log = logs / "server.err.log"

    def start_proxy(self) -> None:
        self.proxy = start_proxy(
            f"http://127.0.0.1:{self.port}",
            "--restart-command", f"{self.ctl} restart server",
            "--server-pid-command", f"{self.ctl} pid server",
            "--watchdog-stuck-s", str(STUCK_S), "--watchdog-interval-s", str(INTERVAL_S),
            "--watchdog-backoff-s", "30", "--maintenance-file", str(self.maintenance),
            "--probe-timeout-s", "60", "--log-level", "DEBUG",
            log_path=self.tmp / "proxy.log",
        )
        end = time.monotonic() + 60
        while True:  # its readiness probe: a 1-token generation through it
            try:
                with urllib.request.urlopen(self.proxy.url + "/health", timeout=20) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < end, f"the proxy never got ready:\n{self.proxy.log()}"
            time.sleep(0.5)

    def pid(self) -> int | None:
        out = subprocess.run(f"{self.ctl} pid server", shell=True, capture_output=True,
                             text=True, timeout=30).stdout.strip()
        return int(out) if out.isdigit() and int(out) > 0 else None

    def answers(self) -> bool:
        """A 1-token chat straight to mlx_lm.server."""
        body = json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                           "max_tokens": 1}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=20) as reply:
                return reply.status == 200 and bool(json.loads(reply.read())["choices"])
        except (OSError, ValueError, KeyError):
            return False

    def wait_serving(self, timeout: float, not_pid: int | None = None) -> int:
        """The pid of a server that answers a chat (other than `not_pid`)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.supervisord.poll() is None, "supervisord exited"
            pid = self.pid()
            if pid is not None and pid != not_pid and self.answers() and self.pid() == pid:
                return pid
            time.sleep(0.5)
        raise AssertionError(f"no server (other than pid {not_pid}) answered within {timeout} s:"
                             f"\n{self.server_log.read_text(errors='replace')[-2000:]}"
                             f"\n{self.proxy.log()[-3000:] if self.proxy else ''}")

    def wait_new_pid(self, old: int, timeout: float) -> float:
        """Seconds until supervisord runs a process other than `old`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            pid = self.pid()
            if pid is not None and pid != old:
                return time.monotonic() - start
            time.sleep(0.2)
        raise AssertionError(f"pid {old} was not replaced within {timeout} s:\n"
                             f"{self.proxy.log()[-3000:]}")

    def restarts(self) -> dict[str, int]:
        with urllib.request.urlopen(self.proxy.url + "/metrics", timeout=10) as reply:
            text = reply.read().decode()
        return {m[0]: int(m[1]) for m in
                re.findall(r'proxy_watchdog_restarts_total\{reason="(\w+)"\} (\d+)', text)}

    def stop(self, frozen: list[int]) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for pid in frozen:  # a process this test froze takes its SIGTERM only once continued
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        if self.supervisord.poll() is None:
            self.supervisord.terminate()  # stops its program (stopasgroup), then exits
            try:
                self.supervisord.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.supervisord.pid, signal.SIGKILL)
                self.supervisord.wait(10)


@pytest.fixture
def route_factory(smollm2_model_dir, tmp_path):
    routes: list[tuple[Route, list[int]]] = []

    def start(fault_file: Path | None = None, launcher: bool = False) -> tuple[Route, list[int]]:
        route = Route(tmp_path, smollm2_model_dir, fault_file, launcher)
        frozen: list[int] = []
        routes.append((route, frozen))
        route.wait_serving(READY_S)
        route.start_proxy()
        return route, frozen

    yield start
    for route, frozen in routes:
        route.stop(frozen)


def proxy_chat(route: Route, content: str, max_tokens: int = 1,
               timeout: float = 300) -> tuple[int, dict]:
    body = json.dumps({"model": "openai/glm52", "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": content}]}).encode()
    req = urllib.request.Request(route.proxy.url + "/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def freeze(route: Route, frozen: list[int]) -> int:
    pid = route.pid()
    assert pid is not None
    frozen.append(pid)
    os.kill(pid, signal.SIGSTOP)
    return pid


def test_frozen_server_is_restarted_through_supervisor_within_the_limit(route_factory):
    route, frozen = route_factory()
    old = freeze(route, frozen)
    took = route.wait_new_pid(old, RESTART_LIMIT_S + 30)
    new = route.wait_serving(READY_S, not_pid=old)
    print(f"\nfrozen pid {old} replaced by pid {new} after {took:.1f} s "
          f"(limit {RESTART_LIMIT_S} s: stuck {STUCK_S} s + 2 x interval {INTERVAL_S} s + 8 s)")
    assert took <= RESTART_LIMIT_S, route.proxy.log()[-3000:]
    assert route.restarts() == {"no_token": 1}
    log = route.proxy.log()
    assert f"watchdog: restarting the server (pid {old}, no token for" in log, log[-3000:]
    assert proxy_chat(route, "What is the capital of France?", 4)[0] == 200


def listening_pid(port: int) -> int | None:
    out = subprocess.run(["lsof", "-t", "-nP", f"-iTCP:{port}", "-sTCP:LISTEN"],
                         capture_output=True, text=True, timeout=30).stdout.split()
    return int(out[0]) if out else None


def test_frozen_server_under_the_launcher_is_restarted_and_its_log_written(route_factory):
    """The server as systemd and launchd run it, through files/route_run.py: the pid
    the manager knows is the server's own (exec), so the watchdog sees the frozen server and
    restarts the real process, and the server's own lines reach the launcher's log."""
    route, frozen = route_factory(launcher=True)
    old = route.pid()
    assert old == listening_pid(route.port)  # the manager's pid is the server, not a wrapper
    old = freeze(route, frozen)
    took = route.wait_new_pid(old, RESTART_LIMIT_S + 30)
    new = route.wait_serving(READY_S, not_pid=old)
    print(f"\nfrozen pid {old} (launcher) replaced by pid {new} after {took:.1f} s")
    assert took <= RESTART_LIMIT_S, route.proxy.log()[-3000:]
    assert new == listening_pid(route.port)
    assert route.restarts() == {"no_token": 1}
    assert proxy_chat(route, "What is the capital of France?", 4)[0] == 200
    end = time.monotonic() + 20  # mlx_lm.server's request lines, written by the launcher
    while b'"POST /v1/chat/completions HTTP/1.1" 200' not in route.server_log.read_bytes():
        assert time.monotonic() < end, route.server_log.read_text(errors="replace")[-2000:]
        time.sleep(0.5)
    assert (route.tmp / "logs" / "supervisor.err.log").read_bytes() == b""


def test_server_whose_generation_thread_died_is_restarted(route_factory, tmp_path):
    """Stock mlx-lm (no patch 0004): the injected exception kills the
    generation thread; the process stays up and answers 404 until restarted."""
    fault = tmp_path / "fault"
    route, _ = route_factory(fault)
    old = route.pid()
    mlx_fault.inject(fault)
    status, _ = proxy_chat(route, "What is the capital of France?", 4)
    assert status in (502, 503) and not mlx_fault.pending(fault), status
    assert "generation thread died" in route.server_log.read_text(errors="replace")
    took = route.wait_new_pid(old, RESTART_LIMIT_S + 30)
    new = route.wait_serving(READY_S, not_pid=old)
    print(f"\ndead-thread pid {old} replaced by pid {new} after {took:.1f} s")
    assert took <= RESTART_LIMIT_S
    assert route.restarts() == {"generation_thread_died": 1}
    log = route.proxy.log()
    assert "generation thread died" in log.split("watchdog: restarting the server", 1)[1], log
    assert proxy_chat(route, "What is the capital of France?", 4)[0] == 200


def test_long_prefill_is_left_alone(route_factory):
    route, _ = route_factory()
    pid = route.pid()
    # ~1800 tokens (~6.9 a word): past the watchdog's judgment (STUCK_S + 2 x INTERVAL_S)
    # even at OpenBLAS's best prefill here (server_blas_library: ~100 tok/s alone; 19 s
    # for 600 tokens at load average 5)
    words = [f"w{random.randrange(10**6)}" for _ in range(260)]
    prompt = "Count the words in this text: " + " ".join(words)
    started = time.monotonic()
    status, reply = proxy_chat(route, prompt, 1, timeout=300)
    took = time.monotonic() - started
    print(f"\nprompt of {reply.get('usage', {}).get('prompt_tokens')} tokens answered in "
          f"{took:.1f} s (stuck limit {STUCK_S} s)")
    assert status == 200, reply
    # long enough that a watchdog judging by time alone would have restarted it
    assert took > STUCK_S + 2 * INTERVAL_S, f"the prompt took only {took:.1f} s: make it longer"
    assert route.pid() == pid and route.restarts() == {}
    assert "watchdog: restarting" not in route.proxy.log()


def test_no_restart_while_the_deploy_restarts_the_server(route_factory):
    route, frozen = route_factory()
    now = time.time()
    route.maintenance.write_text(json.dumps({"message": "the model is restarting on release x",
                                             "since": now, "until": now + 600}))
    old = freeze(route, frozen)
    time.sleep(STUCK_S + 4 * INTERVAL_S)
    assert route.pid() == old and route.restarts() == {}, route.proxy.log()[-3000:]
    # the watchdog was armed all along: once the note is past its end (the switch
    # that wrote it was killed half-way and could not remove it) it acts
    route.maintenance.write_text(json.dumps({"message": "the model is restarting on release x",
                                             "since": now, "until": time.time() - 1}))
    took = route.wait_new_pid(old, RESTART_LIMIT_S + 30)
    assert took <= RESTART_LIMIT_S
    assert route.restarts() == {"no_token": 1}
    assert "is past its end" in route.proxy.log()
