"""The OpenAI-compatible proxy in front of mlx_lm.server (files/proxy.py)."""

from __future__ import annotations

import posixpath
import shlex

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, server

from tasks.backends import select_backend
from tasks.common import paths, repo_file
from tasks.services import PROXY, deploy_service, proxy_key_file, route_services


@deploy("Start the proxy")
def start_proxy():
    p = paths()
    backend = select_backend()
    svc = route_services()[PROXY]
    script = repo_file("files/proxy.py")
    files.put(name="Upload proxy.py", src=str(script), dest=p.script("proxy.py"))
    key_file = proxy_key_file(p)
    q = shlex.quote

    def wait_ready():
        host_ = host.data.proxy_host
        if host_ in ("0.0.0.0", "::", ""):
            host_ = "127.0.0.1"
        key = f" --key-file {q(key_file)}" if key_file else ""
        server.shell(
            name="Wait until the proxy's /health is 200",
            commands=[
                f"{q(p.python)} {q(p.script('routectl.py'))} wait --kind proxy "
                f"--url http://{host_}:{host.data.proxy_port} --timeout 60{key}",
                # the release it runs from stays on the host while it runs
                f"basename \"$(readlink {q(p.venv)})\" > "
                f"{q(posixpath.join(p.state_dir, 'proxy.release'))}",
            ],
        )

    deploy_service(
        backend, svc, [script.read_bytes(), str(bool(key_file))],
        after_restart=wait_ready,
        # the proxy reads its key at start: a new key needs a restart
        force=bool(key_file and host.data.get("proxy_rotate_key")),
    )
