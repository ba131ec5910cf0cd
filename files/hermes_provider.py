#!/usr/bin/env python3
"""Merge this route's provider into Hermes' config.yaml, leaving the rest alone.

    python hermes_provider.py --config ~/.hermes/config.yaml --name mlx-route \
        --base-url http://127.0.0.1:8026/v1 --model smollm2-135m [--key-file FILE]

Run on the host by the deploy (tasks/workload.py) with the Hermes venv's
interpreter: ruamel.yaml comes with hermes-agent. Hermes 0.19 reads custom
providers from the keyed `providers:` mapping of config.yaml (`hermes chat
--provider NAME`); the entry written here is

    providers:
      <name>:
        base_url: <the route's /v1 URL>
        default_model: <model>
        api_key: <the proxy key, read from --key-file>   (only with a key)

On a fresh Hermes home (no `model` in config.yaml) it also adds `model:
{provider: <name>, default: <model>}`: Hermes 0.19 will not chat before
`model` names a provider; a model the user already chose is left alone.

The document is edited as text, not re-dumped: the lines of this provider's
entry are added (or replaced) and every other byte of the file, the user's
other providers included, stays as it was; the result is parsed again and
must mean the same as before everywhere else (else nothing is written).
Nothing is written when the entry is already as wanted. The file is written
to a temporary file and renamed into place, mode 0600 (it holds the key).
The key is never printed. Prints `changed` or `unchanged` (`--check`:
`unchanged` or `would change`, nothing written); exit 1 with one line on
stderr (what to fix) when the file cannot be used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile


class ProviderError(Exception):
    pass


def wanted_entry(base_url: str, model: str, key: str | None) -> dict:
    entry = {"base_url": base_url, "default_model": model}
    if key:
        entry["api_key"] = key
    return entry


PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def render(name: str, entry: dict, indent: int, step: int) -> list[str]:
    """The entry's lines, values as JSON strings (valid YAML double-quoted scalars)."""
    key = name if PLAIN_NAME.match(name) else json.dumps(name)
    return [f"{' ' * indent}{key}:\n"] + [
        f"{' ' * (indent + step)}{k}: {json.dumps(v)}\n" for k, v in entry.items()]


def _load(text: str, typ: str):
    from ruamel.yaml import YAML

    try:
        return YAML(typ=typ).load(text)
    except Exception as e:  # ruamel raises many kinds of YAMLError
        first = str(e).splitlines()[0] if str(e) else ""
        raise ProviderError(f"it is not valid YAML ({e.__class__.__name__}: {first}); fix it "
                            "by hand, or move it away to let the deploy start a new one") from None


def _is_filler(line: str) -> bool:
    """A blank line or a comment line: kept with what follows it."""
    return not line.strip() or line.lstrip().startswith("#")


def merge(text: str, name: str, entry: dict) -> str | None:
    """The new document, or None when `text` already has this entry.

    A text edit, not a re-dump: the lines of this provider's entry are added
    (or replaced) and every other byte of the file stays as it was; then the
    result is parsed again and must mean the same as before everywhere else.
    """
    doc = _load(text, "rt") if text.strip() else None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ProviderError("its top level is not a mapping; fix it by hand, or move it "
                            "away to let the deploy start a new one")
    providers = doc.get("providers")
    if providers is not None and not isinstance(providers, dict):
        raise ProviderError("its `providers` is not a mapping (Hermes 0.19 keys custom "
                            "providers by name there); fix it by hand")
    current = (providers or {}).get(name)
    if isinstance(current, dict) and dict(current) == entry and "model" in doc:
        return None
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    if "providers" not in doc:
        lines += ["providers:\n"] + render(name, entry, 2, 2)
    elif not providers:  # `providers:` or `providers: {}` (Hermes' own default)
        at = doc.lc.key("providers")[0]
        if lines[at].startswith(" ") or not lines[at].startswith("providers"):
            raise ProviderError("its `providers:` line is not where expected; fix it by hand")
        lines[at:at + 1] = ["providers:\n"] + render(name, entry, 2, 2)
    else:
        at = doc.lc.key("providers")[0]
        keys = list(providers)
        first_line, indent = providers.lc.key(keys[0])
        if first_line == at:
            raise ProviderError("its `providers` is written in flow style ({...}); write it "
                                "as a block mapping, one provider a line")
        step = 2
        sample = providers[keys[0]]
        if isinstance(sample, dict) and len(sample) and hasattr(sample, "lc"):
            sub_line, sub_col = sample.lc.key(next(iter(sample)))
            if sub_line != first_line and sub_col > indent:
                step = sub_col - indent
        # the block ends at the next top-level key (or the end), before the
        # blank and comment lines that lead into it
        end = next((i for i in range(at + 1, len(lines))
                    if not _is_filler(lines[i]) and not lines[i][0].isspace()), len(lines))
        while end > at + 1 and _is_filler(lines[end - 1]):
            end -= 1
        new_lines = render(name, entry, indent, step)
        if name in providers:
            start = providers.lc.key(name)[0]
            i = keys.index(name)
            stop = providers.lc.key(keys[i + 1])[0] if i + 1 < len(keys) else end
            while stop > start + 1 and _is_filler(lines[stop - 1]):
                stop -= 1
            lines[start:stop] = new_lines
        else:
            lines[end:end] = new_lines
    default = {"provider": name, "default": entry["default_model"]}
    if "model" not in doc:
        # a fresh Hermes home: `hermes chat` refuses to start (its first-run guard)
        # until `model` names a provider; a model already chosen is left alone
        lines += ["model:\n"] + [f"  {k}: {json.dumps(v)}\n" for k, v in default.items()]
    new = "".join(lines)
    # the edit must mean what it says: this provider as wanted, the rest unchanged
    before, after = _load(text, "safe") or {}, _load(new, "safe") or {}
    want = dict(before, providers=dict(before.get("providers") or {}, **{name: entry}))
    want.setdefault("model", default)
    if after != want:
        raise ProviderError("editing it as text did not give the expected document (an "
                            "unusual layout); add the provider by hand: "
                            f"providers: {{{name}: {{base_url: ..., default_model: ...}}}}")
    return new


def write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config.yaml.", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_key(key_file: str | None) -> str | None:
    if not key_file:
        return None
    try:
        with open(os.path.expanduser(key_file)) as f:
            key = f.read().strip()
    except OSError as e:
        raise ProviderError(f"cannot read the proxy key file {key_file} ({e.strerror}); run "
                            "the deploy with proxy_api_key set, or fix workload_key_file") from None
    if not key:
        raise ProviderError(f"the proxy key file {key_file} is empty; run the deploy with "
                            "--data proxy_rotate_key=True")
    return key


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--key-file", default=None)
    p.add_argument("--check", action="store_true",
                   help="only print `unchanged` or `would change`; write nothing")
    args = p.parse_args(argv)
    path = os.path.expanduser(args.config)
    try:
        key = read_key(args.key_file)
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        try:
            new = merge(text, args.name, wanted_entry(args.base_url, args.model, key))
        except ProviderError as e:
            raise ProviderError(f"{path}: {e}") from None
        private = new is None and not os.stat(path).st_mode & 0o077
        if args.check:
            print("unchanged" if private else "would change")
            return 0
        if new is None:
            # the entry is right; the file still must not be readable by others
            if not private:
                os.chmod(path, 0o600)
                print("changed")
            else:
                print("unchanged")
            return 0
        write_atomic(path, new)
    except ProviderError as e:
        print(f"hermes_provider: {e}", file=sys.stderr)
        return 1
    print("changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
