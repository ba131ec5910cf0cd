"""tasks/launchctl.py, tasks/host_facts.py and tasks/tuning.py pieces that run without a Mac.

The bootstrap retry is a shell loop run on the Mac; here it runs in a real
/bin/sh against a stand-in `launchctl` (a script on PATH: launchctl cannot
exist on Linux) that fails the way launchd does while a label drains.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tasks.host_facts import LaunchdMaxfiles, PmsetSettings
from tasks.launchctl import LaunchdPrint, bootstrap_command

REPO = Path(__file__).resolve().parents[2]
PLIST = "/Library/LaunchDaemons/org.mlxroute.server.plist"

STAND_IN = """#!/bin/sh
# launchctl stand-in: `bootstrap` fails with FAILURE for the first FAILS calls.
echo "$*" >> "$LOG"
case "$1" in
bootstrap)
    n=$(cat "$COUNT" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$COUNT"
    if [ "$n" -le "$FAILS" ]; then echo "$FAILURE"; exit 5; fi ;;
bootout) [ -n "$BOOTOUT_FAILS" ] && { echo "Boot-out failed: 3: No such process"; exit 3; } ;;
esac
exit 0
"""


@pytest.fixture
def launchctl(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "launchctl").write_text(STAND_IN)
    (bin_dir / "launchctl").chmod(0o755)
    # `sleep $n` between rounds: a no-op here so the test takes no time
    (bin_dir / "sleep").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sleep").chmod(0o755)

    def run(fails: int, failure: str = "Bootstrap failed: 5: Input/output error",
            retries: int = 3, **env):
        command = bootstrap_command("system", "org.mlxroute.server", PLIST, retries, "studio")
        proc = subprocess.run(
            ["/bin/sh", "-c", command], capture_output=True, text=True, timeout=30,
            env={"PATH": f"{bin_dir}:/usr/bin:/bin", "LOG": str(tmp_path / "calls"),
                 "COUNT": str(tmp_path / "count"), "FAILS": str(fails), "FAILURE": failure,
                 **env},
        )
        log = tmp_path / "calls"
        calls = log.read_text().splitlines() if log.exists() else []
        return proc, calls

    return run


def test_bootstrap_succeeds_first_time_without_a_bootout(launchctl):
    proc, calls = launchctl(fails=0)
    assert proc.returncode == 0, proc.stderr
    assert calls == [f"bootstrap system {PLIST}"]


def test_bootstrap_io_error_boots_the_label_out_and_retries(launchctl):
    proc, calls = launchctl(fails=2, BOOTOUT_FAILS="1")
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        f"bootstrap system {PLIST}", "bootout system/org.mlxroute.server",
        f"bootstrap system {PLIST}", "bootout system/org.mlxroute.server",
        f"bootstrap system {PLIST}",
    ]


def test_persistent_io_error_stops_after_the_bound_with_what_to_check(launchctl):
    proc, calls = launchctl(fails=99, retries=3)
    assert proc.returncode == 1
    assert calls.count(f"bootstrap system {PLIST}") == 3
    assert "Bootstrap failed: 5: Input/output error" in proc.stderr
    assert f"studio: launchctl bootstrap system {PLIST} still fails after 3" in proc.stderr
    assert f"plutil -lint {PLIST}" in proc.stderr and "root:wheel mode 644" in proc.stderr


def test_other_bootstrap_errors_are_not_retried(launchctl):
    proc, calls = launchctl(fails=1, failure="Bootstrap failed: 119: Service is disabled")
    assert proc.returncode == 1
    assert calls == [f"bootstrap system {PLIST}"]
    assert "119: Service is disabled" in proc.stderr


LOADED = """system/org.mlxroute.server = {
\tactive count = 1
\tpath = /Library/LaunchDaemons/org.mlxroute.server.plist
\ttype = LaunchDaemon
\tstate = running

\tprogram = /Users/milo/venvs/mlx-route/bin/python
\targuments = {
\t\t/Users/milo/venvs/mlx-route/bin/python
\t\tstate = not a key
\t}

\tpid = 8123
\tlast exit code = (never exited)
}""".splitlines()


def test_launchd_print_reads_the_jobs_own_keys_only():
    status = LaunchdPrint().process(LOADED)
    assert status["state"] == "running"
    assert status["pid"] == "8123"
    assert status["path"] == "/Library/LaunchDaemons/org.mlxroute.server.plist"
    assert status["last exit code"] == "(never exited)"


def test_launchd_print_of_a_missing_label_is_none():
    # `launchctl print` of an unknown label writes only to stderr (discarded)
    assert LaunchdPrint().process([]) is None


def test_pmset_settings_are_read_with_their_notes_dropped():
    settings = PmsetSettings().process([
        "System-wide power settings:", "Currently in use:",
        " Sleep On Power Button 1", " sleep                0 (sleep prevented by sharingd, powerd)",
        " autorestart          1", " hibernatefile        /var/vm/sleepimage",
    ])
    assert settings == {"Sleep On Power Button": "1", "sleep": "0", "autorestart": "1",
                        "hibernatefile": "/var/vm/sleepimage"}


def test_launchctl_limit_maxfiles_is_read_as_soft_and_hard():
    assert LaunchdMaxfiles().process(["\tmaxfiles    256            unlimited      "]) == (
        "256", "unlimited")


def test_tune_host_plans_nothing_on_linux(tmp_path):
    """The real pyinfra CLI against this Linux machine: tune_host adds no operation."""
    deploy = tmp_path / "tune.py"
    deploy.write_text("from tasks.tuning import tune_host\n\ntune_host()\n")
    pyinfra = str(Path(sys.executable).parent / "pyinfra")
    proc = subprocess.run([pyinfra, "-y", "--json", "@local", str(deploy)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    assert json.loads(proc.stdout)["results"]["operations"] == []
