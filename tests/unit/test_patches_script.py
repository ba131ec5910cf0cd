"""files/mlx_patches.py decides and applies the series safely.

Every test works on a private copy of the installed mlx_lm (package and
dist-info, first on PYTHONPATH), never on the shared .venv.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import subprocess
import sys
from pathlib import Path

from tests.fixtures.tiny_glm import MLX_PATCHES, SERIES, copy_mlx_lm, run_patches

PATCHES = [
    ln.strip()
    for ln in (SERIES / "series").read_text().splitlines()
    if ln.strip() and not ln.startswith("#")
]


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def set_version(site: Path, version: str) -> None:
    (meta,) = site.glob("mlx_lm-*.dist-info/METADATA")
    text = meta.read_text()
    old = next(ln for ln in text.splitlines() if ln.startswith("Version: "))
    meta.write_text(text.replace(old, f"Version: {version}", 1))


def states(doc) -> dict[str, str]:
    return {p["name"]: p["state"] for p in doc["patches"]}


def test_series_applies_cleanly_to_the_pinned_mlx_lm_and_is_recorded(tmp_path):
    site = copy_mlx_lm(tmp_path / "site")
    record = tmp_path / "state" / "mlx_patches.json"
    stale = site / "mlx_lm" / "models" / "__pycache__" / "deepseek_v32.cpython-311.pyc"
    other = site / "mlx_lm" / "models" / "__pycache__" / "llama.cpython-311.pyc"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"stale")
    other.write_bytes(b"untouched")
    before = snapshot(site)

    proc, doc = run_patches(site, record, "--check")
    assert proc.returncode == 0, proc.stderr
    assert doc["changed"] is True and doc["mlx_lm_version"] == "0.32.2"
    assert states(doc) == {name: "would-apply" for name in PATCHES}
    assert snapshot(site) == before, "--check must not change anything"
    assert not record.exists()

    proc, doc = run_patches(site, record, "--apply")
    assert proc.returncode == 0, proc.stderr
    assert doc["changed"] is True
    assert states(doc) == {name: "newly-applied" for name in PATCHES}
    for name in PATCHES:
        assert name in proc.stderr  # the run log names what was applied
    v32 = (site / "mlx_lm" / "models" / "deepseek_v32.py").read_text()
    assert "shares_topk" in v32 and "CacheList(KVCache())" in v32
    server = (site / "mlx_lm" / "server.py").read_text()
    assert "--serve-any-model" in server
    assert "def _watch_client" in server and "mlx_lm-0003" in server
    assert "def _recover" in server and "mlx_lm-0004" in server
    assert not stale.exists(), "stale bytecode of a patched module must go"
    assert other.read_bytes() == b"untouched"

    rec = json.loads(record.read_text())
    assert rec["mlx_lm_version"] == "0.32.2"
    assert rec["applied_at"]
    assert [(p["name"], p["sha256"]) for p in rec["patches"]] == [
        (name, hashlib.sha256((SERIES / name).read_bytes()).hexdigest()) for name in PATCHES
    ]


def test_reapplying_the_series_changes_nothing(tmp_path):
    site = copy_mlx_lm(tmp_path / "site")
    record = tmp_path / "mlx_patches.json"
    assert run_patches(site, record, "--apply")[0].returncode == 0
    after_first = snapshot(site)
    record_first = record.read_bytes()

    proc, doc = run_patches(site, record, "--check")
    assert proc.returncode == 0 and doc["changed"] is False and doc["record_current"] is True
    assert states(doc) == {name: "applied" for name in PATCHES}

    proc, doc = run_patches(site, record, "--apply")
    assert proc.returncode == 0, proc.stderr
    assert doc["changed"] is False
    assert snapshot(site) == after_first
    assert record.read_bytes() == record_first, "an unchanged record is not rewritten"


def test_series_for_another_mlx_lm_is_refused_and_leaves_the_tree_byte_identical(tmp_path):
    """A newer mlx-lm whose GLM code moved: stand-in made by editing the copy
    (one context line of the first patch, and the version)."""
    site = copy_mlx_lm(tmp_path / "site")
    set_version(site, "0.33.0")
    v32 = site / "mlx_lm" / "models" / "deepseek_v32.py"
    v32.write_text(v32.read_text().replace("        self.indexer = Indexer(config)\n", "        self.indexer = Indexer(config, 0)\n"))
    record = tmp_path / "mlx_patches.json"
    before = snapshot(site)

    for mode in ("--check", "--apply"):
        proc, doc = run_patches(site, record, mode)
        assert proc.returncode == 2, (mode, proc.stdout)
        assert "mlx_lm-0001-glm-indexshare.patch" in proc.stderr
        assert "hunk #" in proc.stderr and "mlx_lm/models/deepseek_v32.py" in proc.stderr
        assert (
            "mlx-lm 0.33.0 is not the version this series targets (0.32.2): "
            "update the patches or pin mlx-lm back" in proc.stderr
        )
        assert snapshot(site) == before, "the server patch applies, but all-or-nothing"
        assert not record.exists()


def test_a_failed_write_restores_every_file(tmp_path):
    """A series whose second patch yields a file that does not compile: the
    first patch's file, already written, is put back too."""
    site = copy_mlx_lm(tmp_path / "site")
    series = tmp_path / "series-dir"
    series.mkdir()
    (series / "good.patch").write_text((SERIES / "mlx_lm-0002-serve-any-model.patch").read_text())
    src = (site / "mlx_lm" / "models" / "llama.py").read_text()
    broken = src.replace("class ModelArgs", "class ModelArgs(:", 1)
    diff = difflib.unified_diff(
        src.splitlines(True), broken.splitlines(True), "a/mlx_lm/models/llama.py", "b/mlx_lm/models/llama.py"
    )
    (series / "broken.patch").write_text("Target-Version: mlx-lm 0.32.2\n\n" + "".join(diff))
    (series / "series").write_text("good.patch\nbroken.patch\n")
    record = tmp_path / "mlx_patches.json"
    before = snapshot(site)

    proc, _ = run_patches(site, record, "--apply", series=series)
    assert proc.returncode == 2
    assert "every file was restored" in proc.stderr
    assert snapshot(site) == before
    assert not record.exists()


def test_a_fix_that_upstream_already_ships_is_skipped_and_reported_droppable(tmp_path):
    """Upstream released the same change: stand-in made by applying the series
    to a copy and raising its version, with no record of ours."""
    site = copy_mlx_lm(tmp_path / "site")
    assert run_patches(site, tmp_path / "scratch.json", "--apply")[0].returncode == 0
    set_version(site, "0.40.0")
    record = tmp_path / "mlx_patches.json"
    before = snapshot(site)

    proc, doc = run_patches(site, record, "--apply")
    assert proc.returncode == 0, proc.stderr
    assert doc["changed"] is False
    assert states(doc) == {name: "upstream" for name in PATCHES}
    assert doc["droppable"] == PATCHES
    assert "drop the patch" in doc["patches"][0]["detail"]
    assert snapshot(site) == before
    rec = json.loads(record.read_text())
    assert rec["mlx_lm_version"] == "0.40.0"
    assert {p["state"] for p in rec["patches"]} == {"upstream"}


def test_a_python_without_mlx_lm_is_refused_with_what_to_do(tmp_path):
    # -S hides site-packages: the state of a venv whose packages are not installed yet.
    proc = subprocess.run(
        [sys.executable, "-S", str(MLX_PATCHES), "--series", str(SERIES), "--record", str(tmp_path / "r.json"), "--check"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "mlx_lm is not installed" in proc.stderr and "create the venv first" in proc.stderr


def test_a_series_file_naming_a_missing_patch_is_refused(tmp_path):
    site = copy_mlx_lm(tmp_path / "site")
    series = tmp_path / "s"
    series.mkdir()
    (series / "series").write_text("mlx_lm-0009-gone.patch\n")
    proc, _ = run_patches(site, tmp_path / "r.json", "--apply", series=series)
    assert proc.returncode == 2 and "mlx_lm-0009-gone.patch" in proc.stderr
