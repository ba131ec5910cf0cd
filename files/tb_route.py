#!/usr/bin/env python3
"""Terminal-Bench against this route, the way the field report ran it (stdlib only).

Installed by the deploy (workload_enabled, tasks/workload.py) as
{route_home}/bin/tb-route, which runs this file with the Terminal-Bench venv's
Python and the settings the deploy wrote to {route_home}/workload.json:

    tb-route run                            # the stock regime (workload_timeout_multiplier)
    tb-route run --timeout-multiplier 4     # a diagnostic regime, kept apart
    tb-route run --task-id hello-world      # some tasks only (tb's --task-id)
    tb-route check                          # LiteLLM: a chat and a tool call through the route
    tb-route summarize RUN_DIR              # (re)write RUN_DIR/summary.json
    tb-route list                           # every run's summary, as JSON

`run` is the field report's invocation: `tb run` with the dataset, the agent
(terminus-2), the model as LiteLLM names it (`openai/glm52`), `api_base` the
route's URL as this host reaches it, temperature 0, concurrency and attempts
from data, a run id carrying the date and the timeout regime, its own output
folder per regime, no upload. Before it starts it

- reads the proxy key from the key file into OPENAI_API_KEY (LiteLLM's key);
  the key is never printed or put on a command line, and a key already in the
  environment (e.g. "dummy") is replaced by it;
- puts Docker's folders in front of PATH (a non-login SSH shell on a Mac has
  neither Docker Desktop's, OrbStack's nor Homebrew's);
- raises the open-files soft limit to the hard limit and refuses to start
  when that stays below workload_nofile (the field report's run died of
  Errno 24 at ~24 results with a non-login shell's 256);
- sets LITELLM_LOCAL_MODEL_COST_MAP so LiteLLM does not fetch its price list.

Regimes: a run at multiplier 1 is `stock`, the only one comparable with the
field report's 23/80; any other multiplier is `diagnostic-x<m>`. Runs are
kept under <runs_dir>/<regime>/<run id>/ and summaries are never merged
across regimes. After tb exits, summary.json says: resolved / total, %, wall
time, and the failure classes (agent timeout, test failure, HTTP errors from
the route, model output the agent could not use, harness errors). The
deploy's route report lists them next to the field report's row.

Ctrl-C stops tb (which stops its containers) and still writes the summary:
the trials that did not finish count as harness errors.

Exit: tb's own status for `run` (2 when tb left no results); 2 when the open-
files limit or Docker is missing; 1 with one line on stderr for bad settings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

SCHEMA = 1
# The field report's stock run (docs/field-report.md), shown beside every summary.
REFERENCE = {"label": "field report (GLM-5.2 MXFP4, M3 Ultra)", "regime": "stock",
             "dataset": "terminal-bench-core==0.1.1", "agent": "terminus-2",
             "resolved": 23, "total": 80, "percent": 28.75, "wall_s": 12 * 3600 + 28 * 60}
CLASSES = ("agent_timeout", "test_failure", "route_http_error", "model_output_error",
           "harness_error")
CLASS_LABELS = {"agent_timeout": "agent timeout", "test_failure": "test failure",
                "route_http_error": "HTTP error from the route",
                "model_output_error": "model output unusable", "harness_error": "harness error"}
# What LiteLLM (and the openai SDK under it) write when the route answers with
# an HTTP error or not at all: its exception names and the status it quotes.
HTTP_ERROR = re.compile(
    r"(APIConnectionError|InternalServerError|ServiceUnavailableError|BadGatewayError|"
    r"RateLimitError|APIError|Timeout(?:Error)?|AuthenticationError|NotFoundError|"
    r"Error code: [45]\d\d|status_code[\"']?[:=]\s*[45]\d\d|HTTP/1\.[01]\" [45]\d\d)")
MODEL_OUTPUT_MODES = {"parse_error", "fatal_llm_parse_error", "context_length_exceeded",
                      "output_length_exceeded"}
NO_KEY = "no-key-set"  # LiteLLM needs some key; a proxy without a key ignores it


class SettingsError(Exception):
    pass


class LimitError(Exception):
    pass


# ---------------------------------------------------------------------------
# Settings, regime, environment
# ---------------------------------------------------------------------------


def load_config(path: str) -> dict:
    try:
        with open(os.path.expanduser(path)) as f:
            config = json.load(f)
    except OSError as e:
        raise SettingsError(f"cannot read {path} ({e.strerror}): run the deploy with "
                            "workload_enabled=True") from None
    except ValueError as e:
        raise SettingsError(f"{path} is not JSON ({e}): run the deploy again") from None
    missing = [k for k in ("tb", "api_base", "model", "agent", "runs_dir") if k not in config]
    if missing:
        raise SettingsError(f"{path} lacks {', '.join(missing)}: run the deploy again")
    return config


def regime(multiplier: float) -> str:
    """`stock` at 1x, else `diagnostic-x<m>`: the label of a run everywhere."""
    if multiplier <= 0:
        raise SettingsError(f"the timeout multiplier must be positive, got {multiplier}")
    return "stock" if multiplier == 1 else f"diagnostic-x{multiplier:g}"


def run_id(multiplier: float, now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return f"{now.strftime('%Y-%m-%d__%H-%M-%S')}__{regime(multiplier)}"


def read_key(key_file: str | None) -> str | None:
    if not key_file:
        return None
    path = os.path.expanduser(key_file)
    try:
        with open(path) as f:
            key = f.read().strip()
    except OSError as e:
        raise SettingsError(f"cannot read the proxy key file {key_file} ({e.strerror}); "
                            "set workload_key_file to the key's file on this host") from None
    if not key:
        raise SettingsError(f"the proxy key file {key_file} is empty")
    return key


def docker_path(config: dict, base: str | None = None) -> str:
    """PATH with Docker's folders first (expanded, existing or not: harmless)."""
    base = os.environ.get("PATH", "/usr/bin:/bin") if base is None else base
    first = [os.path.expanduser(p) for p in config.get("docker_path") or []]
    rest = [p for p in base.split(os.pathsep) if p and p not in first]
    return os.pathsep.join(first + rest)


def run_env(config: dict) -> dict:
    env = dict(os.environ)
    env["PATH"] = docker_path(config, env.get("PATH"))
    env["OPENAI_API_KEY"] = read_key(config.get("key_file")) or NO_KEY
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def raise_nofile(minimum: int, limits=resource) -> int:
    """Raise RLIMIT_NOFILE's soft limit as far as the hard limit allows; the new
    soft limit. LimitError (what to do) when it stays below `minimum`."""
    soft, hard = limits.getrlimit(limits.RLIMIT_NOFILE)
    ceiling = hard if hard != limits.RLIM_INFINITY else 1 << 20
    # macOS refuses a soft limit above kern.maxfilesperproc even under an
    # infinite hard limit: try lower values until one is taken
    for want in sorted({ceiling, min(ceiling, 524288), min(ceiling, 65536),
                        min(ceiling, 10240), min(ceiling, minimum)}, reverse=True):
        if want <= soft:
            break
        try:
            limits.setrlimit(limits.RLIMIT_NOFILE, (want, hard))
            soft = want
            break
        except (ValueError, OSError):
            continue
    if soft < minimum:
        shown = "unlimited" if hard == limits.RLIM_INFINITY else hard
        raise LimitError(
            f"the open-files limit is {soft} (hard limit {shown}), below the {minimum} a run "
            "needs (the field report's run died of 'Too many open files' at ~24 results): "
            "raise the hard limit (macOS: the deploy's host_maxfiles, or `sudo launchctl "
            "limit maxfiles 65536 524288`; Linux: `ulimit -Hn` as root or "
            "/etc/security/limits.conf), then run again")
    return soft


def tb_argv(config: dict, multiplier: float, rid: str, out_dir: str,
            dataset_path: str | None = None, task_ids: list[str] = ()) -> list[str]:
    """The `tb run` command line. It never holds the key (that goes in the environment)."""
    argv = [config["tb"], "run"]
    path = dataset_path or config.get("dataset_path")
    if path:
        argv += ["--dataset-path", os.path.expanduser(path)]
    elif config.get("dataset"):
        argv += ["--dataset", config["dataset"]]
    else:
        raise SettingsError("no dataset: set workload_dataset or workload_dataset_path")
    argv += ["--agent", config["agent"], "--model", config["model"],
             "--agent-kwarg", f"api_base={config['api_base']}",
             "--agent-kwarg", f"temperature={config.get('temperature', 0.0)}",
             *[arg for name, value in sorted((config.get("agent_kwargs") or {}).items())
               for arg in ("--agent-kwarg", f"{name}={value}")],
             "--n-concurrent", str(int(config.get("n_concurrent", 1))),
             "--n-attempts", str(int(config.get("n_attempts", 1))),
             "--global-timeout-multiplier", f"{multiplier:g}",
             "--output-path", out_dir, "--run-id", rid, "--no-upload-results"]
    for task in task_ids:
        argv += ["--task-id", task]
    return argv


# ---------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _seconds(start: str | None, end: str | None) -> float | None:
    try:
        return round((datetime.fromisoformat(end) - datetime.fromisoformat(start))
                     .total_seconds(), 1)
    except (TypeError, ValueError):
        return None


def http_errors(trial_dir: Path) -> int:
    """Lines of a trial's logs that quote an HTTP error (or no answer) from the route."""
    count = 0
    for path in sorted(trial_dir.rglob("*")):
        if path.is_file() and path.suffix in (".log", ".json", ".txt") and \
                path.stat().st_size < 20 * 2**20 and path.name != "prompt.txt":
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            count += sum(1 for line in text.splitlines() if HTTP_ERROR.search(line))
    return count


def classify(trial: dict, errors: int) -> str | None:
    """None for a resolved trial, else one of CLASSES."""
    if trial.get("is_resolved"):
        return None
    mode = trial.get("failure_mode") or "unset"
    if mode == "agent_timeout":
        return "agent_timeout"
    if mode in MODEL_OUTPUT_MODES:
        return "model_output_error"
    if mode in ("unset", "none", "test_timeout") and trial.get("parser_results"):
        return "test_failure"
    if errors:
        return "route_http_error"
    return "harness_error"


def summarize(run_dir: Path, tb_exit: int | None = None, wall_s: float | None = None,
              extra: dict | None = None) -> dict:
    """Read tb's output in `run_dir`; write and return summary.json."""
    run_dir = Path(run_dir)
    meta = _read_json(run_dir / "run_metadata.json") or {}
    results = _read_json(run_dir / "results.json")
    old = _read_json(run_dir / "summary.json") or {}
    info = dict(old.get("invocation") or {}, **(extra or {}))
    multiplier = float(info.get("timeout_multiplier", 1.0))
    trials, counts = [], dict.fromkeys(CLASSES, 0)
    http_events = 0
    for trial in (results or {}).get("results", []):
        trial_dir = run_dir / trial.get("task_id", "") / trial.get("trial_name", "")
        errors = http_errors(trial_dir) if trial_dir.is_dir() else 0
        http_events += errors
        cls = classify(trial, errors)
        if cls:
            counts[cls] += 1
        trials.append({"task_id": trial.get("task_id"), "trial": trial.get("trial_name"),
                       "resolved": bool(trial.get("is_resolved")),
                       "failure_mode": trial.get("failure_mode"), "class": cls,
                       "http_errors": errors,
                       "agent_s": _seconds(trial.get("agent_started_at"),
                                           trial.get("agent_ended_at"))})
    expected = None
    if meta.get("dataset_size") is not None:
        expected = int(meta["dataset_size"]) * int(meta.get("n_attempts") or 1)
    total = max(expected or 0, len(trials))
    # trials the harness never finished (it died, or was stopped) are its errors
    counts["harness_error"] += total - len(trials)
    resolved = sum(1 for t in trials if t["resolved"])
    wall = wall_s if wall_s is not None else old.get("wall_s")
    if wall is None:
        wall = _seconds(meta.get("start_time"), meta.get("end_time"))
    summary = {
        "schema": SCHEMA,
        "run_id": meta.get("run_id") or run_dir.name,
        "regime": regime(multiplier),
        "stock": multiplier == 1,
        "timeout_multiplier": multiplier,
        "dataset": meta.get("dataset_name") and
        f"{meta['dataset_name']}=={meta.get('dataset_version')}" or meta.get("dataset_path"),
        "agent": meta.get("agent_name"),
        "model": meta.get("model_name"),
        "started_at": meta.get("start_time"),
        "ended_at": meta.get("end_time"),
        "wall_s": wall,
        "resolved": resolved,
        "total": total,
        "percent": round(100 * resolved / total, 2) if total else None,
        "classes": counts,
        "http_error_lines": http_events,
        "finished": results is not None,
        "tb_exit": tb_exit if tb_exit is not None else old.get("tb_exit"),
        "trials": trials,
        "invocation": info,
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def describe(s: dict) -> str:
    pct = "n/a" if s["percent"] is None else f"{s['percent']:.2f} %"
    wall = "n/a" if s["wall_s"] is None else f"{s['wall_s'] / 60:.1f} min"
    failures = ", ".join(f"{CLASS_LABELS[c]} {n}" for c, n in s["classes"].items() if n)
    return (f"[{s['regime']}] {s['run_id']}: {s['resolved']}/{s['total']} resolved ({pct}) "
            f"in {wall}; failures: {failures or 'none'}")


def list_runs(runs_dir: str) -> list[dict]:
    root = Path(os.path.expanduser(runs_dir))
    runs = []
    for path in sorted(root.glob("*/*/summary.json")):
        data = _read_json(path)
        if data:
            data.pop("trials", None)
            runs.append(data)
    return runs


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def cmd_run(config: dict, args) -> int:
    multiplier = args.timeout_multiplier
    if multiplier is None:
        multiplier = float(config.get("timeout_multiplier", 1.0))
    label = regime(multiplier)
    env = run_env(config)
    soft = raise_nofile(int(config.get("nofile", 8192)))
    if not shutil.which("docker", path=env["PATH"]):
        raise LimitError(f"`docker` is not on PATH ({env['PATH']}): start Docker Desktop or "
                         "OrbStack, or add its folder to workload_docker_path")
    rid = args.run_id or run_id(multiplier)
    out_dir = os.path.join(os.path.expanduser(config["runs_dir"]), label)
    os.makedirs(out_dir, exist_ok=True)
    if args.api_base:
        config = dict(config, api_base=args.api_base.rstrip("/"))
    argv = tb_argv(config, multiplier, rid, out_dir, args.dataset_path, args.task_id or [])
    print(f"tb-route: {label} run {rid}, open files {soft}, key "
          f"{'from ' + config['key_file'] if config.get('key_file') else 'none (proxy without key)'}",
          flush=True)
    print("tb-route: " + " ".join(argv), flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env)
    try:
        proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C: let tb stop its trial and its containers, then summarize what ran
        print("tb-route: interrupted: stopping tb (its containers too), then summarizing",
              file=sys.stderr, flush=True)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(300)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            proc.wait()
    wall = round(time.monotonic() - started, 1)
    run_dir = Path(out_dir) / rid
    if not run_dir.is_dir():
        print(f"tb-route: tb exited {proc.returncode} and left no {run_dir}", file=sys.stderr)
        return 2
    summary = summarize(run_dir, proc.returncode, wall, {
        "timeout_multiplier": multiplier, "api_base": config["api_base"],
        "model": config["model"], "agent": config["agent"],
        "n_concurrent": int(config.get("n_concurrent", 1)),
        "n_attempts": int(config.get("n_attempts", 1)),
        "dataset": args.dataset_path or config.get("dataset_path") or config.get("dataset"),
        "nofile": soft})
    print("tb-route: " + describe(summary), flush=True)
    print(f"tb-route: {run_dir / 'summary.json'}", flush=True)
    if proc.returncode != 0:
        return proc.returncode
    return 0 if summary["finished"] else 2


def cmd_check(config: dict, args) -> int:
    """LiteLLM, as terminal-bench installs it: a chat, then a tool call, with the key."""
    env = run_env(config)
    os.environ.update({k: env[k] for k in ("OPENAI_API_KEY", "LITELLM_LOCAL_MODEL_COST_MAP")})
    import litellm  # the Terminal-Bench venv's

    key = os.environ["OPENAI_API_KEY"]
    common = {"model": config["model"], "api_base": config["api_base"], "api_key": key,
              "temperature": config.get("temperature", 0.0), "timeout": args.timeout_s}
    check = config.get("check") or {}
    out = {}
    started = time.monotonic()
    reply = litellm.completion(messages=check.get("chat_messages") or [
        {"role": "user", "content": "What is the capital of France?"}],
        max_tokens=int(check.get("max_tokens", 32)), **common)
    out["chat"] = {"wall_s": round(time.monotonic() - started, 2),
                   "content": reply.choices[0].message.content, "model": reply.model}
    if check.get("tools"):
        started = time.monotonic()
        reply = litellm.completion(messages=check["tool_call_messages"], tools=check["tools"],
                                   max_tokens=int(check.get("max_tokens", 32)), **common)
        calls = reply.choices[0].message.tool_calls or []
        out["tool_call"] = {
            "wall_s": round(time.monotonic() - started, 2),
            "finish_reason": reply.choices[0].finish_reason,
            "calls": [{"name": c.function.name, "arguments": json.loads(c.function.arguments)}
                      for c in calls]}
    print(json.dumps(out, indent=2))
    ok = bool(out["chat"]["content"])
    want = check.get("tool_call_expect")
    if want:
        got = out["tool_call"]["calls"]
        ok = ok and len(got) == 1 and got[0]["name"] == want["name"] and all(
            str(got[0]["arguments"].get(k, "")).lower() == str(v).lower()
            for k, v in want["arguments"].items())
    if not ok:
        print("tb-route: LiteLLM's chat or tool call through the route did not give the "
              "expected answer (above)", file=sys.stderr)
    return 0 if ok else 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tb-route", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="~/.local/share/mlx-route/workload.json",
                   help="settings written by the deploy")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run Terminal-Bench against the route, then summarize")
    run.add_argument("--timeout-multiplier", type=float, default=None,
                     help="1 = stock (default: workload_timeout_multiplier); any other "
                          "value is a diagnostic regime, kept apart")
    run.add_argument("--dataset-path", default=None, help="a local folder of tasks instead")
    run.add_argument("--task-id", action="append", help="only these tasks (repeatable)")
    run.add_argument("--run-id", default=None, help="default: <UTC date>__<regime>")
    run.add_argument("--api-base", default=None,
                     help="another URL of the route (same key) than workload_api_base's")
    check = sub.add_parser("check", help="LiteLLM: a chat and a tool call through the route")
    check.add_argument("--timeout-s", type=float, default=600)
    summ = sub.add_parser("summarize", help="(re)write RUN_DIR/summary.json")
    summ.add_argument("run_dir", type=Path)
    sub.add_parser("list", help="every run's summary, as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
        if args.command == "run":
            return cmd_run(config, args)
        if args.command == "check":
            return cmd_check(config, args)
        if args.command == "summarize":
            print(describe(summarize(args.run_dir)))
            return 0
        print(json.dumps(list_runs(config["runs_dir"]), indent=2))
        return 0
    except SettingsError as e:
        print(f"tb-route: {e}", file=sys.stderr)
        return 1
    except LimitError as e:
        print(f"tb-route: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
