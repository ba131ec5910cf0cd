#!/usr/bin/env python3
"""Cache-aware routing against round-robin: two real replicas, one front door.

    python bench/affinity_bench.py [--conversations 3] [--turns 4] [--out FILE]

Two mlx_lm.server processes of the small model (the smollm2-135m profile's
flags, its --prompt-cache-size among them) on loopback, the real proxy.pyz in
front with both as replicas of one model, and the openai SDK as the client.
For each policy (--policies), fresh conversations (their text names the run,
so no policy finds the other's caches) are sent interleaved: turn 1 of every
conversation, then turn 2 of every one, ..., each turn resending the whole
history as chat clients do. More conversations than one replica's prompt
cache holds: round-robin sends a conversation's next turn to a replica that
has evicted it or never saw it; cache-aware sends it back where it was.

Reported per policy: the share of prompt tokens the servers took from their
prompt caches (their own `usage.prompt_tokens_details.cached_tokens`, summed
by the client and checked against the proxy's /metrics), the median time to
first token of turns after the first, and the routing decisions. Every loop
is bounded in count and time; everything talks to 127.0.0.1. Writes JSON
(--out) and prints a table; the numbers go in README and docs/proxy.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx
import openai

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from group_data.all import model_profiles  # noqa: E402  (REPO on sys.path first)
from tests.fixtures.mlx_server import start_mlx_server  # noqa: E402
from tests.fixtures.proxy import start_proxy  # noqa: E402

PROFILE = model_profiles["smollm2-135m"]
NAME = PROFILE["public_name"]
# The shared part of every conversation's context: a few hundred tokens, so a
# turn that misses the cache pays a visible prefill.
CONTEXT = ("You are a careful assistant for a small bakery. The shop opens at seven, "
           "sells bread, rolls, croissants and three kinds of cake, closes on Mondays, "
           "and delivers within ten kilometres for orders above twenty euros. ")


def metric(url: str, line_start: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(line_start))


def opening(run: str, c: int, context_repeats: int) -> list[dict]:
    """A conversation's first messages: its own name first (no two share a prefix
    beyond the chat template's first tokens), then the context."""
    return [{"role": "system",
             "content": f"Run {run}, conversation {c}: customer number {c * 7 + 3}. "
                        + CONTEXT * context_repeats},
            {"role": "user", "content": f"Hello, I am customer {c * 7 + 3}. When do you open?"}]


def run_policy(policy: str, servers, args, log_dir: Path) -> dict:
    """The workload through a fresh proxy with this policy in front of the two servers;
    `args`: conversations, turns, context_repeats, max_tokens, timeout_s, budget_s
    (tests/unit/test_affinity_real.py runs it with small counts)."""
    proxy = start_proxy(servers[0].url, "--public-name", NAME, "--retry-after-ms", "500",
                        "--replica", f"{NAME}={servers[1].url}", "--replica-policy", policy,
                        *getattr(args, "proxy_flag", ()), log_path=log_dir / f"proxy-{policy}.log")
    try:
        ready = time.monotonic() + 120  # both replicas probed (a 1-token generation each)
        while metric(proxy.url, f'proxy_replica_ready{{model="{NAME}"') < 2:
            if time.monotonic() > ready:
                raise SystemExit(f"the proxy's replicas were not ready: {proxy.log()[-2000:]}")
            time.sleep(0.5)
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0,
                               timeout=args.timeout_s)
        run = f"{policy}-{int(time.time())}"
        history = {c: opening(run, c, args.context_repeats) for c in range(args.conversations)}
        turns = []
        deadline = time.monotonic() + args.budget_s
        for turn in range(args.turns):
            for c in range(args.conversations):
                if time.monotonic() > deadline:
                    raise SystemExit(f"over --budget-s {args.budget_s} at {policy}, turn {turn}")
                if turn:
                    history[c].append({"role": "user",
                                       "content": f"Thanks. And question {turn}: what about "
                                                  f"order number {turn * 11 + c}?"})
                started = time.monotonic()
                first = None
                text, usage = [], None
                for chunk in client.chat.completions.create(
                        model=NAME, messages=history[c], max_tokens=args.max_tokens,
                        temperature=0, stream=True, stream_options={"include_usage": True}):
                    if chunk.choices and first is None:  # the first token's event
                        first = time.monotonic() - started
                    if chunk.choices and chunk.choices[0].delta.content:
                        text.append(chunk.choices[0].delta.content)
                    if chunk.usage is not None:
                        usage = chunk.usage
                history[c].append({"role": "assistant", "content": "".join(text)})
                details = usage.prompt_tokens_details
                turns.append({"turn": turn, "conversation": c, "ttft_s": first,
                              "prompt_tokens": usage.prompt_tokens,
                              "cached_tokens": details.cached_tokens if details else 0})
        prompt = sum(t["prompt_tokens"] for t in turns)
        cached = sum(t["cached_tokens"] for t in turns)
        later = [t for t in turns if t["turn"] > 0]
        decisions = {d: metric(proxy.url, f'proxy_affinity_decisions_total{{model="{NAME}",'
                                          f'decision="{d}"}}')
                     for d in ("hit", "miss", "imbalance", "short")}
        return {
            "policy": policy, "requests": len(turns),
            "prompt_tokens": prompt, "cached_tokens": cached,
            "cached_share": cached / prompt if prompt else 0.0,
            "later_cached_share": (sum(t["cached_tokens"] for t in later)
                                   / max(1, sum(t["prompt_tokens"] for t in later))),
            "median_ttft_s": statistics.median(t["ttft_s"] for t in turns),
            "median_later_ttft_s": statistics.median(t["ttft_s"] for t in later) if later
            else None,
            "proxy_prompt_tokens": metric(proxy.url, f'proxy_model_prompt_tokens_total{{model="{NAME}"}}'),
            "proxy_cached_tokens": metric(proxy.url, f'proxy_model_cached_tokens_total{{model="{NAME}"}}'),
            "decisions": decisions if policy == "cache-aware" else {},
            "turns": turns,
        }
    finally:
        proxy.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / ".cache/test-artifacts/smollm2-135m-float32"),
                    help="the small model as an MLX directory (tests/fixtures/smollm2.py makes "
                         "it: run tests/unit/test_two_models.py once)")
    ap.add_argument("--conversations", type=int, default=3,
                    help="interleaved conversations (more than one replica's prompt cache)")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--context-repeats", type=int, default=3,
                    help="copies of the shared context in each conversation's system message")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--policies", default="round-robin,cache-aware")
    ap.add_argument("--proxy-flag", action="append", default=[],
                    help="one more proxy flag, e.g. --proxy-flag=--log-level=DEBUG")
    ap.add_argument("--timeout-s", type=float, default=300, help="one request's limit")
    ap.add_argument("--budget-s", type=float, default=1800, help="one policy's whole run")
    ap.add_argument("--out", default=str(REPO / "bench/results/affinity.json"))
    args = ap.parse_args()
    model = Path(args.model)
    if not (model / "config.json").exists():
        print(f"no MLX model at {model}: give --model DIR", file=sys.stderr)
        return 2
    log_dir = Path(tempfile.mkdtemp(prefix="affinity-bench-"))
    servers = []
    try:
        for i in range(2):
            servers.append(start_mlx_server(model, log_dir / f"server{i}.log",
                                            log_dir / "hf-cache"))
        rows = [run_policy(p, servers, args, log_dir) for p in args.policies.split(",")]
    finally:
        for server in servers:
            server.stop()
    result = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
                         f"load {os.getloadavg()[0]:.1f}",
              "profile": "smollm2-135m",
              "prompt_cache_size": PROFILE["server_args"]["prompt-cache-size"],
              "conversations": args.conversations, "turns": args.turns,
              "max_tokens": args.max_tokens, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['when']}, {result['machine']}; 2 replicas, --prompt-cache-size "
          f"{result['prompt_cache_size']}, {args.conversations} conversations x {args.turns} "
          f"turns")
    print(f"{'policy':<12} {'cached share':>12} {'later turns':>12} {'median TTFT':>12} "
          f"{'later TTFT':>11}  decisions")
    for r in rows:
        print(f"{r['policy']:<12} {r['cached_share']:>12.1%} {r['later_cached_share']:>12.1%} "
              f"{r['median_ttft_s']:>11.2f}s {r['median_later_ttft_s'] or 0:>10.2f}s  "
              f"{r['decisions'] or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
