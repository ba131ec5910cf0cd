"""A fake Mac Studio: the whole macOS deploy planned with no Mac (the CI dry-run).

    pyinfra -y -vv inventories/fake_mac.py deploy.py

pyinfra's @fake connector executes nothing: every fact and every operation's
command is answered from the scripted `fake_responses` below (first match
wins; anything unmatched "succeeds" with no output), and `-vv` prints each
command the deploy would run on the Mac (`>>> launchctl bootstrap system ...`).
Add `--json` for machine-readable results. The route is not verified (the host
suite needs a real host: verify_route logs that it skipped this connector).

By default the answers describe a fresh Mac Studio M3 Ultra (512 GB, macOS
15, nothing of the route installed), so the run prints the full first deploy.
To plan a run against a Mac in another state, point MLXROUTE_FAKE_MAC_STATE
at a JSON file that says what already exists there:

    {"files": {"/path": {"content": "...", "user": "root", "group": "wheel", "mode": "644"}},
     "dirs": ["/path", ...],
     "launchd": {"system/org.mlxroute.server": "running", ...},
     "responses": [["substring", "stdout"], ["re:^regex$", {"stdout": "...", "success": false}]]}

tests/unit/test_macos_plan.py builds such states (an unchanged Mac, a Mac
with an older server flag) and asserts the planned commands.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex

USER = "milo"
GROUP = "staff"
UID = 501
HOME = f"/Users/{USER}"
MEMSIZE = 512 * 2**30  # hw.memsize of a 512 GB Mac Studio
MACOS = "15.5"

# What `pmset -g` and `launchctl limit maxfiles` say on a Mac out of the box.
_PMSET_DEFAULTS = [
    "System-wide power settings:",
    "Currently in use:",
    " standby              0",
    " Sleep On Power Button 1",
    " autorestart          0",
    " powernap             1",
    " networkoversleep     0",
    " disksleep            10",
    " sleep                1",
    " ttyskeepawake        1",
    " displaysleep         10",
    " tcpkeepalive         1",
    " womp                 1",
]
MAXFILES_DEFAULT = "\tmaxfiles    256            unlimited      "

# Directories every Mac has (the deploy writes into them).
_SYSTEM_DIRS = ["/Library/LaunchDaemons", "/etc/newsyslog.d", HOME, f"{HOME}/Library",
               f"{HOME}/Library/LaunchAgents"]


def stat_line(path: str, kind: str = "file", user: str = USER, group: str = GROUP,
              mode: str = "644", size: int = 0) -> str:
    """What pyinfra's File/Directory fact reads from `stat -c ...`."""
    bits = "".join(
        ("r" if int(d) & 4 else "-") + ("w" if int(d) & 2 else "-") + ("x" if int(d) & 1 else "-")
        for d in mode.zfill(3)[-3:]
    )
    flag = "d" if kind == "dir" else "-"
    return (f"user={user} group={group} mode={flag}{bits} atime=1767225600 mtime=1767225600 "
            f"ctime=1767225600 size={size} '{path}'")


def existing_dir(path: str, user: str = USER, group: str = GROUP, mode: str = "755") -> dict:
    q = shlex.quote(path)
    return {f"! (test -e {q} || test -L {q} )": stat_line(path, "dir", user, group, mode)}


def existing_file(path: str, content: str, user: str = USER, group: str = GROUP,
                  mode: str = "644") -> dict:
    q = shlex.quote(path)
    data = content.encode("utf-8", "surrogateescape")  # binary uploads round-trip
    return {
        f"! (test -e {q} || test -L {q} )": stat_line(path, "file", user, group, mode, len(data)),
        f"sha1sum {q} 2>": f"{hashlib.sha1(data).hexdigest()}  {path}",
        f"( test -e {q} && cat {q} )": content.splitlines() or [""],
    }


def loaded_job(target: str, state: str = "running") -> dict:
    """`launchctl print <domain>/<label>` of a loaded job (nothing: not loaded)."""
    domain, label = target.rsplit("/", 1)
    return {f"launchctl print {shlex.quote(target)} ": [
        f"{target} = {{",
        "\tactive count = 1",
        f"\tpath = /Library/LaunchDaemons/{label}.plist",
        f"\ttype = {'LaunchDaemon' if domain == 'system' else 'LaunchAgent'}",
        f"\tstate = {state}",
        "",
        "\tpid = 4242" if state == "running" else "\tlast exit code = 1",
        "}",
    ]}


def _matcher(key: str):
    return re.compile(key[3:]) if key.startswith("re:") else key


def scripted_state(path: str | None) -> dict:
    """The answers for what MLXROUTE_FAKE_MAC_STATE says exists on the Mac."""
    if not path:
        return {}
    with open(path) as f:
        state = json.load(f)
    answers: dict = {}
    for key, response in state.get("responses", []):
        answers[_matcher(key)] = response
    for target, job_state in state.get("launchd", {}).items():
        answers.update(loaded_job(target, job_state))
    for file_path, spec in state.get("files", {}).items():
        answers.update(existing_file(file_path, spec["content"], spec.get("user", USER),
                                     spec.get("group", GROUP), str(spec.get("mode", "644"))))
    for dir_path in state.get("dirs", []):
        answers.update(existing_dir(dir_path))
    return answers


def fresh_mac() -> dict:
    answers: dict = {
        # tasks/budget.py MemoryLimits (macOS: hw.memsize only); before "uname -s",
        # which its script also contains
        'if [ "$(uname -s)" = Darwin ]': f"ram {MEMSIZE}",
        "uname -s": "Darwin",
        "sw_vers -productVersion": MACOS,
        "echo $USER": USER,
        re.compile(r"^echo ~[A-Za-z0-9_.-]*$"): HOME,
        f"id -u {USER}": str(UID),
        f"id -gn {USER}": GROUP,
        "sysctl -n hw.memsize": str(MEMSIZE),
        "sysctl -n iogpu.wired_limit_mb": "0",  # 0: macOS's default (about 75% of RAM)
        "pmset -g": _PMSET_DEFAULTS,
        "launchctl limit maxfiles": MAXFILES_DEFAULT,
        "fdesetup status": "FileVault is Off.",  # test_macos_plan.py scripts it On
        # no release yet (tasks/release.py ReleaseState)
        "echo current=$(readlink": ["current=", "next=", "wanted=absent"],
        # an SSH session exists (user/501); nobody is logged in at the console (no gui/501)
        f"launchctl print user/{UID} >/dev/null": "yes",
        # Homebrew's Python (venv_python below) is installed
        # (tasks/interpreter.py: the path, then major and minor)
        "command -v /opt/homebrew/bin/python3.12": "/opt/homebrew/bin/python3.12\n3 12",
    }
    for path in _SYSTEM_DIRS:
        answers.update(existing_dir(path, "root" if not path.startswith(HOME) else USER,
                                    "wheel" if not path.startswith(HOME) else GROUP))
    return answers


scripted = scripted_state(os.environ.get("MLXROUTE_FAKE_MAC_STATE"))

# MLXROUTE_FAKE_MAC_CLUSTER=ring or jaccl: two fresh Mac Studios that serve one
# model together over Thunderbolt (tasks/cluster.py): a Thunderbolt bridge with
# an address each, and for jaccl the RDMA device towards the other Mac.
_CLUSTER_BACKEND = os.environ.get("MLXROUTE_FAKE_MAC_CLUSTER")
_CLUSTER_HOSTS = ["@fake/mac-studio", "@fake/mac-studio-2"]
_CLUSTER_IPS = ["10.0.7.1", "10.0.7.2"]
_CLUSTER_RDMA = [[None, "rdma_en3"], ["rdma_en3", None]]


def _cluster_data(backend: str) -> dict:
    ranks = []
    for name, ip, rdma in zip(_CLUSTER_HOSTS, _CLUSTER_IPS, _CLUSTER_RDMA):
        ranks.append({"host": name, "ip": ip, **({"rdma": rdma} if backend == "jaccl" else {})})
    return {"cluster_ranks": ranks, "cluster_backend": backend}


hosts = [
    ("@fake/mac-studio", {
        # the scripted state first: the first matching answer wins
        "fake_responses": {**scripted,
                           **{k: v for k, v in fresh_mac().items() if k not in scripted}},
        "fake_delay": 0,
        "fake_delay_jitter": 0,
        # the field report's route: GLM-5.2 behind a LAN-visible proxy with a key
        "model_profile": "glm-5.2-mxfp4",
        "venv_python": "/opt/homebrew/bin/python3.12",
        "proxy_host": "0.0.0.0",
        "proxy_api_key": True,
    }),
]

if _CLUSTER_BACKEND:
    hosts = [(name, {**hosts[0][1], **_cluster_data(_CLUSTER_BACKEND)}) for name in _CLUSTER_HOSTS]
