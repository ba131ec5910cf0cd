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
import os
import plistlib
import re
import shlex
import subprocess
import sys

import pytest

from tests.fixtures.fake_mac import INVENTORY, REPO, after, run_plan

pytestmark = pytest.mark.timeout(120)

HOME = "/Users/milo"
ROUTE = f"{HOME}/.local/share/mlx-route"
DAEMONS = "/Library/LaunchDaemons"
SERVER, PROXY = "org.mlxroute.server", "org.mlxroute.proxy"
SERVER_PLIST, PROXY_PLIST = f"{DAEMONS}/{SERVER}.plist", f"{DAEMONS}/{PROXY}.plist"
BOOT_PLIST = f"{DAEMONS}/org.mlxroute.host-tuning.plist"
NEWSYSLOG = "/etc/newsyslog.d/org.mlxroute.conf"
WIRED_MB = 512 * 1024 - 16 * 1024  # the fake Mac's RAM minus host_memory_headroom_gib
STAGED = f"{ROUTE}/state/server.definition.next"  # the server's plist until the switch installs it
SUDOERS = "/etc/sudoers.d/org-mlxroute-watchdog"
KICKSTART = f"/bin/launchctl kickstart -k system/{SERVER}"
LAUNCHER = f"{ROUTE}/bin/route_run.py"  # writes the services' logs, then becomes the service


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


def switch_of(plan) -> dict:
    """The options of the plan's one `routectl.py switch` command (tasks/server.py)."""
    (command,) = plan.matching(r"routectl\.py switch ")
    argv = shlex.split(command)
    options = {}
    for i, word in enumerate(argv):
        if word.startswith("--"):
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else True
            options.setdefault(word[2:], value)
    options["command"] = command
    return options


def index(commands: list[str], pattern: str) -> int:
    found = [i for i, c in enumerate(commands) if re.search(pattern, c)]
    assert found, f"no command matches {pattern!r}"
    return found[0]


def test_fresh_mac_gets_every_file_with_launchd_ownership(fresh):
    for path in (STAGED, PROXY_PLIST, BOOT_PLIST, f"{ROUTE}/route.json",
                 f"{ROUTE}/bin/routectl.py", f"{ROUTE}/bin/proxy.pyz", LAUNCHER,
                 f"{ROUTE}/state/server.applied", f"{ROUTE}/state/proxy.applied"):
        assert path in fresh.uploads, f"{path} is not sent to the Mac"
    for path in (PROXY_PLIST, BOOT_PLIST):
        # launchd refuses a LaunchDaemon that root does not own or others can write
        assert f"chown root:wheel {path}" in fresh.commands
        assert f"chmod 644 {path}" in fresh.commands
    # the server's plist is put in place by the switch, as root (mode 0644), so
    # that a failed start can put the previous one back
    switch = switch_of(fresh)
    assert (switch["definition"], switch["staged"]) == (SERVER_PLIST, STAGED)
    assert switch["command"] in fresh.sudo


def test_fresh_mac_bootstraps_both_services_into_the_system_domain_in_order(fresh):
    c = fresh.commands
    lint = index(c, rf"^plutil -lint -s {re.escape(PROXY_PLIST)}$")
    enable = index(c, rf"^launchctl enable system/{re.escape(PROXY)}$")
    bootstrap = index(c, rf"launchctl bootstrap system {re.escape(PROXY_PLIST)} ")
    assert lint < enable < bootstrap
    switch = switch_of(fresh)
    # the server: linted, enabled, bootstrapped by the switch once the smoke passed
    assert switch["start"].startswith(
        f"plutil -lint -s {SERVER_PLIST} && launchctl enable system/{SERVER} && n=0; "
        f"while ! out=$(launchctl bootstrap system {SERVER_PLIST} ")
    assert switch["stop"].startswith(f"launchctl bootout system/{SERVER} >/dev/null 2>&1 || true")
    assert switch["url"] == "http://127.0.0.1:8025"
    assert (index(c, r"routectl\.py switch ")
            < index(c, rf"launchctl bootstrap system {PROXY_PLIST}")
            < index(c, r"routectl\.py wait --kind proxy"))
    # a fresh Mac has nothing to restart or unload
    assert not fresh.matching(r"^launchctl (kickstart|bootout system/\S+ \|\|)")


def test_glm_on_the_512_gib_mac_restarts_stop_first_and_the_plan_prints_the_budget(fresh):
    """Two copies of GLM-5.2 never fit: the switch stops the server before the smoke."""
    assert ("@fake/mac-studio: memory budget (GiB): RAM 512.00 - headroom 16.00 = 496.00; "
            "model 404.80 - route 0.25 - prompt cache 45.47 = free 45.47; a second copy of the "
            "model does NOT fit; restart strategy: stop-first") in fresh.output
    switch = switch_of(fresh)
    assert switch["strategy"] == "stop-first"
    assert switch["maintenance"] == f"{ROUTE}/state/maintenance.json"
    assert switch["run-as"] == "milo"  # the smoke runs as the route user, not root
    smoke = json.loads(switch["smoke"])
    assert smoke["model"] == f"{HOME}/models/glm-5.2-mxfp4" and smoke["trust_remote_code"]
    # the server's own template arguments: the smoke prompts GLM as the server will
    assert json.loads(smoke["chat_template_args"]) == {"enable_thinking": False,
                                                       "reasoning_effort": None}
    assert "Switch the server to release" in " ".join(fresh.changed)


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
        'echo "host tuning applied at $(/bin/date +%s)"; '  # the host suite's boot order check
        "/bin/launchctl limit maxfiles 65536 524288",
    ]
    assert boot["RunAtLoad"] is True and boot["LaunchOnlyOnce"] is True
    # applied now by the commands above: the boot daemon is not bootstrapped
    assert not fresh.matching(r"launchctl \w+ system/org\.mlxroute\.host-tuning")


def test_fresh_mac_stays_awake_for_the_whole_download(fresh):
    """Issue 16: pmset (and the GPU and file limits) come before the weights
    are fetched, and `hf download` itself runs under caffeinate, so idle sleep
    cannot cut a 368 GB download short."""
    c = fresh.commands
    download = index(c, r"hf download ")
    assert index(c, r"^pmset -a ") < download
    assert index(c, r"^sysctl -w iogpu\.wired_limit_mb=") < download
    assert index(c, r"^launchctl limit maxfiles \d") < download
    (command,) = fresh.matching(r"hf download ")
    # caffeinate holds the whole of it: the progress reporter and hf under it
    assert re.search(r"(^|; )/usr/bin/caffeinate -i -s \S*/bin/python \S*/check_weights\.py "
                     r"progress --dir \S+ --shards 76 --total-gib 368 --interval 30 -- "
                     r"env HF_HUB_DISABLE_PROGRESS_BARS=1 \S*/bin/hf download ", command), command


def test_download_stays_awake_with_host_tuning_off(workdir):
    plan = run_plan(workdir, None, "host_tuning_enabled=False")
    assert plan.code == 0, plan.output[-4000:]
    assert not plan.matching(r"^(pmset -a|sysctl -w)")
    (command,) = plan.matching(r"hf download ")
    assert command.startswith("/usr/bin/caffeinate -i -s ")
    # no tuning: no limit to wait for at boot
    assert "wait-sysctl" not in launcher_options(plistlib.loads(plan.uploads[STAGED].encode()))


def test_service_plists_carry_the_shared_service_description(fresh):
    manifest = json.loads(fresh.uploads[f"{ROUTE}/route.json"])
    assert manifest["backend"] == "launchd" and manifest["launchd_domain"] == "system"
    assert manifest["services"] == {"server": SERVER, "proxy": PROXY}
    # the host suite's and the probes' checks come from the backend (tasks/backends)
    assert manifest["service_running"] == {
        "server": [f"launchctl print system/{SERVER}", "state = running"],
        "proxy": [f"launchctl print system/{PROXY}", "state = running"]}
    assert manifest["server_pid_command"].startswith("/usr/sbin/lsof -t -nP -iTCP:")
    # MLX runs on Metal: no BLAS preloaded (server_blas_library is Linux's), none asked of the Mac
    assert manifest["server_blas"]["mapped"] is None and not fresh.matching("openblas")

    server = plistlib.loads(fresh.uploads[STAGED].encode())
    proxy = plistlib.loads(fresh.uploads[PROXY_PLIST].encode())
    assert server["Label"] == SERVER and proxy["Label"] == PROXY
    argv = served(server)
    assert argv[:3] == [f"{HOME}/venvs/mlx-route/current/bin/python", "-m", "mlx_lm.server"]
    assert argv[argv.index("--model") + 1] == f"{HOME}/models/glm-5.2-mxfp4"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "--trust-remote-code" in argv
    # the quotes of the profile's JSON survive XML escaping
    assert json.loads(argv[argv.index("--chat-template-args") + 1]) == {
        "enable_thinking": False, "reasoning_effort": None}
    assert served(proxy)[1] == f"{ROUTE}/bin/proxy.pyz"
    for plist, name in ((server, "server"), (proxy, "proxy")):
        env = plist["EnvironmentVariables"]
        assert {"/opt/homebrew/bin", "/usr/local/bin"} <= set(env["PATH"].split(":"))
        assert env["HOME"] == HOME and env["HF_HUB_CACHE"] == f"{ROUTE}/hf-cache"
        assert "LD_PRELOAD" not in env and "OPENBLAS_NUM_THREADS" not in env
        assert plist["WorkingDirectory"] == HOME
        assert plist["UserName"] == "milo"  # a LaunchDaemon that runs as the route user
        assert "LimitLoadToSessionType" not in plist
        assert plist["RunAtLoad"] is True and plist["KeepAlive"] is True
        assert plist["ThrottleInterval"] == 5
        # launchd opens no log (its file would never be reopened) and sets no file limit
        # (NumberOfFiles in a LaunchDaemon also sets kern.maxfiles/maxfilesperproc):
        # the launcher writes the logs, rotated from data, and raises the soft limit
        assert not {"StandardOutPath", "StandardErrorPath", "SoftResourceLimits",
                    "HardResourceLimits"} & set(plist)
        launch = launcher_options(plist)
        assert launch["argv"][:2] == [f"{HOME}/venvs/mlx-route/current/bin/python", LAUNCHER]
        assert launch["stdout"] == f"{HOME}/models/_logs/{name}.out.log"
        assert launch["stderr"] == f"{HOME}/models/_logs/{name}.err.log"
        assert (launch["max-bytes"], launch["keep"]) == (str(50 * 1024 * 1024), "5")
        assert launch["nofile"] == "65536"  # service_nofile, within host_maxfiles' hard limit
    assert server["ProcessType"] == "Interactive"
    assert proxy["ProcessType"] == "Standard"


def test_server_starts_only_once_the_planned_wired_limit_is_in_force(fresh):
    """Boot order (issue 16): launchd starts the server and the host-tuning daemon
    together; the server's launcher waits, bounded, for the limit this plan computed
    and applied, so the server never sizes itself against macOS's default."""
    server = launcher_options(plistlib.loads(fresh.uploads[STAGED].encode()))
    assert server["wait-sysctl"] == f"iogpu.wired_limit_mb={WIRED_MB}"
    assert server["wait-s"] == "300"  # host_wired_limit_wait_s
    boot = plistlib.loads(fresh.uploads[BOOT_PLIST].encode())["ProgramArguments"][-1]
    assert f"iogpu.wired_limit_mb={WIRED_MB};" in boot  # the value the boot daemon sets
    # the proxy needs no GPU memory: it does not wait
    assert "wait-sysctl" not in launcher_options(
        plistlib.loads(fresh.uploads[PROXY_PLIST].encode()))
    # and the limit is applied before the switch starts the server on this run
    c = fresh.commands
    assert index(c, r"^sysctl -w iogpu\.wired_limit_mb=") < index(c, r"routectl\.py switch ")


def test_service_nofile_above_the_host_hard_limit_is_refused(workdir):
    plan = run_plan(workdir, None, "service_nofile=600000")
    assert plan.code != 0
    assert ("service_nofile 600000 is above host_maxfiles' hard limit 524288: the services "
            "could not get it; lower service_nofile or raise host_maxfiles") in plan.output


def served(plist: dict) -> list[str]:
    """The service's own argv: what files/route_run.py execs, after its `--`."""
    argv = plist["ProgramArguments"]
    return argv[argv.index("--") + 1:]


def launcher_options(plist: dict) -> dict:
    argv = plist["ProgramArguments"]
    head = argv[:argv.index("--")]
    options = {head[i][2:]: head[i + 1] for i in range(2, len(head) - 1, 2)}
    return options | {"argv": head}


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_proxy_watchdog_kickstarts_the_server_through_a_sudoers_rule_for_that_command_only(fresh):
    from tests.fixtures.proxy import load_proxy

    argv = served(plistlib.loads(fresh.uploads[PROXY_PLIST].encode()))
    assert flag(argv, "--restart-command") == f"/usr/bin/sudo -n {KICKSTART}"
    assert flag(argv, "--server-pid-command") == "/usr/sbin/lsof -t -nP -iTCP:8025 -sTCP:LISTEN"
    assert [flag(argv, f"--watchdog-{n}") for n in ("stuck-s", "interval-s", "min-cpu-s",
                                                     "backoff-s", "backoff-max-s")] == [
        "180", "10", "0.5", "60", "1800"]
    assert flag(argv, "--maintenance-file") == f"{ROUTE}/state/maintenance.json"
    proxy = load_proxy()
    args = proxy.parse_args(argv[2:])  # the proxy's own parser takes them
    assert (args.restart_command, args.watchdog_stuck_s) == (f"/usr/bin/sudo -n {KICKSTART}", 180)
    # the LaunchDaemon is root's; the proxy runs as milo: sudo for that one command
    rules = [line for line in fresh.uploads[SUDOERS].splitlines() if not line.startswith("#")]
    assert rules == [f"milo ALL=(root) NOPASSWD: {KICKSTART}"]
    for command in (f"chown root:wheel {SUDOERS}", f"chmod 440 {SUDOERS}"):
        assert command in fresh.commands and command in fresh.sudo


def test_watchdog_sudoers_rule_passes_visudo(fresh, tmp_path):
    """A broken drop-in in /etc/sudoers.d breaks sudo as a whole: this machine's
    visudo (the same sudo as macOS ships) checks the file the Mac would get."""
    import shutil
    import subprocess

    visudo = shutil.which("visudo") or ("/usr/sbin/visudo" if os.path.exists("/usr/sbin/visudo")
                                        else None)
    if visudo is None:
        pytest.skip("no visudo on this machine")
    rule = tmp_path / "org-mlxroute-watchdog"
    rule.write_text(fresh.uploads[SUDOERS])
    rule.chmod(0o440)
    check = subprocess.run([visudo, "-c", "-f", str(rule)], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    rule.write_text(fresh.uploads[SUDOERS].replace("NOPASSWD:", "NOPASSWD"))  # the check bites
    assert subprocess.run([visudo, "-c", "-f", str(rule)], capture_output=True,
                          timeout=30).returncode != 0


def test_watchdog_off_leaves_no_restart_flag_and_no_sudoers_rule(workdir):
    plan = run_plan(workdir, None, "watchdog_enabled=False")
    assert plan.code == 0, plan.output[-4000:]
    argv = served(plistlib.loads(plan.uploads[PROXY_PLIST].encode()))
    assert "--restart-command" not in argv and "--watchdog-stuck-s" not in argv
    assert SUDOERS not in plan.uploads


def test_no_newsyslog_rule_the_launcher_rotates_from_data(workdir, fresh):
    """newsyslog renamed logs under a service that kept writing into the renamed copy:
    gone; a Mac that has the rule of an earlier deploy gets it removed."""
    assert NEWSYSLOG not in fresh.uploads
    plan = run_plan(workdir, {"files": {NEWSYSLOG: {"content": "old\n", "user": "root",
                                                    "group": "wheel", "mode": "644"}}},
                    "service_log_max_mb=10", "service_log_keep=3")
    assert plan.code == 0, plan.output[-4000:]
    assert f"rm -f {NEWSYSLOG}" in plan.commands and f"rm -f {NEWSYSLOG}" in plan.sudo
    for path in (STAGED, PROXY_PLIST):
        launch = launcher_options(plistlib.loads(plan.uploads[path].encode()))
        assert (launch["max-bytes"], launch["keep"]) == (str(10 * 1024 * 1024), "3")
    refused = run_plan(workdir, None, "service_log_max_mb=0")
    assert refused.code != 0
    assert "service_log_max_mb 0 and service_log_keep 5 must both be at least 1" in refused.output


FILEVAULT_WARNING = ("FileVault is On (FileVault is On.): an unattended restart needs "
                     "`sudo fdesetup authrestart` or FileVault off; LaunchDaemons do not start "
                     "before the first login")


def test_filevault_off_is_recorded_without_a_warning(fresh):
    manifest = json.loads(fresh.uploads[f"{ROUTE}/route.json"])
    assert manifest["filevault"] == {"on": False, "status": "FileVault is Off."}
    assert "FileVault is On" not in fresh.output


@pytest.mark.parametrize("data", [(), ("host_tuning_enabled=False",)])
def test_filevault_on_is_warned_about_and_recorded(workdir, data):
    plan = run_plan(workdir, {"responses": [["fdesetup status", "FileVault is On."]]}, *data)
    assert plan.code == 0, plan.output[-4000:]
    assert FILEVAULT_WARNING in plan.output
    manifest = json.loads(plan.uploads[f"{ROUTE}/route.json"])
    assert manifest["filevault"] == {"on": True, "status": "FileVault is On."}


def test_filevault_being_enabled_at_the_next_restart_counts_as_on():
    from tasks.host_facts import FileVaultStatus

    assert FileVaultStatus().process(
        ["FileVault is Off, but will be enabled after the next restart."])["on"] is True
    assert FileVaultStatus().process(
        ["FileVault is On.", "Decryption in progress: Percent completed = 40.00"])["on"] is True
    assert FileVaultStatus().process(["FileVault is Off."])["on"] is False
    assert FileVaultStatus().process([]) is None


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


def test_changed_server_flag_switches_only_the_server_with_its_new_plist(workdir, deployed):
    plan = run_plan(workdir, deployed, 'server_extra_args=["--pipeline"]')
    assert plan.code == 0, plan.output[-4000:]
    assert set(plan.uploads) == {STAGED, f"{ROUTE}/state/server.applied"}
    assert "--pipeline" in plistlib.loads(plan.uploads[STAGED].encode())["ProgramArguments"]
    switch = switch_of(plan)
    # launchd keeps the definition it read at bootstrap: the switch boots the job
    # out and bootstraps the new plist (the old one comes back on failure)
    assert switch["staged"] == STAGED and switch["strategy"] == "stop-first"
    assert [c for c in plan.launchctl_changes() if c != switch["command"]] == []
    assert not plan.matching(r"routectl\.py wait --kind proxy")


def test_changed_server_code_switches_the_server_with_its_plist_untouched(workdir, deployed):
    state = json.loads(json.dumps(deployed))
    # what the last successful start recorded no longer matches (e.g. a changed profile)
    state["files"][f"{ROUTE}/state/server.applied"]["content"] = "0123456789abcdef\n"
    plan = run_plan(workdir, state)
    assert plan.code == 0, plan.output[-4000:]
    switch = switch_of(plan)
    assert "staged" not in switch and "definition" not in switch
    assert plan.launchctl_changes() == [switch["command"]]
    assert STAGED not in plan.uploads


def test_stopped_service_is_started_again(workdir, deployed):
    state = json.loads(json.dumps(deployed))
    state["launchd"][f"system/{PROXY}"] = "not running"
    plan = run_plan(workdir, state)
    assert plan.code == 0, plan.output[-4000:]
    assert plan.launchctl_changes() == [f"launchctl kickstart -k system/{PROXY}"]


def test_model_that_does_not_fit_the_gpu_limit_is_refused_before_anything_runs(workdir):
    plan = run_plan(workdir, None, "host_memory_headroom_gib=200")
    assert plan.code != 0
    assert ("model profile 'glm-5.2-mxfp4' does not fit in this host's memory: memory budget "
            "(GiB): RAM 512.00 - headroom 200.00 = 312.00; model 404.80") in plan.output
    assert "glm-5.2-mxfp4" in plan.output and "host_memory_headroom_gib" in plan.output
    assert plan.uploads == {}
    assert not plan.matching(r"-m venv|hf download|sysctl -w|launchctl bootstrap")


def test_launchagents_over_ssh_use_the_user_domain(workdir):
    plan = run_plan(workdir, None, "service_launchd_domain=user")
    assert plan.code == 0, plan.output[-4000:]
    agents = f"{HOME}/Library/LaunchAgents"
    server = plistlib.loads(plan.uploads[STAGED].encode())
    assert server["LimitLoadToSessionType"] == "Background"
    assert "UserName" not in server
    switch = switch_of(plan)
    assert switch["definition"] == f"{agents}/{SERVER}.plist"
    assert f"launchctl bootstrap user/501 {agents}/{SERVER}.plist " in switch["start"]
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
    assert f">>> launchctl enable system/{PROXY}" in proc.stderr
    assert "routectl.py switch --root /Users/milo/venvs/mlx-route --release " in proc.stderr
    assert f">>> sysctl -w iogpu.wired_limit_mb={WIRED_MB}" in proc.stderr


def test_root_work_runs_with_sudo_and_the_users_own_work_without(fresh):
    for pattern in (r"^launchctl enable system/", r"launchctl bootstrap system ",
                    r"^sysctl -w ", r"^pmset -a ", r"^launchctl limit maxfiles \d",
                    rf"^chown root:wheel {DAEMONS}/", r"^plutil -lint ", r"routectl\.py switch "):
        commands = fresh.matching(pattern)
        assert commands, pattern
        for command in commands:
            assert command in fresh.sudo, f"not run with sudo: {command}"
    # the releases and the weights belong to the route user; the switch runs
    # its smoke as that user (--run-as)
    for pattern in (r"-m venv ", r"hf download ", r"pip install "):
        commands = fresh.matching(pattern)
        assert commands and not set(commands) & fresh.sudo, pattern


def test_launchagents_run_without_sudo(workdir):
    plan = run_plan(workdir, None, "service_launchd_domain=user")
    assert plan.code == 0, plan.output[-4000:]
    assert plan.matching(r"launchctl (enable|bootstrap) user/501")
    assert not {c for c in plan.sudo if re.search(r"launchctl (enable|bootstrap) user/", c)}
    # the proxy kickstarts the server in its own domain: no sudo, no sudoers rule
    argv = plistlib.loads(plan.uploads[f"{HOME}/Library/LaunchAgents/{PROXY}.plist"].encode())[
        "ProgramArguments"]
    assert flag(argv, "--restart-command") == f"/bin/launchctl kickstart -k user/501/{SERVER}"
    assert SUDOERS not in plan.uploads
    assert "run-as" not in switch_of(plan)


# The field report's Mac: its own LaunchAgents already serve on the route's ports.
FOREIGN = {
    "com.milo.glm52-mlx-server": (8025, 701, "/Users/milo/venvs/glm52-mlx-patch/bin/python -m "
                                  "mlx_lm.server --model /Users/milo/models/GLM-5.2-mxfp4"),
    "com.milo.glm52-strip-proxy": (8026, 702, "python3 /tmp/glm52_strip_model_proxy_threaded.py"),
}


def foreign_mac() -> dict:
    return {
        "launchd": {f"gui/501/{label}": "running" for label in FOREIGN},
        "responses": [["re:lsof -nP -iTCP", [f"port={port} pid={pid} label={label} args={args}"
                                             for label, (port, pid, args) in FOREIGN.items()]]],
    }


def test_foreign_agents_on_the_ports_stop_the_deploy_naming_them(workdir):
    plan = run_plan(workdir, foreign_mac())
    assert plan.code != 0
    assert ("port 8025 is held by pid 701 (/Users/milo/venvs/glm52-mlx-patch/bin/python -m "
            "mlx_lm.server --model /Users/milo/models/GLM-5.2-mxfp4), launchd job "
            "com.milo.glm52-mlx-server") in plan.output
    assert "port 8026 is held by pid 702" in plan.output
    assert ("add 'com.milo.glm52-mlx-server', 'com.milo.glm52-strip-proxy' to service_retire"
            in plan.output)
    assert plan.uploads == {}
    assert not plan.matching(r"-m venv |launchctl (bootout|bootstrap|disable)")


def test_foreign_agents_data_retires_are_booted_out_and_disabled_before_the_server(workdir):
    plan = run_plan(workdir, foreign_mac(),
                    'service_retire=["com.milo.glm52-mlx-server", "com.milo.glm52-strip-proxy"]')
    assert plan.code == 0, plan.output[-4000:]
    switch = index(plan.commands, r"routectl\.py switch ")
    for label in FOREIGN:
        bootout = plan.commands.index(f"launchctl bootout gui/501/{label} || true")
        disable = plan.commands.index(f"launchctl disable gui/501/{label}")
        assert bootout < disable < switch
    # the user's own agents are booted out without sudo
    assert not {c for c in plan.sudo if re.search(r"launchctl (bootout|disable) gui/", c)}


def test_route_user_other_than_the_ssh_user_is_planned_without_setfacl(tmp_path):
    """route_user "ada" on a Mac reached as "milo": the route's files are written
    as ada through sudo, never by pyinfra's upload with a sudo user (its
    `setfacl`, which macOS does not have): uploaded as milo to /tmp, then
    `install`ed by ada, then removed (tasks/as_user.py)."""
    plan = run_plan(tmp_path, None, "route_user=ada")
    assert plan.code == 0, plan.output[-4000:]
    assert not plan.matching(r"\bsetfacl\b")
    # no upload is handed to another user by pyinfra (that is the setfacl path)
    assert not [dest for dest in plan.uploads if dest in plan.sudo_user]
    installs = plan.matching(r"^install -m \d+ /tmp/mlx-route-")
    placed = {shlex.split(c)[-1]: shlex.split(c)[-2] for c in installs}
    for path in (f"{ROUTE}/route.json", f"{ROUTE}/bin/routectl.py", f"{ROUTE}/bin/proxy.pyz",
                 LAUNCHER, f"{ROUTE}/state/server.applied", f"{ROUTE}/patches/series"):
        assert path in placed, f"{path} is not installed as route_user"
        assert path not in plan.uploads, f"{path} is uploaded in place, not as route_user"
        staged = placed[path]
        assert staged in plan.uploads and staged not in plan.sudo_user
        assert f"chmod 644 {staged}" in plan.commands and f"chmod 644 {staged}" not in plan.sudo
        assert f"rm -f {staged}" in plan.commands
    for command in installs:
        assert plan.sudo_user.get(command) == "ada", command
    # the venv is made, and the switch runs, as ada; LaunchDaemons stay root's
    (venv,) = [c for c in plan.matching(r" -m venv ")]
    assert plan.sudo_user.get(venv) == "ada"
    # the LaunchDaemons stay root's (sudo without a user)
    for path in (PROXY_PLIST, BOOT_PLIST):
        assert path in plan.uploads and path not in plan.sudo_user
        assert f"chown root:wheel {path}" in plan.sudo
    (switch,) = plan.matching(r"routectl\.py switch ")
    assert switch in plan.sudo and switch not in plan.sudo_user  # launchctl for the system domain


def test_route_user_key_gets_a_copy_the_ssh_user_can_read(tmp_path):
    """route_user "ada" with a key: the key is ada's (0600); milo, the SSH user the
    host suite and clients connect as, gets its own 0600 copy, made by root on
    the Mac (never through the workstation); route.json names it."""
    plan = run_plan(tmp_path, {"responses": [["re:^echo ~ada$", "/Users/ada"]]},
                    "route_user=ada", "proxy_api_key=True", 'proxy_host="0.0.0.0"')
    assert plan.code == 0, plan.output[-4000:]
    copy = "/Users/milo/.local/share/mlx-route/proxy.key"
    (install,) = plan.matching(
        rf"^install -m 600 -o milo /Users/ada/\S+/proxy\.key {re.escape(copy)}$")
    assert install in plan.sudo and install not in plan.sudo_user  # root, not ada
    assert not [dest for dest in plan.uploads if dest.endswith("proxy.key")]  # made on the host
    # route.json is staged in /tmp and installed as ada (tasks/as_user.py)
    (manifest,) = [json.loads(text) for dest, text in plan.uploads.items()
                   if dest.startswith("/tmp/mlx-route-") and '"client_key_file"' in text]
    assert manifest["proxy"]["client_key_file"] == copy
    assert manifest["proxy"]["key_file"] != copy


# --------------------------------------------------------------------------
# Two Macs, one model (tasks/cluster.py): inventories/fake_mac.py with
# MLXROUTE_FAKE_MAC_CLUSTER=ring|jaccl plans two fresh Mac Studios over Thunderbolt
# --------------------------------------------------------------------------

MAC_A, MAC_B = "@fake/mac-studio", "@fake/mac-studio-2"
CLUSTER_DIR = f"{ROUTE}/cluster"


def cluster_plan(tmp_path, backend: str) -> tuple[dict, dict, str]:
    """({host: {dest: content}}, {host: [commands]}, log) of the plan for both Macs."""
    record = tmp_path / f"cluster-{backend}.jsonl"
    record.touch()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYINFRA_FAKE_DELAY": "0",
           "MLXROUTE_FAKE_MAC_CLUSTER": backend}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fixtures.fake_mac_cli", str(record), "-y", "-vv", "--json",
         str(INVENTORY), "deploy.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    uploads: dict = {MAC_A: {}, MAC_B: {}}
    commands: dict = {MAC_A: [], MAC_B: []}
    order = []  # (host, command), in the order they ran across both Macs
    for line in record.read_text().splitlines():
        item = json.loads(line)
        if "dest" in item:
            uploads[item["host"]][item["dest"]] = item["content"]
        else:
            commands[item["host"]].append(item["command"])
            order.append((item["host"], item["command"]))
    commands["order"] = order
    (results,) = [line for line in proc.stdout.splitlines() if line.startswith('{"plan": ')]
    commands["operations"] = json.loads(results)["results"]["operations"]
    return uploads, commands, proc.stderr


@pytest.mark.parametrize("backend", ["ring", "jaccl"])
def test_two_macs_serve_one_model_over_thunderbolt(tmp_path, backend):
    uploads, commands, log = cluster_plan(tmp_path, backend)
    # the same hostfile on both Macs: what `mlx.launch --hostfile` reads
    hostfile = json.loads(uploads[MAC_A][f"{CLUSTER_DIR}/hostfile.json"])
    assert uploads[MAC_B][f"{CLUSTER_DIR}/hostfile.json"] == uploads[MAC_A][
        f"{CLUSTER_DIR}/hostfile.json"]
    assert hostfile["backend"] == backend
    assert [(h["ssh"], h["ips"]) for h in hostfile["hosts"]] == [
        (MAC_A, ["10.0.7.1"]), (MAC_B, ["10.0.7.2"])]
    if backend == "ring":
        assert json.loads(uploads[MAC_B][f"{CLUSTER_DIR}/ring.json"]) == [
            ["10.0.7.1:32323"], ["10.0.7.2:32324"]]
        rank_env = {"MLX_HOSTFILE": f"{CLUSTER_DIR}/ring.json"}
    else:
        assert json.loads(uploads[MAC_B][f"{CLUSTER_DIR}/ibv_devices.json"]) == [
            [None, "rdma_en3"], ["rdma_en3", None]]
        rank_env = {"MLX_IBV_DEVICES": f"{CLUSTER_DIR}/ibv_devices.json",
                    "MLX_JACCL_COORDINATOR": "10.0.7.1:32323"}
    # Mac A: rank 0 is the server (its plist staged for the switch) behind the proxy
    rank0 = plistlib.loads(uploads[MAC_A][STAGED].encode())
    assert rank0["Label"] == SERVER
    assert rank0["EnvironmentVariables"]["MLX_RANK"] == "0"
    assert rank_env.items() <= rank0["EnvironmentVariables"].items()
    assert PROXY_PLIST in uploads[MAC_A]
    (switch,) = [c for c in commands[MAC_A] if "routectl.py switch " in c]
    argv = shlex.split(switch)
    assert argv[argv.index("--smoke") + 1] == "null"  # no Mac holds the whole model
    assert argv[argv.index("--strategy") + 1] == "stop-first"
    assert "--url" in argv  # rank 0's readiness wait: a generation through every rank
    route_a = json.loads(uploads[MAC_A][f"{ROUTE}/route.json"])
    assert route_a["cluster"] == {
        "size": 2, "backend": backend, "parallel": "tensor", "local_ranks": [0],
        "serves_http": True, "ranks": [{"rank": 0, "host": MAC_A, "ip": "10.0.7.1"},
                                       {"rank": 1, "host": MAC_B, "ip": "10.0.7.2"}]}
    # Mac B: rank 1 as a LaunchDaemon of its own, no proxy
    rank1_plist = f"{DAEMONS}/org.mlxroute.server-rank1.plist"
    rank1 = plistlib.loads(uploads[MAC_B][rank1_plist].encode())
    assert rank1["Label"] == "org.mlxroute.server-rank1"
    assert rank1["EnvironmentVariables"]["MLX_RANK"] == "1"
    assert rank_env.items() <= rank1["EnvironmentVariables"].items()
    assert rank1["KeepAlive"] and rank1["RunAtLoad"]
    assert "mlx_lm.server" in rank1["ProgramArguments"]
    assert PROXY_PLIST not in uploads[MAC_B] and STAGED not in uploads[MAC_B]
    # its route.json says what the host suite checks there: rank 1, no HTTP side
    route_b = json.loads(uploads[MAC_B][f"{ROUTE}/route.json"])
    assert route_b["cluster"] == {**route_a["cluster"], "local_ranks": [1],
                                  "serves_http": False}
    assert set(route_b["services"]) == {"server-rank1"} and "proxy" not in route_b
    # its rank moves with routectl's switch as rank 0 does (the release recorded,
    # old ones pruned, the previous one back if the rank does not start), without
    # a smoke or a wait of its own: rank 0's wait generates through every rank
    (switch_b,) = [c for c in commands[MAC_B] if "routectl.py switch " in c]
    argv_b = shlex.split(switch_b)
    assert argv_b[argv_b.index("--smoke") + 1] == "null"
    assert "--url" not in argv_b and "--keep" in argv_b
    assert "org.mlxroute.server-rank1" in argv_b[argv_b.index("--start") + 1]
    assert "launchctl bootstrap system" in argv_b[argv_b.index("--start") + 1]
    # Mac B's rank is up before Mac A's switch waits for a generation through it
    switches = [host for host, c in commands["order"] if "routectl.py switch " in c]
    assert switches == [MAC_B, MAC_A], switches
    # ... whatever the number of operations each Mac has before: one operation of
    # both (pyinfra runs an operation on every host before the next) stands between
    ops = [(op["name"], sorted(op["success"] + op["no_change"] + op["error"]))
           for op in commands["operations"]]
    barrier = [i for i, (name, hosts) in enumerate(ops) if "rank 0 starts after" in name]
    assert len(barrier) == 1 and ops[barrier[0]][1] == sorted([MAC_A, MAC_B]), ops
    switched = {name.split(" | ")[-1].split(" ")[2]: i for i, (name, _) in enumerate(ops)
                if name.split(" | ")[-1].startswith("Switch the ")}
    assert switched["cluster"] < barrier[0] < switched["server"], ops
    # each Mac's budget holds half of GLM-5.2 (368 GiB x 1.1 / 2)
    assert log.count("model 202.40") == 2, log[-3000:]
