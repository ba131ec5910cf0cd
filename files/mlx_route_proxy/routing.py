"""Routing by model name: several upstreams (one mlx_lm.server a model) behind one proxy.

The first model is the proxy's own (--upstream, --public-name); each --route
adds one more ({"name", "upstream"} and optionally its watchdog's
"restart_command" and "server_pid_command"); each --alias NAME=MODEL adds a
name clients may send for a model. Every model has its own `Proxy` (its pool,
its concurrency gate, its readiness and watchdog: one server's trouble is not
another's); the first one reads the request and hands it to the model it
names. With one model any name goes to it, as before routing existed. A
reply carries the name the client sent.

On the hot path this is one dict lookup (`Router.pick`).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

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
    for text in aliases:
        alias, sep, target = text.partition("=")
        if not sep or not alias or target not in names:
            raise RouteSpecError(f"--alias {text!r} must be NAME=MODEL with MODEL one of the "
                                 f"names served: {', '.join(sorted(names))}")
        if alias in names or table.get(alias, target) != target:
            raise RouteSpecError(f"--alias {text!r}: {alias!r} already names a model")
        table[alias] = target
    return parsed, table


def route_args(args: argparse.Namespace, route: dict) -> argparse.Namespace:
    """The flags of one more model: the proxy's own, with its name, upstream and watchdog."""
    return argparse.Namespace(**{
        **vars(args), "upstream": route["upstream"], "public_name": route["name"],
        "restart_command": route.get("restart_command"),
        "server_pid_command": route.get("server_pid_command")})


class Router:
    """Which model's `Proxy` answers a name; per-model counts for /metrics."""

    def __init__(self, models: dict, aliases: dict[str, str]):
        self.models = models  # public name -> Proxy, the first one first
        self.first = next(iter(models.values()))
        self.single = len(models) == 1
        self.table = {**{name: proxy for name, proxy in models.items()},
                      **{alias: models[target] for alias, target in aliases.items()}}
        self.aliases = aliases
        self.answers: Counter = Counter()  # (model, status) -> count

    def pick(self, name: str):
        """The model's Proxy for the name a client sent; None: no such model."""
        if self.single:
            return self.first
        return self.table.get(name)

    def count(self, model: str, status: int) -> None:
        self.answers[(model, status)] += 1

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
        for model, proxy in self.models.items():
            for kind, n in sorted(proxy.metrics.upstream_errors.items()):
                out.append(f'proxy_model_upstream_errors_total{{model="{model}",kind="{kind}"}} {n}')
        out += ["# HELP proxy_model_in_flight Generations being served, by model.",
                "# TYPE proxy_model_in_flight gauge"]
        out += [f'proxy_model_in_flight{{model="{m}"}} {p.gate.active}'
                for m, p in self.models.items()]
        out += ["# HELP proxy_model_ready 1 when the model's last probe or generation succeeded.",
                "# TYPE proxy_model_ready gauge"]
        out += [f'proxy_model_ready{{model="{m}"}} {int(p.ready)}' for m, p in self.models.items()]
        return "\n".join(out) + "\n"
