"""mlx_lm.server's prompt cache, sized from the host's memory budget.

The seed served GLM-5.2 with `--prompt-cache-bytes 2147483648`: about 20k
tokens of its KV cache, so a long agent transcript never stays cached and every
turn pays the whole prefill again (seed, section 7: 114 tok/s, 29 minutes for
200k tokens). What the host can spare is what is left beside the weights.
"""

from __future__ import annotations

from pyinfra import host

from tasks.common import RouteError
from tasks.host import ram_bytes

GB = 10**9


def cache_budget_bytes(ram: int, prof: dict, fraction: float, overhead: float,
                       headroom_gb: float) -> int:
    """fraction x (RAM - weights while serving - headroom), never below the profile's value."""
    if not 0 < fraction <= 1:
        raise RouteError(f"server_prompt_cache_fraction must be in (0, 1], got {fraction!r}: "
                         f"fix it in inventory.py or group_data/all.py")
    floor = int(prof.get("server_args", {}).get("prompt-cache-bytes") or 0)
    spare = ram - prof["size_gb"] * overhead * GB - headroom_gb * GB
    return max(floor, int(fraction * spare))


def prompt_cache_bytes(prof: dict) -> int | None:
    """The --prompt-cache-bytes to serve with, or None for the profile's own flags."""
    fraction = host.data.get("server_prompt_cache_fraction")
    if fraction is None:
        return None
    if not isinstance(fraction, (int, float)):
        raise RouteError(f"{host.name}: server_prompt_cache_fraction must be a number or None, "
                         f"got {fraction!r}")
    return cache_budget_bytes(
        ram_bytes("; set server_prompt_cache_fraction = None to keep the profile's value"),
        prof, float(fraction),
        float(host.data.get("host_wired_model_overhead") or 1.1),
        float(host.data.get("host_wired_headroom_gb") or 16),
    )
