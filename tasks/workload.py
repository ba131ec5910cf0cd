"""The field report's agent workloads, provisioned on the hosts that run them.

Hosts with `workload_enabled` (inventory.py's `workload` role: the route's
own host, or a workstation that reaches it) get

- a Terminal-Bench venv (`workload_tb_venv`, from requirements/terminal-bench.txt:
  terminal-bench 0.2.18 and everything under it, exact pins) and a Hermes venv
  (`workload_hermes_venv`, requirements/hermes.txt), both from
  `workload_python` (3.12, as the field report ran them); a venv is rebuilt
  only when its lock or its interpreter changed (a marker inside records both);
- `{route_home}/bin/tb-route` (files/tb_route.py) and `{route_home}/workload.json`,
  its settings: the field report's `tb run` against this route (README,
  "Agent workloads");
- this route's provider in Hermes' config.yaml (files/hermes_provider.py:
  the user's other providers and settings are left byte for byte), which the
  host suite's Hermes gate then uses.

The key is read on the host from the key file, by tb-route at run time and by
hermes_provider.py at deploy time; it never travels through pyinfra.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shlex
from io import StringIO

from pyinfra import host
from pyinfra.api import FactBase, deploy
from pyinfra.operations import files, server

from tasks import as_user
from tasks.common import RouteError, _resolve, paths, profile, repo_file
from tasks.interpreter import Interpreter
from tasks.services import proxy_key_file

# terminal-bench 0.2.18 says Requires-Python >= 3.12; the field report found
# newer Pythons broke its CLI, so 3.12 is what is asked for (README).
WORKLOAD_PYTHON = (3, 12)
MARKER = ".mlx-route-workload"
CONFIG = "workload.json"
TB_SCRIPT = "tb_route.py"
TB_COMMAND = "tb-route"
HERMES_SCRIPT = "hermes_provider.py"


class VenvMarker(FactBase):
    """The marker a finished workload venv holds (its lock's hash and interpreter), or ""."""

    def command(self, venv: str) -> str:
        return f"cat {shlex.quote(posixpath.join(venv, MARKER))} 2>/dev/null || true"

    def process(self, output):
        return "\n".join(output).strip()


class HermesProviderState(FactBase):
    """`unchanged` when Hermes' config already has this route's provider as wanted
    (files/hermes_provider.py --check), else what the merge would do or say."""

    def command(self, python: str, script: str, args: str) -> str:
        return (f"test -x {shlex.quote(python)} && test -f {shlex.quote(script)} && "
                f"{shlex.quote(python)} {shlex.quote(script)} --check {args} 2>&1 || "
                "echo missing")

    def process(self, output):
        return "\n".join(output).strip()


def workload_python() -> str:
    wanted = host.data.workload_python
    found = host.get_fact(Interpreter, python=wanted)
    if found is None:
        raise RouteError(
            f"{host.name}: workload_python {wanted!r} is not on PATH, or does not run, in the "
            "deploy's non-login (SSH) shell; install Python 3.12 (macOS: brew install "
            "python@3.12, then workload_python = \"/opt/homebrew/bin/python3.12\") and set "
            "workload_python to its path")
    path, version = found
    if version != WORKLOAD_PYTHON:
        raise RouteError(
            f"{host.name}: workload_python {wanted!r} is {path}, Python "
            f"{'.'.join(map(str, version))}; terminal-bench 0.2.18 needs 3.12 (the field "
            "report: newer Pythons broke its CLI): point workload_python at a 3.12")
    return path


def workload_paths() -> dict:
    p = paths()
    home = p.home
    return {
        "tb_venv": _resolve(home, host.data.workload_tb_venv),
        "hermes_venv": _resolve(home, host.data.workload_hermes_venv),
        "runs_dir": _resolve(home, host.data.workload_runs_dir),
        "hermes_home": _resolve(home, host.data.workload_hermes_home),
        "config": posixpath.join(p.route_home, CONFIG),
        "tb_route": p.script(TB_COMMAND),
        "tb_script": p.script(TB_SCRIPT),
        "hermes_script": p.script(HERMES_SCRIPT),
    }


def api_base() -> str:
    base = host.data.get("workload_api_base")
    if base:
        if not str(base).startswith(("http://", "https://")) or not str(base).rstrip("/") \
                .endswith("/v1"):
            raise RouteError(f"{host.name}: workload_api_base {base!r} must be the route's "
                             "OpenAI base URL, http(s)://HOST:PORT/v1")
        return str(base).rstrip("/")
    return f"http://127.0.0.1:{host.data.proxy_port}/v1"


def key_file() -> str | None:
    given = host.data.get("workload_key_file")
    if given:
        return _resolve(paths().home, given)
    return proxy_key_file(paths())


def check_settings() -> None:
    """Bad workload data, refused before anything is changed."""
    for name in ("workload_n_concurrent", "workload_n_attempts", "workload_nofile"):
        value = host.data.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RouteError(f"{host.name}: {name} must be a positive integer, got {value!r}")
    mult = host.data.get("workload_timeout_multiplier")
    if not isinstance(mult, (int, float)) or isinstance(mult, bool) or mult <= 0:
        raise RouteError(f"{host.name}: workload_timeout_multiplier must be a positive number "
                         f"(1.0 = stock), got {mult!r}")
    if not host.data.get("workload_dataset") and not host.data.get("workload_dataset_path"):
        raise RouteError(f"{host.name}: set workload_dataset (name==version) or "
                         "workload_dataset_path")
    if not host.data.get("workload_hermes_provider"):
        raise RouteError(f"{host.name}: workload_hermes_provider must name Hermes' provider "
                         "for this route")
    if not isinstance(host.data.get("workload_agent_kwargs"), dict):
        raise RouteError(f"{host.name}: workload_agent_kwargs must be a mapping of the "
                         "agent's settings, e.g. {\"max_episodes\": 50}")
    docker = host.data.get("workload_docker_path")
    if not isinstance(docker, (list, tuple)) or not all(isinstance(d, str) for d in docker):
        raise RouteError(f"{host.name}: workload_docker_path must be a list of folders")
    api_base()


def tb_settings(wp: dict) -> dict:
    """workload.json: what tb-route runs (no key in it: the key file's path)."""
    gates = profile().get("gates") or {}
    check = {"chat_messages": profile()["smoke"]["messages"],
             "max_tokens": int(gates.get("max_tokens", 64))}
    if gates.get("tools"):
        check.update(tools=gates["tools"], tool_call_messages=gates["tool_call_messages"],
                     tool_call_expect=gates["tool_call_expect"])
    home = paths().home
    return {
        "tb": posixpath.join(wp["tb_venv"], "bin", "tb"),
        "api_base": api_base(),
        "key_file": key_file(),
        "model": host.data.workload_model,
        "dataset": host.data.workload_dataset,
        "dataset_path": _resolve(home, host.data.workload_dataset_path)
        if host.data.get("workload_dataset_path") else None,
        "agent": host.data.workload_agent,
        "agent_kwargs": dict(host.data.workload_agent_kwargs or {}),
        "temperature": float(host.data.workload_temperature),
        "n_concurrent": host.data.workload_n_concurrent,
        "n_attempts": host.data.workload_n_attempts,
        "timeout_multiplier": float(host.data.workload_timeout_multiplier),
        "runs_dir": wp["runs_dir"],
        "nofile": host.data.workload_nofile,
        "docker_path": [_resolve(home, d) if d.startswith("~/") else d
                        for d in host.data.workload_docker_path],
        "check": check,
    }


def hermes_model() -> str:
    gates = profile().get("gates") or {}
    return gates.get("hermes_model") or profile()["public_name"]


def manifest_part() -> dict | None:
    """route.json's `workload` (what the host suite and the route report read)."""
    if not host.data.get("workload_enabled"):
        return None
    wp = workload_paths()
    return {
        "config": wp["config"],
        "tb_route": wp["tb_route"],
        "runs_dir": wp["runs_dir"],
        "hermes": posixpath.join(wp["hermes_venv"], "bin", "hermes"),
        "hermes_home": wp["hermes_home"],
        "hermes_provider": host.data.workload_hermes_provider,
        "hermes_model": hermes_model(),
        "api_base": api_base(),
    }


def marker(python: str, lock: str) -> str:
    digest = hashlib.sha256(repo_file(lock).read_bytes()).hexdigest()
    return json.dumps({"interpreter": python, "lock_sha256": digest}, sort_keys=True)


def build_venv(what: str, venv: str, lock: str, python: str) -> None:
    want = marker(python, lock)
    if host.get_fact(VenvMarker, venv=venv) == want:
        return
    q = shlex.quote
    server.shell(
        name=f"Create the {what} venv {venv} with {python}",
        commands=[f"rm -rf {q(venv)}", f"mkdir -p {q(posixpath.dirname(venv))}",
                  f"{q(python)} -m venv {q(venv)}"],
    )
    remote_lock = posixpath.join(venv, "requirements.txt")
    as_user.put(name=f"Upload {lock} into the {what} venv", src=str(repo_file(lock)),
                dest=remote_lock)
    server.shell(
        name=f"Install the {what} lock ({lock})",
        commands=[
            f"{q(posixpath.join(venv, 'bin', 'python'))} -m pip install "
            "--disable-pip-version-check --no-input -q -r " + q(remote_lock),
            # written last: a venv without it is unfinished and is rebuilt
            f"echo {q(want)} > {q(posixpath.join(venv, MARKER))}",
        ],
    )


def tb_wrapper(wp: dict) -> str:
    q = shlex.quote
    return ("#!/bin/sh\n"
            "# Terminal-Bench against this route (written by the deploy: tasks/workload.py).\n"
            f"exec {q(posixpath.join(wp['tb_venv'], 'bin', 'python'))} {q(wp['tb_script'])} "
            f"--config {q(wp['config'])} \"$@\"\n")


def hermes_args(wp: dict) -> str:
    q = shlex.quote
    args = [f"--config {q(posixpath.join(wp['hermes_home'], 'config.yaml'))}",
            f"--name {q(host.data.workload_hermes_provider)}",
            f"--base-url {q(api_base())}", f"--model {q(hermes_model())}"]
    key = key_file()
    if key:
        args.append(f"--key-file {q(key)}")
    return " ".join(args)


@deploy("Provision the agent workloads (Terminal-Bench, Hermes)")
def provision_workload():
    if not host.data.get("workload_enabled"):
        return
    check_settings()
    p = paths()
    wp = workload_paths()
    python = workload_python()
    build_venv("Terminal-Bench", wp["tb_venv"], host.data.workload_tb_requirements, python)
    build_venv("Hermes", wp["hermes_venv"], host.data.workload_hermes_requirements, python)
    files.directory(name="Folder of the helper scripts", path=p.bin_dir, present=True)
    as_user.put(name="Upload tb_route.py", src=str(repo_file("files/" + TB_SCRIPT)),
                dest=wp["tb_script"], mode="644")
    as_user.put(name="Write the tb-route command", src=StringIO(tb_wrapper(wp)),
                dest=wp["tb_route"], mode="755")
    as_user.put(name="Write workload.json (tb-route's settings)",
                src=StringIO(json.dumps(tb_settings(wp), indent=2, sort_keys=True) + "\n"),
                dest=wp["config"], mode="644")
    files.directory(name="Folder of the Terminal-Bench runs", path=wp["runs_dir"], present=True)
    as_user.put(name="Upload hermes_provider.py", src=str(repo_file("files/" + HERMES_SCRIPT)),
                dest=wp["hermes_script"], mode="644")
    hermes_python = posixpath.join(wp["hermes_venv"], "bin", "python")
    args = hermes_args(wp)
    state = host.get_fact(HermesProviderState, python=hermes_python, script=wp["hermes_script"],
                          args=args)
    if state != "unchanged":
        server.shell(
            name=f"Merge provider {host.data.workload_hermes_provider!r} into "
                 f"{wp['hermes_home']}/config.yaml (other providers left as they are)",
            commands=[f"{shlex.quote(hermes_python)} {shlex.quote(wp['hermes_script'])} {args}"],
        )
