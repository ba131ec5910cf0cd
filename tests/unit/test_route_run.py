"""Service logs stay bounded under launchd and systemd: files/route_run.py (issue 16).

launchd and systemd open a service's log once and the service writes into that
open file until it restarts, so renaming it (newsyslog) cannot bound it. The
deploy therefore starts each service through files/route_run.py, which pipes
the service's output into a writer that rotates by size and then becomes the
service (exec). Real parts: the real pyinfra CLI renders the server's systemd
unit from group_data and `--data service_log_max_mb=1 --data
service_log_keep=2` (SystemdBackend.render); its ExecStart, unchanged but for
the service's own argv (a test program writing 12 MiB to stdout and stderr,
never reopening anything), runs under a real supervisord, the service manager
this machine has (systemd cannot run as PID 1 here; the unit itself is checked
by `systemd-analyze verify` in test_service_templates.py). The same launcher
options are planned into the Mac's plists (test_macos_plan.py).

The boot wait (`--wait-sysctl`) reads macOS's iogpu.wired_limit_mb, which no
Linux kernel has: here `--sysctl` points at a two-line shell script that
prints a number from a file the test changes, the one stand-in of this module.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.supervisord import start as start_supervisord
from tests.fixtures.artifacts import venv_root_on

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LAUNCHER = REPO / "files" / "route_run.py"
MAX_MB, KEEP = 1, 2
MIB = 1024 * 1024
WRITTEN = 12 * MIB  # per stream: four times what may be kept
LINE = b"x" * 999 + b"\n"

RENDER = """
import dataclasses, json, os
from pathlib import Path
from tasks.backends.systemd import SystemdBackend
from tasks.services import route_services

out = json.loads(os.environ["MLXROUTE_TEST_SERVICE"])
svc = dataclasses.replace(route_services()["server"], **out["replace"])
Path(out["path"]).write_text(SystemdBackend().render(svc))
"""

WRITER = f"""
import os, signal, sys, time
from pathlib import Path
def stopped(*_):
    os.write(2, b"TERM\\n")  # its last words, after the manager's SIGTERM
    os._exit(0)
signal.signal(signal.SIGTERM, stopped)
chunk = {LINE!r} * 65  # 65000 bytes a write: rotations never fall on a write's end
for i in range({WRITTEN} // len(chunk)):
    os.write(1, chunk)
    os.write(2, chunk)
os.write(1, b"DONE\\n")
os.write(2, b"DONE\\n")
Path(sys.argv[1]).write_text(str(os.getpid()))  # all written
time.sleep(600)
"""


def render_unit(tmp_path: Path) -> tuple[list[str], str]:
    """The server's ExecStart and unit text as the deploy renders them, its own argv
    replaced by the writer, its logs in tmp_path/logs."""
    (tmp_path / "render.py").write_text(RENDER)
    writer = tmp_path / "writer.py"
    writer.write_text(WRITER)
    home = tmp_path / "home"
    venvs = venv_root_on(tmp_path, BIN.parent)
    out = tmp_path / "server.service"
    spec = {"path": str(out), "replace": {
        "argv": [sys.executable, str(writer), str(tmp_path / "service.pid")],
        "stdout": str(tmp_path / "logs" / "server.out.log"),
        "stderr": str(tmp_path / "logs" / "server.err.log"),
        "workdir": str(tmp_path),
    }}
    argv = [str(BIN / "pyinfra"), "-y", "@local", str(tmp_path / "render.py"),
            "--data", f"route_home={home}", "--data", f"venv_path={venvs}",
            "--data", "service_backend=systemd",
            "--data", f"service_log_max_mb={MAX_MB}", "--data", f"service_log_keep={KEEP}"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MLXROUTE_TEST_SERVICE": json.dumps(spec)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    (exec_start,) = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    command = shlex.split(exec_start[len("ExecStart="):])
    # where the deploy uploads the launcher (SystemdBackend.prepare)
    assert command[1] == f"{home}/bin/route_run.py", command
    (home / "bin").mkdir(parents=True)
    shutil.copy(LAUNCHER, home / "bin" / "route_run.py")
    return command, text


def run_supervisord(tmp_path: Path, command: list[str]) -> subprocess.Popen:
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    (tmp_path / "logs").mkdir(exist_ok=True)
    # supervisord only keeps it alive: the launcher writes the logs itself
    (conf_d / "server.conf").write_text(
        "[program:server]\n"
        f"command={' '.join(shlex.quote(a) for a in command)}\n"
        # SIGTERM to the whole group, as launchd does when a job exits
        "autorestart=true\nstartsecs=1\nstopwaitsecs=30\nstopasgroup=true\n"
        "stdout_logfile=NONE\nstderr_logfile=NONE\n")
    return start_supervisord(tmp_path, conf_d)


def ctl(tmp_path: Path, *words: str) -> str:
    return subprocess.run([str(BIN / "supervisorctl"), "-c", str(tmp_path / "supervisord.conf"),
                           *words], capture_output=True, text=True, timeout=60).stdout.strip()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()  # supervisord stops its program and exits
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie (a container's PID 1 may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_done(logs: list[Path], supervisord: subprocess.Popen, pid_file: Path,
              timeout: float = 90) -> None:
    """Until the service wrote everything (pid_file) and each log ends with its last line."""
    end = time.monotonic() + timeout
    while not (pid_file.exists() and all(log.exists() and log.read_bytes().endswith(b"DONE\n")
                                         for log in logs)):
        assert supervisord.poll() is None, "supervisord exited"
        assert time.monotonic() < end, f"{logs} never got the writer's last line"
        time.sleep(0.2)


def test_launcher_under_a_real_service_manager_keeps_each_log_under_keep_plus_one_sizes(
        tmp_path):
    command, unit = render_unit(tmp_path)
    assert f"--max-bytes {MAX_MB * MIB} --keep {KEEP} --" in " ".join(command)
    assert "StandardOutput" not in unit and "StandardError" not in unit
    if shutil.which("systemd-analyze"):  # the unit as the deploy renders it, launcher in place
        unit_file = tmp_path / "org.mlxroute.server.service"
        unit_file.write_text(unit)
        check = subprocess.run(["systemd-analyze", "verify", str(unit_file)],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0 and check.stderr == "", check.stderr
    logs = [tmp_path / "logs" / name for name in ("server.out.log", "server.err.log")]
    supervisord = run_supervisord(tmp_path, command)
    try:
        wait_done(logs, supervisord, tmp_path / "service.pid")
        service = int((tmp_path / "service.pid").read_text())
        # exec: the manager's pid is the service's own (systemd's MainPID, the watchdog's)
        assert ctl(tmp_path, "pid", "server") == str(service)
        (writer,) = children(service)  # the log writer, and nothing else
        assert "route_run.py" in Path(f"/proc/{writer}/cmdline").read_text()

        # a restart (SIGTERM to the service): the old writer drains and exits, a new
        # one takes over the same files, still bounded
        (tmp_path / "service.pid").unlink()
        ctl(tmp_path, "restart", "server")
        wait_done(logs, supervisord, tmp_path / "service.pid")
        again = int((tmp_path / "service.pid").read_text())
        end = time.monotonic() + 20
        while alive(writer):
            assert time.monotonic() < end, "the old log writer outlived its service"
            time.sleep(0.2)
        assert again != service and len([c for c in children(again) if alive(c)]) == 1
    finally:
        stop(supervisord)
    # the service's last line, written after the group's SIGTERM, is in its log
    end = time.monotonic() + 20
    while not logs[1].read_bytes().endswith(b"DONE\nTERM\n"):
        assert time.monotonic() < end, logs[1].read_bytes()[-200:]
        time.sleep(0.2)

    for log in logs:
        copies = sorted(log.parent.glob(log.name + "*"))
        sizes = {p.name: p.stat().st_size for p in copies}
        print(f"\n{log.name}: {2 * WRITTEN // MIB} MiB written in two runs; kept {sizes}")
        assert [p.name for p in copies] == [log.name] + [f"{log.name}.{i}"
                                                         for i in range(1, KEEP + 1)]
        assert all(size <= MAX_MB * MIB for size in sizes.values()), sizes
        assert sum(sizes.values()) <= (KEEP + 1) * MAX_MB * MIB < WRITTEN
        # cut at line ends only: every kept line is whole
        for copy in copies:
            assert set(copy.read_bytes().splitlines(keepends=True)) <= {LINE, b"DONE\n",
                                                                       b"TERM\n"}
    assert logs[0].read_bytes().endswith(b"x\nDONE\n")


def fake_sysctl(tmp_path: Path, value: int) -> tuple[Path, Path]:
    """A stand-in for macOS's `sysctl -n iogpu.wired_limit_mb`: prints a file's number."""
    value_file = tmp_path / "wired_limit_mb"
    value_file.write_text(f"{value}\n")
    script = tmp_path / "sysctl"
    script.write_text(f"#!/bin/sh\n[ \"$2\" = iogpu.wired_limit_mb ] && exec cat {value_file}\n"
                      "exit 1\n")
    script.chmod(0o755)
    return script, value_file


def launch(tmp_path: Path, sysctl: Path, wait_s: int) -> subprocess.Popen:
    marker = tmp_path / "started"
    return subprocess.Popen([
        sys.executable, str(LAUNCHER), "--stdout", str(tmp_path / "out.log"),
        "--stderr", str(tmp_path / "err.log"), "--max-bytes", str(MIB), "--keep", "2",
        "--wait-sysctl", "iogpu.wired_limit_mb=507904", "--wait-s", str(wait_s),
        "--sysctl", str(sysctl), "--", sys.executable, "-c",
        f"open({str(marker)!r}, 'w').write('yes')"])


def test_server_waits_for_the_wired_limit_and_says_why(tmp_path):
    sysctl, value = fake_sysctl(tmp_path, 393216)  # macOS's default on 512 GB: too low
    proc = launch(tmp_path, sysctl, wait_s=2)
    assert proc.wait(30) == 75  # not started; the manager starts it again
    assert not (tmp_path / "started").exists()
    err = (tmp_path / "err.log").read_text()
    assert "waiting up to 2 s for iogpu.wired_limit_mb to reach 507904 (now 393216)" in err
    assert "is still 393216 after 2 s, below 507904: not starting (exit 75)" in err

    # the host-tuning daemon applies it while the launcher waits: the server starts then
    proc = launch(tmp_path, sysctl, wait_s=60)
    time.sleep(1.5)
    assert proc.poll() is None and not (tmp_path / "started").exists()
    value.write_text("507904\n")
    assert proc.wait(30) == 0
    assert (tmp_path / "started").read_text() == "yes"
    last = (tmp_path / "err.log").read_text().splitlines()[-1]
    assert "iogpu.wired_limit_mb is 507904 (at least 507904) after" in last and "starting" in last


def test_launcher_raises_the_open_files_soft_limit_within_the_hard_one(tmp_path):
    """What the plists' NumberOfFiles keys did, without their system-wide side effect."""
    import resource

    def low_soft_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2048))

    def run(nofile: int) -> str:
        subprocess.run([
            sys.executable, str(LAUNCHER), "--stdout", str(tmp_path / "out.log"),
            "--stderr", str(tmp_path / "err.log"), "--max-bytes", str(MIB), "--keep", "1",
            "--nofile", str(nofile), "--", sys.executable, "-c",
            "import resource; print(resource.getrlimit(resource.RLIMIT_NOFILE))"],
            preexec_fn=low_soft_limit, check=True, timeout=30)
        time.sleep(0.5)  # the writer drains after the service exits
        return (tmp_path / "out.log").read_text().splitlines()[-1]

    assert run(1024) == "(1024, 2048)"
    assert run(65536) == "(2048, 2048)"  # at most the hard limit, and it says so
    assert "open-files limit 2048, not 65536 (hard limit 2048)" in (
        tmp_path / "err.log").read_text()


def test_a_log_that_cannot_be_written_never_stops_the_service(tmp_path):
    """No log directory (deleted by hand, a full or read-only disk): the writer drops
    the lines and keeps reading, so the service never meets a closed pipe; once the
    directory is back, logging resumes (retried every RotatingLog.RETRY_S)."""
    logs = tmp_path / "gone"
    service = (
        "import os, sys, time\n"
        "for i in range(200): os.write(1, b'y' * 9999 + b'\\n')\n"  # 2 MB into the void
        f"while not os.path.isdir({str(logs)!r}): time.sleep(0.1)\n"
        "time.sleep(6)\n"  # past the writer's retry interval
        "print('back', flush=True)\n")
    proc = subprocess.Popen([
        sys.executable, str(LAUNCHER), "--stdout", str(logs / "out.log"),
        "--stderr", str(logs / "err.log"), "--max-bytes", str(MIB), "--keep", "1",
        "--", sys.executable, "-c", service])
    time.sleep(1.5)
    assert proc.poll() is None  # writing into a pipe whose reader has nowhere to write
    logs.mkdir()
    assert proc.wait(60) == 0  # no BrokenPipeError
    end = time.monotonic() + 10
    while not ((logs / "out.log").exists() and (logs / "out.log").read_text() == "back\n"):
        assert time.monotonic() < end, list(logs.iterdir())
        time.sleep(0.2)
