"""files/check_weights.py: what "a complete copy" means, and the disk check.

Fast: model directories are written here (real safetensors files, a few MB),
no download runs. The checker runs as the host runs it, a python3 subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.model import WeightsCheck
from tests.fixtures.hubstub import make_sharded_model

REPO = Path(__file__).resolve().parents[2]
CHECKER = REPO / "files" / "check_weights.py"
SHARDS = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]

pytestmark = pytest.mark.timeout(60)


def run(*args: str, python: str = sys.executable) -> tuple[int, dict | None, str]:
    proc = subprocess.run([python, str(CHECKER), *args], capture_output=True, text=True, timeout=30)
    try:
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
    except ValueError:
        out = None
    return proc.returncode, out, proc.stderr


@pytest.fixture
def model(tmp_path) -> Path:
    return make_sharded_model(tmp_path / "model", [0.25, 0.25, 0.5, 0.25])


def check(model: Path, shards: int = 4, *extra: str) -> tuple[int, dict]:
    code, report, _ = run("check", "--dir", str(model), "--shards", str(shards), *extra)
    return code, report


def test_check_accepts_a_complete_copy(model):
    code, report = check(model)
    assert code == 0
    assert report["complete"] and report["up_to_date"]
    assert report["shards_found"] == report["shards_in_index"] == 4
    assert report["missing"] == report["wrong_size"] == report["incomplete"] == []


def test_check_names_a_missing_shard(model):
    (model / SHARDS[2]).unlink()
    code, report = check(model)
    assert code == 1 and not report["complete"]
    assert report["missing"] == [SHARDS[2]]
    assert report["shards_found"] == 3


def test_check_names_a_truncated_shard_with_its_sizes(model):
    shard = model / SHARDS[1]
    full = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(full - 4096)
    code, report = check(model)
    assert code == 1
    assert report["wrong_size"] == [{"file": SHARDS[1], "size": full - 4096, "expected": full}]


def test_check_names_a_shard_cut_inside_its_header(model):
    with open(model / SHARDS[0], "r+b") as f:
        f.truncate(20)
    _, report = check(model)
    assert [w["file"] for w in report["wrong_size"]] == [SHARDS[0]]
    assert "header" in report["wrong_size"][0]["why"]


def test_check_uses_the_size_the_hub_listed_when_hf_recorded_one(model):
    """A shard whose own header is consistent but whose size differs from the
    tree listing hf cached for the downloaded commit is reported."""
    commit = "a" * 40
    hf = model / ".cache" / "huggingface"
    (hf / "download").mkdir(parents=True)
    (hf / "download" / "model.safetensors.index.json.metadata").write_text(f"{commit}\netag\n1.0\n")
    listed = {n: {"size": (model / n).stat().st_size, "blob_id": "x"} for n in SHARDS}
    listed[SHARDS[3]]["size"] += 8
    (hf / "trees").mkdir()
    (hf / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listed}))
    _, report = check(model)
    assert report["commit"] == commit
    assert [w["file"] for w in report["wrong_size"]] == [SHARDS[3]]
    assert report["wrong_size"][0]["expected"] == listed[SHARDS[3]]["size"]


def test_check_fails_when_the_profile_expects_another_shard_count(model):
    code, report = check(model, 5)
    assert code == 1 and not report["complete"]
    assert any("names 4 shards, the profile expects 5" in e for e in report["errors"])


def test_check_reports_safetensors_files_the_index_does_not_name(model):
    # mlx-lm loads every *.safetensors in the folder: a stray one breaks the load.
    (model / "consolidated.safetensors").write_bytes((model / SHARDS[0]).read_bytes())
    code, report = check(model)
    assert code == 1
    assert report["extra"] == ["consolidated.safetensors"]


def test_check_without_an_index_reports_the_index_missing(tmp_path):
    empty = tmp_path / "nothing-yet"
    code, report = check(empty)
    assert code == 1
    assert report["missing"] == ["model.safetensors.index.json"]


def test_clean_removes_only_incomplete_leftovers(model):
    download = model / ".cache" / "huggingface" / "download"
    (download / "sub").mkdir(parents=True)
    leftovers = [download / "Xy.abc.1234.incomplete", download / "sub" / "Zz.def.5678.incomplete"]
    for path in leftovers:
        path.write_bytes(b"\0" * 1000)
    kept = download / (SHARDS[0] + ".metadata")
    kept.write_text("c\ne\n1\n")

    code, report = check(model)
    assert code == 1 and len(report["incomplete"]) == 2

    code, cleaned, _ = run("clean", "--dir", str(model))
    assert code == 0
    assert cleaned["freed_bytes"] == 2000 and len(cleaned["removed"]) == 2
    assert not any(p.exists() for p in leftovers) and kept.exists()
    assert check(model)[0] == 0


def test_record_then_check_detects_a_changed_pinned_revision(model):
    code, _, err = run("record", "--dir", str(model), "--shards", "4",
                       "--repo", "org/m", "--revision", "v1")
    assert code == 0, err
    assert json.loads((model / ".mlx-route.json").read_text())["revision"] == "v1"
    assert check(model, 4, "--repo", "org/m", "--revision", "v1")[0] == 0

    code, report = check(model, 4, "--repo", "org/m", "--revision", "v2")
    assert code == 1
    assert report["complete"] and not report["up_to_date"]
    assert report["record_mismatch"] == {"revision": {"recorded": "v1", "wanted": "v2"}}


def test_record_refuses_an_incomplete_copy_and_names_what_is_missing(model):
    (model / SHARDS[3]).unlink()
    code, report, err = run("record", "--dir", str(model), "--shards", "4",
                            "--expect", "package=p==1", "--host", "studio")
    assert code == 1
    assert err.startswith(f"studio: the model in {model} is not complete: missing {SHARDS[3]}")
    assert report is None
    assert not (model / ".mlx-route.json").exists()


def test_disk_check_error_names_host_path_need_and_free(tmp_path):
    target = tmp_path / "models" / "glm"
    code, report, err = run("disk", "--dir", str(target), "--need-gib", "1e9",
                            "--margin-gib", "10", "--host", "studio.local")
    assert code == 2 and report is None
    match = re.fullmatch(
        rf"studio\.local: not enough free disk for {re.escape(str(target))}: need 1000000000\.0 GiB "
        r"\(\+10 margin\), ([0-9.]+) GiB free; free space or set model_root to a bigger disk\n",
        err,
    )
    assert match, err
    st = os.statvfs(tmp_path)
    assert abs(float(match.group(1)) - st.f_bavail * st.f_frsize / 2**30) < 1.0


def test_disk_check_passes_when_there_is_room(tmp_path):
    code, report, err = run("disk", "--dir", str(tmp_path / "m"), "--need-gib", "0.001",
                            "--margin-gib", "0", "--host", "h")
    assert code == 0, err
    assert report["to_fetch_bytes"] == int(0.001 * 2**30)


def test_disk_check_counts_shards_already_downloaded(tmp_path):
    """Resuming a 368 GB download must not ask for 368 GB again: a sparse
    'shard' bigger than the free disk takes no room but counts as there."""
    model = tmp_path / "m"
    model.mkdir()
    size = 8 * 10**12
    with open(model / "model-00001-of-00002.safetensors", "wb") as f:
        f.truncate(size)
    need_gib = size / 2**30 + 0.001
    code, report, err = run("disk", "--dir", str(model), "--need-gib", str(need_gib),
                            "--margin-gib", "0", "--host", "h")
    assert report["free_bytes"] < size  # else this test proves nothing
    assert code == 0, err
    assert abs(report["to_fetch_bytes"] - 0.001 * 2**30) < 2

    # A conversion writes a whole new copy beside the old one: nothing counts.
    code, _, err = run("disk", "--dir", str(model), "--need-gib", str(need_gib),
                       "--margin-gib", "0", "--host", "h", "--whole")
    assert code == 2 and "not enough free disk" in err


def test_checker_runs_with_the_system_python3(model):
    """The host may not have the venv yet: any python3 must do."""
    code, report, err = run("check", "--dir", str(model), "--shards", "4", python="python3")
    assert code == 0, err
    assert report["complete"]


def test_plan_time_fact_runs_the_checker_inline_and_tolerates_no_venv(model, tmp_path):
    fact = WeightsCheck()
    command = fact.command(python=str(tmp_path / "no-venv" / "bin" / "python"),
                           model_dir=str(model), shards=4, expect=("repo=org/m", "revision=v1"))
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    report = fact.process(out.stdout.splitlines())
    assert report["complete"] and not report["up_to_date"]
    assert report["record_mismatch"]["revision"] == {"recorded": None, "wanted": "v1"}


def test_plan_time_fact_without_any_python_plans_the_fetch(model):
    fact = WeightsCheck()
    command = fact.command(python="/nonexistent/python", model_dir=str(model), shards=4, expect=())
    env = {"PATH": "/nonexistent"}  # no python3 either: a fresh Mac without developer tools
    out = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, env=env,
                         timeout=30)
    assert out.returncode == 0
    assert fact.process(out.stdout.splitlines()) is None
