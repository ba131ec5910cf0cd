#!/usr/bin/env python3
"""Host-side checks the deploy runs with the venv's interpreter.

    routectl.py smoke --model DIR --messages JSON --expect TEXT [--max-tokens N]
        Load the model with mlx_lm and greedy-generate the profile's smoke
        prompt: proves the venv (and the patches) can load and run the model
        before the server is (re)started. Exit 1 with the model's error.

    routectl.py wait --url URL [--kind server|proxy] [--timeout S] [--key-file F]
        Wait until a (re)started service really answers: the server only when
        a 1-token chat completion succeeds (mlx_lm.server says /health 200
        while it is still loading), the proxy when its /health is 200.

stdlib only, apart from mlx_lm for `smoke`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import urllib.error
import urllib.request


def smoke(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        from mlx_lm import generate, load
        from mlx_lm.sample_utils import make_sampler

        model, tokenizer = load(
            args.model, tokenizer_config={"trust_remote_code": args.trust_remote_code}
        )
        loaded = time.monotonic()
        messages = json.loads(args.messages)
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        text = generate(
            model, tokenizer, prompt=prompt, max_tokens=args.max_tokens,
            sampler=make_sampler(temp=0.0),
        )
    except Exception as exc:  # the model's own error is what the person needs
        traceback.print_exc()
        print(f"smoke: the venv cannot run the model in {args.model}: {exc!r}", file=sys.stderr)
        return 1
    result = {
        "ok": args.expect in text,
        "expect": args.expect,
        "answer": text,
        "load_s": round(loaded - started, 2),
        "generate_s": round(time.monotonic() - loaded, 2),
    }
    print(json.dumps(result))
    if not result["ok"]:
        print(
            f"smoke: the model answered {text!r}, which lacks {args.expect!r}; "
            "the weights, patches or chat template are wrong for this profile",
            file=sys.stderr,
        )
        return 1
    return 0


def _probe(url: str, kind: str, key: str | None) -> tuple[bool, str]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if kind == "server":
        body = json.dumps({
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1,
        }).encode()
        request = urllib.request.Request(
            url.rstrip("/") + "/v1/chat/completions", data=body, headers=headers
        )
    else:
        request = urllib.request.Request(url.rstrip("/") + "/health", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status == 200, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}: {exc.read()[:200]!r}"
    except (OSError, urllib.error.URLError) as exc:
        return False, repr(exc)


def wait(args: argparse.Namespace) -> int:
    key = None
    if args.key_file:
        with open(args.key_file) as handle:
            key = handle.read().strip()
    deadline = time.monotonic() + args.timeout
    started = time.monotonic()
    last = "no answer yet"
    while time.monotonic() < deadline:
        ok, last = _probe(args.url, args.kind, key)
        if ok:
            print(json.dumps({"ready": True, "kind": args.kind, "after_s": round(time.monotonic() - started, 1)}))
            return 0
        time.sleep(min(args.interval, max(0.0, deadline - time.monotonic())))
    print(
        f"wait: the {args.kind} at {args.url} did not become ready within {args.timeout:.0f} s "
        f"(last: {last}); read its log under route_logs_dir",
        file=sys.stderr,
    )
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p_smoke = sub.add_parser("smoke", help="load the model and generate the smoke prompt")
    p_smoke.add_argument("--model", required=True)
    p_smoke.add_argument("--messages", required=True, help="chat messages as JSON")
    p_smoke.add_argument("--expect", required=True, help="substring the answer must contain")
    p_smoke.add_argument("--max-tokens", type=int, default=16)
    p_smoke.add_argument("--trust-remote-code", action="store_true")
    p_smoke.set_defaults(func=smoke)

    p_wait = sub.add_parser("wait", help="wait until a service really answers")
    p_wait.add_argument("--url", required=True)
    p_wait.add_argument("--kind", choices=["server", "proxy"], default="server")
    p_wait.add_argument("--timeout", type=float, default=120)
    p_wait.add_argument("--interval", type=float, default=1.0)
    p_wait.add_argument("--key-file")
    p_wait.set_defaults(func=wait)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
