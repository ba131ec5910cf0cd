"""tasks/patches.py: the real pyinfra CLI runs apply_patches() against this
machine (@local), on a throwaway venv: `python -m venv --without-pip` plus a
copy of the installed mlx_lm and its dist-info (all mlx_patches.py needs),
never the shared .venv. The venv is made by an operation of the same run, as
create_venv() does on a first deploy: at plan time no venv exists.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_patches_script import PATCHES, set_version, snapshot

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent
PYINFRA = str(VENV / "bin" / "pyinfra")
APPLY_OP = (
    "Apply mlx-lm patches mlx_lm-0001-glm-indexshare.patch, mlx_lm-0002-serve-any-model.patch, "
    "mlx_lm-0003-stop-cancelled-promptly.patch, mlx_lm-0004-keep-generation-loop-alive.patch, "
    "mlx_lm-0005-distributed-rank-exits.patch"
)

pytestmark = pytest.mark.timeout(300)

DEPLOY = """
import shlex
from pyinfra import host
from pyinfra.operations import server
from tasks.patches import apply_patches
from tasks.release import MARKER, wanted_release

# Stands in for build_release() (which would pip-install from PyPI): the
# release's venv holding a copy of the installed mlx_lm, marked complete.
release = wanted_release()
server.shell(
    name="Make the test venv",
    commands=[
        f"test -x {{release.python}} || ({python} -m venv --without-pip {{release.dir}} && "
        f"{python} -c 'from tests.fixtures.tiny_glm import copy_mlx_lm; import pathlib, sysconfig; "
        f"copy_mlx_lm(pathlib.Path(sysconfig.get_path(\\"purelib\\", vars={{{{\\"base\\": \\"{{release.dir}}\\"}}}})))' && "
        f"touch {{release.dir}}/{{MARKER}})",
        f"ln -sfn releases/{{release.id}} {root}/next",
    ],
)
apply_patches()
"""


def run(tmp_path: Path):
    root = tmp_path / "venvs"
    deploy = tmp_path / "deploy_patches.py"
    deploy.write_text(DEPLOY.format(root=root, python=sys.executable))
    proc = subprocess.run(
        [PYINFRA, "-y", "--json", "@local", str(deploy),
         "--data", f"route_home={tmp_path / 'route'}", "--data", f"venv_path={root}",
         "--data", f"venv_python={sys.executable}"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)},
    )
    changed = []
    if proc.returncode == 0:
        for op in json.loads(proc.stdout)["results"]["operations"]:
            if op["success"]:
                changed.append(op["name"].split(" | ", 1)[-1])
    return proc, changed


def release_of(tmp_path: Path) -> Path:
    return (tmp_path / "venvs" / "next").resolve()


def site_of(tmp_path: Path) -> Path:
    (site,) = (release_of(tmp_path) / "lib").glob("python3*/site-packages")
    return site


def test_first_deploy_applies_the_series_and_the_second_changes_nothing(tmp_path):
    proc, changed = run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert any(name.startswith(APPLY_OP) for name in changed), changed
    assert APPLY_OP in proc.stderr  # the run log names the patches
    v32 = site_of(tmp_path) / "mlx_lm" / "models" / "deepseek_v32.py"
    assert "shares_topk" in v32.read_text()
    record = json.loads((release_of(tmp_path) / "mlx_patches.json").read_text())
    assert record["mlx_lm_version"] == "0.32.2"
    assert [(p["name"], p["state"]) for p in record["patches"]] == [(n, "applied") for n in PATCHES]

    proc, changed = run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    # server.shell always reports a change; the stand-in is not under test.
    assert [name for name in changed if name != "Make the test venv"] == [], changed


def test_deploy_stops_on_a_series_that_does_not_fit_and_leaves_the_venv_as_it_was(tmp_path):
    assert run(tmp_path)[0].returncode == 0
    # "pip installed another mlx-lm": a pristine copy whose GLM code moved.
    site = site_of(tmp_path)
    from tests.fixtures.tiny_glm import copy_mlx_lm
    import shutil

    for old in [site / "mlx_lm", *site.glob("mlx_lm-*.dist-info")]:
        shutil.rmtree(old)
    copy_mlx_lm(site)
    set_version(site, "0.33.0")
    v32 = site / "mlx_lm" / "models" / "deepseek_v32.py"
    v32.write_text(v32.read_text().replace("        self.indexer = Indexer(config)\n", "        self.indexer = Indexer(config, 0)\n"))
    before = snapshot(site)

    proc, _ = run(tmp_path)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "mlx_lm-0001-glm-indexshare.patch: hunk #" in out
    assert "mlx-lm 0.33.0 is not the version this series targets (0.32.2)" in out
    assert snapshot(site) == before
