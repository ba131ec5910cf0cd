#!/usr/bin/env python3
"""Direct vs through the proxy (the zipapp the deploy ships): what it costs and saves.

    python bench/proxy_bench.py                       # against the stand-in upstream
    python bench/proxy_bench.py --mlx-model DIR       # against a real mlx_lm.server

Measures (issue "the proxy", item 10):
  added latency   p50/p99 of sequential 1-token requests, proxy minus direct
  throughput      requests/s with --clients concurrent clients, direct and proxy:
                  this script's own aiohttp clients, then (stand-in upstream,
                  when `wrk` is installed: apt-get install wrk) as many wrk
                  connections
  first byte      time to the first streamed byte, direct and proxy
  stop after leave  how long the upstream keeps generating after a client
                  leaves: a streaming client, and a non-streaming client that
                  times out (the field report's wedge: direct, it runs to max_tokens)

Every loop is bounded in count and in time; everything talks to 127.0.0.1.
Writes a JSON file (--out) and prints a table. Numbers go in README.md.

Why two load generators: on a small machine the clients share the cores with
the proxy and the upstream. The aiohttp clients cost about as much CPU per
request as the upstream does, so their throughput ratio counts the clients'
CPU against the proxy; wrk (C, a few us a request) leaves the two cores to the
proxy and the upstream, as clients on other machines of the LAN do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tasks.proxy_artifact import write_zipapp  # noqa: E402  (REPO on sys.path first)
from tests.fixtures.ports import free_port, wait_port  # noqa: E402
from tests.fixtures.mlx_server import mlx_env  # noqa: E402  (the deploy's BLAS on Linux)
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
# The leave test needs an answer longer than the test (a real model stops early).
LONG = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Bench:
    def __init__(self, args, direct: str, proxy: str, stub: bool, server_pid: int | None,
                 proxy_pid: int | None = None):
        self.args, self.direct, self.proxy, self.stub = args, direct, proxy, stub
        self.server_pid, self.proxy_pid = server_pid, proxy_pid

    def body(self, stream=False, tokens=1, **stub):
        body = {"messages": PROMPT, "max_tokens": tokens, "stream": stream,
                "temperature": 0}
        if self.stub:
            body["stub"] = {"tokens": tokens, **stub}
        return body

    async def one(self, session, base, body) -> float:
        t0 = time.perf_counter()
        async with session.post(base + "/v1/chat/completions", json=body) as r:
            await r.read()
            assert r.status == 200, (r.status, base)
        return time.perf_counter() - t0

    async def latency(self, session, n) -> tuple[list[float], list[float]]:
        """Sequential requests, direct and proxy alternating so that load from
        elsewhere on the machine falls on both alike."""
        body = self.body()
        for _ in range(min(20, n)):  # warm up
            await self.one(session, self.direct, body)
            await self.one(session, self.proxy, body)
        direct, proxy, end = [], [], time.monotonic() + 2 * self.args.phase_s
        while len(direct) < n and time.monotonic() < end:
            direct.append(await self.one(session, self.direct, body))
            proxy.append(await self.one(session, self.proxy, body))
        return direct, proxy

    async def throughput(self, session, clients) -> dict:
        """Direct and proxy in alternating slices (--rounds of each), so that load
        from elsewhere on the machine, which comes and goes, falls on both alike."""
        body = self.body()
        slice_s = self.args.phase_s / self.args.rounds
        limit = self.args.max_requests // self.args.rounds
        totals = {base: {"requests": 0, "errors": 0, "seconds": 0.0}
                  for base in (self.direct, self.proxy)}
        # CPU seconds of each process in the slices of each side: what one
        # request costs the upstream, the proxy and this client (what bounds
        # the ratio when the cores are full)
        pids = {"upstream": self.server_pid, "proxy": self.proxy_pid, "client": os.getpid()}
        cpu = {base: dict.fromkeys(pids, 0.0) for base in totals}

        async def one_slice(base):
            done, errors = 0, 0
            end = time.monotonic() + slice_s

            async def client():
                nonlocal done, errors
                while time.monotonic() < end and done + errors < limit:
                    try:
                        await self.one(session, base, body)
                        done += 1
                    except (AssertionError, aiohttp.ClientError):
                        errors += 1
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            t0 = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(clients)))
            for name, pid in pids.items():
                cpu[base][name] += cpu_seconds(pid) - before[name]
            total = totals[base]
            total["requests"] += done
            total["errors"] += errors
            total["seconds"] += time.perf_counter() - t0

        for _ in range(self.args.rounds):
            await one_slice(self.direct)
            await one_slice(self.proxy)
        return summarize(totals[self.direct], totals[self.proxy], cpu[self.direct],
                         cpu[self.proxy])

    def throughput_wrk(self, clients) -> dict | None:
        """As throughput(), with wrk as the clients: --clients connections on one
        thread, direct and proxy in alternating whole-second slices. None when
        wrk is not installed."""
        wrk = shutil.which("wrk")
        if wrk is None:
            print("bench: wrk is not installed (apt-get install wrk): "
                  "the wrk throughput phase is skipped", file=sys.stderr)
            return None
        slice_s = max(1, round(self.args.phase_s / self.args.rounds))
        totals = {base: {"requests": 0, "errors": 0, "seconds": 0.0}
                  for base in (self.direct, self.proxy)}
        pids = {"upstream": self.server_pid, "proxy": self.proxy_pid}
        cpu = {base: dict.fromkeys([*pids, "client"], 0.0) for base in totals}
        body = self.body()
        for _ in range(self.args.rounds):
            for base in totals:
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                summary = run_wrk(wrk, base + "/v1/chat/completions", body, clients, slice_s)
                for name, pid in pids.items():
                    cpu[base][name] += cpu_seconds(pid) - before[name]
                cpu[base]["client"] += summary["cpu_s"]
                total = totals[base]
                total["requests"] += summary["ok"]
                total["errors"] += summary["errors"]
                total["seconds"] += summary["seconds"]
        return summarize(totals[self.direct], totals[self.proxy], cpu[self.direct],
                         cpu[self.proxy])

    async def first_byte(self, session, n) -> tuple[list[float], list[float]]:
        """Time to the first streamed token, direct and proxy alternating."""
        body = self.body(stream=True, tokens=self.args.stream_tokens,
                         delay_s=self.args.stream_delay_s)
        out = {self.direct: [], self.proxy: []}
        end = time.monotonic() + self.args.phase_s * 8
        for _ in range(n):
            if time.monotonic() > end:
                break
            for base in (self.direct, self.proxy):
                t0 = time.perf_counter()
                async with session.post(base + "/v1/chat/completions", json=body) as r:
                    async for chunk in r.content.iter_any():
                        if b"data: {" in chunk:
                            out[base].append(time.perf_counter() - t0)
                            break
                    r.close()  # leave: the rest is not measured here
                await asyncio.sleep(0.05)
        return out[self.direct], out[self.proxy]

    async def run_after_leave(self, base, stream: bool) -> float | None:
        """Seconds the upstream kept generating after the client left."""
        tokens = self.args.leave_tokens
        body = dict(self.body(stream=stream, tokens=tokens, delay_s=0.01), messages=LONG)
        before = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=None if stream else self.args.leave_after_s)
        left = None
        async with aiohttp.ClientSession(timeout=timeout) as s:
            try:
                async with s.post(base + "/v1/chat/completions", json=body) as r:
                    seen = 0
                    async for chunk in r.content.iter_any():
                        seen += chunk.count(b"data: {")
                        if seen >= 3:
                            break
                    left = time.monotonic()
                    r.close()
            except asyncio.TimeoutError:
                left = time.monotonic()
        if self.stub:
            return await self.stub_stop_time(before, left)
        return await self.cpu_stop_time(left)

    async def stub_stop_time(self, before, left) -> float | None:
        end = time.monotonic() + 15
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < end:
                async with s.get(self.direct + "/_stub/generations") as r:
                    gens = [g for g in await r.json() if g["started"] >= before]
                if gens and gens[-1]["finished"] is not None:
                    return gens[-1]["finished"] - left
                await asyncio.sleep(0.01)
        return None

    async def cpu_stop_time(self, left) -> float | None:
        """The real server: when its CPU use falls to idle after the client left."""
        tick, idle_needed = 0.02, 10
        last_busy, idle_run = left, 0
        prev = cpu_seconds(self.server_pid)
        end = left + 60
        while time.monotonic() < end and idle_run < idle_needed:
            await asyncio.sleep(tick)
            now_cpu = cpu_seconds(self.server_pid)
            if now_cpu - prev > tick * 0.3:  # above ~30% of a core: still generating
                last_busy, idle_run = time.monotonic(), 0
            else:
                idle_run += 1
            prev = now_cpu
        return last_busy - left

    async def run(self) -> dict:
        a = self.args
        res = {"upstream": "stand-in" if self.stub else "mlx_lm.server", "clients": a.clients,
               "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
               "python": platform.python_version()}
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as s:
            lat_d, lat_p = await self.latency(s, a.latency_n)
            res["latency_ms"] = {
                "direct_p50": 1e3 * pct(lat_d, .5), "direct_p99": 1e3 * pct(lat_d, .99),
                "proxy_p50": 1e3 * pct(lat_p, .5), "proxy_p99": 1e3 * pct(lat_p, .99),
                "added_p50": 1e3 * (pct(lat_p, .5) - pct(lat_d, .5)),
                "added_p99": 1e3 * (pct(lat_p, .99) - pct(lat_d, .99)),
                "n": [len(lat_d), len(lat_p)]}
            res["throughput"] = await self.throughput(s, a.clients)
            # Against a real server, no: wrk drops the requests in flight when a
            # slice ends, and the server still generates them (~80 ms each on these
            # cores, 16 at a time), so whole-second slices would measure mostly
            # abandoned work (one run: 6.0 direct vs 3.6 requests/s proxied, with
            # 185 vs 307 ms of the server's CPU counted per answered request).
            res["throughput_wrk"] = self.throughput_wrk(a.clients) if self.stub else None
            fd, fp = await self.first_byte(s, a.first_byte_n)
            res["first_byte_ms"] = {"direct_p50": 1e3 * statistics.median(fd),
                                    "proxy_p50": 1e3 * statistics.median(fp),
                                    "added_p50": 1e3 * (statistics.median(fp)
                                                        - statistics.median(fd)),
                                    "n": [len(fd), len(fp)]}
        res["generating_after_leave_s"] = {
            "stream_direct": await self.run_after_leave(self.direct, True),
            "stream_proxy": await self.run_after_leave(self.proxy, True),
            "nonstream_timeout_direct": await self.run_after_leave(self.direct, False),
            "nonstream_timeout_proxy": await self.run_after_leave(self.proxy, False)}
        return round_all(res)


# wrk's request (one JSON body, POSTed on every connection) and its result, one
# JSON line on stdout after wrk's own report; non-2xx answers are errors.
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = BODY
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('\\nWRK {"requests": %d, "status_errors": %d, "errors": %d, '
    .. '"us": %d}\\n', summary.requests, e.status,
    e.connect + e.read + e.write + e.status + e.timeout, summary.duration))
end
"""


def lua_string(text: str) -> str:
    """`text` as a Lua string literal: its UTF-8 bytes, quotes, backslashes and
    control bytes as three-digit decimal escapes, the rest as they are."""
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:03d}"
                         for b in text.encode()) + '"'


def run_wrk(wrk: str, url: str, body: dict, clients: int, seconds: int) -> dict:
    """One wrk run POSTing `body` to `url` on `clients` connections for `seconds`:
    requests answered 2xx ("ok"), errors (non-2xx included), the seconds it ran
    and the CPU it used ("cpu_s": RUSAGE_CHILDREN across the run, which counts
    only wrk as long as no other child of this process ends meanwhile; the
    bench's upstream and proxy end only after the measures)."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(WRK_SCRIPT.replace("BODY", lua_string(json.dumps(body))))
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        run = subprocess.run([wrk, "-t1", f"-c{clients}", f"-d{seconds}s", "--timeout", "10s",
                              "-s", str(script), url],
                             capture_output=True, text=True, timeout=seconds + 30)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for line in run.stdout.splitlines():
        if run.returncode == 0 and line.startswith("WRK "):
            r = json.loads(line[4:])
            return {"ok": r["requests"] - r["status_errors"], "errors": r["errors"],
                    "seconds": r["us"] / 1e6,
                    "cpu_s": (after.ru_utime - children.ru_utime
                              + after.ru_stime - children.ru_stime)}
    raise SystemExit(f"bench: wrk failed ({run.returncode}): "
                     f"{run.stderr.strip() or run.stdout.strip()}")


def summarize(direct: dict, proxy: dict, cpu_direct: dict, cpu_proxy: dict) -> dict:
    """A throughput phase's result from its totals (requests, errors, seconds)
    and the CPU seconds of each process on each side: requests/s, CPU per
    request (the proxy's only where it ran), the ratio and its ceiling."""
    for total, cpu, side in ((direct, cpu_direct, "direct"), (proxy, cpu_proxy, "proxy")):
        total["rps"] = round(total["requests"] / total["seconds"], 1)
        total["cpu_us_per_request"] = {
            name: round(1e6 * seconds / max(1, total["requests"]))
            for name, seconds in cpu.items() if side == "proxy" or name != "proxy"}
        total["seconds"] = round(total["seconds"], 3)
    return {"direct": direct, "proxy": proxy,
            "ratio": round(proxy["rps"] / direct["rps"], 3) if direct["rps"] else None,
            "cpu_bound": cpu_bound(direct, proxy)}


def cpu_bound(direct: dict, proxy: dict) -> float | None:
    """The ratio if CPU per request were all that limits requests/s: each side
    can serve no more than the cores over the CPU a request costs all its
    processes, nor more than one core over what it costs the busiest one (each
    process runs on one core at a time). The measured ratio stays under it by
    what the processes lose waiting on each other."""
    def capacity(cpu: dict) -> float:
        cost = [us for us in cpu.values() if us]
        return min(os.cpu_count() / sum(cost), 1 / max(cost)) if cost else 0.0

    d, p = capacity(direct["cpu_us_per_request"]), capacity(proxy["cpu_us_per_request"])
    return round(p / d, 3) if d else None


def round_all(x):
    if isinstance(x, float):
        return round(x, 3)
    if isinstance(x, dict):
        return {k: round_all(v) for k, v in x.items()}
    if isinstance(x, list):
        return [round_all(v) for v in x]
    return x


def throughput_rows(thr: dict | None, load: str, client: str, missing: str = "") -> list[tuple]:
    """A throughput phase's rows: requests/s under `load`, the ceiling, CPU per
    request of each process (`client`: the load generator's name)."""
    if thr is None:
        return [(f"requests/s, {load}", missing, "", "")]
    d, p = thr["direct"], thr["proxy"]
    cpu_d, cpu_p = d["cpu_us_per_request"], p["cpu_us_per_request"]
    return [
        (f"requests/s, {load}", d["rps"], p["rps"], f"x{thr['ratio']}"),
        ("  ... bound by CPU per request alone", "", "", f"x{thr['cpu_bound']}"),
        ("CPU us per request there: upstream", cpu_d["upstream"], cpu_p["upstream"], ""),
        ("  ... the proxy", "", cpu_p["proxy"], ""),
        (f"  ... {client}", cpu_d["client"], cpu_p["client"], ""),
    ]


def table(res: dict) -> str:
    lat, thr, fb, lv = (res["latency_ms"], res["throughput"], res["first_byte_ms"],
                        res["generating_after_leave_s"])
    rows = [
        ("latency p50 (ms)", lat["direct_p50"], lat["proxy_p50"], lat["added_p50"]),
        ("latency p99 (ms)", lat["direct_p99"], lat["proxy_p99"], lat["added_p99"]),
        *throughput_rows(thr, f"{res['clients']} aiohttp clients", "the bench's client"),
        *throughput_rows(res.get("throughput_wrk"), f"{res['clients']} wrk connections", "wrk",
                         "no wrk" if res["upstream"] == "stand-in" else "stand-in only"),
        ("first streamed byte p50 (ms)", fb["direct_p50"], fb["proxy_p50"], fb["added_p50"]),
        ("generating after a streaming client left (s)", lv["stream_direct"],
         lv["stream_proxy"], ""),
        ("generating after a non-streaming client timed out (s)",
         lv["nonstream_timeout_direct"], lv["nonstream_timeout_proxy"], ""),
    ]
    out = [f"upstream: {res['upstream']} ({res['machine']}, Python {res['python']})",
           f"| {'measure':<54} | {'direct':>9} | {'proxy':>9} | {'added':>8} |",
           f"|{'-' * 56}|{'-' * 11}|{'-' * 11}|{'-' * 10}|"]
    for name, d, p, diff in rows:
        out.append(f"| {name:<54} | {d!s:>9} | {p!s:>9} | {diff!s:>8} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mlx-model", help="model dir: start a real mlx_lm.server on it "
                    "(default: the stand-in upstream)")
    ap.add_argument("--out", default=None, help="JSON result file "
                    "(default bench/results/proxy_<upstream>.json)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--latency-n", type=int, default=2000)
    ap.add_argument("--first-byte-n", type=int, default=40)
    ap.add_argument("--phase-s", type=float, default=5.0, help="time bound of each phase")
    ap.add_argument("--rounds", type=int, default=5,
                    help="alternating direct/proxy slices the throughput phase is cut into")
    ap.add_argument("--max-requests", type=int, default=50000)
    ap.add_argument("--stream-tokens", type=int, default=20)
    ap.add_argument("--stream-delay-s", type=float, default=0.02)
    ap.add_argument("--leave-tokens", type=int, default=200,
                    help="max_tokens of the leave test (the real server: keep under its "
                         "--max-tokens)")
    ap.add_argument("--proxy", default=None,
                    help="proxy to run (a .pyz or a .py); default: the zipapp built from "
                         "files/mlx_route_proxy, as the deploy ships it")
    ap.add_argument("--leave-after-s", type=float, default=0.5,
                    help="the non-streaming client's own timeout")
    a = ap.parse_args()
    py = sys.executable
    procs, logs, built = [], [], None
    up_port, proxy_port = free_port(), free_port()
    stub = a.mlx_model is None
    try:
        if stub:
            cmd = [py, "-m", "tests.fixtures.upstream_stub", str(up_port)]
        else:
            cmd = [py, "-m", "mlx_lm.server", "--model", a.mlx_model, "--host", "127.0.0.1",
                   "--port", str(up_port), "--max-tokens", str(max(256, a.leave_tokens)),
                   "--temp", "0.0"]
            a.latency_n, a.max_requests = min(a.latency_n, 60), min(a.max_requests, 400)
        log = open(REPO / "bench" / f".upstream_{up_port}.log", "wb")
        logs.append(log)
        up = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, HF_HUB_OFFLINE="1",
                                       **({} if stub else mlx_env())))
        procs.append(up)
        wait_port(up_port, up, 120, what="bench upstream")
        if a.proxy is None:
            a.proxy = str(write_zipapp(REPO / "bench" / f".proxy_{proxy_port}.pyz"))
            built = a.proxy
        proxy = subprocess.Popen(
            [py, a.proxy, "--port", str(proxy_port), "--upstream",
             f"http://127.0.0.1:{up_port}", "--concurrency", str(a.clients), "--queue",
             str(4 * a.clients), "--log-level", "WARNING"], cwd=REPO)
        procs.append(proxy)
        wait_port(proxy_port, proxy, 20, what="bench proxy")
        ready_by = time.monotonic() + 180
        while time.monotonic() < ready_by:  # the proxy's /health does a real generation
            try:
                with socket.create_connection(("127.0.0.1", proxy_port), 1) as c:
                    c.settimeout(60)
                    c.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                    if c.recv(100).split(b" ")[1:2] == [b"200"]:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("bench: the proxy's /health never said 200")
        res = asyncio.run(Bench(a, f"http://127.0.0.1:{up_port}",
                                f"http://127.0.0.1:{proxy_port}", stub, up.pid,
                                proxy.pid).run())
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            os.unlink(log.name)
            log.close()
        if built:
            os.unlink(built)
    out = Path(a.out or REPO / "bench" / "results" /
               f"proxy_{'stub' if stub else 'mlx'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
