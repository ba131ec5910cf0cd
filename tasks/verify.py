"""The route's manifest on the host, and the testinfra host suite run against it."""

from __future__ import annotations

import json
import posixpath
import subprocess
import sys
from io import StringIO

from pyinfra import host, logger
from pyinfra.api import deploy
from pyinfra.operations import files, python

from tasks import as_user
from tasks.backends import select_backend
from tasks.common import REPO, RouteError, paths, profile
from tasks.host import filevault
from tasks.probes import bench_sizes
from tasks.reach import Reach, testinfra_target
from tasks.services import public_name, proxy_key_file, route_services

MANIFEST = "route.json"


def manifest() -> dict:
    """What the host suite needs to know about the route, as deployed."""
    p = paths()
    prof = profile()
    backend = select_backend()
    return {
        "profile": host.data.model_profile,
        "model_dir": p.model_dir,
        "shards": prof["shards"],
        "public_name": public_name(prof),
        "smoke": prof["smoke"],
        "gates": prof.get("gates", {}),
        "bench": bench_sizes(prof),
        "server": {"host": host.data.server_host, "port": host.data.server_port},
        "proxy": {
            "host": host.data.proxy_host,
            "port": host.data.proxy_port,
            "key_file": proxy_key_file(p),
        },
        "backend": backend.name,
        "backend_ctl": getattr(backend, "ctl", None),
        # who owns the route, and what its services run: how the host suite checks
        # them when it connects as another user (ownership, processes)
        "user": p.user,
        "supervisord_pidfile": getattr(backend, "pidfile", None),
        "service_definitions": {name: backend.definition_path(svc)
                                for name, svc in route_services().items()},
        "launchd_domain": getattr(backend, "domain", None),
        "services": {name: svc.label for name, svc in route_services().items()},
        "venv": p.venv,
        "route_home": p.route_home,
        # macOS: `fdesetup status` at deploy time ({"on", "status"}); None elsewhere
        "filevault": filevault(),
    }


def manifest_path() -> str:
    return posixpath.join(paths().route_home, MANIFEST)


@deploy("Write the route manifest")
def write_manifest():
    as_user.put(
        name="Write route.json (what the host suite checks)",
        src=StringIO(json.dumps(manifest(), indent=2, sort_keys=True) + "\n"),
        dest=manifest_path(),
    )


def run_host_suite(target: Reach, manifest_file: str, report: str) -> None:
    command = [
        sys.executable, "-m", "pytest", str(REPO / "tests" / "host"), "-q", "-p", "no:cacheprovider",
        *target.cli_args(), f"--route-manifest={manifest_file}", f"--junitxml={report}",
        "-o", "addopts=", "-W", "ignore::DeprecationWarning",
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
    )
