"""The memory budget: one table in GiB for the prompt cache, the wired limit and the
restart strategy, from the host's RAM or its memory cgroup."""

from __future__ import annotations

import plistlib
import runpy
from pathlib import Path

import pytest

from tasks.budget import GiB, compute, wired_mb
from tasks.common import RouteError
from tests.fixtures.fake_mac import run_plan

REPO = Path(__file__).resolve().parents[2]
DATA = {k: v for k, v in runpy.run_path(str(REPO / "group_data/all.py")).items()
        if not k.startswith("_")}
GLM = DATA["model_profiles"]["glm-5.2-mxfp4"]
SMOL = DATA["model_profiles"]["smollm2-135m"]
MAC_RAM = 512 * GiB  # hw.memsize of a 512 GiB Mac Studio (and of the fake Mac)
# GLM-5.2's KV cache in mlx_lm is a 576-value latent a layer plus indexer keys,
# bf16, 78 layers: about 0.1 MB a token (group_data/all.py).
GLM_BYTES_PER_TOKEN = 78 * (576 + 2 * 128) * 2


def budget(ram=MAC_RAM, cgroup=None, prof=GLM, **data):
    return compute(ram, cgroup, prof, {**DATA, **data}, "studio")


def test_glm_on_a_512_gib_mac_every_line_in_gib():
    b = budget()
    assert (b.memory, b.model, b.route) == (496, pytest.approx(404.8), 0.25)
    assert b.cache == pytest.approx(0.5 * (496 - 404.8 - 0.25))  # 45.475 GiB
    assert b.free == pytest.approx(b.cache)
    assert GLM["server_args"]["prompt-cache-bytes"] < 200_000 * GLM_BYTES_PER_TOKEN <= b.cache * GiB
    assert not b.second_copy_fits
    assert b.line() == (
        "memory budget (GiB): RAM 512.00 - headroom 16.00 = 496.00; model 404.80 - route 0.25 "
        "- prompt cache 45.47 = free 45.47; a second copy of the model does NOT fit")
    assert wired_mb(b) == 496 * 1024


def test_other_model_services_count_in_the_budget():
    b = budget(host_other_services=[{"label": "com.milo.qwen-server", "memory_gib": 40}])
    assert b.cache == pytest.approx(0.5 * (496 - 404.8 - 0.25 - 40))
    assert "- com.milo.qwen-server 40.00 -" in b.line()


def test_a_profile_that_does_not_fit_is_refused_with_the_numbers():
    with pytest.raises(RouteError) as refused:
        budget(ram=384 * GiB, model_profile="glm-5.2-mxfp4")
    message = str(refused.value)
    assert message.startswith("studio: model profile 'glm-5.2-mxfp4' does not fit")
    assert "RAM 384.00 - headroom 16.00 = 368.00; model 404.80" in message
    assert "prompt cache 2.00" in message  # the profile's own 2 GiB floor


def test_a_cgroup_limit_below_the_ram_is_the_memory_line_without_the_os_headroom():
    b = budget(ram=24 * GiB, cgroup=int(1.2 * GiB), prof=SMOL, host_memory_route_gib=0.15)
    assert b.memory == pytest.approx(1.2)
    assert b.line().startswith("memory budget (GiB): cgroup limit 1.20 = 1.20; model 0.66")
    assert b.cache == pytest.approx(0.25)  # the profile's floor: 0.5 x spare is below it
    assert not b.second_copy_fits
    roomy = budget(ram=24 * GiB, cgroup=None, prof=SMOL)
    assert roomy.second_copy_fits


def test_a_small_host_keeps_at_least_the_profiles_own_cache():
    b = budget(ram=17.2 * GiB, prof=SMOL)  # 1.2 GiB beside the 16 GiB headroom
    assert b.cache * GiB == SMOL["server_args"]["prompt-cache-bytes"]


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, "half"])
def test_a_fraction_outside_zero_to_one_is_refused(fraction):
    with pytest.raises(RouteError, match=r"server_prompt_cache_fraction must be in \(0, 1\]"):
        budget(server_prompt_cache_fraction=fraction)


def test_a_bad_other_service_entry_says_what_it_needs():
    with pytest.raises(RouteError, match=r'needs a "label" and a "memory_gib"'):
        budget(host_other_services=[{"label": "qwen"}])


@pytest.mark.timeout(120)
def test_the_mac_server_is_started_with_the_budgets_cache_size(tmp_path):
    plan = run_plan(tmp_path)
    assert plan.code == 0, plan.output[-3000:]
    argv = plistlib.loads(
        plan.uploads["/Users/milo/.local/share/mlx-route/state/server.definition.next"].encode()
    )["ProgramArguments"]
    assert argv.count("--prompt-cache-bytes") == 1
    assert int(argv[argv.index("--prompt-cache-bytes") + 1]) == int(budget().cache * GiB)
