#!/usr/bin/env python3
"""Probe a deployed route and keep a report of it: JSON, Markdown, PNG plots.

    python tools/route_report.py --hosts local://                  # this machine
    python tools/route_report.py --hosts ssh://me@studio           # a Mac over SSH
    python tools/route_report.py --hosts ssh://me@studio --ssh-config reports/ssh/studio.config
                                    # ... with the inventory's key, port, known_hosts
    python tools/route_report.py --from-json probes.json --host-name studio   # rebuild

Runs files/probes.py ON the host with the route's own interpreter (the venv
named in route.json), through testinfra's connection (the same `--hosts` as
the host suite), then writes

    reports/<host>/<UTC timestamp>/report.json   every number, for machines
    reports/<host>/<UTC timestamp>/report.md     the page a person opens
    reports/<host>/<UTC timestamp>/*.png         tokens/s per probe, prefill
                                                 time against prompt length,
                                                 cold vs cached follow-up

Older runs of the same host stay next to it; report.md lists them so runs can
be compared over time. Probe sizes default to the ones the deploy recorded in
route.json (the profile's `bench`, or the bench_* data keys).
"""

from __future__ import annotations

import argparse
import base64
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROBES = REPO / "files" / "probes.py"
DEFAULT_MANIFEST = "~/.local/share/mlx-route/route.json"
SIZE_FLAGS = ("needle_tokens", "cache_tokens", "integers", "prose_words", "timeout_s")
PLOTS = {
    "tokens_per_s.png": "Prefill and decode tokens/s per probe",
    "prefill_vs_length.png": "Time to first token against uncached prompt length",
    "prefix_cache.png": "Cold prefill vs cached follow-up turn",
}


class ReportError(Exception):
    pass


# ---------------------------------------------------------------------------
# Running the probes on the host
# ---------------------------------------------------------------------------


def weights_source(record: dict | None) -> str:
    """Where the weights came from, as the deploy recorded it (the resolved commit)."""
    if not record:
        return ""
    if "repo" in record:
        what = f"{record['repo']}@{record.get('revision')}"
        if record.get("commit") and record["commit"] != record.get("revision"):
            what += f" = commit {record['commit']}"
    else:
        what = f"{record.get('package')} ({record.get('dtype')})"
    return f"; {what}{' (adopted)' if record.get('adopted') else ''}"


def run_probes(target, manifest: str = DEFAULT_MANIFEST, via: str = "proxy",
               sizes: dict | None = None, only: str = "all", ssh_config: str | None = None) -> dict:
    """files/probes.py run on `target` (a testinfra --hosts value or host); its JSON."""
    import testinfra

    host = testinfra.get_host(target, ssh_config=ssh_config) if isinstance(target, str) else target
    path = manifest
    if path.startswith("~/"):
        path = host.run('printf %s "$HOME"').stdout + path[1:]
    f = host.file(path)
    if not f.exists:
        raise ReportError(f"{target}: {path} is missing: run the deploy first")
    route = json.loads(f.content_string)
    python = f"{route['venv']}/bin/python"
    # The script travels inside the command, so a by-hand run needs nothing
    # uploaded beforehand and leaves nothing behind.
    payload = base64.b64encode(PROBES.read_bytes()).decode()
    args = ["--manifest", path, "--via", via, "--only", only]
    for name, value in (sizes or {}).items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    code = ("import base64,sys; "
            "exec(compile(base64.b64decode(sys.argv.pop(1)), 'probes.py', 'exec'))")
    # no `timeout` wrapper: macOS has none; every request has its own deadline
    command = (f"{shlex.quote(python)} -c {shlex.quote(code)} "
               f"{payload} {' '.join(shlex.quote(a) for a in args)}")
    out = host.run(command)
    if out.rc != 0:
        raise ReportError(f"{target}: the probes failed (exit {out.rc}): "
                          f"{(out.stderr or out.stdout).strip()[-800:]}")
    return json.loads(out.stdout)


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def fmt(v, unit: str = "", digits: int = 2) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}{unit}" if isinstance(v, float) else f"{v}{unit}"


def verdicts(data: dict) -> dict:
    """Checks with a limit taken from the profile (route.json `gates`)."""
    out = {}
    limit = (data.get("limits") or {}).get("cache_followup_max_ratio")
    ratio = data["prefix_cache"]["ratio"]
    if limit is not None:
        out["cache_followup"] = {
            "ratio": ratio, "max_ratio": limit,
            "ok": ratio is not None and ratio <= limit,
        }
    return out


def plot(data: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = data["probes"]
    names = [p["name"] for p in probes]
    title = f"{data['host']} - {data['profile']} - {data['started_at']}"
    written = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, colour, what in ((axes[0], "prefill_tok_s", "#4c72b0", "prefill"),
                                  (axes[1], "decode_tok_s", "#dd8452", "decode")):
        values = [p[key] or 0 for p in probes]
        bars = ax.bar(names, values, color=colour)
        ax.bar_label(bars, labels=[fmt(p[key]) for p in probes], fontsize=8)
        ax.set_ylim(0, max(values) * 1.15 or 1)  # room for the labels
        ax.set_title(f"{what} tokens/s")
        ax.set_ylabel("tokens/s")
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    written.append(out / "tokens_per_s.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = [p["prompt_tokens"] - p["cached_tokens"] for p in probes]
    ys = [p["ttft_s"] for p in probes]
    ax.scatter(xs, ys, color="#4c72b0")
    for x, y, n in zip(xs, ys, names):
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if len(set(xs)) > 1:
        # least squares through the points: the slope is seconds per prompt token
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        lo, hi = min(xs), max(xs)
        ax.plot([lo, hi], [my + slope * (lo - mx), my + slope * (hi - mx)], "--", color="grey",
                label=f"{1 / slope:.0f} tok/s" if slope > 0 else "fit")
        ax.legend(fontsize=8)
    ax.set_xlabel("prompt tokens computed (prompt - cached)")
    ax.set_ylabel("time to first token (s)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    written.append(out / "prefill_vs_length.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    cache = data["prefix_cache"]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    bars = ax.bar(["cold", "cached follow-up"], [cache["cold_ttft_s"], cache["followup_ttft_s"]],
                  color=["#c44e52", "#55a868"])
    ax.bar_label(bars, labels=[f"{cache['cold_ttft_s']:.2f} s\n{cache['cold_prompt_tokens']} tok",
                               f"{cache['followup_ttft_s']:.2f} s\n"
                               f"{cache['followup_cached_tokens']}/"
                               f"{cache['followup_prompt_tokens']} cached"], fontsize=8)
    ax.set_ylim(0, max(cache["cold_ttft_s"], cache["followup_ttft_s"]) * 1.25 or 1)
    ax.set_ylabel("time to first token (s)")
    ax.set_title(f"follow-up / cold = {fmt(cache['ratio'], digits=3)}\n{title}", fontsize=9)
    fig.tight_layout()
    written.append(out / "prefix_cache.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def history(host_dir: Path, limit: int = 10) -> list[dict]:
    runs = []
    for path in sorted(host_dir.glob("*/report.json"))[-limit:]:
        try:
            runs.append(json.loads(path.read_text()) | {"_dir": path.parent.name})
        except (OSError, ValueError):
            continue
    return runs


def by_name(data: dict) -> dict:
    return {p["name"]: p for p in data["probes"]}


# The field report's stock run (docs/field-report.md): the row every stock run is read against.
REFERENCE_RUN = {"run_id": "field report: GLM-5.2 MXFP4 on an M3 Ultra", "regime": "stock",
                 "dataset": "terminal-bench-core==0.1.1", "agent": "terminus-2",
                 "model": "openai/glm52", "resolved": 23, "total": 80, "percent": 28.75,
                 "wall_s": 12 * 3600 + 28 * 60}
FAILURE_CLASSES = (("agent_timeout", "Agent timeout"), ("test_failure", "Test failure"),
                   ("route_http_error", "HTTP error from the route"),
                   ("model_output_error", "Model output unusable"),
                   ("harness_error", "Harness error"))


def duration(seconds) -> str:
    if seconds is None:
        return "n/a"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def regime_order(name: str) -> tuple:
    if name == "stock":
        return (0, 0.0)
    try:
        return (1, float(name.rsplit("-x", 1)[1]))
    except (IndexError, ValueError):
        return (2, 0.0)


def workload_markdown(runs: list[dict] | None) -> list[str]:
    """Terminal-Bench runs, one table per timeout regime (never merged), the
    field report's stock run at the head of the stock table."""
    if runs is None:
        return []
    lines = ["## Agent workloads: Terminal-Bench", "",
             "Runs of `tb-route run` on this host (tasks/workload.py), one table per timeout "
             "regime: only `stock` (timeout multiplier 1) compares with the field report; a "
             "diagnostic regime (`diagnostic-x<m>`: agent and test timeouts times m) is shown "
             "apart and never merged. Failure classes: agent timeout, tests run and failed, "
             "an HTTP error from the route (or no answer) in the agent's logs, model output "
             "the agent could not use (unparsable, too long), harness errors (everything "
             "else, and trials the harness never finished).", ""]
    header = ("| Run | Dataset | Agent | Model | Resolved | % | Wall | "
              + " | ".join(label for _, label in FAILURE_CLASSES) + " |")
    rule = "|" + "---|" * (7 + len(FAILURE_CLASSES))
    by_regime: dict[str, list[dict]] = {"stock": []}
    for run in runs:
        by_regime.setdefault(run.get("regime") or "unknown", []).append(run)
    for regime in sorted(by_regime, key=regime_order):
        rows = by_regime[regime]
        title = ("stock (1x timeouts)" if regime == "stock" else
                 f"{regime} (a diagnostic regime: NOT comparable with stock runs)")
        lines += [f"### {title}", "", header, rule]
        if regime == "stock":
            ref = REFERENCE_RUN
            lines.append(f"| *{ref['run_id']}* | {ref['dataset']} | {ref['agent']} | "
                         f"{ref['model']} | {ref['resolved']}/{ref['total']} | "
                         f"{ref['percent']:.2f} | ~{duration(ref['wall_s'])} | "
                         + " | ".join("—" for _ in FAILURE_CLASSES) + " |")
        for run in rows:
            classes = run.get("classes") or {}
            pct = "n/a" if run.get("percent") is None else f"{run['percent']:.2f}"
            unfinished = "" if run.get("finished", True) else " (unfinished)"
            lines.append(f"| {run.get('run_id')}{unfinished} | {run.get('dataset')} | "
                         f"{run.get('agent')} | {run.get('model')} | "
                         f"{run.get('resolved')}/{run.get('total')} | {pct} | "
                         f"{duration(run.get('wall_s'))} | "
                         + " | ".join(str(classes.get(key, 0)) for key, _ in FAILURE_CLASSES)
                         + " |")
        if not rows:
            lines.append("")
            lines.append("No stock run on this host yet (`tb-route run`).")
        lines.append("")
    return lines


def workload_only_markdown(data: dict) -> str:
    lines = [f"# Route report: {data['host']}", "",
             f"- profile `{data.get('profile')}` (served as `{data.get('public_name')}`), "
             f"collected {data['started_at']}; no speed probe in this report", ""]
    return "\n".join(lines + workload_markdown(data.get("workload"))) + "\n"


def markdown(data: dict, runs: list[dict]) -> str:
    if "probes" not in data:
        return workload_only_markdown(data)
    mem, disk, cache = data["memory"], data["disk"], data["prefix_cache"]
    lines = [
        f"# Route report: {data['host']}",
        "",
        f"- profile `{data['profile']}` (served as `{data['public_name']}`), probed via "
        f"{data['via']} {data['endpoint']}",
        f"- started {data['started_at']}, {data['duration_s']} s, {data['system']}",
        f"- sizes: {', '.join(f'{k} {v}' for k, v in data['sizes'].items())}",
        "",
        "## Speed probes",
        "",
        "Prefill is the time to the first streamed token; decode is the rest of the wall "
        "(output tokens after the first over that time). `total tok/s` is all tokens over "
        "the wall, the field report's figure for its needle probe. These are direct endpoint "
        "probes, not an agent benchmark.",
        "",
        "| Probe | Prompt tokens | Cached | Output tokens | Wall (s) | TTFT (s) | "
        "Prefill tok/s | Decode tok/s | Total tok/s | Finish |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in data["probes"]:
        lines.append(
            f"| {p['label']} | {p['prompt_tokens']} | {p['cached_tokens']} | "
            f"{p['output_tokens']} | {fmt(p['wall_s'])} | {fmt(p['ttft_s'])} | "
            f"{fmt(p['prefill_tok_s'])} | {fmt(p['decode_tok_s'])} | {fmt(p['total_tok_s'])} | "
            f"{p['finish_reason']} |")
    needle = by_name(data).get("needle", {})
    lines += ["", f"Needle found in the answer: {needle.get('needle_found', 'n/a')} "
                  f"(answer `{needle.get('answer', '')[:60]!s}`).", ""]
    lines += [
        "![tokens/s per probe](tokens_per_s.png)",
        "",
        "![prefill time against prompt length](prefill_vs_length.png)",
        "",
        "## Prefix cache",
        "",
        f"A {cache['cold_prompt_tokens']}-token prompt nobody sent before took "
        f"{fmt(cache['cold_ttft_s'])} s to its first token; the same conversation with the "
        f"answer and a short new turn ({cache['followup_prompt_tokens']} tokens, "
        f"{cache['followup_cached_tokens']} from the cache) took "
        f"{fmt(cache['followup_ttft_s'])} s: "
        f"**{fmt(cache['ratio'], digits=3)}** of the cold prefill.",
    ]
    for name, v in data.get("verdicts", {}).items():
        lines.append(f"Limit from the profile: at most {v['max_ratio']}: "
                     f"**{'PASS' if v['ok'] else 'FAIL'}**.")
    lines += ["", "![cold vs cached follow-up](prefix_cache.png)", "",
              "## Memory", "",
              "Three different things, kept apart (the field report saw ~368 GB on disk, ~395 GB MLX "
              "peak and ~309 GB RSS for the same model).", "",
              "| What | Value | How |", "|---|---|---|",
              f"| Weights on disk | {gib(disk['apparent_bytes'])} ({disk['files']} files; "
              f"{gib(disk['allocated_bytes'])} allocated) | sizes under `{disk['model_dir']}`"
              f"{weights_source(disk.get('record'))} |",
              f"| Server RSS after load | {gib(mem['rss_loaded_bytes'])} | pid {mem['server_pid']} "
              f"({mem['server_pid_from']}), before the probes |",
              f"| Server RSS peak during probes | {gib(mem['rss_peak_sampled_bytes'])} | "
              f"{mem['rss_samples']} samples, every 0.25 s |",
              f"| Server RSS high-water mark | {gib(mem['rss_hwm_bytes'])} | kernel VmHWM since "
              f"the process started (Linux only) |",
              f"| MLX peak | {gib(mem['mlx_peak_bytes'])} | {mem['mlx_peak_note']} |",
              f"| Host memory | {gib(mem['host_total_bytes'])} | |",
              ""]
    if mem.get("server_command"):
        lines += ["Server command: `" + " ".join(mem["server_command"]) + "`", ""]
    lines += cluster_markdown(data)
    lines += ["## Runs of this host", "",
              "| Run | Tiny wall (s) | Integers decode tok/s | Prose decode tok/s | "
              "Needle prefill tok/s | Cache ratio | RSS peak |",
              "|---|---|---|---|---|---|---|"]
    for run in [r for r in runs if "probes" in r]:
        p = by_name(run)
        g = lambda n, k: p.get(n, {}).get(k)  # noqa: E731
        lines.append(
            f"| {run['_dir']} | {fmt(g('tiny', 'wall_s'))} | "
            f"{fmt(g('integers', 'decode_tok_s'))} | "
            f"{fmt(g('prose', 'decode_tok_s'))} | {fmt(g('needle', 'prefill_tok_s'))} | "
            f"{fmt(run['prefix_cache']['ratio'], digits=3)} | "
            f"{gib(run['memory']['rss_peak_sampled_bytes'])} |")
    lines += [""] + workload_markdown(data.get("workload"))
    return "\n".join(lines) + "\n"


def rates(data: dict) -> dict:
    """probe name -> (prefill tok/s, decode tok/s) of a probes document."""
    return {p["name"]: (p.get("prefill_tok_s"), p.get("decode_tok_s")) for p in data["probes"]}


def single_rank_part(data: dict, single: dict) -> dict:
    """What a report of the same profile on one rank (--single-rank) adds to a
    cluster's report: its rates per probe and where they came from."""
    if "probes" not in single:
        raise ReportError("--single-rank: the file has no probes (a report.json or probes "
                          "JSON of the speed probes is needed)")
    if single.get("cluster"):
        raise ReportError(f"--single-rank: that report is of a cluster of "
                          f"{single['cluster']['size']} ranks, not of one rank")
    if single.get("profile") != data.get("profile"):
        raise ReportError(f"--single-rank: that report is of profile {single.get('profile')!r}, "
                          f"this one of {data.get('profile')!r}: compare the same model")
    return {"host": single.get("host"), "started_at": single.get("started_at"),
            "sizes": single.get("sizes"),
            "rates": {name: {"prefill_tok_s": pre, "decode_tok_s": dec}
                      for name, (pre, dec) in rates(single).items()}}


def cluster_markdown(data: dict) -> list[str]:
    """A cluster host's section: its ranks, backend, sharding and rates, beside one
    rank's when the report was given --single-rank."""
    cluster = data.get("cluster")
    if not cluster:
        return []
    lines = ["## Cluster", "",
             f"{cluster['size']} ranks, `{cluster['backend']}` backend, {cluster['parallel']} "
             f"parallelism; this host runs rank(s) {', '.join(map(str, cluster['local_ranks']))} "
             "(rank 0 serves HTTP).", "",
             "| Rank | Host | Address |", "|---|---|---|"]
    lines += [f"| {r['rank']} | {r['host']} | {r['ip']} |" for r in cluster["ranks"]]
    single = data.get("single_rank")
    n = cluster["size"]
    lines += ["", f"Rates of the {n} ranks beside one rank's (the same model on one "
              "`mlx_lm.server`"
              + (f", {single['host']} at {single['started_at']}, sizes "
                 f"{', '.join(f'{k} {v}' for k, v in (single.get('sizes') or {}).items())})."
                 if single else ": not given; `route_report.py --single-rank REPORT.json` adds "
                 "it from a report of one rank)."), "",
              f"| Probe | Prefill tok/s, {n} ranks | Prefill tok/s, 1 rank | "
              f"Decode tok/s, {n} ranks | Decode tok/s, 1 rank |", "|---|---|---|---|---|"]
    for name, (pre, dec) in rates(data).items():
        one = (single or {}).get("rates", {}).get(name, {})
        lines.append(f"| {name} | {fmt(pre)} | {fmt(one.get('prefill_tok_s'))} | {fmt(dec)} | "
                     f"{fmt(one.get('decode_tok_s'))} |")
    return lines + [""]


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "host"


def build_report(data: dict, out_root: Path, host_name: str | None = None,
                 stamp: str | None = None, single_rank: dict | None = None) -> Path:
    """Write report.json, report.md and the plots; return the run's directory.
    `single_rank`: a report (or probes JSON) of the same profile on one rank,
    whose rates a cluster's report shows beside its own."""
    if single_rank is not None:
        if not data.get("cluster"):
            raise ReportError("--single-rank compares a cluster's rates with one rank's, and "
                              "this report is of one server (route.json has no cluster)")
        data = dict(data, single_rank=single_rank_part(data, single_rank))
    stamp = stamp or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    host_dir = Path(out_root) / safe_name(host_name or data["host"])
    out = host_dir / stamp
    if out.exists():
        raise ReportError(f"{out} exists already: a run is never overwritten")
    out.mkdir(parents=True)
    data = dict(data, verdicts=verdicts(data) if "probes" in data else {}, report_stamp=stamp)
    (out / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    if "probes" in data:
        plot(data, out)
    (out / "report.md").write_text(markdown(data, history(host_dir)))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hosts", help="testinfra host: local://, ssh://user@host[:port]")
    src.add_argument("--from-json", type=Path, help="build the report from a saved probes JSON")
    p.add_argument("--ssh-config", default=None,
                   help="ssh_config file for --hosts ssh://... (the deploy writes one per host)")
    p.add_argument("--route-manifest", default=DEFAULT_MANIFEST,
                   help="route.json on the host (written by the deploy)")
    p.add_argument("--via", choices=["proxy", "server"], default="proxy")
    p.add_argument("--workload-only", action="store_true",
                   help="no speed probe: only the Terminal-Bench runs' summaries (tb-route)")
    p.add_argument("--single-rank", type=Path, default=None,
                   help="a cluster host: a report.json (or probes JSON) of the same profile on "
                        "one rank, whose prefill and decode rates go beside the cluster's")
    p.add_argument("--host-name", default=None,
                   help="folder name under --out (default: the host's hostname)")
    p.add_argument("--out", type=Path, default=REPO / "reports", help="reports root")
    for name in SIZE_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=float if name == "timeout_s" else int,
                       default=None, help="override route.json's bench value")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.from_json:
            data = json.loads(args.from_json.read_text())
        else:
            sizes = {n: getattr(args, n) for n in SIZE_FLAGS}
            data = run_probes(args.hosts, args.route_manifest, args.via, sizes,
                              only="workload" if args.workload_only else "all",
                              ssh_config=args.ssh_config)
        single = json.loads(args.single_rank.read_text()) if args.single_rank else None
        out = build_report(data, args.out, args.host_name, single_rank=single)
    except (ReportError, OSError, ValueError) as e:
        print(f"route_report: {e}", file=sys.stderr)
        return 1
    print(out / "report.md")
    failed = [n for n, v in json.loads((out / "report.json").read_text())["verdicts"].items()
              if not v["ok"]]
    if failed:
        print(f"route_report: over the profile's limit: {', '.join(failed)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
