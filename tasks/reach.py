"""How the workstation's checks (testinfra: the host suite, the probes) reach a
host the way pyinfra did.

testinfra's ssh backend runs the `ssh` command and reads none of pyinfra's
data, so a host that pyinfra reaches with `ssh_key`, `ssh_port`,
`ssh_known_hosts_file` or `ssh_strict_host_key_checking` would fail its host
suite (or be checked under another identity). This module writes that data as
an ssh_config file for testinfra's `--ssh-config`, with what pyinfra itself
gives `ssh` (`pyinfra/connectors/ssh.py`, its rsync command): BatchMode, so a
missing key fails at once instead of waiting for a password nobody types.
(testinfra 10.2.2's pytest plugin drops `--ssh-extra-args`: a config file is
the one way through.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pyinfra import host
from pyinfra.connectors.ssh import connector_data_meta

from tasks.common import REPO
from tools.route_report import safe_name

SSH_CONFIGS = REPO / "reports" / "ssh"


@dataclass(frozen=True)
class Reach:
    hosts: str  # testinfra's --hosts value
    ssh_config: str | None = None  # the config's text; written by cli_args()
    name: str = ""

    def cli_args(self, config_dir: Path = SSH_CONFIGS) -> list[str]:
        """Options for `pytest` (testinfra's plugin) and tools/route_report.py."""
        args = [f"--hosts={self.hosts}"]
        if self.ssh_config:
            config_dir.mkdir(parents=True, exist_ok=True)
            path = config_dir / f"{safe_name(self.name)}.config"
            path.write_text(self.ssh_config)
            args.append(f"--ssh-config={path}")
        return args


def _value(text) -> str:
    text = str(text)
    return f'"{text}"' if re.search(r"\s", text) else text


def testinfra_target() -> Reach | None:
    """How testinfra reaches this host, or None where it cannot (@fake...)."""
    connector = host.connector_cls.__name__
    if connector == "LocalConnector":
        return Reach("local://")
    if connector != "SSHConnector":
        return None
    data = host.data
    user, port = data.get("ssh_user"), data.get("ssh_port")
    hostname = data.get("ssh_hostname") or host.name
    strict = (data.get("ssh_strict_host_key_checking")
              or connector_data_meta["ssh_strict_host_key_checking"].default)  # accept-new
    settings = {
        "User": user,
        "Port": port,
        "IdentityFile": data.get("ssh_key"),
        "UserKnownHostsFile": data.get("ssh_known_hosts_file"),
        "StrictHostKeyChecking": strict,
        "BatchMode": "yes",
    }
    lines = [f"# Written by mlx-route from pyinfra's data for {host.name}: how testinfra",
             "# reaches it (the first value ssh finds wins; the rest from the include).",
             f"Host {_value(hostname)}"]
    lines += [f"    {key} {_value(value)}" for key, value in settings.items() if value]
    # pyinfra's ssh_config_file replaces ~/.ssh/config, as `ssh -F` does
    lines += ["Match all", f"Include {_value(data.get('ssh_config_file') or '~/.ssh/config')}"]
    target = f"ssh://{user + '@' if user else ''}{hostname}" + (f":{port}" if port else "")
    return Reach(hosts=target, ssh_config="\n".join(lines) + "\n", name=host.name)
