"""Which replica of a model takes a request: round-robin, least-busy or cache-aware.

mlx_lm.server keeps a few prompt caches (--prompt-cache-size); a conversation
whose earlier turns a replica still holds costs that replica only the new
tokens, anywhere else the whole prompt again (the field report: ~114 tok/s
prefill, so a 200k-token context is ~29 minutes cold). The cache-aware policy
keeps, per replica, an approximate index of the prompts it was sent lately
(as SGLang's router keeps an approximate radix tree per worker, and Ray
Serve's prefix-cache affinity router): the prompt's text (each message's role
and content) is cut into blocks of --affinity-block-chars characters, each
block hashed together with the hash of the blocks before it (as vLLM's prefix
caching hashes token blocks), and the chain of hashes is what a replica "has
seen". A request goes to the ready replica matching the longest run of its
leading blocks, if that run is at least --affinity-min-match of the prompt
and that replica has at most --affinity-max-imbalance more generations in
flight or queued than the least busy one; otherwise to the least busy one.
Ties: fewest in flight, then in turn.

Bounds: each replica's index holds at most --affinity-max-entries block hashes
(an int each in an OrderedDict, about 100 bytes); the least recently used go
first, a prompt's later blocks before its earlier ones (a leaf before its
parents, as in a radix tree), so what is left is still a prefix. A replica that
is not ready has its index emptied (a restarted server has lost its caches).

The index is approximate by design: it does not know what the server evicted
(its LRU of --prompt-cache-size entries), nor the tokens the model generated,
nor the chat template; the counters the server itself reports
(`usage.prompt_tokens_details.cached_tokens`, per replica in /metrics) say how
well it works. None of this runs for a model with one upstream.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, OrderedDict

log = logging.getLogger("mlx-route-proxy")

POLICIES = ("round-robin", "least-busy", "cache-aware")

# prompt_text() joins a prompt's parts with separators chat text does not hold.
_SEP, _END = "\x00", "\x01"


def prompt_text(body: dict) -> str:
    """The request's prompt as one string: its messages (role, content) or its prompt."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if not isinstance(content, str):
                content = json.dumps(content, sort_keys=True)
            parts.append(f"{m.get('role')}{_SEP}{content}{_END}")
        return "".join(parts)
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def block_hashes(text: str, block: int) -> list[int]:
    """The chained hashes of the text's whole blocks (a partial last block is left
    out: it is not yet a prefix a later turn shares)."""
    out, h = [], 0
    for start in range(0, len(text) - block + 1, block):
        h = hash((h, text[start:start + block]))
        out.append(h)
    return out


class PrefixIndex:
    """The block hashes one replica was sent, most recently used last, bounded."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.seen: OrderedDict[int, None] = OrderedDict()

    def match(self, chain: list[int]) -> int:
        """How many leading blocks of the chain this replica has seen."""
        n = 0
        seen = self.seen
        for h in chain:
            if h not in seen:
                break
            n += 1
        return n

    def add(self, chain: list[int]) -> None:
        """Records the chain: the first block most recently used (evicted last)."""
        seen = self.seen
        for h in reversed(chain):
            if h in seen:
                seen.move_to_end(h)
            else:
                seen[h] = None
        while len(seen) > self.max_entries:
            seen.popitem(last=False)

    def clear(self) -> None:
        self.seen.clear()


def load(proxy) -> int:
    """Generations a replica is running or has queued."""
    return proxy.gate.active + len(proxy.gate.waiters)


class Policy:
    """Orders a model's replicas for one request (routing.Router.serve tries them in turn)."""

    def __init__(self, name: str, min_match: float, max_imbalance: int, max_entries: int,
                 block_chars: int):
        if name not in POLICIES:
            raise ValueError(f"policy {name!r} is not one of {', '.join(POLICIES)}")
        self.name = name
        self.min_match = min_match
        self.max_imbalance = max_imbalance
        self.max_entries = max_entries
        self.block_chars = block_chars
        self.turn = 0
        self.indexes: dict[int, PrefixIndex] = {}  # id(Proxy) -> its index
        self.decisions: Counter = Counter()  # (model, decision) -> count

    def index(self, proxy) -> PrefixIndex:
        found = self.indexes.get(id(proxy))
        if found is None:
            found = self.indexes[id(proxy)] = PrefixIndex(self.max_entries)
        return found

    def order(self, replicas: list, body: dict) -> tuple[list, list[int] | None]:
        """(the replicas to try, best first; the prompt's block chain to record, or None).
        Not ready ones are left out; none ready: the first one in turn (it says why)."""
        self.turn += 1
        n = len(replicas)
        turn = [replicas[(self.turn + i) % n] for i in range(n)]
        ready = [p for p in turn if p.ready]
        if not ready:
            return turn[:1], None
        if self.name == "round-robin":
            return ready, None
        ready.sort(key=load)  # stable: ties stay in turn
        if self.name == "least-busy":
            return ready, None
        for p in turn:
            if not p.ready and self.indexes.get(id(p)) and self.indexes[id(p)].seen:
                self.indexes[id(p)].clear()  # down: a restarted server has lost its caches
        chain = block_hashes(prompt_text(body), self.block_chars)
        model = replicas[0].args.public_name
        if not chain:
            self.decisions[(model, "short")] += 1
            return ready, chain
        best, best_n = None, 0
        for p in ready:  # least busy first: ties go to the least busy
            matched = self.index(p).match(chain)
            if matched > best_n:
                best, best_n = p, matched
        if log.isEnabledFor(logging.DEBUG):
            log.debug("cache-aware: %d blocks; matched %s", len(chain), ", ".join(
                f"{p.upstream} {self.index(p).match(chain)} (load {load(p)})" for p in ready))
        if best is None or best_n < self.min_match * len(chain):
            self.decisions[(model, "miss")] += 1
            return ready, chain
        if load(best) - load(ready[0]) > self.max_imbalance:
            self.decisions[(model, "imbalance")] += 1
            return ready, chain
        self.decisions[(model, "hit")] += 1
        return [best, *(p for p in ready if p is not best)], chain

    def served(self, proxy, chain: list[int] | None) -> None:
        """The replica took the request: it now holds (or soon will) the prompt's prefix."""
        if chain:
            self.index(proxy).add(chain)

    def render(self, models: dict) -> list[str]:
        """/metrics lines: routing decisions and index sizes (cache-aware only)."""
        if self.name != "cache-aware":
            return []
        out = ["# HELP proxy_affinity_decisions_total Cache-aware routing decisions, by model: "
               "hit (to the replica with the longest seen prefix), miss (no replica had "
               "--affinity-min-match of the prompt), imbalance (that replica was too busy), "
               "short (prompt under one block).",
               "# TYPE proxy_affinity_decisions_total counter"]
        for (model, decision), n in sorted(self.decisions.items()):
            out.append(f'proxy_affinity_decisions_total{{model="{model}",'
                       f'decision="{decision}"}} {n}')
        out += ["# HELP proxy_affinity_index_blocks Prompt blocks the proxy remembers a replica "
                "was sent (bounded by --affinity-max-entries).",
                "# TYPE proxy_affinity_index_blocks gauge"]
        for model, reps in models.items():
            if len(reps) > 1:
                out += [f'proxy_affinity_index_blocks{{model="{model}",upstream="{p.upstream}"}} '
                        f'{len(self.index(p).seen)}' for p in reps]
        return out


class CacheUsage:
    """Prompt tokens an upstream reported, and how many of them came from its prompt
    cache (`usage.prompt_tokens_details.cached_tokens`, mlx_lm.server 0.32)."""

    __slots__ = ("answers", "prompt", "cached")

    def __init__(self):
        self.answers = self.prompt = self.cached = 0

    def add(self, usage) -> None:
        if not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens")
        if type(prompt) is not int:
            return
        self.answers += 1
        self.prompt += prompt
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        if type(cached) is int and cached > 0:
            self.cached += cached

    def add_event(self, payload: bytes) -> None:
        """The usage of a stream's usage chunk (its data payload)."""
        try:
            chunk = json.loads(payload)
        except ValueError:
            return
        if isinstance(chunk, dict):
            self.add(chunk.get("usage"))

    def render(self) -> list[str]:
        """/metrics lines of a proxy with one upstream."""
        return ["# HELP proxy_prompt_tokens_total Prompt tokens of answered generations, as "
                "the upstream reported them (usage.prompt_tokens; streams: when the client "
                "asked for usage).", "# TYPE proxy_prompt_tokens_total counter",
                f"proxy_prompt_tokens_total {self.prompt}",
                "# HELP proxy_cached_prompt_tokens_total Of those, tokens the upstream took "
                "from its prompt cache (usage.prompt_tokens_details.cached_tokens).",
                "# TYPE proxy_cached_prompt_tokens_total counter",
                f"proxy_cached_prompt_tokens_total {self.cached}"]


def stream_usage(body: dict, ask: bool) -> tuple[bool, bool]:
    """(watch, strip) for a streamed request: watch its usage chunk when the client
    asked for one, or ask for it upstream when `ask` (several upstreams) and strip it
    from the answer again. Changes body when it asks."""
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        return True, False
    if not ask or (options is not None and not isinstance(options, dict)):
        return False, False
    body["stream_options"] = {**(options or {}), "include_usage": True}
    return True, True
