#!/usr/bin/env python3
"""Apply the mlx-route patch series to the mlx_lm of the Python that runs this.

    python mlx_patches.py --series DIR --record FILE (--check | --apply)

Run it with the venv's interpreter: it finds that venv's mlx_lm through
importlib.metadata, so it patches exactly what `mlx_lm.server` will import.
Standard library only, and hunks are applied in Python: macOS ships BSD
patch and may lack git, and the result must not depend on either.

Each patch of DIR/series is in one state:
  applied      the tree already has it (reverse-applies) at its target version
  would-apply  it applies cleanly (--check); --apply makes it `newly-applied`
  upstream     the tree has it but mlx-lm is not its target version: upstream
               shipped the change, the patch is droppable (see patches/README.md)
  conflict     neither: the series does not fit this mlx-lm; nothing is changed

--apply is all-or-nothing: touched files are backed up and restored on any
failure, so the package is byte-identical to before; stale bytecode of touched
files is removed after success; the record (version, patch names and sha256,
time) is written only after success.

stdout: one JSON document: changed (mlx_lm files were / would be changed),
mlx_lm_version, patches: [{name, sha256, state, ...}], droppable, and
record_current (the record already says this; --apply rewrites it if not).
Exit 0: done / nothing to do.  Exit 2: refused; the reason is on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

SCRIPT_SHA256 = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
HUNK_RE = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
TARGET_RE = re.compile(r"^Target-Version:\s*(?:mlx-lm\s+)?(\S+)\s*$", re.M)


class Refused(Exception):
    """The series cannot be applied; the message says why and what to do."""


@dataclass
class Hunk:
    header: str
    old_start: int
    old: list[str]
    new: list[str]


@dataclass
class FilePatch:
    path: str  # relative to site-packages, e.g. mlx_lm/server.py
    hunks: list[Hunk] = field(default_factory=list)


@dataclass
class Patch:
    name: str
    sha256: str
    target: str | None
    files: list[FilePatch]


def _strip_prefix(path: str) -> str:
    path = path.split("\t", 1)[0].strip()
    return path[2:] if path[:2] in ("a/", "b/") else path


def parse_patch(path: Path) -> Patch:
    raw = path.read_bytes()
    text = raw.decode("utf-8")
    target = TARGET_RE.search(text.split("\n--- ", 1)[0])
    files: list[FilePatch] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            new_path = _strip_prefix(lines[i + 1][4:])
            if new_path == "/dev/null" or _strip_prefix(line[4:]) == "/dev/null":
                raise Refused(f"{path.name}: creating or deleting files is not supported")
            files.append(FilePatch(new_path))
            i += 2
            continue
        m = HUNK_RE.match(line)
        if m:
            if not files:
                raise Refused(f"{path.name}: hunk before any file header")
            old_len = int(m.group(2) or 1)
            new_len = int(m.group(4) or 1)
            hunk = Hunk(line, int(m.group(1)), [], [])
            i += 1
            while len(hunk.old) < old_len or len(hunk.new) < new_len:
                if i >= len(lines):
                    raise Refused(f"{path.name}: truncated hunk {line}")
                body = lines[i]
                tag, rest = (body[:1], body[1:]) if body else (" ", "")
                if tag == " ":
                    hunk.old.append(rest)
                    hunk.new.append(rest)
                elif tag == "-":
                    hunk.old.append(rest)
                elif tag == "+":
                    hunk.new.append(rest)
                elif tag != "\\":
                    raise Refused(f"{path.name}: malformed line in hunk {line}: {body!r}")
                i += 1
            files[-1].hunks.append(hunk)
            continue
        i += 1
    if not files:
        raise Refused(f"{path.name}: no file changes found")
    return Patch(
        name=path.name,
        sha256=hashlib.sha256(raw).hexdigest(),
        target=target.group(1) if target else None,
        files=files,
    )


def read_series(series: Path) -> list[Patch]:
    order = series / "series"
    if not order.is_file():
        raise Refused(f"{order} does not exist: the series directory needs a `series` file")
    names = [
        ln.split("#", 1)[0].strip() for ln in order.read_text().splitlines()
    ]
    patches = []
    for name in filter(None, names):
        p = series / name
        if not p.is_file():
            raise Refused(f"{order} lists {name}, which is not in {series}")
        patches.append(parse_patch(p))
    return patches


def _find(lines: list[str], block: list[str], want: int, lo: int) -> int | None:
    """Index where `block` matches exactly, nearest to `want`, not before `lo`."""
    n = len(block)
    hi = len(lines) - n
    if hi < lo:
        return None
    want = min(max(want, lo), hi)
    for dist in range(0, max(want - lo, hi - want) + 1):
        for pos in (want - dist, want + dist):
            if lo <= pos <= hi and lines[pos : pos + n] == block:
                return pos
    return None


def apply_hunks(text: str, fp: FilePatch, reverse: bool) -> tuple[str | None, int]:
    """New text, or (None, number of the first hunk that does not fit)."""
    trailing = text.endswith("\n")
    lines = text.split("\n")
    if trailing:
        lines.pop()
    delta = 0
    lo = 0
    for number, h in enumerate(fp.hunks, 1):
        old, new = (h.new, h.old) if reverse else (h.old, h.new)
        pos = _find(lines, old, h.old_start - 1 + delta if old else h.old_start + delta, lo)
        if pos is None:
            return None, number
        lines[pos : pos + len(old)] = new
        delta += len(new) - len(old)
        lo = pos + len(new)
    return "\n".join(lines) + ("\n" if trailing else ""), 0


def find_mlx_lm() -> tuple[str, Path]:
    try:
        dist = metadata.distribution("mlx_lm")
    except metadata.PackageNotFoundError:
        raise Refused(
            f"mlx_lm is not installed for {sys.executable}: create the venv first "
            "(run this script with the venv's python)"
        ) from None
    site = Path(dist.locate_file(""))
    if not (site / "mlx_lm" / "__init__.py").is_file():
        raise Refused(f"mlx_lm {dist.version}: package files not found under {site}")
    return dist.version, site


def plan(patches: list[Patch], version: str, site: Path):
    """Per-patch states and the new text of every file a pending patch touches."""
    contents: dict[str, str] = {}
    originals: dict[str, str] = {}
    results = []

    def text_of(rel: str) -> str | None:
        if rel not in contents:
            f = site / rel
            if not f.is_file():
                return None
            contents[rel] = originals[rel] = f.read_text(encoding="utf-8")
        return contents[rel]

    for patch in patches:
        entry = {"name": patch.name, "sha256": patch.sha256, "target_version": patch.target}

        def run(reverse: bool):
            out = {}
            for fp in patch.files:
                text = text_of(fp.path)
                if text is None:
                    return None, f"{fp.path} does not exist"
                new, bad = apply_hunks(text, fp, reverse)
                if new is None:
                    h = fp.hunks[bad - 1]
                    return None, f"hunk #{bad} of {fp.path} ({h.header.strip()})"
                out[fp.path] = new
            return out, None

        undone, _ = run(reverse=True)
        if undone is not None:
            if patch.target and version != patch.target:
                entry["state"] = "upstream"
                entry["detail"] = (
                    f"mlx-lm {version} already contains this change (target was "
                    f"{patch.target}): drop the patch from the series"
                )
            else:
                entry["state"] = "applied"
            results.append(entry)
            continue
        done, failure = run(reverse=False)
        if done is None:
            entry["state"] = "conflict"
            target = patch.target or "unknown"
            entry["detail"] = (
                f"{patch.name}: {failure} does not apply: mlx-lm {version} is not the "
                f"version this series targets ({target}): update the patches or pin "
                f"mlx-lm back"
            )
            results.append(entry)
            continue
        contents.update(done)
        entry["state"] = "would-apply"
        if patch.target and version != patch.target:
            entry["detail"] = f"applies cleanly, but its target is mlx-lm {patch.target}"
        results.append(entry)
    changed = {rel: t for rel, t in contents.items() if t != originals.get(rel)}
    return results, changed


def record_doc(version: str, site: Path, results: list[dict]) -> dict:
    return {
        "mlx_lm_version": version,
        "package_dir": str(site / "mlx_lm"),
        "patches": [
            {"name": r["name"], "sha256": r["sha256"], "state": r["state"]} for r in results
        ],
    }


def _same_record(path: Path, want: dict) -> bool:
    try:
        have = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return {k: have.get(k) for k in want} == want


def write_files(site: Path, changed: dict[str, str]) -> None:
    """Write all or nothing: on any failure every file is put back as it was."""
    backup = Path(tempfile.mkdtemp(prefix="mlx-patches-backup-"))
    saved: list[tuple[Path, Path]] = []
    try:
        for rel in changed:
            src = site / rel
            dst = backup / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            saved.append((src, dst))
        for rel, text in changed.items():
            target = site / rel
            tmp = target.with_name(f".{target.name}.mlx-patches.tmp")
            tmp.write_text(text, encoding="utf-8")
            shutil.copymode(target, tmp)
            os.replace(tmp, target)
            if target.suffix == ".py":
                compile(text, str(target), "exec")
    except BaseException:
        for src, dst in saved:
            shutil.copy2(dst, src)
        for rel in changed:
            (site / rel).with_name(f".{(site / rel).name}.mlx-patches.tmp").unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)
    for rel in changed:
        target = site / rel
        for pyc in (target.parent / "__pycache__").glob(f"{target.stem}.*.pyc"):
            pyc.unlink(missing_ok=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--series", required=True, type=Path, help="directory with series + *.patch")
    ap.add_argument("--record", required=True, type=Path, help="JSON record written after --apply")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="report, change nothing")
    mode.add_argument("--apply", action="store_true", help="apply what is missing")
    args = ap.parse_args(argv)

    out = {"changed": False, "script_sha256": SCRIPT_SHA256}
    try:
        patches = read_series(args.series)
        version, site = find_mlx_lm()
        out.update(mlx_lm_version=version, package_dir=str(site / "mlx_lm"))
        results, changed = plan(patches, version, site)
        out["patches"] = results
        out["droppable"] = [r["name"] for r in results if r["state"] == "upstream"]
        conflicts = [r for r in results if r["state"] == "conflict"]
        if conflicts:
            raise Refused("\n".join(r["detail"] for r in conflicts) + "\nNothing was changed.")
        record = record_doc(version, site, results)
        out["record_current"] = _same_record(args.record, record)
        if args.check:
            out["changed"] = bool(changed)
            print(json.dumps(out, indent=1))
            return 0
        try:
            write_files(site, changed)
        except Exception as exc:
            raise Refused(
                f"writing the patched files failed ({exc!r}); every file was restored"
            ) from exc
        for r in results:
            if r["state"] == "would-apply":
                r["state"] = "newly-applied"
        record = record_doc(version, site, results)
        if not out["record_current"] or changed:
            args.record.parent.mkdir(parents=True, exist_ok=True)
            doc = dict(record, applied_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            for r in doc["patches"]:
                if r["state"] == "newly-applied":
                    r["state"] = "applied"
            tmp = args.record.with_name(args.record.name + ".tmp")
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
            os.replace(tmp, args.record)
        out["changed"] = bool(changed)
        out["record_current"] = True
        print(json.dumps(out, indent=1))
        for r in results:
            if r["state"] in ("newly-applied", "upstream"):
                print(f"{r['name']}: {r['state']} (mlx-lm {version})", file=sys.stderr)
        return 0
    except Refused as exc:
        out["error"] = str(exc)
        print(json.dumps(out, indent=1))
        print(f"mlx_patches: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
