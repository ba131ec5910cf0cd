"""The patched mlx-lm computes what transformers' GlmMoeDsaForCausalLM (torch,
CPU, float32) computes on the same weights: the reference nobody here wrote.

Prompts: one shorter than index_topk (dense attention everywhere) and one ten
times longer (the indexer picks top-k and the "shared" layers reuse it).
Both for one-shot prefill and for token-by-token decode with the cache.
Needs requirements/reference.txt (torch); deselect with -m "not reference".
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.unit.test_patches_glm import LONG, SHORT, probe, rel_err

pytestmark = pytest.mark.reference

# float32 through a few layers: observed ~6e-7; a wrong top-k gives ~1e-1.
TOLERANCE = 1e-4


def torch_logits(model_dir, tokens) -> np.ndarray:
    try:
        import torch
        from safetensors.numpy import load_file
        from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM
    except ImportError as exc:  # pragma: no cover - environment problem
        pytest.fail(f"{exc}: install requirements/reference.txt or deselect -m 'not reference'")

    cfg = json.loads((model_dir / "config.json").read_text())
    skip = {"architectures", "model_type", "torch_dtype", "dtype"}
    config = GlmMoeDsaConfig(**{k: v for k, v in cfg.items() if k not in skip})
    config._attn_implementation = "eager"
    model = GlmMoeDsaForCausalLM(config).float().eval()

    # The checkpoint keeps one tensor per expert; transformers fuses them.
    weights = load_file(str(model_dir / "model.safetensors"))
    state = {}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp.experts"
        if f"{p}.0.gate_proj.weight" not in weights:
            continue
        experts = range(cfg["n_routed_experts"])
        state[f"{p}.gate_up_proj"] = np.stack(
            [
                np.concatenate(
                    [weights.pop(f"{p}.{e}.gate_proj.weight"), weights.pop(f"{p}.{e}.up_proj.weight")]
                )
                for e in experts
            ]
        )
        state[f"{p}.down_proj"] = np.stack([weights.pop(f"{p}.{e}.down_proj.weight") for e in experts])
    state.update(weights)
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in state.items()}, strict=False
    )
    assert not missing and not unexpected, (missing, unexpected)
    assert model.model.layers[1].self_attn.indexer is None  # shared layers: IndexShare
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


@pytest.mark.parametrize("tokens", [SHORT, LONG], ids=["shorter-than-topk", "10x-topk"])
def test_patched_mlx_lm_matches_transformers_prefill_and_decode(
    patched_mlx_site, tiny_glm_dir, tmp_path, tokens
):
    reference = torch_logits(tiny_glm_dir, tokens)
    proc, got = probe(patched_mlx_site, tiny_glm_dir, tmp_path, tokens)
    assert proc.returncode == 0, proc.stderr
    assert rel_err(got["prefill"], reference) < TOLERANCE
    assert rel_err(got["decode"], reference) < TOLERANCE
    assert (got["prefill"].argmax(-1) == reference.argmax(-1)).all()


def test_dense_shared_layers_disagree_with_transformers_past_topk(
    patched_mlx_site, tiny_glm_dir, tmp_path
):
    """The field report's patches A-C is measurably wrong: the comparison above can fail."""
    reference = torch_logits(tiny_glm_dir, LONG)
    _, dense = probe(patched_mlx_site, tiny_glm_dir, tmp_path, LONG, "--dense-shared")
    assert rel_err(dense["prefill"], reference) > 100 * TOLERANCE
