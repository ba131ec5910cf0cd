"""Patch 0003: mlx_lm.server stops generating within about one token of its
client leaving; stock 0.32.2 does not.

Real parts only: a real mlx_lm.server (stock, or a copy of mlx_lm with the
whole series applied by files/mlx_patches.py, first on PYTHONPATH) serving
SmolLM2-135M, and the real openai SDK as the client. "Still generating" is read
from the server process's CPU time (/proc/<pid>/stat utime+stime, sampled every
20 ms): an idle mlx_lm.server uses none, a generating one about a core.

The bound is one token, not the 100 ms target: a step of the batch (one token
for every request in it) cannot be interrupted, so the request leaves the batch
after the step in progress. A token here takes ~130-250 ms (2 cores shared with
other jobs); on the Mac a GLM-5.2 token takes less than 100 ms.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from tasks.services import server_flags
from tests.fixtures.mlx_server import PROFILE, MlxServer, wait_ready
from tests.fixtures.ports import free_port
from tests.fixtures.tiny_glm import env_with

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# At temperature 0 SmolLM2-135M's answer to this runs past 300 tokens (checked
# with mlx_lm.generate), so the stream is never over by itself when we leave.
LONG = [{"role": "user", "content": "Write a very long story about a dragon, at least 2000 words."}]
SAMPLE_S = 0.02
# Share of one core that shows the server was generating when the client left:
# idle it uses none, generating about one, less when other jobs share the box.
BUSY = 0.2
WATCH_S = 1.2
# Noticing the close and waking the generation thread, plus the sampling
# period and the 10 ms clock tick of utime/stime.
SLACK_S = 0.06
# CPU the server may still use once it stopped: stray wake-ups, the handler's
# exit, the log line (two clock ticks).
RESIDUAL_CPU_S = 0.02
# A stop counts when that quiet lasts at least this long (a token is ~0.2 s).
QUIET_S = 0.4


@contextlib.contextmanager
def served(model_dir: Path, tmp_path: Path, site: Path | None):
    """`python -m mlx_lm server` with the smollm2 profile's flags; `site`: a
    patched mlx_lm copy put first on PYTHONPATH (None: the venv's stock one)."""
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    hf_cache = tmp_path / "hf-cache"
    hf_cache.mkdir(exist_ok=True)
    argv = [
        sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), *server_flags(PROFILE["server_args"]),
    ]
    env = env_with(site) | {"HF_HUB_CACHE": str(hf_cache)}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = MlxServer(f"http://127.0.0.1:{port}", port, model_dir, proc, log_path)
    try:
        wait_ready(server, PROFILE["ready_timeout_s"])
        yield server
    finally:
        server.stop()


class CpuWatch:
    """Samples the process's CPU seconds every SAMPLE_S in a thread."""

    def __init__(self, pid: int):
        self.path = f"/proc/{pid}/stat"
        self.tick = os.sysconf("SC_CLK_TCK")
        self.samples: list[tuple[float, float]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def cpu(self) -> float:
        # Fields after "(comm)": utime and stime are the 12th and 13th.
        fields = Path(self.path).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.tick

    def _run(self):
        while not self._done.is_set():
            self.samples.append((time.monotonic(), self.cpu()))
            time.sleep(SAMPLE_S)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()

    def busy_before(self, t: float, span: float = 0.3) -> float:
        """Share of one core used in the `span` seconds before `t`."""
        inside = [(ts, c) for ts, c in self.samples if t - span <= ts <= t]
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    def stopped_after(self, t: float) -> float | None:
        """Seconds from `t` to the first sample after which the process used at
        most RESIDUAL_CPU_S until the end, at least QUIET_S later; None: still
        computing QUIET_S before the end."""
        after = [(ts, c) for ts, c in self.samples if ts >= t]
        assert after and after[-1][0] - t >= WATCH_S - 2 * SAMPLE_S, "watch too short"
        end, last = after[-1]
        for ts, c in after:
            if end - ts < QUIET_S:
                break
            if last - c <= RESIDUAL_CPU_S:
                return ts - t
        return None


def client_for(server: MlxServer, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key="none", timeout=timeout, max_retries=0
    )


def leave_stream(server: MlxServer, tokens: int = 6) -> tuple[float, float, float | None]:
    """Stream the long answer, read `tokens` chunks, close the stream.
    Returns (one token's time, busy share before leaving, stopped after)."""
    client = client_for(server)
    with CpuWatch(server.proc.pid) as watch:
        stream = client.chat.completions.create(
            model="default_model", messages=LONG, max_tokens=300, stream=True
        )
        arrivals = []
        for chunk in stream:
            assert not (chunk.choices and chunk.choices[0].finish_reason), "answer ended early"
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic())
                if len(arrivals) == tokens:
                    break
        stream.close()
        left = time.monotonic()
        time.sleep(WATCH_S)
    # The first interval may still hold prompt work: judge by the later ones.
    token_s = max(b - a for a, b in zip(arrivals[1:], arrivals[2:]))
    return token_s, watch.busy_before(left), watch.stopped_after(left)


def leave_waiting(server: MlxServer, timeout: float = 2.0) -> tuple[float, float | None]:
    """A non-streaming chat whose client times out (the field report's case).
    Returns (busy share before leaving, stopped after)."""
    client = client_for(server, timeout=timeout)
    with CpuWatch(server.proc.pid) as watch:
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model="default_model", messages=LONG, max_tokens=300)
        left = time.monotonic()
        time.sleep(WATCH_S)
    return watch.busy_before(left), watch.stopped_after(left)


def report(label: str, token_s: float, stopped: float | None) -> None:
    shown = "still generating" if stopped is None else f"{stopped * 1000:.0f} ms"
    print(f"\n{label}: one token {token_s * 1000:.0f} ms, generation stopped after {shown}")


def test_patched_server_stops_generating_within_a_token_of_its_client_leaving(
    patched_mlx_site, smollm2_model_dir, tmp_path
):
    with served(smollm2_model_dir, tmp_path, patched_mlx_site) as server:
        token_s, busy, stopped = leave_stream(server)
        report("patched, streaming client closed", token_s, stopped)
        assert busy > BUSY, f"not generating when the client left ({busy:.0%} of a core)"
        assert stopped is not None and stopped <= token_s + SLACK_S, (stopped, token_s)

        busy, stopped = leave_waiting(server)
        report("patched, non-streaming client timed out", token_s, stopped)
        assert busy > BUSY, f"not generating when the client left ({busy:.0%} of a core)"
        assert stopped is not None and stopped <= token_s + SLACK_S, (stopped, token_s)

        # Still serves, and a reply that nobody abandons is whole.
        reply = client_for(server).chat.completions.create(
            model="default_model", messages=LONG, max_tokens=8
        )
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 8
        assert "generation thread died" not in server.log(), server.log()[-3000:]


def test_stock_server_keeps_generating_after_its_client_left(smollm2_model_dir, tmp_path):
    """The control: the same measurement against the venv's unpatched mlx_lm.
    Streaming: it notices at a failed write and then finishes its 0.5 s time
    budget, so its stop lands anywhere from about one token to 0.5 s plus two
    tokens after the close; one trial of two past one token shows the delay
    (both landing within a token by chance is rare). Non-streaming: it never
    notices and generates to max_tokens."""
    with served(smollm2_model_dir, tmp_path, None) as server:
        trials = []
        for _ in range(2):
            token_s, busy, stopped = leave_stream(server)
            report("stock, streaming client closed", token_s, stopped)
            assert busy > BUSY, f"not generating when the client left ({busy:.0%} of a core)"
            trials.append((stopped, token_s))
            if stopped is None or stopped > token_s + SLACK_S:
                break
        assert any(s is None or s > t + SLACK_S for s, t in trials), trials

        busy, stopped = leave_waiting(server)
        report("stock, non-streaming client timed out", token_s, stopped)
        assert busy > BUSY, f"not generating when the client left ({busy:.0%} of a core)"
        assert stopped is None, f"stock mlx_lm.server stopped {stopped:.2f} s after the client left"
