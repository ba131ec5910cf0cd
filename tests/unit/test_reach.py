"""testinfra reaches an SSH host with pyinfra's own SSH settings (tasks/reach.py).

The host's data goes through tasks.reach.testinfra_target into the options
of the host suite's pytest run; what is asserted is what `ssh` itself makes of
them (`ssh -G`: the effective settings, no connection) and that testinfra's
pytest plugin really hands them to ssh. tests/e2e/test_ssh_deploy.py runs it
for real against SSH hosts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
from pyinfra.api import Config, Inventory, State
from pyinfra.context import ctx_host, ctx_state

from tasks import reach as reach_module
from tasks.reach import Reach

pytestmark = pytest.mark.skipif(not shutil.which("ssh"), reason="no ssh client")


def reach_of(name: str, data: dict) -> Reach | None:
    inventory = Inventory(([(name, data)], {}))
    state = State(inventory, Config())
    with ctx_state.use(state), ctx_host.use(inventory.get_host(name)):
        return reach_module.testinfra_target()


def ssh_settings(reach: Reach, tmp_path, hostname: str) -> dict[str, str]:
    """What ssh resolves for hostname from the config the suite would get."""
    config = next(arg.split("=", 1)[1] for arg in reach.cli_args(tmp_path)
                  if arg.startswith("--ssh-config="))
    out = subprocess.run(["ssh", "-G", "-F", config, hostname], capture_output=True, text=True,
                         check=True, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def test_ssh_host_is_checked_with_the_key_port_and_known_hosts_pyinfra_used(tmp_path):
    reach = reach_of("studio.local", {
        "ssh_user": "milo", "ssh_port": 2222, "ssh_hostname": "10.0.0.7",
        "ssh_key": "/keys/studio key", "ssh_known_hosts_file": "/keys/known hosts",
        "ssh_strict_host_key_checking": "yes",
    })
    assert reach.hosts == "ssh://milo@10.0.0.7:2222"
    settings = ssh_settings(reach, tmp_path, "10.0.0.7")
    assert settings["user"] == "milo" and settings["port"] == "2222"
    assert settings["identityfile"] == "/keys/studio key"
    assert settings["userknownhostsfile"] == "/keys/known hosts"
    assert settings["stricthostkeychecking"] == "true"
    assert settings["batchmode"] == "yes"


def test_ssh_host_without_settings_gets_pyinfras_default_host_key_policy(tmp_path):
    reach = reach_of("studio.local", {})
    assert reach.hosts == "ssh://studio.local"
    settings = ssh_settings(reach, tmp_path, "studio.local")
    assert settings["stricthostkeychecking"] == "accept-new"
    assert settings["batchmode"] == "yes"


def test_users_own_ssh_config_still_applies_to_what_pyinfra_data_leaves_unset(tmp_path):
    own = tmp_path / "lab config"
    own.write_text("Host studio\n    ProxyJump bastion\n    Port 2200\n")
    reach = reach_of("studio", {"ssh_config_file": str(own), "ssh_port": 22})
    settings = ssh_settings(reach, tmp_path, "studio")
    assert settings["proxyjump"] == "bastion"
    assert settings["port"] == "22"  # pyinfra's data wins over the file, as with pyinfra


def test_testinfras_pytest_plugin_hands_the_config_to_ssh(tmp_path):
    """testinfra 10.2.2's plugin drops --ssh-extra-args; --ssh-config must arrive."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(textwrap.dedent("""
        import json
        def test_command(host):
            print("SSH", json.dumps(host.backend._build_ssh_command("true")))
    """))
    reach = reach_of("studio.local", {"ssh_user": "milo", "ssh_key": "/keys/k"})
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(probe), "-q", "-s", "-p", "no:cacheprovider",
         "-o", "addopts=", *reach.cli_args(tmp_path / "configs")],
        capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:]
    template, args = json.loads(result.stdout.split("SSH ", 1)[1].splitlines()[0])
    assert "-F %s" in template
    assert str(tmp_path / "configs" / "studio.local.config") in args


def test_local_and_fake_hosts():
    assert reach_of("@local", {}).cli_args() == ["--hosts=local://"]
    assert reach_of("@fake", {}) is None


def test_route_report_takes_the_same_options(tmp_path):
    from tools.route_report import parse_args

    reach = reach_of("studio", {"ssh_user": "milo"})
    args = parse_args(reach.cli_args(tmp_path))
    assert args.hosts == "ssh://milo@studio"
    assert args.ssh_config == str(tmp_path / "studio.config")
