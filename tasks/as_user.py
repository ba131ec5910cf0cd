"""Acting as `route_user` when it is not the SSH user.

The venv and its releases, the weights, the patches, the stamps, supervisord
and the services belong to `route_user`. When that is another account than
the one pyinfra connects as, every operation and fact that touches them runs
through sudo as that user: deploy.py calls those deploys with
`**route_user_args()` (pyinfra's deploy-wide global arguments reach every
operation and fact inside), and what must run as root inside them asks for
it with `as_root()`.

Uploads are the exception. pyinfra's upload with `_sudo_user` hands the
temporary file over with `setfacl`, which macOS does not have (nor a Linux
without the `acl` package). `put()` uploads to a temporary file as the SSH
user instead (mode 0644 in /tmp, which every user can read), then copies it
into place as route_user with `install`, and removes the temporary file: the
same three steps on macOS and on Linux. It compares checksums first (read as
route_user), so a re-run with nothing changed uploads nothing.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import shlex
from pathlib import Path

from pyinfra import host
from pyinfra.facts.files import File, FindFiles, Sha256File
from pyinfra.operations import files, server

STAGING_DIR = "/tmp"  # not $TMPDIR: the SSH user's may be private to it


def other_route_user() -> str | None:
    """route_user when it is set and is not the SSH user; else None."""
    user = host.data.get("route_user")
    if user and user != host.data.get("ssh_user"):
        return user
    return None


def route_user_args() -> dict:
    """Global arguments that run operations and facts as route_user."""
    user = other_route_user()
    return {"_sudo": True, "_sudo_user": user} if user else {}


def as_root(sudo: bool = True) -> dict:
    """Global arguments for an operation that needs root when `sudo`: plain
    sudo, also inside a deploy that runs as route_user; {} otherwise (the
    operation runs as the deploy around it does)."""
    return {"_sudo": True, "_sudo_user": None} if sudo else {}


def _bytes(src) -> bytes:
    if isinstance(src, (str, Path)):
        return Path(src).read_bytes()
    data = src.read()
    src.seek(0)
    return data.encode() if isinstance(data, str) else data


def put(name: str, src, dest: str, mode: str | None = None, **kwargs):
    """files.put, as route_user without setfacl when route_user is another user."""
    user = other_route_user()
    if not user:
        return files.put(name=name, src=src, dest=dest, mode=mode, **kwargs)
    data = _bytes(src)
    digest = hashlib.sha256(data).hexdigest()
    args = route_user_args()
    same = host.get_fact(Sha256File, path=dest, **args) == digest
    if same and mode:
        info = host.get_fact(File, path=dest, **args)
        same = bool(info) and info.get("mode") == int(mode)
    if same:
        return None
    q = shlex.quote
    staged = posixpath.join(
        STAGING_DIR, f"mlx-route-{host.data.get('ssh_user') or 'ssh'}-{digest[:16]}")
    plain = {"_sudo": False, "_sudo_user": None}
    files.put(name=f"{name}: upload (as the SSH user)", src=io.BytesIO(data), dest=staged,
              mode="644", **plain)
    op = server.shell(
        name=f"{name}: install as {user}",
        commands=[f"install -m {q(mode or '644')} {q(staged)} {q(dest)}"],
        **args,
    )
    server.shell(name=f"{name}: remove the upload", commands=[f"rm -f {q(staged)}"], **plain)
    return op


def sync(name: str, src: Path, dest: str):
    """files.sync (delete=True) of a flat folder, as route_user: put() each file,
    remove the files the folder no longer has."""
    if not other_route_user():
        return files.sync(name=name, src=str(src), dest=dest, delete=True, add_deploy_dir=False)
    args = route_user_args()
    files.directory(name=f"{name}: folder", path=dest, present=True, **args)
    local = sorted(path for path in src.iterdir() if path.is_file())
    for path in local:
        put(name=f"{name}: {path.name}", src=path, dest=posixpath.join(dest, path.name))
    remote = host.get_fact(FindFiles, path=dest, maxdepth=1, **args) or []
    for extra in sorted(set(remote) - {posixpath.join(dest, path.name) for path in local}):
        files.file(name=f"{name}: remove {posixpath.basename(extra)}", path=extra,
                   present=False, **args)
    return None
