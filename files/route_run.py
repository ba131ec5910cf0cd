#!/usr/bin/env python3
"""Start one of the route's services with bounded logs (launchd and systemd).

    route_run.py --stdout LOG --stderr LOG --max-bytes N --keep K
                 [--nofile N] [--wait-sysctl NAME=VALUE --wait-s S] -- ARGV...

The service manager starts this script; it becomes the service itself
(`exec`), so the service keeps the pid the manager knows (launchctl
kickstart, systemd's MainPID, the proxy's watchdog all see the real server).
Before the exec it forks one small log writer and gives the service a pipe for
its stdout and one for its stderr. The service never opens or reopens a log:
the writer appends what comes through the pipes to LOG and, before a write
would take LOG past N bytes, renames LOG to LOG.1 (LOG.1 to LOG.2, ... the
oldest beyond K dropped) and starts a new LOG. A write is cut at its last
newline that fits, so no file grows past N bytes and the files of one stream
stay within (K + 1) x N. The writer exits when the service has closed its
pipes (it exited) or is gone; it has its own process group and ignores
SIGTERM/SIGINT/SIGHUP, so that a signal to the service's whole process group
does not lose the last lines.

Why not newsyslog (launchd) or `StandardOutput=append:` (systemd): the
manager opens the file once and the service writes into that open file until
it restarts, so a rotation by renaming leaves it writing into the renamed
copy, which grows without bound (docs/macos.md, "Logs").

--wait-sysctl NAME=VALUE (the server on macOS, issue 16): do not start the
service before `sysctl -n NAME` is at least VALUE. At boot launchd starts
every LaunchDaemon at once and has no dependencies; the host-tuning daemon
raises iogpu.wired_limit_mb, and a server started before it would size itself
against macOS's default limit. Waits at most S seconds, saying why in LOG
(stderr); then exits 75 without starting, so the manager (KeepAlive) starts
this again after its throttle interval and it waits again.

--nofile N: raise the open-files soft limit to N (at most the hard limit) in
place of launchd's NumberOfFiles keys, which in a LaunchDaemon would also set
the system-wide kern.maxfiles/kern.maxfilesperproc (launchd.plist(5)).

Standard library only: it runs under the release's Python before anything
else of the route.
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import signal
import subprocess
import sys
import time

WAIT_EXIT = 75  # EX_TEMPFAIL: not started, try again later
READ_SIZE = 65536


def stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def say(message: str) -> None:
    """One line into the service's stderr log."""
    os.write(2, f"route_run {stamp()} pid {os.getpid()}: {message}\n".encode())


class RotatingLog:
    """Append-only file rotated by size; never larger than max_bytes.

    A log it cannot open (one an earlier deploy left to another owner, a full
    disk) is moved aside like a rotation and opened afresh; while that fails
    too, output is dropped and opening retried every RETRY_S: the service must
    never meet a closed pipe."""

    RETRY_S = 5.0

    def __init__(self, path: str, max_bytes: int, keep: int) -> None:
        self.path, self.max_bytes, self.keep = path, max_bytes, keep
        self.fd = -1
        self.size = 0
        self.next_try = 0.0
        self.open()

    def open(self) -> bool:
        if self.fd >= 0:
            return True
        if time.monotonic() < self.next_try:
            return False
        for attempt in (1, 2):
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                self.size = os.fstat(self.fd).st_size
                return True
            except OSError:
                if attempt == 1:
                    self.shift()
        self.next_try = time.monotonic() + self.RETRY_S
        return False

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.fd = -1

    def shift(self) -> None:
        """<log> to <log>.1, <log>.1 to <log>.2, ... the oldest beyond keep dropped."""
        for i in range(self.keep, 0, -1):
            src = self.path if i == 1 else f"{self.path}.{i - 1}"
            try:
                if os.path.lexists(src):
                    os.replace(src, f"{self.path}.{i}")
            except OSError:
                pass

    def rotate(self) -> None:
        self.close()
        self.shift()
        self.open()

    def write(self, data: bytes) -> None:
        while data:
            if not self.open():
                return  # dropped: nowhere to write now
            if self.size + len(data) <= self.max_bytes:
                self._write(data)
                return
            # the part that fits, cut after its last newline
            cut = data.rfind(b"\n", 0, max(self.max_bytes - self.size, 0)) + 1
            if cut == 0:
                if self.size > 0:
                    self.rotate()
                    continue
                cut = self.max_bytes  # one line longer than a whole file: split it
            self._write(data[:cut])
            data = data[cut:]
            self.rotate()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.size += n


def write(log: RotatingLog, data: bytes) -> None:
    """A failed write loses those lines, never the writer."""
    try:
        log.write(data)
    except OSError:
        log.close()


def pump(streams: dict[int, RotatingLog], parent: int) -> None:
    """Copy each pipe into its log until every pipe is closed or the service is gone."""
    sel = selectors.DefaultSelector()
    for fd, log in streams.items():
        sel.register(fd, selectors.EVENT_READ, log)
    while sel.get_map():
        ready = sel.select(timeout=1.0)
        for key, _ in ready:
            try:
                data = os.read(key.fd, READ_SIZE)
            except OSError:
                data = b""
            if data:
                write(key.data, data)
            else:
                sel.unregister(key.fd)
                os.close(key.fd)
        if not ready and os.getppid() != parent:
            # the service exited but something it started still holds a pipe:
            # take what is there and go, so two writers never share a log
            for key in list(sel.get_map().values()):
                os.set_blocking(key.fd, False)
                try:
                    while data := os.read(key.fd, READ_SIZE):
                        write(key.data, data)
                except (BlockingIOError, OSError):
                    pass
            return


def start_writer(stdout: str, stderr: str, max_bytes: int, keep: int) -> None:
    """Fork the writer; this process's fds 1 and 2 become the pipes' write ends."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    parent = os.getpid()
    for path in (stdout, stderr):
        # newsyslog's copies (<log>.0) from deploys before the writer: nothing writes them
        if os.path.exists(path + ".0"):
            os.unlink(path + ".0")
    pid = os.fork()
    if pid == 0:
        try:
            # out of the service's process group, and deaf to the signals a manager sends
            # it (launchd signals the job's group when the job exits): the writer goes
            # when the pipes close, after the service's last lines (a traceback)
            os.setpgid(0, 0)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            os.close(out_w)
            os.close(err_w)
            logs = {out_r: RotatingLog(stdout, max_bytes, keep)}
            logs[err_r] = logs[out_r] if stderr == stdout else RotatingLog(stderr, max_bytes, keep)
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            pump(logs, parent)
        finally:
            os._exit(0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    for fd in (out_r, out_w, err_r, err_w):
        os.close(fd)


def read_sysctl(command: str, name: str) -> int | None:
    try:
        out = subprocess.run([command, "-n", name], capture_output=True, text=True, timeout=10)
        return int(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def wait_for_sysctl(spec: str, wait_s: float, command: str) -> bool:
    name, _, wanted_text = spec.partition("=")
    wanted = int(wanted_text)
    start = time.monotonic()
    value = read_sysctl(command, name)
    if value is None or value < wanted:
        say(f"waiting up to {wait_s:g} s for {name} to reach {wanted} (now {value}): the "
            "host-tuning LaunchDaemon sets it at boot, and the server must not size itself "
            "against a lower limit")
    while value is None or value < wanted:
        if time.monotonic() - start >= wait_s:
            say(f"{name} is still {value} after {wait_s:g} s, below {wanted}: not starting "
                f"(exit {WAIT_EXIT}); the service manager starts this again and it waits again. "
                f"Check the host-tuning daemon's log, or run the deploy again")
            return False
        time.sleep(1)
        value = read_sysctl(command, name)
    say(f"{name} is {value} (at least {wanted}) after {time.monotonic() - start:.1f} s: starting")
    return True


def raise_nofile(wanted: int, sysctl: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target <= soft:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        # macOS refuses a soft limit above kern.maxfilesperproc (EINVAL): take that
        per_proc = read_sysctl(sysctl, "kern.maxfilesperproc") if sys.platform == "darwin" else None
        try:
            if not per_proc or per_proc <= soft:
                raise exc
            target = min(target, per_proc)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as again:
            say(f"cannot raise the open-files limit from {soft} to {target} (hard {hard}): "
                f"{again}")
            return
    if target < wanted:
        say(f"open-files limit {target}, not {wanted} (hard limit {hard})")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stdout", required=True)
    parser.add_argument("--stderr", required=True)
    parser.add_argument("--max-bytes", type=int, required=True)
    parser.add_argument("--keep", type=int, required=True)
    parser.add_argument("--nofile", type=int)
    parser.add_argument("--wait-sysctl", metavar="NAME=VALUE")
    parser.add_argument("--wait-s", type=float, default=300.0)
    parser.add_argument("--sysctl", default="/usr/sbin/sysctl",
                        help="the sysctl command (tests point it elsewhere)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        parser.error("no command after --")
    if args.max_bytes < 4096 or args.keep < 1:
        parser.error("--max-bytes must be at least 4096 and --keep at least 1")
    if args.wait_sysctl and not args.wait_sysctl.partition("=")[2].isdigit():
        parser.error("--wait-sysctl takes NAME=VALUE, VALUE a whole number")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sys.stdout.flush()
    start_writer(args.stdout, args.stderr, args.max_bytes, args.keep)
    if args.wait_sysctl and not wait_for_sysctl(args.wait_sysctl, args.wait_s, args.sysctl):
        return WAIT_EXIT
    if args.nofile:
        raise_nofile(args.nofile, args.sysctl)
    try:
        os.execvp(args.command[0], args.command)
    except OSError as exc:
        say(f"cannot start {args.command[0]}: {exc}")
        return 127


if __name__ == "__main__":
    sys.exit(main())
