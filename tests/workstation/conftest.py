"""Fixtures of the workstation's view: the route as a client on the LAN meets it.

    pytest tests/workstation --lan-host studio.local \
        --lan-ssh-config reports/ssh/studio.local.config

Run from the workstation (or any machine on the LAN), never on the host: the
route's manifest and the proxy key are read over SSH with the deploy's SSH
settings (the key is never printed), and every request goes to --lan-host.
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess

import pytest


def over_ssh(config: str | None, address: str, command: str) -> str:
    argv = ["ssh", *(["-F", config] if config else []), "-o", "BatchMode=yes", address, command]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"ssh {address} {command.split()[0]}...: {out.stderr.strip()[-500:]}"
    return out.stdout


@pytest.fixture(scope="session")
def lan_host(request) -> str:
    address = request.config.getoption("--lan-host")
    if not address:
        pytest.skip("the workstation's view needs --lan-host (README: The workstation's view)")
    return address


@pytest.fixture(scope="session")
def ssh_config(request) -> str | None:
    return request.config.getoption("--lan-ssh-config")


@pytest.fixture(scope="session")
def route(lan_host, ssh_config, request) -> dict:
    path = request.config.getoption("--route-manifest")
    if path.startswith("~/"):
        path = '"$HOME"/' + shlex.quote(path[2:])
    else:
        path = shlex.quote(path)
    return json.loads(over_ssh(ssh_config, lan_host, f"cat {path}"))


@pytest.fixture(scope="session")
def lan_proxy(route, lan_host) -> bool:
    """Whether the proxy listens where the LAN reaches the host (proxy_host: every
    address, or lan_host's own): not on loopback only, nor only on another
    address of the host (a bridge to a second Mac that the LAN does not reach)."""
    listen = route["proxy"]["host"]
    if listen in ("0.0.0.0", "::", ""):
        return True
    if listen in ("127.0.0.1", "localhost", "::1"):
        return False
    return bool({info[4][0] for info in socket.getaddrinfo(listen, None)}
                & {info[4][0] for info in socket.getaddrinfo(lan_host, None)})


@pytest.fixture(scope="session")
def key(route, lan_host, ssh_config, lan_proxy) -> str | None:
    """The proxy key, read over SSH as a user would (never printed)."""
    if not lan_proxy or not route["proxy"]["key_file"]:
        return None
    path = route["proxy"].get("client_key_file") or route["proxy"]["key_file"]
    text = over_ssh(ssh_config, lan_host, f"cat {shlex.quote(path)}").strip()
    assert text, "the key file is empty"
    return text
