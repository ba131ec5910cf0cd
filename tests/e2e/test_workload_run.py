"""The field report's agent workloads, for real, against a route on this machine.

A real mlx_lm.server with the small model behind the real proxy (with a key);
a real pyinfra run of `workload.py` (tasks/workload.py: the venvs from the
locks, tb-route, Hermes' provider) on @local; then, as a user would:

- `tb-route check`: LiteLLM, as terminal-bench installs it, completes a chat
  and a tool call through the route with the key;
- `tb-route run` on a local dataset of one tiny task whose image is built
  offline (tests/fixtures/docker_host.py: Debian's docker.io, a debootstrap
  base image, the compose stand-in where the v2 plugin is missing): tb's
  harness with terminus-2 runs end to end in the stock regime, and its
  summary says what happened. The small model fails the task, as expected:
  its replies never end, terminus-2 re-asks until the route's body limit
  answers 413, and the summary counts that trial as an HTTP error from the
  route (SERVER_MAX_TOKENS, TB_PROXY_MAX_BODY_BYTES below). The test asserts
  the harness finished, the class and the labels, not a score;
- the route report lists the run in the stock table next to the field
  report's row;
- the host suite's Hermes gate runs by default (not skipped) and passes with
  the profile's task.

route.json here is assembled by the test from the route it started and the
workload part tasks/workload.py computes (the full deploy, which writes it, is
tests/e2e/test_deploy.py's). Needs root (dockerd); skipped otherwise.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from group_data.all import model_profiles
from tests.fixtures.docker_host import DockerUnavailable, docker, docker_host
from tests.fixtures.mlx_server import start_mlx_server
from tests.fixtures.proxy import start_proxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
PROFILE = model_profiles["smollm2-135m"]
TASK = "mlx-route-hello"
# terminus-2 sends no max_tokens, so the server's default caps each reply. At
# temperature 0 the 135M model never ends a reply by itself ("```" lines until
# the cap): each turn is cut at the cap, and terminus-2 (0.2.18) answers an
# over-long reply by re-asking recursively, with no bound but the context.
# A low cap keeps each of those calls short...
SERVER_MAX_TOKENS = 48
# ... and the proxy's real request body limit (proxy_max_body_bytes) ends the
# loop: the run goes through a second proxy of the route (same server, same
# key) whose limit lets terminus-2's first turn through (~3.3 KB: one real
# answer from the model) but not its second (~4.2 KB): the route answers 413,
# LiteLLM gives up after its retries, and the trial ends as an agent error
# whose logs quote the route's HTTP error: the summary's "HTTP error from the
# route" class, end to end. LiteLLM's check and Hermes (~6.8 KB) use the first.
TB_PROXY_MAX_BODY_BYTES = 3800
# a Hermes config as its user left it: another provider that must survive byte for byte
USER_HERMES_CONFIG = """\
# written by hand
model:
  default: qwen3
  provider: lab
providers:
  lab:
    base_url: "http://10.0.0.9:8000/v1"   # the lab box
    api_key: 'sk-lab'
"""


def python312() -> str:
    for candidate in [shutil.which("python3.12"),
                      *sorted(glob.glob("/root/.pyenv/versions/3.12*/bin/python3.12"))]:
        if candidate:
            out = subprocess.run([candidate, "-c", "import sys; print(sys.executable)"],
                                 capture_output=True, text=True, timeout=60)
            if out.returncode == 0:
                return out.stdout.strip()
    pytest.fail("no Python 3.12 on this machine: terminal-bench 0.2.18 needs one "
                "(install python3.12, or pyenv install 3.12)")


def write_dataset(root: Path, base_image: str) -> Path:
    """One tiny task in terminal-bench 0.2.18's format (task.yaml, Dockerfile,
    docker-compose.yaml, run-tests.sh, solution.sh, tests/)."""
    task = root / TASK
    (task / "tests").mkdir(parents=True)
    (task / "task.yaml").write_text(textwrap.dedent("""\
        instruction: |-
          Create a file /app/hello.txt that contains exactly the word hello.
        author_name: mlx-route tests
        author_email: unknown
        difficulty: easy
        category: file-operations
        tags: [smoke]
        parser_name: pytest
        max_agent_timeout_sec: 600
        max_test_timeout_sec: 60
        run_tests_in_same_shell: false
        """))
    (task / "Dockerfile").write_text(f"FROM {base_image}\nWORKDIR /app\n")
    (task / "docker-compose.yaml").write_text(textwrap.dedent("""\
        services:
          client:
            build:
              context: .
              dockerfile: Dockerfile
            image: ${T_BENCH_TASK_DOCKER_CLIENT_IMAGE_NAME}
            container_name: ${T_BENCH_TASK_DOCKER_CLIENT_CONTAINER_NAME}
            command: [ "sh", "-c", "sleep infinity" ]
            network_mode: none
            environment:
              - TEST_DIR=${T_BENCH_TEST_DIR}
            volumes:
              - ${T_BENCH_TASK_LOGS_PATH}:${T_BENCH_CONTAINER_LOGS_PATH}
              - ${T_BENCH_TASK_AGENT_LOGS_PATH}:${T_BENCH_CONTAINER_AGENT_LOGS_PATH}
        """))
    (task / "run-tests.sh").write_text(
        '#!/bin/bash\ncd /app\npython3 -m pytest "$TEST_DIR/test_outputs.py" -rA\n')
    (task / "solution.sh").write_text("#!/bin/bash\nprintf 'hello\\n' > /app/hello.txt\n")
    (task / "tests" / "test_outputs.py").write_text(
        "from pathlib import Path\n\n\ndef test_hello_file():\n"
        "    assert Path('/app/hello.txt').read_text().strip() == 'hello'\n")
    for name in ("run-tests.sh", "solution.sh"):
        (task / name).chmod(0o755)
    return root


def proxy_counts(proxy, key: str) -> dict:
    """The proxy's own request counters (its /metrics): "chat_200" (answered chats)
    and the total of every other status code, whatever the path."""
    request = urllib.request.Request(f"{proxy.url}/metrics",
                                     headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        text = reply.read().decode()
    counts = {"chat_200": 0}
    for path, code, n in re.findall(
            r'proxy_requests_total\{path="([^"]*)",code="(\d+)"\} (\d+)', text):
        if code == "200":
            if path == "/v1/chat/completions":
                counts["chat_200"] += int(n)
        else:
            counts[code] = counts.get(code, 0) + int(n)
    return counts


@pytest.fixture(scope="module")
def stage(tmp_path_factory, smollm2_model_dir, artifacts_dir):
    """The route, Docker, and the workload provisioned by pyinfra; torn down after."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the Terminal-Bench harness runs the task in Docker "
                    "(dockerd); run as root, as CI does")
    work = tmp_path_factory.mktemp("workload")
    timings = {}
    started = time.monotonic()
    try:
        dock = docker_host(work)
    except DockerUnavailable as e:
        pytest.fail(str(e))
    timings["docker_and_base_image_s"] = round(time.monotonic() - started, 1)
    key_file = work / "proxy.key"
    key_file.write_text("sk-" + os.urandom(16).hex() + "\n")
    key_file.chmod(0o600)
    key = key_file.read_text().strip()
    server = start_mlx_server(smollm2_model_dir, work / "server.log", work / "hf-cache",
                              server_args={**PROFILE["server_args"],
                                           "max-tokens": SERVER_MAX_TOKENS})
    proxy = None
    try:
        proxy = start_proxy(server.url, "--public-name", PROFILE["public_name"],
                            "--api-key-file", str(key_file), log_path=work / "proxy.log")
        tb_proxy = start_proxy(server.url, "--public-name", PROFILE["public_name"],
                               "--api-key-file", str(key_file), "--max-body-bytes",
                               str(TB_PROXY_MAX_BODY_BYTES), log_path=work / "tb-proxy.log")
    except BaseException:
        if proxy is not None:
            proxy.stop()
        server.stop()
        dock.close()
        raise
    hermes_home = work / "hermes"
    hermes_home.mkdir()
    (hermes_home / "config.yaml").write_text(USER_HERMES_CONFIG)
    dataset = write_dataset(work / "dataset", dock.base_image)
    venvs = artifacts_dir / "workload-venvs"  # reused by a later run: the locks' marker decides
    data = {
        "model_profile": "smollm2-135m",
        "route_home": str(work / "route-home"),
        "workload_enabled": True,
        "workload_python": python312(),
        "workload_tb_venv": str(venvs / "terminal-bench"),
        "workload_hermes_venv": str(venvs / "hermes"),
        "workload_api_base": f"{proxy.url}/v1",
        "workload_key_file": str(key_file),
        "workload_dataset_path": str(dataset),
        "workload_agent_kwargs": {"max_episodes": 1},  # one LLM turn: bounded in time
        "workload_runs_dir": str(work / "tb-runs"),
        "workload_hermes_home": str(hermes_home),
    }
    inventory = work / "inventory_workload.py"
    inventory.write_text(f"workload = [(\"@local\", {data!r})]\n")
    started = time.monotonic()
    deploy = subprocess.run([PYINFRA, "-y", str(inventory), "workload.py"], cwd=REPO,
                            capture_output=True, text=True, timeout=1500,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    timings["pyinfra_workload_s"] = round(time.monotonic() - started, 1)
    stage = {"work": work, "dock": dock, "proxy": proxy, "tb_proxy": tb_proxy, "key": key,
             "key_file": key_file,
             "data": data, "deploy": deploy, "timings": timings,
             "route_home": Path(data["route_home"]), "hermes_home": hermes_home}
    try:
        yield stage
    finally:
        proxy.stop()
        tb_proxy.stop()
        server.stop()
        images = docker("images", "--format", "{{.Repository}}:{{.Tag}}", check=False).stdout
        for image in images.split():
            if image.startswith(f"tb__{TASK}__"):
                docker("rmi", "-f", image, check=False)
        dock.close()
        print(f"\nworkload e2e timings: {json.dumps(timings)}")


def tb_route(stage, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(stage["route_home"] / "bin" / "tb-route"), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**stage["dock"].env, "OPENAI_API_KEY": "dummy"})
    assert stage["key"] not in proc.stdout + proc.stderr, "the proxy key was printed"
    return proc


def test_pyinfra_provisions_the_workload_and_keeps_the_users_hermes_providers(stage):
    deploy = stage["deploy"]
    assert deploy.returncode == 0, (deploy.stdout + deploy.stderr)[-6000:]
    settings = json.loads((stage["route_home"] / "workload.json").read_text())
    assert settings["api_base"] == stage["data"]["workload_api_base"]
    assert settings["key_file"] == str(stage["key_file"]) and stage["key"] not in json.dumps(
        settings)
    for key, lock in (("workload_tb_venv", "terminal-bench.txt"),
                      ("workload_hermes_venv", "hermes.txt")):
        marker = json.loads((Path(stage["data"][key]) / ".mlx-route-workload").read_text())
        assert marker == {"interpreter": stage["data"]["workload_python"], "lock_sha256":
                          hashlib.sha256((REPO / "requirements" / lock).read_bytes()).hexdigest()}
    config = (stage["hermes_home"] / "config.yaml").read_text()
    assert config.startswith(USER_HERMES_CONFIG), config  # the user's bytes, untouched
    added = config[len(USER_HERMES_CONFIG):]
    assert added.startswith("  mlx-route:\n") and f'api_key: "{stage["key"]}"' in added
    assert oct((stage["hermes_home"] / "config.yaml").stat().st_mode & 0o777) == "0o600"


def test_litellm_completes_a_chat_and_a_tool_call_through_the_route(stage):
    before = proxy_counts(stage["proxy"], stage["key"])
    started = time.monotonic()
    proc = tb_route(stage, "check", timeout=900)
    stage["timings"]["litellm_check_s"] = round(time.monotonic() - started, 1)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert "Paris" in out["chat"]["content"] and out["chat"]["model"] == "glm52"
    assert out["tool_call"]["finish_reason"] == "tool_calls"
    assert out["tool_call"]["calls"] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    after = proxy_counts(stage["proxy"], stage["key"])
    assert after["chat_200"] - before["chat_200"] == 2 and "401" not in after, after


def test_terminal_bench_runs_end_to_end_in_the_stock_regime(stage):
    before = proxy_counts(stage["tb_proxy"], stage["key"])
    started = time.monotonic()
    proc = tb_route(stage, "run", "--api-base", f"{stage['tb_proxy'].url}/v1", timeout=1500)
    stage["timings"]["tb_run_s"] = round(time.monotonic() - started, 1)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    path = re.search(r"tb-route: (\S+/summary\.json)", proc.stdout).group(1)
    summary = json.loads(Path(path).read_text())
    print(f"tb-route: {summary['regime']} {summary['resolved']}/{summary['total']}, "
          f"classes {summary['classes']}, wall {summary['wall_s']} s")
    assert Path(path).parent.parent == stage["work"] / "tb-runs" / "stock"
    assert summary["run_id"].endswith("__stock") and summary["regime"] == "stock"
    assert summary["stock"] is True and summary["finished"] is True
    assert summary["total"] == 1 and summary["agent"] == "terminus-2"
    assert summary["resolved"] + sum(summary["classes"].values()) == 1
    # the harness itself worked; the trial ended on the route's 413 (see TB_PROXY_MAX_BODY_BYTES)
    assert summary["classes"]["harness_error"] == 0, summary
    trial = summary["trials"][0]
    assert trial["task_id"] == TASK, trial
    assert summary["invocation"]["api_base"] == f"{stage['tb_proxy'].url}/v1"
    after = proxy_counts(stage["tb_proxy"], stage["key"])
    # terminus-2 reached the route with the key (no 401) through LiteLLM, until the 413s
    assert after["chat_200"] > before["chat_200"] and "401" not in after, after
    assert after.get("413", 0) > before.get("413", 0), after
    assert trial["failure_mode"] == "unknown_agent_error" and trial["http_errors"] > 0, trial
    assert summary["classes"]["route_http_error"] == 1 and summary["resolved"] == 0, summary
    assert "[stock]" in proc.stdout and "__stock" in proc.stdout
    stage["summary"] = summary


def test_route_report_lists_the_run_beside_the_field_report(stage):
    summary = stage.get("summary")
    assert summary, "no run to report: see test_terminal_bench_runs_end_to_end_in_the_stock_regime"
    workload = json.loads((stage["route_home"] / "workload.json").read_text())
    manifest = stage["work"] / "route.json"
    manifest.write_text(json.dumps(route_json(stage, workload)))
    out = stage["work"] / "reports"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "route_report.py"),
                           "--hosts", "local://", "--workload-only", "--route-manifest",
                           str(manifest), "--out", str(out), "--host-name", "ci"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    report = Path(proc.stdout.strip()).read_text()
    stock = report.split("### stock (1x timeouts)", 1)[1]
    assert "| *field report: GLM-5.2 MXFP4 on an M3 Ultra* |" in stock
    assert f"| {summary['run_id']} | {stage['data']['workload_dataset_path']} | terminus-2 |" \
        in stock
    print(report)


def route_json(stage, workload: dict) -> dict:
    data = stage["data"]
    return {
        "profile": "smollm2-135m", "public_name": PROFILE["public_name"],
        "smoke": PROFILE["smoke"], "gates": PROFILE["gates"], "bench": PROFILE["bench"],
        # the interpreter route_report runs files/probes.py with (stdlib only here)
        "venv": sys.prefix,
        "model_dir": "", "server": {"host": "127.0.0.1", "port": 0},
        "proxy": {"host": "127.0.0.1", "port": stage["proxy"].port,
                  "key_file": str(stage["key_file"])},
        "workload": {
            "config": str(stage["route_home"] / "workload.json"),
            "tb_route": str(stage["route_home"] / "bin" / "tb-route"),
            "runs_dir": workload["runs_dir"],
            "hermes": str(Path(data["workload_hermes_venv"]) / "bin" / "hermes"),
            "hermes_home": data["workload_hermes_home"],
            "hermes_provider": "mlx-route",
            "hermes_model": PROFILE["gates"]["hermes_model"],
            "api_base": data["workload_api_base"],
        },
    }


def test_the_hosts_hermes_gate_runs_by_default_and_passes(stage):
    workload = json.loads((stage["route_home"] / "workload.json").read_text())
    manifest = stage["work"] / "route.json"
    manifest.write_text(json.dumps(route_json(stage, workload)))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(REPO / "tests" / "host" / "test_gates.py"),
         "-k", "hermes", "-rA", "-s", "-p", "no:cacheprovider", "-o", "addopts=",
         # Hermes' ~1500-token system prompt, cold: ~2 min on 2 quiet cores, over
         # 10 min on this shared machine under load; the suite's 600 s is too short
         "--timeout", "1500",
         "--hosts=local://", f"--route-manifest={manifest}"],
        capture_output=True, text=True, timeout=1500, cwd=REPO)
    stage["timings"]["hermes_gate_s"] = round(time.monotonic() - started, 1)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"\b1 passed\b", out) and "skipped" not in out, out[-2000:]
    assert "hermes child_capital on the host (workload_enabled): exit 0" in out
