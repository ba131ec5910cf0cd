"""The watchdog's sudoers rule: the route user may restart the server, that command only."""

from __future__ import annotations

from io import StringIO

from pyinfra import host
from pyinfra.operations import files

from tasks.common import RouteError


def sudoers_path() -> str:
    """The sudoers drop-in that lets the route user restart the server (the
    watchdog); sudo skips files whose name holds a dot."""
    return "/etc/sudoers.d/" + host.data.service_label_prefix.replace(".", "-") + "-watchdog"


def sudoers_rule(user: str, commands: list[str]) -> str:
    """One NOPASSWD rule for exactly each command (an absolute path and its arguments):
    one a model server (route_profiles)."""
    return ("# mlx-route: the proxy's watchdog restarts a stuck server "
            "(tasks/backends/sudoers.py)\n"
            + "".join(f"{user} ALL=(root) NOPASSWD: {command}\n" for command in commands))


def watchdog_rule(user: str, commands: list[str], verb: str, group: str, root: dict) -> None:
    """Write the rule when watchdog_enabled, remove it otherwise.

    `verb` names what the command does in the operation's name ("kickstart",
    "restart"); `group` owns the file (wheel on macOS, root on Linux); `root`
    are the operation arguments that reach root."""
    path = sudoers_path()
    if not host.data.get("watchdog_enabled"):
        files.file(name="Remove the watchdog's sudoers rule", path=path, present=False, **root)
        return
    if not user.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise RouteError(f"{host.name}: route user {user!r} cannot go into a sudoers rule")
    files.put(
        name=f"Let the proxy's watchdog {verb} the server (sudoers, that command only)",
        src=StringIO(sudoers_rule(user, commands)),
        dest=path, user="root", group=group, mode="440", **root,
    )
