"""The agent workloads' parts (issue 11): Hermes' provider merge, tb-route's
command, key, regimes, open-files limit and run summaries, and the route
report's Terminal-Bench section.

Everything runs for real: files/hermes_provider.py and files/tb_route.py as
their own processes where it matters (the key must never reach stdout or
stderr; the open-files limit is set on a real child process), tb's output
folders written in the format terminal-bench 0.2.18 writes them (its
results.json / run_metadata.json fields, as a real `tb run` left them here).
"""

from __future__ import annotations

import difflib
import json
import os
import resource
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MERGE = REPO / "files" / "hermes_provider.py"
TB_ROUTE = REPO / "files" / "tb_route.py"
KEY = "sk-route-0123456789abcdef-SECRET"

sys.path.insert(0, str(REPO / "files"))
import hermes_provider  # noqa: E402
import tb_route  # noqa: E402

# A config as a person keeps it: comments, quotes, 4-space mappings, 2-space
# lists, another custom provider with its own key, a model already chosen.
USER_CONFIG = """\
# my hermes config
model:
    default: anthropic/claude-sonnet-4
    provider: openrouter
providers:
    work-vllm:
        base_url: "http://10.0.0.9:8000/v1"   # the lab box
        default_model: qwen3
        api_key: 'sk-abc'
        models: [qwen3, qwen3-coder]

    # the old one, kept for a while
    legacy:
        url: http://10.0.0.8:8000/v1
toolsets:
  - safe
  - web
agent:
    max_turns: 30
"""


def run_merge(tmp_path, config: Path, *extra: str, key: str | None = KEY):
    args = [sys.executable, str(MERGE), "--config", str(config), "--name", "mlx-route",
            "--base-url", "http://127.0.0.1:8026/v1", "--model", "smollm2-135m", *extra]
    if key is not None:
        key_file = tmp_path / "proxy.key"
        key_file.write_text(key + "\n")
        args += ["--key-file", str(key_file)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert KEY not in proc.stdout + proc.stderr, "the key was printed"
    return proc


def only_insertions(before: str, after: str) -> list[str]:
    """The lines `after` adds to `before`; fails when any line of `before` changed."""
    a, b = before.splitlines(keepends=True), after.splitlines(keepends=True)
    added = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        assert op in ("equal", "insert"), f"{op} of {a[i1:i2]!r} -> {b[j1:j2]!r}"
        if op == "insert":
            added += b[j1:j2]
    return added


def test_merge_adds_the_route_and_keeps_every_other_byte(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(USER_CONFIG)
    config.chmod(0o644)
    proc = run_merge(tmp_path, config)
    assert proc.returncode == 0 and proc.stdout.strip() == "changed", proc.stderr
    after = config.read_text()
    added = only_insertions(USER_CONFIG, after)
    assert added == ['    mlx-route:\n', '        base_url: "http://127.0.0.1:8026/v1"\n',
                     '        default_model: "smollm2-135m"\n', f'        api_key: "{KEY}"\n']
    # inside `providers`, after the last provider, before `toolsets`
    assert after.index("mlx-route:") > after.index("legacy:")
    assert after.index("mlx-route:") < after.index("toolsets:")
    assert oct(config.stat().st_mode & 0o777) == "0o600"  # it holds a key now
    from ruamel.yaml import YAML

    doc = YAML(typ="safe").load(after)
    assert doc["providers"]["mlx-route"] == {"base_url": "http://127.0.0.1:8026/v1",
                                            "default_model": "smollm2-135m", "api_key": KEY}
    assert doc["model"]["provider"] == "openrouter"  # the user's choice stays

    again = run_merge(tmp_path, config)
    assert again.stdout.strip() == "unchanged" and config.read_text() == after
    check = run_merge(tmp_path, config, "--check")
    assert check.stdout.strip() == "unchanged"


def test_merge_replaces_only_its_own_entry(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(USER_CONFIG)
    run_merge(tmp_path, config)
    first = config.read_text()
    proc = subprocess.run(
        [sys.executable, str(MERGE), "--config", str(config), "--name", "mlx-route",
         "--base-url", "http://studio.local:8026/v1", "--model", "glm-5.2"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    after = config.read_text()
    diff = [line for line in difflib.unified_diff(first.splitlines(), after.splitlines(),
                                                  lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert sorted(diff) == sorted([
        '-        base_url: "http://127.0.0.1:8026/v1"',
        '-        default_model: "smollm2-135m"', f'-        api_key: "{KEY}"',
        '+        base_url: "http://studio.local:8026/v1"', '+        default_model: "glm-5.2"'])


def test_merge_on_a_fresh_hermes_home_sets_the_route_as_default(tmp_path):
    """Hermes 0.19 refuses to chat (first-run guard) until `model` names a provider."""
    home = tmp_path / "hermes"
    proc = run_merge(tmp_path, home / "config.yaml", key=None)
    assert proc.returncode == 0, proc.stderr
    from ruamel.yaml import YAML

    doc = YAML(typ="safe").load((home / "config.yaml").read_text())
    assert doc == {"providers": {"mlx-route": {"base_url": "http://127.0.0.1:8026/v1",
                                               "default_model": "smollm2-135m"}},
                   "model": {"provider": "mlx-route", "default": "smollm2-135m"}}
    # Hermes' own default: `providers: {}` and a model already set
    config = tmp_path / "c2.yaml"
    config.write_text("model:\n  default: x\n  provider: nous\nproviders: {}\n")
    assert run_merge(tmp_path, config).returncode == 0
    text = config.read_text()
    assert text.startswith("model:\n  default: x\n  provider: nous\nproviders:\n  mlx-route:\n")


@pytest.mark.parametrize("text, says", [
    ("providers: [a, b]\n", "is not a mapping"),
    ("providers: {a: {base_url: 'http://x/v1'}}\n", "flow style"),
    ("model: [unclosed\n", "not valid YAML"),
    ("- a list\n", "top level is not a mapping"),
])
def test_merge_refuses_what_it_cannot_edit_and_changes_nothing(tmp_path, text, says):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    proc = run_merge(tmp_path, config)
    assert proc.returncode == 1 and says in proc.stderr, proc.stderr
    assert config.read_text() == text


def test_merge_refuses_an_empty_or_missing_key_file(tmp_path):
    config = tmp_path / "config.yaml"
    proc = run_merge(tmp_path, config, key="")
    assert proc.returncode == 1 and "is empty" in proc.stderr
    proc = subprocess.run([sys.executable, str(MERGE), "--config", str(config), "--name", "r",
                           "--base-url", "http://x/v1", "--model", "m", "--key-file",
                           str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "cannot read the proxy key file" in proc.stderr
    assert not config.exists()


# ---------------------------------------------------------------------------
# tb-route
# ---------------------------------------------------------------------------


def settings(tmp_path, **over) -> dict:
    key_file = tmp_path / "proxy.key"
    key_file.write_text(KEY + "\n")
    return {"tb": "/venv/bin/tb", "api_base": "http://127.0.0.1:8026/v1",
            "key_file": str(key_file), "model": "openai/glm52",
            "dataset": "terminal-bench-core==0.1.1", "dataset_path": None,
            "agent": "terminus-2", "agent_kwargs": {}, "temperature": 0.0, "n_concurrent": 1,
            "n_attempts": 1, "timeout_multiplier": 1.0, "runs_dir": str(tmp_path / "runs"),
            "nofile": 8192, "docker_path": ["/Applications/Docker.app/Contents/Resources/bin",
                                            "~/.orbstack/bin", "/opt/homebrew/bin",
                                            "/usr/local/bin"], **over}


def test_regimes_and_run_ids_say_the_timeout_regime():
    assert tb_route.regime(1.0) == "stock" and tb_route.regime(1) == "stock"
    assert tb_route.regime(4.0) == "diagnostic-x4" and tb_route.regime(1.5) == "diagnostic-x1.5"
    with pytest.raises(tb_route.SettingsError):
        tb_route.regime(0)
    when = datetime(2026, 11, 29, 20, 5, 7, tzinfo=timezone.utc)
    assert tb_route.run_id(1.0, when) == "2026-11-29__20-05-07__stock"
    assert tb_route.run_id(3, when) == "2026-11-29__20-05-07__diagnostic-x3"


def test_tb_command_is_the_field_reports_invocation_without_the_key(tmp_path):
    config = settings(tmp_path, agent_kwargs={"max_episodes": 5})
    argv = tb_route.tb_argv(config, 1.0, "RID", "/runs/stock")
    assert argv[:2] == ["/venv/bin/tb", "run"]
    pairs = list(zip(argv, argv[1:]))
    for pair in [("--dataset", "terminal-bench-core==0.1.1"), ("--agent", "terminus-2"),
                 ("--model", "openai/glm52"),
                 ("--agent-kwarg", "api_base=http://127.0.0.1:8026/v1"),
                 ("--agent-kwarg", "temperature=0.0"), ("--agent-kwarg", "max_episodes=5"),
                 ("--n-concurrent", "1"), ("--n-attempts", "1"),
                 ("--global-timeout-multiplier", "1"), ("--output-path", "/runs/stock"),
                 ("--run-id", "RID")]:
        assert pair in pairs, (pair, argv)
    assert argv[-1] == "--no-upload-results"
    assert KEY not in " ".join(argv)
    local = tb_route.tb_argv(config, 4.0, "R", "/o", dataset_path="/tasks", task_ids=["a", "b"])
    assert ("--dataset-path", "/tasks") in list(zip(local, local[1:])) and "--dataset" not in local
    assert ("--global-timeout-multiplier", "4") in list(zip(local, local[1:]))
    assert local[-4:] == ["--task-id", "a", "--task-id", "b"]


def test_the_key_replaces_whatever_key_the_shell_had(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "dummy")
    monkeypatch.setenv("PATH", "/usr/bin:/bin:/usr/local/bin")
    env = tb_route.run_env(settings(tmp_path))
    assert env["OPENAI_API_KEY"] == KEY
    assert env["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
    home = os.path.expanduser("~")
    assert env["PATH"].split(":") == [
        "/Applications/Docker.app/Contents/Resources/bin", f"{home}/.orbstack/bin",
        "/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin"]
    without = tb_route.run_env(settings(tmp_path, key_file=None))
    assert without["OPENAI_API_KEY"] == tb_route.NO_KEY != "dummy"
    with pytest.raises(tb_route.SettingsError, match="cannot read the proxy key file"):
        tb_route.run_env(settings(tmp_path, key_file=str(tmp_path / "missing")))


NOFILE_PROBE = (
    "import sys; sys.path.insert(0, {files!r}); import tb_route\n"
    "try:\n    print(tb_route.raise_nofile({minimum}))\n"
    "except tb_route.LimitError as e:\n    print('REFUSED', e); sys.exit(2)\n")


def nofile_child(soft: int, hard: int, minimum: int) -> subprocess.CompletedProcess:
    """tb_route.raise_nofile in a child process started with these real limits."""
    def limits():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    code = NOFILE_PROBE.format(files=str(REPO / "files"), minimum=minimum)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, preexec_fn=limits)


def test_open_files_soft_limit_is_raised_to_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = min(hard, 16384) if hard != resource.RLIM_INFINITY else 16384
    if top < 8192:
        pytest.skip(f"this machine's hard limit ({hard}) is below 8192")
    proc = nofile_child(256, top, 8192)  # a non-login SSH shell's 256
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert int(proc.stdout) == top


def test_a_hard_limit_below_the_minimum_is_refused_with_what_to_do():
    proc = nofile_child(256, 1024, 8192)
    assert proc.returncode == 2
    assert "REFUSED the open-files limit is 1024 (hard limit 1024), below the 8192" in proc.stdout
    assert "launchctl limit maxfiles" in proc.stdout and "ulimit -Hn" in proc.stdout


def test_run_refuses_without_docker_and_prints_no_key(tmp_path):
    config = settings(tmp_path, docker_path=[str(tmp_path / "nothing")])
    (tmp_path / "workload.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, str(TB_ROUTE), "--config",
                           str(tmp_path / "workload.json"), "run"],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": str(tmp_path / "empty"), "HOME": str(tmp_path)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "`docker` is not on PATH" in proc.stderr and KEY not in proc.stdout + proc.stderr
    bad = subprocess.run([sys.executable, str(TB_ROUTE), "--config", str(tmp_path / "no.json"),
                          "list"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "workload_enabled=True" in bad.stderr


# -- summaries, from tb's own output format --------------------------------------


def trial(task: str, rid: str, resolved, mode: str, tests: dict | None) -> dict:
    return {"id": "257a8aa5-7f8c-4f57-9229-3ce12a4944bc", "trial_name": f"{task}.1-of-1.{rid}",
            "task_id": task, "instruction": "do it", "is_resolved": resolved,
            "failure_mode": mode, "parser_results": tests, "recording_path": None,
            "total_input_tokens": 0, "total_output_tokens": 0,
            "trial_started_at": "2026-11-29T20:22:52.971453+00:00",
            "trial_ended_at": "2026-11-29T20:23:14.076201+00:00",
            "agent_started_at": "2026-11-29T20:22:58.237628+00:00",
            "agent_ended_at": "2026-11-29T20:23:58.485962+00:00",
            "test_started_at": None, "test_ended_at": None}


def tb_run_dir(root: Path, rid: str, trials: list[dict], dataset_size: int) -> Path:
    run = root / rid
    run.mkdir(parents=True)
    for t in trials:
        (run / t["task_id"] / t["trial_name"] / "agent-logs").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({
        "id": "2ea8f1d1-e585-4c15-bf71-e02e1d79edbc", "results": trials, "pass_at_k": {},
        "n_resolved": sum(1 for t in trials if t["is_resolved"]),
        "n_unresolved": sum(1 for t in trials if not t["is_resolved"]),
        "accuracy": 0.0}, indent=4))
    (run / "run_metadata.json").write_text(json.dumps({
        "run_id": rid, "dataset_path": "/tasks", "dataset_name": "terminal-bench-core",
        "dataset_version": "0.1.1", "agent_name": "terminus-2", "n_attempts": 1,
        "dataset_size": dataset_size, "model_name": "openai/glm52",
        "start_time": "2026-11-29T20:22:52.968335+00:00",
        "end_time": "2026-11-29T20:32:52.968335+00:00"}, indent=4))
    return run


def test_summary_counts_every_failure_class(tmp_path):
    rid = "2026-11-29__20-22-52__stock"
    trials = [
        trial("solved", rid, True, "unset", {"test_a": "passed"}),
        trial("slow", rid, False, "agent_timeout", None),
        trial("wrong", rid, False, "unset", {"test_a": "failed"}),
        trial("gateway", rid, False, "unknown_agent_error", None),
        trial("garbled", rid, False, "fatal_llm_parse_error", None),
        trial("broken", rid, False, "agent_installation_failed", None),
    ]
    run = tb_run_dir(tmp_path / "runs" / "stock", rid, trials, dataset_size=7)
    log = run / "gateway" / trials[3]["trial_name"] / "agent-logs" / "episode-0"
    log.mkdir()
    (log / "debug.json").write_text(
        '{"error": "litellm.InternalServerError: OpenAIException - Error code: 502 - '
        '{\'error\': {\'message\': \'upstream closed\'}}"}\n')
    s = tb_route.summarize(run, tb_exit=0, wall_s=600.0, extra={"timeout_multiplier": 1.0})
    assert (s["resolved"], s["total"], s["percent"]) == (1, 7, 14.29)
    assert s["classes"] == {"agent_timeout": 1, "test_failure": 1, "route_http_error": 1,
                            "model_output_error": 1, "harness_error": 2}  # 1 + 1 never run
    assert s["regime"] == "stock" and s["stock"] is True and s["http_error_lines"] == 1
    assert s["dataset"] == "terminal-bench-core==0.1.1" and s["wall_s"] == 600.0
    assert json.loads((run / "summary.json").read_text()) == s
    line = tb_route.describe(s)
    assert line.startswith("[stock] 2026-11-29__20-22-52__stock: 1/7 resolved (14.29 %) in 10.0")
    assert "HTTP error from the route 1" in line and "harness error 2" in line
    # summarize again (by hand) keeps the invocation and wall time
    assert tb_route.summarize(run)["wall_s"] == 600.0


def test_runs_of_two_regimes_are_listed_apart_never_merged(tmp_path):
    runs = tmp_path / "runs"
    stock = tb_run_dir(runs / "stock", "A__stock", [trial("t", "A", True, "unset", {"x": "passed"})], 1)
    diag = tb_run_dir(runs / "diagnostic-x4", "B__diagnostic-x4",
                      [trial("t", "B", False, "agent_timeout", None)], 1)
    tb_route.summarize(stock, extra={"timeout_multiplier": 1.0})
    tb_route.summarize(diag, extra={"timeout_multiplier": 4.0})
    listed = tb_route.list_runs(str(runs))
    assert [(r["run_id"], r["regime"], r["resolved"], r["total"]) for r in listed] == [
        ("B__diagnostic-x4", "diagnostic-x4", 0, 1), ("A__stock", "stock", 1, 1)]
    assert all("trials" not in r for r in listed)

    from tools.route_report import workload_markdown

    text = "\n".join(workload_markdown(listed))
    stock_part, diag_part = text.split("### diagnostic-x4")
    assert "### stock (1x timeouts)" in stock_part
    assert "| *field report: GLM-5.2 MXFP4 on an M3 Ultra* | terminal-bench-core==0.1.1 | " \
           "terminus-2 | openai/glm52 | 23/80 | 28.75 | ~12 h 28 min |" in stock_part
    assert "A__stock" in stock_part and "B__diagnostic" not in stock_part
    assert "NOT comparable with stock runs" in diag_part and "A__stock" not in diag_part
    assert "| B__diagnostic-x4 | terminal-bench-core==0.1.1 | terminus-2 | openai/glm52 | " \
           "0/1 | 0.00 | 10 min 0 s | 1 | 0 | 0 | 0 | 0 |" in diag_part
