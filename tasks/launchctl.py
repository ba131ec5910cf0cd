"""launchd with the modern verbs: a fact read from `launchctl print` and one operation.

pyinfra's own `launchd.service` runs only the legacy `launchctl list/start/stop`
and cannot install or bootstrap a plist. This module drives a service through
`enable`, `bootstrap`, `kickstart -k` and `bootout` on a domain:

    system       LaunchDaemons (/Library/LaunchDaemons), root; start at boot
    gui/<uid>    LaunchAgents of a user logged in at the console
    user/<uid>   LaunchAgents of a user's background session (SSH)

launchd keeps the definition it read at `bootstrap`: `kickstart -k` restarts the
process with that old definition, so a changed plist needs `bootout` +
`bootstrap` (man launchctl, "bootstrap" and "kickstart").
"""

from __future__ import annotations

import re
import shlex

from pyinfra import host
from pyinfra.api import FactBase, operation

# `launchctl print` indents the service's own keys with one tab; nested blocks
# (arguments, environment, ...) are indented further and are not read.
_TOP_LEVEL = re.compile(r"^\t([A-Za-z][A-Za-z ]*?) = (.*)$")


class LaunchdPrint(FactBase):
    """`launchctl print <domain>/<label>` as a dict of its top-level keys, or
    None when the label is not loaded in that domain.

        {"state": "running", "pid": "8123", "path": "/Library/LaunchDaemons/x.plist",
         "last exit code": "(never exited)", ...}
    """

    def command(self, target: str) -> str:
        # "Could not find service" (exit 113) goes to stderr: no output is "not loaded".
        return f"launchctl print {shlex.quote(target)} 2>/dev/null || true"

    def process(self, output):
        found = {}
        for line in output:
            match = _TOP_LEVEL.match(line)
            if match:
                found.setdefault(match.group(1), match.group(2).strip())
        return found or None


class LaunchdDomainExists(FactBase):
    """Whether a launchd domain (gui/501, user/501) exists on the host now.

    gui/<uid> exists only while the user is logged in at the console, so an
    SSH-only Mac after a reboot has none."""

    def command(self, domain: str) -> str:
        return f"launchctl print {shlex.quote(domain)} >/dev/null 2>&1 && echo yes || echo no"

    def process(self, output):
        return bool(output) and output[0].strip() == "yes"


class UserId(FactBase):
    """The numeric uid of a user (launchd domains are named by uid)."""

    def command(self, user: str) -> str:
        return f"id -u {shlex.quote(user)}"

    def process(self, output):
        value = output[0].strip() if output else ""
        return int(value) if value.isdigit() else None


class PrimaryGroup(FactBase):
    """The name of a user's primary group (staff for macOS accounts)."""

    def command(self, user: str) -> str:
        return f"id -gn {shlex.quote(user)}"

    def process(self, output):
        return output[0].strip() if output else None


def bootstrap_command(domain: str, label: str, plist: str, retries: int, who: str) -> str:
    """`launchctl bootstrap`, retried after a `bootout` while the label drains.

    `Bootstrap failed: 5: Input/output error` (and 37, "Operation already in
    progress") mostly means the label is still loaded or still shutting down
    after a bootout; Homebrew's `brew services` retries the same way
    (Homebrew/brew Library/Homebrew/services). Any other error, or error 5
    after `retries` attempts, stops the run with what to check.
    """
    q = shlex.quote
    target = f"{domain}/{label}"
    giveup = (
        f"{who}: launchctl bootstrap {domain} {plist} still fails after {retries} "
        f"bootout+retry rounds. Check: plutil -lint {plist}; the plist is owned by "
        f"root:wheel mode 644 (LaunchDaemons); launchctl print {target}; "
        f"log show --last 5m --predicate 'process == \"launchd\"'"
    )
    return (
        f"n=0; while ! out=$(launchctl bootstrap {q(domain)} {q(plist)} 2>&1); do "
        f"n=$((n+1)); "
        f"case \"$out\" in *'5: Input/output error'*|*'37: Operation already in progress'*) ;; "
        f"*) echo \"$out\" >&2; exit 1;; esac; "
        f"if [ $n -ge {int(retries)} ]; then echo \"$out\" >&2; echo {q(giveup)} >&2; exit 1; fi; "
        f"launchctl bootout {q(target)} >/dev/null 2>&1 || true; sleep $n; "
        f"done"
    )


@operation()
def service(
    label: str,
    plist: str,
    domain: str = "system",
    running: bool = True,
    reload: bool = False,
    restart: bool = False,
    bootstrap_retries: int = 5,
):
    """
    Keep a launchd job loaded and running from its plist (or removed).

    + label: the plist's Label
    + plist: path of the installed plist on the host
    + domain: "system", "gui/<uid>" or "user/<uid>"
    + running: False boots the job out of the domain (if loaded)
    + reload: the plist changed since it was bootstrapped: bootout + bootstrap
    + restart: the job's code changed, the plist did not: kickstart -k
    + bootstrap_retries: bootout+retry rounds on "5: Input/output error"

    A job that is not loaded is enabled (clears a `launchctl disable` override
    that would make bootstrap fail) and bootstrapped; RunAtLoad starts it. A
    loaded job with nothing to do produces no command at all.
    """
    target = f"{domain}/{label}"
    q = shlex.quote
    status = host.get_fact(LaunchdPrint, target=target)

    if not running:
        if status is None:
            host.noop(f"{target} is not loaded")
            return
        yield f"launchctl bootout {q(target)} || true"
        return

    # launchd reports a malformed plist as the same "5: Input/output error"
    lint = f"plutil -lint -s {q(plist)}"
    if status is None:
        yield lint
        yield f"launchctl enable {q(target)}"
        yield bootstrap_command(domain, label, plist, bootstrap_retries, host.name)
        return
    if reload:
        yield lint
        yield f"launchctl bootout {q(target)} >/dev/null 2>&1 || true"
        yield bootstrap_command(domain, label, plist, bootstrap_retries, host.name)
        return
    if restart:
        yield f"launchctl kickstart -k {q(target)}"
        return
    if status.get("state") != "running":
        # loaded but exited (or throttled): start it now instead of waiting
        yield f"launchctl kickstart {q(target)}"
        return
    host.noop(f"{target} is loaded and running")
