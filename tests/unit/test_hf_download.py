"""The real `hf download` CLI (huggingface_hub 2.4.0) against the Hub stand-in.

The stand-in (tests/fixtures/hubstub.py) exists because no hub is reachable
here and the real one cannot break a transfer on demand; `hf` itself is the
real CLI from the venv, run as a subprocess with HF_ENDPOINT pointing at
loopback and HF_HOME in the test's tmp dir. These tests pin down the hf
behaviour the weights step relies on, and the checker's verdict on what hf
leaves behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.hubstub import hf_env, kill_hf_mid_file

REPO = Path(__file__).resolve().parents[2]
HF = str(Path(sys.executable).parent / "hf")
CHECKER = REPO / "files" / "check_weights.py"
MiB = 1024 * 1024
BIG = "model-00003-of-00004.safetensors"  # the 12 MiB shard of the `sharded_model` fixture
OTHERS = ["config.json", "model.safetensors.index.json",
          "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
          "model-00004-of-00004.safetensors"]

pytestmark = pytest.mark.timeout(120)


def hf_download(stub, dest: Path, hf_home: Path, revision: str = "main", repo: str | None = None,
                **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HF, "download", repo or stub.repo, "--revision", revision, "--local-dir", str(dest)],
        env=hf_env(stub, hf_home, **env), capture_output=True, text=True, timeout=90,
    )


def check(dest: Path, shards: int = 4) -> dict:
    proc = subprocess.run([sys.executable, str(CHECKER), "check", "--dir", str(dest),
                           "--shards", str(shards)], capture_output=True, text=True, timeout=30)
    return json.loads(proc.stdout)


def stats(dest: Path, names) -> dict:
    return {n: ((s := (dest / n).stat()).st_ino, s.st_mtime_ns) for n in names}


def leftovers(dest: Path) -> list[Path]:
    return sorted((dest / ".cache" / "huggingface" / "download").glob("*.incomplete"))


def test_hf_download_fetches_a_copy_the_checker_accepts(sharded_model, hub_stub, tmp_path):
    stub = hub_stub(sharded_model)
    dest = tmp_path / "dest"
    proc = hf_download(stub, dest, tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    report = check(dest)
    assert report["complete"], report
    assert report["commit"] == stub.sha
    for name in OTHERS + [BIG]:
        assert (dest / name).read_bytes() == (sharded_model / name).read_bytes()


def test_rerun_of_a_complete_copy_downloads_no_file(sharded_model, hub_stub, tmp_path):
    stub = hub_stub(sharded_model)
    dest = tmp_path / "dest"
    assert hf_download(stub, dest, tmp_path / "hf").returncode == 0
    before = stats(dest, OTHERS + [BIG])
    stub.requests.clear()

    proc = hf_download(stub, dest, tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    assert stub.downloads() == []
    assert stats(dest, OTHERS + [BIG]) == before


def test_rerun_pinned_to_a_commit_asks_the_hub_for_nothing(sharded_model, hub_stub, tmp_path):
    stub = hub_stub(sharded_model)
    dest = tmp_path / "dest"
    assert hf_download(stub, dest, tmp_path / "hf", revision=stub.sha).returncode == 0
    stub.requests.clear()
    assert hf_download(stub, dest, tmp_path / "hf", revision=stub.sha).returncode == 0
    # hf's once-a-day agent registry probe is the only request left.
    assert [path for _, path, _ in stub.requests if path != "/api/agent-harnesses"] == []


def test_download_killed_mid_shard_keeps_finished_shards_and_next_run_fetches_the_rest(
    sharded_model, hub_stub, tmp_path
):
    stub = hub_stub(sharded_model)
    dest, hf_home = tmp_path / "dest", tmp_path / "hf"
    kill_hf_mid_file(HF, stub, dest, hf_home, BIG, after_bytes=11 * MiB, finished=OTHERS)

    assert not (dest / BIG).exists()
    killed_leftover = leftovers(dest)
    assert len(killed_leftover) == 1 and killed_leftover[0].stat().st_size == 10 * MiB
    report = check(dest)
    assert not report["complete"]
    assert report["missing"] == [BIG] and len(report["incomplete"]) == 1
    finished = stats(dest, OTHERS)
    stub.requests.clear()

    proc2 = hf_download(stub, dest, hf_home)
    assert proc2.returncode == 0, proc2.stderr
    assert stub.downloads() == [BIG]  # only the unfinished shard is fetched again...
    assert stats(dest, OTHERS) == finished  # ...the finished ones are not touched
    assert (dest / BIG).read_bytes() == (sharded_model / BIG).read_bytes()
    # ...from byte zero: hf neither reuses nor removes the killed run's leftover,
    # which is why the deploy runs `check_weights.py clean` before hf download.
    assert leftovers(dest) == killed_leftover
    assert check(dest)["incomplete"] == [str(killed_leftover[0].relative_to(dest))]

    cleaned = subprocess.run([sys.executable, str(CHECKER), "clean", "--dir", str(dest)],
                             capture_output=True, text=True, timeout=30)
    assert json.loads(cleaned.stdout)["freed_bytes"] == 10 * MiB
    assert leftovers(dest) == []
    assert check(dest)["complete"]


def test_connection_cut_mid_shard_is_resumed_with_a_range_request_in_the_same_run(
    sharded_model, hub_stub, tmp_path
):
    stub = hub_stub(sharded_model)
    stub.cut(BIG, after_bytes=int(10.5 * MiB))
    dest = tmp_path / "dest"
    proc = hf_download(stub, dest, tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    ranges = [rng for method, path, rng in stub.requests if method == "GET" and path.endswith(BIG)]
    assert ranges == [None, f"bytes={10 * MiB}-"]
    assert (dest / BIG).read_bytes() == (sharded_model / BIG).read_bytes()
    report = check(dest)
    assert report["complete"] and report["incomplete"] == []


@pytest.mark.parametrize(
    "repo, revision, message",
    [
        ("nobody/nothing", "main", "Model 'nobody/nothing' not found"),
        (None, "v9.9", "Revision not found"),
    ],
    ids=["unknown-repo", "unknown-revision"],
)
def test_unknown_repo_or_revision_fails_with_a_clear_error(
    sharded_model, hub_stub, tmp_path, repo, revision, message
):
    stub = hub_stub(sharded_model)
    dest = tmp_path / "dest"
    proc = hf_download(stub, dest, tmp_path / "hf", revision=revision, repo=repo)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert check(dest)["missing"] == ["model.safetensors.index.json"]
