"""A port held by something that is not the route stops the deploy, naming it.

The real pyinfra CLI against @local; the "foreign service" is a real process
this test starts (python's http.server on a free loopback port) and stops.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.ports import free_port, wait_port

REPO = Path(__file__).resolve().parents[2]
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def foreign_listener():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                             "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc, 20, what="http.server")
    yield port, proc.pid
    proc.terminate()
    proc.wait(timeout=10)


def plan(tmp_path: Path, *data: str) -> subprocess.CompletedProcess:
    deploy = tmp_path / "deploy_retire.py"
    deploy.write_text("from tasks.foreign import retire_services\nretire_services()\n")
    argv = [PYINFRA, "-y", "@local", str(deploy), "--data", f"route_home={tmp_path / 'route'}",
            "--data", f"venv_path={tmp_path / 'venvs'}"]
    for item in data:
        argv += ["--data", item]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=100,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_a_process_on_the_server_port_is_named_and_nothing_runs(tmp_path, foreign_listener):
    port, pid = foreign_listener
    result = plan(tmp_path, f"server_port={port}", f"proxy_port={free_port()}")
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"port {port} is held by pid {pid} ({sys.executable} -m http.server {port}" in log
    assert "Nothing was changed. To go on: stop that process, or move the route" in log
    assert "Beginning operation run" not in log  # refused while planning


def test_the_routes_own_processes_are_not_foreign(tmp_path, foreign_listener):
    """A listener whose command line is under route_home is this route's (a re-run)."""
    port, _ = foreign_listener
    result = plan(tmp_path, f"proxy_port={port}", f"server_port={free_port()}",
                  f"route_home={Path(sys.prefix).parent}")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
