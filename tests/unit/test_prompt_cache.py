"""The prompt cache is sized from the host's memory, not the seed's fixed 2 GiB."""

from __future__ import annotations

import plistlib

import pytest

from group_data.all import model_profiles
from tasks.common import RouteError
from tasks.prompt_cache import cache_budget_bytes
from tests.fixtures.fake_mac import run_plan

GLM = model_profiles["glm-5.2-mxfp4"]
SMOL = model_profiles["smollm2-135m"]
MAC_RAM = 512 * 2**30  # hw.memsize of a 512 GB Mac Studio (and of the fake Mac)
# GLM-5.2's KV cache in mlx_lm is a 576-value latent a layer plus indexer keys,
# bf16, 78 layers: about 0.1 MB a token (group_data/all.py).
GLM_BYTES_PER_TOKEN = 78 * (576 + 2 * 128) * 2


def test_glm_on_a_512_gb_mac_gets_room_for_a_200k_token_transcript():
    budget = cache_budget_bytes(MAC_RAM, GLM, 0.5, 1.1, 16)
    assert budget == int(0.5 * (MAC_RAM - 368 * 1.1 * 10**9 - 16 * 10**9))
    assert GLM["server_args"]["prompt-cache-bytes"] < 200_000 * GLM_BYTES_PER_TOKEN <= budget


def test_a_small_host_keeps_at_least_the_profiles_own_cache():
    budget = cache_budget_bytes(8 * 2**30, SMOL, 0.5, 1.1, 16)  # nothing spare beside 16 GB
    assert budget == SMOL["server_args"]["prompt-cache-bytes"]


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_a_fraction_outside_zero_to_one_is_refused(fraction):
    with pytest.raises(RouteError, match=r"server_prompt_cache_fraction must be in \(0, 1\]"):
        cache_budget_bytes(MAC_RAM, GLM, fraction, 1.1, 16)


@pytest.mark.timeout(120)
def test_the_mac_server_is_started_with_the_computed_cache_size(tmp_path):
    plan = run_plan(tmp_path)
    assert plan.code == 0, plan.output[-3000:]
    argv = plistlib.loads(
        plan.uploads["/Library/LaunchDaemons/org.mlxroute.server.plist"].encode()
    )["ProgramArguments"]
    assert argv.count("--prompt-cache-bytes") == 1
    assert int(argv[argv.index("--prompt-cache-bytes") + 1]) == cache_budget_bytes(
        MAC_RAM, GLM, 0.5, 1.1, 16)
