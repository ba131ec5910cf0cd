#!/usr/bin/env python3
"""Host-side checks the deploy runs with the venv's interpreter.

    routectl.py smoke --model DIR --messages JSON --expect TEXT [--max-tokens N]
        Load the model with mlx_lm and greedy-generate the profile's smoke
        prompt: proves the venv (and the patches) can load and run the model
        before the server is (re)started. Exit 1 with the model's error.

    routectl.py wait --url URL [--kind server|proxy] [--timeout S] [--key-file F]
        Wait until a (re)started service really answers: the server only when
        a 1-token chat completion succeeds (mlx_lm.server says /health 200
        while it is still loading), the proxy when its /health is 200.

    routectl.py switch --root VENV_ROOT --release ID|previous --strategy overlap|stop-first
                       --stop CMD --start CMD --smoke JSON --url URL [...]
        Move the server to a release (tasks/release.py), with rollback:
          overlap     smoke the new release beside the running server, then
                      point `current` at it and restart
          stop-first  stop the server (the proxy answers 503 "the model is
                      restarting"), smoke, point `current` at it, start
        A failed smoke, start or readiness wait puts the previous release and
        service definition back and starts them; the exit code says how it
        ended: 0 switched, 1 nothing changed (overlap smoke failed) or no
        previous release to go back to, 2 rolled back (the route serves the
        previous release), 3 the rollback failed too (the route is down).

stdlib only, apart from mlx_lm for `smoke`.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request


def smoke(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        from mlx_lm import generate, load
        from mlx_lm.sample_utils import make_sampler

        model, tokenizer = load(
            args.model, tokenizer_config={"trust_remote_code": args.trust_remote_code}
        )
        loaded = time.monotonic()
        messages = json.loads(args.messages)
        # The server's own template arguments (e.g. GLM's enable_thinking=false):
        # the smoke must prompt the model the way the server will.
        template_args = json.loads(args.chat_template_args) if args.chat_template_args else {}
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               **template_args)
        text = generate(
            model, tokenizer, prompt=prompt, max_tokens=args.max_tokens,
            sampler=make_sampler(temp=0.0),
        )
    except Exception as exc:  # the model's own error is what the person needs
        traceback.print_exc()
        print(f"smoke: the venv cannot run the model in {args.model}: {exc!r}", file=sys.stderr)
        return 1
    result = {
        "ok": args.expect in text,
        "expect": args.expect,
        "answer": text,
        "load_s": round(loaded - started, 2),
        "generate_s": round(time.monotonic() - loaded, 2),
    }
    print(json.dumps(result))
    if not result["ok"]:
        print(
            f"smoke: the model answered {text!r}, which lacks {args.expect!r}; "
            "the weights, patches or chat template are wrong for this profile",
            file=sys.stderr,
        )
        return 1
    return 0


def _probe(url: str, kind: str, key: str | None) -> tuple[bool, str]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if kind == "server":
        body = json.dumps({
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1,
        }).encode()
        request = urllib.request.Request(
            url.rstrip("/") + "/v1/chat/completions", data=body, headers=headers
        )
    else:
        request = urllib.request.Request(url.rstrip("/") + "/health", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status == 200, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}: {exc.read()[:200]!r}"
    except (OSError, urllib.error.URLError) as exc:
        return False, repr(exc)


def wait_ready(url: str, kind: str, key: str | None, timeout: float,
               interval: float = 1.0) -> tuple[bool, str]:
    """(True, "after N s") once the service answers, (False, why) at the deadline."""
    started = time.monotonic()
    deadline = started + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        ok, last = _probe(url, kind, key)
        if ok:
            return True, f"after {time.monotonic() - started:.1f} s"
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
    return False, (f"the {kind} at {url} did not become ready within {timeout:.0f} s "
                   f"(last: {last}); read its log under route_logs_dir")


def wait(args: argparse.Namespace) -> int:
    key = None
    if args.key_file:
        with open(args.key_file) as handle:
            key = handle.read().strip()
    ok, how = wait_ready(args.url, args.kind, key, args.timeout, args.interval)
    if ok:
        print(json.dumps({"ready": True, "kind": args.kind, "after_s": float(how.split()[1])}))
        return 0
    print(f"wait: {how}", file=sys.stderr)
    return 1


# -- switch -------------------------------------------------------------------

def say(message: str) -> None:
    print(f"switch: {message}", flush=True)


class Releases:
    """releases/<id>, the `current` link and releases.json under a venv root."""

    def __init__(self, root: str):
        self.root = root
        self.dir = os.path.join(root, "releases")
        self.link = os.path.join(root, "current")
        self.state_file = os.path.join(root, "releases.json")

    def current(self) -> str | None:
        try:
            return os.path.basename(os.readlink(self.link))
        except OSError:
            return None

    def python(self, release: str) -> str:
        return os.path.join(self.dir, release, "bin", "python")

    def state(self) -> dict:
        try:
            with open(self.state_file) as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return {"current": self.current(), "previous": [], "failed": {}}

    def point(self, release: str | None) -> None:
        """Move `current` atomically (a new link renamed over the old one)."""
        if release is None:
            if os.path.lexists(self.link):
                os.unlink(self.link)
            return
        tmp = self.link + ".new"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.path.join("releases", release), tmp)
        os.replace(tmp, self.link)

    def write_state(self, state: dict) -> None:
        tmp = self.state_file + ".new"
        with open(tmp, "w") as handle:
            json.dump(state, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, self.state_file)

    def previous(self) -> str | None:
        current = self.current()
        for release in self.state().get("previous", []):
            if release != current and os.path.exists(self.python(release)):
                return release
        return None

    def commit(self, release: str, before: str | None, keep: int, protect: set[str]) -> list[str]:
        """Record `release` as current (and `before` as the newest previous); prune.

        Only releases this record knows are removed: those that fell off the
        end of `previous`, and failed ones; a release built but not switched
        to yet (`next`), or named in a --protect file, stays."""
        state = self.state()
        known = [r for r in [before, *state.get("previous", [])] if r and r != release]
        previous = list(dict.fromkeys(known))
        kept_previous = previous[:max(keep - 1, 1)]
        failed = state.setdefault("failed", {})
        failed.pop(release, None)
        state.update(current=release, previous=kept_previous,
                     switched_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        try:
            protect = protect | {os.path.basename(os.readlink(os.path.join(self.root, "next")))}
        except OSError:
            pass
        removed = []
        for name in [*previous[len(kept_previous):], *list(failed)]:
            if name in protect or name in kept_previous or name == release:
                continue
            shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)
            failed.pop(name, None)
            removed.append(name)
        self.write_state(state)
        return removed

    def record_failure(self, release: str, why: str) -> None:
        state = self.state()
        state.setdefault("failed", {})[release] = {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "why": why[-2000:]}
        self.write_state(state)


class Definition:
    """The service manager's definition of the server, swapped with a backup."""

    def __init__(self, dest: str | None, staged: str | None):
        self.dest, self.staged = dest, staged
        self.backup = staged + ".prev" if staged else None
        self.had = bool(dest and os.path.exists(dest))
        self.installed = False

    def install(self) -> None:
        if not self.staged:
            return
        if self.had:
            shutil.copyfile(self.dest, self.backup)
        self._copy(self.staged)
        self.installed = True

    def restore(self) -> None:
        if not self.installed:
            return
        if self.had:
            self._copy(self.backup)
        elif os.path.exists(self.dest):
            os.unlink(self.dest)

    def _copy(self, src: str) -> None:
        tmp = self.dest + ".mlx-route-new"
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.dest)


def run_shell(command: str, timeout: float = 600) -> tuple[bool, str]:
    try:
        done = subprocess.run(command, shell=True, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"`{command}` did not finish within {timeout:.0f} s"
    out = (done.stdout + done.stderr).strip()
    return done.returncode == 0, out[-1500:]


def run_smoke(args: argparse.Namespace, releases: Releases, release: str) -> tuple[bool, str]:
    spec = json.loads(args.smoke)
    if spec is None:
        # a cluster: one host cannot load the whole model; the readiness wait
        # (a real generation through every rank) is the check
        return True, "no smoke generation (a cluster: the readiness wait generates through the ranks)"
    argv = [releases.python(release), os.path.abspath(__file__), "smoke",
            "--model", spec["model"], "--messages", json.dumps(spec["messages"]),
            "--expect", spec["expect"], "--max-tokens", str(spec.get("max_tokens", 16))]
    if spec.get("trust_remote_code"):
        argv.append("--trust-remote-code")
    if spec.get("chat_template_args"):
        argv += ["--chat-template-args", spec["chat_template_args"]]
    # the server's BLAS (LD_PRELOAD on Linux), through `env`: sudo drops LD_* variables
    extra = [f"{key}={value}" for key, value in sorted(spec.get("env", {}).items())]
    if args.run_as and os.geteuid() == 0 and args.run_as != "root":
        # the service manager needs root; the model is the route user's business
        home = pwd.getpwnam(args.run_as).pw_dir
        argv = ["sudo", "-n", "-u", args.run_as, "-H", "--", "env", f"HOME={home}", *extra, *argv]
    elif extra:
        argv = ["env", *extra, *argv]
    say(f"smoke-generating with release {release}")
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=args.smoke_timeout)
    except subprocess.TimeoutExpired:
        return False, f"the smoke generation did not finish within {args.smoke_timeout:.0f} s"
    if done.returncode == 0:
        return True, f"smoke passed in {time.monotonic() - started:.1f} s: {done.stdout.strip()}"
    if done.returncode < 0:
        # killed by a signal: on a host the model fills, the out-of-memory killer
        return False, (f"the smoke generation was killed by signal {-done.returncode} "
                       "(SIGKILL: out of memory?): " + done.stderr.strip()[-800:])
    return False, "the smoke generation failed: " + done.stderr.strip()[-1500:]


class Maintenance:
    """A note the proxy shows in its 503s while the server restarts on purpose (and
    the proxy's watchdog leaves the server alone). `until`: when the note stops
    being trusted, this switch's longest run from now; a switch killed half-way
    (SIGKILL, a power cut) cannot remove it, and it must not silence the watchdog
    until the next deploy."""

    def __init__(self, path: str | None, longest_s: float):
        self.path = path
        self.longest_s = longest_s

    def __enter__(self):
        return self

    def begin(self, message: str) -> None:
        if self.path:
            tmp = self.path + ".new"
            now = time.time()
            with open(tmp, "w") as handle:
                json.dump({"message": message, "since": now, "until": now + self.longest_s},
                          handle)
            os.replace(tmp, self.path)

    def __exit__(self, *exc) -> None:
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)


def switch(args: argparse.Namespace) -> int:
    releases = Releases(args.root)
    before = releases.current()
    target = args.release
    if target == "previous":
        target = releases.previous()
        if target is None:
            print(f"switch: there is no earlier release to go back to under {releases.dir} "
                  f"(current: {before}); see releases.json", file=sys.stderr)
            return 1
    if not os.path.exists(releases.python(target)):
        print(f"switch: release {target} does not exist under {releases.dir}", file=sys.stderr)
        return 1
    definition = Definition(args.definition, args.staged)
    protect = set()
    for name in args.protect or []:
        try:
            with open(name) as handle:
                protect.add(handle.read().strip())
        except OSError:
            pass
    say(f"server {before or '(none)'} -> {target}, strategy {args.strategy}")

    def start_and_wait() -> tuple[bool, str]:
        ok, out = run_shell(args.start)
        if not ok:
            return False, f"starting the server failed: {out}"
        if args.url is None:
            # a cluster host without rank 0: its ranks serve no HTTP; rank 0's
            # switch, on its host, waits for a generation through every rank
            return True, "started (no readiness wait here: rank 0's host waits for the group)"
        return wait_ready(args.url, "server", None, args.timeout)

    def finish() -> int:
        removed = releases.commit(target, before, args.keep, protect | {target})
        say(f"the server runs release {target}" + (f"; removed old releases {', '.join(removed)}"
                                                   if removed else ""))
        return 0

    def roll_back(why: str) -> int:
        releases.record_failure(target, why)
        if before is None:
            run_shell(args.stop)
            definition.restore()
            releases.point(None)
            print(f"switch: release {target} failed and there is no earlier release to go back "
                  f"to: {why}", file=sys.stderr)
            return 1
        say(f"release {target} failed; rolling back to release {before}")
        run_shell(args.stop)
        definition.restore()
        releases.point(before)
        ok, how = start_and_wait()
        if ok:
            print(f"switch: release {target} failed: {why}\n"
                  f"switch: rolled back: the route is back on release {before} (serving {how})",
                  file=sys.stderr)
            return 2
        print(f"switch: release {target} failed: {why}\nswitch: the rollback to release {before} "
              f"failed too: {how}\nswitch: the route is DOWN", file=sys.stderr)
        return 3

    # the longest a switch runs after its note: the smoke, the start and a rollback's
    # start (each bounded), two stops (each bounded by the service manager's kill
    # timeout), and a minute for everything between them
    longest = args.smoke_timeout + 2 * args.timeout + 2 * args.stop_timeout + 60
    with Maintenance(args.maintenance, longest) as note:
        if args.strategy == "overlap":
            ok, how = run_smoke(args, releases, target)
            if not ok:
                releases.record_failure(target, how)
                print(f"switch: {how}\nswitch: nothing changed: the server still runs release "
                      f"{before or '(none)'}", file=sys.stderr)
                return 1
            say(how)
            note.begin(f"the model is restarting on release {target}")
            run_shell(args.stop)
        else:
            note.begin(f"the model is restarting on release {target} (stop-first: memory for "
                       "one copy only)")
            say("stopping the server first (one copy of the model fits)")
            run_shell(args.stop)
            ok, how = run_smoke(args, releases, target)
            if not ok:
                return roll_back(how)
            say(how)
        definition.install()
        releases.point(target)
        ok, how = start_and_wait()
        if not ok:
            return roll_back(how)
        say(f"the server answers on release {target} ({how})")
        return finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p_smoke = sub.add_parser("smoke", help="load the model and generate the smoke prompt")
    p_smoke.add_argument("--model", required=True)
    p_smoke.add_argument("--messages", required=True, help="chat messages as JSON")
    p_smoke.add_argument("--expect", required=True, help="substring the answer must contain")
    p_smoke.add_argument("--max-tokens", type=int, default=16)
    p_smoke.add_argument("--trust-remote-code", action="store_true")
    p_smoke.add_argument("--chat-template-args", help="the server's --chat-template-args (JSON)")
    p_smoke.set_defaults(func=smoke)

    p_wait = sub.add_parser("wait", help="wait until a service really answers")
    p_wait.add_argument("--url", required=True)
    p_wait.add_argument("--kind", choices=["server", "proxy"], default="server")
    p_wait.add_argument("--timeout", type=float, default=120)
    p_wait.add_argument("--interval", type=float, default=1.0)
    p_wait.add_argument("--key-file")
    p_wait.set_defaults(func=wait)

    p_switch = sub.add_parser("switch", help="move the server to a release, with rollback")
    p_switch.add_argument("--root", required=True, help="venv_path: releases/, current")
    p_switch.add_argument("--release", required=True, help="a release id, or 'previous'")
    p_switch.add_argument("--strategy", choices=["overlap", "stop-first"], required=True)
    p_switch.add_argument("--stop", required=True, help="shell command that stops the server")
    p_switch.add_argument("--start", required=True,
                          help="shell command that (re)loads the definition and starts it")
    p_switch.add_argument("--smoke", required=True,  # JSON null: no smoke (a cluster)
                          help="JSON: model, messages, expect, max_tokens, trust_remote_code, "
                               "chat_template_args")
    p_switch.add_argument("--smoke-timeout", type=float, default=1800)
    p_switch.add_argument("--url", help="the server's URL; none: a cluster host without rank 0 "
                          "(started, not waited for: rank 0's switch waits for the group)")
    p_switch.add_argument("--timeout", type=float, default=600, help="readiness deadline")
    p_switch.add_argument("--definition", help="the service definition the start command reads")
    p_switch.add_argument("--staged", help="the new definition to put there")
    p_switch.add_argument("--keep", type=int, default=3, help="releases kept, current included")
    p_switch.add_argument("--protect", action="append",
                          help="a file naming a release still in use (never pruned)")
    p_switch.add_argument("--maintenance", help="note file the proxy shows while restarting")
    p_switch.add_argument("--stop-timeout", type=float, default=30,
                          help="longest a stop command takes (the service manager's kill "
                               "timeout); with the other timeouts it bounds the note's life")
    p_switch.add_argument("--run-as", help="user the smoke runs as when this runs as root")
    p_switch.set_defaults(func=switch)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
