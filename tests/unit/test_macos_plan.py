"""The macOS deploy, planned by the real pyinfra CLI against a fake Mac (no Mac exists here).

inventories/fake_mac.py is a pyinfra @fake host whose scripted answers are a
fresh Mac Studio (uname Darwin, macOS 15, 512 GB, nothing installed);
tests/fixtures/fake_mac.py runs the unchanged deploy.py against it and, for
the later runs, scripts "that Mac after the first run" from what the first
run sent it. The commands asserted here are what a real Mac would be told to
run; that launchd, sysctl and pmset accept them is checked on a Mac by
tests/host/test_macos.py.
"""

from __future__ import annotations

import json
import plistlib
import re

import pytest

from tests.fixtures.fake_mac import after, run_plan

pytestmark = pytest.mark.timeout(120)

HOME = "/Users/milo"
ROUTE = f"{HOME}/.local/share/mlx-route"
DAEMONS = "/Library/LaunchDaemons"
SERVER, PROXY = "org.mlxroute.server", "org.mlxroute.proxy"
SERVER_PLIST, PROXY_PLIST = f"{DAEMONS}/{SERVER}.plist", f"{DAEMONS}/{PROXY}.plist"
BOOT_PLIST = f"{DAEMONS}/org.mlxroute.host-tuning.plist"
NEWSYSLOG = "/etc/newsyslog.d/org.mlxroute.conf"
WIRED_MB = 512 * 1024 - 16 * 1024  # the fake Mac's RAM minus host_wired_headroom_gb


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fake-mac")


@pytest.fixture(scope="module")
def fresh(workdir):
    plan = run_plan(workdir)
    assert plan.code == 0, plan.output[-4000:]
    return plan


@pytest.fixture(scope="module")
def deployed(fresh):
    return after(fresh)


def index(commands: list[str], pattern: str) -> int:
    found = [i for i, c in enumerate(commands) if re.search(pattern, c)]
    assert found, f"no command matches {pattern!r}"
    return found[0]


def test_fresh_mac_gets_every_file_with_launchd_ownership(fresh):
    for path in (SERVER_PLIST, PROXY_PLIST, BOOT_PLIST, NEWSYSLOG, f"{ROUTE}/route.json",
                 f"{ROUTE}/bin/routectl.py", f"{ROUTE}/bin/proxy.pyz",
                 f"{ROUTE}/state/server.applied", f"{ROUTE}/state/proxy.applied"):
        assert path in fresh.uploads, f"{path} is not sent to the Mac"
    for path in (SERVER_PLIST, PROXY_PLIST, BOOT_PLIST, NEWSYSLOG):
        # launchd refuses a LaunchDaemon that root does not own or others can write
        assert f"chown root:wheel {path}" in fresh.commands
        assert f"chmod 644 {path}" in fresh.commands


def test_fresh_mac_bootstraps_both_services_into_the_system_domain_in_order(fresh):
    c = fresh.commands
    for label, plist in ((SERVER, SERVER_PLIST), (PROXY, PROXY_PLIST)):
        lint = index(c, rf"^plutil -lint -s {re.escape(plist)}$")
        enable = index(c, rf"^launchctl enable system/{re.escape(label)}$")
        bootstrap = index(c, rf"launchctl bootstrap system {re.escape(plist)} ")
        assert lint < enable < bootstrap
    server_bootstrap = index(c, rf"launchctl bootstrap system {SERVER_PLIST}")
    assert index(c, r"routectl\.py smoke ") < server_bootstrap
    assert (index(c, rf"launchctl bootstrap system {SERVER_PLIST}")
            < index(c, r"routectl\.py wait --kind server")
            < index(c, rf"launchctl bootstrap system {PROXY_PLIST}")
            < index(c, r"routectl\.py wait --kind proxy"))
    # a fresh Mac has nothing to restart or unload
    assert not fresh.matching(r"launchctl (kickstart|bootout system/\S+ \|\|)")


def test_fresh_mac_is_tuned_now_and_at_every_boot(fresh):
    assert f"sysctl -w iogpu.wired_limit_mb={WIRED_MB}" in fresh.commands
    # womp is already 1 on the fake Mac: only what differs is set
    assert "pmset -a sleep 0 disksleep 0 autorestart 1" in fresh.commands
    assert "launchctl limit maxfiles 65536 524288" in fresh.commands
    boot = plistlib.loads(fresh.uploads[BOOT_PLIST].encode())
    assert boot["Label"] == "org.mlxroute.host-tuning"
    assert boot["ProgramArguments"] == [
        "/bin/sh", "-c",
        f"/usr/sbin/sysctl -w iogpu.wired_limit_mb={WIRED_MB}; "
        "/bin/launchctl limit maxfiles 65536 524288",
    ]
    assert boot["RunAtLoad"] is True and boot["LaunchOnlyOnce"] is True
    # applied now by the commands above: the boot daemon is not bootstrapped
    assert not fresh.matching(r"launchctl \w+ system/org\.mlxroute\.host-tuning")


def test_service_plists_carry_the_shared_service_description(fresh):
    manifest = json.loads(fresh.uploads[f"{ROUTE}/route.json"])
    assert manifest["backend"] == "launchd" and manifest["launchd_domain"] == "system"
    assert manifest["services"] == {"server": SERVER, "proxy": PROXY}

    server = plistlib.loads(fresh.uploads[SERVER_PLIST].encode())
    proxy = plistlib.loads(fresh.uploads[PROXY_PLIST].encode())
    assert server["Label"] == SERVER and proxy["Label"] == PROXY
    argv = server["ProgramArguments"]
    assert argv[:3] == [f"{HOME}/venvs/mlx-route/bin/python", "-m", "mlx_lm.server"]
    assert argv[argv.index("--model") + 1] == f"{HOME}/models/glm-5.2-mxfp4"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "--trust-remote-code" in argv
    # the quotes of the profile's JSON survive XML escaping
    assert json.loads(argv[argv.index("--chat-template-args") + 1]) == {
        "enable_thinking": False, "reasoning_effort": None}
    assert proxy["ProgramArguments"][1] == f"{ROUTE}/bin/proxy.pyz"
    for plist, name in ((server, "server"), (proxy, "proxy")):
        env = plist["EnvironmentVariables"]
        assert {"/opt/homebrew/bin", "/usr/local/bin"} <= set(env["PATH"].split(":"))
        assert env["HOME"] == HOME and env["HF_HUB_CACHE"] == f"{ROUTE}/hf-cache"
        assert plist["WorkingDirectory"] == HOME
        assert plist["UserName"] == "milo"  # a LaunchDaemon that runs as the route user
        assert "LimitLoadToSessionType" not in plist
        assert plist["RunAtLoad"] is True and plist["KeepAlive"] is True
        assert plist["ThrottleInterval"] == 5
        assert plist["SoftResourceLimits"] == {"NumberOfFiles": 65536}
        assert plist["HardResourceLimits"] == {"NumberOfFiles": 65536}
        assert plist["StandardOutPath"] == f"{HOME}/models/_logs/{name}.out.log"
        assert plist["StandardErrorPath"] == f"{HOME}/models/_logs/{name}.err.log"
    assert server["ProcessType"] == "Interactive"
    assert proxy["ProcessType"] == "Standard"


def test_newsyslog_rotates_each_service_log(fresh):
    rules = [line.split("\t") for line in fresh.uploads[NEWSYSLOG].splitlines()
             if line and not line.startswith("#")]
    assert sorted(rule[0] for rule in rules) == sorted(
        f"{HOME}/models/_logs/{n}.{s}.log" for n in ("server", "proxy") for s in ("out", "err"))
    for rule in rules:
        # owner:group, mode, copies kept, size in KB (service_log_max_mb), any time, no signal
        assert rule[1:] == ["milo:staff", "644", "5", str(50 * 1024), "*", "N"]


def test_verify_route_skips_the_fake_host_and_says_so(fresh):
    assert "host suite not run: testinfra cannot reach this connector" in fresh.output
    assert not any("Run tests/host" in name for name in fresh.changed)


def test_rerun_on_an_unchanged_mac_changes_nothing_and_touches_no_launchd_job(workdir, deployed):
    plan = run_plan(workdir, deployed)
    assert plan.code == 0, plan.output[-4000:]
    assert plan.changed == []
    assert plan.unchanged  # it did plan, and found everything in place
    assert plan.uploads == {}
    assert plan.launchctl_changes() == []
    assert not plan.matching(r"^(sysctl -w|pmset -a|plutil)")


def test_changed_server_flag_reloads_only_the_server(workdir, deployed):
    plan = run_plan(workdir, deployed, 'server_extra_args=["--pipeline"]')
    assert plan.code == 0, plan.output[-4000:]
    assert set(plan.uploads) == {SERVER_PLIST, f"{ROUTE}/state/server.applied"}
    assert "--pipeline" in plistlib.loads(plan.uploads[SERVER_PLIST].encode())["ProgramArguments"]
    changes = plan.launchctl_changes()
    # launchd keeps the definition it read at bootstrap: a new plist needs bootout + bootstrap
    assert changes[0] == f"launchctl bootout system/{SERVER} >/dev/null 2>&1 || true"
    assert changes[1].startswith(f"n=0; while ! out=$(launchctl bootstrap system {SERVER_PLIST} ")
    assert len(changes) == 2
    assert not [c for c in changes if PROXY in c]
    assert not plan.matching(r"routectl\.py wait --kind proxy")
    assert index(plan.commands, r"routectl\.py smoke ") < index(plan.commands, "launchctl bootout")


def test_changed_server_code_kickstarts_the_server_with_its_plist_untouched(workdir, deployed):
    state = json.loads(json.dumps(deployed))
    # what the last successful start recorded no longer matches (e.g. a new patch or lock file)
    state["files"][f"{ROUTE}/state/server.applied"]["content"] = "0123456789abcdef\n"
    plan = run_plan(workdir, state)
    assert plan.code == 0, plan.output[-4000:]
    assert plan.launchctl_changes() == [f"launchctl kickstart -k system/{SERVER}"]
    assert SERVER_PLIST not in plan.uploads


def test_stopped_service_is_started_again(workdir, deployed):
    state = json.loads(json.dumps(deployed))
    state["launchd"][f"system/{PROXY}"] = "not running"
    plan = run_plan(workdir, state)
    assert plan.code == 0, plan.output[-4000:]
    assert plan.launchctl_changes() == [f"launchctl kickstart -k system/{PROXY}"]


def test_model_that_does_not_fit_the_gpu_limit_is_refused_before_anything_runs(workdir):
    plan = run_plan(workdir, None, "host_wired_headroom_gb=200")
    assert plan.code != 0
    assert "does not fit in a GPU wired limit of 319488 MB" in plan.output
    assert "glm-5.2-mxfp4" in plan.output and "host_wired_headroom_gb" in plan.output
    assert plan.uploads == {}
    assert not plan.matching(r"-m venv|hf download|sysctl -w|launchctl bootstrap")


def test_launchagents_over_ssh_use_the_user_domain(workdir):
    plan = run_plan(workdir, None, "service_launchd_domain=user")
    assert plan.code == 0, plan.output[-4000:]
    agents = f"{HOME}/Library/LaunchAgents"
    server = plistlib.loads(plan.uploads[f"{agents}/{SERVER}.plist"].encode())
    assert server["LimitLoadToSessionType"] == "Background"
    assert "UserName" not in server
    assert plan.matching(rf"launchctl bootstrap user/501 {agents}/{SERVER}\.plist ")
    assert f"launchctl enable user/501/{PROXY}" in plan.commands
    assert not plan.matching(rf"chown root:wheel {agents}")


def test_gui_domain_without_a_console_login_is_refused_with_what_to_do(workdir):
    plan = run_plan(workdir, None, "service_launchd_domain=gui")
    assert plan.code != 0
    assert "launchd domain gui/501 does not exist now" in plan.output
    assert 'service_launchd_domain = "system"' in plan.output
    assert not plan.matching(r"launchctl (enable|bootstrap)")


def test_documented_ci_dry_run_command_runs_the_plain_pyinfra_cli(workdir):
    """README's CI dry-run, exactly: `pyinfra -y -vv inventories/fake_mac.py deploy.py`."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    pyinfra = str(Path(sys.executable).parent / "pyinfra")
    proc = subprocess.run([pyinfra, "-y", "-vv", "inventories/fake_mac.py", "deploy.py"],
                          cwd=repo, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(workdir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f">>> launchctl enable system/{SERVER}" in proc.stderr
    assert f">>> sysctl -w iogpu.wired_limit_mb={WIRED_MB}" in proc.stderr


def test_root_work_runs_with_sudo_and_the_users_own_work_without(fresh):
    for pattern in (r"^launchctl enable system/", r"launchctl bootstrap system ",
                    r"^sysctl -w ", r"^pmset -a ", r"^launchctl limit maxfiles \d",
                    rf"^chown root:wheel {DAEMONS}/", r"^plutil -lint "):
        commands = fresh.matching(pattern)
        assert commands, pattern
        for command in commands:
            assert command in fresh.sudo, f"not run with sudo: {command}"
    # the venv, the weights and the smoke test belong to the route user
    for pattern in (r"-m venv ", r"hf download ", r"routectl\.py smoke "):
        commands = fresh.matching(pattern)
        assert commands and not set(commands) & fresh.sudo, pattern


def test_launchagents_run_without_sudo(workdir):
    plan = run_plan(workdir, None, "service_launchd_domain=user")
    assert plan.code == 0, plan.output[-4000:]
    assert plan.matching(r"launchctl (enable|bootstrap) user/501")
    assert not {c for c in plan.sudo if re.search(r"launchctl (enable|bootstrap) user/", c)}
