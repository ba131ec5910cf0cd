"""(Re)start a service only when what it is made of changed, with a stamp on the host."""

from __future__ import annotations

import posixpath
from io import StringIO

from pyinfra import host
from pyinfra.facts.files import FileContents

from tasks import as_user
from tasks.common import fingerprint, paths
from tasks.service_spec import Service


def stamp_path(svc: Service) -> str:
    return posixpath.join(paths().state_dir, f"{svc.name}.applied")


def deploy_service(backend, svc: Service, code: list[bytes | str], after_restart=None,
                   force: bool = False) -> bool:
    """Put the service's definition in place and (re)start it only when needed.

    A restart is needed when the rendered definition or the service's code
    (`code`: lock file, patches, scripts) differs from what was last started
    successfully (a stamp on the host), or when the service is not running.
    The stamp is written only after the service answered, so a failed run is
    retried by the next one instead of being forgotten. Returns whether a
    restart was planned.
    """
    text = backend.render(svc)
    desired = fingerprint(backend.name, text, *code)
    applied = host.get_fact(FileContents, stamp_path(svc))
    needed = force or applied != [desired] or not backend.is_running(svc)
    backend.install(svc, text)
    if needed:
        backend.restart(svc)
        if after_restart:
            after_restart()
    record_started(svc, desired)
    return needed


def record_started(svc: Service, desired: str) -> None:
    """The stamp of what answered; written only after it did (a failed run retries)."""
    as_user.put(
        name=f"Record the {svc.name} as started ({desired})",
        src=StringIO(desired + "\n"),
        dest=stamp_path(svc),
    )
