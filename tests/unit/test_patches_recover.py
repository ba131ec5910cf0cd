"""Patch 0004: one request whose generation raises no longer kills
mlx_lm.server's generation loop; stock 0.32.2 is a zombie afterwards.

Real parts: a real mlx_lm.server (stock, or a copy of mlx_lm with the whole
series applied by files/mlx_patches.py, first on PYTHONPATH) serving
SmolLM2-135M on loopback, the real openai SDK as the client.

The exception is injected, not provoked: the server is started through the
test-only wrapper tests/fixtures/mlx_fault.py (`python -c "from
tests.fixtures.mlx_fault import main; main()" server ...`), which wraps
`mlx_lm.generate.BatchGenerator.next`; creating the file named by
MLX_ROUTE_FAULT_FILE makes the server's next batch step raise
`RuntimeError: [metal::malloc] Resource limit (499000) exceeded`, the
exception of mlx-lm issues 1505 and 1672, once. Nothing of it is in the patch.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from tasks.services import server_flags
from tests.fixtures import mlx_fault
from tests.fixtures.mlx_server import PROFILE, MlxServer, mlx_env, wait_ready
from tests.fixtures.ports import free_port
from tests.fixtures.tiny_glm import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LONG = [{"role": "user", "content": "Write a very long story about a dragon, at least 2000 words."}]
SHORT = [{"role": "user", "content": "What is the capital of France?"}]


@contextlib.contextmanager
def faulty_server(model_dir: Path, tmp_path: Path, site: Path | None):
    """mlx_lm.server with the smollm2 profile's flags, started through the
    fault wrapper; `site`: a patched mlx_lm copy first on PYTHONPATH (None:
    the venv's stock one). Yields (server, fault file)."""
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    fault = tmp_path / f"fault-{port}"
    hf_cache = tmp_path / "hf-cache"
    hf_cache.mkdir(exist_ok=True)
    path = [str(site)] if site is not None else []
    env = dict(os.environ) | {
        "PYTHONPATH": os.pathsep.join([*path, str(REPO)]),
        "HF_HUB_CACHE": str(hf_cache),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        mlx_fault.ENV: str(fault),
        **mlx_env(),
    }
    argv = mlx_fault.argv(
        "server", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
        *server_flags(PROFILE["server_args"]),
    )
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            cwd=REPO,
        )
    server = MlxServer(f"http://127.0.0.1:{port}", port, model_dir, proc, log_path)
    try:
        wait_ready(server, PROFILE["ready_timeout_s"])
        yield server, fault
    finally:
        server.stop()


def client_for(server: MlxServer, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key="none", timeout=timeout, max_retries=0
    )


def health(server: MlxServer) -> int:
    try:
        with urllib.request.urlopen(server.url + "/health", timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


def raw_chat(server: MlxServer, max_tokens: int = 4) -> tuple[int, dict]:
    """(status, body) of a plain non-streaming chat; no SDK in the way."""
    body = json.dumps({"model": "default_model", "messages": SHORT, "max_tokens": max_tokens})
    request = urllib.request.Request(
        server.url + "/v1/chat/completions", body.encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def assert_serves(server: MlxServer, tokens: int = 8) -> None:
    reply = client_for(server).chat.completions.create(
        model="default_model", messages=LONG, max_tokens=tokens
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == tokens and reply.choices[0].message.content


def test_patched_server_fails_only_the_request_that_raised_and_serves_the_next(
    patched_mlx_site, smollm2_model_dir, tmp_path
):
    with faulty_server(smollm2_model_dir, tmp_path, patched_mlx_site) as (server, fault):
        pid = server.proc.pid

        # Non-streaming: the fault fires at the request's first batch step.
        mlx_fault.inject(fault)
        with pytest.raises(openai.InternalServerError) as err:
            client_for(server).chat.completions.create(
                model="default_model", messages=SHORT, max_tokens=8
            )
        assert not mlx_fault.pending(fault), "the injected fault never fired"
        assert "generation failed" in str(err.value) and "Resource limit (499000)" in str(err.value)
        assert health(server) == 200
        assert_serves(server)

        # Streaming: the fault fires mid-answer; the stream ends with an error
        # event the SDK raises (never a [DONE] as if the answer were whole).
        stream = client_for(server).chat.completions.create(
            model="default_model", messages=LONG, max_tokens=200, stream=True
        )
        seen = 0
        with pytest.raises(openai.APIError) as err:
            for chunk in stream:
                assert not (chunk.choices and chunk.choices[0].finish_reason), "answer ended"
                if chunk.choices and chunk.choices[0].delta.content:
                    seen += 1
                    if seen == 3:
                        mlx_fault.inject(fault)
        assert seen >= 3 and not mlx_fault.pending(fault)
        assert "generation failed" in str(err.value) and "Resource limit (499000)" in str(err.value)

        # Without a restart: the same process serves the next requests.
        assert_serves(server)
        assert raw_chat(server)[0] == 200
        assert health(server) == 200
        assert server.proc.poll() is None and server.proc.pid == pid
        log = server.log()
        assert log.count("the generation loop goes on") == 2, log[-3000:]
        assert "generation thread died" not in log, log[-3000:]


def test_patched_server_gives_up_after_repeated_failures(
    patched_mlx_site, smollm2_model_dir, tmp_path
):
    """Four failures within a minute are the loop's own problem, not a
    request's: it stops as stock does (/health 503), for a supervisor to
    restart the process, instead of failing requests in a hot loop."""
    with faulty_server(smollm2_model_dir, tmp_path, patched_mlx_site) as (server, fault):
        statuses = []
        for _ in range(4):
            mlx_fault.inject(fault)
            statuses.append(raw_chat(server)[0])
        assert statuses == [500, 500, 500, 500]
        deadline = time.monotonic() + 10
        while health(server) != 503:
            assert time.monotonic() < deadline, "/health still ok after 4 failures"
            time.sleep(0.2)
        assert "generation thread died" in server.log()


def test_stock_server_generation_thread_dies_on_the_same_exception(smollm2_model_dir, tmp_path):
    """The control: the venv's unpatched mlx_lm, same wrapper, same fault. The
    request in flight gets no answer (connection dropped), then every request
    is refused (404 "generation thread died") and /health says 503, while the
    process stays up: only a restart brings it back."""
    with faulty_server(smollm2_model_dir, tmp_path, None) as (server, fault):
        mlx_fault.inject(fault)
        with pytest.raises(openai.APIConnectionError):
            client_for(server).chat.completions.create(
                model="default_model", messages=SHORT, max_tokens=8
            )
        assert not mlx_fault.pending(fault)
        for _ in range(2):
            status, body = raw_chat(server)
            assert status == 404 and "generation thread died" in body["error"], (status, body)
            assert health(server) == 503
            time.sleep(2)
        assert server.proc.poll() is None
        assert "generation thread died" in server.log()
