"""Routing by model name: several upstreams (one mlx_lm.server a model) behind one proxy.

The first model is the proxy's own (--upstream, --public-name); each --route
adds one more ({"name", "upstream"} and optionally its watchdog's
"restart_command" and "server_pid_command"); each --alias NAME=MODEL adds a
name clients may send for a model; each --replica MODEL=URL one more upstream
serving a model (another server of the same profile, on this host or another).
Every upstream has its own `Proxy` (its pool, its concurrency gate, its
readiness probe and watchdog: one server's trouble is not another's); the
first one reads the request and hands it to the model it names. With one model
any name goes to it, as before routing existed. A reply carries the name the
client sent.

Replicas: a request goes to the replica --replica-policy picks (affinity.py:
round-robin, least-busy: the ready one with the fewest generations in flight,
ties in turn; cache-aware: the one holding the longest prefix of the prompt,
unless it is much busier); a replica whose request fails is marked down and left
out until its own probe gets a token again (Proxy.recover); a request that
never reached a replica (no connection, no answer, not ready, or a 503 from a
replica that is another host's proxy whose server is down or restarting) is
tried on the next ready one, so the client sees a 503 only when none could
take it.

On the hot path this is one dict lookup (`Router.pick`), and with replicas the
policy's ordering (a sort of the few replicas by load; cache-aware: one hash a
block of the prompt and a lookup a block and replica).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from .affinity import Policy

UNKNOWN = "_unknown"  # the /metrics label of names no model answers to (a bounded set)


class RouteSpecError(ValueError):
    """A --route or --alias the proxy cannot use; the message says what to fix."""


def parse_routes(routes: list[str], aliases: list[str], first: str) -> tuple[list[dict], dict]:
    """(routes, {alias: model name}) from the flags; `first` is --public-name."""
    parsed, names = [], {first}
    for text in routes:
        try:
            route = json.loads(text)
        except ValueError as e:
            raise RouteSpecError(f"--route {text!r} is not JSON ({e}); give "
                                 '{"name": ..., "upstream": "http://127.0.0.1:PORT"}') from None
        if not isinstance(route, dict) or not isinstance(route.get("name"), str) \
                or not isinstance(route.get("upstream"), str):
            raise RouteSpecError(f"--route {text!r} needs a \"name\" and an \"upstream\"")
        if not route["upstream"].startswith(("http://", "https://")):
            raise RouteSpecError(f"--route {route['name']!r}: upstream {route['upstream']!r} "
                                 "must be an http:// or https:// URL")
        if route["name"] in names:
            raise RouteSpecError(f"--route {route['name']!r}: that name is already served")
        if bool(route.get("restart_command")) != bool(route.get("server_pid_command")):
            raise RouteSpecError(f"--route {route['name']!r}: restart_command and "
                                 "server_pid_command go together (the watchdog needs both)")
        names.add(route["name"])
        parsed.append(route)
    table = {}
    usage = f"NAME=MODEL with MODEL one of the names served: {', '.join(sorted(names))}"
    for text in aliases:
        alias, target = flag_pair("--alias", text, usage, lambda _, model: model in names)
        if alias in names or table.get(alias, target) != target:
            raise RouteSpecError(f"--alias {text!r}: {alias!r} already names a model")
        table[alias] = target
    return parsed, table


def parse_replicas(replicas: list[str], names: list[str]) -> list[dict]:
    """--replica MODEL=URL flags as routes ({"name", "upstream"}) of known models."""
    parsed = []
    usage = f"MODEL=URL with MODEL one of the names served: {', '.join(names)}"
    for text in replicas:
        model, url = flag_pair("--replica", text, usage, lambda name, _: name in names)
        if not url.startswith(("http://", "https://")):
            raise RouteSpecError(f"--replica {text!r}: {url!r} must be an http:// or https:// "
                                 "URL")
        parsed.append({"name": model, "upstream": url})
    return parsed


def upstream_urls(args: argparse.Namespace, routes: list[dict], replicas: list[dict]) -> list[str]:
    """Every upstream's URL: --upstream, the --routes', the --replicas'."""
    return [args.upstream, *(r["upstream"] for r in routes), *(r["upstream"] for r in replicas)]


def parse_key_files(key_files: list[str], upstreams: list[str]) -> dict[str, str]:
    """--upstream-key-file URL=PATH flags: {upstream URL: key file}."""
    out = {}
    usage = (f"URL=PATH with URL one of the upstream URLs (--upstream, --route, --replica): "
             f"{', '.join(upstreams) or '(none)'}")
    for text in key_files:
        url, path = flag_pair("--upstream-key-file", text, usage,
                              lambda name, value: name in upstreams and bool(value), last=True)
        out[url] = path
    return out


def flag_pair(flag: str, text: str, usage: str, valid, last: bool = False) -> tuple[str, str]:
    """A NAME=VALUE flag split at its first "=" (its last with `last`: URLs hold "="),
    refused with the flag's usage unless both sides are there and valid(name, value)."""
    name, sep, value = text.rpartition("=") if last else text.partition("=")
    if not sep or not name or not valid(name, value):
        raise RouteSpecError(f"{flag} {text!r} must be {usage}")
    return name, value


def read_upstream_key(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read().strip()


def route_args(args: argparse.Namespace, route: dict) -> argparse.Namespace:
    """The flags of one more model: the proxy's own, with its name, upstream and watchdog."""
    return argparse.Namespace(**{
        **vars(args), "upstream": route["upstream"], "public_name": route["name"],
        "restart_command": route.get("restart_command"),
        "server_pid_command": route.get("server_pid_command"),
        "upstream_key": read_upstream_key(route["key_file"]) if route.get("key_file") else None})


class Router:
    """Which model's `Proxy` answers a name; per-model counts for /metrics."""

    def __init__(self, models: dict, aliases: dict[str, str], policy: Policy):
        self.policy = policy  # which replica takes a request (affinity.py)
        self.models = models  # public name -> [Proxy of each replica], the first one first
        self.first = next(iter(models.values()))
        self.single = len(models) == 1
        self.table = {**{name: proxy for name, proxy in models.items()},
                      **{alias: models[target] for alias, target in aliases.items()}}
        self.aliases = aliases
        self.answers: Counter = Counter()  # (model, status) -> count
        self.replica_answers: Counter = Counter()  # (model, upstream, status) -> count
        self.retries: Counter = Counter()  # model -> requests moved to another replica
        for replicas in models.values():
            for proxy in replicas:  # every stream's usage (cached tokens) is counted
                proxy.ask_usage = True

    def pick(self, name: str):
        """The model's replicas (Proxies) for the name a client sent; None: no such model."""
        if self.single:
            return self.first
        return self.table.get(name)

    async def serve(self, replicas, request, started, path, body, *rest):
        """The request on the model's replicas in the policy's order: the next one while
        it never reached one."""
        chain = None
        order = replicas if len(replicas) == 1 else None
        if order is None:
            order, chain = self.policy.order(replicas, body)
        try:
            for proxy in order:
                request.pop("unreached", None)
                resp = await proxy.serve(request, started, path, body, *rest)
                model = proxy.args.public_name
                if len(replicas) > 1:
                    self.replica_answers[(model, proxy.upstream, resp.status)] += 1
                if not request.get("unreached") or request.get("sse") is not None:
                    break
                self.retries[model] += 1
        finally:
            # also when the handler is cancelled: a client that closes its connection
            # at [DONE] may do so while the proxy waits for the upstream's end
            if chain is not None and not request.get("unreached"):
                self.policy.served(proxy, chain)
        self.count(model, resp.status)
        return resp

    def count(self, model: str, status: int) -> None:
        self.answers[(model, status)] += 1

    def down(self, first, first_fresh: bool) -> dict[str, str]:
        """{model: problem} of the models no replica of which is ready (`first`, the
        proxy that answers /health, by its fresh check)."""
        out = {}
        for model, replicas in self.models.items():
            if not any(first_fresh if p is first else p.ready for p in replicas):
                out[model] = "; ".join(p.last_problem for p in replicas)
        return out

    def unknown_message(self, name: str) -> str:
        served = ", ".join(repr(n) for n in self.models)
        aliases = ", ".join(f"{a!r} ({t})" for a, t in sorted(self.aliases.items()))
        return (f"no model {name!r} here; this proxy serves {served}"
                + (f" and the aliases {aliases}" if aliases else "")
                + ": send one of them as 'model' (GET /v1/models lists them)")

    def entries(self) -> list[str]:
        return list(self.models)

    def render(self) -> str:
        """Per-model lines for /metrics: answers, upstream errors, in flight, readiness."""
        out = ["# HELP proxy_model_requests_total Generation answers, by model and HTTP status.",
               "# TYPE proxy_model_requests_total counter"]
        for (model, status), n in sorted(self.answers.items()):
            out.append(f'proxy_model_requests_total{{model="{model}",code="{status}"}} {n}')
        out += ["# HELP proxy_model_upstream_errors_total Upstream failures, by model and kind.",
                "# TYPE proxy_model_upstream_errors_total counter"]
        for model, replicas in self.models.items():
            errors: Counter = Counter()
            for proxy in replicas:
                errors.update(proxy.metrics.upstream_errors)
            for kind, n in sorted(errors.items()):
                out.append(f'proxy_model_upstream_errors_total{{model="{model}",kind="{kind}"}} {n}')
        out += ["# HELP proxy_model_in_flight Generations being served, by model.",
                "# TYPE proxy_model_in_flight gauge"]
        out += [f'proxy_model_in_flight{{model="{m}"}} {sum(p.gate.active for p in reps)}'
                for m, reps in self.models.items()]
        out += ["# HELP proxy_model_ready 1 when a replica of the model is ready (its last probe "
                "or generation succeeded).", "# TYPE proxy_model_ready gauge"]
        out += [f'proxy_model_ready{{model="{m}"}} {int(any(p.ready for p in reps))}'
                for m, reps in self.models.items()]
        out += ["# HELP proxy_model_prompt_tokens_total Prompt tokens of answered generations, "
                "by model, as the upstreams reported them (usage.prompt_tokens).",
                "# TYPE proxy_model_prompt_tokens_total counter"]
        out += [f'proxy_model_prompt_tokens_total{{model="{m}"}} '
                f'{sum(p.usage.prompt for p in reps)}' for m, reps in self.models.items()]
        out += ["# HELP proxy_model_cached_tokens_total Of those, tokens taken from the "
                "upstreams' prompt caches (usage.prompt_tokens_details.cached_tokens).",
                "# TYPE proxy_model_cached_tokens_total counter"]
        out += [f'proxy_model_cached_tokens_total{{model="{m}"}} '
                f'{sum(p.usage.cached for p in reps)}' for m, reps in self.models.items()]
        replicated = {m: reps for m, reps in self.models.items() if len(reps) > 1}
        if replicated:
            out += ["# HELP proxy_replica_requests_total Answers, by model, replica and status.",
                    "# TYPE proxy_replica_requests_total counter"]
            for (model, upstream, status), n in sorted(self.replica_answers.items()):
                out.append(f'proxy_replica_requests_total{{model="{model}",upstream="{upstream}",'
                           f'code="{status}"}} {n}')
            out += ["# HELP proxy_replica_ready 1 while the replica takes requests.",
                    "# TYPE proxy_replica_ready gauge"]
            out += [f'proxy_replica_ready{{model="{m}",upstream="{p.upstream}"}} {int(p.ready)}'
                    for m, reps in replicated.items() for p in reps]
            out += ["# HELP proxy_replica_in_flight Generations being served, by replica.",
                    "# TYPE proxy_replica_in_flight gauge"]
            out += [f'proxy_replica_in_flight{{model="{m}",upstream="{p.upstream}"}} '
                    f'{p.gate.active}' for m, reps in replicated.items() for p in reps]
            out += ["# HELP proxy_replica_retries_total Requests that never reached a replica, "
                    "tried on another.", "# TYPE proxy_replica_retries_total counter"]
            out += [f'proxy_replica_retries_total{{model="{m}"}} {self.retries[m]}'
                    for m in replicated]
            out += ["# HELP proxy_replica_prompt_tokens_total Prompt tokens, by replica.",
                    "# TYPE proxy_replica_prompt_tokens_total counter"]
            out += [f'proxy_replica_prompt_tokens_total{{model="{m}",upstream="{p.upstream}"}} '
                    f'{p.usage.prompt}' for m, reps in replicated.items() for p in reps]
            out += ["# HELP proxy_replica_cached_tokens_total Prompt tokens taken from the "
                    "replica's prompt cache, as it reported them.",
                    "# TYPE proxy_replica_cached_tokens_total counter"]
            out += [f'proxy_replica_cached_tokens_total{{model="{m}",upstream="{p.upstream}"}} '
                    f'{p.usage.cached}' for m, reps in replicated.items() for p in reps]
            out += self.policy.render(self.models)
        return "\n".join(out) + "\n"
