"""The watchdog: restart mlx_lm.server through its service manager when it is
alive but cannot generate (issue 16).

mlx_lm.server can stay up while it serves nothing: its generation thread died
on an exception (mlx-lm issues 1505, 1672, 1909: /health 503, chats 404
"generation thread died"), or it is wedged (issue 1493: the process alive,
/v1/models instant, no token ever, 0% CPU). KeepAlive / autorestart never
fire, because the process does not exit.

Every --watchdog-interval-s the watchdog looks at the server:

- a maintenance note exists (`routectl.py switch` is restarting the server
  on purpose): it does nothing, and forgets what it saw. A note past its
  `until` (the switch that wrote it was killed, or the machine lost power
  half-way) is not trusted: the watchdog judges the server again;
- no server process (--server-pid-command prints nothing): the service
  manager's business, nothing to do;
- a token came within the interval, or any byte of a generation in flight
  (mlx_lm.server sends `: keepalive N/M` during prefill), or the server's CPU
  time moved by --watchdog-min-cpu-s or more since the last look: progress.
  A 29-minute prefill of a 200k-token prompt is progress all along;
- otherwise it asks for one token (the proxy's shared readiness probe). If no
  token comes, the server is "stuck" from that moment; when it has been stuck
  for --watchdog-stuck-s, the watchdog runs --restart-command (launchctl
  kickstart -k, supervisorctl restart, systemctl restart), logs why, counts it
  in /metrics, and waits at least --watchdog-backoff-s before another restart,
  doubling up to --watchdog-backoff-max-s while restarts do not bring a token.

So the restart command runs at most --watchdog-stuck-s + 2 x
--watchdog-interval-s after the server last showed progress. A frozen process
(SIGSTOP) gets a SIGCONT right after the restart command started: the
manager's SIGTERM then lands at once instead of after its kill timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import signal
import time

log = logging.getLogger("mlx-route-proxy")

COMMAND_TIMEOUT_S = 300  # a restart command (stop + start) never runs longer


def note_expired(note) -> bool:
    """A maintenance note (JSON) whose `until` (wall-clock seconds, written by
    `routectl.py switch`: its own longest run) has passed: the switch that wrote
    it is gone without removing it. A note without `until` never expires."""
    until = note.get("until") if isinstance(note, dict) else None
    if isinstance(until, bool) or not isinstance(until, (int, float)):
        return False
    return time.time() > until


def parse_cpu_time(text: str) -> float | None:
    """`ps -o time=` ([[DD-]HH:]MM:SS[.ss]) as seconds."""
    text = text.strip()
    if not text:
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return days * 86400 + seconds


async def run_shell(command: str, timeout: float) -> tuple[int | None, str]:
    """(exit code or None on timeout, output) of a shell command."""
    proc = await asyncio.create_subprocess_shell(
        command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        await proc.wait()
        return None, ""
    return proc.returncode, out.decode("utf-8", "replace")


async def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads), or None."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None  # Linux: the process is gone
    except (OSError, ValueError, IndexError):
        return None
    code, out = await run_shell(f"ps -o time= -p {int(pid)}", 10)  # macOS: no /proc
    if code != 0:
        return None
    try:
        return parse_cpu_time(out)
    except ValueError:
        return None


class Watchdog:
    def __init__(self, proxy, args):
        self.proxy = proxy
        self.args = args
        self.pid: int | None = None
        self.cpu: float | None = None
        self.stuck_since: float | None = None
        self.consecutive = 0  # restarts since the last token
        self.not_before = -math.inf  # backoff: no restart before this loop time
        self.restarts: dict[str, int] = {}
        self.failures = 0
        self.task: asyncio.Task | None = None
        self.warned_stale = False  # said once that the maintenance note is past its end

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.run())
        log.info("watchdog on: a server that shows no progress and gives no token for %g s "
                 "is restarted with: %s", self.args.watchdog_stuck_s, self.args.restart_command)

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def stuck_for(self) -> float:
        return 0.0 if self.stuck_since is None else self.proxy.now() - self.stuck_since

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.args.watchdog_interval_s)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watchdog never takes the proxy down
                log.exception("watchdog: look at the server failed")

    def forget(self) -> None:
        self.stuck_since = None
        self.pid = self.cpu = None

    def in_maintenance(self) -> bool:
        """The note exists and has not expired (one that cannot be read counts)."""
        path = self.args.maintenance_file
        if not path:
            return False
        try:
            with open(path) as handle:
                note = json.load(handle)
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            return True
        if note_expired(note):
            if not self.warned_stale:
                log.warning("watchdog: maintenance note %s is past its end (the switch that "
                            "wrote it did not finish); judging the server again", path)
                self.warned_stale = True
            return False
        self.warned_stale = False
        return True

    async def server_pid(self) -> int | None:
        code, out = await run_shell(self.args.server_pid_command, 30)
        if code != 0:
            return None
        match = re.search(r"\b([0-9]+)\b", out)
        pid = int(match.group(1)) if match else 0
        return pid if pid > 0 else None

    async def tick(self) -> None:
        proxy, interval = self.proxy, self.args.watchdog_interval_s
        if self.in_maintenance():
            if self.stuck_since is not None:
                log.info("watchdog: maintenance note %s: the deploy restarts the server; "
                         "not judging it", self.args.maintenance_file)
            self.forget()
            return
        pid = await self.server_pid()
        if pid is None:
            self.forget()  # not running: its service manager starts it
            return
        cpu = await cpu_seconds(pid)
        if pid != self.pid or cpu is None or self.cpu is None:
            self.stuck_since = None  # a new process (or no reading): start looking afresh
            self.pid, self.cpu = pid, cpu
            return
        moved, self.cpu = cpu - self.cpu, cpu
        now = proxy.now()
        if now - proxy.last_ok < interval:
            self.healthy()
            return
        if now - proxy.last_upstream_activity < interval or moved >= self.args.watchdog_min_cpu_s:
            if self.stuck_since is not None:
                log.info("watchdog: server pid %d makes progress again (CPU time +%.2f s)",
                         pid, moved)
            self.stuck_since = None  # prefill, a model loading: working
            return
        # CPU flat and nothing came from it: does it give a token?
        try:
            if await asyncio.wait_for(proxy.probe(), min(interval, self.args.probe_timeout_s)):
                self.healthy()
                return
        except asyncio.TimeoutError:
            pass
        if proxy.probing():
            problem = f"no token for {now - proxy.last_probe:.0f} s"
        else:
            problem = proxy.last_problem
        if self.stuck_since is None:
            self.stuck_since = now
            log.warning("watchdog: server pid %d cannot generate (%s) and its CPU time moved "
                        "%.2f s in %g s; restart in %g s unless it recovers", pid, problem,
                        moved, interval, self.args.watchdog_stuck_s)
        if self.stuck_for() < self.args.watchdog_stuck_s:
            return
        if now < self.not_before:
            log.info("watchdog: server pid %d still stuck; next restart allowed in %.0f s "
                     "(backoff)", pid, self.not_before - now)
            return
        await self.restart(pid, problem, moved)

    def healthy(self) -> None:
        if self.stuck_since is not None or self.consecutive:
            log.info("watchdog: the server generates again")
        self.stuck_since = None
        self.consecutive = 0
        self.not_before = -math.inf

    async def restart(self, pid: int, problem: str, moved: float) -> None:
        reason = ("generation_thread_died" if "generation thread died" in problem
                  else "no_token" if problem.startswith("no token") else "probe_failed")
        log.warning("watchdog: restarting the server (pid %d, %s): no token and CPU time "
                    "+%.2f s in %g s, stuck for %.0f s (--watchdog-stuck-s %g), restart %d "
                    "in a row; %s", pid, problem, moved, self.args.watchdog_interval_s,
                    self.stuck_for(), self.args.watchdog_stuck_s, self.consecutive + 1,
                    self.args.restart_command)
        self.restarts[reason] = self.restarts.get(reason, 0) + 1
        self.consecutive += 1
        backoff = min(self.args.watchdog_backoff_s * 2 ** (self.consecutive - 1),
                      self.args.watchdog_backoff_max_s)
        self.not_before = self.proxy.now() + backoff
        command = asyncio.ensure_future(run_shell(self.args.restart_command, COMMAND_TIMEOUT_S))
        await asyncio.sleep(0.5)
        try:
            os.kill(pid, signal.SIGCONT)  # a stopped process takes the manager's SIGTERM now
        except OSError:
            pass
        code, out = await command
        if code != 0:
            self.failures += 1
            log.error("watchdog: the restart command %s: %s",
                      "timed out" if code is None else f"exited {code}", out.strip()[-500:])
        else:
            log.info("watchdog: restart command done; next restart not before %.0f s from now",
                     backoff)
        self.forget()
        self.proxy.mark_down(f"restarted by the watchdog ({reason})")

    def render(self) -> list[str]:
        out = ["# HELP proxy_watchdog_restarts_total Server restarts by the watchdog, by reason.",
               "# TYPE proxy_watchdog_restarts_total counter"]
        for reason, n in sorted(self.restarts.items()):
            out.append(f'proxy_watchdog_restarts_total{{reason="{reason}"}} {n}')
        out += ["# HELP proxy_watchdog_restart_failures_total Restart commands that failed.",
                "# TYPE proxy_watchdog_restart_failures_total counter",
                f"proxy_watchdog_restart_failures_total {self.failures}",
                "# HELP proxy_watchdog_stuck_seconds How long the server has given no token "
                "and shown no progress (0: fine).",
                "# TYPE proxy_watchdog_stuck_seconds gauge",
                f"proxy_watchdog_stuck_seconds {self.stuck_for():.0f}"]
        return out
