#!/usr/bin/env python3
"""Check, record and prepare a model directory on the host (stdlib only).

Uploaded by tasks/model.py and run with the venv's python (or any python3 3.8+):

  check  --dir D --shards N [--repo R --revision REV] [--record F] [--expect K=V ...]
         JSON report on stdout; exit 0 when the copy is complete (and, when
         --repo/--revision/--expect are given, its record matches), else 1.
  record --dir D --shards N (--repo R --revision REV | --expect K=V ...) [--host NAME]
         [--adopted]
         check; when complete, write D/.mlx-route.json (the given keys, e.g.
         repo + revision or package + dtype, and the commit hf resolved; with
         --adopted, that the copy was found on the host, not fetched) and
         exit 0; otherwise say on stderr what is missing, exit 1. A later
         `check` with the same keys then tells whether the copy is the one
         the data asks for (a changed pinned revision means: fetch again).
  clean  --dir D
         remove the *.incomplete files an interrupted `hf download` leaves in
         D/.cache/huggingface/download (it never reuses nor removes them).
  disk   --dir D --need-gib G --margin-gib M --host NAME [--whole]
         exit 2 with one actionable line when the disk of D lacks room for
         what is still to be fetched (G minus the shards already there, or
         all of G with --whole) + M.
  progress --dir D --shards N --total-gib G --interval S -- COMMAND...
         run COMMAND (`hf download ...`) and, every S seconds while it runs,
         print one line on stdout: shards in place / N, GiB in D (shards in
         place + hf's *.incomplete files; MiB below 1 GiB) / G, the rate since the start and
         the ETA at that rate; a last line when it ends. Exit with COMMAND's
         status. SIGTERM, SIGINT and SIGHUP are passed on to COMMAND.

What "complete" means: model.safetensors.index.json names every shard
(mlx-lm's loader globs *.safetensors, so a stray one breaks loading too); each
named shard exists with the size that its own safetensors header implies
(8 + header + tensor data), and with the size the Hub listed when hf recorded
one (D/.cache/huggingface/trees/<commit>.json, written by huggingface_hub
2.4's local-dir download); there are exactly N *.safetensors files; no
*.incomplete file is left. No byte of the weights is hashed: 368 GiB would take
longer than the download.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import subprocess
import sys
import time

INDEX = "model.safetensors.index.json"
RECORD = ".mlx-route.json"
HF_DIR = os.path.join(".cache", "huggingface")
GiB = 2**30  # every size in this project is in GiB


def _hf_download_dir(model_dir: str) -> str:
    return os.path.join(model_dir, HF_DIR, "download")


def hf_metadata(model_dir: str, filename: str) -> dict | None:
    """The (commit, etag) hf wrote after finishing a file, or None.

    Format (huggingface_hub/_local_folder.py): three lines, commit sha, etag
    (sha256 for LFS files), unix time of the write.
    """
    path = os.path.join(_hf_download_dir(model_dir), *filename.split("/")) + ".metadata"
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        return {"commit": lines[0].strip(), "etag": lines[1].strip(), "timestamp": float(lines[2])}
    except (OSError, IndexError, ValueError):
        return None


def hub_sizes(model_dir: str, commit: str | None) -> dict:
    """File sizes from the tree listing hf cached for that commit ({} if none)."""
    if not commit:
        return {}
    path = os.path.join(model_dir, HF_DIR, "trees", commit + ".json")
    try:
        with open(path, encoding="utf-8") as f:
            files = json.load(f)["files"]
        return {name: int(info["size"]) for name, info in files.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def safetensors_size(path: str) -> int:
    """Size a safetensors file must have, from its own header.

    Raises ValueError when the header is unreadable (truncated or not
    safetensors). Format: https://github.com/huggingface/safetensors#format
    """
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > 100 * 1024 * 1024:
            raise ValueError("header length %d is not plausible" % length)
        raw = f.read(length)
    if len(raw) != length:
        raise ValueError("header cut short")
    header = json.loads(raw.decode("utf-8"))
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = max(end, int(info["data_offsets"][1]))
    return 8 + length + end


def incomplete_files(model_dir: str) -> list:
    root = _hf_download_dir(model_dir)
    found = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if name.endswith(".incomplete"):
                found.append(os.path.relpath(os.path.join(dirpath, name), model_dir))
    return sorted(found)


def top_level_shards(model_dir: str) -> list:
    try:
        names = os.listdir(model_dir)
    except OSError:
        return []
    return sorted(
        n for n in names
        if n.endswith(".safetensors") and os.path.isfile(os.path.join(model_dir, n))
    )


def read_record(model_dir: str, name: str) -> dict | None:
    try:
        with open(os.path.join(model_dir, name), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def check(model_dir: str, shards: int, record: str = RECORD, expect: dict | None = None) -> dict:
    report = {
        "dir": model_dir,
        "complete": False,
        "up_to_date": False,
        "shards_expected": shards,
        "shards_in_index": 0,
        "shards_found": 0,
        "missing": [],
        "wrong_size": [],
        "extra": [],
        "incomplete": incomplete_files(model_dir),
        "errors": [],
        "bytes_present": 0,
        "commit": None,
        "revision_recorded": read_record(model_dir, record),
        "record_mismatch": {},
    }
    present = top_level_shards(model_dir)
    report["shards_found"] = len(present)
    report["bytes_present"] = sum(os.path.getsize(os.path.join(model_dir, n)) for n in present)

    index_path = os.path.join(model_dir, INDEX)
    named: list = []
    if not os.path.isfile(index_path):
        report["missing"].append(INDEX)
    else:
        try:
            with open(index_path, encoding="utf-8") as f:
                named = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            report["errors"].append("%s is not a readable index: %s" % (INDEX, e))
    report["shards_in_index"] = len(named)

    index_meta = hf_metadata(model_dir, INDEX)
    report["commit"] = index_meta["commit"] if index_meta else None
    listed = hub_sizes(model_dir, report["commit"])

    for name in named:
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            report["missing"].append(name)
            continue
        size = os.path.getsize(path)
        try:
            expected = safetensors_size(path)
        except (OSError, ValueError) as e:
            report["wrong_size"].append(
                {"file": name, "size": size, "expected": None, "why": str(e)}
            )
            continue
        if name in listed and listed[name] != expected:
            expected = listed[name]
        if size != expected:
            report["wrong_size"].append({"file": name, "size": size, "expected": expected})
    report["extra"] = [n for n in present if named and n not in named]

    if named and len(named) != shards:
        report["errors"].append(
            "%s names %d shards, the profile expects %d" % (INDEX, len(named), shards)
        )
    if report["shards_found"] != shards and not report["missing"]:
        report["errors"].append(
            "%d *.safetensors files found, the profile expects %d"
            % (report["shards_found"], shards)
        )
    report["complete"] = not (
        report["missing"] or report["wrong_size"] or report["extra"] or report["incomplete"]
        or report["errors"] or report["shards_found"] != shards
    )
    recorded = report["revision_recorded"] or {}
    for key, value in (expect or {}).items():
        if recorded.get(key) != value:
            report["record_mismatch"][key] = {"recorded": recorded.get(key), "wanted": value}
    report["up_to_date"] = report["complete"] and not report["record_mismatch"]
    return report


def summary(report: dict) -> str:
    parts = []
    if report["missing"]:
        parts.append("missing " + ", ".join(report["missing"]))
    if report["wrong_size"]:
        parts.append("wrong size " + ", ".join(
            "%s (%s bytes, want %s)" % (w["file"], w["size"], w["expected"])
            for w in report["wrong_size"]
        ))
    if report["extra"]:
        parts.append("not in the index (remove them) " + ", ".join(report["extra"]))
    if report["incomplete"]:
        parts.append("unfinished downloads " + ", ".join(report["incomplete"]))
    parts.extend(report["errors"])
    if not parts and report["shards_found"] != report["shards_expected"]:
        parts.append(
            "%d shards found, %d expected" % (report["shards_found"], report["shards_expected"])
        )
    for key, diff in report["record_mismatch"].items():
        parts.append("%s is %r, wanted %r" % (key, diff["recorded"], diff["wanted"]))
    return "; ".join(parts) or "complete"


def clean(model_dir: str) -> dict:
    removed, freed = [], 0
    for rel in incomplete_files(model_dir):
        path = os.path.join(model_dir, rel)
        try:
            freed += os.path.getsize(path)
            os.unlink(path)
            removed.append(rel)
        except FileNotFoundError:
            pass
    return {"removed": removed, "freed_bytes": freed}


def free_bytes(path: str) -> tuple:
    """Free bytes on the filesystem that holds path (or would, once created)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize, probe


def disk(model_dir: str, need_gib: float, margin_gib: float, host: str, whole: bool = False) -> tuple:
    free, probe = free_bytes(model_dir)
    present = 0 if whole else sum(
        os.path.getsize(os.path.join(model_dir, n)) for n in top_level_shards(model_dir)
    )
    to_fetch = max(0, int(need_gib * GiB) - present)
    report = {
        "dir": model_dir,
        "filesystem_of": probe,
        "free_bytes": free,
        "present_bytes": present,
        "to_fetch_bytes": to_fetch,
        "margin_bytes": int(margin_gib * GiB),
    }
    if free < to_fetch + margin_gib * GiB:
        message = (
            "%s: not enough free disk for %s: need %.1f GiB (+%g margin), %.1f GiB free; "
            "free space or set model_root to a bigger disk"
            % (host, model_dir, to_fetch / GiB, margin_gib, free / GiB)
        )
        return 2, report, message
    return 0, report, None


def downloaded(model_dir: str) -> tuple:
    """(shards in place, bytes in D): hf writes a file into .cache/.../download
    as <name>.incomplete and moves it into D when it is whole."""
    shards = top_level_shards(model_dir)
    size = 0
    for rel in shards + incomplete_files(model_dir):
        try:
            size += os.path.getsize(os.path.join(model_dir, rel))
        except OSError:
            pass  # moved or removed meanwhile
    return len(shards), size


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return "%d s" % seconds
    if seconds < 7200:
        return "%d min" % round(seconds / 60)
    return "%d h %02d min" % (seconds // 3600, seconds % 3600 // 60)


def progress_line(shards: int, total_shards: int, size: int, total_gib: float,
                  rate: float, elapsed: float, done: bool = False) -> str:
    if total_gib >= 1:
        sizes = "%.2f/%.2f GiB" % (size / GiB, total_gib)
    else:  # a small model: GiB with two decimals would not move
        sizes = "%.1f/%.1f MiB" % (size / 2**20, total_gib * 1024)
    line = "download: %d/%d shards, %s, %.1f MiB/s" % (shards, total_shards, sizes, rate / 2**20)
    if done:
        return line + ", %s in %s" % ("ended", _duration(elapsed))
    left = max(total_gib * GiB - size, 0)
    eta = _duration(left / rate) if rate > 0 else "unknown"
    return line + ", ETA %s" % eta


def follow(model_dir: str, total_shards: int, total_gib: float, interval: float,
           argv: list) -> int:
    """Run argv, printing a progress line every `interval` seconds."""
    _, start_size = downloaded(model_dir)
    started = time.monotonic()
    child = subprocess.Popen(argv)

    def forward(signum, _frame):
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)

    def line(done: bool = False) -> str:
        shards, size = downloaded(model_dir)
        elapsed = time.monotonic() - started
        rate = (size - start_size) / elapsed if elapsed > 0 else 0.0
        return progress_line(shards, total_shards, size, total_gib, max(rate, 0.0), elapsed, done)

    while True:
        try:
            code = child.wait(timeout=interval)
            break
        except subprocess.TimeoutExpired:
            print(line(), flush=True)
    print(line(done=True), flush=True)
    return code


def _expect_pairs(pairs: list) -> dict:
    result = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit("--expect wants KEY=VALUE, got %r" % pair)
        result[key] = value
    return result


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    for name in ("check", "record"):
        p = sub.add_parser(name)
        p.add_argument("--dir", required=True)
        p.add_argument("--shards", type=int, required=True)
        p.add_argument("--repo")
        p.add_argument("--revision")
        p.add_argument("--record", default=RECORD,
                       help="record file in --dir to compare --expect with")
        p.add_argument("--expect", action="append", metavar="KEY=VALUE")
        p.add_argument("--host", default=os.uname().nodename)
        if name == "record":
            p.add_argument("--adopted", action="store_true",
                           help="the copy was already on the host (downloaded by hand)")

    p = sub.add_parser("clean")
    p.add_argument("--dir", required=True)

    p = sub.add_parser("disk")
    p.add_argument("--dir", required=True)
    p.add_argument("--need-gib", type=float, required=True)
    p.add_argument("--margin-gib", type=float, default=0.0)
    p.add_argument("--host", default=os.uname().nodename)
    p.add_argument("--whole", action="store_true",
                   help="the fetch writes a whole new copy beside the old one (a conversion)")

    p = sub.add_parser("progress")
    p.add_argument("--dir", required=True)
    p.add_argument("--shards", type=int, required=True)
    p.add_argument("--total-gib", type=float, required=True)
    p.add_argument("--interval", type=float, required=True)
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND...")

    args = parser.parse_args(argv)
    model_dir = os.path.abspath(args.dir)

    if args.command == "progress":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd or args.interval <= 0:
            parser.error("progress needs --interval > 0 and -- COMMAND...")
        return follow(model_dir, args.shards, args.total_gib, args.interval, cmd)

    if args.command == "clean":
        print(json.dumps(clean(model_dir)))
        return 0

    if args.command == "disk":
        code, report, message = disk(model_dir, args.need_gib, args.margin_gib, args.host, args.whole)
        # On failure the one line is the whole message a person reads in the deploy log.
        print(message, file=sys.stderr) if message else print(json.dumps(report))
        return code

    expect = _expect_pairs(args.expect)
    if args.repo is not None:
        expect["repo"] = args.repo
    if args.revision is not None:
        expect["revision"] = args.revision

    if args.command == "check":
        report = check(model_dir, args.shards, args.record, expect)
        print(json.dumps(report, sort_keys=True))
        return 0 if report["up_to_date"] else 1

    # record
    if not expect:
        parser.error("record needs --repo and --revision, or --expect KEY=VALUE")
    report = check(model_dir, args.shards, RECORD, {})
    if not report["complete"]:
        what = ("it cannot be adopted: fix or remove it, or unset model_dir to download"
                if args.adopted else "run the deploy again to resume the download")
        print("%s: the model in %s is not complete: %s; %s"
              % (args.host, model_dir, summary(report), what), file=sys.stderr)
        return 1
    data = dict(expect, commit=report["commit"], shards=args.shards)
    if args.adopted:
        data["adopted"] = True
    path = os.path.join(model_dir, RECORD)
    if read_record(model_dir, RECORD) != data:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    report = check(model_dir, args.shards, RECORD, expect)
    print(json.dumps(report, sort_keys=True))
    return 0 if report["up_to_date"] else 1


if __name__ == "__main__":
    sys.exit(main())
