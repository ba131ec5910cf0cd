"""The gates' and probes' data reach the host: route.json carries them as deployed."""

from __future__ import annotations

import json

import pytest

from group_data.all import model_profiles
from tests.fixtures.fake_mac import run_plan

ROUTE_JSON = "/Users/milo/.local/share/mlx-route/route.json"
# what tests/host/test_gates.py reads from a profile's gates
GATE_KEYS = {"tools", "tool_call_messages", "tool_call_expect", "tool_result",
             "tool_result_expect", "max_tokens", "max_wall_s", "concurrent_requests",
             "cache_prompt_tokens", "cache_followup_max_ratio", "hermes_provider",
             "hermes_model", "hermes_tasks", "hermes_timeout_s"}
BENCH_KEYS = {"needle_tokens", "cache_tokens", "integers", "prose_words", "timeout_s"}


@pytest.mark.parametrize("name", sorted(model_profiles))
def test_every_profile_defines_every_gate_and_probe_size(name):
    prof = model_profiles[name]
    assert set(prof["gates"]) == GATE_KEYS
    assert set(prof["bench"]) == BENCH_KEYS
    expect = prof["gates"]["tool_call_expect"]
    assert expect["name"] in [t["function"]["name"] for t in prof["gates"]["tools"]]
    assert prof["gates"]["tool_result_expect"] in prof["gates"]["tool_result"]


@pytest.mark.timeout(120)
def test_route_json_carries_the_gates_and_the_bench_keys_override_the_profile(tmp_path):
    plan = run_plan(tmp_path, None, "bench_needle_tokens=300")
    assert plan.code == 0, plan.output[-3000:]
    manifest = json.loads(plan.uploads[ROUTE_JSON])
    glm = model_profiles["glm-5.2-mxfp4"]
    assert manifest["gates"] == json.loads(json.dumps(glm["gates"]))
    assert manifest["bench"] == {**glm["bench"], "needle_tokens": 300}


@pytest.mark.timeout(120)
def test_a_probe_size_that_is_not_a_positive_number_is_refused(tmp_path):
    plan = run_plan(tmp_path, None, "bench_integers=-5")
    assert plan.code != 0
    assert "bench_integers must be a positive number, got -5" in plan.output
