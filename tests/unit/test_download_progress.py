"""The first download is not silent: progress lines as they come (issue 16).

The real pyinfra CLI, at its default verbosity (no -v), runs fetch_model()
against this machine; the real `hf download` (huggingface_hub's CLI from this
venv) fetches from the Hub stand-in (tests/fixtures/hubstub.py: no hub is
reachable here), throttled to 2 MiB/s per connection so the 15 MiB model takes
seconds. The test reads pyinfra's output as it is printed and time-stamps each
line. hf writes a shard into its .incomplete file in 10 MiB steps, so the
bytes move in steps too (on a 5 GB GLM-5.2 shard that is fine-grained).
"""

from __future__ import annotations

import re
import subprocess
import threading
import time

import pytest

from tests.unit.test_model_task import REPO, Deploy, hf_profile

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def deploy(tmp_path) -> Deploy:
    return Deploy(tmp_path)

LINE = re.compile(r"^\[@local\] download: (\d+)/4 shards, ([\d.]+)/([\d.]+) MiB, "
                  r"([\d.]+) MiB/s, (ETA .+|ended in .+)$")


def run_timed(deploy: Deploy, profile: dict, endpoint: str, *data: str):
    """pyinfra as a person runs it; (exit code, [(seconds since start, line)], end)."""
    argv = deploy.argv(profile, endpoint, *data)
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, env=deploy.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []

    def read():
        for line in proc.stdout:
            lines.append((time.monotonic() - started, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    reader.join(10)
    return code, lines, time.monotonic() - started


def test_download_prints_a_progress_line_every_interval_as_it_comes(
    sharded_model, hub_stub, deploy
):
    stub = hub_stub(sharded_model)
    stub.throttle(2 * 2**20)
    code, lines, end = run_timed(deploy, hf_profile(stub), stub.url,
                                 "model_download_progress_s=1")
    text = "\n".join(line for _, line in lines)
    assert code == 0, text[-3000:]
    progress = [(t, LINE.match(line)) for t, line in lines if LINE.match(line)]
    for t, m in progress:
        print(f"{t:6.1f} s  {m.group(0)}")
    ticks = [(t, m) for t, m in progress if m.group(5).startswith("ETA")]
    assert len(ticks) >= 3, text[-3000:]
    # as it comes: the first line long before pyinfra ends, then about one a second
    assert ticks[0][0] < end - 3
    gaps = [b[0] - a[0] for a, b in zip(ticks, ticks[1:])]
    assert all(0.5 < gap < 3 for gap in gaps), gaps
    done = [float(m.group(2)) for _, m in ticks]
    assert done == sorted(done) and done[-1] > done[0]
    assert {m.group(3) for _, m in progress} == {"20.5"}  # the profile's size_gib, 0.02
    # hf writes a shard in 10 MiB steps: a tick may see nothing new, the last cannot
    assert float(ticks[-1][1].group(4)) > 0 and re.match(r"ETA \d+ s$", ticks[-1][1].group(5))
    last = progress[-1][1]
    assert last.group(5).startswith("ended in") and last.group(1) == "4"
    # default verbosity: the facts' output (the weights check's JSON) is not shown
    assert '"up_to_date"' not in text


def test_no_progress_lines_when_switched_off(sharded_model, hub_stub, deploy):
    stub = hub_stub(sharded_model)
    code, lines, _ = run_timed(deploy, hf_profile(stub), stub.url, "model_download_progress_s=0")
    assert code == 0, "\n".join(line for _, line in lines)[-3000:]
    assert not any("download: " in line for _, line in lines)
    assert (deploy.model_dir / ".mlx-route.json").exists()
