"""The deploy's side of the proxy: its argv from data, and its API key.

The key test runs the real task through the pyinfra CLI against @local (this
machine) with route_home in a temporary folder.
"""

from __future__ import annotations

import os
import runpy
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.proxy_args import LIMIT_FLAGS, ROUTING_FLAGS, proxy_argv
from tests.fixtures.artifacts import venv_root_on

REPO = Path(__file__).resolve().parents[2]
PYINFRA = Path(sys.executable).with_name("pyinfra")


def load_proxy_module():
    from tests.fixtures.proxy import load_proxy
    return load_proxy()


def group_data() -> dict:
    return {k: v for k, v in runpy.run_path(str(REPO / "group_data/all.py")).items()
            if not k.startswith("__")}


def test_proxy_argv_from_default_data_is_accepted_by_the_proxy(tmp_path):
    proxy = load_proxy_module()
    data = dict(group_data(), proxy_host="0.0.0.0")
    key = tmp_path / "proxy.key"
    key.write_text("x" * 43)
    key.chmod(0o600)
    argv = proxy_argv("/venv/bin/python", "/route/bin/proxy.py", str(key), data, "glm-5.2")
    assert argv[:2] == ["/venv/bin/python", "/route/bin/proxy.py"]
    args = proxy.parse_args(argv[2:])
    assert proxy.validate(args) is None
    assert (args.host, args.port, args.upstream, args.public_name, args.api_key_file) == (
        "0.0.0.0", data["proxy_port"], f"http://{data['server_host']}:{data['server_port']}",
        "glm-5.2", str(key))
    for data_key, flag in {**LIMIT_FLAGS, **ROUTING_FLAGS}.items():
        assert data_key in data, f"{data_key} is missing from group_data/all.py"
        parsed = getattr(args, flag[2:].replace("-", "_"))
        assert parsed == type(parsed)(data[data_key]), (data_key, flag)


def test_proxy_argv_without_key_on_lan_is_refused_by_the_proxy():
    proxy = load_proxy_module()
    data = dict(group_data(), proxy_host="0.0.0.0")
    args = proxy.parse_args(proxy_argv("py", "proxy.py", None, data)[2:])
    assert "without --api-key-file" in proxy.validate(args)


def run_key_deploy(tmp_path: Path, *data: str) -> subprocess.CompletedProcess:
    deploy = tmp_path / "deploy_key.py"
    deploy.write_text("from tasks.proxy_key import ensure_proxy_key\nensure_proxy_key()\n")
    cmd = [str(PYINFRA), "-y", "-vv", "@local", str(deploy),
           "--data", "proxy_api_key=True", "--data", f"route_home={tmp_path / 'home'}",
           "--data", f"venv_path={venv_root_on(tmp_path, Path(sys.executable).parent.parent)}",
           *data]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.timeout(300)
def test_proxy_key_is_made_on_host_private_never_printed_and_rotates(tmp_path):
    key_file = tmp_path / "home" / "proxy.key"
    first = run_key_deploy(tmp_path)
    key = key_file.read_text().strip()
    assert len(key) >= 40
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key not in first.stdout + first.stderr
    assert "Generate the proxy API key" in first.stderr

    again = run_key_deploy(tmp_path)  # unchanged: same key, no operation
    assert key_file.read_text().strip() == key
    assert "Generate the proxy API key" not in again.stderr

    os.chmod(key_file, 0o644)  # someone loosened it: put it back
    run_key_deploy(tmp_path)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    rotated = run_key_deploy(tmp_path, "--data", "proxy_rotate_key=True")
    new_key = key_file.read_text().strip()
    assert new_key != key and len(new_key) >= 40
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert new_key not in rotated.stdout + rotated.stderr
    assert not list(key_file.parent.glob("*.new"))


def test_proxy_ships_as_one_reproducible_zipapp_that_runs(tmp_path):
    from tasks.proxy_artifact import ARTIFACT, build_zipapp, write_zipapp

    assert build_zipapp() == build_zipapp()  # same sources, same bytes: no needless restart
    pyz = write_zipapp(tmp_path / ARTIFACT)
    out = subprocess.run([sys.executable, str(pyz), "--help"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and "--first-byte-timeout-s" in out.stdout, out.stderr


RENDER_PROXY = """
import json, os
from pathlib import Path
from tasks.services import route_services

Path(os.environ["MLXROUTE_TEST_OUT"]).write_text(json.dumps(route_services()["proxy"].argv))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["supervisor", "systemd"])
def test_proxy_gets_its_backends_watchdog_commands_from_data(tmp_path, backend):
    """The proxy's argv as the real pyinfra CLI builds it on @local: the
    restart and pid commands tests/unit/test_watchdog.py runs under a real
    supervisord (supervisor), and systemd's."""
    import getpass
    import json

    deploy = tmp_path / "render.py"
    deploy.write_text(RENDER_PROXY)
    out = tmp_path / "argv.json"
    venvs = venv_root_on(tmp_path, Path(sys.executable).parent.parent)
    home = tmp_path / "home"
    cmd = [str(PYINFRA), "-y", "@local", str(deploy), "--data", f"route_home={home}",
           "--data", f"venv_path={venvs}", "--data", f"service_backend={backend}",
           "--data", "watchdog_stuck_s=42"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=100,
                            env={**os.environ, "MLXROUTE_TEST_OUT": str(out)})
    assert result.returncode == 0, result.stdout + result.stderr
    argv = json.loads(out.read_text())
    args = load_proxy_module().parse_args(argv[2:])
    if backend == "supervisor":
        ctl = f"{venvs}/current/bin/supervisorctl -c {home}/supervisor/supervisord.conf"
        assert (args.restart_command, args.server_pid_command) == (
            f"{ctl} restart server", f"{ctl} pid server")
    else:
        unit = "org.mlxroute.server.service"
        sudo = "" if getpass.getuser() == "root" else "/usr/bin/sudo -n "  # as User=
        assert (args.restart_command, args.server_pid_command) == (
            f"{sudo}/usr/bin/systemctl restart {unit}",
            f"/usr/bin/systemctl show --property MainPID --value {unit}")
    assert (args.watchdog_stuck_s, args.watchdog_interval_s) == (42, 10)
    assert args.maintenance_file == f"{home}/state/maintenance.json"

    result = subprocess.run([*cmd, "--data", "watchdog_enabled=False"], cwd=REPO, text=True,
                            capture_output=True, timeout=100,
                            env={**os.environ, "MLXROUTE_TEST_OUT": str(out)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--restart-command" not in json.loads(out.read_text())
