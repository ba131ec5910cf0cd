"""Service logs stay bounded under supervisor, from data (issue 16).

Real parts: the real pyinfra CLI renders the route's server program from
group_data and `--data service_log_max_mb=1 --data service_log_keep=2`
(route_services() -> templates/supervisor/program.conf.j2); only its command
and log paths are swapped for a test program that writes 12 MiB to stdout and
to stderr in writes of 65000 bytes and never reopens anything. A real supervisord (the
one in this venv, as the deploy runs it on Linux) runs it; the test reads the
log files it leaves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.supervisord import start as start_supervisord

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MAX_MB, KEEP = 1, 2
MIB = 1024 * 1024
WRITTEN = 12 * MIB  # per stream: four times what may be kept

RENDER = """
import dataclasses, json, os
from pathlib import Path
from tasks.services import route_services
from tasks.templates import render

out = json.loads(os.environ["MLXROUTE_TEST_SERVICE"])
svc = dataclasses.replace(route_services()["server"], **out["replace"])
Path(out["path"]).write_text(render("supervisor/program.conf.j2", svc=svc))
"""

WRITER = f"""
import os, sys, time
line = b"x" * 999 + b"\\n"
chunk = line * 65  # 65000 bytes a write: rotations never fall on a write's end
for i in range({WRITTEN} // len(chunk)):
    os.write(1, chunk)
    os.write(2, chunk)
os.write(1, b"DONE\\n")
os.write(2, b"DONE\\n")
time.sleep(600)
"""


def render_program(tmp_path: Path, *data: str) -> str:
    """The server's supervisor program as the deploy renders it from data,
    with the writer as its command and its logs in tmp_path."""
    import json

    deploy = tmp_path / "render.py"
    deploy.write_text(RENDER)
    writer = tmp_path / "writer.py"
    writer.write_text(WRITER)
    out = tmp_path / "program.conf"
    spec = {"path": str(out), "replace": {
        "argv": [sys.executable, str(writer)],
        "stdout": str(tmp_path / "logs" / "server.out.log"),
        "stderr": str(tmp_path / "logs" / "server.err.log"),
        "workdir": str(tmp_path),
    }}
    argv = [str(BIN / "pyinfra"), "-y", "@local", str(deploy)]
    for item in data:
        argv += ["--data", item]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MLXROUTE_TEST_SERVICE": json.dumps(spec)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out.read_text()


def run_supervisord(tmp_path: Path, program: str) -> subprocess.Popen:
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    (tmp_path / "logs").mkdir(exist_ok=True)
    (conf_d / "server.conf").write_text(program)
    return start_supervisord(tmp_path, conf_d)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()  # supervisord stops its program (stopasgroup) and exits
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_done(log: Path, supervisord: subprocess.Popen, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while not (log.exists() and log.read_bytes().endswith(b"DONE\n")):
        assert supervisord.poll() is None, "supervisord exited"
        assert time.monotonic() < end, f"{log} never got the writer's last line"
        time.sleep(0.2)


def test_each_supervisor_log_stays_under_keep_plus_one_times_its_size(tmp_path):
    program = render_program(tmp_path, f"service_log_max_mb={MAX_MB}",
                             f"service_log_keep={KEEP}")
    supervisord = run_supervisord(tmp_path, program)
    try:
        for name in ("server.out.log", "server.err.log"):
            wait_done(tmp_path / "logs" / name, supervisord)
    finally:
        stop(supervisord)

    for name in ("server.out.log", "server.err.log"):
        log = tmp_path / "logs" / name
        copies = sorted(log.parent.glob(name + "*"))
        sizes = {p.name: p.stat().st_size for p in copies}
        print(f"\n{name}: {WRITTEN // MIB} MiB written; kept {sizes}")
        # rotated KEEP times at least, and the oldest beyond KEEP removed
        assert [p.name for p in copies] == [name] + [f"{name}.{i}" for i in range(1, KEEP + 1)]
        assert all(size < MAX_MB * MIB for size in sizes.values()), sizes
        assert sum(sizes.values()) < (KEEP + 1) * MAX_MB * MIB < WRITTEN
        # the newest output is what was kept
        assert log.read_bytes().endswith(b"x\nDONE\n")
