"""server_blas_library on a Linux host: the model servers' environment, from a
real plan of the real tasks (pyinfra against @local, this Linux machine).

Present: every model server preloads the library (the proxy does not); missing:
a warning naming the fix, and no LD_PRELOAD anywhere (nothing half-changed);
bad data: refused with what to write. That the running server really maps it is
the host suite's check (tests/host/test_route.py), run by the e2e deploy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from group_data.all import model_profiles, server_blas_library

REPO = Path(__file__).resolve().parents[2]
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
MARK = "SERVICES-ENV "
# a second profile (the same small model under another name): a server-<profile> service
PROFILES = {**model_profiles, "smollm2-bis": {**model_profiles["smollm2-135m"],
                                              "public_name": "smollm2-bis"}}

pytestmark = pytest.mark.timeout(120)

DEPLOY = f'''
import json
from tasks.services import route_services
route_services()  # the deploy builds them several times: one warning all the same
envs = {{name: svc.env for name, svc in route_services().items()}}
print({MARK!r} + json.dumps(envs, sort_keys=True), flush=True)
'''


def plan(tmp_path: Path, *data: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    deploy = tmp_path / "deploy_env.py"
    deploy.write_text(DEPLOY)
    argv = [PYINFRA, "-y", "@local", str(deploy), "--data", f"route_home={tmp_path / 'route'}",
            "--data", 'route_profiles={"smollm2-135m": 8025, "smollm2-bis": 8027}',
            "--data", "model_profiles=" + json.dumps(PROFILES)]
    for item in data:
        argv += ["--data", item]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=100,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [line for line in result.stdout.splitlines() if line.startswith(MARK)]
    return result, json.loads(lines[0][len(MARK):]) if lines else None


@pytest.mark.skipif(not os.access(server_blas_library, os.R_OK),
                    reason=f"{server_blas_library} is not installed: apt-get install "
                           "libopenblas0-pthread (.ci/run does)")
def test_every_model_server_preloads_the_library_and_the_proxy_does_not(tmp_path):
    result, envs = plan(tmp_path, "server_blas_threads=1")
    assert envs is not None, (result.stdout + result.stderr)[-3000:]
    assert sorted(envs) == ["proxy", "server", "server-smollm2-bis"]
    for name in ("server", "server-smollm2-bis"):
        assert envs[name]["LD_PRELOAD"] == server_blas_library
        assert envs[name]["OPENBLAS_NUM_THREADS"] == "1"
    assert "LD_PRELOAD" not in envs["proxy"] and "OPENBLAS_NUM_THREADS" not in envs["proxy"]
    assert "libopenblas0-pthread" not in result.stdout + result.stderr  # no warning


def test_a_missing_library_warns_with_the_fix_and_preloads_nothing(tmp_path):
    missing = str(tmp_path / "no" / "libopenblas.so.0")
    result, envs = plan(tmp_path, f"server_blas_library={missing}")
    log = result.stdout + result.stderr
    assert envs is not None, log[-3000:]
    assert not any("LD_PRELOAD" in env or "OPENBLAS_NUM_THREADS" in env for env in envs.values())
    assert f"server_blas_library {missing} is not on this host" in log
    assert "Fix: `apt-get install libopenblas0-pthread`" in log
    assert log.count("is not on this host") == 1  # once per host, however often it is asked


@pytest.mark.parametrize("data, says", [
    ("server_blas_library=lib/libopenblas.so.0", "must be an absolute path"),
    ("server_blas_threads=0", "must be a positive integer or None"),
])
def test_bad_blas_data_is_refused_with_what_to_write(tmp_path, data, says):
    result, envs = plan(tmp_path, data)
    assert result.returncode != 0 and envs is None
    assert says in result.stdout + result.stderr
