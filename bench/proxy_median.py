#!/usr/bin/env python3
"""`proxy_bench.py` several times: the median and range of each number, and the load.

    python bench/proxy_median.py                        # 5 runs of the zipapp
    python bench/proxy_median.py --also /tmp/old.py     # and 5 of another proxy,
                                                        # alternated run by run

Other jobs on the machine move the numbers more than small changes in the
proxy do; alternating two proxies run by run lets both meet the same load.
The load average (1 min) is read before each run. Options after `--` go to
every proxy_bench.py run (e.g. `-- --first-byte-n 20`). Writes a JSON summary
(--out) with every run in it; each run is bounded by proxy_bench.py's own
bounds, and the whole by --runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

MEASURES = {  # name: (path in proxy_bench.py's JSON, format)
    "direct p50 (ms)": (("latency_ms", "direct_p50"), "{:.2f}"),
    "added p50 (ms)": (("latency_ms", "added_p50"), "{:+.3f}"),
    "added p99 (ms)": (("latency_ms", "added_p99"), "{:+.2f}"),
    "direct req/s": (("throughput", "direct", "rps"), "{:.0f}"),
    "proxy req/s": (("throughput", "proxy", "rps"), "{:.0f}"),
    "proxy/direct": (("throughput", "ratio"), "x{:.3f}"),
    "bound by CPU alone": (("throughput", "cpu_bound"), "x{:.3f}"),
    "CPU/req upstream direct": (("throughput", "direct", "cpu_us_per_request", "upstream"),
                                "{:.0f} us"),
    "CPU/req upstream proxied": (("throughput", "proxy", "cpu_us_per_request", "upstream"),
                                 "{:.0f} us"),
    "CPU/req proxy": (("throughput", "proxy", "cpu_us_per_request", "proxy"), "{:.0f} us"),
    "CPU/req client": (("throughput", "direct", "cpu_us_per_request", "client"), "{:.0f} us"),
    "wrk direct req/s": (("throughput_wrk", "direct", "rps"), "{:.0f}"),
    "wrk proxy req/s": (("throughput_wrk", "proxy", "rps"), "{:.0f}"),
    "wrk proxy/direct": (("throughput_wrk", "ratio"), "x{:.3f}"),
    "wrk bound by CPU alone": (("throughput_wrk", "cpu_bound"), "x{:.3f}"),
    "wrk CPU/req upstream direct": (("throughput_wrk", "direct", "cpu_us_per_request",
                                     "upstream"), "{:.0f} us"),
    "wrk CPU/req upstream proxied": (("throughput_wrk", "proxy", "cpu_us_per_request",
                                      "upstream"), "{:.0f} us"),
    "wrk CPU/req proxy": (("throughput_wrk", "proxy", "cpu_us_per_request", "proxy"),
                          "{:.0f} us"),
    "wrk CPU/req wrk": (("throughput_wrk", "proxy", "cpu_us_per_request", "client"),
                        "{:.0f} us"),
    "first byte added (ms)": (("first_byte_ms", "added_p50"), "{:+.2f}"),
    "after stream leave (s)": (("generating_after_leave_s", "stream_proxy"), "{:.3f}"),
    "after timeout (s)": (("generating_after_leave_s", "nonstream_timeout_proxy"), "{:.3f}"),
}


def pick(res: dict, path: tuple):
    for key in path:
        if not isinstance(res, dict) or key not in res:
            return None  # a result of an older proxy_bench.py
        res = res[key]
    return res


def summary(runs: list[dict]) -> dict:
    out = {}
    for name, (path, _) in MEASURES.items():
        values = [v for v in (pick(r, path) for r in runs) if v is not None]
        if values:
            out[name] = {"median": statistics.median(values), "min": min(values),
                         "max": max(values)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--also", action="append", default=[],
                    help="another proxy (.py or .pyz) run alternately with the zipapp")
    ap.add_argument("--no-zipapp", action="store_true",
                    help="run only the --also proxies (e.g. two frozen builds)")
    ap.add_argument("--out", default=None, help="JSON summary (default: none)")
    ap.add_argument("bench_args", nargs="*", help="after --: options for proxy_bench.py")
    a = ap.parse_args()
    proxies = ([] if a.no_zipapp else [None]) + a.also
    runs: dict[str, list[dict]] = {p or "zipapp": [] for p in proxies}
    loads: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.runs):
            for p in proxies:
                name = p or "zipapp"
                loads.append(os.getloadavg()[0])
                out = Path(tmp) / f"run{i}_{len(runs[name])}.json"
                cmd = [sys.executable, str(HERE / "proxy_bench.py"), "--out", str(out),
                       *(["--proxy", p] if p else []), *a.bench_args]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=600)
                res = json.loads(out.read_text())
                res["load_1m"] = loads[-1]
                runs[name].append(res)
                lat, thr = res["latency_ms"], res["throughput"]
                wrk = (res.get("throughput_wrk") or {}).get("ratio")
                print(f"run {i + 1}/{a.runs} {name}: load {loads[-1]:.1f}, added p50 "
                      f"{lat['added_p50']:+.3f} ms, x{thr['ratio']} (wrk x{wrk}), first byte "
                      f"{res['first_byte_ms']['added_p50']:+.2f} ms", flush=True)
    result = {"load_1m": {"min": min(loads), "max": max(loads)},
              "proxies": {name: {"summary": summary(r), "runs": r} for name, r in runs.items()}}
    print(f"\nmedian (min-max) of {a.runs} runs; load average 1 min "
          f"{min(loads):.1f}-{max(loads):.1f}")
    for name, r in runs.items():
        print(f"  {name}")
        for measure, stats in summary(r).items():
            fmt = MEASURES[measure][1]
            print(f"    {measure:<30} {fmt.format(stats['median']):>9} "
                  f"({fmt.format(stats['min'])} .. {fmt.format(stats['max'])})")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
