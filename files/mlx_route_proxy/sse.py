"""Server-sent events: split, rename, assemble; strict JSON in and out.

Everything here is linear in the size of what the upstream sends, so a huge
answer costs time in proportion and the event loop serves other clients
between the pieces it arrives in.
"""

from __future__ import annotations

import json
import math

MAX_EVENT_BYTES = 8 * 1024 * 1024  # one SSE event (a token is a few hundred bytes)
DEFAULT_MODEL = b'"model": "default_model"'
CONCATENATED = frozenset(("content", "reasoning", "reasoning_content", "refusal", "text"))


class BadUpstream(ValueError):
    """The upstream's answer is not what an OpenAI-compatible server sends."""


# -- strict JSON ---------------------------------------------------------------


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)
# The decoder's own scanner (the C one), called directly: JSONDecoder.decode
# adds two regular-expression matches and two calls around it, a fair part of
# the proxy's JSON time (four documents a request). The scanner clears its
# memo itself after each call.
_SCAN = _DECODER.scan_once


def _c_encoder():
    """json.dumps() with its defaults, without building an encoder for every call
    (None without the C accelerator, or if its signature ever changes). No check
    for circular references: everything encoded here came from loads()."""
    try:
        encode = json.encoder.c_make_encoder(
            None, json.JSONEncoder().default, json.encoder.encode_basestring_ascii, None,
            ": ", ", ", False, False, True)
        probe = {"a": [1, 2.5, None, True, "\u00e9"], 1: {}}
        return encode if "".join(encode(probe, 0)) == json.dumps(probe) else None
    except TypeError:  # no C encoder (None), or other arguments
        return None


_ENCODE = _c_encoder()


def loads(raw: bytes | str):
    """JSON as RFC 8259 has it: UTF-8, no NaN/Infinity, finite numbers; ValueError else
    (also for nesting too deep to parse)."""
    try:
        if isinstance(raw, (bytes, bytearray)):
            raw = raw.decode("utf-8")
        try:  # the usual document: one value, no whitespace around it
            value, end = _SCAN(raw, 0)
            if end == len(raw):
                return value
        except (StopIteration, ValueError):
            pass
        return _DECODER.decode(raw)  # the rest, and the error with its position
    except RecursionError:
        raise ValueError("nested too deeply") from None


def dumps_text(obj) -> str:
    """The text json.dumps(obj) gives."""
    return "".join(_ENCODE(obj, 0)) if _ENCODE is not None else json.dumps(obj)


def dumps(obj) -> bytes:
    return dumps_text(obj).encode()


# -- the request, streamed --------------------------------------------------------

STREAM_KEY = b'"stream"'
STREAM_OPTIONS = b'"stream_options": {"include_usage": true}'
JSON_SPACE = b" \t\r\n"


def as_stream(raw: bytes, body: dict) -> bytes | None:
    """The client's request `raw` (parsed: `body`, a non-streaming request) with
    `"stream": true` and `stream_options.include_usage`, as bytes, without
    encoding the whole body again; None when that cannot be done for sure (the
    caller encodes the body instead).

    Without a top-level `stream`, both keys are added last, where the encoder
    would put them. With one (false), it is replaced in place when it is sure to
    be that one: no `\\u` escape anywhere (the letters of a key can be written
    no other way, so every key reads as written) and `"stream"` written once
    (a nested key or a value of that name would make two). `stream_options`
    must not be there. The upstream reads the values the client wrote, in the
    client's notation (a number is not re-encoded).
    """
    if not body or "stream_options" in body:
        return None
    end = len(raw.rstrip(JSON_SPACE)) - 1  # the closing brace (raw is a JSON object)
    if "stream" not in body:
        return raw[:end] + b', "stream": true, ' + STREAM_OPTIONS + b"}"
    if body["stream"] is not False or b"\\u" in raw or raw.count(STREAM_KEY) != 1:
        return None
    at = raw.find(STREAM_KEY) + len(STREAM_KEY)
    while raw[at:at + 1] in (b" ", b"\t", b"\r", b"\n"):
        at += 1
    if raw[at:at + 1] != b":":
        return None
    at += 1
    while raw[at:at + 1] in (b" ", b"\t", b"\r", b"\n"):
        at += 1
    if raw[at:at + 5] != b"false":
        return None
    return raw[:at] + b"true" + raw[at + 5:end] + b", " + STREAM_OPTIONS + b"}"


# -- splitting -----------------------------------------------------------------


class EventSplitter:
    """Cuts an SSE byte stream into events (the bytes before each blank line).

    Linear: bytes with no event boundary are kept as a list of pieces and
    joined once, when the boundary comes; an event over MAX_EVENT_BYTES is
    refused (BadUpstream) as soon as it passes the limit.
    """

    def __init__(self, limit: int = MAX_EVENT_BYTES):
        self.limit = limit
        self.pending: list[bytes] = []
        self.size = 0
        self.cr = False  # the last piece ended with \r

    def feed(self, data: bytes) -> list[bytes]:
        if b"\r" in data or self.cr:
            if self.cr:
                data = b"\r" + data
            self.cr = data.endswith(b"\r")
            if self.cr:
                data = data[:-1]
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        pending = self.pending
        boundary = data.find(b"\n\n") >= 0 or (
            pending and pending[-1].endswith(b"\n") and data.startswith(b"\n"))
        if not boundary:
            if data:
                pending.append(data)
                self.size += len(data)
                if self.size > self.limit:
                    raise BadUpstream(f"upstream event over {self.limit} bytes")
            return []
        if pending:
            pending.append(data)
            data = b"".join(pending)
            pending.clear()
        *events, rest = data.split(b"\n\n")
        if rest:
            pending.append(rest)
        self.size = len(rest)
        if self.size > self.limit:
            raise BadUpstream(f"upstream event over {self.limit} bytes")
        return [e for e in events if e.strip(b"\n")]

    @property
    def partial(self) -> bool:
        """Bytes of an event whose end never came."""
        return any(p.strip() for p in self.pending)


# -- renaming ------------------------------------------------------------------


def _top_level(event: bytes, pos: int) -> bool:
    """The bytes at pos (in `data: {...`) are a key of the outermost object.

    Conservative: anything before them that could open an object, an array or
    an escape sends the caller to the slow path, which parses.
    """
    prefix = event[7:pos]
    return (b"{" not in prefix and b"[" not in prefix and b"\\" not in prefix
            and prefix.count(b'"') % 2 == 0)


def _renamed_payload(payload: bytes, name: str) -> bytes:
    try:
        chunk = loads(payload)
    except ValueError as e:
        raise BadUpstream(f"upstream event is not valid JSON: {e}") from None
    if isinstance(chunk, dict) and "model" in chunk:
        chunk["model"] = name
    try:
        return dumps(chunk)
    except RecursionError:
        raise BadUpstream("upstream event nested too deeply") from None


def rename_event(event: bytes, name: str, field: bytes) -> bytes:
    """One SSE event with its top-level `model` renamed, ending in a blank line.

    `field` is `"model": <name as JSON>`. Comments, `event:`/`id:`/`retry:`
    lines and `[DONE]` pass untouched; a data payload that is not a JSON
    object, or not valid JSON, is BadUpstream.
    """
    if event.startswith(b"data: {") and b"\n" not in event:
        # Fast path, byte-exact: mlx_lm.server echoes "default_model" when the
        # request names no model (we strip it), as json.dumps writes it.
        pos = event.find(DEFAULT_MODEL)
        if pos > 0 and _top_level(event, pos):
            try:
                loads(event[6:])  # valid, strict JSON (a few us in C), though not re-encoded
            except ValueError as e:
                raise BadUpstream(f"upstream event is not valid JSON: {e}") from None
            return event[:pos] + field + event[pos + len(DEFAULT_MODEL):] + b"\n\n"
        return b"data: " + _renamed_payload(event[6:], name) + b"\n\n"
    lines = event.split(b"\n")
    data = [i for i, line in enumerate(lines) if line.startswith(b"data:")]
    if not data:
        return event + b"\n\n"  # comments (": keepalive"), event:, id:, retry:
    parts = [lines[i][5:] for i in data]
    payload = b"\n".join(p[1:] if p.startswith(b" ") else p for p in parts)
    if payload.strip() == b"[DONE]":
        return event + b"\n\n"
    if not payload.lstrip().startswith(b"{"):
        raise BadUpstream("upstream event data is not a JSON object")
    out = [line for i, line in enumerate(lines) if i not in data[1:]]
    out[data[0]] = b"data: " + _renamed_payload(payload, name)
    return b"\n".join(out) + b"\n\n"


def event_data(event: bytes) -> bytes | None:
    """The data payload of one event, None when it has none."""
    if event.startswith(b"data:") and b"\n" not in event:
        payload = event[5:]
    else:
        parts = [line[5:] for line in event.split(b"\n") if line.startswith(b"data:")]
        if not parts:
            return None
        payload = b"\n".join(p[1:] if p.startswith(b" ") else p for p in parts)
        return payload
    return payload[1:] if payload.startswith(b" ") else payload


# -- assembling ----------------------------------------------------------------


class Parts(list):
    """Pieces of a string, joined once at the end (appending is linear)."""


def _append(target: dict, key, value: str) -> None:
    current = target.get(key)
    if type(current) is Parts:
        current.append(value)
    else:
        target[key] = Parts([current, value] if isinstance(current, str) else [value])


def _text(value) -> str:
    return "".join(value) if type(value) is Parts else value


def _dict(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise BadUpstream(f"upstream {what} is not an object")
    return value


class Assembler:
    """The non-streaming reply that a stream of chunks adds up to, built as they come.

    Mirrors mlx_lm.server's own non-streaming shape: message content null when
    empty, tool_calls and reasoning only when present, usage from the usage chunk.
    Linear in the total size. BadUpstream for a chunk of the wrong shape.
    """

    def __init__(self, name: str):
        self.name = name
        self.first: dict | None = None
        self.usage = None
        self.choices: dict[int, dict] = {}
        self.error = None  # the first in-band error the upstream sent

    def add(self, chunk) -> None:
        if not isinstance(chunk, dict):
            raise BadUpstream("upstream event is not an object")
        if self.first is None:
            self.first = chunk
        get = chunk.get
        if self.error is None:
            message = get("error")
            if isinstance(message, (str, dict)):
                self.error = (message.get("message", message) if isinstance(message, dict)
                              else message)
        usage = get("usage")
        if usage:
            self.usage = usage
        parts = get("choices") or []
        if not isinstance(parts, list):
            raise BadUpstream("upstream choices are not a list")
        for part in parts:
            if not isinstance(part, dict):
                raise BadUpstream("upstream choice is not an object")
            index = part.get("index", 0)
            if type(index) is not int and (not isinstance(index, int) or isinstance(index, bool)):
                raise BadUpstream("upstream choice index is not an integer")
            choice = self.choices.get(index)
            if choice is None:
                choice = self.choices[index] = {"index": index, "finish_reason": None}
            for key, value in part.items():
                if key == "delta":
                    if not isinstance(value, dict):
                        raise BadUpstream("upstream delta is not an object")
                    message = choice.get("message")
                    if message is None:
                        message = choice["message"] = {}
                    merge_delta(message, value)
                elif key == "finish_reason":
                    if value is not None:
                        choice[key] = value
                elif key == "text":
                    if value:
                        if not isinstance(value, str):
                            raise BadUpstream("upstream text is not a string")
                        _append(choice, "text", value)
                    else:
                        choice.setdefault("text", "")
                elif key == "logprobs" and isinstance(value, dict):
                    merged = choice.setdefault("logprobs", {})
                    for k, v in value.items():
                        if isinstance(v, list):
                            merged.setdefault(k, []).extend(v)
                        else:
                            merged[k] = v
                elif key != "index":
                    choice[key] = value

    def reply(self) -> dict:
        first = self.first or {}
        reply = {k: v for k, v in first.items() if k not in ("choices", "usage")}
        obj = reply.get("object", "chat.completion.chunk")
        if isinstance(obj, str) and obj.endswith(".chunk"):
            obj = obj[:-len(".chunk")]
        reply["object"] = obj
        reply["model"] = self.name
        for choice in self.choices.values():
            if "text" in choice:
                choice["text"] = _text(choice["text"])
            message = choice.get("message")
            if message is not None:
                for key, value in message.items():
                    if type(value) is Parts:
                        message[key] = "".join(value)
                rest = {k: v for k, v in message.items() if k not in ("role", "content")}
                message = {"role": message.get("role", "assistant"),
                           "content": message.get("content") or None, **rest}
                if "tool_calls" in message:
                    calls = []
                    for _, call in sorted(message["tool_calls"].items()):
                        fn = call.get("function")
                        if isinstance(fn, dict) and type(fn.get("arguments")) is Parts:
                            fn["arguments"] = "".join(fn["arguments"])
                        calls.append({k: v for k, v in call.items() if k != "index"})
                    message["tool_calls"] = calls
                del choice["message"]
                choice["message"] = message  # last, after logprobs, as mlx_lm has it
        reply["choices"] = [self.choices[i] for i in sorted(self.choices)]
        if self.usage is not None:
            reply["usage"] = self.usage
        return reply


def merge_delta(message: dict, delta: dict) -> None:
    for key, value in delta.items():
        if key in CONCATENATED and isinstance(value, str):
            _append(message, key, value)
        elif key == "tool_calls" and value is not None:
            if not isinstance(value, list):
                raise BadUpstream("upstream tool_calls are not a list")
            calls = message.get("tool_calls")
            if not isinstance(calls, dict):
                calls = message["tool_calls"] = {}
            for position, call in enumerate(value):
                call = _dict(call, "tool call")
                index = call.get("index", len(calls) if "id" in call else position)
                if not isinstance(index, int) or isinstance(index, bool):
                    raise BadUpstream("upstream tool call index is not an integer")
                merged = calls.setdefault(index, {})
                for k, v in call.items():
                    if k == "function" and isinstance(v, dict):
                        fn = merged.setdefault("function", {})
                        for fk, fv in v.items():
                            if fk == "arguments" and isinstance(fv, str):
                                _append(fn, fk, fv)
                            elif fv is not None:
                                fn[fk] = fv
                    elif v is not None:
                        merged[k] = v
        elif value is not None:
            message[key] = value
