"""The OpenAI-compatible proxy in front of mlx_lm.server (files/mlx_route_proxy, shipped
as one zipapp built by tasks/proxy_artifact.py)."""

from __future__ import annotations

import io
import posixpath
import shlex

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, server

from tasks import as_user
from tasks.backends import select_backend
from tasks.common import paths
from tasks.proxy_args import local_address
from tasks.proxy_artifact import ARTIFACT, build_zipapp
from tasks.replicas import stale_keys
from tasks.restarts import deploy_service
from tasks.service_spec import PROXY
from tasks.services import proxy_key_file, route_services, served_profiles


@deploy("Start the proxy")
def start_proxy():
    p = paths()
    backend = select_backend()
    svc = route_services()[PROXY]
    artifact = build_zipapp()
    as_user.put(name=f"Upload {ARTIFACT}", src=io.BytesIO(artifact), dest=p.script(ARTIFACT))
    files.file(name="Remove the one-file proxy.py of earlier deploys", path=p.script("proxy.py"),
               present=False)
    key_file = proxy_key_file(p)
    q = shlex.quote

    def wait_ready():
        host_ = local_address(str(host.data.proxy_host))
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
        backend, svc, [artifact, str(bool(key_file))],
        after_restart=wait_ready,
        # the proxy reads its key and its replicas' keys at start: a new key needs a restart
        force=bool(key_file and host.data.get("proxy_rotate_key"))
        or bool(stale_keys(served_profiles())),
    )
