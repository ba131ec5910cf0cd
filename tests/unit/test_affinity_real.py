"""Cache-aware routing against round-robin with two real mlx_lm.server processes of
the small model (the profile's --prompt-cache-size 2) behind the real proxy.pyz,
the openai SDK as the client: bench/affinity_bench.py's workload with small
counts. The servers' own `cached_tokens` decide, not a timing.

3 conversations x 2 turns, interleaved: more than one replica's cache holds (2),
fewer than both hold together (with 6, as many as 3 a replica, every turn would
find its conversation evicted whatever the policy). Round-robin sends each next
turn to the other replica, which never saw it or has since evicted it;
cache-aware sends it back.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench.affinity_bench import run_policy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

WORKLOAD = SimpleNamespace(conversations=3, turns=2, context_repeats=1, max_tokens=1,
                           timeout_s=120, budget_s=150)
POLICIES = ("round-robin", "cache-aware")  # the second must serve clearly more from cache


def test_cache_aware_routing_serves_clearly_more_prompt_tokens_from_cache(
        mlx_server, mlx_server_factory, tmp_path):
    servers = [mlx_server, mlx_server_factory()]
    rows = {policy: run_policy(policy, servers, WORKLOAD, tmp_path) for policy in POLICIES}
    for row in rows.values():
        print(f"{row['policy']}: {row['cached_tokens']}/{row['prompt_tokens']} prompt tokens "
              f"from cache ({row['cached_share']:.0%}), decisions {row['decisions']}")
        # the proxy counted what the servers reported to the client
        assert (row["proxy_prompt_tokens"], row["proxy_cached_tokens"]) == (
            row["prompt_tokens"], row["cached_tokens"])
    base, aware = rows[POLICIES[0]], rows[POLICIES[1]]
    assert aware["cached_share"] > base["cached_share"] + 0.2, rows
    assert aware["cached_tokens"] > 2 * base["cached_tokens"], rows
