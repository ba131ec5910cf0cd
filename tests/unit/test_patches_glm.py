"""The GLM patch: stock mlx-lm cannot load a GLM-5.2-shaped model; the patched
copy loads it, keeps one cache slot on layers without an indexer, and
generates. Numerical agreement with transformers is in
test_patches_reference.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.tiny_glm import INDEXER_TYPES, env_with

PROBE = Path(__file__).resolve().parents[1] / "fixtures" / "glm_probe.py"
SHORT = [5, 17, 42]  # fewer tokens than index_topk (4): attention is dense
LONG = [int(t) for t in np.random.default_rng(1).integers(5, 300, 40)]  # 10x index_topk


def probe(site, model, tmp_path, tokens, *flags, name="out"):
    out = tmp_path / f"{name}.npz"
    proc = subprocess.run(
        [sys.executable, str(PROBE), str(model), str(out), "--tokens", ",".join(map(str, tokens)), *flags],
        env=env_with(site),
        capture_output=True,
        text=True,
        timeout=180,
    )
    return proc, (dict(np.load(out)) if proc.returncode == 0 else None)


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_stock_mlx_lm_cannot_load_a_glm52_shaped_model(tiny_glm_dir, tmp_path):
    proc, _ = probe(None, tiny_glm_dir, tmp_path, SHORT)
    assert proc.returncode != 0
    assert "ValueError: Missing 15 parameters" in proc.stderr
    assert "model.layers.1.self_attn.indexer.wq_b.weight" in proc.stderr


def test_patched_mlx_lm_loads_it_with_one_cache_slot_on_shared_layers(
    patched_mlx_site, tiny_glm_dir, tmp_path
):
    proc, got = probe(patched_mlx_site, tiny_glm_dir, tmp_path, LONG)
    assert proc.returncode == 0, proc.stderr
    assert str(got["mlx_lm_file"]).startswith(str(patched_mlx_site))
    assert got["caches"].tolist() == [2 if t == "full" else 1 for t in INDEXER_TYPES]
    assert np.isfinite(got["prefill"]).all()
    # Decoding token by token with the cache reproduces the one-shot prefill,
    # far past index_topk, where the shared layers reuse cached top-k.
    assert rel_err(got["decode"], got["prefill"]) < 1e-5


def test_shared_layers_reuse_top_k_instead_of_attending_densely(
    patched_mlx_site, tiny_glm_dir, tmp_path
):
    """Dense shared layers (the field report's patches A-C) agree below index_topk and
    not above it: proof that the fixture exercises IndexShare at all."""
    for tokens, same in ((SHORT, True), (LONG, False)):
        _, share = probe(patched_mlx_site, tiny_glm_dir, tmp_path, tokens, name="share")
        _, dense = probe(patched_mlx_site, tiny_glm_dir, tmp_path, tokens, "--dense-shared", name="dense")
        err = rel_err(dense["prefill"], share["prefill"])
        assert (err < 1e-5) if same else (err > 1e-2), (len(tokens), err)


def test_sharding_on_one_rank_keeps_the_logits(patched_mlx_site, tiny_glm_dir, tmp_path):
    _, plain = probe(patched_mlx_site, tiny_glm_dir, tmp_path, LONG, name="plain")
    proc, sharded = probe(patched_mlx_site, tiny_glm_dir, tmp_path, LONG, "--shard", name="sharded")
    assert proc.returncode == 0, proc.stderr
    assert rel_err(sharded["prefill"], plain["prefill"]) < 1e-6


@pytest.mark.slow
def test_mlx_lm_generate_produces_tokens_with_the_patched_copy(patched_mlx_site, tiny_glm_dir):
    proc = subprocess.run(
        [
            sys.executable, "-m", "mlx_lm", "generate", "--model", str(tiny_glm_dir),
            "--prompt", "The quick brown fox " * 6, "--max-tokens", "12", "--temp", "0",
            "--ignore-chat-template",
        ],
        env=env_with(patched_mlx_site),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Generation: 12 tokens" in proc.stdout, proc.stdout
