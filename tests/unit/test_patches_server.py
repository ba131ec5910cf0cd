"""The patched mlx-lm serves the tiny GLM: batched generation (cache merging
of one- and two-slot CacheLists), a real mlx_lm.server answering concurrent
and streaming chats, and patch 0002's --serve-any-model against a real server.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.fixtures.ports import free_port
from tests.fixtures.tiny_glm import env_with

BATCH_SCRIPT = """
import sys
import numpy as np
from mlx_lm import load, stream_generate
from mlx_lm.generate import batch_generate
model, tok = load(sys.argv[1])
rng = np.random.default_rng(2)
prompts = [[int(t) for t in rng.integers(5, 300, n)] for n in (3, 13, 29)]
batched = batch_generate(model, tok, prompts, max_tokens=10, return_token_ids=True).token_ids
single = [[r.token for r in stream_generate(model, tok, p, max_tokens=10)] for p in prompts]
print(repr((batched, single)))
"""


def test_batched_generation_matches_one_prompt_at_a_time(patched_mlx_site, tiny_glm_dir):
    """Prompts of 3, 13 and 29 tokens (below and far above index_topk),
    left-padded into one batch: what the server does with concurrent chats."""
    proc = subprocess.run(
        [sys.executable, "-c", BATCH_SCRIPT, str(tiny_glm_dir)],
        env=env_with(patched_mlx_site), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    batched, single = eval(proc.stdout.strip().splitlines()[-1])
    assert [list(b) for b in batched] == single
    assert all(len(s) == 10 for s in single)


@contextlib.contextmanager
def mlx_server(site, model_dir, tmp_path, *flags):
    port = free_port()
    log = (tmp_path / f"server-{port}.log").open("w")
    hf_cache = tmp_path / "hf-cache"
    hf_cache.mkdir(exist_ok=True)
    env = env_with(site) | {"HF_HUB_CACHE": str(hf_cache)}
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--temp", "0", "--max-tokens", "16",
            *flags,
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=60, max_retries=0)
    try:
        # /health is 200 before the model has loaded: a 1-token chat is the probe.
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / f"server-{port}.log").read_text()
            try:
                client.chat.completions.create(
                    model="default_model", messages=[{"role": "user", "content": "hi"}], max_tokens=1
                )
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "mlx_lm.server did not come up in 90 s"
                time.sleep(0.5)
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


MESSAGES = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 3}]


@pytest.mark.slow
def test_server_with_serve_any_model_answers_concurrent_and_streaming_chats_for_any_name(
    patched_mlx_site, tiny_glm_dir, tmp_path
):
    names = ["gpt-4o", "openai/glm52", "glm-5.2"]
    with mlx_server(patched_mlx_site, tiny_glm_dir, tmp_path, "--serve-any-model") as client:

        def chat(name):
            return client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=12)

        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(chat, names))
        for name, reply in zip(names, replies):
            assert reply.model == name  # echoed back, no reload, no 404
            assert reply.usage.completion_tokens > 0
            assert reply.choices[0].message.content

        stream = client.chat.completions.create(
            model="some-other-name", messages=MESSAGES, max_tokens=12, stream=True
        )
        chunks = list(stream)
        assert {c.model for c in chunks} == {"some-other-name"}
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert any(c.choices and c.choices[0].finish_reason for c in chunks)


@pytest.mark.slow
def test_without_the_flag_a_foreign_model_name_is_not_served(patched_mlx_site, tiny_glm_dir, tmp_path):
    """The flag is off by default: stock behaviour (try to load `gpt-4o`, fail)."""
    with mlx_server(patched_mlx_site, tiny_glm_dir, tmp_path) as client:
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
        assert err.value.status_code == 404
