"""Speed and memory probes of the route, kept as a report per host and run.

Optional (bench_enabled): files/probes.py runs on the host through the proxy,
tools/route_report.py writes reports/<host>/<UTC time>/report.{md,json} and
PNG plots on the workstation. By hand, the same thing:

    python tools/route_report.py --hosts local://
    python tools/route_report.py --hosts ssh://me@studio
"""

from __future__ import annotations

import subprocess
import sys

from pyinfra import host, logger
from pyinfra.api import deploy
from pyinfra.operations import python

from tasks.common import REPO, RouteError
from tasks.manifest import manifest_path
from tasks.reach import Reach, testinfra_target


def run_report(target: Reach, manifest_file: str, host_name: str) -> None:
    command = [sys.executable, str(REPO / "tools" / "route_report.py"), *target.cli_args(),
               "--route-manifest", manifest_file, "--host-name", host_name,
               "--out", str(REPO / "reports")]
    logger.info(f"Probing the route: {' '.join(command)}")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=7200)
    if result.returncode == 1:
        raise RouteError(f"{host.name}: the probes failed: {result.stderr.strip()[-800:]}")
    logger.info(f"    report: {result.stdout.strip()}")
    if result.returncode == 2:
        # a measured limit (cache ratio) was missed: the route works but is slow
        logger.warning(f"{host.name}: {result.stderr.strip()}")


@deploy("Probe the route's speed")
def probe_route():
    if not host.data.get("bench_enabled"):
        return
    target = testinfra_target()
    if target is None:
        logger.warning(f"{host.name}: probes not run: testinfra cannot reach this connector")
        return
    python.call(
        name=f"Probe {target.hosts} and write reports/{host.name}/",
        function=run_report,
        target=target,
        manifest_file=manifest_path(),
        host_name=host.name,
    )
