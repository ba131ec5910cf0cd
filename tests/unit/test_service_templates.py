"""The service description renders into definitions their managers accept.

supervisor's own config parser reads the rendered program, and
`systemd-analyze verify` checks the rendered unit; both must give back exactly
the argv, environment and limits of the description.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tasks.common import REPO
from tasks.service_spec import Service
from tasks.services import server_flags
from tasks.templates import render

ARGV = [
    sys.executable, "-m", "mlx_lm.server",
    "--model", "/srv/models/with space%and percent",
    "--chat-template-args", '{"enable_thinking":false,"reasoning_effort":null}',
    "--temp", "0.0",
]


def make_service(tmp_path, argv=ARGV) -> Service:
    return Service(
        name="server", label="org.mlxroute.server", description="mlx_lm.server serving test",
        argv=list(argv), env={"HOME": str(tmp_path), "HF_HUB_CACHE": f"{tmp_path}/hf cache"},
        workdir=str(tmp_path), stdout=f"{tmp_path}/server.out.log",
        stderr=f"{tmp_path}/server.err.log", nofile=4096, restart_delay=5,
        stop_timeout_s=42,
        log_max_mb=50, log_keep=5,
    )


def launched(svc: Service) -> list[str]:
    """The unit's command: files/route_run.py writing the logs, then the service."""
    return [sys.executable, str(REPO / "files" / "route_run.py"), "--stdout", svc.stdout,
            "--stderr", svc.stderr, "--max-bytes", str(svc.log_max_mb * 1048576),
            "--keep", str(svc.log_keep), "--", *svc.argv]


def supervisor_program(tmp_path, svc: Service):
    from supervisor.options import ServerOptions

    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    (conf_d / "server.conf").write_text(render("supervisor/program.conf.j2", svc=svc))
    conf = tmp_path / "supervisord.conf"
    conf.write_text(render(
        "supervisor/supervisord.conf.j2", sock=tmp_path / "s.sock", pidfile=tmp_path / "s.pid",
        logfile=tmp_path / "s.log", conf_d=conf_d, home=tmp_path, nofile=1024,
        log_max_mb=7, log_keep=2,
    ))
    options = ServerOptions()
    options.realize(["-c", str(conf)])
    # supervisord's own log is rotated as the services' logs are
    assert (options.logfile_maxbytes, options.logfile_backups) == (7 * 1048576, 2)
    (group,) = options.process_group_configs
    (program,) = group.process_configs
    return program


def test_supervisor_program_gives_back_the_exact_argv_and_environment(tmp_path):
    import shlex

    svc = make_service(tmp_path)
    program = supervisor_program(tmp_path, svc)
    assert shlex.split(program.command) == svc.argv
    assert program.environment == svc.env
    assert program.directory == svc.workdir
    assert program.autorestart is not False
    assert program.stdout_logfile == svc.stdout
    assert program.stopwaitsecs == svc.stop_timeout_s == 42


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    svc = make_service(tmp_path)
    unit = tmp_path / f"{svc.label}.service"
    unit.write_text(render("systemd/unit.service.j2", svc=svc, argv=launched(svc),
                           launcher_sha="0123abcd", user="root", wanted_by="multi-user.target"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    text = unit.read_text()
    assert "LimitNOFILE=4096" in text and "Restart=always" in text
    assert "TimeoutStopSec=42" in text.splitlines()
    # the launcher writes the logs: systemd opens no log file the service would keep
    (exec_start,) = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    assert exec_start.startswith(f"ExecStart={sys.executable} {REPO}/files/route_run.py "
                                 f"--stdout {svc.stdout} --stderr {svc.stderr} "
                                 "--max-bytes 52428800 --keep 5 -- ")
    assert "StandardOutput" not in text and "StandardError" not in text


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_catches_a_bad_unit(tmp_path):
    """The check above can fail: a unit whose command is not a path is refused."""
    svc = make_service(tmp_path, argv=["python3-not-a-path", "-m", "x"])
    unit = tmp_path / f"{svc.label}.service"
    unit.write_text(render("systemd/unit.service.j2", svc=svc, argv=svc.argv,
                           launcher_sha="0123abcd", user="root", wanted_by="multi-user.target"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode != 0 or result.stderr


def test_server_flags_render_true_as_the_bare_flag_and_leave_false_out():
    """One rendering for the deploy and the tests' own servers (tests/fixtures/mlx_server.py)."""
    assert server_flags({"trust-remote-code": True, "pipeline": False, "draft-model": None,
                         "max-tokens": 256, "temp": 0.0}) == [
        "--trust-remote-code", "--max-tokens", "256", "--temp", "0.0"]
