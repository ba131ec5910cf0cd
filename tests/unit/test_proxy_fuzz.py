"""Fuzzing the proxy: random and malformed requests, random and malformed upstream answers.

Bounded (a fixed number of cases, each with its own time bound), seeded
(PROXY_FUZZ_SEED, default below; a failure names the seed and the case) and on
127.0.0.1 only. The promises checked on every case: the proxy never answers
500, never takes longer than its deadlines (plus a margin for this shared
machine), a streamed answer is always valid SSE whose every data payload is
JSON and which ends with [DONE] or an error event, and afterwards the proxy
still serves a good request and logged no traceback.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import socket
import time

import httpx2 as httpx
import pytest

from tests.fixtures.proxy import wait_healthy
from tests.fixtures.raw_upstream import SSE_HEAD

pytestmark = pytest.mark.timeout(180)

SEED = int(os.environ.get("PROXY_FUZZ_SEED", "1515"))
KEY = "fuzz-" + "k" * 40
KEYED = {"Authorization": f"Bearer {KEY}"}  # /health with the key: the details too
CHAT = [{"role": "user", "content": "hi"}]
# What a status may be when the client sent garbage (the upstream is healthy).
CLIENT_STATUSES = {200, 400, 401, 404, 405, 408, 413, 414, 417, 429, 431, 501, 503, 505}
# ...and when the upstream misbehaves.
UPSTREAM_STATUSES = {200, 400, 404, 422, 502, 503, 504}


def exchange(port: int, data: bytes, timeout: float) -> tuple[bytes, float]:
    """Send raw bytes, read until the proxy closes or answers one response; (answer, seconds)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.settimeout(timeout)
        try:
            s.sendall(data)
        except OSError:
            pass  # the proxy may close before reading everything (413, 400)
        out = b""
        try:
            while True:
                more = s.recv(65536)
                if not more:
                    break
                out += more
                if complete_response(out, head_only=data.startswith(b"HEAD ")):
                    break
        except (ConnectionResetError, BrokenPipeError):
            pass
        except socket.timeout:
            raise AssertionError(f"no answer and no close within {timeout} s; got {out[:200]!r}")
    return out, time.monotonic() - t0


def final(out: bytes) -> bytes:
    """The answer without interim ones (100 Continue)."""
    while out.startswith(b"HTTP/1.1 1") and b"\r\n\r\n" in out:
        out = out.partition(b"\r\n\r\n")[2]
    return out


def complete_response(out: bytes, head_only: bool = False) -> bool:
    head, sep, body = final(out).partition(b"\r\n\r\n")
    if not sep:
        return False
    if head_only:
        return True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def status_of(answer: bytes) -> int | None:
    answer = final(answer)
    if not answer:
        return None  # closed without answering (a slow or broken request): allowed
    assert answer.startswith(b"HTTP/1."), answer[:200]
    return int(answer.split(b" ", 2)[1])


# -- random requests -------------------------------------------------------------------------

WEIRD_VALUES = [None, True, False, 0, -1, 2**70, 1.5, -0.0, 1e308, "", "x" * 5000, "\u0000",
                "\ud7ff\ue000", [], {}, [[[]]], {"a": {"b": {}}}, "caf\u00e9", "\U0001F600"]
KEYS = ["messages", "stream", "model", "max_tokens", "temperature", "logprobs", "top_logprobs",
        "tools", "stream_options", "n", "stop", "draft_model", "adapters", "seed", "x"]
PATHS = ["/v1/chat/completions", "/v1/completions", "/chat/completions", "/v1/models",
         "/v1/models/default_model", "/health", "/metrics", "//v1/chat/completions",
         "/v1/chat%2Fcompletions", "/V1/CHAT/COMPLETIONS", "/v1/chat/completions?key=" + KEY,
         "http://127.0.0.1/v1/chat/completions", "/" + "a" * 9000, "/%00", "/..%2f..%2fetc",
         "*", "/v1/models/%ff%fe"]
METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT",
           "GE T", "\u00e9", "POST" * 100]


def random_body(rng: random.Random) -> bytes:
    body = {"messages": CHAT, "max_tokens": 2, "stub": {"tokens": rng.randint(0, 3)}}
    if rng.random() < 0.5:
        body["stream"] = rng.random() < 0.5
    for _ in range(rng.randint(0, 4)):
        body[rng.choice(KEYS)] = rng.choice(WEIRD_VALUES)
    raw = json.dumps(body).encode()
    kind = rng.randint(0, 15)
    if kind == 0:
        raw = raw[:rng.randint(0, len(raw))]
    elif kind == 1:
        pos = rng.randint(0, len(raw))
        raw = raw[:pos] + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 8))) + raw[pos:]
    elif kind == 2:
        depth = rng.choice([10, 1000, 50000])
        raw = b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"
    elif kind == 3:
        raw = raw.replace(b'"max_tokens": 2', rng.choice(
            [b'"max_tokens": NaN', b'"max_tokens": -Infinity', b'"max_tokens": 1e999',
             b'"max_tokens": 1' + b"0" * 5000]))
    elif kind == 4:
        raw = rng.choice([b"", b"null", b"[]", b'"x"', b"\xff\xfe{}", b"{}" * 3,
                          b'{"a": 1, "a": 2}', b'{"m": "\xed\xa0\x80"}'])  # a lone surrogate
    return raw


def random_request(rng: random.Random) -> tuple[bytes, bool]:
    """Raw request bytes, and whether the case is a slow client (it stops mid-way)."""
    method = rng.choice(METHODS) if rng.random() < 0.25 else "POST"
    path = rng.choice(PATHS) if rng.random() < 0.5 else "/v1/chat/completions"
    body = random_body(rng)
    headers = [("Host", "127.0.0.1")]
    auth = rng.random()
    if auth < 0.5:
        headers.append(("Authorization", f"Bearer {KEY}"))
    elif auth < 0.6:
        headers.append(("Authorization", rng.choice(
            [f"bearer {KEY}", f"Bearer  {KEY} ", f"Basic {KEY}", "Bearer", "", f"Bearer {KEY}x",
             f"Bearer {KEY[:-1]}"])))
    elif auth < 0.7:
        headers += [("Authorization", f"Bearer {KEY}"), ("Authorization", f"Bearer {KEY}")]
    elif auth < 0.75:
        headers.append(("x-api-key", KEY))
    length = len(body)
    framing = rng.random()
    if framing < 0.7:
        headers.append(("Content-Length", str(length)))
    elif framing < 0.8:
        headers.append(("Content-Length", str(max(0, length + rng.choice([-5, -1, 1, 1000])))))
    elif framing < 0.9:
        headers.append(("Transfer-Encoding", "chunked"))
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if rng.random() < 0.8 else (
            b"zz\r\n" + body)
    else:
        headers += [("Content-Length", str(length)), ("Transfer-Encoding", "chunked")]
    if rng.random() < 0.2:
        headers.append(rng.choice([("X-Big", "a" * 70000), ("X\u00e9", "1"), ("X", "a\u00ffb"),
                                   ("Content-Type", "text/plain"), ("Expect", "100-continue"),
                                   ("Connection", "keep-alive, Upgrade"), ("Upgrade", "h2c")]))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    raw = head.encode("utf-8", "surrogateescape") + b"\r\n" + body
    if rng.random() < 0.05:  # obs-fold: a header continued on the next line
        raw = raw.replace(b"Authorization: Bearer ", b"Authorization: Bearer\r\n ", 1)
    slow = rng.random() < 0.04
    if slow:
        raw = raw[:rng.randint(1, len(raw) - 1)] if len(raw) > 1 else raw
    return raw, slow


def test_fuzz_random_requests(upstream_stub, proxy_factory, tmp_path):
    key_file = tmp_path / "proxy.key"
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    p = proxy_factory(upstream_stub.url, "--api-key-file", str(key_file),
                      "--header-timeout-s", "1", "--body-timeout-s", "1",
                      "--max-body-bytes", "65536", "--request-timeout-s", "5",
                      "--retry-after-ms", "100")
    wait_healthy(p.url, headers=KEYED)
    rng = random.Random(SEED)
    cases = [random_request(rng) for _ in range(250)]
    seen: dict = {}

    def run(i):
        raw, slow = cases[i]
        answer, seconds = exchange(p.port, raw, timeout=12)
        status = status_of(answer)
        where = f"seed {SEED}, case {i}: {raw[:300]!r} -> {answer[:300]!r}"
        assert status != 500 and (status is None or status in CLIENT_STATUSES), where
        assert seconds < 8, (seconds, where)  # 1 s header/body timeouts, 5 s deadline
        if KEY.encode() in answer or KEY[:20].encode() in answer:
            raise AssertionError(f"the key came back: {where}")
        return status

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for status in pool.map(run, range(len(cases))):
            seen[status] = seen.get(status, 0) + 1
    assert seen.get(200, 0) > 10 and seen.get(400, 0) > 10, seen  # the fuzz reached both sides
    good = httpx.post(p.url + "/v1/chat/completions", timeout=10,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": CHAT, "stub": {"tokens": 2}})
    assert good.status_code == 200, good.text
    log = p.log()
    assert "Traceback" not in log and KEY not in log and KEY[:20] not in log, log[-3000:]


# -- random upstream answers -----------------------------------------------------------------


def good_events(rng: random.Random) -> list[bytes]:
    out = []
    for i in range(rng.randint(0, 6)):
        delta = rng.choice([{"content": "tok"}, {"role": "assistant", "content": ""},
                            {"reasoning": "r"}, {"tool_calls": [{"index": 0, "id": "c",
                             "function": {"name": "f", "arguments": "{\"a\""}}]},
                            {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}])
        out.append(json.dumps({"id": "x", "object": "chat.completion.chunk",
                               "model": rng.choice(["default_model", "m"]),
                               "choices": [{"index": 0, "delta": delta,
                                            "finish_reason": None}]}).encode())
    out.append(json.dumps({"id": "x", "model": "default_model", "choices": [
        {"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode())
    out.append(b'{"id": "x", "choices": [], "usage": {"prompt_tokens": 1, "total_tokens": 2}}')
    return out


ODD_EVENTS = [b"{nope", b"[1, 2]", b'"str"', b"{}", b'{"choices": null}', b'{"choices": 5}',
              b'{"choices": [null]}', b'{"choices": [{"index": "0"}]}',
              b'{"choices": [{"delta": []}]}', b'{"choices": [{"delta": {"content": 5}}]}',
              b'{"choices": [{"delta": {"tool_calls": [{"function": "f"}]}}]}',
              b'{"choices": [{"delta": {"tool_calls": "x"}}]}', b'{"x": NaN}',
              b'{"x": 1e999}', b'{"error": "boom"}', b'{"error": {"message": 5}}',
              b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"\xff\xfe", b"{\"model\": 7}"]


def random_answer(rng: random.Random) -> list:
    """A mutated upstream answer: head, body and framing each maybe broken."""
    events = good_events(rng)
    if rng.random() < 0.5:
        events.insert(rng.randint(0, len(events)), rng.choice(ODD_EVENTS))
    sep = rng.choice([b"\n\n"] * 6 + [b"\r\n\r\n", b"\n", b"\n\n\n"])
    lines = [rng.choice([b"data: ", b"data:", b"event: x\ndata: ", b"id: 1\ndata: "]) + e + sep
             for e in events]
    if rng.random() < 0.2:
        lines.insert(rng.randint(0, len(lines)), b": keepalive 1/2" + sep)
    if rng.random() < 0.8:
        lines.append(b"data: [DONE]" + sep)
    body = b"".join(lines)
    cut = rng.random()
    if cut < 0.15:
        body = body[:rng.randint(0, len(body))]
    elif cut < 0.2:
        pos = rng.randint(0, len(body))
        noise = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 20)))
        body = body[:pos] + noise + body[pos:]
    framing = rng.random()
    if framing < 0.4:
        parts = [SSE_HEAD, body]  # HTTP/1.0, to the close: like mlx_lm.server
    elif framing < 0.6:
        length = len(body) + rng.choice([0, 0, 0, -3, 5])
        parts = [b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Content-Length: %d\r\n\r\n" % max(0, length), body]
    elif framing < 0.8:
        pieces, pos = [], 0
        while pos < len(body):
            n = rng.randint(1, 50)
            pieces.append(b"%x\r\n%s\r\n" % (len(body[pos:pos + n]), body[pos:pos + n]))
            pos += n
        end = b"0\r\n\r\n" if rng.random() < 0.85 else b""
        parts = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", *pieces, end]
        if rng.random() < 0.1:
            parts[rng.randint(1, len(parts) - 1)] = b"zz\r\n"
    else:
        parts = [rng.choice([
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\n{\"e\"",
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 22\r\n\r\n{\"error\": \"not found\"}",
            b"HTTP/1.0 400 Bad\r\n\r\n[1]", b"HTTP/1.1 422 X\r\nContent-Length: 4\r\n\r\nnull",
            b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
            b"HTTP/1.1 100 Continue\r\n\r\n" + SSE_HEAD + body, b"SSH-2.0-x\r\n\r\n", b"",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"])]
    if rng.random() < 0.1:  # split anywhere, with pauses between the pieces
        flat = b"".join(parts)
        cuts = sorted(rng.randint(0, len(flat)) for _ in range(3))
        parts = [flat[:cuts[0]], 0.05, flat[cuts[0]:cuts[1]], 0.05, flat[cuts[1]:cuts[2]],
                 0.05, flat[cuts[2]:]]
    if rng.random() < 0.04:
        parts = [rng.choice([4.0, 9.0])] + parts  # past the first-byte timeout / the deadline
    return parts


def check_sse(text: str, where: str) -> None:
    payloads = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:")]
        if data:
            payloads.append("\n".join(data))
    assert payloads, f"an empty stream: {where}"
    for payload in payloads[:-1]:
        assert payload != "[DONE]", f"events after [DONE]: {where}"
        try:
            json.loads(payload)  # the openai SDK would fail on a partial event
        except ValueError as e:
            raise AssertionError(f"{e} in {payload[:300]!r}: {where}") from None
    last = payloads[-1]
    assert last == "[DONE]" or "error" in json.loads(last), f"no [DONE], no error: {where}"


def test_fuzz_random_upstream_answers(raw_upstream, proxy_factory):
    rng = random.Random(SEED + 1)
    answers = [random_answer(rng) for _ in range(160)]
    current = {"i": 0}
    up = raw_upstream(lambda body: [SSE_HEAD, b'data: {"model": "default_model", "choices": []}'
                                    b"\n\ndata: [DONE]\n\n"] if b'"good"' in body
                      else answers[current["i"]])
    p = proxy_factory(up.url, "--request-timeout-s", "3", "--first-byte-timeout-s", "2",
                      "--retry-after-ms", "100", "--public-name", "pub")
    wait_healthy(p.url, headers=KEYED)
    seen: dict = {}
    for i in range(len(answers)):
        current["i"] = i
        stream = rng.random() < 0.5
        body = {"messages": CHAT, "stream": stream}
        if rng.random() < 0.3:
            body["model"] = "asked"
        t0 = time.monotonic()
        try:
            r = httpx.post(p.url + "/v1/chat/completions", json=body, timeout=10)
        except httpx.HTTPError as e:
            raise AssertionError(f"seed {SEED + 1}, case {i}: {e!r}: {answers[i]!r}"[:2000])
        seconds = time.monotonic() - t0
        where = f"seed {SEED + 1}, case {i} ({stream=}): {answers[i]!r} -> {r.text[:500]!r}"
        assert r.status_code in UPSTREAM_STATUSES, where[:3000]
        assert seconds < 5.5, (seconds, where[:3000])  # the 3 s deadline, and a margin
        if r.status_code == 200 and stream:
            check_sse(r.text, where[:3000])
        elif r.status_code == 200:
            assert r.json()["model"] in ("asked", "pub"), where[:3000]
            assert "Infinity" not in r.text and "NaN" not in r.text, where[:3000]
        else:
            assert "error" in r.json(), where[:3000]
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        if r.status_code >= 500:
            wait_healthy(p.url, headers=KEYED)  # the proxy probes its way back
    assert seen.get(200, 0) > 20 and seen.get(502, 0) > 5, seen
    good = httpx.post(p.url + "/v1/chat/completions", timeout=10,
                      json={"messages": CHAT, "good": True})
    assert good.status_code == 200 and good.json()["model"] == "pub", good.text
    assert "Traceback" not in p.log(), p.log()[-3000:]
