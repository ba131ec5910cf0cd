"""Replicas that are hosts of the same inventory: their URL and their key, found by the deploy.

    route_replicas = {"glm-5.2-mxfp4": [{"host": "studio2.local"}]}

An entry {"host": NAME} names another host of the inventory that serves the same
profile behind its own proxy. The front door (this host) reaches that proxy at
its proxy_host when that is one address (a Thunderbolt bridge's, say), or at
the host's SSH address when it listens on every address (0.0.0.0); a proxy on
loopback only cannot be a replica, and the deploy says so.

When that proxy wants a key (proxy_api_key), the deploy copies it here in the
same run: read on the other host (as its route_user, through its sudo), held in
memory, written on this host into route_home/replicas/<host>.key with mode 0600
in a folder of mode 0700. It is never printed, and it never touches the
workstation's disk. The copy is made only when the other host's key and this
host's copy differ (sha256 facts of both), so a re-run changes nothing; a new
copy restarts the proxy (it reads key files when it starts). The other host's
key is made in the same run (tasks/proxy_key.py) before the copy is taken.
"""

from __future__ import annotations

import io
import posixpath
import shlex

from pyinfra import host, logger, state
from pyinfra.api import deploy
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS, pop_global_arguments
from pyinfra.api.exceptions import NoHostError
from pyinfra.context import ctx_host
from pyinfra.facts.files import Sha256File
from pyinfra.operations import files, python

from tasks.as_user import other_route_user, route_user_args
from tasks.common import RouteError, RoutePaths, paths
from tasks.proxy_key import key_path

LOOPBACK = ("127.0.0.1", "localhost", "::1")
EVERY_ADDRESS = ("0.0.0.0", "::", "")


def replica_host(name: str, profile: str):
    """The inventory's host `name`, or a RouteError that says what to fix."""
    try:
        return host.inventory.get_host(name)
    except NoHostError:
        known = ", ".join(sorted(h.name for h in host.inventory if h.name != host.name))
        raise RouteError(
            f"{host.name}: route_replicas[{profile!r}] names host {name!r}, which is not in "
            f"the inventory (other hosts: {known or 'none'}); add it to the inventory, or "
            "give the replica as {\"url\": ..., \"key_file\": ...}") from None


def replica_url(other, profile: str) -> str:
    """Where the front door reaches `other`'s proxy."""
    address = str(other.data.get("proxy_host") or "")
    if address in LOOPBACK:
        raise RouteError(
            f"{host.name}: route_replicas[{profile!r}] names host {other.name!r}, whose proxy "
            f"listens on {address} only: another host cannot reach it; set its proxy_host to an "
            "address this host reaches (its LAN or bridge address, or 0.0.0.0) and "
            "proxy_api_key = True")
    if address in EVERY_ADDRESS:
        address = other.data.get("ssh_hostname") or other.name
    if ":" in address:
        address = f"[{address}]"
    return f"http://{address}:{other.data.get('proxy_port')}"


def replica_key_file(p: RoutePaths, other) -> str | None:
    """This host's copy of `other`'s proxy key; None when that proxy takes no key."""
    if not other.data.get("proxy_api_key"):
        return None
    return posixpath.join(p.route_home, "replicas", f"{other.name}.key")


def host_replicas(served_profiles) -> list[tuple[str, object, str, str | None]]:
    """(public name, other host, URL, key copy or None) of every {"host": ...} replica."""
    p = paths()
    out = []
    for which in served_profiles:
        for name in which.replica_hosts:
            other = replica_host(name, which.profile)
            out.append((which.public_name, other, replica_url(other, which.profile),
                        replica_key_file(p, other)))
    return out


def _other_key(other) -> tuple[str, dict]:
    """(path of `other`'s proxy key, the global arguments that read it as its route_user)."""
    with ctx_host.use(other):
        return key_path(paths()), route_user_args()


def stale_keys(served_profiles) -> list[tuple[object, str, str]]:
    """(other host, its key's path, this host's copy) of the copies to (re)make: the
    other host's key is missing yet (it is made in this run) or differs from the copy."""
    out = []
    for _, other, _, copy in host_replicas(served_profiles):
        if copy is None:
            continue
        mine = host.get_fact(Sha256File, path=copy, **route_user_args())
        if other in state.failed_hosts:
            if not mine:
                raise RouteError(f"{host.name}: cannot copy the proxy key of {other.name} "
                                 "(it is not reachable in this run) and has no copy yet")
            logger.warning(f"{host.name}: {other.name} is not reachable: keeping its key copy")
            continue
        path, args = _other_key(other)
        theirs = other.get_fact(Sha256File, path=path, **args)
        if not theirs or theirs != mine:
            out.append((other, path, copy))
    return out


def _read_key(other, path: str, args: dict) -> bytes:
    """`other`'s key, read through its connector (as its route_user); never printed."""
    global_args, _ = pop_global_arguments(state, other, dict(args))
    executor = {k: v for k, v in global_args.items() if k in CONNECTOR_ARGUMENT_KEYS}
    ok, output = other.run_shell_command(f"cat {shlex.quote(path)}", print_output=False,
                                         print_input=False, **executor)
    key = "\n".join(output.stdout_lines).strip().encode()
    if not ok or not key:
        raise RouteError(f"{host.name}: could not read the proxy key of {other.name} at {path} "
                         "(is proxy_api_key set there, and did its deploy make the key?)")
    return key + b"\n"


def _copy_key(other, path: str, args: dict, copy: str) -> None:
    """Runs during the deploy, after `other`'s key step: read it there, write it here."""
    key = _read_key(other, path, args)
    global_args, _ = pop_global_arguments(state, host, dict(route_user_args()))
    executor = {k: v for k, v in global_args.items() if k in CONNECTOR_ARGUMENT_KEYS}
    staged = copy + ".new"
    if not host.put_file(io.BytesIO(key), staged, print_output=False, print_input=False,
                         **executor):
        raise RouteError(f"{host.name}: could not write the copy of {other.name}'s key")
    q = shlex.quote
    ok, output = host.run_shell_command(
        f"chmod 600 {q(staged)} && mv -f {q(staged)} {q(copy)}", print_output=False,
        print_input=False, **executor)
    if not ok:
        raise RouteError(f"{host.name}: could not put {other.name}'s key in place: "
                         f"{output.stderr[-300:]}")


@deploy("Copy the proxy keys of replica hosts")
def copy_replica_keys(served_profiles) -> bool:
    """Copy the keys of the {"host": ...} replicas that need it; True when one was copied."""
    stale = stale_keys(served_profiles)
    if not stale:
        return False
    if other_route_user():
        # pyinfra's upload as another user hands the file over with setfacl
        # (tasks/as_user.py): not for a secret. Said, not half-done.
        raise RouteError(f"{host.name}: copying a replica's key needs the route owned by the "
                         "SSH user on the front door (route_user unset); or place the key "
                         "yourself and give the replica as {\"url\": ..., \"key_file\": ...}")
    p = paths()
    files.directory(name="Folder of the replicas' keys (mode 0700)",
                    path=posixpath.join(p.route_home, "replicas"), mode="700")
    for other, path, copy in stale:
        python.call(name=f"Copy the proxy key of {other.name} (not printed, mode 0600)",
                    function=_copy_key, other=other, path=path,
                    args=_other_key(other)[1], copy=copy)
    return True
