#!/usr/bin/env python3
"""Speed and memory probes of a deployed route, run ON the host (stdlib only).

    python probes.py --manifest ~/.local/share/mlx-route/route.json [--via proxy|server]
        [--needle-tokens 4500] [--cache-tokens 1600] [--integers 128] [--prose-words 220]
        [--timeout-s 900] [--out FILE]

The field report's direct endpoint probes (docs/field-report.md, "What it
measured"), plus a prefix-cache probe:

  tiny      the profile's smoke prompt, after one warm-up request
  integers  "write the integers 1..N" (decode-heavy)
  prose     "write an N-word paragraph" (decode-heavy)
  needle    a ~N-token filler with one fact in the middle, 8 output tokens
            (prefill-heavy; `needle_found` says whether the fact came back)
  cache     a ~N-token prompt nobody sent before (cold), then the same
            conversation with the answer and a short new user turn (cached):
            mlx_lm.server's prompt cache should make the second prefill cheap

Every request streams (`stream_options.include_usage`), so prefill and decode
are measured apart, as the field report kept them apart: prefill is the time to the
first streamed token, decode is the rest. Token counts are the server's
`usage` (prompt_tokens_details.cached_tokens: tokens taken from its cache).

Memory, kept apart because they are different things (docs/field-report.md,
"The machine and the model"):
  disk            the weights directory (apparent and allocated bytes)
  rss             the server process's resident size before the probes (model
                  loaded) and the highest of samples taken during them; on
                  Linux also the kernel's lifetime high-water mark (VmHWM)
  mlx_peak        MLX's own peak allocation lives inside the server process
                  and mlx_lm.server does not report it: recorded as null

With `workload` in route.json (workload_enabled), the summaries of the
Terminal-Bench runs tb-route kept on the host come with it (`--only workload`:
those alone, no probe).

Prints one JSON document (or writes it to --out). Exit 1 with one line on
stderr when the route cannot be probed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

SCHEMA = 1
MLX_PEAK_NOTE = (
    "not measured: MLX's peak allocation is only visible inside the server process and "
    "mlx_lm.server does not report it"
)
# Words of filler() per token, measured with SmolLM2's BPE tokenizer (digits
# are one token each); other tokenizers differ a little, and the reported
# counts are always the server's own.
WORDS_PER_TOKEN = 0.53


# The field report's probe set (docs/field-report.md); per-profile sizes come from route.json.
REPORT_SIZES = {"needle_tokens": 4500, "cache_tokens": 1600, "integers": 128, "prose_words": 220,
              "timeout_s": 900}


class ProbeError(Exception):
    pass


# ---------------------------------------------------------------------------
# The route: endpoint, key, server process
# ---------------------------------------------------------------------------


def load_manifest(path: str) -> dict:
    path = os.path.expanduser(path)
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise ProbeError(f"cannot read the route manifest {path}: {e.strerror}; "
                         f"run the deploy first")


def endpoint(manifest: dict, via: str) -> tuple[str, str | None]:
    """Base URL and API key of the proxy (what clients use) or the bare server."""
    if via == "server":
        return f"http://127.0.0.1:{manifest['server']['port']}", None
    key = None
    key_file = manifest["proxy"].get("client_key_file") or manifest["proxy"].get("key_file")
    if key_file:
        with open(key_file) as f:
            key = f.read().strip()
    return f"http://{manifest['proxy'].get('address', '127.0.0.1')}:{manifest['proxy']['port']}", key


def _run(cmd: str) -> str:
    try:
        out = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return ""
    return out.stdout if out.returncode == 0 else ""


def server_pid(manifest: dict) -> tuple[int | None, str]:
    """The mlx_lm.server pid as its service manager knows it (the backend's
    command in route.json, tasks/backends), else by its port."""
    command = manifest.get("server_pid_command")
    how = manifest.get("backend") or "unknown"
    found = _run(command).strip() if command else ""
    if not found.isdigit() or found == "0":
        how = "lsof on the server port"
        found = _run(f"lsof -nP -t -iTCP:{int(manifest['server']['port'])} -sTCP:LISTEN")
        found = found.split()[0] if found.split() else ""
    return (int(found), how) if found.isdigit() and found != "0" else (None, how)


def rss_bytes(pid: int) -> tuple[int | None, int | None]:
    """(resident size now, lifetime high-water mark or None) of a process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        kb = lambda k: int(fields[k].split()[0]) * 1024 if k in fields else None  # noqa: E731
        return kb("VmRSS"), kb("VmHWM")
    except OSError:
        pass
    out = _run(f"ps -o rss= -p {int(pid)}").strip()  # macOS: no /proc; ps says KiB
    return (int(out) * 1024 if out.isdigit() else None), None


def process_command(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        out = _run(f"ps -o command= -p {int(pid)}").strip()
        return shlex.split(out) if out else None


class RssSampler(threading.Thread):
    """Samples a process's RSS until stopped; the peak seen is kept."""

    def __init__(self, pid: int, every_s: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.peak = 0
        self.samples = 0
        self.hwm = None
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            rss, hwm = rss_bytes(self.pid)
            if rss:
                self.peak = max(self.peak, rss)
                self.samples += 1
            if hwm:
                self.hwm = hwm
            self._halt.wait(self.every_s)

    def stop(self):
        self._halt.set()
        self.join(5)


def disk_usage(path: str) -> dict:
    apparent = allocated = files = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(root, name))
            apparent += st.st_size
            allocated += getattr(st, "st_blocks", 0) * 512
            files += 1
    try:  # what the deploy recorded: repo, revision, the commit it resolved to, adopted
        with open(os.path.join(path, ".mlx-route.json")) as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        record = None
    return {"model_dir": path, "apparent_bytes": apparent, "allocated_bytes": allocated,
            "files": files, "record": record}


def host_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    out = _run("sysctl -n hw.memsize").strip()
    return int(out) if out.isdigit() else None


# ---------------------------------------------------------------------------
# One streamed chat completion, timed
# ---------------------------------------------------------------------------


def stream_chat(base: str, key: str | None, model: str, messages: list, max_tokens: int,
                timeout_s: float) -> dict:
    """One streamed chat; a 503 (not ready) or 429 (queue full) is retried after
    the Retry-After the proxy sends, as the openai SDK does, within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return _stream_chat_once(base, key, model, messages, max_tokens, timeout_s)
        except RetryLater as e:
            wait = min(e.after_s, 5.0)
            if time.monotonic() + wait >= deadline:
                raise ProbeError(f"{base} was still answering HTTP {e.code} after {timeout_s} s")
            time.sleep(wait)


class RetryLater(Exception):
    def __init__(self, code: int, after_s: float):
        super().__init__(code, after_s)
        self.code, self.after_s = code, after_s


def _stream_chat_once(base: str, key: str | None, model: str, messages: list, max_tokens: int,
                      timeout_s: float) -> dict:
    body = {
        "messages": messages, "max_tokens": max_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"{base}/v1/chat/completions", json.dumps(body).encode(),
                                 headers)
    started = time.monotonic()
    first = None
    text, usage, finish = [], None, None
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            for raw in resp:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    piece = delta.get("content") or ""
                    if (piece or delta.get("tool_calls")) and first is None:
                        first = time.monotonic()
                    text.append(piece)
                    finish = choice.get("finish_reason") or finish
    except urllib.error.HTTPError as e:
        if e.code in (429, 503):
            after_ms = e.headers.get("retry-after-ms")
            after_s = float(after_ms) / 1000 if after_ms else float(e.headers.get("Retry-After") or 1)
            raise RetryLater(e.code, after_s)
        raise ProbeError(f"{base} answered HTTP {e.code}: {e.read()[:300]!r}")
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
        raise ProbeError(f"{base} did not answer within {timeout_s} s: {e}")
    ended = time.monotonic()
    if usage is None:
        raise ProbeError(f"{base} sent no usage in its stream (stream_options.include_usage)")
    return {"text": "".join(text), "usage": usage, "finish_reason": finish,
            "ttft_s": (first or ended) - started, "wall_s": ended - started}


def measure(name: str, label: str, reply: dict) -> dict:
    usage = reply["usage"]
    prompt = int(usage.get("prompt_tokens", 0))
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    out = int(usage.get("completion_tokens", 0))
    wall, ttft = reply["wall_s"], reply["ttft_s"]
    decode_s = wall - ttft
    return {
        "name": name,
        "label": label,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "output_tokens": out,
        "wall_s": round(wall, 3),
        "ttft_s": round(ttft, 3),
        # prompt tokens actually computed (not taken from the cache) per second
        "prefill_tok_s": round((prompt - cached) / ttft, 2) if ttft > 0 else None,
        # the first token comes with the prefill; the rest is decode
        "decode_tok_s": round((out - 1) / decode_s, 2) if out > 1 and decode_s > 0 else None,
        # the field report's "observed rate" of the needle probe: all tokens over the wall
        "total_tok_s": round((prompt + out) / wall, 2) if wall > 0 else None,
        "finish_reason": reply["finish_reason"],
        "answer": reply["text"][:400],
    }


# ---------------------------------------------------------------------------
# The probes
# ---------------------------------------------------------------------------

COLOURS = ["red", "blue", "green", "amber", "violet", "grey", "white", "black"]
THINGS = ["lantern", "river", "ledger", "compass", "orchard", "harbour", "engine", "window"]


def filler(tokens: int, seed: str) -> str:
    """Plain sentences of about `tokens` tokens, different for every `seed`."""
    words = int(tokens * WORDS_PER_TOKEN)
    out, n = [], 0
    i = 0
    while n < words:
        sentence = (f"Entry {i} of log {seed}: the {COLOURS[i % 8]} {THINGS[(i * 3) % 8]} "
                    f"was checked at {(i * 7) % 24:02d}:{(i * 13) % 60:02d} and found in order.")
        out.append(sentence)
        n += len(sentence.split())
        i += 1
    return " ".join(out)


def run_probes(args: argparse.Namespace, manifest: dict) -> dict:
    base, key = endpoint(manifest, args.via)
    # mlx_lm.server drops its loaded model for a name it does not know
    # (docs/field-report.md), so only the proxy (which strips it) is sent one.
    model = manifest.get("public_name") if args.via == "proxy" else None
    smoke = manifest["smoke"]

    def chat(messages, max_tokens):
        return stream_chat(base, key, model, messages, max_tokens, args.timeout_s)

    pid, pid_how = server_pid(manifest)
    rss_loaded, _ = rss_bytes(pid) if pid else (None, None)
    sampler = RssSampler(pid) if pid else None
    if sampler:
        sampler.start()
    started_at = datetime.now(timezone.utc)
    probes = []
    t0 = time.monotonic()
    try:
        if args.only == "all":
            chat(smoke["messages"], 4)  # warm-up: the field report's "tiny warm" is a warm request
            probes.append(measure("tiny", "Tiny warm request", chat(
                smoke["messages"], int(smoke["max_tokens"]))))

            n = args.integers
            probes.append(measure("integers", f"{n}-integer generation", chat(
                [{"role": "user", "content": f"Write the integers from 1 to {n} in order, "
                                             f"separated by single spaces, and nothing else."}],
                int(n * 2.5) + 16)))

            w = args.prose_words
            probes.append(measure("prose", f"{w}-word prose", chat(
                [{"role": "user", "content": f"Write a {w}-word paragraph about how lighthouses "
                                             f"guided ships before radio."}],
                int(w * 1.6) + 16)))

            nonce = secrets.token_hex(4)
            code = str(secrets.randbelow(9000) + 1000)
            half = args.needle_tokens // 2
            needle_prompt = (f"{filler(half, nonce)} The secret code is {code}. "
                             f"{filler(half, nonce + 'b')}\n\n"
                             f"What is the secret code? Reply with the number only.")
            needle = measure("needle", f"~{args.needle_tokens}-token needle prefill",
                             chat([{"role": "user", "content": needle_prompt}], 8))
            needle["needle_found"] = code in needle["answer"]
            probes.append(needle)

        long_turn = [{"role": "user", "content": (
            f"{filler(args.cache_tokens, secrets.token_hex(4))}\n\n"
            f"Which colour is mentioned first? Answer in one word.")}]
        cold = measure("cache_cold", "Long prompt, cold", chat(long_turn, 8))
        follow = long_turn + [
            {"role": "assistant", "content": cold["answer"]},
            {"role": "user", "content": "Thanks. Which object is mentioned first? One word."},
        ]
        cached = measure("cache_followup", "Same prompt + short new turn", chat(follow, 8))
        probes += [cold, cached]
    finally:
        if sampler:
            sampler.stop()
    rss_after, hwm = rss_bytes(pid) if pid else (None, None)

    ratio = cached["ttft_s"] / cold["ttft_s"] if cold["ttft_s"] > 0 else None
    return {
        "schema": SCHEMA,
        "host": socket.gethostname(),
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "started_at": started_at.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 1),
        "profile": manifest.get("profile"),
        "public_name": manifest.get("public_name"),
        "via": args.via,
        "endpoint": base,
        "sizes": {"needle_tokens": args.needle_tokens, "cache_tokens": args.cache_tokens,
                  "integers": args.integers, "prose_words": args.prose_words},
        "probes": probes,
        # a cluster's ranks, backend and sharding (route.json; None: one server)
        "cluster": manifest.get("cluster"),
        "limits": {"cache_followup_max_ratio":
                   (manifest.get("gates") or {}).get("cache_followup_max_ratio")},
        "prefix_cache": {
            "cold_prompt_tokens": cold["prompt_tokens"],
            "cold_ttft_s": cold["ttft_s"],
            "followup_prompt_tokens": cached["prompt_tokens"],
            "followup_cached_tokens": cached["cached_tokens"],
            "followup_ttft_s": cached["ttft_s"],
            # what a follow-up turn costs, as a share of the cold prefill
            "ratio": round(ratio, 4) if ratio is not None else None,
        },
        "memory": {
            "host_total_bytes": host_memory_bytes(),
            "server_pid": pid,
            "server_pid_from": pid_how,
            "server_command": process_command(pid) if pid else None,
            "rss_loaded_bytes": rss_loaded,
            "rss_peak_sampled_bytes": max(filter(None, [sampler.peak if sampler else 0,
                                                        rss_after, rss_loaded]), default=None),
            "rss_samples": sampler.samples if sampler else 0,
            "rss_after_bytes": rss_after,
            "rss_hwm_bytes": hwm,
            "mlx_peak_bytes": None,
            "mlx_peak_note": MLX_PEAK_NOTE,
        },
        "disk": disk_usage(manifest["model_dir"]),
    }


def workload_runs(manifest: dict) -> list[dict] | None:
    """The Terminal-Bench runs' summaries (tb-route's summary.json, without the
    per-trial list), oldest first; None when the deploy provisioned no workload."""
    workload = manifest.get("workload")
    if not workload:
        return None
    root = os.path.expanduser(workload["runs_dir"])
    runs = []
    try:
        regimes = sorted(os.listdir(root))
    except OSError:
        return []
    for regime in regimes:
        try:
            names = sorted(os.listdir(os.path.join(root, regime)))
        except OSError:
            continue
        for name in names:
            try:
                with open(os.path.join(root, regime, name, "summary.json")) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                continue
            data.pop("trials", None)
            runs.append(data)
    return sorted(runs, key=lambda r: r.get("started_at") or "")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--manifest", default="~/.local/share/mlx-route/route.json",
                   help="route.json written by the deploy")
    p.add_argument("--via", choices=["proxy", "server"], default="proxy",
                   help="probe the route as clients see it, or mlx_lm.server directly")
    for name, default in REPORT_SIZES.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=float if name == "timeout_s" else int,
                       default=None,
                       help=f"route.json's bench value, else the field report's {default}")
    p.add_argument("--only", choices=["all", "cache", "workload"], default="all",
                   help="all probes, only the prefix-cache pair (the host suite's gate), or "
                        "no probe: only the Terminal-Bench runs' summaries")
    p.add_argument("--out", default=None, help="write the JSON here instead of stdout")
    args = p.parse_args(argv)
    for name in REPORT_SIZES:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def resolve_sizes(args: argparse.Namespace, manifest: dict) -> None:
    """Flags, else the sizes the deploy recorded (route.json `bench`), else the field report's."""
    recorded = manifest.get("bench") or {}
    for name, default in REPORT_SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, recorded.get(name) or default)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        manifest = load_manifest(args.manifest)
        for key in ("smoke", "server", "proxy", "model_dir"):
            if key not in manifest:
                raise ProbeError(f"{args.manifest} has no {key!r}: it is not a route.json "
                                 f"written by the deploy; run the deploy again")
        resolve_sizes(args, manifest)
        if args.only == "workload":
            result = {"schema": SCHEMA, "host": socket.gethostname(),
                      "profile": manifest.get("profile"),
                      "public_name": manifest.get("public_name"),
                      "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        else:
            result = run_probes(args, manifest)
        result["workload"] = workload_runs(manifest)
    except (ProbeError, OSError) as e:
        print(f"probes: {e}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
