"""The mlx-lm source patches (patches/, README there), applied to the venv.

files/mlx_patches.py does the work on the host and refuses, changing nothing,
when the series does not fit the installed mlx-lm. Here the plan is decided:
the apply step is planned only when something would change, so a second
deploy reports no change.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shlex

from pyinfra import host, logger
from pyinfra.api import FactBase, deploy
from pyinfra.operations import files, server

from tasks import as_user
from tasks.common import RouteError, paths, repo_file
from tasks.release import release_state, wanted_release


class MlxPatchState(FactBase):
    """The `--check` report of mlx_patches.py on the host (a dict, with
    "exit"), or None while the venv's python or the uploaded script and series
    do not exist yet (a first run: the venv is created later in the same run).
    """

    def command(self, python: str, script: str, series: str, record: str) -> str:
        q = shlex.quote
        return (
            f"if [ -x {q(python)} ] && [ -f {q(script)} ] && [ -f {q(series + '/series')} ]; then "
            f"{q(python)} {q(script)} --series {q(series)} --record {q(record)} --check "
            f"2>/dev/null; echo \"exit=$?\"; else echo absent; fi"
        )

    def process(self, output):
        lines = list(output)
        if not lines or lines[-1].strip() == "absent" or not lines[-1].startswith("exit="):
            return None
        try:
            report = json.loads("\n".join(lines[:-1]))
        except ValueError:
            return None  # e.g. an interpreter that cannot run the script: re-apply reports why
        report["exit"] = int(lines[-1].split("=", 1)[1])
        return report


def local_series() -> list[tuple[str, str]]:
    """(name, sha256) of each patch of the repository's series, in order."""
    series = repo_file("patches/series")
    names = [ln.split("#", 1)[0].strip() for ln in series.read_text().splitlines()]
    return [
        (name, hashlib.sha256(repo_file(f"patches/{name}").read_bytes()).hexdigest())
        for name in names
        if name
    ]


def _why_apply(script: str, series: str, record: str, wanted: list[tuple[str, str]]) -> str | None:
    release = wanted_release()
    if release_state(release).get("wanted") != "complete":
        return f"release {release.id} is built in this run"
    report = host.get_fact(MlxPatchState, python=release.python, script=script, series=series,
                           record=record)
    if report is None:
        return "first run"
    script_sha = hashlib.sha256(repo_file("files/mlx_patches.py").read_bytes()).hexdigest()
    on_host = [(r["name"], r["sha256"]) for r in report.get("patches", [])]
    if report.get("script_sha256") != script_sha or on_host != wanted:
        return "the series changed"  # the host's copy is replaced before the apply runs
    if report["exit"] != 0:
        raise RouteError(
            f"{host.name}: the mlx-lm patches do not fit this venv, nothing was changed:\n"
            f"{report.get('error', 'mlx_patches.py --check failed')}"
        )
    for name in report.get("droppable", []):
        logger.warning(
            f"{host.name}: mlx-lm {report['mlx_lm_version']} already contains {name}: "
            "drop it from patches/series (patches/README.md)"
        )
    if report["changed"]:
        pending = [r["name"] for r in report["patches"] if r["state"] == "would-apply"]
        return f"pending: {', '.join(pending)} on mlx-lm {report['mlx_lm_version']}"
    if not report["record_current"]:
        return "the record is out of date"
    return None


@deploy("Apply the mlx-lm source patches")
def apply_patches():
    if not host.data.patches_enabled:
        logger.info(f"{host.name}: patches_enabled is False: mlx-lm is used as installed")
        return
    p = paths()
    script = p.script("mlx_patches.py")
    series = posixpath.join(p.route_home, "patches")
    release = wanted_release()
    # the record lives in the release it describes (and goes with it)
    record = posixpath.join(release.dir, "mlx_patches.json")
    wanted = local_series()

    files.directory(name="Create the scripts directory", path=p.bin_dir, present=True)
    files.directory(name="Create the state directory", path=p.state_dir, present=True)
    as_user.put(name="Upload mlx_patches.py", src=str(repo_file("files/mlx_patches.py")), dest=script, mode="755")
    as_user.sync(name="Upload the patch series", src=repo_file("patches"), dest=series)

    reason = _why_apply(script, series, record, wanted)
    if reason is None:
        return
    q = shlex.quote
    server.shell(
        # The name is the run log's line: which patches, and why now.
        name=f"Apply mlx-lm patches {', '.join(name for name, _ in wanted)} ({reason})",
        commands=[f"{q(release.python)} {q(script)} --series {q(series)} --record {q(record)} --apply"],
    )
