"""A host that runs only the front door (route_front_door_only): the proxy, its
key and its service, in front of other hosts' servers; no model server, no
weights, no GPU tuning, no watchdog (there is no server here to restart: the
proxy probes its upstreams and leaves a failed one out until it answers).

The proxy runs from the same release as on a Mac that serves (the lock's
Python environment, built by tasks/release.py); with no server to switch,
`current` is pointed at that release here once it is built.
"""

from __future__ import annotations

import shlex

from pyinfra.api import deploy
from pyinfra.operations import files, server

from tasks import as_user
from tasks.backends import select_backend
from tasks.common import paths, repo_file
from tasks.release import release_state, wanted_release
from tasks.services import route_services


@deploy("Set up the front door (no model server here)")
def start_front_door():
    p = paths()
    backend = select_backend()
    release = wanted_release()
    as_user.put(name="Upload routectl.py", src=str(repo_file("files/routectl.py")),
                dest=p.script("routectl.py"))
    files.directory(name="Create the log directory", path=p.logs_dir, present=True)
    files.directory(name="Create the state directory", path=p.state_dir, present=True)
    backend.prepare(route_services())
    if release_state(release).get("current") != release.id:
        server.shell(  # -n: replace the `current` link itself (GNU and BSD ln)
            name=f"Point the venv's current release at {release.id} (the proxy runs from it)",
            commands=[f"ln -sfn releases/{shlex.quote(release.id)} {shlex.quote(p.venv)}"],
        )
