"""`routectl.py switch`: the order of a restart, and the rollback, step by step.

The real script runs; what it drives is made small so every step can be
watched and made to fail on demand: each release's `bin/python` is a shell
script standing in for the smoke generation (it logs and exits 0, or 1 for a
release that cannot generate), the stop and start commands log and flip a
file, and a loopback HTTP stand-in answers the readiness probe 200 only while
the server is "up" on a release that can serve. The real services are in
tests/e2e/test_memory_limit.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROUTECTL = REPO / "files" / "routectl.py"


class Rig:
    def __init__(self, tmp: Path, releases: dict[str, bool], current: str | None = "A"):
        self.tmp = tmp
        self.root = tmp / "venvs"
        self.log = tmp / "log"
        self.up = tmp / "up"
        self.note = tmp / "maintenance.json"
        self.cannot_serve: set[str] = set()
        for name, smoke_ok in releases.items():
            self.add_release(name, smoke_ok)
        if current:
            (self.root / "current").symlink_to(f"releases/{current}")
        self.definition = tmp / "server.conf"
        self.definition.write_text("old definition\n")
        self.staged = tmp / "server.definition.next"
        self.staged.write_text("new definition\n")
        rig = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                serving = rig.up.exists() and rig.current() not in rig.cannot_serve
                self.send_response(200 if serving else 503)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def add_release(self, name: str, smoke_ok: bool = True) -> None:
        python = self.root / "releases" / name / "bin" / "python"
        python.parent.mkdir(parents=True)
        # the smoke's BLAS (the smoke spec's env), when it has one
        python.write_text(f"#!/bin/sh\necho \"smoke {name}${{LD_PRELOAD:+ $LD_PRELOAD}}"
                          f"${{OPENBLAS_NUM_THREADS:+ $OPENBLAS_NUM_THREADS}}\" >> {self.log}\n"
                          f"{'exit 0' if smoke_ok else 'echo the model cannot load >&2; exit 1'}\n")
        python.chmod(0o755)

    def current(self) -> str | None:
        try:
            return os.readlink(self.root / "current").rsplit("/", 1)[-1]
        except OSError:
            return None

    def switch(self, release: str, strategy: str, *extra: str, smoke: dict | None = None,
               rank_host: bool = False) -> subprocess.CompletedProcess:
        """`rank_host`: as a cluster host without rank 0 runs it (no smoke, no --url)."""
        stop = (f"test -f {self.note} && echo 'stop (503: restarting)' >> {self.log} "
                f"|| echo stop >> {self.log}; cp {self.note} {self.tmp}/note.seen 2>/dev/null; "
                f"rm -f {self.up}")
        start = (f"echo \"start $(basename $(readlink {self.root}/current)) "
                 f"$(cat {self.definition})\" >> {self.log}; touch {self.up}")
        argv = [sys.executable, str(ROUTECTL), "switch", "--root", str(self.root),
                "--release", release, "--strategy", strategy, "--stop", stop, "--start", start,
                "--smoke", "null" if rank_host else json.dumps(
                    smoke or {"model": "m", "messages": [], "expect": "x"}),
                *([] if rank_host else ["--url", f"http://127.0.0.1:{self.http.server_port}"]),
                "--timeout", "3", "--stop-timeout", "5",
                "--maintenance", str(self.note), "--keep", "2",
                "--definition", str(self.definition), "--staged", str(self.staged), *extra]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    def steps(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def state(self) -> dict:
        return json.loads((self.root / "releases.json").read_text())

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def rig(tmp_path):
    made = []

    def make(releases: dict[str, bool], current: str | None = "A") -> Rig:
        made.append(Rig(tmp_path, releases, current))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_stop_first_stops_then_smokes_then_starts_the_new_release(rig):
    r = rig({"A": True, "B": True})
    done = r.switch("B", "stop-first")
    assert done.returncode == 0, done.stderr
    assert r.steps() == ["stop (503: restarting)", "smoke B", "start B new definition"]
    assert r.current() == "B" and r.state()["previous"] == ["A"]
    assert not r.note.exists()  # the proxy stops saying "restarting"
    # and a note left behind by a switch killed half-way ends: its longest run from
    # then (smoke 1800 s by default + 2 x the 3-s readiness deadline + 2 x the 5-s stop
    # timeout + 60 s), after which the proxy and its watchdog no longer trust it
    seen = json.loads((r.tmp / "note.seen").read_text())
    assert seen["until"] - seen["since"] == pytest.approx(1800 + 2 * 3 + 2 * 5 + 60)


def test_the_smoke_runs_with_the_servers_blas(rig):
    """The smoke spec's env (the server's LD_PRELOAD on Linux: tasks/server.smoke_spec)
    reaches the smoke generation's process."""
    r = rig({"A": True, "B": True})
    smoke = {"model": "m", "messages": [], "expect": "x",
             "env": {"LD_PRELOAD": "/lib/libfast.so", "OPENBLAS_NUM_THREADS": "1"}}
    done = r.switch("B", "stop-first", smoke=smoke)
    assert done.returncode == 0, done.stderr
    assert r.steps() == ["stop (503: restarting)", "smoke B /lib/libfast.so 1",
                         "start B new definition"]


def test_overlap_smokes_beside_the_running_server_then_restarts(rig):
    r = rig({"A": True, "B": True})
    done = r.switch("B", "overlap")
    assert done.returncode == 0, done.stderr
    assert r.steps() == ["smoke B", "stop (503: restarting)", "start B new definition"]
    assert r.current() == "B"


def test_a_failed_smoke_in_stop_first_puts_the_old_release_and_definition_back(rig):
    r = rig({"A": True, "B": False})
    done = r.switch("B", "stop-first")
    assert done.returncode == 2, done.stderr
    assert r.steps() == ["stop (503: restarting)", "smoke B", "stop (503: restarting)",
                         "start A old definition"]
    assert r.current() == "A" and r.definition.read_text() == "old definition\n"
    assert "the model cannot load" in done.stderr
    assert "rolled back: the route is back on release A" in done.stderr
    assert "the model cannot load" in r.state()["failed"]["B"]["why"]
    assert not r.note.exists()


def test_a_failed_smoke_in_overlap_changes_nothing(rig):
    r = rig({"A": True, "B": False})
    done = r.switch("B", "overlap")
    assert done.returncode == 1
    assert r.steps() == ["smoke B"]  # the running server was never touched
    assert r.current() == "A" and r.definition.read_text() == "old definition\n"
    assert "nothing changed: the server still runs release A" in done.stderr


@pytest.mark.parametrize("strategy", ["stop-first", "overlap"])
def test_a_release_that_starts_but_never_answers_is_rolled_back(rig, strategy):
    r = rig({"A": True, "B": True})
    r.cannot_serve.add("B")
    done = r.switch("B", strategy)
    assert done.returncode == 2, done.stderr
    assert r.steps()[-3:] == ["start B new definition", "stop (503: restarting)",
                              "start A old definition"]
    assert "did not become ready within 3 s" in done.stderr
    assert r.current() == "A"


def test_when_the_rollback_fails_too_it_says_the_route_is_down(rig):
    r = rig({"A": True, "B": True})
    r.cannot_serve.update({"A", "B"})
    done = r.switch("B", "stop-first")
    assert done.returncode == 3
    assert "the route is DOWN" in done.stderr


def test_a_first_deploy_that_fails_has_nothing_to_go_back_to(rig):
    r = rig({"B": False}, current=None)
    done = r.switch("B", "stop-first")
    assert done.returncode == 1
    assert "there is no earlier release to go back to" in done.stderr
    assert r.current() is None


def test_rollback_by_hand_goes_to_the_previous_release_and_old_ones_are_pruned(rig):
    r = rig({"A": True, "B": True, "C": True})
    assert r.switch("B", "overlap").returncode == 0
    assert r.switch("C", "overlap").returncode == 0
    # keep 2: C and B stay; A (not protected) is gone
    assert sorted(os.listdir(r.root / "releases")) == ["B", "C"]
    assert r.state()["previous"] == ["B"]
    done = r.switch("previous", "stop-first")
    assert done.returncode == 0, done.stderr
    assert r.current() == "B" and r.state()["previous"] == ["C"]


def test_a_release_still_used_by_another_process_is_never_pruned(rig, tmp_path):
    r = rig({"A": True, "B": True, "C": True})
    in_use = tmp_path / "proxy.release"
    in_use.write_text("A\n")
    assert r.switch("B", "overlap", "--protect", str(in_use)).returncode == 0
    assert r.switch("C", "overlap", "--protect", str(in_use)).returncode == 0
    assert sorted(os.listdir(r.root / "releases")) == ["A", "B", "C"]


def test_a_cluster_host_without_rank_0_switches_its_ranks_without_a_wait_and_prunes(rig):
    """No --url (tasks/server.py ranks_switch_command): the ranks are stopped,
    `current` moved, started, and the release recorded with old ones pruned as on
    rank 0's host; no readiness wait here (the stand-in server never answers)."""
    r = rig({"A": True, "B": True, "C": True})
    r.cannot_serve.update({"A", "B", "C"})

    done = r.switch("B", "stop-first", rank_host=True)
    assert done.returncode == 0, done.stderr
    assert "no readiness wait here" in done.stdout
    assert r.steps()[-2:] == ["stop (503: restarting)", "start B new definition"]
    assert r.switch("C", "stop-first", rank_host=True).returncode == 0
    assert r.current() == "C" and r.state()["previous"] == ["B"]
    assert sorted(os.listdir(r.root / "releases")) == ["B", "C"]  # keep 2: A pruned
