"""The testinfra host suite (tests/host), run from the workstation against the
route's manifest (tasks/manifest.py)."""

from __future__ import annotations

import subprocess
import sys

from pyinfra import host, logger
from pyinfra.api import deploy
from pyinfra.operations import python

from tasks.common import REPO, RouteError
from tasks.manifest import manifest_path
from tasks.reach import Reach, testinfra_target


def run_host_suite(target: Reach, manifest_file: str, report: str, gates: bool = True) -> None:
    suite = REPO / "tests" / "host"
    command = [
        sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider",
        *target.cli_args(), f"--route-manifest={manifest_file}", f"--junitxml={report}",
        "-o", "addopts=", "-W", "ignore::DeprecationWarning",
        *([] if gates else [f"--ignore={suite / 'test_gates.py'}"]),  # verify_gates
    ]
    logger.info(f"Running the host suite: {' '.join(command)}")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    for line in lines[-25:]:
        logger.info(f"    {line}")
    if result.returncode != 0:
        raise RouteError(
            f"{host.name}: the route is NOT healthy: the host suite failed "
            f"({lines[-1] if lines else result.stderr[-500:]}); report: {report}"
        )


@deploy("Verify the route with the host suite")
def verify_route():
    if not host.data.verify_enabled:
        return
    target = testinfra_target()
    if target is None:
        logger.warning(f"{host.name}: host suite not run: testinfra cannot reach this connector")
        return
    reports = REPO / "reports"
    reports.mkdir(exist_ok=True)
    safe = "".join(c if c.isalnum() else "_" for c in host.name)
    python.call(
        name=f"Run tests/host against {target.hosts}",
        function=run_host_suite,
        target=target,
        manifest_file=manifest_path(),
        report=str(reports / f"host-suite-{safe}.xml"),
        gates=bool(host.data.verify_gates),
    )
