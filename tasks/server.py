"""mlx_lm.server on loopback, with the profile's flags."""

from __future__ import annotations

import json
import shlex

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, server

from tasks.backends import select_backend
from tasks.common import REPO, paths, profile, repo_file
from tasks.services import SERVER, deploy_service, route_services
from tasks.venv import lock_text


def server_code() -> list[bytes | str]:
    """What the running server is made of besides its definition."""
    parts: list[bytes | str] = [lock_text(), json.dumps(profile(), sort_keys=True)]
    if host.data.patches_enabled:
        parts += [path.read_bytes() for path in sorted((REPO / "patches").glob("*.patch"))]
    return parts


@deploy("Start mlx_lm.server")
def start_server():
    p = paths()
    prof = profile()
    backend = select_backend()
    svc = route_services()[SERVER]
    routectl = p.script("routectl.py")
    files.put(name="Upload routectl.py", src=str(repo_file("files/routectl.py")), dest=routectl)
    files.directory(name="Create the log directory", path=p.logs_dir, present=True)
    files.directory(name="Create the HF cache directory", path=svc.env["HF_HUB_CACHE"], present=True)
    backend.prepare()

    smoke = prof["smoke"]
    q = shlex.quote

    def smoke_generate():
        trust = " --trust-remote-code" if prof.get("trust_remote_code") else ""
        server.shell(
            name=f"Smoke-generate with {host.data.model_profile} before (re)starting the server",
            commands=[
                f"{q(p.python)} {q(routectl)} smoke --model {q(p.model_dir)} "
                f"--messages {q(json.dumps(smoke['messages']))} --expect {q(smoke['expect'])} "
                f"--max-tokens {int(smoke.get('max_tokens', 16))}{trust}"
            ],
        )

    def wait_ready():
        url = f"http://{host.data.server_host}:{host.data.server_port}"
        server.shell(
            name="Wait until the server answers a 1-token completion",
            commands=[
                f"{q(p.python)} {q(routectl)} wait --kind server --url {q(url)} "
                f"--timeout {int(prof.get('ready_timeout_s', 600))}"
            ],
        )

    deploy_service(backend, svc, server_code(), before_restart=smoke_generate,
                   after_restart=wait_ready)
