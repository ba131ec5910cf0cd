"""The real deploy, run against this machine with the small model.

These run README's own command (`pyinfra -y inventory.py deploy.py`) against
@local: a real venv, the real weights conversion, a real mlx_lm.server and
proxy under a real supervisor, then the testinfra host suite as the deploy's
last step. They take minutes: `pytest -m "not e2e"` leaves them out.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
VERIFY_ROW = "Verify the route with the host suite"
# The host suite (trust gates included) and the probes run in full on the
# first deploy; later runs skip them to keep the suite's time in bounds.
NO_VERIFY = ("--data", "verify_enabled=False")
# (the cache probe keeps the profile's 600 tokens: its follow-up must stay under a
# tenth of the cold prefill, which a shorter prompt no longer shows with OpenBLAS)
SMALL_BENCH = ("--data", "bench_needle_tokens=120", "--data", "bench_integers=8",
               "--data", "bench_prose_words=16")


def deploy(*args: str, inventory: str = "inventory.py", timeout: int = 1200):
    """README's command with --json: the log on stderr, the results as JSON on stdout."""
    result = subprocess.run(
        [PYINFRA, "-y", "--json", inventory, "deploy.py", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return result, result.stdout + result.stderr


def results_table(log: str) -> dict[str, tuple[int, int, int]]:
    """Operation -> hosts it (changed, failed on, left unchanged), from the
    results `pyinfra --json` prints on stdout (one line); {} when it printed none."""
    rows: dict[str, tuple[int, int, int]] = {}
    lines = [line for line in log.splitlines() if line.startswith('{"plan": ')]
    if not lines:
        return rows
    for op in (json.loads(lines[-1])["results"] or {}).get("operations", []):
        # operations of the same name (one a loop round) add up, as in pyinfra's table
        before = rows.get(op["name"], (0, 0, 0))
        rows[op["name"]] = (before[0] + len(op["success"]), before[1] + len(op["error"]),
                            before[2] + len(op["no_change"]))
    return rows


def supervisorctl(*args: str) -> str:
    manifest = json.loads((Path.home() / ".local/share/mlx-route/route.json").read_text())
    return subprocess.run(
        f"{manifest['backend_ctl']} {' '.join(args)}", shell=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture(scope="module")
def first_run():
    started = time.time()
    # the probes at small sizes (bench_*, so every later run passes them too: they are in
    # route.json), as tests/unit/test_route_report.py runs them: this test shows the
    # deploy writes the report; the profile's sizes are for a person
    result, log = deploy("--data", "bench_enabled=True", *SMALL_BENCH)
    assert result.returncode == 0, log[-6000:]
    return log, started


def test_deploy_brings_up_a_route_the_host_suite_passes(first_run):
    log, _ = first_run
    rows = results_table(log)
    verify = [name for name in rows if name.startswith(VERIFY_ROW)]
    assert verify, log[-3000:]
    assert rows[verify[0]][1] == 0, "the host suite failed"
    assert re.search(r"\b\d+ passed\b", log), log[-3000:]
    assert "failed" not in re.findall(r"\d+ (passed|failed)", log)


def test_first_deploy_writes_a_probe_report_with_plots(first_run):
    _, started = first_run
    reports = [path for path in (REPO / "reports" / "_local").glob("*/report.json")
               if path.stat().st_mtime >= started]
    assert len(reports) == 1, reports
    folder = reports[0].parent
    report = json.loads(reports[0].read_text())
    assert report["probes"], report
    pngs = list(folder.glob("*.png"))
    assert len(pngs) >= 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "report.md" in {p.name for p in folder.iterdir()}


def test_second_run_reports_no_changes(first_run):
    result, log = deploy(*NO_VERIFY, *SMALL_BENCH)
    assert result.returncode == 0, log[-6000:]
    rows = results_table(log)
    assert rows, log[-3000:]
    changed = {name: row for name, row in rows.items() if row[0]}
    assert changed == {}, f"a re-run changed something: {changed}"


def test_changed_server_flag_restarts_only_the_server(first_run):
    server_before, proxy_before = supervisorctl("pid", "server"), supervisorctl("pid", "proxy")
    result, log = deploy("--data", 'server_extra_args=["--prefill-step-size", "512"]', *NO_VERIFY,
                         *SMALL_BENCH)
    assert result.returncode == 0, log[-6000:]
    assert supervisorctl("pid", "server") != server_before
    assert supervisorctl("pid", "proxy") == proxy_before
    proxy_changes = [name for name, row in results_table(log).items()
                     if name.startswith("Start the proxy |") and row[0]]
    assert proxy_changes == []
    # back to the defaults: the server restarts once more, the proxy stays
    result, log = deploy(*NO_VERIFY, *SMALL_BENCH)
    assert result.returncode == 0, log[-6000:]
    assert supervisorctl("pid", "proxy") == proxy_before


def test_failed_smoke_generate_stops_the_deploy_and_keeps_the_running_server(first_run, tmp_path):
    """A profile whose smoke answer cannot match: the deploy must stop before
    touching the running server (same pid, same stamp), with the model's answer
    in the error."""
    pid_before = supervisorctl("pid", "server")
    stamp = Path.home() / ".local/share/mlx-route/state/server.applied"
    stamp_before = stamp.read_text()
    inventory = tmp_path / "inventory_bad_smoke.py"
    inventory.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / "group_data")!r})
        from all import model_profiles
        profile = dict(model_profiles["smollm2-135m"])
        profile["smoke"] = dict(profile["smoke"], expect="Berlin")
        local = [("@local", {{
            "model_profiles": {{**model_profiles, "smollm2-135m": profile}},
        }})]
    """))
    result, log = deploy(inventory=str(inventory))
    assert result.returncode != 0, log[-3000:]
    assert "lacks 'Berlin'" in log, log[-3000:]
    assert supervisorctl("pid", "server") == pid_before
    assert stamp.read_text() == stamp_before
