"""`./run bench` (bench/proxy_bench.py), the tool README's proxy numbers come from.

The stand-in upstream is the bench's own upstream (tests/fixtures/upstream_stub.py,
an aiohttp server that answers 1-token generations at once); wrk is Debian's.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import proxy_bench  # noqa: E402  (bench/ is not a package)


def wrk() -> str:
    path = shutil.which("wrk")
    assert path, "wrk is not installed: apt-get install wrk (.ci/run installs it)"
    return path


@pytest.mark.parametrize("text", ["plain", 'quote " back \\ ]] 1', "\n\r\x00 é 😀 \\n9"])
def test_lua_string_holds_any_text(text, tmp_path):
    """The JSON body goes into wrk's Lua script as a string literal: what wrk's
    own Lua reads back is the text, byte for byte (printed from the script's
    init; wrk connects first, so a socket listens)."""
    script = tmp_path / "s.lua"
    script.write_text(f"local t = {proxy_bench.lua_string(text)}\n"
                      "function init(args) io.write('<' .. t .. '>') os.exit(0) end\n")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        run = subprocess.run([wrk(), "-t1", "-c1", "-d1s", "-s", str(script), url],
                             capture_output=True, timeout=30)
    assert f"<{text}>".encode() in run.stdout, run


def test_wrk_counts_only_2xx_answers(upstream_stub):
    """A wrk run's requests are counted as served only when answered 2xx: the
    stand-in answers 404 to a model it does not have, as mlx_lm.server does."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            "stub": {"tokens": 1}}
    url = upstream_stub.url + "/v1/chat/completions"
    good = proxy_bench.run_wrk(wrk(), url, body, clients=2, seconds=1)
    bad = proxy_bench.run_wrk(wrk(), url, dict(body, model="other"), clients=2, seconds=1)
    assert good["ok"] > 10 and good["errors"] == 0
    assert bad["ok"] == 0 and bad["errors"] > 10
    assert 0.9 < good["seconds"] < 5 and good["cpu_s"] > 0
    assert upstream_stub.generations[-1].body["model"] == "other"


def test_cpu_bound_counts_cores_and_the_busiest_process():
    """The ceiling CPU per request sets: both cores full, or one process's core."""
    def side(**cpu):
        return {"cpu_us_per_request": cpu}
    cores = proxy_bench.os.cpu_count()
    # two processes of 100 us: one core each, 10000 req/s either way
    direct = side(upstream=100, client=100)
    # one process of 200 us bounds the side at 5000 req/s however many cores
    assert proxy_bench.cpu_bound(direct, side(upstream=200, proxy=10, client=10)) == 0.5
    # three processes of 100 us on the machine's cores
    expected = min(cores / 300, 1 / 100) / (1 / 100)
    assert proxy_bench.cpu_bound(direct, side(upstream=100, proxy=100, client=100)) == \
        round(expected, 3)


@pytest.mark.slow
def test_bench_runs_and_writes_its_measures(tmp_path):
    """README's `./run bench` at its smallest: the stand-in upstream, the zipapp
    the deploy ships, both load generators; every phase answers, none errs."""
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "proxy_bench.py"), "--out", str(out),
         "--latency-n", "20", "--first-byte-n", "2", "--phase-s", "2", "--rounds", "2",
         "--max-requests", "2000", "--clients", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    for phase in ("throughput", "throughput_wrk"):
        thr = res[phase]
        for side in ("direct", "proxy"):
            assert thr[side]["requests"] > 0 and thr[side]["errors"] == 0, (phase, thr)
        assert 0 < thr["ratio"] and thr["proxy"]["cpu_us_per_request"]["proxy"] > 0
    assert res["latency_ms"]["n"] == [20, 20]
    # the proxy stops the generation its client left; direct, it runs to the end
    leave = res["generating_after_leave_s"]
    assert leave["nonstream_timeout_proxy"] < leave["nonstream_timeout_direct"]
    assert "wrk connections" in run.stdout
